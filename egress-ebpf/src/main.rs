//! The egress kernel programs.
//!
//! The cgroup programs are attached to the managed cgroup v2 and judge every process in it
//! (or below it) before a packet is sent:
//!
//! - `egress_connect4`/`egress_connect6` (`cgroup/connect4`/`6`): TCP `connect()` (also TCP
//!   Fast Open and io_uring connects, which take the same kernel path) and `connect()` on UDP
//!   sockets;
//! - `egress_sendmsg4`/`egress_sendmsg6` (`cgroup/sendmsg4`/`6`): UDP datagrams sent to an
//!   address;
//! - `egress_sock_create` (`cgroup/sock_create`): raw sockets and inet protocols other than
//!   TCP and UDP are refused unless the policy's `allowSockets` names them.
//!
//! For a destination:
//!
//! 1. in a bypass range -> allow;
//! 2. (port, protocol, address) matches a rule -> allow, counted on the rule's row;
//! 3. a TCP connect to an HTTP port -> redirected to the proxy;
//! 4. otherwise -> deny (`EPERM`), or in audit mode allow and report a would-deny. Both are
//!    counted and sent to the agent as an `Event`.
//!
//! v4-mapped, NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`) destinations are judged as the IPv4
//! address they carry. `egress_xdp` applies the same rules to TCP SYNs and UDP datagrams
//! arriving on host-side veths (a pod's egress), dropping what they do not allow.
//!
//! Every program fails closed: an error on the way to a verdict (a missing config entry, a
//! truncated packet) denies and counts it in `STATS.errors`.
//!
//! # Minimum kernel version
//!
//! Per program below; in short: `cgroup/connect4`/`connect6` need 4.17, `cgroup/sendmsg4`/`6`
//! 4.18, `cgroup/sock_create` 4.10, `sockops` 4.13 (with `bpf_get_socket_cookie` there, 4.20),
//! `cgroup/getpeername4`/`6` 5.8; `bpf_get_current_pid_tgid`, `bpf_get_current_comm` and
//! `bpf_get_current_cgroup_id` in `cgroup_sock_addr` and `cgroup_sock` programs 5.7 (6.1 only
//! moved them into the common `cgroup_current_func_proto`, which is where "6.1" came from); the ring buffer 5.8; the cgroup programs are attached through
//! `bpf_link`s (5.7; `BPF_LINK_DETACH` for `egress unload`, 5.9), XDP through a `bpf_link`
//! 5.9. The maps are BTF-defined, but that is the loader's business: the kernel needs neither
//! `/sys/kernel/btf/vmlinux` (no CO-RE relocations) nor, strictly, to accept the object's BTF
//! (aya drops it where the kernel cannot). The agent probes each of these at start-up
//! (`egress_user::loader::features`) and refuses to start without a required one; the tests
//! run on 6.1 and newer.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod judge;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path (it becomes an unbounded loop), so a panic
    // here means the program never loads: it cannot fail open at run time.
    loop {}
}

/// On the host this crate has nothing to run: `cargo build --workspace` type-checks it and the
/// real object is built for `bpfel-unknown-none` by `egress-user/build.rs`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
