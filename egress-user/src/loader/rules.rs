//! A change of rules alone, put in force without a new generation of programs.
//!
//! The programs reach the rule tries only through the two-slot map-of-maps `RULESET_V4` and
//! `RULESET_V6`: generation `g` reads its number once from `CONFIG` and looks its rules up in
//! slot `g & 1`, so one number both picks the rules that judge a `connect()` and labels its
//! event. When a new policy differs from the one in force only in its rule keys (and so in the
//! rows its rules own), it goes into force in three steps:
//! 1. each family's other slot (the standby, holding the rules of the generation before the
//!    one in force) is brought to the new rules: a difference of at most
//!    [`IN_PLACE_MAX_KEYS`] keys is written into the standby trie key by key (microseconds a
//!    key); a larger one fills a fresh trie and puts it in the slot;
//! 2. `CONFIG` takes the new generation number: the one write that puts both families' new
//!    rules in force, for every program run that reads it from then on;
//! 3. a wait for an RCU grace period, begun in the background (a [`Barrier`]): once it is
//!    over, no program run that read the old number is still going, and the old slot becomes
//!    the standby the next change may write. The next change waits for it first, if it has
//!    not ended by then.
//!
//! That skips what a generation costs (loading the object, verifying every program, swapping
//! every link). Anything else that changed (mode, bypass ranges, scopes, resolvers, FQDN
//! names, aliases, protocols, proxy ports), or a generation in force that is not this agent's
//! (`egress unload` or another agent since), takes the whole path of [`super::Generation`].

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use aya::maps::{Map, MapData, lpm_trie::Key};
use egress_common::{RuleValue, maps};

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

/// A difference of at most this many rule keys (keys added, removed or given another row)
/// between the standby trie and the new rules is written into the standby key by key
/// ([`delta`]); a larger one fills a fresh trie and puts it in the slot, which costs a fill of
/// every key and a wait for an RCU grace period (5-16 ms here).
pub const IN_PLACE_MAX_KEYS: usize = 4096;

/// One rule key written into or removed from a trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op<K> {
    /// Insert the key, or give it another value.
    Put {
        prefix: u32,
        key: K,
        value: RuleValue,
    },
    /// Remove the key.
    Delete { prefix: u32, key: K },
}

impl<K> Op<K> {
    fn prefix(&self) -> u32 {
        match self {
            Op::Put { prefix, .. } | Op::Delete { prefix, .. } => *prefix,
        }
    }
}

/// The key writes that turn the trie holding `old` into one holding `new`. Only the standby
/// trie is written, which no program reads; the order is a second line of defence should one
/// still read it: under it every longest-prefix lookup made between two writes gives what it
/// gave with `old` or what it gives with `new`, never a third answer. First the keys to insert
/// or change, longest prefix first (a new key is in only once every longer new key that could
/// cover the same address is), then the keys to remove, shortest prefix first (a key goes only
/// once every shorter one to go is gone).
pub(super) fn delta<K: Copy + Eq + std::hash::Hash>(
    old: &[LpmEntry<K, RuleValue>],
    new: &[LpmEntry<K, RuleValue>],
) -> Vec<Op<K>> {
    use foldhash::{HashMap, HashSet};
    let before: HashMap<(u32, K), RuleValue> = old.iter().map(|&(p, k, v)| ((p, k), v)).collect();
    let after: HashSet<(u32, K)> = new.iter().map(|&(p, k, _)| (p, k)).collect();
    let mut puts: Vec<Op<K>> = new
        .iter()
        .filter(|&&(prefix, key, value)| before.get(&(prefix, key)) != Some(&value))
        .map(|&(prefix, key, value)| Op::Put { prefix, key, value })
        .collect();
    puts.sort_by_key(|op| std::cmp::Reverse(op.prefix()));
    let mut deletes: Vec<Op<K>> = old
        .iter()
        .filter(|(p, k, _)| !after.contains(&(*p, *k)))
        .map(|&(prefix, key, _)| Op::Delete { prefix, key })
        .collect();
    deletes.sort_by_key(Op::prefix);
    puts.extend(deletes);
    puts
}

