//! TLS origination to local rustls servers under a test CA, and apps that bring their own TLS.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

use super::*;
use crate::{
    policy::{Alias, HttpProtocol::Https},
    testing::TempDir,
};

/// A test certificate authority.
struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Ca(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    /// The CA's PEM in a file of its own, for `caFiles`, in a directory that goes when the
    /// returned guard is dropped.
    fn file(&self, tag: &str) -> (TempDir, PathBuf) {
        let dir = TempDir::new(&format!("proxy-test-{tag}"));
        let path = dir.file("ca.pem", self.0.pem());
        (dir, path)
    }

    /// A server configuration with a certificate for `names`, optionally long expired.
    fn server(&self, names: &[&str], expired: bool) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = params.signed_by(&key, &self.0).unwrap();
        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        super::super::install_crypto_provider();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// A TLS upstream on `addr` answering with [`echo`], and a harness whose policy has one https
/// rule for `name` on its port, mapped to 127.0.0.1 and trusting `trusted`.
async fn setup(
    name: &str,
    server: Arc<rustls::ServerConfig>,
    trusted: &Ca,
    tag: &str,
) -> (Upstream, Harness, TempDir) {
    let up = Upstream::with("127.0.0.1:0", Some(server), handler(echo)).await;
    let (dir, ca) = trusted.file(tag);
    let mut p = policy(vec![rule("secure", name, up.addr.port(), Https)], &[name]);
    p.ca_files = vec![ca];
    (up, Harness::start(p).await, dir)
}

#[tokio::test]
async fn https_rule_originates_tls_with_the_host_as_sni() {
    let ca = Ca::new("egress test ca");
    let (up, mut h, _ca_dir) =
        setup("secure.test", ca.server(&["secure.test"], false), &ca, "ok").await;
    let port = up.addr.port();
    let mut c = h.connect(orig(port)).await;
    // The app speaks plain HTTP to http://secure.test:PORT/.
    c.get(&format!("secure.test:{port}"), "/get")
        .await
        .assert_echoed(&format!("secure.test:{port}"), "/get");
    assert_eq!(
        *up.sni.lock().unwrap(),
        vec![Some("secure.test".to_owned())]
    );
    // Kept alive and pooled: a second request reuses the TLS connection.
    assert_eq!(c.get("secure.test", "/again").await.status, 200);
    assert_eq!(up.conns.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(h.event().await.upstream, Some(up.addr));
}

/// Fails the handshake for `server` and returns the 502's body.
async fn refused(
    name: &str,
    server: Arc<rustls::ServerConfig>,
    trusted: &Ca,
    tag: &str,
) -> (String, RequestEvent) {
    let (up, mut h, _ca_dir) = setup(name, server, trusted, tag).await;
    let mut c = h.connect(orig(up.addr.port())).await;
    let r = c.get(name, "/").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(up.requests(), 0);
    (r.text(), h.event().await)
}

/// `a:123 (127.0.0.1:5)` -> `a:N (N.N.N.N:N)`.
fn numbers_to_n(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('N') {
            out.push('N');
        }
    }
    out
}

#[tokio::test]
async fn wrong_ca_wrong_name_and_expired_are_502_with_the_reason() {
    let ca = Ca::new("egress test ca");
    let other = Ca::new("another test ca");
    let (body, ev) = refused(
        "secure.test",
        other.server(&["secure.test"], false),
        &ca,
        "wrong-ca",
    )
    .await;
    let port_free = numbers_to_n(&body);
    assert!(
        port_free.starts_with("egress: upstream secure.test:N: tls handshake with secure.test (N.N.N.N:N): invalid peer certificate: UnknownIssuer"),
        "{body}"
    );
    assert_eq!(
        ev.reason.as_deref(),
        Some(body.trim_start_matches("egress: ").trim_end())
    );

    let cases = [
        (
            ca.server(&["other.test"], false),
            "wrong-name",
            "invalid peer certificate: certificate not valid for name \"secure.test\"",
        ),
        (
            ca.server(&["secure.test"], true),
            "expired",
            "invalid peer certificate: certificate expired",
        ),
    ];
    for (server, tag, why) in cases {
        let (body, _) = refused("secure.test", server, &ca, tag).await;
        assert!(body.contains(why), "{body}");
    }
}

#[tokio::test]
async fn an_alias_on_443_originates_tls_to_the_external_name() {
    let ca = Ca::new("egress test ca");
    let server = ca.server(&["secure.test"], false);
    // Port 443 is what makes an alias https; several loopback addresses in case one is taken.
    let mut up = None;
    for last in 77..90 {
        let addr = format!("127.0.0.{last}:443");
        if let Ok(l) = std::net::TcpListener::bind(&addr) {
            drop(l);
            up = Some(Upstream::with(&addr, Some(server.clone()), handler(echo)).await);
            break;
        }
    }
    let up = up.expect("binding a loopback address on port 443 (the tests run as root)");
    let (_ca_dir, file) = ca.file("alias");
    let mut p = Policy {
        ca_files: vec![file],
        ..Policy::default()
    };
    p.hosts.insert("secure.test".into(), vec![up.addr.ip()]);
    p.aliases.push(Alias {
        scope: None,
        name: "securebin".into(),
        namespace: "apps".into(),
        origin: origin(),
        external_name: "secure.test".into(),
        ports: vec![443],
    });
    let mut h = Harness::start(p).await;
    let mut c = h.connect(orig(443)).await;
    c.get("securebin.apps.svc", "/headers")
        .await
        .assert_echoed("secure.test", "/headers");
    assert_eq!(
        *up.sni.lock().unwrap(),
        vec![Some("secure.test".to_owned())]
    );
    let ev = h.event().await;
    assert_eq!(
        (ev.rule.as_deref(), ev.upstream),
        (Some("securebin"), Some(up.addr))
    );
}

#[tokio::test]
async fn an_app_that_does_its_own_tls_is_refused_with_its_sni_named() {
    let up = Upstream::start("127.0.0.1").await;
    let mut h = Harness::start(policy(
        vec![rule("secure", "tls.test", 443, Https)],
        &["tls.test"],
    ))
    .await;
    let c = h.connect(orig(443)).await;
    let tcp = c.io.into_inner();
    super::super::install_crypto_provider();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from("tls.test").unwrap();
    let result = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await;
    let err = result.expect_err("the proxy must not complete a TLS handshake");
    assert!(err.to_string().contains("HandshakeFailure"), "{err}");
    let ev = h.event().await;
    assert_eq!(
        (ev.host.as_str(), ev.status, ev.rule.as_deref()),
        ("tls.test", 0, None)
    );
    let reason = ev.reason.unwrap();
    assert!(
        reason.starts_with("tls client hello for tls.test on an http egress port refused"),
        "{reason}"
    );
    assert!(
        reason.contains("send http://tls.test:443/ to have the proxy originate tls"),
        "{reason}"
    );
    assert!(reason.contains("tcp rule"), "{reason}");
    let none = h.proxy.counters().pop().unwrap();
    assert_eq!((none.requests, none.denied), (1, 1));
    assert_eq!(up.conns.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Issue 14: in audit mode an app's own TLS is not refused but relayed, byte for byte, to
/// where the app sent it: the handshake completes with the real server (which sees the app's
/// SNI) and the request is answered, with one would-deny event naming the SNI.
#[tokio::test]
async fn in_audit_mode_an_apps_own_tls_is_relayed_to_its_destination_and_reported() {
    let ca = Ca::new("egress audit test ca");
    let up = Upstream::with(
        "127.0.0.1:0",
        Some(ca.server(&["tls.test"], false)),
        handler(echo),
    )
    .await;
    let mut p = policy(vec![rule("other", "other.test", 443, Https)], &[]);
    p.mode = crate::policy::Mode::Audit;
    let mut h = Harness::start(p).await;
    let c = h.connect(up.addr).await;
    let tcp = c.io.into_inner();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.0.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("tls.test").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("the handshake reaches the real server in audit mode");
    tls.write_all(b"GET /own HTTP/1.1\r\nHost: tls.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("reading the answer");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(tls);
    assert_eq!(
        up.requests(),
        1,
        "the destination served the app's own request"
    );
    assert_eq!(up.last().uri, "/own");
    assert_eq!(*up.sni.lock().unwrap(), vec![Some("tls.test".to_owned())]);
    let ev = h.event().await;
    assert!(ev.would_deny, "{ev:?}");
    assert_eq!((ev.host.as_str(), ev.rule.as_deref()), ("tls.test", None));
    assert_eq!(ev.upstream, Some(up.addr));
    assert!(ev.bytes_in > 0 && ev.bytes_out > 0, "{ev:?}");
    let reason = ev.reason.unwrap();
    assert!(
        reason.contains("audit mode passed it on")
            && reason.contains("tls client hello for tls.test"),
        "{reason}"
    );
    let none = h.proxy.counters().pop().unwrap();
    assert_eq!((none.would_deny, none.denied), (1, 0));
}

/// An app's own TLS over `tcp` to `name`, trusting `ca`.
async fn own_tls(
    tcp: TcpStream,
    name: &str,
    ca: &Ca,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    super::super::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.0.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// A TLS upstream for `tls.test` and a proxy whose policy has the `tls` (passthrough) rule
/// `passthrough` for `*.tls.test`... and `tls.test` itself, on the upstream's port.
async fn passthrough_setup(ca: &Ca) -> (Upstream, Harness) {
    let up = Upstream::with(
        "127.0.0.1:0",
        Some(ca.server(&["tls.test", "www.tls.test"], false)),
        handler(echo),
    )
    .await;
    let port = up.addr.port();
    let h = Harness::start(policy(
        vec![
            rule("exact", "tls.test", port, crate::policy::HttpProtocol::Tls),
            rule("wild", "*.tls.test", port, crate::policy::HttpProtocol::Tls),
        ],
        &["tls.test", "www.tls.test"],
    ))
    .await;
    (up, h)
}

/// Issue 18: `protocol: tls` lets an app's own TLS through, unmodified, when its SNI matches
/// the rule: the handshake is with the real server (trusting the app's own CA, which the
/// proxy never holds), and the proxy reaches it by resolving the SNI itself, not at the
/// address the app gave (`orig`, where nothing listens).
#[tokio::test]
async fn a_tls_rule_passes_the_apps_own_tls_through_to_its_sni() {
    let ca = Ca::new("egress passthrough test ca");
    let (up, mut h) = passthrough_setup(&ca).await;
    let port = up.addr.port();
    for (name, rule) in [("tls.test", "exact"), ("www.tls.test", "wild")] {
        let c = h.connect(orig(port)).await;
        let mut tls = own_tls(c.io.into_inner(), name, &ca)
            .await
            .expect("the handshake reaches the real server");
        tls.write_all(
            format!("GET /own HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, tls.read_to_end(&mut answer))
            .await
            .expect("an answer in time")
            .expect("reading the answer");
        assert!(
            String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        // The connection's one event comes when it ends.
        drop(tls);
        let ev = h.event().await;
        assert_eq!(
            (ev.host.as_str(), ev.rule.as_deref(), ev.upstream),
            (name, Some(rule), Some(up.addr)),
            "{ev:?}"
        );
        assert_eq!(ev.orig_dst, Some(orig(port)));
        assert!(
            ev.bytes_in > 0 && ev.bytes_out > 0 && ev.reason.is_none(),
            "{ev:?}"
        );
    }
    assert_eq!(
        *up.sni.lock().unwrap(),
        vec![Some("tls.test".to_owned()), Some("www.tls.test".to_owned())]
    );
    assert_eq!(up.requests(), 2);
    let counted: Vec<_> = h.proxy.counters().into_iter().map(|c| c.requests).collect();
    assert_eq!(counted, [1, 1, 0]);
}

/// No SNI, an SNI no tls rule names (on that port), and an encrypted ClientHello (ECH) are
/// refused with an alert, and each with an event naming what the app asked for; the upstream
/// never sees a connection.
#[tokio::test]
async fn a_tls_rule_refuses_no_sni_another_name_and_ech() {
    let ca = Ca::new("egress passthrough refusal ca");
    let (up, mut h) = passthrough_setup(&ca).await;
    let port = up.addr.port();

    // No SNI: an IP address as the server name sends none.
    let c = h.connect(orig(port)).await;
    let err = own_tls(c.io.into_inner(), "127.0.0.9", &ca)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("HandshakeFailure"), "{err}");
    let ev = h.event().await;
    let reason = ev.reason.unwrap_or_default();
    assert!(
        reason.starts_with("tls client hello without sni"),
        "{reason}"
    );
    assert_eq!(ev.rule, None);

    // Another name, and a name of the rule's on another port.
    let c = h.connect(orig(port)).await;
    own_tls(c.io.into_inner(), "other.test", &ca)
        .await
        .expect_err("refused");
    let reason = h.event().await.reason.unwrap_or_default();
    assert!(
        reason.starts_with("tls client hello for other.test on an http egress port refused")
            && reason.contains(&format!("no tls rule allows other.test on port {port}")),
        "{reason}"
    );
    let c = h.connect(orig(port + 1)).await;
    own_tls(c.io.into_inner(), "tls.test", &ca)
        .await
        .expect_err("refused");
    let reason = h.event().await.reason.unwrap_or_default();
    assert!(
        reason.contains("no tls rule allows tls.test on port"),
        "{reason}"
    );

    // ECH: a ClientHello for tls.test with an encrypted_client_hello extension.
    let mut c = h.connect(orig(port)).await;
    c.io.get_mut()
        .write_all(&super::super::hello::tests::with_ech(
            &super::super::hello::tests::hello("tls.test"),
        ))
        .await
        .unwrap();
    let mut alert = Vec::new();
    let _ = tokio::time::timeout(WAIT, c.io.get_mut().read_to_end(&mut alert)).await;
    assert_eq!(alert.first(), Some(&0x15), "an alert record: {alert:?}");
    let ev = h.event().await;
    let reason = ev.reason.unwrap_or_default();
    assert!(
        reason.starts_with("tls client hello for tls.test with encrypted client hello (ech)"),
        "{reason}"
    );
    assert_eq!(ev.host, "tls.test");

    assert_eq!(up.conns.load(std::sync::atomic::Ordering::SeqCst), 0);
    let none = h.proxy.counters().pop().unwrap();
    assert_eq!((none.requests, none.denied), (4, 4));
}
