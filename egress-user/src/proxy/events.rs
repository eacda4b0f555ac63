//! What the proxy reports: one [`RequestEvent`] per request (and per refused connection), and
//! lock-free counters per rule or alias, read with [`super::Proxy::counters`].
//!
//! Events go through a bounded channel with `try_send`: a slow consumer loses events (counted
//! in [`Counters::events_dropped`]), it never slows a request down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// One proxied request, or one refused connection, reported once it is over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestEvent {
    /// The HTTP rule or alias that allowed the request; `None` when none did.
    pub rule: Option<String>,
    /// The request's normalised host (for a refused TLS connection: the ClientHello's SNI,
    /// empty when it had none).
    pub host: String,
    /// The request method; empty for a refused connection.
    pub method: String,
    /// The request path and query; empty for a refused connection.
    pub path: String,
    /// The status the app got; 0 when the connection was closed without an HTTP answer.
    pub status: u16,
    /// Body bytes read from the app (for an upgraded connection: tunnel bytes app -> upstream).
    pub bytes_in: u64,
    /// Body bytes sent to the app (for an upgraded connection: tunnel bytes upstream -> app).
    pub bytes_out: u64,
    /// From the start of the request to the end of the response body (or of the tunnel).
    pub latency: Duration,
    /// The app's end of the connection (the accepted socket's peer).
    pub client: SocketAddr,
    /// Where the app wanted to connect; `None` for a connection that was not redirected.
    pub orig_dst: Option<SocketAddr>,
    /// The upstream address the request went to, when it got that far.
    pub upstream: Option<SocketAddr>,
    /// Why the proxy answered itself (denied, malformed, upstream failure), or why the body
    /// ended early; in audit mode, for a request passed on, why enforce would refuse it.
    pub reason: Option<String>,
    /// Audit mode passed on a request (or relayed a connection) that enforce mode would
    /// refuse: `status` is the destination's answer.
    pub would_deny: bool,
    /// The policy generation that judged it (the proxy's, see [`super::Proxy::generation`]).
    pub generation: u32,
    /// The process that made the connection, when the kernel recorded it with the redirect.
    pub process: Option<super::Process>,
}

impl RequestEvent {
    /// The one event of a connection the proxy read no request from (an app's own TLS,
    /// bytes that are not HTTP), started at `start`: no rule, method, path or status, and no
    /// bytes or upstream unless the caller sets them.
    pub(crate) fn connection(
        proxy: &super::Proxy,
        host: String,
        client: SocketAddr,
        (orig_dst, process): (Option<SocketAddr>, Option<super::Process>),
        start: Instant,
        reason: String,
    ) -> Self {
        Self {
            rule: None,
            host,
            method: String::new(),
            path: String::new(),
            status: 0,
            bytes_in: 0,
            bytes_out: 0,
            latency: start.elapsed(),
            client,
            orig_dst,
            upstream: None,
            reason: Some(reason),
            would_deny: false,
            generation: proxy.generation(),
            process,
        }
    }
}

/// A snapshot of one rule's or alias's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// The rule's or alias's name; `None` for requests no rule allowed (denied, malformed) and
    /// refused connections.
    pub rule: Option<String>,
    /// True when `rule` names an ExternalName alias rather than an EgressRule.
    pub alias: bool,
    /// Requests answered, whatever the status.
    pub requests: u64,
    /// Requests answered 1xx (upgrades), 2xx, 3xx, 4xx and 5xx.
    pub status_1xx: u64,
    /// See `status_1xx`.
    pub status_2xx: u64,
    /// See `status_1xx`.
    pub status_3xx: u64,
    /// See `status_1xx`.
    pub status_4xx: u64,
    /// See `status_1xx`.
    pub status_5xx: u64,
    /// Requests refused by policy (403) and connections refused (a TLS ClientHello).
    pub denied: u64,
    /// Requests and connections audit mode passed on that enforce mode would refuse.
    pub would_deny: u64,
    /// Body bytes read from apps.
    pub bytes_in: u64,
    /// Body bytes sent to apps.
    pub bytes_out: u64,
}

