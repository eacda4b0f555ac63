//! Loads the kernel programs, writes a policy generation into fresh maps, attaches (or swaps)
//! the programs on the managed cgroup, and pins everything so enforcement outlives the agent.
//!
//! # How a policy gets into the kernel
//! Every generation is complete and new: new `CONFIG`, `RULES_*` and `BYPASS_*` maps, filled
//! while no program reads them, and new programs bound to them. Only then is each pinned
//! cgroup link switched to the new program with `BPF_LINK_UPDATE`, which is atomic: a
//! `connect()` is judged either entirely by the old generation or entirely by the new one, and
//! the hook is never empty. The maps that outlive generations (counters, the row table, stats,
//! the event ring) are reopened from their pins, so counters survive reloads and agent
//! restarts.
//!
//! A change of rules alone takes a shorter way ([`rules`]): the programs reach the rule tries
//! only through a two-slot map-of-maps, picked by the parity of the generation number they
//! read once, so rules written into the standby slot are put in force by one write of that
//! number, with no new programs; a `connect()` sees the old rules or the new ones, whole, and
//! its event names the generation whose rules judged it.
//!
//! The stages are types, driven by [`crate::pipeline`]: [`Generation::open`] (on a kernel whose
//! [`features`] were assessed), then the compiler, then [`Generation::fill`] and
//! [`Filled::swap`], which returns the [`Enforcer`] of the generation in force. A new agent
//! started over existing pins does the same, so "take over" and "reload" are one code path.
//!
//! By job: [`error`] what fails; [`generation`] the stages; [`enforcer`] the generation in
//! force; [`fill`] writing maps and rows; [`links`] the pinned links and `egress unload`;
//! [`layout`] the shared maps' layout check; [`counters`] reading counters; [`orig_dst`] the
//! redirects' original destinations for the proxy; [`xdp`] the XDP backstop; [`events`] the
//! kernel's events; [`inspect`] `egress maps`; [`rules`] changes of rules alone.

mod counters;
mod enforcer;
mod error;
pub mod events;
pub mod features;
mod fill;
mod generation;
pub mod inspect;
mod layout;
pub mod learned;
mod links;
mod orig_dst;
mod pins;
mod proxy_mark;
mod rules;
mod sys;
mod xdp;

use std::path::PathBuf;

pub use counters::{PinnedCounters, RowCount};
pub use enforcer::{Enforcer, row_names};
pub use error::LoadError;
pub use generation::{Filled, Generation, next_generation};
pub use links::{enforced_cgroups, unload};
pub use orig_dst::{OrigDstTable, Redirect};
pub use pins::{BPFFS_MOUNT, DEFAULT_PIN_DIR, PinDir, ensure_bpffs, is_bpffs};
pub use xdp::PassAll as PassAllXdp;

/// The kernel programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-ebpf"));

/// Where to enforce.
#[derive(Clone, Debug)]
pub struct Target {
    /// The pin directory (default [`DEFAULT_PIN_DIR`]).
    pub pin_dir: PathBuf,
    /// The managed cgroup v2 directory; created if missing.
    pub cgroup: PathBuf,
    /// Host-side interfaces for the XDP backstop (`--xdp-iface`); empty for none.
    pub xdp_ifaces: Vec<String>,
}
