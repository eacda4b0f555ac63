//! Pods under a real container runtime (containerd, runc, the CNI `ptp` plugin), created
//! through the CRI as kubelet creates them, filtered by the agent whose managed cgroup holds
//! their cgroups (`cargo xtask test --step pods`; see `egress_tests::node`).
//!
//! Every address is TEST-NET inside the sandbox's network namespace, which has no route out:
//! the pods reach the node's own addresses and nothing else.

use std::{net::SocketAddr, time::Duration};

use egress_tests::{
    Sandbox, V4_A, V4_B, assert_accepted, egress_bin, eventually,
    node::{Node, Pod},
    policy::{config, tcp_rule},
    probe_bin, sa, status_row,
    upstream::Upstream,
    world::World,
};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();

/// Where a pod connects: a port of 192.0.2.1, or any address.
struct Dest(SocketAddr);

impl From<u16> for Dest {
    fn from(port: u16) -> Self {
        Self(sa(V4_A, port))
    }
}

impl From<SocketAddr> for Dest {
    fn from(addr: SocketAddr) -> Self {
        Self(addr)
    }
}

fn assert_connects(node: &Node<'_>, pod: &Pod, addr: impl Into<Dest>) {
    node.assert_connects(pod, addr.into().0);
}

fn assert_refused(node: &Node<'_>, pod: &Pod, addr: impl Into<Dest>) {
    node.assert_refused(pod, addr.into().0);
}

/// A pod that ran before the agent started and one created after it are both held to the
/// node's policy: the allowed port reaches its server, the other never does, and the agent
/// counts each denial and reports it with the pod's own cgroup and its name, which it learns
/// from containerd's CRI socket.
#[test]
fn containerd_pods_are_held_to_the_policy_from_before_and_after_the_agent_starts() {
    let sb = Sandbox::new();
    let [allowed, denied] = sb.sinks(V4_A, [8080, 9090]);
    let mut node = Node::start(&sb);
    let early = node.pod("default", "early");
    // No agent yet: nothing is filtered.
    assert_connects(&node, &early, 9090);
    assert_accepted(&[(&allowed, 0), (&denied, 1)]);

    let policy = sb.policy_file("p.yaml", &tcp_rule("web", "192.0.2.0/24", 8080));
    let socket = node.socket().display().to_string();
    let _agent = sb
        .agent(EGRESS)
        .policy(&policy, &["--cri-socket", &socket])
        .start();
    let late = node.pod("team-a", "late");
    for pod in [&early, &late] {
        assert_connects(&node, pod, 8080);
        // The agent lists the pods every second: a pod's first denials may name only its
        // cgroup. Each attempt is refused all the same; within seconds the events name it.
        let named = eventually(Duration::from_secs(15), || {
            assert_refused(&node, pod, 9090);
            sb.events_json(EGRESS).iter().any(|e| {
                e["verdict"] == "deny"
                    && e["destination"] == "192.0.2.1:9090"
                    && e["cgroup_id"] == pod.cgroup_id
                    && e["pod"] == pod.name.as_str()
            })
        });
        assert!(
            named,
            "no deny event naming {} (cgroup {}): {:#?}",
            pod.name,
            pod.cgroup_id,
            sb.events_json(EGRESS)
        );
    }
    assert_accepted(&[(&allowed, 2), (&denied, 1)]);
    let status = sb.status_json(EGRESS);
    assert_eq!(status_row(&status, "web")["allowed"], 2, "{status:#}");

    // `egress events` picks one pod's denials.
    let (ok, out, err) = sb.ctl(
        EGRESS,
        &[
            "events",
            "-o",
            "json",
            "-n",
            "team-a",
            "--pod",
            "late",
            "--verdict",
            "deny",
        ],
    );
    assert!(ok.success(), "{err}");
    let picked: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("an event per line"))
        .collect();
    assert!(!picked.is_empty(), "no events picked: {err}");
    for e in &picked {
        assert_eq!(
            (&e["pod"], &e["verdict"]),
            (&"team-a/late".into(), &"deny".into()),
            "{e}"
        );
    }

    // A deleted pod is gone from the runtime; the others keep their filter.
    node.delete(early);
    assert_refused(&node, &late, 9090);
    assert_accepted(&[(&allowed, 2), (&denied, 1)]);
}

