//! Proxy errors. Every error knows which side of the proxy failed ([`Side`]: the app's request,
//! the upstream, or the proxy itself), and [`ProxyError::status`] is the one place that turns an
//! error into the status code the app sees (the idea of pingora's `ErrorSource`).

use std::error::Error as _;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::StatusCode;

use super::upstream::ConnectError;

/// Which side of the proxy a failure belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The app sent something the proxy refuses: a malformed or forbidden request.
    Client,
    /// The upstream could not be resolved, reached, verified or did not answer.
    Upstream,
    /// A bug or resource problem inside the proxy.
    Internal,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Client => "client",
            Self::Upstream => "upstream",
            Self::Internal => "internal",
        })
    }
}

/// Why one request was not proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The accepted connection has no recorded original destination, so the port a rule must
    /// match is unknown: it did not come through the kernel's redirect.
    #[error("not a redirected connection: no original destination is known for {client}")]
    NotRedirected {
        /// The accepted socket's peer address.
        client: SocketAddr,
    },
    /// Content-Length together with Transfer-Encoding, or Content-Length twice: two parsers
    /// could disagree about where the body ends (request smuggling), so the request is refused.
    #[error("ambiguous message framing: {0}")]
    AmbiguousFraming(&'static str),
    /// CONNECT would open an opaque tunnel the proxy cannot check.
    #[error(
        "connect is refused: the proxy forwards plain http requests; use a tcp rule for opaque \
         tunnels"
    )]
    ConnectMethod,
    /// Neither an absolute-form URI nor a Host header.
    #[error("the request names no host (no absolute-form uri and no host header)")]
    MissingHost,
    /// More than one Host header.
    #[error("the request has more than one host header")]
    MultipleHosts,
    /// A Host or URI authority that is not a valid host\[:port\].
    #[error("invalid host {0:?}")]
    InvalidHost(String),
    /// The request names an explicit port other than the one the app connected to.
    #[error("port {request} in the request does not match port {connection} the app connected to")]
    PortMismatch {
        /// The port in the Host header or the absolute URI.
        request: u16,
        /// The original destination's port.
        connection: u16,
    },
    /// No HTTP rule or alias names the host.
    #[error("host {host} is not allowed: no http rule or alias names it")]
    Denied {
        /// The normalised host.
        host: String,
    },
    /// The host is named, but not on this port.
    #[error("host {host} is not allowed on port {port} (its rules allow port {allowed})")]
    DeniedPort {
        /// The normalised host.
        host: String,
        /// The original destination's port.
        port: u16,
        /// The ports the matching rules allow, comma-separated.
        allowed: String,
    },
    /// Nothing moved either way for the idle limit while the proxy waited for the upstream:
    /// it neither read the request body nor sent a response.
    #[error("upstream {authority} was idle: no bytes either way for {idle:?}")]
    UpstreamIdle {
        /// The upstream host:port.
        authority: String,
        /// The configured limit.
        idle: Duration,
    },
    /// Nothing moved either way for the idle limit while the proxy waited for the rest of the
    /// app's request body.
    #[error("the request body stalled: no bytes from the app for {idle:?}")]
    AppIdle {
        /// The configured limit.
        idle: Duration,
    },
    /// The app's request body could not be read: malformed chunked framing, or the app closed
    /// the connection before the body ended. The app's fault, not the upstream's.
    #[error("invalid request body")]
    RequestBody(#[source] hyper::Error),
    /// Resolving, connecting, the TLS handshake or the exchange with the upstream failed.
    #[error("upstream {authority}")]
    Upstream {
        /// The upstream host:port.
        authority: String,
        /// What the HTTP client reported; a [`ConnectError`] is somewhere in its chain when the
        /// connection could not be made.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The upstream request could not be built (a bug).
    #[error("building the upstream request")]
    BuildRequest(#[source] http::Error),
}

impl ProxyError {
    /// Which side failed.
    pub fn side(&self) -> Side {
        match self {
            Self::NotRedirected { .. }
            | Self::AmbiguousFraming(_)
            | Self::ConnectMethod
            | Self::MissingHost
            | Self::MultipleHosts
            | Self::InvalidHost(_)
            | Self::PortMismatch { .. }
            | Self::Denied { .. }
            | Self::DeniedPort { .. }
            | Self::AppIdle { .. }
            | Self::RequestBody(_) => Side::Client,
            Self::UpstreamIdle { .. } => Side::Upstream,
            Self::Upstream { source, .. } => match connect_error(source) {
                Some(ConnectError::BadUri(_)) => Side::Internal,
                _ => Side::Upstream,
            },
            Self::BuildRequest(_) => Side::Internal,
        }
    }

    /// The status code the app gets for this error: the one mapping from errors to statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Denied { .. } | Self::DeniedPort { .. } => StatusCode::FORBIDDEN,
            Self::ConnectMethod => StatusCode::METHOD_NOT_ALLOWED,
            Self::UpstreamIdle { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::AppIdle { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::Upstream { source, .. }
                if matches!(connect_error(source), Some(ConnectError::Timeout { .. })) =>
            {
                StatusCode::GATEWAY_TIMEOUT
            }
            err => match err.side() {
                Side::Client => StatusCode::BAD_REQUEST,
                Side::Upstream => StatusCode::BAD_GATEWAY,
                Side::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// The whole story in one line, for the response body, the event and the log:
    /// `upstream a.test:443: tls handshake with a.test (127.0.0.1:443): invalid peer certificate: UnknownIssuer`.
    pub fn reason(&self) -> String {
        match self {
            // The client's own wrapper text ("client error (Connect)") says nothing.
            Self::Upstream { authority, source } => match connect_error(source) {
                Some(c) => format!("upstream {authority}: {}", chain(c)),
                None => chain(self),
            },
            _ => chain(self),
        }
    }

    /// True when the connection to the app must be closed after the answer: after a framing
    /// or addressing error the proxy cannot trust where the next request starts. That is every
    /// error of the app's but the policy's answers to a well-formed request.
    pub fn closes_connection(&self) -> bool {
        self.side() == Side::Client
            && !matches!(
                self,
                Self::PortMismatch { .. } | Self::Denied { .. } | Self::DeniedPort { .. }
            )
    }
}

/// Why a response body stopped before its end; hyper then cuts the app's connection, so the
/// app cannot take a truncated body for a whole one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// The upstream's body failed.
    #[error("upstream body ended early")]
    Upstream(#[source] hyper::Error),
    /// No bytes moved either way for the idle limit.
    #[error("idle: no bytes either way for {0:?}")]
    Idle(Duration),
}

/// The connect error inside an HTTP client error, if the connection could not be made.
fn connect_error(err: &hyper_util::client::legacy::Error) -> Option<&ConnectError> {
    let mut next = err.source();
    while let Some(e) = next {
        if let Some(c) = e.downcast_ref::<ConnectError>() {
            return Some(c);
        }
        next = e.source();
    }
    None
}

/// An error and its sources as one line, `a: b: c`, for a response body or a log field.
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let s = e.to_string();
        // Wrappers often repeat their source's text; say it once.
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        next = e.source();
    }
    out
}

/// Why a [`super::Proxy`] could not be built from a policy.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A `caFiles` entry could not be read.
    #[error("ca file {}: cannot read it", path.display())]
    CaFileRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `caFiles` entry is not valid PEM.
    #[error("ca file {}: invalid pem", path.display())]
    CaFilePem {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A `caFiles` entry holds no certificate.
    #[error("ca file {}: no certificate in it", path.display())]
    CaFileEmpty {
        /// The file.
        path: PathBuf,
    },
    /// A certificate in a `caFiles` entry is not a usable trust anchor.
    #[error("ca file {}: certificate {index} is not a usable ca", path.display())]
    CaCert {
        /// The file.
        path: PathBuf,
        /// 1-based position of the certificate in the file.
        index: usize,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The TLS client configuration could not be built.
    #[error("tls client configuration")]
    Tls(#[source] rustls::Error),
    /// An alias's external name cannot be an upstream authority.
    #[error("alias {alias}: external name {name:?} is not a valid host")]
    AliasName {
        /// The alias's name.
        alias: String,
        /// Its external name.
        name: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let client: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            ProxyError::NotRedirected { client }.status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ProxyError::AmbiguousFraming("x").status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ProxyError::PortMismatch {
                request: 81,
                connection: 80
            }
            .status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            ProxyError::Denied { host: "a".into() }.status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            ProxyError::ConnectMethod.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let t = ProxyError::UpstreamIdle {
            authority: "a:1".into(),
            idle: Duration::ZERO,
        };
        assert_eq!(t.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(t.side(), Side::Upstream);
        let t = ProxyError::AppIdle {
            idle: Duration::ZERO,
        };
        assert_eq!(t.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(t.side(), Side::Client);
        assert!(t.closes_connection());
        assert!(ProxyError::AmbiguousFraming("x").closes_connection());
        assert!(!ProxyError::Denied { host: "a".into() }.closes_connection());
    }

    #[test]
    fn messages_are_lowercase_and_name_things() {
        let e = ProxyError::PortMismatch {
            request: 81,
            connection: 80,
        };
        assert_eq!(
            e.to_string(),
            "port 81 in the request does not match port 80 the app connected to"
        );
        let e = ProxyError::DeniedPort {
            host: "a.test".into(),
            port: 8080,
            allowed: "80".into(),
        };
        assert_eq!(
            e.to_string(),
            "host a.test is not allowed on port 8080 (its rules allow port 80)"
        );
    }
}
