//! Destination, bypass and `hosts` addresses: a CIDR or a single IP, IPv4 or IPv6, written
//! exactly.
//!
//! Stricter than [`IpNet`]'s own parser on purpose, and with a reason for every rejection:
//! `10.0.0.1/24` is refused rather than silently truncated (did the author mean the /24 or the
//! one host?), `010.0.0.1` is refused because `inet_aton` and many tools read a leading zero as
//! octal (`010` = 8), and an IPv4-mapped IPv6 rule is refused because it could never match:
//! connect6 judges `::ffff:a.b.c.d` by the IPv4 rules. So are rules and bypass ranges inside
//! the NAT64 and 6to4 ranges ([`not_embedded`]), for the same reason.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::model::Embedded;

/// Why a text is not an acceptable network.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AddrError {
    /// `10.0.0.1/24`: bits set after the prefix.
    #[error("`{text}` has host bits set; did you mean `{network}`?")]
    HostBits {
        /// As written.
        text: String,
        /// The network the prefix describes.
        network: IpNet,
    },
    /// `10.0.0.0/33`.
    #[error("`{text}`: prefix length {prefix} is over {max}, the most an IPv{family} address has")]
    PrefixTooLong {
        /// As written.
        text: String,
        /// The prefix length given.
        prefix: u32,
        /// 32 or 128.
        max: u8,
        /// 4 or 6.
        family: u8,
    },
    /// `10.0.0.0/abc`, `10.0.0.0/08`, `10.0.0.0/`.
    #[error("`{text}`: prefix length `{prefix}` is not a number from 0 to {max}")]
    BadPrefix {
        /// As written.
        text: String,
        /// The text after the `/`.
        prefix: String,
        /// 32 or 128.
        max: u8,
    },
    /// `010.0.0.1`.
    #[error(
        "`{text}`: octet `{octet}` has a leading zero, which some tools read as octal; \
         write it without"
    )]
    LeadingZero {
        /// As written.
        text: String,
        /// The offending octet.
        octet: String,
    },
    /// `256.1.1.1`.
    #[error("`{text}`: octet `{octet}` is over 255")]
    OctetRange {
        /// As written.
        text: String,
        /// The offending octet.
        octet: String,
    },
    /// `10.0.0`, `1.2.3.4.5`, `1..2.3`.
    #[error("`{text}` is not an IPv4 address (four numbers 0-255 separated by dots)")]
    BadIpv4 {
        /// As written.
        text: String,
    },
    /// `2001:db8:::1`, `fe80::1%eth0`.
    #[error("`{text}` is not a valid IPv6 address")]
    BadIpv6 {
        /// As written.
        text: String,
    },
    /// `::ffff:10.0.0.1`: never matches, connect6 hands these to the IPv4 rules.
    #[error(
        "`{text}` is an IPv4-mapped IPv6 network, which the IPv4 rules already judge; \
         write `{ipv4}`"
    )]
    Ipv4Mapped {
        /// As written.
        text: String,
        /// The same network written as IPv4.
        ipv4: Ipv4Net,
    },
    /// `64:ff9b::c000:200/120`, `2002:c000:200::/40`: never matches, the kernel judges NAT64
    /// and 6to4 destinations by the IPv4 rules as their embedded IPv4 address.
    #[error(
        "`{text}` lies inside the {range} range, whose destinations the kernel judges by the \
         IPv4 rules as their embedded IPv4 address, never by IPv6 rules or bypass ranges; \
         write `{ipv4}`"
    )]
    Embedded {
        /// As written.
        text: String,
        /// The range it lies in.
        range: Embedded,
        /// The IPv4 network its addresses are judged as.
        ipv4: Ipv4Net,
    },
    /// `httpbin.org`, `*.example.com`: a name, not an address.
    #[error("`{text}` is a host name, not an address")]
    HostName {
        /// As written.
        text: String,
    },
    /// Anything else.
    #[error("`{text}` is not a CIDR or an IP address")]
    Invalid {
        /// As written.
        text: String,
    },
    /// `10.0.0.0/8` where one address is wanted (a `hosts` entry).
    #[error("`{text}` is a network; a single IP address is needed here")]
    NotSingle {
        /// As written.
        text: String,
    },
    /// `::ffff:10.0.0.1` where one address is wanted: the proxy would connect over IPv4
    /// anyway, so say it plainly.
    #[error("`{text}` is an IPv4-mapped IPv6 address; write `{ipv4}`")]
    MappedAddress {
        /// As written.
        text: String,
        /// The same address written as IPv4.
        ipv4: Ipv4Addr,
    },
    /// `0.0.0.0`, `::`, `224.0.0.1`, `255.255.255.255`: not an address a host is reached at
    /// (a connect() to `0.0.0.0` even reaches the local machine).
    #[error("`{text}` is not an address a host can have (unspecified, multicast or broadcast)")]
    NotHostAddress {
        /// As written.
        text: String,
    },
}

