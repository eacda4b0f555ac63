//! `egress unload`: detach the programs and remove the pins.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use crate::loader::{self, DEFAULT_PIN_DIR};

/// Arguments of `egress unload`.
#[derive(clap::Args, Debug)]
pub struct UnloadArgs {
    /// The pin directory of the agent to unload.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// Runs `egress unload`.
pub fn run(args: &UnloadArgs) -> anyhow::Result<ExitCode> {
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
    Ok(ExitCode::SUCCESS)
}
