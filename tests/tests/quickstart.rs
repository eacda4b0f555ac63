//! The README's quickstart, run as written (issue 14, item 5): its shell blocks are read from
//! README.md between `<!-- quickstart:begin NAME -->` and `<!-- quickstart:end -->` and run
//! with bash, so the README cannot drift from what works.
//!
//! What the test changes, and only that: the namespace and directory name `egress-demo`
//! becomes one unique to this test; `egress` is a wrapper on PATH that adds this sandbox's
//! `--cgroup`, `--pin-dir` or `--socket` (so nothing touches the host's defaults); and the
//! agent the `agent` block starts with `cargo xtask run` is started by the harness with the
//! same `egress run` arguments. Needs `python3` and `curl`, like the quickstart; left out of
//! the kernel matrix, whose guests have neither.
//!
//! Network safety: the quickstart's servers listen on addresses it assigns to the loopback of
//! the namespace it creates, which has no other interface.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use egress_tests::{Sandbox, egress_bin};

const EGRESS: &str = egress_bin!();
const DEMO: &str = "egress-demo";

/// The shell block of the quickstart named `name`, from README.md.
fn block(readme: &str, name: &str) -> String {
    let begin = format!("<!-- quickstart:begin {name} -->");
    let start = readme
        .find(&begin)
        .unwrap_or_else(|| panic!("README.md has no {begin}"))
        + begin.len();
    let rest = &readme[start..];
    let end = rest
        .find("<!-- quickstart:end -->")
        .unwrap_or_else(|| panic!("README.md: {begin} is never ended"));
    let fenced = rest[..end].trim();
    fenced
        .strip_prefix("```sh")
        .and_then(|b| b.strip_suffix("```"))
        .unwrap_or_else(|| panic!("{begin} does not hold one ```sh block: {fenced}"))
        .to_owned()
}

/// Removes what the quickstart made under `name`, also when the test fails halfway.
struct Demo {
    name: String,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip netns pids {0} 2>/dev/null | xargs -r kill; ip netns del {0} 2>/dev/null; rm -rf /tmp/{0}",
                self.name
            ))
            .status();
    }
}

/// Runs `script` with bash and returns its exit status, stdout and stderr.
fn bash(script: &str, path: &str) -> (bool, String, String) {
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .env("PATH", path)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An `egress` on PATH that runs the test's binary with this sandbox's paths.
fn wrapper(sb: &Sandbox, dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).expect("wrapper dir");
    let script = format!(
        "#!/bin/sh\nverb=$1; shift\ncase $verb in\n  \
         exec) exec {egress} exec --cgroup {cgroup} --pin-dir {pins} \"$@\" ;;\n  \
         unload|maps) exec {egress} $verb --pin-dir {pins} \"$@\" ;;\n  \
         *) exec {egress} $verb --socket {socket} \"$@\" ;;\nesac\n",
        egress = EGRESS,
        cgroup = sb.cgroup.display(),
        pins = sb.pin_dir.display(),
        socket = sb.socket().display(),
    );
    let path = bin.join("egress");
    fs::write(&path, script).expect("wrapper");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

/// The lines of a server's log that are requests for `path`.
fn requests(log: &Path, path: &str) -> usize {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("\"GET {path} HTTP/1.1\"")))
        .count()
}

#[test]
fn the_readme_quickstart_shows_an_allowed_and_a_denied_connection_and_their_events() {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let sb = Sandbox::new();
    let name = format!("eqs{}", sb.name);
    let demo = Demo { name: name.clone() };
    let ours = |text: String| text.replace(DEMO, &demo.name);
    let dir = PathBuf::from("/tmp").join(&name);
    let bin = wrapper(&sb, &sb.dir("wrap"));
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let (ok, out, err) = bash(&ours(block(&readme, "destination")), &path);
    assert!(ok, "the destination block failed: {out}{err}");

    // The agent block is `cargo xtask run -- ARGS`: the same `egress run ARGS` here.
    let agent_block = ours(block(&readme, "agent"));
    let args = agent_block
        .trim()
        .strip_prefix("cargo xtask run -- ")
        .unwrap_or_else(|| {
            panic!("the agent block is not `cargo xtask run -- ...`: {agent_block}")
        });
    let mut run: Vec<String> = args.split_whitespace().map(str::to_owned).collect();
    run.extend([
        "--cgroup".to_owned(),
        sb.cgroup.display().to_string(),
        "--pin-dir".to_owned(),
        sb.pin_dir.display().to_string(),
    ]);
    let agent = sb.agent(EGRESS).args(&run).start();
    // Start-up ends with what to run next, with this agent's own flags (issue 14, item 5).
    agent.wait_for_log("stop: Ctrl-C here", std::time::Duration::from_secs(5));
    let log = agent.log();
    for next in [
        "next, as root in another terminal:".to_owned(),
        format!(
            " exec --cgroup {} --pin-dir {} -- ",
            sb.cgroup.display(),
            sb.pin_dir.display()
        ),
        format!(" events --follow --socket {} ", sb.socket().display()),
        format!("then {EGRESS} unload --pin-dir {}", sb.pin_dir.display()),
    ] {
        assert!(
            log.contains(&next),
            "no {next:?} in the agent's start-up:\n{log}"
        );
    }

    // The servers started in the background: wait until both listen.
    let allowed_log = dir.join("192.0.2.10.log");
    let denied_log = dir.join("198.51.100.10.log");
    for log in [&allowed_log, &denied_log] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fs::read_to_string(log)
            .unwrap_or_default()
            .contains("Serving HTTP")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{} never started",
                log.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    let try_block = ours(block(&readme, "try"));
    let line = "export PATH=\"$PWD/target/debug:$PATH\"";
    assert!(
        try_block.contains(line),
        "the try block no longer puts egress on PATH: {try_block}"
    );
    // The wrapper instead of target/debug/egress.
    let try_block = try_block.replace(line, "");
    let (_, out, err) = bash(&try_block, &path);
    let shown = format!("stdout:\n{out}\nstderr:\n{err}\nagent:\n{}", agent.log());

    // Counted at the servers: the allowed one saw the request, the denied one did not.
    assert_eq!(requests(&allowed_log, "/"), 1, "{shown}");
    assert_eq!(requests(&denied_log, "/"), 0, "{shown}");
    assert!(out.contains("allowed: 200"), "{shown}");
    assert!(
        err.contains("Failed to connect to 198.51.100.10 port 8080"),
        "{shown}"
    );
    let event = |verdict: &str, dst: &str| {
        out.lines()
            .any(|l| l.contains(&format!(" {verdict} ")) && l.contains(&format!("dst={dst}")))
    };
    assert!(event("allow", "192.0.2.10:8080"), "{shown}");
    assert!(event("deny", "198.51.100.10:8080"), "{shown}");
    assert!(out.contains("demo-allowed"), "{shown}");
    // The denied server was there to be reached: from outside the cgroup it is.
    let (_, _, _) = bash(
        &format!(
            "nsenter --net=/run/netns/{name} curl -sS -o /dev/null http://198.51.100.10:8080/outside"
        ),
        &path,
    );
    assert_eq!(requests(&denied_log, "/outside"), 1, "{shown}");

    agent.signal(libc::SIGINT);
    let _ = agent.wait();
    let (ok, out, err) = bash(&ours(block(&readme, "cleanup")), &path);
    assert!(ok, "the cleanup block failed: {out}{err}");
    assert!(!Path::new("/run/netns").join(&name).exists());
    assert!(!dir.exists());
    drop(demo);
}
