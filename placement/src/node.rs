//! One placement node: the fjall database, the Raft instance over it, and
//! the write / read entry points the HTTP server and the local client use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fjall::{Database, PersistMode};
use openraft::error::{ForwardToLeader, InitializeError, RaftError};
use openraft::{BasicNode, RaftMetrics, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use shoal_security::ClientAuth;
use tokio::sync::watch;

use tokio::sync::mpsc;

use crate::bucket::Bucket;
use crate::command::{Command, Query, QueryReply, Reply};
use crate::error::{Error, Result};
use crate::mirror;
use crate::raft::log_store::LogStore;
use crate::raft::network::Network;
use crate::raft::state_machine::{self, AppliedTap, SharedState, StateMachineStore};
use crate::raft::{NodeId, Raft, blocking};

/// Entries applied between two snapshots, by default.
pub const DEFAULT_SNAPSHOT_LOGS: u64 = 1000;

/// How long `start` waits for a standalone node to elect itself.
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// How long `start` retries opening a database a previous instance in this
/// process is still closing.
const OPEN_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: u64,
    pub data_dir: PathBuf,
    /// host:port where this node's HTTP API (router) is reachable by peers
    pub advertise_addr: String,
    /// all voters incl. self: id -> host:port. A single entry = standalone.
    pub peers: BTreeMap<u64, String>,
    /// Build a snapshot every this many applied entries and purge the log
    /// behind it (keeping as many again for lagging followers).
    pub snapshot_logs: u64,
    /// Keep a copy of the state in object storage (standalone on a bucket).
    pub bucket: Option<BucketConfig>,
    /// A broker that has not heartbeated for this long loses its shards.
    pub session_timeout: Duration,
    /// What this node presents to its peers (and to a bucket holder it
    /// checks on): the cluster secret when one is configured.
    pub peer_auth: ClientAuth,
}

/// Where and how a standalone node mirrors its state into the bucket.
#[derive(Debug, Clone)]
pub struct BucketConfig {
    pub store: shoal_storage::ObjectStorage,
    /// Names this node in the lease; keep it across restarts (with the data
    /// dir) so a crashed node takes its own lease back without waiting.
    pub holder: String,
    /// How long the bucket lease lasts without renewal (renewed every third
    /// while the node writes; an idle node lets it lapse).
    pub lease_ttl: Duration,
    /// Base URL of this node's HTTP API (serving [`crate::router`]), named
    /// in the lease so another node sees that an idle holder is alive.
    pub contact: Option<String>,
    /// Write a full snapshot every this many commands.
    pub snapshot_every: u64,
}

impl BucketConfig {
    pub fn new(store: shoal_storage::ObjectStorage, holder: impl Into<String>) -> Self {
        BucketConfig {
            store,
            holder: holder.into(),
            lease_ttl: Duration::from_secs(10),
            contact: None,
            snapshot_every: 1000,
        }
    }
}

impl NodeConfig {
    /// A one-node placement center.
    pub fn standalone(
        node_id: u64,
        data_dir: impl Into<PathBuf>,
        advertise_addr: impl Into<String>,
    ) -> Self {
        let advertise_addr = advertise_addr.into();
        Self {
            node_id,
            data_dir: data_dir.into(),
            peers: BTreeMap::from([(node_id, advertise_addr.clone())]),
            advertise_addr,
            snapshot_logs: DEFAULT_SNAPSHOT_LOGS,
            bucket: None,
            session_timeout: crate::controller::DEFAULT_SESSION_TIMEOUT,
            peer_auth: ClientAuth::none(),
        }
    }

    /// A member of a cluster whose voters (including this node) are `peers`.
    pub fn cluster(
        node_id: u64,
        data_dir: impl Into<PathBuf>,
        advertise_addr: impl Into<String>,
        peers: BTreeMap<u64, String>,
    ) -> Self {
        Self {
            node_id,
            data_dir: data_dir.into(),
            advertise_addr: advertise_addr.into(),
            peers,
            snapshot_logs: DEFAULT_SNAPSHOT_LOGS,
            bucket: None,
            session_timeout: crate::controller::DEFAULT_SESSION_TIMEOUT,
            peer_auth: ClientAuth::none(),
        }
    }

