//! The cluster roles: `shoal placement` (one Placement Center node) and
//! `shoal broker` (a stateless broker following the placement controller).
//! Settings come from flags or the matching `SHOAL_*` variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use serde::Deserialize;
use shoal_broker::{Broker, BrokerConfig, Durability};
use shoal_placement::{NodeConfig, PlacementClient, PlacementNode};
use shoal_storage::ObjectStorage;

use crate::config::{ConfigError, err, parse_addr, parse_bytes};
use crate::{bind, wait_for_signal};

#[derive(Debug, Args)]
pub struct PlacementArgs {
    /// This node's id, one of the ids in --peers.
    #[arg(long, env = "SHOAL_NODE_ID")]
    pub node_id: u64,
    /// HTTP address to listen on, as the peers and brokers reach it.
    #[arg(long, env = "SHOAL_ADDR")]
    pub addr: String,
    /// Every voter of a new cluster: 1=HOST:PORT,2=HOST:PORT,3=HOST:PORT.
    /// The lowest id initialises the cluster on its first start.
    #[arg(long, env = "SHOAL_PEERS")]
    pub peers: String,
    /// Raft log, votes, snapshots and state machine.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: PathBuf,
    /// A broker that has not heartbeated for this long loses its shards.
    #[arg(long, env = "SHOAL_SESSION_TIMEOUT", default_value = "6s")]
    pub session_timeout: String,
    /// `retention.ms` of new topics that set none, cluster-wide (e.g. 7d;
    /// -1 keeps everything). Unset: the cluster's current value (7d at first).
    #[arg(long, env = "SHOAL_DEFAULT_RETENTION")]
    pub default_retention: Option<String>,
    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,
    /// The certificate for --http-tls.
    #[command(flatten)]
    pub tls: crate::listeners::TlsArgs,
}

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// This broker's id (stable across restarts).
    #[arg(long, env = "SHOAL_NODE_ID")]
    pub node_id: u64,
    /// Placement nodes: HOST:PORT[,HOST:PORT...]; any of them will do.
    #[arg(long, env = "SHOAL_PLACEMENT")]
    pub placement: String,
    #[arg(long, env = "SHOAL_KAFKA_ADDR", default_value = "127.0.0.1:9092")]
    pub kafka_addr: String,
    /// Address given to Kafka clients (defaults to the listener address).
    #[arg(long, env = "SHOAL_ADVERTISED_KAFKA_ADDR")]
    pub advertised_kafka_addr: Option<String>,
    #[arg(long, env = "SHOAL_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: String,
    /// Object store shared by every broker: s3://bucket/prefix or file:///dir.
    #[arg(long, env = "SHOAL_OBJECT_STORE")]
    pub object_store: String,
    /// WAL and cache.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: PathBuf,
    #[arg(long, env = "SHOAL_FLUSH_INTERVAL", default_value = "250ms")]
    pub flush_interval: String,
    #[arg(long, env = "SHOAL_FLUSH_BYTES", default_value = "8MiB")]
    pub flush_bytes: String,
    #[arg(long, env = "SHOAL_MAX_UNFLUSHED_BYTES", default_value = "1GiB")]
    pub max_unflushed_bytes: String,
    /// The read cache's memory tier: `auto` (12 % of the memory this
    /// process may use, 64 MiB to 32 GiB), a percentage or a size.
    #[arg(long, env = "SHOAL_CACHE_MEMORY", default_value = "auto")]
    pub cache_memory: String,
    /// The read cache's disk tier under DATA_DIR/cache: `auto` (10 % of the
    /// free space there, 256 MiB to 1 TiB), a percentage or a size; 0 is off.
    #[arg(long, env = "SHOAL_CACHE_DISK", default_value = "auto")]
    pub cache_disk: String,
    /// Most Kafka incremental fetch sessions kept (Kafka's
    /// max.incremental.fetch.session.cache.slots; 0 = none).
    #[arg(long, env = "SHOAL_FETCH_SESSION_CACHE_SLOTS", default_value_t = 1000)]
    pub fetch_session_cache_slots: usize,
    /// How far ahead of a sequential reader committed segments are loaded,
    /// per partition; 0 turns read-ahead off.
    #[arg(long, env = "SHOAL_READ_AHEAD_BYTES", default_value = "16MiB")]
    pub read_ahead_bytes: String,
    /// Most read-ahead loads from the object store in flight at once.
    #[arg(long, env = "SHOAL_READ_AHEAD_CONCURRENCY", default_value_t = 32)]
    pub read_ahead_concurrency: usize,
    #[arg(long, env = "SHOAL_DEFAULT_PARTITIONS", default_value_t = 1)]
    pub default_partitions: i32,
    /// Durability of new topics; `object` by default in a cluster, where a
    /// broker's disk is not meant to matter.
    #[arg(long, env = "SHOAL_DEFAULT_DURABILITY", default_value = "object")]
    pub default_durability: String,
    /// Directory of the write-ahead log (default DATA_DIR/wal).
    #[arg(long, env = "SHOAL_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// Idle idempotent producers are forgotten after this (Kafka's
    /// producer.id.expiration.ms).
    #[arg(long, env = "SHOAL_PRODUCER_ID_EXPIRATION", default_value = "1d")]
    pub producer_id_expiration: String,
    #[command(flatten)]
    pub mqtt: crate::mqtt::MqttArgs,
    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,
    #[command(flatten)]
    pub security: crate::listeners::SecurityArgs,
    /// TOML file with the listener, TLS, SASL, ACL, MQTT and HTTP
    /// authentication settings (the keys of `standalone`'s file; flags and
    /// SHOAL_* variables win).
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `shoal broker --config FILE`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BrokerFile {
    cluster_secret_file: Option<PathBuf>,
    admin_token_file: Option<PathBuf>,
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
    mqtt: Option<crate::mqtt::MqttFile>,
}

