//! Loads the kernel programs, writes a policy generation into fresh maps, attaches (or swaps)
//! the programs on the managed cgroup, and pins everything so enforcement outlives the agent.
//!
//! # How a policy gets into the kernel
//! Every [`Enforcer::apply`] builds a complete new generation: new `CONFIG`, `RULES_*` and
//! `BYPASS_*` maps, filled while no program reads them, and new programs bound to them. Only
//! then is each pinned cgroup link switched to the new program with `BPF_LINK_UPDATE`, which
//! is atomic: a `connect()` is judged either entirely by the old generation or entirely by the
//! new one, and the hook is never empty. The maps that outlive generations (counters, the row
//! table, stats, the event ring) are reopened from their pins, so counters survive reloads
//! and agent restarts.
//!
//! A new agent started over existing pins does the same, so "take over" and "reload" are one
//! code path.
//!
//! Before any of that, the kernel's features are checked ([`features`]): without a required
//! one nothing is touched; without an optional one (the getpeername hooks, batch map calls)
//! the generation is built without it.

pub mod events;
pub mod features;
pub mod inspect;
mod pins;
mod proxy_mark;
mod sys;
mod xdp;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, LpmTrie, MapData, MapInfo, MapType, PerCpuArray, PerCpuValues, RingBuf,
        lpm_trie::Key,
    },
    programs::{CgroupAttachMode, Program, links::FdLink},
    util::nr_cpus,
};
use egress_common::{
    AF_INET, COUNTER_ROWS, Config, EVENTS_BYTES, FIRST_RULE_ROW, MAX_REDIRECTS, OrigDst, PeerKey,
    ROW_BYPASS, ROW_NO_RULE, ROW_PROXY, RuleCounters, RuleInfo, RuleKeyV4, RuleKeyV6, RuleValue,
    Stats, maps,
};
pub use pins::{BPFFS_MOUNT, DEFAULT_PIN_DIR, PinDir, ensure_bpffs, is_bpffs};

use crate::{
    cgroup::{self, CgroupError},
    compile::{self, CompileError, Compiled, RowTable, StoredRows},
    policy::Policy,
};

/// The kernel programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-ebpf"));

/// What can go wrong putting a policy into the kernel. In every case the generation that was
/// in force before stays in force.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The pin directory could not be prepared.
    #[error("preparing pin directory {path}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The managed cgroup could not be prepared.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The policy does not fit the kernel maps.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// The kernel lacks a feature the policy cannot be enforced without.
    #[error(transparent)]
    Kernel(#[from] features::Unsupported),
    /// The agent itself runs in the managed cgroup.
    #[error(
        "the agent runs in the managed cgroup {cgroup} itself, so exempting its own connections \
         would exempt every workload there; run the agent in another cgroup"
    )]
    AgentInsideCgroup {
        /// The managed cgroup.
        cgroup: PathBuf,
    },
    /// An `--xdp-iface` interface does not exist.
    #[error("--xdp-iface {name}: no such interface in the agent's network namespace")]
    Interface {
        /// The name given.
        name: String,
        /// What if_nametoindex said.
        #[source]
        source: io::Error,
    },
    /// A pinned map was made by an incompatible version of egress.
    #[error(
        "pinned map {path} has {found}, this version needs {expected}; it was made by an \
         incompatible version of egress: run `egress unload --pin-dir {dir}` first"
    )]
    IncompatiblePin {
        /// The pin.
        path: PathBuf,
        /// The pin directory.
        dir: PathBuf,
        /// Its layout.
        found: String,
        /// The layout this build needs.
        expected: String,
    },
    /// The pinned links are attached to another cgroup.
    #[error(
        "{path} is attached to cgroup id {found}, not to {cgroup} (id {expected}); use another \
         --pin-dir or run `egress unload` first"
    )]
    LinkElsewhere {
        /// The link pin.
        path: PathBuf,
        /// The cgroup asked for.
        cgroup: PathBuf,
        /// Its id.
        expected: u64,
        /// The id the link is attached to.
        found: u64,
    },
    /// Loading the object or a program failed (the verifier's log is in the source).
    #[error("loading the eBPF programs")]
    Ebpf(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("program {name}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The kernel refused to load (verify) a program although every probed feature is there:
    /// most likely a kernel older than any the programs are tested on.
    #[error(
        "the kernel (Linux {release}) refused to load program {name}; egress's programs are \
         tested on Linux {} and newer, and older verifiers may reject them",
        features::TESTED_SINCE
    )]
    Rejected {
        /// The program.
        name: &'static str,
        /// `uname -r`.
        release: String,
        /// The load error, with the verifier's log (boxed: it is large, and rare).
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map operation failed.
    #[error("map {name}: {what}")]
    Map {
        /// The map.
        name: &'static str,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: aya::maps::MapError,
    },
    /// Pinning or replacing a pin failed.
    #[error("{what} {path}")]
    Pin {
        /// What was being done.
        what: &'static str,
        /// The pin.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn map_err(
    name: &'static str,
    what: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { name, what, source }
}

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

/// The counters of one row, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowCount {
    /// The row.
    pub row: u32,
    /// The rule's name, or `(no rule)` / `(bypass)` for the reserved rows.
    pub name: String,
    /// Summed counters.
    pub counters: RuleCounters,
}

/// The name shown for [`ROW_NO_RULE`].
pub const NO_RULE_NAME: &str = "(no rule)";
/// The name shown for [`ROW_BYPASS`].
pub const BYPASS_NAME: &str = "(bypass)";
/// The name shown for [`ROW_PROXY`].
pub const PROXY_NAME: &str = "(proxy)";

/// The policy in force on one cgroup, and the handles to read its counters and events.
pub struct Enforcer {
    pins: PinDir,
    // The current generation's object: its programs are behind the pinned links and its maps
    // hold the policy. Kept so that counters and the row table can be read.
    ebpf: Ebpf,
    rows: RowTable,
    generation: u32,
}

