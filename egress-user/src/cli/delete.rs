//! `egress delete egressrule NAME...`: remove rules made with `egress create`.

use std::process::ExitCode;

use super::ctl::{self, SocketArg};
use crate::{control::Request, state::Kind};

/// Arguments of `egress delete`.
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    /// What to delete: `egressrule` or `service`.
    #[arg(value_name = "KIND", value_parser = super::get::parse_kind)]
    kind: Kind,
    /// Their names; all are deleted, or (if one is unknown) none.
    #[arg(value_name = "NAME", required = true)]
    names: Vec<String>,
    #[command(flatten)]
    socket: SocketArg,
    #[command(flatten)]
    namespace: ctl::NamespaceArg,
}

/// Runs `egress delete`.
pub fn run(args: &DeleteArgs) -> anyhow::Result<ExitCode> {
    let request = Request::Delete {
        kind: args.kind,
        names: args.names.clone(),
        namespace: args.namespace.namespace.clone(),
    };
    ctl::apply(&args.socket, &request)?;
    Ok(ExitCode::SUCCESS)
}
