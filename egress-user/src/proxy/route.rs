//! From a request's authority to a decision: which rule or alias allows it, and where and how
//! the proxy sends it. Pure: no I/O, built once per policy, looked up once per request without
//! allocating.
//!
//! Precedence, for a host and the connection's original port:
//! 1. exact names: an alias's names (`httpbin`, `httpbin.ns`, `httpbin.ns.svc`,
//!    `httpbin.ns.svc.cluster.local`), then exact-host rules in file order, then aliases'
//!    external names (an alias also allows its external name on its ports);
//! 2. wildcard rules, the longest suffix first (`*.a.example.com` before `*.example.com`).
//!
//! The first entry that names the host on that port wins.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::Ipv6Addr;

use http::HeaderValue;
use http::uri::Authority;

use super::error::{ConfigError, ProxyError};
use crate::policy::{Alias, HostPattern, HttpProtocol, Policy, scoped_name};

/// Where and how an allowed request goes.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// The counters slot (rule or alias index, see [`Routes::names`]).
    pub(crate) slot: usize,
    /// Plain HTTP or TLS origination.
    pub(crate) protocol: HttpProtocol,
    /// The upstream `host:port` when it is known in advance (exact rules, aliases); `None` for
    /// a wildcard rule, whose upstream is the request's own host.
    pub(crate) authority: Option<Authority>,
    /// For an alias: the Host header the upstream gets (its external name).
    pub(crate) host_header: Option<HeaderValue>,
}

#[derive(Clone, Debug)]
struct Entry {
    port: u16,
    /// The namespace whose pods the entry is for; `None`: every client.
    scope: Option<String>,
    target: Target,
}

impl Entry {
    /// Whether the entry is for a request on `port` from a client of `scope`.
    fn serves(&self, port: u16, scope: Option<&str>) -> bool {
        self.port == port && (self.scope.is_none() || self.scope.as_deref() == scope)
    }
}

/// Every HTTP rule and alias of a policy, indexed by host; the `tls` (passthrough) ports of
/// the rules apart, looked up by a ClientHello's server name, never by a request's Host.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    exact: HashMap<String, Vec<Entry>>,
    wildcard: HashMap<String, Vec<Entry>>,
    tls_exact: HashMap<String, Vec<Entry>>,
    tls_wildcard: HashMap<String, Vec<Entry>>,
    names: Vec<(String, bool)>,
}

/// The entry of `exact` or `wildcard` (the longest suffix first) for `host` on `port` for a
/// client of `scope`.
fn lookup<'e>(
    exact: &'e HashMap<String, Vec<Entry>>,
    wildcard: &'e HashMap<String, Vec<Entry>>,
    host: &str,
    port: u16,
    scope: Option<&str>,
) -> Option<&'e Target> {
    fn on_port<'e>(v: &'e [Entry], port: u16, scope: Option<&str>) -> Option<&'e Target> {
        v.iter().find(|e| e.serves(port, scope)).map(|e| &e.target)
    }
    if let Some(t) = exact.get(host).and_then(|v| on_port(v, port, scope)) {
        return Some(t);
    }
    // `a.b.example.com`: try `b.example.com`, then `example.com`, then `com`. A wildcard
    // never matches its own suffix, because the suffix starts after a dot.
    host.match_indices('.').find_map(|(i, _)| {
        wildcard
            .get(&host[i + 1..])
            .and_then(|v| on_port(v, port, scope))
    })
}

impl Routes {
    /// Indexes `policy.http_rules` and `policy.aliases`.
    pub(crate) fn new(policy: &Policy) -> Result<Self, ConfigError> {
        let mut r = Routes::default();
        let first_alias = policy.http_rules.len();
        r.names.extend(
            policy
                .http_rules
                .iter()
                .map(|h| (scoped_name(h.scope.as_deref(), &h.name).into_owned(), false)),
        );
        r.names
            .extend(policy.aliases.iter().map(|a| (a.name.clone(), true)));

        for (i, alias) in policy.aliases.iter().enumerate() {
            let slot = first_alias + i;
            for name in alias.hostnames() {
                let name = normalise(&name).into_owned();
                for &port in &alias.ports {
                    let target = alias_target(alias, slot, port, true)?;
                    r.exact.entry(name.clone()).or_default().push(Entry {
                        port,
                        scope: alias.scope.clone(),
                        target,
                    });
                }
            }
        }
        for (slot, rule) in policy.http_rules.iter().enumerate() {
            for p in &rule.ports {
                let tls = p.protocol == HttpProtocol::Tls;
                let (map, name, authority) = match &rule.host {
                    HostPattern::Exact(name) => {
                        let name = normalise(name);
                        let authority = Authority::try_from(format!("{name}:{}", p.port)).ok();
                        let map = if tls { &mut r.tls_exact } else { &mut r.exact };
                        (map, name, authority)
                    }
                    HostPattern::Wildcard(suffix) => {
                        let map = if tls {
                            &mut r.tls_wildcard
                        } else {
                            &mut r.wildcard
                        };
                        (map, normalise(suffix), None)
                    }
                };
                let target = Target {
                    slot,
                    protocol: p.protocol,
                    authority,
                    host_header: None,
                };
                map.entry(name.into_owned()).or_default().push(Entry {
                    port: p.port,
                    scope: rule.scope.clone(),
                    target,
                });
            }
        }
        for (i, alias) in policy.aliases.iter().enumerate() {
            let name = normalise(&alias.external_name).into_owned();
            for &port in &alias.ports {
                let target = alias_target(alias, first_alias + i, port, false)?;
                r.exact.entry(name.clone()).or_default().push(Entry {
                    port,
                    scope: alias.scope.clone(),
                    target,
                });
            }
        }
        Ok(r)
    }

