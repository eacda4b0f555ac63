//! The agent on kernels with and without the features it uses (issue 7): it starts and says
//! so when every feature is there; it refuses to start, attaching nothing, when a required
//! one is missing; and it runs degraded, saying what is lost, without an optional one, with
//! enforcement unchanged. This machine's kernel has every feature, so the agent is shown a
//! smaller kernel with `EGRESS_KERNEL_FEATURES_HIDE`, which only takes features away. Nothing
//! here depends on more than Linux 6.1 (these tests also run under QEMU on 6.1 and 6.12).

use std::{
    fs,
    path::{Path, PathBuf},
};

use egress_tests::{
    Outcome, Sandbox, V4_A, assert_accepted, egress_bin, policy_file, probe_bin, sa, status_row,
    upstream::Upstream,
};
use egress_user::loader::{self, features};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();
const HIDE: &str = features::HIDE_ENV;

/// 8080/tcp to 192.0.2.0/24, and plain HTTP to `web.test` (192.0.2.1:80) through the proxy.
fn policy(dir: &Path) -> PathBuf {
    policy_file(
        dir,
        "policy.yaml",
        "kind: EgressConfig\nmetadata: {name: config}\nspec:\n  hosts: {web.test: [192.0.2.1]}\n\
         ---\nkind: EgressRule\nmetadata: {name: allow-8080}\nspec:\n  destination: {service: 192.0.2.0/24}\n  \
         ports: [{port: 8080, protocol: tcp}]\n\
         ---\nkind: EgressRule\nmetadata: {name: web}\nspec:\n  destination: {service: web.test}\n  \
         ports: [{port: 80, protocol: http}]\n",
    )
}

/// `egress status` of the sandbox's agent, as text.
fn status(sb: &Sandbox) -> String {
    let (code, out, err) = sb.ctl(EGRESS, &["status"]);
    assert!(code.success(), "egress status: {err}");
    out
}

/// One HTTP request through the proxy from inside the managed cgroup: the probe's status line
/// and what its `getpeername()` said.
fn get(sb: &Sandbox) -> (String, String) {
    let req = "GET /kf HTTP/1.1\\r\\nHost: web.test\\r\\nConnection: close\\r\\n\\r\\n";
    let out = sb.http(PROBE, req, &[sa(V4_A, 80)]);
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} line in the probe's output:\n{out}"))
            .to_owned()
    };
    (field("status"), field("peer"))
}

/// On this kernel (and 6.1, 6.12) every feature is there: the probes say so, the agent logs
/// it, `egress status` shows it, and the app sees its original destination.
#[test]
fn with_every_feature_the_agent_says_so_and_runs_complete() {
    let kernel = features::kernel();
    let assessment = kernel.assess(true).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        assessment.degraded.is_empty() && assessment.unavailable.is_empty(),
        "{}",
        assessment.summary()
    );

    let sb = Sandbox::new();
    let dir = sb.dir("kfeat");
    let web = Upstream::http(&sb.name, sa(V4_A, 80));
    let agent = sb.agent(EGRESS).policy(&policy(&dir), &[]).start();
    let log = agent.log();
    assert!(log.contains("kernel: all kernel features present"), "{log}");
    assert!(log.contains(&kernel.release), "{log}");
    assert!(!log.contains("kernel feature missing"), "{log}");
    assert!(
        status(&sb).contains(&format!(
            "features:    all present (Linux {})",
            kernel.release
        )),
        "{}",
        status(&sb)
    );
    let (code, peer) = get(&sb);
    assert!(code.contains(" 200 "), "{code}");
    assert_eq!(
        peer, "192.0.2.1:80",
        "getpeername shows the original destination"
    );
    assert_eq!(web.seen().len(), 1);
    assert!(sb.pin_dir.join("links/getpeername4").exists());
}

