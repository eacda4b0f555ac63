//! Audit mode in the proxy: what enforce mode would refuse is passed on, unchanged, to where
//! the app sent it, and reported as a would-deny.
//!
//! - A request the policy would refuse (no rule names its host, the host on another port, a
//!   port that does not match the connection's, no or an invalid Host) goes over plain HTTP to
//!   the app's original destination address, with the Host the app sent, through a pool of
//!   its own ([`connect_direct`]): the app gets the destination's answer, as it would without egress.
//!   A request a rule allows is served as in enforce mode (TLS origination included), so an
//!   app that works in audit mode works the same once the policy is enforced.
//! - A connection that does not speak HTTP (its own TLS, or any other protocol on an HTTP
//!   port) is relayed byte for byte to the original destination ([`relay`]), once it is seen
//!   to be one: its first byte is not the start of an HTTP method.
//!
//! Refusals that are not the policy's stay: ambiguous framing (the proxy cannot tell where
//! the request ends, so cannot pass it on either), CONNECT, a connection that was not
//! redirected (no destination to pass it to).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Uri;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::error::ProxyError;
use super::events::RequestEvent;
use super::upstream::{ConnectError, UpstreamIo, dial};
use super::{Proxy, hello};

/// The start of the reason of every request or connection audit mode passed on.
pub(crate) const WOULD_REFUSE: &str = "audit mode passed it on; enforce would refuse it";

/// Whether audit mode passes a request refused for `err` on: the policy's refusals, not the
/// proxy's own limits on what it can forward safely.
pub(crate) fn passes_on(err: &ProxyError) -> bool {
    matches!(
        err,
        ProxyError::Denied { .. }
            | ProxyError::DeniedPort { .. }
            | ProxyError::PortMismatch { .. }
            | ProxyError::MissingHost
            | ProxyError::MultipleHosts
            | ProxyError::InvalidHost(_)
    )
}

/// Whether `first`, a connection's first byte, can start an HTTP/1 request: methods are
/// tokens, and every method in use is upper-case letters.
pub(crate) fn starts_http(first: u8) -> bool {
    first.is_ascii_uppercase()
}

/// How audit mode's pool ([`super::upstream::Connector::Direct`]) connects: dials the URI's address as it is
/// (the app's original destination, an IP literal), plain TCP, within the connect limit. No
/// name is resolved and no address refused: the app could have connected there itself, audit
/// mode lets it.
pub(crate) async fn connect_direct(
    uri: Uri,
    timeout: Duration,
) -> Result<UpstreamIo, ConnectError> {
    let addr = uri
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or_else(|| ConnectError::BadUri(uri.to_string()))?;
    let tcp = tokio::time::timeout(timeout, dial(addr, None))
        .await
        .map_err(|_| ConnectError::Timeout {
            host: addr.to_string(),
            timeout,
        })?
        .map_err(|source| ConnectError::Tcp { addr, source })?;
    let _ = tcp.set_nodelay(true);
    Ok(UpstreamIo::plain(tcp, addr))
}

/// Relays a connection that is not HTTP to its original destination `orig`, byte for byte
/// both ways until both sides are done, and reports it once, when it ends.
pub(crate) async fn relay(
    proxy: &Proxy,
    mut app: TcpStream,
    client: SocketAddr,
    (orig, process): (SocketAddr, Option<super::Process>),
    events: &mpsc::Sender<RequestEvent>,
) {
    let start = Instant::now();
    // What the app asked for, if it is TLS: read without consuming, the bytes go on as sent.
    let sni = hello::peek_sni(&app).await;
    let what = match (&sni, app_first_byte(&app).await) {
        (Some(name), _) => format!("a tls client hello for {name} on an http egress port"),
        (None, Some(hello::HANDSHAKE)) => {
            "a tls client hello without sni on an http egress port".to_owned()
        }
        _ => "a connection that does not speak http on an http egress port".to_owned(),
    };
    let mut reason = format!("{WOULD_REFUSE}: {what}");
    let (mut bytes_in, mut bytes_out, mut upstream) = (0, 0, None);
    match tokio::time::timeout(proxy.timeouts.connect, dial(orig, None)).await {
        Ok(Ok(mut up)) => {
            upstream = Some(orig);
            let _ = up.set_nodelay(true);
            match tokio::io::copy_bidirectional(&mut app, &mut up).await {
                Ok((to_up, to_app)) => (bytes_in, bytes_out) = (to_up, to_app),
                Err(e) => reason = format!("{reason}; relay ended: {e}"),
            }
        }
        Ok(Err(e)) => reason = format!("{reason}; connecting to {orig} failed: {e}"),
        Err(_) => reason = format!("{reason}; connecting to {orig} timed out"),
    }
    let counters = &proxy.counters;
    counters.record_would_deny(counters.no_rule(), 0, bytes_in, bytes_out);
    let host = sni.unwrap_or_default();
    let event = RequestEvent {
        bytes_in,
        bytes_out,
        upstream,
        would_deny: true,
        ..RequestEvent::connection(proxy, host, client, (Some(orig), process), start, reason)
    };
    counters.emit(events, event);
}

/// The connection's first byte, without consuming it (the caller already saw one arrive).
async fn app_first_byte(app: &TcpStream) -> Option<u8> {
    let mut first = [0u8; 1];
    match app.peek(&mut first).await {
        Ok(1..) => Some(first[0]),
        _ => None,
    }
}
