//! The broker's error type and its one mapping to Kafka error codes.

use kafka_protocol::ResponseError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("corrupt record batch: {0}")]
    Corrupt(String),
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    #[error("unknown topic or partition {stream}/{shard}")]
    UnknownShard { stream: String, shard: i32 },
    #[error("unknown topic {0}")]
    UnknownStream(String),
    #[error("invalid topic name {0:?}")]
    InvalidTopic(String),
    #[error("topic {0} already exists")]
    StreamExists(String),
    #[error("invalid partitions: {0}")]
    InvalidPartitions(String),
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    #[error("offset {offset} out of range for {stream}/{shard}")]
    OffsetOutOfRange {
        stream: String,
        shard: i32,
        offset: i64,
    },
    #[error("out of order sequence for producer {producer_id}: expected {expected}, got {got}")]
    OutOfOrderSequence {
        producer_id: i64,
        expected: i32,
        got: i32,
    },
    #[error("producer {0} fenced by a newer epoch")]
    ProducerFenced(i64),
    #[error("unknown producer id {0}")]
    UnknownProducer(i64),
    #[error("transactions are not supported")]
    Unsupported,
    #[error("this broker no longer owns {stream}/{shard}")]
    NotLeader { stream: String, shard: i32 },
    #[error("{stream}/{shard} is stopped: {reason}")]
    ShardStopped {
        stream: String,
        shard: i32,
        reason: String,
    },
    #[error("write-ahead log: {0}")]
    Wal(#[from] shoal_wal_cache::Error),
    #[error("object storage: {0}")]
    Storage(#[from] shoal_storage::Error),
    #[error("placement: {0}")]
    Placement(#[from] shoal_placement::Error),
    #[error("placement rejected the request: {0}")]
    Rejected(shoal_placement::Rejection),
    #[error("request timed out")]
    Timeout,
    #[error("{pending} bytes are waiting for object storage (limit {limit}); retry later")]
    Backpressure { pending: u64, limit: u64 },
    #[error("reading {object}: {reason}")]
    ColdRead { object: String, reason: String },
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The Kafka error a client understands for this failure.
    pub fn kafka(&self) -> ResponseError {
        use shoal_placement::Rejection as R;
        match self {
            Error::Corrupt(_) => ResponseError::CorruptMessage,
            Error::InvalidRecord(_) => ResponseError::InvalidRecord,
            Error::UnknownShard { .. } | Error::UnknownStream(_) => {
                ResponseError::UnknownTopicOrPartition
            }
            Error::InvalidTopic(_) => ResponseError::InvalidTopicException,
            Error::StreamExists(_) => ResponseError::TopicAlreadyExists,
            Error::InvalidPartitions(_) => ResponseError::InvalidPartitions,
            Error::InvalidConfig(_) => ResponseError::InvalidConfig,
            Error::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
            Error::OutOfOrderSequence { .. } => ResponseError::OutOfOrderSequenceNumber,
            Error::ProducerFenced(_) => ResponseError::InvalidProducerEpoch,
            Error::UnknownProducer(_) => ResponseError::UnknownProducerId,
            Error::Unsupported => ResponseError::UnsupportedForMessageFormat,
            Error::NotLeader { .. } => ResponseError::NotLeaderOrFollower,
            Error::Timeout => ResponseError::RequestTimedOut,
            // Retriable for every client: the producer backs off and retries.
            Error::Backpressure { .. } => ResponseError::KafkaStorageError,
            Error::Wal(_) | Error::ShardStopped { .. } => ResponseError::KafkaStorageError,
            Error::Rejected(r) => match r {
                R::StreamExists { .. } => ResponseError::TopicAlreadyExists,
                R::UnknownStream { .. } | R::UnknownShard { .. } => {
                    ResponseError::UnknownTopicOrPartition
                }
                R::InvalidPartitions { .. } => ResponseError::InvalidPartitions,
                R::StaleEpoch { .. } => ResponseError::NotLeaderOrFollower,
                R::StaleCoordinator { .. } => ResponseError::NotCoordinator,
                R::OffsetGap { .. }
                | R::NoSuchHandoff { .. }
                | R::CompactionLeaseHeld { .. }
                | R::StaleCompaction { .. }
                | R::IndexChanged { .. } => ResponseError::UnknownServerError,
                R::Invalid { .. } => ResponseError::InvalidRequest,
                R::UnknownCredential { .. } => ResponseError::ResourceNotFound,
            },
            Error::ColdRead { .. } => ResponseError::KafkaStorageError,
            Error::Storage(_) | Error::Placement(_) | Error::Internal(_) => {
                ResponseError::UnknownServerError
            }
        }
    }

    pub fn code(&self) -> i16 {
        self.kafka().code()
    }
}