    /// The rule and alias names, in counter-slot order, each with "is an alias".
    pub(crate) fn names(&self) -> impl Iterator<Item = (String, bool)> + '_ {
        self.names.iter().cloned()
    }

    /// The target for normalised `host` on the connection's original `port`, for a client of
    /// the namespace `scope` (`None`: a host process, or a pod of no namespace with rules), or
    /// why not. The client's namespace's rules and the node-wide ones apply.
    pub(crate) fn decide(
        &self,
        host: &str,
        port: u16,
        scope: Option<&str>,
    ) -> Result<&Target, ProxyError> {
        if let Some(t) = lookup(&self.exact, &self.wildcard, host, port, scope) {
            return Ok(t);
        }
        let mut allowed: Vec<u16> = self
            .exact
            .get(host)
            .into_iter()
            .flatten()
            .filter(|e| e.serves(e.port, scope))
            .map(|e| e.port)
            .collect();
        for (i, _) in host.match_indices('.') {
            allowed.extend(
                self.wildcard
                    .get(&host[i + 1..])
                    .into_iter()
                    .flatten()
                    .filter(|e| e.serves(e.port, scope))
                    .map(|e| e.port),
            );
        }
        allowed.sort_unstable();
        allowed.dedup();
        if allowed.is_empty() {
            Err(ProxyError::Denied {
                host: host.to_owned(),
            })
        } else {
            let allowed = allowed
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            Err(ProxyError::DeniedPort {
                host: host.to_owned(),
                port,
                allowed,
            })
        }
    }
}

impl Routes {
    /// The `tls` (passthrough) rule for a ClientHello's normalised server name `sni` on the
    /// connection's original `port`, for a client of `scope`; `None` when no such rule allows
    /// it. The same precedence as [`Routes::decide`]: exact names, then wildcards.
    pub(crate) fn decide_tls(&self, sni: &str, port: u16, scope: Option<&str>) -> Option<&Target> {
        lookup(&self.tls_exact, &self.tls_wildcard, sni, port, scope)
    }
}

fn alias_target(
    alias: &Alias,
    slot: usize,
    port: u16,
    rewrite: bool,
) -> Result<Target, ConfigError> {
    let protocol = Alias::protocol(port);
    let bad = || ConfigError::AliasName {
        alias: alias.name.clone(),
        name: alias.external_name.clone(),
    };
    let ext = normalise(&alias.external_name);
    let authority = Authority::try_from(format!("{ext}:{port}")).map_err(|_| bad())?;
    let default_port = match protocol {
        HttpProtocol::Http => 80,
        // An alias is never passthrough (`Alias::protocol`); 443 as https's.
        HttpProtocol::Https | HttpProtocol::Tls => 443,
    };
    let host_header = if !rewrite {
        None
    } else if port == default_port {
        Some(HeaderValue::try_from(ext.as_ref()).map_err(|_| bad())?)
    } else {
        Some(HeaderValue::try_from(authority.as_str()).map_err(|_| bad())?)
    };
    Ok(Target {
        slot,
        protocol,
        authority: Some(authority),
        host_header,
    })
}

