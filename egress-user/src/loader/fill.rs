//! Writing a generation into its fresh maps (in batches where the kernel has them, with
//! progress for long fills), giving and freeing counter rows, reading the row table back, and
//! pinning the generation's maps.

use std::{io, os::fd::AsFd as _, path::PathBuf};

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, MapData, PerCpuArray, PerCpuValues, lpm_trie::Key},
    util::nr_cpus,
};
use egress_common::{
    Config, FIRST_RULE_ROW, RuleCounters, RuleInfo, RuleKeyV4, RuleKeyV6, RuleValue, maps,
};

use super::{
    LoadError, PinDir,
    error::{map_err, remove_pin},
    sys,
};
use crate::compile::{self, Compiled, RowTable, StoredRows};

/// The pinned `CONFIG` of the generation in force, if any.
pub(super) fn previous_config(pins: &PinDir) -> Option<Config> {
    let data = MapData::from_pin(pins.map(maps::CONFIG)).ok()?;
    let config: Array<_, Config> = Array::try_from(aya::maps::Map::Array(data)).ok()?;
    config.get(&0, 0).ok()
}

/// Reads the row table back from `RULE_INFO`, rows below `limit`, in one batch: one lookup
/// per row took 7 ms of a 10,000-rule reload.
pub(super) fn read_rule_info(
    ebpf: &Ebpf,
    limit: u32,
    batch: bool,
) -> Result<StoredRows, LoadError> {
    let map = ebpf.map(maps::RULE_INFO).expect("object has RULE_INFO");
    Ok(RowTable::from_rule_info(rule_info_rows(map, limit, batch)?))
}