/// Parses a CIDR (`91.198.174.192/27`, `2001:db8::/32`) or a single address (`10.0.0.1` is
/// `10.0.0.1/32`, `::1` is `::1/128`).
pub(crate) fn parse_net(text: &str) -> Result<IpNet, AddrError> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let address = parse_addr(text, address, prefix.is_some())?;
    let max = match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    let prefix = match prefix {
        None => max,
        Some(prefix) => parse_prefix(text, prefix, max)?,
    };
    let net = match address {
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, prefix).expect("prefix checked above")),
        IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, prefix).expect("prefix checked above")),
    };
    if net.trunc() != net {
        return Err(AddrError::HostBits {
            text: text.to_owned(),
            network: net.trunc(),
        });
    }
    if let IpNet::V6(v6) = net
        && let Some(ipv4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
    {
        return Err(AddrError::Ipv4Mapped {
            text: text.to_owned(),
            ipv4: Ipv4Net::new(ipv4, v6.prefix_len() - 96).expect("96..=128 minus 96 fits"),
        });
    }
    Ok(net)
}

/// Refuses an IPv6 rule destination or bypass range that lies inside the NAT64 or 6to4 range
/// ([`Embedded`]): the kernel never judges those addresses by the IPv6 rules and bypass
/// ranges, so it could never match. `text` is the network as written, for the message.
pub(crate) fn not_embedded(text: &str, net: IpNet) -> Result<IpNet, AddrError> {
    let IpNet::V6(v6) = net else {
        return Ok(net);
    };
    match Embedded::ALL
        .into_iter()
        .find_map(|range| range.ipv4_net(v6).map(|ipv4| (range, ipv4)))
    {
        Some((range, ipv4)) => Err(AddrError::Embedded {
            text: text.to_owned(),
            range,
            ipv4,
        }),
        None => Ok(net),
    }
}

/// Parses one host's address (`10.0.0.1`, `2001:db8::1`), as strictly as [`parse_net`]: no
/// prefix, no IPv4-mapped form, nothing a host cannot be reached at.
pub(crate) fn parse_ip(text: &str) -> Result<IpAddr, AddrError> {
    let owned = || text.to_owned();
    let net = match parse_net(text) {
        Ok(net) => net,
        Err(AddrError::Ipv4Mapped { ipv4, .. }) if !text.contains('/') => {
            return Err(AddrError::MappedAddress {
                text: owned(),
                ipv4: ipv4.addr(),
            });
        }
        Err(e) => return Err(e),
    };
    if text.contains('/') {
        return Err(AddrError::NotSingle { text: owned() });
    }
    let address = net.addr();
    let broadcast = address == IpAddr::V4(Ipv4Addr::BROADCAST);
    if address.is_unspecified() || address.is_multicast() || broadcast {
        return Err(AddrError::NotHostAddress { text: owned() });
    }
    Ok(address)
}

