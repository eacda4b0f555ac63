//! FQDN rules (issue 18): seed 003 written with names. `www.wikipedia.test` and
//! `*.wikipedia.test` are tcp/443 rules; a DNS server the test runs in its sandbox answers
//! with TEST-NET addresses; workloads resolve through glibc (`egress-resolve`, the sandbox's
//! resolv.conf, which the agent reads too) and connect. Counted at the sinks, in the rules'
//! counters and in the learned-address maps.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use egress_tests::{
    Agent, Attempted, Family, Sandbox, Sink, Vector, egress_bin, resolv_conf_text, resolve_bin, sa,
    status_row, vector::attempt, vector_bin,
};
use egress_user::loader::{PinDir, learned::LearnedMaps};

const EGRESS: &str = egress_bin!();
const RESOLVE: &str = resolve_bin!();
const VECTOR: &str = vector_bin!();
const PROBE: &str = egress_tests::probe_bin!();

/// The resolver of the sandbox's resolv.conf.
const RESOLVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
/// `www.wikipedia.test`.
const WWW: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const WWW6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
/// `cdn.edge.test`, the end of `en.wikipedia.test`'s CNAME chain.
const CDN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
/// `evil.test`: in an answer, but for a name no rule allows.
const EVIL: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// In no answer at all.
const NOWHERE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);

/// Seed 003's idea with names: the two rules by name instead of Wikipedia's five CIDRs.
const POLICY: &str = "\
kind: EgressRule
metadata:
  name: wikipedia
spec:
  destination:
    service: www.wikipedia.test
  ports:
  - port: 443
    protocol: tcp
---
kind: EgressRule
metadata:
  name: wikipedias
spec:
  destination:
    service: \"*.wikipedia.test\"
  ports:
  - port: 443
    protocol: tcp
---
kind: EgressRule
metadata:
  name: ntp
spec:
  destination:
    service: time.test
  ports:
  - port: 123
    protocol: udp
";

/// A sandbox with the resolver, the upstreams on 443 and an agent enforcing [`POLICY`].
struct World {
    sb: Sandbox,
    dns: egress_tests::DnsServer,
    resolv: PathBuf,
    policy: PathBuf,
    agent: Option<Agent>,
}

impl World {
    fn start() -> Self {
        let sb = Sandbox::new();
        let addrs: Vec<String> = [RESOLVER, WWW, CDN, EVIL, NOWHERE]
            .iter()
            .map(|a| format!("{a}/32"))
            .chain([format!("{WWW6}/128")])
            .collect();
        sb.add_addrs(&addrs);
        let dns = sb.dns_server(sa(RESOLVER, 53));
        dns.set_a("www.wikipedia.test", &[WWW], 300);
        dns.set_aaaa("www.wikipedia.test", &[WWW6], 300);
        dns.set_cname("en.wikipedia.test", "cdn.edge.test", 300);
        dns.set_a("cdn.edge.test", &[CDN], 300);
        dns.set_a("evil.test", &[EVIL], 300);
        let resolv = sb.resolv_conf();
        std::fs::write(
            &resolv,
            resolv_conf_text(&[IpAddr::V4(RESOLVER)], "timeout:2 attempts:2"),
        )
        .expect("writing resolv.conf");
        let policy = sb.policy_file("policy.yaml", POLICY);
        let mut world = Self {
            sb,
            dns,
            resolv,
            policy,
            agent: None,
        };
        world.agent = Some(world.start_agent());
        world
    }

    /// Starts an agent on [`POLICY`] (a first one, or one taking over).
    fn start_agent(&self) -> Agent {
        self.sb
            .agent(EGRESS)
            .policy(&self.policy, &["--no-watch"])
            .log("egress_user::agent::dns=debug,info")
            .start()
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent running")
    }

    /// A direct connect (no lookup) from the managed cgroup.
    fn connect(&self, addr: SocketAddr) -> Attempted {
        attempt(
            VECTOR,
            &self.sb.name,
            Some(&self.sb.cgroup),
            Vector::Tcp,
            addr,
            Duration::from_secs(3),
        )
    }

