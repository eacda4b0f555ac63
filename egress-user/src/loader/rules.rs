//! A change of rules alone, put in force without a new generation of programs.
//!
//! The programs reach the rule tries only through the one-slot map-of-maps `RULESET_V4` and
//! `RULESET_V6`. When a new policy differs from the one in force only in its rule keys (and
//! so in the rows its rules own), each family whose keys changed goes into force one of two
//! ways, both atomic for every `connect()` (one trie lookup each, answered wholly by the old
//! rules or wholly by the new):
//! - a change of at most [`IN_PLACE_MAX_KEYS`] keys is written into the trie in force, key
//!   by key, in the order [`delta`] gives: microseconds a key;
//! - a larger one fills a new, unreferenced trie and puts it in the slot with one map write;
//!   the kernel keeps the replaced trie alive until no program that could see it runs.
//!
//! That skips what a generation costs (loading the object, verifying every program, swapping
//! every link). Anything else that changed (mode, bypass ranges, scopes, resolvers, FQDN
//! names, aliases, protocols, proxy ports), or a generation in force that is not this agent's
//! (`egress unload` or another agent since), takes the whole path of [`super::Generation`].

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd},
};

use aya::maps::{Map, MapData, lpm_trie::Key};
use egress_common::{RuleKeyV4, RuleKeyV6, RuleValue, maps};

use super::{
    Enforcer, LoadError,
    error::map_err,
    fill::{self, map_fd, syscall_error},
    sys,
};
use crate::compile::{Compiled, LpmEntry, StoredRows};

/// What a policy puts in force besides its rule keys: two policies with the same shape differ
/// only in their rules and rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Shape(Compiled);

impl Shape {
    pub(super) fn of(compiled: &Compiled) -> Self {
        let mut config = compiled.config;
        config.generation = 0;
        config.row_limit = 0;
        // Field by field: cloning the whole and clearing the rules would copy every key.
        Self(Compiled {
            config,
            rules_v4: Vec::new(),
            rules_v6: Vec::new(),
            bypass_v4: compiled.bypass_v4.clone(),
            bypass_v6: compiled.bypass_v6.clone(),
            http_ports: compiled.http_ports.clone(),
            scopes: compiled.scopes.clone(),
            scoped_cgroups: Vec::new(),
            sock_protos: compiled.sock_protos.clone(),
            rows: Default::default(),
            shadowed: Vec::new(),
            dns_slots: compiled.dns_slots.clone(),
            scope_ids: compiled.scope_ids.clone(),
            names: compiled.names.clone(),
            alias_names: compiled.alias_names.clone(),
        })
    }
}

/// The IPv4 and IPv6 rule entries of a policy in force.
pub(super) type RuleEntries = (
    Vec<LpmEntry<RuleKeyV4, RuleValue>>,
    Vec<LpmEntry<RuleKeyV6, RuleValue>>,
);

/// A change of at most this many rule keys (keys added, removed or given another row) is
/// made in the trie in force, key by key in an order that keeps every lookup whole
/// ([`delta`]); a larger one fills a fresh trie and puts it in the slot, which costs a fill of
/// every key and a wait for an RCU grace period (5-16 ms here).
pub const IN_PLACE_MAX_KEYS: usize = 4096;

/// One rule key written or removed in the trie in force, with what it held before (to undo).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op<K> {
    /// Insert the key, or give it another value; `was`: its value before, if any.
    Put {
        prefix: u32,
        key: K,
        value: RuleValue,
        was: Option<RuleValue>,
    },
    /// Remove the key, which held `was`.
    Delete { prefix: u32, key: K, was: RuleValue },
}

impl<K> Op<K> {
    fn prefix(&self) -> u32 {
        match self {
            Op::Put { prefix, .. } | Op::Delete { prefix, .. } => *prefix,
        }
    }
}

