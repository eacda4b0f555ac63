//! `egress maps`: the pinned maps, decoded (rules with their names, counters of the rows in
//! use), where `bpftool map dump` shows raw bytes and every row of every CPU.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use super::ctl::Output;
use crate::loader::{DEFAULT_PIN_DIR, inspect};

/// Arguments of `egress maps`.
#[derive(clap::Args, Debug)]
pub struct MapsArgs {
    /// The pin directory to read (the agent need not be running).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

/// Runs `egress maps`.
pub fn run(args: &MapsArgs) -> anyhow::Result<ExitCode> {
    let view = inspect::read(&args.pin_dir).with_context(|| {
        format!(
            "reading the maps pinned in {} (is an agent loaded there? `egress run` pins them)",
            args.pin_dir.display()
        )
    })?;
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(ExitCode::SUCCESS);
    }
    let c = &view.config;
    println!("pin dir:    {}", view.pin_dir);
    println!(
        "CONFIG:     mode {}, generation {}, rows below {}, proxy port {}, events {}, raw sockets {}, agent cgroup {}",
        c.mode,
        c.generation,
        c.row_limit,
        c.proxy_port,
        if c.events_all { "all" } else { "denied" },
        if c.allow_raw { "allowed" } else { "refused" },
        c.agent_cgroup
    );
    println!("BYPASS:     {}", super::joined_or(&view.bypass, "none"));
    println!("HTTP_PORTS: {}", super::joined_or(&view.http_ports, "none"));
    println!("RULES_V4, RULES_V6: {} keys", view.rules.len());
    let width = view
        .rules
        .iter()
        .map(|r| r.destination.len())
        .max()
        .unwrap_or(0);
    for rule in &view.rules {
        let scope = if rule.scope == 0 {
            String::new()
        } else {
            format!("  (scope {})", rule.scope)
        };
        println!(
            "  {:width$}  {:9}  -> row {:<5} {}{scope}",
            rule.destination, rule.port, rule.row, rule.rule
        );
    }
    println!("COUNTERS (summed over CPUs; rows with a rule or a count):");
    print_counts(&view.counters);
    println!("HOOKS:");
    print_counts(&view.hooks);
    println!(
        "STATS:      events lost {}, errors {}",
        view.stats.events_lost, view.stats.errors
    );
    println!(
        "LEARNED_V4, LEARNED_V6: {} addresses from DNS answers (FQDN rules)",
        view.learned.len()
    );
    for l in &view.learned {
        println!(
            "  {:39}  {:9}  {}  expires in {:.0} s  (scope {})",
            l.destination, l.port, l.rule, l.expires_in_s, l.scope
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_counts(rows: &[inspect::CounterView]) {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for r in rows {
        println!(
            "  {:<5} {:width$}  allowed {:<8} denied {:<8} would_deny {}",
            r.row, r.name, r.allowed, r.denied, r.would_deny
        );
    }
}
