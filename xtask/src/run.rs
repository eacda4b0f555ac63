//! `cargo xtask run`: set-up, build the agent, and replace this process with `egress run`.

use std::{ffi::OsString, os::unix::process::CommandExt as _};

use anyhow::{Context as _, Result};
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

/// Runs set-up, then execs `cargo run` of the `egress` binary with `run <args>`.
///
/// `cargo run` builds first and knows the target directory (`CARGO_TARGET_DIR`, config),
/// so nothing here guesses at `target/debug`. Exec rather than spawn, so that Ctrl-C and
/// the exit status belong to the agent and not to a waiting xtask.
pub fn run(options: &Options) -> Result<()> {
    env::require_root("`egress run`")?;
    let child = setup::run(&options.setup)?;
    let mut command = child.command("cargo");
    command
        .args([
            "run",
            "--package",
            "egress-user",
            "--bin",
            "egress",
            "--",
            "run",
        ])
        .args(&options.args);
    let error = command.exec();
    Err(error).with_context(|| format!("executing {}", env::describe(&command)))
}
