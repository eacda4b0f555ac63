//! `egress exec`: run one command inside the managed cgroup.

use std::{ffi::OsString, os::unix::process::CommandExt as _, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};

use crate::{
    cgroup,
    loader::{self, DEFAULT_PIN_DIR},
};

/// Arguments of `egress exec`.
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// The managed cgroup (default: `<cgroup2 mount>/egress`).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// The pin directory of the agent that filters the cgroup; exec refuses to run the command
    /// when no egress program is attached to the cgroup or one of its ancestors.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// The command and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Runs `egress exec`: joins the cgroup, then replaces this process with the command, so the
/// exit status is the command's own.
pub fn run(args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let cgroup = match &args.cgroup {
        Some(path) => path.clone(),
        None => cgroup::default_cgroup()?,
    };
    // Refuse rather than run the command unfiltered: joining a cgroup no program watches
    // would silently fail open.
    let enforced = loader::enforced_cgroups(&args.pin_dir)
        .with_context(|| format!("reading the links pinned in {}", args.pin_dir.display()))?;
    let mut covered = false;
    for dir in cgroup.ancestors() {
        if let Ok(id) = cgroup::id(dir) {
            covered |= enforced.contains(&id);
        }
    }
    if !covered {
        bail!(
            "no egress program in {} is attached to {} or its ancestors: start `egress run` first",
            args.pin_dir.display(),
            cgroup.display()
        );
    }
    cgroup::join(&cgroup)?;
    let (program, rest) = args.command.split_first().context("no command given")?;
    let err = std::process::Command::new(program).args(rest).exec();
    eprintln!(
        "egress: error: running {}: {err}",
        program.to_string_lossy()
    );
    Ok(ExitCode::from(
        if err.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        },
    ))
}
