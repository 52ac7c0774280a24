//! The broker: the shards it owns, their WAL, the cache, and stream
//! administration through placement.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::RwLock;
use shoal_placement::{BrokerId, BrokerInfo, Command, PlacementClient, Reply, SegmentRef, Stream};
use shoal_storage::ObjectStorage;
use shoal_wal_cache::{Cache, CacheOptions, Wal, WalOptions};
use tokio::sync::Notify;

use crate::batch::WalRecord;
use crate::config::{BrokerConfig, Durability};
use crate::error::{Error, Result};
use crate::group::Coordinator;
use crate::metrics::Metrics;
use crate::segment_load::{ColdReader, InFlight, range_key};
use crate::shard::{Replayed, ShardEnv, ShardInit, ShardLog};
use shoal_wal_cache::{Damage, WalHealth};

/// A stream as this broker sees it. Replaced whole when it changes.
#[derive(Debug)]
pub struct StreamHandle {
    pub name: String,
    pub id: u128,
    pub config: BTreeMap<String, String>,
    /// Without its own `retention.ms` the stream follows the cluster-wide
    /// default (see [`Broker::default_retention_ms`]); else it keeps all.
    pub retention_default: bool,
    pub partitions: Vec<Partition>,
}

/// One shard of a stream: who leads it, and its log if that is this broker.
#[derive(Debug, Clone)]
pub struct Partition {
    pub leader: Option<BrokerId>,
    /// The leader's lease epoch (Kafka's leader epoch).
    pub epoch: u64,
    pub log: Option<Arc<ShardLog>>,
}

impl StreamHandle {
    /// The shard's log, if this broker owns it.
    pub fn shard(&self, i: i32) -> Option<&Arc<ShardLog>> {
        self.partition(i).and_then(|p| p.log.as_ref())
    }

    pub fn partition(&self, i: i32) -> Option<&Partition> {
        usize::try_from(i).ok().and_then(|i| self.partitions.get(i))
    }

    pub fn partition_count(&self) -> i32 {
        i32::try_from(self.partitions.len()).unwrap_or(i32::MAX)
    }

    /// The logs of the shards this broker owns.
    pub fn owned(&self) -> impl Iterator<Item = &Arc<ShardLog>> {
        self.partitions.iter().filter_map(|p| p.log.as_ref())
    }

    /// The error for a partition this broker cannot serve: another leads
    /// it (clients refresh metadata), or it does not exist.
    pub fn not_here(&self, i: i32) -> Error {
        match self.partition(i) {
            Some(_) => Error::NotLeader {
                stream: self.name.clone(),
                shard: i,
            },
            None => Error::UnknownShard {
                stream: self.name.clone(),
                shard: i,
            },
        }
    }
}

pub struct Broker {
    pub config: BrokerConfig,
    pub placement: PlacementClient,
    pub store: ObjectStorage,
    pub wal: Wal,
    pub cache: Cache,
    pub metrics: Metrics,
    pub groups: Coordinator,
    streams: RwLock<HashMap<String, Arc<StreamHandle>>>,
    /// Serialises stream creation/deletion so concurrent auto-creates agree.
    admin: tokio::sync::Mutex<()>,
    /// Bytes accepted and not yet committed: the sum of every shard's own
    /// count (see [`ShardEnv`]).
    unflushed_bytes: Arc<AtomicU64>,
    pub(crate) flush_now: Notify,
    /// The last flush failure and when the failures began, while flushes
    /// fail; cleared by a successful flush.
    pub(crate) flush_failing: parking_lot::Mutex<Option<(Instant, String)>>,
    /// Segment ranges being loaded from the object store, by cache key.
    loads: InFlight,
    cold: Arc<ColdReader>,
    /// Bounds the read-ahead loads in flight.
    load_permits: Arc<tokio::sync::Semaphore>,
    /// Kafka incremental fetch sessions (KIP-227).
    pub(crate) fetch_sessions: crate::kafka::fetch_session::FetchSessions,
    /// Placement's users, followed (SASL and MQTT passwords check them).
    pub(crate) users: Arc<crate::security::Users>,
    pub(crate) sasl: shoal_security::sasl::SaslServer,
    /// Set in a cluster: the live brokers and this broker's lease.
    pub cluster: Option<crate::cluster::ClusterState>,
    pub(crate) encoder: crate::encoder::Encoder,
    /// Placement's cluster-wide default `retention.ms`, as last seen.
    default_retention_ms: std::sync::atomic::AtomicI64,
    /// Placement's compaction totals as last seen (exported as metrics).
    pub(crate) compaction_totals: parking_lot::Mutex<Option<shoal_placement::CompactionTotals>>,
    /// MQTT subscription routes, this broker's and its peers' (exchanged
    /// through placement with the heartbeat).
    pub mqtt_routes: Arc<crate::mqtt::routes::Routes>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Kafka's legal topic names.
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
}

