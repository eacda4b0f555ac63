//! Input that is cut or hangs (issue 13 §3), against a running agent: `egress create` with more
//! than it can send fails and changes nothing (never a prefix: a cut after `port: 443` of
//! `4430` once enforced 443), and a reload naming a FIFO or a file that is not a CA file fails
//! at its `FILE:LINE` without hanging the agent, the running policy staying in force. Each is
//! proven at the sinks.

use std::{fs, time::Duration};

use egress_tests::{Outcome, Sandbox, V4_A, assert_accepted, egress_bin, probe_bin};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();

/// What `egress create` sends at most (`MAX_CREATE_INPUT`).
const CREATE_LIMIT: usize = 8 * 1024 * 1024;

/// Longer than a client that hangs would ever take to fail, short enough for a regression to
/// fail the test rather than hang the suite.
const PROMPTLY: Duration = Duration::from_secs(20);

fn rule(name: &str, port: u16) -> String {
    format!(
        "kind: EgressRule\nmetadata: {{name: {name}}}\nspec:\n  destination: {{service: \
         192.0.2.0/24}}\n  ports:\n    - protocol: tcp\n      port: {port}\n"
    )
}

/// `rule(name, 4430)` after comment lines, sized so that the first [`CREATE_LIMIT`] bytes end
/// in `port: 443`: a valid rule for another port than the one written.
fn rule_cut_at_the_limit(name: &str) -> String {
    let rule = rule(name, 4430);
    let cut = rule.rfind("4430").expect("the port") + 3;
    let mut pad_len = CREATE_LIMIT - cut;
    let mut text = String::with_capacity(CREATE_LIMIT + rule.len());
    while pad_len > 0 {
        // Lines of at most 64 bytes, each `#...#\n`.
        let line = pad_len.min(64);
        text.push_str(&"#".repeat(line - 1));
        text.push('\n');
        pad_len -= line;
    }
    text.push_str(&rule);
    assert!(
        text[..CREATE_LIMIT].ends_with("port: 443"),
        "the cut is placed"
    );
    text
}

/// `egress status -o json`, parsed; fails if the agent does not answer promptly.
fn status(sb: &Sandbox) -> serde_json::Value {
    let (ok, out, err) = sb.ctl_within(EGRESS, &["status", "-o", "json"], b"", PROMPTLY);
    assert!(ok.success(), "egress status failed: {err}");
    serde_json::from_str(&out).expect("status is JSON")
}

#[test]
fn create_with_more_than_8_mib_fails_and_changes_nothing() {
    let sb = Sandbox::new();
    let dir = &sb.dir("input");
    let policy = egress_tests::policy_file(dir, "policy.yaml", &rule("from-file", 8080));
    let [s8080, s443, s4430] = sb.sinks(V4_A, [8080, 443, 4430]);
    let agent = sb.agent(EGRESS).policy(&policy, &[]).start();
    assert_eq!(sb.connect(PROBE, s8080.addr()), Outcome::Connected);

    let yaml = rule_cut_at_the_limit("cut");
    let big = egress_tests::policy_file(dir, "big.yaml", &yaml);
    let big_arg = big.display().to_string();
    for (source, args, stdin) in [
        ("-", vec!["create", "-f", "-"], yaml.as_bytes()),
        (big_arg.as_str(), vec!["create", "-f", &big_arg], &b""[..]),
    ] {
        let (ok, out, err) = sb.ctl_within(EGRESS, &args, stdin, PROMPTLY);
        assert!(!ok.success(), "{source}: created: {out}");
        assert!(
            err.contains(&format!(
                "reading {source}: it is larger than the 8 MiB limit"
            )) && err.contains("nothing was created"),
            "{source}: {err}"
        );
    }

    let s = status(&sb);
    assert_eq!(s["generation"], 1, "no generation was made");
    assert!(!sb.state_dir().join("created.yaml").exists());
    sb.expect_verdicts(PROBE, &[s8080.addr()], &[s443.addr(), s4430.addr()]);
    assert_eq!(
        s443.accepted(),
        0,
        "the cut rule for 443 was never in force"
    );
    assert_accepted(&[(&s4430, 0), (&s8080, 2)]);
    drop(agent);
}