    /// The voters, with this node in them; an empty map means standalone.
    fn voters(&self) -> Result<BTreeMap<u64, String>> {
        if self.peers.is_empty() {
            return Ok(BTreeMap::from([(
                self.node_id,
                self.advertise_addr.clone(),
            )]));
        }
        if !self.peers.contains_key(&self.node_id) {
            return Err(Error::Config(format!(
                "node {} is not among the peers {:?}",
                self.node_id, self.peers
            )));
        }
        Ok(self.peers.clone())
    }

    fn raft_config(&self, standalone: bool) -> Result<openraft::Config> {
        // Alone, nothing crosses the network: react fast. In a cluster the
        // heartbeat is also the append-entries timeout, so leave room for a
        // busy machine before a follower gives up on its leader.
        let (heartbeat, election_min, election_max) = if standalone {
            (100, 300, 600)
        } else {
            (250, 1000, 2000)
        };
        let snapshot_logs = self.snapshot_logs.max(1);
        openraft::Config {
            cluster_name: "shoal-placement".into(),
            heartbeat_interval: heartbeat,
            election_timeout_min: election_min,
            election_timeout_max: election_max,
            install_snapshot_timeout: 30_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_logs),
            max_in_snapshot_log_to_keep: snapshot_logs,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| Error::Config(e.to_string()))
    }
}

/// GET /placement/v1/cluster: everything an operator asks first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterView {
    pub status: NodeStatus,
    pub brokers: Vec<BrokerView>,
    pub streams: Vec<crate::controller::StreamAssignment>,
    /// Raft writes made through this node, and their summed latency.
    pub raft_writes: u64,
    pub raft_write_seconds: f64,
    /// Shard moves made by this node's controller, and how many of them
    /// took a shard from a broker that was no longer alive.
    pub lease_changes: u64,
    pub failovers: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerView {
    pub info: crate::model::BrokerInfo,
    /// Alive in the leader's view; `None` when this node is not the leader.
    pub live: Option<bool>,
}

/// What a node knows about itself and the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: u64,
    pub leader_id: Option<u64>,
    pub term: u64,
    /// Index of the last entry applied to the state machine.
    pub last_applied: Option<u64>,
    pub is_leader: bool,
    /// Voters and learners: id -> host:port.
    pub membership: BTreeMap<u64, String>,
    /// Last index covered by the latest snapshot.
    pub last_snapshot: Option<u64>,
    /// Last index removed from the log (the log holds what follows).
    pub last_purged: Option<u64>,
}

pub struct PlacementNode {
    id: NodeId,
    raft: Raft,
    state: SharedState,
    version: watch::Receiver<u64>,
    metrics: watch::Receiver<RaftMetrics<NodeId, BasicNode>>,
    db: Database,
    mirror: Option<Mirror>,
    liveness: crate::controller::Liveness,
    /// Raft writes applied through this node and their total latency.
    raft_writes: std::sync::atomic::AtomicU64,
    raft_write_nanos: std::sync::atomic::AtomicU64,
}

/// The bucket copy: every applied command is written there, in version
/// order (the state machine hands them over as it applies them), before a
/// write is answered.
struct Mirror {
    bucket: Arc<Bucket>,
    mirrored: watch::Receiver<u64>,
    fenced: watch::Receiver<Option<String>>,
    tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for PlacementNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlacementNode")
            .field("id", &self.id)
            .finish()
    }
}