impl BrokerFile {
    fn read(path: Option<&Path>) -> Result<Self, ConfigError> {
        path.map_or_else(|| Ok(Self::default()), crate::config::read_file)
    }

    fn security(&self) -> crate::listeners::SecurityFile {
        crate::listeners::SecurityFile {
            kafka_listeners: self.kafka_listeners.clone(),
            advertised_kafka_listeners: self.advertised_kafka_listeners.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_client_ca: self.tls_client_ca.clone(),
            sasl_mechanisms: self.sasl_mechanisms.clone(),
            connections_max_reauth: self.connections_max_reauth.clone(),
            authorizer: self.authorizer,
            super_users: self.super_users.clone(),
            allow_everyone_if_no_acl_found: self.allow_everyone_if_no_acl_found,
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
        }
    }

    fn mqtt(&mut self) -> (crate::mqtt::MqttFlatFile, Vec<crate::mqtt::PersistRuleFile>) {
        let flat = crate::mqtt::MqttFlatFile {
            mqtt_addr: self.mqtt_addr.take(),
            mqtt_ws_addr: self.mqtt_ws_addr.take(),
            mqtt_listeners: self.mqtt_listeners.take(),
            mqtt_password_file: self.mqtt_password_file.take(),
            mqtt_acl_file: self.mqtt_acl_file.take(),
            mqtt_allow_anonymous: self.mqtt_allow_anonymous,
            mqtt_max_packet_size: self.mqtt_max_packet_size.take(),
            mqtt_max_queued_messages: self.mqtt_max_queued_messages,
            mqtt_queue_drop_policy: self.mqtt_queue_drop_policy.take(),
            mqtt_max_inflight: self.mqtt_max_inflight,
            mqtt_max_keep_alive: self.mqtt_max_keep_alive,
        };
        (
            flat,
            self.mqtt.take().map(|m| m.persist).unwrap_or_default(),
        )
    }
}

fn duration(flag: &str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| err(format!("invalid {flag} {s:?}: {e}")))
}

/// `1=HOST:PORT,2=HOST:PORT` into a map.
fn parse_peers(s: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| {
            err(format!(
                "invalid --peers entry {part:?}: expected ID=HOST:PORT"
            ))
        })?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| err(format!("invalid node id in --peers entry {part:?}")))?;
        parse_addr("--peers address", addr.trim())?;
        if peers.insert(id, addr.trim().to_string()).is_some() {
            return Err(err(format!("node {id} appears twice in --peers")));
        }
    }
    if peers.is_empty() {
        return Err(err("--peers is empty"));
    }
    Ok(peers)
}

