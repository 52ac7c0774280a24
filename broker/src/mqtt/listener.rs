//! The MQTT listener: accept connections and run each one's I/O loop,
//! which feeds whole packets to its protocol machine and carries out what
//! the machine asks (writes, log appends, closing).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::{Listener, ListenerExt};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use mqtt5_protocol::ReasonCode;
use shoal_security::limits::{ConnectionLimits, LimitedListener};
use shoal_security::tls::{TlsListener, TlsServer, TlsStream, certificate_principal};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::Mqtt;
use super::conn::{Action, Protocol, publish_ack};
use super::frame;
use super::handover;

/// Accept MQTT connections until `shutdown`; those beyond `limits` are
/// closed at once.
pub async fn serve(
    listener: TcpListener,
    limits: Arc<ConnectionLimits>,
    mqtt: Arc<Mqtt>,
    shutdown: watch::Receiver<bool>,
) {
    let listener = listener.tap_io(|sock| {
        let _ = sock.set_nodelay(true);
    });
    let listener = LimitedListener::new(listener, limits);
    accept_until_shutdown(listener, |_| None, mqtt, shutdown).await;
}

/// Accept MQTT over TLS (the 8883 kind of listener) until `shutdown`. A
/// client certificate the handshake verified is the client's identity.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<TlsServer>,
    limits: Arc<ConnectionLimits>,
    mqtt: Arc<Mqtt>,
    shutdown: watch::Receiver<bool>,
) {
    let listener = match TlsListener::with_limits(listener, tls, Some(limits)) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("MQTT TLS listener: {e}");
            return;
        }
    };
    let subject = |stream: &TlsStream| {
        // The principal's `User:` prefix is Kafka's; an MQTT user name is
        // the subject alone.
        certificate_principal(stream.get_ref().1)
            .map(|p| p.strip_prefix("User:").map(str::to_string).unwrap_or(p))
    };
    accept_until_shutdown(listener, subject, mqtt, shutdown).await;
}