impl Enforcer {
    /// Puts `policy` in force on `target`, as a new generation: loads fresh programs and maps,
    /// fills them, then attaches the programs (first time) or swaps them into the pinned links
    /// in place (a reload, or a new agent taking over from a previous one).
    ///
    /// # Errors
    /// Among others, [`LoadError::Kernel`] when the kernel lacks a required feature; then
    /// nothing was touched.
    pub fn apply(target: &Target, policy: &Policy) -> Result<Self, LoadError> {
        Self::apply_with_proxy(target, policy, &[])
    }

    /// [`Enforcer::apply`], marking `proxy_listeners` as the agent's (`PROXY_LISTEN`) before
    /// any program of the new generation runs: the connect programs redirect to the proxy only
    /// through a listener the agent marked, and refuse the connection otherwise. Marking again
    /// on every generation costs two map writes and repairs the marks if the pinned map was
    /// made anew (`egress unload` while the agent ran).
    ///
    /// # Errors
    /// As [`Enforcer::apply`]; a listener that cannot be marked is [`LoadError::Map`], and
    /// nothing was switched.
    pub fn apply_with_proxy(
        target: &Target,
        policy: &Policy,
        proxy_listeners: &[&std::net::TcpListener],
    ) -> Result<Self, LoadError> {
        // First, before any cgroup, pin or map is touched. `egress run` has checked (and
        // logged) this already; this is for every other caller.
        let kernel = features::kernel();
        kernel.assess(!target.xdp_ifaces.is_empty())?;
        if cgroup::ensure(&target.cgroup)? {
            tracing::info!(
                cgroup = %target.cgroup.display(),
                "created the managed cgroup; `egress unload` removes it once it is empty"
            );
        }
        let cgroup_id = cgroup::id(&target.cgroup)?;
        let agent_cgroup = cgroup::own_id()?;
        if agent_cgroup == cgroup_id {
            // The agent's sockets are exempt by cgroup id; if that id is the managed cgroup's,
            // every workload in it would be exempt too.
            return Err(LoadError::AgentInsideCgroup {
                cgroup: target.cgroup.clone(),
            });
        }
        let pins = PinDir::new(&target.pin_dir);
        pins.prepare().map_err(|source| LoadError::PinDir {
            path: target.pin_dir.clone(),
            source,
        })?;
        let existing = existing_links(&pins, &target.cgroup, cgroup_id)?;
        let xdp_ifaces = xdp::resolve(&target.xdp_ifaces, true)?;
        let existing_xdp = xdp::pinned(&pins)?;
        check_shared_pins(&pins)?;
        let previous = previous_config(&pins);
        // Rows to read back: below the previous generation's limit; all of them if the row
        // table is pinned without a config (an earlier apply stopped half way); none if fresh.
        let row_limit = match (&previous, pins.map(maps::RULE_INFO).exists()) {
            (Some(config), _) => config.row_limit.min(COUNTER_ROWS),
            (None, true) => COUNTER_ROWS,
            (None, false) => FIRST_RULE_ROW,
        };

        let mut loader = EbpfLoader::new();
        for name in maps::SHARED {
            loader.map_pin_path(name, pins.map(name));
        }
        let mut ebpf = loader.load(OBJECT)?;
        if !proxy_listeners.is_empty() {
            let map = ebpf
                .map_mut(maps::PROXY_LISTEN)
                .expect("object has PROXY_LISTEN");
            proxy_mark::mark(map, proxy_listeners)?;
        }

        let stored = read_rule_info(&ebpf, row_limit)?;
        let generation = previous.map_or(1, |c| next_generation(c.generation));
        let mut compiled = compile::compile(policy, &stored, generation)?;
        compiled.config.agent_cgroup = agent_cgroup;
        for s in &compiled.shadowed {
            tracing::warn!(rule = %s.rule, by = %s.by, key = %s.key, "rule key already allowed by an earlier rule; counted there");
        }
        fill_generation(&mut ebpf, &compiled)?;
        let new_rows: Vec<(u32, &str)> = compiled
            .rows
            .rows()
            .into_iter()
            .filter(|(row, _)| !stored.contains(*row))
            .collect();
        take_rows(&mut ebpf, &new_rows, generation)?;

        // A program whose feature this kernel lacks is left out: only optional ones can be
        // (assess() refused the rest), the getpeername hooks.
        let wanted: Vec<&'static str> = pins::LINKS
            .iter()
            .map(|(program, _)| *program)
            .filter(|program| kernel.program_available(program))
            .collect();
        for program in &wanted {
            load_program(&mut ebpf, program)?;
        }
        // Up to here nothing the kernel enforces has changed. Now switch, program by program:
        // connect4/6 last, so that when they start redirecting, sockops and getpeername of
        // the same generation are already in place.
        for (program, _) in pins::LINKS.iter().rev() {
            let path = pins.link(program);
            if !wanted.contains(program) {
                if let Some(link) = existing.get(program) {
                    // Pinned by an agent that had the feature (a hidden one, in the tests). Its
                    // program would go on working (it reads only the shared ORIG_COOKIE), but
                    // it is an older build that this agent neither swaps nor reports: detach
                    // it, so that what runs is what this agent says runs.
                    drop_link(link.as_fd(), &path)?;
                    tracing::info!(program, path = %path.display(), "detached a pinned link this kernel's features leave out");
                }
                continue;
            }
            let prog_fd = ebpf
                .program(program)
                .expect("object has the program")
                .fd()
                .map_err(|source| LoadError::Program {
                    name: program,
                    source,
                })?;
            match existing.get(program) {
                Some(link) => {
                    sys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(|source| {
                        LoadError::Pin {
                            what: "swapping the program of",
                            path,
                            source,
                        }
                    })?
                }
                None => {
                    let link = attach_program(&mut ebpf, program, &target.cgroup)?;
                    link.pin(&path).map_err(|e| LoadError::Pin {
                        what: "pinning",
                        path: path.clone(),
                        source: io::Error::other(e),
                    })?;
                }
            }
        }
        xdp::apply(&mut ebpf, &pins, &xdp_ifaces, existing_xdp)?;
        repin_generation(&ebpf, &pins)?;
        free_rows(&mut ebpf, &stored.gone(&compiled.rows))?;
        tracing::debug!(
            generation,
            rules = compiled.rows.len(),
            "generation in force"
        );
        Ok(Self {
            pins,
            ebpf,
            rows: compiled.rows,
            generation,
        })
    }

