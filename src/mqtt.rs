//! MQTT settings shared by `shoal standalone` and `shoal broker`, the
//! listeners they open, and `shoal mqtt passwd`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use serde::Deserialize;
use shoal_broker::Broker;
use shoal_broker::mqtt::{Access, DropPolicy, Limits, Mqtt, Settings};
use shoal_security::limits::LimitSettings;
use shoal_security::tls::TlsServer;
use tokio::net::TcpListener;

use crate::config::{ConfigError, err, parse_addr, parse_bytes};

#[derive(Debug, Args)]
pub struct MqttArgs {
    /// MQTT listener address, or `off` (standalone default 127.0.0.1:1883;
    /// a cluster broker serves MQTT only when given one).
    #[arg(long, env = "SHOAL_MQTT_ADDR")]
    pub mqtt_addr: Option<String>,
    /// MQTT over WebSocket listener address (path /mqtt), or `off` (default).
    #[arg(long, env = "SHOAL_MQTT_WS_ADDR")]
    pub mqtt_ws_addr: Option<String>,
    /// MQTT listeners by scheme, replacing --mqtt-addr and --mqtt-ws-addr:
    /// 'mqtt://127.0.0.1:1883,mqtts://0.0.0.0:8883,ws://..,wss://..' (the
    /// TLS ones use --tls-cert and --tls-key).
    #[arg(long, env = "SHOAL_MQTT_LISTENERS")]
    pub mqtt_listeners: Option<String>,
    /// File of `user:argon2-hash` lines (see `shoal mqtt passwd`).
    #[arg(long, env = "SHOAL_MQTT_PASSWORD_FILE")]
    pub mqtt_password_file: Option<PathBuf>,
    /// Topic access rules per user (`user`, `topic`, `pattern` lines).
    #[arg(long, env = "SHOAL_MQTT_ACL_FILE")]
    pub mqtt_acl_file: Option<PathBuf>,
    /// Accept clients that send no user name (default true).
    #[arg(long, env = "SHOAL_MQTT_ALLOW_ANONYMOUS")]
    pub mqtt_allow_anonymous: Option<bool>,
    /// Largest MQTT packet accepted (e.g. 1MiB).
    #[arg(long, env = "SHOAL_MQTT_MAX_PACKET_SIZE")]
    pub mqtt_max_packet_size: Option<String>,
    /// Messages queued per session beyond those in flight.
    #[arg(long, env = "SHOAL_MQTT_MAX_QUEUED_MESSAGES")]
    pub mqtt_max_queued_messages: Option<usize>,
    /// Which message goes when a session's queue is full: drop-new or
    /// drop-oldest.
    #[arg(long, env = "SHOAL_MQTT_QUEUE_DROP_POLICY")]
    pub mqtt_queue_drop_policy: Option<String>,
    /// Outgoing QoS 1/2 messages in flight per MQTT 3.1.1 client.
    #[arg(long, env = "SHOAL_MQTT_MAX_INFLIGHT")]
    pub mqtt_max_inflight: Option<usize>,
    /// Keep Alive imposed on MQTT 5 clients that ask for none or a longer
    /// one, in seconds (0: none).
    #[arg(long, env = "SHOAL_MQTT_MAX_KEEP_ALIVE")]
    pub mqtt_max_keep_alive: Option<u16>,
}

/// The same settings from the TOML file (flat `mqtt-*` keys), and the
/// `[[mqtt.persist]]` rules.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MqttFile {
    #[serde(default)]
    pub persist: Vec<PersistRuleFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistRuleFile {
    pub filter: String,
    pub stream: String,
    #[serde(default = "one")]
    pub shards: i32,
}

fn one() -> i32 {
    1
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MqttFlatFile {
    pub mqtt_addr: Option<String>,
    pub mqtt_ws_addr: Option<String>,
    pub mqtt_listeners: Option<String>,
    pub mqtt_password_file: Option<PathBuf>,
    pub mqtt_acl_file: Option<PathBuf>,
    pub mqtt_allow_anonymous: Option<bool>,
    pub mqtt_max_packet_size: Option<toml::Value>,
    pub mqtt_max_queued_messages: Option<usize>,
    pub mqtt_queue_drop_policy: Option<String>,
    pub mqtt_max_inflight: Option<usize>,
    pub mqtt_max_keep_alive: Option<u16>,
}

/// Resolved MQTT settings.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub tcp: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    /// MQTT over TLS, and over WebSocket over TLS.
    pub tls: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub password_file: Option<PathBuf>,
    pub acl_file: Option<PathBuf>,
    pub allow_anonymous: bool,
    pub settings: Settings,
    pub persist: Vec<PersistRuleFile>,
}

fn listen_addr(flag: &str, v: Option<String>) -> Result<Option<SocketAddr>, ConfigError> {
    match v.as_deref() {
        None | Some("off") | Some("") => Ok(None),
        Some(a) => parse_addr(flag, a).map(Some),
    }
}

