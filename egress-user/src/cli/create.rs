//! `egress create -f FILE|-`: add EgressRule and Service documents to the running agent's
//! policy; they are kept in its state directory and survive restarts.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use super::ctl::{self, SocketArg};
use crate::{
    control::{MAX_REQUEST, Request},
    policy::read::{ReadError, read_bounded, read_to_limit},
};

/// The most YAML one `egress create` sends, in bytes: half of the agent's request limit
/// ([`MAX_REQUEST`], 16 MiB), because the YAML travels as a JSON string and escaping can double
/// it (every newline becomes `\n`). More is an error, never a prefix: a file cut after
/// `port: 443` of `port: 4430` would allow another port than the one written.
pub const MAX_CREATE_INPUT: u64 = MAX_REQUEST as u64 / 2;

/// Arguments of `egress create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The YAML file (a regular file), or `-` for standard input (a pipe); at most 8 MiB.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    socket: SocketArg,
    #[command(flatten)]
    namespace: ctl::NamespaceArg,
}

/// Runs `egress create`.
///
/// # Errors
/// The input cannot be read, is over [`MAX_CREATE_INPUT`] or not UTF-8, or the agent refused it.
pub fn run(args: &CreateArgs) -> anyhow::Result<ExitCode> {
    let stdin = args.file.as_os_str() == "-";
    let source = if stdin {
        "-".to_owned()
    } else {
        args.file.display().to_string()
    };
    let bytes = if stdin {
        read_to_limit(std::io::stdin().lock(), MAX_CREATE_INPUT)
    } else {
        // Never blocks: a FIFO or device is refused (a pipe can be given as `-f -`).
        read_bounded(&args.file, MAX_CREATE_INPUT)
    }
    .map_err(|e| match e {
        ReadError::TooLarge { .. } => anyhow::anyhow!(
            "reading {source}: {e}, which is what one `egress create` can send; give larger \
             policies to `egress run --policy`; nothing was created"
        ),
        other => anyhow::Error::new(other).context(format!("reading {source}")),
    })?;
    let text = String::from_utf8(bytes)
        .with_context(|| format!("reading {source} (it must be UTF-8 YAML)"))?;
    let request = Request::Create {
        source,
        text,
        namespace: args.namespace.namespace.clone(),
    };
    ctl::apply(&args.socket, &request)?;
    Ok(ExitCode::SUCCESS)
}
