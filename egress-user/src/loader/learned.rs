//! The addresses DNS answers taught (`LEARNED_V4`/`LEARNED_V6`): written by the agent's DNS
//! path before an answer reaches the workload that asked, read by the connect and sendmsg
//! programs when no rule key allows a destination, kept across generations and agent restarts
//! (the maps are pinned with the shared ones).
//!
//! An entry is `(scope id, port, protocol, address) -> (expiry, rule hash, row)`. The scope id
//! is stable ([`crate::compile::stable_scope_id`]), so a new generation that numbers its scopes
//! differently reads the same entries for the same namespaces. An entry stays valid while the
//! FQDN rule that allowed it is in force unchanged (same name and pattern, [`Learned::rule_hash`]),
//! with that port, for that scope, and until it expires.
//!
//! Every write, and every generation swap, happens under one lock per pin directory
//! ([`InForce`]): a swap first removes the entries the new policy no longer allows, then
//! switches the programs, then publishes the new FQDN rules to the DNS path, all under the
//! lock, so no entry of a removed rule can be written or survive past the swap.

use std::{
    collections::HashMap as StdHashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::Duration,
};

use aya::maps::{HashMap, MapData};
use egress_common::{Learned, LearnedKeyV4, LearnedKeyV6, PROTO_TCP, PROTO_UDP, XDP_LEARNED, maps};

use super::{LoadError, PinDir, error::map_err};
use crate::{
    compile::{NameEntry, stable_scope_id},
    policy::{MIN_LEARNED_TTL, Protocol},
};

/// The FQDN rules in force on one pin directory, as the DNS path applies them.
#[derive(Clone, Debug, Default)]
pub struct NamesInForce {
    /// The FQDN rules.
    pub names: Vec<NameEntry>,
    /// The namespaces with rules of their own (scopes), sorted.
    pub scopes: Vec<String>,
    /// The aliases' names, which the DNS path answers itself.
    pub aliases: Vec<crate::compile::AliasName>,
}

impl NamesInForce {
    /// Whether an entry `(scope_id, port, proto)` with `hash` may stay: the rule of that hash
    /// is in force, has that port and protocol, and applies to that scope (or the entry is
    /// the XDP backstop's copy).
    fn allows(&self, scope_id: u64, port: u16, proto: u8, hash: u64) -> bool {
        self.names.iter().any(|rule| {
            rule.hash == hash
                && has_port(rule, port, proto)
                && (scope_id == XDP_LEARNED
                    || match &rule.scope {
                        None => scope_id == 0 || self.scope_ids().any(|id| id == scope_id),
                        Some(ns) => scope_id == stable_scope_id(Some(ns)),
                    })
        })
    }

    fn scope_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.scopes.iter().map(|ns| stable_scope_id(Some(ns)))
    }
}

/// Whether `rule` has `port` (network byte order) over `proto`.
fn has_port(rule: &NameEntry, port: u16, proto: u8) -> bool {
    let port = u16::from_be(port);
    rule.ports
        .iter()
        .any(|p| proto_number(p.protocol) == proto && p.ports().contains(&port))
}

fn proto_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

/// What the lock of a pin directory guards: the FQDN rules in force there.
type Guarded = Arc<Mutex<NamesInForce>>;

/// The lock and the rules in force, per pin directory (one agent has one; tests run many).
fn registry() -> &'static Mutex<StdHashMap<PathBuf, Guarded>> {
    static REGISTRY: OnceLock<Mutex<StdHashMap<PathBuf, Guarded>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The lock of the pin directory `pins`.
pub struct InForce(Guarded);

impl InForce {
    /// The lock of `pin_dir`.
    pub fn of(pin_dir: &Path) -> Self {
        let mut registry = registry().lock().unwrap_or_else(|e| e.into_inner());
        Self(registry.entry(pin_dir.to_owned()).or_default().clone())
    }

    /// Takes the lock.
    pub fn lock(&self) -> MutexGuard<'_, NamesInForce> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock itself, for a caller that decides how to wait for it.
    pub fn mutex(&self) -> &Mutex<NamesInForce> {
        &self.0
    }
}

/// The pinned learned-address maps of a pin directory, opened.
pub struct LearnedMaps {
    v4: HashMap<MapData, LearnedKeyV4, Learned>,
    v6: HashMap<MapData, LearnedKeyV6, Learned>,
}

/// How many entries a sweep or a revocation looked at and removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Entries left.
    pub kept: usize,
    /// Entries removed because they expired.
    pub expired: usize,
    /// Entries removed because the policy no longer allows them.
    pub revoked: usize,
}