/// How one family's standby slot is brought to the new rules.
enum Plan<K> {
    /// It holds them already.
    Same,
    /// Key by key in the standby trie.
    InPlace(Vec<Op<K>>),
    /// A fresh trie, filled, to put in the slot.
    Fresh(MapData),
}

/// Applies `ops` to the trie `trie` in order.
fn apply_ops<K: aya::Pod>(
    name: &'static str,
    trie: BorrowedFd<'_>,
    ops: &[Op<K>],
) -> Result<(), LoadError> {
    for op in ops {
        match *op {
            Op::Put { prefix, key, value } => sys::map_update(trie, &Key::new(prefix, key), &value)
                .map_err(|e| syscall_error("bpf_map_update_elem", e)),
            Op::Delete { prefix, key } => sys::map_delete(trie, &Key::new(prefix, key))
                .map_err(|e| syscall_error("bpf_map_delete_elem", e)),
        }
        .map_err(map_err(name, "changing"))?;
    }
    Ok(())
}

/// A rule trie in one slot of a rule set, and what it holds.
pub(super) struct Slot<K> {
    trie: MapData,
    /// Its entries; `None` once a change failed part-way through writing it (the next change
    /// fills a fresh trie for the slot).
    entries: Option<Vec<LpmEntry<K, RuleValue>>>,
}

/// One family's rule set (`RULESET_V4` or `RULESET_V6`): the tries this agent put in its two
/// slots.
pub(super) struct Tries<K> {
    /// The family's trie map name, `RULES_V4` or `RULES_V6` (pin and error messages).
    name: &'static str,
    /// The rule set's map name.
    ruleset: &'static str,
    slots: [Option<Slot<K>>; 2],
    /// The standby being made in the background for a generation just put in force, and its
    /// slot ([`Tries::new`]).
    pending: Option<(usize, Pending<K>)>,
}

/// A standby trie being filled and put in its slot by a thread of its own.
type Pending<K> = std::thread::JoinHandle<Result<Slot<K>, LoadError>>;

impl<K> AsFd for Slot<K> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.trie.fd().as_fd()
    }
}

/// In a thread of its own: makes a trie with `make`, then puts it in slot `slot` of the rule
/// set `outer` (called `ruleset` in errors); the thread's result is the trie.
fn set_in_background<T: AsFd + Send + 'static>(
    thread: &str,
    (ruleset, outer): (&'static str, BorrowedFd<'_>),
    slot: usize,
    make: impl FnOnce() -> Result<T, LoadError> + Send + 'static,
) -> io::Result<std::thread::JoinHandle<Result<T, LoadError>>> {
    let outer = outer.try_clone_to_owned()?;
    std::thread::Builder::new()
        .name(thread.into())
        .spawn(move || {
            let trie = make()?;
            sys::map_of_maps_set(outer.as_fd(), slot as u32, trie.as_fd()).map_err(|e| {
                map_err(ruleset, "writing")(syscall_error("bpf_map_update_elem", e))
            })?;
            Ok(trie)
        })
}

