//! Recognising an app that did its own TLS on an HTTP egress port: the first byte of a TLS
//! connection is a handshake record (0x16), which no HTTP method starts with. The proxy cannot
//! check the Host of an encrypted request, so it refuses the connection and names the SNI.

use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// The TLS record type of a handshake message.
pub(crate) const HANDSHAKE: u8 = 0x16;

/// How long the proxy waits for the rest of a ClientHello record.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A fatal `handshake_failure` alert, so the app's TLS library reports a refusal rather than a
/// reset.
const ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];

/// Reads the first TLS record from `stream` (whose first byte is [`HANDSHAKE`]), answers with
/// an alert, and returns the SNI of the ClientHello, if it has one.
pub(crate) async fn read_sni_and_refuse(stream: &mut TcpStream) -> Option<String> {
    let read = async {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).await.ok()?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let mut record = vec![0u8; len.min(18 * 1024)];
        stream.read_exact(&mut record).await.ok()?;
        Some(record)
    };
    let record = tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .ok()
        .flatten();
    let _ = tokio::io::AsyncWriteExt::write_all(stream, &ALERT).await;
    record.as_deref().and_then(client_hello_sni)
}

/// The SNI of the ClientHello waiting on `stream`, read without consuming it (audit mode relays
/// the bytes on as they are): `None` when the first byte is not [`HANDSHAKE`], the record does
/// not arrive whole within the read limit, or it names no server.
pub(crate) async fn peek_sni(stream: &TcpStream) -> Option<String> {
    peek_hello(stream).await.and_then(|hello| hello.sni)
}

/// What the proxy reads of a ClientHello.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Hello {
    /// The server name (SNI), if it names one.
    pub(crate) sni: Option<String>,
    /// It carries an `encrypted_client_hello` extension: the name that matters is encrypted,
    /// and the SNI in clear is only the client-facing server's.
    pub(crate) ech: bool,
}

/// The ClientHello waiting on `stream`, read without consuming it (the bytes go on as they
/// are): `None` when the first byte is not [`HANDSHAKE`], the record does not arrive whole
/// within the read limit, or it is not a ClientHello.
pub(crate) async fn peek_hello(stream: &TcpStream) -> Option<Hello> {
    let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
    let mut buf = vec![0u8; 5 + 18 * 1024];
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 || buf[0] != HANDSHAKE {
            return None;
        }
        if n >= 5 {
            let len = usize::from(u16::from_be_bytes([buf[3], buf[4]])).min(18 * 1024);
            if n >= 5 + len {
                return client_hello(&buf[5..5 + len]);
            }
        }
        // A peek returns at once while any byte waits: wait a little for the rest.
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The server name in a ClientHello handshake message (the payload of the first record).
pub(crate) fn client_hello_sni(msg: &[u8]) -> Option<String> {
    client_hello(msg).and_then(|hello| hello.sni)
}

/// `encrypted_client_hello` (draft-ietf-tls-esni), extension type 0xfe0d.
const ECH: u16 = 0xfe0d;

/// The server name and the ECH extension of a ClientHello handshake message; `None` when it
/// is not a ClientHello or is cut short before its extensions.
pub(crate) fn client_hello(msg: &[u8]) -> Option<Hello> {
    let mut c = Cursor(msg);
    if c.u8()? != 0x01 {
        return None; // not a ClientHello
    }
    let _len = c.take(3)?;
    let _version = c.take(2)?;
    let _random = c.take(32)?;
    let n = c.u8()?;
    let _session_id = c.take(usize::from(n))?;
    let n = c.u16()?;
    let _ciphers = c.take(usize::from(n))?;
    let n = c.u8()?;
    let _compression = c.take(usize::from(n))?;
    let n = c.u16()?;
    let mut exts = Cursor(c.take(usize::from(n)).unwrap_or(c.0));
    let mut hello = Hello::default();
    while let (Some(kind), Some(len)) = (exts.u16(), exts.u16()) {
        let data = exts.take(usize::from(len))?;
        match kind {
            0 => hello.sni = server_name(data),
            ECH => hello.ech = true,
            _ => {}
        }
    }
    Some(hello)
}

/// The host name of a `server_name` extension's list.
fn server_name(data: &[u8]) -> Option<String> {
    let mut list = Cursor(data);
    let n = list.u16()?;
    let mut list = Cursor(list.take(usize::from(n))?);
    while let Some(name_type) = list.u8() {
        let n = list.u16()?;
        let name = list.take(usize::from(n))?;
        if name_type == 0 {
            return std::str::from_utf8(name).ok().map(str::to_owned);
        }
    }
    None
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A real ClientHello record, from rustls, for `name`.
    pub(in crate::proxy) fn hello(name: &str) -> Vec<u8> {
        super::super::tls::install_crypto_provider();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn finds_the_sni_of_a_real_client_hello() {
        let record = hello("secure.example.test");
        assert_eq!(record[0], HANDSHAKE);
        assert_eq!(
            client_hello_sni(&record[5..]).as_deref(),
            Some("secure.example.test")
        );
        // An IP address sends no SNI.
        let record = hello("127.0.0.1");
        assert_eq!(client_hello_sni(&record[5..]), None);
    }

    #[test]
    fn an_encrypted_client_hello_extension_is_seen() {
        let record = hello("public.example.test");
        assert_eq!(
            client_hello(&record[5..]),
            Some(Hello {
                sni: Some("public.example.test".to_owned()),
                ech: false
            })
        );
        // The same hello with an encrypted_client_hello extension appended.
        let record = with_ech(&record);
        let seen = client_hello(&record[5..]).expect("a hello");
        assert_eq!(seen.sni.as_deref(), Some("public.example.test"));
        assert!(seen.ech);
    }

    /// `record` (one handshake record holding a ClientHello) with an `encrypted_client_hello`
    /// extension appended, every length fixed.
    pub(in crate::proxy) fn with_ech(record: &[u8]) -> Vec<u8> {
        let data = [0, 1, 2, 3];
        let mut msg = record[5..].to_vec();
        // Past the version, the random, the session id, the cipher suites and the compression
        // methods: the extensions' length.
        let mut c = 4 + 2 + 32;
        c += 1 + usize::from(msg[c]);
        c += 2 + usize::from(u16::from_be_bytes([msg[c], msg[c + 1]]));
        c += 1 + usize::from(msg[c]);
        let exts_len = u16::from_be_bytes([msg[c], msg[c + 1]]);
        let added = u16::try_from(4 + data.len()).unwrap();
        msg[c..c + 2].copy_from_slice(&(exts_len + added).to_be_bytes());
        msg.extend_from_slice(&ECH.to_be_bytes());
        msg.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        msg.extend_from_slice(&data);
        let body = u32::try_from(msg.len() - 4).unwrap().to_be_bytes();
        msg[1..4].copy_from_slice(&body[1..]);
        let mut out = record[..3].to_vec();
        out.extend_from_slice(&u16::try_from(msg.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&msg);
        out
    }

    #[test]
    fn survives_truncation_and_garbage() {
        let record = hello("a.test");
        for n in 0..record.len() - 5 {
            let _ = client_hello_sni(&record[5..5 + n]);
        }
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(client_hello_sni(&[1, 0, 0]), None);
    }
}
