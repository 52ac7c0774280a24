//! The replicated state machine: a pure function from (state, command) to
//! (state, reply). No I/O, so it is unit-tested without Raft.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::{
    Command, OffsetCommit, Query, QueryReply, Rejection, Reply, SegmentCommit, ShardRejection,
};
use crate::lifecycle::Lifecycle;
use crate::model::{BrokerId, BrokerInfo, GroupOffset, SegmentRef, Shard, ShardStop, Stream};

/// Upper bound on partitions per stream, so one request cannot make the
/// state machine allocate without limit.
pub const MAX_PARTITIONS: i32 = 10_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub streams: BTreeMap<String, Stream>,
    /// group -> stream -> shard -> offset
    pub group_offsets: BTreeMap<String, BTreeMap<String, BTreeMap<i32, GroupOffset>>>,
    pub brokers: BTreeMap<BrokerId, BrokerInfo>,
    /// group -> coordinator epoch (see `Command::ClaimGroup`).
    #[serde(default)]
    pub group_epochs: BTreeMap<String, u64>,
    pub next_producer_id: i64,
    /// Bumped by every applied command; lets watchers notice change.
    pub version: u64,
    /// Compaction lease, retired objects, default retention.
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// MQTT persistence rules, in the order they are tried.
    #[serde(default)]
    pub mqtt_persist: Vec<crate::model::MqttPersistRule>,
    /// Users' credentials.
    #[serde(default)]
    pub security: crate::security::Security,
    /// The layout this state was written in ([`STATE_FORMAT`]); states
    /// from before the field existed read as 0 and load unchanged.
    #[serde(default)]
    pub format: u32,
}

/// The current layout of [`State`] (snapshots and the bucket mirror).
/// Fields added since are optional with defaults, so older states load.
pub const STATE_FORMAT: u32 = 1;

