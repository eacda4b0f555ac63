//! Hop-by-hop fields (RFC 9110 7.6.1): they describe one connection, so the proxy removes them
//! in both directions and its HTTP stack frames each side itself.

use http::HeaderMap;
use http::header::{
    CONNECTION, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRANSFER_ENCODING, UPGRADE,
};

/// Fields that are hop-by-hop whether or not `Connection` lists them. `Trailer` is not among
/// them: it announces end-to-end trailer fields, and hyper only sends announced trailers.
const ALWAYS: [&str; 4] = [
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Removes every hop-by-hop field from `headers`: those named in `Connection`, `Connection`
/// itself, and the well-known ones. With `upgrade` (an upgrade request, or its 101 answer)
/// `Upgrade` is kept and `Connection: upgrade` put back, since the upgrade is for the
/// upstream; `TE: trailers` in a request is passed on, as it says the app accepts trailers.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderValue> = headers.get_all(CONNECTION).iter().cloned().collect();
    for value in &listed {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            if token.is_empty() || (upgrade && token.eq_ignore_ascii_case(b"upgrade")) {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                headers.remove(&name);
            }
        }
    }
    let trailers = headers.get_all(TE).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
    });
    for name in [
        CONNECTION,
        TE,
        TRANSFER_ENCODING,
        PROXY_AUTHORIZATION,
        PROXY_AUTHENTICATE,
    ] {
        headers.remove(name);
    }
    for name in ALWAYS {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// True when the request asks to switch protocols: `Upgrade` present and `Connection` lists
/// `upgrade` (RFC 9110 7.8).
pub(crate) fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers.get_all(CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn strips_listed_and_well_known_fields() {
        let mut h = map(&[
            ("connection", "x-foo, Keep-Alive"),
            ("connection", "x-bar"),
            ("x-foo", "1"),
            ("x-bar", "2"),
            ("x-kept", "3"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic eA=="),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
            ("trailer", "x-checksum"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["trailer", "x-kept"]);
    }

    #[test]
    fn te_trailers_passes_and_upgrades_keep_their_fields() {
        let mut h = map(&[("te", "trailers, deflate")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.get(TE).unwrap(), "trailers");

        let mut h = map(&[
            ("connection", "Upgrade, x-foo"),
            ("upgrade", "websocket"),
            ("x-foo", "1"),
        ]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(CONNECTION).unwrap(), "upgrade");
        assert!(!h.contains_key("x-foo"));

        assert!(!wants_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!wants_upgrade(&map(&[("connection", "upgrade")])));
    }
}