/// The prefix length after the `/`: decimal digits without a leading zero, at most `max`.
fn parse_prefix(text: &str, prefix: &str, max: u8) -> Result<u8, AddrError> {
    let bad = || AddrError::BadPrefix {
        text: text.to_owned(),
        prefix: prefix.to_owned(),
        max,
    };
    let canonical = !prefix.is_empty()
        && prefix.bytes().all(|b| b.is_ascii_digit())
        && (prefix == "0" || !prefix.starts_with('0'));
    if !canonical {
        return Err(bad());
    }
    match prefix.parse::<u32>() {
        Ok(n) if n <= u32::from(max) => Ok(u8::try_from(n).expect("at most 128")),
        Ok(n) => Err(AddrError::PrefixTooLong {
            text: text.to_owned(),
            prefix: n,
            max,
            family: if max == 32 { 4 } else { 6 },
        }),
        // More digits than a u32 holds: a prefix length, but far too long.
        Err(_) => Err(bad()),
    }
}

/// The address part of `text` (before any `/`).
fn parse_addr(text: &str, address: &str, has_prefix: bool) -> Result<IpAddr, AddrError> {
    if address.contains(':') {
        return address
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| AddrError::BadIpv6 {
                text: text.to_owned(),
            });
    }
    if !address.is_empty() && address.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return parse_ipv4(text, address).map(IpAddr::V4);
    }
    if !has_prefix && is_host_name(address) {
        return Err(AddrError::HostName {
            text: text.to_owned(),
        });
    }
    Err(AddrError::Invalid {
        text: text.to_owned(),
    })
}

/// A dotted quad, each octet decimal without a leading zero.
///
/// `Ipv4Addr::from_str` already refuses leading zeros and out-of-range octets (a test checks
/// it); we parse by hand only to say which octet is wrong and why.
fn parse_ipv4(text: &str, address: &str) -> Result<Ipv4Addr, AddrError> {
    let parts: Vec<&str> = address.split('.').collect();
    if parts.len() != 4 || parts.iter().any(|p| p.is_empty()) {
        return Err(AddrError::BadIpv4 {
            text: text.to_owned(),
        });
    }
    let mut octets = [0u8; 4];
    for (octet, part) in octets.iter_mut().zip(&parts) {
        if part.len() > 1 && part.starts_with('0') {
            return Err(AddrError::LeadingZero {
                text: text.to_owned(),
                octet: (*part).to_owned(),
            });
        }
        *octet = part.parse().map_err(|_| AddrError::OctetRange {
            text: text.to_owned(),
            octet: (*part).to_owned(),
        })?;
    }
    Ok(Ipv4Addr::from(octets))
}