/// The key writes that turn the trie holding `old` into one holding `new`, in an order under
/// which every longest-prefix lookup made between two of them gives what it gave with `old`
/// or what it gives with `new`, never a third answer: first the keys to insert or change,
/// longest prefix first (a new key is in only once every longer new key that could cover the
/// same address is), then the keys to remove, shortest prefix first (a key goes only once
/// every shorter one to go is gone). So a `connect()` during the change is judged wholly by
/// the old rules or wholly by the new ones, as with a swapped trie.
pub(super) fn delta<K: Copy + Eq + std::hash::Hash>(
    old: &[LpmEntry<K, RuleValue>],
    new: &[LpmEntry<K, RuleValue>],
) -> Vec<Op<K>> {
    use foldhash::{HashMap, HashSet};
    let before: HashMap<(u32, K), RuleValue> = old.iter().map(|&(p, k, v)| ((p, k), v)).collect();
    let after: HashSet<(u32, K)> = new.iter().map(|&(p, k, _)| (p, k)).collect();
    let mut puts: Vec<Op<K>> = new
        .iter()
        .filter_map(|&(prefix, key, value)| {
            let was = before.get(&(prefix, key)).copied();
            (was != Some(value)).then_some(Op::Put {
                prefix,
                key,
                value,
                was,
            })
        })
        .collect();
    puts.sort_by_key(|op| std::cmp::Reverse(op.prefix()));
    let mut deletes: Vec<Op<K>> = old
        .iter()
        .filter(|(p, k, _)| !after.contains(&(*p, *k)))
        .map(|&(prefix, key, was)| Op::Delete { prefix, key, was })
        .collect();
    deletes.sort_by_key(Op::prefix);
    puts.extend(deletes);
    puts
}

/// How one family's rules go into force.
enum Plan<K> {
    /// Its entries did not change.
    Same,
    /// Key by key in the trie in force.
    InPlace(Vec<Op<K>>),
    /// A fresh trie, filled, to put in the slot.
    Fresh(MapData),
}

impl<K> Plan<K> {
    /// The fresh trie, if that is the plan.
    fn fresh(&self) -> Option<&MapData> {
        match self {
            Plan::Fresh(trie) => Some(trie),
            Plan::Same | Plan::InPlace(_) => None,
        }
    }
}

/// Makes the plan for one family: nothing, key writes, or a filled fresh trie (made here, so
/// that a failure leaves everything as it was).
fn plan<K: aya::Pod + Eq + std::hash::Hash>(
    model: (&'static str, BorrowedFd<'_>),
    old: &[LpmEntry<K, RuleValue>],
    new: &[LpmEntry<K, RuleValue>],
    batch: bool,
) -> Result<Plan<K>, LoadError> {
    let ops = delta(old, new);
    Ok(if ops.is_empty() {
        Plan::Same
    } else if ops.len() <= IN_PLACE_MAX_KEYS {
        Plan::InPlace(ops)
    } else {
        Plan::Fresh(new_trie(model, new, batch)?)
    })
}

/// Applies `ops` to the trie `trie` in order; if one fails, undoes those done (in reverse,
/// which keeps every lookup whole too) and returns the error.
fn apply_ops<K: aya::Pod>(
    name: &'static str,
    trie: BorrowedFd<'_>,
    ops: &[Op<K>],
) -> Result<(), LoadError> {
    let write = |op: &Op<K>| match *op {
        Op::Put {
            prefix, key, value, ..
        } => sys::map_update(trie, &Key::new(prefix, key), &value)
            .map_err(|e| syscall_error("bpf_map_update_elem", e)),
        Op::Delete { prefix, key, .. } => sys::map_delete(trie, &Key::new(prefix, key))
            .map_err(|e| syscall_error("bpf_map_delete_elem", e)),
    };
    for (done, op) in ops.iter().enumerate() {
        if let Err(e) = write(op) {
            undo(name, trie, &ops[..done]);
            return Err(map_err(name, "changing")(e));
        }
    }
    Ok(())
}

/// Undoes `ops` (all done) in reverse order.
fn undo<K: aya::Pod>(name: &'static str, trie: BorrowedFd<'_>, ops: &[Op<K>]) {
    for op in ops.iter().rev() {
        let result = match *op {
            Op::Put {
                prefix,
                key,
                was: Some(was),
                ..
            }
            | Op::Delete {
                prefix, key, was, ..
            } => sys::map_update(trie, &Key::new(prefix, key), &was),
            Op::Put {
                prefix,
                key,
                was: None,
                ..
            } => sys::map_delete(trie, &Key::new(prefix, key)),
        };
        if let Err(e) = result {
            tracing::error!(map = name, error = %e, "could not undo a rule key write after a failed change; run `egress reload` to rewrite the rules");
        }
    }
}

