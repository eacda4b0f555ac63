//! Counters and events that stay true (issue 14, item 4): the proxy's per-rule counts in
//! `egress get` survive reloads, `egress create` and agent restarts keep what users saw, HTTP
//! events carry the generation that judged them and no made-up process fields, and errors
//! name their cause once.

use std::time::Duration;

use egress_tests::{Outcome, V4_A, egress_bin, probe_bin, sa, world::World};

const EGRESS: &str = egress_bin!();
const PROBE: &str = probe_bin!();

/// `egress get egressrules -o json`, parsed.
fn rules(w: &World) -> Vec<serde_json::Value> {
    let (status, out, err) = w.sb.ctl(EGRESS, &["get", "egressrules", "-o", "json"]);
    assert!(status.success(), "egress get: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("egress get -o json: {e}: {out}"))
}

/// The proxy's request count of rule `name`, as `egress get` shows it.
fn requests(w: &World, name: &str) -> u64 {
    let rules = rules(w);
    let row = rules
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no rule {name} in {rules:?}"));
    row["requests"].as_u64().expect("requests")
}

/// Waits until `egress get` counts `want` requests for `name` (a request is counted when its
/// response body is over, a moment after the app read it); fails with the last count.
fn wait_requests(w: &World, name: &str, want: u64) {
    let mut got = 0;
    let counted = egress_tests::eventually(Duration::from_secs(5), || {
        got = requests(w, name);
        got == want
    });
    assert!(
        counted,
        "rule {name}: egress get shows {got} requests, want {want}"
    );
}

const ADDED: &str = "kind: EgressRule\nmetadata: {name: added}\nspec:\n  destination: {service: 192.0.2.9}\n  ports:\n    - {port: 9, protocol: tcp}\n";

#[test]
fn request_counts_of_a_rule_that_stays_survive_create_reload_and_delete() {
    let w = World::new(EGRESS, PROBE);
    for _ in 0..2 {
        let r = w.get(sa(V4_A, 80), "httpbin.test", "/count");
        assert_eq!(r.code(), 200, "{}", r.raw);
    }
    wait_requests(&w, "httpbin", 2);

    // `egress create` of another rule: a new generation, with a new proxy.
    let (status, _, err) = w.sb.ctl_within(
        EGRESS,
        &["create", "-f", "-"],
        ADDED.as_bytes(),
        Duration::from_secs(30),
    );
    assert!(status.success(), "egress create: {err}");
    assert_eq!(requests(&w, "httpbin"), 2, "after egress create");

    let r = w.get(sa(V4_A, 80), "httpbin.test", "/count");
    assert_eq!(r.code(), 200, "{}", r.raw);
    wait_requests(&w, "httpbin", 3);

    let (status, _, err) = w.sb.ctl(EGRESS, &["reload"]);
    assert!(status.success(), "egress reload: {err}");
    assert_eq!(requests(&w, "httpbin"), 3, "after egress reload");
    let (status, _, err) = w.sb.ctl(EGRESS, &["delete", "egressrule", "added"]);
    assert!(status.success(), "egress delete: {err}");
    assert_eq!(requests(&w, "httpbin"), 3, "after egress delete");

    // Counted at the sink: the upstream saw exactly the requests the rule counts.
    assert_eq!(w.http.seen().len(), 3, "{:?}", w.http.seen());
}

/// Fails unless `needle` occurs exactly once in `text`: an error names its cause once, either in
/// its message or in its chain, never in both.
fn assert_once(text: &str, needle: &str) {
    assert_eq!(
        text.matches(needle).count(),
        1,
        "`{needle}` should appear exactly once in: {text}"
    );
}

#[test]
fn an_error_names_its_cause_once() {
    let sb = egress_tests::Sandbox::new();
    // A socket that is not there.
    let missing = sb.tmp().join("none.sock");
    let out = std::process::Command::new(EGRESS)
        .args(["status", "--socket"])
        .arg(&missing)
        .output()
        .expect("egress status");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no egress agent is listening on"), "{err}");
    assert_once(&err, "No such file or directory");

    // A policy file that is not there.
    let policy = sb.tmp().join("missing.yaml");
    let (status, err) = sb.agent(EGRESS).policy(&policy, &[]).run_to_exit();
    assert!(!status.success());
    assert!(err.contains(&policy.display().to_string()), "{err}");
    assert_once(&err, "No such file or directory");
}

#[test]
fn a_reload_with_a_bad_file_names_its_cause_once() {
    let w = World::new(EGRESS, PROBE);
    // The policy's CA file is gone: the reload fails and says why, once.
    std::fs::remove_file(w.dir.join("ca.pem")).expect("removing ca.pem");
    let (status, out, err) = w.sb.ctl(EGRESS, &["reload"]);
    assert!(!status.success(), "{out}");
    assert!(err.contains("ca.pem"), "{err}");
    assert_once(&err, "No such file or directory");
    // And `egress status` shows the same error with its cause once.
    let (_, out, _) = w.sb.ctl(EGRESS, &["status"]);
    assert_once(&out, "No such file or directory");
}

/// `egress events -o json` (the recent ones), parsed.
fn events(w: &World) -> Vec<serde_json::Value> {
    w.sb.events_json(EGRESS)
}

/// The generation in force, from `egress status -o json`.
fn generation(w: &World) -> u64 {
    let (status, out, err) = w.sb.ctl(EGRESS, &["status", "-o", "json"]);
    assert!(status.success(), "egress status: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status json");
    v["generation"].as_u64().expect("generation")
}

/// The http events of allowed requests to `httpbin.test`, once there are `want` of them (an
/// event is published when its response is over, a moment after the app read it).
fn http_events(w: &World, want: usize) -> Vec<serde_json::Value> {
    let mut found = Vec::new();
    egress_tests::eventually(Duration::from_secs(5), || {
        found = events(w)
            .into_iter()
            .filter(|e| e["source"] == "http" && e["host"] == "httpbin.test")
            .filter(|e| e["reason"] == "" || e["reason"].is_null())
            .collect();
        found.len() >= want
    });
    found
}

#[test]
fn http_events_carry_their_generation_and_process() {
    let w = World::new(EGRESS, PROBE);
    let first = generation(&w);
    assert!(first > 0);
    let r = w.get(sa(V4_A, 80), "httpbin.test", "/one");
    assert_eq!(r.code(), 200, "{}", r.raw);
    assert!(r.pid > 0, "{}", r.raw);
    let one = r.pid;
    let (status, _, err) = w.sb.ctl(EGRESS, &["reload"]);
    assert!(status.success(), "egress reload: {err}");
    let second = generation(&w);
    assert!(second > first, "{first} then {second}");
    let r = w.get(sa(V4_A, 80), "httpbin.test", "/two");
    assert_eq!(r.code(), 200, "{}", r.raw);
    let two = r.pid;

    let events = http_events(&w, 2);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["generation"], first, "{}", events[0]);
    assert_eq!(events[1]["generation"], second, "{}", events[1]);
    // The process that connected, as the kernel recorded it with the redirect.
    assert_eq!(events[0]["pid"], one, "{}", events[0]);
    assert_eq!(events[1]["pid"], two, "{}", events[1]);
    for e in &events {
        assert_eq!(e["comm"], "egress-probe", "{e}");
        // The proxy does not learn the cgroup: no field rather than a zero.
        assert!(e.get("cgroup_id").is_none(), "cgroup_id in {e}");
    }
    // The text form says the generation too.
    let (_, out, _) = w.sb.ctl(EGRESS, &["events"]);
    assert!(
        out.lines().any(|l| l.contains(" http allow httpbin.test ")
            && l.contains(&format!("generation={second} pid={two} comm=egress-probe"))),
        "{out}"
    );
    assert_eq!(w.http.seen().len(), 2, "{:?}", w.http.seen());
}