    /// The learned entries: (scope id, port, protocol, address).
    fn learned(&self) -> Vec<(u64, u16, u8, IpAddr)> {
        let maps = LearnedMaps::open(&PinDir::new(&self.sb.pin_dir)).expect("learned maps");
        let mut entries: Vec<_> = maps
            .entries()
            .into_iter()
            .map(|(scope, port, proto, addr, _)| (scope, port, proto, addr))
            .collect();
        entries.sort();
        entries
    }
}

#[test]
fn names_allow_the_addresses_their_answers_gave_and_nothing_else() {
    let w = World::start();
    let sinks: Vec<Sink> = [
        IpAddr::V4(WWW),
        IpAddr::V6(WWW6),
        IpAddr::V4(CDN),
        IpAddr::V4(EVIL),
        IpAddr::V4(NOWHERE),
    ]
    .into_iter()
    .map(|ip| w.sb.sink(sa(ip, 443)))
    .collect();
    let [www, www6, cdn, evil, nowhere] = &sinks[..] else {
        unreachable!()
    };

    // Before any answer, the name's address is refused like any other.
    assert!(
        w.connect(sa(WWW, 443)).failed_with("connect", libc::EPERM),
        "www before its lookup"
    );
    assert_eq!(www.accepted(), 0);
    assert!(w.learned().is_empty(), "{:?}", w.learned());

    // glibc asks A and AAAA; the answer comes back through the agent, which allowed both
    // addresses before releasing it: the first connect (to the first address) succeeds.
    let got =
        w.sb.resolve(RESOLVE, &w.resolv)
            .connect(443)
            .run(&["www.wikipedia.test"]);
    let lookup = &got.lookups[0];
    let mut addrs = lookup.addrs.clone().expect("www.wikipedia.test resolves");
    addrs.sort();
    assert_eq!(addrs, [IpAddr::V4(WWW), IpAddr::V6(WWW6)], "{got:?}");
    assert_eq!(lookup.connect, Some(Ok(())), "{got:?}\n{}", w.agent().log());
    assert!(
        w.dns.queries_for("www.wikipedia.test") >= 2,
        "the resolver answered"
    );
    // And the other address of the same answer, directly.
    assert_eq!(w.connect(sa(WWW, 443)), Attempted::Ok);
    assert_eq!(w.connect(sa(WWW6, 443)), Attempted::Ok);
    // The lookup's connect went to one of the two (glibc's order), then one more each.
    let (four, six) = (www.accepted(), www6.accepted());
    assert!(four + six == 3 && four >= 1 && six >= 1, "({four}, {six})");
    // Only port 443: the rule's port.
    assert!(
        w.connect(sa(WWW, 80)).failed_with("connect", libc::EPERM),
        "www on port 80"
    );

    // A CNAME chain: the wildcard matches the question, the address is the chain's end's.
    let got =
        w.sb.resolve(RESOLVE, &w.resolv)
            .family(Family::V4)
            .connect(443)
            .run(&["en.wikipedia.test"]);
    assert_eq!(got.lookups[0].addrs, Ok(vec![IpAddr::V4(CDN)]), "{got:?}");
    assert_eq!(got.lookups[0].connect, Some(Ok(())), "{got:?}");
    assert_eq!(cdn.accepted(), 1);

    // A name no rule allows still resolves (DNS is not the filter), but its address stays
    // refused, as does an address no answer gave.
    let got =
        w.sb.resolve(RESOLVE, &w.resolv)
            .family(Family::V4)
            .connect(443)
            .run(&["evil.test"]);
    assert_eq!(got.lookups[0].addrs, Ok(vec![IpAddr::V4(EVIL)]), "{got:?}");
    assert_eq!(
        got.lookups[0].connect,
        Some(Err("EPERM".to_owned())),
        "{got:?}"
    );
    assert!(
        w.connect(sa(NOWHERE, 443))
            .failed_with("connect", libc::EPERM)
    );
    assert_eq!((evil.accepted(), nowhere.accepted()), (0, 0));

    // What the kernel holds: the answers' addresses on 443/tcp for scope 0, nothing else.
    let tcp = egress_common::PROTO_TCP;
    assert_eq!(
        w.learned(),
        [
            (0, 443, tcp, IpAddr::V4(WWW)),
            (0, 443, tcp, IpAddr::V4(CDN)),
            (0, 443, tcp, IpAddr::V6(WWW6)),
        ]
    );
    // `egress maps` shows them, with the rule that allowed each.
    let out = std::process::Command::new(EGRESS)
        .args([
            "maps",
            "--pin-dir",
            &w.sb.pin_dir.display().to_string(),
            "-o",
            "json",
        ])
        .output()
        .expect("egress maps");
    let maps: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let shown: Vec<(String, String, String)> = maps["learned"]
        .as_array()
        .expect("learned")
        .iter()
        .map(|l| {
            assert!(l["expires_in_s"].as_f64().expect("expiry") > 200.0, "{l}");
            (
                l["destination"].as_str().expect("destination").to_owned(),
                l["port"].as_str().expect("port").to_owned(),
                l["rule"].as_str().expect("rule").to_owned(),
            )
        })
        .collect();
    assert_eq!(shown.len(), 3, "{maps:#}");
    assert!(
        shown.contains(&(
            CDN.to_string(),
            "443/tcp".to_owned(),
            "wikipedias".to_owned()
        )),
        "{shown:?}"
    );
    // Counted on the rules that allowed them: www.wikipedia.test matches both rules (either
    // one's row may hold the entry: the last answer's), en.wikipedia.test only the wildcard.
    let status = w.sb.status_json(EGRESS);
    let allowed = |name: &str| {
        status_row(&status, name)["allowed"]
            .as_u64()
            .expect("allowed")
    };
    assert_eq!(
        allowed("wikipedia") + allowed("wikipedias"),
        4,
        "{status:#}"
    );
    assert!(allowed("wikipedias") >= 1, "{status:#}");
}

