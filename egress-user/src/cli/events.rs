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
    /// Only events of the pods of this namespace (the agent names pods when it runs with
    /// `--cri-socket`).
    #[arg(short, long, value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Only events of the pod of this name (in `--namespace` when given).
    #[arg(long, value_name = "NAME")]
    pod: Option<String>,
    /// Only events with this verdict (`allow`, `deny`, `would-deny`, `bypass`, `redirect`;
    /// for http events also `error` and `refused`).
    #[arg(long, value_name = "VERDICT")]
    verdict: Option<String>,
}

impl EventsArgs {
    /// Whether `e` passes the `--namespace`, `--pod` and `--verdict` filters.
    fn wanted(&self, e: &WireEvent) -> bool {
        let (namespace, name) = match e.pod.as_deref().and_then(|p| p.split_once('/')) {
            Some((namespace, name)) => (Some(namespace), Some(name)),
            None => (None, None),
        };
        self.namespace
            .as_deref()
            .is_none_or(|n| namespace == Some(n))
            && self.pod.as_deref().is_none_or(|p| name == Some(p))
            && self.verdict.as_deref().is_none_or(|v| e.verdict == v)
    }
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
            Response::Event(e) if !args.wanted(&e) => {}
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
            "{} sock_create {} {}{} rule={} pid={} comm={} cgroup={}{} generation={}",
            e.time,
            e.verdict,
            if e.socket.is_empty() { "" } else { "raw " },
            e.protocol,
            e.rule,
            shown(&e.pid),
            shown(&e.comm),
            shown(&e.cgroup_id),
            pod(e),
            e.generation
        )
    } else {
        format!(
            "{} {} {} {} dst={}{} rule={} pid={} comm={} cgroup={}{} generation={}{}",
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
            pod(e),
            e.generation,
            if e.reason.is_empty() {
                String::new()
            } else {
                format!(" reason={}", e.reason)
            }
        )
    }
}

/// ` pod=namespace/name` where the agent knows it, or nothing.
fn pod(e: &WireEvent) -> String {
    e.pod
        .as_ref()
        .map_or_else(String::new, |p| format!(" pod={p}"))
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        events: EventsArgs,
    }

    fn args(words: &[&str]) -> EventsArgs {
        Cli::parse_from(std::iter::once("events").chain(words.iter().copied())).events
    }

    fn event(pod: Option<&str>, verdict: &str) -> WireEvent {
        WireEvent {
            source: "connect".into(),
            verdict: verdict.into(),
            pod: pod.map(str::to_owned),
            cgroup_id: Some(7),
            ..WireEvent::default()
        }
    }

    #[test]
    fn namespace_pod_and_verdict_pick_events() {
        let late_deny = event(Some("team-a/late"), "deny");
        let late_allow = event(Some("team-a/late"), "allow");
        let other_pod = event(Some("team-a/early"), "deny");
        let other_namespace = event(Some("default/late"), "deny");
        let host = event(None, "deny");
        let all = [&late_deny, &late_allow, &other_pod, &other_namespace, &host];
        let picked = |words: &[&str]| {
            let a = args(words);
            all.iter().filter(|e| a.wanted(e)).count()
        };
        assert_eq!(picked(&[]), 5);
        assert_eq!(picked(&["-n", "team-a"]), 3);
        assert_eq!(picked(&["--pod", "late"]), 3);
        assert_eq!(picked(&["-n", "team-a", "--pod", "late"]), 2);
        assert_eq!(
            picked(&["-n", "team-a", "--pod", "late", "--verdict", "deny"]),
            1
        );
        assert_eq!(picked(&["--verdict", "deny"]), 4);
    }

    #[test]
    fn a_known_pod_is_named_in_the_line() {
        assert!(line(&event(Some("team-a/late"), "deny")).contains(" cgroup=7 pod=team-a/late "));
        assert!(!line(&event(None, "deny")).contains("pod="));
    }
}
