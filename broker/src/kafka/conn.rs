//! Accepting connections, framing, decoding and ordered responses.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::versions::is_supported;
use super::{Pending, admin, fetch, groups, metadata, produce, records};
use crate::broker::Broker;
use crate::metrics::ApiLabel;

/// How many responses one connection may have in flight (pipelining).
/// Produces on `object` topics wait about a flush interval each, so a busy
/// producer keeps hundreds in flight; what they hold is small (the records
/// already went to the WAL and the tail).
const MAX_IN_FLIGHT: usize = 1024;

/// Per-connection context handed to handlers.
pub struct Ctx {
    pub broker: Arc<Broker>,
    pub peer: SocketAddr,
    pub client_id: String,
    /// Idempotent batches refused on this connection before they were
    /// written (see `produce::Gaps`).
    pub(crate) gaps: super::produce::Gaps,
}

pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let broker = broker.clone();
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, peer, broker).await {
                            tracing::debug!(%peer, "connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

struct Frame {
    api_key: ApiKey,
    version: i16,
    header: RequestHeader,
    request: RequestKind,
}

/// Why a frame cannot be served; the connection is closed after logging.
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("frame of {0} bytes is shorter than a request header")]
    Short(usize),
    #[error("unknown API key {0}")]
    UnknownApi(i16),
    #[error("unsupported version {1} of {0:?}")]
    Unsupported(ApiKey, i16),
    #[error("malformed {0:?} v{1} request: {2}")]
    Malformed(ApiKey, i16, String),
}

/// Sans-io: decode one frame body into a request.
fn decode_frame(mut body: Bytes) -> Result<Frame, (FrameError, Option<i32>)> {
    if body.len() < 8 {
        return Err((FrameError::Short(body.len()), None));
    }
    let raw_key = i16::from_be_bytes([body[0], body[1]]);
    let version = i16::from_be_bytes([body[2], body[3]]);
    let correlation_id = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
    let api_key = ApiKey::try_from(raw_key).map_err(|_| (FrameError::UnknownApi(raw_key), None))?;
    if !is_supported(api_key, version) {
        return Err((
            FrameError::Unsupported(api_key, version),
            Some(correlation_id),
        ));
    }
    let header = RequestHeader::decode(&mut body, api_key.request_header_version(version))
        .map_err(|e| (FrameError::Malformed(api_key, version, e.to_string()), None))?;
    let request = RequestKind::decode(api_key, &mut body, version)
        .map_err(|e| (FrameError::Malformed(api_key, version, e.to_string()), None))?;
    Ok(Frame {
        api_key,
        version,
        header,
        request,
    })
}