#[test]
fn the_first_connect_after_each_answer_succeeds_a_thousand_times() {
    let w = World::start();
    // 1,000 names, each answered with an address of its own: no connect can ride on an
    // address an earlier answer taught.
    let ip = |i: usize| Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250 + 1) as u8);
    egress_tests::sh(&[
        "ip",
        "-n",
        &w.sb.name,
        "route",
        "add",
        "local",
        "198.18.0.0/16",
        "dev",
        "lo",
    ]);
    let names: Vec<String> = (0..1000).map(|i| format!("n{i}.wikipedia.test")).collect();
    for (i, name) in names.iter().enumerate() {
        w.dns.set_a(name, &[ip(i)], 300);
    }
    let sink = w.sb.sink(sa(Ipv4Addr::UNSPECIFIED, 443));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let started = Instant::now();
    let got =
        w.sb.resolve(RESOLVE, &w.resolv)
            .family(Family::V4)
            .connect(443)
            .quiet()
            .run(&names);
    let took = started.elapsed();
    assert_eq!(got.summary.lookups, 1000, "{got:?}");
    assert!(got.summary.lookup_errors.is_empty(), "{got:?}");
    assert_eq!(
        got.summary.connects_ok,
        1000,
        "{got:?}\n{}",
        w.agent().log()
    );
    assert!(got.summary.connect_errors.is_empty(), "{got:?}");
    assert_eq!(sink.accepted(), 1000);
    eprintln!("1,000 lookups and first connects through the agent in {took:?}");
}