impl State {
    pub fn apply(&mut self, cmd: Command) -> Reply {
        self.version += 1;
        self.format = STATE_FORMAT;
        match cmd {
            Command::CreateStream {
                name,
                partitions,
                config,
                id,
                now_ms,
                retention_default,
            } => self.create_stream(name, partitions, config, (id, now_ms), retention_default),
            Command::DeleteStream { name } => match self.streams.remove(&name) {
                Some(gone) => {
                    // Deterministic: the newest commit into the stream
                    // stands in for the time (the command carries none).
                    let when = gone
                        .shards
                        .iter()
                        .flat_map(|s| s.segments.iter().map(|r| r.committed_ms))
                        .max()
                        .unwrap_or(0);
                    self.lifecycle.retire_stream(&gone, when);
                    for offsets in self.group_offsets.values_mut() {
                        offsets.remove(&name);
                    }
                    Reply::Done
                }
                None => rejected(Rejection::UnknownStream { name }),
            },
            Command::CreatePartitions { name, count } => self.create_partitions(&name, count),
            Command::AlterStreamConfig { name, set, remove } => {
                let Some(stream) = self.streams.get_mut(&name) else {
                    return rejected(Rejection::UnknownStream { name });
                };
                for key in remove {
                    stream.config.remove(&key);
                }
                stream.config.extend(set);
                Reply::Stream {
                    stream: stream.clone(),
                }
            }
            Command::RegisterBroker { info } => {
                self.brokers.insert(info.id, info);
                Reply::Done
            }
            Command::AcquireLease {
                stream,
                shard,
                broker,
            } => match self.shard_mut(&stream, shard) {
                Ok(s) => grant(s, broker),
                Err(r) => rejected(r),
            },
            Command::AssignShard {
                stream,
                shard,
                broker,
                expected_epoch,
            } => match self.shard_at(&stream, shard, expected_epoch) {
                Ok(s) => grant(s, broker),
                Err(r) => rejected(r),
            },
            Command::RequestHandoff {
                stream,
                shard,
                to,
                expected_epoch,
            } => match self.shard_at(&stream, shard, expected_epoch) {
                Ok(s) => {
                    s.handoff_id += 1;
                    s.handoff_to = Some(to);
                    Reply::Done
                }
                Err(r) => rejected(r),
            },
            Command::CompleteHandoff {
                stream,
                shard,
                to,
                expected_epoch,
                handoff_id,
            } => match self.shard_at(&stream, shard, expected_epoch) {
                Ok(s) if s.handoff_to == Some(to) && s.handoff_id == handoff_id => grant(s, to),
                Ok(_) => rejected(Rejection::NoSuchHandoff {
                    stream,
                    shard,
                    to,
                    handoff_id,
                }),
                Err(r) => rejected(r),
            },
            Command::CancelHandoff {
                stream,
                shard,
                expected_epoch,
            } => match self.shard_at(&stream, shard, expected_epoch) {
                Ok(s) => {
                    s.handoff_to = None;
                    Reply::Done
                }
                Err(r) => rejected(r),
            },
            Command::CommitSegment(commit) => self.commit_segment(commit),
            Command::StopShard {
                stream,
                shard,
                reason,
                now_ms,
            } => match self.shard_mut(&stream, shard) {
                Ok(s) => {
                    // The first reason stays: it names the original loss.
                    s.stopped.get_or_insert(ShardStop {
                        reason,
                        since_ms: now_ms,
                    });
                    Reply::Done
                }
                Err(r) => rejected(r),
            },
            Command::ResumeShard { stream, shard } => match self.shard_mut(&stream, shard) {
                Ok(s) => {
                    s.stopped = None;
                    Reply::Done
                }
                Err(r) => rejected(r),
            },
            Command::CommitOffsets {
                group,
                offsets,
                now_ms,
                coordinator_epoch,
            } => {
                let current = self.group_epochs.get(&group).copied().unwrap_or(0);
                match coordinator_epoch {
                    Some(epoch) if epoch < current => rejected(Rejection::StaleCoordinator {
                        group,
                        epoch,
                        current,
                    }),
                    _ => self.commit_offsets(group, offsets, now_ms),
                }
            }
            Command::ClaimGroup { group } => {
                let epoch = self.group_epochs.entry(group).or_insert(0);
                *epoch += 1;
                Reply::GroupEpoch { epoch: *epoch }
            }
            Command::DeleteGroup { group } => {
                self.group_offsets.remove(&group);
                Reply::Done
            }
            Command::PutScramCredential {
                user,
                mechanism,
                credential,
            } => self.security.put_credential(user, mechanism, credential),
            Command::DeleteScramCredential { user, mechanism } => {
                self.security.delete_credential(&user, mechanism)
            }
            Command::CreateAcls { bindings } => self.security.create_acls(bindings),
            Command::DeleteAcls { filters } => self.security.delete_acls(&filters),
            Command::Restore { state } => {
                *self = *state;
                Reply::Done
            }
            Command::AcquireCompactionLease {
                holder,
                now_ms,
                ttl_ms,
            } => self.lifecycle.acquire(holder, now_ms, ttl_ms),
            Command::ReplaceSegments(r) => {
                let lifecycle = &mut self.lifecycle;
                match self.streams.get_mut(&r.stream).and_then(|s| {
                    usize::try_from(r.shard)
                        .ok()
                        .and_then(|i| s.shards.get_mut(i))
                }) {
                    Some(shard) => lifecycle.replace(shard, r),
                    None => rejected(Rejection::UnknownShard {
                        stream: r.stream,
                        shard: r.shard,
                    }),
                }
            }
            Command::AdvanceLogStart {
                stream,
                shard,
                offset,
                now_ms,
                compaction_epoch,
            } => {
                if let Some(epoch) = compaction_epoch
                    && let Err(e) = self.lifecycle.check_epoch(epoch)
                {
                    return rejected(e);
                }
                let lifecycle = &mut self.lifecycle;
                match self.streams.get_mut(&stream).and_then(|s| {
                    usize::try_from(shard)
                        .ok()
                        .and_then(|i| s.shards.get_mut(i))
                }) {
                    Some(s) => lifecycle.advance_start(s, offset, now_ms),
                    None => rejected(Rejection::UnknownShard { stream, shard }),
                }
            }
            Command::ForgetRetired {
                compaction_epoch,
                objects,
            } => self.lifecycle.forget(compaction_epoch, objects),
            Command::PutMqttPersist { rule } => {
                match self
                    .mqtt_persist
                    .iter_mut()
                    .find(|r| r.filter == rule.filter)
                {
                    Some(r) => *r = rule,
                    None => self.mqtt_persist.push(rule),
                }
                Reply::Done
            }
            Command::DeleteMqttPersist { filter } => {
                self.mqtt_persist.retain(|r| r.filter != filter);
                Reply::Done
            }
            Command::SetDefaultRetention { retention_ms } => {
                self.lifecycle.default_retention_ms = Some(retention_ms.max(-1));
                Reply::Done
            }
            Command::RecordCompactionRun { run } => self.lifecycle.record(run),
            Command::AllocateProducerId => {
                // Kafka producer ids start at 0; keep 0 free for readability.
                self.next_producer_id += 1;
                Reply::ProducerId {
                    id: self.next_producer_id,
                }
            }
        }
    }

