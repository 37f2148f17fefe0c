//! Test PKI: a throwaway CA and leaf certificates for `localhost`/`127.0.0.1`/`::1`, plus
//! TLS clients that trust only that CA (reqwest, and raw tokio-rustls for handshake checks).
#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Names every leaf is valid for.
pub const LEAF_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Leaves are valid from yesterday until this many days from today (UTC midnights).
pub const LEAF_VALID_DAYS: i64 = 90;

/// Installs rustls' ring provider as the process default (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A CA plus one leaf certificate signed by it.
pub struct TestPki {
    ca: CertifiedIssuer<'static, KeyPair>,
    leaf: Leaf,
}

/// A leaf certificate and its key, signed by a [`TestPki`] CA.
#[derive(Clone)]
pub struct Leaf {
    /// Subject common name.
    pub common_name: String,
    /// Serial number, big-endian bytes (random per leaf).
    pub serial: Vec<u8>,
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
    key_der: Vec<u8>,
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    /// `notAfter` as Unix seconds.
    pub not_after_unix: i64,
}

impl TestPki {
    /// A fresh CA (`chatkit-gate test CA`) and a leaf with CN `localhost` for
    /// [`LEAF_NAMES`], valid from yesterday for [`LEAF_VALID_DAYS`] days.
    pub fn new() -> TestPki {
        install_crypto_provider();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "chatkit-gate test CA");
        params.distinguished_name.push(DnType::OrganizationName, "chatkit-gate tests");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ((y, m, d), _) = date_from_today(-1);
        params.not_before = rcgen::date_time_ymd(y, m, d);
        params.not_after = rcgen::date_time_ymd(2099, 1, 1);
        let key = KeyPair::generate().expect("generate CA key");
        let ca = CertifiedIssuer::self_signed(params, key).expect("self-sign CA");
        let leaf = make_leaf(&ca, "localhost");
        TestPki { ca, leaf }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// The leaf made by [`TestPki::new`] (CN `localhost`).
    pub fn leaf(&self) -> &Leaf {
        &self.leaf
    }

    /// A new leaf for the same names, signed by the same CA, with subject CN `name` and a fresh
    /// key and serial: a client can tell it from other leaves by CN, serial or DER.
    pub fn leaf_with_cn(&self, name: &str) -> Leaf {
        make_leaf(&self.ca, name)
    }

    /// Writes the default leaf to `dir/tls.crt` (leaf + CA chain) and `dir/tls.key`.
    pub fn write_to(&self, dir: &Path) -> (PathBuf, PathBuf) {
        self.leaf.write_to(dir)
    }

    /// A rustls server config presenting the default leaf, ALPN `h2` and `http/1.1`.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.leaf.server_config()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl Leaf {
    /// Leaf then CA certificate, PEM (what `tls.cert_file` holds).
    pub fn chain_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.ca_pem)
    }

    /// Writes `dir/tls.crt` (leaf + chain) and `dir/tls.key`, each through a temp file and a
    /// rename so a watcher never reads half a file. Returns (cert path, key path).
    pub fn write_to(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let cert_path = dir.join("tls.crt");
        let key_path = dir.join("tls.key");
        write_atomically(&cert_path, self.chain_pem().as_bytes());
        write_atomically(&key_path, self.key_pem.as_bytes());
        (cert_path, key_path)
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// The certificate chain as rustls wants it: leaf, then CA.
    pub fn chain_der(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert_der.clone(), self.ca_der.clone()]
    }

    /// A rustls server config presenting this leaf, ALPN `h2` and `http/1.1`.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        install_crypto_provider();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(self.chain_der(), self.key_der())
            .expect("server config from leaf");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

fn write_atomically(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, contents).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// A reqwest client trusting only `ca_pem` (no built-in roots), no proxy, no redirects
/// followed (tests look at 302/308 themselves), 10 s timeout.
/// `http2 = false`: HTTP/1.1 only (ALPN `http/1.1`). `http2 = true`: HTTP/2 only (ALPN `h2`
/// over TLS; h2c prior knowledge over plain http).
pub fn reqwest_client(ca_pem: &str, http2: bool) -> reqwest::Client {
    install_crypto_provider();
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA PEM for reqwest");
    let builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10));
    let builder = if http2 { builder.http2_prior_knowledge() } else { builder.http1_only() };
    builder.build().expect("build reqwest client")
}

/// A rustls client config trusting only `ca_pem`, offering the given ALPN protocols.
pub fn client_config(ca_pem: &str, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("parse CA PEM")).expect("add CA to root store");
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// Opens a TLS connection to `addr`, verifying the server as `server_name` (e.g. `"localhost"`
/// or `"127.0.0.1"`) against `ca_pem`, offering `alpn`. The error is the handshake's, so tests
/// can assert failures (wrong CA, no TLS, …).
pub async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    ca_pem: &str,
    alpn: &[&str],
) -> std::io::Result<TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(client_config(ca_pem, alpn));
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tcp = TcpStream::connect(addr).await?;
    connector.connect(name, tcp).await
}

/// Handshakes with `addr` (as `localhost`, trusting `ca_pem`) and returns the DER of the
/// certificate the server presented. For reload tests: compare with [`Leaf::cert_der`].
pub async fn peer_cert_der(addr: SocketAddr, ca_pem: &str) -> CertificateDer<'static> {
    let stream = tls_connect(addr, "localhost", ca_pem, &["http/1.1"])
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    let (_, connection) = stream.get_ref();
    connection
        .peer_certificates()
        .and_then(|certs| certs.first())
        .expect("server presented no certificate")
        .clone()
        .into_owned()
}

/// The UTC date `days` from today, and its midnight as Unix seconds.
fn date_from_today(days: i64) -> ((i32, u8, u8), i64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs();
    let day = i64::try_from(now / 86_400).expect("day fits") + days;
    (civil_from_days(day), day * 86_400)
}

/// Days since 1970-01-01 to (year, month, day): the gate's own date arithmetic.
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let (y, m, d) = chatkit_gate::obs::time::civil_from_days(days);
    (y as i32, m as u8, d as u8)
}

fn make_leaf(ca: &CertifiedIssuer<'static, KeyPair>, name: &str) -> Leaf {
    let mut params = CertificateParams::new(LEAF_NAMES.map(String::from).to_vec()).expect("leaf params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let mut serial: [u8; 16] = rand::random();
    // High bit clear (positive) and first byte non-zero: DER keeps exactly these 16 bytes.
    serial[0] = (serial[0] & 0x7f) | 0x01;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let ((y, m, d), _) = date_from_today(-1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let ((y, m, d), not_after_unix) = date_from_today(LEAF_VALID_DAYS);
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let key = KeyPair::generate().expect("generate leaf key");
    let cert = params.signed_by(&key, &**ca).expect("sign leaf");
    Leaf {
        common_name: name.to_string(),
        serial: serial.to_vec(),
        cert_der: cert.der().clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        key_der: key.serialize_der(),
        ca_der: ca.der().clone(),
        ca_pem: ca.pem(),
        not_after_unix,
    }
}
