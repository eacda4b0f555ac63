//! A change of rules alone, put in force without a new generation of programs.
//!
//! The programs reach the rule tries only through the one-slot map-of-maps `RULESET_V4` and
//! `RULESET_V6`. When a new policy differs from the one in force only in its rule keys (and
//! so in the rows its rules own), the agent fills new, unreferenced tries and puts each in its
//! slot with one map write: a `connect()` looks its family's rules up in one trie, the old or
//! the new, never a mix, and the kernel keeps a replaced trie alive until no program that
//! could see it runs any more. That skips what a generation costs (loading the object,
//! verifying every program, swapping every link): a one-rule change against 10,000 rules
//! costs filling two tries.
//!
//! Anything else that changed (mode, bypass ranges, scopes, resolvers, FQDN names, aliases,
//! protocols, proxy ports), or a generation in force that is not this agent's (`egress unload`
//! or another agent since), takes the whole path of [`super::Generation`].

use std::{io, os::fd::AsFd as _};

use aya::maps::{Map, MapData};
use egress_common::{COUNTER_ROWS, FIRST_RULE_ROW, RuleKeyV4, RuleKeyV6, RuleValue, maps};

use super::{
    Enforcer, LoadError,
    error::map_err,
    fill::{self, map_fd, syscall_error},
    sys,
};
use crate::compile::{Compiled, StoredRows};

/// What a policy puts in force besides its rule keys: two policies with the same shape differ
/// only in their rules and rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Shape(Compiled);

impl Shape {
    pub(super) fn of(compiled: &Compiled) -> Self {
        let mut c = Compiled {
            rules_v4: Vec::new(),
            rules_v6: Vec::new(),
            rows: Default::default(),
            shadowed: Vec::new(),
            scoped_cgroups: Vec::new(),
            ..compiled.clone()
        };
        c.config.generation = 0;
        c.config.row_limit = 0;
        Self(c)
    }
}

/// A digest of one family's rule entries: a trie whose entries are unchanged is not
/// replaced (each replacement waits for an RCU grace period, 8-16 ms here).
pub(super) fn digest<K: std::hash::Hash>(entries: &[(u32, K, RuleValue)]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::hash::DefaultHasher::new();
    entries.hash(&mut hasher);
    hasher.finish()
}

impl Enforcer {
    /// The rows the generation in force counts on, to compile the next policy against (as
    /// [`super::Generation::stored_rows`] reads them for a new generation).
    ///
    /// # Errors
    /// `RULE_INFO` cannot be read.
    pub fn stored_rows(&self, batch: bool) -> Result<StoredRows, LoadError> {
        let limit = self.row_limit.clamp(FIRST_RULE_ROW, COUNTER_ROWS);
        fill::read_rule_info(&self.ebpf, limit, batch)
    }

    /// Whether `compiled` (compiled against [`Enforcer::stored_rows`] as the next generation)
    /// can be put in force by [`Enforcer::swap_rules`]: it differs from the policy in force
    /// only in its rules, and the generation pinned in force is still this one.
    pub fn rules_only(&self, compiled: &Compiled) -> bool {
        let mut candidate = Shape::of(compiled);
        candidate.0.config.agent_cgroup = self.shape.0.config.agent_cgroup;
        candidate == self.shape && self.pinned_is_ours()
    }

    /// True when the pinned `CONFIG` is this generation's: nobody unloaded the pins or put
    /// another generation in force since.
    fn pinned_is_ours(&self) -> bool {
        let pinned = MapData::from_pin(self.pins.map(maps::CONFIG)).and_then(|m| m.info());
        let ours = match self.ebpf.map(maps::CONFIG) {
            Some(Map::Array(data)) => data.info(),
            _ => return false,
        };
        matches!((pinned, ours), (Ok(p), Ok(o)) if p.id() == o.id())
    }

