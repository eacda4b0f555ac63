//! TLS passthrough (`protocol: tls`): an app that does its own TLS on a port of a `tls` rule.
//! The proxy reads the ClientHello without consuming it, and when its server name (SNI)
//! matches a `tls` rule for the connection's port and the app's scope, relays the connection
//! byte for byte, the ClientHello included, to the proxy's own resolution of that name on that
//! port: never to the address the app connected to, so an app that names an allowed server in
//! its SNI and sends the connection somewhere else reaches the allowed server or nothing.
//!
//! Refused, with an event naming the SNI and the address the app gave: no SNI, an
//! `encrypted_client_hello` extension (the name in clear is only the client-facing server's),
//! and an SNI no `tls` rule allows on that port.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::{net::TcpStream, sync::mpsc};

use super::{
    Origin, Proxy, RequestEvent, hello,
    route::{Target, normalise},
};

/// What the proxy decided for a connection that starts with a ClientHello.
pub(crate) enum Judged {
    /// A `tls` rule allows the SNI on the port.
    Allowed {
        /// The SNI, normalised.
        sni: String,
        /// The rule's counter slot.
        slot: usize,
    },
    /// Why not, for the event.
    Refused { why: String },
}

/// Reads the ClientHello waiting on `app` (without consuming it) and judges it against the
/// `tls` rules for the connection's original `port`.
pub(crate) async fn judge(
    proxy: &Proxy,
    app: &TcpStream,
    port: u16,
    origin: Option<&Origin>,
) -> Judged {
    let Some(hello) = hello::peek_hello(app).await else {
        return Judged::Refused {
            why: "tls client hello on an http egress port refused: not read whole in time"
                .to_owned(),
        };
    };
    let Some(sni) = hello.sni else {
        return Judged::Refused {
            why: "tls client hello without sni on an http egress port refused: a tls rule \
                  allows a server by name"
                .to_owned(),
        };
    };
    if hello.ech {
        return Judged::Refused {
            why: format!(
                "tls client hello for {sni} with encrypted client hello (ech) on an http egress \
                 port refused: the server name that matters is encrypted"
            ),
        };
    }
    let name = normalise(&sni).into_owned();
    let scope = origin.and_then(|o| o.namespace.as_deref());
    match proxy.routes.decide_tls(&name, port, scope) {
        Some(Target { slot, .. }) => Judged::Allowed {
            sni: name,
            slot: *slot,
        },
        None => Judged::Refused {
            why: format!(
                "tls client hello for {sni} on an http egress port refused: no tls rule allows \
                 {sni} on port {port}; send http://{sni}:{port}/ to have the proxy originate \
                 tls, allow the name with a tls rule, or opaque tls with a tcp rule"
            ),
        },
    }
}

/// Relays `app` to `sni` on `port` as the proxy resolves it (from the pod's own network
/// namespace for a pod), until both sides are done; reports it once, when it ends.
pub(crate) async fn relay(
    proxy: &Proxy,
    mut app: TcpStream,
    client: SocketAddr,
    (orig_dst, process): (Option<SocketAddr>, Option<super::Process>),
    (events, origin): (&mpsc::Sender<RequestEvent>, Option<Arc<Origin>>),
    (sni, slot, port): (String, usize, u16),
) {
    let start = Instant::now();
    let sockets = origin.as_ref().map(|o| o.sockets.clone());
    let (mut bytes_in, mut bytes_out, mut upstream, mut reason) = (0, 0, None, None);
    match proxy.dialer.dial_host(&sni, port, sockets.as_deref()).await {
        Ok((mut up, addr)) => {
            upstream = Some(addr);
            match tokio::io::copy_bidirectional(&mut app, &mut up).await {
                Ok((to_up, to_app)) => (bytes_in, bytes_out) = (to_up, to_app),
                Err(e) => reason = Some(format!("tls passthrough relay ended: {e}")),
            }
        }
        Err(e) => reason = Some(format!("tls passthrough to {sni}:{port}: {e}")),
    }
    let counters = &proxy.counters;
    // No HTTP status: a relay that never reached its upstream says why in its reason.
    counters.record(slot, 0, false, bytes_in, bytes_out);
    let event = RequestEvent {
        rule: counters.name(slot).map(str::to_owned),
        upstream,
        bytes_in,
        bytes_out,
        reason,
        ..RequestEvent::connection(
            proxy,
            sni,
            client,
            (orig_dst, process),
            start,
            String::new(),
        )
    };
    counters.emit(events, event);
}
