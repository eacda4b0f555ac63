//! HTTP egress end to end, as in Istio's "Configuring Egress with Envoy" task: the app's
//! connect() to an HTTP port is redirected in the kernel to the agent's proxy, which allows
//! requests by Host, originates TLS, and resolves aliases. The agent runs inside the test's
//! network namespace (the redirect goes to its loopback); upstreams are servers the test runs
//! at addresses it assigned there, under made-up names.

use std::{fs, net::SocketAddr, time::Duration};

use egress_tests::{
    Outcome, Sandbox, V4_A, V4_B, egress_bin,
    policy::{Rule, config},
    probe_bin, sa,
    upstream::Upstream,
    world::{Response, World},
};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();

fn world() -> World {
    World::new(EGRESS, PROBE)
}

/// A rule for plain HTTP to `host` on port 80.
fn http_rule(name: &str, host: &str) -> String {
    Rule::new(name, host).port(80, "http").to_string()
}

#[test]
fn plain_http_by_host_and_tls_origination_as_in_the_seed() {
    let w = world();
    // curl http://httpbin.test/headers
    w.get(sa(V4_A, 80), "httpbin.test", "/headers")
        .assert_code(200)
        .assert_says("upstream saw host=httpbin.test path=/headers sni=-")
        // The app's getpeername() shows where it connected, not the proxy.
        .assert_peer("192.0.2.1:80");
    // The request's log line rounds its latency for people: `latency_ms=0.84`.
    w.agent()
        .wait_for_log("latency_ms=", Duration::from_secs(5));
    let log = w.agent().log();
    let latency = log
        .split("latency_ms=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("latency_ms");
    let decimals = latency.split_once('.').map_or(0, |(_, d)| d.len());
    assert_eq!(decimals, 2, "latency_ms={latency}");

    // curl http://secure.test:443/: the app speaks HTTP, the upstream sees TLS for secure.test.
    w.get(sa(V4_A, 443), "secure.test:443", "/")
        .assert_code(200)
        .assert_says("sni=secure.test")
        .assert_peer("192.0.2.1:443");
    let tls = w.tls.seen();
    assert_eq!(tls.len(), 1);
    assert_eq!(tls[0].sni.as_deref(), Some("secure.test"));

    // The agent logged both requests with their rule and original destination.
    w.agent()
        .wait_for_log("path=/headers", Duration::from_secs(5));
    let log = w.agent().log();
    assert!(
        log.lines().any(|l| l.contains("rule=httpbin")
            && l.contains("status=200")
            && l.contains("orig_dst=192.0.2.1:80")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("rule=secure") && l.contains("orig_dst=192.0.2.1:443")),
        "{log}"
    );
}

#[test]
fn an_externalname_alias_is_sent_to_its_external_name() {
    let w = world();
    // The app calls the alias; any address works for the connection, Host picks the alias.
    // Also by its cluster DNS name.
    for (alias, path) in [
        ("securebin", "/alias"),
        ("securebin.default.svc.cluster.local", "/fqdn"),
    ] {
        w.get(sa(V4_A, 443), alias, path)
            .assert_code(200)
            .assert_says(&format!("host=secure.test path={path} sni=secure.test"));
    }
    assert_eq!(w.tls.seen().len(), 2);
}

#[test]
fn a_forbidden_host_on_an_allowed_address_gets_403_and_the_upstream_sees_nothing() {
    let w = world();
    // The reason names the host.
    w.get(sa(V4_A, 80), "forbidden.test", "/")
        .assert_code(403)
        .assert_says("forbidden.test");
    // A pipelined second request with a forbidden Host is refused on its own.
    let req = "GET /one HTTP/1.1\\r\\nHost: httpbin.test\\r\\n\\r\\nGET /two HTTP/1.1\\r\\nHost: forbidden.test\\r\\nConnection: close\\r\\n\\r\\n";
    let out = w.sb.http(PROBE, req, &[sa(V4_A, 80)]);
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert!(out.contains("HTTP/1.1 403"), "{out}");
    // CONNECT is refused.
    let out = w.sb.http(
        PROBE,
        "CONNECT httpbin.test:80 HTTP/1.1\\r\\nHost: httpbin.test:80\\r\\n\\r\\n",
        &[sa(V4_A, 80)],
    );
    let connect = Response::parse(&out);
    assert!(matches!(connect.code(), 403 | 405), "{out}");
    let seen = w.http.seen();
    assert_eq!(
        seen.len(),
        1,
        "only the allowed request reached the upstream: {seen:?}"
    );
    assert_eq!(seen[0].path, "/one");
}

#[test]
fn an_upstream_certificate_from_an_untrusted_ca_gets_502() {
    let w = world();
    let r = w.get(sa(V4_B, 443), "rogue.test:443", "/");
    r.assert_code(502);
    assert!(
        r.text.to_ascii_lowercase().contains("certificate"),
        "the reason says why: {}",
        r.raw
    );
    assert!(
        w.rogue_tls.seen().is_empty(),
        "no request was sent over the untrusted connection"
    );
    // Logged once, by the agent's request log, with the reason.
    w.agent().wait_for_log("http 502", Duration::from_secs(5));
    let log = w.agent().log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("rogue.test")).collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("http 502") && lines[0].contains("certificate"),
        "{lines:#?}"
    );
}

