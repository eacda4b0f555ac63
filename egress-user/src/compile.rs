//! Compiles a validated [`Policy`] into the exact entries the kernel maps will hold.
//!
//! Compilation is pure: it either produces every entry of a generation or fails before
//! anything is written, so a policy the kernel cannot hold (too many rules, too many bypass
//! ranges) is rejected whole and the running policy stays.
//!
//! Counter rows are stable: a rule keeps its row (and so its counters) across reloads and agent
//! restarts for as long as its name stays in the policy. The row table lives in the pinned
//! `RULE_INFO` map, read back by the loader into a [`RowTable`].
//!
//! The policy's DNS resolvers become one more rule, [`DNS_RULE_NAME`], after the user's: its
//! keys allow port 53 over udp and tcp to each resolver, and it gets a row like any rule (only
//! when there is a resolver), so its counters survive reloads too.

#![forbid(unsafe_code)]

use std::{borrow::Cow, collections::hash_map::Entry, sync::Arc};

// foldhash, not SipHash: hashing rule names and keys was a seventh of a 10,000-rule reload.
use foldhash::{HashMap, HashMapExt as _};

use egress_common::{
    AF_INET, AF_INET6, COUNTER_ROWS, Config, DNS_PORT, DnsSlot, FIRST_RULE_ROW, KEY_PREFIX_BITS,
    MAX_BYPASS, MAX_RESOLVERS, MAX_RULE_KEYS, PROTO_TCP, PROTO_UDP, ROW_BYPASS, ROW_NO_RULE,
    ROW_PROXY, RULE_NAME_LEN, RuleInfo, RuleKeyV4, RuleKeyV6, RuleValue, XDP_LEARNED, config_flags,
    fnv1a64, mode,
};
use ipnet::IpNet;

use crate::policy::{
    DNS_LISTEN_PORT, Events, HostPattern, Mode, Policy, PortRule, Protocol, judged_as, port_span,
    scoped_name,
};

use egress_common::{MAX_SCOPES, XDP_SCOPE};

/// The row name of the implicit rule that allows DNS to the policy's resolvers. No EgressRule
/// can be named so (names are DNS subdomains), so it never clashes with one.
pub const DNS_RULE_NAME: &str = "(dns)";

/// The name shown for [`ROW_NO_RULE`]: connections no rule allowed (and, in the proxy,
/// requests no rule allowed).
pub const NO_RULE_NAME: &str = "(no rule)";
/// The name shown for [`ROW_BYPASS`].
pub const BYPASS_NAME: &str = "(bypass)";
/// The name shown for [`ROW_PROXY`].
pub const PROXY_NAME: &str = "(proxy)";

/// The rows no rule owns, with their names, in row order. Like [`DNS_RULE_NAME`], the names
/// are in parentheses, which no rule name can have.
pub const RESERVED_ROWS: [(u32, &str); 3] = [
    (ROW_NO_RULE, NO_RULE_NAME),
    (ROW_BYPASS, BYPASS_NAME),
    (ROW_PROXY, PROXY_NAME),
];

/// The name of `row` if it is a reserved row.
pub fn reserved_row_name(row: u32) -> Option<&'static str> {
    RESERVED_ROWS
        .iter()
        .find(|(r, _)| *r == row)
        .map(|(_, name)| *name)
}