    /// Marks a proxy listener opened after this generation was applied as the agent's, so that
    /// redirected connections may go to it (see [`Enforcer::apply_with_proxy`]).
    ///
    /// # Errors
    /// The pinned `PROXY_LISTEN` map cannot be opened or written.
    pub fn mark_proxy_listener(&self, listener: &std::net::TcpListener) -> Result<(), LoadError> {
        proxy_mark::mark_pinned(&self.pins, listener)
    }

    /// The generation in force.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    /// Which rule owns each row.
    pub fn rows(&self) -> &RowTable {
        &self.rows
    }

    /// The name of a row: a rule name, or the reserved rows' names.
    pub fn row_name(&self, row: u32) -> Option<&str> {
        match row {
            ROW_NO_RULE => Some(NO_RULE_NAME),
            ROW_BYPASS => Some(BYPASS_NAME),
            ROW_PROXY => Some(PROXY_NAME),
            row => self.rows.name(row),
        }
    }

    /// The reserved rows and every rule row of this generation, with their names.
    pub fn row_names(&self) -> Vec<(u32, String)> {
        let mut rows = vec![
            (ROW_NO_RULE, NO_RULE_NAME.to_owned()),
            (ROW_BYPASS, BYPASS_NAME.to_owned()),
            (ROW_PROXY, PROXY_NAME.to_owned()),
        ];
        rows.extend(self.rows.rows().into_iter().map(|(r, n)| (r, n.to_owned())));
        rows
    }

    /// Counters of the reserved rows and every rule of the policy, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<RowCount>, LoadError> {
        let counters: PerCpuArray<_, RuleCounters> =
            PerCpuArray::try_from(self.ebpf.map(maps::COUNTERS).expect("object has COUNTERS"))
                .map_err(map_err(maps::COUNTERS, "opening"))?;
        sum_rows(&counters, &self.row_names())
    }

    /// Verdicts by hook (`connect`, `sendmsg`, `sock_create`, `xdp`), summed over CPUs.
    pub fn hooks(&self) -> Result<Vec<RowCount>, LoadError> {
        let hooks: PerCpuArray<_, RuleCounters> =
            PerCpuArray::try_from(self.ebpf.map(maps::HOOKS).expect("object has HOOKS"))
                .map_err(map_err(maps::HOOKS, "opening"))?;
        sum_rows(&hooks, &hook_rows())
    }

    /// Brings the XDP backstop in line with the interfaces `patterns` name now: attaches this
    /// generation's program to new ones (a pod's veth that appeared since), detaches it from
    /// those that no longer match, and forgets links whose interface is gone. Returns whether
    /// anything changed. Exact names that do not exist are left out, not an error.
    pub fn sync_xdp(&mut self, patterns: &[String]) -> Result<bool, LoadError> {
        let wanted = xdp::resolve(patterns, false)?;
        let existing = xdp::pinned(&self.pins)?;
        let mut have: Vec<(String, u32)> = existing
            .iter()
            .map(|l| (l.iface.clone(), l.ifindex))
            .collect();
        have.sort();
        if have == wanted {
            return Ok(false);
        }
        xdp::apply(&mut self.ebpf, &self.pins, &wanted, existing)?;
        Ok(true)
    }

    /// Interfaces with the XDP backstop attached (from the pins).
    pub fn xdp_ifaces(&self) -> Vec<String> {
        xdp::pinned(&self.pins)
            .map(|links| {
                links
                    .into_iter()
                    .filter(|l| l.ifindex != 0)
                    .map(|l| l.iface)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The programs' own health counters, summed over CPUs.
    pub fn stats(&self) -> Result<Stats, LoadError> {
        let stats: PerCpuArray<_, Stats> =
            PerCpuArray::try_from(self.ebpf.map(maps::STATS).expect("object has STATS"))
                .map_err(map_err(maps::STATS, "opening"))?;
        sum_stats(&stats)
    }

    /// Takes the table of redirected connections' original destinations, for the proxy
    /// (once; later calls return `None`).
    pub fn take_orig_dst(&mut self) -> Option<OrigDstTable> {
        let map = self.ebpf.take_map(maps::ORIG_BY_PEER)?;
        let map = aya::maps::HashMap::try_from(map).ok()?;
        Some(OrigDstTable(std::sync::Mutex::new(map)))
    }

    /// Takes the event ring buffer (once; later calls return `None`).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.ebpf
            .take_map(maps::EVENTS)
            .and_then(|m| RingBuf::try_from(m).ok())
    }

    /// Takes the event ring buffer, registered with the current tokio runtime so that
    /// `readable_mut().await` wakes when the kernel submits an event.
    pub fn take_async_events(&mut self) -> io::Result<tokio::io::unix::AsyncFd<RingBuf<MapData>>> {
        let ring = self
            .take_events()
            .ok_or_else(|| io::Error::other("the event ring buffer was already taken"))?;
        // SAFETY: the RingBuf owns its map fd (MapData holds an OwnedFd) and returns the same
        // fd from as_raw_fd() until it is dropped, which happens only when the AsyncFd is.
        unsafe { tokio::io::unix::AsyncFd::register(ring) }.map_err(|e| e.into_parts().1)
    }
}

/// The rows of `HOOKS`, named as events name the hooks.
fn hook_rows() -> Vec<(u32, String)> {
    events::Hook::ALL
        .iter()
        .zip(0..)
        .map(|(hook, row)| (row, hook.to_string()))
        .collect()
}

/// Per-CPU counters of `rows`, summed.
fn sum_rows<T: std::borrow::Borrow<MapData>>(
    counters: &PerCpuArray<T, RuleCounters>,
    rows: &[(u32, String)],
) -> Result<Vec<RowCount>, LoadError> {
    rows.iter()
        .map(|(row, name)| {
            let per_cpu = counters
                .get(row, 0)
                .map_err(map_err(maps::COUNTERS, "reading"))?;
            let counters = per_cpu
                .iter()
                .fold(RuleCounters::default(), |a, c| RuleCounters {
                    allowed: a.allowed + c.allowed,
                    denied: a.denied + c.denied,
                    would_deny: a.would_deny + c.would_deny,
                });
            Ok(RowCount {
                row: *row,
                name: name.clone(),
                counters,
            })
        })
        .collect()
}

/// The per-CPU health counters, summed.
fn sum_stats<T: std::borrow::Borrow<MapData>>(
    stats: &PerCpuArray<T, Stats>,
) -> Result<Stats, LoadError> {
    let per_cpu = stats.get(&0, 0).map_err(map_err(maps::STATS, "reading"))?;
    Ok(per_cpu.iter().fold(Stats::default(), |a, s| Stats {
        events_lost: a.events_lost + s.events_lost,
        errors: a.errors + s.errors,
    }))
}

/// The generation that follows `current`: the next number, skipping 0 (which means "none"
/// in events and the pinned config) when it wraps.
pub fn next_generation(current: u32) -> u32 {
    current.wrapping_add(1).max(1)
}

/// The counters that outlive generations, opened from their pins: readable from any thread
/// while the agent applies new generations (the metrics endpoint reads them at each scrape).
pub struct PinnedCounters {
    counters: PerCpuArray<MapData, RuleCounters>,
    hooks: PerCpuArray<MapData, RuleCounters>,
    stats: PerCpuArray<MapData, Stats>,
}

impl PinnedCounters {
    /// Opens `COUNTERS` and `STATS` under `pin_dir`.
    ///
    /// # Errors
    /// A pin is missing or not the map this version expects.
    pub fn open(pin_dir: &Path) -> Result<Self, LoadError> {
        let pins = PinDir::new(pin_dir);
        let open = |name: &'static str| {
            MapData::from_pin(pins.map(name)).map_err(map_err(name, "opening the pin of"))
        };
        Ok(Self {
            counters: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(maps::COUNTERS)?))
                .map_err(map_err(maps::COUNTERS, "opening"))?,
            hooks: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(maps::HOOKS)?))
                .map_err(map_err(maps::HOOKS, "opening"))?,
            stats: PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(maps::STATS)?))
                .map_err(map_err(maps::STATS, "opening"))?,
        })
    }

    /// Counters of `rows` (as [`Enforcer::row_names`] lists them), summed over CPUs.
    ///
    /// # Errors
    /// Reading the map failed.
    pub fn rows(&self, rows: &[(u32, String)]) -> Result<Vec<RowCount>, LoadError> {
        sum_rows(&self.counters, rows)
    }

    /// Verdicts by hook, summed over CPUs.
    ///
    /// # Errors
    /// Reading the map failed.
    pub fn hooks(&self) -> Result<Vec<RowCount>, LoadError> {
        sum_rows(&self.hooks, &hook_rows())
    }

    /// The programs' health counters, summed over CPUs.
    ///
    /// # Errors
    /// Reading the map failed.
    pub fn stats(&self) -> Result<Stats, LoadError> {
        sum_stats(&self.stats)
    }
}