/// The `time` of every event `egress events -o json` lists, with its source.
fn listed(w: &World) -> Vec<(String, String)> {
    events(w)
        .iter()
        .map(|e| (e["time"].to_string(), e["source"].to_string()))
        .collect()
}

#[test]
fn the_event_history_survives_an_agent_restart_and_a_crash() {
    let mut w = World::new(EGRESS, PROBE);
    let r = w.get(sa(V4_A, 80), "httpbin.test", "/before-crash");
    assert_eq!(r.code(), 200, "{}", r.raw);
    // No rule allows tcp/22: a kernel denial, counted at the sink as never connected.
    let sink = w.sb.sink(sa(V4_A, 22));
    assert_eq!(w.sb.connect(PROBE, sa(V4_A, 22)), Outcome::Denied);
    assert_eq!(sink.accepted(), 0);
    http_events(&w, 1);
    let first = listed(&w);
    assert!(
        first.iter().any(|(_, s)| s == "\"http\"") && first.iter().any(|(_, s)| s == "\"connect\""),
        "{first:?}"
    );

    // A crash (SIGKILL) a while after the events: the history written in the meantime stays.
    std::thread::sleep(Duration::from_millis(2500));
    drop(w.agent.take());
    w.start_agent();
    assert_eq!(listed(&w), first, "after a crash");

    // A clean stop right after an event writes it too.
    let r = w.get(sa(V4_A, 80), "httpbin.test", "/before-stop");
    assert_eq!(r.code(), 200, "{}", r.raw);
    http_events(&w, 2);
    let second = listed(&w);
    assert_eq!(second.len(), first.len() + 1, "{second:?}");
    let agent = w.agent.take().expect("agent");
    agent.signal(libc::SIGTERM);
    assert!(agent.wait().success());
    w.start_agent();
    assert_eq!(listed(&w), second, "after a restart");
    assert_eq!(w.http.seen().len(), 2, "{:?}", w.http.seen());
}

