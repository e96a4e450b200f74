//! TLS on the public listener (`gateway.tls`): the certificates, chosen by SNI, reloaded when
//! their files change on disk, and their expiry for `/metrics`.
//!
//! The store is pingora's certificate resolver (rustls' [`ResolvesServerCert`]): each
//! handshake reads the certificates in force from an `ArcSwap`, so a reload swaps them for new
//! connections while connections already open go on. A replacement that cannot serve (it does
//! not parse, its key does not match, it has expired) is refused with the file named, and the
//! certificate it would have replaced stays in use. Files are polled rather than watched: a
//! certbot renewal or a Kubernetes secret update replaces them through renames and symlinks,
//! which a poll of their metadata sees whatever the mechanism.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{error, info};

use crate::config::CertificateConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{key}: this key does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{path}: the certificate expired at {not_after}")]
    Expired { path: PathBuf, not_after: String },
}

/// One certificate with its key, ready to serve.
#[derive(Debug)]
struct Loaded {
    /// The DNS names it serves, lower case; `*.example.com` covers one label.
    names: Vec<String>,
    key: Arc<CertifiedKey>,
    /// End of validity, in seconds since the Unix epoch.
    not_after: i64,
}

/// What a certificate's files looked like when they were last read; a change means a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    cert: Option<(SystemTime, u64)>,
    key: Option<(SystemTime, u64)>,
}

impl Stamp {
    fn of(source: &CertificateConfig) -> Stamp {
        let look = |path: &Path| {
            // Follows symlinks: a secret volume swaps the link's target.
            let metadata = std::fs::metadata(path).ok()?;
            Some((metadata.modified().ok()?, metadata.len()))
        };
        Stamp {
            cert: look(&source.cert),
            key: look(&source.key),
        }
    }
}

/// The certificates of `gateway.tls`, in the order configured: the first is the default.
#[derive(Debug)]
pub struct CertStore {
    sources: Vec<CertificateConfig>,
    loaded: ArcSwap<Vec<Arc<Loaded>>>,
    /// Per certificate: its files when last read, and a change seen but not read yet.
    stamps: Mutex<Vec<(Stamp, Option<Stamp>)>>,
    reloads: AtomicU64,
    refusals: AtomicU64,
}

