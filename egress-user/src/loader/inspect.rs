//! The pinned maps, decoded: what `egress maps` prints.
//!
//! `bpftool map dump` shows the raw maps: ports in network byte order read as little-endian
//! numbers, rule names as byte arrays, and every one of the [`COUNTER_ROWS`] rows of
//! `COUNTERS` once per CPU (131,072 rows, 57 MB of JSON on a 2-CPU machine). This reads the
//! same pins and gives each rule key with its CIDR, `port/proto` and rule name, and the
//! counters of the rows in use only: the reserved rows and the rows below the generation's
//! `row_limit` that a rule owns or that counted something. It needs no running agent, only
//! the pins, like `cilium-dbg bpf ... list`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::{
    Pod,
    maps::{Array, LpmTrie, Map, MapData},
};
use egress_common::{
    COUNTER_ROWS, Config, FIRST_RULE_ROW, PROTO_TCP, PROTO_UDP, ROW_PROXY, RULE_NAME_LEN, RuleInfo,
    RuleKeyV4, RuleKeyV6, RuleValue, Stats, XDP_SCOPE, config_flags, maps, mode,
};
use serde::Serialize;

use super::{
    LoadError, PinDir, PinnedCounters, RowCount, error::map_err, features, fill::rule_info_rows,
};
use crate::compile::RESERVED_ROWS;

/// Everything `egress maps` shows, read from one pin directory.
#[derive(Debug, Serialize)]
pub struct MapsView {
    /// The pin directory read.
    pub pin_dir: String,
    /// The `CONFIG` entry.
    pub config: ConfigView,
    /// Every rule key of `RULES_V4` and `RULES_V6` but the redirects and the XDP backstop's
    /// copies (scope 255), IPv4 first, in the tries' order.
    pub rules: Vec<RuleKeyView>,
    /// `BYPASS_V4` and `BYPASS_V6`: the never-filtered ranges.
    pub bypass: Vec<String>,
    /// The ports whose unmatched connections go to the proxy in some scope (the tries' keys
    /// with the proxy's row), sorted.
    pub http_ports: Vec<u16>,
    /// `COUNTERS` rows in use, summed over CPUs.
    pub counters: Vec<CounterView>,
    /// `HOOKS`: verdicts by hook, summed over CPUs.
    pub hooks: Vec<CounterView>,
    /// `STATS`: events lost and verdicts taken on an error path.
    pub stats: StatsView,
    /// `LEARNED_V4` and `LEARNED_V6`: the addresses DNS answers taught, but the XDP
    /// backstop's copies; by scope id, address and port.
    pub learned: Vec<LearnedView>,
}

/// One learned address (FQDN rules).
#[derive(Debug, Serialize)]
pub struct LearnedView {
    /// The scope's namespace, when it is one of this generation's scopes; `-` for scope 0
    /// (the node-wide rules, host processes), or the stable id in hex for a scope the
    /// generation no longer has.
    pub scope: String,
    /// The address.
    pub destination: String,
    /// `443/tcp`.
    pub port: String,
    /// The FQDN rule owning the row in `RULE_INFO`.
    pub rule: String,
    /// Seconds until new connections to it are refused; negative once expired (the agent
    /// removes it within 10 s).
    pub expires_in_s: f64,
}

/// The `CONFIG` entry, decoded.
#[derive(Debug, Serialize)]
pub struct ConfigView {
    /// `enforce` or `audit`.
    pub mode: &'static str,
    /// The generation of the policy in the maps.
    pub generation: u32,
    /// One past the highest `COUNTERS` row this generation uses.
    pub row_limit: u32,
    /// The proxy's port (host byte order).
    pub proxy_port: u16,
    /// `events: all` in the EgressConfig.
    pub events_all: bool,
    /// `allowSockets: [raw]` in the EgressConfig.
    pub allow_raw: bool,
    /// The agent's cgroup id, whose sockets are never judged.
    pub agent_cgroup: u64,
}

/// One rule key: what it matches and the rule that owns it.
#[derive(Debug, Serialize)]
pub struct RuleKeyView {
    /// The scope: 0 for every socket, else a namespace's (the agent's `egress check` lists
    /// them).
    pub scope: u8,
    /// The destination, as a CIDR.
    pub destination: String,
    /// `443/tcp`, as `egress check` and `get` spell it.
    pub port: String,
    /// The counter row the key points to.
    pub row: u32,
    /// The rule owning that row in `RULE_INFO`.
    pub rule: String,
}

/// One counter row, summed over CPUs.
#[derive(Debug, Serialize)]
pub struct CounterView {
    /// The row (or hook number).
    pub row: u32,
    /// The rule, reserved row or hook.
    pub name: String,
    /// Allowed connections and datagrams.
    pub allowed: u64,
    /// Denied ones.
    pub denied: u64,
    /// Ones audit mode let through that enforce mode would deny.
    pub would_deny: u64,
}

