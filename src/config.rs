//! `shoal standalone` settings: defaults < TOML file < SHOAL_* env < flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

#[derive(Debug, Args)]
pub struct StandaloneArgs {
    /// TOML file with the same keys as the flags (e.g. `flush-interval = "250ms"`).
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the WAL, placement state, cache and (by default) objects.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Kafka listener address.
    #[arg(long, env = "SHOAL_KAFKA_ADDR")]
    pub kafka_addr: Option<String>,
    /// Address given to Kafka clients (defaults to the listener address).
    #[arg(long, env = "SHOAL_ADVERTISED_KAFKA_ADDR")]
    pub advertised_kafka_addr: Option<String>,
    /// HTTP address for /health, /metrics, the admin API and placement.
    #[arg(long, env = "SHOAL_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Object store URL: file:///dir, memory://, s3://bucket/prefix.
    #[arg(long, env = "SHOAL_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// Flush un-flushed data at least this often (e.g. 250ms).
    #[arg(long, env = "SHOAL_FLUSH_INTERVAL")]
    pub flush_interval: Option<String>,
    /// Flush as soon as this many bytes are un-flushed (e.g. 8MiB or 8388608).
    #[arg(long, env = "SHOAL_FLUSH_BYTES")]
    pub flush_bytes: Option<String>,
    /// Most bytes accepted but not yet in object storage (e.g. 1GiB); past
    /// it produces get a retriable error.
    #[arg(long, env = "SHOAL_MAX_UNFLUSHED_BYTES")]
    pub max_unflushed_bytes: Option<String>,
    /// The read cache's memory tier: `auto` (12 % of the memory this
    /// process may use, 64 MiB to 32 GiB), a percentage (`25%`) or a size
    /// (`2GiB`).
    #[arg(long, env = "SHOAL_CACHE_MEMORY")]
    pub cache_memory: Option<String>,
    /// The read cache's disk tier under DATA_DIR/cache: `auto` (10 % of the
    /// free space there at start, 256 MiB to 1 TiB), a percentage or a
    /// size; 0 turns it off.
    #[arg(long, env = "SHOAL_CACHE_DISK")]
    pub cache_disk: Option<String>,
    /// How far ahead of a sequential reader committed segments are loaded,
    /// per partition (e.g. 16MiB, the default; 0 turns read-ahead off).
    #[arg(long, env = "SHOAL_READ_AHEAD_BYTES")]
    pub read_ahead_bytes: Option<String>,
    /// Most read-ahead loads from the object store in flight at once
    /// (default 32).
    #[arg(long, env = "SHOAL_READ_AHEAD_CONCURRENCY")]
    pub read_ahead_concurrency: Option<usize>,
    /// Most Kafka incremental fetch sessions kept (Kafka's
    /// max.incremental.fetch.session.cache.slots, default 1000; 0 = none).
    #[arg(long, env = "SHOAL_FETCH_SESSION_CACHE_SLOTS")]
    pub fetch_session_cache_slots: Option<usize>,
    /// Partitions of auto-created topics.
    #[arg(long, env = "SHOAL_DEFAULT_PARTITIONS")]
    pub default_partitions: Option<i32>,
    /// Keep placement's state in the object store too (default: on for s3://),
    /// so a node with an empty disk resumes from the bucket alone.
    #[arg(long, env = "SHOAL_PLACEMENT_IN_BUCKET")]
    pub placement_in_bucket: Option<bool>,
    /// How long the bucket lease of a standalone node lasts unrenewed.
    #[arg(long, env = "SHOAL_BUCKET_LEASE_TTL")]
    pub bucket_lease_ttl: Option<String>,
    /// Durability of new topics: local or object.
    #[arg(long, env = "SHOAL_DEFAULT_DURABILITY")]
    pub default_durability: Option<String>,
    /// Directory of the write-ahead log (default DATA_DIR/wal); a disk of
    /// its own keeps its fsyncs clear of other writes.
    #[arg(long, env = "SHOAL_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// Idle idempotent producers are forgotten after this (Kafka's
    /// producer.id.expiration.ms; e.g. 1d, 15m).
    #[arg(long, env = "SHOAL_PRODUCER_ID_EXPIRATION")]
    pub producer_id_expiration: Option<String>,
    /// Run compaction, retention and garbage collection in this process.
    #[arg(long, env = "SHOAL_COMPACTION")]
    pub compaction: Option<bool>,
    /// `retention.ms` of new topics that set none, cluster-wide (e.g. 7d;
    /// -1 keeps everything). Unset: placement's current value (7d at first).
    #[arg(long, env = "SHOAL_DEFAULT_RETENTION")]
    pub default_retention: Option<String>,
    /// Listen beyond loopback even where no one is authenticated.
    #[arg(long, env = "SHOAL_INSECURE")]
    pub insecure: bool,
    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,
    #[command(flatten)]
    pub security: crate::listeners::SecurityArgs,
    #[command(flatten)]
    pub compaction_settings: crate::compaction::CompactionArgs,
    #[command(flatten)]
    pub mqtt: crate::mqtt::MqttArgs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileConfig {
    #[serde(alias = "data_dir")]
    data_dir: Option<PathBuf>,
    #[serde(alias = "kafka_addr")]
    kafka_addr: Option<String>,
    #[serde(alias = "advertised_kafka_addr")]
    advertised_kafka_addr: Option<String>,
    #[serde(alias = "http_addr")]
    http_addr: Option<String>,
    #[serde(alias = "object_store")]
    object_store: Option<String>,
    #[serde(alias = "flush_interval")]
    flush_interval: Option<String>,
    #[serde(alias = "flush_bytes")]
    flush_bytes: Option<toml::Value>,
    #[serde(alias = "max_unflushed_bytes")]
    max_unflushed_bytes: Option<toml::Value>,
    #[serde(alias = "cache_memory")]
    cache_memory: Option<toml::Value>,
    #[serde(alias = "cache_disk")]
    cache_disk: Option<toml::Value>,
    #[serde(alias = "fetch_session_cache_slots")]
    fetch_session_cache_slots: Option<usize>,
    #[serde(alias = "read_ahead_bytes")]
    read_ahead_bytes: Option<toml::Value>,
    #[serde(alias = "read_ahead_concurrency")]
    read_ahead_concurrency: Option<usize>,
    #[serde(alias = "default_partitions")]
    default_partitions: Option<i32>,
    #[serde(alias = "default_durability")]
    default_durability: Option<String>,
    #[serde(alias = "placement_in_bucket")]
    placement_in_bucket: Option<bool>,
    #[serde(alias = "bucket_lease_ttl")]
    bucket_lease_ttl: Option<String>,
    #[serde(alias = "wal_dir")]
    wal_dir: Option<PathBuf>,
    #[serde(alias = "producer_id_expiration")]
    producer_id_expiration: Option<String>,
    compaction: Option<bool>,
    #[serde(alias = "default_retention")]
    default_retention: Option<String>,
    #[serde(alias = "compaction_delay")]
    compaction_delay: Option<String>,
    #[serde(alias = "compaction_interval")]
    compaction_interval: Option<String>,
    #[serde(alias = "gc_grace")]
    gc_grace: Option<String>,
    #[serde(alias = "orphan_grace")]
    orphan_grace: Option<String>,
    #[serde(alias = "compaction_target_size")]
    compaction_target_size: Option<toml::Value>,
    cluster_secret_file: Option<PathBuf>,
    admin_token_file: Option<PathBuf>,
    insecure: Option<bool>,
    http_tls: Option<bool>,
    kafka_listeners: Option<String>,
    advertised_kafka_listeners: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    sasl_mechanisms: Option<String>,
    connections_max_reauth: Option<String>,
    authorizer: Option<bool>,
    super_users: Option<String>,
    allow_everyone_if_no_acl_found: Option<bool>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    mqtt_addr: Option<String>,
    mqtt_ws_addr: Option<String>,
    mqtt_listeners: Option<String>,
    mqtt_password_file: Option<PathBuf>,
    mqtt_acl_file: Option<PathBuf>,
    mqtt_allow_anonymous: Option<bool>,
    mqtt_max_packet_size: Option<toml::Value>,
    mqtt_max_queued_messages: Option<usize>,
    mqtt_queue_drop_policy: Option<String>,
    mqtt_max_inflight: Option<usize>,
    mqtt_max_keep_alive: Option<u16>,
    /// `[[mqtt.persist]]` rules.
    mqtt: Option<crate::mqtt::MqttFile>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Standalone {
    pub data_dir: PathBuf,
    pub kafka: crate::listeners::KafkaSetup,
    pub http_addr: SocketAddr,
    pub object_store: String,
    pub flush_interval: Duration,
    pub flush_bytes: u64,
    pub max_unflushed_bytes: u64,
    pub cache_memory: shoal_wal_cache::CacheSize,
    pub cache_disk: shoal_wal_cache::CacheSize,
    pub fetch_session_slots: usize,
    pub read_ahead_bytes: u64,
    pub read_ahead_concurrency: usize,
    pub default_partitions: i32,
    pub default_durability: shoal_broker::Durability,
    pub placement_in_bucket: bool,
    pub bucket_lease_ttl: Duration,
    pub wal_dir: Option<PathBuf>,
    pub producer_id_expiration: Duration,
    pub compaction_enabled: bool,
    pub compaction: crate::compaction::Compaction,
    pub default_retention_ms: Option<i64>,
    pub mqtt: crate::mqtt::MqttConfig,
    pub auth: crate::auth::Auth,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub(crate) fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// "8MiB", "512KiB", "1GiB", "8M" or a plain byte count.
pub fn parse_bytes(s: &str) -> Result<u64, ConfigError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| err(format!("invalid byte size {s:?}")))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(err(format!("invalid byte unit {other:?} in {s:?}"))),
    };
    n.checked_mul(mult)
        .ok_or_else(|| err(format!("byte size {s:?} too large")))
}

