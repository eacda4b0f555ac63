//! `egress get egressrules|services`: the rules or aliases in force, with counters and where
//! each is defined.

use std::process::ExitCode;

use super::ctl::{self, Output, SocketArg};
use crate::{
    control::{Request, Response},
    state::Kind,
};

/// Arguments of `egress get`.
#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// What to list: `egressrules` or `services`.
    #[arg(value_name = "KIND", value_parser = parse_kind)]
    kind: Kind,
    #[command(flatten)]
    socket: SocketArg,
    #[command(flatten)]
    namespace: ctl::NamespaceArg,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

/// Parses `egressrule(s)` or `service(s)`.
pub fn parse_kind(word: &str) -> Result<Kind, String> {
    Kind::parse(word).ok_or_else(|| {
        format!("unknown kind `{word}`: use `egressrules` (EgressRule) or `services` (Service)")
    })
}

/// Runs `egress get`.
pub fn run(args: &GetArgs) -> anyhow::Result<ExitCode> {
    let request = Request::Get {
        kind: args.kind,
        namespace: args.namespace.namespace.clone(),
    };
    let rules = match ctl::call(&args.socket, &request)? {
        Response::Rules { rules } => rules,
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    };
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&rules)?);
    } else if rules.is_empty() {
        println!("no {}s", args.kind);
    } else {
        ctl::print_rules(&rules);
    }
    Ok(ExitCode::SUCCESS)
}