#[derive(Default)]
struct Slot {
    requests: AtomicU64,
    classes: [AtomicU64; 5],
    denied: AtomicU64,
    would_deny: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

/// The counters of one proxy: a slot per rule and alias, one for "no rule", and the number of
/// events lost to a full channel.
///
/// Slots are shared with the next generation's proxy for the rules both have (see
/// [`Counters::after`]), so `egress status` keeps counting a rule across reloads as the kernel's
/// rows do, and a request still finishing on the old proxy lands in the same count.
pub(crate) struct Counters {
    names: Box<[(Option<String>, bool)]>,
    slots: Box<[Arc<Slot>]>,
    events_dropped: Arc<AtomicU64>,
}

impl Counters {
    /// Slots for `names` (name, is_alias) in order, plus a last one for "no rule".
    #[cfg(test)]
    pub(crate) fn new(names: impl IntoIterator<Item = (String, bool)>) -> Self {
        Self::after(names, None)
    }

    /// As [`Counters::new`], but a rule or alias that `previous` counted under the same name
    /// (and kind) goes on counting in the same slot, as do "no rule" and the events lost. A
    /// rule removed and added again starts at 0: `previous` no longer has it.
    pub(crate) fn after(
        names: impl IntoIterator<Item = (String, bool)>,
        previous: Option<&Counters>,
    ) -> Self {
        let mut names: Vec<_> = names.into_iter().map(|(n, a)| (Some(n), a)).collect();
        names.push((None, false));
        let slots = names
            .iter()
            .map(|name| {
                previous
                    .and_then(|p| p.names.iter().position(|n| n == name).map(|i| &p.slots[i]))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        Self {
            names: names.into(),
            slots,
            events_dropped: previous.map_or_else(Arc::default, |p| p.events_dropped.clone()),
        }
    }

    /// The slot for requests no rule allowed.
    pub(crate) fn no_rule(&self) -> usize {
        self.slots.len() - 1
    }

    /// The name of slot `i`.
    pub(crate) fn name(&self, i: usize) -> Option<&str> {
        self.names[i].0.as_deref()
    }

    /// Counts one finished request.
    pub(crate) fn record(
        &self,
        slot: usize,
        status: u16,
        denied: bool,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let s = &self.slots[slot];
        s.requests.fetch_add(1, Relaxed);
        if let Some(c) = (status / 100)
            .checked_sub(1)
            .and_then(|i| s.classes.get(usize::from(i)))
        {
            c.fetch_add(1, Relaxed);
        }
        if denied {
            s.denied.fetch_add(1, Relaxed);
        }
        s.bytes_in.fetch_add(bytes_in, Relaxed);
        s.bytes_out.fetch_add(bytes_out, Relaxed);
    }

    /// Counts one finished request (or relayed connection) that audit mode passed on.
    pub(crate) fn record_would_deny(
        &self,
        slot: usize,
        status: u16,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        self.record(slot, status, false, bytes_in, bytes_out);
        self.slots[slot].would_deny.fetch_add(1, Relaxed);
    }

    /// Sends `event` without waiting; counts it as dropped when the channel is full or closed.
    /// A failure (no answer, or a 5xx) whose event is dropped is still logged here, so that
    /// no upstream or internal failure goes unrecorded; the consumer logs the rest.
    pub(crate) fn emit(&self, events: &mpsc::Sender<RequestEvent>, event: RequestEvent) {
        if let Err(e) = events.try_send(event) {
            self.events_dropped.fetch_add(1, Relaxed);
            let event = match e {
                mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e) => e,
            };
            if event.status == 0 || event.status >= 500 {
                tracing::warn!(
                    host = %event.host,
                    status = event.status,
                    reason = event.reason.as_deref().unwrap_or(""),
                    "request failed (its event was dropped: the event queue is full)"
                );
            }
        }
    }

    /// Events lost so far.
    pub(crate) fn events_dropped(&self) -> u64 {
        self.events_dropped.load(Relaxed)
    }

    /// A snapshot of every slot.
    pub(crate) fn snapshot(&self) -> Vec<RuleStats> {
        self.names
            .iter()
            .zip(self.slots.iter())
            .map(|((rule, alias), s)| {
                let c = |i: usize| s.classes[i].load(Relaxed);
                RuleStats {
                    rule: rule.clone(),
                    alias: *alias,
                    requests: s.requests.load(Relaxed),
                    status_1xx: c(0),
                    status_2xx: c(1),
                    status_3xx: c(2),
                    status_4xx: c(3),
                    status_5xx: c(4),
                    denied: s.denied.load(Relaxed),
                    would_deny: s.would_deny.load(Relaxed),
                    bytes_in: s.bytes_in.load(Relaxed),
                    bytes_out: s.bytes_out.load(Relaxed),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_class_and_drops() {
        let c = Counters::new([("web".to_owned(), false), ("httpbin".to_owned(), true)]);
        assert_eq!(c.no_rule(), 2);
        c.record(0, 200, false, 3, 5);
        c.record(0, 101, false, 1, 1);
        c.record(2, 403, true, 0, 10);
        c.record(2, 0, true, 0, 0);
        let s = c.snapshot();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].rule.as_deref(), Some("web"));
        assert_eq!((s[0].requests, s[0].status_2xx, s[0].status_1xx), (2, 1, 1));
        assert_eq!((s[0].bytes_in, s[0].bytes_out), (4, 6));
        assert!(s[1].alias);
        assert_eq!(s[2].rule, None);
        assert_eq!((s[2].requests, s[2].status_4xx, s[2].denied), (2, 1, 2));

        let (tx, rx) = mpsc::channel(1);
        let ev = RequestEvent {
            rule: None,
            host: "a".into(),
            method: "GET".into(),
            path: "/".into(),
            status: 200,
            bytes_in: 0,
            bytes_out: 0,
            latency: Duration::ZERO,
            client: "127.0.0.1:1".parse().unwrap(),
            orig_dst: None,
            upstream: None,
            reason: None,
            would_deny: false,
            generation: 1,
            process: None,
        };
        c.emit(&tx, ev.clone());
        c.emit(&tx, ev.clone());
        assert_eq!(c.events_dropped(), 1);
        drop(rx);
        c.emit(&tx, ev);
        assert_eq!(c.events_dropped(), 2);
    }

    #[test]
    fn a_new_generation_keeps_counting_the_rules_it_shares() {
        let old = Counters::new([
            ("web".to_owned(), false),
            ("gone".to_owned(), false),
            ("httpbin".to_owned(), true),
        ]);
        old.record(0, 200, false, 1, 2);
        old.record(1, 200, false, 0, 0);
        old.record(2, 200, false, 0, 0);
        old.record(old.no_rule(), 403, true, 0, 0);
        // `httpbin` becomes a rule rather than an alias: another thing, counted anew.
        let new = Counters::after(
            [
                ("httpbin".to_owned(), false),
                ("web".to_owned(), false),
                ("added".to_owned(), false),
            ],
            Some(&old),
        );
        // A request still finishing on the old proxy counts for the rule in force too.
        old.record(0, 200, false, 0, 0);
        new.record(1, 204, false, 0, 0);
        let s = new.snapshot();
        let requests: Vec<_> = s.iter().map(|s| (s.rule.as_deref(), s.requests)).collect();
        assert_eq!(
            requests,
            [
                (Some("httpbin"), 0),
                (Some("web"), 3),
                (Some("added"), 0),
                (None, 1)
            ]
        );
        assert_eq!((s[1].status_2xx, s[1].bytes_out), (3, 2));
    }
}
