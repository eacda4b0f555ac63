//! Hop-by-hop fields (RFC 9110 7.6.1): they describe one connection, so the proxy removes them
//! in both directions and its HTTP stack frames each side itself.

use http::HeaderMap;
use http::header::{
    CONNECTION, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRANSFER_ENCODING, UPGRADE,
};

/// Fields that are hop-by-hop whether or not `Connection` lists them, besides the standard
/// ones [`strip_hop_by_hop`] names. `Trailer` is not among them: it announces end-to-end
/// trailer fields, and hyper only sends announced trailers.
const ALWAYS: [&str; 2] = ["proxy-connection", "keep-alive"];

/// Whether `name` is one [`strip_hop_by_hop`] removes whatever `Connection` lists.
fn always_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TE
        || name == TRANSFER_ENCODING
        || name == PROXY_AUTHORIZATION
        || name == PROXY_AUTHENTICATE
        || name == UPGRADE
        || ALWAYS.contains(&name.as_str())
}

/// Removes every hop-by-hop field from `headers`: those named in `Connection`, `Connection`
/// itself, and the well-known ones. With `upgrade` (an upgrade request, or its 101 answer)
/// `Upgrade` is kept and `Connection: upgrade` put back, since the upgrade is for the
/// upstream; `TE: trailers` in a request is passed on, as it says the app accepts trailers.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of them: one look at each name, no lookups by name. Without
    // `Connection` nothing else is listed.
    if !upgrade && !headers.keys().any(always_hop_by_hop) {
        return;
    }
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

/// True when the request asks to switch to WebSocket: `Upgrade: websocket` (exactly one
/// protocol) and `Connection` lists `upgrade` (RFC 9110 7.8, RFC 6455 4.1). Other upgrades
/// (`h2c` above all) are not passed on: inside such a tunnel the app could send requests for
/// other hosts to the same server (domain fronting), which the proxy could no longer check;
/// without the hop-by-hop `Upgrade` the request goes on as a plain request.
pub(crate) fn wants_upgrade(headers: &HeaderMap) -> bool {
    let mut upgrades = headers.get_all(UPGRADE).iter();
    let websocket = upgrades.next().is_some_and(|v| {
        let v = v.as_bytes().trim_ascii();
        let name = v.split(|&b| b == b'/').next().unwrap_or(v);
        name.eq_ignore_ascii_case(b"websocket") && !v.contains(&b',')
    }) && upgrades.next().is_none();
    websocket
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
    fn a_message_without_hop_by_hop_fields_is_left_as_it_is() {
        let pairs = [
            ("host", "a.test"),
            ("x-foo", "1"),
            ("accept", "*/*"),
            ("x-foo", "2"),
            ("trailer", "x-checksum"),
        ];
        let mut h = map(&pairs);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, map(&pairs));
        // One hop-by-hop field among them goes, the others stay.
        let mut h = map(&[("x-foo", "1"), ("keep-alive", "timeout=5"), ("x-foo", "2")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, map(&[("x-foo", "1"), ("x-foo", "2")]));
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
        let up =
            |p: &'static str| wants_upgrade(&map(&[("connection", "Upgrade"), ("upgrade", p)]));
        assert!(up("WebSocket"));
        assert!(!up("h2c"));
        assert!(!up("websocket, h2c"));
        assert!(!up("TLS/1.2"));

        // Refused upgrades lose their hop-by-hop fields and go on as plain requests.
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAA"),
        ]);
        let upgrade = wants_upgrade(&h);
        strip_hop_by_hop(&mut h, upgrade);
        assert!(h.is_empty(), "{h:?}");
        assert!(!wants_upgrade(&map(&[("connection", "upgrade")])));
    }
}
