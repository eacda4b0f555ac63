//! A new generation, in the two stages of the loader: [`Generation::open`] gathers what the
//! kernel holds (the cgroup, the pins of the generation in force, the rows it counts on) and
//! loads the object; the caller compiles the policy against [`Generation::stored_rows`]; then
//! [`Generation::fill`] writes the compiled entries and verifies the programs while nothing
//! reads them, and [`Filled::swap`] puts them behind the pinned links and returns the
//! [`Enforcer`] of the generation in force.
//!
//! Up to [`Filled::swap`] nothing the kernel enforces has changed: dropping a [`Generation`]
//! or a [`Filled`] leaves the generation in force as it was.

use std::{collections::HashMap, io, os::fd::AsFd as _, os::fd::OwnedFd};

use aya::{Ebpf, EbpfLoader};
use egress_common::{COUNTER_ROWS, FIRST_RULE_ROW, maps};

use super::{
    Enforcer, LoadError, OBJECT, PinDir, Target,
    features::{Assessment, Id},
    fill, layout, learned, links, pins, proxy_mark, rules, sys, xdp,
};
use crate::{
    cgroup,
    compile::{Compiled, StoredRows},
};

/// A generation being built: the object loaded (its maps fresh, the shared ones reopened from
/// their pins), not yet filled.
pub struct Generation<'a> {
    target: &'a Target,
    kernel: &'a Assessment,
    pins: PinDir,
    /// The agent's own cgroup, exempt in `CONFIG`.
    agent_cgroup: u64,
    /// The pinned links of the generation in force, by program.
    existing: HashMap<&'static str, OwnedFd>,
    /// The XDP interfaces asked for (name, index), and those pinned now.
    xdp_ifaces: Vec<(String, u32)>,
    existing_xdp: Vec<xdp::PinnedXdp>,
    ebpf: Ebpf,
    stored: StoredRows,
    number: u32,
}

impl<'a> Generation<'a> {
    /// Opens the next generation on `target`, on a kernel whose features `kernel` assessed:
    /// checks the cgroup and the pins an earlier agent left, loads the object, and marks
    /// `proxy_listeners` as the agent's (`PROXY_LISTEN`) before any program of the generation
    /// runs. The connect programs redirect to the proxy only through a listener the agent
    /// marked, and refuse the connection otherwise; marking again on every generation costs two
    /// map writes and repairs the marks if the pinned map was made anew (`egress unload` while
    /// the agent ran).
    ///
    /// # Errors
    /// The cgroup, the pin directory or a pin cannot be used; the agent runs inside the managed
    /// cgroup; an `--xdp-iface` does not exist; the object does not load; a listener cannot be
    /// marked. Nothing the kernel enforces has changed.
    pub fn open(
        target: &'a Target,
        kernel: &'a Assessment,
        proxy_listeners: &[&std::net::TcpListener],
    ) -> Result<Self, LoadError> {
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
        let existing = links::existing_links(&pins, &target.cgroup, cgroup_id)?;
        let xdp_ifaces = xdp::resolve(&target.xdp_ifaces, true)?;
        let existing_xdp = xdp::pinned(&pins)?;
        layout::check_shared_pins(&pins)?;
        let previous = fill::previous_config(&pins);
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
        let stored = fill::read_rule_info(&ebpf, row_limit, kernel.has(Id::BatchOps))?;
        Ok(Self {
            target,
            kernel,
            pins,
            agent_cgroup,
            existing,
            xdp_ifaces,
            existing_xdp,
            ebpf,
            stored,
            number: previous.map_or(1, |c| next_generation(c.generation)),
        })
    }

    /// The rows the generation in force counts on, to compile against: a rule that stays
    /// keeps its row and its counters.
    pub fn stored_rows(&self) -> &StoredRows {
        &self.stored
    }

    /// This generation's number.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Writes `compiled` (compiled against [`Generation::stored_rows`] as
    /// [`Generation::number`]) into the fresh maps, gives rows to new rules, and loads
    /// (verifies) the programs this kernel can run.
    ///
    /// # Errors
    /// A map write failed or the kernel refused a program; nothing enforced has changed.
    pub fn fill(mut self, mut compiled: Compiled) -> Result<Filled<'a>, LoadError> {
        compiled.config.agent_cgroup = self.agent_cgroup;
        fill::fill_generation(&mut self.ebpf, &compiled, self.kernel.has(Id::BatchOps))?;
        let new_rows: Vec<(u32, &str)> = compiled
            .rows
            .rows()
            .into_iter()
            .filter(|(row, _)| !self.stored.contains(*row))
            .collect();
        fill::take_rows(
            &mut self.ebpf,
            &new_rows,
            self.number,
            self.kernel.has(Id::BatchOps),
        )?;

        // A program whose feature this kernel lacks is left out: only optional ones can be
        // (the assessment refused the rest), the getpeername hooks.
        let programs: Vec<&'static str> = pins::LINKS
            .iter()
            .map(|(program, _)| *program)
            .filter(|program| self.kernel.program_available(program))
            .collect();
        for program in &programs {
            links::load_program(&mut self.ebpf, program)?;
        }
        Ok(Filled {
            generation: self,
            compiled,
            programs,
        })
    }
}

