//! The DNS resolvers a policy allows, when its EgressConfig names none: the `nameserver` lines
//! of resolv.conf, read as glibc's resolver reads them, so the workloads may query exactly the
//! servers their libc will send queries to.
//!
//! glibc's reading, which [`read_resolv_conf`] follows: a line is a `nameserver` line when it
//! starts with `nameserver` followed by a space or a tab (an indented line is not one); the
//! address is what follows the blanks, up to the next blank; an IPv4 address is anything
//! `inet_aton` takes whole (`10.0.0.1`, and also `10.1`, `0x0a.0.0.1` or the octal `012.0.0.1`);
//! an IPv6 address may carry a `%scope`, which says which interface, not which address. Lines
//! starting with `#` or `;` are comments. Unlike glibc, an unreadable address is reported (glibc
//! skips it silently), and a file without any usable address allows no DNS at all, where glibc
//! would try 127.0.0.1 (loopback, which the default bypass ranges let through anyway).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use super::{
    model::{Dns, DnsSource, Policy},
    read::{ReadError, read_bounded},
};

/// The resolv.conf `egress run` and `egress check` read when not told another.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";

/// The largest resolv.conf read, in bytes: real ones hold a few lines, and the agent must not
/// read `/dev/zero` for ever if pointed at it.
pub const MAX_RESOLV_CONF_SIZE: u64 = 1024 * 1024;

/// The resolvers of the resolv.conf at `path`, in file order without duplicates (an
/// IPv4-mapped address as IPv4), and one warning for each `nameserver` line that names no
/// usable address, as `PATH:LINE: what is wrong`.
///
/// # Errors
/// The file cannot be read, or is larger than [`MAX_RESOLV_CONF_SIZE`].
pub fn read_resolv_conf(path: &Path) -> io::Result<(Vec<IpAddr>, Vec<String>)> {
    // Bounded and never blocking: a FIFO or device given as --resolv-conf is refused.
    let bytes = read_bounded(path, MAX_RESOLV_CONF_SIZE).map_err(|e| match e {
        ReadError::TooLarge { .. } => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{e}, too large for a resolv.conf"),
        ),
        other => io::Error::from(other),
    })?;
    Ok(parse(&path.display().to_string(), &bytes))
}

impl Policy {
    /// Fills [`Policy::dns`] from the resolv.conf at `path`, unless the EgressConfig named the
    /// resolvers (then it does nothing). Called at every load of a policy to enforce, so a
    /// changed resolv.conf is in force from the next reload on. Returns warnings for the user
    /// (lines that name no usable address; a missing file, which allows no DNS: fail closed).
    ///
    /// # Errors
    /// The file exists but cannot be read; the message names it.
    pub fn fill_resolvers(&mut self, path: &Path) -> Result<Vec<String>, io::Error> {
        if matches!(self.dns.source, DnsSource::Config(_)) {
            return Ok(Vec::new());
        }
        let (resolvers, mut warnings) = match read_resolv_conf(path) {
            Ok(found) => found,
            Err(e) if e.kind() == io::ErrorKind::NotFound => (
                Vec::new(),
                vec![format!(
                    "{}: not found; no DNS resolver is allowed",
                    path.display()
                )],
            ),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("reading the DNS resolvers from {}: {e}", path.display()),
                ));
            }
        };
        if resolvers.is_empty() && warnings.is_empty() {
            warnings.push(format!(
                "{}: no nameserver line; no DNS resolver is allowed",
                path.display()
            ));
        }
        self.dns = Dns {
            resolvers,
            source: DnsSource::ResolvConf(path.to_owned()),
        };
        Ok(warnings)
    }
}

/// The resolvers of a resolv.conf's contents, and the warnings (`name` is the file, for them).
fn parse(name: &str, bytes: &[u8]) -> (Vec<IpAddr>, Vec<String>) {
    let mut resolvers: Vec<IpAddr> = Vec::new();
    let mut warnings = Vec::new();
    for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let number = index + 1;
        let blank = |b: &u8| *b == b' ' || *b == b'\t';
        let Some(rest) = line.strip_prefix(b"nameserver") else {
            // glibc reads keywords only at the start of a line; say so rather than let an
            // indented line look like it counts.
            let indented = line.iter().position(|b| !blank(b)).filter(|&at| at > 0);
            if let Some(at) = indented
                && line[at..]
                    .strip_prefix(b"nameserver")
                    .is_some_and(|r| r.first().is_some_and(blank))
            {
                warnings.push(format!(
                    "{name}:{number}: an indented nameserver line, which glibc does not read; \
                     ignored"
                ));
            }
            continue;
        };
        // `nameserver` must be followed by a blank: `nameservers 10.0.0.1` is another keyword.
        if !rest.first().is_some_and(blank) {
            continue;
        }
        let start = rest.iter().position(|b| !blank(b)).unwrap_or(rest.len());
        let rest = &rest[start..];
        let end = rest.iter().position(blank).unwrap_or(rest.len());
        let text = String::from_utf8_lossy(&rest[..end]);
        if text.is_empty() {
            warnings.push(format!(
                "{name}:{number}: a nameserver line without an address"
            ));
            continue;
        }
        match parse_address(&text) {
            Some(address) => {
                let address = address.to_canonical();
                if !resolvers.contains(&address) {
                    resolvers.push(address);
                }
            }
            None => warnings.push(format!(
                "{name}:{number}: `{}` is not an IP address; this nameserver is not allowed",
                text.escape_debug()
            )),
        }
    }
    (resolvers, warnings)
}

