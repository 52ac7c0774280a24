//! Kafka listeners and their security: `--kafka-listeners` (Kafka's
//! `PROTOCOL://host:port` list), the advertised addresses, the TLS files
//! and the SASL mechanisms. Shared by `shoal standalone` and `shoal broker`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use shoal_broker::kafka::{KafkaListener, SecurityProtocol};
use shoal_security::acl::AuthorizerConfig;
use shoal_security::limits::LimitSettings;
use shoal_security::sasl::SaslMechanism;
use shoal_security::tls::{TlsFiles, TlsServer};

use crate::config::{ConfigError, err, parse_addr};

#[derive(Debug, Args, Default)]
pub struct SecurityArgs {
    /// Kafka listeners, one per security protocol:
    /// 'PLAINTEXT://127.0.0.1:9092,SASL_SSL://127.0.0.1:9093' (PLAINTEXT,
    /// SSL, SASL_PLAINTEXT, SASL_SSL). Replaces --kafka-addr.
    #[arg(long, env = "SHOAL_KAFKA_LISTENERS")]
    pub kafka_listeners: Option<String>,
    /// What clients are told for each listener, in the same form (default:
    /// the listener addresses).
    #[arg(long, env = "SHOAL_ADVERTISED_KAFKA_LISTENERS")]
    pub advertised_kafka_listeners: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// SASL mechanisms offered on SASL listeners.
    #[arg(long, env = "SHOAL_SASL_MECHANISMS")]
    pub sasl_mechanisms: Option<String>,
    /// Kafka's connections.max.reauth.ms: how long a SASL session lasts
    /// before the client must re-authenticate (e.g. 1h; 0 or unset: for
    /// the connection's life).
    #[arg(long, env = "SHOAL_CONNECTIONS_MAX_REAUTH")]
    pub connections_max_reauth: Option<String>,
    /// Connections open at once per listener, Kafka and MQTT alike
    /// (Kafka's max.connections).
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections open at once from one address, per Kafka or MQTT
    /// listener (max.connections.per.ip).
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Enforce Kafka ACLs (CreateAcls and friends) on every Kafka API.
    #[arg(long, env = "SHOAL_AUTHORIZER")]
    pub authorizer: Option<bool>,
    /// Principals allowed everything: 'User:admin;User:ops'.
    #[arg(long, env = "SHOAL_SUPER_USERS")]
    pub super_users: Option<String>,
    /// Kafka's allow.everyone.if.no.acl.found: a resource no ACL matches is
    /// open to everyone (default false).
    #[arg(long, env = "SHOAL_ALLOW_EVERYONE_IF_NO_ACL_FOUND")]
    pub allow_everyone_if_no_acl_found: Option<bool>,
}

/// The certificate of a node's TLS listeners (Kafka, MQTT, HTTP).
#[derive(Debug, Args, Default)]
pub struct TlsArgs {
    /// PEM certificate chain of the TLS listeners.
    #[arg(long, env = "SHOAL_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listeners.
    #[arg(long, env = "SHOAL_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle of the cluster: client certificates that chain to it
    /// are `User:<their subject>` (mTLS), and with --http-tls the other
    /// nodes' certificates are verified against it.
    #[arg(long, env = "SHOAL_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The reloadable TLS configuration, if a certificate is given (flags
    /// win over the file's keys).
    pub fn load(
        &self,
        file_cert: Option<PathBuf>,
        file_key: Option<PathBuf>,
        file_ca: Option<PathBuf>,
    ) -> Result<Option<Arc<TlsServer>>, ConfigError> {
        let cert = self.tls_cert.clone().or(file_cert);
        let key = self.tls_key.clone().or(file_key);
        let client_ca = self.tls_client_ca.clone().or(file_ca);
        match (cert, key) {
            (Some(cert), Some(key)) => TlsServer::load(
                TlsFiles {
                    cert,
                    key,
                    client_ca,
                },
                Vec::new(),
            )
            .map(Some)
            .map_err(|e| err(format!("TLS: {e}"))),
            (None, None) if client_ca.is_none() => Ok(None),
            _ => Err(err("TLS needs both --tls-cert and --tls-key")),
        }
    }
}

