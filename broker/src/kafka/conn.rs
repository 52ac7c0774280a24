//! Accepting connections, framing, decoding and ordered responses.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::{Decodable, Encodable};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::auth::{After, ConnAuth, KafkaListener};
use super::versions::is_supported;
use super::{Pending, acls, admin, fetch, groups, metadata, produce, records, users};
use crate::broker::Broker;
use crate::metrics::ApiLabel;

/// How many responses one connection may have in flight (pipelining).
/// Produces on `object` topics wait about a flush interval each, so a busy
/// producer keeps hundreds in flight; what they hold is small (the records
/// already went to the WAL and the tail).
const MAX_IN_FLIGHT: usize = 1024;
/// A connection with no request for this long is closed (Kafka's default
/// `connections.max.idle.ms`).
const MAX_IDLE: std::time::Duration = std::time::Duration::from_secs(600);
/// The largest request read before a SASL client has authenticated.
const MAX_UNAUTHENTICATED_REQUEST: usize = 512 * 1024;
/// Once a request's first byte arrived, the rest must within this.
const REQUEST_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a connection whose authentication failed stays open (Kafka's
/// default `connection.failed.authentication.delay.ms`).
const FAILED_AUTHENTICATION_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Per-connection context handed to handlers.
pub struct Ctx {
    pub broker: Arc<Broker>,
    pub peer: SocketAddr,
    pub client_id: String,
    /// Idempotent batches refused on this connection before they were
    /// written (see `produce::Gaps`).
    pub(crate) gaps: super::produce::Gaps,
    /// Who the client is (`User:...`), once authenticated.
    pub(crate) principal: String,
    pub(crate) listener: Arc<KafkaListener>,
}

impl Ctx {
    /// May this connection's principal do `op` on the resource? Always,
    /// without an authorizer.
    pub(crate) fn allowed(
        &self,
        op: shoal_security::acl::Operation,
        resource_type: shoal_security::acl::ResourceType,
        name: &str,
    ) -> bool {
        // No Decider here: a request checks many resources, and building
        // one clones the authorizer's settings each time.
        let Some(config) = &self.broker.config.authorizer else {
            return true;
        };
        if !self.broker.users.is_loaded() {
            return false;
        }
        shoal_security::acl::authorize(
            &self.broker.users.snapshot().acls,
            config,
            &self.principal,
            &self.peer.ip().to_string(),
            op,
            resource_type,
            name,
        )
    }

    /// This connection's rights against the current ACLs, to take along
    /// into a response future; `None` without an authorizer.
    pub(crate) fn decider(&self) -> Option<super::authz::Decider> {
        Some(super::authz::Decider {
            loaded: self.broker.users.is_loaded(),
            config: self.broker.config.authorizer.clone()?,
            security: self.broker.users.snapshot(),
            principal: self.principal.clone(),
            host: self.peer.ip().to_string(),
        })
    }

    pub(crate) fn allowed_topic(&self, op: shoal_security::acl::Operation, topic: &str) -> bool {
        self.allowed(op, shoal_security::acl::ResourceType::Topic, topic)
    }

    pub(crate) fn allowed_group(&self, op: shoal_security::acl::Operation, group: &str) -> bool {
        self.allowed(op, shoal_security::acl::ResourceType::Group, group)
    }

    pub(crate) fn allowed_cluster(&self, op: shoal_security::acl::Operation) -> bool {
        self.allowed(
            op,
            shoal_security::acl::ResourceType::Cluster,
            shoal_security::acl::CLUSTER,
        )
    }
}

/// Serve Kafka clients on `listener` with `security`'s protocol.
pub async fn serve(
    listener: TcpListener,
    security: Arc<KafkaListener>,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let permit = match security.limits.admit(peer.ip()) {
                        Ok(p) => p,
                        Err(why) => {
                            tracing::warn!(%peer, ?why, "connection refused: too many connections");
                            broker.metrics.connections_refused.inc();
                            continue;
                        }
                    };
                    let broker = broker.clone();
                    let security = security.clone();
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        if let Err(e) = accept(stream, peer, security, broker).await {
                            tracing::debug!(%peer, "connection ended: {e}");
                        }
                        drop(permit);
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

pub(crate) struct Frame {
    api_key: ApiKey,
    version: i16,
    header: RequestHeader,
    request: RequestKind,
}

/// Why a frame cannot be served; the connection is closed after logging.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
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
pub(crate) fn decode_frame(mut body: Bytes) -> Result<Frame, (FrameError, Option<i32>)> {
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
/// Encode a length-prefixed response into `buf` (cleared first), which the
/// connection's writer keeps from one response to the next. (Fetch
/// responses go out in pieces instead, see `fetch_encode`.)
fn encode_response(
    buf: &mut BytesMut,
    api_key: ApiKey,
    version: i16,
    correlation_id: i32,
    response: &ResponseKind,
) -> Result<(), String> {
    buf.clear();
    buf.put_i32(0);
    let header = ResponseHeader::default().with_correlation_id(correlation_id);
    header
        .encode(buf, api_key.response_header_version(version))
        .map_err(|e| e.to_string())?;
    response.encode(buf, version).map_err(|e| e.to_string())?;
    let len = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// A writer's buffer larger than this is let go after a response that
/// used less than a quarter of it, so one large response does not pin its
/// size for the connection's life.
const KEEP_WRITE_BUFFER: usize = 1 << 20;

/// The TLS handshake where the listener has one, then the connection.
async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    security: Arc<KafkaListener>,
    broker: Arc<Broker>,
) -> std::io::Result<()> {
    let Some(tls) = security.tls.clone() else {
        let (rd, wr) = stream.into_split();
        let auth = ConnAuth::new(security, None);
        return connection(rd, wr, peer, auth, broker).await;
    };
    let tls_stream = match tokio::time::timeout(
        shoal_security::tls::HANDSHAKE_TIMEOUT,
        tls.acceptor().accept(stream),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "TLS handshake failed: {e}");
            return Ok(());
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return Ok(());
        }
    };
    let certificate = shoal_security::tls::certificate_principal(tls_stream.get_ref().1);
    let auth = ConnAuth::new(security, certificate);
    let (rd, wr) = tokio::io::split(tls_stream);
    connection(rd, wr, peer, auth, broker).await
}

async fn connection<R, W>(
    mut rd: R,
    mut wr: W,
    peer: SocketAddr,
    mut auth: ConnAuth,
    broker: Arc<Broker>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<(ApiKey, i16, i32, Pending)>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        let mut buf = BytesMut::new();
        while let Some((key, version, correlation_id, pending)) = rx.recv().await {
            let Some(response) = pending.await else {
                continue;
            };
            // A fetch goes out with its batches as they are (not copied
            // into the buffer first).
            let response = match response {
                ResponseKind::Fetch(f) => {
                    match super::fetch_encode::encode_fetch_response(correlation_id, version, f) {
                        Ok(pieces) => {
                            for piece in pieces {
                                wr.write_all(&piece).await?;
                            }
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(api = ?key, version, "cannot encode response: {e}");
                            break;
                        }
                    }
                }
                other => other,
            };
            let encoded = encode_response(&mut buf, key, version, correlation_id, &response);
            drop(response);
            match encoded {
                Ok(()) => {
                    wr.write_all(&buf).await?;
                    if buf.capacity() > KEEP_WRITE_BUFFER && buf.len() < buf.capacity() / 4 {
                        buf = BytesMut::new();
                    }
                }
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
        principal: auth.principal().to_string(),
        listener: auth.listener().clone(),
    };
    loop {
        let mut len = [0u8; 4];
        // Idle until a request starts (Kafka's connections.max.idle.ms) ...
        match tokio::time::timeout(MAX_IDLE, rd.read_exact(&mut len[..1])).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                tracing::debug!(%peer, "closing an idle connection");
                break;
            }
        }
        // ... then the whole request within a deadline: a client that never
        // finishes a frame (slowloris) is closed.
        // Before authentication only small requests (SASL, ApiVersions)
        // are read: Kafka's sasl.server.max.receive.size.
        let limit = if auth.authenticated() {
            max
        } else {
            MAX_UNAUTHENTICATED_REQUEST
        };
        let read = async {
            rd.read_exact(&mut len[1..]).await?;
            let len = i32::from_be_bytes(len);
            let Some(len) = usize::try_from(len).ok().filter(|l| *l <= limit) else {
                return Ok(None);
            };
            // Bounded by max_request_bytes above.
            let mut body = vec![0u8; len];
            rd.read_exact(&mut body).await?;
            Ok::<_, std::io::Error>(Some(body))
        };
        let body = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read).await {
            Ok(Ok(Some(body))) => body,
            Ok(Ok(None)) => {
                tracing::warn!(%peer, "closing connection: invalid request size");
                break;
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                tracing::warn!(%peer, "closing connection: a request did not arrive in time");
                break;
            }
        };
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
                // Unauthenticated garbage is not worth a warning each.
                if auth.authenticated() {
                    tracing::warn!(%peer, "closing connection: {e}");
                } else {
                    tracing::debug!(%peer, "closing connection: {e}");
                }
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
        let now = std::time::Instant::now();
        if let Err(why) = auth.admits(frame.api_key, now) {
            tracing::warn!(%peer, api = ?frame.api_key, "closing connection: {why}");
            break;
        }
        let mut close = false;
        let pending = match frame.request {
            RequestKind::SaslHandshake(r) if frame.version == 0 => {
                tracing::warn!(%peer, "closing connection: SaslHandshake v0 is not supported");
                close = true;
                let resp = auth
                    .handshake(&r)
                    .with_error_code(kafka_protocol::ResponseError::UnsupportedVersion.code());
                super::ready(ResponseKind::SaslHandshake(resp))
            }
            RequestKind::SaslHandshake(r) => {
                super::ready(ResponseKind::SaslHandshake(auth.handshake(&r)))
            }
            RequestKind::SaslAuthenticate(r) => {
                // PLAIN hashes the password (PBKDF2): off the async workers.
                let (resp, after) =
                    crate::security::hashing(|| auth.authenticate(&ctx.broker.sasl, &r, now));
                if after == After::Close {
                    tracing::warn!(
                        %peer,
                        reason = resp.error_message.as_deref().unwrap_or(""),
                        "SASL authentication failed"
                    );
                    close = true;
                }
                ctx.principal = auth.principal().to_string();
                super::ready(ResponseKind::SaslAuthenticate(resp))
            }
            request => super::authz::dispatch(&ctx, &frame.header, frame.version, request).await,
        };
        let sent = tx
            .send((
                frame.api_key,
                frame.version,
                frame.header.correlation_id,
                pending,
            ))
            .await;
        if sent.is_err() {
            break;
        }
        if close {
            // Kafka's connection.failed.authentication.delay.ms: the answer
            // reaches the client before the close, and a password guesser
            // gets one try per connection and delay.
            tokio::time::sleep(FAILED_AUTHENTICATION_DELAY).await;
            break;
        }
    }
    drop(tx);
    match writer.await {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
}

pub(super) async fn dispatch(
    ctx: &Ctx,
    header: &RequestHeader,
    version: i16,
    req: RequestKind,
) -> Pending {
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
        R::CreateAcls(r) => acls::create(ctx, r).await,
        R::DescribeAcls(r) => acls::describe(ctx, r),
        R::DeleteAcls(r) => acls::delete(ctx, r).await,
        R::DescribeUserScramCredentials(r) => users::describe(ctx, r),
        R::AlterUserScramCredentials(r) => users::alter(ctx, r).await,
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
        let mut b = BytesMut::new();
        encode_response(&mut b, ApiKey::ApiVersions, 3, 42, &resp).unwrap();
        let mut s = &b[..];
        assert_eq!(s.get_i32() as usize, b.len() - 4);
        assert_eq!(s.get_i32(), 42);
    }
}