/// Why a valid policy cannot be put into the kernel maps.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// More rules than counter rows.
    #[error("the policy has {rules} rules; at most {max} fit in the kernel maps")]
    TooManyRules {
        /// Rules in the policy.
        rules: usize,
        /// The limit.
        max: u32,
    },
    /// More (destination, port) keys than the rule tries hold.
    #[error("the policy needs {keys} {family} rule keys; at most {max} fit")]
    TooManyKeys {
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// Keys needed.
        keys: usize,
        /// The limit.
        max: u32,
    },
    /// A rule's ports took the rule keys past what the tries hold: each port of a range is a
    /// key, in each scope the rule is in.
    #[error(
        "rule `{rule}` ({origin}): ports {ports} take the policy past {max} rule keys (a \
         range needs one key per port, destination and scope, here {scopes} scopes); \
         narrow the range or the scopes it is in"
    )]
    RangeTooWide {
        /// The rule, as named in counters.
        rule: String,
        /// Where it is (`file:line`).
        origin: String,
        /// The entry that crossed the limit, `8000-8999/tcp`.
        ports: String,
        /// How many scopes its keys go into.
        scopes: usize,
        /// The limit.
        max: u32,
    },
    /// More namespaces with rules of their own than a rule key's scope can tell apart.
    #[error("the policy has rules in {scopes} namespaces; at most {max} can have their own")]
    TooManyScopes {
        /// Namespaces with rules.
        scopes: usize,
        /// The limit.
        max: u8,
    },
    /// More bypass ranges than the bypass tries hold.
    #[error("the policy has {ranges} {family} bypass ranges; at most {max} fit")]
    TooManyBypass {
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// Ranges in the policy.
        ranges: usize,
        /// The limit.
        max: u32,
    },
}

/// One LPM trie entry: prefix length in bits, key data, value.
pub type LpmEntry<K, V> = (u32, K, V);

/// Everything one policy generation writes into the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// The `CONFIG` entry.
    pub config: Config,
    /// `RULES_V4` entries.
    pub rules_v4: Vec<LpmEntry<RuleKeyV4, RuleValue>>,
    /// `RULES_V6` entries.
    pub rules_v6: Vec<LpmEntry<RuleKeyV6, RuleValue>>,
    /// `BYPASS_V4` entries.
    pub bypass_v4: Vec<LpmEntry<[u8; 4], u32>>,
    /// `BYPASS_V6` entries.
    pub bypass_v6: Vec<LpmEntry<[u8; 16], u32>>,
    /// Ports (host byte order) whose connections go to the proxy in some scope: every port of
    /// an HTTP rule or alias, sorted, without duplicates. The kernel redirects by the rule
    /// keys with [`ROW_PROXY`] (one per scope and port), not by this list.
    pub http_ports: Vec<u16>,
    /// The policy's scopes: the namespaces with rules of their own, sorted; the scope id of
    /// `scopes[i]` is `i + 1` (0 is the node-wide rules only).
    pub scopes: Vec<String>,
    /// `SCOPES` entries: the cgroup id of each pod of a scope's namespace, with the scope id
    /// (see [`scoped_cgroups`]); set by the caller, who knows the pods.
    pub scoped_cgroups: Vec<(u64, u32)>,
    /// Protocol numbers whose `SOCK_PROTOS` entry is 1 (EgressConfig `allowSockets`), sorted,
    /// without duplicates; TCP and UDP are never among them (always allowed).
    pub sock_protos: Vec<u16>,
    /// The row table after this generation: which rule owns each row.
    pub rows: RowTable,
    /// Rules whose every key was already taken by an earlier rule: they can never match.
    pub shadowed: Vec<Shadowed>,
    /// `DNS_SLOTS` entries: the resolvers whose queries go to the agent's DNS listeners (none
    /// without FQDN rules).
    pub dns_slots: Vec<DnsSlot>,
    /// `SCOPE_IDS` entries (scope, stable id), every scope of this generation and
    /// [`XDP_SCOPE`].
    pub scope_ids: Vec<(u32, u64)>,
    /// The FQDN rules, for the agent's DNS path.
    pub names: Vec<NameEntry>,
    /// The names of the ExternalName aliases, which the agent's DNS path answers itself.
    pub alias_names: Vec<AliasName>,
}

/// The names of one ExternalName alias, as the agent's DNS path answers them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AliasName {
    /// [`crate::policy::Alias::hostnames`].
    pub hostnames: Vec<String>,
    /// The namespace whose pods it is for; `None`: every workload.
    pub scope: Option<String>,
}

