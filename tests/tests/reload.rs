//! Reloading a running agent (SIGHUP): a valid policy replaces the running one in the kernel
//! and in the proxy; an invalid one changes nothing.

use std::{fs, time::Duration};

use egress_tests::{
    Outcome, Sandbox, V4_A, assert_accepted, egress_bin, probe_bin, sa, upstream::Upstream,
};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();

fn tcp_rule(name: &str, port: u16) -> String {
    format!(
        "kind: EgressRule\nmetadata: {{name: {name}}}\nspec:\n  destination: {{service: 192.0.2.0/24}}\n  ports: [{{port: {port}, protocol: tcp}}]\n"
    )
}

fn http_rule(name: &str, host: &str) -> String {
    format!(
        "kind: EgressRule\nmetadata: {{name: {name}}}\nspec:\n  destination: {{service: {host}}}\n  ports: [{{port: 80, protocol: http}}]\n"
    )
}

const CONFIG: &str = "kind: EgressConfig\nmetadata: {name: config}\nspec:\n  hosts: {one.test: [192.0.2.1], two.test: [192.0.2.1]}\n";

fn status(sb: &Sandbox, host: &str) -> String {
    let req = format!("GET / HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n");
    let out = sb.http(PROBE, &req, &[sa(V4_A, 80)]);
    out.lines()
        .find_map(|l| l.strip_prefix("status "))
        .unwrap_or("")
        .to_owned()
}

#[test]
fn sighup_applies_a_valid_policy_and_keeps_the_running_one_when_invalid() {
    let sb = Sandbox::new();
    let dir = sb.dir("reload");
    fs::write(dir.join("0-config.yaml"), CONFIG).expect("config");
    fs::write(
        dir.join("a.yaml"),
        format!(
            "{}---\n{}",
            tcp_rule("tcp", 8080),
            http_rule("web", "one.test")
        ),
    )
    .expect("a");
    let [s8080, s9090] = sb.sinks(V4_A, [8080, 9090]);
    let http = Upstream::http(&sb.name, sa(V4_A, 80));
    let agent = sb.agent(EGRESS).policy(&dir, &[]).start();

    sb.expect_verdicts(PROBE, &[s8080.addr()], &[s9090.addr()]);
    assert!(status(&sb, "one.test").contains("200"));
    assert!(status(&sb, "two.test").contains("403"));

    // A new policy in the directory: the TCP port and the allowed host both move.
    fs::write(
        dir.join("a.yaml"),
        format!(
            "{}---\n{}",
            tcp_rule("tcp", 9090),
            http_rule("web", "two.test")
        ),
    )
    .expect("a");
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("reloaded", Duration::from_secs(10));
    assert!(
        agent
            .log()
            .lines()
            .any(|l| l.contains("reloaded") && l.contains("generation=2")),
        "{}",
        agent.log()
    );
    sb.expect_verdicts(PROBE, &[s9090.addr()], &[s8080.addr()]);
    assert!(status(&sb, "two.test").contains("200"));
    assert!(status(&sb, "one.test").contains("403"));
    // Events carry the generation that judged them.
    agent.wait_for_log("destination=192.0.2.1:8080", Duration::from_secs(5));
    assert!(
        agent.log().lines().any(|l| l.contains("verdict=deny")
            && l.contains("destination=192.0.2.1:8080")
            && l.contains("generation=2")),
        "{}",
        agent.log()
    );

    // An invalid file: reported with its file and line, and nothing changes.
    fs::write(dir.join("b.yaml"), tcp_rule("bad", 0)).expect("b");
    agent.signal(libc::SIGHUP);
    agent.wait_for_log("reload failed", Duration::from_secs(10));
    let log = agent.log();
    assert!(
        log.contains(&format!("{}:5:", dir.join("b.yaml").display())),
        "{log}"
    );
    assert_eq!(
        sb.connect(PROBE, s9090.addr()),
        Outcome::Connected,
        "the running policy stays"
    );
    assert_eq!(sb.connect(PROBE, s8080.addr()), Outcome::Denied);
    assert!(status(&sb, "two.test").contains("200"));

    assert_accepted(&[(&s8080, 1), (&s9090, 2)]);
    assert_eq!(
        http.seen().len(),
        3,
        "only allowed requests reached the upstream"
    );
    drop(agent);
}
