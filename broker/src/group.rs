//! The classic Kafka consumer-group coordinator (JoinGroup / SyncGroup /
//! Heartbeat / LeaveGroup), as a state machine driven by requests and a
//! periodic tick. Requests that must wait (a join until every member has
//! rejoined, a follower's sync until the leader's assignment) get a
//! oneshot receiver. Committed offsets are not here: they live in placement.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::ResponseError;
use parking_lot::Mutex;
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub fn as_str(&self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

pub struct JoinParams {
    pub group_id: String,
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    /// JoinGroup v4+: a new member first gets its id with MEMBER_ID_REQUIRED.
    pub require_known_member_id: bool,
    /// The coordinator epoch placement granted for this group (see
    /// [`Coordinator::epoch`]); the highest one seen is kept.
    pub coordinator_epoch: u64,
}

#[derive(Debug, Clone, Default)]
pub struct JoinResult {
    pub error: i16,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// Only for the leader: (member id, instance id, metadata).
    pub members: Vec<(String, Option<String>, Bytes)>,
}

#[derive(Debug, Clone, Default)]
pub struct SyncResult {
    pub error: i16,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Bytes,
}

pub enum Waiting<T> {
    Ready(T),
    Wait(oneshot::Receiver<T>),
}

#[derive(Debug, Clone)]
pub struct MemberDescription {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub metadata: Bytes,
    pub assignment: Bytes,
}

#[derive(Debug, Clone)]
pub struct GroupDescription {
    pub state: GroupState,
    pub protocol_type: String,
    pub protocol: String,
    pub members: Vec<MemberDescription>,
}

struct Member {
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    last_seen: Instant,
    join_tx: Option<oneshot::Sender<JoinResult>>,
    sync_tx: Option<oneshot::Sender<SyncResult>>,
}

struct Group {
    state: GroupState,
    generation: i32,
    /// Placement's coordinator epoch for this group when this broker began
    /// coordinating it: its members' commits carry it, so they are refused
    /// once another broker has taken the group over.
    epoch: u64,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    pending: HashSet<String>,
    rebalance_deadline: Instant,
}

impl Group {
    fn new(now: Instant) -> Self {
        Group {
            state: GroupState::Empty,
            generation: 0,
            epoch: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            pending: HashSet::new(),
            rebalance_deadline: now,
        }
    }

    fn prepare_rebalance(&mut self, now: Instant) {
        if self.state == GroupState::PreparingRebalance {
            return;
        }
        self.state = GroupState::PreparingRebalance;
        let timeout = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or_default();
        self.rebalance_deadline = now + timeout;
        for m in self.members.values_mut() {
            if let Some(tx) = m.sync_tx.take() {
                let _ = tx.send(SyncResult {
                    error: ResponseError::RebalanceInProgress.code(),
                    ..SyncResult::default()
                });
            }
        }
    }

    /// The protocol every member supports, preferring the leader's order.
    fn select_protocol(&self) -> Option<String> {
        let first = self.members.values().next()?;
        first
            .protocols
            .iter()
            .map(|(name, _)| name)
            .find(|name| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == *name))
            })
            .cloned()
    }

    fn try_complete_join(&mut self, now: Instant) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        let all_joined = self.members.values().all(|m| m.join_tx.is_some());
        if !all_joined && now < self.rebalance_deadline {
            return;
        }
        // Members that did not rejoin in time are out.
        self.members.retain(|_, m| m.join_tx.is_some());
        self.generation += 1;
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.leader = None;
            self.protocol = None;
            return;
        }
        self.protocol = self.select_protocol();
        if self
            .leader
            .as_ref()
            .is_none_or(|l| !self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        self.state = GroupState::CompletingRebalance;
        let leader = self.leader.clone().unwrap_or_default();
        let protocol = self.protocol.clone().unwrap_or_default();
        let all: Vec<(String, Option<String>, Bytes)> = self
            .members
            .iter()
            .map(|(id, m)| {
                let meta = m
                    .protocols
                    .iter()
                    .find(|(n, _)| *n == protocol)
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default();
                (id.clone(), m.instance_id.clone(), meta)
            })
            .collect();
        for (id, m) in self.members.iter_mut() {
            m.last_seen = now;
            m.assignment = Bytes::new();
            if let Some(tx) = m.join_tx.take() {
                let _ = tx.send(JoinResult {
                    error: 0,
                    generation: self.generation,
                    protocol_type: self.protocol_type.clone(),
                    protocol_name: self.protocol.clone(),
                    leader: leader.clone(),
                    member_id: id.clone(),
                    members: if *id == leader {
                        all.clone()
                    } else {
                        Vec::new()
                    },
                });
            }
        }
    }

    fn remove_member(&mut self, id: &str, now: Instant) -> bool {
        if self.members.remove(id).is_none() {
            return false;
        }
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.generation += 1;
            self.leader = None;
            self.protocol = None;
        } else {
            self.prepare_rebalance(now);
            self.try_complete_join(now);
        }
        true
    }
}

