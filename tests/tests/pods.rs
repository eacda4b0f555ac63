//! Pods under a real container runtime (containerd, runc, the CNI `ptp` plugin), created
//! through the CRI as kubelet creates them, filtered by the agent whose managed cgroup holds
//! their cgroups (`cargo xtask test --step pods`; see `egress_tests::node`).
//!
//! Every address is TEST-NET inside the sandbox's network namespace, which has no route out:
//! the pods reach the node's own addresses and nothing else.

use std::time::Duration;

use egress_tests::{
    Sandbox, V4_A, assert_accepted, egress_bin, eventually,
    node::{Exec, Node, Pod},
    policy::tcp_rule,
    status_row,
};

const EGRESS: &str = egress_bin!();

/// `nc` from the pod's busybox to the node's 192.0.2.1:`port`: exit 0 once connected (the
/// sink closes at once), non-zero with the reason on stderr when refused.
fn connect(node: &Node<'_>, pod: &Pod, port: u16) -> Exec {
    let port = port.to_string();
    node.exec(
        pod,
        &["/bin/busybox", "nc", "-w", "3", &V4_A.to_string(), &port],
        Duration::from_secs(10),
    )
}

fn assert_connects(node: &Node<'_>, pod: &Pod, port: u16) {
    let out = connect(node, pod, port);
    assert_eq!(out.exit_code, 0, "{} to port {port}: {out:?}", pod.name);
}

fn assert_refused(node: &Node<'_>, pod: &Pod, port: u16) {
    let out = connect(node, pod, port);
    assert_ne!(
        out.exit_code, 0,
        "{} to port {port} connected: {out:?}",
        pod.name
    );
    assert!(
        out.stderr.contains("Operation not permitted"),
        "{} to port {port}: refused at connect() with EPERM, not {out:?}",
        pod.name
    );
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
