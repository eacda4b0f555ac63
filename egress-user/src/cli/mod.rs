//! The `egress` command line: one file per verb. Doc comments are the `--help` text.

#![forbid(unsafe_code)]

pub mod check;
pub mod create;
pub mod ctl;
pub mod delete;
pub mod events;
pub mod exec;
pub mod get;
pub mod maps;
pub mod reload;
pub mod run;
pub mod status;
pub mod unload;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::policy::dns::DEFAULT_RESOLV_CONF;

/// egress: default-deny TCP and UDP egress for the processes of a cgroup, enforced in the
/// kernel at connect()/sendto() time (raw and other sockets refused at socket()), from
/// Istio-style EgressRule policies.
#[derive(Parser, Debug)]
#[command(name = "egress", version, about, long_about = None)]
pub struct Cli {
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent in the foreground: load the policy, enforce it on the managed cgroup, log
    /// verdicts. Enforcement stays pinned when the agent exits. The kernel's features are
    /// probed first: without a feature it needs to enforce the policy, the agent refuses to
    /// start and names it; without an optional one it runs, warns and says what is lost (see
    /// docs/kernel.md).
    ///
    /// Example: egress run --policy /etc/egress/policy.yaml
    Run(run::RunArgs),
    /// Validate policy files and print the normalised rules; exit 1 and print every error
    /// (FILE:LINE: what is wrong) if any is invalid.
    ///
    /// Example: egress check policy.yaml more-rules.yaml
    Check(check::CheckArgs),
    /// Run a command inside the managed cgroup, so its connections are filtered; exits with
    /// the command's status.
    ///
    /// Example: egress exec -- curl http://example.test/
    Exec(exec::ExecArgs),
    /// Show the running agent: mode, generation, rules with allow/deny counters, proxy state.
    /// `--ready` is a readiness probe.
    ///
    /// Example: egress status
    Status(status::StatusArgs),
    /// List the rules (`egressrules`) or aliases (`services`) in force, with counters and
    /// where each is defined.
    ///
    /// Example: egress get egressrules
    Get(get::GetArgs),
    /// Add EgressRule and Service documents to the running agent's policy. They are checked
    /// with the whole policy first (an invalid one changes nothing), and kept in the agent's
    /// state directory across restarts. The input is at most 8 MiB of UTF-8 YAML; more is an
    /// error, never cut.
    ///
    /// Example: egress create -f rules.yaml
    Create(create::CreateArgs),
    /// Remove rules or aliases made with `egress create` (all named, or none).
    ///
    /// Example: egress delete egressrule httpbin
    Delete(delete::DeleteArgs),
    /// Make the running agent read its policy files again now (as SIGHUP does) and report
    /// whether the new policy is in force.
    ///
    /// Example: egress reload
    Reload(reload::ReloadArgs),
    /// Print the running agent's recent allow/deny events; `--follow` keeps printing.
    ///
    /// Example: egress events --follow
    Events(events::EventsArgs),
    /// Detach the programs and remove every pin: nothing is filtered afterwards. The managed
    /// cgroup is removed too if `egress run` created it and it is empty; otherwise unload
    /// says why it stays.
    ///
    /// Example: egress unload --pin-dir /sys/fs/bpf/egress
    Unload(unload::UnloadArgs),
    /// Print the pinned maps decoded, from the pins alone (no agent needed): the config, every
    /// rule key (CIDR, port/protocol -> rule name), bypass ranges, HTTP ports, and the
    /// counters of the rows in use, summed over CPUs. `bpftool map dump` shows the same maps
    /// raw.
    ///
    /// Example: egress maps -o json
    Maps(maps::MapsArgs),
}

/// Entry point of the `egress` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        // `egress status | head -1`: a command that prints ends quietly when its reader goes
        // (killed by SIGPIPE, as `cat` is), instead of panicking on a failed write. Not the
        // agent: it must outlive whatever reads its log.
        sigpipe::reset();
    }
    let result = match &cli.command {
        Command::Run(args) => run::run(args),
        Command::Check(args) => check::run(args),
        Command::Exec(args) => exec::run(args),
        Command::Unload(args) => unload::run(args),
        Command::Status(args) => status::run(args),
        Command::Get(args) => get::run(args),
        Command::Create(args) => create::run(args),
        Command::Delete(args) => delete::run(args),
        Command::Reload(args) => reload::run(args),
        Command::Events(args) => events::run(args),
        Command::Maps(args) => maps::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("egress: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--resolv-conf`, one declaration for `egress run` and `egress check`, so that a check
/// reads the same file (and the same `EGRESS_RESOLV_CONF`) as the agent it is checking for.
#[derive(clap::Args, Debug)]
pub struct ResolvConf {
    /// The resolv.conf whose `nameserver` addresses DNS (port 53, udp and tcp) is allowed to,
    /// unless the EgressConfig names `dns.resolvers`. A missing file allows no DNS. `egress
    /// run` reads it again at every reload.
    #[arg(
        long = "resolv-conf",
        value_name = "PATH",
        env = "EGRESS_RESOLV_CONF",
        default_value = DEFAULT_RESOLV_CONF
    )]
    pub path: PathBuf,
}

/// `items` joined with `, `, or `none` when there are none: a list on one line of `egress
/// maps` or `egress status`.
fn joined_or<T: std::fmt::Display>(items: &[T], none: &str) -> String {
    if items.is_empty() {
        none.to_owned()
    } else {
        items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}