/// A generation filled and verified, ready to be swapped in.
pub struct Filled<'a> {
    generation: Generation<'a>,
    compiled: Compiled,
    /// The programs loaded, those this kernel can run.
    programs: Vec<&'static str>,
}

impl Filled<'_> {
    /// Puts the generation in force: program by program, each pinned link is switched to the
    /// new program with `BPF_LINK_UPDATE` (or attached and pinned, the first time), connect4/6
    /// last, so that when they start redirecting, sockops and getpeername of the same
    /// generation are already in place; then the XDP backstop, the generation's map pins, and
    /// the rows of rules that left are freed.
    ///
    /// # Errors
    /// A link could not be swapped, attached or pinned.
    pub fn swap(self) -> Result<Enforcer, LoadError> {
        let Self {
            generation: g,
            compiled,
            programs,
        } = self;
        // The DNS path writes learned addresses under this lock: none can be written for a
        // rule between its revocation here and the new rules' publication below.
        let in_force = learned::InForce::of(g.pins.path());
        let mut published = in_force.lock();
        let names = learned::NamesInForce {
            names: compiled.names.clone(),
            scopes: compiled.scopes.clone(),
            aliases: compiled.alias_names.clone(),
        };
        // Addresses the new policy no longer allows go before it is in force (refused a few
        // milliseconds early rather than allowed late).
        let swept = learned::LearnedMaps::open(&g.pins)?.sweep(&names, false)?;
        if swept.revoked > 0 {
            tracing::info!(
                revoked = swept.revoked,
                kept = swept.kept,
                "learned addresses the new policy no longer allows were removed"
            );
        }
        let mut ebpf = g.ebpf;
        for (program, _) in pins::LINKS.iter().rev() {
            let path = g.pins.link(program);
            if !programs.contains(program) {
                if let Some(link) = g.existing.get(program) {
                    // Pinned by an agent that had the feature (a hidden one, in the tests). Its
                    // program would go on working (it reads only the shared ORIG_COOKIE), but
                    // it is an older build that this agent neither swaps nor reports: detach
                    // it, so that what runs is what this agent says runs.
                    links::drop_link(link.as_fd(), &path)?;
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
            match g.existing.get(program) {
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
                    let link = links::attach_program(&mut ebpf, program, &g.target.cgroup)?;
                    link.pin(&path).map_err(|e| LoadError::Pin {
                        what: "pinning",
                        path: path.clone(),
                        source: io::Error::other(e),
                    })?;
                }
            }
        }
        xdp::apply(&mut ebpf, &g.pins, &g.xdp_ifaces, g.existing_xdp)?;
        fill::repin_generation(&ebpf, &g.pins)?;
        fill::free_rows(
            &mut ebpf,
            &g.stored.gone(&compiled.rows),
            g.kernel.has(Id::BatchOps),
        )?;
        *published = names;
        drop(published);
        tracing::debug!(
            generation = g.number,
            rules = compiled.rows.len(),
            "generation in force"
        );
        let batch = g.kernel.has(Id::BatchOps);
        let shape = rules::Shape::of(&compiled);
        let (v4_trie, v6_trie) = (
            take_trie(&mut ebpf, maps::RULES_V4),
            take_trie(&mut ebpf, maps::RULES_V6),
        );
        let ruleset = |name| fill::map_fd(ebpf.map(name).expect("object has the rule set"));
        let v4 = rules::Tries::new(
            (maps::RULES_V4, maps::RULESET_V4),
            g.number,
            (ruleset(maps::RULESET_V4), v4_trie),
            compiled.rules_v4,
            batch,
        );
        let v6 = rules::Tries::new(
            (maps::RULES_V6, maps::RULESET_V6),
            g.number,
            (ruleset(maps::RULESET_V6), v6_trie),
            compiled.rules_v6,
            batch,
        );
        Ok(Enforcer {
            pins: g.pins,
            ebpf,
            shape,
            row_limit: compiled.config.row_limit,
            stored: g.stored.after(&compiled.rows, g.number),
            v4,
            v6,
            readers: super::rules::Readers::Gone,
            rows: std::sync::Arc::new(compiled.rows),
            generation: g.number,
            scopes: compiled.scopes,
            dns_slots: compiled.dns_slots,
        })
    }
}

/// The object's rule trie `name`, taken out of it: the enforcer keeps it in its slot.
fn take_trie(ebpf: &mut aya::Ebpf, name: &'static str) -> aya::maps::MapData {
    match ebpf.take_map(name) {
        Some(aya::maps::Map::LpmTrie(data)) => data,
        _ => unreachable!("the object has the LPM trie {name}"),
    }
}

/// The generation that follows `current`: the next number, skipping 0 (which means "none"
/// in events and the pinned config) when it wraps, to 2, so that the parity, which picks the
/// rules' slot (`RULESET_V4`), alternates across the wrap too.
pub fn next_generation(current: u32) -> u32 {
    match current.wrapping_add(1) {
        0 => 2,
        n => n,
    }
}
