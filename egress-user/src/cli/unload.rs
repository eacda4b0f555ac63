//! `egress unload`: detach the programs, remove the pins, and remove the managed cgroup if
//! `egress run` created it and it is empty (or say why it stays).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use crate::{
    cgroup,
    loader::{self, DEFAULT_PIN_DIR},
};

/// Arguments of `egress unload`.
#[derive(clap::Args, Debug)]
pub struct UnloadArgs {
    /// The pin directory of the agent to unload.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// Runs `egress unload`.
pub fn run(args: &UnloadArgs) -> anyhow::Result<ExitCode> {
    // Read before the links go: they are what says which cgroups were enforced on.
    let cgroups = loader::enforced_cgroups(&args.pin_dir)
        .with_context(|| format!("reading the links pinned in {}", args.pin_dir.display()))?;
    let removed = loader::unload(&args.pin_dir)
        .with_context(|| format!("unloading {}", args.pin_dir.display()))?;
    if removed.is_empty() {
        println!(
            "nothing pinned in {}: nothing to unload",
            args.pin_dir.display()
        );
    } else {
        for path in &removed {
            println!("removed {}", path.display());
        }
        println!("egress unloaded: connections are no longer filtered");
    }
    let mut ids = cgroups;
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        println!("{}", tidy_cgroup(id)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Removes the cgroup `id` if `egress run` created it and nothing is in it; otherwise says
/// why it stays. A cgroup with processes is left alone: removing it is not possible, and
/// moving its processes elsewhere is not ours to decide.
fn tidy_cgroup(id: u64) -> anyhow::Result<String> {
    let Some(path) = cgroup::find_by_id(id)? else {
        return Ok(format!("cgroup {id} is gone already"));
    };
    let shown = path.display();
    if !cgroup::created_by_egress(&path) {
        return Ok(format!(
            "cgroup {shown} stays: egress did not create it (it existed before `egress run`)"
        ));
    }
    let occupants = cgroup::occupants(&path)?;
    if !occupants.pids.is_empty() {
        let pids: Vec<String> = occupants.pids.iter().map(ToString::to_string).collect();
        return Ok(format!(
            "cgroup {shown} stays: {} process(es) still run in it (pid {}); they are no longer \
             filtered. Remove it with `rmdir {shown}` once they have exited",
            pids.len(),
            pids.join(", ")
        ));
    }
    if !occupants.children.is_empty() {
        return Ok(format!(
            "cgroup {shown} stays: it holds child cgroups ({})",
            occupants.children.join(", ")
        ));
    }
    cgroup::remove(&path)?;
    Ok(format!("removed cgroup {shown} (egress run created it)"))
}