    pub fn query(&self, query: &Query) -> QueryReply {
        match query {
            Query::ListStreams => QueryReply::Streams {
                streams: self.streams.values().cloned().collect(),
            },
            Query::GetStream { name } => QueryReply::Stream {
                stream: self.streams.get(name).cloned(),
            },
            Query::GroupOffsets { group } => QueryReply::GroupOffsets {
                offsets: self.group_offsets.get(group).cloned().unwrap_or_default(),
            },
            Query::ListGroups => QueryReply::Groups {
                groups: self.group_offsets.keys().cloned().collect(),
            },
            Query::ListBrokers => QueryReply::Brokers {
                brokers: self.brokers.values().cloned().collect(),
            },
            Query::IndexVersions => QueryReply::IndexVersions {
                versions: self
                    .streams
                    .iter()
                    .map(|(name, s)| {
                        (
                            name.clone(),
                            s.shards.iter().map(|sh| sh.index_version).collect(),
                        )
                    })
                    .collect(),
                default_retention_ms: self.lifecycle.default_retention_ms(),
                compaction: self.lifecycle.totals(),
            },
            Query::MqttPersist => QueryReply::MqttPersist {
                rules: self.mqtt_persist.clone(),
            },
            Query::Security { known } => QueryReply::Security {
                security: (*known != Some(self.security.version)).then(|| self.security.clone()),
            },
            Query::Users => QueryReply::Users {
                users: self
                    .security
                    .users
                    .iter()
                    .map(|(user, creds)| {
                        let mechs = creds.iter().map(|(m, c)| (*m, c.iterations)).collect();
                        (user.clone(), mechs)
                    })
                    .collect(),
            },
            Query::Lifecycle => QueryReply::Lifecycle {
                lifecycle: self.lifecycle.clone(),
            },
        }
    }

