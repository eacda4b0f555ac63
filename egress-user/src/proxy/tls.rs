//! TLS origination settings: one rustls client configuration per proxy, built from the
//! system's roots plus the policy's `caFiles`, on the `ring` provider (aws-lc-rs would need
//! cmake to build). The server name and verification are explicit per upstream: the connector
//! ([`super::upstream`]) passes the rule's host as the SNI and the name to verify.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use super::error::ConfigError;
use crate::policy::ca::{CaFileError, read_ca_file};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};

/// Installs `ring` as the process's default rustls crypto provider, once. Call it at start-up;
/// [`super::Proxy::new`] calls it too, so calling it is never required, only earlier.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when another provider is already installed, which is then the default.
        if rustls::crypto::ring::default_provider()
            .install_default()
            .is_err()
        {
            tracing::debug!("a rustls crypto provider was already installed");
        }
    });
}

fn provider() -> Arc<CryptoProvider> {
    install_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// Where trusted roots come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SystemRoots {
    /// The operating system's store plus `caFiles`.
    Load,
    /// Only `caFiles` (tests, so that the machine's store cannot make a wrong-CA test pass).
    #[cfg_attr(not(test), expect(dead_code, reason = "used by the tests only"))]
    Skip,
}

/// The client configuration for every TLS upstream: HTTP/1.1 by ALPN, session resumption on
/// (rustls' default in-memory cache), roots from the system and `ca_files`.
pub(crate) fn client_config(
    ca_files: &[PathBuf],
    system: SystemRoots,
) -> Result<Arc<ClientConfig>, ConfigError> {
    let mut roots = match system {
        SystemRoots::Load => system_roots(),
        SystemRoots::Skip => RootCertStore::empty(),
    };
    for path in ca_files {
        add_ca_file(&mut roots, path)?;
    }
    if roots.is_empty() {
        tracing::warn!("no trusted roots: every https upstream will fail verification");
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(ConfigError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Where the system's certificate store lives on the distributions rustls-native-certs knows
/// (its `openssl-probe` list): the bundle files and the directories of single certificates.
const STORE_PATHS: [&str; 12] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/etc/ssl/certs",
    "/etc/pki/tls/certs",
    "/etc/pki/tls",
    "/etc/ssl",
    "/etc/openssl/certs",
    "/usr/local/share/certs",
];

/// Size, modification time (ns), change time and inode of each path (`None`: missing).
type Fingerprint = Vec<(String, Option<(u64, i64, i64, u64)>)>;

/// What says whether the system's store changed: `SSL_CERT_FILE` and `SSL_CERT_DIR` and every
/// [`STORE_PATHS`] entry, with [`fingerprint`] (a directory's times change when a certificate
/// is added to it or removed).
fn store_fingerprint() -> Fingerprint {
    let from_env = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .into_iter()
        .filter_map(|var| std::env::var(var).ok());
    fingerprint(from_env.chain(STORE_PATHS.iter().map(|p| (*p).to_owned())))
}

/// The [`Fingerprint`] of `paths`.
fn fingerprint(paths: impl Iterator<Item = String>) -> Fingerprint {
    use std::os::unix::fs::MetadataExt as _;
    paths
        .map(|path| {
            let meta = std::fs::metadata(&path).ok().map(|m| {
                let mtime = m.mtime() * 1_000_000_000 + m.mtime_nsec();
                (m.len(), mtime, m.ctime(), m.ino())
            });
            (path, meta)
        })
        .collect()
}

/// The system's trust roots, read again only when [`store_fingerprint`] changed: a reload
/// needs the proxy's TLS settings anew, and reading some 150 certificates took 3-4 ms of
/// every reload.
fn system_roots() -> RootCertStore {
    type Cached = Option<(Fingerprint, RootCertStore)>;
    static CACHE: std::sync::Mutex<Cached> = std::sync::Mutex::new(None);
    let fingerprint = store_fingerprint();
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((seen, roots)) = &*cache
        && *seen == fingerprint
    {
        return roots.clone();
    }
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::warn!(error = %err, "skipping part of the system certificate store");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "system trust roots loaded");
    *cache = Some((fingerprint, roots.clone()));
    roots
}

/// Adds the certificates of one `caFiles` entry, read as the policy loader checked it
/// ([`read_ca_file`]: a regular file of bounded size, never a FIFO that would block).
fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), ConfigError> {
    let path_buf = || path.to_owned();
    let certs = read_ca_file(path).map_err(|error| match error {
        CaFileError::Read(source) => ConfigError::CaFileRead {
            path: path_buf(),
            source: source.into(),
        },
        CaFileError::Pem(source) => ConfigError::CaFilePem {
            path: path_buf(),
            source,
        },
        CaFileError::Empty => ConfigError::CaFileEmpty { path: path_buf() },
        CaFileError::Cert { index, error } => ConfigError::CaCert {
            path: path_buf(),
            index,
            source: error,
        },
    })?;
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|source| ConfigError::CaCert {
            path: path_buf(),
            index: i + 1,
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_store_fingerprint_changes_when_a_file_of_it_does() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bundle.pem");
        let paths = || [file.display().to_string(), dir.path().display().to_string()].into_iter();
        let missing = fingerprint(paths());
        assert_eq!(missing[0].1, None);
        std::fs::write(&file, "one").unwrap();
        let written = fingerprint(paths());
        assert_ne!(written, missing, "a file appeared");
        assert_eq!(fingerprint(paths()), written, "nothing changed");
        std::fs::write(&file, "other").unwrap();
        assert_ne!(fingerprint(paths()), written, "the file was rewritten");
    }

    use super::*;
    use crate::testing::TempDir;

    #[test]
    fn ca_file_errors_name_the_file() {
        let missing = PathBuf::from("/nonexistent/egress-ca.pem");
        let err = client_config(std::slice::from_ref(&missing), SystemRoots::Skip).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ca file /nonexistent/egress-ca.pem: cannot read it"
        );

        let dir = TempDir::new("tls");
        let empty = dir.file("empty.pem", b"no pem here\n");
        let err = client_config(std::slice::from_ref(&empty), SystemRoots::Skip).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("ca file {}: no certificate in it", empty.display())
        );

        let garbage = dir.file(
            "garbage.pem",
            b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        );
        let err = client_config(std::slice::from_ref(&garbage), SystemRoots::Skip).unwrap_err();
        assert!(matches!(err, ConfigError::CaFilePem { .. }), "{err:?}");

        let not_a_cert = dir.file(
            "bad.pem",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        );
        let err = client_config(std::slice::from_ref(&not_a_cert), SystemRoots::Skip).unwrap_err();
        assert!(
            err.to_string().contains("certificate 1 is not a usable ca"),
            "{err}"
        );
    }

    #[test]
    fn good_ca_file_loads() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let dir = TempDir::new("tls");
        let path = dir.file("ca.pem", ca.pem());
        let config = client_config(std::slice::from_ref(&path), SystemRoots::Skip).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }
}