impl LearnedMaps {
    /// Opens the pinned maps of `pins`.
    ///
    /// # Errors
    /// A map is not pinned (no generation was ever applied there) or cannot be opened.
    pub fn open(pins: &PinDir) -> Result<Self, LoadError> {
        let open = |name: &'static str| {
            MapData::from_pin(pins.map(name)).map_err(map_err(name, "opening the pinned"))
        };
        let v4 = HashMap::try_from(aya::maps::Map::HashMap(open(maps::LEARNED_V4)?))
            .map_err(map_err(maps::LEARNED_V4, "opening"))?;
        let v6 = HashMap::try_from(aya::maps::Map::HashMap(open(maps::LEARNED_V6)?))
            .map_err(map_err(maps::LEARNED_V6, "opening"))?;
        Ok(Self { v4, v6 })
    }

    /// Allows `addr` on every port of `rule` for the scope `scope_id` (and, with `xdp`, for
    /// the XDP backstop) until `ttl` (at least [`MIN_LEARNED_TTL`]) from now. Returns the
    /// number of entries written.
    ///
    /// # Errors
    /// A map is full or cannot be written; the entries written before stay (each is a valid
    /// allowance on its own), and the caller must not release the answer.
    pub fn allow(
        &mut self,
        scope_id: u64,
        xdp: bool,
        rule: &NameEntry,
        addr: IpAddr,
        ttl: Duration,
    ) -> Result<usize, LoadError> {
        let expires_ns = monotonic_ns()
            .saturating_add(u64::try_from(ttl.max(MIN_LEARNED_TTL).as_nanos()).unwrap_or(u64::MAX));
        let value = Learned {
            expires_ns,
            rule_hash: rule.hash,
            row: rule.row,
            _pad: 0,
        };
        let ids: &[u64] = if xdp && scope_id != XDP_LEARNED {
            &[scope_id, XDP_LEARNED]
        } else {
            &[scope_id]
        };
        let mut written = 0;
        for port in &rule.ports {
            let proto = proto_number(port.protocol);
            for p in port.ports() {
                for &scope_id in ids {
                    self.insert(scope_id, p.to_be(), proto, addr, value)?;
                    written += 1;
                }
            }
        }
        Ok(written)
    }

    fn insert(
        &mut self,
        scope_id: u64,
        port: u16,
        proto: u8,
        addr: IpAddr,
        value: Learned,
    ) -> Result<(), LoadError> {
        match addr {
            IpAddr::V4(v4) => {
                let key = LearnedKeyV4 {
                    scope_id,
                    port,
                    proto,
                    _pad: 0,
                    addr: v4.octets(),
                };
                self.v4
                    .insert(key, value, 0)
                    .map_err(map_err(maps::LEARNED_V4, "writing"))
            }
            IpAddr::V6(v6) => {
                let key = LearnedKeyV6 {
                    scope_id,
                    port,
                    proto,
                    _pad: 0,
                    addr: v6.octets(),
                    _pad2: 0,
                };
                self.v6
                    .insert(key, value, 0)
                    .map_err(map_err(maps::LEARNED_V6, "writing"))
            }
        }
    }

    /// Removes the entries that expired (when `expire`) and those `names` does not allow.
    ///
    /// # Errors
    /// An entry cannot be removed.
    pub fn sweep(&mut self, names: &NamesInForce, expire: bool) -> Result<Swept, LoadError> {
        let now = monotonic_ns();
        let mut swept = Swept::default();
        let mut judge = |scope_id, port, proto, value: &Learned| {
            if expire && value.expires_ns <= now {
                swept.expired += 1;
                false
            } else if !names.allows(scope_id, port, proto, value.rule_hash) {
                swept.revoked += 1;
                false
            } else {
                swept.kept += 1;
                true
            }
        };
        let gone_v4: Vec<LearnedKeyV4> = self
            .v4
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| !judge(k.scope_id, k.port, k.proto, v))
            .map(|(k, _)| k)
            .collect();
        let gone_v6: Vec<LearnedKeyV6> = self
            .v6
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| !judge(k.scope_id, k.port, k.proto, v))
            .map(|(k, _)| k)
            .collect();
        for key in gone_v4 {
            remove_missing_ok(self.v4.remove(&key), maps::LEARNED_V4)?;
        }
        for key in gone_v6 {
            remove_missing_ok(self.v6.remove(&key), maps::LEARNED_V6)?;
        }
        Ok(swept)
    }

    /// Every entry, for `egress maps` and tests: (scope id, port in host order, protocol,
    /// address, value).
    pub fn entries(&self) -> Vec<(u64, u16, u8, IpAddr, Learned)> {
        let v4 = self.v4.iter().filter_map(Result::ok).map(|(k, v)| {
            (
                k.scope_id,
                u16::from_be(k.port),
                k.proto,
                IpAddr::from(k.addr),
                v,
            )
        });
        let v6 = self.v6.iter().filter_map(Result::ok).map(|(k, v)| {
            (
                k.scope_id,
                u16::from_be(k.port),
                k.proto,
                IpAddr::from(k.addr),
                v,
            )
        });
        v4.chain(v6).collect()
    }
}

/// A removal that found the entry already gone (expired and removed by another sweep) is
/// not an error.
fn remove_missing_ok(
    result: Result<(), aya::maps::MapError>,
    name: &'static str,
) -> Result<(), LoadError> {
    match result {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(map_err(name, "removing from")(e)),
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`, which the programs
/// compare [`Learned::expires_ns`] with.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}
