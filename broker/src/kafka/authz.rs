//! Kafka ACLs on every API, in one place: before a request reaches its
//! handler, the resources its principal may not touch are taken out of it,
//! and their errors (TOPIC_, GROUP_ or CLUSTER_AUTHORIZATION_FAILED) are
//! added to the handler's response. Without `--authorizer` everything
//! passes untouched. Metadata, which hides topics rather than refusing
//! them, does its own filtering (metadata.rs).

use kafka_protocol::ResponseError;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_groups_response::DescribedGroup;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::*;
use shoal_security::acl::{Operation, ResourceType};

use super::conn::Ctx;
use super::{Pending, ready};

const TOPIC: i16 = ResponseError::TopicAuthorizationFailed.code();
const GROUP: i16 = ResponseError::GroupAuthorizationFailed.code();
const CLUSTER: i16 = ResponseError::ClusterAuthorizationFailed.code();

/// One principal's rights against one snapshot of the ACLs.
pub(crate) struct Decider {
    /// The ACLs arrived from placement (denied until they have).
    pub(crate) loaded: bool,
    pub(crate) config: shoal_security::acl::AuthorizerConfig,
    pub(crate) security: std::sync::Arc<shoal_placement::Security>,
    pub(crate) principal: String,
    pub(crate) host: String,
}

impl Decider {
    pub(crate) fn allows(
        &self,
        op: Operation,
        resource_type: shoal_security::acl::ResourceType,
        name: &str,
    ) -> bool {
        self.loaded
            && shoal_security::acl::authorize(
                &self.security.acls,
                &self.config,
                &self.principal,
                &self.host,
                op,
                resource_type,
                name,
            )
    }
}