#[test]
fn with_the_proxy_stopped_redirected_connections_fail_and_never_go_direct() {
    let mut w = world();
    assert_eq!(w.get(sa(V4_A, 80), "httpbin.test", "/").code(), 200);
    let agent = w.agent.take().expect("agent");
    agent.signal(libc::SIGKILL);
    let _ = agent.wait();
    // The programs are still pinned; nothing listens at the proxy's address, so the kernel
    // refuses the connection instead of redirecting it (EPERM, `proxy-absent`).
    assert_eq!(w.sb.connect(PROBE, sa(V4_A, 80)), Outcome::Denied);
    assert_eq!(
        w.http.seen().len(),
        1,
        "nothing reached the upstream directly"
    );
    // A restarted agent reads the event the kernel kept, and serves again.
    w.start_agent();
    w.agent()
        .wait_for_log("reason=proxy-absent", Duration::from_secs(5));
    assert_eq!(w.get(sa(V4_A, 80), "httpbin.test", "/again").code(), 200);
}

#[test]
fn a_large_response_streams_through_with_bounded_proxy_memory() {
    let w = world();
    const SIZE: u64 = 100 * 1024 * 1024;
    let r = w.get(sa(V4_A, 80), "httpbin.test", &format!("/big/{SIZE}"));
    r.assert_code(200);
    assert!(r.bytes > SIZE, "the whole body arrived: {} bytes", r.bytes);
    let status =
        fs::read_to_string(format!("/proc/{}/status", w.agent().pid())).expect("agent status");
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    assert!(
        peak_kib < 64 * 1024,
        "the agent's peak RSS was {peak_kib} KiB for a 100 MiB body"
    );
}

#[test]
fn two_hundred_concurrent_connections_each_get_their_own_original_destination() {
    let w = world();
    let addrs: Vec<SocketAddr> = (1..=200u8)
        .map(|i| sa(std::net::Ipv4Addr::new(198, 18, 0, i), 80))
        .collect();
    w.sb.add_addrs(
        &addrs
            .iter()
            .map(|a| format!("{}/32", a.ip()))
            .collect::<Vec<_>>(),
    );
    let out = w.sb.http(
        PROBE,
        "GET /conn/{addr} HTTP/1.1\\r\\nHost: httpbin.test\\r\\nConnection: close\\r\\n\\r\\n",
        &addrs,
    );
    let peers: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("peer "))
        .collect();
    let wanted: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    assert_eq!(peers, wanted, "every app socket shows its own destination");
    assert_eq!(out.matches("status HTTP/1.1 200").count(), 200, "{out}");
    w.agent()
        .wait_for_log("path=/conn/198.18.0.200:80", Duration::from_secs(10));
    let log = w.agent().log();
    for a in &addrs {
        assert!(
            log.lines().any(|l| l.contains(&format!("path=/conn/{a} "))
                && l.contains(&format!("orig_dst={a} "))),
            "the proxy saw {a} as the original destination of its own request"
        );
    }
    // The main loop that logged them never preempts the proxy's workers: it runs under
    // SCHED_BATCH; the runtime's threads (workers and blocking threads, some started by the
    // main loop) keep the default policy.
    let threads = thread_policies(w.agent().pid());
    let main = threads.iter().find(|t| t.0 == w.agent().pid());
    assert_eq!(main.map(|t| t.2), Some(SCHED_BATCH), "{threads:?}");
    let runtime: Vec<_> = threads
        .iter()
        .filter(|t| t.1.starts_with("tokio-"))
        .collect();
    assert!(!runtime.is_empty(), "{threads:?}");
    assert!(runtime.iter().all(|t| t.2 == SCHED_OTHER), "{threads:?}");
}