impl<K: aya::Pod + Eq + std::hash::Hash + Send> Tries<K> {
    /// The rule set `outer` of a generation just put in force: its object's trie `trie`,
    /// holding `entries`, in the slot of generation `number`; the other slot gets a copy in
    /// the background, so that the first change of rules alone finds a standby to write in
    /// place (else it would fill a fresh trie: 0.6 s instead of 0.3 at 100,000 rules).
    pub(super) fn new(
        (name, ruleset): (&'static str, &'static str),
        number: u32,
        (outer, trie): (BorrowedFd<'_>, MapData),
        entries: Vec<LpmEntry<K, RuleValue>>,
        batch: bool,
    ) -> Self {
        let standby = slot_of(number) ^ 1;
        let pending = match Self::prefill(
            name,
            ruleset,
            (outer, trie.fd().as_fd()),
            standby,
            &entries,
            batch,
        ) {
            Ok(pending) => Some((standby, pending)),
            Err(e) => {
                tracing::warn!(map = name, error = %e, "could not begin making the standby rule trie; the first change of rules will fill one");
                None
            }
        };
        let mut slots = [None, None];
        slots[slot_of(number)] = Some(Slot {
            trie,
            entries: Some(entries),
        });
        Self {
            name,
            ruleset,
            slots,
            pending,
        }
    }

    /// Begins making the standby: a trie like `model` holding `entries`, put in slot `slot` of
    /// `outer` (no program reads it), in a thread of its own.
    fn prefill(
        name: &'static str,
        ruleset: &'static str,
        (outer, model): (BorrowedFd<'_>, BorrowedFd<'_>),
        slot: usize,
        entries: &[LpmEntry<K, RuleValue>],
        batch: bool,
    ) -> io::Result<Pending<K>> {
        let model = model.try_clone_to_owned()?;
        let entries = entries.to_vec();
        set_in_background("egress-standby", (ruleset, outer), slot, move || {
            Ok(Slot {
                trie: new_trie((name, model.as_fd()), &entries, batch, false)?,
                entries: Some(entries),
            })
        })
    }

    /// Waits for the standby begun by [`Tries::new`], if any, and takes it in its slot; one
    /// that failed leaves the slot empty (the next change fills a fresh trie).
    fn settle(&mut self) {
        let Some((slot, pending)) = self.pending.take() else {
            return;
        };
        match pending.join() {
            Ok(Ok(standby)) => self.slots[slot] = Some(standby),
            Ok(Err(e)) => {
                tracing::warn!(map = self.name, error = %e, "the standby rule trie could not be made; this change fills a fresh one");
            }
            Err(_) => {
                tracing::warn!(
                    map = self.name,
                    "the thread making the standby rule trie panicked; this change fills a fresh one"
                );
            }
        }
    }

    /// A trie of this family, the model of new ones.
    fn model(&self) -> BorrowedFd<'_> {
        self.slots
            .iter()
            .flatten()
            .map(|slot| slot.trie.fd().as_fd())
            .next()
            .expect("the slot in force holds a trie")
    }

    /// The trie in slot `slot`, if this agent put one there.
    fn trie(&self, slot: usize) -> Option<&MapData> {
        self.slots[slot].as_ref().map(|s| &s.trie)
    }

    /// Makes the plan that brings slot `slot` to `new`: nothing, key writes, or a filled fresh
    /// trie (made here, so that a failure leaves everything as it was).
    fn plan(
        &self,
        slot: usize,
        new: &[LpmEntry<K, RuleValue>],
        batch: bool,
    ) -> Result<Plan<K>, LoadError> {
        if let Some(Slot {
            entries: Some(old), ..
        }) = &self.slots[slot]
        {
            let ops = delta(old, new);
            if ops.is_empty() {
                return Ok(Plan::Same);
            }
            if ops.len() <= IN_PLACE_MAX_KEYS {
                return Ok(Plan::InPlace(ops));
            }
        }
        Ok(Plan::Fresh(new_trie(
            (self.name, self.model()),
            new,
            batch,
            true,
        )?))
    }

    /// Carries out `plan` on slot `slot` of the rule set `outer`, which then holds `new`. No
    /// program reads that slot (the caller waited for the [`Barrier`] of the last change).
    fn write(
        &mut self,
        outer: BorrowedFd<'_>,
        slot: usize,
        plan: Plan<K>,
        new: Vec<LpmEntry<K, RuleValue>>,
    ) -> Result<(), LoadError> {
        match plan {
            Plan::Same => {}
            Plan::InPlace(ops) => {
                let standby = self.slots[slot].as_mut().expect("planned on a trie");
                if let Err(e) = apply_ops(self.name, standby.trie.fd().as_fd(), &ops) {
                    standby.entries = None;
                    return Err(e);
                }
            }
            Plan::Fresh(trie) => {
                sys::map_of_maps_set(outer, slot as u32, trie.fd().as_fd()).map_err(|e| {
                    map_err(self.ruleset, "writing")(syscall_error("bpf_map_update_elem", e))
                })?;
                self.slots[slot] = Some(Slot {
                    trie,
                    entries: None,
                });
            }
        }
        self.slots[slot].as_mut().expect("written").entries = Some(new);
        Ok(())
    }
}

/// The slot of `RULESET_V4`/`RULESET_V6` whose rules judge for generation `number`.
pub(super) fn slot_of(number: u32) -> usize {
    (number & 1) as usize
}

