//! The agent's control socket: how `egress status`, `get`, `create`, `delete`, `reload` and
//! `events` talk to a running agent.
//!
//! A Unix stream socket that only root can use: it lives in a directory of mode 0700 and is
//! itself mode 0600, and the agent also checks each client's credentials (`SO_PEERCRED`) and
//! refuses any uid but 0, so a mode changed by hand does not open it.
//!
//! The protocol is one JSON [`Request`] per connection, as one line; the agent answers with
//! one JSON [`Response`] per line: one for every request but `events --follow`, which streams
//! [`Response::Event`] lines until the client goes away.

pub mod client;
pub mod history;
pub mod server;

use serde::{Deserialize, Serialize};

use crate::state::Kind;

/// The default socket path.
pub const DEFAULT_SOCKET: &str = "/run/egress/egress.sock";

/// The longest request line the agent reads (a `create` carries its YAML).
pub const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Mode, generation, rules with counters, proxy state.
    Status,
    /// The rules or aliases in force, with where each comes from.
    Get {
        /// Which.
        kind: Kind,
        /// Only those of this namespace; all of them without.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
    },
    /// Adds the EgressRule and Service documents of `text` (named `source` in messages).
    Create {
        /// The file name, or `-` for standard input.
        source: String,
        /// The YAML.
        text: String,
        /// The namespace of the documents that name none (`egress create -n`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
    },
    /// Removes created documents by name.
    Delete {
        /// Which kind.
        kind: Kind,
        /// Their names.
        names: Vec<String>,
        /// Their namespace: without, node-wide rules (and Services of `default`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
    },
    /// Reads the policy files again and applies them.
    Reload,
    /// Recent events, then (with `follow`) new ones as they happen.
    Events {
        /// Keep streaming.
        follow: bool,
        /// How many recent events to send first.
        recent: usize,
    },
}

/// What the agent answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The request failed; nothing changed.
    Error {
        /// What is wrong (policy errors as `FILE:LINE: message` lines).
        message: String,
    },
    /// The agent's state.
    Status(Box<Status>),
    /// Rules or aliases.
    Rules {
        /// One per rule or alias.
        rules: Vec<RuleRow>,
    },
    /// A change was applied (create, delete, reload).
    Applied {
        /// The generation now in force.
        generation: u32,
        /// What changed, for the user.
        message: String,
    },
    /// One event.
    Event(Box<WireEvent>),
    /// The end of the recent events (with `follow`, new ones come after it).
    EndOfRecent,
}

/// The agent's state, for `egress status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Programs attached to the managed cgroup and a policy applied.
    pub ready: bool,
    /// The agent's version.
    pub version: String,
    /// The agent's pid.
    pub pid: u32,
    /// `enforce` or `audit`.
    pub mode: String,
    /// The generation in force.
    pub generation: u32,
    /// The managed cgroup.
    pub cgroup: String,
    /// The pin directory.
    pub pin_dir: String,
    /// Whether the programs are attached to the managed cgroup (read from the pinned links).
    pub attached: bool,
    /// The policy files and directories, and the created-rules file.
    pub sources: Vec<String>,
    /// Every rule and alias with its counters, then the reserved rows.
    pub rules: Vec<RuleRow>,
    /// The proxy.
    pub proxy: ProxyStatus,
    /// Reloads since start.
    pub reloads_ok: u64,
    /// Failed reloads since start.
    pub reloads_failed: u64,
    /// The last failed reload's error, if the last reload failed.
    pub last_error: Option<String>,
    /// Kernel events lost (ring buffer full).
    pub events_lost: u64,
    /// Kernel program errors (each failed closed).
    pub kernel_errors: u64,
    /// Verdicts by the hook that took them.
    #[serde(default)]
    pub hooks: Vec<HookRow>,
    /// Interfaces with the XDP backstop attached.
    #[serde(default)]
    pub xdp_ifaces: Vec<String>,
    /// The kernel release (`uname -r`).
    #[serde(default)]
    pub kernel: String,
    /// Optional kernel features this kernel lacks, each `NAME (Linux >= X.Y): what is lost`;
    /// empty when the agent runs with every feature.
    #[serde(default)]
    pub degraded: Vec<String>,
    /// What keeps the agent from doing its job now (what makes `/healthz` fail); empty:
    /// healthy.
    #[serde(default)]
    pub problems: Vec<String>,
}