/// A link pinned in the pin directory, opened.
struct Pinned {
    program: &'static str,
    path: PathBuf,
    fd: OwnedFd,
    info: sys::CgroupLinkInfo,
}

/// Opens every link pinned in `pins` (none, one or both programs).
fn pinned_links(pins: &PinDir) -> Result<Vec<Pinned>, LoadError> {
    let mut links = Vec::new();
    for (program, _) in pins::LINKS {
        let path = pins.link(program);
        if !path.exists() {
            continue;
        }
        let pin_err = |what, path: &Path| {
            let path = path.to_owned();
            move |source| LoadError::Pin { what, path, source }
        };
        let fd = sys::obj_get(&path).map_err(pin_err("opening", &path))?;
        let info = sys::cgroup_link_info(fd.as_fd()).map_err(pin_err("reading", &path))?;
        links.push(Pinned {
            program,
            path,
            fd,
            info,
        });
    }
    Ok(links)
}

/// Detaches a pinned link and removes its pin.
fn drop_link(link: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<(), LoadError> {
    sys::link_detach(link).map_err(|source| LoadError::Pin {
        what: "detaching",
        path: path.to_owned(),
        source,
    })?;
    std::fs::remove_file(path).map_err(|source| LoadError::Pin {
        what: "removing",
        path: path.to_owned(),
        source,
    })
}

/// Loads (verifies) one program of the object.
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), LoadError> {
    let err = |source| LoadError::Rejected {
        name,
        release: features::release(),
        source: Box::new(source),
    };
    match ebpf.program_mut(name).expect("object has the program") {
        Program::CgroupSockAddr(p) => p.load().map_err(err),
        Program::SockOps(p) => p.load().map_err(err),
        Program::CgroupSock(p) => p.load().map_err(err),
        other => unreachable!("{name} is a {:?} program", other.prog_type()),
    }
}

