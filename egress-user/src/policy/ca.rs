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
