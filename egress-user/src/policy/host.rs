//! Host names and `*.`-wildcards: checked and normalised once, here, so every later comparison
//! is a plain string comparison.
//!
//! The normal form is what DNS and TLS use on the wire: ASCII (an IDN such as `bücher.test`
//! becomes `xn--bcher-kva.test`, by UTS 46 as browsers and curl do), lowercase, without the
//! trailing dot of a fully qualified name. Without it `Example.test.` in a policy would never
//! match the `example.test` a client sends.
//!
//! A wildcard must sit below a registrable domain: `*` alone, `*.com`, `*.co.uk` or
//! `*.github.io` would allow whole swathes of the internet (anyone can register a name there),
//! which is never what a rule means. "Public suffix" is decided by the Public Suffix List
//! embedded in the `psl` crate, including its default rule that any unlisted top-level domain
//! (`*.test`, `*.internal`) is one.

use std::net::IpAddr;

use super::model::{HostName, HostPattern};

/// The longest host name DNS carries, in ASCII, without the trailing dot (RFC 1035: 255
/// octets on the wire).
pub const MAX_HOST_LEN: usize = 253;
/// The longest label (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a text is not an acceptable host name or wildcard. Each variant carries the text as
/// written (escaped for printing).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// `""`, `"."`.
    #[error("the host name is empty")]
    Empty,
    /// `*`.
    #[error("`*` alone would allow every host; name a domain, as in `*.example.test`")]
    BareWildcard,
    /// `a.*.example.test`, `*example.test`.
    #[error("`{text}`: `*` may only be the whole first label, as in `*.example.test`")]
    MisplacedWildcard {
        /// As written.
        text: String,
    },
    /// `*.example.test` where one host is wanted (an externalName, a `hosts` entry).
    #[error("`{text}` is a wildcard; a single host name is needed here")]
    WildcardNotAllowed {
        /// As written.
        text: String,
    },
    /// `10.0.0.1`, `[::1]` where a name is needed.
    #[error("`{text}` is an IP address, not a host name")]
    IpAddress {
        /// As written.
        text: String,
    },
    /// `example.123`, `1.2.3`: clients (and `inet_aton`) read a numeric last label as an IPv4
    /// address, so such a name would never be looked up in DNS.
    #[error("`{text}` ends in a number, so clients read it as an IP address, not a host name")]
    NumericLastLabel {
        /// As written.
        text: String,
    },
    /// UTS 46 refuses it: a disallowed code point, broken punycode (`xn--a`).
    #[error("`{text}` is not a valid internationalised host name")]
    Idna {
        /// As written.
        text: String,
    },
    /// UTS 46 maps it to another name, not only to lower case: a zero-width character it drops
    /// (`exa\u{200b}mple.test`), a fullwidth or other compatibility form it folds
    /// (`ｅｘａｍｐｌｅ.test`). The rule would then match a name that is not what the file
    /// shows a reviewer, so it must be written as what it means.
    #[error(
        "`{text}` holds characters that IDNA folds away (zero-width, fullwidth or other \
         compatibility forms): it means `{folded}`; write that"
    )]
    Folded {
        /// As written.
        text: String,
        /// What it means, in Unicode.
        folded: String,
    },
    /// A label that breaks RFC 1123 once in ASCII.
    #[error("`{text}`: label `{label}` {problem}")]
    BadLabel {
        /// As written.
        text: String,
        /// The label, in ASCII.
        label: String,
        /// What is wrong with it.
        problem: LabelProblem,
    },
    /// Over [`MAX_HOST_LEN`] in ASCII.
    #[error("`{text}` is {len} characters long in ASCII; a host name has at most {MAX_HOST_LEN}")]
    TooLong {
        /// As written.
        text: String,
        /// The ASCII length (with the `*.` of a wildcard).
        len: usize,
    },
    /// `*.co.uk`: a suffix the Public Suffix List names.
    #[error(
        "`{text}` would allow every domain under the public suffix `{suffix}`; \
         name a domain below it, as in `*.example.{suffix}`"
    )]
    PublicSuffix {
        /// As written.
        text: String,
        /// The normalised suffix.
        suffix: String,
    },
    /// `*.test`: a top-level domain, a public suffix by the list's default rule.
    #[error(
        "`{text}` would allow every domain under the top-level domain `{suffix}`; \
         name a domain below it, as in `*.example.{suffix}`"
    )]
    TopLevelDomain {
        /// As written.
        text: String,
        /// The normalised top-level domain.
        suffix: String,
    },
}

/// What is wrong with one label of a host name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelProblem {
    /// `a..b`.
    #[error("is empty")]
    Empty,
    /// Over [`MAX_LABEL_LEN`].
    #[error("is longer than {MAX_LABEL_LEN} characters")]
    TooLong,
    /// `a_b`, `a b`, `a/b`.
    #[error("may hold only letters, digits and '-'")]
    BadCharacter,
    /// `-a`, `a-`.
    #[error("starts or ends with '-'")]
    Hyphen,
}

