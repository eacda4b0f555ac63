//! Socket kinds other than TCP and UDP, judged at `socket()` by `cgroup/sock_create`: ICMP ping
//! sockets, UDP-Lite, MPTCP and raw sockets, over IPv4 and IPv6, from inside the managed cgroup
//! (and once from outside it). Each case is counted where it would arrive (the ICMP echo
//! counter of the sandbox's namespace for ping, a UDP-Lite sink, a TCP sink, a UDP sink for the
//! raw UDP datagram), then in the per-hook and per-row counters and in the events.
//!
//! What each kind needs is the EgressConfig's `allowSockets` entry: `icmp` (ping sockets, both
//! families), `udplite`, `mptcp`, `raw`; and MPTCP, on this kernel, a tcp rule as well: its
//! connects reach `cgroup/connect4`/`6` as TCP, through the subflow
//! (`allow_sockets_lets_each_named_kind_through` says more).

use std::{collections::HashMap, net::IpAddr, path::Path, time::Duration};

use egress_common::RuleCounters;
use egress_tests::{
    Attempted, Sandbox, V4_A, V6_A, Vector, counted,
    matrix::AnySink,
    policy::{Rule, config, load},
    sa,
    sinks::echo_requests,
    vector::attempt,
    vector_bin,
};
use egress_user::{
    compile::{BYPASS_NAME, NO_RULE_NAME},
    events::{self, EventRecord, Hook, Verdict},
    loader::{Enforcer, RowCount},
    pipeline,
};

const VECTOR: &str = vector_bin!();
const TIMEOUT: Duration = Duration::from_secs(3);
const BASE_PORT: u16 = 25000;
const EPERM: i32 = libc::EPERM;

/// The vectors under test: every socket kind `allowSockets` names by itself, and raw UDP.
fn kinds() -> impl Iterator<Item = Vector> {
    Vector::SOCKET_KINDS.into_iter().chain([Vector::RawUdp])
}

/// One attempt: a vector to an address of the sandbox, on its own port.
#[derive(Clone, Copy, Debug)]
struct Case {
    vector: Vector,
    ip: IpAddr,
    port: u16,
}

impl Case {
    /// The IP protocol `sock_create` sees for the case's socket.
    fn protocol(&self) -> u16 {
        match (self.vector, self.ip.is_ipv4()) {
            (Vector::Ping, true) => 1,
            (Vector::Ping, false) => 58,
            (Vector::Udplite, _) => 136,
            (Vector::Mptcp, _) => 262,
            (Vector::RawUdp, _) => 17,
            (other, _) => unreachable!("{other} is not a case here"),
        }
    }

    fn raw(&self) -> bool {
        self.vector == Vector::RawUdp
    }
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} to {}", self.vector, sa(self.ip, self.port))
    }
}

/// Every kind to 192.0.2.1 and to 2001:db8::1, each on its own port.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (vi, vector) in kinds().enumerate() {
        for (fi, ip) in [IpAddr::from(V4_A), V6_A.into()].into_iter().enumerate() {
            cases.push(Case {
                vector,
                ip,
                port: BASE_PORT + (vi * 2 + fi) as u16,
            });
        }
    }
    cases
}

/// What a case should come to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// `ok` (for ping: the reply came), and it arrived once.
    Arrives,
    /// The tool failed with EPERM at this stage, and nothing arrived.
    Denied(&'static str),
}

/// `socket()` refused with EPERM: `cgroup/sock_create`'s denial.
const REFUSED: Expect = Expect::Denied("socket");

/// Runs every case from the sandbox's namespace (inside `cgroup` when given); returns one
/// line per case that did not come to what `expect` says.
fn run(sb: &Sandbox, cgroup: Option<&Path>, expect: impl Fn(&Case) -> Expect) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases() {
        let want = expect(&case);
        let addr = sa(case.ip, case.port);
        let sink =
            (case.vector != Vector::Ping).then(|| AnySink::start(case.vector, &sb.name, addr));
        let echoes = echo_requests(&sb.name, case.ip);
        let got = attempt(VECTOR, &sb.name, cgroup, case.vector, addr, TIMEOUT);
        let arrived = match &sink {
            None => {
                std::thread::sleep(Duration::from_millis(30));
                echo_requests(&sb.name, case.ip) - echoes
            }
            Some(AnySink::Tcp(s)) => s.accepted() as u64,
            Some(AnySink::Udp(s)) => {
                let datagrams = s.datagrams();
                let payload = case.vector.payload();
                if datagrams.iter().any(|d| d.payload != payload) {
                    failures.push(format!("{case}: unexpected datagrams {datagrams:?}"));
                }
                datagrams.len() as u64
            }
            Some(AnySink::Syn(_)) => unreachable!("no SYN sink here"),
        };
        let ok = match want {
            Expect::Arrives => got == Attempted::Ok && arrived == 1,
            Expect::Denied(stage) => got.failed_with(stage, EPERM) && arrived == 0,
        };
        if ok {
            eprintln!("{case}: {got:?}, arrived {arrived}, as expected ({want:?})");
        } else {
            failures.push(format!(
                "{case}: the tool said {got:?} and {arrived} arrived; wanted {want:?}"
            ));
        }
    }
    failures
}