impl PlacementNode {
    /// Open fjall in data_dir, load the last snapshot + log, start Raft. If
    /// the cluster has never been initialised and this node has the lowest id
    /// among peers, initialise it with all peers as voters. A standalone node
    /// returns once it is leader.
    pub async fn start(cfg: NodeConfig) -> Result<Arc<PlacementNode>> {
        let voters = cfg.voters()?;
        let standalone = voters.len() == 1;
        // Fence first: a second node on the same bucket must not even start.
        let bucket = match &cfg.bucket {
            Some(b) if standalone => Some(Arc::new(
                Bucket::acquire(
                    b.store.clone(),
                    b.lease_ttl,
                    &b.holder,
                    b.contact.as_deref(),
                    &cfg.peer_auth,
                )
                .await?,
            )),
            Some(_) => {
                return Err(Error::Config(
                    "the bucket copy of placement is for a standalone node".into(),
                ));
            }
            None => None,
        };
        let config = Arc::new(cfg.raft_config(standalone)?);

        tokio::fs::create_dir_all(&cfg.data_dir)
            .await
            .map_err(|e| Error::Storage(format!("creating {}: {e}", cfg.data_dir.display())))?;
        let db = open_db(&cfg.data_dir).await?;
        let log_store = LogStore::open(&db)?;
        let sm = StateMachineStore::open(&db)?;
        let state = sm.shared();
        let tap = sm.tap();
        let version = sm.subscribe_version();
        let network = Network::new(&cfg.peer_auth).map_err(|e| Error::Http(e.to_string()))?;

        // Raft::new re-applies the committed entries after the snapshot.
        let raft = Raft::new(cfg.node_id, config, network, log_store, sm)
            .await
            .map_err(|e| Error::Raft(format!("starting raft: {e}")))?;
        let mut node = PlacementNode {
            id: cfg.node_id,
            metrics: raft.metrics(),
            raft,
            state,
            version,
            db,
            mirror: None,
            liveness: crate::controller::Liveness::new(cfg.session_timeout),
            raft_writes: Default::default(),
            raft_write_nanos: Default::default(),
        };
        let started = async {
            node.join(&voters, standalone).await?;
            if let (Some(bucket), Some(bc)) = (bucket, &cfg.bucket) {
                node.mirror = Some(node.recover_from_bucket(bucket, bc, &tap).await?);
            }
            Ok(())
        }
        .await;
        if let Err(e) = started {
            // Do not leave Raft running (and holding the database) behind.
            let _ = node.raft.shutdown().await;
            return Err(e);
        }
        Ok(Arc::new(node))
    }

    /// Bring the local state up to the bucket's (a new machine, or a stale
    /// disk), write a snapshot of the result, and start mirroring.
    async fn recover_from_bucket(
        &self,
        bucket: Arc<Bucket>,
        bc: &BucketConfig,
        tap: &AppliedTap,
    ) -> Result<Mirror> {
        let local = state_machine::read(&self.state).state.version;
        if let Some(remote) = bucket.load().await?
            && remote.version > local
        {
            tracing::info!(
                local,
                bucket = remote.version,
                "restoring placement state from the bucket"
            );
            self.write_raft(Command::Restore {
                state: Box::new(remote),
            })
            .await?;
        }
        // Tap first, then take the snapshot: a command applied in between
        // is both in the snapshot and in the channel (the writer skips it).
        let (tx, rx) = mpsc::unbounded_channel();
        *tap.lock() = Some(tx);
        let state = state_machine::read(&self.state).state.clone();
        if let Err(e) = bucket.write_snapshot(&state).await {
            *tap.lock() = None;
            return Err(e);
        }
        let (mirrored_tx, mirrored) = watch::channel(state.version);
        let (fenced_tx, fenced) = watch::channel(None);
        let fenced_tx = Arc::new(fenced_tx);
        let tasks = vec![
            tokio::spawn(mirror::mirror_loop(
                bucket.clone(),
                rx,
                mirrored_tx,
                fenced_tx.clone(),
                self.state.clone(),
                state.version,
                bc.snapshot_every.max(1),
            )),
            tokio::spawn(mirror::renew_loop(bucket.clone(), fenced_tx)),
        ];
        Ok(Mirror {
            bucket,
            mirrored,
            fenced,
            tasks: parking_lot::Mutex::new(tasks),
        })
    }

    /// The name this node holds the bucket lease under, if it keeps its
    /// state in a bucket.
    pub fn bucket_holder(&self) -> Option<&str> {
        self.mirror.as_ref().map(|m| m.bucket.holder())
    }