const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;

/// Each thread of process `pid`: its id, name and scheduling policy (`stat` field 41).
fn thread_policies(pid: u32) -> Vec<(u32, String, u32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the agent's threads");
    tasks
        .filter_map(|task| {
            let tid: u32 = task.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            // Fields after the name start at field 3: policy (41) is the 39th of them.
            let policy = rest.split_whitespace().nth(41 - 3)?.parse().ok()?;
            Some((tid, name, policy))
        })
        .collect()
}

/// The agent's own upstream connections are exempt by its cgroup id: an agent running below
/// the managed cgroup still reaches the upstream instead of being redirected to itself. An
/// agent in the managed cgroup itself refuses to start, since that exemption would cover
/// every workload there.
#[test]
fn the_agents_own_connections_are_exempt_by_cgroup_and_it_refuses_the_managed_cgroup() {
    let sb = Sandbox::new();
    let policy = sb.policy_file(
        "policy.yaml",
        &(config("  hosts: {httpbin.test: [192.0.2.1]}\n") + &http_rule("httpbin", "httpbin.test")),
    );
    let http = Upstream::http(&sb.name, sa(V4_A, 80));
    let args = sb.run_args(&policy, &[]);

    let (status, log) = sb
        .agent(EGRESS)
        .args(&args)
        .cgroup(&sb.cgroup)
        .run_to_exit();
    assert!(!status.success(), "{log}");
    assert!(log.contains("runs in the managed cgroup"), "{log}");
    assert!(
        !sb.pin_dir.join("links").join("connect4").exists(),
        "nothing was attached"
    );

    let agent_cgroup = sb.cgroup.join("agent");
    fs::create_dir_all(&agent_cgroup).expect("agent cgroup");
    let agent = sb.agent(EGRESS).args(&args).cgroup(&agent_cgroup).start();
    let r = sb.get(PROBE, sa(V4_A, 80), "httpbin.test", "/exempt");
    assert_eq!(r.code(), 200, "{}\n{}", r.raw, agent.log());
    let seen = http.seen();
    assert_eq!(
        seen.len(),
        1,
        "one request, not a loop through the proxy: {seen:?}"
    );
    drop(agent);
}

/// Without a static override the proxy resolves the host with the system resolver (here
/// `/etc/hosts`), and refuses an answer inside a bypass range (DNS rebinding).
#[test]
fn names_resolve_through_the_system_resolver_and_rebinding_to_a_bypass_range_gets_502() {
    let sb = Sandbox::new();
    let dir = sb.dir("dns");
    let hosts = dir.join("hosts");
    fs::write(
        &hosts,
        "127.0.0.1 localhost\n192.0.2.1 dns.test\n127.0.0.1 rebind.test\n",
    )
    .expect("hosts");
    let policy = sb.policy_file(
        "policy.yaml",
        &(http_rule("dns", "dns.test") + &http_rule("rebind", "rebind.test")),
    );
    let http = Upstream::http(&sb.name, sa(V4_A, 80));
    // Something listening where the rebinding answer points: it must see nothing.
    let local = Upstream::http(&sb.name, sa(std::net::Ipv4Addr::LOCALHOST, 80));
    let args = sb.run_args(&policy, &[]);
    let agent = sb.agent(EGRESS).args(&args).hosts(&hosts).start();

    let get = |host: &str| sb.get(PROBE, sa(V4_A, 80), host, &format!("/{host}"));
    let r = get("dns.test");
    assert_eq!(r.code(), 200, "{}\n{}", r.raw, agent.log());
    assert_eq!(http.seen().len(), 1);
    // The reason names the refused address.
    get("rebind.test").assert_code(502).assert_says("127.0.0.1");
    assert!(
        local.seen().is_empty(),
        "nothing reached the loopback server"
    );
    drop(agent);
}