impl MqttArgs {
    /// `default_addr`: the TCP listener when none is given (standalone).
    pub fn resolve(
        self,
        file: MqttFlatFile,
        persist: Vec<PersistRuleFile>,
        default_addr: Option<&str>,
    ) -> Result<MqttConfig, ConfigError> {
        let (tcp, ws, tls, wss) = match self.mqtt_listeners.or(file.mqtt_listeners) {
            Some(list) => parse_listeners(&list)?,
            None => (
                listen_addr(
                    "--mqtt-addr",
                    self.mqtt_addr
                        .or(file.mqtt_addr)
                        .or(default_addr.map(str::to_string)),
                )?,
                listen_addr("--mqtt-ws-addr", self.mqtt_ws_addr.or(file.mqtt_ws_addr))?,
                None,
                None,
            ),
        };
        let mut settings = Settings::default();
        match (self.mqtt_max_packet_size, file.mqtt_max_packet_size) {
            (Some(s), _) => settings.max_packet_size = size(&s)?,
            (None, Some(toml::Value::Integer(n))) => {
                settings.max_packet_size =
                    usize::try_from(n).map_err(|_| err("mqtt-max-packet-size must be positive"))?
            }
            (None, Some(toml::Value::String(s))) => settings.max_packet_size = size(&s)?,
            (None, Some(v)) => return Err(err(format!("invalid mqtt-max-packet-size {v}"))),
            (None, None) => {}
        }
        // MQTT's own limit: four bytes of remaining length plus the header.
        if !(64..=268_435_460).contains(&settings.max_packet_size) {
            return Err(err(
                "--mqtt-max-packet-size must be between 64 B and 256 MiB",
            ));
        }
        let mut limits = Limits::default();
        if let Some(n) = self
            .mqtt_max_queued_messages
            .or(file.mqtt_max_queued_messages)
        {
            limits.max_queued = n;
        }
        if let Some(p) = self.mqtt_queue_drop_policy.or(file.mqtt_queue_drop_policy) {
            limits.drop_policy = DropPolicy::parse(&p).ok_or_else(|| {
                err(format!(
                    "invalid --mqtt-queue-drop-policy {p:?}: expected drop-new or drop-oldest"
                ))
            })?;
        }
        settings.limits = limits;
        if let Some(n) = self.mqtt_max_inflight.or(file.mqtt_max_inflight) {
            if !(1..=65_535).contains(&n) {
                return Err(err("--mqtt-max-inflight must be between 1 and 65535"));
            }
            settings.inflight_v3 = n;
        }
        if let Some(k) = self.mqtt_max_keep_alive.or(file.mqtt_max_keep_alive) {
            settings.max_keep_alive = k;
        }
        for r in &persist {
            if !shoal_broker::mqtt::valid_rule_filter(&r.filter) {
                return Err(err(format!(
                    "invalid [[mqtt.persist]] filter {:?}",
                    r.filter
                )));
            }
        }
        Ok(MqttConfig {
            tcp,
            ws,
            tls,
            wss,
            password_file: self.mqtt_password_file.or(file.mqtt_password_file),
            acl_file: self.mqtt_acl_file.or(file.mqtt_acl_file),
            allow_anonymous: self
                .mqtt_allow_anonymous
                .or(file.mqtt_allow_anonymous)
                .unwrap_or(true),
            settings,
            persist,
        })
    }
}

type Listeners = (
    Option<SocketAddr>,
    Option<SocketAddr>,
    Option<SocketAddr>,
    Option<SocketAddr>,
);

/// `mqtt://a,mqtts://b,ws://c,wss://d` into (tcp, ws, tls, wss); each at
/// most once.
fn parse_listeners(list: &str) -> Result<Listeners, ConfigError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Scheme {
        Tcp,
        Ws,
        Tls,
        Wss,
    }
    let scheme = |s: &str| match s.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => Some(Scheme::Tcp),
        "ws" => Some(Scheme::Ws),
        "mqtts" | "ssl" => Some(Scheme::Tls),
        "wss" => Some(Scheme::Wss),
        _ => None,
    };
    let flag = "--mqtt-listeners";
    let mut out: Listeners = (None, None, None, None);
    for (s, addr) in crate::config::scheme_list(flag, list, scheme, "mqtt, mqtts, ws or wss")? {
        let addr = Some(parse_addr("--mqtt-listeners address", addr)?);
        match s {
            Scheme::Tcp => out.0 = addr,
            Scheme::Ws => out.1 = addr,
            Scheme::Tls => out.2 = addr,
            Scheme::Wss => out.3 = addr,
        }
    }
    Ok(out)
}

fn size(s: &str) -> Result<usize, ConfigError> {
    usize::try_from(parse_bytes(s)?).map_err(|_| err(format!("size {s:?} too large")))
}

/// The MQTT service and its bound listeners, ready to serve.
pub struct MqttServing {
    pub mqtt: Arc<Mqtt>,
    pub listeners: MqttListeners,
    /// The TLS configuration of the `mqtts` and `wss` listeners.
    pub tls: Option<Arc<TlsServer>>,
    /// Each listener's connection limits.
    pub limits: LimitSettings,
}