pub async fn placement(args: PlacementArgs) -> Result<(), String> {
    let peers = parse_peers(&args.peers).map_err(|e| e.to_string())?;
    if !peers.contains_key(&args.node_id) {
        return Err(format!("--node-id {} is not in --peers", args.node_id));
    }
    let listen = parse_addr("--addr", &args.addr).map_err(|e| e.to_string())?;
    let session_timeout =
        duration("--session-timeout", &args.session_timeout).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("cannot use data dir {}: {e}", args.data_dir.display()))?;
    let default_retention = args
        .default_retention
        .as_deref()
        .map(crate::compaction::parse_retention)
        .transpose()
        .map_err(|e| e.to_string())?;
    let tls = args.tls.load(None, None, None).map_err(|e| e.to_string())?;
    let auth = args
        .auth
        .resolve_for_cluster()
        .and_then(|a| a.with_http_tls(args.auth.http_tls.unwrap_or(false), tls.as_ref()))
        .map_err(|e| e.to_string())?;
    let peer_addrs: Vec<String> = peers.values().cloned().collect();
    let listener = bind("placement", listen).await?;
    let mut cfg = NodeConfig::cluster(args.node_id, &args.data_dir, args.addr.clone(), peers);
    cfg.session_timeout = session_timeout;
    cfg.peer_auth = auth.peers.clone();
    let node = PlacementNode::start(cfg)
        .await
        .map_err(|e| format!("placement: {e}"))?;
    let app = auth.server.protect(
        shoal_placement::router(node.clone()).merge(
            Router::new()
                .route("/health", get(placement_health))
                .route("/metrics", get(placement_metrics))
                .with_state(node.clone()),
        ),
    );
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    if let Some(tls) = &auth.http_tls {
        tokio::spawn(tls.clone().watch(shutdown_rx.clone()));
    }
    let http = tokio::spawn(crate::serving::serve_http(
        listener,
        auth.http_tls.clone(),
        app,
        shutdown_rx,
    ));
    let controller = tokio::spawn(shoal_placement::controller::run(node.clone()));
    if let Some(ms) = default_retention {
        tokio::spawn(async move {
            let client = PlacementClient::remote(peer_addrs, &auth.peers);
            crate::compaction::set_default_retention(&client, ms).await;
        });
    }
    tracing::info!(node = args.node_id, addr = %args.addr, "shoal placement is running");
    wait_for_signal().await;
    tracing::info!("shutting down");
    controller.abort();
    let _ = shutdown_tx.send(true);
    let _ = http.await;
    node.shutdown()
        .await
        .map_err(|e| format!("placement shutdown: {e}"))
}

/// `{"status": "ok" | "starting", "checks": {"raft": ...}}`: 200 once the
/// node knows a leader (itself or another), 503 until then.
async fn placement_health(State(node): State<Arc<PlacementNode>>) -> Response {
    match node.status().leader_id {
        Some(leader) => axum::Json(serde_json::json!({
            "status": "ok",
            "checks": { "raft": format!("leader is node {leader}") },
        }))
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "status": "starting",
                "checks": { "raft": "no leader known" },
            })),
        )
            .into_response(),
    }
}

async fn placement_metrics(State(node): State<Arc<PlacementNode>>) -> Response {
    let v = node.cluster_view();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    metric(
        "shoal_placement_is_leader",
        "gauge",
        "1 on the Raft leader",
        f64::from(u8::from(v.status.is_leader)),
    );
    metric(
        "shoal_placement_term",
        "gauge",
        "Current Raft term",
        v.status.term as f64,
    );
    metric(
        "shoal_placement_raft_write_seconds_count",
        "counter",
        "Raft writes committed through this node",
        v.raft_writes as f64,
    );
    metric(
        "shoal_placement_raft_write_seconds_sum",
        "counter",
        "Total latency of those writes (commit and apply)",
        v.raft_write_seconds,
    );
    metric(
        "shoal_placement_lease_changes_total",
        "counter",
        "Shard leases moved by this node's controller",
        v.lease_changes as f64,
    );
    metric(
        "shoal_placement_failovers_total",
        "counter",
        "Shards moved off a broker that stopped heartbeating",
        v.failovers as f64,
    );
    let live = v.brokers.iter().filter(|b| b.live == Some(true)).count();
    metric(
        "shoal_placement_live_brokers",
        "gauge",
        "Live brokers (leader only)",
        live as f64,
    );
    out.push_str("# EOF\n");
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        out,
    )
        .into_response()
}

struct BrokerSettings {
    kafka: crate::listeners::KafkaSetup,
    http_addr: SocketAddr,
    config: BrokerConfig,
}

