//! The printing commands as a shell uses them (issue 14): a closed pipe ends them quietly,
//! `events --follow` says when the agent goes, and `EGRESS_SOCKET` names the socket.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::ExitStatusExt as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use egress_tests::{Agent, Sandbox, egress_bin, policy_file};

const EGRESS: &str = egress_bin!();

/// Waits for `child` at most `limit`; kills it and panics if it is still running.
fn wait_at_most(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_reader_that_goes_away_ends_a_printing_command_quietly() {
    // `egress check big.yaml | head -1`: far more output than a pipe holds.
    let dir = std::env::temp_dir().join(format!("egress-cli-pipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let yaml: String = (0..3000)
        .map(|i| {
            format!(
                "kind: EgressRule\nmetadata: {{name: r{i}}}\nspec:\n  destination: {{service: 192.0.{}.{}/32}}\n  ports: [{{port: 443, protocol: tcp}}]\n---\n",
                i / 250,
                i % 250
            )
        })
        .collect();
    let file = policy_file(&dir, "big.yaml", &yaml);
    let mut child = Command::new(EGRESS)
        .arg("check")
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("egress check");
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("first line");
    // The reader is dropped here: the pipe is closed with most of the output unwritten.
    let status = wait_at_most(&mut child, Duration::from_secs(30));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    let _ = std::fs::remove_dir_all(&dir);
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
    let dir = std::env::temp_dir().join(format!("{}-cli", sb.name));
    std::fs::create_dir_all(&dir).expect("dir");
    let policy = policy_file(
        &dir,
        "p.yaml",
        "kind: EgressConfig\nmetadata: {name: c}\nspec: {}\n",
    );
    let agent = Agent::start_in(&sb, EGRESS, &sb.run_args(&policy, &[]));

    // EGRESS_SOCKET instead of --socket.
    let out = Command::new(EGRESS)
        .arg("status")
        .env("EGRESS_SOCKET", sb.socket())
        .output()
        .expect("egress status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(", ready"));

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
    let status = wait_at_most(&mut follow, Duration::from_secs(10));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut follow.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!status.success(), "a follow that lost its agent must fail");
    assert!(
        stderr.contains("the agent closed the event stream"),
        "{stderr}"
    );
}

#[test]
fn a_namespace_flag_other_than_default_is_refused_before_anything_is_sent() {
    // `istioctl create -f rule.yaml -n default` as the seeds do it: accepted (this one then
    // fails only because no agent listens on the made-up socket).
    let socket = std::env::temp_dir().join(format!("egress-cli-ns-{}.sock", std::process::id()));
    let out = Command::new(EGRESS)
        .args(["get", "egressrules", "-n", "default", "--socket"])
        .arg(&socket)
        .output()
        .expect("egress get");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("namespace"), "{err}");
    assert!(err.contains("no egress agent is listening"), "{err}");
    for verb in [
        &["create", "-f", "-"][..],
        &["delete", "egressrule", "r"],
        &["get", "egressrules"],
    ] {
        let out = Command::new(EGRESS)
            .args(verb)
            .args(["--namespace", "team-a", "--socket"])
            .arg(&socket)
            .stdin(Stdio::null())
            .output()
            .expect("egress");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{verb:?}: {err}");
        assert!(
            err.contains("namespaces do not scope rules yet"),
            "{verb:?}: {err}"
        );
    }
}