/// Every case run against one policy: the sandbox, the enforcer that judged the cases, and
/// the events they made.
struct Trial {
    sb: Sandbox,
    enforcer: Enforcer,
    events: Vec<EventRecord>,
}

/// Applies `yaml` in a sandbox whose namespace lets ping sockets be made (so only the filter
/// can refuse them), runs every case (from inside the managed cgroup when `in_cgroup`) and
/// fails the test if one did not come to what `expect` says; then takes the events.
fn trial(yaml: &str, in_cgroup: bool, expect: impl Fn(&Case) -> Expect) -> Trial {
    let sb = Sandbox::new();
    sb.allow_ping();
    let mut enforcer = pipeline::apply(&sb.target(), &load(yaml)).expect("apply");
    let mut ring = enforcer.take_events().expect("events");
    let cgroup = in_cgroup.then_some(sb.cgroup.as_path());
    let failures = run(&sb, cgroup, expect);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let events = drain(&mut enforcer, &mut ring);
    Trial {
        sb,
        enforcer,
        events,
    }
}

impl Trial {
    /// Fails the test unless each named hook counted what `want` says of it.
    fn assert_hooks(&self, want: &[(&str, RuleCounters)]) {
        assert_counts("hook", self.enforcer.hooks().expect("hooks"), want);
    }

    /// Fails the test unless each named row counted what `want` says of it.
    fn assert_rows(&self, want: &[(&str, RuleCounters)]) {
        assert_counts("row", self.enforcer.counters().expect("counters"), want);
    }
}

/// Fails the test unless each of the named `rows` (of hooks or of rules: `what`) counted what
/// `want` says of it.
fn assert_counts(what: &str, rows: Vec<RowCount>, want: &[(&str, RuleCounters)]) {
    let got = by_name(rows);
    for (name, counted) in want {
        assert_eq!(got[*name], *counted, "{what} {name}: {got:?}");
    }
}

/// An EgressRule allowing tcp and udp on every case port of both addresses: what a rule can
/// say about these destinations, which must not open a socket kind.
fn rules_for_every_port() -> String {
    let ports: Vec<u16> = cases().iter().map(|c| c.port).collect();
    ["192.0.2.1", "2001:db8::1"]
        .iter()
        .enumerate()
        .map(|(i, service)| {
            Rule::new(&format!("ports-{i}"), service)
                .tcp_and_udp(ports.iter().copied())
                .to_string()
        })
        .collect()
}

fn by_name(rows: Vec<RowCount>) -> HashMap<String, RuleCounters> {
    rows.into_iter().map(|r| (r.name, r.counters)).collect()
}

/// The events now in the enforcer's ring.
fn drain(
    enforcer: &mut Enforcer,
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
) -> Vec<EventRecord> {
    events::drain(ring, |_, row| enforcer.row_name(row).map(str::to_owned))
}

/// Checks one event's common fields: `verdict` on `rule`, by `egress-vector` in the sandbox's
/// cgroup.
fn check_event(sb: &Sandbox, e: &EventRecord, verdict: Verdict, rule: &str) {
    assert_eq!(e.verdict, verdict, "{e:?}");
    assert_eq!(e.rule, rule, "{e:?}");
    assert_eq!(e.comm, "egress-vector", "{e:?}");
    assert_eq!(e.cgroup_id, sb.cgroup_id(), "{e:?}");
}

/// Checks that the sock_create events among `events` are exactly one `verdict` per case
/// `picked` picks, on the `(no rule)` row, with the socket's protocol, family and raw flag
/// (and no destination: a new socket has none).
fn check_sock_create_events(
    sb: &Sandbox,
    events: &[EventRecord],
    verdict: Verdict,
    picked: impl Fn(&Case) -> bool,
) {
    let mut got: Vec<(u16, bool, bool)> = Vec::new();
    for e in events.iter().filter(|e| e.hook == Hook::SockCreate) {
        check_event(sb, e, verdict, NO_RULE_NAME);
        assert!(e.destination.ip().is_unspecified(), "{e:?}");
        assert_eq!(e.destination.port(), 0, "{e:?}");
        got.push((e.protocol, e.raw, e.destination.is_ipv4()));
    }
    let mut want: Vec<(u16, bool, bool)> = cases()
        .iter()
        .filter(|c| picked(c))
        .map(|c| (c.protocol(), c.raw(), c.ip.is_ipv4()))
        .collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(
        got, want,
        "(protocol, raw, ipv4) of the sock_create events: {events:#?}"
    );
}

