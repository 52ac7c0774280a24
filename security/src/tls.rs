//! TLS for Shoal's listeners (rustls with the ring provider): certificate
//! and key from PEM files, an optional CA for client certificates (mTLS),
//! reloading on SIGHUP or when the files change (new connections get the
//! new certificate; open ones keep theirs), and the principal a client
//! certificate stands for.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};
use crate::limits::{Admitted, ConnectionLimits};

/// How often the files' modification times are looked at.
const POLL: Duration = Duration::from_secs(2);

/// The PEM files of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle client certificates must chain to. With it, clients may
    /// present a certificate (mTLS); those that do not stay anonymous.
    pub client_ca: Option<PathBuf>,
}

/// A reloadable rustls server configuration, shared by every listener
/// that serves the same files.
pub struct TlsServer {
    files: TlsFiles,
    /// ALPN protocols offered (e.g. `http/1.1` for HTTPS); empty for Kafka
    /// and MQTT.
    alpn: Vec<Vec<u8>>,
    config: RwLock<Arc<ServerConfig>>,
    stamps: parking_lot::Mutex<Vec<Option<SystemTime>>>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Reads and checks the files now: a bad certificate or key is a
    /// start-up error.
    pub fn load(files: TlsFiles, alpn: Vec<Vec<u8>>) -> Result<Arc<Self>> {
        let config = build(&files, &alpn)?;
        let stamps = stamps(&files);
        Ok(Arc::new(TlsServer {
            files,
            alpn,
            config: RwLock::new(config),
            stamps: parking_lot::Mutex::new(stamps),
        }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.read().clone())
    }

    /// The current configuration (for servers that take one directly).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.read().clone()
    }

    /// Re-reads the files; on error the old configuration stays.
    pub fn reload(&self) -> Result<()> {
        let config = build(&self.files, &self.alpn)?;
        *self.config.write() = config;
        *self.stamps.lock() = stamps(&self.files);
        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// Reloads on SIGHUP and when a file's modification time changes,
    /// until `shutdown` turns true.
    pub async fn watch(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(POLL);
        loop {
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hangup => {}
                _ = tick.tick() => {
                    if *self.stamps.lock() == stamps(&self.files) {
                        continue;
                    }
                }
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.reload() {
                tracing::warn!("TLS certificate not reloaded, the old one stays: {e}");
                // Not again until the files change once more.
                *self.stamps.lock() = stamps(&self.files);
            }
        }
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    .collect()
}

fn invalid(path: &Path, why: &'static str) -> Error {
    Error::Invalid {
        what: path.display().to_string(),
        why,
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|_| invalid(path, "cannot read PEM certificates"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| invalid(path, "malformed PEM certificate"))?;
    if certs.is_empty() {
        return Err(invalid(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn build(files: &TlsFiles, alpn: &[Vec<u8>]) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert)?;
    // The key's parse error would quote nothing secret, but say only where.
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|_| invalid(&files.key, "no readable PEM private key"))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|_| invalid(&files.cert, "no TLS protocol version available"))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|_| invalid(ca, "unusable CA certificate"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|_| invalid(ca, "cannot verify clients with this CA"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|_| invalid(&files.key, "the key does not match the certificate"))?;
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// The principal of a verified client certificate: `User:` and its
/// subject as an RFC 2253 distinguished name (`CN=alice,OU=eng,O=acme`),
/// as Kafka's default principal builder forms it.
pub fn certificate_principal(conn: &rustls::ServerConnection) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(format!("User:{}", rfc2253(parsed.subject())))
}

fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    // RFC 2253 lists the RDNs last to first.
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let key = short_name(&atv.attr_type().to_id_string());
                    let value = atv
                        .as_str()
                        .map(escape)
                        .unwrap_or_else(|_| format!("#{}", hex::encode(atv.attr_value().data)));
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn short_name(oid: &str) -> String {
    match oid {
        "2.5.4.3" => "CN",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        other => return other.to_string(),
    }
    .to_string()
}

fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A TLS listener for servers that take an `axum::serve::Listener` (the
/// HTTP API, MQTT over WebSocket): handshakes run in their own tasks, with
/// a deadline, so a client that never finishes one holds up nobody.
pub struct TlsListener {
    accepted: tokio::sync::mpsc::Receiver<(TlsStream, std::net::SocketAddr)>,
    local: std::net::SocketAddr,
    _acceptor: AbortOnDrop,
}

pub type TlsStream = tokio_rustls::server::TlsStream<Admitted<tokio::net::TcpStream>>;

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TlsListener {
    pub fn new(tcp: tokio::net::TcpListener, tls: Arc<TlsServer>) -> std::io::Result<Self> {
        Self::with_limits(tcp, tls, None)
    }

    /// A listener whose connections beyond `limits` are closed before
    /// their handshake.
    pub fn with_limits(
        tcp: tokio::net::TcpListener,
        tls: Arc<TlsServer>,
        limits: Option<Arc<ConnectionLimits>>,
    ) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, accepted) = tokio::sync::mpsc::channel(64);
        let task = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let permit = match limits.as_ref().map(|l| l.admit(peer.ip())).transpose() {
                    Ok(permit) => permit,
                    Err(why) => {
                        tracing::debug!(%peer, ?why, "connection refused: too many open");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let stream = Admitted::new(stream, permit);
                let (acceptor, tx) = (tls.acceptor(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            accepted,
            local,
            _acceptor: AbortOnDrop(task),
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(a) => a,
            // The acceptor task lives as long as this listener.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_characters_are_escaped() {
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape("#x "), "\\#x\\ ");
        assert_eq!(short_name("2.5.4.3"), "CN");
        assert_eq!(short_name("1.2.3"), "1.2.3");
    }

    #[test]
    fn missing_or_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "not pem").unwrap();
        let files = TlsFiles {
            cert: cert.clone(),
            key: dir.path().join("missing.pem"),
            client_ca: None,
        };
        assert!(TlsServer::load(files, vec![]).is_err());
    }
}