/// Attaches one loaded program to the cgroup and returns its link, to be pinned.
fn attach_program(ebpf: &mut Ebpf, name: &'static str, cgroup: &Path) -> Result<FdLink, LoadError> {
    let file = cgroup::open(cgroup)?;
    let err = |source| LoadError::Program { name, source };
    let to_fd = |e: aya::programs::links::LinkError| LoadError::Pin {
        what: "converting the link of",
        path: PathBuf::from(name),
        source: io::Error::other(e),
    };
    match ebpf.program_mut(name).expect("object has the program") {
        Program::CgroupSockAddr(p) => {
            let id = p.attach(file, CgroupAttachMode::Single).map_err(err)?;
            p.take_link(id).map_err(err)?.try_into().map_err(to_fd)
        }
        Program::SockOps(p) => {
            let id = p.attach(file, CgroupAttachMode::Single).map_err(err)?;
            p.take_link(id).map_err(err)?.try_into().map_err(to_fd)
        }
        Program::CgroupSock(p) => {
            let id = p.attach(file, CgroupAttachMode::Single).map_err(err)?;
            p.take_link(id).map_err(err)?.try_into().map_err(to_fd)
        }
        other => unreachable!("{name} is a {:?} program", other.prog_type()),
    }
}

/// Opens the existing link pins and checks they belong to this cgroup.
fn existing_links(
    pins: &PinDir,
    cgroup: &Path,
    cgroup_id: u64,
) -> Result<HashMap<&'static str, OwnedFd>, LoadError> {
    let mut links = HashMap::new();
    for link in pinned_links(pins)? {
        if link.info.cgroup_id != cgroup_id {
            return Err(LoadError::LinkElsewhere {
                path: link.path,
                cgroup: cgroup.to_owned(),
                expected: cgroup_id,
                found: link.info.cgroup_id,
            });
        }
        links.insert(link.program, link.fd);
    }
    Ok(links)
}

/// The layout each shared map must have to be reused.
fn expected_layout(name: &str) -> (MapType, u32, u32, u32) {
    match name {
        maps::COUNTERS => (
            MapType::PerCpuArray,
            4,
            size_of::<RuleCounters>() as u32,
            COUNTER_ROWS,
        ),
        maps::RULE_INFO => (
            MapType::Array,
            4,
            size_of::<RuleInfo>() as u32,
            COUNTER_ROWS,
        ),
        maps::STATS => (MapType::PerCpuArray, 4, size_of::<Stats>() as u32, 1),
        maps::EVENTS => (MapType::RingBuf, 0, 0, EVENTS_BYTES),
        maps::ORIG_BY_COOKIE => (
            MapType::LruHash,
            8,
            size_of::<OrigDst>() as u32,
            MAX_REDIRECTS,
        ),
        maps::ORIG_BY_PEER => (
            MapType::LruHash,
            size_of::<PeerKey>() as u32,
            size_of::<OrigDst>() as u32,
            MAX_REDIRECTS,
        ),
        maps::HOOKS => (
            MapType::PerCpuArray,
            4,
            size_of::<RuleCounters>() as u32,
            egress_common::hook::COUNT,
        ),
        maps::PROXY_LISTEN => (
            MapType::SkStorage,
            4,
            size_of::<egress_common::ProxyMark>() as u32,
            0,
        ),
        other => unreachable!("{other} is not a shared map"),
    }
}

/// Refuses to reuse a pinned map whose type or sizes differ from this build's.
fn check_shared_pins(pins: &PinDir) -> Result<(), LoadError> {
    for name in maps::SHARED {
        let path = pins.map(name);
        if !path.exists() {
            continue;
        }
        let info =
            MapInfo::from_pin(&path).map_err(map_err(name_static(name), "reading pinned"))?;
        let found = (
            info.map_type()
                .map_err(map_err(name_static(name), "reading pinned"))?,
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        let expected = expected_layout(name);
        if found != expected && [maps::ORIG_BY_COOKIE, maps::ORIG_BY_PEER].contains(&name) {
            // Only redirects in flight live here (for milliseconds, between connect() and the
            // proxy's accept()), so an earlier build's layout (20-byte values, before pid and
            // comm) is replaced rather than refused: an upgrade keeps its no-gap takeover, and
            // at worst a connection made during the swap is refused by the proxy.
            std::fs::remove_file(&path).map_err(|source| LoadError::PinDir {
                path: pins.path().to_owned(),
                source,
            })?;
            tracing::warn!(
                map = name,
                found = format!("value {} B", found.2),
                expected = format!("value {} B", expected.2),
                "replaced a pinned original-destination map of an earlier layout"
            );
            continue;
        }
        if found != expected {
            let show = |(t, k, v, m): (MapType, u32, u32, u32)| {
                format!("type {t:?}, key {k} B, value {v} B, {m} entries")
            };
            return Err(LoadError::IncompatiblePin {
                path,
                dir: pins.path().to_owned(),
                found: show(found),
                expected: show(expected),
            });
        }
    }
    Ok(())
}

fn name_static(name: &str) -> &'static str {
    maps::SHARED
        .into_iter()
        .chain(maps::PER_GENERATION)
        .find(|n| *n == name)
        .unwrap_or("map")
}

/// The pinned `CONFIG` of the generation in force, if any.
fn previous_config(pins: &PinDir) -> Option<Config> {
    let data = MapData::from_pin(pins.map(maps::CONFIG)).ok()?;
    let config: Array<_, Config> = Array::try_from(aya::maps::Map::Array(data)).ok()?;
    config.get(&0, 0).ok()
}

/// Reads the row table back from `RULE_INFO`, rows below `limit`, in one batch: one lookup
/// per row took 7 ms of a 10,000-rule reload.
fn read_rule_info(ebpf: &Ebpf, limit: u32) -> Result<StoredRows, LoadError> {
    let map = ebpf.map(maps::RULE_INFO).expect("object has RULE_INFO");
    Ok(RowTable::from_rule_info(rule_info_rows(map, limit)?))
}