impl CertStore {
    /// Reads every certificate; any that cannot serve stops the start, naming its file.
    pub fn load(sources: &[CertificateConfig]) -> Result<Arc<CertStore>, TlsError> {
        let stamps = sources.iter().map(|s| (Stamp::of(s), None)).collect();
        let loaded = sources
            .iter()
            .map(|source| load_one(source, unix_now()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        for (source, certificate) in sources.iter().zip(&loaded) {
            info!(
                cert = %source.cert.display(),
                names = %certificate.names.join(","),
                "TLS certificate loaded."
            );
        }
        Ok(Arc::new(CertStore {
            sources: sources.to_vec(),
            loaded: ArcSwap::from_pointee(loaded),
            stamps: Mutex::new(stamps),
            reloads: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
        }))
    }

    /// Reloads each certificate whose files changed since they were last read and then stayed
    /// as they are for one poll: a renewal writes the certificate and the key one after the
    /// other, and the pair is read once both are in place. A replacement that cannot serve is
    /// logged, counted and left out: the one in force stays.
    pub fn reload_changed(&self) {
        let mut stamps = self.stamps.lock().expect("stamps lock");
        let mut next: Option<Vec<Arc<Loaded>>> = None;
        for (index, source) in self.sources.iter().enumerate() {
            let stamp = Stamp::of(source);
            let (read, seen) = &mut stamps[index];
            if stamp == *read {
                *seen = None;
                continue;
            }
            if seen.as_ref() != Some(&stamp) {
                *seen = Some(stamp);
                continue;
            }
            *read = stamp;
            *seen = None;
            match load_one(source, unix_now()) {
                Ok(certificate) => {
                    info!(
                        cert = %source.cert.display(),
                        names = %certificate.names.join(","),
                        "TLS certificate reloaded; new connections get it."
                    );
                    self.reloads.fetch_add(1, Ordering::Relaxed);
                    let certificates = next.get_or_insert_with(|| self.loaded.load().to_vec());
                    certificates[index] = Arc::new(certificate);
                }
                Err(refusal) => {
                    error!(error = %refusal, "TLS certificate replacement refused; the previous one stays in use.");
                    self.refusals.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if let Some(certificates) = next {
            self.loaded.store(Arc::new(certificates));
        }
    }

    /// Appends the certificates' expiry and the reload counters in Prometheus' text format.
    pub fn render_prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        out.push_str("# HELP goms_tls_certificate_expiry_timestamp_seconds When each certificate in force expires (Unix time).\n");
        out.push_str("# TYPE goms_tls_certificate_expiry_timestamp_seconds gauge\n");
        for (source, certificate) in self.sources.iter().zip(self.loaded.load().iter()) {
            let _ = writeln!(
                out,
                "goms_tls_certificate_expiry_timestamp_seconds{{cert=\"{}\",names=\"{}\"}} {}",
                label(&source.cert.display().to_string()),
                label(&certificate.names.join(",")),
                certificate.not_after
            );
        }
        for (name, help, counter) in [
            (
                "goms_tls_reloads_total",
                "Certificates reloaded after their files changed.",
                &self.reloads,
            ),
            (
                "goms_tls_reload_refusals_total",
                "Replacement certificates refused (unparsable, wrong key, expired); the previous one stayed in use.",
                &self.refusals,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", counter.load(Ordering::Relaxed));
        }
    }

    fn choose(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let certificates = self.loaded.load();
        let chosen = server_name
            .map(str::to_ascii_lowercase)
            .and_then(|name| {
                certificates
                    .iter()
                    .find(|c| c.names.iter().any(|pattern| matches_name(pattern, &name)))
            })
            .or_else(|| certificates.first())?;
        Some(chosen.key.clone())
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(client_hello.server_name())
    }
}

/// Polls the certificate files every `interval` and reloads those that changed.
pub struct CertReloader {
    pub store: Arc<CertStore>,
    pub interval: Duration,
}

#[async_trait]
impl BackgroundService for CertReloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.store.reload_changed(),
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Whether the certificate name `pattern` covers the SNI `name` (both lower case).
fn matches_name(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

fn load_one(source: &CertificateConfig, now: i64) -> Result<Loaded, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let invalid = |path: &Path, reason: String| TlsError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let cert_pem = read(&source.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&source.cert, format!("not a PEM certificate chain: {e}")))?;
    let first = chain
        .first()
        .ok_or_else(|| invalid(&source.cert, "no certificate in the file".into()))?;
    let (names, not_after) = names_and_expiry(first).map_err(|e| invalid(&source.cert, e))?;
    if not_after < now {
        return Err(TlsError::Expired {
            path: source.cert.clone(),
            not_after: crate::config::rfc3339_from_unix(not_after.max(0) as u64, 0),
        });
    }
    let key_pem = read(&source.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| invalid(&source.key, format!("not a PEM private key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|error| match error {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert: source.cert.clone(),
            key: source.key.clone(),
        },
        other => invalid(&source.key, other.to_string()),
    })?;
    Ok(Loaded {
        names,
        key: Arc::new(key),
        not_after,
    })
}

/// The DNS names of the subject alternative names (the common name when there are none), and
/// the end of validity.
fn names_and_expiry(certificate: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names: Vec<String> = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        names.extend(
            parsed
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok((names, parsed.validity().not_after.timestamp()))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label_only() {
        assert!(matches_name("*.example.com", "shop.example.com"));
        assert!(!matches_name("*.example.com", "a.shop.example.com"));
        assert!(!matches_name("*.example.com", "example.com"));
        assert!(matches_name("example.com", "example.com"));
        assert!(!matches_name("example.com", "www.example.com"));
    }
}
