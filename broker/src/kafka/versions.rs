//! Which API versions Shoal answers. Clients negotiate down to these via
//! ApiVersions; a version outside them closes the connection with a log line.

use kafka_protocol::messages::ApiKey;

const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 9),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 0, 7),
    (ApiKey::DeleteTopics, 0, 5),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::DescribeConfigs, 0, 4),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::DescribeCluster, 0, 1),
    (ApiKey::DeleteRecords, 0, 2),
    // librdkafka wants v0 listed before it uses SASL at all; a v0 request
    // itself (SASL tokens without Kafka framing after it) is refused.
    (ApiKey::SaslHandshake, 0, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
    (ApiKey::DescribeAcls, 1, 3),
    (ApiKey::CreateAcls, 1, 3),
    (ApiKey::DeleteAcls, 1, 3),
    (ApiKey::DescribeUserScramCredentials, 0, 0),
    (ApiKey::AlterUserScramCredentials, 0, 0),
];

/// (api key, min, max) for every API Shoal serves, clipped to what the
/// protocol crate can encode.
pub fn supported_versions() -> Vec<(ApiKey, i16, i16)> {
    SUPPORTED
        .iter()
        .filter_map(|&(k, min, max)| {
            let v = k.valid_versions();
            let (lo, hi) = (min.max(v.min), max.min(v.max));
            (lo <= hi).then_some((k, lo, hi))
        })
        .collect()
}

pub fn is_supported(key: ApiKey, version: i16) -> bool {
    supported_versions()
        .iter()
        .any(|&(k, lo, hi)| k == key && (lo..=hi).contains(&version))
}
