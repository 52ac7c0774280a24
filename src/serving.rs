//! The tasks of a running broker, shared by `shoal standalone` and
//! `shoal broker`: the HTTP API, the flusher, the WAL watcher, the group
//! ticker, the segment-index follower, the Kafka and MQTT listeners and,
//! in a cluster, the heartbeat loop; and
//! their orderly stop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use shoal_broker::Broker;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Serving {
    broker: Arc<Broker>,
    shutdown: watch::Sender<bool>,
    ready: Arc<AtomicBool>,
    /// Stopped in this order: Kafka and MQTT first (no new requests), then the
    /// flusher (commits what was accepted), then HTTP.
    tasks: Vec<JoinHandle<()>>,
}

/// Start serving `broker`; `extra` routes join its HTTP API (the placement
/// API of a standalone node). `/health` answers 200 once this returns.
pub fn serve(
    broker: Arc<Broker>,
    kafka_listener: TcpListener,
    http_listener: TcpListener,
    extra: Router,
    mqtt: Option<crate::mqtt::MqttServing>,
) -> Serving {
    let (shutdown, rx) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(false));
    let app = shoal_broker::http::router(
        broker.clone(),
        ready.clone(),
        mqtt.as_ref().map(|m| m.mqtt.clone()),
    )
    .merge(extra);
    let mut http_shutdown = rx.clone();
    let http = tokio::spawn(async move {
        let served = axum::serve(http_listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.changed().await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!("HTTP server: {e}");
        }
    });
    if broker.cluster.is_some() {
        tokio::spawn(shoal_broker::cluster::run(broker.clone(), rx.clone()));
    }
    let flusher = tokio::spawn(shoal_broker::flusher::run(broker.clone(), rx.clone()));
    tokio::spawn(shoal_broker::broker::watch_wal(broker.clone(), rx.clone()));
    tokio::spawn(shoal_broker::run_group_ticker(broker.clone(), rx.clone()));
    tokio::spawn(shoal_broker::index::follow(broker.clone(), rx.clone()));
    let kafka = tokio::spawn({
        let (broker, rx) = (broker.clone(), rx.clone());
        async move {
            shoal_broker::kafka::serve(kafka_listener, broker, rx).await;
        }
    });
    let mut tasks = vec![kafka];
    if let Some(m) = mqtt {
        tokio::spawn(m.mqtt.clone().run(rx.clone()));
        if let Some(l) = m.tcp {
            tasks.push(tokio::spawn(shoal_broker::mqtt::listener::serve(
                l,
                m.mqtt.clone(),
                rx.clone(),
            )));
        }
        if let Some(l) = m.ws {
            tasks.push(tokio::spawn(shoal_broker::mqtt::listener::serve_ws(
                l,
                m.mqtt.clone(),
                rx.clone(),
            )));
        }
    }
    tasks.extend([flusher, http]);
    ready.store(true, Ordering::Release);
    Serving {
        broker,
        shutdown,
        ready,
        tasks,
    }
}

impl Serving {
    pub async fn stop(self) {
        self.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.broker.cache.close().await;
    }
}
