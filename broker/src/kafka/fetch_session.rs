//! Incremental fetch sessions (KIP-227): which partitions a Fetch covers,
//! and which of them its response carries. Pure state, no I/O: the Fetch
//! handler asks [`FetchSessions::begin`] what to read and hands the result
//! to [`FetchSessions::finish`].
//!
//! A client that opens a session (session id 0, epoch 0) gets an id back;
//! later requests name the session with the next epoch and list only the
//! partitions whose fetch position changed, plus those to forget. Every
//! fetch still reads every partition of the session, and the response
//! leaves out the ones with no records, no error and the same high
//! watermark, last stable offset and log start as last reported.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use kafka_protocol::ResponseError;
use kafka_protocol::messages::fetch_response::FetchableTopicResponse;
use kafka_protocol::messages::{FetchRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use uuid::Uuid;

/// Kafka's `max.incremental.fetch.session.cache.slots`.
pub const DEFAULT_SESSION_SLOTS: usize = 1000;
/// A session used within this long is only evicted for a new session with
/// more partitions (Kafka's `min.incremental.fetch.session.eviction.ms`).
const EVICTION_PROTECTION: Duration = Duration::from_secs(120);
/// Partitions all sessions together may hold (about 200 bytes each). A
/// session grows with every incremental request that names a new
/// partition, so without a bound a client could make the broker keep any
/// number of them.
const DEFAULT_MAX_CACHED_PARTITIONS: usize = 500_000;
/// The epoch after `i32::MAX`: epochs 0 and -1 mean open and close.
const FIRST_INCREMENTAL_EPOCH: i32 = 1;

/// One partition a fetch reads.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Wanted {
    pub topic: TopicName,
    pub topic_id: Uuid,
    pub partition: i32,
    pub fetch_offset: i64,
    pub partition_max_bytes: i32,
}

/// What one Fetch reads and how its response is shaped.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The session named in the response (0: none).
    pub session_id: i32,
    /// An incremental fetch: the response leaves out unchanged partitions.
    pub incremental: bool,
    /// Every partition to read, grouped by topic in request order.
    pub wanted: Vec<Wanted>,
}

/// The last values a session's response carried for a partition.
type Reported = (i64, i64, i64);

struct Cached {
    wanted: Wanted,
    reported: Option<Reported>,
}

struct Session {
    next_epoch: i32,
    partitions: IndexMap<(TopicName, i32), Cached>,
    used: Instant,
}

#[derive(Default)]
struct Held {
    sessions: HashMap<i32, Session>,
    /// Partitions over all sessions.
    partitions: usize,
}

impl Held {
    fn remove(&mut self, id: i32) -> Option<Session> {
        let s = self.sessions.remove(&id)?;
        self.partitions -= s.partitions.len();
        Some(s)
    }
}

/// The broker's fetch sessions, at most `slots` of them and
/// `max_partitions` partitions in all.
pub struct FetchSessions {
    slots: usize,
    max_partitions: usize,
    held: parking_lot::Mutex<Held>,
    evictions: std::sync::atomic::AtomicU64,
}

impl FetchSessions {
    pub fn new(slots: usize) -> Self {
        Self::with_partition_budget(slots, DEFAULT_MAX_CACHED_PARTITIONS)
    }

    fn with_partition_budget(slots: usize, max_partitions: usize) -> Self {
        Self {
            slots,
            max_partitions,
            held: parking_lot::Mutex::default(),
            evictions: Default::default(),
        }
    }

    /// Sessions held now.
    pub fn active(&self) -> usize {
        self.held.lock().sessions.len()
    }

