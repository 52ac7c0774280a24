//! Consumer-group APIs: the coordinator (group.rs) for membership, and
//! placement for committed offsets.

use std::collections::BTreeSet;
use std::time::Instant;

use kafka_protocol::ResponseError;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::{
    DeleteGroupsRequest, DeleteGroupsResponse, DescribeGroupsRequest, DescribeGroupsResponse,
    GroupId, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse,
    LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse,
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse,
    ResponseKind, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use shoal_placement::{Command, OffsetCommit, Reply};

use super::conn::Ctx;
use super::{Pending, ready};
use crate::broker::now_ms;
use crate::group::{JoinParams, JoinResult, SyncResult, Waiting};

fn s(v: impl Into<String>) -> StrBytes {
    StrBytes::from_string(v.into())
}

pub async fn join_group(ctx: &Ctx, req: JoinGroupRequest, version: i16) -> Pending {
    if !ctx.broker.is_coordinator(req.group_id.as_str()) {
        return ready(ResponseKind::JoinGroup(
            JoinGroupResponse::default().with_error_code(ResponseError::NotCoordinator.code()),
        ));
    }
    // Taking up a group: placement hands out a new coordinator epoch, which
    // fences the commits of whichever broker coordinated it before.
    let mut coordinator_epoch = 0;
    if !ctx.broker.groups.has(req.group_id.as_str()) {
        match ctx
            .broker
            .placement
            .write(Command::ClaimGroup {
                group: req.group_id.to_string(),
            })
            .await
        {
            Ok(Reply::GroupEpoch { epoch }) => coordinator_epoch = epoch,
            other => {
                tracing::warn!(group = %req.group_id.as_str(), "claiming the group: {other:?}");
                return ready(ResponseKind::JoinGroup(
                    JoinGroupResponse::default()
                        .with_error_code(ResponseError::CoordinatorNotAvailable.code()),
                ));
            }
        }
    }
    let params = JoinParams {
        group_id: req.group_id.to_string(),
        member_id: req.member_id.to_string(),
        group_instance_id: req.group_instance_id.map(|i| i.to_string()),
        client_id: ctx.client_id.clone(),
        client_host: format!("/{}", ctx.peer.ip()),
        session_timeout_ms: req.session_timeout_ms,
        // v0 has no rebalance timeout: Kafka uses the session timeout.
        rebalance_timeout_ms: if version == 0 {
            req.session_timeout_ms
        } else {
            req.rebalance_timeout_ms
        },
        protocol_type: req.protocol_type.to_string(),
        protocols: req
            .protocols
            .into_iter()
            .map(|p| (p.name.to_string(), p.metadata))
            .collect(),
        require_known_member_id: version >= 4,
        coordinator_epoch,
    };
    let waiting = ctx.broker.groups.join(params, Instant::now());
    Box::pin(async move {
        let r = match waiting {
            Waiting::Ready(r) => r,
            Waiting::Wait(rx) => rx.await.unwrap_or_else(|_| JoinResult {
                error: ResponseError::RebalanceInProgress.code(),
                generation: -1,
                ..JoinResult::default()
            }),
        };
        Some(ResponseKind::JoinGroup(
            JoinGroupResponse::default()
                .with_error_code(r.error)
                .with_generation_id(r.generation)
                .with_protocol_type(r.protocol_type.map(s))
                .with_protocol_name(Some(s(r.protocol_name.unwrap_or_default())))
                .with_leader(s(r.leader))
                .with_member_id(s(r.member_id))
                .with_members(
                    r.members
                        .into_iter()
                        .map(|(id, inst, meta)| {
                            JoinGroupResponseMember::default()
                                .with_member_id(s(id))
                                .with_group_instance_id(inst.map(s))
                                .with_metadata(meta)
                        })
                        .collect(),
                ),
        ))
    })
}

pub fn sync_group(ctx: &Ctx, req: SyncGroupRequest) -> Pending {
    if !ctx.broker.is_coordinator(req.group_id.as_str()) {
        return ready(ResponseKind::SyncGroup(
            SyncGroupResponse::default().with_error_code(ResponseError::NotCoordinator.code()),
        ));
    }
    let waiting = ctx.broker.groups.sync(
        req.group_id.as_str(),
        req.generation_id,
        req.member_id.as_str(),
        req.assignments
            .into_iter()
            .map(|a| (a.member_id.to_string(), a.assignment))
            .collect(),
        Instant::now(),
    );
    Box::pin(async move {
        let r = match waiting {
            Waiting::Ready(r) => r,
            Waiting::Wait(rx) => rx.await.unwrap_or_else(|_| SyncResult {
                error: ResponseError::RebalanceInProgress.code(),
                ..SyncResult::default()
            }),
        };
        Some(ResponseKind::SyncGroup(
            SyncGroupResponse::default()
                .with_error_code(r.error)
                .with_protocol_type(r.protocol_type.map(s))
                .with_protocol_name(r.protocol_name.map(s))
                .with_assignment(r.assignment),
        ))
    })
}

pub fn heartbeat(ctx: &Ctx, req: HeartbeatRequest) -> Pending {
    if !ctx.broker.is_coordinator(req.group_id.as_str()) {
        return ready(ResponseKind::Heartbeat(
            HeartbeatResponse::default().with_error_code(ResponseError::NotCoordinator.code()),
        ));
    }
    let code = ctx.broker.groups.heartbeat(
        req.group_id.as_str(),
        req.generation_id,
        req.member_id.as_str(),
        Instant::now(),
    );
    ready(ResponseKind::Heartbeat(
        HeartbeatResponse::default().with_error_code(code),
    ))
}

pub fn leave_group(ctx: &Ctx, req: LeaveGroupRequest, version: i16) -> Pending {
    if !ctx.broker.is_coordinator(req.group_id.as_str()) {
        return ready(ResponseKind::LeaveGroup(
            LeaveGroupResponse::default().with_error_code(ResponseError::NotCoordinator.code()),
        ));
    }
    let ids: Vec<String> = if version >= 3 {
        req.members
            .iter()
            .map(|m| m.member_id.to_string())
            .collect()
    } else {
        vec![req.member_id.to_string()]
    };
    let codes = ctx
        .broker
        .groups
        .leave(req.group_id.as_str(), &ids, Instant::now());
    let mut resp = LeaveGroupResponse::default();
    if version >= 3 {
        resp = resp.with_members(
            req.members
                .into_iter()
                .zip(codes)
                .map(|(m, code)| {
                    MemberResponse::default()
                        .with_member_id(m.member_id)
                        .with_group_instance_id(m.group_instance_id)
                        .with_error_code(code)
                })
                .collect(),
        );
    } else {
        resp = resp.with_error_code(codes.first().copied().unwrap_or(0));
    }
    ready(ResponseKind::LeaveGroup(resp))
}

pub async fn offset_commit(ctx: &Ctx, req: OffsetCommitRequest) -> Pending {
    let b = &ctx.broker;
    let group = req.group_id.as_str();
    // A commit outside group membership (generation -1, no member: manual
    // assignment) touches no coordinator state; offsets live in placement,
    // so any broker takes it. Otherwise a broker that thinks it is not the
    // coordinator checks again with a fresh live list before saying so:
    // brokers learn the live list at different heartbeats.
    let standalone_commit =
        req.generation_id_or_member_epoch < 0 && req.member_id.as_str().is_empty();
    if !standalone_commit && !b.is_coordinator(group) && b.cluster.is_some() {
        let _ = crate::cluster::refresh(b).await;
    }
    let (mut code, coordinator_epoch) = if standalone_commit || b.is_coordinator(group) {
        match b.groups.check_commit(
            req.group_id.as_str(),
            req.generation_id_or_member_epoch,
            req.member_id.as_str(),
        ) {
            Ok(epoch) => (0, epoch),
            Err(code) => (code, None),
        }
    } else {
        (ResponseError::NotCoordinator.code(), None)
    };
    // Kafka answers UNKNOWN_TOPIC_OR_PARTITION for a partition that does
    // not exist, per partition, and commits the others.
    let exists = |topic: &str, partition: i32| {
        b.stream(topic)
            .is_some_and(|s| (0..s.partition_count()).contains(&partition))
    };
    let any_unknown = || {
        req.topics.iter().any(|t| {
            t.partitions
                .iter()
                .any(|p| !exists(t.name.as_str(), p.partition_index))
        })
    };
    if code == 0 && b.cluster.is_some() && any_unknown() {
        // Created on another broker since this one's last heartbeat?
        let _ = crate::cluster::refresh(b).await;
    }
    let partition_code = |topic: &str, partition: i32, code: i16| {
        if code == 0 && !exists(topic, partition) {
            ResponseError::UnknownTopicOrPartition.code()
        } else {
            code
        }
    };
    if code == 0 {
        let offsets: Vec<OffsetCommit> = req
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions
                    .iter()
                    .filter(|p| exists(t.name.as_str(), p.partition_index))
                    .map(|p| OffsetCommit {
                        stream: t.name.to_string(),
                        shard: p.partition_index,
                        offset: p.committed_offset,
                        metadata: p
                            .committed_metadata
                            .as_ref()
                            .map(|m| m.to_string())
                            .unwrap_or_default(),
                    })
            })
            .collect();
        if !offsets.is_empty() {
            code = match b
                .placement
                .write(Command::CommitOffsets {
                    group: req.group_id.to_string(),
                    offsets,
                    now_ms: now_ms(),
                    coordinator_epoch,
                })
                .await
            {
                Ok(Reply::Done) => 0,
                // Another broker has taken the group over since.
                Ok(Reply::Rejected {
                    rejection: shoal_placement::Rejection::StaleCoordinator { .. },
                }) => ResponseError::NotCoordinator.code(),
                Ok(Reply::Rejected { rejection }) => {
                    tracing::debug!("offset commit rejected: {rejection}");
                    ResponseError::InvalidGroupId.code()
                }
                Ok(_) => ResponseError::UnknownServerError.code(),
                Err(e) => {
                    tracing::warn!("offset commit failed: {e}");
                    ResponseError::CoordinatorNotAvailable.code()
                }
            };
        }
    }
    let topics = req
        .topics
        .into_iter()
        .map(|t| {
            let parts = t
                .partitions
                .iter()
                .map(|p| {
                    OffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(partition_code(t.name.as_str(), p.partition_index, code))
                })
                .collect();
            OffsetCommitResponseTopic::default()
                .with_name(t.name)
                .with_partitions(parts)
        })
        .collect();
    ready(ResponseKind::OffsetCommit(
        OffsetCommitResponse::default().with_topics(topics),
    ))
}

