//! Why a change of the policy (a reload, `egress create`, `egress delete`) did not happen. In
//! every case the policy in force stays, on disk and in the kernel.

#![forbid(unsafe_code)]

use crate::{pipeline, proxy, state::SplitError};

use super::sources::SourceError;

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The sources do not make a valid policy.
    #[error(transparent)]
    Sources(#[from] SourceError),
    /// The proxy port is bound once, at start.
    #[error("changing the proxy port ({from} to {to}) needs a restart of the agent")]
    ProxyPort {
        /// The port in force.
        from: u16,
        /// The port asked for.
        to: u16,
    },
    /// The proxy cannot be configured (a CA file).
    #[error(transparent)]
    Proxy(#[from] proxy::ConfigError),
    /// The kernel side refused the policy.
    #[error(transparent)]
    Kernel(#[from] pipeline::Error),
    /// The created rules cannot be read.
    #[error("{0}")]
    Store(String),
    /// The created rules cannot be saved.
    #[error("saving the created rules")]
    Save(#[source] std::io::Error),
    /// `egress create` was given documents it does not take.
    #[error(transparent)]
    Split(#[from] SplitError),
    /// `egress create` was given no document to create.
    #[error("{origin}: no EgressRule or Service document")]
    NoDocuments {
        /// Where the documents came from (a file name, or `-`).
        origin: String,
    },
    /// `egress create` would make an invalid policy: nothing was created.
    #[error("{0}\nnothing was created")]
    NothingCreated(Box<ChangeError>),
    /// `egress delete` names what it cannot delete (one line each): nothing was deleted.
    #[error("{}\nnothing was deleted", .0.join("\n"))]
    NothingDeleted(Vec<String>),
}

/// `error`, then each of its causes, as `error: cause: cause`: what the control socket answers
/// and `egress status` shows as the last error.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