impl Broker {
    /// Open the WAL and cache, take the leases of every shard, replay the
    /// WAL and start the flusher.
    pub async fn start(
        config: BrokerConfig,
        placement: PlacementClient,
        store: ObjectStorage,
    ) -> Result<Arc<Broker>> {
        let wal = Wal::open(WalOptions::new(config.wal_dir()))?;
        let mut cache_opts = CacheOptions::new(config.data_dir.join("cache"));
        let whole = |b: u64| usize::try_from(b).unwrap_or(usize::MAX);
        cache_opts.memory_bytes = whole(config.cache_memory.memory_bytes());
        cache_opts.disk_bytes = whole(config.cache_disk.disk_bytes(&cache_opts.dir));
        tracing::info!(
            memory_bytes = cache_opts.memory_bytes,
            disk_bytes = cache_opts.disk_bytes,
            memory = %config.cache_memory,
            disk = %config.cache_disk,
            "read cache sized"
        );
        let memory_bytes = cache_opts.memory_bytes as u64;
        let cache = Cache::open(cache_opts).await?;
        if !config.cluster {
            placement
                .write(Command::RegisterBroker {
                    info: config.broker_info(now_ms()),
                })
                .await?;
        }
        let cluster = config.cluster.then(crate::cluster::ClusterState::default);
        let load_permits = Arc::new(tokio::sync::Semaphore::new(config.max_segment_loads.max(1)));
        let fetch_sessions =
            crate::kafka::fetch_session::FetchSessions::new(config.fetch_session_slots);
        let users = Arc::new(crate::security::Users::default());
        let cold = ColdReader::new(store.clone(), cache.clone(), memory_bytes);
        let broker = Arc::new(Broker {
            encoder: crate::encoder::Encoder::start()?,
            default_retention_ms: std::sync::atomic::AtomicI64::new(
                shoal_placement::lifecycle::DEFAULT_RETENTION_MS,
            ),
            compaction_totals: parking_lot::Mutex::new(None),
            mqtt_routes: Default::default(),
            cluster,
            groups: Coordinator::new(),
            config,
            placement,
            store,
            wal,
            cache,
            metrics: Metrics::new(),
            streams: RwLock::new(HashMap::new()),
            admin: tokio::sync::Mutex::new(()),
            unflushed_bytes: Arc::new(AtomicU64::new(0)),
            flush_now: Notify::new(),
            flush_failing: parking_lot::Mutex::new(None),
            loads: Default::default(),
            cold,
            load_permits,
            fetch_sessions,
            sasl: crate::security::sasl_server(users.clone()),
            users,
        });
        if broker.cluster.is_some() {
            // The first heartbeat takes back, with new epochs, the shards
            // still assigned to this broker; placement may be electing.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                match crate::cluster::heartbeat(&broker, true).await {
                    Ok(()) => break,
                    // Another try carries the same credentials.
                    Err(e @ Error::Placement(shoal_placement::Error::Unauthorized { .. })) => {
                        return Err(e);
                    }
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::warn!("first heartbeat to placement: {e}; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        } else {
            for stream in broker.placement.list_streams().await? {
                broker.adopt(stream).await?;
            }
        }
        broker.replay().await?;
        crate::security::refresh(&broker).await;
        Ok(broker)
    }

    /// Settings and counters for a new shard log.
    pub(crate) fn shard_env(&self) -> ShardEnv {
        ShardEnv {
            tail_keep_bytes: self.config.tail_keep_bytes,
            producer_expiration_ms: i64::try_from(self.config.producer_expiration.as_millis())
                .unwrap_or(i64::MAX),
            unflushed_bytes: self.unflushed_bytes.clone(),
            cluster: self.cluster.is_some(),
        }
    }

    /// A log for a shard this broker now owns.
    pub(crate) fn new_log(&self, stream: &str, shard: i32, init: ShardInit) -> Arc<ShardLog> {
        Arc::new(ShardLog::new(stream, shard, init, self.shard_env()))
    }

    /// Put a stream view in place (the cluster's assignment changed).
    pub(crate) fn install(&self, handle: StreamHandle) {
        self.streams
            .write()
            .insert(handle.name.clone(), Arc::new(handle));
    }

    pub(crate) fn uninstall(&self, name: &str) {
        self.streams.write().remove(name);
    }

    /// May this broker write the shards it holds right now? In a cluster,
    /// only while its last heartbeat is recent enough.
    pub fn lease_valid(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.lease_valid())
    }