    fn create_stream(
        &mut self,
        name: String,
        partitions: i32,
        config: BTreeMap<String, String>,
        (id, now_ms): (u128, i64),
        retention_default: bool,
    ) -> Reply {
        if self.streams.contains_key(&name) {
            return rejected(Rejection::StreamExists { name });
        }
        if name.is_empty() || name.len() > 249 {
            return rejected(Rejection::Invalid {
                reason: format!("invalid stream name length {}", name.len()),
            });
        }
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return rejected(Rejection::InvalidPartitions {
                count: partitions,
                reason: format!("must be between 1 and {MAX_PARTITIONS}"),
            });
        }
        let stream = Stream {
            name: name.clone(),
            id,
            config,
            created_ms: now_ms,
            retention_default,
            shards: (0..partitions)
                .map(|shard| Shard {
                    shard,
                    ..Shard::default()
                })
                .collect(),
        };
        self.streams.insert(name, stream.clone());
        Reply::Stream { stream }
    }

    fn create_partitions(&mut self, name: &str, count: i32) -> Reply {
        let Some(stream) = self.streams.get_mut(name) else {
            return rejected(Rejection::UnknownStream {
                name: name.to_string(),
            });
        };
        let current = stream.partitions();
        if count <= current || count > MAX_PARTITIONS {
            return rejected(Rejection::InvalidPartitions {
                count,
                reason: format!(
                    "must be greater than the current {current} and at most {MAX_PARTITIONS}"
                ),
            });
        }
        stream.shards.extend((current..count).map(|shard| Shard {
            shard,
            ..Shard::default()
        }));
        Reply::Stream {
            stream: stream.clone(),
        }
    }

    fn shard_mut(&mut self, stream: &str, shard: i32) -> Result<&mut Shard, Rejection> {
        let s = self
            .streams
            .get_mut(stream)
            .ok_or_else(|| Rejection::UnknownStream {
                name: stream.to_string(),
            })?;
        usize::try_from(shard)
            .ok()
            .and_then(|i| s.shards.get_mut(i))
            .ok_or_else(|| Rejection::UnknownShard {
                stream: stream.to_string(),
                shard,
            })
    }

    /// The shard, if it still has lease `epoch`.
    fn shard_at(&mut self, stream: &str, shard: i32, epoch: u64) -> Result<&mut Shard, Rejection> {
        let s = self.shard_mut(stream, shard)?;
        if s.epoch != epoch {
            return Err(Rejection::StaleEpoch {
                stream: stream.to_string(),
                shard,
                epoch,
                current: s.epoch,
            });
        }
        Ok(s)
    }

    fn commit_segment(&mut self, commit: SegmentCommit) -> Reply {
        let mut rejected_shards = Vec::new();
        for sc in commit.shards {
            let check = self.shard_mut(&sc.stream, sc.shard).and_then(|shard| {
                // The same range of the same object again: a retry of a
                // commit whose answer was lost. It is already registered.
                if shard.segments.iter().rev().take(64).any(|r| {
                    r.object == commit.object
                        && r.row_group == sc.row_group
                        && r.first_offset == sc.first_offset
                        && r.last_offset == sc.last_offset
                }) {
                    return Ok(());
                }
                // A range of this owner's current lease that is already
                // committed: a retry whose range compaction or retention
                // has since rewritten or dropped (the owner commits each
                // range once per lease).
                if shard.epoch == sc.epoch
                    && shard.owner == Some(commit.broker)
                    && sc.last_offset < shard.committed_offset
                    && sc.first_offset <= sc.last_offset
                {
                    return Ok(());
                }
                if shard.epoch != sc.epoch || shard.owner != Some(commit.broker) {
                    return Err(Rejection::StaleEpoch {
                        stream: sc.stream.clone(),
                        shard: sc.shard,
                        epoch: sc.epoch,
                        current: shard.epoch,
                    });
                }
                if sc.first_offset != shard.committed_offset || sc.last_offset < sc.first_offset {
                    return Err(Rejection::OffsetGap {
                        stream: sc.stream.clone(),
                        shard: sc.shard,
                        expected: shard.committed_offset,
                        got: sc.first_offset,
                    });
                }
                shard.segments.push(SegmentRef {
                    object: commit.object.clone(),
                    row_group: sc.row_group,
                    first_offset: sc.first_offset,
                    last_offset: sc.last_offset,
                    epoch: sc.epoch,
                    record_count: sc.record_count,
                    min_timestamp_ms: sc.min_timestamp_ms,
                    max_timestamp_ms: sc.max_timestamp_ms,
                    object_size: commit.object_size,
                    committed_ms: commit.now_ms,
                    bytes: sc.bytes,
                });
                shard.committed_offset = sc.last_offset + 1;
                for pid in &sc.expired_producers {
                    shard.producers.remove(pid);
                }
                for (pid, state) in &sc.producers {
                    shard.producers.insert(*pid, state.clone());
                }
                Ok(())
            });
            if let Err(rejection) = check {
                rejected_shards.push(ShardRejection {
                    stream: sc.stream,
                    shard: sc.shard,
                    rejection,
                });
            }
        }
        Reply::SegmentCommitted {
            rejected: rejected_shards,
        }
    }

    fn commit_offsets(&mut self, group: String, offsets: Vec<OffsetCommit>, now_ms: i64) -> Reply {
        if group.is_empty() {
            return rejected(Rejection::Invalid {
                reason: "empty group id".into(),
            });
        }
        let entry = self.group_offsets.entry(group).or_default();
        for c in offsets {
            entry.entry(c.stream).or_default().insert(
                c.shard,
                GroupOffset {
                    offset: c.offset,
                    metadata: c.metadata,
                    commit_ms: now_ms,
                },
            );
        }
        Reply::Done
    }
}

/// A new lease on `s` for `broker`: the next epoch, any handoff cleared.
fn grant(s: &mut Shard, broker: BrokerId) -> Reply {
    s.epoch += 1;
    s.owner = Some(broker);
    s.handoff_to = None;
    Reply::Lease { epoch: s.epoch }
}