/// A host name as it will be compared: ASCII, lowercase, no trailing dot. No wildcard, no IP
/// address. This is also how the proxy must normalise a request's Host before
/// [`HostPattern::matches`].
///
/// # Errors
/// Why `text` is not a host name.
pub fn normalise_host(text: &str) -> Result<HostName, HostError> {
    match parse_pattern(text)? {
        HostPattern::Exact(name) => Ok(name),
        HostPattern::Wildcard(_) => Err(HostError::WildcardNotAllowed { text: shown(text) }),
    }
}

/// A host name or a `*.`-wildcard, normalised (see [`normalise_host`]); a wildcard must lie
/// below a registrable domain.
pub(crate) fn parse_pattern(text: &str) -> Result<HostPattern, HostError> {
    let trimmed = text.strip_suffix('.').unwrap_or(text);
    if trimmed.is_empty() {
        return Err(HostError::Empty);
    }
    if trimmed == "*" {
        return Err(HostError::BareWildcard);
    }
    let (wildcard, name) = match trimmed.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, trimmed),
    };
    if name.contains('*') {
        return Err(HostError::MisplacedWildcard { text: shown(text) });
    }
    let unbracketed = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if unbracketed.parse::<IpAddr>().is_ok() {
        return Err(HostError::IpAddress { text: shown(text) });
    }
    let ascii = idna::domain_to_ascii(name).map_err(|_| HostError::Idna { text: shown(text) })?;
    if !name.is_ascii() {
        check_not_folded(text, name, &ascii)?;
    }
    check_labels(text, &ascii)?;
    let len = ascii.len() + if wildcard { 2 } else { 0 };
    if len > MAX_HOST_LEN {
        return Err(HostError::TooLong {
            text: shown(text),
            len,
        });
    }
    if !wildcard {
        return Ok(HostPattern::Exact(ascii));
    }
    if let Some(suffix) = psl::suffix(ascii.as_bytes())
        && suffix.as_bytes() == ascii.as_bytes()
    {
        return Err(if suffix.is_known() {
            HostError::PublicSuffix {
                text: shown(text),
                suffix: ascii,
            }
        } else {
            HostError::TopLevelDomain {
                text: shown(text),
                suffix: ascii,
            }
        });
    }
    Ok(HostPattern::Wildcard(ascii))
}

/// Refuses a non-ASCII `name` whose meaning (`ascii`, back in Unicode) differs from it by more
/// than lower case: see [`HostError::Folded`].
fn check_not_folded(text: &str, name: &str, ascii: &str) -> Result<(), HostError> {
    let (unicode, result) = idna::domain_to_unicode(ascii);
    let lowered: String = name.chars().flat_map(char::to_lowercase).collect();
    if result.is_err() || unicode == lowered {
        return Ok(());
    }
    Err(HostError::Folded {
        text: shown(text),
        folded: unicode,
    })
}

/// RFC 1123 labels in the ASCII form, and a last label that is not a number.
fn check_labels(text: &str, ascii: &str) -> Result<(), HostError> {
    for label in ascii.split('.') {
        let problem = if label.is_empty() {
            Some(LabelProblem::Empty)
        } else if label.len() > MAX_LABEL_LEN {
            Some(LabelProblem::TooLong)
        } else if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            Some(LabelProblem::BadCharacter)
        } else if label.starts_with('-') || label.ends_with('-') {
            Some(LabelProblem::Hyphen)
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(HostError::BadLabel {
                text: shown(text),
                label: shown(label),
                problem,
            });
        }
    }
    // The WHATWG URL parser's "ends in a number": decimal, or 0x and hex digits.
    let last = ascii.rsplit('.').next().unwrap_or(ascii);
    let numeric = last.bytes().all(|b| b.is_ascii_digit())
        || last
            .strip_prefix("0x")
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        return Err(HostError::NumericLastLabel { text: shown(text) });
    }
    Ok(())
}