    /// Brokers to list in Metadata: the live ones in a cluster, else this one.
    pub fn live_brokers(&self) -> Vec<BrokerInfo> {
        match &self.cluster {
            Some(c) => c.live(),
            None => vec![self.config.broker_info(0)],
        }
    }

    /// The broker coordinating `group` (this one when standalone).
    pub fn coordinator(&self, group: &str) -> Option<BrokerInfo> {
        crate::cluster::coordinator_for(group, &self.live_brokers())
    }

    /// Does this broker coordinate `group`? In a cluster, only while its
    /// lease is valid: a broker out of touch (paused, cut off from
    /// placement) may have been replaced as coordinator already.
    pub fn is_coordinator(&self, group: &str) -> bool {
        self.cluster.is_none()
            || (self.lease_valid()
                && self
                    .coordinator(group)
                    .is_some_and(|b| b.id == self.config.broker_id))
    }

    /// Replay the WAL into the shards' tails. Records are never dropped
    /// silently: a shard whose replay shows missing records (a gap in its
    /// offsets, an unreadable entry of its own) is stopped, in placement
    /// too, and says why in `/health`, the metrics and the log. Damage that
    /// names no shard stops every shard this broker owns.
    async fn replay(&self) -> Result<()> {
        let entries = self.wal.replay()?;
        let mut stops: BTreeMap<(String, i32), String> = BTreeMap::new();
        // Entries of stopped shards not applied: kept out of the WAL's reach.
        let mut kept: BTreeMap<(String, i32), Vec<(u64, Bytes)>> = BTreeMap::new();
        // Entries judged superseded by a later owner: kept too if their
        // shard ends up stopped, as the judgement assumed an intact log.
        let mut superseded: BTreeMap<(String, i32), Vec<(u64, Bytes)>> = BTreeMap::new();
        let mut unattributed: Vec<String> = Vec::new();
        let mut replayed = 0u64;
        for entry in entries {
            let entry_bytes = entry.payload.clone();
            let rec = match WalRecord::decode(entry.payload) {
                Ok(r) => r,
                Err(e) => {
                    unattributed.push(format!("write-ahead log entry {}: {e}", entry.seq));
                    continue;
                }
            };
            let key = (rec.stream.clone(), rec.shard);
            let Some(shard) = self
                .stream(&rec.stream)
                .and_then(|s| s.shard(rec.shard).cloned())
            else {
                continue; // the stream was deleted, or the shard is elsewhere
            };
            if stops.contains_key(&key) {
                kept.entry(key).or_default().push((entry.seq, entry_bytes));
                continue;
            }
            match shard.replay(rec.batch, entry.seq, rec.epoch) {
                Replayed::Applied => replayed += 1,
                Replayed::Replaced { superseded } => {
                    replayed += 1;
                    self.metrics.wal_superseded.inc_by(superseded as u64);
                    tracing::info!(
                        stream = %rec.stream,
                        shard = rec.shard,
                        epoch = rec.epoch,
                        superseded,
                        "replaced write-ahead log entries of an older, overtaken lease"
                    );
                }
                Replayed::Committed => {}
                Replayed::Superseded => {
                    superseded
                        .entry(key)
                        .or_default()
                        .push((entry.seq, entry_bytes));
                    self.metrics.wal_superseded.inc();
                    tracing::info!(
                        stream = %rec.stream,
                        shard = rec.shard,
                        epoch = rec.epoch,
                        "dropping a write-ahead log entry another owner superseded"
                    );
                }
                Replayed::Gap {
                    expected,
                    got,
                    epoch,
                } => {
                    kept.entry(key.clone())
                        .or_default()
                        .push((entry.seq, entry_bytes));
                    stops.insert(
                        key,
                        format!(
                            "write-ahead log entry {} (lease epoch {epoch}) starts at offset \
                             {got}, but the records from offset {expected} on are missing",
                            entry.seq
                        ),
                    );
                }
            }
        }
        for damage in self.wal.damage() {
            match damage {
                Damage::Entry { seq, payload } => match WalRecord::decode_header(payload) {
                    Some((h, _)) => {
                        let Some(shard) = self
                            .stream(&h.stream)
                            .and_then(|s| s.shard(h.shard).cloned())
                        else {
                            continue;
                        };
                        if h.last_offset < shard.committed_offset() {
                            continue; // in a committed object already
                        }
                        let key = (h.stream.clone(), h.shard);
                        kept.entry(key.clone())
                            .or_default()
                            .push((*seq, payload.clone()));
                        stops.entry(key).or_insert_with(|| {
                            format!(
                                "write-ahead log entry {seq} holding offsets {}-{} \
                                     (lease epoch {}) is unreadable",
                                h.base_offset, h.last_offset, h.epoch
                            )
                        });
                    }
                    None => unattributed.push(format!(
                        "write-ahead log entry {seq} is unreadable and names no shard"
                    )),
                },
                Damage::Unreadable { after, before } => unattributed.push(match before {
                    Some(b) => format!(
                        "write-ahead log entries after {after} and before {b} are unreadable"
                    ),
                    None => format!("write-ahead log entries after {after} are unreadable"),
                }),
            }
        }
        if !unattributed.is_empty() {
            let reason = unattributed.join("; ");
            for stream in self.streams() {
                for log in stream.owned() {
                    stops
                        .entry((log.stream.clone(), log.shard))
                        .or_insert_with(|| reason.clone());
                }
            }
        }
        for (key, entries) in superseded {
            if stops.contains_key(&key) {
                kept.entry(key).or_default().extend(entries);
            }
        }
        let dir = self.config.data_dir.join("quarantine");
        for ((stream, shard), mut entries) in kept {
            entries.sort_by_key(|e| e.0);
            match crate::quarantine::keep(&dir, &stream, shard, &entries) {
                Ok(path) => tracing::warn!(
                    %stream,
                    shard,
                    entries = entries.len(),
                    file = %path.display(),
                    "kept the stopped shard's write-ahead log entries"
                ),
                // The WAL still holds them; a restart tries again.
                Err(e) => {
                    return Err(Error::Internal(format!(
                        "keeping the write-ahead log entries of stopped shard {stream}/{shard} \
                     in {}: {e}",
                        dir.display()
                    )));
                }
            }
        }
        for ((stream, shard), reason) in stops {
            tracing::error!(%stream, shard, "stopping the shard: acknowledged records are lost: {reason}");
            self.stop_replayed_shard(&stream, shard, &reason).await?;
        }
        if replayed > 0 {
            tracing::info!(
                batches = replayed,
                "replayed un-flushed batches from the WAL"
            );
            self.flush_now.notify_one();
        }
        Ok(())
    }