/// The `RULE_INFO` rows from [`FIRST_RULE_ROW`] to below `limit` of `map`, named or free:
/// for [`read_rule_info`] and for `egress maps`, which reads the pin. `batch`: the kernel has
/// batch map operations.
pub(super) fn rule_info_rows(
    map: &aya::maps::Map,
    limit: u32,
    batch: bool,
) -> Result<Vec<(u32, RuleInfo)>, LoadError> {
    // Checks the map's key and value sizes against RuleInfo.
    let _: Array<_, RuleInfo> =
        Array::try_from(map).map_err(map_err(maps::RULE_INFO, "opening"))?;
    let mut infos = vec![RuleInfo::default(); limit.saturating_sub(FIRST_RULE_ROW) as usize];
    if batch {
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
pub(super) fn map_fd(map: &aya::maps::Map) -> std::os::fd::BorrowedFd<'_> {
    use aya::maps::Map;
    match map {
        Map::Array(data)
        | Map::LpmTrie(data)
        | Map::PerCpuArray(data)
        | Map::HashMap(data)
        | Map::ArrayOfMaps(data) => data.fd().as_fd(),
        other => unreachable!("no batch operations on {other:?}"),
    }
}

/// A failed bpf(2) call, as aya reports its own.
pub(super) fn syscall_error(call: &'static str, io_error: io::Error) -> aya::maps::MapError {
    aya::maps::MapError::SyscallError(aya::sys::SyscallError { call, io_error })
}

/// Writes every entry of a generation into its (fresh, unreferenced) maps; `batch`: the kernel
/// has batch map operations.
pub(super) fn fill_generation(ebpf: &mut Ebpf, c: &Compiled, batch: bool) -> Result<(), LoadError> {
    write_config(ebpf, c.config)?;
    fill_scopes(ebpf, &c.scoped_cgroups)?;
    fill_set(
        ebpf,
        maps::SOCK_PROTOS,
        c.sock_protos.iter().map(|&p| u32::from(p)),
    )?;
    let mut slots: Array<_, egress_common::DnsSlot> =
        Array::try_from(ebpf.map_mut(maps::DNS_SLOTS).expect("object has DNS_SLOTS"))
            .map_err(map_err(maps::DNS_SLOTS, "opening"))?;
    for (i, slot) in c.dns_slots.iter().enumerate() {
        slots
            .set(i as u32, *slot, 0)
            .map_err(map_err(maps::DNS_SLOTS, "writing"))?;
    }
    let mut ids: Array<_, u64> =
        Array::try_from(ebpf.map_mut(maps::SCOPE_IDS).expect("object has SCOPE_IDS"))
            .map_err(map_err(maps::SCOPE_IDS, "opening"))?;
    for &(scope, id) in &c.scope_ids {
        ids.set(scope, id, 0)
            .map_err(map_err(maps::SCOPE_IDS, "writing"))?;
    }
    fill_lpm::<RuleKeyV4, RuleValue>(ebpf, maps::RULES_V4, &c.rules_v4, batch)?;
    fill_lpm::<RuleKeyV6, RuleValue>(ebpf, maps::RULES_V6, &c.rules_v6, batch)?;
    for (ruleset, rules) in [
        (maps::RULESET_V4, maps::RULES_V4),
        (maps::RULESET_V6, maps::RULES_V6),
    ] {
        let rules = map_fd(ebpf.map(rules).expect("object has the rule trie"));
        let outer = map_fd(ebpf.map(ruleset).expect("object has the rule set"));
        let slot = super::rules::slot_of(c.config.generation) as u32;
        sys::map_of_maps_set(outer, slot, rules).map_err(|io_error| {
            map_err(ruleset, "writing")(syscall_error("bpf_map_update_elem", io_error))
        })?;
    }
    fill_lpm::<[u8; 4], u32>(ebpf, maps::BYPASS_V4, &c.bypass_v4, batch)?;
    fill_lpm::<[u8; 16], u32>(ebpf, maps::BYPASS_V6, &c.bypass_v6, batch)?;
    Ok(())
}

/// Writes the one `CONFIG` entry.
pub(super) fn write_config(ebpf: &mut Ebpf, value: Config) -> Result<(), LoadError> {
    let mut config: Array<_, Config> =
        Array::try_from(ebpf.map_mut(maps::CONFIG).expect("object has CONFIG"))
            .map_err(map_err(maps::CONFIG, "opening"))?;
    config
        .set(0, value, 0)
        .map_err(map_err(maps::CONFIG, "writing"))
}

/// Sets 1 at each of `indexes` in the array `name`, a set of ports or protocols.
fn fill_set(
    ebpf: &mut Ebpf,
    name: &'static str,
    indexes: impl IntoIterator<Item = u32>,
) -> Result<(), LoadError> {
    let map = ebpf.map_mut(name).expect("object has the map");
    let mut set: Array<_, u32> = Array::try_from(map).map_err(map_err(name, "opening"))?;
    for index in indexes {
        set.set(index, 1, 0).map_err(map_err(name, "writing"))?;
    }
    Ok(())
}

/// Writes the pods' scopes into a generation's `SCOPES`, and removes the entries of cgroups
/// not among them: the map holds exactly `entries` afterwards.
pub(super) fn fill_scopes(ebpf: &mut Ebpf, entries: &[(u64, u32)]) -> Result<(), LoadError> {
    let name = maps::SCOPES;
    if entries.len() > egress_common::MAX_SCOPED_CGROUPS as usize {
        return Err(map_err(name, "writing")(aya::maps::MapError::OutOfBounds {
            index: entries.len() as u32,
            max_entries: egress_common::MAX_SCOPED_CGROUPS,
        }));
    }
    let map = ebpf.map_mut(name).expect("object has the map");
    let mut scopes: aya::maps::HashMap<_, u64, u32> =
        aya::maps::HashMap::try_from(map).map_err(map_err(name, "opening"))?;
    let stale: Vec<u64> = scopes
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !entries.iter().any(|(cgroup, _)| cgroup == k))
        .collect();
    for (cgroup, scope) in entries {
        if scopes.get(cgroup, 0).ok() != Some(*scope) {
            scopes
                .insert(cgroup, scope, 0)
                .map_err(map_err(name, "writing"))?;
        }
    }
    for cgroup in stale {
        scopes.remove(&cgroup).map_err(map_err(name, "writing"))?;
    }
    Ok(())
}