/// A `SCHEME://HOST:PORT,...` listener list (`--kafka-listeners`,
/// `--mqtt-listeners`) into (scheme, "HOST:PORT") pairs, each scheme at
/// most once. `scheme` reads a scheme; `expected` names the valid ones.
pub(crate) fn scheme_list<'a, T: PartialEq + Copy>(
    flag: &str,
    list: &'a str,
    scheme: impl Fn(&str) -> Option<T>,
    expected: &str,
) -> Result<Vec<(T, &'a str)>, ConfigError> {
    let mut out: Vec<(T, &str)> = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, addr) = part.split_once("://").ok_or_else(|| {
            err(format!(
                "invalid {flag} entry {part:?}: expected SCHEME://HOST:PORT"
            ))
        })?;
        let s = scheme(name).ok_or_else(|| {
            err(format!(
                "invalid {flag} entry {part:?}: the scheme must be {expected}"
            ))
        })?;
        if out.iter().any(|(p, _)| *p == s) {
            return Err(err(format!("{flag}: {name} appears twice")));
        }
        out.push((s, addr));
    }
    Ok(out)
}

pub(crate) fn parse_addr(what: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .ok()
        .and_then(|mut a| {
            a.find(|a| a.is_ipv4())
                .or_else(|| s.to_socket_addrs().ok()?.next())
        })
        .ok_or_else(|| err(format!("invalid {what} {s:?}: expected HOST:PORT")))
}

