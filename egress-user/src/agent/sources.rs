//! Where the agent's policy comes from, and the one function that builds it: the policy files
//! (directories expanded, `*.yaml`/`*.yml` in name order) or the embedded default, then the
//! rules made with `egress create`, then the DNS resolvers of resolv.conf unless the policy
//! names its own. `egress run`, every reload and `egress create` build their policy here.

#![forbid(unsafe_code)]

use std::{
    hash::{Hash as _, Hasher as _},
    io,
    path::{Path, PathBuf},
};

use crate::{
    policy::{self, Policy, PolicyErrors, PolicySource},
    state::Store,
};

/// Why the sources do not make a policy.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The documents are invalid (every error, as `FILE:LINE: message`).
    #[error(transparent)]
    Invalid(#[from] PolicyErrors),
    /// resolv.conf exists but cannot be read.
    #[error(transparent)]
    ResolvConf(io::Error),
}

/// A policy built from its sources.
pub struct Built {
    /// The policy, resolvers filled.
    pub policy: Policy,
    /// What was wrong with resolv.conf (a line without a usable address, a missing file).
    pub resolv_conf_warnings: Vec<String>,
    /// A hash of the sources' names and bytes and of resolv.conf's, see [`digest`].
    pub digest: u64,
}

impl Built {
    /// Logs the policy's warnings (an empty policy, ...) as `FILE:LINE: message`, as `egress
    /// check` prints them, and resolv.conf's.
    pub fn log_warnings(&self) {
        for warning in &self.policy.warnings {
            tracing::warn!(%warning, "policy warning");
        }
        for warning in &self.resolv_conf_warnings {
            tracing::warn!(problem = %warning, "dns: resolv.conf");
        }
    }
}

/// The policy sources: the files under `paths` or, without any, the embedded default, then
/// the created rules of `store`.
pub fn list(paths: &[PathBuf], store: &Store) -> Vec<PolicySource> {
    let mut out = Vec::new();
    if paths.is_empty() {
        out.push(PolicySource::Text {
            name: policy::DEFAULT_POLICY_NAME.to_owned(),
            bytes: policy::DEFAULT_POLICY.as_bytes().to_vec(),
        });
    }
    for path in paths {
        match std::fs::read_dir(path) {
            Ok(entries) => {
                let mut found: Vec<PathBuf> = entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                    .collect();
                found.sort();
                out.extend(found.into_iter().map(PolicySource::File));
            }
            // Not a directory (or unreadable): loading reports it with the path.
            Err(_) => out.push(PolicySource::File(path.clone())),
        }
    }
    let created = store.created_path();
    if created.exists() {
        out.push(PolicySource::File(created));
    }
    out
}

/// Reads and validates `sources` as one policy and fills its DNS resolvers from `resolv_conf`
/// (read every time, so a changed resolv.conf is in force from the next reload on).
///
/// # Errors
/// The documents are invalid, or resolv.conf exists but cannot be read.
pub fn build(sources: &[PolicySource], resolv_conf: &Path) -> Result<Built, SourceError> {
    // Taken before the sources are read, never after: a file written while they are read then
    // has a digest its policy does not match, and the write's own event reloads it. Taken
    // after, the digest would already be the new bytes' and that reload would be skipped as
    // "unchanged", leaving the older policy in force.
    let digest = digest(sources, resolv_conf);
    let mut policy = policy::load_mixed(sources)?;
    let resolv_conf_warnings = policy
        .fill_resolvers(resolv_conf)
        .map_err(SourceError::ResolvConf)?;
    Ok(Built {
        policy,
        resolv_conf_warnings,
        digest,
    })
}

/// A hash of the sources' names and bytes, and of resolv.conf's (an unreadable file hashes its
/// error): a reload that would change nothing is skipped.
pub fn digest(sources: &[PolicySource], resolv_conf: &Path) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    let resolv_conf = PolicySource::File(resolv_conf.to_owned());
    for source in sources.iter().chain([&resolv_conf]) {
        match source {
            PolicySource::File(path) => {
                path.hash(&mut h);
                // Bounded and never blocking, as loading reads it: a FIFO named as a policy
                // file must not hang the watcher (loading then reports it).
                match policy::read::read_bounded(path, policy::MAX_FILE_SIZE) {
                    Ok(bytes) => bytes.hash(&mut h),
                    Err(e) => e.to_string().hash(&mut h),
                }
            }
            PolicySource::Text { name, bytes } => {
                name.hash(&mut h);
                bytes.hash(&mut h);
            }
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn a_changed_resolv_conf_changes_the_digest() {
        let dir = TempDir::new("digest");
        let resolv_conf = dir.file("resolv.conf", "nameserver 192.0.2.53\n");
        let sources = [PolicySource::Text {
            name: "p.yaml".to_owned(),
            bytes: b"kind: EgressConfig\n".to_vec(),
        }];
        let before = digest(&sources, &resolv_conf);
        assert_eq!(digest(&sources, &resolv_conf), before);
        std::fs::write(&resolv_conf, "nameserver 192.0.2.54\n").expect("write");
        let after = digest(&sources, &resolv_conf);
        std::fs::remove_file(&resolv_conf).expect("remove");
        let missing = digest(&sources, &resolv_conf);
        assert_ne!(after, before);
        assert_ne!(missing, after);
    }
}