#[test]
fn an_expired_address_refuses_new_connections_and_keeps_the_established_one() {
    let w = World::start();
    let short = Ipv4Addr::new(192, 0, 2, 20);
    w.sb.add_addr(&format!("{short}/32"));
    // A TTL of 1 s is held for the floor, 5 s.
    w.dns.set_a("short.wikipedia.test", &[short], 1);
    let server = ByteCounter::start(&w.sb, sa(short, 443));
    std::thread::scope(|scope| {
        // A connection made right after the answer, which writes once at once and once after
        // the expiry.
        let held = scope.spawn(|| {
            w.sb.resolve(RESOLVE, &w.resolv)
                .family(Family::V4)
                .connect(443)
                .hold(Duration::from_secs(8))
                .run(&["short.wikipedia.test"])
        });
        assert!(
            egress_tests::eventually(Duration::from_secs(30), || server.received() == "before\n"),
            "the held connection's first write: {:?}",
            server.received()
        );
        std::thread::sleep(Duration::from_secs(6));
        // Past the floor: a new connection is refused...
        assert!(
            w.connect(sa(short, 443))
                .failed_with("connect", libc::EPERM),
            "a new connect after the expiry"
        );
        // ...and the one made before goes on.
        let got = held.join().expect("the held connection");
        assert_eq!(got.lookups[0].addrs, Ok(vec![IpAddr::V4(short)]), "{got:?}");
        assert_eq!(got.lookups[0].connect, Some(Ok(())), "{got:?}");
    });
    assert_eq!(server.received(), "before\nafter\n");
    // Asked again, the name is allowed again.
    let got =
        w.sb.resolve(RESOLVE, &w.resolv)
            .family(Family::V4)
            .connect(443)
            .run(&["short.wikipedia.test"]);
    assert_eq!(got.lookups[0].connect, Some(Ok(())), "{got:?}");
    // The client's connect returns once the handshake is done; the server's accept may come a
    // moment later.
    let later = || server.later.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        egress_tests::eventually(Duration::from_secs(5), || later() >= 1),
        "the server never accepted the connection made after asking again"
    );
    assert_eq!(later(), 1, "connections accepted after the first");
}

