//! MQTT 3.1.1 and 5.0 on the same log as Kafka.
//!
//! Layers, outermost first: [`listener`] (sockets: accept, read, write,
//! timers), [`frame`] (whole packets out of a byte stream, size limit
//! before allocation), the `mqtt5-protocol` codec (decode/encode of every
//! packet and property), [`conn`] (one connection's protocol state machine:
//! packets in, actions out, no I/O), [`hub`] (sessions, the subscription
//! [`trie`], shared subscriptions, retained messages, routing) and
//! [`persist`] (persistence rules: MQTT publishes into streams through the
//! log's append path, Kafka records out to MQTT subscribers).
//!
//! Not here: the log itself (shards, WAL, flushing), and where the rules
//! are kept (placement).
//!
//! Main types: [`Mqtt`] (the service a broker runs), [`Settings`],
//! [`Access`].

pub mod access;
pub(crate) mod conn;
mod forward;
pub(crate) mod frame;
mod handover;
pub mod http;
pub(crate) mod hub;
pub mod listener;
mod message;
mod persist;
mod remote_append;
pub mod routes;
mod store;
mod topic;
mod trie;

use std::sync::Arc;
use std::time::Duration;

pub use access::{Access, AccessError, hash_password};
pub use hub::{ClientView, Counts, DropPolicy, Limits, SubscriptionView};

use crate::Broker;

/// MQTT listener settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest packet accepted, and advertised as Maximum Packet Size.
    pub max_packet_size: usize,
    /// Incoming QoS 1/2 publishes unacknowledged at once per client
    /// (advertised as Receive Maximum).
    pub receive_maximum: u16,
    /// Topic aliases a client may set up (advertised).
    pub topic_alias_maximum: u16,
    /// Outgoing QoS 1/2 messages in flight per MQTT 3.1.1 client (v5
    /// clients say their own Receive Maximum).
    pub inflight_v3: usize,
    /// Keep Alive imposed on v5 clients asking for none or more (0: none).
    pub max_keep_alive: u16,
    /// How long a new connection has to send CONNECT.
    pub connect_timeout: Duration,
    /// How long a QoS 1/2 publish to a persisted topic may wait for the
    /// stream's durability point before it is refused.
    pub persist_timeout: Duration,
    pub limits: Limits,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_packet_size: 1 << 20,
            receive_maximum: 1024,
            topic_alias_maximum: 64,
            inflight_v3: 64,
            max_keep_alive: 0,
            connect_timeout: Duration::from_secs(10),
            persist_timeout: Duration::from_secs(30),
            limits: Limits::default(),
        }
    }
}

/// The MQTT service of one broker.
pub struct Mqtt {
    pub(crate) hub: Arc<hub::Hub>,
    pub(crate) settings: Arc<Settings>,
    pub(crate) access: Arc<Access>,
    pub(crate) broker: Arc<Broker>,
    /// For asking the other brokers (sessions, retained messages).
    pub(crate) peers: reqwest::Client,
    /// Which clients have records in the state shards this broker owns.
    pub(crate) state_index: Arc<store::StateIndex>,
    /// Persisted publishes for shards other brokers own, and the queue
    /// [`Mqtt::run`] drains.
    pub(crate) remote: Arc<remote_append::RemoteAppender>,
    remote_queue:
        parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<remote_append::RemoteRecord>>>,
    /// Listener kind ("tcp", "websocket") -> address, for /health.
    listeners: parking_lot::Mutex<std::collections::BTreeMap<&'static str, String>>,
}

impl Mqtt {
    pub fn new(broker: Arc<Broker>, settings: Settings, access: Access) -> Arc<Self> {
        let (remote, remote_queue) = remote_append::RemoteAppender::new();
        Arc::new(Mqtt {
            state_index: Arc::default(),
            remote: Arc::new(remote),
            remote_queue: parking_lot::Mutex::new(Some(remote_queue)),
            hub: Arc::new(hub::Hub::with_routes(
                settings.limits.clone(),
                broker.mqtt_routes.clone(),
            )),
            settings: Arc::new(settings),
            access: Arc::new(access.with_users(broker.users.clone())),
            peers: broker
                .config
                .peer_auth
                .http_client()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            broker,
            listeners: Default::default(),
        })
    }