fn error(e: ResponseError) -> i16 {
    e.code()
}

#[derive(Default)]
pub struct Coordinator {
    groups: Mutex<HashMap<String, Group>>,
}

impl Coordinator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn join(&self, p: JoinParams, now: Instant) -> Waiting<JoinResult> {
        let fail = |e: ResponseError, member_id: String| {
            Waiting::Ready(JoinResult {
                error: e.code(),
                generation: -1,
                member_id,
                ..JoinResult::default()
            })
        };
        if p.group_id.is_empty() {
            return fail(ResponseError::InvalidGroupId, p.member_id);
        }
        if p.session_timeout_ms <= 0 || p.protocols.is_empty() {
            return fail(ResponseError::InvalidSessionTimeout, p.member_id);
        }
        let mut groups = self.groups.lock();
        let g = groups
            .entry(p.group_id.clone())
            .or_insert_with(|| Group::new(now));
        g.epoch = g.epoch.max(p.coordinator_epoch);
        if g.state != GroupState::Empty
            && g.protocol_type
                .as_deref()
                .is_some_and(|t| t != p.protocol_type)
        {
            return fail(ResponseError::InconsistentGroupProtocol, p.member_id);
        }
        if !g.members.is_empty()
            && !g.members.values().all(|m| {
                m.protocols
                    .iter()
                    .any(|(n, _)| p.protocols.iter().any(|(q, _)| q == n))
            })
        {
            return fail(ResponseError::InconsistentGroupProtocol, p.member_id);
        }
        let member_id = if p.member_id.is_empty() {
            let id = format!("{}-{:032x}", p.client_id, rand::random::<u128>());
            if p.require_known_member_id {
                g.pending.insert(id.clone());
                return fail(ResponseError::MemberIdRequired, id);
            }
            id
        } else if g.members.contains_key(&p.member_id) || g.pending.remove(&p.member_id) {
            p.member_id
        } else {
            return fail(ResponseError::UnknownMemberId, p.member_id);
        };
        let (tx, rx) = oneshot::channel();
        let session_timeout = Duration::from_millis(p.session_timeout_ms as u64);
        let rebalance_timeout =
            Duration::from_millis(p.rebalance_timeout_ms.max(p.session_timeout_ms) as u64);
        let m = g.members.entry(member_id).or_insert_with(|| Member {
            instance_id: p.group_instance_id.clone(),
            client_id: p.client_id.clone(),
            client_host: p.client_host.clone(),
            session_timeout,
            rebalance_timeout,
            protocols: Vec::new(),
            assignment: Bytes::new(),
            last_seen: now,
            join_tx: None,
            sync_tx: None,
        });
        m.protocols = p.protocols;
        m.session_timeout = session_timeout;
        m.rebalance_timeout = rebalance_timeout;
        m.last_seen = now;
        m.join_tx = Some(tx);
        g.protocol_type = Some(p.protocol_type);
        g.prepare_rebalance(now);
        g.try_complete_join(now);
        Waiting::Wait(rx)
    }

    pub fn sync(
        &self,
        group: &str,
        generation: i32,
        member_id: &str,
        assignments: Vec<(String, Bytes)>,
        now: Instant,
    ) -> Waiting<SyncResult> {
        let fail = |e: ResponseError| {
            Waiting::Ready(SyncResult {
                error: e.code(),
                ..SyncResult::default()
            })
        };
        let mut groups = self.groups.lock();
        let Some(g) = groups.get_mut(group) else {
            return fail(ResponseError::UnknownMemberId);
        };
        if !g.members.contains_key(member_id) {
            return fail(ResponseError::UnknownMemberId);
        }
        if generation != g.generation {
            return fail(ResponseError::IllegalGeneration);
        }
        let ok = |g: &Group, assignment: Bytes| SyncResult {
            error: 0,
            protocol_type: g.protocol_type.clone(),
            protocol_name: g.protocol.clone(),
            assignment,
        };
        match g.state {
            GroupState::Empty | GroupState::PreparingRebalance => {
                fail(ResponseError::RebalanceInProgress)
            }
            GroupState::Stable => {
                let a = g
                    .members
                    .get(member_id)
                    .map(|m| m.assignment.clone())
                    .unwrap_or_default();
                Waiting::Ready(ok(g, a))
            }
            GroupState::CompletingRebalance => {
                let (tx, rx) = oneshot::channel();
                if let Some(m) = g.members.get_mut(member_id) {
                    m.sync_tx = Some(tx);
                    m.last_seen = now;
                }
                if g.leader.as_deref() == Some(member_id) {
                    let mut given: HashMap<String, Bytes> = assignments.into_iter().collect();
                    g.state = GroupState::Stable;
                    let reply = ok(g, Bytes::new());
                    for (id, m) in g.members.iter_mut() {
                        m.assignment = given.remove(id).unwrap_or_default();
                        if let Some(tx) = m.sync_tx.take() {
                            let _ = tx.send(SyncResult {
                                assignment: m.assignment.clone(),
                                ..reply.clone()
                            });
                        }
                    }
                }
                Waiting::Wait(rx)
            }
        }
    }

    pub fn heartbeat(&self, group: &str, generation: i32, member_id: &str, now: Instant) -> i16 {
        let mut groups = self.groups.lock();
        let Some(g) = groups.get_mut(group) else {
            return error(ResponseError::UnknownMemberId);
        };
        let state = g.state;
        let current = g.generation;
        let Some(m) = g.members.get_mut(member_id) else {
            return error(ResponseError::UnknownMemberId);
        };
        m.last_seen = now;
        if generation != current {
            return error(ResponseError::IllegalGeneration);
        }
        match state {
            GroupState::PreparingRebalance => error(ResponseError::RebalanceInProgress),
            _ => 0,
        }
    }

    /// Remove members; returns one error code per member id.
    pub fn leave(&self, group: &str, member_ids: &[String], now: Instant) -> Vec<i16> {
        let mut groups = self.groups.lock();
        let Some(g) = groups.get_mut(group) else {
            return member_ids
                .iter()
                .map(|_| error(ResponseError::UnknownMemberId))
                .collect();
        };
        member_ids
            .iter()
            .map(|id| {
                if g.remove_member(id, now) {
                    0
                } else {
                    error(ResponseError::UnknownMemberId)
                }
            })
            .collect()
    }

    /// Expire members whose session ran out and finish overdue rebalances.
    pub fn tick(&self, now: Instant) {
        let mut groups = self.groups.lock();
        for g in groups.values_mut() {
            let expired: Vec<String> = g
                .members
                .iter()
                .filter(|(_, m)| m.join_tx.is_none() && now > m.last_seen + m.session_timeout)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                tracing::info!(member = %id, "consumer group member session expired");
                g.remove_member(&id, now);
            }
            g.try_complete_join(now);
        }
    }

    /// May this member commit offsets (Kafka's rules for OffsetCommit)?
    /// `Ok` carries the group's coordinator epoch for a member's commit,
    /// `None` for a commit outside group membership.
    pub fn check_commit(
        &self,
        group: &str,
        generation: i32,
        member_id: &str,
    ) -> Result<Option<u64>, i16> {
        if generation < 0 && member_id.is_empty() {
            return Ok(None);
        }
        let groups = self.groups.lock();
        let Some(g) = groups.get(group) else {
            return if generation < 0 {
                Ok(None)
            } else {
                Err(error(ResponseError::UnknownMemberId))
            };
        };
        if !g.members.contains_key(member_id) {
            return Err(error(ResponseError::UnknownMemberId));
        }
        if generation != g.generation {
            return Err(error(ResponseError::IllegalGeneration));
        }
        if g.state == GroupState::CompletingRebalance {
            return Err(error(ResponseError::RebalanceInProgress));
        }
        Ok(Some(g.epoch))
    }

    /// Is `group` coordinated here (in memory) already?
    pub fn has(&self, group: &str) -> bool {
        self.groups.lock().contains_key(group)
    }

    /// Forget every group `keep` says no: their members rejoin wherever
    /// the group is coordinated now, and a group that comes back here
    /// starts over under a new coordinator epoch.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut groups = self.groups.lock();
        let gone: Vec<String> = groups.keys().filter(|g| !keep(g)).cloned().collect();
        for name in gone {
            if let Some(g) = groups.remove(&name) {
                // Waiting joins and syncs learn the group moved.
                for (_, mut m) in g.members {
                    if let Some(tx) = m.join_tx.take() {
                        let _ = tx.send(JoinResult {
                            error: error(ResponseError::NotCoordinator),
                            generation: -1,
                            ..JoinResult::default()
                        });
                    }
                    if let Some(tx) = m.sync_tx.take() {
                        let _ = tx.send(SyncResult {
                            error: error(ResponseError::NotCoordinator),
                            ..SyncResult::default()
                        });
                    }
                }
            }
        }
    }

    pub fn describe(&self, group: &str) -> Option<GroupDescription> {
        let groups = self.groups.lock();
        let g = groups.get(group)?;
        let protocol = g.protocol.clone().unwrap_or_default();
        Some(GroupDescription {
            state: g.state,
            protocol_type: g.protocol_type.clone().unwrap_or_default(),
            protocol: protocol.clone(),
            members: g
                .members
                .iter()
                .map(|(id, m)| MemberDescription {
                    member_id: id.clone(),
                    group_instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    metadata: m
                        .protocols
                        .iter()
                        .find(|(n, _)| *n == protocol)
                        .map(|(_, b)| b.clone())
                        .unwrap_or_default(),
                    assignment: m.assignment.clone(),
                })
                .collect(),
        })
    }

    /// (group, protocol type, state)
    pub fn list(&self) -> Vec<(String, String, GroupState)> {
        self.groups
            .lock()
            .iter()
            .map(|(id, g)| {
                (
                    id.clone(),
                    g.protocol_type.clone().unwrap_or_default(),
                    g.state,
                )
            })
            .collect()
    }

    /// Forget an empty group; NON_EMPTY_GROUP if it has members.
    pub fn delete(&self, group: &str) -> i16 {
        let mut groups = self.groups.lock();
        match groups.get(group) {
            Some(g) if !g.members.is_empty() => error(ResponseError::NonEmptyGroup),
            _ => {
                groups.remove(group);
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(member: &str) -> JoinParams {
        JoinParams {
            group_id: "g".into(),
            member_id: member.into(),
            group_instance_id: None,
            client_id: "c".into(),
            client_host: "h".into(),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 10_000,
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Bytes::from_static(b"m"))],
            require_known_member_id: true,
            coordinator_epoch: 1,
        }
    }

    fn join_ready(c: &Coordinator, member: &str, now: Instant) -> JoinResult {
        match c.join(params(member), now) {
            Waiting::Ready(r) => r,
            Waiting::Wait(mut rx) => rx.try_recv().expect("join should complete"),
        }
    }

    #[test]
    fn two_members_rebalance_and_one_leaves() {
        let c = Coordinator::new();
        let now = Instant::now();
        let first = join_ready(&c, "", now);
        assert_eq!(first.error, ResponseError::MemberIdRequired.code());
        let a = join_ready(&c, &first.member_id, now);
        assert_eq!(a.error, 0);
        assert_eq!(a.leader, a.member_id);
        assert_eq!(a.generation, 1);
        let Waiting::Wait(mut rx) = c.sync(
            "g",
            1,
            &a.member_id,
            vec![(a.member_id.clone(), Bytes::from_static(b"all"))],
            now,
        ) else {
            panic!()
        };
        assert_eq!(&rx.try_recv().unwrap().assignment[..], b"all");

        // B joins: A learns through its heartbeat and rejoins.
        let b_id = join_ready(&c, "", now).member_id;
        let Waiting::Wait(mut b_rx) = c.join(params(&b_id), now) else {
            panic!()
        };
        assert!(b_rx.try_recv().is_err());
        assert_eq!(
            c.heartbeat("g", 1, &a.member_id, now),
            ResponseError::RebalanceInProgress.code()
        );
        let a2 = join_ready(&c, &a.member_id, now);
        let b2 = b_rx.try_recv().unwrap();
        assert_eq!(a2.generation, 2);
        assert_eq!(a2.members.len(), 2);
        assert!(b2.members.is_empty());
        let Waiting::Wait(mut b_sync) = c.sync("g", 2, &b_id, vec![], now) else {
            panic!()
        };
        let Waiting::Wait(_) = c.sync(
            "g",
            2,
            &a.member_id,
            vec![(b_id.clone(), Bytes::from_static(b"half"))],
            now,
        ) else {
            panic!()
        };
        assert_eq!(&b_sync.try_recv().unwrap().assignment[..], b"half");
        assert_eq!(c.heartbeat("g", 2, &b_id, now), 0);

        // A leaves: B must rejoin and becomes leader alone.
        assert_eq!(
            c.leave("g", std::slice::from_ref(&a.member_id), now),
            vec![0]
        );
        assert_eq!(
            c.heartbeat("g", 2, &b_id, now),
            ResponseError::RebalanceInProgress.code()
        );
        let b3 = join_ready(&c, &b_id, now);
        assert_eq!(b3.leader, b_id);
        assert_eq!(b3.generation, 3);
    }

    #[test]
    fn silent_member_expires() {
        let c = Coordinator::new();
        let now = Instant::now();
        let id = join_ready(&c, "", now).member_id;
        let a = join_ready(&c, &id, now);
        let _ = c.sync("g", a.generation, &id, vec![], now);
        c.tick(now + Duration::from_secs(11));
        assert_eq!(
            c.heartbeat("g", a.generation, &id, now),
            ResponseError::UnknownMemberId.code()
        );
        assert_eq!(c.describe("g").unwrap().state, GroupState::Empty);
    }

    #[test]
    fn commit_rules() {
        let c = Coordinator::new();
        assert_eq!(c.check_commit("g", -1, ""), Ok(None));
        assert_eq!(
            c.check_commit("g", 3, "x"),
            Err(ResponseError::UnknownMemberId.code())
        );
    }
}