/// `GET path` for `host` from the pod over its own connection to 192.0.2.1:`port` (busybox's
/// `nc`, as an app would send it): the response as the pod received it. The request's end is
/// not a half-close: `nc` would shut its sending side down at the end of its input, and the
/// proxy (hyper) takes a half-closed client as gone before answering.
fn get(node: &Node<'_>, pod: &Pod, port: u16, host: &str, path: &str) -> String {
    let script = format!(
        "(printf 'GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n'; \\
         /bin/busybox sleep 1) | /bin/busybox nc -w 5 {V4_A} {port}"
    );
    let out = node.exec(
        pod,
        &["/bin/busybox", "sh", "-c", &script],
        Duration::from_secs(15),
    );
    format!("{}{}", out.stdout, out.stderr)
}

/// The status code of a response, 0 when there was none.
fn code(response: &str) -> u16 {
    response
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Seed 000 from pods: a pod's connection to an HTTP egress port goes to the proxy listener
/// the agent opened inside that pod's own network namespace (for a pod from before the agent
/// and one created after it), the request is allowed by Host, TLS is originated on :443, the
/// ExternalName alias works and a forbidden Host gets 403 without reaching its upstream; the
/// upstream sees each request come from the pod's own address. A deleted pod's listeners go.
#[test]
fn pods_http_egress_goes_through_the_proxy_inside_each_pod() {
    let w = World::without_agent(EGRESS, PROBE);
    let sb = &w.sb;
    let mut node = Node::start(sb);
    let early = node.pod("default", "sleep");
    // A pod whose own process holds the proxy port before the agent starts.
    let squat = node.pod("default", "squat");
    let held = node.exec(
        &squat,
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox nc -l -p 15001 >/got 2>&1 &",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(held.exit_code, 0, "{held:?}");
    let policy = w.dir.join("policy.yaml");
    let socket = node.socket().display().to_string();
    let agent = sb
        .agent(EGRESS)
        .args(&sb.run_args(&policy, &["--cri-socket", &socket]))
        .start();
    let late = node.pod("team-a", "sleep");
    for pod in [&early, &late] {
        // The agent lists the pods every second and then opens the pod's listeners; until
        // then the kernel refuses the pod's connections meant for the proxy.
        let mut last = String::new();
        let served = eventually(Duration::from_secs(15), || {
            last = get(&node, pod, 80, "httpbin.test", "/headers");
            code(&last) == 200
        });
        assert!(
            served,
            "{}: no 200 through the proxy: {last}\n{}",
            pod.name,
            agent.log()
        );
        assert!(
            last.contains("upstream saw host=httpbin.test path=/headers"),
            "{}: {last}",
            pod.name
        );
        let seen = w.http.seen();
        let at_upstream = seen.last().expect("the upstream saw the request");
        assert_eq!(
            at_upstream.peer.map(|p| p.ip()),
            Some(pod.ip),
            "{}: the proxied request left from the pod's own address",
            pod.name
        );

        // curl http://secure.test:443/: TLS originated by the proxy, from the pod's address.
        let tls = get(&node, pod, 443, "secure.test:443", "/tls");
        assert_eq!(code(&tls), 200, "{}: {tls}", pod.name);
        assert!(tls.contains("sni=secure.test"), "{}: {tls}", pod.name);
        let seen = w.tls.seen();
        let at_upstream = seen.last().expect("the TLS upstream saw the request");
        assert_eq!(
            (at_upstream.sni.as_deref(), at_upstream.peer.map(|p| p.ip())),
            (Some("secure.test"), Some(pod.ip)),
            "{}",
            pod.name
        );

        // The ExternalName alias.
        let alias = get(&node, pod, 443, "securebin", "/alias");
        assert_eq!(code(&alias), 200, "{}: {alias}", pod.name);
        assert!(
            alias.contains("host=secure.test path=/alias sni=secure.test"),
            "{}: {alias}",
            pod.name
        );

        // A Host no rule allows: 403 from the proxy, never seen upstream.
        let before = w.http.seen().len();
        let forbidden = get(&node, pod, 80, "forbidden.test", "/");
        assert_eq!(code(&forbidden), 403, "{}: {forbidden}", pod.name);
        assert!(
            forbidden.contains("forbidden.test"),
            "{}: {forbidden}",
            pod.name
        );
        assert_eq!(
            w.http.seen().len(),
            before,
            "the upstream saw the forbidden request"
        );
    }
    // The squatting pod's connections meant for the proxy are refused (`proxy-foreign`), never
    // handed to its own listener, and the agent says why.
    let mut last = String::new();
    let refused = eventually(Duration::from_secs(15), || {
        last = get(&node, &squat, 80, "httpbin.test", "/squat");
        sb.events_json(EGRESS).iter().any(|e| {
            e["reason"] == "proxy-foreign" && e["pod"] == "default/squat" && e["verdict"] == "deny"
        })
    });
    assert!(refused, "no proxy-foreign event for default/squat: {last}");
    assert_eq!(code(&last), 0, "{last}");
    let got = node.exec(
        &squat,
        &["/bin/busybox", "cat", "/got"],
        Duration::from_secs(10),
    );
    assert_eq!(
        got.stdout, "",
        "the pod's own listener received a connection meant for the proxy"
    );
    assert!(
        agent
            .log()
            .lines()
            .any(|l| l.contains("cannot listen inside the pod") && l.contains("default/squat")),
        "{}",
        agent.log()
    );

    // The proxy's events name the pod a request came from.
    let events = sb.events_json(EGRESS);
    for pod in [&early, &late] {
        assert!(
            events.iter().any(|e| e["source"] == "http"
                && e["host"] == "httpbin.test"
                && e["status"] == 200
                && e["pod"] == pod.name.as_str()),
            "no http event naming {}: {events:#?}",
            pod.name
        );
    }
    let log = agent.log();
    for pod in [&early, &late] {
        assert!(
            log.lines()
                .any(|l| l.contains("listening inside the pod") && l.contains(&pod.name)),
            "{}: {log}",
            pod.name
        );
    }

    // A deleted pod's listeners go; the other pod keeps its proxy.
    node.delete(early);
    let gone = eventually(Duration::from_secs(10), || {
        agent
            .log()
            .lines()
            .any(|l| l.contains("the pod is gone") && l.contains("default/sleep"))
    });
    assert!(gone, "{}", agent.log());
    assert_eq!(code(&get(&node, &late, 80, "httpbin.test", "/after")), 200);
}

/// Istio's seed 003 (five EgressRules for the ranges of one site, created with `istioctl create
/// -n default`), with TEST-NET ranges in place of the site's.
const SEED_003: &str = "\
kind: EgressRule
metadata:
  name: wikipedia-range1
spec:
  destination:
    service: 192.0.2.0/25
  ports:
  - port: 443
    protocol: tcp
---
kind: EgressRule
metadata:
  name: wikipedia-range2
spec:
  destination:
    service: 198.51.100.0/25
  ports:
  - port: 443
    protocol: tcp
---
kind: EgressRule
metadata:
  name: wikipedia-range3
spec:
  destination:
    service: 203.0.113.0/26
  ports:
  - port: 443
    protocol: tcp
---
kind: EgressRule
metadata:
  name: wikipedia-range4
spec:
  destination:
    service: 198.18.0.0/24
  ports:
  - port: 443
    protocol: tcp
---
kind: EgressRule
metadata:
  name: wikipedia-range5
spec:
  destination:
    service: 198.19.0.0/24
  ports:
  - port: 443
    protocol: tcp
";

/// HTTP rules of two namespaces: `teamonly.test` for team-a's pods, `otheronly.test` for
/// team-b's, both on port 80 of the node's 192.0.2.1.
const TEAM_RULES: &str = "\
kind: EgressRule
metadata: {name: web, namespace: team-a}
spec:
  destination: {service: teamonly.test}
  ports: [{port: 80, protocol: http}]
---
kind: EgressRule
metadata: {name: web, namespace: team-b}
spec:
  destination: {service: otheronly.test}
  ports: [{port: 80, protocol: http}]
";

/// Policy scopes on real pods: seed 003 created in `default` with `egress create -n default`
/// allows its ranges to the pods of `default` and nothing else, and nothing to a pod of
/// another namespace; HTTP rules of `team-a` and `team-b` allow each its own host (the other's
/// is 403, never seen upstream), and a namespace with no HTTP rule on a port has no redirect
/// there. Pods created after the agent are in their namespace's scope from their first
/// connect.
#[test]
fn each_namespace_has_its_own_rules() {
    let sb = Sandbox::new();
    let [a443, a9090] = sb.sinks(V4_A, [443, 9090]);
    let [b443] = sb.sinks(V4_B, [443]);
    let http = Upstream::http(&sb.name, sa(V4_A, 80));
    let hosts = "  hosts:\n    teamonly.test: [192.0.2.1]\n    otheronly.test: [192.0.2.1]\n";
    let policy = sb.policy_file("p.yaml", &(config(hosts) + TEAM_RULES));
    let mut node = Node::start(&sb);
    let socket = node.socket().display().to_string();
    // No --cgroup: the agent finds the pods' cgroup from the runtime's layout (kubelet's
    // `kubepods`, here below the sandbox's cgroup).
    let _first = node.pod("kube-system", "first");
    let (policy_arg, pin_dir) = (
        policy.display().to_string(),
        sb.pin_dir.display().to_string(),
    );
    let args = [
        "--policy",
        &policy_arg,
        "--pin-dir",
        &pin_dir,
        "--cri-socket",
        &socket,
        "--metrics-addr",
        "127.0.0.1:9464",
    ];
    let agent = sb.agent(EGRESS).args(&args).start();
    let kubepods = sb.cgroup.join("kubepods");
    assert!(
        agent.log().contains(&format!(
            "the pods' cgroup, from the runtime's layout cgroup={}",
            kubepods.display()
        )),
        "{}",
        agent.log()
    );
    let seed = sb.policy_file("wikipedia.yaml", SEED_003);
    let seed = seed.display().to_string();
    let (ok, out, err) = sb.ctl(EGRESS, &["create", "-f", &seed, "-n", "default"]);
    assert!(ok.success(), "{out}{err}");
    let (ok, out, err) = sb.ctl(
        EGRESS,
        &["get", "egressrules", "-n", "default", "-o", "json"],
    );
    assert!(ok.success(), "{err}");
    let rules: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
    assert_eq!(rules.len(), 5, "{out}");
    assert!(rules.iter().all(|r| r["namespace"] == "default"), "{out}");

    // Created after the agent: in their namespaces' scopes from their first connect.
    let web = node.pod("default", "sleep");
    let other = node.pod("other", "sleep");
    assert_connects(&node, &web, sa(V4_A, 443));
    assert_connects(&node, &web, sa(V4_B, 443));
    assert_refused(&node, &web, 9090);
    assert_refused(&node, &other, sa(V4_A, 443));
    assert_refused(&node, &other, sa(V4_B, 443));
    assert_accepted(&[(&a443, 1), (&b443, 1), (&a9090, 0)]);
    let status = sb.status_json(EGRESS);
    let range1 = status["rules"]
        .as_array()
        .and_then(|rules| {
            rules
                .iter()
                .find(|r| r["name"] == "wikipedia-range1" && r["namespace"] == "default")
        })
        .unwrap_or_else(|| panic!("no default/wikipedia-range1 in {status:#}"));
    assert_eq!(range1["allowed"], 1, "{status:#}");

    // HTTP rules by namespace, on the same port: each pod gets its own.
    let a = node.pod("team-a", "sleep");
    let b = node.pod("team-b", "sleep");
    let mut last = String::new();
    let served = eventually(Duration::from_secs(15), || {
        last = get(&node, &a, 80, "teamonly.test", "/a");
        code(&last) == 200
    });
    assert!(served, "team-a: {last}\n{}", agent.log());
    let served = eventually(Duration::from_secs(15), || {
        last = get(&node, &b, 80, "otheronly.test", "/b");
        code(&last) == 200
    });
    assert!(served, "team-b: {last}\n{}", agent.log());
    same_loopback_port_at_once(&sb, &agent, &http, [&a, &b]);
    let seen = http.seen().len();
    let refused = get(&node, &b, 80, "teamonly.test", "/not-b");
    assert_eq!(code(&refused), 403, "{refused}");
    assert_eq!(
        http.seen().len(),
        seen,
        "the upstream saw team-b's request for team-a's host"
    );
    // The metrics count each pod's events by pod: other/sleep's two denied connects,
    // team-b/sleep's 403.
    let series = |pod: &str, source: &str, verdict: &str| {
        format!(
            "egress_pod_events_total{{pod=\"{pod}\",source=\"{source}\",verdict=\"{verdict}\"}} "
        )
    };
    let mut metrics = String::new();
    let counted = eventually(Duration::from_secs(5), || {
        metrics = sb.scrape(9464, "/metrics").1;
        metrics.contains(&(series("other/sleep", "connect", "deny") + "2\n"))
            && metrics.contains(&(series("team-b/sleep", "http", "deny") + "1\n"))
    });
    assert!(counted, "{metrics}");
    // `other` has no HTTP rule on 80: no redirect, refused at connect().
    assert_refused(&node, &other, 80);

    // The agent killed: what is pinned keeps enforcing, scopes included; the pods' HTTP egress
    // has no proxy and is refused, never sent anywhere else.
    agent.signal(9);
    let _ = agent.wait();
    assert_connects(&node, &web, sa(V4_A, 443));
    assert_refused(&node, &other, sa(V4_A, 443));
    let seen = http.seen().len();
    let down = get(&node, &a, 80, "teamonly.test", "/down");
    assert_eq!(code(&down), 0, "{down}");
    assert_eq!(
        http.seen().len(),
        seen,
        "a request got out with the agent down"
    );
    // Restarted: the pods are in their scopes from its first generation, and stay in them
    // while the runtime is slow to answer its pod watch (the listing at start is answered, the
    // watch's first call only after 4 s); their HTTP egress resumes once it has reopened their
    // listeners.
    let slow = node.slow_socket(Duration::from_secs(4));
    let slow_arg = slow.path().display().to_string();
    let restart_args = args.map(|a| if a == socket { slow_arg.as_str() } else { a });
    let agent = sb.agent(EGRESS).args(&restart_args).start();
    assert_connects(&node, &web, sa(V4_A, 443));
    assert_refused(&node, &other, sa(V4_A, 443));
    assert_eq!(
        slow.let_through(),
        0,
        "the checks ran after the pod watch's first answer: they show nothing of the time before it\n{}",
        agent.log()
    );
    let served = eventually(Duration::from_secs(15), || {
        last = get(&node, &a, 80, "teamonly.test", "/again");
        code(&last) == 200
    });
    assert!(served, "team-a after the restart: {last}\n{}", agent.log());

    // The seed's rules deleted from `default` as `istioctl delete ... -n default` does.
    let (ok, out, err) = sb.ctl(
        EGRESS,
        &[
            "delete",
            "egressrule",
            "wikipedia-range1",
            "wikipedia-range2",
            "wikipedia-range3",
            "wikipedia-range4",
            "wikipedia-range5",
            "-n",
            "default",
        ],
    );
    assert!(ok.success(), "{out}{err}");
    assert_refused(&node, &web, sa(V4_A, 443));
    assert_accepted(&[(&a443, 3), (&b443, 1)]);
}

/// Two pods whose connections to the proxy come from the same loopback address and port at
/// the same time (each pod has its own loopback) get their own original destinations: team-a's
/// 192.0.2.1:80, team-b's 198.51.100.1:80. The agent is stopped (SIGSTOP) while both connect, so
/// both are established and both original destinations recorded before the proxy looks either
/// up: keyed by address and port alone, the second would overwrite the first. The clients are
/// the probe binary in each pod's container cgroup and network namespace (busybox's `nc`
/// cannot pick its local port).
fn same_loopback_port_at_once(
    sb: &Sandbox,
    agent: &egress_tests::agent::Agent,
    http: &Upstream,
    [a, b]: [&Pod; 2],
) {
    const PORT: u16 = 40_000;
    let requests = [
        (a, V4_A, "teamonly.test", "/same-a"),
        (b, V4_B, "otheronly.test", "/same-b"),
    ];
    let before = sb.events_json(EGRESS).len();
    agent.signal(libc::SIGSTOP);
    let probes: Vec<_> = requests
        .iter()
        .map(|(pod, dst, host, path)| {
            std::process::Command::new(PROBE)
                .arg("--cgroup")
                .arg(pod.cgroup_dir())
                .arg("--netns")
                .arg(pod.netns_path())
                .args(["--local-port", &PORT.to_string(), "--http"])
                .arg(format!(
                    "GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n"
                ))
                .arg(sa(*dst, 80).to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("starting the probe")
        })
        .collect();
    // Both established from 127.0.0.1:40000, in their own pods, with the proxy stopped.
    for (pod, ..) in requests {
        let mut sockets = String::new();
        let established = eventually(Duration::from_secs(5), || {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={}", pod.netns_path().display()))
                .args(["ss", "-Htan"])
                .output()
                .expect("ss");
            sockets = String::from_utf8_lossy(&out.stdout).into_owned();
            sockets.lines().any(|l| {
                l.starts_with("ESTAB")
                    && l.contains(&format!("127.0.0.1:{PORT} "))
                    && l.contains("127.0.0.1:15001")
            })
        });
        if !established {
            agent.signal(libc::SIGCONT);
        }
        assert!(
            established,
            "{}: no connection from 127.0.0.1:{PORT} to the proxy: {sockets}",
            pod.name
        );
    }
    agent.signal(libc::SIGCONT);
    for ((pod, dst, host, path), probe) in requests.into_iter().zip(probes) {
        let out = probe.wait_with_output().expect("the probe");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("status HTTP/1.1 200"),
            "{}: {text}{}",
            pod.name,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            http.seen().iter().any(|s| s.host == host
                && s.path == path
                && s.peer.map(|p| p.ip()) == Some(pod.ip)),
            "{}: the upstream did not see {host}{path} from the pod",
            pod.name
        );
        // The proxy's events for this request name the destination the pod connected to.
        let mut events = Vec::new();
        let logged = eventually(Duration::from_secs(5), || {
            events = sb.events_json(EGRESS).split_off(before);
            events.retain(|e| {
                e["source"] == "http" && e["pod"] == pod.name.as_str() && e["host"] == host
            });
            !events.is_empty()
        });
        assert!(logged, "no http event for {} {host}", pod.name);
        for event in &events {
            assert_eq!(
                event["destination"],
                sa(dst, 80).to_string(),
                "{}: the proxy took another pod's original destination: {event:#}",
                pod.name
            );
        }
    }
}

/// Seconds since midnight UTC of `t`.
fn day_seconds(t: std::time::SystemTime) -> f64 {
    let since = t.duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    since.as_secs_f64().rem_euclid(86_400.0)
}

/// Seconds since midnight UTC of a log line's timestamp (`2026-12-03T18:45:33.372016Z ...`).
fn log_day_seconds(line: &str) -> Option<f64> {
    let time = line
        .split_whitespace()
        .next()?
        .split_once('T')?
        .1
        .strip_suffix('Z')?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// The agent's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// What each pod costs the agent: ten pods created one after another each get their proxy
/// listeners (and scope) within a second of `RunPodSandbox`, every one of them serves, and
/// the agent's memory grows by a bounded amount per pod. Prints the numbers (time from the
/// pod's creation to its listeners, resident memory per pod) for the project's notes.
#[test]
fn every_pod_gets_its_listeners_within_a_second_at_a_bounded_cost() {
    const PODS: usize = 10;
    let sb = Sandbox::new();
    let http = Upstream::http(&sb.name, sa(V4_A, 80));
    let hosts = "  hosts:\n    httpbin.test: [192.0.2.1]\n";
    let rule = "kind: EgressRule\nmetadata: {name: web}\nspec:\n  destination: {service: httpbin.test}\n  ports: [{port: 80, protocol: http}]\n";
    let policy = sb.policy_file("p.yaml", &(config(hosts) + rule));
    let mut node = Node::start(&sb);
    let socket = node.socket().display().to_string();
    let agent = sb
        .agent(EGRESS)
        .policy(&policy, &["--cri-socket", &socket])
        .start();
    // Settled: the first poll done, nothing else going on.
    std::thread::sleep(Duration::from_secs(2));
    let before = rss_kib(agent.pid());
    let mut pods = Vec::new();
    let mut waits = Vec::new();
    for i in 0..PODS {
        let started = std::time::Instant::now();
        let at = day_seconds(std::time::SystemTime::now());
        let pod = node.pod("bench", &format!("p{i}"));
        let created = started.elapsed();
        let mut line = None;
        let listening = eventually(Duration::from_secs(5), || {
            line = agent
                .log()
                .lines()
                .find(|l| l.contains("listening inside the pod") && l.contains(&pod.name))
                .map(str::to_owned);
            line.is_some()
        });
        assert!(listening, "{}: no listeners: {}", pod.name, agent.log());
        // The agent's own timestamp of the line, against the wall clock before RunPodSandbox.
        let logged = line
            .as_deref()
            .and_then(log_day_seconds)
            .expect("a timestamp");
        let wait = Duration::from_secs_f64((logged - at).rem_euclid(86_400.0));
        waits.push((created, wait));
        pods.push(pod);
    }
    for pod in &pods {
        let out = get(&node, pod, 80, "httpbin.test", "/cost");
        assert_eq!(code(&out), 200, "{}: {out}", pod.name);
    }
    assert_eq!(http.seen().len(), PODS);
    let after = rss_kib(agent.pid());
    let per_pod = after.saturating_sub(before) as f64 / PODS as f64;
    let slowest = waits.iter().map(|(_, w)| *w).max().expect("pods");
    let created = waits.iter().map(|(c, _)| *c).max().expect("pods");
    let mut sorted: Vec<Duration> = waits.iter().map(|(_, w)| *w).collect();
    sorted.sort_unstable();
    eprintln!(
        "pods: {PODS} pods; agent RSS {before} KiB -> {after} KiB ({per_pod:.0} KiB per pod, one \
         request each); creation (RunPodSandbox to a running container) at most {created:?}; \
         listening inside the pod (agent's log timestamp) after RunPodSandbox started: median \
         {:?}, max {slowest:?}",
        sorted[PODS / 2]
    );
    assert!(
        slowest < Duration::from_secs(3),
        "a pod waited {slowest:?} for its listeners"
    );
}

/// FQDN rules in pods (issue 18): a pod's DNS queries go to the agent's DNS listener inside
/// the pod, and what they teach is its namespace's alone. `team-a` has an FQDN rule for
/// `www.wikipedia.test` on 443; `default` has none. busybox's `nc` resolves the name through
/// the pod's resolv.conf (the sandbox's DNS server, as the CRI's `dns_config` says).
#[test]
fn one_namespaces_lookups_never_open_a_path_for_another() {
    let sb = Sandbox::new();
    let www = std::net::Ipv4Addr::new(192, 0, 2, 10);
    sb.add_addrs(&["192.0.2.53/32".to_owned(), format!("{www}/32")]);
    let dns = sb.dns_server(sa(std::net::Ipv4Addr::new(192, 0, 2, 53), 53));
    dns.set_a("www.wikipedia.test", &[www], 300);
    std::fs::write(sb.resolv_conf(), "nameserver 192.0.2.53\n").expect("resolv.conf");
    let [sink] = sb.sinks(www, [443]);
    let mut node = Node::start(&sb);
    node.dns_servers = vec!["192.0.2.53".to_owned()];
    let policy = sb.policy_file(
        "p.yaml",
        "kind: EgressRule\nmetadata:\n  name: wikipedia\n  namespace: team-a\nspec:\n  \
         destination:\n    service: www.wikipedia.test\n  ports:\n  - port: 443\n    protocol: \
         tcp\n",
    );
    let socket = node.socket().display().to_string();
    let agent = sb
        .agent(EGRESS)
        .policy(&policy, &["--cri-socket", &socket])
        .log("egress_user::agent::dns=debug,info")
        .start();
    let a = node.pod("team-a", "a");
    let b = node.pod("default", "b");
    // Each pod's DNS listener is open within a second of the agent seeing it.
    for ns in ["team-a", "default"] {
        agent.wait_for_log(
            &format!("dns: listening for the queries to a resolver namespace=Some(\"{ns}\")"),
            Duration::from_secs(15),
        );
    }
    let by_name = |pod: &Pod| {
        node.exec(
            pod,
            &["/bin/busybox", "nc", "-w", "3", "www.wikipedia.test", "443"],
            Duration::from_secs(15),
        )
    };
    // default/b asks first: the name resolves, but nothing lets default's pods connect.
    let out = by_name(&b);
    assert_ne!(out.exit_code, 0, "default/b connected: {out:?}");
    assert!(out.stderr.contains("Operation not permitted"), "{out:?}");
    // team-a/a's lookup is learned for team-a: its first connect goes through.
    let out = by_name(&a);
    assert_eq!(out.exit_code, 0, "team-a/a: {out:?}\n{}", agent.log());
    // ...and still not for default/b, by name or by address.
    let out = by_name(&b);
    assert!(out.stderr.contains("Operation not permitted"), "{out:?}");
    assert_refused(&node, &b, sa(www, 443));
    assert_connects(&node, &a, sa(www, 443));
    assert_accepted(&[(&sink, 2)]);
    // The kernel holds the address for team-a's scope (and the XDP backstop's copy) only.
    let learned = egress_user::loader::learned::LearnedMaps::open(
        &egress_user::loader::PinDir::new(&sb.pin_dir),
    )
    .expect("learned maps")
    .entries();
    let mut scopes: Vec<u64> = learned.iter().map(|e| e.0).collect();
    scopes.sort_unstable();
    let team_a = egress_user::compile::stable_scope_id(Some("team-a"));
    let mut want = vec![team_a, egress_common::XDP_LEARNED];
    want.sort_unstable();
    assert_eq!(scopes, want, "{learned:?}");
    assert!(dns.queries_for("www.wikipedia.test") >= 2);
}

/// Seed 000's `curl http://httpbin/headers` from a pod, as written (busybox's `wget`): the
/// alias's name is answered by the agent's DNS listener inside the pod, with no cluster DNS
/// entry (the pod's resolver, the sandbox's DNS server, knows nothing of `httpbin`), and the
/// request goes through the pod's proxy listener to the alias's external name.
#[test]
fn seed_000s_alias_name_resolves_inside_a_pod() {
    let w = World::without_agent(EGRESS, PROBE);
    let sb = &w.sb;
    sb.add_addr("192.0.2.53/32");
    let dns = sb.dns_server(sa(std::net::Ipv4Addr::new(192, 0, 2, 53), 53));
    std::fs::write(sb.resolv_conf(), "nameserver 192.0.2.53\n").expect("resolv.conf");
    let policy = w.dir.join("policy.yaml");
    let mut yaml = std::fs::read_to_string(&policy).expect("policy");
    yaml.push_str(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: httpbin\nspec:\n  type: \
         ExternalName\n  externalName: httpbin.test\n  ports:\n  - port: 80\n",
    );
    std::fs::write(&policy, yaml).expect("policy");
    let mut node = Node::start(sb);
    node.dns_servers = vec!["192.0.2.53".to_owned()];
    let socket = node.socket().display().to_string();
    let agent = sb
        .agent(EGRESS)
        .args(&sb.run_args(&policy, &["--cri-socket", &socket]))
        .start();
    let pod = node.pod("default", "sleep");
    agent.wait_for_log(
        "dns: listening for the queries to a resolver namespace=Some(\"default\")",
        Duration::from_secs(15),
    );
    // $ curl http://httpbin/headers
    let out = node.exec(
        &pod,
        &[
            "/bin/busybox",
            "wget",
            "-q",
            "-O",
            "-",
            "http://httpbin/headers",
        ],
        Duration::from_secs(15),
    );
    assert_eq!(out.exit_code, 0, "{out:?}\n{}", agent.log());
    assert!(
        out.stdout
            .contains("upstream saw host=httpbin.test path=/headers"),
        "{out:?}"
    );
    assert_eq!(
        dns.queries_for("httpbin"),
        0,
        "the agent answered the alias's name"
    );
}
