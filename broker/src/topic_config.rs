//! Which topic configs Shoal accepts. A config is only stored when Shoal
//! does what it says: `shoal.durability`; the lifecycle keys the compactor
//! honours (`cleanup.policy`, `retention.ms`, `retention.bytes`,
//! `delete.retention.ms`, `min.compaction.lag.ms`) with any valid value;
//! and Kafka's other keys set to the one value that describes Shoal's
//! behaviour. Any other value of a Kafka key is refused with
//! INVALID_CONFIG naming the key; a key Kafka does not know is refused as
//! Kafka refuses it.

use crate::config::Durability;
use crate::error::{Error, Result};

/// Kafka's topic-level config names (as of Kafka 4.1).
const KAFKA_TOPIC_CONFIGS: &[&str] = &[
    "cleanup.policy",
    "compression.gzip.level",
    "compression.lz4.level",
    "compression.type",
    "compression.zstd.level",
    "delete.retention.ms",
    "file.delete.delay.ms",
    "flush.messages",
    "flush.ms",
    "follower.replication.throttled.replicas",
    "index.interval.bytes",
    "leader.replication.throttled.replicas",
    "local.retention.bytes",
    "local.retention.ms",
    "max.compaction.lag.ms",
    "max.message.bytes",
    "message.downconversion.enable",
    "message.format.version",
    "message.timestamp.after.max.ms",
    "message.timestamp.before.max.ms",
    "message.timestamp.difference.max.ms",
    "message.timestamp.type",
    "min.cleanable.dirty.ratio",
    "min.compaction.lag.ms",
    "min.insync.replicas",
    "preallocate",
    "remote.log.copy.disable",
    "remote.log.delete.on.disable",
    "remote.storage.enable",
    "retention.bytes",
    "retention.ms",
    "segment.bytes",
    "segment.index.bytes",
    "segment.jitter.ms",
    "segment.ms",
    "unclean.leader.election.enable",
];

/// The Kafka configs Shoal honours, with the one value that describes
/// what it does (also what DescribeConfigs reports).
pub fn implemented_defaults(max_message_bytes: usize) -> Vec<(&'static str, String)> {
    vec![
        ("cleanup.policy", "delete".into()),
        ("retention.ms", "-1".into()),
        ("retention.bytes", "-1".into()),
        ("delete.retention.ms", "86400000".into()),
        ("min.compaction.lag.ms", "0".into()),
        ("compression.type", "producer".into()),
        ("max.message.bytes", max_message_bytes.to_string()),
        ("message.timestamp.type", "CreateTime".into()),
        ("min.insync.replicas", "1".into()),
    ]
}

/// Is the topic log-compacted (`cleanup.policy` holds `compact`)?
pub fn is_compacted(config: &std::collections::BTreeMap<String, String>) -> bool {
    config
        .get("cleanup.policy")
        .is_some_and(|v| v.split(',').any(|p| p.trim() == "compact"))
}

/// The lifecycle configs the compactor honours, checked as Kafka does.
fn check_lifecycle(key: &str, value: &str) -> Option<Result<()>> {
    let number = |min: i64| match value.parse::<i64>() {
        Ok(n) if n >= min => Ok(()),
        _ => Err(Error::InvalidConfig(format!(
            "invalid value {value:?} for {key}: must be an integer of at least {min}"
        ))),
    };
    Some(match key {
        "retention.ms" | "retention.bytes" => number(-1),
        "delete.retention.ms" | "min.compaction.lag.ms" => number(0),
        "cleanup.policy" => {
            let ok = !value.trim().is_empty()
                && value
                    .split(',')
                    .all(|p| matches!(p.trim(), "delete" | "compact"));
            if ok {
                Ok(())
            } else {
                Err(Error::InvalidConfig(format!(
                    "invalid value {value:?} for cleanup.policy: expected delete, compact or both"
                )))
            }
        }
        _ => return None,
    })
}

/// May `key` be set to `value` on a topic?
pub fn check(key: &str, value: &str, max_message_bytes: usize) -> Result<()> {
    if let Some(checked) = check_lifecycle(key, value) {
        return checked;
    }
    if key == Durability::CONFIG_KEY {
        return match Durability::parse(value) {
            Some(_) => Ok(()),
            None => Err(Error::InvalidConfig(format!(
                "{key} must be local or object, not {value:?}"
            ))),
        };
    }
    if let Some((_, honoured)) = implemented_defaults(max_message_bytes)
        .into_iter()
        .find(|(k, _)| *k == key)
    {
        if value == honoured {
            return Ok(());
        }
        return Err(Error::InvalidConfig(format!(
            "{key}={value} is not supported by Shoal (only {key}={honoured})"
        )));
    }
    if KAFKA_TOPIC_CONFIGS.contains(&key) {
        return Err(Error::InvalidConfig(format!(
            "{key} is not supported by Shoal"
        )));
    }
    Err(Error::InvalidConfig(format!(
        "Unknown topic config name: {key}"
    )))
}

/// May `key` be removed (reset to its default)? Any key Kafka or Shoal
/// knows may; an unknown one is refused as on set.
pub fn check_removal(key: &str) -> Result<()> {
    if key == Durability::CONFIG_KEY || KAFKA_TOPIC_CONFIGS.contains(&key) {
        return Ok(());
    }
    Err(Error::InvalidConfig(format!(
        "Unknown topic config name: {key}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_shoal_does_is_accepted() {
        let max = 1 << 20;
        assert!(check("shoal.durability", "object", max).is_ok());
        assert!(check("shoal.durability", "fast", max).is_err());
        assert!(check("cleanup.policy", "delete", max).is_ok());
        assert!(check("cleanup.policy", "compact,delete", max).is_ok());
        let e = check("cleanup.policy", "shred", max).unwrap_err();
        assert!(e.to_string().contains("cleanup.policy"), "{e}");
        assert!(check("retention.ms", "60000", max).is_ok());
        assert!(check("retention.bytes", "-2", max).is_err());
        let e = check("segment.ms", "1000", max).unwrap_err();
        assert!(e.to_string().contains("segment.ms"), "{e}");
        let e = check("no.such.thing", "1", max).unwrap_err();
        assert!(
            e.to_string()
                .contains("Unknown topic config name: no.such.thing"),
            "{e}"
        );
        assert!(check_removal("retention.ms").is_ok());
        assert!(check_removal("no.such.thing").is_err());
    }
}
