//! `cargo xtask run`: set-up, build the agent, and replace this process with `egress run`.
//!
//! A cold first run spends minutes building (the kernel programs with nightly, then the
//! agent), so each stage gets one line on stderr as it starts; the agent itself ends its
//! start-up with the commands to run next.

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{env, setup};

/// Options of `cargo xtask run`.
#[derive(Debug, Args)]
pub struct Options {
    #[command(flatten)]
    setup: setup::Options,

    /// Arguments for `egress run` (after `--`).
    #[arg(last = true, value_name = "EGRESS_RUN_ARGS")]
    args: Vec<OsString>,
}

/// Runs set-up, builds `egress` with `cargo build`, then execs `egress run <args>`.
///
/// `cargo build` knows the target directory (`CARGO_TARGET_DIR`, config) and reports the
/// binary's path in its JSON messages, so nothing here guesses at `target/debug`. Exec
/// rather than spawn, so that Ctrl-C and the exit status belong to the agent and not to a
/// waiting xtask.
pub fn run(options: &Options) -> Result<()> {
    env::require_root("`egress run`")?;
    stage(
        1,
        "checking set-up (nightly rust-src, bpf-linker, bpftool, iproute2)",
    );
    let child = setup::run(&options.setup)?;
    let egress = build(&child)?;
    stage(4, &format!("starting the agent: {} run", egress.display()));
    let mut command = Command::new(&egress);
    command.arg("run").args(&options.args);
    let error = command.exec();
    Err(error).with_context(|| format!("executing {}", env::describe(&command)))
}

/// One line per stage, so a cold build is not minutes of silence.
fn stage(n: u8, what: &str) {
    eprintln!("xtask run [{n}/4] {what}");
}

/// Builds the `egress` binary and returns its path. Cargo's own progress (`Compiling ...`)
/// and the compiler's diagnostics go to stderr as usual; its JSON messages on stdout say when
/// egress-user's build script (which builds the kernel programs) has run, and where the
/// binary is.
fn build(child: &env::ChildEnv) -> Result<PathBuf> {
    stage(
        2,
        "building the dependencies and the kernel programs (egress-ebpf, with nightly; \
         minutes on a cold build)",
    );
    let started = Instant::now();
    let mut command = child.command("cargo");
    command
        .args([
            "build",
            "--package",
            "egress-user",
            "--bin",
            "egress",
            "--message-format=json-render-diagnostics",
        ])
        .stdout(Stdio::piped());
    let mut cargo = command
        .spawn()
        .with_context(|| format!("starting {}", env::describe(&command)))?;
    let stdout = cargo.stdout.take().context("cargo's stdout")?;
    let mut binary = None;
    let mut agent_stage = false;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's messages")?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let package = message["package_id"].as_str().unwrap_or_default();
        match message["reason"].as_str() {
            Some("build-script-executed") if is_egress_user(package) && !agent_stage => {
                agent_stage = true;
                stage(
                    3,
                    &format!(
                        "building the agent (egress-user; kernel programs ready after {}s)",
                        started.elapsed().as_secs()
                    ),
                );
            }
            Some("compiler-artifact") if message["target"]["name"] == "egress" => {
                binary = message["executable"].as_str().map(PathBuf::from);
            }
            _ => {}
        }
    }
    let status = cargo.wait().context("waiting for cargo build")?;
    if !status.success() {
        bail!("{} failed ({status})", env::describe(&command));
    }
    binary.context("cargo build reported no `egress` executable")
}

/// Whether a cargo package id names this workspace's egress-user: `path+file:///.../egress-user#0.1.0`
/// (the directory carries the name), `...#egress-user@0.1.0`, or in older cargo
/// `egress-user 0.1.0 (path+file://...)`.
fn is_egress_user(package_id: &str) -> bool {
    package_id.contains("/egress-user#")
        || package_id.contains("#egress-user@")
        || package_id.starts_with("egress-user ")
}

#[cfg(test)]
mod tests {
    use super::is_egress_user;

    #[test]
    fn knows_egress_user_by_either_package_id_form() {
        assert!(is_egress_user(
            "path+file:///work/egress/egress-user#egress-user@0.1.0"
        ));
        assert!(is_egress_user(
            "egress-user 0.1.0 (path+file:///work/egress)"
        ));
        assert!(is_egress_user("path+file:///work/egress/egress-user#0.1.0"));
        assert!(!is_egress_user(
            "path+file:///work/egress/egress-common#egress-common@0.1.0"
        ));
    }
}