    /// Sessions evicted to make room for others since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decide what `req` (of API `version`) reads: a top-level error for an
    /// unknown session or a wrong epoch.
    pub(crate) fn begin(
        &self,
        req: &FetchRequest,
        version: i16,
        now: Instant,
    ) -> Result<Plan, ResponseError> {
        let requested = wanted_in(req);
        // Sessions came with v7; older requests decode as sessionless.
        if version < 7 {
            return Ok(full(0, requested));
        }
        let mut held = self.held.lock();
        let held = &mut *held;
        match (req.session_id, req.session_epoch) {
            (0, -1) => Ok(full(0, requested)),
            (id, -1) => {
                held.remove(id);
                Ok(full(0, requested))
            }
            (id, 0) => {
                if id != 0 {
                    held.remove(id);
                }
                let id = self.open(held, &requested, now);
                Ok(full(id, requested))
            }
            (_, epoch) if epoch < 0 => Err(ResponseError::InvalidFetchSessionEpoch),
            (id, epoch) => {
                let Some(s) = held.sessions.get_mut(&id) else {
                    return Err(ResponseError::FetchSessionIdNotFound);
                };
                if s.next_epoch != epoch {
                    return Err(ResponseError::InvalidFetchSessionEpoch);
                }
                s.next_epoch = next_epoch(epoch);
                s.used = now;
                let before = s.partitions.len();
                for t in &req.forgotten_topics_data {
                    for p in &t.partitions {
                        s.partitions.shift_remove(&(t.topic.clone(), *p));
                    }
                }
                for w in requested {
                    match s.partitions.get_mut(&(w.topic.clone(), w.partition)) {
                        Some(c) => c.wanted = w,
                        None => {
                            let w = owned(w);
                            s.partitions.insert(
                                (w.topic.clone(), w.partition),
                                Cached {
                                    wanted: w,
                                    reported: None,
                                },
                            );
                        }
                    }
                }
                held.partitions = held.partitions - before + s.partitions.len();
                if held.partitions > self.max_partitions {
                    // The client starts over with a full fetch, and gets a
                    // session again if there is room for it.
                    held.remove(id);
                    return Err(ResponseError::FetchSessionIdNotFound);
                }
                let mut wanted: Vec<Wanted> =
                    s.partitions.values().map(|c| c.wanted.clone()).collect();
                // One response entry per topic: keep a topic's partitions together.
                let mut order: IndexMap<TopicName, usize> = IndexMap::new();
                for w in &wanted {
                    let n = order.len();
                    order.entry(w.topic.clone()).or_insert(n);
                }
                wanted.sort_by_key(|w| order.get(&w.topic).copied().unwrap_or(usize::MAX));
                Ok(Plan {
                    session_id: id,
                    incremental: true,
                    wanted,
                })
            }
        }
    }

    /// Note what the response reports and, for an incremental fetch, drop
    /// the partitions with nothing new.
    pub(crate) fn finish(
        &self,
        plan: &Plan,
        mut topics: Vec<FetchableTopicResponse>,
    ) -> Vec<FetchableTopicResponse> {
        if plan.session_id == 0 {
            return topics;
        }
        let mut held = self.held.lock();
        let Some(s) = held.sessions.get_mut(&plan.session_id) else {
            return topics;
        };
        let mut answered = Vec::new();
        for t in &mut topics {
            let topic = t.topic.clone();
            t.partitions.retain(|p| {
                let now = (p.high_watermark, p.last_stable_offset, p.log_start_offset);
                let changed = match s.partitions.get_mut(&(topic.clone(), p.partition_index)) {
                    Some(c) => c.reported.replace(now) != Some(now),
                    None => true,
                };
                let has_records = p.records.as_ref().is_some_and(|r| !r.is_empty());
                if has_records {
                    answered.push((topic.clone(), p.partition_index));
                }
                !plan.incremental || changed || has_records || p.error_code != 0
            });
        }
        // Partitions that got records go to the back, so the ones after
        // them are read first next time and none waits behind the others
        // for room in the response.
        for key in answered {
            if let Some(c) = s.partitions.shift_remove(&key) {
                s.partitions.insert(key, c);
            }
        }
        if plan.incremental {
            topics.retain(|t| !t.partitions.is_empty());
        }
        topics
    }