#[test]
fn a_reload_naming_a_fifo_or_a_bad_ca_file_fails_at_its_line_and_keeps_the_policy() {
    let sb = Sandbox::new();
    let dir = &sb.dir("input-reload");
    let config = egress_tests::policy_file(dir, "0-config.yaml", "kind: EgressConfig\nspec: {}\n");
    let rules = egress_tests::policy_file(dir, "rules.yaml", &rule("r", 8080));
    let fifo = dir.join("ca.fifo");
    egress_tests::sh(&["mkfifo", fifo.to_str().expect("utf-8 path")]);
    let [s8080, s9090] = sb.sinks(V4_A, [8080, 9090]);
    // Only `egress reload` applies: with the file watch, a loaded machine could let the watch
    // apply the rules' change on its own before the broken config is written (CI saw
    // generation 2).
    let agent = sb.agent(EGRESS).policy(dir, &["--no-watch"]).start();
    assert_eq!(sb.connect(PROBE, s8080.addr()), Outcome::Connected);

    // Each reload also moves the rule to 9090: a change that must not come into force.
    fs::write(&rules, rule("r", 9090)).expect("rules");
    let c = config.display();
    let naming = |ca: &str| format!("kind: EgressConfig\nspec:\n  caFiles:\n    - {ca}\n");
    for (ca, expected) in [
        (
            fifo.display().to_string(),
            format!(
                "{c}:4: spec.caFiles[0]: CA file `{}`: cannot read it: it is a FIFO (named pipe), \
                 not a regular file",
                fifo.display()
            ),
        ),
        (
            "/etc/passwd".to_owned(),
            format!(
                "{c}:4: spec.caFiles[0]: CA file `/etc/passwd`: no PEM certificate in it \
                 (expected -----BEGIN CERTIFICATE-----)"
            ),
        ),
    ] {
        fs::write(&config, naming(&ca)).expect("config");
        let (ok, _, err) = sb.ctl_within(EGRESS, &["reload"], b"", PROMPTLY);
        assert!(!ok.success(), "{ca}: reloaded");
        assert!(err.contains(&expected), "{ca}: {err}");
        let s = status(&sb);
        assert_eq!(s["generation"], 1, "{ca}");
        assert!(
            s["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(&expected)),
            "{ca}: {s:#}"
        );
        assert_eq!(sb.connect(PROBE, s9090.addr()), Outcome::Denied, "{ca}");
        assert_eq!(sb.connect(PROBE, s8080.addr()), Outcome::Connected, "{ca}");
    }

    // A FIFO among the policy files themselves.
    fs::write(&config, "kind: EgressConfig\nspec: {}\n").expect("config");
    let policy_fifo = dir.join("extra.yaml");
    egress_tests::sh(&["mkfifo", policy_fifo.to_str().expect("utf-8 path")]);
    let (ok, _, err) = sb.ctl_within(EGRESS, &["reload"], b"", PROMPTLY);
    assert!(!ok.success(), "reloaded with a FIFO");
    assert!(
        err.contains(&format!(
            "{}:1: cannot read the policy file: it is a FIFO (named pipe), not a regular file",
            policy_fifo.display()
        )),
        "{err}"
    );
    assert_eq!(status(&sb)["generation"], 1);
    assert_eq!(sb.connect(PROBE, s9090.addr()), Outcome::Denied);

    // Without it the same files reload: the refusals above were the FIFO's and the CA's.
    fs::remove_file(&policy_fifo).expect("remove the FIFO");
    let (ok, out, err) = sb.ctl_within(EGRESS, &["reload"], b"", PROMPTLY);
    assert!(ok.success(), "{err}");
    assert!(out.contains("reloaded"), "{out}");
    sb.expect_verdicts(PROBE, &[s9090.addr()], &[s8080.addr()]);
    assert_eq!(
        s9090.accepted(),
        1,
        "9090 only once the good policy was in force"
    );
    assert_eq!(s8080.accepted(), 3);
    drop(agent);
}