impl Enforcer {
    /// The rows the policy in force counts on, to compile the next policy against: what
    /// `RULE_INFO` holds (as [`super::Generation::stored_rows`] reads it for a new
    /// generation), kept in memory since this agent alone writes it.
    pub fn stored_rows(&self) -> &StoredRows {
        &self.stored
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
        let v4 = plan(
            self.trie(maps::RULES_V4),
            &self.entries.0,
            &compiled.rules_v4,
            batch,
        )?;
        let v6 = plan(
            self.trie(maps::RULES_V6),
            &self.entries.1,
            &compiled.rules_v6,
            batch,
        )?;
        let new_rows: Vec<(u32, &str)> = compiled
            .rows
            .rows()
            .into_iter()
            .filter(|(row, _)| !stored.contains(*row))
            .collect();
        fill::take_rows(&mut self.ebpf, &new_rows, compiled.config.generation, batch)?;

        let old_v4 = self.ruleset_get(maps::RULESET_V4)?;
        self.put_in_force(maps::RULES_V4, maps::RULESET_V4, &v4)?;
        if let Err(e) = self.put_in_force(maps::RULES_V6, maps::RULESET_V6, &v6) {
            // Back to the old IPv4 rules: the old policy stays in force whole.
            match &v4 {
                Plan::Same => {}
                Plan::InPlace(ops) => undo(maps::RULES_V4, self.trie(maps::RULES_V4).1, ops),
                Plan::Fresh(_) => {
                    if let Err(back) = self.ruleset_set(maps::RULESET_V4, &old_v4) {
                        tracing::error!(error = %back, "could not put the IPv4 rules back after a failed change");
                    }
                }
            }
            return Err(e);
        }
        // The new rules are in force: what follows cannot take them back, so a failure is
        // logged, not returned (the caller would take the old policy for the one in force).
        if let Err(e) = fill::write_config(&mut self.ebpf, compiled.config) {
            tracing::error!(error = %e, "rules in force, but CONFIG still names the previous generation (events will)");
        }
        for (name, trie) in [(maps::RULES_V4, v4.fresh()), (maps::RULES_V6, v6.fresh())] {
            if let Some(trie) = trie
                && let Err(e) = self.repin(name, trie)
            {
                tracing::warn!(error = %e, "rules in force, but their pin still shows the previous trie");
            }
        }
        if let Err(e) = fill::free_rows(&mut self.ebpf, &stored.gone(&compiled.rows), batch) {
            tracing::warn!(error = %e, "rules in force; the rows of rules that left stay named until the next change");
        }
        tracing::debug!(
            generation = compiled.config.generation,
            rules = compiled.rows.len(),
            "rules in force"
        );
        self.generation = compiled.config.generation;
        self.row_limit = compiled.config.row_limit;
        self.stored = stored.after(&compiled.rows, compiled.config.generation);
        self.rows = std::sync::Arc::new(compiled.rows);
        self.entries = (compiled.rules_v4, compiled.rules_v6);
        // The object's own trie of a family is out of force once replaced, and the new one
        // models the next: free it (a million-key policy holds tens of megabytes in each).
        if let Plan::Fresh(v4) = v4 {
            self.tries.0 = Some(v4);
            drop(self.ebpf.take_map(maps::RULES_V4));
        }
        if let Plan::Fresh(v6) = v6 {
            self.tries.1 = Some(v6);
            drop(self.ebpf.take_map(maps::RULES_V6));
        }
        Ok(())
    }

    /// Puts one family's plan in force: its key writes in the trie in force, or its fresh
    /// trie in the slot `ruleset` (pinned under `name` by the caller once both families are
    /// in force).
    fn put_in_force<K: aya::Pod>(
        &self,
        name: &'static str,
        ruleset: &'static str,
        plan: &Plan<K>,
    ) -> Result<(), LoadError> {
        match plan {
            Plan::Same => Ok(()),
            Plan::InPlace(ops) => apply_ops(name, self.trie(name).1, ops),
            Plan::Fresh(trie) => self.ruleset_set(ruleset, trie),
        }
    }