/// The `STATS` entry, summed over CPUs.
#[derive(Debug, Serialize)]
pub struct StatsView {
    /// Events the ring buffer had no room for.
    pub events_lost: u64,
    /// Verdicts taken on an internal error path (denied: the programs fail closed).
    pub errors: u64,
}

/// Reads and decodes the maps pinned in `pin_dir`.
///
/// # Errors
/// A pin is missing (nothing loaded there) or not the map this version expects.
pub fn read(pin_dir: &Path) -> Result<MapsView, LoadError> {
    let pins = PinDir::new(pin_dir);
    let open = |name: &'static str| {
        MapData::from_pin(pins.map(name)).map_err(map_err(name, "opening the pin of"))
    };
    let config: Array<_, Config> = Array::try_from(Map::Array(open(maps::CONFIG)?))
        .map_err(map_err(maps::CONFIG, "opening"))?;
    let config = config
        .get(&0, 0)
        .map_err(map_err(maps::CONFIG, "reading"))?;
    let row_limit = config.row_limit.clamp(FIRST_RULE_ROW, COUNTER_ROWS);
    let names = rule_names(&rule_info_rows(
        &Map::Array(open(maps::RULE_INFO)?),
        row_limit,
        features::kernel().has(features::Id::BatchOps),
    )?);
    let name_of = |row: u32| {
        names
            .iter()
            .find(|(r, _)| *r == row)
            .map_or_else(|| format!("(row {row} has no rule)"), |(_, n)| n.clone())
    };
    let rule = |addr: IpAddr, prefix_len, port, proto, scope, RuleValue { row }| RuleKeyView {
        scope,
        destination: cidr(addr, prefix_len),
        port: port_proto(port, proto),
        row,
        rule: name_of(row),
    };
    let v4 = trie::<RuleKeyV4, RuleValue>(&pins, maps::RULES_V4)?;
    let v6 = trie::<RuleKeyV6, RuleValue>(&pins, maps::RULES_V6)?;
    let keys: Vec<RuleKeyView> = v4
        .into_iter()
        .map(|(len, k, v)| {
            rule(
                Ipv4Addr::from(k.addr).into(),
                len,
                k.port,
                k.proto,
                k.scope,
                v,
            )
        })
        .chain(v6.into_iter().map(|(len, k, v)| {
            rule(
                Ipv6Addr::from(k.addr).into(),
                len,
                k.port,
                k.proto,
                k.scope,
                v,
            )
        }))
        .filter(|k| k.scope != XDP_SCOPE)
        .collect();
    let (redirects, rules): (Vec<RuleKeyView>, Vec<RuleKeyView>) =
        keys.into_iter().partition(|k| k.row == ROW_PROXY);
    let mut http_ports: Vec<u16> = redirects
        .iter()
        .filter_map(|k| k.port.split_once('/').and_then(|(p, _)| p.parse().ok()))
        .collect();
    http_ports.sort_unstable();
    http_ports.dedup();
    let b4 = trie::<[u8; 4], u32>(&pins, maps::BYPASS_V4)?;
    let b6 = trie::<[u8; 16], u32>(&pins, maps::BYPASS_V6)?;
    let bypass = b4
        .into_iter()
        .map(|(len, addr, _)| format!("{}/{len}", Ipv4Addr::from(addr)))
        .chain(
            b6.into_iter()
                .map(|(len, addr, _)| format!("{}/{len}", Ipv6Addr::from(addr))),
        )
        .collect();

    // Every row below the limit, so that a row still counting after its rule went (or a
    // reserved row) is not hidden; only rows with a rule or a count are listed.
    let mut rows: Vec<(u32, String)> = RESERVED_ROWS
        .iter()
        .map(|(row, name)| (*row, (*name).to_owned()))
        .collect();
    rows.extend((FIRST_RULE_ROW..row_limit).map(|row| (row, name_of(row))));
    let counted = PinnedCounters::open(pin_dir)?;
    let counters = counted
        .rows(&rows)?
        .into_iter()
        .filter(|c| {
            c.row < FIRST_RULE_ROW
                || names.iter().any(|(r, _)| *r == c.row)
                || c.counters.allowed + c.counters.denied + c.counters.would_deny > 0
        })
        .map(counter_view)
        .collect();
    let hooks = counted.hooks()?.into_iter().map(counter_view).collect();
    let Stats {
        events_lost,
        errors,
    } = counted.stats()?;
    let learned = learned_view(&pins, &name_of)?;
    Ok(MapsView {
        pin_dir: pin_dir.display().to_string(),
        config: ConfigView {
            mode: if config.mode == mode::AUDIT {
                "audit"
            } else {
                "enforce"
            },
            generation: config.generation,
            row_limit: config.row_limit,
            proxy_port: u16::from_be(config.proxy_port),
            events_all: config.flags & config_flags::EVENTS_ALL != 0,
            allow_raw: config.flags & config_flags::ALLOW_RAW != 0,
            agent_cgroup: config.agent_cgroup,
        },
        rules,
        bypass,
        http_ports,
        counters,
        hooks,
        stats: StatsView {
            events_lost,
            errors,
        },
        learned,
    })
}

