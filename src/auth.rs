//! Authentication settings shared by every role: the cluster secret nodes
//! present to each other, operators' token files, and the rule that a
//! standalone node does not listen beyond loopback unauthenticated.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use shoal_security::{ClientAuth, HttpAuth, Secret, TokenFile};

use crate::config::{ConfigError, err};

/// `--cluster-secret-file` and `--admin-token-file`.
#[derive(Debug, Args, Default)]
pub struct AuthArgs {
    /// File holding the secret every node of the cluster (placement nodes,
    /// brokers, the compactor) presents to the others; or the secret itself
    /// in SHOAL_CLUSTER_SECRET. With it, every HTTP endpoint but /health
    /// and /metrics needs a credential.
    #[arg(long, env = "SHOAL_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Operators' bearer tokens, one per line (plaintext or sha256:HEX; see
    /// `shoal tokens create`). With it, every HTTP endpoint but /health and
    /// /metrics needs a token.
    #[arg(long, env = "SHOAL_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Serve the HTTP API over TLS (--tls-cert, --tls-key) and call the
    /// other nodes over HTTPS, trusting --tls-client-ca.
    #[arg(long, env = "SHOAL_HTTP_TLS")]
    pub http_tls: Option<bool>,
}

/// What a node's HTTP server accepts and what it presents to its peers.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub server: HttpAuth,
    pub peers: ClientAuth,
    /// The HTTP listener's TLS, with --http-tls.
    pub http_tls: Option<std::sync::Arc<shoal_security::tls::TlsServer>>,
}

impl Auth {
    /// With `enabled`, serve HTTPS with `tls` and call peers over HTTPS,
    /// trusting its client CA (the cluster's CA) besides the system roots.
    pub fn with_http_tls(
        mut self,
        enabled: bool,
        tls: Option<&std::sync::Arc<shoal_security::tls::TlsServer>>,
    ) -> Result<Self, ConfigError> {
        if !enabled {
            return Ok(self);
        }
        let tls = tls.ok_or_else(|| err("--http-tls needs --tls-cert and --tls-key"))?;
        self.peers = self
            .peers
            .with_https(tls.files().client_ca.as_deref())
            .map_err(|e| err(format!("--http-tls: {e}")))?;
        self.http_tls = Some(tls.clone());
        Ok(self)
    }
}

impl AuthArgs {
    /// `file_*`: the same settings from a TOML file (flags win).
    pub fn resolve(
        &self,
        file_secret: Option<PathBuf>,
        file_tokens: Option<PathBuf>,
    ) -> Result<Auth, ConfigError> {
        let secret = cluster_secret(self.cluster_secret_file.clone().or(file_secret))?;
        let tokens = match self.admin_token_file.clone().or(file_tokens) {
            Some(path) => {
                Some(TokenFile::open(&path).map_err(|e| err(format!("--admin-token-file: {e}")))?)
            }
            None => None,
        };
        Ok(Auth {
            server: HttpAuth::new(secret.as_ref(), tokens),
            peers: secret.map(ClientAuth::bearer).unwrap_or_default(),
            http_tls: None,
        })
    }

    /// For a cluster role: operators' tokens without a cluster secret would
    /// lock the nodes out of each other.
    pub fn resolve_for_cluster(&self) -> Result<Auth, ConfigError> {
        self.resolve_for_cluster_with(None, None)
    }

    /// As [`Self::resolve_for_cluster`], with the config file's paths
    /// (flags and variables win).
    pub fn resolve_for_cluster_with(
        &self,
        file_secret: Option<PathBuf>,
        file_tokens: Option<PathBuf>,
    ) -> Result<Auth, ConfigError> {
        let auth = self.resolve(file_secret, file_tokens)?;
        if auth.server.is_on() && !auth.peers.is_some() {
            return Err(err(
                "--admin-token-file needs --cluster-secret-file on the nodes of a cluster: \
                 without it they cannot call each other",
            ));
        }
        Ok(auth)
    }
}

/// The cluster secret from a file, else from SHOAL_CLUSTER_SECRET.
pub fn cluster_secret(file: Option<PathBuf>) -> Result<Option<Secret>, ConfigError> {
    Secret::from_file_or_env(file.as_deref(), "SHOAL_CLUSTER_SECRET")
        .map_err(|e| err(format!("cluster secret: {e}")))
}

/// A listener of a standalone node, and whether it asks for credentials.
pub struct Exposure<'a> {
    pub what: &'a str,
    pub addr: SocketAddr,
    pub authenticated: bool,
}

/// Refuses a non-loopback listener that authenticates no one, unless the
/// operator said `--insecure`: a standalone node holds the whole cluster's
/// state, and its HTTP API can replace it.
pub fn check_exposure(listeners: &[Exposure<'_>], insecure: bool) -> Result<(), ConfigError> {
    if insecure {
        return Ok(());
    }
    for l in listeners {
        if !l.addr.ip().is_loopback() && !l.authenticated {
            return Err(err(format!(
                "refusing to listen on {} for {} without authentication: anyone who can \
                 reach it could read and change everything. Configure authentication \
                 (see docs/security.md) or pass --insecure to accept that",
                l.addr, l.what
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_listeners_beyond_loopback_are_refused() {
        let open = |addr: &str, authenticated| Exposure {
            what: "HTTP",
            addr: addr.parse().unwrap(),
            authenticated,
        };
        assert!(check_exposure(&[open("127.0.0.1:1", false)], false).is_ok());
        assert!(check_exposure(&[open("0.0.0.0:1", false)], false).is_err());
        assert!(check_exposure(&[open("0.0.0.0:1", true)], false).is_ok());
        assert!(check_exposure(&[open("10.0.0.1:1", false)], true).is_ok());
    }
}