fn rejected(rejection: Rejection) -> Reply {
    Reply::Rejected { rejection }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::ShardCommit;

    fn create(state: &mut State, name: &str, partitions: i32) -> Reply {
        state.apply(Command::CreateStream {
            name: name.into(),
            partitions,
            config: BTreeMap::new(),
            id: 7,
            now_ms: 1,
            retention_default: true,
        })
    }

    #[test]
    fn a_withdrawn_handoff_cannot_be_completed() {
        let mut st = State::default();
        create(&mut st, "t", 1);
        let lease = |broker| Command::AssignShard {
            stream: "t".into(),
            shard: 0,
            broker,
            expected_epoch: 0,
        };
        assert_eq!(st.apply(lease(1)), Reply::Lease { epoch: 1 });
        let request = || Command::RequestHandoff {
            stream: "t".into(),
            shard: 0,
            to: 2,
            expected_epoch: 1,
        };
        let complete = |handoff_id| Command::CompleteHandoff {
            stream: "t".into(),
            shard: 0,
            to: 2,
            expected_epoch: 1,
            handoff_id,
        };
        let refused = |r: Reply| {
            matches!(
                r,
                Reply::Rejected {
                    rejection: Rejection::NoSuchHandoff { .. }
                }
            )
        };
        assert_eq!(st.apply(request()), Reply::Done);
        let cancel = Command::CancelHandoff {
            stream: "t".into(),
            shard: 0,
            expected_epoch: 1,
        };
        assert_eq!(st.apply(cancel), Reply::Done);
        assert!(refused(st.apply(complete(1))));
        // Asked again: only the new request's id completes it.
        assert_eq!(st.apply(request()), Reply::Done);
        assert!(refused(st.apply(complete(1))));
        assert_eq!(st.apply(complete(2)), Reply::Lease { epoch: 2 });
        let sh = &st.streams["t"].shards[0];
        assert_eq!((sh.owner, sh.handoff_to), (Some(2), None));
        // A repeated completion meets the new epoch.
        assert!(matches!(
            st.apply(complete(2)),
            Reply::Rejected {
                rejection: Rejection::StaleEpoch { .. }
            }
        ));
    }

    fn shard_commit(stream: &str, epoch: u64, first: i64, last: i64) -> ShardCommit {
        ShardCommit {
            stream: stream.into(),
            shard: 0,
            epoch,
            row_group: 0,
            first_offset: first,
            last_offset: last,
            record_count: (last - first + 1) as u64,
            min_timestamp_ms: 0,
            max_timestamp_ms: 0,
            producers: BTreeMap::new(),
            expired_producers: Vec::new(),
            bytes: 0,
        }
    }

    fn commit(broker: BrokerId, sc: ShardCommit) -> Command {
        Command::CommitSegment(SegmentCommit {
            broker,
            object: "o".into(),
            object_size: 10,
            shards: vec![sc],
            now_ms: 0,
        })
    }

    /// A CreateStream from a log written before retention existed has no
    /// `retention_default`: replayed, the stream keeps everything.
    #[test]
    fn a_create_logged_before_retention_keeps_unlimited_retention() {
        let logged =
            r#"{"create_stream":{"name":"a","partitions":1,"config":{},"id":"5","now_ms":0}}"#;
        let cmd: Command = serde_json::from_str(logged).unwrap();
        let mut s = State::default();
        let Reply::Stream { stream } = s.apply(cmd) else {
            panic!("not created")
        };
        assert!(!stream.retention_default);
        assert_eq!(s.lifecycle.retention_ms(&stream), -1);
        let Reply::Stream { stream } = create(&mut s, "b", 1) else {
            panic!("not created")
        };
        assert_eq!(
            s.lifecycle.retention_ms(&stream),
            crate::lifecycle::DEFAULT_RETENTION_MS
        );
    }

    #[test]
    fn create_twice_is_rejected() {
        let mut s = State::default();
        assert!(matches!(create(&mut s, "a", 2), Reply::Stream { .. }));
        assert!(matches!(
            create(&mut s, "a", 2),
            Reply::Rejected {
                rejection: Rejection::StreamExists { .. }
            }
        ));
        assert!(matches!(
            create(&mut s, "b", 0),
            Reply::Rejected {
                rejection: Rejection::InvalidPartitions { .. }
            }
        ));
    }

    #[test]
    fn stale_epoch_commit_is_fenced() {
        let mut s = State::default();
        create(&mut s, "a", 1);
        let Reply::Lease { epoch: e1 } = s.apply(Command::AcquireLease {
            stream: "a".into(),
            shard: 0,
            broker: 1,
        }) else {
            panic!("no lease")
        };
        let Reply::Lease { epoch: e2 } = s.apply(Command::AcquireLease {
            stream: "a".into(),
            shard: 0,
            broker: 2,
        }) else {
            panic!("no lease")
        };
        assert!(e2 > e1);
        let Reply::SegmentCommitted { rejected } = s.apply(commit(1, shard_commit("a", e1, 0, 9)))
        else {
            panic!("unexpected reply")
        };
        assert!(matches!(
            rejected[0].rejection,
            Rejection::StaleEpoch { .. }
        ));
        let Reply::SegmentCommitted { rejected } = s.apply(commit(2, shard_commit("a", e2, 0, 9)))
        else {
            panic!("unexpected reply")
        };
        assert!(rejected.is_empty());
        assert_eq!(s.streams["a"].shards[0].committed_offset, 10);
    }

    #[test]
    fn offsets_must_be_dense() {
        let mut s = State::default();
        create(&mut s, "a", 1);
        s.apply(Command::AcquireLease {
            stream: "a".into(),
            shard: 0,
            broker: 1,
        });
        let Reply::SegmentCommitted { rejected } = s.apply(commit(1, shard_commit("a", 1, 5, 9)))
        else {
            panic!("unexpected reply")
        };
        assert!(matches!(rejected[0].rejection, Rejection::OffsetGap { .. }));
        assert_eq!(s.streams["a"].shards[0].committed_offset, 0);
    }

    #[test]
    fn a_superseded_coordinator_cannot_commit() {
        let mut s = State::default();
        create(&mut s, "a", 1);
        let claim = |s: &mut State| match s.apply(Command::ClaimGroup { group: "g".into() }) {
            Reply::GroupEpoch { epoch } => epoch,
            other => panic!("{other:?}"),
        };
        let commit = |s: &mut State, epoch: Option<u64>, offset: i64| {
            s.apply(Command::CommitOffsets {
                group: "g".into(),
                offsets: vec![OffsetCommit {
                    stream: "a".into(),
                    shard: 0,
                    offset,
                    metadata: String::new(),
                }],
                now_ms: 1,
                coordinator_epoch: epoch,
            })
        };
        let old = claim(&mut s);
        assert_eq!(commit(&mut s, Some(old), 10), Reply::Done);
        let new = claim(&mut s);
        assert!(new > old);
        assert_eq!(commit(&mut s, Some(new), 20), Reply::Done);
        // The old coordinator's late commit is refused; offsets stay.
        assert!(matches!(
            commit(&mut s, Some(old), 15),
            Reply::Rejected {
                rejection: Rejection::StaleCoordinator { .. }
            }
        ));
        // A commit outside group membership is always taken.
        assert_eq!(commit(&mut s, None, 25), Reply::Done);
        let QueryReply::GroupOffsets { offsets } =
            s.query(&Query::GroupOffsets { group: "g".into() })
        else {
            panic!("unexpected reply")
        };
        assert_eq!(offsets["a"][&0].offset, 25);
    }

    #[test]
    fn partitions_only_grow_and_offsets_are_kept() {
        let mut s = State::default();
        create(&mut s, "a", 1);
        assert!(matches!(
            s.apply(Command::CreatePartitions {
                name: "a".into(),
                count: 1
            }),
            Reply::Rejected { .. }
        ));
        assert!(matches!(
            s.apply(Command::CreatePartitions {
                name: "a".into(),
                count: 3
            }),
            Reply::Stream { .. }
        ));
        s.apply(Command::CommitOffsets {
            group: "g".into(),
            offsets: vec![OffsetCommit {
                stream: "a".into(),
                shard: 2,
                offset: 42,
                metadata: String::new(),
            }],
            now_ms: 5,
            coordinator_epoch: None,
        });
        let QueryReply::GroupOffsets { offsets } =
            s.query(&Query::GroupOffsets { group: "g".into() })
        else {
            panic!("unexpected reply")
        };
        assert_eq!(offsets["a"][&2].offset, 42);
    }
}