/// A wait for an RCU grace period begun right after a change put a new generation number in
/// force: a `BPF_MAP_UPDATE_ELEM` of a map-of-maps returns only once every program run that
/// began before it has ended (the kernel's `synchronize_rcu`), so the update is made to the
/// old slot with the trie already in it, changing nothing, in a thread of its own.
///
/// Only `RULESET_V4`'s slot is re-put: `synchronize_rcu` waits for every RCU reader, so the
/// same wait covers the program runs that read `RULESET_V6`.
pub(super) struct Barrier(std::thread::JoinHandle<Result<OwnedFd, LoadError>>);

impl Barrier {
    /// Begins the wait: re-puts `trie`, in slot `slot` of `outer` already, there.
    fn begin(outer: BorrowedFd<'_>, slot: usize, trie: BorrowedFd<'_>) -> io::Result<Self> {
        let trie = trie.try_clone_to_owned()?;
        set_in_background(
            "egress-rcu-wait",
            (maps::RULESET_V4, outer),
            slot,
            move || Ok(trie),
        )
        .map(Self)
    }

    /// Waits for it to end.
    fn wait(self) -> Result<(), LoadError> {
        match self.0.join() {
            Ok(done) => done.map(drop),
            Err(_) => Err(map_err(
                maps::RULESET_V4,
                "waiting for a grace period after writing",
            )(aya::maps::MapError::IoError(
                io::Error::other("the thread waiting for a grace period panicked"),
            ))),
        }
    }
}

/// Whether a program run may still read the slot of the generation before the one in force.
#[derive(Default)]
pub(super) enum Readers {
    /// None does: its slot may be written.
    #[default]
    Gone,
    /// The last change of rules alone began a wait for them to end.
    Pending(Barrier),
    /// The last change could not begin that wait, or it failed: the next change waits first.
    Unsure,
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
        candidate == self.shape
            && slot_of(compiled.config.generation) != slot_of(self.generation)
            && self.pinned_is_ours()
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

    /// Puts `compiled` (compiled against [`Enforcer::stored_rows`]) in force by its rule tries
    /// alone (see the module documentation); the caller checked [`Enforcer::rules_only`]. New rules get their rows (counters zeroed)
    /// before the rules that count on them are in force; rows of rules that left are freed
    /// after.
    ///
    /// # Errors
    /// The grace period after the last change could not be waited for, or a standby trie could
    /// not be made, filled or written, or `CONFIG` could not be written: the policy in force
    /// stays the old one whole.
    pub fn swap_rules(&mut self, mut compiled: Compiled, batch: bool) -> Result<(), LoadError> {
        compiled.config.agent_cgroup = self.shape.0.config.agent_cgroup;
        let (old, slot) = (
            slot_of(self.generation),
            slot_of(compiled.config.generation),
        );
        self.v4.settle();
        self.v6.settle();
        // Planning reads the standby and fills fresh tries aside: it may overlap the wait.
        let v4 = self.v4.plan(slot, &compiled.rules_v4, batch)?;
        let v6 = self.v6.plan(slot, &compiled.rules_v6, batch)?;
        // Rows are given, and the standby written, only once no program reads either as the
        // generation before last's.
        self.wait_for_readers()?;
        let new_rows: Vec<(u32, &str)> = compiled
            .rows
            .rows()
            .into_iter()
            .filter(|(row, _)| !self.stored.contains(*row))
            .collect();
        fill::take_rows(&mut self.ebpf, &new_rows, compiled.config.generation, batch)?;
        let rules_v4 = std::mem::take(&mut compiled.rules_v4);
        let rules_v6 = std::mem::take(&mut compiled.rules_v6);
        self.v4
            .write(outer(&self.ebpf, maps::RULESET_V4), slot, v4, rules_v4)?;
        self.v6
            .write(outer(&self.ebpf, maps::RULESET_V6), slot, v6, rules_v6)?;
        // The one write that puts the new rules in force.
        fill::write_config(&mut self.ebpf, compiled.config)?;

        // What follows cannot take the new rules back, so a failure is logged, not returned
        // (the caller would take the old policy for the one in force).
        let previous = self.v4.trie(old).expect("the slot in force holds a trie");
        let begun = Barrier::begin(
            outer(&self.ebpf, maps::RULESET_V4),
            old,
            previous.fd().as_fd(),
        );
        self.readers = match begun {
            Ok(barrier) => Readers::Pending(barrier),
            Err(e) => {
                tracing::warn!(error = %e, "could not begin waiting for a grace period in the background; the next change of rules will wait first");
                Readers::Unsure
            }
        };
        for (name, trie) in [
            (maps::RULES_V4, self.v4.trie(slot)),
            (maps::RULES_V6, self.v6.trie(slot)),
        ] {
            if let Some(trie) = trie
                && let Err(e) = self.repin(name, trie)
            {
                tracing::warn!(error = %e, "rules in force, but their pin still shows the previous trie");
            }
        }
        if let Err(e) = fill::free_rows(&mut self.ebpf, &self.stored.gone(&compiled.rows), batch) {
            tracing::warn!(error = %e, "rules in force; the rows of rules that left stay named until the next change");
        }
        tracing::debug!(
            generation = compiled.config.generation,
            rules = compiled.rows.len(),
            "rules in force"
        );
        self.generation = compiled.config.generation;
        self.row_limit = compiled.config.row_limit;
        self.stored = self
            .stored
            .after(&compiled.rows, compiled.config.generation);
        self.rows = std::sync::Arc::new(compiled.rows);
        Ok(())
    }

