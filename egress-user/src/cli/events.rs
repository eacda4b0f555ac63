//! `egress events [--follow]`: the running agent's allow/deny events, with pid, command,
//! cgroup, destination and rule (http events: pid and command when the kernel recorded them).

use std::process::ExitCode;

use super::ctl::{Output, SocketArg};
use crate::control::{Request, Response, WireEvent, client::Conversation};

/// Arguments of `egress events`.
#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    /// Keep printing new events as they happen, until interrupted.
    #[arg(short, long)]
    follow: bool,
    /// How many recent events to print first (the agent keeps the last 1024, across restarts,
    /// in its state directory's `events.jsonl`).
    #[arg(long, value_name = "N", default_value_t = 100)]
    recent: usize,
    #[command(flatten)]
    socket: SocketArg,
    /// Output format: a line per event, or a JSON document per line.
    #[arg(short, long, value_enum, default_value_t)]
    output: Output,
}

/// Runs `egress events`.
pub fn run(args: &EventsArgs) -> anyhow::Result<ExitCode> {
    let request = Request::Events {
        follow: args.follow,
        recent: args.recent,
    };
    let mut conversation = Conversation::start(&args.socket.socket, &request)?;
    loop {
        let Some(response) = conversation.answer()? else {
            if args.follow {
                // The agent closed the stream: it stopped (or restarted). Following is over,
                // and a script watching for events must be able to tell.
                eprintln!(
                    "egress: error: the agent closed the event stream (it stopped or restarted); no more events follow"
                );
                return Ok(ExitCode::FAILURE);
            }
            break;
        };
        match response {
            Response::Event(e) if args.output == Output::Json => {
                println!("{}", serde_json::to_string(&e)?);
            }
            Response::Event(e) => println!("{}", line(&e)),
            Response::EndOfRecent if !args.follow => break,
            Response::EndOfRecent => {}
            Response::Error { message } => eprintln!("egress: warning: {message}"),
            other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One event as a line.
fn line(e: &WireEvent) -> String {
    if e.source == "http" {
        let mut out = format!(
            "{} http {} {} status={} rule={} dst={} generation={}",
            e.time, e.verdict, e.host, e.status, e.rule, e.destination, e.generation
        );
        // Known when the kernel recorded the caller with the redirect; left out otherwise.
        if let (Some(pid), Some(comm)) = (e.pid, &e.comm) {
            out.push_str(&format!(" pid={pid} comm={comm}"));
        }
        if !e.reason.is_empty() {
            out.push_str(&format!(" reason={:?}", e.reason));
        }
        out
    } else if e.source == "xdp" {
        format!(
            "{} xdp {} {} dst={}{} rule={} iface={} generation={}",
            e.time,
            e.verdict,
            e.protocol,
            e.destination,
            via(e),
            e.rule,
            e.iface,
            e.generation
        )
    } else if e.source == "sock_create" {
        format!(
            "{} sock_create {} {}{} rule={} pid={} comm={} cgroup={} generation={}",
            e.time,
            e.verdict,
            if e.socket.is_empty() { "" } else { "raw " },
            e.protocol,
            e.rule,
            shown(&e.pid),
            shown(&e.comm),
            shown(&e.cgroup_id),
            e.generation
        )
    } else {
        format!(
            "{} {} {} {} dst={}{} rule={} pid={} comm={} cgroup={} generation={}{}",
            e.time,
            e.source,
            e.verdict,
            e.protocol,
            e.destination,
            via(e),
            e.rule,
            shown(&e.pid),
            shown(&e.comm),
            shown(&e.cgroup_id),
            e.generation,
            if e.reason.is_empty() {
                String::new()
            } else {
                format!(" reason={}", e.reason)
            }
        )
    }
}

/// ` via=nat64` and the like, or nothing.
fn via(e: &WireEvent) -> String {
    if e.via.is_empty() {
        String::new()
    } else {
        format!(" via={}", e.via)
    }
}

/// A process field of a kernel event, or `-` where the event has none.
fn shown<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), T::to_string)
}