#[test]
fn a_corrupt_event_history_is_reported_and_the_agent_starts_empty() {
    let mut w = World::without_agent(EGRESS, PROBE);
    std::fs::create_dir_all(w.sb.state_dir()).expect("state dir");
    std::fs::write(
        w.sb.state_dir().join("events.jsonl"),
        "{\"time\": \"x\"\nnot json\n",
    )
    .expect("history");
    w.start_agent();
    w.agent()
        .wait_for_log("the event history is unusable", Duration::from_secs(5));
    assert!(
        w.agent().log().contains("events.jsonl:1: not an event"),
        "{}",
        w.agent().log()
    );
    assert_eq!(listed(&w), [], "a corrupt history lists nothing");
    // The agent serves as usual.
    let r = w.get(sa(V4_A, 80), "httpbin.test", "/after");
    assert_eq!(r.code(), 200, "{}", r.raw);
}

/// The redirect record grew (pid and comm): an agent of this build taking over from one of the
/// last replaces the pinned original-destination map of the old layout instead of refusing to
/// start, and redirects work.
#[test]
fn an_original_destination_map_of_the_earlier_layout_is_replaced() {
    let mut w = World::without_agent(EGRESS, PROBE);
    std::fs::create_dir_all(&w.sb.pin_dir).expect("pin dir");
    let peer = w.sb.pin_dir.join("ORIG_PEER");
    let entries = egress_common::MAX_REDIRECTS.to_string();
    egress_tests::sh(&[
        "bpftool",
        "map",
        "create",
        peer.to_str().expect("utf-8 path"),
        "type",
        "lru_hash",
        "key",
        "20",
        "value",
        "20",
        "entries",
        &entries,
        "name",
        "ORIG_PEER",
    ]);
    w.start_agent();
    w.agent().wait_for_log(
        "replaced a pinned original-destination map of an earlier layout",
        Duration::from_secs(5),
    );
    let r = w.get(sa(V4_A, 80), "httpbin.test", "/after-upgrade");
    assert_eq!(r.code(), 200, "{}", r.raw);
    assert_eq!(w.http.seen().len(), 1);
}
