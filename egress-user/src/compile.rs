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

use std::collections::{HashMap, hash_map::Entry};

use egress_common::{
    COUNTER_ROWS, Config, DNS_PORT, FIRST_RULE_ROW, KEY_PREFIX_BITS, MAX_BYPASS, MAX_RULE_KEYS,
    PROTO_TCP, PROTO_UDP, RULE_NAME_LEN, RuleInfo, RuleKeyV4, RuleKeyV6, RuleValue, config_flags,
    fnv1a64, mode,
};
use ipnet::IpNet;

use crate::policy::{Events, Mode, Policy, Protocol, judged_as};

/// The row name of the implicit rule that allows DNS to the policy's resolvers. No EgressRule
/// can be named so (names are DNS subdomains), so it never clashes with one.
pub const DNS_RULE_NAME: &str = "(dns)";

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
    /// Ports (host byte order) whose connections go to the proxy: every port of an HTTP rule
    /// or alias, sorted, without duplicates.
    pub http_ports: Vec<u16>,
    /// Protocol numbers whose `SOCK_PROTOS` entry is 1 (EgressConfig `allowSockets`), sorted,
    /// without duplicates; TCP and UDP are never among them (always allowed).
    pub sock_protos: Vec<u16>,
    /// The row table after this generation: which rule owns each row.
    pub rows: RowTable,
    /// Rules whose every key was already taken by an earlier rule: they can never match.
    pub shadowed: Vec<Shadowed>,
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
    by_name: HashMap<String, u32>,
    by_row: HashMap<u32, String>,
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
        self.by_row.get(&row).map(String::as_str)
    }

    /// Every (row, name), sorted by row.
    pub fn rows(&self) -> Vec<(u32, &str)> {
        let mut rows: Vec<_> = self.by_name.iter().map(|(n, r)| (*r, n.as_str())).collect();
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
#[derive(Clone, Debug, Default)]
pub struct StoredRows(Vec<(u32, RuleInfo)>);

impl StoredRows {
    /// True when `row` is in use in the kernel. A binary search: the loader asks this for
    /// every row of a policy of up to 100,000 rules.
    pub fn contains(&self, row: u32) -> bool {
        self.0.binary_search_by_key(&row, |(r, _)| *r).is_ok()
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
        let stored: HashMap<(u64, u32), Vec<(u32, &RuleInfo)>> =
            self.0.iter().fold(HashMap::new(), |mut acc, (row, info)| {
                acc.entry((info.name_hash, info.name_len))
                    .or_default()
                    .push((*row, info));
                acc
            });
        let mut new = Vec::new();
        // Filled in below for the names in `new`.
        let mut order = vec![0; names.len()];
        for (i, name) in names.iter().enumerate() {
            let found = stored
                .get(&(fnv1a64(name.as_bytes()), name.len() as u32))
                .and_then(|c| {
                    c.iter().find(|(row, info)| {
                        !taken[*row as usize] && info.name == rule_info(name, 0).name
                    })
                });
            match found {
                Some((row, _)) => {
                    taken[*row as usize] = true;
                    by_name.insert((*name).to_owned(), *row);
                    order[i] = *row;
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
            by_name.insert(name.to_owned(), row);
            order[i] = row;
        }
        if by_name.len() != names.len() {
            // A name given twice (a policy never has one): each takes the row the table keeps.
            for (slot, name) in order.iter_mut().zip(&names) {
                *slot = by_name[*name];
            }
        }
        let by_row = by_name.iter().map(|(n, r)| (*r, n.clone())).collect();
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
    let (rows, order) =
        stored.assign_in_order(policy.rules.iter().map(|r| r.name.as_str()).chain(dns))?;
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
            },
            // The loader knows the agent's cgroup.
            agent_cgroup: 0,
        },
        http_ports: http_ports(policy),
        sock_protos: policy.allow_sockets.protocols.iter().copied().collect(),
        ..Compiled::default()
    };
    // First rule to claim a key keeps it: file order is the user's order of precedence.
    let mut owners: HashMap<(IpNet, u16, Protocol), &str> = HashMap::new();
    for (rule, &row) in policy.rules.iter().zip(&order) {
        let value = RuleValue { row };
        for port in &rule.ports {
            match owners.entry((rule.destination, port.port, port.protocol)) {
                Entry::Occupied(owner) => {
                    out.shadowed.push(Shadowed {
                        rule: rule.name.clone(),
                        by: (*owner.get()).to_owned(),
                        key: format!("{} {}/{}", rule.destination, port.port, port.protocol),
                    });
                    continue;
                }
                Entry::Vacant(slot) => {
                    slot.insert(&rule.name);
                }
            }
            push_key(&mut out, rule.destination, port.port, port.protocol, value);
        }
    }
    // After the user's rules: a key one of them holds stays theirs, and is not reported.
    if dns.is_some() {
        let row = order[policy.rules.len()];
        let value = RuleValue { row };
        for resolver in &policy.dns.resolvers {
            // A NAT64 or 6to4 resolver is judged as its IPv4 address: the key must be that.
            let destination = IpNet::from(judged_as(*resolver));
            for protocol in [Protocol::Udp, Protocol::Tcp] {
                if let Entry::Vacant(slot) = owners.entry((destination, DNS_PORT, protocol)) {
                    slot.insert(DNS_RULE_NAME);
                    push_key(&mut out, destination, DNS_PORT, protocol, value);
                }
            }
        }
    }
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
    check_len(
        "IPv4",
        out.rules_v4.len(),
        MAX_RULE_KEYS,
        |family, keys, max| CompileError::TooManyKeys { family, keys, max },
    )?;
    check_len(
        "IPv6",
        out.rules_v6.len(),
        MAX_RULE_KEYS,
        |family, keys, max| CompileError::TooManyKeys { family, keys, max },
    )?;
    check_len(
        "IPv4",
        out.bypass_v4.len(),
        MAX_BYPASS,
        |family, ranges, max| CompileError::TooManyBypass {
            family,
            ranges,
            max,
        },
    )?;
    check_len(
        "IPv6",
        out.bypass_v6.len(),
        MAX_BYPASS,
        |family, ranges, max| CompileError::TooManyBypass {
            family,
            ranges,
            max,
        },
    )?;
    out.rows = rows;
    Ok(out)
}

/// Adds the rule key for `destination` and `port`/`protocol` (port in host order).
fn push_key(
    out: &mut Compiled,
    destination: IpNet,
    port: u16,
    protocol: Protocol,
    value: RuleValue,
) {
    let (port, proto) = (port.to_be(), proto(protocol));
    match destination {
        IpNet::V4(net) => out.rules_v4.push((
            KEY_PREFIX_BITS + u32::from(net.prefix_len()),
            RuleKeyV4 {
                port,
                proto,
                _pad: 0,
                addr: net.network().octets(),
            },
            value,
        )),
        IpNet::V6(net) => out.rules_v6.push((
            KEY_PREFIX_BITS + u32::from(net.prefix_len()),
            RuleKeyV6 {
                port,
                proto,
                _pad: 0,
                addr: net.network().octets(),
            },
            value,
        )),
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

fn check_len(
    family: &'static str,
    len: usize,
    max: u32,
    err: impl FnOnce(&'static str, usize, u32) -> CompileError,
) -> Result<(), CompileError> {
    if len > max as usize {
        Err(err(family, len, max))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Origin, PortRule, Rule, default_bypass};

    fn rule(name: &str, dest: &str, ports: &[u16]) -> Rule {
        Rule {
            name: name.to_owned(),
            origin: Origin {
                file: "t.yaml".to_owned(),
                line: 1,
            },
            destination: dest.parse().unwrap(),
            ports: ports
                .iter()
                .map(|&port| PortRule {
                    port,
                    protocol: Protocol::Tcp,
                })
                .collect(),
        }
    }

    fn policy(rules: Vec<Rule>) -> Policy {
        Policy {
            mode: Mode::Enforce,
            bypass: default_bypass(),
            rules,
            ..Policy::default()
        }
    }

    #[test]
    fn keys_carry_port_in_network_order_and_prefix_past_port_and_proto() {
        let p = policy(vec![
            rule("a", "192.0.2.0/24", &[443, 8080]),
            rule("b", "2001:db8::/32", &[22]),
        ]);
        let c = compile(&p, &StoredRows::default(), 7).unwrap();
        assert_eq!(
            c.config,
            Config {
                mode: mode::ENFORCE,
                generation: 7,
                row_limit: FIRST_RULE_ROW + 2,
                proxy_port: crate::policy::DEFAULT_PROXY_PORT.to_be(),
                flags: 0,
                agent_cgroup: 0,
            }
        );
        assert!(c.http_ports.is_empty());
        assert_eq!(c.rules_v4.len(), 2);
        let (prefix, key, value) = c.rules_v4[0];
        assert_eq!(prefix, 32 + 24);
        assert_eq!(key.addr, [192, 0, 2, 0]);
        // Network byte order: the first byte in memory is the high byte of 443 (0x01bb).
        assert_eq!(key.port.to_ne_bytes(), [0x01, 0xbb]);
        assert_eq!(key.proto, PROTO_TCP);
        assert_eq!(value.row, FIRST_RULE_ROW);
        let (prefix, key, value) = c.rules_v6[0];
        assert_eq!(prefix, 32 + 32);
        assert_eq!(key.port.to_ne_bytes(), [0, 22]);
        assert_eq!(value.row, FIRST_RULE_ROW + 1);
        assert_eq!(c.bypass_v4, vec![(8, [127, 0, 0, 0], 1)]);
        assert_eq!(c.bypass_v6.len(), 1);
        assert_eq!(c.bypass_v6[0].0, 128);
    }

    #[test]
    fn http_rule_and_alias_ports_go_to_the_proxy() {
        use crate::policy::{Alias, HostPattern, HttpPort, HttpProtocol, HttpRule};
        let mut p = policy(vec![rule("a", "192.0.2.0/24", &[8080])]);
        p.http_rules.push(HttpRule {
            name: "web".into(),
            origin: Origin {
                file: "t.yaml".into(),
                line: 1,
            },
            host: HostPattern::Exact("httpbin.test".into()),
            ports: vec![
                HttpPort {
                    port: 80,
                    protocol: HttpProtocol::Http,
                },
                HttpPort {
                    port: 443,
                    protocol: HttpProtocol::Https,
                },
            ],
        });
        p.aliases.push(Alias {
            name: "httpbin".into(),
            namespace: "default".into(),
            origin: Origin {
                file: "t.yaml".into(),
                line: 9,
            },
            external_name: "httpbin.test".into(),
            ports: vec![80, 8000],
        });
        p.proxy.port = 15999;
        let c = compile(&p, &StoredRows::default(), 1).unwrap();
        assert_eq!(c.http_ports, vec![80, 443, 8000]);
        assert_eq!(c.config.proxy_port.to_ne_bytes(), 15999u16.to_be_bytes());
        // HTTP rules are the proxy's: they take no counter row and no rule key.
        assert_eq!(c.rows.len(), 1);
        assert_eq!(c.rules_v4.len(), 1);
    }

    #[test]
    fn audit_mode_compiles_to_audit() {
        let mut p = policy(vec![]);
        p.mode = Mode::Audit;
        assert_eq!(
            compile(&p, &StoredRows::default(), 1).unwrap().config.mode,
            mode::AUDIT
        );
    }

    #[test]
    fn events_all_sets_the_config_flag() {
        let mut p = policy(vec![]);
        assert_eq!(
            compile(&p, &StoredRows::default(), 1).unwrap().config.flags,
            0
        );
        p.events = Events::All;
        assert_eq!(
            compile(&p, &StoredRows::default(), 1).unwrap().config.flags,
            config_flags::EVENTS_ALL
        );
    }

    #[test]
    fn allow_sockets_compile_to_the_raw_flag_and_sock_protos() {
        let mut p = policy(vec![]);
        let c = compile(&p, &StoredRows::default(), 1).unwrap();
        assert_eq!(c.config.flags & config_flags::ALLOW_RAW, 0);
        assert!(c.sock_protos.is_empty());
        p.allow_sockets.raw = true;
        p.allow_sockets.protocols = [262, 1, 58, 132].into();
        p.events = Events::All;
        let c = compile(&p, &StoredRows::default(), 1).unwrap();
        assert_eq!(
            c.config.flags,
            config_flags::ALLOW_RAW | config_flags::EVENTS_ALL
        );
        assert_eq!(c.sock_protos, [1, 58, 132, 262]);
    }

    fn with_resolvers(mut p: Policy, resolvers: &[&str]) -> Policy {
        p.dns = crate::policy::Dns {
            resolvers: resolvers.iter().map(|r| r.parse().unwrap()).collect(),
            source: crate::policy::DnsSource::ResolvConf("/etc/resolv.conf".into()),
        };
        p
    }

    #[test]
    fn resolvers_become_the_dns_rule_after_the_users_rules() {
        let mut user = rule("own-dns", "192.0.2.53/32", &[53]);
        user.ports.push(PortRule {
            port: 5353,
            protocol: Protocol::Udp,
        });
        let p = with_resolvers(
            policy(vec![user]),
            &[
                "192.0.2.53",
                "2001:db8::53",
                "64:ff9b::c000:236",
                "2002:c000:236::1",
            ],
        );
        let c = compile(&p, &StoredRows::default(), 1).unwrap();
        let user_row = c.rows.row("own-dns").unwrap();
        let dns_row = c.rows.row(DNS_RULE_NAME).unwrap();
        assert_eq!((user_row, dns_row), (FIRST_RULE_ROW, FIRST_RULE_ROW + 1));
        assert_eq!(c.config.row_limit, FIRST_RULE_ROW + 2);
        let v4: Vec<(u32, [u8; 4], u16, u8, u32)> = c
            .rules_v4
            .iter()
            .map(|(prefix, k, v)| (*prefix, k.addr, u16::from_be(k.port), k.proto, v.row))
            .collect();
        assert_eq!(
            v4,
            [
                (64, [192, 0, 2, 53], 53, PROTO_TCP, user_row),
                (64, [192, 0, 2, 53], 5353, PROTO_UDP, user_row),
                // 53/tcp to 192.0.2.53 is the user's rule's already: skipped, not reported.
                (64, [192, 0, 2, 53], 53, PROTO_UDP, dns_row),
                // The NAT64 and 6to4 resolvers are judged as 192.0.2.54: one pair of keys.
                (64, [192, 0, 2, 54], 53, PROTO_UDP, dns_row),
                (64, [192, 0, 2, 54], 53, PROTO_TCP, dns_row),
            ]
        );
        let v6: Vec<(u32, u16, u8, u32)> = c
            .rules_v6
            .iter()
            .map(|(prefix, k, v)| (*prefix, u16::from_be(k.port), k.proto, v.row))
            .collect();
        assert_eq!(
            v6,
            [(160, 53, PROTO_UDP, dns_row), (160, 53, PROTO_TCP, dns_row)]
        );
        assert_eq!(
            c.rules_v6[0].1.addr,
            "2001:db8::53"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert!(c.shadowed.is_empty(), "{:?}", c.shadowed);
    }

    #[test]
    fn no_resolvers_no_dns_row() {
        let p = with_resolvers(policy(vec![rule("a", "192.0.2.1/32", &[443])]), &[]);
        let c = compile(&p, &StoredRows::default(), 1).unwrap();
        assert_eq!(c.rows.row(DNS_RULE_NAME), None);
        assert_eq!(c.rows.len(), 1);
        assert_eq!(c.rules_v4.len(), 1);
        // Not filled at all: no DNS either.
        let c = compile(
            &policy(vec![rule("a", "192.0.2.1/32", &[443])]),
            &StoredRows::default(),
            1,
        )
        .unwrap();
        assert_eq!(c.rows.row(DNS_RULE_NAME), None);
    }

    #[test]
    fn the_dns_row_is_stable_across_reloads() {
        let first = compile(
            &with_resolvers(
                policy(vec![rule("a", "192.0.2.1/32", &[1])]),
                &["192.0.2.53"],
            ),
            &StoredRows::default(),
            1,
        )
        .unwrap();
        let stored = RowTable::from_rule_info(
            first
                .rows
                .rows()
                .into_iter()
                .map(|(row, name)| (row, rule_info(name, 1))),
        );
        // A new rule comes first and the resolvers change: (dns) keeps its row.
        let second = compile(
            &with_resolvers(
                policy(vec![
                    rule("new", "192.0.2.2/32", &[1]),
                    rule("a", "192.0.2.1/32", &[1]),
                ]),
                &["192.0.2.54"],
            ),
            &stored,
            2,
        )
        .unwrap();
        assert_eq!(
            second.rows.row(DNS_RULE_NAME),
            first.rows.row(DNS_RULE_NAME)
        );
        assert_eq!(second.rows.row("a"), first.rows.row("a"));
        assert_eq!(second.rows.len(), 3);
    }

    #[test]
    fn same_key_twice_is_kept_by_the_first_rule_and_reported() {
        let p = policy(vec![
            rule("a", "192.0.2.0/24", &[443]),
            rule("b", "192.0.2.0/24", &[443, 80]),
        ]);
        let c = compile(&p, &StoredRows::default(), 1).unwrap();
        assert_eq!(c.rules_v4.len(), 2);
        assert_eq!(c.shadowed.len(), 1);
        assert_eq!(c.shadowed[0].rule, "b");
        assert_eq!(c.shadowed[0].by, "a");
    }

    #[test]
    fn udp_ports_compile_to_udp_keys_beside_tcp_ones() {
        let mut dns = rule("dns", "192.0.2.53/32", &[53]);
        dns.ports.insert(
            0,
            PortRule {
                port: 53,
                protocol: Protocol::Udp,
            },
        );
        let mut again = rule("again", "192.0.2.53/32", &[]);
        again.ports.push(PortRule {
            port: 53,
            protocol: Protocol::Udp,
        });
        let c = compile(&policy(vec![dns, again]), &StoredRows::default(), 1).unwrap();
        let keys: Vec<(u16, u8)> = c
            .rules_v4
            .iter()
            .map(|(_, k, _)| (u16::from_be(k.port), k.proto))
            .collect();
        assert_eq!(keys, [(53, PROTO_UDP), (53, PROTO_TCP)]);
        assert_eq!(
            c.shadowed,
            [Shadowed {
                rule: "again".into(),
                by: "dns".into(),
                key: "192.0.2.53/32 53/udp".into(),
            }]
        );
    }

    #[test]
    fn rows_survive_a_recompile_and_new_names_never_take_a_row_still_in_force() {
        let first = compile(
            &policy(vec![
                rule("a", "192.0.2.1/32", &[1]),
                rule("b", "192.0.2.2/32", &[1]),
            ]),
            &StoredRows::default(),
            1,
        )
        .unwrap();
        let stored = RowTable::from_rule_info(
            first
                .rows
                .rows()
                .into_iter()
                .map(|(row, name)| (row, rule_info(name, 1))),
        );
        // "a" goes away, "c" arrives before "b" in file order: "b" keeps its row.
        let second = compile(
            &policy(vec![
                rule("c", "192.0.2.3/32", &[1]),
                rule("b", "192.0.2.2/32", &[1]),
            ]),
            &stored,
            2,
        )
        .unwrap();
        assert_eq!(second.rows.row("b"), first.rows.row("b"));
        assert_ne!(
            second.rows.row("c"),
            first.rows.row("a"),
            "a's row is still counted on by generation 1 until the swap"
        );
        assert_eq!(second.rows.len(), 2);
        // One generation later a's row is free and is reused.
        let stored = RowTable::from_rule_info(
            second
                .rows
                .rows()
                .into_iter()
                .map(|(row, name)| (row, rule_info(name, 2))),
        );
        let third = compile(
            &policy(vec![
                rule("c", "192.0.2.3/32", &[1]),
                rule("b", "192.0.2.2/32", &[1]),
                rule("d", "192.0.2.4/32", &[1]),
            ]),
            &stored,
            3,
        )
        .unwrap();
        assert_eq!(
            third.rows.row("d"),
            first.rows.row("a"),
            "the freed row is reused"
        );
        assert_eq!(third.rows.row("c"), second.rows.row("c"));
    }

    #[test]
    fn stored_rows_are_sorted_so_contains_can_search() {
        let stored = RowTable::from_rule_info(
            [9, 3, 7, 5]
                .into_iter()
                .map(|row| (row, rule_info(&format!("r{row}"), 1))),
        );
        for row in [3, 5, 7, 9] {
            assert!(stored.contains(row), "{row}");
        }
        for row in [0, 4, 8, 10] {
            assert!(!stored.contains(row), "{row}");
        }
    }

    #[test]
    fn long_names_that_share_a_prefix_keep_their_own_rows() {
        let long_a = format!("{}-a", "x".repeat(70));
        let long_b = format!("{}-b", "x".repeat(70));
        let first = compile(
            &policy(vec![
                rule(&long_a, "192.0.2.1/32", &[1]),
                rule(&long_b, "192.0.2.2/32", &[1]),
            ]),
            &StoredRows::default(),
            1,
        )
        .unwrap();
        let stored = RowTable::from_rule_info(
            first
                .rows
                .rows()
                .into_iter()
                .map(|(row, name)| (row, rule_info(name, 1))),
        );
        let second = compile(
            &policy(vec![
                rule(&long_b, "192.0.2.2/32", &[1]),
                rule(&long_a, "192.0.2.1/32", &[1]),
            ]),
            &stored,
            2,
        )
        .unwrap();
        assert_eq!(second.rows.row(&long_a), first.rows.row(&long_a));
        assert_eq!(second.rows.row(&long_b), first.rows.row(&long_b));
    }

    #[test]
    fn too_many_rules_is_an_error_not_a_partial_policy() {
        let names: Vec<String> = (0..COUNTER_ROWS).map(|i| format!("r{i}")).collect();
        let err = StoredRows::default()
            .assign(names.iter().map(String::as_str))
            .unwrap_err();
        assert!(matches!(err, CompileError::TooManyRules { .. }), "{err}");
    }

    #[test]
    fn too_many_bypass_ranges_is_an_error() {
        let mut p = policy(vec![]);
        p.bypass = (0..=MAX_BYPASS)
            .map(|i| {
                ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(i << 8), 24)
                    .unwrap()
                    .into()
            })
            .collect();
        let err = compile(&p, &StoredRows::default(), 1).unwrap_err();
        assert!(matches!(err, CompileError::TooManyBypass { .. }), "{err}");
    }
}
