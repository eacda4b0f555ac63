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
    policy::{self, Policy, PolicyErrors, PolicySource, ReadSource},
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
    /// A hash of the sources' names and bytes and of resolv.conf's, see [`read`].
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

/// The policy sources read once, and the digest of what was read.
pub struct Read {
    sources: Vec<ReadSource>,
    /// A hash of the sources' names and bytes and of resolv.conf's, see [`read`].
    pub digest: u64,
}

/// Reads every source once, and hashes what was read together with resolv.conf's bytes (an
/// unreadable file hashes its error): a reload whose digest is the one in force would change
/// nothing and is skipped, and one that goes on checks exactly the bytes its digest describes.
/// A file written after it was read has new bytes; the write's own event reloads it.
pub fn read(sources: Vec<PolicySource>, resolv_conf: &Path) -> Read {
    let sources = policy::read_sources(sources);
    let mut h = std::hash::DefaultHasher::new();
    sources.hash(&mut h);
    // Before resolv.conf is read for its resolvers (in [`Read::build`]), never after: a
    // resolv.conf written in between then has a digest its policy does not match, and the
    // write's own event reloads it, instead of being skipped as "unchanged".
    policy::read_sources([PolicySource::File(resolv_conf.to_owned())]).hash(&mut h);
    Read {
        sources,
        digest: h.finish(),
    }
}

/// Reads and validates `sources` as one policy and fills its DNS resolvers from `resolv_conf`
/// (read every time, so a changed resolv.conf is in force from the next reload on).
///
/// # Errors
/// The documents are invalid, or resolv.conf exists but cannot be read.
pub fn build(sources: Vec<PolicySource>, resolv_conf: &Path) -> Result<Built, SourceError> {
    read(sources, resolv_conf).build(resolv_conf)
}

impl Read {
    /// Validates the sources read as one policy and fills its DNS resolvers from
    /// `resolv_conf`, as [`build`] does.
    ///
    /// # Errors
    /// The documents are invalid, or resolv.conf exists but cannot be read.
    pub fn build(self, resolv_conf: &Path) -> Result<Built, SourceError> {
        let mut policy = policy::load_read_whole(&self.sources)?;
        let resolv_conf_warnings = policy
            .fill_resolvers(resolv_conf)
            .map_err(SourceError::ResolvConf)?;
        Ok(Built {
            policy,
            resolv_conf_warnings,
            digest: self.digest,
        })
    }
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
        let before = read(sources.to_vec(), &resolv_conf).digest;
        assert_eq!(read(sources.to_vec(), &resolv_conf).digest, before);
        std::fs::write(&resolv_conf, "nameserver 192.0.2.54\n").expect("write");
        let after = read(sources.to_vec(), &resolv_conf).digest;
        std::fs::remove_file(&resolv_conf).expect("remove");
        let missing = read(sources.to_vec(), &resolv_conf).digest;
        assert_ne!(after, before);
        assert_ne!(missing, after);
    }

    fn rule(name: &str) -> String {
        format!(
            "kind: EgressRule\nmetadata:\n  name: {name}\nspec:\n  destination:\n      \
             service: 192.0.2.0/24\n  ports:\n      - port: 443\n        protocol: tcp\n"
        )
    }

    #[test]
    fn a_reload_checks_the_bytes_its_digest_describes() {
        let dir = TempDir::new("read-once");
        let resolv_conf = dir.file("resolv.conf", "nameserver 192.0.2.53\n");
        let file = dir.file("p.yaml", rule("first"));
        let sources = [PolicySource::File(file.clone())];
        let first = read(sources.to_vec(), &resolv_conf);
        // Written after the sources were read: this reload goes on with what it read.
        std::fs::write(&file, rule("second")).expect("write");
        let built = first.build(&resolv_conf).expect("valid");
        let names: Vec<_> = built.policy.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["first"]);
        // And the write's own reload is not skipped as unchanged.
        let second = read(sources.to_vec(), &resolv_conf);
        assert_ne!(second.digest, built.digest);
        let built = second.build(&resolv_conf).expect("valid");
        let names: Vec<_> = built.policy.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["second"]);
        // The same bytes again: the same digest, so that reload is skipped.
        assert_eq!(read(sources.to_vec(), &resolv_conf).digest, built.digest);
    }

    #[test]
    fn an_unreadable_file_is_reported_and_has_a_digest_of_its_own() {
        let dir = TempDir::new("read-error");
        let resolv_conf = dir.file("resolv.conf", "nameserver 192.0.2.53\n");
        let file = dir.file("p.yaml", rule("first"));
        let sources = [PolicySource::File(file.clone())];
        let present = read(sources.to_vec(), &resolv_conf).digest;
        std::fs::remove_file(&file).expect("remove");
        let missing = read(sources.to_vec(), &resolv_conf);
        assert_ne!(missing.digest, present);
        let Err(SourceError::Invalid(errors)) = missing.build(&resolv_conf) else {
            panic!("a missing policy file must be an error");
        };
        let message = errors.to_string();
        assert!(
            message.starts_with(&format!(
                "{}:1: cannot read the policy file",
                file.display()
            )),
            "{message}"
        );
    }
}