    /// Resolves with the reason once this node lost the bucket to another.
    pub async fn fenced(&self) -> String {
        match &self.mirror {
            Some(m) => {
                let mut f = m.fenced.clone();
                match f.wait_for(|f| f.is_some()).await {
                    Ok(v) => v.clone().unwrap_or_default(),
                    Err(_) => std::future::pending().await,
                }
            }
            None => std::future::pending().await,
        }
    }

    async fn join(&self, voters: &BTreeMap<u64, String>, standalone: bool) -> Result<()> {
        let raft_err = |e: &dyn std::fmt::Display| Error::Raft(e.to_string());
        let initialized = self.raft.is_initialized().await.map_err(|e| raft_err(&e))?;
        if !initialized && voters.keys().next() == Some(&self.id) {
            let members: BTreeMap<u64, BasicNode> = voters
                .iter()
                .map(|(id, addr)| (*id, BasicNode::new(addr)))
                .collect();
            match self.raft.initialize(members).await {
                // NotAllowed: another start (or a peer) got there first.
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(Error::Raft(format!("initialising the cluster: {e}"))),
            }
        } else if initialized && standalone {
            // Nobody else can be leader: skip the election timeout.
            self.raft
                .trigger()
                .elect()
                .await
                .map_err(|e| raft_err(&e))?;
        }
        if standalone {
            self.raft
                .wait(Some(LEADER_WAIT))
                .metrics(|m| m.current_leader.is_some(), "standalone leader")
                .await
                .map_err(|e| Error::Raft(format!("no leader elected: {e}")))?;
        }
        Ok(())
    }

    /// Linearizable write through the leader. On a follower: [`Error::NotLeader`].
    /// With a bucket copy, answered once the command is in the bucket too.
    pub async fn write(&self, cmd: Command) -> Result<Reply> {
        let Some(m) = &self.mirror else {
            return self.write_raft(cmd).await;
        };
        if let Some(why) = m.fenced.borrow().clone() {
            return Err(Error::Fenced(why));
        }
        // No lock is held across an await here: a caller that stops
        // polling its write (a select! arm busy elsewhere) cannot hold up
        // anyone else's. Applied is mirrored, whoever waits.
        let reply = self.write_raft(cmd).await?;
        // At least this command's version (later ones only wait longer).
        let version = state_machine::read(&self.state).state.version;
        let mut mirrored = m.mirrored.clone();
        let mut fenced = m.fenced.clone();
        tokio::select! {
            r = mirrored.wait_for(|v| *v >= version) => {
                r.map_err(|_| Error::Bucket("the bucket writer stopped".into()))?;
                Ok(reply)
            }
            f = fenced.wait_for(|f| f.is_some()) => {
                let why = f.ok().and_then(|f| f.clone()).unwrap_or_default();
                Err(Error::Fenced(why))
            }
        }
    }

    async fn write_raft(&self, cmd: Command) -> Result<Reply> {
        let started = Instant::now();
        match self.raft.client_write(cmd).await {
            Ok(resp) => {
                use std::sync::atomic::Ordering::Relaxed;
                self.raft_writes.fetch_add(1, Relaxed);
                let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.raft_write_nanos.fetch_add(nanos, Relaxed);
                Ok(resp.data)
            }
            Err(e) => Err(match e.forward_to_leader() {
                Some(f) => self.not_leader(f),
                None => Error::Raft(e.to_string()),
            }),
        }
    }

    /// Read from the state machine on the leader, after confirming the
    /// leadership with a quorum and applying everything committed before.
    pub async fn query(&self, q: Query) -> Result<QueryReply> {
        if let Err(e) = self.raft.ensure_linearizable().await {
            return Err(match e.forward_to_leader() {
                Some(f) => self.not_leader(f),
                None => Error::Raft(e.to_string()),
            });
        }
        Ok(state_machine::read(&self.state).state.query(&q))
    }

