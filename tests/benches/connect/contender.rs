//! A contender: one way of filtering (or not), its sandbox, sinks and load generator.

use std::{
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use egress_tests::{Sandbox, V4_A, in_netns, sa};
use egress_user::{compile::NO_RULE_NAME, loader::Enforcer, pipeline, policy::Policy};

pub use crate::client::Round;
use crate::{DENIED_PORT, PORT, TARGET_RULE, client::Client, rulesets::netns_exec, sink::FastSink};

/// What a contender's connects must do.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Every connect is established (and reaches the sink).
    Connected,
    /// Every connect fails with `EPERM` (and nothing reaches the sink).
    Denied,
}

/// Which filter a contender measures, for the rule-scaling table and the plot.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    None,
    Egress,
    IptablesNft,
    NftSet,
    EgressDenied,
    /// egress with scopes, the client's cgroup in one.
    EgressScoped,
}

impl Kind {
    /// Its name in the JSON results.
    pub fn label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Egress => "egress",
            Self::IptablesNft => "iptables-nft",
            Self::NftSet => "nft-set",
            Self::EgressDenied => "egress-denied",
            Self::EgressScoped => "egress-scoped",
        }
    }
}

/// One way of filtering (or not), with its own sandbox, sinks and load generator.
pub struct Contender {
    /// The name in the report.
    pub name: String,
    // Declared before the sandbox: the client leaves the cgroup before the sandbox removes it.
    client: Option<Client>,
    sinks: Vec<FastSink>,
    /// Its netns, cgroup and pin directory.
    pub sandbox: Sandbox,
    /// Where its connects go.
    pub target: SocketAddr,
    /// What they must do.
    pub expect: Expect,
    /// Which filter, and how many (network, port) keys it holds.
    pub kind: Kind,
    pub keys: usize,
    /// Untimed connects before each timed block.
    pub warmup: u64,
    /// The egress policy in force on its cgroup, if it is an egress contender.
    pub enforcer: Option<Enforcer>,
    /// How long putting the ruleset in force took.
    pub load: Option<Duration>,
    /// The timed rounds of metric 1.
    pub rounds: Vec<Round>,
    /// Connects made since [`Self::begin`], warm-up included.
    total: u64,
    /// The sink's count and the judged counter at [`Self::begin`].
    accepted_before: u64,
    counter_before: u64,
}

impl Contender {
    /// A contender with nothing filtering yet: a fresh sandbox and its sinks.
    pub fn new(
        name: impl Into<String>,
        target: SocketAddr,
        expect: Expect,
        sink_cpu: Option<usize>,
    ) -> Self {
        let sandbox = Sandbox::new();
        // A listener on the denied port too, so that a filter failing open would connect
        // (and the client, expecting EPERM, would stop the bench) instead of being refused.
        let sinks = [PORT, DENIED_PORT]
            .map(|port| FastSink::start(&sandbox.name, sa(V4_A, port), sink_cpu))
            .into();
        Self {
            name: name.into(),
            client: None,
            sinks,
            sandbox,
            target,
            expect,
            kind: Kind::None,
            keys: 0,
            warmup: 0,
            enforcer: None,
            load: None,
            rounds: Vec::new(),
            total: 0,
            accepted_before: 0,
            counter_before: 0,
        }
    }

    /// Says which filter it measures with how many keys.
    pub fn of(mut self, kind: Kind, keys: usize) -> Self {
        self.kind = kind;
        self.keys = keys;
        self
    }

    /// Puts `policy` in force on the contender's cgroup.
    pub fn with_egress(mut self, policy: &Policy) -> Self {
        let started = Instant::now();
        let enforcer = pipeline::apply(&self.sandbox.target(), policy)
            .unwrap_or_else(|e| panic!("{}: loading the policy: {}", self.name, chain(&e)));
        self.load = Some(started.elapsed());
        self.enforcer = Some(enforcer);
        self
    }