/// The events of `hook` among `events`, as (destination, protocol), sorted.
fn at_hook(events: &[EventRecord], hook: Hook) -> Vec<(std::net::SocketAddr, u16)> {
    let mut got: Vec<_> = events
        .iter()
        .filter(|e| e.hook == hook)
        .map(|e| (e.destination, e.protocol))
        .collect();
    got.sort_unstable();
    got
}

/// The addresses of the cases of `vector`, with `protocol`, sorted.
fn targets(vector: Vector, protocol: u16) -> Vec<(std::net::SocketAddr, u16)> {
    let mut want: Vec<_> = cases()
        .iter()
        .filter(|c| c.vector == vector)
        .map(|c| (sa(c.ip, c.port), protocol))
        .collect();
    want.sort_unstable();
    want
}

/// With no `allowSockets`, every one of them fails at `socket()` with EPERM, even where a
/// rule allows its address and port over tcp and udp; nothing arrives; sock_create counts one
/// denial each and reports it with the socket's protocol (and `raw` for the raw one only).
#[test]
fn other_socket_kinds_are_refused_at_socket_by_default() {
    let t = trial(&rules_for_every_port(), true, |_| REFUSED);
    t.assert_hooks(&[
        ("sock_create", counted(0, 8, 0)),
        ("connect", counted(0, 0, 0)),
        ("sendmsg", counted(0, 0, 0)),
    ]);
    t.assert_rows(&[
        (NO_RULE_NAME, counted(0, 8, 0)),
        ("ports-0", counted(0, 0, 0)),
        ("ports-1", counted(0, 0, 0)),
    ]);
    assert_eq!(t.events.len(), 8, "{:#?}", t.events);
    check_sock_create_events(&t.sb, &t.events, Verdict::Deny, |_| true);
}

/// `allowSockets: [icmp, udplite, mptcp, raw]`: each socket is made, counted as allowed by
/// sock_create on the `(bypass)` row without an event; ping gets its reply, and the UDP-Lite
/// and raw UDP datagrams arrive, the UDP-Lite `sendto()` passing sendmsg as a bypass too.
///
/// MPTCP is the exception: the socket is made, but its `connect()` is judged by the TCP rules
/// and, with none for the address, denied (EPERM at `connect`). The kernel connects an MPTCP
/// socket through its first subflow, a TCP socket (`sk_protocol` 6) in the same cgroup, and
/// runs `cgroup/connect4`/`connect6` on that subflow; the hook sees plain TCP. This differs
/// from docs/policy.md ("an allowed one is not judged by rules"); see
/// `an_allowed_mptcp_socket_connects_where_a_tcp_rule_allows`.
#[test]
fn allow_sockets_lets_each_named_kind_through() {
    let t = trial(
        &config("  allowSockets: [icmp, udplite, mptcp, raw]\n"),
        true,
        |c| match c.vector {
            Vector::Mptcp => Expect::Denied("connect"),
            _ => Expect::Arrives,
        },
    );
    t.assert_hooks(&[
        ("sock_create", counted(8, 0, 0)),
        // The UDP-Lite sendto()s; ping and raw sockets meet no sendmsg hook.
        ("sendmsg", counted(2, 0, 0)),
        // The MPTCP subflows' connects, judged as TCP.
        ("connect", counted(0, 2, 0)),
    ]);
    t.assert_rows(&[
        (BYPASS_NAME, counted(8 + 2, 0, 0)),
        (NO_RULE_NAME, counted(0, 2, 0)),
    ]);

    // Only the denials make events (`events: denied`, the default): the MPTCP connects, as TCP.
    for e in &t.events {
        check_event(&t.sb, e, Verdict::Deny, NO_RULE_NAME);
        assert!(!e.raw, "{e:?}");
    }
    assert_eq!(at_hook(&t.events, Hook::Connect), targets(Vector::Mptcp, 6));
    assert_eq!(t.events.len(), 2, "{:#?}", t.events);
}