    /// Answers from this node's state machine without asking the leader:
    /// possibly stale (a follower may lag), but never blocks.
    /// A broker's heartbeat, answered by the leader only: records it as
    /// alive (registering it when new or moved) and returns the assignment.
    pub async fn heartbeat(
        &self,
        hb: crate::controller::Heartbeat,
    ) -> Result<crate::controller::HeartbeatReply> {
        if let Err(e) = self.raft.ensure_linearizable().await {
            return Err(match e.forward_to_leader() {
                Some(f) => self.not_leader(f),
                None => Error::Raft(e.to_string()),
            });
        }
        let known = state_machine::read(&self.state)
            .state
            .brokers
            .get(&hb.info.id)
            .map(|b| (b.kafka_addr.clone(), b.http_addr.clone()));
        if known != Some((hb.info.kafka_addr.clone(), hb.info.http_addr.clone())) {
            self.write(Command::RegisterBroker {
                info: hb.info.clone(),
            })
            .await?;
        }
        // The controller notes the term on its next tick; a heartbeat can
        // come first, and its reply must already count the others as live.
        let status = self.status();
        if status.is_leader {
            self.liveness.leading(status.term);
        }
        self.liveness.saw(hb.info.id);
        self.liveness
            .mqtt_filters(hb.info.id, hb.mqtt_filters.clone());
        let st = state_machine::read(&self.state);
        let (live, streams) = crate::controller::assignment(&st.state, &self.liveness);
        // Routes only for brokers that serve MQTT (and report theirs).
        let mqtt_routes = if hb.mqtt_filters.is_some() {
            self.liveness.mqtt_routes(&live)
        } else {
            Vec::new()
        };
        Ok(crate::controller::HeartbeatReply {
            session_timeout_ms: self.liveness.session_timeout.as_millis() as u64,
            live,
            streams,
            version: st.state.version,
            mqtt_routes,
        })
    }

    pub(crate) fn liveness(&self) -> &crate::controller::Liveness {
        &self.liveness
    }

    /// Add a voter: it joins as a learner, catches up, then votes. Run on
    /// the leader; start the new node first (with the full --peers list).
    pub async fn add_node(&self, id: NodeId, addr: String) -> Result<NodeStatus> {
        let raft_err = |e: RaftError<NodeId, _>| match e.forward_to_leader() {
            Some(f) => self.not_leader(f),
            None => Error::Raft(e.to_string()),
        };
        self.raft
            .add_learner(id, BasicNode::new(addr), true)
            .await
            .map_err(raft_err)?;
        let mut voters: std::collections::BTreeSet<NodeId> = self
            .metrics
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        voters.insert(id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(raft_err)?;
        Ok(self.status())
    }

    /// Remove a voter (it may then be stopped). Run on the leader.
    pub async fn remove_node(&self, id: NodeId) -> Result<NodeStatus> {
        let voters: std::collections::BTreeSet<NodeId> = self
            .metrics
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .filter(|v| *v != id)
            .collect();
        if voters.is_empty() {
            return Err(Error::Config("cannot remove the last voter".into()));
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| match e.forward_to_leader() {
                Some(f) => self.not_leader(f),
                None => Error::Raft(e.to_string()),
            })?;
        Ok(self.status())
    }

    /// Look at the applied state without copying it (keep `f` short: it
    /// holds the state machine's read lock).
    pub fn with_state<R>(&self, f: impl FnOnce(&crate::state::State) -> R) -> R {
        f(&state_machine::read(&self.state).state)
    }

    /// The cluster as this node sees it: Raft status, brokers with their
    /// liveness (as far as this node, if leader, knows) and shard owners.
    pub fn cluster_view(&self) -> ClusterView {
        use std::sync::atomic::Ordering::Relaxed;
        let st = state_machine::read(&self.state);
        let status = self.status();
        let brokers = st
            .state
            .brokers
            .values()
            .map(|b| BrokerView {
                info: b.clone(),
                live: status.is_leader.then(|| self.liveness.is_live(b.id)),
            })
            .collect();
        let (_, streams) = crate::controller::assignment(&st.state, &self.liveness);
        ClusterView {
            status,
            brokers,
            streams,
            raft_writes: self.raft_writes.load(Relaxed),
            raft_write_seconds: self.raft_write_nanos.load(Relaxed) as f64 / 1e9,
            lease_changes: self.liveness.lease_changes.load(Relaxed),
            failovers: self.liveness.failovers.load(Relaxed),
        }
    }

    pub fn query_local(&self, q: &Query) -> QueryReply {
        state_machine::read(&self.state).state.query(q)
    }

    /// Changes whenever `State::version` changes (applied commands).
    pub fn watch_version(&self) -> watch::Receiver<u64> {
        self.version.clone()
    }

    pub fn status(&self) -> NodeStatus {
        let m = self.metrics.borrow();
        NodeStatus {
            node_id: self.id,
            leader_id: m.current_leader,
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index),
            is_leader: m.state == ServerState::Leader,
            membership: m
                .membership_config
                .nodes()
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect(),
            last_snapshot: m.snapshot.map(|l| l.index),
            last_purged: m.purged.map(|l| l.index),
        }
    }

