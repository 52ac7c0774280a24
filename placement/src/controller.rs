//! Broker liveness and shard assignment, run by the Raft leader.
//!
//! Brokers heartbeat to the leader (an RPC, not a Raft write: liveness is
//! the leader's view and costs no log entry). The controller task on the
//! leader gives every shard without a live owner to the least-loaded live
//! broker with a new epoch ([`Command::AssignShard`]), and spreads shards
//! when a broker joins by asking an owner to hand a shard over
//! ([`Command::RequestHandoff`]): the owner commits what it holds, stops
//! accepting writes for it, commits the rest and then completes the handoff
//! itself ([`Command::CompleteHandoff`]), so a rebalance loses nothing even
//! for `local` durability. An owner that does not finish a handoff in time
//! (it cannot commit, say during an object-store outage) keeps the shard:
//! moving it would drop the records it acknowledged and has not committed.
//! The handoff is withdrawn ([`Command::CancelHandoff`]), after which its
//! completion is refused, and that owner is not asked for another one
//! before [`HANDOFF_RETRY`] has passed.
//!
//! A leader that was just elected has not heard from anyone yet: brokers it
//! has not seen count as alive for one session timeout from its election.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::command::{Command, Reply};
use crate::model::{BrokerId, BrokerInfo};
use crate::node::PlacementNode;
use crate::state::State;

/// How long a broker stays alive without a heartbeat (Kafka's
/// `broker.session.timeout.ms` is 9 s; 6 s keeps failover short).
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// How long an owner has to hand a shard over before the handoff is
/// withdrawn.
pub const HANDOFF_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an owner whose handoff was withdrawn is not asked for another.
pub const HANDOFF_RETRY: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(300);

/// A broker's heartbeat: who it is and where clients reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub info: BrokerInfo,
    /// The MQTT topic filters this broker has subscribers for (shared ones
    /// as `$share/{group}/{filter}`); `None` when it serves no MQTT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_filters: Option<Vec<String>>,
}

/// One live broker's MQTT subscription routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqttRoute {
    pub broker: BrokerId,
    pub http_addr: String,
    pub filters: Vec<String>,
}

