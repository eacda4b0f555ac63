//! The HTTP egress proxy: the kernel redirects an app's connections to HTTP egress ports here;
//! the proxy lets a request through only when an HTTP rule or alias allows its host on the
//! port the app connected to, and reaches the upstream itself (resolving the allowed name,
//! never dialling the app's original address), originating TLS for https rules. In audit mode
//! what the policy would refuse goes on to the app's original address instead (`audit`).
//!
//! A request flows through the files in this order: `admission` (which connections are
//! held), [`listen`](self::listen) (accept, span, ClientHello peek, hyper's HTTP/1.1 server), `framing` (refuses ambiguous framing),
//! `forward` (per request: checks, rewrite, answer), `route` (authority -> rule), `upstream`
//! (resolve, rebinding filter, dial, pooled connections), `tls` (rustls settings), `body`
//! (streaming, counting, the per-request event), `idle` (the limit on an exchange where
//! nothing moves), `events` (events and counters), `error`
//! (which side failed and the one error -> status mapping).
//!
//! Performance shape: upstream connections are pooled per scheme and authority (hyper-util's
//! client), bodies stream frame by frame in both directions, and a request costs a handful of
//! small allocations (its event's strings among them), none proportional to its body.

#![forbid(unsafe_code)]

/// Inside an `impl` of tokio's `AsyncWrite` or hyper's `rt::Write` (the same five methods, the
/// same signatures) for a wrapper whose writes are not its business: every write goes to the
/// field `$field` unchanged. Reads are where the wrappers differ (`framing` watches them).
macro_rules! forward_writes_to {
    ($field:ident) => {
        fn poll_write(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            buf: &[u8],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.get_mut().$field).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
            bufs: &[::std::io::IoSlice<'_>],
        ) -> ::std::task::Poll<::std::io::Result<usize>> {
            ::std::pin::Pin::new(&mut self.get_mut().$field).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.$field.is_write_vectored()
        }

        fn poll_flush(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.get_mut().$field).poll_flush(cx)
        }

        fn poll_shutdown(
            self: ::std::pin::Pin<&mut Self>,
            cx: &mut ::std::task::Context<'_>,
        ) -> ::std::task::Poll<::std::io::Result<()>> {
            ::std::pin::Pin::new(&mut self.get_mut().$field).poll_shutdown(cx)
        }
    };
}

mod admission;
mod audit;
mod body;
mod error;
mod events;
mod forward;
mod framing;
mod headers;
mod hello;
mod idle;
mod listen;
mod orig_dst;
mod passthrough;
mod route;
#[cfg(test)]
mod tests;
mod tls;
mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_rustls::TlsConnector;

pub use admission::{Admission, AdmissionStats, Limits, Ticket};
pub use error::{ConfigError, ProxyError, Side};
pub use events::{RequestEvent, RuleStats};
pub use listen::{Origin, accept_error_is_per_connection};
pub use orig_dst::{OrigDst, Process};
pub use tls::install_crypto_provider;
pub use upstream::{BoxFuture, ConnectError, Resolve, Sockets, SystemResolver};

use crate::policy::Policy;
use body::ReqBody;
use events::Counters;
use route::Routes;
use upstream::{AddrFilter, Connector, Dialer};

/// Time limits of the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Resolving, connecting and the TLS handshake of a new upstream connection (then 504).
    pub connect: Duration,
    /// How long an exchange may go without a byte moving either way (the app's request body
    /// going up, the response head or body coming down), however long it lasts in all. Then
    /// 504 when the upstream stalled, 408 when the app's body did, and a response already
    /// under way is cut. The clock starts once `connect` has passed, so that a slow connect is
    /// reported as one. An upgraded (WebSocket) connection has no idle limit.
    pub idle: Duration,
    /// For an app's request head, on a new or an idle kept-alive connection.
    pub header_read: Duration,
    /// How long an idle upstream connection stays in the pool.
    pub pool_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(10),
            idle: crate::policy::DEFAULT_PROXY_IDLE_TIMEOUT,
            header_read: Duration::from_secs(30),
            pool_idle: Duration::from_secs(90),
        }
    }
}

