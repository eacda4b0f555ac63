//! What egress needs from the kernel, and whether this kernel has it.
//!
//! [`FEATURES`] lists every kernel feature the programs and the loader use, with the oldest
//! Linux that has it and what happens without it:
//!
//! - [`Need::Required`]: the policy cannot be enforced without it (a judging hook, a helper or
//!   map the programs use, the links that keep enforcement in place). The agent refuses to
//!   start, naming every missing feature in one message, before it touches a pin, map or
//!   cgroup: failing obscurely in the verifier half way, or running with a hole, is worse.
//! - [`Need::Optional`]: enforcement is the same without it; something else is lost (say, a
//!   redirected app's `getpeername()` shows the proxy). The agent runs without it on purpose
//!   and says so at start-up, one WARN per feature, and in `egress status`.
//! - [`Need::ForXdp`]: needed only for the XDP backstop: required with `--xdp-iface`, unused
//!   without.
//!
//! Every feature is probed with a real bpf(2) call (load a two- or three-instruction program
//! of the type and attach type, calling the helper; create a one-entry map; create a link on
//! a cgroup fd that cannot exist, or an XDP link on the loopback of a network namespace made
//! for the probe; write a tiny trie in a batch), not read off the version number:
//! distribution kernels backport features and the version would lie both ways. Probes leave
//! nothing behind: each fd they get is closed at once. The release (`uname -r`) is only
//! printed.
//!
//! Not in the list, because every kernel with the features above has them: plain array and
//! hash maps (3.19), bpffs pins (4.4), `BPF_OBJ_GET_INFO_BY_FD` on links (5.8, with
//! `cgroup_link`). Not probed either: what the verifier can prove (bounded loops, program
//! size), which only loading the real programs shows; they are tested on 6.1 and newer.
//!
//! The "Kernel features" table of docs/kernel.md is this list; a unit test keeps the two equal.
//!
//! # Hiding features (tests only)
//! This machine's kernel has every feature. `EGRESS_KERNEL_FEATURES_HIDE=getpeername4,batch_ops`
//! makes the named features count as missing, so that the tests can drive the refusal and the
//! degraded paths. It can only take features away, so it can only make the agent refuse or
//! run degraded, never open a hole; a name that is not in [`FEATURES`] makes the agent refuse,
//! so a misspelt test hides nothing by accident.

mod assess;
mod probe;

use std::fmt;

pub use assess::{Assessment, Kernel, Probe, Unsupported, degraded_line, kernel, release};
use aya_obj::generated::{
    BPF_F_NO_PREALLOC, bpf_attach_type as attach, bpf_func_id as helper, bpf_map_type as map,
    bpf_prog_type as prog,
};
use egress_common::programs;
use probe::{
    batch_ops, call, cgroup_link, in_connect4, in_judges, map_type, program, sock_addr, xdp_link,
};

/// The environment variable that hides features from the probes (tests only).
pub const HIDE_ENV: &str = "EGRESS_KERNEL_FEATURES_HIDE";

/// The oldest kernel the test suite runs on (Debian 12's 6.1 under QEMU): what a refusal
/// recommends.
pub const TESTED_SINCE: Linux = Linux(6, 1);

/// A Linux version, major and minor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Linux(pub u32, pub u32);

impl fmt::Display for Linux {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// What happens when a feature is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The policy cannot be enforced without it: refuse to start.
    Required,
    /// Enforcement is unchanged without it; this is lost.
    Optional {
        /// What the agent cannot do without it, for the WARN line and docs/kernel.md.
        lost: &'static str,
    },
    /// Used only by the XDP backstop: required when `--xdp-iface` is given, unused otherwise.
    ForXdp,
}

/// A kernel feature by name, checked by the compiler (see [`FEATURES`] for each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Id {
    /// `connect4`.
    Connect4,
    /// `connect6`.
    Connect6,
    /// `sendmsg4`.
    Sendmsg4,
    /// `sendmsg6`.
    Sendmsg6,
    /// `sock_create`.
    SockCreate,
    /// `sockops`.
    Sockops,
    /// `getpeername4`.
    Getpeername4,
    /// `getpeername6`.
    Getpeername6,
    /// `recvmsg4`.
    Recvmsg4,
    /// `recvmsg6`.
    Recvmsg6,
    /// `cgroup_id_helper`.
    CgroupIdHelper,
    /// `task_helpers`.
    TaskHelpers,
    /// `socket_cookie`.
    SocketCookie,
    /// `proxy_check`.
    ProxyCheck,
    /// `ringbuf`.
    Ringbuf,
    /// `lpm_trie`.
    LpmTrie,
    /// `lru_hash`.
    LruHash,
    /// `percpu_array`.
    PercpuArray,
    /// `cgroup_link`.
    CgroupLink,
    /// `xdp_link`.
    XdpLink,
    /// `batch_ops`.
    BatchOps,
}