fn broker_settings(args: &BrokerArgs, file: &BrokerFile) -> Result<BrokerSettings, ConfigError> {
    let kafka = args.security.resolve(
        file.security(),
        &args.kafka_addr,
        args.advertised_kafka_addr.as_deref(),
    )?;
    let http_addr = parse_addr("--http-addr", &args.http_addr)?;
    let mut c = BrokerConfig::new(&args.data_dir);
    c.broker_id = args.node_id;
    c.cluster = true;
    let host = kafka.advertised_host.clone();
    c.advertised_host = host.clone();
    c.advertised_port = kafka.advertised_port;
    c.advertised_listeners = kafka.advertised.clone();
    c.authorizer = kafka.authorizer.clone();
    c.http_addr = if http_addr.ip().is_unspecified() {
        format!("{host}:{}", http_addr.port())
    } else {
        http_addr.to_string()
    };
    c.flush_interval = duration("--flush-interval", &args.flush_interval)?;
    if c.flush_interval.is_zero() {
        return Err(err("--flush-interval must be greater than zero"));
    }
    c.flush_bytes = parse_bytes(&args.flush_bytes)?;
    c.max_unflushed_bytes = parse_bytes(&args.max_unflushed_bytes)?;
    c.cache_memory =
        crate::config::cache_size_setting("cache-memory", Some(args.cache_memory.clone()), None)?;
    c.cache_disk =
        crate::config::cache_size_setting("cache-disk", Some(args.cache_disk.clone()), None)?;
    if c.cache_memory == shoal_wal_cache::CacheSize::Bytes(0) {
        return Err(err("--cache-memory must be more than 0"));
    }
    c.fetch_session_slots = args.fetch_session_cache_slots;
    c.read_ahead_bytes = parse_bytes(&args.read_ahead_bytes)?;
    if args.read_ahead_concurrency == 0 {
        return Err(err("--read-ahead-concurrency must be at least 1"));
    }
    c.max_segment_loads = args.read_ahead_concurrency;
    if !(1..=10_000).contains(&args.default_partitions) {
        return Err(err("--default-partitions must be between 1 and 10000"));
    }
    c.default_partitions = args.default_partitions;
    c.default_durability = Durability::parse(&args.default_durability).ok_or_else(|| {
        err(format!(
            "invalid --default-durability {:?}: expected local or object",
            args.default_durability
        ))
    })?;
    c.wal_dir = args.wal_dir.clone();
    c.producer_expiration = crate::config::producer_expiration(Some(&args.producer_id_expiration))?;
    Ok(BrokerSettings {
        kafka,
        http_addr,
        config: c,
    })
}

pub async fn broker(args: BrokerArgs) -> Result<(), String> {
    let mut file = BrokerFile::read(args.config.as_deref()).map_err(|e| e.to_string())?;
    let mut s = broker_settings(&args, &file).map_err(|e| e.to_string())?;
    let http_tls = args.auth.http_tls.or(file.http_tls).unwrap_or(false);
    let auth = args
        .auth
        .resolve_for_cluster_with(
            file.cluster_secret_file.take(),
            file.admin_token_file.take(),
        )
        .and_then(|a| a.with_http_tls(http_tls, s.kafka.tls.as_ref()))
        .map_err(|e| e.to_string())?;
    s.config.peer_auth = auth.peers.clone();
    let (mqtt_file, persist) = file.mqtt();
    let mqtt_cfg = args
        .mqtt
        .resolve(mqtt_file, persist, None)
        .map_err(|e| e.to_string())?;
    let placement_addrs: Vec<String> = args
        .placement
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if placement_addrs.is_empty() {
        return Err("--placement is empty".into());
    }
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("cannot use data dir {}: {e}", args.data_dir.display()))?;
    let kafka_listeners = crate::bind_kafka(&s.kafka).await?;
    let http_listener = bind("HTTP", s.http_addr).await?;
    let mqtt_listeners = crate::mqtt::bind(&mqtt_cfg).await?;
    let store = ObjectStorage::from_url(&args.object_store)
        .map_err(|e| format!("object store {}: {e}", args.object_store))?;
    let placement = PlacementClient::remote(placement_addrs, &auth.peers);
    let broker = Broker::start(s.config, placement, store)
        .await
        .map_err(|e| format!("broker: {e}"))?;
    let mqtt_serving = crate::mqtt::start(
        &broker,
        &mqtt_cfg,
        mqtt_listeners,
        s.kafka.tls.clone(),
        s.kafka.limits,
    )
    .await?;
    let serving = crate::serving::serve(
        broker,
        kafka_listeners,
        s.kafka.tls.clone(),
        http_listener,
        Router::new(),
        mqtt_serving,
        auth,
    );
    tracing::info!(
        node = args.node_id,
        kafka = ?s.kafka.advertised,
        http = %s.http_addr,
        mqtt = ?mqtt_cfg.tcp,
        objects = %args.object_store,
        "shoal broker is ready"
    );
    wait_for_signal().await;
    tracing::info!("shutting down");
    serving.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse() {
        let p = parse_peers("1=127.0.0.1:1,2=127.0.0.1:2, 3=127.0.0.1:3").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[&2], "127.0.0.1:2");
        assert!(parse_peers("1=127.0.0.1:1,1=127.0.0.1:2").is_err());
        assert!(parse_peers("x=127.0.0.1:1").is_err());
        assert!(parse_peers("").is_err());
    }
}