/// Verdicts of one hook, summed over every rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRow {
    /// `connect`, `sendmsg`, `sock_create` or `xdp`.
    pub hook: String,
    /// Allowed (by a rule, a bypass range or allowSockets).
    pub allowed: u64,
    /// Denied.
    pub denied: u64,
    /// Audit mode's would-be denials.
    pub would_deny: u64,
}

/// The proxy's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// Where it listens.
    pub listening: Vec<String>,
    /// Listeners the proxy needs and does not have, each with why (`ADDR: error`); while any
    /// is missing, the agent is not ready and the kernel refuses the connections meant for it.
    #[serde(default)]
    pub missing: Vec<String>,
    /// Requests answered by the current policy's proxy.
    pub requests: u64,
    /// Requests refused (403, refused TLS).
    pub denied: u64,
    /// Requests and connections audit mode passed on that enforce mode would refuse.
    #[serde(default)]
    pub would_deny: u64,
    /// Events dropped because the agent's queue was full.
    pub events_dropped: u64,
    /// App connections held now.
    #[serde(default)]
    pub connections: u64,
    /// App connections it may hold (from the descriptor limit).
    #[serde(default)]
    pub connections_limit: u64,
    /// Connections closed at accept since start: every held one was serving requests.
    #[serde(default)]
    pub connections_refused: u64,
    /// Connections closed before their first request to make room, since start.
    #[serde(default)]
    pub connections_evicted: u64,
    /// Descriptors the agent has open.
    #[serde(default)]
    pub open_fds: u64,
    /// Its soft descriptor limit.
    #[serde(default)]
    pub fds_limit: u64,
}

/// One rule or alias.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRow {
    /// `egressrule`, `service`, or `reserved` for the rows every policy has.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its namespace: the pods it applies to (a Service's, whose names it answers to). None:
    /// a node-wide rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// What it allows: `CIDR tcp/PORTS` or `HOST http/PORTS`.
    pub allows: String,
    /// `FILE:LINE`, or `created` plus where in the state file.
    pub source: String,
    /// Whether `egress create` made it (so `egress delete` can remove it).
    pub created: bool,
    /// Kernel: connections allowed.
    pub allowed: u64,
    /// Kernel: connections denied.
    pub denied: u64,
    /// Kernel: connections audit mode let through that enforce mode would deny.
    pub would_deny: u64,
    /// Proxy: requests answered.
    pub requests: u64,
}

/// One event, as `egress events` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEvent {
    /// Wall-clock time the agent read it, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// The hook of a kernel verdict (`connect`, `sendmsg`, `sock_create`, `xdp`), or `http`
    /// (a proxied request).
    pub source: String,
    /// `allow`, `deny`, `would-deny`, `bypass`; for http the status class.
    pub verdict: String,
    /// The rule that decided, or `(no rule)`.
    pub rule: String,
    /// The calling process (kernel events). Absent where it is not known (http events: the
    /// proxy sees a connection, not the process that made it), never a made-up 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Its command name (kernel events); absent as `pid` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Its cgroup id (kernel events); absent as `pid` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// `namespace/pod` of that cgroup, when the agent knows the node's pods
    /// (`egress run --cri-socket`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Destination `IP:PORT` (for http, the original destination); empty for sock_create.
    pub destination: String,
    /// Kernel events: `tcp`, `udp`, or the protocol of a refused socket (`icmp`, `sctp`...).
    #[serde(default)]
    pub protocol: String,
    /// Kernel events: `raw` for a raw socket (sock_create).
    #[serde(default)]
    pub socket: String,
    /// Kernel events judged as IPv4 though written otherwise: `v4-mapped`, `nat64`, `6to4`.
    #[serde(default)]
    pub via: String,
    /// XDP events: the interface the packet arrived on.
    #[serde(default)]
    pub iface: String,
    /// The policy generation that judged it: the kernel's for kernel events, the proxy's for
    /// http events.
    pub generation: u32,
    /// The request's host (http).
    pub host: String,
    /// The status sent to the app (http).
    pub status: u16,
    /// Why the proxy answered itself (http); for a kernel verdict the rules did not decide,
    /// why (`proxy-absent`, `proxy-foreign`).
    pub reason: String,
}

/// Formats a system time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn rfc3339_has_milliseconds_and_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_000_000_000_123);
        assert_eq!(rfc3339(t), "2001-09-09T01:46:40.123Z");
    }

    #[test]
    fn requests_round_trip_as_one_json_line() {
        let r = Request::Delete {
            kind: Kind::EgressRule,
            names: vec!["a".into()],
            namespace: None,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"op":"delete","kind":"egressrule","names":["a"]}"#);
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
    }
}
