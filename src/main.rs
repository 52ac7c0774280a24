//! The `shoal` binary: CLI, configuration and wiring of the crates.

mod auth;
mod compaction;
mod config;
mod listeners;
mod mqtt;
mod roles;
mod serving;
mod tokens;
mod users;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shoal_broker::{Broker, BrokerConfig};
use shoal_placement::{BucketConfig, NodeConfig, PlacementClient, PlacementNode};
use shoal_storage::ObjectStorage;
use tokio::net::TcpListener;

use crate::config::{Standalone, StandaloneArgs};

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Object-storage-first Kafka and MQTT broker"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Placement Center, broker and local storage in one process.
    Standalone(StandaloneArgs),
    /// One node of a Placement Center cluster (three or five of them).
    Placement(roles::PlacementArgs),
    /// A stateless broker of a cluster.
    Broker(roles::BrokerArgs),
    /// Compaction, retention and garbage collection for a cluster (or a
    /// standalone node, through its HTTP address).
    Compactor(compaction::CompactorArgs),
    /// MQTT tools.
    Mqtt {
        #[command(subcommand)]
        cmd: mqtt::MqttCmd,
    },
    /// SCRAM users (Kafka SASL, MQTT passwords).
    Users {
        #[command(subcommand)]
        cmd: users::UsersCmd,
    },
    /// Operators' bearer tokens for the HTTP APIs.
    Tokens {
        #[command(subcommand)]
        cmd: tokens::TokensCmd,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The admin tools print their own results; the services log.
    let default_level = match cli.command {
        Cmd::Users { .. } | Cmd::Tokens { .. } => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Cmd::Standalone(args) => match args.resolve() {
            Ok(cfg) => runtime.block_on(standalone(cfg)),
            Err(e) => Err(e.to_string()),
        },
        Cmd::Placement(args) => runtime.block_on(roles::placement(args)),
        Cmd::Broker(args) => runtime.block_on(roles::broker(args)),
        Cmd::Compactor(args) => runtime.block_on(compaction::compactor(args)),
        Cmd::Mqtt { cmd } => mqtt::command(cmd),
        Cmd::Tokens { cmd } => tokens::command(cmd),
        Cmd::Users { cmd } => runtime.block_on(users::command(cmd)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) async fn bind(what: &str, addr: std::net::SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => format!("{what} address {addr} is already in use"),
        _ => format!("cannot listen on {what} address {addr}: {e}"),
    })
}

/// Bind every Kafka listener (a port in use fails before state opens).
pub(crate) async fn bind_kafka(
    setup: &listeners::KafkaSetup,
) -> Result<
    Vec<(
        TcpListener,
        std::sync::Arc<shoal_broker::kafka::KafkaListener>,
    )>,
    String,
> {
    let mut out = Vec::new();
    for l in &setup.listeners {
        let what = format!("Kafka {}", l.security.name());
        out.push((bind(&what, l.addr).await?, l.security.clone()));
    }
    Ok(out)
}