/// The bound MQTT listeners.
#[derive(Default)]
pub struct MqttListeners {
    pub tcp: Option<TcpListener>,
    pub ws: Option<TcpListener>,
    pub tls: Option<TcpListener>,
    pub wss: Option<TcpListener>,
}

impl MqttListeners {
    fn is_empty(&self) -> bool {
        self.tcp.is_none() && self.ws.is_none() && self.tls.is_none() && self.wss.is_none()
    }
}

/// Bind the listeners (so a port in use fails fast, before state opens).
pub async fn bind(cfg: &MqttConfig) -> Result<MqttListeners, String> {
    async fn one(what: &str, a: Option<SocketAddr>) -> Result<Option<TcpListener>, String> {
        match a {
            Some(a) => Ok(Some(crate::bind(what, a).await?)),
            None => Ok(None),
        }
    }
    Ok(MqttListeners {
        tcp: one("MQTT", cfg.tcp).await?,
        ws: one("MQTT WebSocket", cfg.ws).await?,
        tls: one("MQTT TLS", cfg.tls).await?,
        wss: one("MQTT WebSocket TLS", cfg.wss).await?,
    })
}

/// Start the service for `broker` with the bound listeners; `None` when
/// neither listener is on. Seeds the file's persistence rules.
pub async fn start(
    broker: &Arc<Broker>,
    cfg: &MqttConfig,
    listeners: MqttListeners,
    tls: Option<Arc<TlsServer>>,
    limits: LimitSettings,
) -> Result<Option<MqttServing>, String> {
    for r in &cfg.persist {
        shoal_broker::mqtt::http::put(broker, r.filter.clone(), r.stream.clone(), r.shards)
            .await
            .map_err(|(_, e)| format!("[[mqtt.persist]] {}: {e}", r.filter))?;
    }
    if listeners.is_empty() {
        return Ok(None);
    }
    if (listeners.tls.is_some() || listeners.wss.is_some()) && tls.is_none() {
        return Err("the mqtts and wss listeners need --tls-cert and --tls-key".into());
    }
    let access = Access::load(
        cfg.password_file.as_deref(),
        cfg.acl_file.as_deref(),
        cfg.allow_anonymous,
    )
    .map_err(|e| format!("MQTT access: {e}"))?;
    let mqtt = Mqtt::new(broker.clone(), cfg.settings.clone(), access);
    mqtt.open_state()
        .await
        .map_err(|e| format!("MQTT sessions and retained messages: {e}"))?;
    if let Err(e) = mqtt.load_rules().await {
        tracing::warn!("MQTT persistence rules not loaded yet: {e}");
    }
    if let Some(l) = &listeners.tcp {
        mqtt.add_listener("tcp", addr_of(l));
    }
    if let Some(l) = &listeners.ws {
        mqtt.add_listener("websocket", format!("{}/mqtt", addr_of(l)));
    }
    if let Some(l) = &listeners.tls {
        mqtt.add_listener("tls", addr_of(l));
    }
    if let Some(l) = &listeners.wss {
        mqtt.add_listener("websocket-tls", format!("{}/mqtt", addr_of(l)));
    }
    Ok(Some(MqttServing {
        mqtt,
        listeners,
        tls,
        limits,
    }))
}

fn addr_of(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

#[derive(Debug, Subcommand)]
pub enum MqttCmd {
    /// Add or replace USER in a password file, with a password read from
    /// standard input (first line) or --password.
    Passwd {
        file: PathBuf,
        user: String,
        #[arg(long)]
        password: Option<String>,
        /// Remove USER instead.
        #[arg(long, short = 'D')]
        delete: bool,
    },
}

pub fn command(cmd: MqttCmd) -> Result<(), String> {
    match cmd {
        MqttCmd::Passwd {
            file,
            user,
            password,
            delete,
        } => passwd(&file, &user, password, delete),
    }
}

fn passwd(file: &Path, user: &str, password: Option<String>, delete: bool) -> Result<(), String> {
    if user.is_empty() || user.contains(':') {
        return Err("a user name must be non-empty and contain no ':'".into());
    }
    let existing = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
    };
    let mut lines: Vec<String> = existing
        .lines()
        .filter(|l| l.split_once(':').is_none_or(|(u, _)| u != user))
        .map(str::to_string)
        .collect();
    if !delete {
        let password = match password {
            Some(p) => p,
            None => {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .map_err(|e| format!("reading the password: {e}"))?;
                line.trim_end_matches(['\r', '\n']).to_string()
            }
        };
        if password.is_empty() {
            return Err("the password is empty".into());
        }
        let hash = shoal_broker::mqtt::hash_password(password.as_bytes())?;
        lines.push(format!("{user}:{hash}"));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(file, text).map_err(|e| format!("cannot write {}: {e}", file.display()))
}