/// Authorizes `req`, runs what is left of it, and adds the refusals.
pub(crate) async fn dispatch(
    ctx: &Ctx,
    header: &RequestHeader,
    version: i16,
    req: RequestKind,
) -> Pending {
    if ctx.broker.config.authorizer.is_none() {
        return super::conn::dispatch(ctx, header, version, req).await;
    }
    use RequestKind as R;
    let (req, added): (RequestKind, Added) = match req {
        R::Produce(mut r) => {
            let denied = take(&mut r.topic_data, |t| {
                !ctx.allowed_topic(Operation::Write, &t.name)
            });
            (R::Produce(r), Added::Produce(denied))
        }
        R::Fetch(mut r) => {
            let denied = take(&mut r.topics, |t| {
                !ctx.allowed_topic(Operation::Read, &t.topic)
            });
            (R::Fetch(r), Added::Fetch(denied))
        }
        R::ListOffsets(mut r) => {
            let denied = take(&mut r.topics, |t| {
                !ctx.allowed_topic(Operation::Describe, &t.name)
            });
            (R::ListOffsets(r), Added::ListOffsets(denied))
        }
        R::CreateTopics(mut r) => {
            let cluster = ctx.allowed_cluster(Operation::Create);
            let denied = take(&mut r.topics, |t| {
                !cluster && !ctx.allowed_topic(Operation::Create, &t.name)
            });
            (R::CreateTopics(r), Added::CreateTopics(denied))
        }
        R::DeleteTopics(mut r) => {
            let by_name = take(&mut r.topic_names, |n| {
                !ctx.allowed_topic(Operation::Delete, n)
            });
            let by_state = take(&mut r.topics, |t| {
                t.name
                    .as_ref()
                    .is_some_and(|n| !ctx.allowed_topic(Operation::Delete, n))
            });
            let mut denied = by_name;
            denied.extend(by_state.into_iter().filter_map(|t| t.name));
            (R::DeleteTopics(r), Added::DeleteTopics(denied))
        }
        R::OffsetCommit(mut r) => {
            if !ctx.allowed_group(Operation::Read, &r.group_id) {
                let all = std::mem::take(&mut r.topics);
                return refuse_commit(all, GROUP);
            }
            let denied = take(&mut r.topics, |t| {
                !ctx.allowed_topic(Operation::Read, &t.name)
            });
            (R::OffsetCommit(r), Added::OffsetCommit(denied))
        }
        R::DescribeGroups(mut r) => {
            let denied = take(&mut r.groups, |g| {
                !ctx.allowed_group(Operation::Describe, g)
            });
            (R::DescribeGroups(r), Added::DescribeGroups(denied))
        }
        R::DeleteGroups(mut r) => {
            let denied = take(&mut r.groups_names, |g| {
                !ctx.allowed_group(Operation::Delete, g)
            });
            (R::DeleteGroups(r), Added::DeleteGroups(denied))
        }
        R::ListGroups(r) if !ctx.allowed_cluster(Operation::Describe) => {
            // Only the groups the principal may describe are listed.
            let inner = super::conn::dispatch(ctx, header, version, R::ListGroups(r)).await;
            let decider = ctx.decider();
            return Box::pin(async move {
                let mut resp = inner.await?;
                if let (ResponseKind::ListGroups(l), Some(d)) = (&mut resp, &decider) {
                    l.groups.retain(|g| {
                        d.allows(Operation::Describe, ResourceType::Group, &g.group_id)
                    });
                }
                Some(resp)
            });
        }
        R::OffsetFetch(r) if ctx.allowed_group(Operation::Describe, &r.group_id) => {
            // Offsets of topics the principal may not describe are left out.
            let inner = super::conn::dispatch(ctx, header, version, R::OffsetFetch(r)).await;
            let decider = ctx.decider();
            return Box::pin(async move {
                let mut resp = inner.await?;
                if let (ResponseKind::OffsetFetch(o), Some(d)) = (&mut resp, &decider) {
                    o.topics
                        .retain(|t| d.allows(Operation::Describe, ResourceType::Topic, &t.name));
                }
                Some(resp)
            });
        }
        R::FindCoordinator(mut r) if version >= 4 && r.key_type == 0 => {
            let denied = take(&mut r.coordinator_keys, |k| {
                !ctx.allowed_group(Operation::Describe, k)
            });
            (R::FindCoordinator(r), Added::Coordinators(denied))
        }
        other => match refusal(ctx, &other, version) {
            Some(resp) => return ready(resp),
            None => (other, Added::Nothing),
        },
    };
    let inner = super::conn::dispatch(ctx, header, version, req).await;
    if added.is_empty() {
        return inner;
    }
    Box::pin(async move {
        let mut resp = inner.await?;
        added.into(&mut resp);
        Some(resp)
    })
}

/// Takes the items `denied` says out of `items`, returning them.
fn take<T>(items: &mut Vec<T>, mut denied: impl FnMut(&T) -> bool) -> Vec<T> {
    let (out, kept): (Vec<T>, Vec<T>) = std::mem::take(items).into_iter().partition(|t| denied(t));
    *items = kept;
    out
}