async fn standalone(cfg: Standalone) -> Result<(), String> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("cannot use data dir {}: {e}", cfg.data_dir.display()))?;
    let probe = cfg.data_dir.join(".shoal-write-test");
    std::fs::write(&probe, b"ok")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| format!("data dir {} is not writable: {e}", cfg.data_dir.display()))?;

    // Bind first: a port in use should fail fast, before any state is opened.
    let kafka_listeners = bind_kafka(&cfg.kafka).await?;
    let http_listener = bind("HTTP", cfg.http_addr).await?;
    let mqtt_listeners = mqtt::bind(&cfg.mqtt).await?;

    let store = ObjectStorage::from_url(&cfg.object_store)
        .map_err(|e| format!("object store {}: {e}", cfg.object_store))?;
    let mut node_cfg =
        NodeConfig::standalone(1, cfg.data_dir.join("placement"), cfg.http_addr.to_string());
    node_cfg.peer_auth = cfg.auth.peers.clone();
    let identity = node_identity(&cfg.data_dir)?;
    if cfg.placement_in_bucket {
        let mut b = BucketConfig::new(store.clone(), identity.clone());
        b.lease_ttl = cfg.bucket_lease_ttl;
        b.contact = Some(contact_url(&cfg));
        node_cfg.bucket = Some(b);
    }
    let node = PlacementNode::start(node_cfg)
        .await
        .map_err(|e| format!("placement: {e}"))?;

    let mut bc = BrokerConfig::new(&cfg.data_dir);
    bc.broker_id = 1;
    bc.advertised_host = cfg.kafka.advertised_host.clone();
    bc.advertised_port = cfg.kafka.advertised_port;
    bc.advertised_listeners = cfg.kafka.advertised.clone();
    bc.authorizer = cfg.kafka.authorizer.clone();
    bc.flush_interval = cfg.flush_interval;
    bc.flush_bytes = cfg.flush_bytes;
    bc.max_unflushed_bytes = cfg.max_unflushed_bytes;
    bc.cache_memory = cfg.cache_memory;
    bc.cache_disk = cfg.cache_disk;
    bc.fetch_session_slots = cfg.fetch_session_slots;
    bc.read_ahead_bytes = cfg.read_ahead_bytes;
    bc.max_segment_loads = cfg.read_ahead_concurrency;
    bc.default_partitions = cfg.default_partitions;
    bc.default_durability = cfg.default_durability;
    bc.http_addr = cfg.http_addr.to_string();
    bc.wal_dir = cfg.wal_dir.clone();
    bc.producer_expiration = cfg.producer_id_expiration;
    bc.peer_auth = cfg.auth.peers.clone();
    let placement = PlacementClient::local(node.clone());
    if let Some(ms) = cfg.default_retention_ms {
        compaction::set_default_retention(&placement, ms).await;
    }
    let broker = Broker::start(bc, placement.clone(), store.clone())
        .await
        .map_err(|e| format!("broker: {e}"))?;

    let mqtt_serving = mqtt::start(
        &broker,
        &cfg.mqtt,
        mqtt_listeners,
        cfg.kafka.tls.clone(),
        cfg.kafka.limits,
    )
    .await?;
    let serving = serving::serve(
        broker,
        kafka_listeners,
        cfg.kafka.tls.clone(),
        http_listener,
        shoal_placement::router(node.clone()),
        mqtt_serving,
        cfg.auth.clone(),
    );
    tracing::info!(
        kafka = ?cfg.kafka.advertised,
        mqtt = ?cfg.mqtt.tcp,
        http = %cfg.http_addr,
        objects = %cfg.object_store,
        data_dir = %cfg.data_dir.display(),
        "shoal standalone is ready"
    );

    let (compaction_stop, compaction_rx) = tokio::sync::watch::channel(false);
    let compaction = cfg.compaction_enabled.then(|| {
        let compactor = shoal_compactor::Compactor::new(
            placement,
            store,
            // The node's own name: after a restart it takes its lease back
            // at once instead of waiting for the dead run's lease to lapse.
            cfg.compaction
                .compactor_config(format!("standalone-{identity}")),
        );
        tokio::spawn(shoal_compactor::run_every(
            compactor,
            cfg.compaction.interval,
            compaction_rx,
        ))
    });

    let fenced = tokio::select! {
        _ = wait_for_signal() => None,
        why = node.fenced() => Some(why),
    };
    tracing::info!("shutting down");
    let _ = compaction_stop.send(true);
    if let Some(task) = compaction {
        let _ = task.await;
    }
    serving.stop().await;
    node.shutdown()
        .await
        .map_err(|e| format!("placement shutdown: {e}"))?;
    match fenced {
        Some(why) => Err(format!(
            "stopped: placement was fenced in the bucket: {why}"
        )),
        None => Ok(()),
    }
}

/// A random name for this node, kept in the data dir: the same disk is the
/// same node (it may take its own bucket lease back after a crash); a new
/// disk is a new node (it waits for the old lease to run out).
/// Where other nodes reach this one's HTTP API: the HTTP address, with the
/// advertised Kafka host standing in for a wildcard bind address.
fn contact_url(cfg: &Standalone) -> String {
    let addr = cfg.http_addr;
    if addr.ip().is_unspecified() {
        cfg.auth
            .peers
            .url(&format!("{}:{}", cfg.kafka.advertised_host, addr.port()))
    } else {
        cfg.auth.peers.url(&addr.to_string())
    }
}

fn node_identity(data_dir: &std::path::Path) -> Result<String, String> {
    let path = data_dir.join("node-identity");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = format!("{:032x}", rand::random::<u128>());
            std::fs::write(&path, &id)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(id)
        }
    }
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
