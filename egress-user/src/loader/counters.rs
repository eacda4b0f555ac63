//! Reading the counters that outlive generations: per rule row, per hook, and the programs'
//! own health, summed over CPUs.

use std::path::Path;

use aya::maps::{MapData, PerCpuArray};
use egress_common::{RuleCounters, Stats, maps};

use super::{LoadError, PinDir, error::map_err, events};

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

/// The rows of `HOOKS`, named as events name the hooks.
pub(super) fn hook_rows() -> Vec<(u32, String)> {
    events::Hook::ALL
        .iter()
        .zip(0..)
        .map(|(hook, row)| (row, hook.to_string()))
        .collect()
}

/// Per-CPU counters of `rows`, summed.
pub(super) fn sum_rows<T: std::borrow::Borrow<MapData>>(
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
pub(super) fn sum_stats<T: std::borrow::Borrow<MapData>>(
    stats: &PerCpuArray<T, Stats>,
) -> Result<Stats, LoadError> {
    let per_cpu = stats.get(&0, 0).map_err(map_err(maps::STATS, "reading"))?;
    Ok(per_cpu.iter().fold(Stats::default(), |a, s| Stats {
        events_lost: a.events_lost + s.events_lost,
        errors: a.errors + s.errors,
    }))
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