    /// A new session for `wanted`, or 0 when there is no room. When full,
    /// as Kafka does: the least recently used session makes way if it has
    /// been idle for [`EVICTION_PROTECTION`]; otherwise the smallest one
    /// (the least recently used among equals) if the new one has more
    /// partitions.
    /// Past the partition budget there is no session (a sessionless fetch
    /// works the same, only with larger requests).
    fn open(&self, held: &mut Held, wanted: &[Wanted], now: Instant) -> i32 {
        if self.slots == 0 || wanted.len() > self.max_partitions {
            return 0;
        }
        let sessions = &held.sessions;
        if sessions.len() >= self.slots || held.partitions + wanted.len() > self.max_partitions {
            let stale = sessions
                .iter()
                .min_by_key(|(_, s)| s.used)
                .filter(|(_, s)| now.saturating_duration_since(s.used) >= EVICTION_PROTECTION)
                .map(|(id, _)| *id);
            let smaller = || {
                sessions
                    .iter()
                    .min_by_key(|(_, s)| (s.partitions.len(), s.used))
                    .filter(|(_, s)| s.partitions.len() < wanted.len())
                    .map(|(id, _)| *id)
            };
            match stale.or_else(smaller) {
                Some(id) => {
                    held.remove(id);
                    self.evictions
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                None => return 0,
            }
            if held.partitions + wanted.len() > self.max_partitions {
                return 0;
            }
        }
        let id = loop {
            let id = rand::random_range(1..=i32::MAX);
            if !held.sessions.contains_key(&id) {
                break id;
            }
        };
        let partitions: IndexMap<_, _> = wanted
            .iter()
            .map(|w| {
                let w = owned(w.clone());
                (
                    (w.topic.clone(), w.partition),
                    Cached {
                        wanted: w,
                        reported: None,
                    },
                )
            })
            .collect();
        held.partitions += partitions.len();
        held.sessions.insert(
            id,
            Session {
                next_epoch: FIRST_INCREMENTAL_EPOCH,
                partitions,
                used: now,
            },
        );
        id
    }
}

/// `w` with a topic name of its own: a decoded name shares the request's
/// buffer, which a session would otherwise keep alive whole.
fn owned(w: Wanted) -> Wanted {
    Wanted {
        topic: TopicName(StrBytes::from_string(w.topic.as_str().to_owned())),
        ..w
    }
}

fn next_epoch(epoch: i32) -> i32 {
    if epoch == i32::MAX {
        FIRST_INCREMENTAL_EPOCH
    } else {
        epoch + 1
    }
}

fn full(session_id: i32, wanted: Vec<Wanted>) -> Plan {
    Plan {
        session_id,
        incremental: false,
        wanted,
    }
}

fn wanted_in(req: &FetchRequest) -> Vec<Wanted> {
    req.topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| Wanted {
                topic: t.topic.clone(),
                topic_id: t.topic_id,
                partition: p.partition,
                fetch_offset: p.fetch_offset,
                partition_max_bytes: p.partition_max_bytes,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bytes::Bytes;
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic, ForgottenTopic};
    use kafka_protocol::messages::fetch_response::PartitionData;
    use kafka_protocol::protocol::StrBytes;

    use super::*;

    fn name(s: &str) -> TopicName {
        TopicName(StrBytes::from_string(s.to_owned()))
    }

    fn request(
        id: i32,
        epoch: i32,
        parts: &[(&str, i32, i64)],
        forget: &[(&str, i32)],
    ) -> FetchRequest {
        let mut topics: Vec<FetchTopic> = Vec::new();
        for (t, p, off) in parts {
            let part = FetchPartition::default()
                .with_partition(*p)
                .with_fetch_offset(*off)
                .with_partition_max_bytes(1 << 20);
            match topics.iter_mut().find(|x| x.topic == name(t)) {
                Some(x) => x.partitions.push(part),
                None => topics.push(
                    FetchTopic::default()
                        .with_topic(name(t))
                        .with_partitions(vec![part]),
                ),
            }
        }
        let forgotten = forget
            .iter()
            .map(|(t, p)| {
                ForgottenTopic::default()
                    .with_topic(name(t))
                    .with_partitions(vec![*p])
            })
            .collect();
        FetchRequest::default()
            .with_session_id(id)
            .with_session_epoch(epoch)
            .with_topics(topics)
            .with_forgotten_topics_data(forgotten)
    }

    /// The response a read of `plan` would give: `records` for the listed
    /// partitions, a high watermark of `hw` everywhere.
    fn response(plan: &Plan, hw: i64, records: &[(&str, i32)]) -> Vec<FetchableTopicResponse> {
        let mut out: Vec<FetchableTopicResponse> = Vec::new();
        for w in &plan.wanted {
            let mut pd = PartitionData::default()
                .with_partition_index(w.partition)
                .with_high_watermark(hw)
                .with_last_stable_offset(hw);
            if records
                .iter()
                .any(|(t, p)| name(t) == w.topic && *p == w.partition)
            {
                pd = pd.with_records(Some(Bytes::from_static(b"batch")));
            }
            match out.iter_mut().find(|t| t.topic == w.topic) {
                Some(t) => t.partitions.push(pd),
                None => out.push(
                    FetchableTopicResponse::default()
                        .with_topic(w.topic.clone())
                        .with_partitions(vec![pd]),
                ),
            }
        }
        out
    }

    fn listed(topics: &[FetchableTopicResponse]) -> Vec<(String, i32)> {
        topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .map(|p| (t.topic.0.to_string(), p.partition_index))
            })
            .collect()
    }

    #[test]
    fn a_session_carries_the_partitions_and_answers_only_changes() {
        let s = FetchSessions::new(10);
        let now = Instant::now();
        let open = s
            .begin(
                &request(0, 0, &[("a", 0, 0), ("a", 1, 0), ("b", 0, 5)], &[]),
                12,
                now,
            )
            .unwrap();
        assert!(open.session_id > 0 && !open.incremental);
        let first = s.finish(&open, response(&open, 10, &[("a", 0)]));
        assert_eq!(listed(&first).len(), 3, "the opening fetch is a full one");

        // Nothing changed: an empty incremental request still reads all three.
        let next = s
            .begin(&request(open.session_id, 1, &[], &[]), 12, now)
            .unwrap();
        assert!(next.incremental);
        assert_eq!(next.wanted.len(), 3);
        assert!(s.finish(&next, response(&next, 10, &[])).is_empty());

        // New records in b/0 and a new high watermark everywhere.
        let moved = s
            .begin(&request(open.session_id, 2, &[("a", 0, 7)], &[]), 12, now)
            .unwrap();
        assert_eq!(
            moved
                .wanted
                .iter()
                .find(|w| w.partition == 0 && w.topic == name("a"))
                .unwrap()
                .fetch_offset,
            7
        );
        assert_eq!(
            listed(&s.finish(&moved, response(&moved, 11, &[("b", 0)]))).len(),
            3
        );
        let quiet = s
            .begin(&request(open.session_id, 3, &[], &[]), 12, now)
            .unwrap();
        assert_eq!(
            listed(&s.finish(&quiet, response(&quiet, 11, &[("b", 0)]))),
            [("b".to_string(), 0)]
        );
    }

    #[test]
    fn partitions_are_added_and_forgotten() {
        let s = FetchSessions::new(10);
        let now = Instant::now();
        let open = s
            .begin(&request(0, 0, &[("a", 0, 0), ("b", 0, 0)], &[]), 12, now)
            .unwrap();
        s.finish(&open, response(&open, 1, &[]));
        let next = s
            .begin(
                &request(open.session_id, 1, &[("a", 1, 0)], &[("b", 0)]),
                12,
                now,
            )
            .unwrap();
        let parts: Vec<_> = next
            .wanted
            .iter()
            .map(|w| (w.topic.0.to_string(), w.partition))
            .collect();
        assert_eq!(parts, [("a".to_string(), 0), ("a".to_string(), 1)]);
        // The added partition is reported once although nothing else changed.
        assert_eq!(
            listed(&s.finish(&next, response(&next, 1, &[]))),
            [("a".to_string(), 1)]
        );
    }

    #[test]
    fn unknown_sessions_and_wrong_epochs_are_refused() {
        let s = FetchSessions::new(10);
        let now = Instant::now();
        let err = |r: Result<Plan, ResponseError>| r.err();
        assert_eq!(
            err(s.begin(&request(42, 1, &[], &[]), 12, now)),
            Some(ResponseError::FetchSessionIdNotFound)
        );
        let open = s
            .begin(&request(0, 0, &[("a", 0, 0)], &[]), 12, now)
            .unwrap();
        assert_eq!(
            err(s.begin(&request(open.session_id, 2, &[], &[]), 12, now)),
            Some(ResponseError::InvalidFetchSessionEpoch)
        );
        assert_eq!(
            err(s.begin(&request(open.session_id, -2, &[], &[]), 12, now)),
            Some(ResponseError::InvalidFetchSessionEpoch)
        );
        assert!(
            s.begin(&request(open.session_id, 1, &[], &[]), 12, now)
                .is_ok()
        );
        // Epoch -1 closes it.
        let closed = s
            .begin(&request(open.session_id, -1, &[("a", 0, 0)], &[]), 12, now)
            .unwrap();
        assert_eq!(closed.session_id, 0);
        assert_eq!(s.active(), 0);
        // Before v7 there are no sessions.
        assert_eq!(
            s.begin(&request(0, 0, &[("a", 0, 0)], &[]), 6, now)
                .unwrap()
                .session_id,
            0
        );
        assert_eq!(s.active(), 0);
    }

    #[test]
    fn a_full_cache_evicts_only_idle_or_smaller_sessions() {
        let s = FetchSessions::new(1);
        let t0 = Instant::now();
        let small = s
            .begin(&request(0, 0, &[("a", 0, 0)], &[]), 12, t0)
            .unwrap();
        assert!(small.session_id > 0);
        // As many partitions, recently used: no room, the fetch goes sessionless.
        let same = s
            .begin(&request(0, 0, &[("b", 0, 0)], &[]), 12, t0)
            .unwrap();
        assert_eq!(same.session_id, 0);
        // More partitions: the small session makes way.
        let big = s
            .begin(&request(0, 0, &[("b", 0, 0), ("b", 1, 0)], &[]), 12, t0)
            .unwrap();
        assert!(big.session_id > 0);
        assert_eq!(s.evictions(), 1);
        assert_eq!(
            s.begin(&request(small.session_id, 1, &[], &[]), 12, t0)
                .err(),
            Some(ResponseError::FetchSessionIdNotFound)
        );
        // Idle long enough, any new session may take its place.
        let later = t0 + EVICTION_PROTECTION;
        assert!(
            s.begin(&request(0, 0, &[("c", 0, 0)], &[]), 12, later)
                .unwrap()
                .session_id
                > 0
        );
        assert_eq!(s.evictions(), 2);
        assert_eq!(
            FetchSessions::new(0)
                .begin(&request(0, 0, &[("a", 0, 0)], &[]), 12, t0)
                .unwrap()
                .session_id,
            0
        );
    }

    #[test]
    fn partitions_that_got_records_go_to_the_back() {
        let s = FetchSessions::new(10);
        let now = Instant::now();
        let open = s
            .begin(
                &request(0, 0, &[("a", 0, 0), ("a", 1, 0), ("a", 2, 0)], &[]),
                12,
                now,
            )
            .unwrap();
        s.finish(&open, response(&open, 5, &[("a", 0)]));
        let next = s
            .begin(&request(open.session_id, 1, &[], &[]), 12, now)
            .unwrap();
        let order: Vec<i32> = next.wanted.iter().map(|w| w.partition).collect();
        assert_eq!(order, [1, 2, 0]);
    }

    #[test]
    fn a_full_cache_makes_way_for_a_larger_session_by_dropping_the_smallest() {
        let s = FetchSessions::new(2);
        let t0 = Instant::now();
        let two = s
            .begin(&request(0, 0, &[("a", 0, 0), ("a", 1, 0)], &[]), 12, t0)
            .unwrap();
        let one = s
            .begin(
                &request(0, 0, &[("b", 0, 0)], &[]),
                12,
                t0 + Duration::from_secs(1),
            )
            .unwrap();
        // The two-partition session is the least recently used, but the
        // one-partition session is the smaller: it goes.
        let three = s
            .begin(
                &request(0, 0, &[("c", 0, 0), ("c", 1, 0), ("c", 2, 0)], &[]),
                12,
                t0 + Duration::from_secs(2),
            )
            .unwrap();
        assert!(three.session_id > 0);
        assert!(
            s.begin(&request(two.session_id, 1, &[], &[]), 12, t0)
                .is_ok()
        );
        assert_eq!(
            s.begin(&request(one.session_id, 1, &[], &[]), 12, t0).err(),
            Some(ResponseError::FetchSessionIdNotFound)
        );
    }

    #[test]
    fn sessions_hold_a_bounded_number_of_partitions() {
        let s = FetchSessions::with_partition_budget(10, 4);
        let now = Instant::now();
        // Too many for the budget: answered without a session.
        let big = &[
            ("a", 0, 0),
            ("a", 1, 0),
            ("a", 2, 0),
            ("a", 3, 0),
            ("a", 4, 0),
        ];
        assert_eq!(
            s.begin(&request(0, 0, big, &[]), 12, now)
                .unwrap()
                .session_id,
            0
        );
        let one = s
            .begin(&request(0, 0, &[("a", 0, 0), ("a", 1, 0)], &[]), 12, now)
            .unwrap();
        let two = s
            .begin(&request(0, 0, &[("b", 0, 0), ("b", 1, 0)], &[]), 12, now)
            .unwrap();
        assert!(one.session_id > 0 && two.session_id > 0);
        // A third session of the same size finds no room and evicts no one.
        let three = s
            .begin(&request(0, 0, &[("c", 0, 0), ("c", 1, 0)], &[]), 12, now)
            .unwrap();
        assert_eq!(three.session_id, 0);
        assert_eq!(s.active(), 2);
        // Forgetting one and adding one stays within the budget.
        assert!(
            s.begin(
                &request(one.session_id, 1, &[("a", 2, 0)], &[("a", 0)]),
                12,
                now
            )
            .is_ok()
        );
        // Growing past it ends the session; the other one stays.
        assert_eq!(
            s.begin(&request(one.session_id, 2, &[("a", 3, 0)], &[]), 12, now)
                .err(),
            Some(ResponseError::FetchSessionIdNotFound)
        );
        assert_eq!(s.active(), 1);
        assert_eq!(s.held.lock().partitions, 2);
        assert!(
            s.begin(&request(two.session_id, 1, &[], &[]), 12, now)
                .is_ok()
        );
    }

    #[test]
    fn cached_names_do_not_keep_the_request_alive() {
        let s = FetchSessions::new(10);
        let req = request(0, 0, &[("a", 0, 0)], &[]);
        let open = s.begin(&req, 12, Instant::now()).unwrap();
        let held = s.held.lock();
        let cached = &held.sessions[&open.session_id].partitions[0].wanted.topic;
        assert_ne!(cached.as_ptr(), req.topics[0].topic.as_ptr());
    }

    #[test]
    fn epochs_wrap_past_the_maximum() {
        assert_eq!(next_epoch(i32::MAX), 1);
        assert_eq!(next_epoch(5), 6);
    }
}