/// A nameserver address as glibc takes it: IPv4 as `inet_aton` reads it, else IPv6 without
/// its `%scope`.
fn parse_address(text: &str) -> Option<IpAddr> {
    if let Some(v4) = inet_aton(text) {
        return Some(IpAddr::V4(v4));
    }
    let address = text.split_once('%').map_or(text, |(address, _)| address);
    address.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// `inet_aton`, whole string only: one to four numbers separated by dots, each decimal, octal
/// (a leading `0`) or hexadecimal (`0x`); the last fills the bytes the others leave
/// (`10.1` is 10.0.0.1, `167772161` is 10.0.0.1), each other one a byte.
fn inet_aton(text: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in parts {
        let (digits, radix) =
            if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
                (hex, 16)
            } else if part.len() > 1 && part.starts_with('0') {
                (&part[1..], 8)
            } else {
                (part, 10)
            };
        // from_str_radix would take a sign; inet_aton takes digits only.
        if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        values.push(u32::from_str_radix(digits, radix).ok()?);
    }
    let (last, bytes) = values.split_last()?;
    if bytes.iter().any(|&b| b > 0xff) {
        return None;
    }
    let last_bits = 32 - 8 * bytes.len() as u32;
    if last_bits < 32 && *last >> last_bits != 0 {
        return None;
    }
    let high = bytes
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, &b)| acc | b << (24 - 8 * i as u32));
    Some(Ipv4Addr::from(high | last))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::policy::{Origin, load_sources};
    use crate::testing::TempDir;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("valid literal")
    }

    /// A resolv.conf holding `contents` in `dir`.
    fn resolv_conf(dir: &TempDir, contents: impl AsRef<[u8]>) -> PathBuf {
        dir.file("resolv.conf", contents)
    }

    #[test]
    fn nameserver_lines_as_glibc_reads_them() {
        let text = "\
# Generated by NetworkManager
search example.test
nameserver 192.0.2.53
nameserver\t\t2001:db8::53   # a trailing comment
; nameserver 192.0.2.99
#nameserver 192.0.2.98
nameserver fe80::1%eth0
nameserver 192.0.2.53
nameserver ::ffff:192.0.2.54
nameservers 192.0.2.97
options edns0 trust-ad
nameserver 10.1
nameserver 0x0a.0.0.2
nameserver 012.0.0.3";
        let (resolvers, warnings) = parse("r.conf", text.as_bytes());
        assert_eq!(
            resolvers,
            [
                ip("192.0.2.53"),
                ip("2001:db8::53"),
                ip("fe80::1"),
                ip("192.0.2.54"),
                ip("10.0.0.1"),
                ip("10.0.0.2"),
                ip("10.0.0.3"),
            ]
        );
        assert!(warnings.is_empty(), "{warnings:#?}");
    }

    #[test]
    fn unusable_lines_are_skipped_with_a_warning_naming_the_line() {
        let text = "\
nameserver 192.0.2.300
  nameserver 192.0.2.1
nameserver
nameserver \t
nameserver dns.example.test
nameserver 192.0.2.2#comment
nameserver 192.0.2.3\r
nameserver 192.0.2.4
nameserver 1.2.3.4.5
nameserver 08.0.0.1
nameserver -1
";
        let (resolvers, warnings) = parse("r.conf", text.as_bytes());
        assert_eq!(resolvers, [ip("192.0.2.4")]);
        assert_eq!(
            warnings,
            [
                "r.conf:1: `192.0.2.300` is not an IP address; this nameserver is not allowed",
                "r.conf:2: an indented nameserver line, which glibc does not read; ignored",
                "r.conf:4: a nameserver line without an address",
                "r.conf:5: `dns.example.test` is not an IP address; this nameserver is not \
                 allowed",
                "r.conf:6: `192.0.2.2#comment` is not an IP address; this nameserver is not \
                 allowed",
                "r.conf:7: `192.0.2.3\\r` is not an IP address; this nameserver is not allowed",
                "r.conf:9: `1.2.3.4.5` is not an IP address; this nameserver is not allowed",
                "r.conf:10: `08.0.0.1` is not an IP address; this nameserver is not allowed",
                "r.conf:11: `-1` is not an IP address; this nameserver is not allowed",
            ]
        );
    }

    #[test]
    fn inet_aton_forms() {
        for (text, expected) in [
            ("1.2.3.4", Some("1.2.3.4")),
            ("167772161", Some("10.0.0.1")),
            ("10.1", Some("10.0.0.1")),
            ("10.1.2", Some("10.1.0.2")),
            ("10.1.65535", Some("10.1.255.255")),
            ("0x7f.1", Some("127.0.0.1")),
            ("0", Some("0.0.0.0")),
            ("0377.0.0.1", Some("255.0.0.1")),
            ("10.1.65536", None),
            ("256.1.1.1", None),
            ("1.2.3.256", None),
            ("0x", None),
            ("1..2", None),
            ("", None),
            ("+1.2.3.4", None),
            ("4294967296", None),
        ] {
            assert_eq!(
                inet_aton(text),
                expected.map(|e| e.parse().expect("valid literal")),
                "{text}"
            );
        }
    }

    #[test]
    fn read_resolv_conf_reads_a_file_and_refuses_a_huge_one() {
        let dir = TempDir::new("resolv");
        let file = resolv_conf(&dir, b"nameserver 192.0.2.53\nnameserver bogus\n");
        let (resolvers, warnings) = read_resolv_conf(&file).expect("readable");
        assert_eq!(resolvers, [ip("192.0.2.53")]);
        assert_eq!(
            warnings,
            [format!(
                "{}:2: `bogus` is not an IP address; this nameserver is not allowed",
                file.display()
            )]
        );
        let huge = dir.file("huge.conf", vec![b'#'; MAX_RESOLV_CONF_SIZE as usize + 1]);
        let error = read_resolv_conf(&huge).expect_err("too large");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(
            error.to_string().contains("too large for a resolv.conf"),
            "{error}"
        );
    }

    #[test]
    fn fill_resolvers_reads_resolv_conf_unless_the_config_names_them() {
        let dir = TempDir::new("resolv");
        let file = resolv_conf(&dir, b"nameserver 192.0.2.53\n");
        let mut policy = Policy::default();
        assert_eq!(policy.dns.source, DnsSource::None);
        assert_eq!(
            policy.fill_resolvers(&file).expect("readable"),
            Vec::<String>::new()
        );
        assert_eq!(policy.dns.resolvers, [ip("192.0.2.53")]);
        assert_eq!(policy.dns.source, DnsSource::ResolvConf(file.clone()));
        // Read again at the next load: a changed file is picked up.
        std::fs::write(&file, "nameserver 192.0.2.54\n").expect("rewrite");
        policy.fill_resolvers(&file).expect("readable");
        assert_eq!(policy.dns.resolvers, [ip("192.0.2.54")]);

        let mut configured = load_sources(&[(
            "p.yaml".to_owned(),
            b"kind: EgressConfig\nspec:\n  dns:\n    resolvers: [192.0.2.1]\n".to_vec(),
        )])
        .expect("valid");
        let before = configured.dns.clone();
        assert_eq!(
            before.source,
            DnsSource::Config(Origin {
                file: "p.yaml".to_owned(),
                line: 3
            })
        );
        assert!(
            configured
                .fill_resolvers(&file)
                .expect("untouched")
                .is_empty()
        );
        assert_eq!(configured.dns, before);
    }

    #[test]
    fn a_missing_resolv_conf_allows_no_dns_and_says_so() {
        let dir = TempDir::new("no-resolv");
        let path = dir.join("resolv.conf");
        let mut policy = Policy::default();
        let warnings = policy
            .fill_resolvers(&path)
            .expect("missing is not an error");
        assert_eq!(
            warnings,
            [format!(
                "{}: not found; no DNS resolver is allowed",
                path.display()
            )]
        );
        assert!(policy.dns.resolvers.is_empty());
        assert_eq!(policy.dns.source, DnsSource::ResolvConf(path));
    }

    #[test]
    fn an_empty_resolv_conf_allows_no_dns_and_says_so() {
        let dir = TempDir::new("resolv");
        let file = resolv_conf(&dir, b"# nothing here\nsearch example.test\n");
        let mut policy = Policy::default();
        let warnings = policy.fill_resolvers(&file).expect("readable");
        assert_eq!(
            warnings,
            [format!(
                "{}: no nameserver line; no DNS resolver is allowed",
                file.display()
            )]
        );
        assert!(policy.dns.resolvers.is_empty());
    }

    #[test]
    fn an_unreadable_resolv_conf_is_an_error_naming_it() {
        // A directory exists but cannot be read as a file.
        let dir = TempDir::new("resolv-dir");
        let error = Policy::default()
            .fill_resolvers(&dir)
            .expect_err("a directory is not a resolv.conf");
        assert!(
            error.to_string().starts_with(&format!(
                "reading the DNS resolvers from {}: ",
                dir.display()
            )),
            "{error}"
        );
    }
}