/// The `RULE_INFO` rows from [`FIRST_RULE_ROW`] to below `limit` of `map`, named or free:
/// for [`read_rule_info`] and for `egress maps`, which reads the pin.
fn rule_info_rows(map: &aya::maps::Map, limit: u32) -> Result<Vec<(u32, RuleInfo)>, LoadError> {
    // Checks the map's key and value sizes against RuleInfo.
    let _: Array<_, RuleInfo> =
        Array::try_from(map).map_err(map_err(maps::RULE_INFO, "opening"))?;
    let mut infos = vec![RuleInfo::default(); limit.saturating_sub(FIRST_RULE_ROW) as usize];
    if features::kernel().has(features::Id::BatchOps) {
        sys::array_lookup_batch(map_fd(map), FIRST_RULE_ROW, &mut infos).map_err(|io_error| {
            map_err(maps::RULE_INFO, "reading")(syscall_error("bpf_map_lookup_batch", io_error))
        })?;
    } else {
        let array: Array<_, RuleInfo> =
            Array::try_from(map).map_err(map_err(maps::RULE_INFO, "opening"))?;
        for (row, info) in (FIRST_RULE_ROW..).zip(infos.iter_mut()) {
            *info = array
                .get(&row, 0)
                .map_err(map_err(maps::RULE_INFO, "reading"))?;
        }
    }
    Ok((FIRST_RULE_ROW..).zip(infos).collect())
}

/// The fd of a map of the object.
fn map_fd(map: &aya::maps::Map) -> std::os::fd::BorrowedFd<'_> {
    use aya::maps::Map;
    match map {
        Map::Array(data) | Map::LpmTrie(data) | Map::PerCpuArray(data) | Map::HashMap(data) => {
            data.fd().as_fd()
        }
        other => unreachable!("no batch operations on {other:?}"),
    }
}

/// A failed bpf(2) call, as aya reports its own.
fn syscall_error(call: &'static str, io_error: io::Error) -> aya::maps::MapError {
    aya::maps::MapError::SyscallError(aya::sys::SyscallError { call, io_error })
}

/// Writes every entry of a generation into its (fresh, unreferenced) maps.
fn fill_generation(ebpf: &mut Ebpf, c: &Compiled) -> Result<(), LoadError> {
    let mut config: Array<_, Config> =
        Array::try_from(ebpf.map_mut(maps::CONFIG).expect("object has CONFIG"))
            .map_err(map_err(maps::CONFIG, "opening"))?;
    config
        .set(0, c.config, 0)
        .map_err(map_err(maps::CONFIG, "writing"))?;
    let mut ports: Array<_, u32> = Array::try_from(
        ebpf.map_mut(maps::HTTP_PORTS)
            .expect("object has HTTP_PORTS"),
    )
    .map_err(map_err(maps::HTTP_PORTS, "opening"))?;
    for port in &c.http_ports {
        ports
            .set(u32::from(*port), 1, 0)
            .map_err(map_err(maps::HTTP_PORTS, "writing"))?;
    }
    let mut protos: Array<_, u32> = Array::try_from(
        ebpf.map_mut(maps::SOCK_PROTOS)
            .expect("object has SOCK_PROTOS"),
    )
    .map_err(map_err(maps::SOCK_PROTOS, "opening"))?;
    for proto in &c.sock_protos {
        protos
            .set(u32::from(*proto), 1, 0)
            .map_err(map_err(maps::SOCK_PROTOS, "writing"))?;
    }
    fill_lpm::<RuleKeyV4, RuleValue>(ebpf, maps::RULES_V4, &c.rules_v4)?;
    fill_lpm::<RuleKeyV6, RuleValue>(ebpf, maps::RULES_V6, &c.rules_v6)?;
    fill_lpm::<[u8; 4], u32>(ebpf, maps::BYPASS_V4, &c.bypass_v4)?;
    fill_lpm::<[u8; 16], u32>(ebpf, maps::BYPASS_V6, &c.bypass_v6)?;
    Ok(())
}

fn fill_lpm<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(u32, K, V)],
) -> Result<(), LoadError> {
    let map = ebpf.map_mut(name).expect("object has the map");
    let keys: Vec<Key<K>> = entries
        .iter()
        .map(|(prefix, key, _)| Key::new(*prefix, *key))
        .collect();
    let values: Vec<V> = entries.iter().map(|(_, _, value)| *value).collect();
    let mut progress = Progress::new(name, entries.len());
    if !features::kernel().has(features::Id::BatchOps) {
        // One bpf(2) call per key, as aya does it: the same entries, more slowly.
        let mut trie: LpmTrie<_, K, V> =
            LpmTrie::try_from(map).map_err(map_err(name, "opening"))?;
        for (key, value) in keys.iter().zip(&values) {
            trie.insert(key, *value, 0)
                .map_err(map_err(name, "inserting"))?;
            progress.step_to(progress.done + 1);
        }
        return Ok(());
    }
    let map = &*map;
    // Checks the map's key and value sizes against K and V.
    let _: LpmTrie<_, K, V> = LpmTrie::try_from(map).map_err(map_err(name, "opening"))?;
    // In batches (one bpf(2) call each instead of one per key), cut where progress is logged.
    while progress.done < entries.len() {
        let end = progress.next.min(entries.len());
        let range = progress.done..end;
        sys::map_update_batch(map_fd(map), &keys[range.clone()], &values[range])
            .map_err(|e| map_err(name, "inserting")(syscall_error("bpf_map_update_batch", e)))?;
        progress.step_to(end);
    }
    Ok(())
}

/// Progress of a long map fill, logged at every tenth for fills of at least
/// [`Progress::LONG`] entries (a 100k-rule policy takes seconds to load), so an operator sees
/// the agent working rather than hung.
struct Progress {
    map: &'static str,
    total: usize,
    done: usize,
    /// Tenths logged so far.
    tenths: usize,
    next: usize,
    start: std::time::Instant,
}

impl Progress {
    /// Fills shorter than this are not reported.
    const LONG: usize = 10_000;

