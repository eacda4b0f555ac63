//! The `egress` CLI as a client of a sandbox's agent (`egress VERB ... --socket`), and the
//! parsed `egress status -o json`.

use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use crate::{Sandbox, wait_within};

impl Sandbox {
    /// Runs `egress VERB ARGS... --socket <this sandbox's>` (a client of the agent) and returns
    /// its exit status, stdout and stderr.
    pub fn ctl(&self, egress: &str, verb: &[&str]) -> (std::process::ExitStatus, String, String) {
        let out = Command::new(egress)
            .args(verb)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .expect("running the egress client");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `egress events -o json` of this sandbox's agent (the recent events), one parsed event
    /// per line; fails the test if the command fails or a line is not JSON.
    pub fn events_json(&self, egress: &str) -> Vec<serde_json::Value> {
        let (ok, out, err) = self.ctl(egress, &["events", "-o", "json"]);
        assert!(ok.success(), "egress events failed: {err}");
        out.lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("an event per line: {e}: {l}"))
            })
            .collect()
    }

    /// `egress unload --pin-dir <this sandbox's>`: its output, for the test to judge.
    pub fn unload(&self, egress: &str) -> std::process::Output {
        Command::new(egress)
            .args(["unload", "--pin-dir"])
            .arg(&self.pin_dir)
            .output()
            .expect("running egress unload")
    }

    /// `egress status -o json` of this sandbox's agent, parsed (fails the test if it fails).
    pub fn status_json(&self, egress: &str) -> serde_json::Value {
        let (ok, out, err) = self.ctl(egress, &["status", "-o", "json"]);
        assert!(ok.success(), "egress status failed: {out}{err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
    }

    /// [`Sandbox::ctl`] with `stdin` fed to the client, that fails the test (killing the
    /// client) if it has not exited within `timeout`: for requests that once hung (a reload
    /// reading a FIFO), so that a regression fails instead of hanging the suite. A client that
    /// stops reading stdin early (input over its limit) is not an error here.
    pub fn ctl_within(
        &self,
        egress: &str,
        verb: &[&str],
        stdin: &[u8],
        timeout: Duration,
    ) -> (std::process::ExitStatus, String, String) {
        use std::io::{Read as _, Write as _};
        let mut child = Command::new(egress)
            .args(verb)
            .arg("--socket")
            .arg(self.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running the egress client");
        let mut input = child.stdin.take().expect("stdin");
        let stdin = stdin.to_vec();
        // Broken pipe when the client stops reading: that is its business, judged by its exit.
        let writer = thread::spawn(move || drop(input.write_all(&stdin)));
        let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
            thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        };
        let out = drain(Box::new(child.stdout.take().expect("stdout")));
        let err = drain(Box::new(child.stderr.take().expect("stderr")));
        let status = wait_within(&mut child, timeout).unwrap_or_else(|| {
            panic!(
                "`egress {}` did not finish within {timeout:?}",
                verb.join(" ")
            )
        });
        let _ = writer.join();
        (
            status,
            out.join().expect("stdout"),
            err.join().expect("stderr"),
        )
    }
}

/// The row of rule `name` in a parsed `egress status -o json` (fails the test if there is none).
pub fn status_row<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    row_named(status, "rules", name)
}

/// The element whose `name` is `name` in the array `list` of the JSON document `json` (the
/// rules of `egress status -o json`, the counters of `egress maps -o json`); fails the test if
/// there is none.
pub fn row_named<'a>(json: &'a serde_json::Value, list: &str, name: &str) -> &'a serde_json::Value {
    find_row(json, list, name).unwrap_or_else(|| panic!("no {list} row {name} in {json:#}"))
}

/// [`row_named`], or `None` where there is no such element; fails the test if `json` has no
/// array `list`.
pub fn find_row<'a>(
    json: &'a serde_json::Value,
    list: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    json[list]
        .as_array()
        .unwrap_or_else(|| panic!("no array {list} in {json:#}"))
        .iter()
        .find(|r| r["name"] == name)
}