/// A host name as the policy stores it ([`crate::policy::normalise_host`]): lowercase, without
/// one trailing dot. Request hosts are ASCII, where that is all the policy's normal form does.
pub(crate) fn normalise(name: &str) -> Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// Splits a request authority (`Host` header or absolute-URI authority) into a normalised host
/// and its explicit port. An IPv6 literal keeps its brackets (`[::1]`).
pub(crate) fn parse_authority(s: &str) -> Result<(Cow<'_, str>, Option<u16>), ProxyError> {
    let bad = || ProxyError::InvalidHost(s.to_owned());
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
        addr.parse::<Ipv6Addr>().map_err(|_| bad())?;
        let host = &s[..addr.len() + 2];
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        // `host:` is allowed by RFC 3986 and means the default port.
        None | Some("") => None,
        Some(p) if p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad)?)
        }
        Some(_) => return Err(bad()),
    };
    if !host.starts_with('[') {
        let name = host.strip_suffix('.').unwrap_or(host);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(bad());
        }
    }
    Ok((normalise(host), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{HttpPort, HttpRule, Origin};

    fn origin() -> Origin {
        Origin {
            file: "t.yaml".into(),
            line: 1,
        }
    }

    /// An http rule for `host`, written as in a policy file (`*.example.com` is a wildcard).
    fn rule(name: &str, host: &str, ports: &[(u16, HttpProtocol)]) -> HttpRule {
        let host = match host.strip_prefix("*.") {
            Some(domain) => HostPattern::Wildcard(domain.into()),
            None => HostPattern::Exact(host.into()),
        };
        let ports = ports
            .iter()
            .map(|&(port, protocol)| HttpPort { port, protocol })
            .collect();
        HttpRule {
            scope: None,
            name: name.into(),
            origin: origin(),
            host,
            ports,
        }
    }

    fn policy() -> Policy {
        use HttpProtocol::*;
        Policy {
            http_rules: vec![
                rule("exact", "api.example.com", &[(80, Http)]),
                rule("wild", "*.example.com", &[(80, Http), (443, Https)]),
                rule("deep", "*.b.example.com", &[(80, Http)]),
                rule("tls", "secure.test", &[(443, Https), (8443, Https)]),
            ],
            aliases: vec![Alias {
                scope: None,
                name: "httpbin".into(),
                namespace: "default".into(),
                origin: origin(),
                external_name: "httpbin.org".into(),
                ports: vec![80, 443],
            }],
            ..Policy::default()
        }
    }

    fn name_of(r: &Routes, host: &str, port: u16) -> Result<String, String> {
        r.decide(host, port, None)
            .map(|t| r.names[t.slot].0.clone())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn exact_and_wildcard() {
        let r = Routes::new(&policy()).unwrap();
        assert_eq!(name_of(&r, "api.example.com", 80).unwrap(), "exact");
        // An exact rule without the port falls through to the wildcard.
        assert_eq!(name_of(&r, "api.example.com", 443).unwrap(), "wild");
        assert_eq!(name_of(&r, "x.example.com", 80).unwrap(), "wild");
        assert_eq!(name_of(&r, "a.b.c.example.com", 443).unwrap(), "wild");
        // The longest suffix wins.
        assert_eq!(name_of(&r, "a.b.example.com", 80).unwrap(), "deep");
        assert_eq!(name_of(&r, "a.b.example.com", 443).unwrap(), "wild");
        // `*.example.com` never matches `example.com` itself, nor a look-alike.
        assert_eq!(
            name_of(&r, "example.com", 80).unwrap_err(),
            "host example.com is not allowed: no http rule or alias names it"
        );
        assert!(name_of(&r, "badexample.com", 80).is_err());
        assert!(name_of(&r, "example.com.evil.test", 80).is_err());
        assert_eq!(
            name_of(&r, "x.example.com", 8080).unwrap_err(),
            "host x.example.com is not allowed on port 8080 (its rules allow port 80, 443)"
        );
        let t = r.decide("secure.test", 8443, None).unwrap();
        assert_eq!(t.protocol, HttpProtocol::Https);
        assert_eq!(t.authority.as_ref().unwrap().as_str(), "secure.test:8443");
        assert!(
            r.decide("x.example.com", 80, None)
                .unwrap()
                .authority
                .is_none()
        );
    }

    #[test]
    fn wildcard_agrees_with_host_pattern() {
        let p = HostPattern::Wildcard("example.com".into());
        let r = Routes::new(&Policy {
            http_rules: vec![rule("w", "*.example.com", &[(80, HttpProtocol::Http)])],
            ..Policy::default()
        })
        .unwrap();
        for host in [
            "example.com",
            "a.example.com",
            "a.b.example.com",
            "aexample.com",
            "com",
            "x.com",
        ] {
            assert_eq!(r.decide(host, 80, None).is_ok(), p.matches(host), "{host}");
        }
    }

    #[test]
    fn aliases() {
        let r = Routes::new(&policy()).unwrap();
        for host in [
            "httpbin",
            "httpbin.default",
            "httpbin.default.svc",
            "httpbin.default.svc.cluster.local",
        ] {
            let t = r.decide(host, 80, None).unwrap();
            assert_eq!(r.names[t.slot], ("httpbin".to_owned(), true));
            assert_eq!(t.protocol, HttpProtocol::Http);
            assert_eq!(t.authority.as_ref().unwrap().as_str(), "httpbin.org:80");
            assert_eq!(t.host_header.as_ref().unwrap(), "httpbin.org");
            let t = r.decide(host, 443, None).unwrap();
            assert_eq!(t.protocol, HttpProtocol::Https);
            assert_eq!(t.authority.as_ref().unwrap().as_str(), "httpbin.org:443");
        }
        // The external name itself is allowed on the alias's ports, its Host kept.
        let t = r.decide("httpbin.org", 443, None).unwrap();
        assert_eq!(
            (t.protocol, t.host_header.is_none()),
            (HttpProtocol::Https, true)
        );
        assert!(r.decide("httpbin.other", 80, None).is_err());
        assert!(r.decide("httpbin", 8080, None).is_err());
    }

    #[test]
    fn alias_on_another_port_keeps_the_port_in_host() {
        let mut p = policy();
        p.aliases[0].ports = vec![8080];
        let r = Routes::new(&p).unwrap();
        let t = r.decide("httpbin", 8080, None).unwrap();
        assert_eq!(t.host_header.as_ref().unwrap(), "httpbin.org:8080");
        assert_eq!(t.protocol, HttpProtocol::Http);
    }

    #[test]
    fn authorities() {
        let ok = |s: &str| {
            parse_authority(s)
                .map(|(h, p)| (h.into_owned(), p))
                .unwrap()
        };
        assert_eq!(ok("Example.COM"), ("example.com".into(), None));
        assert_eq!(ok("example.com."), ("example.com".into(), None));
        assert_eq!(ok("EXAMPLE.com.:8080"), ("example.com".into(), Some(8080)));
        assert_eq!(ok("a_b.test:"), ("a_b.test".into(), None));
        assert_eq!(ok("[::1]:80"), ("[::1]".into(), Some(80)));
        assert_eq!(ok("[FE80::1]"), ("[fe80::1]".into(), None));
        assert_eq!(ok("10.0.0.1:443"), ("10.0.0.1".into(), Some(443)));
        for bad in [
            "", ".", "a..b", ".a", "a.b..", "a b", "a:b", "a:0", "a:65536", "a:1:2", "user@a",
            "a/b", "[::1", "[zz]", "[::1]x", "a:+80", "é.test", "a:000080",
        ] {
            assert!(parse_authority(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// A request's Host arrives in ASCII (HTTP carries no other), where the policy's
    /// normalisation (UTS 46, which also checks punycode) comes down to lowercasing and one
    /// trailing dot; the proxy does that without allocating. Wherever the policy accepts a
    /// name, both give the same result, so a rule's name and a request's host compare equal.
    #[test]
    fn agrees_with_the_policy_normal_form() {
        for host in [
            "example.test",
            "Example.TEST.",
            "xn--bcher-kva.test",
            "XN--BCHER-KVA.Test",
            "a-b.c-d.test",
            "httpbin",
            "httpbin.default.svc.cluster.local.",
            "0a.example.test",
            "a.b.c.d.e.f.example.test",
        ] {
            let policy = crate::policy::normalise_host(host).expect(host);
            let (ours, _) = parse_authority(host).expect(host);
            assert_eq!(ours, policy, "{host}");
        }
    }

    #[test]
    fn normalise_is_lowercase_without_one_trailing_dot() {
        assert_eq!(normalise("A.Test."), "a.test");
        assert_eq!(normalise("a.test"), "a.test");
        assert!(matches!(normalise("a.test"), Cow::Borrowed(_)));
    }

    #[test]
    fn a_namespaces_rules_are_for_its_pods_and_the_node_wide_ones_for_everyone() {
        use HttpProtocol::*;
        let mut a = rule("web", "api.test", &[(80, Http)]);
        a.scope = Some("team-a".into());
        let mut b = rule("web", "api.test", &[(8080, Http)]);
        b.scope = Some("team-b".into());
        let p = Policy {
            http_rules: vec![a, b, rule("shared", "shared.test", &[(80, Http)])],
            ..Policy::default()
        };
        let r = Routes::new(&p).unwrap();
        let name = |host, port, scope| {
            r.decide(host, port, scope)
                .map(|t| r.names[t.slot].0.clone())
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            name("api.test", 80, Some("team-a")),
            Ok("team-a/web".into())
        );
        assert_eq!(
            name("api.test", 8080, Some("team-b")),
            Ok("team-b/web".into())
        );
        // Another namespace's rule is not this pod's, nor a host process's: and the refusal
        // names only the ports this client has.
        assert!(name("api.test", 80, Some("team-b")).is_err());
        assert!(name("api.test", 80, None).is_err());
        let other = name("api.test", 8080, Some("team-a")).unwrap_err();
        assert!(other.contains("80") && !other.contains("8080, "), "{other}");
        for scope in [None, Some("team-a"), Some("kube-system")] {
            assert_eq!(name("shared.test", 80, scope), Ok("shared".into()));
        }
    }
}
