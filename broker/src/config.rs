//! Broker settings, filled in by the binary from flags, env and file.

use shoal_wal_cache::CacheSize;
use std::path::PathBuf;
use std::time::Duration;

/// Where acknowledged records must be before a produce with acks=all is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After the local WAL fsync.
    Local,
    /// After the records are in a committed object.
    Object,
}

impl Durability {
    pub const CONFIG_KEY: &'static str = "shoal.durability";

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "local" => Some(Durability::Local),
            "object" => Some(Durability::Object),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Durability::Local => "local",
            Durability::Object => "object",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub broker_id: u64,
    /// Host and port written into Metadata and FindCoordinator answers.
    pub advertised_host: String,
    pub advertised_port: i32,
    /// The WAL lives in `<data_dir>/wal` (unless `wal_dir` says otherwise),
    /// the cache in `<data_dir>/cache`.
    pub data_dir: PathBuf,
    /// Where the WAL lives, if not under `data_dir` (a disk of its own).
    pub wal_dir: Option<PathBuf>,
    /// Idle idempotent producers are forgotten after this (Kafka's
    /// `producer.id.expiration.ms`, default one day).
    pub producer_expiration: Duration,
    pub flush_interval: Duration,
    pub flush_bytes: u64,
    pub default_partitions: i32,
    pub default_durability: Durability,
    pub auto_create_topics: bool,
    /// Flushed bytes per shard kept in memory for tail reads.
    pub tail_keep_bytes: usize,
    /// The cache's memory tier (see [`CacheSize`]; `auto` by default).
    pub cache_memory: CacheSize,
    /// The cache's disk tier under `data_dir/cache`.
    pub cache_disk: CacheSize,
    /// How far a sequential read of committed segments is read ahead, per
    /// shard, in bytes of segment ranges.
    pub read_ahead_bytes: u64,
    /// Most segment ranges loaded from the object store at once for
    /// read-ahead (reads a fetch waits for are not limited).
    pub max_segment_loads: usize,
    /// Most Kafka incremental fetch sessions kept (Kafka's
    /// `max.incremental.fetch.session.cache.slots`); 0 turns them off.
    pub fetch_session_slots: usize,
    pub cluster_id: String,
    /// Largest Kafka request frame accepted (Kafka's socket.request.max.bytes).
    pub max_request_bytes: usize,
    /// Bound on bytes accepted but not yet in a committed object (the WAL
    /// and the tails). Past it, produces get a retriable error instead of
    /// growing memory and disk while object storage is unreachable.
    pub max_unflushed_bytes: u64,
    /// In a cluster: follow the controller's assignment (heartbeating to
    /// placement) instead of taking every shard's lease.
    pub cluster: bool,
    /// host:port of this broker's HTTP API, published to placement.
    pub http_addr: String,
    /// What this broker presents to the other brokers' HTTP APIs (the
    /// cluster secret when one is configured).
    pub peer_auth: shoal_security::ClientAuth,
    /// Listener name -> advertised host:port, when there are several
    /// (`advertised_host:advertised_port` is the first).
    pub advertised_listeners: std::collections::BTreeMap<String, String>,
    /// Kafka ACLs are enforced when set (`--authorizer true`).
    pub authorizer: Option<shoal_security::acl::AuthorizerConfig>,
}

impl BrokerConfig {
    /// The WAL directory.
    pub fn wal_dir(&self) -> PathBuf {
        self.wal_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("wal"))
    }

    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        BrokerConfig {
            broker_id: 1,
            advertised_host: "127.0.0.1".into(),
            advertised_port: 9092,
            data_dir: data_dir.into(),
            wal_dir: None,
            producer_expiration: Duration::from_secs(24 * 3600),
            flush_interval: Duration::from_millis(250),
            flush_bytes: 8 << 20,
            default_partitions: 1,
            default_durability: Durability::Local,
            auto_create_topics: true,
            tail_keep_bytes: 8 << 20,
            cache_memory: CacheSize::Auto,
            cache_disk: CacheSize::Auto,
            fetch_session_slots: crate::kafka::fetch_session::DEFAULT_SESSION_SLOTS,
            read_ahead_bytes: 16 << 20,
            max_segment_loads: 32,
            cluster_id: "shoal".into(),
            max_request_bytes: 100 << 20,
            max_unflushed_bytes: 1 << 30,
            cluster: false,
            http_addr: String::new(),
            peer_auth: shoal_security::ClientAuth::none(),
            advertised_listeners: Default::default(),
            authorizer: None,
        }
    }

    /// How this broker is registered in placement.
    pub fn broker_info(&self, registered_ms: i64) -> shoal_placement::BrokerInfo {
        shoal_placement::BrokerInfo {
            id: self.broker_id,
            kafka_addr: format!("{}:{}", self.advertised_host, self.advertised_port),
            http_addr: self.http_addr.clone(),
            registered_ms,
            kafka_listeners: self.advertised_listeners.clone(),
        }
    }
}