/// `text` as messages show it: control characters and quotes escaped.
fn shown(text: &str) -> String {
    text.escape_debug().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::assert_refused_saying;

    fn pattern(text: &str) -> HostPattern {
        parse_pattern(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn exact(name: &str) -> HostPattern {
        HostPattern::Exact(name.to_owned())
    }

    fn wildcard(suffix: &str) -> HostPattern {
        HostPattern::Wildcard(suffix.to_owned())
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(pattern("example.test"), exact("example.test"));
        assert_eq!(pattern("Example.TEST"), exact("example.test"));
        assert_eq!(pattern("example.test."), exact("example.test"));
        assert_eq!(pattern("bücher.test"), exact("xn--bcher-kva.test"));
        // Upper case is only case: not a fold to refuse.
        assert_eq!(pattern("BÜCHER.test"), exact("xn--bcher-kva.test"));
        assert_eq!(pattern("BÜCHER.test"), exact("xn--bcher-kva.test"));
        assert_eq!(pattern("XN--BCHER-KVA.test"), exact("xn--bcher-kva.test"));
        assert_eq!(pattern("httpbin"), exact("httpbin"));
        assert_eq!(pattern("*.Example.test."), wildcard("example.test"));
        assert_eq!(pattern("*.bücher.test"), wildcard("xn--bcher-kva.test"));
        // A suffix with a registrable part is fine, private suffixes' subdomains too.
        assert_eq!(pattern("*.example.co.uk"), wildcard("example.co.uk"));
        assert_eq!(
            pattern("*.svc.cluster.local"),
            wildcard("svc.cluster.local")
        );
        assert_eq!(pattern("a-b.x1.test"), exact("a-b.x1.test"));
        assert_eq!(
            normalise_host("WWW.Example.Test.").as_deref(),
            Ok("www.example.test")
        );
    }

    #[test]
    fn wildcards_match_strictly_below_their_suffix() {
        let rule = pattern("*.example.test");
        assert!(rule.matches("a.example.test"));
        assert!(rule.matches("a.b.example.test"));
        assert!(!rule.matches("example.test"));
        assert!(!rule.matches("aexample.test"));
        assert!(!rule.matches("a.example.test.evil.test"));
        let rule = pattern("example.test");
        assert!(rule.matches("example.test"));
        assert!(!rule.matches("a.example.test"));
    }

    #[test]
    fn longest_names_and_labels() {
        let label = "a".repeat(MAX_LABEL_LEN);
        assert!(parse_pattern(&format!("{label}.test")).is_ok());
        // 63 + 1 + 63 + 1 + 63 + 1 + 61 = 253.
        let name = format!("{label}.{label}.{label}.{}", "b".repeat(61));
        assert_eq!(name.len(), MAX_HOST_LEN);
        assert!(parse_pattern(&name).is_ok());
        assert!(parse_pattern(&format!("{name}.")).is_ok());
    }

    #[test]
    fn every_rejection_says_why() {
        let label = "a".repeat(MAX_LABEL_LEN);
        let too_long = format!("{label}.{label}.{label}.{}", "b".repeat(62));
        let long_label = format!("{}.test", "a".repeat(MAX_LABEL_LEN + 1));
        let cases: &[(&str, &str)] = &[
            ("", "the host name is empty"),
            (".", "the host name is empty"),
            ("*", "`*` alone would allow every host"),
            ("*.", "`*` alone would allow every host"),
            (
                "a.*.test",
                "`a.*.test`: `*` may only be the whole first label",
            ),
            ("*example.test", "`*` may only be the whole first label"),
            ("*.*.example.test", "`*` may only be the whole first label"),
            ("10.0.0.1", "`10.0.0.1` is an IP address, not a host name"),
            ("::1", "is an IP address"),
            ("[2001:db8::1]", "is an IP address"),
            ("*.10.0.0.1", "`*.10.0.0.1` is an IP address"),
            ("example.123", "ends in a number"),
            ("1.2.3", "ends in a number"),
            ("example.0x1f", "ends in a number"),
            ("xn--a.test", "is not a valid internationalised host name"),
            (
                "\u{ff45}\u{ff58}ample.test",
                "`\u{ff45}\u{ff58}ample.test` holds characters that IDNA folds away \
                 (zero-width, fullwidth or other compatibility forms): it means \
                 `example.test`; write that",
            ),
            ("exa\u{200b}mple.test", "it means `example.test`"),
            ("exa\u{ad}mple.test", "it means `example.test`"),
            ("*.\u{ff45}xample.test", "it means `example.test`"),
            ("b\u{fc}cher\u{2160}.test", "it means `b\u{fc}cheri.test`"),
            ("a..b.test", "label `` is empty"),
            (&long_label, "is longer than 63 characters"),
            (
                "a_b.test",
                "label `a_b` may hold only letters, digits and '-'",
            ),
            ("a b.test", "may hold only letters, digits and '-'"),
            ("-a.test", "label `-a` starts or ends with '-'"),
            ("a-.test", "starts or ends with '-'"),
            (
                &too_long,
                "is 254 characters long in ASCII; a host name has at most 253",
            ),
            (
                "*.com",
                "`*.com` would allow every domain under the public suffix `com`",
            ),
            ("*.co.uk", "under the public suffix `co.uk`"),
            ("*.CO.UK.", "under the public suffix `co.uk`"),
            ("*.github.io", "under the public suffix `github.io`"),
            ("*.рф", "under the public suffix `xn--p1ai`"),
            ("*.test", "under the top-level domain `test`"),
            ("*.internal", "under the top-level domain `internal`"),
        ];
        assert_refused_saying(parse_pattern, cases);
        assert_eq!(
            normalise_host("*.example.test")
                .expect_err("wildcard")
                .to_string(),
            "`*.example.test` is a wildcard; a single host name is needed here"
        );
        assert_eq!(
            parse_pattern("a\tb.test").expect_err("tab").to_string(),
            "`a\\tb.test`: label `a\\tb` may hold only letters, digits and '-'"
        );
    }
}
