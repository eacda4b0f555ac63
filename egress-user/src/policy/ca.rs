//! `caFiles`: the extra trusted roots of the proxy's TLS origination, read and checked when the
//! policy is loaded (by `egress check`, `egress run` and every reload), so that a missing file,
//! a directory, `/etc/passwd` or a FIFO is an error at its `FILE:LINE` and the running policy
//! stays in force, instead of a proxy that cannot start (or a reload that hangs).
//!
//! The proxy reads the files again through [`read_ca_file`] when it is built, so both readings
//! refuse the same things the same way.

use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, pem::PemObject as _};

use super::read::{ReadError, read_bounded};

/// The largest CA file read. Mozilla's whole root store (about 150 roots, the usual
/// `ca-certificates.crt`) is about 220 KiB of PEM; 4 MiB leaves room for a bundle many times
/// that, and still keeps a log file named by mistake out of the agent's memory.
pub const MAX_CA_FILE_SIZE: u64 = 4 * 1024 * 1024;

/// Why a `caFiles` entry cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// It cannot be read, or is not a regular file of at most [`MAX_CA_FILE_SIZE`].
    ///
    /// The message names the cause (it is shown as `FILE:LINE: ...` text), so it is no
    /// `#[source]`: `{:#}` would print it twice.
    #[error("cannot read it: {0}")]
    Read(ReadError),
    /// A PEM section is broken.
    #[error("invalid PEM: {0}")]
    Pem(rustls_pki_types::pem::Error),
    /// No `-----BEGIN CERTIFICATE-----` section (`/etc/passwd`, a private key alone).
    #[error("no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)")]
    Empty,
    /// A certificate that rustls cannot take as a trust anchor.
    #[error("certificate {index} in it is not a usable CA certificate: {error}")]
    Cert {
        /// 1-based position of the certificate in the file.
        index: usize,
        /// What rustls said.
        error: rustls::Error,
    },
}

/// The certificates of the CA file at `path`: a regular file of at most [`MAX_CA_FILE_SIZE`]
/// holding at least one PEM certificate, each usable as a trust anchor. Never blocks (see
/// [`read_bounded`]).
///
/// # Errors
/// See [`CaFileError`].
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let pem = read_bounded(path, MAX_CA_FILE_SIZE).map_err(CaFileError::Read)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(CaFileError::Pem)?;
    if certs.is_empty() {
        return Err(CaFileError::Empty);
    }
    // What the proxy's root store will do with them, so a certificate it would refuse is
    // refused here, at the policy's line.
    let mut roots = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        roots.add(cert.clone()).map_err(|error| CaFileError::Cert {
            index: i + 1,
            error,
        })?;
    }
    Ok(certs)
}

/// CA files for the tests of policy loading and of `egress check`, which refuse the same ones.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    /// An EgressConfig naming one CA file, on line 4.
    pub(crate) fn config_naming(ca: &str) -> String {
        format!("kind: EgressConfig\nspec:\n  caFiles:\n    - \"{ca}\"\n")
    }

    /// Files that cannot be CA files, all absolute, each as a policy names it and the message
    /// it gets after `CA file `: a missing file and `dir` itself, a character device, a file
    /// with no PEM in it, and a FIFO this makes in `dir`.
    pub(crate) fn unusable(dir: &Path) -> Vec<(String, String)> {
        let fifo = dir.join("ca-fifo.pem");
        crate::policy::read::mkfifo(&fifo);
        let d = dir.display();
        // A CA file named as it is, and the message it gets, quoting that name.
        let named = |ca: String, why: &str| {
            let message = format!("`{ca}`: {why}");
            (ca, message)
        };
        vec![
            named(
                format!("{d}/missing.pem"),
                "cannot read it: No such file or directory (os error 2)",
            ),
            named(
                d.to_string(),
                "cannot read it: it is a directory, not a regular file",
            ),
            named(
                "/dev/zero".to_owned(),
                "cannot read it: it is a character device, not a regular file",
            ),
            named(
                "/etc/passwd".to_owned(),
                "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
            ),
            named(
                fifo.display().to_string(),
                "cannot read it: it is a FIFO (named pipe), not a regular file",
            ),
        ]
    }
}