/// A TCP server in the sandbox that keeps what its first connection sends, and counts the
/// connections after it.
struct ByteCounter {
    received: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    later: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ByteCounter {
    fn start(sb: &Sandbox, addr: SocketAddr) -> Self {
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let later = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (into, count) = (received.clone(), later.clone());
        let ((), _thread) = egress_tests::spawn_in_netns(&sb.name, "byte counter", move |ready| {
            let listener = std::net::TcpListener::bind(addr).expect("bind");
            ready.send(()).expect("ready");
            let (mut conn, _) = listener.accept().expect("accept");
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                loop {
                    match std::io::Read::read(&mut conn, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => into.lock().expect("lock").extend_from_slice(&buf[..n]),
                    }
                }
            });
            for conn in listener.incoming() {
                if conn.is_ok() {
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        Self { received, later }
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().expect("lock")).into_owned()
    }
}

#[test]
fn a_restart_amid_lookups_and_connects_loses_no_allowed_connect_and_allows_no_denied_one() {
    let mut w = World::start();
    let sinks: Vec<Sink> = [WWW, CDN, EVIL]
        .into_iter()
        .map(|ip| w.sb.sink(sa(ip, 443)))
        .collect();
    let rounds = 300;
    // Learned before the loops start, whatever the loops' own start-up costs (under the kernel
    // guests' emulation a process takes longer to start than the 1.5 s before the kill).
    let first =
        w.sb.resolve(RESOLVE, &w.resolv)
            .family(Family::V4)
            .connect(443)
            .run(&["www.wikipedia.test", "en.wikipedia.test"]);
    assert_eq!(first.summary.connects_ok, 2, "{first:?}");
    let (allowed, denied, down) = std::thread::scope(|scope| {
        let loop_over = |names: &'static [&'static str]| {
            let (sb, resolv) = (&w.sb, &w.resolv);
            scope.spawn(move || {
                sb.resolve(RESOLVE, resolv)
                    .family(Family::V4)
                    .connect(443)
                    .rounds(rounds, Duration::from_millis(20))
                    .quiet()
                    .run(names)
            })
        };
        let allowed = loop_over(&["www.wikipedia.test", "en.wikipedia.test"]);
        let denied = loop_over(&["evil.test"]);
        std::thread::sleep(Duration::from_millis(1500));
        // Killed mid-loop: no chance to hand anything over.
        let old = w.agent.take().expect("agent");
        old.signal(libc::SIGKILL);
        let killed = Instant::now();
        old.wait();
        std::thread::sleep(Duration::from_millis(500));
        let new = w.start_agent();
        let down = killed.elapsed();
        w.agent = Some(new);
        (
            allowed.join().expect("the allowed loop"),
            denied.join().expect("the denied loop"),
            down,
        )
    });
    eprintln!("agent down (killed to ready again) for {down:?}");
    // Every lookup answered (by the agent, or by the resolver directly while it was down),
    // every connect to an allowed name's address made: learned before, pinned, still valid.
    // With one exception (docs/policy.md, "Policy changes and restarts"): a query the old
    // agent had read when it was killed is lost, and glibc sends its retry on the same socket,
    // connected to the agent's listener, so it is answered only if the new agent is back by
    // then. Each loop asks one name at a time: at most one lookup per loop can be lost so, and
    // none when the agent was back within the stub's timeout (2 s here: then its retry met the
    // new listener). The kernel guests' emulation takes 10 to 20 s to start an agent.
    let may_lose = u64::from(down > Duration::from_secs(2));
    let lost = |r: &egress_tests::Resolved| -> u64 {
        let again = r
            .summary
            .lookup_errors
            .get("EAI_AGAIN")
            .copied()
            .unwrap_or(0);
        assert_eq!(
            r.summary.lookup_errors.values().sum::<u64>(),
            again,
            "only a timeout may fail a lookup: {r:?}"
        );
        assert!(again <= may_lose, "agent down for {down:?}: {r:?}");
        again
    };
    let (lost_allowed, lost_denied) = (lost(&allowed), lost(&denied));
    assert_eq!(allowed.summary.lookups, 2 * rounds, "{allowed:?}");
    assert_eq!(
        allowed.summary.connects_ok,
        2 * rounds - lost_allowed,
        "{allowed:?}"
    );
    // And never one to the address of a name no rule allows, whoever answered.
    assert_eq!(denied.summary.lookups, rounds, "{denied:?}");
    assert_eq!(denied.summary.connects_ok, 0, "{denied:?}");
    assert_eq!(
        denied.summary.connect_errors.get("EPERM").copied(),
        Some(rounds - lost_denied),
        "{denied:?}"
    );
    let [www, cdn, evil] = &sinks[..] else {
        unreachable!()
    };
    assert_eq!(
        (www.accepted() + cdn.accepted()) as u64,
        2 * (rounds + 1) - lost_allowed,
        "every allowed connect arrived"
    );
    assert!(
        www.accepted() as u64 >= rounds && cdn.accepted() as u64 >= rounds,
        "{} and {} connects",
        www.accepted(),
        cdn.accepted()
    );
    assert_eq!(evil.accepted(), 0);
    // The new agent learns again: a name first asked now is allowed at once.
    let late = Ipv4Addr::new(192, 0, 2, 21);
    w.sb.add_addr(&format!("{late}/32"));
    w.dns.set_a("late.wikipedia.test", &[late], 300);
    let late_sink = w.sb.sink(sa(late, 443));
    let got =
        w.sb.resolve(RESOLVE, &w.resolv)
            .family(Family::V4)
            .connect(443)
            .run(&["late.wikipedia.test"]);
    assert_eq!(
        got.lookups[0].connect,
        Some(Ok(())),
        "{got:?}\n{}",
        w.agent().log()
    );
    assert_eq!(late_sink.accepted(), 1);
}

#[test]
fn an_answer_too_big_for_udp_is_learned_from_its_tcp_retry() {
    let w = World::start();
    egress_tests::sh(&[
        "ip",
        "-n",
        &w.sb.name,
        "route",
        "add",
        "local",
        "198.18.0.0/16",
        "dev",
        "lo",
    ]);
    // 40 addresses: more than 512 bytes, so the UDP answer is cut and glibc asks over TCP.
    let many: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(198, 18, 1, i)).collect();
    w.dns.set_a("big.wikipedia.test", &many, 300);
    let sink = w.sb.sink(sa(Ipv4Addr::UNSPECIFIED, 443));
    let got =
        w.sb.resolve(RESOLVE, &w.resolv)
            .family(Family::V4)
            .connect(443)
            .run(&["big.wikipedia.test"]);
    let addrs = got.lookups[0].addrs.clone().expect("resolves");
    assert_eq!(addrs.len(), 40, "{got:?}");
    assert_eq!(
        got.lookups[0].connect,
        Some(Ok(())),
        "{got:?}\n{}",
        w.agent().log()
    );
    let transports: Vec<_> = w.dns.asked().into_iter().map(|a| a.transport).collect();
    assert!(
        transports.contains(&egress_tests::dns_server::Transport::Tcp),
        "the retry went over TCP: {transports:?}"
    );
    // Every address of the answer, not only the first.
    let learned = w.learned();
    assert_eq!(learned.len(), 40, "{learned:?}");
    for addr in [many[0], many[39]] {
        assert_eq!(w.connect(sa(addr, 443)), Attempted::Ok, "{addr}");
    }
    assert_eq!(sink.accepted(), 3);
}

