//! Reloading a running agent (SIGHUP): a valid policy replaces the running one in the kernel
//! and in the proxy; an invalid one changes nothing.

use std::{fs, time::Duration};

use egress_tests::{
    Outcome, Sandbox, V4_A, assert_accepted, egress_bin, probe_bin, row_named, sa,
    upstream::Upstream, workload::Workload,
};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();
const VERDICTS: &str = env!("CARGO_BIN_EXE_egress-verdicts");

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

/// A TCP rule allowing `cidr` on `port`.
fn cidr_rule(name: &str, cidr: &str, port: u16) -> String {
    format!(
        "kind: EgressRule\nmetadata: {{name: {name}}}\nspec:\n  destination: {{service: {cidr}}}\n  ports: [{{port: {port}, protocol: tcp}}]\n"
    )
}

/// The program behind a pinned link (`bpftool link show pinned`), as an operator reads it.
fn link_prog_id(sb: &Sandbox, link: &str) -> u64 {
    let path = sb.pin_dir.join("links").join(link);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(&path)
        .output()
        .expect("running bpftool (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "bpftool link show {}: {out:?}",
        path.display()
    );
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    link["prog_id"].as_u64().expect("prog_id")
}

/// The id of the pinned map `name` (`bpftool map show pinned`).
fn pinned_map_id(sb: &Sandbox, name: &str) -> u64 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(sb.pin_dir.join(name))
        .output()
        .expect("running bpftool");
    assert!(out.status.success(), "bpftool map show {name}: {out:?}");
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    map["id"].as_u64().expect("id")
}