/// Whether `text` reads as a DNS name (`httpbin.org`) or a wildcard (`*.example.com`), so the
/// message can say "a host name where an address belongs" rather than "not an address".
pub(crate) fn is_host_name(text: &str) -> bool {
    let name = text.strip_suffix('.').unwrap_or(text);
    let name = name.strip_prefix("*.").unwrap_or(name);
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().any(|b| b.is_ascii_alphabetic())
        && name.split('.').all(label_ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_refused_saying;

    fn net(text: &str) -> IpNet {
        parse_net(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn single_addresses_become_host_networks() {
        assert_eq!(net("10.0.0.1"), "10.0.0.1/32".parse::<IpNet>().unwrap());
        assert_eq!(
            net("2001:db8::1"),
            "2001:db8::1/128".parse::<IpNet>().unwrap()
        );
        assert_eq!(net("0.0.0.0/0"), "0.0.0.0/0".parse::<IpNet>().unwrap());
        assert_eq!(net("::/0"), "::/0".parse::<IpNet>().unwrap());
    }

    #[test]
    fn std_parser_refuses_leading_zeros_and_big_octets() {
        // The brief relies on this; if std ever relaxed it, parse_ipv4 still would not.
        assert!("010.0.0.1".parse::<Ipv4Addr>().is_err());
        assert!("256.1.1.1".parse::<Ipv4Addr>().is_err());
        assert!("1.2.3.4".parse::<Ipv4Addr>().is_ok());
    }

    #[test]
    fn every_rejection_says_why() {
        let cases = [
            ("10.0.0.1/24", "did you mean `10.0.0.0/24`?"),
            ("2001:db8::1/32", "did you mean `2001:db8::/32`?"),
            ("10.0.0.0/33", "prefix length 33 is over 32"),
            ("::/129", "prefix length 129 is over 128"),
            ("10.0.0.0/99999999999", "is not a number from 0 to 32"),
            ("10.0.0.0/08", "is not a number from 0 to 32"),
            ("10.0.0.0/", "is not a number from 0 to 32"),
            ("010.0.0.1", "octet `010` has a leading zero"),
            ("256.1.1.1", "octet `256` is over 255"),
            ("1.2.3", "is not an IPv4 address"),
            ("1..2.3", "is not an IPv4 address"),
            ("fe80::1%eth0", "is not a valid IPv6 address"),
            ("::ffff:10.0.0.1", "write `10.0.0.1/32`"),
            ("::ffff:10.0.0.0/120", "write `10.0.0.0/24`"),
            ("httpbin.org", "is a host name"),
            ("*.example.com", "is a host name"),
            ("example.com/24", "is not a CIDR or an IP address"),
            ("", "is not a CIDR or an IP address"),
            ("10.0.0.1 ", "is not a CIDR or an IP address"),
        ];
        assert_refused_saying(parse_net, &cases);
    }

    #[test]
    fn nat64_and_6to4_networks_say_which_ipv4_network_to_write() {
        let cases = [
            (
                "64:ff9b::c000:200/120",
                "NAT64 (64:ff9b::/96)",
                "192.0.2.0/24",
            ),
            ("64:ff9b::c000:201", "NAT64 (64:ff9b::/96)", "192.0.2.1/32"),
            ("64:ff9b::/96", "NAT64 (64:ff9b::/96)", "0.0.0.0/0"),
            ("2002:c000:200::/40", "6to4 (2002::/16)", "192.0.2.0/24"),
            ("2002:c000:201::/48", "6to4 (2002::/16)", "192.0.2.1/32"),
            ("2002:c000:201:1::/64", "6to4 (2002::/16)", "192.0.2.1/32"),
            ("2002::/16", "6to4 (2002::/16)", "0.0.0.0/0"),
        ];
        for (text, range, ipv4) in cases {
            let error = not_embedded(text, net(text)).expect_err(text).to_string();
            assert_eq!(
                error,
                format!(
                    "`{text}` lies inside the {range} range, whose destinations the kernel \
                     judges by the IPv4 rules as their embedded IPv4 address, never by IPv6 \
                     rules or bypass ranges; write `{ipv4}`"
                )
            );
        }
        // Wider networks contain the ranges without lying inside them; others miss them.
        for text in [
            "::/0",
            "2000::/3",
            "64:ff9b::/64",
            "2001:db8::/32",
            "64:ff9a::/32",
            "192.0.2.0/24",
        ] {
            assert_eq!(not_embedded(text, net(text)), Ok(net(text)), "{text}");
        }
    }

    #[test]
    fn single_host_addresses() {
        assert_eq!(
            parse_ip("192.0.2.1"),
            Ok(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)))
        );
        assert_eq!(parse_ip("2001:db8::1"), Ok("2001:db8::1".parse().unwrap()));
        let cases = [
            (
                "192.0.2.0/24",
                "is a network; a single IP address is needed here",
            ),
            ("192.0.2.1/32", "is a network"),
            (
                "::ffff:192.0.2.1",
                "IPv4-mapped IPv6 address; write `192.0.2.1`",
            ),
            ("0.0.0.0", "is not an address a host can have"),
            ("::", "is not an address a host can have"),
            ("224.0.0.1", "is not an address a host can have"),
            ("ff02::1", "is not an address a host can have"),
            ("255.255.255.255", "is not an address a host can have"),
            ("010.0.0.1", "leading zero"),
            ("example.test", "is a host name"),
            ("192.0.2.1/24", "has host bits set"),
        ];
        assert_refused_saying(parse_ip, &cases);
    }
}