    fn new(map: &'static str, total: usize) -> Self {
        Self {
            map,
            total,
            done: 0,
            tenths: 0,
            next: if total >= Self::LONG {
                total.div_ceil(10)
            } else {
                usize::MAX
            },
            start: std::time::Instant::now(),
        }
    }

    #[cfg(test)]
    fn step(&mut self) {
        self.step_to(self.done + 1);
    }

    /// Records that the first `done` entries are written; `done` is at most `next`.
    fn step_to(&mut self, done: usize) {
        self.done = done;
        if self.done >= self.next {
            // The k-th line at ceil(total * k / 10) entries: ten lines, the last at the last
            // entry, whatever the total (20,002 logged 9%, 19%, ... and never 100% before).
            self.tenths += 1;
            self.next = (self.total * (self.tenths + 1)).div_ceil(10);
            tracing::info!(
                map = self.map,
                done = self.done,
                total = self.total,
                elapsed_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX),
                "loading rules: {}%",
                self.done * 100 / self.total
            );
        }
    }
}

/// Gives rows to rules new in this generation: zeroes their counters (whatever an earlier
/// rule or a crashed apply left there) and records the owner, before any program that counts
/// on those rows runs.
fn take_rows(ebpf: &mut Ebpf, rows: &[(u32, &str)], generation: u32) -> Result<(), LoadError> {
    if rows.is_empty() {
        return Ok(());
    }
    let cpus = nr_cpus().map_err(|(_, source)| LoadError::Pin {
        what: "counting CPUs in",
        path: PathBuf::from("/sys/devices/system/cpu/possible"),
        source,
    })?;
    {
        let mut counters: PerCpuArray<_, RuleCounters> =
            PerCpuArray::try_from(ebpf.map_mut(maps::COUNTERS).expect("object has COUNTERS"))
                .map_err(map_err(maps::COUNTERS, "opening"))?;
        for (row, _) in rows {
            let zero =
                PerCpuValues::try_from(vec![RuleCounters::default(); cpus]).map_err(|source| {
                    LoadError::Pin {
                        what: "building zero counters for",
                        path: PathBuf::from(maps::COUNTERS),
                        source,
                    }
                })?;
            counters
                .set(*row, zero, 0)
                .map_err(map_err(maps::COUNTERS, "clearing"))?;
        }
    }
    let mut info: Array<_, RuleInfo> =
        Array::try_from(ebpf.map_mut(maps::RULE_INFO).expect("object has RULE_INFO"))
            .map_err(map_err(maps::RULE_INFO, "opening"))?;
    for (row, name) in rows {
        info.set(*row, compile::rule_info(name, generation), 0)
            .map_err(map_err(maps::RULE_INFO, "writing"))?;
    }
    Ok(())
}

/// Frees the rows of rules that left the policy, after the swap: no program of the new
/// generation counts on them.
fn free_rows(ebpf: &mut Ebpf, rows: &[u32]) -> Result<(), LoadError> {
    let mut info: Array<_, RuleInfo> =
        Array::try_from(ebpf.map_mut(maps::RULE_INFO).expect("object has RULE_INFO"))
            .map_err(map_err(maps::RULE_INFO, "opening"))?;
    for row in rows {
        info.set(*row, RuleInfo::default(), 0)
            .map_err(map_err(maps::RULE_INFO, "clearing"))?;
    }
    Ok(())
}

/// Pins this generation's maps in place of the previous generation's, so `bpftool map dump
/// pinned` shows what is in force.
fn repin_generation(ebpf: &Ebpf, pins: &PinDir) -> Result<(), LoadError> {
    for name in maps::PER_GENERATION {
        let path = pins.map(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LoadError::Pin {
                    what: "removing old pin",
                    path,
                    source,
                });
            }
        }
        ebpf.map(name)
            .expect("object has the map")
            .pin(&path)
            .map_err(|e| LoadError::Pin {
                what: "pinning",
                path: path.clone(),
                source: io::Error::other(e),
            })?;
    }
    Ok(())
}

/// Detaches the programs and removes every pin `egress` made in `pin_dir`. Links are detached
/// explicitly (`BPF_LINK_DETACH`), so enforcement stops even if a running agent still holds
/// them. Returns what was removed.
pub fn unload(pin_dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let pins = PinDir::new(pin_dir);
    let mut removed = Vec::new();
    for link in pinned_links(&pins)? {
        let path = link.path;
        sys::link_detach(link.fd.as_fd()).map_err(|source| LoadError::Pin {
            what: "detaching",
            path: path.clone(),
            source,
        })?;
        std::fs::remove_file(&path).map_err(|source| LoadError::Pin {
            what: "removing",
            path: path.clone(),
            source,
        })?;
        removed.push(path);
    }
    for link in xdp::pinned(&pins)? {
        xdp::detach(&link)?;
        removed.push(link.path);
    }
    for name in maps::PER_GENERATION.into_iter().chain(maps::SHARED) {
        let path = pins.map(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LoadError::Pin {
                    what: "removing",
                    path,
                    source,
                });
            }
        }
    }
    // Only empty directories go; anything else in there is not ours to delete.
    let _ = std::fs::remove_dir(pins.links_dir());
    let _ = std::fs::remove_dir(pins.path());
    Ok(removed)
}

/// The cgroup ids that the pinned links in `pin_dir` enforce on, or an empty list when no
/// link is pinned there. A process is filtered when it is in one of these cgroups or below.
pub fn enforced_cgroups(pin_dir: &Path) -> Result<Vec<u64>, LoadError> {
    Ok(pinned_links(&PinDir::new(pin_dir))?
        .into_iter()
        .map(|l| l.info.cgroup_id)
        .collect())
}

/// Where redirected connections were going, keyed by the client end of the connection (the
/// peer address the proxy's `accept()` returns), as the sockops program files them.
pub struct OrigDstTable(std::sync::Mutex<aya::maps::HashMap<MapData, PeerKey, OrigDst>>);