/// The HTTP egress proxy for one policy: its routes, TLS settings, upstream pool and counters.
/// A new policy means a new `Proxy`; connections already open keep the one they started with.
pub struct Proxy {
    routes: Routes,
    client: Client<Connector, ReqBody>,
    /// How upstream connections are made, for the pools of pods' namespaces.
    dialer: Arc<Dialer>,
    /// One pool per pod network namespace (by cookie) that requests came from: a connection
    /// made from one pod's namespace never carries another pod's request.
    pods: std::sync::Mutex<HashMap<u64, Client<Connector, ReqBody>>>,
    /// Audit mode: what the policy would refuse is passed on, see [`audit`].
    audit: bool,
    /// Audit mode's pool, to the apps' original destinations.
    direct: Client<Connector, ReqBody>,
    counters: Counters,
    timeouts: Timeouts,
    /// The policy generation this proxy judges for, as its events report it. Set when the
    /// kernel has taken the generation (the number is the kernel's to give).
    generation: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Proxy`] with settings other than the defaults.
pub struct ProxyBuilder<'a> {
    policy: &'a Policy,
    resolver: Arc<dyn Resolve>,
    timeouts: Timeouts,
    system_roots: tls::SystemRoots,
    previous: Option<&'a Proxy>,
    generation: u32,
}

impl<'a> ProxyBuilder<'a> {
    /// Goes on counting, for every rule and alias `previous` also has, where `previous` is at
    /// (by name, as the kernel keeps its rows): a reload does not reset `egress status`.
    pub fn counting_after(mut self, previous: &'a Proxy) -> Self {
        self.previous = Some(previous);
        self
    }

    /// The policy generation the proxy's events name until [`Proxy::set_generation`] (by
    /// default 0: not yet known).
    pub fn generation(mut self, generation: u32) -> Self {
        self.generation = generation;
        self
    }

    /// Resolves upstream names with `resolver` instead of the system's (after the policy's
    /// `hosts`, which always come first). Its answers are filtered like DNS answers.
    pub fn resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = resolver;
        self
    }

    /// Uses these time limits (by default: [`Timeouts::default`], with the policy's
    /// `proxy.idleTimeout`).
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Trusts only the policy's `caFiles`, not the system's roots.
    #[cfg(test)]
    fn without_system_roots(mut self) -> Self {
        self.system_roots = tls::SystemRoots::Skip;
        self
    }

    /// Reads the CA files and builds the routes and the pool.
    pub fn build(self) -> Result<Proxy, ConfigError> {
        let routes = Routes::new(self.policy)?;
        let tls = tls::client_config(&self.policy.ca_files, self.system_roots)?;
        let dialer = Dialer {
            hosts: self
                .policy
                .hosts
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            resolver: self.resolver,
            filter: AddrFilter::new(self.policy),
            tls: TlsConnector::from(tls),
            connect_timeout: self.timeouts.connect,
        };
        let pool = |connector| pool(connector, &self.timeouts);
        let dialer = Arc::new(dialer);
        let client = pool(Connector::Dialer(dialer.clone(), None));
        let direct = pool(Connector::Direct {
            connect_timeout: self.timeouts.connect,
        });
        let counters = Counters::after(routes.names(), self.previous.map(|p| &p.counters));
        Ok(Proxy {
            routes,
            client,
            dialer,
            pods: std::sync::Mutex::default(),
            audit: self.policy.mode == crate::policy::Mode::Audit,
            direct,
            counters,
            timeouts: self.timeouts,
            generation: std::sync::atomic::AtomicU32::new(self.generation),
        })
    }
}

/// A pool of upstream connections made by `connector`.
fn pool(connector: Connector, timeouts: &Timeouts) -> Client<Connector, ReqBody> {
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(timeouts.pool_idle)
        .build(connector)
}

impl Proxy {
    /// The pool for requests that came in through a listener of `origin` (a pod's network
    /// namespace), or the agent's own.
    fn client_for(&self, origin: Option<&Origin>) -> Client<Connector, ReqBody> {
        let Some(origin) = origin else {
            return self.client.clone();
        };
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        pods.entry(origin.netns)
            .or_insert_with(|| {
                let sockets = Some(origin.sockets.clone());
                pool(
                    Connector::Dialer(self.dialer.clone(), sockets),
                    &self.timeouts,
                )
            })
            .clone()
    }

    /// Drops the pool of a pod's network namespace (the pod is gone).
    pub fn forget_netns(&self, netns: u64) {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&netns);
    }

    /// The proxy for `policy`, with the system resolver and default time limits. Reads
    /// `policy.ca_files`; an error names the file.
    pub fn new(policy: &Policy) -> Result<Proxy, ConfigError> {
        Self::builder(policy).build()
    }

    /// A builder for a proxy with other settings.
    pub fn builder(policy: &Policy) -> ProxyBuilder<'_> {
        install_crypto_provider();
        ProxyBuilder {
            policy,
            resolver: Arc::new(SystemResolver),
            timeouts: Timeouts {
                idle: policy.proxy.idle_timeout,
                ..Timeouts::default()
            },
            system_roots: tls::SystemRoots::Load,
            previous: None,
            generation: 0,
        }
    }

    /// Counters per rule and alias (in policy order), then one for requests no rule allowed.
    pub fn counters(&self) -> Vec<RuleStats> {
        self.counters.snapshot()
    }

    /// The policy generation this proxy judges for (0 until it is known).
    pub fn generation(&self) -> u32 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records the generation the kernel gave the policy this proxy was built from.
    pub fn set_generation(&self, generation: u32) {
        self.generation
            .store(generation, std::sync::atomic::Ordering::Relaxed);
    }

    /// Events lost because the channel was full or closed.
    pub fn events_dropped(&self) -> u64 {
        self.counters.events_dropped()
    }
}