/// Without a required feature the agent exits non-zero before touching anything, naming every
/// missing feature, what it is for and the kernel it needs; nothing judges the cgroup's
/// connections afterwards (no pins, no links: a denied port still reaches the sink).
#[test]
fn without_a_required_feature_the_agent_refuses_and_attaches_nothing() {
    let sb = Sandbox::new();
    let dir = sb.dir("kfeat");
    let denied_if_enforced = sb.sink(sa(V4_A, 9090));
    let args = sb.run_args(&policy(&dir), &[]);

    let log = refused_without(&sb, &args, "sendmsg4,ringbuf");
    assert!(
        log.contains("egress: error: this kernel (Linux ")
            && log.contains(") lacks what egress needs to enforce its policy: sendmsg4 ("),
        "{log}"
    );
    for needle in [
        "BPF_CGROUP_UDP4_SENDMSG; Linux >= 4.18; used for judging UDP datagrams sent to an IPv4 address",
        "ringbuf (BPF_MAP_TYPE_RINGBUF",
        "Linux >= 5.8; used for deny events",
        "upgrade to Linux 6.1 or newer",
    ] {
        assert!(
            log.to_lowercase().contains(&needle.to_lowercase()),
            "{needle:?} not in:\n{log}"
        );
    }
    assert!(!log.contains("ready"), "{log}");

    // Nothing was made: no pin directory (as checked above), no control socket, no link on
    // the cgroup.
    assert!(!sb.socket().exists());
    assert_eq!(
        loader::enforced_cgroups(&sb.pin_dir).expect("reading pins"),
        Vec::<u64>::new()
    );
    // ...so the cgroup's connections are not judged at all: the policy would deny 9090.
    assert_eq!(
        sb.connect(PROBE, denied_if_enforced.addr()),
        Outcome::Connected
    );
    assert_eq!(denied_if_enforced.accepted(), 1);

    // A name that is no feature refuses too, rather than quietly hide nothing.
    let log = refused_without(&sb, &args, "getpeername");
    assert!(
        log.contains("EGRESS_KERNEL_FEATURES_HIDE names getpeername, which is no kernel feature"),
        "{log}"
    );

    // Without the XDP link the agent runs, unless the XDP backstop is asked for.
    let xdp = sb.run_args(&policy(&dir), &["--xdp-iface", "d1"]);
    let log = refused_without(&sb, &xdp, "xdp_link");
    assert!(
        log.contains("xdp_link (XDP programs attached through BPF_LINK_CREATE; Linux >= 5.9"),
        "{log}"
    );
}

/// Runs an agent of `sb` with `args` and shown a kernel without the features `hidden` (a
/// comma-separated list), which must refuse to start: exit status 1, nothing pinned. Returns
/// its log, which says why.
fn refused_without(sb: &Sandbox, args: &[String], hidden: &str) -> String {
    let (code, log) = sb
        .agent(EGRESS)
        .args(args)
        .env(&[(HIDE, hidden)])
        .run_to_exit();
    assert_eq!(code.code(), Some(1), "{log}");
    assert!(
        !sb.pin_dir.exists(),
        "{} exists: {log}",
        sb.pin_dir.display()
    );
    log
}

/// Fails the test unless the agent's `log` has a WARN line for each of the optional
/// `features` it runs without, naming the kernel that has it (`needs`) and what is `lost`, and
/// then the summary naming them all.
fn assert_degraded(log: &str, features: &[&str], needs: &str, lost: &str) {
    for feature in features {
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains("kernel feature missing, running without it")
                && l.contains(&format!("feature=\"{feature}\""))
                && l.contains(needs)
                && l.contains(lost)),
            "no WARN line for {feature}:\n{log}"
        );
    }
    let summary = format!("kernel: degraded, running without {}", features.join(", "));
    assert!(log.contains(&summary), "{log}");
}

