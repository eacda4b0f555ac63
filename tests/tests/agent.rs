//! The `egress` CLI as an operator runs it: `egress run` in the foreground, killed and
//! restarted, `egress exec`, `egress unload`, and a bad policy.

use std::{process::Command, time::Duration};

use egress_tests::{
    Outcome, Sandbox, V4_A, assert_accepted, egress_bin, policy::test_net_rule, probe_bin, sa,
};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();

/// SIGKILL leaves enforcement in place (the pins hold it); a new agent takes the pins over
/// and swaps its own policy in; `egress unload` then lifts all filtering.
#[test]
fn enforcement_survives_sigkill_a_new_agent_takes_over_and_unload_lifts_it() {
    let sb = Sandbox::new();
    let p8080 = sb.policy_file("a.yaml", &test_net_rule("allow-8080", 8080));
    let p9090 = sb.policy_file("b.yaml", &test_net_rule("allow-9090", 9090));
    let [s8080, s9090] = sb.sinks(V4_A, [8080, 9090]);

    let first = sb.agent(EGRESS).policy(&p8080, &[]).start();
    sb.expect_verdicts(PROBE, &[s8080.addr()], &[s9090.addr()]);
    // The agent logs the denial with the destination and the process.
    first.wait_for_log("192.0.2.1:9090", Duration::from_secs(5));
    let log = first.log();
    assert!(
        log.contains("connect deny") && log.contains("egress-probe"),
        "{log}"
    );

    first.signal(libc::SIGKILL);
    let status = first.wait();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert_eq!(
        sb.connect(PROBE, s9090.addr()),
        Outcome::Denied,
        "still enforced with no agent"
    );
    assert_eq!(sb.connect(PROBE, s8080.addr()), Outcome::Connected);

    let second = sb.agent(EGRESS).policy(&p9090, &[]).start();
    assert!(second.log().contains("generation=2"), "{}", second.log());
    assert_eq!(
        sb.connect(PROBE, s9090.addr()),
        Outcome::Connected,
        "the new policy is in force"
    );
    assert_eq!(
        sb.connect(PROBE, s8080.addr()),
        Outcome::Denied,
        "the old policy is gone"
    );
    second.signal(libc::SIGTERM);
    let log = second.log.clone();
    assert!(second.wait().success());
    assert!(
        log.lock()
            .expect("log")
            .contains("enforcement stays in place")
    );
    assert_eq!(
        sb.connect(PROBE, s8080.addr()),
        Outcome::Denied,
        "a clean stop also keeps enforcing"
    );

    assert_accepted(&[(&s8080, 2), (&s9090, 1)]);

    let out = sb.unload(EGRESS);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("no longer filtered"));
    assert!(!sb.pin_dir.exists(), "unload removed the pin directory");
    sb.expect_verdicts(PROBE, &[s8080.addr(), sa(V4_A, 9090)], &[]);
    assert_accepted(&[(&s8080, 3), (&s9090, 2)]);
}

/// `egress exec` runs the command inside the managed cgroup, with its exit status; it refuses
/// to run anything when no egress program watches the cgroup (that would fail open).
#[test]
fn exec_runs_the_command_filtered_and_refuses_an_unwatched_cgroup() {
    let sb = Sandbox::new();
    let policy = sb.policy_file("a.yaml", &test_net_rule("allow-8080", 8080));
    let [allowed, denied] = sb.sinks(V4_A, [8080, 9090]);
    let exec = |addr: &str| {
        Command::new(EGRESS)
            .args(["exec", "--cgroup"])
            .arg(&sb.cgroup)
            .arg("--pin-dir")
            .arg(&sb.pin_dir)
            .args(["--", PROBE, "--netns", &sb.name, addr])
            .output()
            .expect("egress exec")
    };

    let refused = exec("192.0.2.1:9090");
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("start `egress run` first"),
        "{refused:?}"
    );
    assert!(
        refused.stdout.is_empty(),
        "the command did not run: {refused:?}"
    );
    assert_eq!(denied.accepted(), 0);

    let _agent = sb.agent(EGRESS).policy(&policy, &[]).start();
    let out = exec("192.0.2.1:9090");
    assert_eq!(
        out.status.code(),
        Some(1),
        "the command's own exit status: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!("error {} ", libc::EPERM)),
        "{out:?}"
    );
    let out = exec("192.0.2.1:8080");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "connected");
    assert_accepted(&[(&allowed, 1), (&denied, 0)]);
}

/// A bad policy is reported as FILE:LINE and nothing is loaded.
#[test]
fn run_with_an_invalid_policy_loads_nothing() {
    let sb = Sandbox::new();
    let bad = sb.policy_file("bad.yaml", &test_net_rule("bad", 0));
    let out = Command::new(EGRESS)
        .arg("run")
        .args(sb.run_args(&bad, &[]))
        .output()
        .expect("egress run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:8:", bad.display())),
        "{stderr}"
    );
    assert!(!sb.pin_dir.join("links").exists(), "nothing was pinned");
    let server = sb.sink(sa(V4_A, 8080));
    assert_eq!(
        sb.connect(PROBE, server.addr()),
        Outcome::Connected,
        "nothing is filtered"
    );
}