/// A change of rules alone goes into force without new programs (the pinned links keep their
/// program) and atomically, whether written in place (a few keys) or by a fresh trie (more
/// than 4,096): a workload connecting in a loop to a destination that both policies allow,
/// by different rules and keys (a /32 in one, a /24 in the other), is never denied across
/// many changes, while the destinations only one policy allows flip. A change
/// beyond the rules (here a bypass range) still takes a new generation of programs.
#[test]
fn a_change_of_rules_alone_keeps_the_programs_and_no_connect_sees_a_mix() {
    let sb = Sandbox::new();
    let dir = sb.dir("rules");
    let policy_a = format!(
        "{}---\n{}",
        cidr_rule("exact", "192.0.2.1/32", 8080),
        cidr_rule("nine", "192.0.2.0/24", 9090)
    );
    let policy_b = format!(
        "{}---\n{}",
        cidr_rule("wide", "192.0.2.0/24", 8080),
        cidr_rule("seven", "192.0.2.0/24", 7070)
    );
    // A and more keys than a change makes in place: a change between A and C fills a fresh
    // trie and puts it in the slot.
    let mut policy_c = policy_a.clone();
    for i in 0..4100u32 {
        let [_, _, hi, lo] = (u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + i).to_be_bytes();
        policy_c.push_str(&format!(
            "---\n{}",
            cidr_rule(&format!("f{i}"), &format!("198.18.{hi}.{lo}/32"), 8080)
        ));
    }
    fs::write(dir.join("a.yaml"), &policy_a).expect("a");
    let [both, a_only, b_only] = sb.sinks(V4_A, [8080, 9090, 7070]);
    // Reloads by `egress reload` alone, each answered once in force.
    let agent = sb.agent(EGRESS).policy(&dir, &["--no-watch"]).start();
    sb.expect_verdicts(PROBE, &[both.addr(), a_only.addr()], &[b_only.addr()]);
    let programs = (link_prog_id(&sb, "connect4"), link_prog_id(&sb, "connect6"));
    let trie = pinned_map_id(&sb, "RULES_V4");
    // The agent makes the standby in the background once a generation is in force: the first
    // change writes it in place (no fresh trie), and the pin follows it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let standby = loop {
        let slots = ruleset_slots(&sb);
        if let [a, b] = slots[..] {
            assert!(
                a == trie || b == trie,
                "the trie in force is in a slot: {slots:?}"
            );
            break if a == trie { b } else { a };
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the standby never appeared: {slots:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    for (policy, id, what) in [
        (&policy_b, standby, "the standby"),
        (&policy_a, trie, "the first trie"),
    ] {
        fs::write(dir.join("a.yaml"), policy).expect("policy");
        let (ok, out, err) = sb.ctl(EGRESS, &["reload"]);
        assert!(ok.success(), "egress reload: {out}{err}\n{}", agent.log());
        assert_eq!(pinned_map_id(&sb, "RULES_V4"), id, "{what} in force");
    }
    sb.expect_verdicts(PROBE, &[both.addr(), a_only.addr()], &[b_only.addr()]);

    let workload = Workload::start(
        &sb,
        VERDICTS,
        &[both.addr(), a_only.addr(), b_only.addr()],
        Duration::ZERO,
    );
    // A to B and back in place; A to C and back by fresh tries.
    let cycle = [&policy_b, &policy_a, &policy_c, &policy_a];
    const CHANGES: usize = 40;
    for change in 0..CHANGES {
        let policy = cycle[change % cycle.len()];
        fs::write(dir.join("a.yaml"), policy).expect("policy");
        let (ok, out, err) = sb.ctl(EGRESS, &["reload"]);
        assert!(ok.success(), "egress reload: {out}{err}\n{}", agent.log());
        // Some connects under each policy, so that both are seen in force.
        std::thread::sleep(Duration::from_millis(20));
    }
    let (counts, failures) = workload.stop();
    let log = agent.log();
    let ways = log.lines().filter(|l| l.contains("way=Rules")).count();
    assert_eq!(ways, CHANGES + 2, "every change was of rules alone:\n{log}");
    let both_count = &counts[&both.addr()];
    assert_eq!(
        (both_count.denied, both_count.failed),
        (0, 0),
        "a destination both policies allow was refused during a change: {failures:?}"
    );
    assert!(both_count.connected > 0);
    for one in [a_only.addr(), b_only.addr()] {
        let c = &counts[&one];
        assert!(
            c.connected > 0 && c.denied > 0,
            "{one} flips with the policy: {} connected, {} denied",
            c.connected,
            c.denied
        );
    }
    assert_eq!(
        (link_prog_id(&sb, "connect4"), link_prog_id(&sb, "connect6")),
        programs,
        "the programs in force stayed"
    );
    // Policy A is in force (the cycle's last). Each change writes the slot the one before
    // last used (the standby), then flips to it: the pin follows the trie in force.
    sb.expect_verdicts(PROBE, &[both.addr(), a_only.addr()], &[b_only.addr()]);
    let a_trie = pinned_map_id(&sb, "RULES_V4");
    let reload = |policy: &str| {
        fs::write(dir.join("a.yaml"), policy).expect("policy");
        let (ok, out, err) = sb.ctl(EGRESS, &["reload"]);
        assert!(ok.success(), "egress reload: {out}{err}\n{}", agent.log());
        pinned_map_id(&sb, "RULES_V4")
    };
    // The standby holds C: from C to B is more than a change makes in place, a fresh trie.
    let b_trie = reload(&policy_b);
    sb.expect_verdicts(PROBE, &[both.addr(), b_only.addr()], &[a_only.addr()]);
    assert!(
        b_trie != a_trie && b_trie != trie,
        "a change to B from the standby's C put a fresh trie in force, pinned"
    );
    // The standby holds A already: nothing written, its trie in force again.
    assert_eq!(reload(&policy_a), a_trie, "back to A's trie");
    sb.expect_verdicts(PROBE, &[both.addr(), a_only.addr()], &[b_only.addr()]);
    // D is B's trie with a few keys changed: written in place, in the standby.
    let policy_d = format!(
        "{policy_a}---\n{}",
        cidr_rule("seven", "192.0.2.0/24", 7070)
    );
    assert_eq!(
        reload(&policy_d),
        b_trie,
        "a small change is written in place"
    );
    sb.expect_verdicts(PROBE, &[both.addr(), a_only.addr(), b_only.addr()], &[]);
    assert_eq!(reload(&policy_a), a_trie, "A's trie in force again");
    sb.expect_verdicts(PROBE, &[both.addr(), a_only.addr()], &[b_only.addr()]);
    let dump = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(sb.pin_dir.join("RULES_V4"))
        .output()
        .expect("bpftool");
    let dump = String::from_utf8_lossy(&dump.stdout);
    // 9090 in network byte order read as a little-endian u16: 0x8223.
    for needle in [
        "\"prefix_len\": 56",
        "\"port\": 33315",
        "\"addr\": [192,0,2,1",
    ] {
        assert!(
            dump.contains(needle),
            "{needle} missing from RULES_V4:\n{dump}"
        );
    }
    assert!(
        both.accepted() > 0 && a_only.accepted() > 0 && b_only.accepted() > 0,
        "the sinks saw the allowed connects"
    );

    // A bypass range is more than rules: a new generation, new programs.
    fs::write(
        dir.join("0-config.yaml"),
        "kind: EgressConfig\nmetadata: {name: config}\nspec:\n  bypass: [127.0.0.0/8, \"::1/128\", 198.18.0.0/15]\n",
    )
    .expect("config");
    let (ok, out, err) = sb.ctl(EGRESS, &["reload"]);
    assert!(ok.success(), "egress reload: {out}{err}\n{}", agent.log());
    assert!(agent.log().contains("way=Generation"), "{}", agent.log());
    assert_ne!(link_prog_id(&sb, "connect4"), programs.0, "new programs");
    sb.expect_verdicts(PROBE, &[both.addr(), a_only.addr()], &[b_only.addr()]);
    drop(agent);
}

/// The ids of the tries in the slots of the sandbox's `RULESET_V4` (`bpftool map dump`: an
/// empty slot is not listed).
fn ruleset_slots(sb: &Sandbox) -> Vec<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(sb.pin_dir.join("RULESET_V4"))
        .arg("-j")
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "bpftool map dump RULESET_V4: {out:?}");
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    entries
        .iter()
        .map(|e| {
            let bytes: Vec<u8> = e["value"]
                .as_array()
                .expect("value bytes")
                .iter()
                .map(|b| {
                    u8::from_str_radix(b.as_str().expect("hex").trim_start_matches("0x"), 16)
                        .expect("a byte")
                })
                .collect();
            u64::from(u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")))
        })
        .collect()
}

/// `egress maps -o json` of the sandbox's pins.
fn maps_json(sb: &Sandbox) -> serde_json::Value {
    let out = std::process::Command::new(EGRESS)
        .args(["maps", "-o", "json", "--pin-dir"])
        .arg(&sb.pin_dir)
        .output()
        .expect("egress maps");
    assert!(out.status.success(), "egress maps: {out:?}");
    serde_json::from_slice(&out.stdout).expect("egress maps -o json")
}

/// A row freed by a change of rules is given to a rule that comes later, and that rule counts
/// from zero: taking a row clears its counters on every CPU (in one batch) before the rule's
/// keys are in force.
#[test]
fn a_row_given_again_counts_from_zero() {
    let sb = Sandbox::new();
    let dir = sb.dir("rows");
    let [s8080, s9090] = sb.sinks(V4_A, [8080, 9090]);
    let reload = |text: String| {
        fs::write(dir.join("a.yaml"), text).expect("policy");
        let (ok, out, err) = sb.ctl(EGRESS, &["reload"]);
        assert!(ok.success(), "egress reload: {out}{err}");
    };
    fs::write(
        dir.join("a.yaml"),
        format!("{}---\n{}", tcp_rule("keep", 9090), tcp_rule("old", 8080)),
    )
    .expect("policy");
    let agent = sb.agent(EGRESS).policy(&dir, &["--no-watch"]).start();
    for _ in 0..3 {
        assert_eq!(sb.connect(PROBE, s8080.addr()), Outcome::Connected);
    }
    let before = maps_json(&sb);
    let old = row_named(&before, "counters", "old");
    assert_eq!(old["allowed"], 3, "{before}");
    let old_row = old["row"].clone();

    reload(tcp_rule("keep", 9090));
    assert_eq!(sb.connect(PROBE, s8080.addr()), Outcome::Denied);
    reload(format!(
        "{}---\n{}",
        tcp_rule("keep", 9090),
        tcp_rule("new", 8080)
    ));
    let after = maps_json(&sb);
    let new = row_named(&after, "counters", "new");
    assert_eq!(new["row"], old_row, "the freed row is given again: {after}");
    assert_eq!(new["allowed"], 0, "the new rule starts from zero: {after}");
    assert_eq!(sb.connect(PROBE, s8080.addr()), Outcome::Connected);
    assert_eq!(sb.connect(PROBE, s9090.addr()), Outcome::Connected);
    let last = maps_json(&sb);
    assert_eq!(row_named(&last, "counters", "new")["allowed"], 1, "{last}");
    assert_eq!(row_named(&last, "counters", "keep")["allowed"], 1, "{last}");
    assert!(
        agent.log().matches("way=Rules").count() == 2,
        "{}",
        agent.log()
    );
    assert_accepted(&[(&s8080, 4), (&s9090, 1)]);
}
