//! The egress kernel programs.
//!
//! `egress_connect4` and `egress_connect6` are `cgroup/connect4` and `cgroup/connect6`
//! programs attached to the managed cgroup v2. Every TCP `connect()` made by a process in that
//! cgroup (or below it) is judged before a packet is sent:
//!
//! 1. destination in a bypass range -> allow;
//! 2. (port, protocol, address) matches a rule -> allow, counted on the rule's row;
//! 3. otherwise -> deny (`connect()` fails with `EPERM`), or in audit mode allow and report a
//!    would-deny. Both are counted and sent to the agent as an [`Event`].
//!
//! Both programs fail closed: an error on the way to a verdict (a missing config entry) denies
//! the connection and counts it in `STATS.errors`.
//!
//! # Minimum kernel version
//!
//! `cgroup/connect4`/`connect6` need 4.17; BTF-defined maps and the ring buffer need 5.8;
//! `bpf_get_current_pid_tgid`, `bpf_get_current_comm` and `bpf_get_current_cgroup_id` in
//! `cgroup_sock_addr` programs need 6.1 (they came with the common cgroup helpers in 5.19/6.0;
//! 6.1 is the oldest long-term kernel we test).
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