    /// [`Broker::stop_shard`] at start-up, where placement may be briefly
    /// unreachable (electing): retry for a minute before giving up, since
    /// a broker that starts without recording the stop would let the next
    /// owner serve the shard as if nothing were missing.
    async fn stop_replayed_shard(&self, stream: &str, shard: i32, reason: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match self.stop_shard(stream, shard, reason).await {
                Ok(()) => return Ok(()),
                Err(Error::Rejected(r)) => {
                    // Not this broker's shard any more (its lease moved on
                    // while it replayed): its new owner decides.
                    tracing::warn!(%stream, shard, "placement refused to stop the shard: {r}");
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(%stream, shard, "stopping the shard in placement: {e}; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stop a shard's writes, here and in placement (so it stays stopped
    /// across restarts and moves) until an operator resumes it.
    pub async fn stop_shard(&self, stream: &str, shard: i32, reason: &str) -> Result<()> {
        let log = self.stream(stream).and_then(|s| s.shard(shard).cloned());
        if let Some(log) = &log {
            log.stop(reason);
        }
        match self
            .placement
            .write(Command::StopShard {
                stream: stream.to_string(),
                shard,
                reason: reason.to_string(),
                now_ms: now_ms(),
            })
            .await?
        {
            Reply::Rejected { rejection } => Err(Error::Rejected(rejection)),
            _ => Ok(()),
        }
    }

    /// An operator accepts the loss of a stopped shard: it takes writes
    /// again (new records continue from what it holds).
    pub async fn resume_shard(&self, stream: &str, shard: i32) -> Result<()> {
        if let Reply::Rejected { rejection } = self
            .placement
            .write(Command::ResumeShard {
                stream: stream.to_string(),
                shard,
            })
            .await?
        {
            return Err(Error::Rejected(rejection));
        }
        if let Some(log) = self.stream(stream).and_then(|s| s.shard(shard).cloned()) {
            log.resume();
        }
        Ok(())
    }

    /// Shards this broker owns that are stopped, with the reason.
    pub fn stopped_shards(&self) -> Vec<(String, i32, String)> {
        let mut out = Vec::new();
        for stream in self.streams() {
            for log in stream.owned() {
                if let Some(reason) = log.stopped() {
                    out.push((log.stream.clone(), log.shard, reason));
                }
            }
        }
        out
    }

    /// After a stream changed in placement: standalone, take the leases of
    /// its new shards; in a cluster, wait for the controller to place them.
    async fn follow(self: &Arc<Self>, stream: Stream) -> Result<Arc<StreamHandle>> {
        if self.cluster.is_none() {
            return self.adopt(stream).await;
        }
        crate::cluster::wait_for_leaders(self, &stream.name, std::time::Duration::from_secs(10))
            .await;
        self.stream(&stream.name)
            .ok_or_else(|| Error::UnknownStream(stream.name.clone()))
    }

    /// Take the leases of a stream's shards and start serving them.
    async fn adopt(&self, stream: Stream) -> Result<Arc<StreamHandle>> {
        let existing = self.stream(&stream.name);
        let mut shards = Vec::with_capacity(stream.shards.len());
        for s in &stream.shards {
            if let Some(sh) = existing.as_ref().and_then(|e| e.shard(s.shard)) {
                shards.push(Partition {
                    leader: Some(self.config.broker_id),
                    epoch: sh.epoch(),
                    log: Some(sh.clone()),
                });
                continue;
            }
            let epoch = match self
                .placement
                .write(Command::AcquireLease {
                    stream: stream.name.clone(),
                    shard: s.shard,
                    broker: self.config.broker_id,
                })
                .await?
            {
                Reply::Lease { epoch } => epoch,
                Reply::Rejected { rejection } => return Err(Error::Rejected(rejection)),
                other => return Err(Error::Internal(format!("unexpected reply {other:?}"))),
            };
            shards.push(Partition {
                leader: Some(self.config.broker_id),
                epoch,
                log: Some(self.new_log(&stream.name, s.shard, ShardInit::committed(s, epoch))),
            });
        }
        let handle = Arc::new(StreamHandle {
            name: stream.name.clone(),
            id: stream.id,
            config: stream.config,
            retention_default: stream.retention_default,
            partitions: shards,
        });
        self.streams.write().insert(stream.name, handle.clone());
        Ok(handle)
    }

    /// The cluster-wide default `retention.ms` as last read from placement.
    pub fn default_retention_ms(&self) -> i64 {
        self.default_retention_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn set_default_retention_ms(&self, ms: i64) {
        self.default_retention_ms.store(ms, Ordering::Relaxed);
    }

    pub fn stream(&self, name: &str) -> Option<Arc<StreamHandle>> {
        self.streams.read().get(name).cloned()
    }

    pub fn streams(&self) -> Vec<Arc<StreamHandle>> {
        let mut v: Vec<_> = self.streams.read().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn durability(&self, stream: &StreamHandle) -> Durability {
        stream
            .config
            .get(Durability::CONFIG_KEY)
            .and_then(|v| Durability::parse(v))
            .unwrap_or(self.config.default_durability)
    }

    /// Create a stream (or find it if it already exists when `or_existing`).
    pub async fn create_stream(
        self: &Arc<Self>,
        name: &str,
        partitions: i32,
        mut config: BTreeMap<String, String>,
        validate_only: bool,
    ) -> Result<Arc<StreamHandle>> {
        if !valid_topic_name(name) {
            return Err(Error::InvalidTopic(name.to_string()));
        }
        for (k, v) in &config {
            crate::topic_config::check(k, v, self.config.max_request_bytes)?;
        }
        config
            .entry(Durability::CONFIG_KEY.to_string())
            .or_insert_with(|| self.config.default_durability.as_str().to_string());
        let _guard = self.admin.lock().await;
        if self.stream(name).is_some() {
            return Err(Error::StreamExists(name.to_string()));
        }
        if !(1..=shoal_placement::state::MAX_PARTITIONS).contains(&partitions) {
            return Err(Error::InvalidPartitions(format!(
                "partition count {partitions} out of range"
            )));
        }
        if validate_only {
            return Err(Error::Internal("validate_only".into()));
        }
        let reply = self
            .placement
            .write(Command::CreateStream {
                name: name.to_string(),
                partitions,
                config,
                id: rand::random::<u128>(),
                now_ms: now_ms(),
                retention_default: true,
            })
            .await?;
        match reply {
            Reply::Stream { stream } => self.follow(stream).await,
            Reply::Rejected { rejection } => Err(Error::Rejected(rejection)),
            other => Err(Error::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// The stream, auto-creating it with the default partitions if allowed.
    pub async fn stream_or_create(
        self: &Arc<Self>,
        name: &str,
        allow_create: bool,
    ) -> Result<Arc<StreamHandle>> {
        if let Some(s) = self.stream(name) {
            return Ok(s);
        }
        // Another broker may have created it since our last heartbeat.
        if self.cluster.is_some() {
            crate::cluster::refresh(self).await?;
            if let Some(s) = self.stream(name) {
                return Ok(s);
            }
        }
        if !(allow_create && self.config.auto_create_topics) {
            return Err(Error::UnknownStream(name.to_string()));
        }
        match self
            .create_stream(name, self.config.default_partitions, BTreeMap::new(), false)
            .await
        {
            Err(Error::StreamExists(_))
            | Err(Error::Rejected(shoal_placement::Rejection::StreamExists { .. })) => {
                if self.cluster.is_some() {
                    crate::cluster::wait_for_leaders(
                        self,
                        name,
                        std::time::Duration::from_secs(10),
                    )
                    .await;
                }
                self.stream(name)
                    .ok_or_else(|| Error::UnknownStream(name.to_string()))
            }
            other => other,
        }
    }

    pub async fn delete_stream(self: &Arc<Self>, name: &str) -> Result<()> {
        let _guard = self.admin.lock().await;
        if let Reply::Rejected { rejection } = self
            .placement
            .write(Command::DeleteStream {
                name: name.to_string(),
            })
            .await?
        {
            return Err(Error::Rejected(rejection));
        }
        if let Some(gone) = self.streams.write().remove(name) {
            for log in gone.owned() {
                let _ = log.fence();
            }
        }
        Ok(())
    }

    pub async fn create_partitions(self: &Arc<Self>, name: &str, count: i32) -> Result<()> {
        let _guard = self.admin.lock().await;
        match self
            .placement
            .write(Command::CreatePartitions {
                name: name.to_string(),
                count,
            })
            .await?
        {
            Reply::Stream { stream } => {
                self.follow(stream).await?;
                Ok(())
            }
            Reply::Rejected { rejection } => Err(Error::Rejected(rejection)),
            other => Err(Error::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    pub async fn alter_config(
        self: &Arc<Self>,
        name: &str,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<()> {
        for (k, v) in &set {
            crate::topic_config::check(k, v, self.config.max_request_bytes)?;
        }
        for k in &remove {
            crate::topic_config::check_removal(k)?;
        }
        let _guard = self.admin.lock().await;
        match self
            .placement
            .write(Command::AlterStreamConfig {
                name: name.to_string(),
                set,
                remove,
            })
            .await?
        {
            Reply::Stream { stream } => {
                self.follow(stream).await?;
                Ok(())
            }
            Reply::Rejected { rejection } => Err(Error::Rejected(rejection)),
            other => Err(Error::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    pub fn unflushed_bytes(&self) -> u64 {
        self.unflushed_bytes.load(Ordering::Relaxed)
    }

    /// Wake the flusher once `flush_bytes` are waiting (the shard counted
    /// the bytes already).
    pub(crate) fn note_appended(&self) {
        if self.unflushed_bytes() >= self.config.flush_bytes {
            self.flush_now.notify_one();
        }
    }

    /// Start loading `seg` in the background unless it is cached or on its
    /// way: a fetch does this for every partition it will read, so their
    /// cold reads overlap instead of queueing one behind another.
    pub(crate) fn start_load(self: &Arc<Self>, seg: &SegmentRef) {
        let key = range_key(seg);
        if self.cache.contains(&key) || self.loads.contains(&key) {
            return;
        }
        // Within the same bound as read-ahead; past it the fetch loads the
        // range itself when it gets there.
        let Ok(permit) = self.load_permits.clone().try_acquire_owned() else {
            return;
        };
        let broker = self.clone();
        let seg = seg.clone();
        tokio::spawn(async move {
            if let Err(e) = broker.read_segment(&seg).await {
                tracing::debug!(object = %seg.object, "segment load failed: {e}");
            }
            drop(permit);
        });
    }

    /// Warm the cache with the segment ranges after `seg`, up to the
    /// read-ahead window (`read_ahead_bytes`), so a sequential catch-up
    /// read finds its next batches fetched. Loads run in the background,
    /// at most `max_segment_loads` at once across the broker.
    pub fn read_ahead(self: &Arc<Self>, shard: &ShardLog, seg: &SegmentRef) {
        let mut ahead = 0u64;
        let mut next = seg.last_offset + 1;
        while ahead < self.config.read_ahead_bytes {
            let crate::shard::Read::Segment(s) = shard.read(next, 1) else {
                return;
            };
            next = s.last_offset + 1;
            // Ranges committed before their size was recorded count as a
            // re-encoded chunk.
            ahead += if s.bytes > 0 {
                s.bytes
            } else {
                crate::segment_load::COLD_BATCH_BYTES as u64
            };
            let key = range_key(&s);
            if self.cache.contains(&key) || self.loads.contains(&key) {
                continue;
            }
            let Ok(permit) = self.load_permits.clone().try_acquire_owned() else {
                // Loads are at their limit: this one waits for a later fetch.
                return;
            };
            let broker = self.clone();
            tracing::debug!(object = %s.object, row_group = s.row_group, "reading ahead");
            tokio::spawn(async move {
                if let Err(e) = broker.read_segment(&s).await {
                    tracing::debug!(object = %s.object, "read-ahead failed: {e}");
                }
                drop(permit);
            });
        }
    }

    /// Move a shard's log start to `offset` (DeleteRecords). Placement only
    /// moves it within what is committed, so records not yet flushed are
    /// flushed first (waiting up to `timeout`). Returns the new log start.
    pub async fn delete_records(
        &self,
        shard: &ShardLog,
        offset: i64,
        timeout: std::time::Duration,
    ) -> Result<i64> {
        let mut committed = shard.watch_committed();
        let waited = tokio::time::timeout(timeout, async {
            while *committed.borrow_and_update() < offset {
                self.flush_now.notify_one();
                if committed.changed().await.is_err() {
                    return false;
                }
            }
            true
        })
        .await;
        if !matches!(waited, Ok(true)) {
            return Err(Error::Timeout);
        }
        let cmd = Command::AdvanceLogStart {
            stream: shard.stream.clone(),
            shard: shard.shard,
            offset,
            now_ms: now_ms(),
            compaction_epoch: None,
        };
        match self.placement.write(cmd).await? {
            Reply::LogStart { offset } => {
                shard.advance_log_start(offset);
                Ok(offset)
            }
            Reply::Rejected { rejection } => Err(Error::Rejected(rejection)),
            other => Err(Error::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Keep a just-committed range in the cache in its original Kafka
    /// encoding, under the key a read of that segment looks up: recent data
    /// is served without decoding Parquet. With a local object store the
    /// copy lives in memory only (the object is as cheap to read again as
    /// a spilled copy); with a remote one it may spill to the disk tier.
    pub(crate) fn keep_flushed(&self, seg: &SegmentRef, batches: &[crate::shard::TailBatch]) {
        let (Some(first), Some(last)) = (batches.first(), batches.last()) else {
            return;
        };
        // Only a range the batches cover exactly stands for the segment.
        if first.base_offset != seg.first_offset || last.last_offset != seg.last_offset {
            return;
        }
        let mut bytes = bytes::BytesMut::with_capacity(batches.iter().map(|b| b.bytes.len()).sum());
        for b in batches {
            bytes.extend_from_slice(&b.bytes);
        }
        let key = range_key(seg);
        if self.store.is_local() {
            self.cache.insert_in_memory(&key, bytes.freeze());
        } else {
            self.cache.insert(&key, bytes.freeze());
        }
    }

    /// Records of a committed segment range as consecutive Kafka batches,
    /// through the cache. Concurrent reads of one range share one load.
    pub async fn read_segment(&self, seg: &SegmentRef) -> Result<Bytes> {
        let key = range_key(seg);
        if let Some(b) = self.cache.get(&key).await {
            return Ok(b);
        }
        let cold = self.cold.clone();
        let range = seg.clone();
        let loaded = self
            .loads
            .run(
                &key,
                || {
                    self.metrics.cold_reads.inc();
                },
                move || cold.load(range),
            )
            .await;
        loaded.map_err(|reason| Error::ColdRead {
            object: seg.object.clone(),
            reason,
        })
    }
}

/// Follow the WAL's health: after a failed write (a full disk, say), take
/// the failed batches out of every shard's tail, then let the WAL write
/// again. Producers got a retriable error for those batches; their retries
/// are appended afresh.
pub async fn watch_wal(broker: Arc<Broker>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut health = broker.wal.watch_health();
    loop {
        let failure = match &*health.borrow_and_update() {
            WalHealth::Failed(f) if !f.resumed => Some(f.clone()),
            _ => None,
        };
        if let Some(f) = failure {
            tracing::warn!(error = %f.error, first_failed_seq = f.first_failed_seq, "wal write failed: rolling back the failed batches");
            for stream in broker.streams() {
                for log in stream.owned() {
                    log.roll_back_from(f.first_failed_seq);
                }
            }
            broker.metrics.wal_failures.inc();
            broker.wal.resume(f.generation);
        }
        tokio::select! {
            changed = health.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}