    /// Puts `compiled` in force by its rule tries alone (see the module documentation); the
    /// caller checked [`Enforcer::rules_only`]. New rules get their rows (counters zeroed)
    /// before the tries that count on them are in force; rows of rules that left are freed
    /// after.
    ///
    /// # Errors
    /// A trie could not be made or filled (nothing changed), or put in force; if the IPv6
    /// trie fails after the IPv4 one went in, the IPv4 one is put back, so the policy in force
    /// stays the old one whole.
    pub fn swap_rules(
        &mut self,
        mut compiled: Compiled,
        stored: &StoredRows,
        batch: bool,
    ) -> Result<(), LoadError> {
        compiled.config.agent_cgroup = self.shape.0.config.agent_cgroup;
        let digests = (digest(&compiled.rules_v4), digest(&compiled.rules_v6));
        let v4 = if digests.0 == self.digests.0 {
            None
        } else {
            Some(new_trie::<RuleKeyV4>(
                self.trie(maps::RULES_V4),
                &compiled.rules_v4,
                batch,
            )?)
        };
        let v6 = if digests.1 == self.digests.1 {
            None
        } else {
            Some(new_trie::<RuleKeyV6>(
                self.trie(maps::RULES_V6),
                &compiled.rules_v6,
                batch,
            )?)
        };
        let new_rows: Vec<(u32, &str)> = compiled
            .rows
            .rows()
            .into_iter()
            .filter(|(row, _)| !stored.contains(*row))
            .collect();
        fill::take_rows(&mut self.ebpf, &new_rows, compiled.config.generation)?;

        let old_v4 = self.ruleset_get(maps::RULESET_V4)?;
        if let Some(v4) = &v4 {
            self.ruleset_set(maps::RULESET_V4, v4)?;
        }
        if let Some(v6) = &v6
            && let Err(e) = self.ruleset_set(maps::RULESET_V6, v6)
        {
            if v4.is_some()
                && let Err(back) = self.ruleset_set(maps::RULESET_V4, &old_v4)
            {
                tracing::error!(error = %back, "could not put the IPv4 rules back after a failed change");
            }
            return Err(e);
        }
        fill::write_config(&mut self.ebpf, compiled.config)?;
        if let Some(v4) = &v4 {
            self.repin(maps::RULES_V4, v4)?;
        }
        if let Some(v6) = &v6 {
            self.repin(maps::RULES_V6, v6)?;
        }
        fill::free_rows(&mut self.ebpf, &stored.gone(&compiled.rows))?;
        tracing::debug!(
            generation = compiled.config.generation,
            rules = compiled.rows.len(),
            "rules in force"
        );
        self.generation = compiled.config.generation;
        self.row_limit = compiled.config.row_limit;
        self.rows = compiled.rows;
        self.digests = digests;
        // The object's own trie of a family is out of force once replaced, and the new one
        // models the next: free it (a million-key policy holds tens of megabytes in each).
        if let Some(v4) = v4 {
            self.tries.0 = Some(v4);
            drop(self.ebpf.take_map(maps::RULES_V4));
        }
        if let Some(v6) = v6 {
            self.tries.1 = Some(v6);
            drop(self.ebpf.take_map(maps::RULES_V6));
        }
        Ok(())
    }

    /// The rule trie `name` (`RULES_V4` or `RULES_V6`) in force, as the model of a new one.
    fn trie(&self, name: &'static str) -> (&'static str, std::os::fd::BorrowedFd<'_>) {
        let made = if name == maps::RULES_V4 {
            &self.tries.0
        } else {
            &self.tries.1
        };
        let fd = match made {
            Some(trie) => trie.fd().as_fd(),
            None => map_fd(self.ebpf.map(name).expect("object has the rule trie")),
        };
        (name, fd)
    }

    /// The trie in slot 0 of the map-of-maps `name`.
    fn ruleset_get(&self, name: &'static str) -> Result<MapData, LoadError> {
        let outer = map_fd(self.ebpf.map(name).expect("object has the rule set"));
        let id = sys::map_of_maps_get(outer, 0)
            .map_err(|e| map_err(name, "reading")(syscall_error("bpf_map_lookup_elem", e)))?;
        MapData::from_id(id).map_err(map_err(name, "opening the trie in"))
    }

    /// Puts `trie` in slot 0 of the map-of-maps `name`.
    fn ruleset_set(&self, name: &'static str, trie: &MapData) -> Result<(), LoadError> {
        let outer = map_fd(self.ebpf.map(name).expect("object has the rule set"));
        sys::map_of_maps_set(outer, 0, trie.fd().as_fd())
            .map_err(|e| map_err(name, "writing")(syscall_error("bpf_map_update_elem", e)))
    }

    /// Moves the pin `name` to `trie`: pinned under a temporary name ([`temporary_pin`]),
    /// then renamed over the old pin, so that `bpftool map dump pinned` always finds a trie.
    fn repin(&self, name: &'static str, trie: &MapData) -> Result<(), LoadError> {
        let path = self.pins.map(name);
        let tmp = self.pins.map(&temporary_pin(name));
        super::error::remove_pin(&tmp, "removing a stale temporary pin")?;
        trie.pin(&tmp).map_err(|e| LoadError::Pin {
            what: "pinning",
            path: tmp.clone(),
            source: io::Error::other(e),
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| LoadError::Pin {
            what: "renaming a new pin over",
            path,
            source,
        })
    }
}

/// Where the new trie `name` is pinned before it is renamed over the pin `name` (bpffs refuses
/// names with a dot).
pub(super) fn temporary_pin(name: &str) -> String {
    format!("{name}_NEW")
}

/// A new trie like `model` (type, capacity, BTF), holding `entries`.
fn new_trie<K: aya::Pod>(
    (name, model): (&'static str, std::os::fd::BorrowedFd<'_>),
    entries: &[(u32, K, RuleValue)],
    batch: bool,
) -> Result<MapData, LoadError> {
    let fd = sys::map_create_like(model, name)
        .map_err(|e| map_err(name, "creating")(syscall_error("bpf_map_create", e)))?;
    let data = MapData::from_fd(fd).map_err(map_err(name, "opening"))?;
    let mut map = Map::LpmTrie(data);
    fill::fill_trie(&mut map, name, entries, batch)?;
    match map {
        Map::LpmTrie(data) => Ok(data),
        _ => unreachable!("made as an LPM trie"),
    }
}
