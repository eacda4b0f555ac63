//! The feature table against docs/kernel.md, the refuse/degrade decision and its messages, and
//! the probes on this machine's kernel.

use super::*;

fn names(list: &[&Feature]) -> Vec<&'static str> {
    list.iter().map(|f| f.name).collect()
}

#[test]
fn every_feature_present_runs_with_nothing_degraded() {
    let k = Kernel::with_results("6.18.0", &[]);
    let a = k.assess(true).expect("runs");
    assert!(a.degraded.is_empty() && a.unavailable.is_empty());
    assert_eq!(a.summary(), "kernel: all kernel features present");
    assert!(k.program_available(programs::GETPEERNAME4));
}

#[test]
fn a_missing_required_feature_refuses_and_names_every_one() {
    let k = Kernel::with_results(
        "5.15.0-91-generic",
        &[
            ("sendmsg4", Probe::Hidden),
            ("ringbuf", Probe::Absent),
            ("getpeername4", Probe::Absent),
            ("lru_hash", Probe::Failed("BPF_MAP_CREATE: boom".into())),
        ],
    );
    let e = k.assess(false).expect_err("refuses");
    assert_eq!(
        e.missing.iter().map(|(f, _)| f.name).collect::<Vec<_>>(),
        ["sendmsg4", "ringbuf", "lru_hash"],
        "every missing required feature, in table order; not the optional one"
    );
    let text = e.to_string();
    assert!(
        text.starts_with(
            "this kernel (Linux 5.15.0-91-generic) lacks what egress needs to enforce its \
             policy: sendmsg4 (cgroup_sock_addr programs on BPF_CGROUP_UDP4_SENDMSG; \
             Linux >= 4.18; used for judging UDP datagrams sent to an IPv4 address) \
             [hidden by EGRESS_KERNEL_FEATURES_HIDE]; ringbuf ("
        ),
        "{text}"
    );
    assert!(
        text.contains("Linux >= 5.8; used for deny events"),
        "{text}"
    );
    assert!(
        text.contains("[the probe failed: BPF_MAP_CREATE: boom]"),
        "{text}"
    );
    assert!(
        text.ends_with(
            "nothing was loaded. Upgrade to Linux 6.1 or newer (the oldest kernel egress \
             is tested on)"
        ),
        "{text}"
    );
    assert!(!text.contains("getpeername"), "{text}");
}

#[test]
fn missing_optional_features_degrade_and_say_what_is_lost() {
    let k = Kernel::with_results(
        "5.10.0",
        &[
            ("getpeername4", Probe::Absent),
            ("getpeername6", Probe::Hidden),
            ("batch_ops", Probe::Absent),
        ],
    );
    let a = k.assess(false).expect("runs degraded");
    assert_eq!(
        names(&a.degraded),
        ["getpeername4", "getpeername6", "batch_ops"]
    );
    assert_eq!(
        a.summary(),
        "kernel: degraded, running without getpeername4, getpeername6, batch_ops"
    );
    let lines = a.degraded_lines();
    assert!(
        lines[0].starts_with("getpeername4 (Linux >= 5.8): an app whose connection is redirected"),
        "{lines:?}"
    );
    assert!(lines[2].contains("one bpf(2) call per entry"), "{lines:?}");
    // The loader leaves out exactly the programs that cannot load.
    assert!(!k.program_available(programs::GETPEERNAME4));
    assert!(!k.program_available(programs::GETPEERNAME6));
    assert!(k.program_available(programs::CONNECT4));
    assert!(k.program_available(programs::SOCK_OPS));
    assert!(!k.has(Id::BatchOps));
}

#[test]
fn xdp_by_link_is_required_only_with_an_xdp_interface() {
    let k = Kernel::with_results("5.8.0", &[("xdp_link", Probe::Absent)]);
    let a = k.assess(false).expect("no --xdp-iface: runs");
    assert!(a.degraded.is_empty());
    assert_eq!(names(&a.unavailable), ["xdp_link"]);
    assert_eq!(
        a.summary(),
        "kernel: unavailable (needed only with --xdp-iface): xdp_link"
    );
    let e = k.assess(true).expect_err("--xdp-iface: refuses");
    assert_eq!(e.missing[0].0.name, "xdp_link");
    assert!(e.to_string().contains("the XDP backstop"), "{e}");
}

#[test]
fn without_the_right_to_call_bpf_the_refusal_says_so_once() {
    let denied = || {
        Probe::Failed("BPF_PROG_LOAD: Operation not permitted (os error 1) (run as root)".into())
    };
    let results: Vec<(&str, Probe)> = FEATURES.iter().map(|f| (f.name, denied())).collect();
    let e = Kernel::with_results("6.1.0", &results)
        .assess(false)
        .expect_err("refuses");
    assert_eq!(
        e.to_string(),
        "cannot probe the features of this kernel (Linux 6.1.0): bpf(2) is not permitted \
         (EPERM); run `egress run` as root"
    );
}