fn fill_lpm<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(u32, K, V)],
    batch: bool,
) -> Result<(), LoadError> {
    fill_trie(
        ebpf.map_mut(name).expect("object has the map"),
        name,
        entries,
        batch,
        true,
    )
}

/// Writes `entries` into the (empty, unreferenced) LPM trie `map`, called `name` in errors
/// and progress; `progress`: log it ([`Progress`]), else one batch, silently (a fill in the
/// background).
pub(super) fn fill_trie<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::Map,
    name: &'static str,
    entries: &[(u32, K, V)],
    batch: bool,
    progress: bool,
) -> Result<(), LoadError> {
    let keys: Vec<Key<K>> = entries
        .iter()
        .map(|(prefix, key, _)| Key::new(*prefix, *key))
        .collect();
    let values: Vec<V> = entries.iter().map(|(_, _, value)| *value).collect();
    let mut progress = if progress {
        Progress::new(name, entries.len())
    } else {
        Progress::silent(name, entries.len())
    };
    if !batch {
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

    /// A fill that logs nothing, whatever its length (one made in the background).
    fn silent(map: &'static str, total: usize) -> Self {
        Self {
            next: usize::MAX,
            ..Self::new(map, total)
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
/// on those rows runs. `batch`: the kernel has batch map operations (one call for all rows
/// instead of two per row: 10,000 new rules took 20 ms one by one).
pub(super) fn take_rows(
    ebpf: &mut Ebpf,
    rows: &[(u32, &str)],
    generation: u32,
    batch: bool,
) -> Result<(), LoadError> {
    if rows.is_empty() {
        return Ok(());
    }
    let cpus = nr_cpus().map_err(|(_, source)| LoadError::Pin {
        what: "counting CPUs in",
        path: PathBuf::from("/sys/devices/system/cpu/possible"),
        source,
    })?;
    let infos: Vec<RuleInfo> = rows
        .iter()
        .map(|(_, name)| compile::rule_info(name, generation))
        .collect();
    if batch {
        let keys: Vec<u32> = rows.iter().map(|(row, _)| *row).collect();
        let zeros = vec![RuleCounters::default(); keys.len() * cpus];
        let counters = map_fd(ebpf.map(maps::COUNTERS).expect("object has COUNTERS"));
        sys::percpu_update_batch(counters, &keys, &zeros, cpus).map_err(|e| {
            map_err(maps::COUNTERS, "clearing")(syscall_error("bpf_map_update_batch", e))
        })?;
        let info = map_fd(ebpf.map(maps::RULE_INFO).expect("object has RULE_INFO"));
        return sys::map_update_batch(info, &keys, &infos).map_err(|e| {
            map_err(maps::RULE_INFO, "writing")(syscall_error("bpf_map_update_batch", e))
        });
    }
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
    for ((row, _), value) in rows.iter().zip(infos) {
        info.set(*row, value, 0)
            .map_err(map_err(maps::RULE_INFO, "writing"))?;
    }
    Ok(())
}

/// Frees the rows of rules that left the policy, after the swap: no program of the new
/// generation counts on them. `batch`: as [`take_rows`].
pub(super) fn free_rows(ebpf: &mut Ebpf, rows: &[u32], batch: bool) -> Result<(), LoadError> {
    if batch {
        let info = map_fd(ebpf.map(maps::RULE_INFO).expect("object has RULE_INFO"));
        let empty = vec![RuleInfo::default(); rows.len()];
        return sys::map_update_batch(info, rows, &empty).map_err(|e| {
            map_err(maps::RULE_INFO, "clearing")(syscall_error("bpf_map_update_batch", e))
        });
    }
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
pub(super) fn repin_generation(ebpf: &Ebpf, pins: &PinDir) -> Result<(), LoadError> {
    for name in maps::PER_GENERATION {
        let path = pins.map(name);
        remove_pin(&path, "removing old pin")?;
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
}