/// An FQDN rule as the agent's DNS path applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameEntry {
    /// Its name in counters (`namespace/name`).
    pub name: String,
    /// Its namespace; `None`: every scope.
    pub scope: Option<String>,
    /// The names it allows.
    pub host: HostPattern,
    /// Its ports.
    pub ports: Vec<PortRule>,
    /// Its counter row.
    pub row: u32,
    /// [`crate::policy::NameRule::learned_hash`].
    pub hash: u64,
}

/// The stable id of the scope of namespace `ns` (`None`: scope 0) in `SCOPE_IDS` and the
/// learned-address keys: FNV-1a 64 of the name, never 0 (scope 0) nor [`XDP_LEARNED`].
pub fn stable_scope_id(ns: Option<&str>) -> u64 {
    match ns {
        None => 0,
        Some(ns) => match fnv1a64(ns.as_bytes()) {
            0 | XDP_LEARNED => 1,
            id => id,
        },
    }
}

/// A rule key that an earlier rule already holds; the connection is counted on the earlier one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shadowed {
    /// The later rule.
    pub rule: String,
    /// The rule that holds the key.
    pub by: String,
    /// The key, as `CIDR port/proto`.
    pub key: String,
}

/// Which rule name owns each counter row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowTable {
    /// Each name is one allocation, shared by both maps.
    by_name: HashMap<Arc<str>, u32>,
    by_row: HashMap<u32, Arc<str>>,
}

impl RowTable {
    /// Rebuilds the table from the `RULE_INFO` rows read back from the kernel. Rows whose
    /// stored name is truncated keep their row only if a rule of the new policy has the same
    /// length, prefix and hash; see [`RowTable::assign`].
    pub fn from_rule_info(rows: impl IntoIterator<Item = (u32, RuleInfo)>) -> StoredRows {
        let mut rows: Vec<(u32, RuleInfo)> = rows
            .into_iter()
            .filter(|(row, info)| *row >= FIRST_RULE_ROW && info.name_len != 0)
            .collect();
        rows.sort_unstable_by_key(|(row, _)| *row);
        StoredRows(rows)
    }

