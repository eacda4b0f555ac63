//! `egress check`: validate policy files and print what they mean, without touching the
//! kernel, so a policy can be checked in CI or before `egress run` picks it up.

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use super::ResolvConf;
use crate::policy::{self, DEFAULT_POLICY_NAME, Policy, PolicyErrors};

/// Validate policy files and print the normalised policy; exit 1 on any error.
///
/// All files together form one policy. Every error is printed as `FILE:LINE: message`, one a
/// line on stderr; nothing is printed on stdout then. Policy and CA files must be regular files
/// (a FIFO or device is refused, never waited on), and every `caFiles` entry is read and must
/// hold PEM certificates. What is almost certainly a mistake but still valid (an empty policy)
/// is printed as `FILE:LINE: warning: message` without failing the check. The DNS resolvers shown are the policy's
/// own, or those of `--resolv-conf`, as `egress run` would read them; problems with that file
/// and notes about the policy go to stderr without failing the check.
///
/// Example: egress check policy/base.yaml policy/wikipedia.yaml
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Policy files (multi-document YAML) to check as one policy.
    #[arg(value_name = "FILE", required_unless_present = "default")]
    pub files: Vec<PathBuf>,
    /// Check the policy built into the binary, the one `egress run` enforces without --policy.
    #[arg(long, conflicts_with = "files")]
    pub default: bool,
    /// `--resolv-conf`, as `egress run` reads it.
    #[command(flatten)]
    pub resolv_conf: ResolvConf,
}

/// Exit status for a command line that names nothing to check (clap's own usage-error code).
const USAGE_ERROR: u8 = 2;

/// Prints `message` as `egress check`'s usage error and returns its exit status.
fn usage_error(err: &mut dyn Write, message: &str) -> anyhow::Result<ExitCode> {
    writeln!(err, "egress check: {message}").context("cannot write to stderr")?;
    Ok(ExitCode::from(USAGE_ERROR))
}

/// Runs `egress check`: 0 when the policy is valid (and printed), 1 when it is not, 2 when
/// there is nothing to check.
///
/// # Errors
/// Only when stdout or stderr cannot be written.
pub fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    run_with(
        args,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )
}

/// [`run`] with its output streams given, so tests can read what it prints.
fn run_with(
    args: &CheckArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let result: Result<Policy, PolicyErrors> = match (args.default, args.files.is_empty()) {
        (true, true) => Ok(policy::default_policy()),
        (false, false) => policy::load_files(&args.files),
        // clap rejects both cases already; this is for callers that build CheckArgs by hand.
        (true, false) => return usage_error(err, "give policy files or --default, not both"),
        (false, true) => {
            return usage_error(
                err,
                &format!(
                    "nothing to check: give policy files, or --default for {DEFAULT_POLICY_NAME}"
                ),
            );
        }
    };
    match result {
        Ok(mut policy) => {
            match policy.fill_resolvers(&args.resolv_conf.path) {
                Ok(warnings) => {
                    for warning in warnings {
                        writeln!(err, "warning: {warning}").context("cannot write to stderr")?;
                    }
                }
                Err(e) => {
                    writeln!(err, "egress check: {e}").context("cannot write to stderr")?;
                    return Ok(ExitCode::FAILURE);
                }
            }
            // What the kernel maps could not hold (a port range too wide for its scopes, too
            // many rules) is refused here as `egress run` would refuse it.
            if let Err(e) = crate::compile::compile(&policy, &Default::default(), 1) {
                writeln!(err, "egress check: {e}").context("cannot write to stderr")?;
                return Ok(ExitCode::FAILURE);
            }
            for warning in &policy.warnings {
                writeln!(err, "{}: warning: {}", warning.origin, warning.message)
                    .context("cannot write to stderr")?;
            }
            for note in notes(&policy) {
                writeln!(err, "{note}").context("cannot write to stderr")?;
            }
            write!(out, "{policy}").context("cannot write to stdout")?;
            out.flush().context("cannot write to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for diagnostic in &errors.0 {
                writeln!(err, "{diagnostic}").context("cannot write to stderr")?;
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What a valid policy may not mean at a glance, one note per rule: an IPv6 rule whose
/// destination contains the NAT64 or 6to4 range does not allow the destinations there, which
/// the kernel judges by the IPv4 rules.
fn notes(policy: &Policy) -> Vec<String> {
    policy
        .rules
        .iter()
        .filter_map(|rule| {
            let ranges = rule.embedded_ranges();
            let ranges = match ranges.as_slice() {
                [] => return None,
                [one] => one.to_string(),
                [first, second, ..] => format!("{first} and {second}"),
            };
            Some(format!(
                "{}: note: rule `{}` ({}) contains {ranges} destinations, which the kernel judges \
                 by the IPv4 rules as their embedded IPv4 address, not by this rule",
                rule.origin, rule.name, rule.destination
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests;