    /// Record a listener's address (shown by /health).
    pub fn add_listener(&self, kind: &'static str, addr: String) {
        self.listeners.lock().insert(kind, addr);
    }

    pub fn listeners(&self) -> std::collections::BTreeMap<&'static str, String> {
        self.listeners.lock().clone()
    }

    pub fn counts(&self) -> Counts {
        self.hub.counts()
    }

    pub fn clients(&self) -> Vec<ClientView> {
        self.hub.clients()
    }

    pub fn subscriptions(&self) -> Vec<SubscriptionView> {
        self.hub.subscriptions()
    }

    /// The service's metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let c = self.hub.counts();
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, v: usize| {
            out.push_str(&format!(
                "# HELP shoal_mqtt_{name} {help}\n# TYPE shoal_mqtt_{name} gauge\nshoal_mqtt_{name} {v}\n"
            ));
        };
        gauge("connections", "Connected MQTT clients", c.connections);
        gauge("sessions", "MQTT sessions (connected or kept)", c.sessions);
        gauge("subscriptions", "MQTT subscriptions", c.subscriptions);
        gauge("retained_messages", "Retained MQTT messages", c.retained);
        gauge(
            "queued_messages",
            "Messages queued in MQTT sessions",
            c.queued,
        );
        let (received, sent) = self.hub.message_counts();
        for (name, help, counts) in [
            (
                "messages_received",
                "MQTT PUBLISHes received, by QoS",
                received,
            ),
            ("messages_sent", "MQTT PUBLISHes sent, by QoS", sent),
        ] {
            out.push_str(&format!(
                "# HELP shoal_mqtt_{name}_total {help}\n# TYPE shoal_mqtt_{name}_total counter\n"
            ));
            for (q, n) in counts.iter().enumerate() {
                out.push_str(&format!("shoal_mqtt_{name}_total{{qos=\"{q}\"}} {n}\n"));
            }
        }
        out.push_str(
            "# HELP shoal_mqtt_messages_dropped_total MQTT messages not delivered, by reason\n\
             # TYPE shoal_mqtt_messages_dropped_total counter\n",
        );
        let dropped = self.hub.dropped();
        for why in [
            hub::Dropped::QueueFull,
            hub::Dropped::Expired,
            hub::Dropped::PacketTooLarge,
            hub::Dropped::ForwardFailed,
        ] {
            let n = dropped
                .iter()
                .find(|(d, _)| *d == why)
                .map_or(0, |(_, n)| *n);
            out.push_str(&format!(
                "shoal_mqtt_messages_dropped_total{{reason=\"{}\"}} {n}\n",
                why.label()
            ));
        }
        out
    }

    /// Timers (session expiry, delayed wills), the persistence rules from
    /// placement, and delivery of Kafka records to MQTT subscribers.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let (forwarder, queue) = forward::Forwarder::new();
        self.hub.set_forwarder(forwarder);
        tokio::spawn(forward::run(
            queue,
            self.broker.mqtt_routes.clone(),
            self.hub.clone(),
            self.broker.config.peer_auth.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(store::run(
            self.broker.clone(),
            self.hub.clone(),
            self.remote.clone(),
            self.state_index.clone(),
            shutdown.clone(),
        ));
        let me = Arc::downgrade(&self);
        self.hub.set_will_sink(Box::new(move |stream, msg| {
            let Some(mqtt) = me.upgrade() else {
                return;
            };
            // Nothing acknowledges a will: the append is not waited for.
            if let Err(e) = persist::append(&mqtt.broker, &mqtt.remote, stream, msg) {
                tracing::warn!(stream, topic = %msg.topic, "a will was not persisted: {e}");
            }
        }));
        tokio::spawn(handover::sync_retained(self.clone(), shutdown.clone()));
        if let Some(queue) = self.remote_queue.lock().take() {
            tokio::spawn(remote_append::run(
                queue,
                self.peers.clone(),
                self.broker.config.peer_auth.scheme(),
                self.settings.persist_timeout,
                shutdown.clone(),
            ));
        }
        tokio::spawn(persist::bridge(
            self.broker.clone(),
            self.hub.clone(),
            shutdown.clone(),
        ));
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_rules = Vec::new();
        let mut ticks: u64 = 0;
        let mut live: Vec<u64> = self.broker.live_brokers().iter().map(|b| b.id).collect();
        let mut state_shards = self.state_shards();
        // Brokers may have gone while this one started.
        if self.broker.config.cluster {
            tokio::spawn(self.clone().take_over_sessions());
        }
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            self.hub.tick(crate::broker::now_ms());
            // A broker gone, or a state shard taken on (from a broker gone):
            // the sessions whose broker is gone, from the state shards this
            // broker owns, are held here from now on.
            let now_live: Vec<u64> = self.broker.live_brokers().iter().map(|b| b.id).collect();
            let now_shards = self.state_shards();
            if live.iter().any(|b| !now_live.contains(b))
                || now_shards.iter().any(|s| !state_shards.contains(s))
            {
                tokio::spawn(self.clone().take_over_sessions());
            }
            live = now_live;
            state_shards = now_shards;
            // Rules change rarely; once a second is soon enough.
            if ticks.is_multiple_of(4) {
                match self.broker.placement.mqtt_persist_rules().await {
                    Ok(rules) if rules != last_rules => {
                        self.hub.set_rules(
                            rules
                                .iter()
                                .map(|r| (r.filter.clone(), Arc::from(r.stream.as_str())))
                                .collect(),
                        );
                        last_rules = rules;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!("reading the MQTT persistence rules: {e}"),
                }
            }
            ticks += 1;
        }
    }

    /// The state stream's shards this broker owns, with their epochs (a
    /// shard lost and owned again between two looks counts as new).
    fn state_shards(&self) -> Vec<(i32, u64)> {
        store::owned_shards(&self.broker)
    }

    /// Hold the sessions whose broker is gone and whose records are in the
    /// state shards this broker owns.
    async fn take_over_sessions(self: Arc<Self>) {
        match store::load_left_behind(&self.broker, &self.state_index).await {
            Ok(sessions) if sessions.is_empty() => {}
            Ok(sessions) => {
                let n = self.hub.take_over(sessions, crate::broker::now_ms());
                tracing::info!(sessions = n, "MQTT sessions of a broker gone taken over");
            }
            Err(e) => tracing::warn!("reading the MQTT sessions of a broker gone: {e}"),
        }
    }

    /// Read persistent sessions and retained messages back from the log,
    /// and keep them there from now on. Before any client connects.
    pub async fn open_state(&self) -> crate::Result<()> {
        let loaded = store::load(&self.broker, &self.state_index).await?;
        tracing::info!(
            sessions = loaded.sessions.len(),
            retained = loaded.retained.len(),
            "MQTT state loaded"
        );
        self.hub.restore(loaded, crate::broker::now_ms());
        self.hub.enable_store();
        Ok(())
    }

    /// Load the rules now (at start, so the first publishes are mapped).
    pub async fn load_rules(&self) -> crate::Result<()> {
        let rules = self
            .broker
            .placement
            .mqtt_persist_rules()
            .await
            .map_err(crate::Error::Placement)?;
        self.hub.set_rules(
            rules
                .iter()
                .map(|r| (r.filter.clone(), Arc::from(r.stream.as_str())))
                .collect(),
        );
        Ok(())
    }
}

/// Is `filter` usable as a persistence rule's filter?
pub fn valid_rule_filter(filter: &str) -> bool {
    topic::valid_filter(filter) && hub::shared(filter).is_none()
}