#[test]
fn a_udp_fqdn_rule_allows_datagrams_to_its_answers_on_its_port() {
    let w = World::start();
    let time = Ipv4Addr::new(192, 0, 2, 30);
    w.sb.add_addr(&format!("{time}/32"));
    w.dns.set_a("time.test", &[time], 300);
    let ntp = w.sb.udp_sink(sa(time, 123));
    let other = w.sb.udp_sink(sa(time, 124));
    let sendto = |port| {
        attempt(
            VECTOR,
            &w.sb.name,
            Some(&w.sb.cgroup),
            Vector::UdpSendto,
            sa(time, port),
            Duration::from_secs(3),
        )
    };
    assert!(
        sendto(123).failed_with("send", libc::EPERM),
        "before the lookup"
    );
    let got =
        w.sb.resolve(RESOLVE, &w.resolv)
            .family(Family::V4)
            .connect(123)
            .udp()
            .run(&["time.test"]);
    assert_eq!(got.lookups[0].connect, Some(Ok(())), "{got:?}");
    assert_eq!(sendto(123), Attempted::Ok);
    // The rule's port over its protocol only.
    assert!(sendto(124).failed_with("send", libc::EPERM), "port 124");
    assert!(
        w.connect(sa(time, 123)).failed_with("connect", libc::EPERM),
        "tcp to a udp rule's port"
    );
    egress_tests::eventually(Duration::from_secs(2), || ntp.count() == 2);
    assert_eq!((ntp.count(), other.count()), (2, 0));
}

#[test]
fn an_ipv6_resolver_is_asked_through_the_agent_too() {
    let w = World::start();
    let resolver6: Ipv6Addr = "2001:db8::53".parse().expect("ip");
    w.sb.add_addr(&format!("{resolver6}/128"));
    let dns6 = w.sb.dns_server(sa(resolver6, 53));
    dns6.set_a("www.wikipedia.test", &[WWW], 300);
    // The agent reads resolv.conf again at a reload: the IPv6 resolver is the policy's now.
    std::fs::write(
        &w.resolv,
        resolv_conf_text(&[IpAddr::V6(resolver6)], "timeout:2 attempts:2"),
    )
    .expect("resolv.conf");
    let (ok, out, err) = w.sb.ctl(EGRESS, &["reload"]);
    assert!(ok.success(), "{out}{err}");
    let sink = w.sb.sink(sa(WWW, 443));
    let got =
        w.sb.resolve(RESOLVE, &w.resolv)
            .family(Family::V4)
            .connect(443)
            .run(&["www.wikipedia.test"]);
    assert_eq!(got.lookups[0].addrs, Ok(vec![IpAddr::V4(WWW)]), "{got:?}");
    assert_eq!(
        got.lookups[0].connect,
        Some(Ok(())),
        "{got:?}\n{}",
        w.agent().log()
    );
    assert_eq!(sink.accepted(), 1);
    assert!(dns6.queries_for("www.wikipedia.test") >= 1);
    assert_eq!(w.dns.queries_for("www.wikipedia.test"), 0);
}