/// With `allowSockets: [mptcp]` and a tcp rule for the MPTCP sinks' ports, the MPTCP
/// connections arrive, counted on that rule at the connect hook: what an MPTCP socket needs
/// on this kernel is both.
#[test]
fn an_allowed_mptcp_socket_connects_where_a_tcp_rule_allows() {
    let ports: String = cases()
        .iter()
        .filter(|c| c.vector == Vector::Mptcp)
        .map(|c| format!("    - port: {}\n      protocol: tcp\n", c.port))
        .collect();
    let rules: String = ["192.0.2.1", "2001:db8::1"]
        .iter()
        .enumerate()
        .map(|(i, service)| {
            format!(
                "kind: EgressRule\nmetadata:\n  name: mptcp-{i}\nspec:\n  destination:\n    service: {service}\n  ports:\n{ports}---\n"
            )
        })
        .collect();
    let t = trial(
        &(rules + &config("  allowSockets: [mptcp]\n")),
        true,
        |c| match c.vector {
            Vector::Mptcp => Expect::Arrives,
            _ => REFUSED,
        },
    );
    t.assert_hooks(&[
        ("sock_create", counted(2, 6, 0)),
        ("connect", counted(2, 0, 0)),
    ]);
    t.assert_rows(&[
        ("mptcp-0", counted(1, 0, 0)),
        ("mptcp-1", counted(1, 0, 0)),
        (BYPASS_NAME, counted(2, 0, 0)),
    ]);
    assert_eq!(t.events.len(), 6, "{:#?}", t.events);
    check_sock_create_events(&t.sb, &t.events, Verdict::Deny, |c| {
        c.vector != Vector::Mptcp
    });
}

/// `allowSockets: [udplite]` opens UDP-Lite alone: ping, MPTCP and raw sockets are still
/// refused at `socket()`.
#[test]
fn one_allowed_kind_does_not_open_the_others() {
    let udplite = |c: &Case| c.vector == Vector::Udplite;
    let t = trial(&config("  allowSockets: [udplite]\n"), true, |c| {
        if udplite(c) { Expect::Arrives } else { REFUSED }
    });
    t.assert_hooks(&[
        ("sock_create", counted(2, 6, 0)),
        ("sendmsg", counted(2, 0, 0)),
        ("connect", counted(0, 0, 0)),
    ]);
    t.assert_rows(&[
        (BYPASS_NAME, counted(2 + 2, 0, 0)),
        (NO_RULE_NAME, counted(0, 6, 0)),
    ]);
    assert_eq!(t.events.len(), 6, "{:#?}", t.events);
    check_sock_create_events(&t.sb, &t.events, Verdict::Deny, |c| !udplite(c));
}

/// Audit mode without `allowSockets`: every one goes through, and sock_create counts it as
/// `would_deny` and reports it. The hooks after it judge what they see as they would in
/// enforce mode: the UDP-Lite `sendto()` at sendmsg (a socket sock_create would have
/// refused) and the MPTCP subflow's connect as TCP without a rule, both would-deny too.
#[test]
fn audit_mode_lets_them_through_as_would_deny() {
    let t = trial(&config("  mode: audit\n"), true, |_| Expect::Arrives);
    t.assert_hooks(&[
        ("sock_create", counted(0, 0, 8)),
        ("sendmsg", counted(0, 0, 2)),
        ("connect", counted(0, 0, 2)),
    ]);
    t.assert_rows(&[(NO_RULE_NAME, counted(0, 0, 12))]);

    assert_eq!(t.events.len(), 12, "{:#?}", t.events);
    check_sock_create_events(&t.sb, &t.events, Verdict::WouldDeny, |_| true);
    for e in &t.events {
        check_event(&t.sb, e, Verdict::WouldDeny, NO_RULE_NAME);
    }
    assert_eq!(
        at_hook(&t.events, Hook::Sendmsg),
        targets(Vector::Udplite, 136)
    );
    assert_eq!(at_hook(&t.events, Hook::Connect), targets(Vector::Mptcp, 6));
}

/// The same process outside the managed cgroup is never refused: the programs judge the
/// managed cgroup only, and count and report nothing for it.
#[test]
fn outside_the_cgroup_nothing_is_refused() {
    let t = trial(&rules_for_every_port(), false, |_| Expect::Arrives);
    let hooks = by_name(t.enforcer.hooks().expect("hooks"));
    for (hook, c) in &hooks {
        assert_eq!(*c, counted(0, 0, 0), "{hook}: {hooks:?}");
    }
    assert!(t.events.is_empty(), "{:#?}", t.events);
}

/// Without `net.ipv4.ping_group_range` (empty in a new namespace), the kernel refuses a ping
/// socket itself, with EACCES, before `cgroup/sock_create` runs: which is why the other tests
/// open the range first, so that only the filter can refuse one.
#[test]
fn the_kernel_refuses_ping_sockets_before_the_filter_without_ping_group_range() {
    let sb = Sandbox::new();
    let policy = load(&config("  mode: enforce\n"));
    let enforcer = pipeline::apply(&sb.target(), &policy).expect("apply");
    for ip in [IpAddr::from(V4_A), V6_A.into()] {
        let got = attempt(
            VECTOR,
            &sb.name,
            Some(&sb.cgroup),
            Vector::Ping,
            sa(ip, 0),
            TIMEOUT,
        );
        assert!(
            got.failed_with("socket", libc::EACCES),
            "ping {ip}: {got:?}"
        );
    }
    assert_counts(
        "hook",
        enforcer.hooks().expect("hooks"),
        &[("sock_create", counted(0, 0, 0))],
    );
}