/// Requests refused as a whole: one group or the cluster decides.
fn refusal(ctx: &Ctx, req: &RequestKind, version: i16) -> Option<ResponseKind> {
    use RequestKind as R;
    let group = |g: &str, op| !ctx.allowed_group(op, g);
    let cluster = |op| !ctx.allowed_cluster(op);
    Some(match req {
        R::JoinGroup(r) if group(&r.group_id, Operation::Read) => {
            ResponseKind::JoinGroup(JoinGroupResponse::default().with_error_code(GROUP))
        }
        R::SyncGroup(r) if group(&r.group_id, Operation::Read) => {
            ResponseKind::SyncGroup(SyncGroupResponse::default().with_error_code(GROUP))
        }
        R::Heartbeat(r) if group(&r.group_id, Operation::Read) => {
            ResponseKind::Heartbeat(HeartbeatResponse::default().with_error_code(GROUP))
        }
        R::LeaveGroup(r) if group(&r.group_id, Operation::Read) => {
            ResponseKind::LeaveGroup(LeaveGroupResponse::default().with_error_code(GROUP))
        }
        // The top-level error exists from v2; v1 answers per partition.
        R::OffsetFetch(_) if version >= 2 => {
            ResponseKind::OffsetFetch(OffsetFetchResponse::default().with_error_code(GROUP))
        }
        R::OffsetFetch(r) => ResponseKind::OffsetFetch(
            OffsetFetchResponse::default().with_topics(
                r.topics
                    .iter()
                    .flatten()
                    .map(|t| {
                        offset_fetch_response::OffsetFetchResponseTopic::default()
                            .with_name(t.name.clone())
                            .with_partitions(
                                t.partition_indexes
                                    .iter()
                                    .map(|p| {
                                        offset_fetch_response::OffsetFetchResponsePartition::default()
                                            .with_partition_index(*p)
                                            .with_committed_offset(-1)
                                            .with_error_code(GROUP)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ),
        ),
        // Before v4, one key and one answer (v4 is answered per key above).
        R::FindCoordinator(r) if r.key_type == 0 && group(&r.key, Operation::Describe) => {
            ResponseKind::FindCoordinator(FindCoordinatorResponse::default().with_error_code(GROUP))
        }
        R::InitProducerId(_)
            if cluster(Operation::IdempotentWrite) && !writes_some_topic(ctx) =>
        {
            ResponseKind::InitProducerId(InitProducerIdResponse::default().with_error_code(CLUSTER))
        }
        R::DescribeCluster(_) if cluster(Operation::Describe) => ResponseKind::DescribeCluster(
            DescribeClusterResponse::default().with_error_code(CLUSTER),
        ),
        R::DescribeUserScramCredentials(_) if cluster(Operation::Describe) => {
            ResponseKind::DescribeUserScramCredentials(
                DescribeUserScramCredentialsResponse::default().with_error_code(CLUSTER),
            )
        }
        R::AlterUserScramCredentials(r) if cluster(Operation::Alter) => {
            let mut users: Vec<_> = r
                .deletions
                .iter()
                .map(|d| d.name.clone())
                .chain(r.upsertions.iter().map(|u| u.name.clone()))
                .collect();
            users.sort();
            users.dedup();
            ResponseKind::AlterUserScramCredentials(
                AlterUserScramCredentialsResponse::default().with_results(
                    users
                        .into_iter()
                        .map(|u| {
                            alter_user_scram_credentials_response::AlterUserScramCredentialsResult::default()
                                .with_user(u)
                                .with_error_code(CLUSTER)
                        })
                        .collect(),
                ),
            )
        }
        R::DeleteRecords(r) if r.topics.iter().any(|t| !ctx.allowed_topic(Operation::Delete, &t.name)) => {
            ResponseKind::DeleteRecords(DeleteRecordsResponse::default().with_topics(
                r.topics
                    .iter()
                    .map(|t| {
                        let code = if ctx.allowed_topic(Operation::Delete, &t.name) {
                            ResponseError::UnknownServerError.code()
                        } else {
                            TOPIC
                        };
                        delete_records_response::DeleteRecordsTopicResult::default()
                            .with_name(t.name.clone())
                            .with_partitions(
                                t.partitions
                                    .iter()
                                    .map(|p| {
                                        delete_records_response::DeleteRecordsPartitionResult::default()
                                            .with_partition_index(p.partition_index)
                                            .with_low_watermark(-1)
                                            .with_error_code(code)
                                    })
                                    .collect(),
                            )
                    })
                    .collect(),
            ))
        }
        R::CreatePartitions(r) if r.topics.iter().any(|t| !ctx.allowed_topic(Operation::Alter, &t.name)) => {
            ResponseKind::CreatePartitions(CreatePartitionsResponse::default().with_results(
                r.topics
                    .iter()
                    .map(|t| {
                        create_partitions_response::CreatePartitionsTopicResult::default()
                            .with_name(t.name.clone())
                            .with_error_code(if ctx.allowed_topic(Operation::Alter, &t.name) {
                                ResponseError::UnknownServerError.code()
                            } else {
                                TOPIC
                            })
                    })
                    .collect(),
            ))
        }
        R::DescribeConfigs(r) if r.resources.iter().any(|c| !config_allowed(ctx, c.resource_type, &c.resource_name, Operation::DescribeConfigs)) => {
            ResponseKind::DescribeConfigs(DescribeConfigsResponse::default().with_results(
                r.resources
                    .iter()
                    .map(|c| {
                        describe_configs_response::DescribeConfigsResult::default()
                            .with_resource_type(c.resource_type)
                            .with_resource_name(c.resource_name.clone())
                            .with_error_code(config_code(ctx, c.resource_type, &c.resource_name, Operation::DescribeConfigs))
                    })
                    .collect(),
            ))
        }
        R::IncrementalAlterConfigs(r) if r.resources.iter().any(|c| !config_allowed(ctx, c.resource_type, &c.resource_name, Operation::AlterConfigs)) => {
            ResponseKind::IncrementalAlterConfigs(IncrementalAlterConfigsResponse::default().with_responses(
                r.resources
                    .iter()
                    .map(|c| {
                        incremental_alter_configs_response::AlterConfigsResourceResponse::default()
                            .with_resource_type(c.resource_type)
                            .with_resource_name(c.resource_name.clone())
                            .with_error_code(config_code(ctx, c.resource_type, &c.resource_name, Operation::AlterConfigs))
                    })
                    .collect(),
            ))
        }
        _ => return None,
    })
}

/// Config resources: 2 is a topic, 4 a broker (the cluster's rights).
fn config_allowed(ctx: &Ctx, resource_type: i8, name: &str, op: Operation) -> bool {
    match resource_type {
        2 => ctx.allowed_topic(op, name),
        _ => ctx.allowed_cluster(op),
    }
}

/// A mixed request is refused whole: the allowed resources get a
/// retriable-looking error rather than a half-applied change.
fn config_code(ctx: &Ctx, resource_type: i8, name: &str, op: Operation) -> i16 {
    match (config_allowed(ctx, resource_type, name, op), resource_type) {
        (true, _) => ResponseError::UnknownServerError.code(),
        (false, 2) => TOPIC,
        (false, _) => CLUSTER,
    }
}

/// Kafka lets a producer that may write some topic be idempotent.
fn writes_some_topic(ctx: &Ctx) -> bool {
    let security = ctx.broker.users.snapshot();
    security.acls.iter().any(|b| {
        b.resource_type == shoal_security::acl::ResourceType::Topic
            && matches!(b.operation, Operation::Write | Operation::All)
            && b.permission == shoal_security::acl::Permission::Allow
            && ctx.allowed_topic(Operation::Write, &b.resource_name)
    })
}

fn refuse_commit(
    topics: Vec<offset_commit_request::OffsetCommitRequestTopic>,
    code: i16,
) -> Pending {
    let mut resp = ResponseKind::OffsetCommit(OffsetCommitResponse::default());
    Added::OffsetCommit(topics).into_with(&mut resp, code);
    ready(resp)
}

/// What was taken out of a request, to answer for in its response.
enum Added {
    Nothing,
    Produce(Vec<produce_request::TopicProduceData>),
    Fetch(Vec<fetch_request::FetchTopic>),
    ListOffsets(Vec<list_offsets_request::ListOffsetsTopic>),
    CreateTopics(Vec<create_topics_request::CreatableTopic>),
    DeleteTopics(Vec<TopicName>),
    OffsetCommit(Vec<offset_commit_request::OffsetCommitRequestTopic>),
    DescribeGroups(Vec<GroupId>),
    DeleteGroups(Vec<GroupId>),
    Coordinators(Vec<kafka_protocol::protocol::StrBytes>),
}

impl Added {
    fn is_empty(&self) -> bool {
        match self {
            Added::Nothing => true,
            Added::Produce(v) => v.is_empty(),
            Added::Fetch(v) => v.is_empty(),
            Added::ListOffsets(v) => v.is_empty(),
            Added::CreateTopics(v) => v.is_empty(),
            Added::DeleteTopics(v) => v.is_empty(),
            Added::OffsetCommit(v) => v.is_empty(),
            Added::DescribeGroups(v) => v.is_empty(),
            Added::DeleteGroups(v) => v.is_empty(),
            Added::Coordinators(v) => v.is_empty(),
        }
    }

    fn into(self, resp: &mut ResponseKind) {
        let code = match self {
            Added::DescribeGroups(_) | Added::DeleteGroups(_) | Added::Coordinators(_) => GROUP,
            _ => TOPIC,
        };
        self.into_with(resp, code);
    }

    fn into_with(self, resp: &mut ResponseKind, code: i16) {
        match (self, resp) {
            (Added::Produce(ts), ResponseKind::Produce(r)) => {
                r.responses.extend(ts.into_iter().map(|t| {
                    TopicProduceResponse::default()
                        .with_name(t.name)
                        .with_partition_responses(
                            t.partition_data
                                .iter()
                                .map(|p| {
                                    PartitionProduceResponse::default()
                                        .with_index(p.index)
                                        .with_error_code(code)
                                        .with_base_offset(-1)
                                        .with_log_append_time_ms(-1)
                                        .with_log_start_offset(-1)
                                })
                                .collect(),
                        )
                }))
            }
            (Added::Fetch(ts), ResponseKind::Fetch(r)) => {
                r.responses.extend(ts.into_iter().map(|t| {
                    FetchableTopicResponse::default()
                        .with_topic(t.topic)
                        .with_topic_id(t.topic_id)
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    PartitionData::default()
                                        .with_partition_index(p.partition)
                                        .with_error_code(code)
                                        .with_high_watermark(-1)
                                        .with_last_stable_offset(-1)
                                        .with_log_start_offset(-1)
                                })
                                .collect(),
                        )
                }))
            }
            (Added::ListOffsets(ts), ResponseKind::ListOffsets(r)) => {
                r.topics.extend(ts.into_iter().map(|t| {
                    ListOffsetsTopicResponse::default()
                        .with_name(t.name)
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    ListOffsetsPartitionResponse::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(code)
                                        .with_timestamp(-1)
                                        .with_offset(-1)
                                })
                                .collect(),
                        )
                }))
            }
            (Added::CreateTopics(ts), ResponseKind::CreateTopics(r)) => {
                r.topics.extend(ts.into_iter().map(|t| {
                    CreatableTopicResult::default()
                        .with_name(t.name)
                        .with_error_code(code)
                        .with_num_partitions(-1)
                        .with_replication_factor(-1)
                }))
            }
            (Added::DeleteTopics(ts), ResponseKind::DeleteTopics(r)) => {
                r.responses.extend(ts.into_iter().map(|n| {
                    DeletableTopicResult::default()
                        .with_name(Some(n))
                        .with_error_code(code)
                }))
            }
            (Added::OffsetCommit(ts), ResponseKind::OffsetCommit(r)) => {
                r.topics.extend(ts.into_iter().map(|t| {
                    OffsetCommitResponseTopic::default()
                        .with_name(t.name)
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    OffsetCommitResponsePartition::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(code)
                                })
                                .collect(),
                        )
                }))
            }
            (Added::DescribeGroups(gs), ResponseKind::DescribeGroups(r)) => {
                r.groups.extend(gs.into_iter().map(|g| {
                    DescribedGroup::default()
                        .with_group_id(g)
                        .with_error_code(code)
                }))
            }
            (Added::DeleteGroups(gs), ResponseKind::DeleteGroups(r)) => {
                r.results.extend(gs.into_iter().map(|g| {
                    DeletableGroupResult::default()
                        .with_group_id(g)
                        .with_error_code(code)
                }))
            }
            (Added::Coordinators(keys), ResponseKind::FindCoordinator(r)) => {
                r.coordinators.extend(keys.into_iter().map(|k| {
                    find_coordinator_response::Coordinator::default()
                        .with_key(k)
                        .with_node_id(BrokerId(-1))
                        .with_port(-1)
                        .with_error_code(code)
                }))
            }
            _ => {}
        }
    }
}
