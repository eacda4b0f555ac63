//! `egress reload`: make the running agent read its policy files again now (as SIGHUP does),
//! and say whether the new policy is in force.

use std::process::ExitCode;

use super::ctl::{self, SocketArg};
use crate::control::{Request, Response};

/// Arguments of `egress reload`.
#[derive(clap::Args, Debug)]
pub struct ReloadArgs {
    #[command(flatten)]
    socket: SocketArg,
}

/// Runs `egress reload`.
pub fn run(args: &ReloadArgs) -> anyhow::Result<ExitCode> {
    match ctl::call(&args.socket, &Request::Reload)? {
        Response::Applied { generation, .. } => {
            println!("reloaded: generation {generation} in force")
        }
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}
