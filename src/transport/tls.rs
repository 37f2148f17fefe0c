//! TLS termination settings: the rustls server config from PEM files (or a self-signed dev
//! certificate), reloaded on change with the last good certificate kept, and the expiry metric.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::{TlsSettings, TlsSource};
use crate::obs::metrics::Metrics;

/// Why a certificate/key pair could not be used. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{0}: no PEM certificate found")]
    NoCertificate(String),
    #[error("{0}: no PEM private key found (PKCS#8, PKCS#1 or SEC1)")]
    NoKey(String),
    #[error("{path}: invalid PEM: {message}")]
    Pem { path: String, message: String },
    #[error("certificate and key rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("self-signed certificate generation failed: {0}")]
    Generate(String),
}

/// The crypto provider used everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Install ring as the process default, for libraries that build their own rustls configs.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A usable server config and the leaf's notAfter (Unix seconds), when it could be read.
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    pub not_after: Option<i64>,
}

/// Build a server config (TLS 1.2 + 1.3, ALPN h2 and http/1.1) from PEM bytes.
pub fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_name: &str,
    key_name: &str,
) -> Result<Loaded, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem { path: cert_name.to_string(), message: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert_name.to_string()));
    }
    let key: PrivateKeyDer<'static> = match PrivateKeyDer::from_pem_slice(key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => return Err(TlsError::NoKey(key_name.to_string())),
        Err(e) => return Err(TlsError::Pem { path: key_name.to_string(), message: e.to_string() }),
    };
    let not_after =
        x509_parser::parse_x509_certificate(&certs[0]).ok().map(|(_, c)| c.validity().not_after.timestamp());
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Loaded { config: Arc::new(config), not_after })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

/// Load the configured certificate once (used by `check` and at startup).
pub fn load(settings: &TlsSettings) -> Result<Loaded, TlsError> {
    match &settings.source {
        TlsSource::SelfSigned => self_signed(),
        TlsSource::Files { cert_file, key_file } => {
            let cert = read(cert_file)?;
            let key = read(key_file)?;
            server_config_from_pem(&cert, &key, &cert_file.display().to_string(), &key_file.display().to_string())
        }
    }
}

fn self_signed() -> Result<Loaded, TlsError> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let ck = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let cert = ck.cert.pem();
    let key = ck.signing_key.serialize_pem();
    server_config_from_pem(cert.as_bytes(), key.as_bytes(), "<self-signed>", "<self-signed>")
}

fn digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(cert);
    h.update([0]);
    h.update(key);
    h.finalize().into()
}

/// Load the certificate and, for files, start polling them every `reload_interval`. New
/// connections read the receiver; a broken replacement keeps the last good config.
pub fn start(settings: &TlsSettings, metrics: &Metrics) -> Result<watch::Receiver<Arc<ServerConfig>>, TlsError> {
    // The digest that tells a later change is taken from the very bytes loaded here: a rotation
    // landing between two reads must not be mistaken for the certificate already served.
    let (loaded, seen) = match &settings.source {
        TlsSource::SelfSigned => (self_signed()?, [0; 32]),
        TlsSource::Files { cert_file, key_file } => {
            let (cert, key) = (read(cert_file)?, read(key_file)?);
            let loaded =
                server_config_from_pem(&cert, &key, &cert_file.display().to_string(), &key_file.display().to_string())?;
            (loaded, digest(&cert, &key))
        }
    };
    if let Some(t) = loaded.not_after {
        metrics.tls_cert_expiry.set(t as f64);
    }
    let (tx, rx) = watch::channel(loaded.config);
    match &settings.source {
        TlsSource::SelfSigned => {
            tracing::warn!(
                "tls.self_signed = true: serving a generated certificate for localhost. \
                 Browsers will warn and clients cannot verify it. DEVELOPMENT ONLY: set \
                 tls.cert_file and tls.key_file in production."
            );
        }
        TlsSource::Files { cert_file, key_file } => {
            let (cert_file, key_file) = (cert_file.clone(), key_file.clone());
            let interval = settings.reload_interval;
            let metrics = metrics.clone();
            tokio::spawn(async move {
                reload_loop(tx, &cert_file, &key_file, interval, seen, metrics).await;
            });
        }
    }
    Ok(rx)
}

async fn reload_loop(
    tx: watch::Sender<Arc<ServerConfig>>,
    cert_file: &Path,
    key_file: &Path,
    interval: Duration,
    mut last_seen: [u8; 32],
    metrics: Metrics,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if tx.is_closed() {
            return;
        }
        // Read both every time: Kubernetes swaps a `..data` symlink, so mtimes of the paths we
        // were given do not change. The files are small.
        let (cert, key) = match (read(cert_file), read(key_file)) {
            (Ok(c), Ok(k)) => (c, k),
            (Err(e), _) | (_, Err(e)) => {
                let seen = digest(e.to_string().as_bytes(), b"read-error");
                if seen != last_seen {
                    last_seen = seen;
                    metrics.tls_reloads.with_label_values(&["error"]).inc();
                    tracing::error!(error = %e, "certificate reload failed; keeping the last good certificate");
                }
                continue;
            }
        };
        let seen = digest(&cert, &key);
        if seen == last_seen {
            continue;
        }
        last_seen = seen;
        match server_config_from_pem(&cert, &key, &cert_file.display().to_string(), &key_file.display().to_string()) {
            Ok(loaded) => {
                if let Some(t) = loaded.not_after {
                    metrics.tls_cert_expiry.set(t as f64);
                }
                metrics.tls_reloads.with_label_values(&["success"]).inc();
                tracing::info!(cert_file = %cert_file.display(), not_after = loaded.not_after, "certificate reloaded");
                let _ = tx.send(loaded.config);
            }
            Err(e) => {
                metrics.tls_reloads.with_label_values(&["error"]).inc();
                tracing::error!(error = %e, "certificate reload failed; keeping the last good certificate");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn self_signed_config_offers_h2_and_http11() {
        let loaded = self_signed().unwrap();
        assert_eq!(loaded.config.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(loaded.not_after.unwrap() > 1_700_000_000);
    }

    #[test]
    fn garbage_pem_is_a_clear_error() {
        let err = server_config_from_pem(b"not pem", b"nor this", "c.pem", "k.pem").err().unwrap();
        assert_eq!(err.to_string(), "c.pem: no PEM certificate found");
    }
}
