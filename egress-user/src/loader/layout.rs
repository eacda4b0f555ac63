//! The layout of the maps that outlive generations, checked before an earlier agent's pins
//! are reused.

use aya::maps::{MapInfo, MapType};
use egress_common::{
    COUNTER_ROWS, EVENTS_BYTES, Learned, LearnedKeyV4, LearnedKeyV6, MAX_LEARNED, MAX_REDIRECTS,
    OrigDst, PeerKey, ProxyMark, RuleCounters, RuleInfo, Stats, hook, maps,
};

use super::{LoadError, PinDir, error::map_err};

/// A map's layout as the kernel reports it: type, key size, value size, max entries.
type Layout = (MapType, u32, u32, u32);

/// The layout of a map of type `map_type` with keys `K`, values `V` and `max_entries`.
const fn layout<K, V>(map_type: MapType, max_entries: u32) -> Layout {
    (
        map_type,
        size_of::<K>() as u32,
        size_of::<V>() as u32,
        max_entries,
    )
}

/// The layout each shared map must have to be reused. Arrays are keyed by a `u32` index,
/// `ORIG_BY_COOKIE` by the `u64` socket cookie, socket storage by a socket fd (`u32`).
fn expected_layout(name: &str) -> Layout {
    match name {
        maps::COUNTERS => layout::<u32, RuleCounters>(MapType::PerCpuArray, COUNTER_ROWS),
        maps::RULE_INFO => layout::<u32, RuleInfo>(MapType::Array, COUNTER_ROWS),
        maps::STATS => layout::<u32, Stats>(MapType::PerCpuArray, 1),
        maps::EVENTS => (MapType::RingBuf, 0, 0, EVENTS_BYTES),
        maps::ORIG_BY_COOKIE => layout::<u64, OrigDst>(MapType::LruHash, MAX_REDIRECTS),
        maps::ORIG_BY_PEER => layout::<PeerKey, OrigDst>(MapType::LruHash, MAX_REDIRECTS),
        maps::HOOKS => layout::<u32, RuleCounters>(MapType::PerCpuArray, hook::COUNT),
        maps::PROXY_LISTEN => layout::<u32, ProxyMark>(MapType::SkStorage, 0),
        maps::LEARNED_V4 => layout::<LearnedKeyV4, Learned>(MapType::Hash, MAX_LEARNED),
        maps::LEARNED_V6 => layout::<LearnedKeyV6, Learned>(MapType::Hash, MAX_LEARNED),
        other => unreachable!("{other} is not a shared map"),
    }
}

/// Refuses to reuse a pinned map whose type or sizes differ from this build's.
pub(super) fn check_shared_pins(pins: &PinDir) -> Result<(), LoadError> {
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