#[test]
fn hiding_an_unknown_name_refuses_rather_than_hide_nothing() {
    let mut k = Kernel::with_results("6.1.0", &[]);
    k.unknown_hidden = vec!["getpeername".into()];
    let e = k.assess(false).expect_err("refuses");
    assert!(
        e.to_string().starts_with(
            "EGRESS_KERNEL_FEATURES_HIDE names getpeername, which is no kernel feature"
        ),
        "{e}"
    );
}

#[test]
fn every_program_the_loader_attaches_depends_on_its_hook_feature() {
    for (program, _) in super::super::pins::LINKS {
        assert!(
            FEATURES
                .iter()
                .any(|f| f.programs == [program] && f.programs.len() == 1),
            "{program} has no feature of its own"
        );
    }
    let mut seen = std::collections::HashSet::new();
    let mut ids = Vec::new();
    for f in &FEATURES {
        assert!(seen.insert(f.name), "{} twice", f.name);
        assert!(!ids.contains(&f.id), "{:?} twice", f.id);
        ids.push(f.id);
        // The id is the name in CamelCase: each feature has the id it is looked up by.
        let camel: String = f
            .name
            .split('_')
            .map(|w| w[..1].to_uppercase() + &w[1..])
            .collect();
        assert_eq!(format!("{:?}", f.id), camel, "{}", f.name);
    }
}

/// The "Kernel features" table of docs/kernel.md lists exactly [`FEATURES`], in order, with
/// the same minimum kernel and the same refuse/degrade decision.
#[test]
fn the_documented_table_is_the_feature_table() {
    let doc = include_str!("../../../../docs/kernel.md");
    let section = doc
        .split("\n## Kernel features\n")
        .nth(1)
        .expect("docs/kernel.md has a Kernel features section");
    let section = section.split("\n## ").next().expect("section");
    let rows: Vec<Vec<&str>> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
        .collect();
    assert_eq!(
        rows.iter()
            .map(|r| r[0].trim_matches('`'))
            .collect::<Vec<_>>(),
        FEATURES.iter().map(|f| f.name).collect::<Vec<_>>(),
        "docs/kernel.md rows"
    );
    for (row, f) in rows.iter().zip(&FEATURES) {
        assert_eq!(row.len(), 5, "{row:?}");
        assert_eq!(row[3], f.since.to_string(), "{}: minimum Linux", f.name);
        let decision = match f.need {
            Need::Required => "refuse",
            Need::Optional { .. } => "degrade",
            Need::ForXdp => "refuse with `--xdp-iface`",
        };
        assert!(
            row[4].starts_with(decision),
            "{}: docs/kernel.md says {:?}, the code {decision}",
            f.name,
            row[4]
        );
    }
}

/// The probes tell "this kernel does not have it" from a failure: a helper the program
/// type cannot call, and an attach type the program type does not have, are absent (not
/// errors, not present). Root only, as every probe.
#[test]
fn the_probes_see_what_a_program_type_lacks() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    // bpf_xdp_adjust_head is for XDP programs only.
    assert_eq!(
        call(
            prog::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            Some(attach::BPF_CGROUP_INET4_CONNECT),
            helper::BPF_FUNC_xdp_adjust_head,
        ),
        Ok(false)
    );
    // cgroup_sock programs have no connect hook.
    assert_eq!(
        program(
            prog::BPF_PROG_TYPE_CGROUP_SOCK,
            Some(attach::BPF_CGROUP_INET4_CONNECT)
        ),
        Ok(false)
    );
    // A helper that takes arguments, called without them, is still found.
    assert_eq!(
        call(
            prog::BPF_PROG_TYPE_CGROUP_SOCK,
            Some(attach::BPF_CGROUP_INET_SOCK_CREATE),
            helper::BPF_FUNC_get_current_comm,
        ),
        Ok(true)
    );
}

/// On the machine running the tests (root, a kernel with everything): every probe finds
/// its feature, so none of them is quietly broken. Without root the probes fail, and say
/// why.
#[test]
fn the_probes_find_every_feature_here_when_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let k = Kernel::probe();
        let e = k.assess(false).expect_err("bpf(2) needs root");
        assert!(e.to_string().contains("as root"), "{e}");
        return;
    }
    let k = Kernel::probe();
    let missing: Vec<_> = k
        .results
        .iter()
        .filter(|(_, p)| !p.present())
        .map(|(f, p)| format!("{}: {p:?}", f.name))
        .collect();
    if std::env::var_os(HIDE_ENV).is_none() {
        assert!(missing.is_empty(), "{missing:?} on Linux {}", k.release);
    }
}