async fn accept_until_shutdown<L>(
    mut listener: L,
    certificate: impl Fn(&L::Io) -> Option<String>,
    mqtt: Arc<Mqtt>,
    mut shutdown: watch::Receiver<bool>,
) where
    L: Listener,
    L::Addr: std::fmt::Debug,
{
    loop {
        tokio::select! {
            (stream, peer) = listener.accept() => {
                tracing::debug!(?peer, "MQTT connection");
                let subject = certificate(&stream);
                tokio::spawn(connection(stream, mqtt.clone(), shutdown.clone(), subject));
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// What an acknowledgement held back for the log resolves to.
enum HeldAck {
    /// The bytes, and whether it is a QoS 1 acknowledgement (counted against
    /// the server's Receive Maximum until it goes out).
    Send(Bytes, bool),
    /// MQTT 3.1.1 has no way to refuse a publish: the connection closes
    /// and the client sends it again on its next one.
    Close,
}

/// What a read reserves in a connection's buffer at least, and at most.
const READ_BUFFER: usize = 256;
const READ_BUFFER_MAX: usize = 64 * 1024;

/// Read into `buf`; also says whether the read took all there was (less
/// than the room it had), after which the caller gives back a buffer left
/// empty. So an idle connection keeps no buffer: its next read goes
/// through a small array in the task and allocates only for what arrived,
/// while a busy one keeps a buffer that grows with its reads.
async fn read_some<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<(usize, bool)> {
    if buf.capacity() == 0 {
        let mut first = [0u8; 64];
        let n = rd.read(&mut first).await?;
        buf.extend_from_slice(&first[..n]);
        return Ok((n, n < first.len()));
    }
    let room = buf.capacity() - buf.len();
    if room < READ_BUFFER {
        buf.reserve(buf.capacity().clamp(READ_BUFFER, READ_BUFFER_MAX));
    }
    let room = buf.capacity() - buf.len();
    let n = rd.read_buf(buf).await?;
    Ok((n, n < room))
}

/// How long a write may block when the client has no keep-alive.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

type Held = Pin<Box<dyn Future<Output = HeldAck> + Send>>;

/// Acknowledgements held back, in order; allocated only while there are
/// some (an idle connection keeps none).
#[derive(Default)]
struct HeldAcks(Option<FuturesOrdered<Held>>);

impl HeldAcks {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(FuturesOrdered::is_empty)
    }

    fn push_back(&mut self, f: Held) {
        self.0.get_or_insert_with(FuturesOrdered::new).push_back(f);
    }

    async fn next(&mut self) -> Option<HeldAck> {
        let next = self.0.as_mut()?.next().await;
        if self.is_empty() {
            self.0 = None;
        }
        next
    }
}

/// Run one connection (TCP, or a WebSocket's byte stream) to its end.
/// `certificate`: the subject of the client certificate its TLS handshake
/// verified, if any (the client's identity).
pub async fn connection<S>(
    io: S,
    mqtt: Arc<Mqtt>,
    mut shutdown: watch::Receiver<bool>,
    certificate: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // Reads and writes take turns (a write happens between two selects), so
    // the socket is not split: that would cost a shared allocation each.
    let mut io = io;
    let wake = Arc::new(Notify::new());
    let mut proto = Protocol::new(
        mqtt.hub.clone(),
        mqtt.settings.clone(),
        mqtt.access.clone(),
        wake.clone(),
    )
    .with_certificate(certificate);
    let max = mqtt.settings.max_packet_size;
    // Empty to start: most connections are idle most of the time, and a
    // packet reserves what it needs (read_some, frame::next).
    let mut buf = BytesMut::new();
    let mut held = HeldAcks::default();
    let mut out = BytesMut::new();
    let mut last_heard = Instant::now();
    let mut closing = false;
    while !closing {
        let deadline = proto.silence_limit().map(|d| last_heard + d);
        let mut actions = Vec::new();
        tokio::select! {
            // Reads first: after a long write, a PINGREQ already buffered
            // must count before the keep-alive deadline does.
            biased;
            r = read_some(&mut io, &mut buf) => match r {
                Ok((0, _)) | Err(_) => break,
                Ok((_, drained)) => {
                    last_heard = Instant::now();
                    let now = crate::broker::now_ms();
                    loop {
                        match frame::next(&mut buf, max) {
                            Ok(Some(f)) => {
                                actions.extend(proto.handle(f, now));
                                if let Some(Action::AskPeers { client, username }) = actions.last() {
                                    // Nothing else is read until the answer: the
                                    // packets after CONNECT are for the session.
                                    // Boxed: rare, and its state would otherwise
                                    // enlarge every connection's task.
                                    let asked =
                                        Box::pin(handover::fetch(&mqtt, client, username.as_deref()))
                                            .await;
                                    actions.pop();
                                    let refusal = match asked {
                                        handover::Asked::OtherUser => Some(ReasonCode::NotAuthorized),
                                        handover::Asked::Unavailable => {
                                            Some(ReasonCode::ServerUnavailable)
                                        }
                                        handover::Asked::Moved | handover::Asked::Absent => None,
                                    };
                                    actions.extend(
                                        proto.peers_answered(refusal, crate::broker::now_ms()),
                                    );
                                }
                                if matches!(actions.last(), Some(Action::Close)) {
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!(client = ?proto.client_id(), "MQTT framing: {e}");
                                actions.extend(proto.frame_error(&e));
                                break;
                            }
                        }
                    }
                    if drained && buf.is_empty() {
                        buf = BytesMut::new();
                    }
                }
            },
            _ = wake.notified() => actions.extend(proto.pump(crate::broker::now_ms())),
            Some(ack) = held.next(), if !held.is_empty() => match ack {
                HeldAck::Send(b, counted) => {
                    if counted {
                        proto.held_ack_sent();
                    }
                    out.extend_from_slice(&b);
                }
                HeldAck::Close => closing = true,
            },
            _ = sleep_until(deadline), if deadline.is_some() => {
                actions.extend(proto.timed_out());
            }
            _ = shutdown.changed() => {
                if proto.version() == 5 && proto.client_id().is_some() {
                    out.extend_from_slice(&server_disconnect(ReasonCode::ServerShuttingDown));
                }
                closing = true;
            }
        }
        for a in actions {
            match a {
                Action::Send(b) => out.extend_from_slice(&b),
                Action::Ack(b) if held.is_empty() => out.extend_from_slice(&b),
                Action::Ack(b) => {
                    let qos1 = b.first().is_some_and(|&t| t >> 4 == 4);
                    if qos1 {
                        proto.ack_held();
                    }
                    held.push_back(Box::pin(async move { HeldAck::Send(b, qos1) }));
                }
                Action::AckAfter {
                    mark,
                    qos,
                    packet_id,
                } => {
                    if qos == 1 {
                        proto.ack_held();
                    }
                    let (hub, version) = (mqtt.hub.clone(), proto.version());
                    let client = proto.client_id().map(Arc::<str>::from);
                    let timeout = mqtt.settings.persist_timeout;
                    held.push_back(Box::pin(async move {
                        if tokio::time::timeout(timeout, hub.wait_durable(mark))
                            .await
                            .is_ok()
                        {
                            return HeldAck::Send(
                                publish_ack(version, qos, packet_id, ReasonCode::Success),
                                qos == 1,
                            );
                        }
                        tracing::warn!("MQTT session state not durable in time: publish refused");
                        if qos == 2
                            && let Some(c) = &client
                        {
                            hub.release(c, packet_id);
                        }
                        refused(version, qos, packet_id)
                    }));
                }
                Action::Persist { msg, stream, ack } => {
                    if let Some(f) = persist(&mqtt, &proto, msg, &stream, ack) {
                        held.push_back(f);
                    }
                }
                // Answered where it was asked (above).
                Action::AskPeers { .. } => {}
                Action::DiscardElsewhere { client, username } => {
                    tokio::spawn(handover::discard(mqtt.clone(), client, username));
                }
                Action::Delay(d) => tokio::time::sleep(d).await,
                Action::Close => {
                    closing = true;
                    break;
                }
            }
        }
        if !out.is_empty() {
            // A client that stops reading is cut off like a silent one.
            let limit = proto.silence_limit().unwrap_or(WRITE_TIMEOUT);
            let w = tokio::time::timeout(limit, io.write_all(&out)).await;
            out.clear();
            if out.capacity() > 64 * 1024 {
                out = BytesMut::new();
            }
            if !matches!(w, Ok(Ok(()))) {
                break;
            }
        }
    }
    let _ = io.flush().await;
    let _ = io.shutdown().await;
    proto.closed(crate::broker::now_ms());
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn server_disconnect(reason: ReasonCode) -> Bytes {
    use mqtt5_protocol::packet::MqttPacket;
    let mut b = BytesMut::new();
    let _ = mqtt5_protocol::packet::disconnect::DisconnectPacket::new(reason).encode(&mut b);
    b.freeze()
}

/// A publish refused after the fact: MQTT 5 says so in the acknowledgement;
/// MQTT 3.1.1 cannot, so the connection closes and the client sends again.
fn refused(version: u8, qos: u8, packet_id: u16) -> HeldAck {
    if version == 5 {
        HeldAck::Send(
            publish_ack(version, qos, packet_id, ReasonCode::UnspecifiedError),
            qos == 1,
        )
    } else {
        HeldAck::Close
    }
}

/// Append a publish to its stream; route it once the log has it; return
/// the acknowledgement to send once it is durable.
fn persist(
    mqtt: &Arc<Mqtt>,
    proto: &Protocol,
    msg: super::message::Message,
    stream: &str,
    ack: Option<(u8, u16)>,
) -> Option<Held> {
    let version = proto.version();
    let client = proto.client_id().map(Arc::<str>::from);
    let refused = move |qos: u8, pid: u16| refused(version, qos, pid);
    match super::persist::append(&mqtt.broker, &mqtt.remote, stream, &msg) {
        Ok(appended) => {
            // Live delivery does not wait for durability: here the record
            // has its place in the log already; for a shard another broker
            // owns it is on its way (if that broker then refuses it, the
            // publisher is refused, and a publish sent again is delivered
            // twice).
            let (_, mark) = mqtt.hub.publish_marked(msg, crate::broker::now_ms());
            let (qos, pid) = ack?;
            let timeout = mqtt.settings.persist_timeout;
            let hub = mqtt.hub.clone();
            Some(Box::pin(async move {
                match appended.durable(timeout).await {
                    Ok(()) => {
                        // Also what the publish queued for persistent sessions.
                        if let Some(mark) = mark {
                            let _ = tokio::time::timeout(timeout, hub.wait_durable(mark)).await;
                        }
                        HeldAck::Send(
                            publish_ack(version, qos, pid, ReasonCode::Success),
                            qos == 1,
                        )
                    }
                    Err(e) => {
                        tracing::warn!("an MQTT publish was not made durable: {e}");
                        if qos == 2
                            && let Some(c) = &client
                        {
                            hub.release(c, pid);
                        }
                        refused(qos, pid)
                    }
                }
            }))
        }
        Err(e) => {
            tracing::warn!(stream, "an MQTT publish was not persisted: {e}");
            let Some((qos, pid)) = ack else {
                // QoS 0 promises no storage: it is still delivered live.
                mqtt.hub.publish(msg, crate::broker::now_ms());
                return None;
            };
            if qos == 2
                && let Some(c) = &client
            {
                mqtt.hub.release(c, pid);
            }
            let r = refused(qos, pid);
            Some(Box::pin(async move { r }))
        }
    }
}

/// Accept MQTT over WebSocket (path `/mqtt`, subprotocol `mqtt`) until
/// `shutdown`. Each binary message carries bytes of the MQTT stream.
/// `listener` is a TCP listener (`ws://`) or a TLS one (`wss://`).
pub async fn serve_ws<L>(listener: L, mqtt: Arc<Mqtt>, shutdown: watch::Receiver<bool>)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    use axum::extract::State;
    use axum::extract::ws::WebSocketUpgrade;
    use axum::routing::get;

    type WsState = (Arc<Mqtt>, watch::Receiver<bool>);
    async fn upgrade(
        State((mqtt, shutdown)): State<WsState>,
        ws: WebSocketUpgrade,
    ) -> axum::response::Response {
        ws.protocols(["mqtt"])
            .max_message_size(mqtt.settings.max_packet_size.saturating_add(16))
            .on_upgrade(move |socket| websocket(socket, mqtt, shutdown))
    }
    let app = axum::Router::new()
        .route("/mqtt", get(upgrade))
        .with_state((mqtt, shutdown.clone()));
    let mut stop = shutdown;
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!("MQTT WebSocket server: {e}");
    }
}

/// Carry one WebSocket's binary messages to and from a connection loop.
async fn websocket(
    mut socket: axum::extract::ws::WebSocket,
    mqtt: Arc<Mqtt>,
    shutdown: watch::Receiver<bool>,
) {
    use axum::extract::ws::Message as Ws;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let conn = tokio::spawn(connection(theirs, mqtt, shutdown, None));
    let (mut rd, mut wr) = tokio::io::split(ours);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            m = socket.recv() => match m {
                Some(Ok(Ws::Binary(b))) => {
                    if wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Ws::Ping(_) | Ws::Pong(_))) => {}
                // Text frames are not MQTT (MQTT §6): the connection ends.
                Some(Ok(Ws::Text(_) | Ws::Close(_))) | Some(Err(_)) | None => break,
            },
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = Bytes::copy_from_slice(&buf[..n]);
                    if socket.send(Ws::Binary(chunk)).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    drop(wr);
    drop(rd);
    let _ = socket.send(Ws::Close(None)).await;
    let _ = conn.await;
}