/// Sans-io: length-prefixed response bytes.
fn encode_response(
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    response: &ResponseKind,
) -> Result<Bytes, String> {
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    header
        .encode(&mut buf, api_key.response_header_version(version))
        .map_err(|e| e.to_string())?;
    response
        .encode(&mut buf, version)
        .map_err(|e| e.to_string())?;
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf.freeze())
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<(ApiKey, i16, i32, Pending)>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some((key, version, correlation_id, pending)) = rx.recv().await {
            let Some(response) = pending.await else {
                continue;
            };
            match encode_response(key, version, correlation_id, &response) {
                Ok(bytes) => wr.write_all(&bytes).await?,
                Err(e) => {
                    tracing::error!(api = ?key, version, "cannot encode response: {e}");
                    break;
                }
            }
        }
        wr.shutdown().await
    });
    let max = broker.config.max_request_bytes;
    let mut ctx = Ctx {
        broker,
        peer,
        client_id: String::new(),
        gaps: Default::default(),
    };
    loop {
        let mut len = [0u8; 4];
        match rd.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
        let len = i32::from_be_bytes(len);
        let Some(len) = usize::try_from(len).ok().filter(|l| *l <= max) else {
            tracing::warn!(%peer, len, "closing connection: invalid request size");
            break;
        };
        // Bounded by max_request_bytes above.
        let mut body = vec![0u8; len];
        rd.read_exact(&mut body).await?;
        let frame = match decode_frame(Bytes::from(body)) {
            Ok(f) => f,
            Err((FrameError::Unsupported(ApiKey::ApiVersions, v), Some(cid))) => {
                // KIP-511: answer v0 with UNSUPPORTED_VERSION and our versions.
                let mut resp = metadata::api_versions_response();
                resp.error_code = kafka_protocol::ResponseError::UnsupportedVersion.code();
                let _ = v;
                let pending = super::ready(ResponseKind::ApiVersions(resp));
                if tx
                    .send((ApiKey::ApiVersions, 0, cid, pending))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            Err((e, _)) => {
                tracing::warn!(%peer, "closing connection: {e}");
                break;
            }
        };
        if let Some(id) = &frame.header.client_id
            && ctx.client_id.as_str() != id.as_str()
        {
            ctx.client_id = id.to_string();
        }
        ctx.broker
            .metrics
            .requests
            .get_or_create(&ApiLabel {
                api: format!("{:?}", frame.api_key),
            })
            .inc();
        let pending = dispatch(&ctx, &frame.header, frame.version, frame.request).await;
        if tx
            .send((
                frame.api_key,
                frame.version,
                frame.header.correlation_id,
                pending,
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    match writer.await {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
}

async fn dispatch(ctx: &Ctx, header: &RequestHeader, version: i16, req: RequestKind) -> Pending {
    use RequestKind as R;
    let _ = header;
    match req {
        R::ApiVersions(_) => {
            super::ready(ResponseKind::ApiVersions(metadata::api_versions_response()))
        }
        R::Metadata(r) => metadata::metadata(ctx, r, version).await,
        R::DescribeCluster(r) => metadata::describe_cluster(ctx, r),
        R::FindCoordinator(r) => metadata::find_coordinator(ctx, r, version),
        R::Produce(r) => produce::produce(ctx, r, version).await,
        R::Fetch(r) => fetch::fetch(ctx, r, version),
        R::ListOffsets(r) => admin::list_offsets(ctx, r, version).await,
        R::CreateTopics(r) => admin::create_topics(ctx, r, version).await,
        R::DeleteTopics(r) => admin::delete_topics(ctx, r, version).await,
        R::CreatePartitions(r) => admin::create_partitions(ctx, r).await,
        R::DescribeConfigs(r) => admin::describe_configs(ctx, r),
        R::IncrementalAlterConfigs(r) => admin::incremental_alter_configs(ctx, r).await,
        R::InitProducerId(r) => admin::init_producer_id(ctx, r).await,
        R::JoinGroup(r) => groups::join_group(ctx, r, version).await,
        R::SyncGroup(r) => groups::sync_group(ctx, r),
        R::Heartbeat(r) => groups::heartbeat(ctx, r),
        R::LeaveGroup(r) => groups::leave_group(ctx, r, version),
        R::OffsetCommit(r) => groups::offset_commit(ctx, r).await,
        R::OffsetFetch(r) => groups::offset_fetch(ctx, r, version).await,
        R::DescribeGroups(r) => groups::describe_groups(ctx, r).await,
        R::ListGroups(r) => groups::list_groups(ctx, r).await,
        R::DeleteGroups(r) => groups::delete_groups(ctx, r).await,
        R::DeleteRecords(r) => records::delete_records(ctx, r),
        // Not reachable: is_supported() filtered every other API.
        other => {
            tracing::warn!("no handler for {other:?}");
            Box::pin(std::future::ready(None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(matches!(
            decode_frame(Bytes::from_static(&[0, 1])),
            Err((FrameError::Short(2), _))
        ));
        assert!(matches!(
            decode_frame(Bytes::from_static(&[0x27, 0x0f, 0, 0, 0, 0, 0, 1])),
            Err((FrameError::UnknownApi(9999), _))
        ));
        // Metadata v1 with a truncated body.
        assert!(matches!(
            decode_frame(Bytes::from_static(&[0, 3, 0, 1, 0, 0, 0, 1, 0, 5, b'a'])),
            Err((FrameError::Malformed(..), _))
        ));
        let mut garbage = vec![0u8; 4096];
        for (i, b) in garbage.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        for start in 0..64 {
            let _ = decode_frame(Bytes::from(garbage[start..].to_vec()));
        }
    }

    #[test]
    fn responses_are_length_prefixed() {
        let resp = ResponseKind::ApiVersions(super::metadata::api_versions_response());
        let b = encode_response(ApiKey::ApiVersions, 3, 42, &resp).unwrap();
        let mut s = &b[..];
        assert_eq!(s.get_i32() as usize, b.len() - 4);
        assert_eq!(s.get_i32(), 42);
    }
}