    /// Stops Raft and flushes the database. The node answers no more requests.
    pub async fn shutdown(&self) -> Result<()> {
        if let Some(m) = &self.mirror {
            for t in m.tasks.lock().drain(..) {
                t.abort();
            }
            if m.fenced.borrow().is_none() {
                m.bucket.release().await;
            }
        }
        self.raft
            .shutdown()
            .await
            .map_err(|e| Error::Raft(format!("shutting down: {e}")))?;
        let db = self.db.clone();
        blocking(move || db.persist(PersistMode::SyncAll)).await?;
        Ok(())
    }

    pub(crate) fn raft(&self) -> &Raft {
        &self.raft
    }

    fn not_leader(&self, f: &ForwardToLeader<NodeId, BasicNode>) -> Error {
        let leader = f.leader_id.and_then(|id| {
            let addr = match &f.leader_node {
                Some(node) => Some(node.addr.clone()),
                None => self
                    .metrics
                    .borrow()
                    .membership_config
                    .membership()
                    .get_node(&id)
                    .map(|n| n.addr.clone()),
            };
            addr.map(|addr| (id, addr))
        });
        Error::NotLeader { leader }
    }
}

/// Opens the database, waiting for a previous instance in this process
/// (whose background threads hold the lock briefly after drop) to let go.
async fn open_db(dir: &Path) -> Result<Database> {
    let deadline = Instant::now() + OPEN_RETRY;
    loop {
        let path = dir.to_path_buf();
        match blocking(move || Database::builder(path).open()).await {
            Err(fjall::Error::Locked) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(Error::Storage(format!("opening {}: {e}", dir.display())));
            }
            Ok(db) => return Ok(db),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::raft::state_machine::StoredSnapshot;

    fn create(name: &str) -> Command {
        Command::create_for_test(name, 1)
    }

    /// Entries applied but never snapshotted come back at start-up from the
    /// log alone: `Raft::new` re-applies up to the saved committed index,
    /// before any election could commit (and so apply) them again.
    #[tokio::test]
    async fn raft_new_reapplies_committed_entries() {
        let dir = tempfile::tempdir().unwrap();
        let node = PlacementNode::start(NodeConfig::standalone(1, dir.path(), "127.0.0.1:1"))
            .await
            .unwrap();
        node.write(create("a")).await.unwrap();
        node.write(create("b")).await.unwrap();
        node.shutdown().await.unwrap();
        drop(node);

        let db = open_db(dir.path()).await.unwrap();
        let log_store = LogStore::open(&db).unwrap();
        let sm = StateMachineStore::open(&db).unwrap();
        let shared = sm.shared();
        let loaded: StoredSnapshot = state_machine::read(&shared).clone();
        assert!(loaded.state.streams.is_empty(), "no snapshot was taken");

        let config = openraft::Config {
            enable_tick: false,
            enable_heartbeat: false,
            enable_elect: false,
            ..openraft::Config::default()
        };
        let raft = Raft::new(
            1,
            Arc::new(config.validate().unwrap()),
            Network::new(&shoal_security::ClientAuth::none()).unwrap(),
            log_store,
            sm,
        )
        .await
        .unwrap();
        {
            let sm = state_machine::read(&shared);
            assert!(sm.state.streams.contains_key("a"));
            assert!(sm.state.streams.contains_key("b"));
        }
        assert_eq!(raft.metrics().borrow().current_leader, None);
        raft.shutdown().await.unwrap();
    }
}