/// Issue 18: `protocol: tls` through the kernel's redirect. The app does its own TLS (trusting
/// the test CA, which the agent's proxy only uses for its own origination): with an SNI the
/// rule allows it reaches the server by that name; the same SNI aimed at another address
/// (rogue.test's, 198.51.100.1) still reaches the allowed server and never that address; no
/// SNI is refused, as is a name no tls rule allows.
#[test]
fn a_tls_rule_lets_the_apps_own_tls_through_to_its_sni_only() {
    let mut w = World::without_agent(EGRESS, PROBE);
    let policy = w.dir.join("policy.yaml");
    // The world's `secure` rule (secure.test, 443) becomes a tls rule: a host's port has one
    // protocol.
    let yaml = fs::read_to_string(&policy).expect("policy");
    let https = "service: \"secure.test\"\n  ports:\n    - port: 443\n      protocol: https\n";
    assert!(yaml.contains(https), "{yaml}");
    let yaml = yaml.replace(https, &https.replace("https", "tls"));
    fs::write(&policy, yaml).expect("policy");
    w.start_agent();
    let ca = w.dir.join("ca.pem").display().to_string();
    let own_tls = |addr: SocketAddr, name: &str| -> String {
        // The probe's TLS mode: --tls NAME --ca FILE before --http.
        let (out, _) = egress_tests::output_text(
            w.sb.workload(PROBE)
                .args(["--tls", name, "--ca", &ca])
                .args([
                    "--http",
                    "GET /own HTTP/1.1\\r\\nHost: secure.test\\r\\nConnection: close\\r\\n\\r\\n",
                ])
                .arg(addr.to_string()),
            "the probe",
        );
        out
    };
    let before = w.tls.seen().len();
    // A good SNI, at the server's own address.
    let out = own_tls(sa(V4_A, 443), "secure.test");
    assert!(
        out.contains("status HTTP/1.1 200"),
        "{out}\n{}",
        w.agent().log()
    );
    // The same SNI aimed at rogue.test's address: the proxy dials secure.test itself.
    let out = own_tls(sa(V4_B, 443), "secure.test");
    assert!(out.contains("status HTTP/1.1 200"), "{out}");
    assert!(
        w.rogue_tls.seen().is_empty(),
        "the address the app gave never saw it"
    );
    let seen = w.tls.seen();
    let own: Vec<_> = seen[before..]
        .iter()
        .filter(|s| s.path == "/own")
        .map(|s| s.sni.clone())
        .collect();
    let secure = Some("secure.test".to_owned());
    assert_eq!(own, [secure.clone(), secure], "{seen:?}");
    // No SNI (an address as the name sends none), and a name no tls rule allows.
    for name in ["192.0.2.1", "rogue.test"] {
        let out = own_tls(sa(V4_A, 443), name);
        assert!(out.contains("error 0 tls:"), "{name}: {out}");
    }
    assert_eq!(
        w.tls.seen().iter().filter(|s| s.path == "/own").count(),
        2,
        "nothing refused reached the server"
    );
    w.agent()
        .wait_for_log("tls client hello without sni", Duration::from_secs(5));
    w.agent().wait_for_log(
        "tls client hello for rogue.test on an http egress port refused",
        Duration::from_secs(5),
    );
}