/// The same keys in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SecurityFile {
    pub kafka_listeners: Option<String>,
    pub advertised_kafka_listeners: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub sasl_mechanisms: Option<String>,
    pub connections_max_reauth: Option<String>,
    pub authorizer: Option<bool>,
    pub super_users: Option<String>,
    pub allow_everyone_if_no_acl_found: Option<bool>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
}

/// One Kafka listener, resolved.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    pub security: Arc<KafkaListener>,
}

/// The Kafka listeners of a node and what it advertises.
#[derive(Debug, Clone)]
pub struct KafkaSetup {
    pub listeners: Vec<ListenerSpec>,
    /// The first listener's advertised host and port.
    pub advertised_host: String,
    pub advertised_port: i32,
    /// Every listener's advertised host:port, by listener name.
    pub advertised: BTreeMap<String, String>,
    /// The TLS configuration shared by every TLS listener (reloaded).
    pub tls: Option<Arc<TlsServer>>,
    /// Kafka ACLs are enforced when set.
    pub authorizer: Option<AuthorizerConfig>,
    /// Connection limits of every listener, MQTT's too.
    pub limits: LimitSettings,
}

impl KafkaSetup {
    /// Is every listener beyond loopback asking for credentials?
    pub fn exposures(&self) -> Vec<crate::auth::Exposure<'static>> {
        self.listeners
            .iter()
            .map(|l| crate::auth::Exposure {
                what: "Kafka",
                addr: l.addr,
                // Client certificates are optional (the others are
                // User:ANONYMOUS), so an SSL listener counts only when the
                // authorizer keeps anonymous clients out.
                authenticated: l.security.protocol.sasl()
                    || (l.security.protocol.tls()
                        && self.authorizer.is_some()
                        && self
                            .tls
                            .as_ref()
                            .is_some_and(|t| t.files().client_ca.is_some())),
            })
            .collect()
    }
}

/// `PROTO://host:port,...` into (protocol, "host:port") pairs.
fn parse_list(flag: &str, s: &str) -> Result<Vec<(SecurityProtocol, String)>, ConfigError> {
    let list = crate::config::scheme_list(
        flag,
        s,
        SecurityProtocol::parse,
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    )?;
    if list.is_empty() {
        return Err(err(format!("{flag} is empty")));
    }
    Ok(list.into_iter().map(|(p, a)| (p, a.to_string())).collect())
}