/// Without the getpeername hooks the agent runs, warns, shows it in `egress status`, and
/// enforces exactly as before: an allowed connect reaches its sink, a denied one gets EPERM and
/// never does, HTTP goes through the proxy; only the app's getpeername() shows the proxy. The
/// getpeername links an earlier, complete agent pinned are detached.
#[test]
fn without_getpeername_the_agent_warns_and_enforces_unchanged() {
    let sb = Sandbox::new();
    let dir = sb.dir("kfeat");
    let [allowed, denied] = sb.sinks(V4_A, [8080, 9090]);
    let web = Upstream::http(&sb.name, sa(V4_A, 80));
    let args = sb.run_args(&policy(&dir), &[]);

    // An earlier agent with every feature pinned the getpeername links.
    let complete = sb.agent(EGRESS).args(&args).start();
    assert!(sb.pin_dir.join("links/getpeername4").exists());
    complete.signal(libc::SIGKILL);
    complete.wait();

    let agent = sb
        .agent(EGRESS)
        .args(&args)
        .env(&[(HIDE, "getpeername4,getpeername6")])
        .start();
    let log = agent.log();
    assert_degraded(
        &log,
        &["getpeername4", "getpeername6"],
        "Linux >= 5.8",
        "getpeername() instead of the destination",
    );
    assert!(log.contains("detached a pinned link"), "{log}");
    assert!(!sb.pin_dir.join("links/getpeername4").exists());
    assert!(!sb.pin_dir.join("links/getpeername6").exists());
    let shown = status(&sb);
    assert!(
        shown.contains("features:    DEGRADED")
            && shown.contains("getpeername4 (Linux >= 5.8): an app whose connection"),
        "{shown}"
    );

    // Enforcement is unchanged, counted at the sinks.
    sb.expect_verdicts(PROBE, &[allowed.addr()], &[denied.addr()]);
    assert_eq!(allowed.accepted(), 1);
    assert_eq!(
        denied.accepted(),
        0,
        "the denied connect never reached its sink"
    );
    // HTTP still goes through the proxy and is allowed by host; the app's getpeername() is
    // what was lost: it shows the proxy.
    let (code, peer) = get(&sb);
    assert!(code.contains(" 200 "), "{code}");
    assert_eq!(peer, "127.0.0.1:15001", "getpeername shows the proxy");
    assert_eq!(web.seen().len(), 1);
}

/// Without batch map calls the agent writes the rules one by one: the same policy in force
/// (first start and a reload, which also reads the row table back entry by entry), with the
/// WARN line.
#[test]
fn without_batch_ops_rules_load_one_by_one_and_are_the_same() {
    let sb = Sandbox::new();
    // 300 rules, one per port, then the ones the test connects to.
    let mut yaml = String::new();
    for port in 20_000..20_300 {
        yaml.push_str(&format!(
            "---\nkind: EgressRule\nmetadata: {{name: r{port}}}\nspec:\n  destination: {{service: 198.51.100.0/24}}\n  ports: [{{port: {port}, protocol: tcp}}]\n"
        ));
    }
    let rule = |port: u16| {
        format!(
            "---\nkind: EgressRule\nmetadata: {{name: allow-{port}}}\nspec:\n  destination: {{service: 192.0.2.1}}\n  ports: [{{port: {port}, protocol: tcp}}]\n"
        )
    };
    let file = sb.policy_file("policy.yaml", &format!("{yaml}{}", rule(8080)));
    let [s8080, s9090] = sb.sinks(V4_A, [8080, 9090]);
    let s20299 = sb.sink(sa(egress_tests::V4_B, 20_299));

    let agent = sb
        .agent(EGRESS)
        .policy(&file, &["--no-watch"])
        .env(&[(HIDE, "batch_ops")])
        .start();
    assert_degraded(
        &agent.log(),
        &["batch_ops"],
        "Linux >= 5.13",
        "one bpf(2) call per entry",
    );
    sb.expect_verdicts(PROBE, &[s8080.addr(), s20299.addr()], &[s9090.addr()]);

    // A reload: the new generation is written key by key and the row table read back the
    // same way; 8080 goes, 9090 comes, the 300 stay.
    fs::write(&file, format!("{yaml}{}", rule(9090))).expect("policy");
    let (code, out, err) = sb.ctl(EGRESS, &["reload"]);
    assert!(code.success(), "{out}{err}");
    sb.expect_verdicts(PROBE, &[s9090.addr(), s20299.addr()], &[s8080.addr()]);

    assert_accepted(&[(&s8080, 1), (&s9090, 1), (&s20299, 2)]);
    // The counters kept their rows across the reload (the row table was read back right).
    let json = sb.status_json(EGRESS);
    let row = status_row(&json, "r20299");
    assert_eq!(row["allowed"], 2, "{row}");
    assert_eq!(
        json["degraded"][0]
            .as_str()
            .map(|l| l.starts_with("batch_ops (Linux >= 5.13)")),
        Some(true),
        "{json:#}"
    );
}