/// The learned addresses, by scope, address and port. The maps hold scopes by stable id only
/// (a hash of the namespace), so a scope other than 0 shows its id in hex.
fn learned_view(
    pins: &PinDir,
    name_of: &dyn Fn(u32) -> String,
) -> Result<Vec<LearnedView>, LoadError> {
    if !pins.map(maps::LEARNED_V4).exists() {
        return Ok(Vec::new());
    }
    let now = super::learned::monotonic_ns();
    let mut learned: Vec<LearnedView> = super::learned::LearnedMaps::open(pins)?
        .entries()
        .into_iter()
        .filter(|(scope, ..)| *scope != egress_common::XDP_LEARNED)
        .map(|(scope, port, proto, addr, value)| LearnedView {
            scope: if scope == 0 {
                "-".to_owned()
            } else {
                format!("{scope:016x}")
            },
            destination: addr.to_string(),
            port: port_proto(port.to_be(), proto),
            rule: name_of(value.row),
            expires_in_s: (value.expires_ns as f64 - now as f64) / 1e9,
        })
        .collect();
    learned.sort_by(|a, b| {
        (&a.scope, &a.destination, &a.port).cmp(&(&b.scope, &b.destination, &b.port))
    });
    Ok(learned)
}

/// Every entry of the LPM trie pinned as `name`, in the trie's order, as (prefix length, key
/// data, value).
fn trie<K: Pod, V: Pod>(pins: &PinDir, name: &'static str) -> Result<Vec<(u32, K, V)>, LoadError> {
    let pin = MapData::from_pin(pins.map(name)).map_err(map_err(name, "opening the pin of"))?;
    let trie: LpmTrie<_, K, V> =
        LpmTrie::try_from(Map::LpmTrie(pin)).map_err(map_err(name, "opening"))?;
    trie.iter()
        .map(|entry| {
            let (key, value) = entry.map_err(map_err(name, "reading"))?;
            Ok((key.prefix_len(), key.data(), value))
        })
        .collect()
}

/// The names of the rows a rule owns. A name longer than [`RULE_NAME_LEN`] bytes is stored
/// cut: it is shown cut, with `...`.
fn rule_names(rows: &[(u32, RuleInfo)]) -> Vec<(u32, String)> {
    rows.iter()
        .filter(|(_, info)| info.name_len != 0)
        .map(|(row, info)| {
            let len = (info.name_len as usize).min(RULE_NAME_LEN);
            let mut name = String::from_utf8_lossy(&info.name[..len]).into_owned();
            if info.name_len as usize > RULE_NAME_LEN {
                name.push_str("...");
            }
            (*row, name)
        })
        .collect()
}

/// `192.0.2.0/24` from a rule key's address and its LPM prefix length, which counts the
/// port, protocol and pad bits before the address.
fn cidr(addr: IpAddr, prefix_len: u32) -> String {
    format!(
        "{addr}/{}",
        prefix_len.saturating_sub(egress_common::KEY_PREFIX_BITS)
    )
}

/// `443/tcp` from a key's port (network byte order) and protocol.
fn port_proto(port: u16, proto: u8) -> String {
    let proto = match proto {
        PROTO_TCP => "tcp".to_owned(),
        PROTO_UDP => "udp".to_owned(),
        other => format!("proto{other}"),
    };
    format!("{}/{proto}", u16::from_be(port))
}

fn counter_view(count: RowCount) -> CounterView {
    CounterView {
        row: count.row,
        name: count.name,
        allowed: count.counters.allowed,
        denied: count.counters.denied,
        would_deny: count.counters.would_deny,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_as_a_user_writes_them() {
        assert_eq!(port_proto(443u16.to_be(), PROTO_TCP), "443/tcp");
        assert_eq!(port_proto(53u16.to_be(), PROTO_UDP), "53/udp");
        assert_eq!(
            cidr(Ipv4Addr::new(192, 0, 2, 0).into(), 32 + 24),
            "192.0.2.0/24"
        );
    }

    #[test]
    fn a_cut_name_says_so_and_free_rows_have_none() {
        let mut info = RuleInfo {
            name_len: 70,
            ..RuleInfo::default()
        };
        info.name.fill(b'a');
        let named = rule_names(&[(3, info), (4, RuleInfo::default())]);
        assert_eq!(named.len(), 1);
        assert_eq!(named[0].1, format!("{}...", "a".repeat(64)));
    }
}
