//! TLS on the control port (headscale's `tls_cert_path` / `tls_key_path`): rustls serving a
//! certificate that is replaced while running, on SIGHUP or when the files change
//! (certbot and cert-manager rewrite them in place or swap a symlink). A bad new pair is
//! refused and the running certificate stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::IntCounterVec;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// How often the files are compared with what is being served.
const POLL_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ControlTlsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCert { path: PathBuf },
    #[error("{path}: {reason}")]
    BadPem { path: PathBuf, reason: String },
    #[error("{key} does not belong to the certificate in {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The two files' bytes as last read. Reloads compare bytes, not modification times,
/// which are coarse on some filesystems and unchanged by a symlink swap.
#[derive(PartialEq, Eq)]
struct PemPair {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// The certificate the control port serves; every handshake asks it.
#[derive(Debug)]
struct Served(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Served {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("certificate lock").clone())
    }
}

/// The control port's TLS: the acceptor for connections and the files it watches.
pub(super) struct ControlTls {
    cert_path: PathBuf,
    key_path: PathBuf,
    loaded: PemPair,
    /// The last pair that failed to load: polling does not retry (or warn about) it
    /// again until the files change; SIGHUP does.
    refused: Option<PemPair>,
    served: Arc<Served>,
}

impl ControlTls {
    /// Loads the pair; a missing, unreadable or mismatched pair fails the start.
    pub(super) fn load(cert_path: &Path, key_path: &Path) -> Result<ControlTls, ControlTlsError> {
        crate::raft::tls::install_crypto_provider();
        let loaded = read_pair(cert_path, key_path)?;
        let key = certified_key(&loaded, cert_path, key_path)?;
        Ok(ControlTls {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            loaded,
            refused: None,
            served: Arc::new(Served(RwLock::new(Arc::new(key)))),
        })
    }

    /// HTTP/2 and HTTP/1.1 (Tailscale's Noise upgrade and DERP offer no ALPN: HTTP/1.1).
    pub(super) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(self.served.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// Re-reads the files on SIGHUP and every few seconds until `stop`; serves a new pair
    /// once it loads, counting each attempt in `hsd_tls_reloads_total{result}`.
    pub(super) async fn watch(mut self, reloads: IntCounterVec, stop: CancellationToken) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(error) => {
                tracing::warn!(%error, "no SIGHUP handler; TLS files are still polled");
                None
            }
        };
        let mut tick = tokio::time::interval(POLL_EVERY);
        loop {
            let forced = tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => false,
                Some(()) = async { hup.as_mut()?.recv().await } => true,
            };
            self.reload(forced, &reloads);
        }
    }

    fn reload(&mut self, forced: bool, reloads: &IntCounterVec) {
        let outcome = read_pair(&self.cert_path, &self.key_path).and_then(|pair| {
            if pair == self.loaded || (!forced && self.refused.as_ref() == Some(&pair)) {
                return Ok(None);
            }
            match certified_key(&pair, &self.cert_path, &self.key_path) {
                Ok(key) => Ok(Some((pair, key))),
                Err(error) => {
                    self.refused = Some(pair);
                    Err(error)
                }
            }
        });
        match outcome {
            Ok(None) if forced => tracing::info!("SIGHUP: control TLS files unchanged"),
            Ok(None) => {}
            Ok(Some((pair, key))) => {
                *self.served.0.write().expect("certificate lock") = Arc::new(key);
                self.loaded = pair;
                self.refused = None;
                reloads.with_label_values(&["ok"]).inc();
                tracing::info!(cert = %self.cert_path.display(), "control TLS certificate reloaded");
            }
            Err(error) => {
                reloads.with_label_values(&["failed"]).inc();
                tracing::warn!(error = %crate::util::error_chain(&error), "control TLS files not reloaded; still serving the previous certificate");
            }
        }
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<PemPair, ControlTlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ControlTlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    Ok(PemPair {
        cert: read(cert)?,
        key: read(key)?,
    })
}

fn certified_key(
    pair: &PemPair,
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, ControlTlsError> {
    let bad = |path: &Path, e: &dyn std::fmt::Display| ControlTlsError::BadPem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let chain = CertificateDer::pem_slice_iter(&pair.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert_path, &e))?;
    if chain.is_empty() {
        return Err(ControlTlsError::NoCert {
            path: cert_path.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&pair.key).map_err(|e| bad(key_path, &e))?;
    let provider = rustls::crypto::CryptoProvider::get_default()
        .expect("installed by install_crypto_provider");
    CertifiedKey::from_der(chain, key, provider).map_err(|e| ControlTlsError::Mismatch {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
        (c, k)
    }

    fn served_name(tls: &ControlTls) -> Vec<u8> {
        tls.served.0.read().unwrap().cert[0].to_vec()
    }

    #[test]
    fn mismatched_or_missing_files_fail_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, _) = self_signed(dir.path(), "one.test");
        let (_, k2) = self_signed(dir.path(), "two.test");
        let err = ControlTls::load(&c1, &k2).err().unwrap();
        assert!(matches!(err, ControlTlsError::Mismatch { .. }), "{err}");
        let err = ControlTls::load(&dir.path().join("nope.pem"), &k2)
            .err()
            .unwrap();
        assert!(err.to_string().contains("nope.pem"), "{err}");
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let err = ControlTls::load(&dir.path().join("empty.pem"), &k2)
            .err()
            .unwrap();
        assert!(matches!(err, ControlTlsError::NoCert { .. }), "{err}");
    }

    #[test]
    fn a_changed_pair_is_served_and_a_bad_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = self_signed(dir.path(), "one.test");
        let (c2, k2) = self_signed(dir.path(), "two.test");
        let mut tls = ControlTls::load(&c1, &k1).unwrap();
        let first = served_name(&tls);
        let reloads = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["result"]).unwrap();
        // Half-written rotation: the new certificate with the old key is refused.
        std::fs::copy(&c2, &c1).unwrap();
        tls.reload(false, &reloads);
        assert_eq!(served_name(&tls), first);
        assert_eq!(reloads.with_label_values(&["failed"]).get(), 1);
        // Polling does not retry the same bad pair; SIGHUP does.
        tls.reload(false, &reloads);
        assert_eq!(reloads.with_label_values(&["failed"]).get(), 1);
        tls.reload(true, &reloads);
        assert_eq!(reloads.with_label_values(&["failed"]).get(), 2);
        // The key arrives: the new pair is served.
        std::fs::copy(&k2, &k1).unwrap();
        tls.reload(false, &reloads);
        assert_ne!(served_name(&tls), first);
        assert_eq!(reloads.with_label_values(&["ok"]).get(), 1);
        // Unchanged files: nothing counted.
        tls.reload(true, &reloads);
        assert_eq!(reloads.with_label_values(&["ok"]).get(), 1);
    }
}