/// A stub that queries from an unconnected socket and checks where the answer came from
/// (musl's does; glibc's connects its socket, so the kernel already filters): `recvfrom()`
/// shows the resolver the query was sent to as the source, over IPv4, IPv6 and a dual-stack
/// socket's IPv4-mapped address, and the answer was learned.
#[test]
fn an_unconnected_stub_sees_its_answer_come_from_the_resolver() {
    let w = World::start();
    let resolver6: Ipv6Addr = "2001:db8::53".parse().expect("ip");
    w.sb.add_addr(&format!("{resolver6}/128"));
    let dns6 = w.sb.dns_server(sa(resolver6, 53));
    dns6.set_a("www.wikipedia.test", &[WWW], 300);
    std::fs::write(
        &w.resolv,
        resolv_conf_text(
            &[IpAddr::V4(RESOLVER), IpAddr::V6(resolver6)],
            "timeout:2 attempts:2",
        ),
    )
    .expect("resolv.conf");
    let (ok, out, err) = w.sb.ctl(EGRESS, &["reload"]);
    assert!(ok.success(), "{out}{err}");
    let mapped = SocketAddr::from((RESOLVER.to_ipv6_mapped(), 53));
    for server in [sa(RESOLVER, 53), sa(resolver6, 53), mapped] {
        let (out, _) = egress_tests::output_text(
            w.sb.workload(PROBE)
                .args(["--dns-query", "www.wikipedia.test", &server.to_string()]),
            "the probe",
        );
        assert_eq!(
            out.trim(),
            format!("from {server} addrs {WWW}"),
            "{server}\n{}",
            w.agent().log()
        );
    }
    assert_eq!(
        w.learned()
            .iter()
            .filter(|e| e.3 == IpAddr::V4(WWW))
            .count(),
        1
    );
}

/// The kernel shows an answer as the resolver's only while the agent's own socket is bound to
/// the listener's port: after the agent died, a process that binds that port (a workload can:
/// it is above 1024) can answer a stub, but its answers keep their own source, so a stub that
/// checks where its answer came from drops them rather than take them as the resolver's.
#[test]
fn only_the_agents_listener_answers_as_the_resolver() {
    let mut w = World::start();
    let listener = sa(Ipv4Addr::LOCALHOST, egress_user::policy::DNS_LISTEN_PORT);
    let ask = |w: &World| {
        egress_tests::output_text(
            w.sb.workload(PROBE)
                .args(["--dns-query", "www.wikipedia.test", &listener.to_string()]),
            "the probe",
        )
        .0
        .trim()
        .to_owned()
    };
    // Asked directly, the agent's listener answers as the resolver it stands for.
    assert_eq!(
        ask(&w),
        format!("from {RESOLVER}:53 addrs {WWW}"),
        "{}",
        w.agent().log()
    );
    let old = w.agent.take().expect("agent");
    old.signal(libc::SIGKILL);
    old.wait();
    // The programs stay pinned with the dead agent's resolver slots; a squatter takes the port.
    let squatter = w.sb.dns_server(listener);
    squatter.set_a("www.wikipedia.test", &[EVIL], 300);
    assert_eq!(ask(&w), format!("from {listener} addrs {EVIL}"));
}

/// Seed 003's point: the app's own HTTPS to a name, with nothing but the name in the policy.
/// The TLS server for `www.wikipedia.test` (a CA of the test's, which only the app trusts)
/// serves the app's request once the name was resolved through the agent.
#[test]
fn the_apps_own_https_to_a_name_works() {
    let w = World::start();
    let ca = egress_tests::upstream::TestCa::new(&["www.wikipedia.test"]);
    let ca_file = w.sb.policy_file("ca.pem", &ca.ca_pem);
    let server = egress_tests::upstream::Upstream::tls(&w.sb.name, sa(WWW, 443), &ca);
    let https = |what: &str| {
        egress_tests::output_text(
            w.sb.workload(PROBE)
                .args(["--tls", "www.wikipedia.test", "--ca"])
                .arg(&ca_file)
                .args([
                    "--http",
                    "GET /wiki HTTP/1.1\\r\\nHost: www.wikipedia.test\\r\\nConnection: close\\r\\n\\r\\n",
                ])
                .arg(sa(WWW, 443).to_string()),
            what,
        )
        .0
    };
    // Not before the name was resolved: refused at connect().
    let out = https("the probe before the lookup");
    assert!(out.starts_with("error 1 "), "{out}");
    let got =
        w.sb.resolve(RESOLVE, &w.resolv)
            .family(Family::V4)
            .run(&["www.wikipedia.test"]);
    assert_eq!(got.lookups[0].addrs, Ok(vec![IpAddr::V4(WWW)]), "{got:?}");
    let out = https("the probe");
    assert!(out.contains("status HTTP/1.1 200"), "{out}");
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (seen[0].path.as_str(), seen[0].sni.as_deref()),
        ("/wiki", Some("www.wikipedia.test"))
    );
}