/// A map pinned by an incompatible version of egress is reported, with the command that
/// clears it, and nothing is attached; after that command a new agent starts.
#[test]
fn a_pinned_map_of_another_layout_is_reported_not_misread() {
    let sb = Sandbox::new();
    let policy = sb.policy_file("a.yaml", &test_net_rule("allow-8080", 8080));
    std::fs::create_dir_all(&sb.pin_dir).expect("pin dir");
    // COUNTERS as another version might have made it: per-CPU, but 16-byte values.
    let counters = sb.pin_dir.join("COUNTERS");
    egress_tests::sh(&[
        "bpftool",
        "map",
        "create",
        counters.to_str().expect("utf-8 path"),
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "16",
        "entries",
        "8",
        "name",
        "COUNTERS",
    ]);
    let (status, stderr) = sb.agent(EGRESS).policy(&policy, &[]).run_to_exit();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "pinned map {} has type PerCpuArray, key 4 B, value 16 B, 8 entries",
            counters.display()
        )) && stderr.contains(&format!(
            "incompatible version of egress: run `egress unload --pin-dir {}` first",
            sb.pin_dir.display()
        )),
        "{stderr}"
    );
    assert!(
        egress_user::loader::enforced_cgroups(&sb.pin_dir)
            .expect("reading the pins")
            .is_empty(),
        "nothing was attached"
    );
    let server = sb.sink(sa(V4_A, 9090));
    assert_eq!(
        sb.connect(PROBE, server.addr()),
        Outcome::Connected,
        "nothing is filtered"
    );

    let unload = sb.unload(EGRESS);
    assert!(unload.status.success(), "{unload:?}");
    let _agent = sb.agent(EGRESS).policy(&policy, &[]).start();
    assert_eq!(sb.connect(PROBE, server.addr()), Outcome::Denied);
    assert_eq!(server.accepted(), 1);
}

/// A mistyped `--cgroup` (`kubepods.slice` on a cgroupfs-driver node) is an error naming what
/// exists there, not a new empty cgroup enforced on; `--create-cgroup` asks for one.
#[test]
fn a_missing_cgroup_is_refused_unless_creating_it_was_asked_for() {
    let sb = Sandbox::new();
    let policy = sb.policy_file("p.yaml", &test_net_rule("r", 8080));
    // The sandbox's cgroup holds one child cgroup, as a node holds kubepods.
    std::fs::create_dir(sb.cgroup.join("kubepods")).expect("child cgroup");
    let typo = sb.cgroup.join("kubepods.slice");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut args = vec![
            "--policy".to_owned(),
            policy.display().to_string(),
            "--cgroup".to_owned(),
            typo.display().to_string(),
            "--pin-dir".to_owned(),
            sb.pin_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    };
    let (status, log) = sb.agent(EGRESS).args(&args(&[])).run_to_exit();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains(&format!("cgroup {} does not exist", typo.display()))
            && log.contains("--create-cgroup")
            && log.contains(&format!(
                "{} exists and holds kubepods",
                sb.cgroup.display()
            )),
        "{log}"
    );
    assert!(!typo.exists(), "nothing was created");
    assert!(!sb.pin_dir.join("links").exists(), "nothing was pinned");

    let agent = sb.agent(EGRESS).args(&args(&["--create-cgroup"])).start();
    assert!(typo.join("cgroup.procs").exists(), "{}", agent.log());
    assert!(agent.log().contains("ready: enforcing"), "{}", agent.log());
    agent.signal(libc::SIGTERM);
    let _ = agent.wait();
    let _ = egress_user::loader::unload(&sb.pin_dir);
    let _ = std::fs::remove_dir(&typo);
    let _ = std::fs::remove_dir(sb.cgroup.join("kubepods"));
}

/// An empty managed cgroup filters nothing: after a while the agent says so, once; a cgroup
/// with a process in it is not reported.
#[test]
fn an_empty_managed_cgroup_is_reported() {
    let sb = Sandbox::new();
    let policy = sb.policy_file("p.yaml", &test_net_rule("r", 8080));
    const WARNING: &str = "the managed cgroup has no process and no child cgroup";
    let env = [("EGRESS_EMPTY_CGROUP_WARN_AFTER_MS", "300")];
    let agent = sb.agent(EGRESS).policy(&policy, &[]).env(&env).start();
    agent.wait_for_log(WARNING, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(agent.log().matches(WARNING).count(), 1, "{}", agent.log());
    agent.signal(libc::SIGTERM);
    let _ = agent.wait();

    // A workload in the cgroup: no warning.
    let mut workload = Command::new("sh")
        .args(["-c", "echo $$ > \"$1/cgroup.procs\" && exec sleep 30", "sh"])
        .arg(&sb.cgroup)
        .spawn()
        .expect("a workload");
    std::thread::sleep(Duration::from_millis(200));
    let agent = sb.agent(EGRESS).policy(&policy, &[]).env(&env).start();
    std::thread::sleep(Duration::from_millis(2000));
    let log = agent.log();
    let _ = workload.kill();
    let _ = workload.wait();
    assert!(!log.contains(WARNING), "{log}");
}