pub async fn offset_fetch(ctx: &Ctx, req: OffsetFetchRequest, _version: i16) -> Pending {
    let b = &ctx.broker;
    let committed = match b.placement.group_offsets(req.group_id.as_str()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("offset fetch failed: {e}");
            return ready(ResponseKind::OffsetFetch(
                OffsetFetchResponse::default()
                    .with_error_code(ResponseError::CoordinatorNotAvailable.code()),
            ));
        }
    };
    let requested: Vec<(String, Vec<i32>)> = match req.topics {
        Some(topics) => topics
            .into_iter()
            .map(|t| (t.name.to_string(), t.partition_indexes))
            .collect(),
        // null = every partition with a committed offset
        None => committed
            .iter()
            .map(|(t, parts)| (t.clone(), parts.keys().copied().collect()))
            .collect(),
    };
    let topics = requested
        .into_iter()
        .map(|(topic, parts)| {
            let partitions = parts
                .into_iter()
                .map(|p| {
                    let c = committed.get(&topic).and_then(|m| m.get(&p));
                    OffsetFetchResponsePartition::default()
                        .with_partition_index(p)
                        .with_committed_offset(c.map(|c| c.offset).unwrap_or(-1))
                        .with_committed_leader_epoch(-1)
                        .with_metadata(Some(s(c.map(|c| c.metadata.clone()).unwrap_or_default())))
                })
                .collect();
            OffsetFetchResponseTopic::default()
                .with_name(TopicName(s(topic)))
                .with_partitions(partitions)
        })
        .collect();
    ready(ResponseKind::OffsetFetch(
        OffsetFetchResponse::default().with_topics(topics),
    ))
}