/// What a broker needs to serve: the live brokers and every shard's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The broker's lease on its shards lasts this long from the moment it
    /// sent this heartbeat.
    pub session_timeout_ms: u64,
    pub live: Vec<BrokerInfo>,
    pub streams: Vec<StreamAssignment>,
    /// State version the assignment was read at.
    pub version: u64,
    /// The MQTT routes of the live brokers that serve MQTT (soft state the
    /// leader keeps from heartbeats; a broker that stops heartbeating drops
    /// out with its liveness).
    #[serde(default)]
    pub mqtt_routes: Vec<MqttRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamAssignment {
    pub name: String,
    #[serde(with = "crate::model::id_u128")]
    pub id: u128,
    pub config: BTreeMap<String, String>,
    pub shards: Vec<ShardAssignment>,
    /// See [`crate::model::Stream::retention_default`].
    #[serde(default)]
    pub retention_default: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardAssignment {
    pub shard: i32,
    pub owner: Option<BrokerId>,
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_to: Option<BrokerId>,
    /// Names the pending handoff; the owner completes it with this id.
    #[serde(default)]
    pub handoff_id: u64,
    /// Why the shard is stopped, if it is (see
    /// [`crate::model::Shard::stopped`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// The leader's view of which brokers are alive.
pub struct Liveness {
    pub session_timeout: Duration,
    seen: parking_lot::Mutex<HashMap<BrokerId, Instant>>,
    /// Each broker's MQTT filters, from its last heartbeat.
    mqtt_routes: parking_lot::Mutex<HashMap<BrokerId, Vec<String>>>,
    /// (term, when this node became leader in it)
    leading: parking_lot::Mutex<Option<(u64, Instant)>>,
    pub lease_changes: AtomicU64,
    pub failovers: AtomicU64,
}

impl Liveness {
    pub fn new(session_timeout: Duration) -> Self {
        Liveness {
            session_timeout,
            seen: parking_lot::Mutex::new(HashMap::new()),
            mqtt_routes: parking_lot::Mutex::new(HashMap::new()),
            leading: parking_lot::Mutex::new(None),
            lease_changes: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
        }
    }

    pub fn saw(&self, id: BrokerId) {
        self.seen.lock().insert(id, Instant::now());
    }

    /// Note a broker's MQTT filters (`None`: it serves no MQTT).
    pub fn mqtt_filters(&self, id: BrokerId, filters: Option<Vec<String>>) {
        let mut r = self.mqtt_routes.lock();
        match filters {
            Some(f) => {
                r.insert(id, f);
            }
            None => {
                r.remove(&id);
            }
        }
    }

    /// The MQTT routes of `live` brokers.
    pub fn mqtt_routes(&self, live: &[BrokerInfo]) -> Vec<MqttRoute> {
        let r = self.mqtt_routes.lock();
        live.iter()
            .filter_map(|b| {
                r.get(&b.id).map(|f| MqttRoute {
                    broker: b.id,
                    http_addr: b.http_addr.clone(),
                    filters: f.clone(),
                })
            })
            .collect()
    }

    /// Note the term this node leads in; a new term restarts the grace.
    pub fn leading(&self, term: u64) {
        let mut l = self.leading.lock();
        if l.map(|(t, _)| t) != Some(term) {
            *l = Some((term, Instant::now()));
        }
    }

    pub fn not_leading(&self) {
        *self.leading.lock() = None;
    }

    /// Alive if heard from within the session timeout, counting a new
    /// term's start as news from everyone: a new leader has not heard from
    /// anyone yet, and a heartbeat it took in an earlier term of its own
    /// says nothing about now. Without that, the first replies of a new
    /// term would list only the brokers heard so far, and a Kafka client
    /// that reads such a list drops its connections to the others, failing
    /// their in-flight requests even if they were written.
    pub fn is_live(&self, id: BrokerId) -> bool {
        let seen = self.seen.lock().get(&id).copied();
        let term_start = self.leading.lock().map(|(_, since)| since);
        seen.max(term_start)
            .is_some_and(|t| t.elapsed() < self.session_timeout)
    }

    /// Has every registered broker had a chance to heartbeat since this node
    /// became leader? Before that, shards are not moved for lack of news.
    fn settled(&self) -> bool {
        self.leading
            .lock()
            .is_some_and(|(_, since)| since.elapsed() >= self.session_timeout)
    }
}

/// The live brokers (sorted by id) and every shard's assignment.
pub fn assignment(state: &State, live: &Liveness) -> (Vec<BrokerInfo>, Vec<StreamAssignment>) {
    let brokers = state
        .brokers
        .values()
        .filter(|b| live.is_live(b.id))
        .cloned()
        .collect();
    let streams = state
        .streams
        .values()
        .map(|s| StreamAssignment {
            name: s.name.clone(),
            id: s.id,
            config: s.config.clone(),
            retention_default: s.retention_default,
            shards: s
                .shards
                .iter()
                .map(|sh| ShardAssignment {
                    shard: sh.shard,
                    owner: sh.owner,
                    epoch: sh.epoch,
                    handoff_to: sh.handoff_to,
                    handoff_id: sh.handoff_id,
                    stopped: sh.stopped.as_ref().map(|s| s.reason.clone()),
                })
                .collect(),
        })
        .collect();
    (brokers, streams)
}

/// One decision of the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Move {
    Assign(Command),
    Handoff(Command),
    /// Withdraw a handoff of this owner's.
    Withdraw(Command, BrokerId),
}

/// What the controller remembers of handoffs over time.
#[derive(Debug, Default)]
pub struct HandoffTimes {
    /// Pending handoffs that ran out of time, by (stream, shard).
    pub expired: Vec<(String, i32)>,
    /// Owners whose handoff was withdrawn lately: not asked again yet.
    pub withdrawn: Vec<BrokerId>,
}

/// What the controller would do now: a pure function of the state, the
/// live set and the handoffs' times, so it is unit-tested.
///
/// Until `settled` (a new leader has not yet heard from every broker) only
/// shards without any owner are placed.
pub fn plan(state: &State, live: &[BrokerId], handoffs: &HandoffTimes, settled: bool) -> Vec<Move> {
    if live.is_empty() {
        return Vec::new();
    }
    let mut load: BTreeMap<BrokerId, usize> = live.iter().map(|b| (*b, 0)).collect();
    for s in state.streams.values() {
        for sh in &s.shards {
            if let Some(o) = sh.owner
                && let Some(n) = load.get_mut(&o)
            {
                *n += 1;
            }
        }
    }
    let least = |load: &BTreeMap<BrokerId, usize>| {
        load.iter()
            .min_by_key(|(id, n)| (**n, **id))
            .map(|(id, _)| *id)
    };
    let mut moves = Vec::new();
    for s in state.streams.values() {
        for sh in &s.shards {
            let orphan = match sh.owner {
                None => true,
                Some(o) => settled && !load.contains_key(&o),
            };
            if !orphan {
                let expired = handoffs
                    .expired
                    .iter()
                    .any(|(n, i)| *n == s.name && *i == sh.shard);
                if let (true, Some(_), Some(owner)) = (expired, sh.handoff_to, sh.owner) {
                    moves.push(Move::Withdraw(
                        Command::CancelHandoff {
                            stream: s.name.clone(),
                            shard: sh.shard,
                            expected_epoch: sh.epoch,
                        },
                        owner,
                    ));
                }
                continue;
            }
            let Some(to) = least(&load) else {
                continue;
            };
            if let Some(o) = sh.owner
                && let Some(n) = load.get_mut(&o)
            {
                *n -= 1;
            }
            *load.entry(to).or_default() += 1;
            moves.push(Move::Assign(Command::AssignShard {
                stream: s.name.clone(),
                shard: sh.shard,
                broker: to,
                expected_epoch: sh.epoch,
            }));
        }
    }
    if !moves.is_empty() || !settled {
        return moves;
    }
    // Spread: while the busiest live broker has two more shards than the
    // idlest, hand one of its shards over (one pending handoff per owner).
    let pending: Vec<BrokerId> = state
        .streams
        .values()
        .flat_map(|s| s.shards.iter())
        .filter(|sh| sh.handoff_to.is_some())
        .filter_map(|sh| sh.owner)
        .chain(handoffs.withdrawn.iter().copied())
        .collect();
    let (Some((&busiest, &most)), Some(idlest)) = (
        load.iter()
            .filter(|(id, _)| !pending.contains(id))
            .max_by_key(|(id, n)| (**n, std::cmp::Reverse(**id))),
        least(&load),
    ) else {
        return moves;
    };
    if most < load[&idlest] + 2 {
        return moves;
    }
    let candidate = state.streams.values().find_map(|s| {
        s.shards
            .iter()
            .find(|sh| sh.owner == Some(busiest) && sh.handoff_to.is_none())
            .map(|sh| (s.name.clone(), sh.shard, sh.epoch))
    });
    if let Some((stream, shard, epoch)) = candidate {
        moves.push(Move::Handoff(Command::RequestHandoff {
            stream,
            shard,
            to: idlest,
            expected_epoch: epoch,
        }));
    }
    moves
}

/// The controller: runs on every node, acts while it is the leader.
pub async fn run(node: Arc<PlacementNode>) {
    // When each pending handoff was first seen: (stream, shard, epoch).
    let mut handoffs: HashMap<(String, i32, u64), Instant> = HashMap::new();
    // When each owner last had a handoff withdrawn.
    let mut withdrawn: HashMap<BrokerId, Instant> = HashMap::new();
    loop {
        tokio::time::sleep(TICK).await;
        let status = node.status();
        let live = node.liveness();
        if !status.is_leader {
            live.not_leading();
            handoffs.clear();
            withdrawn.clear();
            continue;
        }
        withdrawn.retain(|_, at| at.elapsed() < HANDOFF_RETRY);
        live.leading(status.term);
        let settled = live.settled();
        // Decide under the read lock, without copying the state (it holds
        // the whole segment index).
        let (handoff_keys, moves) = node.with_state(|state| {
            let live_ids: Vec<BrokerId> = state
                .brokers
                .keys()
                .copied()
                .filter(|id| live.is_live(*id))
                .collect();
            let mut current = Vec::new();
            for s in state.streams.values() {
                for sh in &s.shards {
                    if sh.handoff_to.is_some() {
                        current.push((s.name.clone(), sh.shard, sh.epoch));
                    }
                }
            }
            let now = Instant::now();
            let times = HandoffTimes {
                expired: current
                    .iter()
                    .filter(|k| {
                        handoffs
                            .get(*k)
                            .is_some_and(|since| now.duration_since(*since) >= HANDOFF_TIMEOUT)
                    })
                    .map(|k| (k.0.clone(), k.1))
                    .collect(),
                withdrawn: withdrawn.keys().copied().collect(),
            };
            let moves: Vec<(Command, bool, Option<BrokerId>)> =
                plan(state, &live_ids, &times, settled)
                    .into_iter()
                    .map(|m| match m {
                        Move::Assign(cmd) => {
                            let failover = match &cmd {
                                Command::AssignShard { stream, shard, .. } => state
                                    .streams
                                    .get(stream)
                                    .and_then(|s| {
                                        usize::try_from(*shard).ok().and_then(|i| s.shards.get(i))
                                    })
                                    .is_some_and(|sh| sh.owner.is_some()),
                                _ => false,
                            };
                            (cmd, failover, None)
                        }
                        Move::Handoff(cmd) => (cmd, false, None),
                        Move::Withdraw(cmd, owner) => (cmd, false, Some(owner)),
                    })
                    .collect();
            (current, moves)
        });
        let now = Instant::now();
        handoffs.retain(|k, _| handoff_keys.contains(k));
        for k in handoff_keys {
            handoffs.entry(k).or_insert(now);
        }
        for (cmd, failover, withdrawing) in moves {
            tracing::info!(?cmd, "controller");
            match node.write(cmd).await {
                Ok(Reply::Lease { .. }) => {
                    live.lease_changes.fetch_add(1, Ordering::Relaxed);
                    if failover {
                        live.failovers.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Reply::Done) => {
                    if let Some(owner) = withdrawing {
                        withdrawn.insert(owner, Instant::now());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!("controller write failed: {e}");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_new_term_counts_every_broker_live_until_the_session_timeout() {
        let timeout = Duration::from_secs(6);
        let live = Liveness::new(timeout);
        live.leading(1);
        live.saw(1);
        tokio::time::advance(timeout).await;
        assert!(!live.is_live(1), "silent for a whole session");
        assert!(!live.is_live(2), "never heard of, grace over");
        // Leadership lost and won again: what was heard in term 1 is stale,
        // and neither broker has had a chance to reach this leader.
        live.not_leading();
        live.leading(3);
        assert!(live.is_live(1));
        assert!(live.is_live(2));
        tokio::time::advance(timeout - Duration::from_millis(1)).await;
        assert!(live.is_live(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!live.is_live(1));
        assert!(!live.is_live(2));
    }

    fn state(owners: &[Option<BrokerId>], brokers: &[BrokerId]) -> State {
        let mut st = State::default();
        st.apply(Command::create_for_test("t", owners.len() as i32));
        for b in brokers {
            st.apply(Command::RegisterBroker {
                info: BrokerInfo {
                    id: *b,
                    kafka_addr: String::new(),
                    http_addr: String::new(),
                    registered_ms: 0,
                    kafka_listeners: Default::default(),
                },
            });
        }
        for (i, o) in owners.iter().enumerate() {
            if let Some(b) = o {
                st.apply(Command::AcquireLease {
                    stream: "t".into(),
                    shard: i as i32,
                    broker: *b,
                });
            }
        }
        st
    }

    fn assigned(moves: &[Move]) -> Vec<(i32, BrokerId)> {
        moves
            .iter()
            .filter_map(|m| match m {
                Move::Assign(Command::AssignShard { shard, broker, .. }) => Some((*shard, *broker)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn new_shards_are_spread_over_live_brokers() {
        let st = state(&[None; 6], &[1, 2, 3]);
        let got = assigned(&plan(&st, &[1, 2, 3], &HandoffTimes::default(), true));
        assert_eq!(got, [(0, 1), (1, 2), (2, 3), (3, 1), (4, 2), (5, 3)]);
    }

    #[test]
    fn a_new_leader_places_only_ownerless_shards_until_settled() {
        let st = state(&[Some(1), None], &[1, 2]);
        let got = assigned(&plan(&st, &[2], &HandoffTimes::default(), false));
        assert_eq!(got, [(1, 2)]);
    }

    #[test]
    fn a_dead_brokers_shards_move_to_the_others() {
        let st = state(&[Some(1), Some(2), Some(3), Some(1)], &[1, 2, 3]);
        let got = assigned(&plan(&st, &[2, 3], &HandoffTimes::default(), true));
        assert_eq!(got, [(0, 2), (3, 3)]);
        // The epoch a move expects is the current one: a stale plan is refused.
        let mut st2 = st.clone();
        let Move::Assign(cmd) = plan(&st, &[2, 3], &HandoffTimes::default(), true).remove(0) else {
            panic!("not an assignment")
        };
        assert!(matches!(st2.apply(cmd.clone()), Reply::Lease { epoch: 2 }));
        assert!(matches!(st2.apply(cmd), Reply::Rejected { .. }));
    }

    #[test]
    fn a_joining_broker_gets_shards_by_handoff() {
        let mut st = state(&[Some(1), Some(1), Some(2), Some(2)], &[1, 2, 3]);
        let moves = plan(&st, &[1, 2, 3], &HandoffTimes::default(), true);
        assert_eq!(moves.len(), 1);
        let Move::Handoff(cmd) = moves[0].clone() else {
            panic!("expected a handoff, got {moves:?}")
        };
        assert_eq!(st.apply(cmd), Reply::Done);
        // While it is pending nothing else moves from that owner.
        let again = plan(&st, &[1, 2, 3], &HandoffTimes::default(), true);
        assert!(
            again.iter().all(|m| !matches!(m, Move::Handoff(Command::RequestHandoff { stream, shard: 0, .. }) if stream == "t")),
            "{again:?}"
        );
        // Past its time the handoff is withdrawn, not forced: the owner is
        // alive and may hold records it acknowledged and has not committed.
        let late = HandoffTimes {
            expired: vec![("t".into(), 0)],
            withdrawn: vec![],
        };
        let moves = plan(&st, &[1, 2, 3], &late, true);
        assert!(assigned(&moves).is_empty(), "{moves:?}");
        let [Move::Withdraw(cmd, 1)] = moves.as_slice() else {
            panic!("expected one withdrawal, got {moves:?}")
        };
        assert_eq!(st.apply(cmd.clone()), Reply::Done);
        let sh = &st.streams["t"].shards[0];
        assert_eq!((sh.owner, sh.epoch, sh.handoff_to), (Some(1), 1, None));
        // For a while that owner is not asked again; another one is.
        let cooling = HandoffTimes {
            expired: vec![],
            withdrawn: vec![1],
        };
        let moves = plan(&st, &[1, 2, 3], &cooling, true);
        let [Move::Handoff(Command::RequestHandoff { shard, to, .. })] = moves.as_slice() else {
            panic!("expected one handoff, got {moves:?}")
        };
        assert_eq!((*shard, *to), (2, 3));
    }

    #[test]
    fn an_expired_handoff_of_a_dead_owner_goes_to_the_least_loaded() {
        let mut st = state(&[Some(1), Some(1), Some(3), Some(3), Some(2)], &[1, 2, 3]);
        st.apply(Command::RequestHandoff {
            stream: "t".into(),
            shard: 0,
            to: 3,
            expected_epoch: 1,
        });
        let late = HandoffTimes {
            expired: vec![("t".into(), 0)],
            withdrawn: vec![],
        };
        // Owner 1 is gone: its shards are orphans, placed by load (broker 2
        // holds one shard, broker 3, the handoff's target, two).
        let got = assigned(&plan(&st, &[2, 3], &late, true));
        assert_eq!(got, [(0, 2), (1, 2)]);
    }
}
