//! The Kafka listener: framing, request dispatch and the API handlers.
//!
//! Each connection has a reader that decodes frames and a writer that sends
//! responses in request order. Handlers return a future for the response;
//! produce does its ordered part (offset assignment, WAL enqueue) before
//! returning, so pipelined produces keep their order while their fsync
//! waits overlap and share group commits.

mod acls;
mod admin;
pub mod auth;
mod authz;
pub(crate) mod conn;
mod fetch;
mod fetch_encode;
pub(crate) mod fetch_session;
mod groups;
mod metadata;
mod produce;
mod records;
mod users;
mod versions;

pub use auth::{KafkaListener, SecurityProtocol};
pub use conn::serve;
pub use versions::supported_versions;

use std::future::Future;
use std::pin::Pin;

use kafka_protocol::messages::ResponseKind;

/// A response still being computed; `None` means "send nothing" (acks=0).
pub type Pending = Pin<Box<dyn Future<Output = Option<ResponseKind>> + Send>>;

pub(crate) fn ready(r: ResponseKind) -> Pending {
    Box::pin(std::future::ready(Some(r)))
}