pub async fn describe_groups(ctx: &Ctx, req: DescribeGroupsRequest) -> Pending {
    let b = &ctx.broker;
    let with_offsets: BTreeSet<String> = b
        .placement
        .list_groups()
        .await
        .unwrap_or_default()
        .into_iter()
        .collect();
    let groups = req
        .groups
        .into_iter()
        .map(|g| {
            let d = DescribedGroup::default().with_group_id(g.clone());
            match b.groups.describe(g.as_str()) {
                Some(desc) => d
                    .with_group_state(s(desc.state.as_str()))
                    .with_protocol_type(s(desc.protocol_type))
                    .with_protocol_data(s(desc.protocol))
                    .with_members(
                        desc.members
                            .into_iter()
                            .map(|m| {
                                DescribedGroupMember::default()
                                    .with_member_id(s(m.member_id))
                                    .with_group_instance_id(m.group_instance_id.map(s))
                                    .with_client_id(s(m.client_id))
                                    .with_client_host(s(m.client_host))
                                    .with_member_metadata(m.metadata)
                                    .with_member_assignment(m.assignment)
                            })
                            .collect(),
                    ),
                None if with_offsets.contains(g.as_str()) => d
                    .with_group_state(s("Empty"))
                    .with_protocol_type(s("consumer")),
                None => d.with_group_state(s("Dead")),
            }
        })
        .collect();
    ready(ResponseKind::DescribeGroups(
        DescribeGroupsResponse::default().with_groups(groups),
    ))
}