    /// The rule trie `name` (`RULES_V4` or `RULES_V6`) in force, as the model of a new one.
    fn trie(&self, name: &'static str) -> (&'static str, BorrowedFd<'_>) {
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
    (name, model): (&'static str, BorrowedFd<'_>),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The row the longest prefix of `entries` matching `addr` gives (bits counted from the
    /// first byte's highest, as the kernel's LPM trie does).
    fn lookup(
        entries: &std::collections::HashMap<(u32, [u8; 2]), RuleValue>,
        addr: [u8; 2],
    ) -> Option<u32> {
        let bits = |x: [u8; 2]| u16::from_be_bytes(x);
        entries
            .iter()
            .filter(|((prefix, key), _)| {
                let mask = if *prefix == 0 {
                    0
                } else {
                    u16::MAX << (16 - prefix)
                };
                bits(*key) & mask == bits(addr) & mask
            })
            .max_by_key(|((prefix, _), _)| *prefix)
            .map(|(_, value)| value.row)
    }

    /// A small pseudo-random rule set: few distinct keys, so that old and new overlap, nest
    /// and share keys with other rows.
    fn entries(seed: &mut u64, n: usize) -> Vec<LpmEntry<[u8; 2], RuleValue>> {
        let mut next = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed
        };
        let mut out: Vec<LpmEntry<[u8; 2], RuleValue>> = Vec::new();
        for _ in 0..n {
            let prefix = (next() % 17) as u32;
            let raw = (next() & 0xf0f0) as u16;
            let mask = if prefix == 0 {
                0
            } else {
                u16::MAX << (16 - prefix)
            };
            let key = (raw & mask).to_be_bytes();
            let row = 3 + (next() % 4) as u32;
            if !out.iter().any(|(p, k, _)| *p == prefix && *k == key) {
                out.push((prefix, key, RuleValue { row }));
            }
        }
        out
    }

    #[test]
    fn every_lookup_during_a_delta_answers_as_the_old_or_the_new_rules() {
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let addrs: Vec<[u8; 2]> = (0..=u16::MAX).step_by(257).map(u16::to_be_bytes).collect();
        for _ in 0..150 {
            let old = entries(&mut seed, 12);
            let new = entries(&mut seed, 12);
            let as_map = |e: &[LpmEntry<[u8; 2], RuleValue>]| {
                e.iter()
                    .map(|&(p, k, v)| ((p, k), v))
                    .collect::<std::collections::HashMap<_, _>>()
            };
            let (before, after) = (as_map(&old), as_map(&new));
            let mut state = before.clone();
            let check = |state: &std::collections::HashMap<_, _>, step: usize| {
                for &a in &addrs {
                    let now = lookup(state, a);
                    assert!(
                        now == lookup(&before, a) || now == lookup(&after, a),
                        "after step {step}, {a:?} gives {now:?}: old {:?}, new {:?}\nold {old:?}\nnew {new:?}",
                        lookup(&before, a),
                        lookup(&after, a)
                    );
                }
            };
            let ops = delta(&old, &new);
            for (step, op) in ops.iter().enumerate() {
                match *op {
                    Op::Put {
                        prefix,
                        key,
                        value,
                        was,
                    } => {
                        assert_eq!(state.insert((prefix, key), value), was);
                    }
                    Op::Delete { prefix, key, was } => {
                        assert_eq!(state.remove(&(prefix, key)), Some(was));
                    }
                }
                check(&state, step);
            }
            assert_eq!(state, after, "the delta ends at the new rules");
            // Undone in reverse, it ends at the old rules, whole at every step too.
            for (step, op) in ops.iter().enumerate().rev() {
                match *op {
                    Op::Put {
                        prefix,
                        key,
                        was: Some(was),
                        ..
                    }
                    | Op::Delete { prefix, key, was } => {
                        state.insert((prefix, key), was);
                    }
                    Op::Put {
                        prefix,
                        key,
                        was: None,
                        ..
                    } => {
                        state.remove(&(prefix, key));
                    }
                }
                check(&state, step);
            }
            assert_eq!(state, before);
        }
    }

    #[test]
    fn a_delta_writes_only_what_changed() {
        let a = (8, [10, 0], RuleValue { row: 3 });
        let b = (16, [10, 1], RuleValue { row: 4 });
        let c = (16, [10, 2], RuleValue { row: 5 });
        assert!(delta(&[a, b], &[b, a]).is_empty());
        let moved = (16, [10, 1], RuleValue { row: 6 });
        assert_eq!(
            delta(&[a, b, c], &[a, moved]),
            vec![
                Op::Put {
                    prefix: 16,
                    key: [10, 1],
                    value: moved.2,
                    was: Some(b.2)
                },
                Op::Delete {
                    prefix: 16,
                    key: [10, 2],
                    was: c.2
                },
            ]
        );
    }
}