    /// Puts `policy` in force on the contender's cgroup, with that cgroup in the scope of
    /// namespace `namespace` as a pod of it would be: its sockets' scope is found by the walk
    /// up their cgroup's ancestors.
    pub fn with_egress_in_scope(mut self, policy: &Policy, namespace: &str) -> Self {
        let started = Instant::now();
        let id = egress_user::cgroup::id(&self.sandbox.cgroup)
            .unwrap_or_else(|e| panic!("{}: the cgroup's id: {e}", self.name));
        let pods = [(id, namespace.to_owned())];
        let enforcer = pipeline::apply_with_pods(&self.sandbox.target(), policy, &pods)
            .unwrap_or_else(|e| panic!("{}: loading the policy: {}", self.name, chain(&e)));
        self.load = Some(started.elapsed());
        self.enforcer = Some(enforcer);
        self
    }

    /// Takes an enforcer loaded elsewhere (timed by the caller).
    pub fn enforced_by(mut self, enforcer: Enforcer, load: Duration) -> Self {
        self.enforcer = Some(enforcer);
        self.load = Some(load);
        self
    }

    /// Loads a netfilter ruleset into the contender's netns with `loader` (a command reading
    /// the ruleset on stdin), and checks that it resets a connection it does not allow.
    pub fn load_ruleset(&mut self, loader: &[&str], rules: &str) {
        let started = Instant::now();
        netns_exec(&self.sandbox.name, loader, rules);
        self.load = Some(started.elapsed());
        // The ruleset must reset anything it does not allow, even with a listener there.
        let refused = in_netns(&self.sandbox.name, || {
            TcpStream::connect_timeout(&sa(V4_A, DENIED_PORT), Duration::from_secs(2))
        });
        match refused {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            other => panic!(
                "{}: a connect to port {DENIED_PORT} should be reset by the ruleset, got {other:?}",
                self.name
            ),
        }
    }

    /// The sink its connects go to.
    fn sink_for_target(&self) -> &FastSink {
        &self.sinks[usize::from(self.target.port() != PORT)]
    }

    /// The counter that proves the filter judged this contender's connects: the target rule's
    /// `allowed`, or the `(no rule)` row's `denied`.
    fn judged(&self) -> Option<u64> {
        let enforcer = self.enforcer.as_ref()?;
        let rows = enforcer
            .counters()
            .unwrap_or_else(|e| panic!("{}: reading counters: {}", self.name, chain(&e)));
        let (row, field): (&str, fn(&egress_common::RuleCounters) -> u64) = match self.expect {
            Expect::Connected => (TARGET_RULE, |c| c.allowed),
            Expect::Denied => (NO_RULE_NAME, |c| c.denied),
        };
        let found = rows
            .iter()
            .find(|r| r.name == row)
            .unwrap_or_else(|| panic!("{}: no row {row}", self.name));
        Some(field(&found.counters))
    }

    /// Starts counting connects, for [`Self::verify`].
    pub fn begin(&mut self) {
        self.accepted_before = self.sink_for_target().wait_for(0);
        self.counter_before = self.judged().unwrap_or(0);
        self.total = 0;
    }

    /// Runs one block of connects (starting the load generator the first time).
    pub fn block(
        &mut self,
        client_cpu: Option<usize>,
        warmup: u64,
        count: u64,
        budget_ms: u64,
    ) -> Round {
        if self.client.is_none() {
            self.client = Some(Client::start(
                &self.name,
                &self.sandbox,
                self.target,
                self.expect == Expect::Connected,
                client_cpu,
            ));
        }
        let client = self.client.as_mut().expect("started above");
        let round = client.block(warmup, count, budget_ms);
        self.total += round.total;
        round
    }

    /// Checks that every connect since [`Self::begin`] was seen by the sink (or not at all,
    /// when denied) and judged by the filter.
    pub fn verify(&self) {
        let total = self.total;
        let sink = self.sink_for_target();
        let expected_at_sink = self.accepted_before
            + if self.expect == Expect::Connected {
                total
            } else {
                0
            };
        let accepted = sink.wait_for(expected_at_sink);
        assert_eq!(
            accepted,
            expected_at_sink,
            "{}: the sink accepted {} connections, the client made {total} that should {}",
            self.name,
            accepted - self.accepted_before,
            if self.expect == Expect::Connected {
                "all arrive"
            } else {
                "all be denied"
            }
        );
        if let Some(after) = self.judged() {
            assert_eq!(
                after - self.counter_before,
                total,
                "{}: the filter's counter moved by {}, but the client made {total} connects: the filter did not judge them",
                self.name,
                after - self.counter_before
            );
        }
    }
}

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(&format!(": {s}"));
        source = s.source();
    }
    out
}