/// The host and port Kafka clients are told: `--advertised-kafka-addr`,
/// else the listener address (127.0.0.1 for a wildcard bind, which clients
/// cannot dial).
pub(crate) fn advertised(
    flag: Option<&str>,
    listen: SocketAddr,
) -> Result<(String, i32), ConfigError> {
    match flag {
        Some(a) => {
            let (h, p) = a
                .rsplit_once(':')
                .ok_or_else(|| err(format!("invalid --advertised-kafka-addr {a:?}")))?;
            let p: i32 = p
                .parse()
                .map_err(|_| err(format!("invalid port in --advertised-kafka-addr {a:?}")))?;
            Ok((h.to_string(), p))
        }
        None if listen.ip().is_unspecified() => {
            Ok(("127.0.0.1".to_string(), i32::from(listen.port())))
        }
        None => Ok((listen.ip().to_string(), i32::from(listen.port()))),
    }
}

impl StandaloneArgs {
    pub fn resolve(self) -> Result<Standalone, ConfigError> {
        let file: FileConfig = match &self.config {
            None => FileConfig::default(),
            Some(path) => read_file(path)?,
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./shoal-data"));
        let kafka_addr_s = self
            .kafka_addr
            .or(file.kafka_addr)
            .unwrap_or_else(|| "127.0.0.1:9092".into());
        let http_addr = parse_addr(
            "--http-addr",
            &self
                .http_addr
                .or(file.http_addr)
                .unwrap_or_else(|| "127.0.0.1:8080".into()),
        )?;
        let kafka = self.security.resolve(
            crate::listeners::SecurityFile {
                kafka_listeners: file.kafka_listeners,
                advertised_kafka_listeners: file.advertised_kafka_listeners,
                tls_cert: file.tls_cert,
                tls_key: file.tls_key,
                tls_client_ca: file.tls_client_ca,
                sasl_mechanisms: file.sasl_mechanisms,
                connections_max_reauth: file.connections_max_reauth,
                authorizer: file.authorizer,
                super_users: file.super_users,
                allow_everyone_if_no_acl_found: file.allow_everyone_if_no_acl_found,
                max_connections: file.max_connections,
                max_connections_per_ip: file.max_connections_per_ip,
            },
            &kafka_addr_s,
            self.advertised_kafka_addr
                .or(file.advertised_kafka_addr)
                .as_deref(),
        )?;
        let object_store = match self.object_store.or(file.object_store) {
            Some(u) => u,
            None => {
                let abs = absolute(&data_dir.join("objects"))?;
                format!("file://{}", abs.display())
            }
        };
        let flush_interval = match self.flush_interval.or(file.flush_interval) {
            Some(s) => humantime::parse_duration(&s)
                .map_err(|e| err(format!("invalid --flush-interval {s:?}: {e}")))?,
            None => Duration::from_millis(250),
        };
        if flush_interval.is_zero() {
            return Err(err("--flush-interval must be greater than zero"));
        }
        let flush_bytes =
            bytes_setting("flush-bytes", self.flush_bytes, file.flush_bytes, 8 << 20)?;
        let max_unflushed_bytes = bytes_setting(
            "max-unflushed-bytes",
            self.max_unflushed_bytes,
            file.max_unflushed_bytes,
            1 << 30,
        )?;
        if max_unflushed_bytes < flush_bytes {
            return Err(err("--max-unflushed-bytes must be at least --flush-bytes"));
        }
        let cache_memory =
            cache_size_setting("cache-memory", self.cache_memory, file.cache_memory)?;
        let read_ahead_bytes = bytes_setting(
            "read-ahead-bytes",
            self.read_ahead_bytes,
            file.read_ahead_bytes,
            16 << 20,
        )?;
        let read_ahead_concurrency = self
            .read_ahead_concurrency
            .or(file.read_ahead_concurrency)
            .unwrap_or(32);
        if read_ahead_concurrency == 0 {
            return Err(err("--read-ahead-concurrency must be at least 1"));
        }
        let cache_disk = cache_size_setting("cache-disk", self.cache_disk, file.cache_disk)?;
        let default_partitions = self
            .default_partitions
            .or(file.default_partitions)
            .unwrap_or(1);
        if !(1..=10_000).contains(&default_partitions) {
            return Err(err("--default-partitions must be between 1 and 10000"));
        }
        let durability_s = self
            .default_durability
            .or(file.default_durability)
            .unwrap_or_else(|| "local".into());
        let default_durability =
            shoal_broker::Durability::parse(&durability_s).ok_or_else(|| {
                err(format!(
                    "invalid --default-durability {durability_s:?}: expected local or object"
                ))
            })?;
        let placement_in_bucket = self
            .placement_in_bucket
            .or(file.placement_in_bucket)
            .unwrap_or_else(|| object_store.starts_with("s3://"));
        let bucket_lease_ttl = match self.bucket_lease_ttl.or(file.bucket_lease_ttl) {
            Some(s) => humantime::parse_duration(&s)
                .map_err(|e| err(format!("invalid --bucket-lease-ttl {s:?}: {e}")))?,
            None => Duration::from_secs(10),
        };
        if bucket_lease_ttl < Duration::from_secs(1) {
            return Err(err("--bucket-lease-ttl must be at least 1s"));
        }
        let producer_id_expiration = producer_expiration(
            self.producer_id_expiration
                .or(file.producer_id_expiration)
                .as_deref(),
        )?;
        let compaction_enabled = self.compaction.or(file.compaction).unwrap_or(true);
        let default_retention_ms = self
            .default_retention
            .or(file.default_retention)
            .map(|s| crate::compaction::parse_retention(&s))
            .transpose()?;
        let compaction = self
            .compaction_settings
            .resolve(crate::compaction::CompactionFile {
                compaction_delay: file.compaction_delay,
                compaction_interval: file.compaction_interval,
                gc_grace: file.gc_grace,
                orphan_grace: file.orphan_grace,
                compaction_target_size: file.compaction_target_size,
            })?;
        let mqtt = self.mqtt.resolve(
            crate::mqtt::MqttFlatFile {
                mqtt_addr: file.mqtt_addr,
                mqtt_ws_addr: file.mqtt_ws_addr,
                mqtt_listeners: file.mqtt_listeners,
                mqtt_password_file: file.mqtt_password_file,
                mqtt_acl_file: file.mqtt_acl_file,
                mqtt_allow_anonymous: file.mqtt_allow_anonymous,
                mqtt_max_packet_size: file.mqtt_max_packet_size,
                mqtt_max_queued_messages: file.mqtt_max_queued_messages,
                mqtt_queue_drop_policy: file.mqtt_queue_drop_policy,
                mqtt_max_inflight: file.mqtt_max_inflight,
                mqtt_max_keep_alive: file.mqtt_max_keep_alive,
            },
            file.mqtt.map(|m| m.persist).unwrap_or_default(),
            Some("127.0.0.1:1883"),
        )?;
        let auth = self
            .auth
            .resolve(file.cluster_secret_file, file.admin_token_file)?
            .with_http_tls(
                self.auth.http_tls.or(file.http_tls).unwrap_or(false),
                kafka.tls.as_ref(),
            )?;
        let mut exposed = kafka.exposures();
        exposed.push(crate::auth::Exposure {
            what: "HTTP",
            addr: http_addr,
            authenticated: auth.server.is_on(),
        });
        for addr in [mqtt.tcp, mqtt.ws, mqtt.tls, mqtt.wss]
            .into_iter()
            .flatten()
        {
            exposed.push(crate::auth::Exposure {
                what: "MQTT",
                addr,
                authenticated: !mqtt.allow_anonymous,
            });
        }
        crate::auth::check_exposure(&exposed, self.insecure || file.insecure.unwrap_or(false))?;
        Ok(Standalone {
            auth,
            mqtt,
            compaction_enabled,
            compaction,
            default_retention_ms,
            wal_dir: self.wal_dir.or(file.wal_dir),
            producer_id_expiration,
            placement_in_bucket,
            bucket_lease_ttl,
            data_dir,
            kafka,
            http_addr,
            object_store,
            flush_interval,
            flush_bytes,
            max_unflushed_bytes,
            cache_memory,
            cache_disk,
            fetch_session_slots: self
                .fetch_session_cache_slots
                .or(file.fetch_session_cache_slots)
                .unwrap_or(1000),
            read_ahead_bytes,
            read_ahead_concurrency,
            default_partitions,
            default_durability,
        })
    }
}

/// `--producer-id-expiration`: Kafka's default is one day.
pub(crate) fn producer_expiration(flag: Option<&str>) -> Result<Duration, ConfigError> {
    let d = match flag {
        Some(s) => humantime::parse_duration(s)
            .map_err(|e| err(format!("invalid --producer-id-expiration {s:?}: {e}")))?,
        None => Duration::from_secs(24 * 3600),
    };
    if d.is_zero() {
        return Err(err("--producer-id-expiration must be greater than zero"));
    }
    Ok(d)
}

/// A byte size from a flag/env string, else the file (integer or string).
fn bytes_setting(
    name: &str,
    flag: Option<String>,
    file: Option<toml::Value>,
    default: u64,
) -> Result<u64, ConfigError> {
    match (flag, file) {
        (Some(s), _) => parse_bytes(&s),
        (None, Some(toml::Value::Integer(n))) => {
            u64::try_from(n).map_err(|_| err(format!("{name} must be positive")))
        }
        (None, Some(toml::Value::String(s))) => parse_bytes(&s),
        (None, Some(v)) => Err(err(format!("invalid {name} {v}"))),
        (None, None) => Ok(default),
    }
}

/// A cache tier size from a flag/env string or a TOML string or integer.
pub(crate) fn cache_size_setting(
    name: &str,
    flag: Option<String>,
    file: Option<toml::Value>,
) -> Result<shoal_wal_cache::CacheSize, ConfigError> {
    let text = match (flag, file) {
        (Some(s), _) | (None, Some(toml::Value::String(s))) => s,
        (None, Some(toml::Value::Integer(n))) => n.to_string(),
        (None, Some(v)) => return Err(err(format!("invalid {name} {v}"))),
        (None, None) => return Ok(shoal_wal_cache::CacheSize::Auto),
    };
    text.parse().map_err(|e| err(format!("--{name}: {e}")))
}

pub(crate) fn read_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        err(format!(
            "invalid config file {}: {}",
            path.display(),
            e.message()
        ))
    })
}

fn absolute(p: &Path) -> Result<PathBuf, ConfigError> {
    std::path::absolute(p).map_err(|e| err(format!("invalid path {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("1 GiB").unwrap(), 1 << 30);
        assert!(parse_bytes("12XB").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
    }
}