impl OrigDstTable {
    /// The original destination of the connection whose client end is `peer`, taken out of
    /// the table (a later connection from the same address and port gets its own entry).
    pub fn take(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.take_with_process(peer).map(|(dst, _)| dst)
    }

    /// [`OrigDstTable::take`], with the process that called `connect()` when the kernel
    /// recorded one.
    pub fn take_with_process(
        &self,
        peer: SocketAddr,
    ) -> Option<(SocketAddr, Option<crate::proxy::Process>)> {
        let key = peer_key(peer);
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let orig = map.get(&key, 0).ok()?;
        // Best effort: the LRU map evicts it anyway.
        let _ = map.remove(&key);
        Some((orig_to_socket_addr(&orig), orig_process(&orig)))
    }
}

impl crate::proxy::OrigDst for OrigDstTable {
    fn lookup(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.take(peer)
    }

    fn lookup_with_process(
        &self,
        peer: SocketAddr,
    ) -> Option<(SocketAddr, Option<crate::proxy::Process>)> {
        self.take_with_process(peer)
    }
}

/// The process the kernel recorded with a redirect; none for pid 0 (no process recorded).
fn orig_process(orig: &OrigDst) -> Option<crate::proxy::Process> {
    (orig.pid != 0).then(|| {
        let len = orig.comm.iter().position(|b| *b == 0).unwrap_or(16);
        crate::proxy::Process {
            pid: orig.pid,
            comm: String::from_utf8_lossy(&orig.comm[..len]).into_owned(),
        }
    })
}

/// The key the sockops program files a connection under: IPv4 (also a v4-mapped client) in
/// the first four bytes.
fn peer_key(peer: SocketAddr) -> PeerKey {
    let port = peer.port().to_be();
    match peer.ip().to_canonical() {
        IpAddr::V4(ip) => {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&ip.octets());
            PeerKey {
                addr,
                port,
                family: AF_INET,
                _pad: 0,
            }
        }
        IpAddr::V6(ip) => PeerKey {
            addr: ip.octets(),
            port,
            family: egress_common::AF_INET6,
            _pad: 0,
        },
    }
}

fn orig_to_socket_addr(orig: &OrigDst) -> SocketAddr {
    let ip = if orig.family == AF_INET && orig.flags & egress_common::flags::NAT64 != 0 {
        // The app asked for 64:ff9b::a.b.c.d; it was judged as a.b.c.d.
        let [a, b, c, d] = [orig.addr[0], orig.addr[1], orig.addr[2], orig.addr[3]];
        IpAddr::V6(Ipv6Addr::new(
            0x64,
            0xff9b,
            0,
            0,
            0,
            0,
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
        ))
    } else if orig.family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(
            orig.addr[0],
            orig.addr[1],
            orig.addr[2],
            orig.addr[3],
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(orig.addr))
    };
    SocketAddr::new(ip, u16::from_be(orig.port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_logs_ten_tenths_and_the_last_at_the_last_entry() {
        for total in [10_000, 20_002, 99_999] {
            let mut p = Progress::new("RULES_V4", total);
            let mut at = Vec::new();
            for _ in 0..total {
                let before = p.tenths;
                p.step();
                if p.tenths != before {
                    at.push(p.done);
                }
            }
            assert_eq!(at.len(), 10, "{total}: {at:?}");
            assert_eq!(at[9], total, "{total}: {at:?}");
            assert!(at[0] * 10 >= total, "{total}: {at:?}");
        }
    }

    #[test]
    fn peer_keys_match_what_sockops_files() {
        let k = peer_key("127.0.0.1:40000".parse().unwrap());
        assert_eq!(&k.addr[..4], &[127, 0, 0, 1]);
        assert_eq!(k.addr[4..], [0; 12]);
        assert_eq!(k.port.to_ne_bytes(), 40000u16.to_be_bytes());
        assert_eq!(k.family, AF_INET);
        // A v4-mapped peer is filed as IPv4, like sockops does for dual-stack sockets.
        assert_eq!(peer_key("[::ffff:127.0.0.1]:40000".parse().unwrap()), k);
        let k6 = peer_key("[::1]:5".parse().unwrap());
        assert_eq!(k6.family, egress_common::AF_INET6);
        assert_eq!(k6.addr[15], 1);
    }

    #[test]
    fn original_destinations_convert_back() {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&[192, 0, 2, 1]);
        let v4 = OrigDst {
            addr,
            port: 80u16.to_be(),
            family: AF_INET,
            flags: 0,
            ..OrigDst::default()
        };
        assert_eq!(orig_to_socket_addr(&v4), "192.0.2.1:80".parse().unwrap());
        let v6 = OrigDst {
            addr: "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
            port: 443u16.to_be(),
            family: egress_common::AF_INET6,
            flags: 0,
            ..OrigDst::default()
        };
        assert_eq!(
            orig_to_socket_addr(&v6),
            "[2001:db8::1]:443".parse().unwrap()
        );
        let nat64 = OrigDst {
            addr: [192, 0, 2, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: 80u16.to_be(),
            family: AF_INET,
            flags: egress_common::flags::NAT64,
            ..OrigDst::default()
        };
        assert_eq!(
            orig_to_socket_addr(&nat64),
            "[64:ff9b::192.0.2.7]:80".parse().unwrap()
        );
    }

    #[test]
    fn a_program_the_kernel_refuses_is_reported_with_the_kernel_and_the_tested_floor() {
        let error = LoadError::Rejected {
            name: "connect4",
            release: "5.10.0-30-cloud-amd64".to_owned(),
            source: Box::new(aya::programs::ProgramError::NotLoaded),
        };
        assert_eq!(
            error.to_string(),
            "the kernel (Linux 5.10.0-30-cloud-amd64) refused to load program connect4; \
             egress's programs are tested on Linux 6.1 and newer, and older verifiers may reject them"
        );
    }
}
