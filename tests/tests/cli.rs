//! The printing commands as a shell uses them (issue 14): a closed pipe ends them quietly,
//! `events --follow` says when the agent goes, and `EGRESS_SOCKET` names the socket; `egress
//! unload` tidies the cgroup `egress run` made, and `egress maps` decodes the pins.

use std::{
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use egress_tests::{
    Agent, Outcome, Sandbox, V4_A, V4_B, assert_accepted, egress_bin, first_line, policy_file,
    probe_bin, row_named, run_ok, sa, wait_within,
};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();

/// A policy of an EgressConfig and no rules: enough for an agent to start.
const NO_RULES: &str = "kind: EgressConfig\nmetadata: {name: c}\nspec: {}\n";

/// Waits for `child` at most `limit` (killing it and failing the test if it is still
/// running then) and returns its exit status and what it wrote to its stderr (piped).
fn finish(child: &mut std::process::Child, limit: Duration) -> (std::process::ExitStatus, String) {
    let status =
        wait_within(child, limit).unwrap_or_else(|| panic!("still running after {limit:?}"));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    (status, stderr)
}

#[test]
fn a_reader_that_goes_away_ends_a_printing_command_quietly() {
    // `egress check big.yaml | head -1`: far more output than a pipe holds.
    let tmp = tempfile::tempdir().expect("temporary directory");
    let dir = tmp.path();
    let yaml: String = (0..3000)
        .map(|i| {
            format!(
                "kind: EgressRule\nmetadata: {{name: r{i}}}\nspec:\n  destination: {{service: 192.0.{}.{}/32}}\n  ports: [{{port: 443, protocol: tcp}}]\n---\n",
                i / 250,
                i % 250
            )
        })
        .collect();
    let file = policy_file(dir, "big.yaml", &yaml);
    let mut child = Command::new(EGRESS)
        .arg("check")
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("egress check");
    let first = first_line(&mut child, "egress check");
    // The pipe is closed here with most of the output unwritten.
    drop(child.stdout.take());
    let (status, stderr) = finish(&mut child, Duration::from_secs(30));
    assert!(!first.is_empty());
    assert_ne!(status.code(), Some(101), "it panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        status.success() || status.signal() == Some(libc::SIGPIPE),
        "{status:?}: {stderr}"
    );
}

#[test]
fn events_follow_says_when_the_agent_stops_and_egress_socket_names_the_socket() {
    let sb = Sandbox::new();
    let policy = sb.policy_file("p.yaml", NO_RULES);
    let agent = sb.agent(EGRESS).policy(&policy, &[]).start();

    // EGRESS_SOCKET instead of --socket.
    let out = run_ok(
        Command::new(EGRESS)
            .arg("status")
            .env("EGRESS_SOCKET", sb.socket()),
        "egress status",
    );
    assert!(out.contains(", ready"), "{out}");

    let mut follow = Command::new(EGRESS)
        .args(["events", "--follow"])
        .env("EGRESS_SOCKET", sb.socket())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("egress events --follow");
    std::thread::sleep(Duration::from_millis(500));
    agent.signal(libc::SIGTERM);
    let _ = agent.wait();
    let (status, stderr) = finish(&mut follow, Duration::from_secs(10));
    assert!(!status.success(), "a follow that lost its agent must fail");
    assert!(
        stderr.contains("the agent closed the event stream"),
        "{stderr}"
    );
}

#[test]
fn a_namespace_flag_is_a_namespace_name_checked_before_anything_is_sent() {
    // `istioctl create -f rule.yaml -n default` as the seeds do it, and any other namespace:
    // accepted (these then fail only because no agent listens on the made-up socket).
    let tmp = tempfile::tempdir().expect("temporary directory");
    let socket = tmp.path().join("ns.sock");
    for verb in [
        &["create", "-f", "-"][..],
        &["delete", "egressrule", "r"],
        &["get", "egressrules"],
    ] {
        for ns in ["default", "team-a"] {
            let out = Command::new(EGRESS)
                .args(verb)
                .args(["-n", ns, "--socket"])
                .arg(&socket)
                .stdin(Stdio::null())
                .output()
                .expect("egress");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("no egress agent is listening"),
                "{verb:?} -n {ns}: {err}"
            );
        }
        let out = Command::new(EGRESS)
            .args(verb)
            .args(["--namespace", "Team_A", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .output()
            .expect("egress");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{verb:?}: {err}");
        assert!(err.contains("is not a namespace name"), "{verb:?}: {err}");
    }
}

/// Starts an agent of `sb` enforcing `policy` on `cgroup`, which it creates
/// (`--create-cgroup`).
fn start_creating(sb: &Sandbox, policy: &Path, cgroup: &Path) -> Agent {
    let cgroup = cgroup.display().to_string();
    let policy = policy.display().to_string();
    let pin_dir = sb.pin_dir.display().to_string();
    sb.agent(EGRESS)
        .args(&[
            "--policy",
            &policy,
            "--cgroup",
            &cgroup,
            "--create-cgroup",
            "--pin-dir",
            &pin_dir,
        ])
        .start()
}

/// Starts an agent of `sb` on `cgroup` (with `--create-cgroup`), stops it, and returns what
/// `egress unload` then printed.
fn run_then_unload(sb: &Sandbox, policy: &Path, cgroup: &Path) -> String {
    let agent = start_creating(sb, policy, cgroup);
    agent.signal(libc::SIGTERM);
    let _ = agent.wait();
    let out = sb.unload(EGRESS);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn unload_removes_the_cgroup_egress_run_created_when_empty_and_says_why_another_stays() {
    let sb = Sandbox::new();
    let policy = sb.policy_file("p.yaml", NO_RULES);

    // Created by `egress run --create-cgroup`, empty: removed.
    let made = sb.cgroup.join("made");
    let out = run_then_unload(&sb, &policy, &made);
    assert!(
        out.contains(&format!(
            "removed cgroup {} (egress run created it)",
            made.display()
        )),
        "{out}"
    );
    assert!(!made.exists(), "{out}");

    // Created, but a process still runs in it: it stays, and unload says why.
    let busy = sb.cgroup.join("busy");
    let mut sleeper = Command::new("sleep").arg("60").spawn().expect("sleep");
    let cleanup = |sleeper: &mut std::process::Child| {
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    };
    let agent_then_join = {
        // The agent makes the cgroup; the process joins it before the unload.
        let agent = start_creating(&sb, &policy, &busy);
        std::fs::write(busy.join("cgroup.procs"), sleeper.id().to_string())
            .expect("moving sleep into the cgroup");
        agent.signal(libc::SIGTERM);
        let _ = agent.wait();
        sb.unload(EGRESS)
    };
    let out = String::from_utf8_lossy(&agent_then_join.stdout).into_owned();
    let busy_stays = busy.exists();
    cleanup(&mut sleeper);
    assert!(
        out.contains(&format!(
            "cgroup {} stays: 1 process(es) still run in it (pid {})",
            busy.display(),
            sleeper.id()
        )),
        "{out}"
    );
    assert!(busy_stays, "{out}");

    // A cgroup that existed before the agent (the sandbox made it): never removed.
    let out = run_then_unload(&sb, &policy, &sb.cgroup);
    assert!(
        out.contains(&format!(
            "cgroup {} stays: egress did not create it",
            sb.cgroup.display()
        )),
        "{out}"
    );
    assert!(sb.cgroup.exists());
}

#[test]
fn egress_maps_lists_the_rules_by_name_with_the_counts_of_the_traffic_made() {
    let sb = Sandbox::new();
    let dir = sb.dir("maps");
    let policy = policy_file(
        &dir,
        "p.yaml",
        "kind: EgressRule\nmetadata: {name: web-a}\nspec:\n  destination: {service: 192.0.2.1/32}\n  ports: [{port: 8080, protocol: tcp}]\n---\n\
         kind: EgressRule\nmetadata: {name: dns-b}\nspec:\n  destination: {service: 198.51.100.0/24}\n  ports: [{port: 53, protocol: udp}]\n---\n\
         kind: EgressRule\nmetadata: {name: site}\nspec:\n  destination: {service: site.example.test}\n  ports: [{port: 80, protocol: http}]\n",
    );
    let _agent = sb.agent(EGRESS).policy(&policy, &[]).start();
    let allowed = sb.sink(sa(V4_A, 8080));
    let denied = sb.sink(sa(V4_B, 8080));
    for _ in 0..3 {
        assert_eq!(sb.connect(PROBE, sa(V4_A, 8080)), Outcome::Connected);
    }
    for _ in 0..2 {
        assert_eq!(sb.connect(PROBE, sa(V4_B, 8080)), Outcome::Denied);
    }
    // Counted at the sinks: the counters below describe what really happened.
    assert_accepted(&[(&allowed, 3), (&denied, 0)]);

    let pin_dir = sb.pin_dir.display().to_string();
    let text = run_ok(
        Command::new(EGRESS).args(["maps", "--pin-dir", &pin_dir]),
        "egress maps",
    );
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
            .to_owned()
    };
    let key = line("192.0.2.1/32");
    assert!(key.contains("8080/tcp") && key.ends_with("web-a"), "{text}");
    let key = line("198.51.100.0/24");
    assert!(key.contains("53/udp") && key.ends_with("dns-b"), "{text}");
    assert!(line("HTTP_PORTS:").ends_with(" 80"), "{text}");
    assert!(line("BYPASS:").contains("127.0.0.0/8"), "{text}");
    let count = |name: &str| {
        text.lines()
            .skip_while(|l| !l.starts_with("COUNTERS"))
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no counter row {name:?} in:\n{text}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(count("web-a")[3], "3", "{text}");
    assert_eq!(count("(no")[6], "2", "{text}");
    assert_eq!(count("dns-b")[3], "0", "{text}");
    // 131,072 rows in the map, only those in use shown.
    assert!(text.lines().count() < 40, "{text}");

    let out = Command::new(EGRESS)
        .args(["maps", "--pin-dir", &pin_dir, "-o", "json"])
        .output()
        .expect("egress maps -o json");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let rules = json["rules"].as_array().expect("rules");
    assert!(
        rules.iter().any(|r| r["destination"] == "192.0.2.1/32"
            && r["port"] == "8080/tcp"
            && r["rule"] == "web-a"),
        "{json}"
    );
    let counter = |name: &str| row_named(&json, "counters", name);
    assert_eq!(counter("web-a")["allowed"], 3, "{json}");
    assert_eq!(counter("(no rule)")["denied"], 2, "{json}");
    assert_eq!(json["http_ports"], serde_json::json!([80]), "{json}");
    assert_eq!(json["config"]["mode"], "enforce", "{json}");
}