/// One kernel feature egress uses.
#[derive(Debug)]
pub struct Feature {
    /// Which feature, for [`Kernel::has`].
    pub id: Id,
    /// Short name, as in messages, docs/kernel.md and [`HIDE_ENV`].
    pub name: &'static str,
    /// What the kernel must have, in its own terms.
    pub kernel: &'static str,
    /// What egress uses it for.
    pub used_for: &'static str,
    /// The first Linux release that has it.
    pub since: Linux,
    /// Refuse, degrade, or only with `--xdp-iface`.
    pub need: Need,
    /// The programs (`egress_common::programs`) that cannot load or attach without it.
    pub programs: &'static [&'static str],
    probe: fn() -> Result<bool, String>,
}

/// The cgroup programs that judge connections (and so run the shared decision path, its
/// helpers and maps).
const JUDGES: &[&str] = &[
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::SOCK_CREATE,
];

/// Every cgroup program the loader attaches.
const CGROUP_PROGRAMS: &[&str] = &[
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::SOCK_CREATE,
    programs::SOCK_OPS,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::RECVMSG4,
    programs::RECVMSG6,
];

/// Every kernel feature the programs and the loader use. The "Kernel features" table of
/// docs/kernel.md lists the same, in the same order.
pub static FEATURES: [Feature; 21] = [
    Feature {
        id: Id::Connect4,
        name: "connect4",
        kernel: "cgroup_sock_addr programs on BPF_CGROUP_INET4_CONNECT",
        used_for: "judging IPv4 TCP connect() and UDP connect()",
        since: Linux(4, 17),
        need: Need::Required,
        programs: &[programs::CONNECT4],
        probe: || sock_addr(attach::BPF_CGROUP_INET4_CONNECT),
    },
    Feature {
        id: Id::Connect6,
        name: "connect6",
        kernel: "cgroup_sock_addr programs on BPF_CGROUP_INET6_CONNECT",
        used_for: "judging IPv6 (and v4-mapped) TCP connect() and UDP connect()",
        since: Linux(4, 17),
        need: Need::Required,
        programs: &[programs::CONNECT6],
        probe: || sock_addr(attach::BPF_CGROUP_INET6_CONNECT),
    },
    Feature {
        id: Id::Sendmsg4,
        name: "sendmsg4",
        kernel: "cgroup_sock_addr programs on BPF_CGROUP_UDP4_SENDMSG",
        used_for: "judging UDP datagrams sent to an IPv4 address",
        since: Linux(4, 18),
        need: Need::Required,
        programs: &[programs::SENDMSG4],
        probe: || sock_addr(attach::BPF_CGROUP_UDP4_SENDMSG),
    },
    Feature {
        id: Id::Sendmsg6,
        name: "sendmsg6",
        kernel: "cgroup_sock_addr programs on BPF_CGROUP_UDP6_SENDMSG",
        used_for: "judging UDP datagrams sent to an IPv6 (or v4-mapped) address",
        since: Linux(4, 18),
        need: Need::Required,
        programs: &[programs::SENDMSG6],
        probe: || sock_addr(attach::BPF_CGROUP_UDP6_SENDMSG),
    },
    Feature {
        id: Id::SockCreate,
        name: "sock_create",
        kernel: "cgroup_sock programs on BPF_CGROUP_INET_SOCK_CREATE",
        used_for: "refusing raw sockets and protocols other than TCP and UDP",
        since: Linux(4, 10),
        need: Need::Required,
        programs: &[programs::SOCK_CREATE],
        probe: || {
            program(
                prog::BPF_PROG_TYPE_CGROUP_SOCK,
                Some(attach::BPF_CGROUP_INET_SOCK_CREATE),
            )
        },
    },
    Feature {
        id: Id::Sockops,
        name: "sockops",
        kernel: "sock_ops programs",
        used_for: "filing a redirected connection's original destination for the proxy",
        since: Linux(4, 13),
        need: Need::Required,
        programs: &[programs::SOCK_OPS],
        probe: || program(prog::BPF_PROG_TYPE_SOCK_OPS, None),
    },
    Feature {
        id: Id::Getpeername4,
        name: "getpeername4",
        kernel: "cgroup_sock_addr programs on BPF_CGROUP_INET4_GETPEERNAME",
        used_for: "showing a redirected IPv4 app its original destination in getpeername()",
        since: Linux(5, 8),
        need: Need::Optional {
            lost: "an app whose connection is redirected to the proxy sees the proxy's \
                   address (127.0.0.1:PORT) in getpeername() instead of the destination it \
                   asked for; enforcement is unchanged",
        },
        programs: &[programs::GETPEERNAME4],
        probe: || sock_addr(attach::BPF_CGROUP_INET4_GETPEERNAME),
    },
    Feature {
        id: Id::Getpeername6,
        name: "getpeername6",
        kernel: "cgroup_sock_addr programs on BPF_CGROUP_INET6_GETPEERNAME",
        used_for: "showing a redirected IPv6 app its original destination in getpeername()",
        since: Linux(5, 8),
        need: Need::Optional {
            lost: "an app whose IPv6 connection is redirected to the proxy sees the proxy's \
                   address ([::1]:PORT) in getpeername() instead of the destination it asked \
                   for; enforcement is unchanged",
        },
        programs: &[programs::GETPEERNAME6],
        probe: || sock_addr(attach::BPF_CGROUP_INET6_GETPEERNAME),
    },
    Feature {
        id: Id::Recvmsg4,
        name: "recvmsg4",
        kernel: "cgroup_sock_addr programs on BPF_CGROUP_UDP4_RECVMSG",
        used_for: "showing a DNS answer from the agent's DNS listener as the resolver's (FQDN rules)",
        since: Linux(5, 2),
        need: Need::Required,
        programs: &[programs::RECVMSG4],
        probe: || sock_addr(attach::BPF_CGROUP_UDP4_RECVMSG),
    },
    Feature {
        id: Id::Recvmsg6,
        name: "recvmsg6",
        kernel: "cgroup_sock_addr programs on BPF_CGROUP_UDP6_RECVMSG",
        used_for: "showing a DNS answer from the agent's DNS listener as an IPv6 (or v4-mapped) resolver's",
        since: Linux(5, 2),
        need: Need::Required,
        programs: &[programs::RECVMSG6],
        probe: || sock_addr(attach::BPF_CGROUP_UDP6_RECVMSG),
    },
    Feature {
        id: Id::CgroupIdHelper,
        name: "cgroup_id_helper",
        kernel: "bpf_get_current_cgroup_id in cgroup_sock_addr and cgroup_sock programs",
        used_for: "exempting the agent's own connections by its cgroup id; the cgroup of events",
        since: Linux(5, 7),
        need: Need::Required,
        programs: JUDGES,
        probe: || in_judges(helper::BPF_FUNC_get_current_cgroup_id),
    },
    Feature {
        id: Id::TaskHelpers,
        name: "task_helpers",
        kernel: "bpf_get_current_pid_tgid and bpf_get_current_comm in cgroup_sock_addr and \
                 cgroup_sock programs",
        used_for: "the pid and command of each event (the programs call them on every verdict)",
        since: Linux(5, 7),
        need: Need::Required,
        programs: JUDGES,
        probe: || {
            Ok(in_judges(helper::BPF_FUNC_get_current_pid_tgid)?
                && in_judges(helper::BPF_FUNC_get_current_comm)?)
        },
    },
    Feature {
        id: Id::SocketCookie,
        name: "socket_cookie",
        kernel: "bpf_get_socket_cookie in cgroup_sock_addr and sock_ops programs",
        used_for: "pairing a redirected socket with its original destination",
        since: Linux(4, 20),
        need: Need::Required,
        programs: &[
            programs::CONNECT4,
            programs::CONNECT6,
            programs::SOCK_OPS,
            programs::GETPEERNAME4,
            programs::GETPEERNAME6,
        ],
        probe: || {
            Ok(in_connect4(helper::BPF_FUNC_get_socket_cookie)?
                && call(
                    prog::BPF_PROG_TYPE_SOCK_OPS,
                    None,
                    helper::BPF_FUNC_get_socket_cookie,
                )?)
        },
    },
    Feature {
        id: Id::ProxyCheck,
        name: "proxy_check",
        kernel: "bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release and bpf_sk_storage_get in cgroup_sock_addr programs (and so BPF_MAP_TYPE_SK_STORAGE)",
        used_for: "redirecting only to a proxy or DNS listener the agent made (PROXY_LISTEN), never to another process on its port",
        since: Linux(5, 8),
        need: Need::Required,
        programs: &[
            programs::CONNECT4,
            programs::CONNECT6,
            programs::SENDMSG4,
            programs::SENDMSG6,
        ],
        probe: || {
            Ok(in_connect4(helper::BPF_FUNC_sk_lookup_tcp)?
                && in_connect4(helper::BPF_FUNC_sk_lookup_udp)?
                && in_connect4(helper::BPF_FUNC_sk_release)?
                && in_connect4(helper::BPF_FUNC_sk_storage_get)?)
        },
    },
    Feature {
        id: Id::Ringbuf,
        name: "ringbuf",
        kernel: "BPF_MAP_TYPE_RINGBUF and the bpf_ringbuf_* helpers",
        used_for: "deny events from the kernel to the agent (EVENTS)",
        since: Linux(5, 8),
        need: Need::Required,
        programs: JUDGES,
        // 64 KiB: a power of two and a whole number of pages for every page size Linux has.
        probe: || map_type(map::BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 16, 0),
    },
    Feature {
        id: Id::LpmTrie,
        name: "lpm_trie",
        kernel: "BPF_MAP_TYPE_LPM_TRIE",
        used_for: "rule and bypass lookups (RULES_V4/V6, BYPASS_V4/V6)",
        since: Linux(4, 11),
        need: Need::Required,
        programs: JUDGES,
        probe: || map_type(map::BPF_MAP_TYPE_LPM_TRIE, 8, 4, 1, BPF_F_NO_PREALLOC),
    },
    Feature {
        id: Id::LruHash,
        name: "lru_hash",
        kernel: "BPF_MAP_TYPE_LRU_HASH",
        used_for: "original destinations of redirected connections (ORIG_COOKIE, ORIG_PEER)",
        since: Linux(4, 10),
        need: Need::Required,
        programs: &[programs::CONNECT4, programs::CONNECT6, programs::SOCK_OPS],
        probe: || map_type(map::BPF_MAP_TYPE_LRU_HASH, 8, 8, 16, 0),
    },
    Feature {
        id: Id::PercpuArray,
        name: "percpu_array",
        kernel: "BPF_MAP_TYPE_PERCPU_ARRAY",
        used_for: "verdict counters (COUNTERS, HOOKS, STATS)",
        since: Linux(4, 6),
        need: Need::Required,
        programs: JUDGES,
        probe: || map_type(map::BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, 0),
    },
    Feature {
        id: Id::CgroupLink,
        name: "cgroup_link",
        kernel: "BPF_LINK_CREATE and BPF_LINK_UPDATE on cgroups (5.7), BPF_LINK_DETACH (5.9)",
        used_for: "pinned links that keep enforcing without the agent, swapped atomically at \
                   each reload, detached by `egress unload`",
        since: Linux(5, 9),
        need: Need::Required,
        programs: CGROUP_PROGRAMS,
        probe: cgroup_link,
    },
    Feature {
        id: Id::XdpLink,
        name: "xdp_link",
        kernel: "XDP programs attached through BPF_LINK_CREATE",
        used_for: "the XDP backstop on --xdp-iface interfaces, pinned and swapped like the \
                   cgroup links",
        since: Linux(5, 9),
        need: Need::ForXdp,
        programs: &[programs::XDP],
        probe: xdp_link,
    },
    Feature {
        id: Id::BatchOps,
        name: "batch_ops",
        kernel: "BPF_MAP_UPDATE_BATCH on LPM tries (5.13), BPF_MAP_LOOKUP_BATCH on arrays (5.6)",
        used_for: "writing a generation's rules and reading the row table in one call",
        since: Linux(5, 13),
        need: Need::Optional {
            lost: "rules are written and the row table read one bpf(2) call per entry \
                   instead of one per batch: the same policy, loaded more slowly",
        },
        programs: &[],
        probe: batch_ops,
    },
];

#[cfg(test)]
mod tests;