impl SecurityArgs {
    /// `kafka_addr`: the one PLAINTEXT listener when no list is given;
    /// `advertised_addr`: its advertised address.
    pub fn resolve(
        &self,
        file: SecurityFile,
        kafka_addr: &str,
        advertised_addr: Option<&str>,
    ) -> Result<KafkaSetup, ConfigError> {
        let list = match self.kafka_listeners.clone().or(file.kafka_listeners) {
            Some(s) => parse_list("--kafka-listeners", &s)?,
            None => vec![(SecurityProtocol::Plaintext, kafka_addr.to_string())],
        };
        let advertised_list = match self
            .advertised_kafka_listeners
            .clone()
            .or(file.advertised_kafka_listeners)
        {
            Some(s) => parse_list("--advertised-kafka-listeners", &s)?,
            None => Vec::new(),
        };
        let tls = self
            .tls
            .load(file.tls_cert, file.tls_key, file.tls_client_ca)?;
        let mechanisms = parse_mechanisms(
            self.sasl_mechanisms
                .clone()
                .or(file.sasl_mechanisms)
                .as_deref()
                .unwrap_or("SCRAM-SHA-512,SCRAM-SHA-256,PLAIN"),
        )?;
        let reauth = match self
            .connections_max_reauth
            .clone()
            .or(file.connections_max_reauth)
        {
            None => None,
            Some(s) if s.trim() == "0" => None,
            // Kafka's unit: a bare number is milliseconds.
            Some(s) if s.trim().bytes().all(|b| b.is_ascii_digit()) => {
                s.trim().parse().ok().map(Duration::from_millis)
            }
            Some(s) => Some(
                humantime::parse_duration(&s)
                    .map_err(|e| err(format!("invalid --connections-max-reauth {s:?}: {e}")))?,
            )
            .filter(|d: &Duration| !d.is_zero()),
        };
        let max_total = self
            .max_connections
            .or(file.max_connections)
            .unwrap_or(usize::MAX);
        let max_per_ip = self
            .max_connections_per_ip
            .or(file.max_connections_per_ip)
            .unwrap_or(usize::MAX);
        if max_total == 0 || max_per_ip == 0 {
            return Err(err("connection limits must be at least 1"));
        }
        let limits = LimitSettings {
            max_total,
            max_per_ip,
        };
        let mut listeners = Vec::new();
        let mut advertised = BTreeMap::new();
        for (protocol, addr_s) in &list {
            let addr = parse_addr("--kafka-listeners address", addr_s)?;
            if protocol.tls() && tls.is_none() {
                return Err(err(format!(
                    "the {} listener needs --tls-cert and --tls-key",
                    protocol.name()
                )));
            }
            let given = advertised_list
                .iter()
                .find(|(p, _)| p == protocol)
                .map(|(_, a)| a.as_str())
                .or(if listeners.is_empty() {
                    advertised_addr
                } else {
                    None
                });
            let (host, port) = crate::config::advertised(given, addr)?;
            advertised.insert(protocol.name().to_string(), format!("{host}:{port}"));
            listeners.push(ListenerSpec {
                addr,
                security: Arc::new(KafkaListener {
                    protocol: *protocol,
                    tls: protocol.tls().then(|| tls.clone()).flatten(),
                    mechanisms: if protocol.sasl() {
                        mechanisms.clone()
                    } else {
                        Vec::new()
                    },
                    reauth: protocol.sasl().then_some(reauth).flatten(),
                    limits: limits.listener(),
                }),
            });
        }
        if let Some((p, _)) = advertised_list
            .iter()
            .find(|(p, _)| !list.iter().any(|(l, _)| l == p))
        {
            return Err(err(format!(
                "--advertised-kafka-listeners names {}, which is not a listener",
                p.name()
            )));
        }
        let authorizer = self
            .authorizer
            .or(file.authorizer)
            .unwrap_or(false)
            .then(|| AuthorizerConfig {
                super_users: self
                    .super_users
                    .clone()
                    .or(file.super_users.clone())
                    .unwrap_or_default()
                    .split(';')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                allow_if_no_acl: self
                    .allow_everyone_if_no_acl_found
                    .or(file.allow_everyone_if_no_acl_found)
                    .unwrap_or(false),
            });
        if let Some(a) = &authorizer
            && let Some(bad) = a.super_users.iter().find(|u| !u.contains(':'))
        {
            return Err(err(format!(
                "invalid --super-users entry {bad:?}: expected User:NAME"
            )));
        }
        let first = &listeners[0];
        let (advertised_host, advertised_port) = advertised[first.security.name()]
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_string(), p.parse().ok()?)))
            .ok_or_else(|| err("invalid advertised address"))?;
        Ok(KafkaSetup {
            listeners,
            advertised_host,
            advertised_port,
            advertised,
            tls,
            authorizer,
            limits,
        })
    }
}

fn parse_mechanisms(s: &str) -> Result<Vec<SaslMechanism>, ConfigError> {
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let m = SaslMechanism::parse(name).ok_or_else(|| {
            err(format!(
                "unknown SASL mechanism {name:?}: expected SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN"
            ))
        })?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    if out.is_empty() {
        return Err(err("--sasl-mechanisms is empty"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_lists_parse() {
        let l = parse_list("x", "PLAINTEXT://127.0.0.1:9092, sasl_ssl://0.0.0.0:9093").unwrap();
        assert_eq!(l[1].0, SecurityProtocol::SaslSsl);
        assert!(parse_list("x", "HTTP://a:1").is_err());
        assert!(parse_list("x", "PLAINTEXT://a:1,PLAINTEXT://a:2").is_err());
        assert!(parse_list("x", "127.0.0.1:9092").is_err());
        assert!(parse_mechanisms("PLAIN,GSSAPI").is_err());
    }

    #[test]
    fn tls_listeners_need_a_certificate() {
        let args = SecurityArgs {
            kafka_listeners: Some("SSL://127.0.0.1:9093".into()),
            ..Default::default()
        };
        assert!(
            args.resolve(SecurityFile::default(), "127.0.0.1:9092", None)
                .is_err()
        );
        let plain = SecurityArgs::default()
            .resolve(
                SecurityFile::default(),
                "127.0.0.1:9092",
                Some("kafka:19092"),
            )
            .unwrap();
        assert_eq!(plain.advertised["PLAINTEXT"], "kafka:19092");
        assert_eq!(plain.advertised_port, 19092);
    }
}
