//! `egress status`: the running agent's mode, generation, rules with counters, proxy state.

use std::process::ExitCode;

use super::ctl::{self, Output, SocketArg};
use crate::control::{Request, Response};

/// Arguments of `egress status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Print nothing; exit 0 only if the agent answers with programs attached, a policy
    /// applied and every proxy listener its own (a readiness probe).
    #[arg(long)]
    ready: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

/// Why the agent is not ready.
fn not_ready(status: &crate::control::Status) -> String {
    if !status.attached {
        format!("the programs are not attached to {}", status.cgroup)
    } else if !status.proxy.missing.is_empty() {
        format!(
            "the proxy does not listen on {} (connections for it there are refused)",
            status.proxy.missing.join("; ")
        )
    } else {
        "unknown".to_owned()
    }
}

/// Runs `egress status`.
pub fn run(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let status = match ctl::call(&args.socket, &Request::Status) {
        Ok(Response::Status(status)) => status,
        Ok(other) => anyhow::bail!("unexpected answer from the agent: {other:?}"),
        Err(e) if args.ready => {
            eprintln!("not ready: {e:#}");
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => return Err(e),
    };
    if args.ready {
        if status.ready {
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("not ready: {}", not_ready(&status));
        return Ok(ExitCode::FAILURE);
    }
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "agent:       pid {} (egress {}), {}",
        status.pid,
        status.version,
        if status.ready {
            "ready".to_owned()
        } else {
            format!("NOT READY: {}", not_ready(&status))
        }
    );
    println!("mode:        {}", status.mode);
    println!("generation:  {}", status.generation);
    println!("cgroup:      {}", status.cgroup);
    println!("pin dir:     {}", status.pin_dir);
    println!("policy:      {}", status.sources.join(", "));
    println!(
        "reloads:     {} ok, {} failed{}",
        status.reloads_ok,
        status.reloads_failed,
        match &status.last_error {
            Some(e) => format!(" (last failed: {})", e.lines().next().unwrap_or("")),
            None => String::new(),
        }
    );
    println!(
        "proxy:       listening on {}; {} requests, {} refused{}, {} events dropped",
        status.proxy.listening.join(", "),
        status.proxy.requests,
        status.proxy.denied,
        match status.proxy.would_deny {
            0 => String::new(),
            n => format!(", {n} passed on by audit mode (would refuse)"),
        },
        status.proxy.events_dropped
    );
    for missing in &status.proxy.missing {
        println!(
            "proxy:       NOT listening on {missing}; connections for the proxy there are refused"
        );
    }
    println!(
        "connections: {} of {} held, {} refused, {} evicted before a request; {} of {} \
         descriptors open",
        status.proxy.connections,
        status.proxy.connections_limit,
        status.proxy.connections_refused,
        status.proxy.connections_evicted,
        status.proxy.open_fds,
        status.proxy.fds_limit
    );
    if status.problems.is_empty() {
        println!("health:      ok");
    } else {
        println!("health:      UNHEALTHY:");
        for line in &status.problems {
            println!("               {line}");
        }
    }
    println!(
        "kernel:      {} events lost, {} errors (failed closed)",
        status.events_lost, status.kernel_errors
    );
    println!(
        "xdp:         {}",
        super::joined_or(&status.xdp_ifaces, "off")
    );
    if status.degraded.is_empty() {
        println!("features:    all present (Linux {})", status.kernel);
    } else {
        println!(
            "features:    DEGRADED on Linux {}, running without:",
            status.kernel
        );
        for line in &status.degraded {
            println!("               {line}");
        }
    }
    let hooks: Vec<String> = status
        .hooks
        .iter()
        .map(|h| {
            let mut s = format!("{} {}/{}", h.hook, h.allowed, h.denied);
            if h.would_deny != 0 {
                s.push_str(&format!(" ({} would-deny)", h.would_deny));
            }
            s
        })
        .collect();
    println!("hooks:       allowed/denied: {}", hooks.join(", "));
    println!();
    ctl::print_rules(&status.rules);
    Ok(ExitCode::SUCCESS)
}