    /// The row of a rule.
    pub fn row(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The name that owns a row.
    pub fn name(&self, row: u32) -> Option<&str> {
        self.by_row.get(&row).map(|name| &**name)
    }

    /// Every (row, name), in no order, each name as the table holds it (for sharing).
    pub fn named_rows(&self) -> impl Iterator<Item = (u32, &Arc<str>)> {
        self.by_row.iter().map(|(row, name)| (*row, name))
    }

    /// A table of these rows and names (tests of what keeps tables).
    #[cfg(test)]
    pub(crate) fn of_rows<'a>(rows: impl IntoIterator<Item = (u32, &'a str)>) -> Self {
        let by_name: HashMap<Arc<str>, u32> = rows
            .into_iter()
            .map(|(row, name)| (Arc::from(name), row))
            .collect();
        let by_row = by_name.iter().map(|(n, r)| (*r, Arc::clone(n))).collect();
        Self { by_name, by_row }
    }

    /// Every (row, name), sorted by row.
    pub fn rows(&self) -> Vec<(u32, &str)> {
        let mut rows: Vec<_> = self.by_name.iter().map(|(n, r)| (*r, &**n)).collect();
        rows.sort_unstable();
        rows
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// True when no rule has a row.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The row table as the kernel holds it, sorted by row: names may be truncated to
/// [`RULE_NAME_LEN`] bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredRows(Vec<(u32, RuleInfo)>);

impl StoredRows {
    /// True when `row` is in use in the kernel. A binary search: the loader asks this for
    /// every row of a policy of up to 100,000 rules.
    pub fn contains(&self, row: u32) -> bool {
        self.0.binary_search_by_key(&row, |(r, _)| *r).is_ok()
    }

    /// The rows as the kernel holds them once `table` (compiled against these rows, as
    /// `generation`) is in force: rows kept as they were, new rows as [`rule_info`] writes
    /// them, rows gone freed. A row in both is the same rule's: [`StoredRows::assign`] never
    /// gives a stored row to another name.
    pub fn after(&self, table: &RowTable, generation: u32) -> StoredRows {
        let rows = table.rows().into_iter().map(|(row, name)| {
            let info = match self.0.binary_search_by_key(&row, |(r, _)| *r) {
                Ok(i) => self.0[i].1,
                Err(_) => rule_info(name, generation),
            };
            (row, info)
        });
        RowTable::from_rule_info(rows)
    }

    /// The rows in use in the kernel that `table` does not keep: to be freed.
    pub fn gone(&self, table: &RowTable) -> Vec<u32> {
        self.0
            .iter()
            .map(|(r, _)| *r)
            .filter(|r| !table.by_row.contains_key(r))
            .collect()
    }

    /// Gives every name a row: a name that already had one keeps it, new names take the lowest
    /// rows that no stored name holds. Rows of names no longer present are freed after the
    /// swap, and only a later generation reuses them: until the swap, the previous
    /// generation's programs still count on those rows, and a new rule given one of them
    /// would be booked the old rule's last connections (and events naming the row would name
    /// the wrong rule).
    pub fn assign<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<RowTable, CompileError> {
        self.assign_in_order(names).map(|(table, _)| table)
    }

    /// [`StoredRows::assign`], also returning the row of each name in the order given, so
    /// that [`compile`] need not look 10,000 names up again.
    fn assign_in_order<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<(RowTable, Vec<u32>), CompileError> {
        let names: Vec<&str> = names.into_iter().collect();
        let max = COUNTER_ROWS - FIRST_RULE_ROW;
        if names.len() > max as usize {
            return Err(CompileError::TooManyRules {
                rules: names.len(),
                max,
            });
        }
        let mut by_name = HashMap::with_capacity(names.len());
        let mut taken = vec![false; COUNTER_ROWS as usize];
        // By name hash and length: the first stored row of each, and any other in `more` (two
        // names of the same hash and length: almost never, so no list per name).
        type NameKey = (u64, u32);
        let mut stored: HashMap<NameKey, (u32, &RuleInfo)> = HashMap::with_capacity(self.0.len());
        let mut more: Vec<(NameKey, (u32, &RuleInfo))> = Vec::new();
        for (row, info) in &self.0 {
            match stored.entry((info.name_hash, info.name_len)) {
                Entry::Vacant(slot) => {
                    slot.insert((*row, info));
                }
                Entry::Occupied(_) => more.push(((info.name_hash, info.name_len), (*row, info))),
            }
        }
        let mut new = Vec::new();
        // Filled in below for the names in `new`.
        let mut order = vec![0; names.len()];
        for (i, name) in names.iter().enumerate() {
            let key = (fnv1a64(name.as_bytes()), name.len() as u32);
            let stored_name = rule_info(name, 0).name;
            let found = stored
                .get(&key)
                .into_iter()
                .chain(more.iter().filter(|(k, _)| *k == key).map(|(_, r)| r))
                .find(|(row, info)| !taken[*row as usize] && info.name == stored_name);
            match found {
                Some(&(row, _)) => {
                    taken[row as usize] = true;
                    by_name.insert(Arc::from(*name), row);
                    order[i] = row;
                }
                None => new.push((i, *name)),
            }
        }
        for (row, _) in &self.0 {
            // Held by the generation in force until the swap.
            taken[*row as usize] = true;
        }
        let mut free = (FIRST_RULE_ROW..COUNTER_ROWS).filter(|row| !taken[*row as usize]);
        for (i, name) in new {
            let row = free.next().ok_or(CompileError::TooManyRules {
                rules: names.len(),
                max,
            })?;
            by_name.insert(Arc::from(name), row);
            order[i] = row;
        }
        if by_name.len() != names.len() {
            // A name given twice (a policy never has one): each takes the row the table keeps.
            for (slot, name) in order.iter_mut().zip(&names) {
                *slot = by_name[*name];
            }
        }
        let by_row = by_name.iter().map(|(n, r)| (*r, Arc::clone(n))).collect();
        Ok((RowTable { by_name, by_row }, order))
    }
}

/// The `RULE_INFO` row for a rule name.
pub fn rule_info(name: &str, generation: u32) -> RuleInfo {
    let mut info = RuleInfo {
        name_len: name.len() as u32,
        generation,
        name_hash: fnv1a64(name.as_bytes()),
        ..RuleInfo::default()
    };
    let n = name.len().min(RULE_NAME_LEN);
    info.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    info
}

/// Compiles `policy` as generation `generation`, keeping the rows in `stored` where it can.
pub fn compile(
    policy: &Policy,
    stored: &StoredRows,
    generation: u32,
) -> Result<Compiled, CompileError> {
    let dns = (!policy.dns.resolvers.is_empty()).then_some(DNS_RULE_NAME);
    let row_names: Vec<Cow<'_, str>> = policy
        .rules
        .iter()
        .map(|r| scoped_name(r.scope.as_deref(), &r.name))
        .collect();
    let name_rule_names: Vec<Cow<'_, str>> = policy
        .name_rules
        .iter()
        .map(|r| scoped_name(r.scope.as_deref(), &r.name))
        .collect();
    let (rows, order) = stored.assign_in_order(
        row_names
            .iter()
            .chain(&name_rule_names)
            .map(|name| &**name)
            .chain(dns),
    )?;
    let scopes = policy.scopes();
    if scopes.len() > usize::from(MAX_SCOPES) {
        return Err(CompileError::TooManyScopes {
            scopes: scopes.len(),
            max: MAX_SCOPES,
        });
    }
    let scope_id = |ns: &str| -> u8 {
        let i = scopes
            .binary_search_by(|s| s.as_str().cmp(ns))
            .expect("a scope of the policy");
        u8::try_from(i + 1).expect("at most MAX_SCOPES scopes")
    };
    // Where a key of each kind of rule goes: a node-wide rule's into every scope (and the XDP
    // backstop's), a namespace's into its own scope and the XDP backstop's. Without scopes
    // the XDP backstop judges by scope 0, which then holds every rule: no copies.
    let all_scopes: Vec<u8> = (0..=scopes.len())
        .map(|i| u8::try_from(i).expect("at most MAX_SCOPES scopes"))
        .chain((!scopes.is_empty()).then_some(XDP_SCOPE))
        .collect();
    let mut out = Compiled {
        config: Config {
            mode: match policy.mode {
                Mode::Enforce => mode::ENFORCE,
                Mode::Audit => mode::AUDIT,
            },
            generation,
            row_limit: rows.by_row.keys().max().map_or(FIRST_RULE_ROW, |r| r + 1),
            proxy_port: policy.proxy.port.to_be(),
            flags: match policy.events {
                Events::Denied => 0,
                Events::All => config_flags::EVENTS_ALL,
            } | if policy.allow_sockets.raw {
                config_flags::ALLOW_RAW
            } else {
                0
            } | if scopes.is_empty() {
                0
            } else {
                config_flags::SCOPED
            } | if uses_dns_path(policy) {
                config_flags::DNS
            } else {
                0
            },
            // The loader knows the agent's cgroup.
            agent_cgroup: 0,
        },
        http_ports: http_ports(policy),
        sock_protos: policy.allow_sockets.protocols.iter().copied().collect(),
        ..Compiled::default()
    };
    // First rule to claim a key in a scope keeps it: node-wide rules first, then file order,
    // the user's order of precedence. A key a node-wide rule holds is held in every scope.
    let mut owners: HashMap<(Option<&str>, IpNet, u16, Protocol), &str> =
        HashMap::with_capacity(policy.rules.len());
    let node_wide_first = policy
        .rules
        .iter()
        .zip(&order)
        .zip(&row_names)
        .filter(|((r, _), _)| r.scope.is_none())
        .chain(
            policy
                .rules
                .iter()
                .zip(&order)
                .zip(&row_names)
                .filter(|((r, _), _)| r.scope.is_some()),
        );
    for ((rule, &row), name) in node_wide_first {
        let value = RuleValue { row };
        let scope = rule.scope.as_deref();
        let own_scopes;
        let in_scopes: &[u8] = match scope {
            None => &all_scopes,
            Some(ns) => {
                own_scopes = [scope_id(ns), XDP_SCOPE];
                &own_scopes
            }
        };
        for port in &rule.ports {
            // A range is one key per port (the port is matched exactly, ahead of the
            // address's prefix, so one lookup decides); a run of ports an earlier rule holds
            // is reported once, as a span.
            let mut held_run: Option<(u16, u16, &str)> = None;
            for p in port.ports() {
                let key = (rule.destination, p, port.protocol);
                let held = owners
                    .get(&(None, key.0, key.1, key.2))
                    .or_else(|| scope.and_then(|_| owners.get(&(scope, key.0, key.1, key.2))))
                    .copied();
                match (held, &mut held_run) {
                    (Some(owner), Some((_, end, by)))
                        if *by == owner && end.checked_add(1) == Some(p) =>
                    {
                        *end = p;
                    }
                    (held, run) => {
                        if let Some(done) = run.take() {
                            out.shadowed
                                .push(shadowed(name, rule.destination, port, done));
                        }
                        *run = held.map(|owner| (p, p, owner));
                    }
                }
                if held.is_some() {
                    continue;
                }
                owners.insert((scope, key.0, key.1, key.2), name);
                for &s in in_scopes {
                    push_key(&mut out, s, key, value);
                }
                // Checked per port, so a range that would need millions of keys stops here,
                // with its rule named, before they are all made.
                let keys = out.rules_v4.len().max(out.rules_v6.len());
                if keys > MAX_RULE_KEYS as usize {
                    return Err(CompileError::RangeTooWide {
                        rule: name.to_string(),
                        origin: rule.origin.to_string(),
                        ports: port.to_string(),
                        scopes: in_scopes.len(),
                        max: MAX_RULE_KEYS,
                    });
                }
            }
            if let Some(done) = held_run {
                out.shadowed
                    .push(shadowed(name, rule.destination, port, done));
            }
        }
    }
    // After the user's rules: a key one of them holds stays theirs, and is not reported.
    if dns.is_some() {
        let row = order[policy.rules.len() + policy.name_rules.len()];
        let value = RuleValue { row };
        for resolver in &policy.dns.resolvers {
            // A NAT64 or 6to4 resolver is judged as its IPv4 address: the key must be that.
            let destination = IpNet::from(judged_as(*resolver));
            for protocol in [Protocol::Udp, Protocol::Tcp] {
                if let Entry::Vacant(slot) = owners.entry((None, destination, DNS_PORT, protocol)) {
                    slot.insert(DNS_RULE_NAME);
                    for &s in &all_scopes {
                        push_key(&mut out, s, (destination, DNS_PORT, protocol), value);
                    }
                }
            }
        }
    }
    // The redirects: each scope's HTTP egress ports (node-wide HTTP rules and aliases, and the
    // scope's own HTTP rules), unless a tcp rule of the scope allows the whole port directly.
    let redirect = RuleValue { row: ROW_PROXY };
    for (i, s) in all_scopes.iter().take(scopes.len() + 1).enumerate() {
        let ns = i.checked_sub(1).map(|i| scopes[i].as_str());
        for port in scope_http_ports(policy, ns) {
            for any in ["0.0.0.0/0", "::/0"] {
                let any: IpNet = any.parse().expect("valid literal");
                let held = owners.contains_key(&(None, any, port, Protocol::Tcp))
                    || ns.is_some_and(|_| owners.contains_key(&(ns, any, port, Protocol::Tcp)));
                if !held {
                    push_key(&mut out, *s, (any, port, Protocol::Tcp), redirect);
                }
            }
        }
    }
    {
        out.names = policy
            .name_rules
            .iter()
            .zip(&order[policy.rules.len()..])
            .map(|(rule, &row)| NameEntry {
                name: rule.row_name().into_owned(),
                scope: rule.scope.clone(),
                host: rule.host.clone(),
                ports: rule.ports.clone(),
                row,
                hash: rule.learned_hash(),
            })
            .collect();
    }
    if uses_dns_path(policy) {
        out.dns_slots = dns_slots(&policy.dns.resolvers);
        out.alias_names = policy
            .aliases
            .iter()
            .map(|alias| AliasName {
                hostnames: alias.hostnames().to_vec(),
                scope: alias.scope.clone(),
            })
            .collect();
    }
    out.scope_ids = std::iter::once((0, 0))
        .chain(
            scopes
                .iter()
                .enumerate()
                .map(|(i, ns)| (i as u32 + 1, stable_scope_id(Some(ns)))),
        )
        .chain(std::iter::once((u32::from(XDP_SCOPE), XDP_LEARNED)))
        .collect();
    out.scopes = scopes;
    for net in &policy.bypass {
        match net {
            IpNet::V4(net) => {
                out.bypass_v4
                    .push((u32::from(net.prefix_len()), net.network().octets(), 1));
            }
            IpNet::V6(net) => {
                out.bypass_v6
                    .push((u32::from(net.prefix_len()), net.network().octets(), 1));
            }
        }
    }
    type TooMany = fn(&'static str, usize, u32) -> CompileError;
    let keys: TooMany = |family, keys, max| CompileError::TooManyKeys { family, keys, max };
    let bypass: TooMany = |family, ranges, max| CompileError::TooManyBypass {
        family,
        ranges,
        max,
    };
    for (family, len, max, too_many) in [
        ("IPv4", out.rules_v4.len(), MAX_RULE_KEYS, keys),
        ("IPv6", out.rules_v6.len(), MAX_RULE_KEYS, keys),
        ("IPv4", out.bypass_v4.len(), MAX_BYPASS, bypass),
        ("IPv6", out.bypass_v6.len(), MAX_BYPASS, bypass),
    ] {
        if len > max as usize {
            return Err(too_many(family, len, max));
        }
    }
    out.rows = rows;
    Ok(out)
}

/// The `SCOPES` entries for `pods` (each pod's cgroup id and namespace) under a policy whose
/// scopes are `scopes` (sorted, as [`Compiled::scopes`]): the pods of a namespace with rules of
/// its own, with its scope id. The other pods have scope 0 (no entry).
pub fn scoped_cgroups(scopes: &[String], pods: &[(u64, String)]) -> Vec<(u64, u32)> {
    pods.iter()
        .filter_map(|(cgroup, ns)| {
            let i = scopes.binary_search(ns).ok()?;
            Some((*cgroup, u32::try_from(i + 1).ok()?))
        })
        .collect()
}

/// Whether the workloads' DNS goes through the agent: for FQDN rules (to learn their
/// addresses) and for aliases (to answer their names), when there is a resolver to ask.
fn uses_dns_path(policy: &Policy) -> bool {
    (!policy.name_rules.is_empty() || !policy.aliases.is_empty())
        && !policy.dns.resolvers.is_empty()
}

/// The `DNS_SLOTS` entries for `resolvers`: the first [`MAX_RESOLVERS`], each as the kernel
/// judges it (a v4-mapped resolver as IPv4), with its listener port.
fn dns_slots(resolvers: &[std::net::IpAddr]) -> Vec<DnsSlot> {
    if resolvers.len() > MAX_RESOLVERS as usize {
        tracing::warn!(
            resolvers = resolvers.len(),
            through_the_agent = MAX_RESOLVERS,
            ignored = ?&resolvers[MAX_RESOLVERS as usize..],
            "dns: only the first resolvers' queries go through the agent; answers from the others teach the kernel nothing, so FQDN rules do not open their addresses"
        );
    }
    resolvers
        .iter()
        .take(MAX_RESOLVERS as usize)
        .enumerate()
        .map(|(i, resolver)| {
            let (family, addr) = match judged_as(*resolver) {
                std::net::IpAddr::V4(v4) => {
                    let mut addr = [0; 16];
                    addr[..4].copy_from_slice(&v4.octets());
                    (AF_INET, addr)
                }
                std::net::IpAddr::V6(v6) => (AF_INET6, v6.octets()),
            };
            DnsSlot {
                addr,
                port: DNS_PORT.to_be(),
                listen_port: (DNS_LISTEN_PORT + i as u16).to_be(),
                family,
                _pad: [0; 3],
            }
        })
        .collect()
}

/// The report of ports `start..=end` of `port` that rule `by` already holds for `rule`.
fn shadowed(
    rule: &str,
    destination: IpNet,
    port: &PortRule,
    (start, end, by): (u16, u16, &str),
) -> Shadowed {
    Shadowed {
        rule: rule.to_owned(),
        by: by.to_owned(),
        key: format!("{destination} {}/{}", port_span(start, end), port.protocol),
    }
}

/// Adds the rule key of `scope` for `destination` and `port`/`protocol` (port in host order).
fn push_key(
    out: &mut Compiled,
    scope: u8,
    (destination, port, protocol): (IpNet, u16, Protocol),
    value: RuleValue,
) {
    let (port, proto) = (port.to_be(), proto(protocol));
    let bits = KEY_PREFIX_BITS + u32::from(destination.prefix_len());
    match destination {
        IpNet::V4(net) => {
            let addr = net.network().octets();
            let key = RuleKeyV4 {
                port,
                proto,
                scope,
                addr,
            };
            out.rules_v4.push((bits, key, value));
        }
        IpNet::V6(net) => {
            let addr = net.network().octets();
            let key = RuleKeyV6 {
                port,
                proto,
                scope,
                addr,
            };
            out.rules_v6.push((bits, key, value));
        }
    }
}

/// The IP protocol number a rule key carries.
fn proto(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

/// Every port of an HTTP rule or alias, sorted, without duplicates.
fn http_ports(policy: &Policy) -> Vec<u16> {
    let rules = policy
        .http_rules
        .iter()
        .flat_map(|r| r.ports.iter().map(|p| p.port));
    let aliases = policy.aliases.iter().flat_map(|a| a.ports.iter().copied());
    let mut ports: Vec<u16> = rules.chain(aliases).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The HTTP egress ports of a scope (`None`: the node-wide one): those of the node-wide HTTP
/// rules and of the aliases, and of the scope's own HTTP rules; sorted, without duplicates.
fn scope_http_ports(policy: &Policy, scope: Option<&str>) -> Vec<u16> {
    let rules = policy
        .http_rules
        .iter()
        .filter(|r| r.scope.is_none() || r.scope.as_deref() == scope)
        .flat_map(|r| r.ports.iter().map(|p| p.port));
    let aliases = policy
        .aliases
        .iter()
        .filter(|a| a.scope.is_none() || a.scope.as_deref() == scope)
        .flat_map(|a| a.ports.iter().copied());
    let mut ports: Vec<u16> = rules.chain(aliases).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

#[cfg(test)]
mod tests;
