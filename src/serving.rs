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
/// API of a standalone node); `auth` guards all of it but `/health` and
/// `/metrics`. `/health` answers 200 once this returns.
pub fn serve(
    broker: Arc<Broker>,
    kafka_listeners: Vec<(TcpListener, Arc<shoal_broker::kafka::KafkaListener>)>,
    tls: Option<Arc<shoal_security::tls::TlsServer>>,
    http_listener: TcpListener,
    extra: Router,
    mqtt: Option<crate::mqtt::MqttServing>,
    auth: crate::auth::Auth,
) -> Serving {
    let (shutdown, rx) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(false));
    let app = shoal_broker::http::router(
        broker.clone(),
        ready.clone(),
        mqtt.as_ref().map(|m| m.mqtt.clone()),
    )
    .merge(extra);
    let app = auth.server.protect(app);
    let http = tokio::spawn(serve_http(http_listener, auth.http_tls, app, rx.clone()));
    if broker.cluster.is_some() {
        tokio::spawn(shoal_broker::cluster::run(broker.clone(), rx.clone()));
    }
    let flusher = tokio::spawn(shoal_broker::flusher::run(broker.clone(), rx.clone()));
    tokio::spawn(shoal_broker::broker::watch_wal(broker.clone(), rx.clone()));
    tokio::spawn(shoal_broker::run_group_ticker(broker.clone(), rx.clone()));
    tokio::spawn(shoal_broker::index::follow(broker.clone(), rx.clone()));
    tokio::spawn(shoal_broker::security::follow(broker.clone(), rx.clone()));
    if let Some(tls) = tls {
        tokio::spawn(tls.watch(rx.clone()));
    }
    let mut tasks: Vec<JoinHandle<()>> = kafka_listeners
        .into_iter()
        .map(|(listener, security)| {
            tokio::spawn(shoal_broker::kafka::serve(
                listener,
                security,
                broker.clone(),
                rx.clone(),
            ))
        })
        .collect();
    if let Some(m) = mqtt {
        tokio::spawn(m.mqtt.clone().run(rx.clone()));
        use shoal_broker::mqtt::listener as mqtt_listener;
        let l = m.listeners;
        if let Some(l) = l.tcp {
            tasks.push(tokio::spawn(mqtt_listener::serve(
                l,
                m.limits.listener(),
                m.mqtt.clone(),
                rx.clone(),
            )));
        }
        if let Some(l) = l.ws {
            let l = shoal_security::limits::LimitedListener::new(l, m.limits.listener());
            tasks.push(tokio::spawn(mqtt_listener::serve_ws(
                l,
                m.mqtt.clone(),
                rx.clone(),
            )));
        }
        if let (Some(l), Some(tls)) = (l.tls, m.tls.clone()) {
            tasks.push(tokio::spawn(mqtt_listener::serve_tls(
                l,
                tls,
                m.limits.listener(),
                m.mqtt.clone(),
                rx.clone(),
            )));
        }
        if let (Some(l), Some(tls)) = (l.wss, m.tls) {
            let limits = Some(m.limits.listener());
            match shoal_security::tls::TlsListener::with_limits(l, tls, limits) {
                Ok(l) => tasks.push(tokio::spawn(mqtt_listener::serve_ws(
                    l,
                    m.mqtt.clone(),
                    rx.clone(),
                ))),
                Err(e) => tracing::error!("MQTT WebSocket TLS listener: {e}"),
            }
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

/// The HTTP API until `shutdown`, over TLS when `tls` is given.
pub(crate) async fn serve_http(
    listener: TcpListener,
    tls: Option<Arc<shoal_security::tls::TlsServer>>,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    let served = match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        }
        Some(tls) => match shoal_security::tls::TlsListener::new(listener, tls) {
            Ok(l) => axum::serve(l, app).with_graceful_shutdown(stop).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = served {
        tracing::error!("HTTP server: {e}");
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