pub async fn list_groups(ctx: &Ctx, req: ListGroupsRequest) -> Pending {
    let b = &ctx.broker;
    let mut all: std::collections::BTreeMap<String, (String, String)> = b
        .placement
        .list_groups()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|g| (g, ("consumer".to_string(), "Empty".to_string())))
        .collect();
    for (g, ptype, state) in b.groups.list() {
        all.insert(g, (ptype, state.as_str().to_string()));
    }
    let groups = all
        .into_iter()
        .filter(|(_, (_, state))| {
            req.states_filter.is_empty()
                || req
                    .states_filter
                    .iter()
                    .any(|f| f.as_str().eq_ignore_ascii_case(state))
        })
        .map(|(g, (ptype, state))| {
            ListedGroup::default()
                .with_group_id(GroupId(s(g)))
                .with_protocol_type(s(ptype))
                .with_group_state(s(state))
                .with_group_type(s("classic"))
        })
        .collect();
    ready(ResponseKind::ListGroups(
        ListGroupsResponse::default().with_groups(groups),
    ))
}

pub async fn delete_groups(ctx: &Ctx, req: DeleteGroupsRequest) -> Pending {
    let b = &ctx.broker;
    let known: BTreeSet<String> = b
        .placement
        .list_groups()
        .await
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut results = Vec::with_capacity(req.groups_names.len());
    for g in req.groups_names {
        let in_memory = b.groups.describe(g.as_str()).is_some();
        let mut code = if !in_memory && !known.contains(g.as_str()) {
            ResponseError::GroupIdNotFound.code()
        } else {
            b.groups.delete(g.as_str())
        };
        if code == 0 {
            code = match b
                .placement
                .write(Command::DeleteGroup {
                    group: g.to_string(),
                })
                .await
            {
                Ok(_) => 0,
                Err(e) => {
                    tracing::warn!("deleting group: {e}");
                    ResponseError::CoordinatorNotAvailable.code()
                }
            };
        }
        results.push(
            DeletableGroupResult::default()
                .with_group_id(g)
                .with_error_code(code),
        );
    }
    ready(ResponseKind::DeleteGroups(
        DeleteGroupsResponse::default().with_results(results),
    ))
}