    /// Returns once no program run that read the generation before the one in force is still
    /// going, so that its slot may be written: waits for the last change's [`Barrier`], or
    /// waits for a grace period here if it could not be begun or failed.
    ///
    /// # Errors
    /// The wait here failed too: writing the standby slot could change rules a program is
    /// still reading, so the change is refused.
    fn wait_for_readers(&mut self) -> Result<(), LoadError> {
        match std::mem::take(&mut self.readers) {
            Readers::Gone => return Ok(()),
            Readers::Pending(barrier) => match barrier.wait() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "the background wait for a grace period failed; waiting again");
                }
            },
            Readers::Unsure => {}
        }
        // Re-putting the trie in force in its own slot changes nothing and waits the same.
        let now = slot_of(self.generation);
        let trie = self.v4.trie(now).expect("the slot in force holds a trie");
        sys::map_of_maps_set(
            outer(&self.ebpf, maps::RULESET_V4),
            now as u32,
            trie.fd().as_fd(),
        )
        .map_err(|e| {
            self.readers = Readers::Unsure;
            map_err(maps::RULESET_V4, "waiting for a grace period after writing")(syscall_error(
                "bpf_map_update_elem",
                e,
            ))
        })
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

/// The map-of-maps `name` (`RULESET_V4` or `RULESET_V6`) of `ebpf`.
fn outer<'a>(ebpf: &'a aya::Ebpf, name: &'static str) -> BorrowedFd<'a> {
    map_fd(ebpf.map(name).expect("object has the rule set"))
}

/// Where the new trie `name` is pinned before it is renamed over the pin `name` (bpffs refuses
/// names with a dot).
pub(super) fn temporary_pin(name: &str) -> String {
    format!("{name}_NEW")
}

/// A new trie like `model` (type, capacity, BTF), holding `entries`; `progress`: log the fill's
/// progress.
fn new_trie<K: aya::Pod>(
    (name, model): (&'static str, BorrowedFd<'_>),
    entries: &[(u32, K, RuleValue)],
    batch: bool,
    progress: bool,
) -> Result<MapData, LoadError> {
    let fd = sys::map_create_like(model, name)
        .map_err(|e| map_err(name, "creating")(syscall_error("bpf_map_create", e)))?;
    let data = MapData::from_fd(fd).map_err(map_err(name, "opening"))?;
    let mut map = Map::LpmTrie(data);
    fill::fill_trie(&mut map, name, entries, batch, progress)?;
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
                    Op::Put { prefix, key, value } => {
                        state.insert((prefix, key), value);
                    }
                    Op::Delete { prefix, key } => {
                        assert!(
                            state.remove(&(prefix, key)).is_some(),
                            "{op:?} removes a key"
                        );
                    }
                }
                check(&state, step);
            }
            assert_eq!(state, after, "the delta ends at the new rules");
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
                },
                Op::Delete {
                    prefix: 16,
                    key: [10, 2],
                },
            ]
        );
    }
}
