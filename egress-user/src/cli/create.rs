//! `egress create -f FILE|-`: add EgressRule and Service documents to the running agent's
//! policy; they are kept in its state directory and survive restarts.

use std::{io::Read as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use super::ctl::{self, SocketArg};
use crate::control::{MAX_REQUEST, Request};

/// Arguments of `egress create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The YAML file, or `-` for standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    file: PathBuf,
    #[command(flatten)]
    socket: SocketArg,
}

/// Runs `egress create`.
pub fn run(args: &CreateArgs) -> anyhow::Result<ExitCode> {
    let (source, mut reader): (String, Box<dyn std::io::Read>) = if args.file.as_os_str() == "-" {
        ("-".to_owned(), Box::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?;
        (args.file.display().to_string(), Box::new(file))
    };
    let mut text = String::new();
    reader
        .by_ref()
        .take(MAX_REQUEST as u64 / 2)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {source} (it must be UTF-8 YAML)"))?;
    let request = Request::Create { source, text };
    ctl::apply(&args.socket, &request)?;
    Ok(ExitCode::SUCCESS)
}
