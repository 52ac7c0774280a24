//! One MQTT connection's protocol logic as a state machine: whole packets
//! in, [`Action`]s out. It talks to the in-memory [`Hub`] but never to a
//! socket or a disk; the listener does the I/O and the log appends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqtt5_protocol::packet::MqttPacket;
use mqtt5_protocol::packet::connack::ConnAckPacket;
use mqtt5_protocol::packet::connect::ConnectPacket;
use mqtt5_protocol::packet::disconnect::DisconnectPacket;
use mqtt5_protocol::packet::puback::PubAckPacket;
use mqtt5_protocol::packet::pubcomp::PubCompPacket;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::pubrec::PubRecPacket;
use mqtt5_protocol::packet::pubrel::PubRelPacket;
use mqtt5_protocol::packet::suback::{SubAckPacket, SubAckReasonCode};
use mqtt5_protocol::packet::subscribe::SubscribePacket;
use mqtt5_protocol::packet::unsuback::{UnsubAckPacket, UnsubAckReasonCode};
use mqtt5_protocol::packet::unsubscribe::UnsubscribePacket;
use mqtt5_protocol::{FixedHeader, Packet, PacketType, PropertyId, PropertyValue, ReasonCode};
use tokio::sync::Notify;

use super::Settings;
use super::access::{Access, Refusal};
use super::frame::{Frame, FrameError};
use super::hub::{ClientId, ConnectRequest, Dropped, Hub, Send, SubOpts, Will};
use super::message::{Message, MessageProps, publish_packet, qos_of};
use super::topic;

/// What the connection's I/O loop does next.
#[derive(Debug)]
pub(crate) enum Action {
    /// Write these bytes (one encoded packet).
    Send(Bytes),
    /// Write this PUBACK/PUBREC after those held back for the log, so
    /// acknowledgements keep the order of their PUBLISHes (MQTT §4.6).
    Ack(Bytes),
    /// The acknowledgement of this QoS 1/2 publish once the durable state
    /// reaches `mark` (the message was queued for a persistent session or
    /// retained).
    AckAfter { mark: u64, qos: u8, packet_id: u16 },
    /// Append `msg` to `stream`; on success route it to subscribers, and
    /// once it is durable send the acknowledgement `ack` (QoS, packet id).
    Persist {
        msg: Message,
        stream: Arc<str>,
        ack: Option<(u8, u16)>,
    },
    /// Ask the other brokers for `client`'s session (its client connected
    /// here without Clean Start, and this broker does not hold it), then
    /// call [`Protocol::peers_answered`].
    AskPeers {
        client: ClientId,
        username: Option<String>,
    },
    /// Tell the other brokers to end `client`'s session there, if they
    /// have one (its client connected here with Clean Start); nothing
    /// waits for the answer.
    DiscardElsewhere {
        client: ClientId,
        username: Option<String>,
    },
    /// Wait this long before the actions after it (a refused login, as
    /// Kafka's `connection.failed.authentication.delay.ms`: one guess per
    /// connection, and not at once).
    Delay(Duration),
    /// Close the connection (after the sends before it).
    Close,
}

/// How long a refused login waits for its CONNACK.
pub(crate) const FAILED_LOGIN_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug)]
enum Phase {
    /// Waiting for CONNECT.
    New,
    /// CONNECT accepted so far; the other brokers are asked for its
    /// session.
    AskingPeers(Box<ConnectPacket>),
    Connected {
        client: ClientId,
        link: u64,
    },
    Closed,
}

pub(crate) struct Protocol {
    hub: Arc<Hub>,
    settings: Arc<Settings>,
    access: Arc<Access>,
    wake: Arc<Notify>,
    phase: Phase,
    /// 4 (3.1.1) or 5.
    version: u8,
    keep_alive: u16,
    /// The client's Maximum Packet Size.
    client_max_packet: usize,
    /// The client's Topic Alias Maximum, and the aliases given out.
    alias_out_max: u16,
    alias_out: HashMap<Arc<str>, u16>,
    /// Aliases the client set up.
    alias_in: HashMap<u16, Arc<str>>,
    /// Incoming QoS 1/2 PUBLISHes not yet acknowledged (waiting for the log).
    inbound_pending: usize,
    /// Publish the will when the connection ends (no normal DISCONNECT).
    send_will: bool,
    connect_expiry: u32,
    disconnect_expiry: Option<u32>,
    username: Option<String>,
    /// The subject of the client certificate this connection's TLS
    /// handshake verified (RFC 2253): the client's identity, in place of a
    /// user name and password.
    certificate: Option<String>,
    /// The other brokers were asked for the session (after the client's
    /// credentials passed).
    peers_asked: bool,
}

/// How long without a packet before a client with this Keep Alive is cut
/// off: one and a half times it (MQTT §3.1.2.10).
pub(crate) fn keep_alive_limit(keep_alive: u16) -> Option<Duration> {
    (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500))
}

fn encode(p: &impl MqttPacket) -> Bytes {
    let mut b = BytesMut::new();
    match p.encode(&mut b) {
        Ok(()) => b.freeze(),
        Err(e) => {
            // Only packets the broker builds get here; a failure is a bug,
            // and sending nothing is safer than sending half a packet.
            tracing::error!("cannot encode an MQTT {:?}: {e}", p.packet_type());
            Bytes::new()
        }
    }
}

/// The acknowledgement of an incoming QoS 1 (PUBACK) or 2 (PUBREC).
pub(crate) fn publish_ack(version: u8, qos: u8, packet_id: u16, reason: ReasonCode) -> Bytes {
    // MQTT 3.1.1 acknowledgements carry no reason code.
    let reason = if version == 5 {
        reason
    } else {
        ReasonCode::Success
    };
    if qos == 1 {
        encode(&PubAckPacket::new_with_reason(packet_id, reason))
    } else {
        encode(&PubRecPacket::new_with_reason(packet_id, reason))
    }
}

impl Protocol {
    pub(crate) fn new(
        hub: Arc<Hub>,
        settings: Arc<Settings>,
        access: Arc<Access>,
        wake: Arc<Notify>,
    ) -> Self {
        Protocol {
            hub,
            settings,
            access,
            wake,
            phase: Phase::New,
            version: 4,
            keep_alive: 0,
            client_max_packet: usize::MAX,
            alias_out_max: 0,
            alias_out: HashMap::new(),
            alias_in: HashMap::new(),
            inbound_pending: 0,
            send_will: true,
            connect_expiry: 0,
            disconnect_expiry: None,
            username: None,
            certificate: None,
            peers_asked: false,
        }
    }

    /// A connection whose client presented a verified certificate: its
    /// subject is the user name, whatever CONNECT says, and no password is
    /// asked for (Mosquitto's `use_subject_as_username`, EMQX's
    /// `peer_cert_as_username = dn`).
    pub(crate) fn with_certificate(mut self, subject: Option<String>) -> Self {
        self.certificate = subject;
        self
    }

    pub(crate) fn version(&self) -> u8 {
        self.version
    }

    pub(crate) fn client_id(&self) -> Option<&str> {
        match &self.phase {
            Phase::Connected { client, .. } => Some(client),
            _ => None,
        }
    }

    /// How long the connection may stay silent before it is closed.
    pub(crate) fn silence_limit(&self) -> Option<Duration> {
        match self.phase {
            // A client gets as long to send CONNECT as a keep-alive of
            // the server's maximum would give it.
            Phase::New | Phase::AskingPeers(_) => Some(self.settings.connect_timeout),
            _ => keep_alive_limit(self.keep_alive),
        }
    }

    /// Close with a reason: a DISCONNECT first for MQTT 5 (once connected).
    fn fail(&mut self, reason: ReasonCode) -> Vec<Action> {
        let mut out = Vec::new();
        if self.version == 5 && matches!(self.phase, Phase::Connected { .. }) {
            out.push(Action::Send(encode(&DisconnectPacket::new(reason))));
        }
        out.push(Action::Close);
        out
    }

    pub(crate) fn frame_error(&mut self, e: &FrameError) -> Vec<Action> {
        match e {
            FrameError::TooLarge { .. } => self.fail(ReasonCode::PacketTooLarge),
            FrameError::BadLength => self.fail(ReasonCode::MalformedPacket),
        }
    }

    /// The connection's silence outlasted its keep-alive.
    pub(crate) fn timed_out(&mut self) -> Vec<Action> {
        self.fail(ReasonCode::KeepAliveTimeout)
    }

    /// A whole packet arrived.
    pub(crate) fn handle(&mut self, frame: Frame, now_ms: i64) -> Vec<Action> {
        let Some(kind) = PacketType::from_u8(frame.first_byte >> 4) else {
            return self.fail(ReasonCode::MalformedPacket);
        };
        let header = FixedHeader::new(
            kind,
            frame.first_byte & 0x0f,
            u32::try_from(frame.body.len()).unwrap_or(u32::MAX),
        );
        let mut body = frame.body;
        if let Phase::New = self.phase {
            if kind != PacketType::Connect {
                // MQTT §3.1: the first packet must be CONNECT.
                return vec![Action::Close];
            }
            // MQTT 5 allows a password without a user name (§3.1.2.9); the
            // codec refuses it as malformed. There is no user to check it
            // against: the client hears so instead of a closed socket.
            if let [0, 4, b'M', b'Q', b'T', b'T', 5, flags, ..] = body[..]
                && flags & 0x40 != 0
                && flags & 0x80 == 0
            {
                self.version = 5;
                return self.refuse(ReasonCode::BadUsernameOrPassword);
            }
            return match Packet::decode_from_body(kind, &header, &mut body) {
                Ok(Packet::Connect(c)) => self.connect(*c, now_ms),
                Ok(_) | Err(_) => vec![Action::Close],
            };
        }
        let packet =
            match Packet::decode_from_body_with_version(kind, &header, &mut body, self.version) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(client = ?self.client_id(), "malformed MQTT packet: {e}");
                    return self.fail(ReasonCode::MalformedPacket);
                }
            };
        let Phase::Connected { client, link } = &self.phase else {
            return vec![Action::Close];
        };
        let (client, link) = (client.clone(), *link);
        if !matches!(packet, Packet::Disconnect(_)) && !self.hub.is_attached(&client, link) {
            // Taken over: what this connection still sends must not touch
            // the session its successor now has.
            return self.pump(now_ms);
        }
        match packet {
            Packet::Connect(_) => self.fail(ReasonCode::ProtocolError),
            Packet::Publish(p) => self.publish(&client, p, now_ms),
            Packet::PubAck(a) => {
                self.hub.acked(&client, a.packet_id);
                self.pump(now_ms)
            }
            Packet::PubRec(r) => {
                let failed = u8::from(r.reason_code) >= 0x80;
                let known = self.hub.received(&client, r.packet_id, failed);
                if failed {
                    return self.pump(now_ms);
                }
                let reason = if known || self.version != 5 {
                    ReasonCode::Success
                } else {
                    ReasonCode::PacketIdentifierNotFound
                };
                vec![Action::Send(encode(&PubRelPacket::new_with_reason(
                    r.packet_id,
                    reason,
                )))]
            }
            Packet::PubRel(r) => {
                let known = self.hub.release(&client, r.packet_id);
                let reason = if known || self.version != 5 {
                    ReasonCode::Success
                } else {
                    ReasonCode::PacketIdentifierNotFound
                };
                vec![Action::Send(encode(&PubCompPacket::new_with_reason(
                    r.packet_id,
                    reason,
                )))]
            }
            Packet::PubComp(c) => {
                self.hub.acked(&client, c.packet_id);
                self.pump(now_ms)
            }
            Packet::Subscribe(s) => self.subscribe(&client, s, now_ms),
            Packet::Unsubscribe(u) => self.unsubscribe(&client, u),
            Packet::PingReq => vec![Action::Send(Bytes::from_static(&[0xd0, 0x00]))],
            Packet::Disconnect(d) => {
                let expiry = d.properties.get_session_expiry_interval();
                if let Some(e) = expiry
                    && e != 0
                    && self.connect_expiry == 0
                {
                    // MQTT 5 §3.14.2.2.2.
                    return self.fail(ReasonCode::ProtocolError);
                }
                self.disconnect_expiry = expiry;
                // Only a normal disconnection (0x00) discards the will
                // (MQTT 5 §3.1.2.5).
                self.send_will = d.reason_code != ReasonCode::Success;
                self.close(link, now_ms);
                vec![Action::Close]
            }
            // No authentication method exists yet, so an AUTH exchange
            // cannot have been started (MQTT 5 §4.12).
            Packet::Auth(_) => self.fail(ReasonCode::ProtocolError),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                self.fail(ReasonCode::ProtocolError)
            }
        }
    }

    fn connack(&self, present: bool, reason: ReasonCode) -> Bytes {
        if self.version == 5 {
            encode(&ConnAckPacket::new(present, reason))
        } else {
            encode(&ConnAckPacket::new_v311(present, reason))
        }
    }

    fn refuse(&self, reason: ReasonCode) -> Vec<Action> {
        vec![Action::Send(self.connack(false, reason)), Action::Close]
    }

    fn connect(&mut self, mut c: ConnectPacket, now_ms: i64) -> Vec<Action> {
        match c.protocol_version {
            4 | 5 => self.version = c.protocol_version,
            _ => {
                // MQTT 3.1.1 §3.1.2.2: refuse an unknown level with return
                // code 1 in the 3.1.1 format, which every client reads.
                self.version = 4;
                return self.refuse(ReasonCode::UnsupportedProtocolVersion);
            }
        }
        let v5 = self.version == 5;
        if v5 && c.properties.get_authentication_method().is_some() {
            return self.refuse(ReasonCode::BadAuthenticationMethod);
        }
        if v5 {
            if let Some(PropertyValue::TwoByteInteger(0)) =
                c.properties.get(PropertyId::ReceiveMaximum)
            {
                return self.refuse(ReasonCode::ProtocolError);
            }
            if let Some(PropertyValue::FourByteInteger(0)) =
                c.properties.get(PropertyId::MaximumPacketSize)
            {
                return self.refuse(ReasonCode::ProtocolError);
            }
        }
        // Credentials and identity (checked once: a CONNECT that waited for
        // the other brokers passed them already). A certificate is both.
        if let Some(subject) = &self.certificate {
            c.username = Some(subject.clone());
            c.password = None;
        } else if !self.peers_asked
            && let Err(r) = self
                .access
                .authenticate(c.username.as_deref(), c.password.as_deref())
        {
            let mut refusal = self.refuse(match r {
                Refusal::BadCredentials => ReasonCode::BadUsernameOrPassword,
                Refusal::NotAuthorized => ReasonCode::NotAuthorized,
            });
            refusal.insert(0, Action::Delay(FAILED_LOGIN_DELAY));
            return refusal;
        }
        let mut assigned = None;
        let client_id: ClientId = if c.client_id.is_empty() {
            if !v5 && !c.clean_start {
                // MQTT 3.1.1 §3.1.3.1: a zero-byte id needs CleanSession=1.
                return self.refuse(ReasonCode::ClientIdentifierNotValid);
            }
            let id = format!("shoal-{:032x}", rand::random::<u128>());
            assigned = Some(id.clone());
            Arc::from(id)
        } else {
            Arc::from(c.client_id.as_str())
        };
        // Another user's session is neither resumed nor wiped.
        if let Some(owner) = self.hub.session_user(&client_id)
            && owner != c.username
        {
            return self.refuse(ReasonCode::NotAuthorized);
        }
        // The will.
        let will = match &c.will {
            None => None,
            Some(w) => {
                if !topic::valid_name(&w.topic) {
                    return self.refuse(ReasonCode::TopicNameInvalid);
                }
                if !self
                    .access
                    .may_publish(c.username.as_deref(), &client_id, &w.topic)
                {
                    return self.refuse(ReasonCode::NotAuthorized);
                }
                let delay = match c.will_properties.get(PropertyId::WillDelayInterval) {
                    Some(PropertyValue::FourByteInteger(d)) => *d,
                    _ => 0,
                };
                Some(Will {
                    msg: Message {
                        topic: Arc::from(w.topic.as_str()),
                        payload: Bytes::from(w.payload.clone()),
                        qos: qos_of(w.qos),
                        retain: w.retain,
                        props: MessageProps::from_properties(&c.will_properties),
                        received_ms: now_ms,
                        origin: Some(client_id.clone()),
                    },
                    delay_secs: delay,
                })
            }
        };
        let (expiry, window) = if v5 {
            let expiry = c.properties.get_session_expiry_interval().unwrap_or(0);
            let window = c.properties.get_receive_maximum().unwrap_or(u16::MAX);
            self.client_max_packet = c
                .properties
                .get_maximum_packet_size()
                .map_or(usize::MAX, |m| m as usize);
            self.alias_out_max = c.properties.get_topic_alias_maximum().unwrap_or(0);
            (expiry, usize::from(window))
        } else {
            let expiry = if c.clean_start { 0 } else { u32::MAX };
            (expiry, self.settings.inflight_v3)
        };
        self.connect_expiry = expiry;
        let mut keep_alive = c.keep_alive;
        let max_ka = self.settings.max_keep_alive;
        let mut server_keep_alive = None;
        if v5 && max_ka > 0 && (keep_alive == 0 || keep_alive > max_ka) {
            keep_alive = max_ka;
            server_keep_alive = Some(max_ka);
        }
        self.keep_alive = keep_alive;
        self.username = c.username.clone();
        // In a cluster the session may be on another broker: once the
        // CONNECT is known to be acceptable, a client resuming one waits for
        // it to move here, and one starting clean ends it there.
        let mut discard_elsewhere = None;
        if self.hub.clustered() && assigned.is_none() && !self.peers_asked {
            if c.clean_start {
                discard_elsewhere = Some(Action::DiscardElsewhere {
                    client: client_id.clone(),
                    username: c.username.clone(),
                });
            } else if self.hub.session_user(&client_id).is_none() {
                self.peers_asked = true;
                let username = c.username.clone();
                self.phase = Phase::AskingPeers(Box::new(c));
                return vec![Action::AskPeers {
                    client: client_id,
                    username,
                }];
            }
        }
        let attached = self.hub.connect(
            ConnectRequest {
                client_id: client_id.clone(),
                clean_start: c.clean_start,
                expiry_secs: expiry,
                will,
                wake: self.wake.clone(),
                window,
                username: c.username.clone(),
            },
            now_ms,
        );
        self.phase = Phase::Connected {
            client: client_id.clone(),
            link: attached.link,
        };
        let mut ack = if v5 {
            ConnAckPacket::new(attached.session_present, ReasonCode::Success)
                .with_receive_maximum(self.settings.receive_maximum)
                .with_topic_alias_maximum(self.settings.topic_alias_maximum)
                .with_maximum_packet_size(
                    u32::try_from(self.settings.max_packet_size).unwrap_or(u32::MAX),
                )
                .with_retain_available(true)
                .with_wildcard_subscription_available(true)
                .with_subscription_identifier_available(true)
                .with_shared_subscription_available(true)
        } else {
            ConnAckPacket::new_v311(attached.session_present, ReasonCode::Success)
        };
        if let Some(id) = assigned
            && v5
        {
            ack = ack.with_assigned_client_id(id);
        }
        if let Some(ka) = server_keep_alive {
            ack = ack.with_server_keep_alive(ka);
        }
        if v5 && c.properties.get_request_response_information() == Some(true) {
            ack = ack.with_response_information(format!("response/{client_id}"));
        }
        let mut out: Vec<Action> = discard_elsewhere.into_iter().collect();
        out.push(Action::Send(encode(&ack)));
        out.extend(self.pump(now_ms));
        out
    }

    /// The other brokers answered [`Action::AskPeers`]: the session moved
    /// here if one of them had it; `refusal` if the CONNECT is refused
    /// after all (another user's session, or none could be looked up).
    pub(crate) fn peers_answered(
        &mut self,
        refusal: Option<ReasonCode>,
        now_ms: i64,
    ) -> Vec<Action> {
        let Phase::AskingPeers(c) = std::mem::replace(&mut self.phase, Phase::New) else {
            return vec![Action::Close];
        };
        if let Some(r) = refusal {
            return self.refuse(r);
        }
        self.connect(*c, now_ms)
    }

    fn publish(&mut self, client: &ClientId, mut p: PublishPacket, now_ms: i64) -> Vec<Action> {
        let qos = qos_of(p.qos);
        // Topic aliases (MQTT 5 §3.3.2.3.4).
        if let Some(alias) = p.properties.get_topic_alias() {
            if alias == 0 || alias > self.settings.topic_alias_maximum {
                return self.fail(ReasonCode::TopicAliasInvalid);
            }
            if p.topic_name.is_empty() {
                match self.alias_in.get(&alias) {
                    Some(t) => p.topic_name = t.to_string(),
                    None => return self.fail(ReasonCode::ProtocolError),
                }
            } else {
                self.alias_in
                    .insert(alias, Arc::from(p.topic_name.as_str()));
            }
        }
        if !topic::valid_name(&p.topic_name) {
            return self.fail(ReasonCode::TopicNameInvalid);
        }
        let packet_id = match (qos, p.packet_id) {
            (0, _) => 0,
            (_, Some(id)) if id != 0 => id,
            _ => return self.fail(ReasonCode::ProtocolError),
        };
        self.hub.count_in(qos);
        if qos > 0
            && self.inbound_pending + self.hub.pending_releases(client)
                >= usize::from(self.settings.receive_maximum)
        {
            return self.fail(ReasonCode::ReceiveMaximumExceeded);
        }
        if qos == 2 && !self.hub.incoming_qos2(client, packet_id) {
            // A retransmission of one not yet released: it was routed
            // already (MQTT §4.3.3), so only the PUBREC goes again.
            return vec![Action::Ack(publish_ack(
                self.version,
                2,
                packet_id,
                ReasonCode::Success,
            ))];
        }
        if !self
            .access
            .may_publish(self.username.as_deref(), client, &p.topic_name)
        {
            return match qos {
                0 => Vec::new(),
                _ => {
                    if qos == 2 {
                        // The exchange ends with the refusal (MQTT 5 §4.3.3).
                        self.hub.release(client, packet_id);
                    }
                    vec![Action::Ack(publish_ack(
                        self.version,
                        qos,
                        packet_id,
                        ReasonCode::NotAuthorized,
                    ))]
                }
            };
        }
        let msg = Message {
            topic: Arc::from(p.topic_name.as_str()),
            payload: p.payload,
            qos,
            retain: p.retain,
            props: MessageProps::from_properties(&p.properties),
            received_ms: now_ms,
            origin: Some(client.clone()),
        };
        if let Some(stream) = self.hub.persist_target(&msg.topic) {
            // QoS 2 counts in the session's incoming ids until PUBREL.
            if qos == 1 {
                self.inbound_pending += 1;
            }
            return vec![Action::Persist {
                msg,
                stream,
                ack: (qos > 0).then_some((qos, packet_id)),
            }];
        }
        let (_, mark) = self.hub.publish_marked(msg, now_ms);
        if qos == 0 {
            return Vec::new();
        }
        // Queued for a persistent session (or retained): acknowledged once
        // that is durable.
        match mark {
            Some(mark) if !self.hub.is_durable(mark) => vec![Action::AckAfter {
                mark,
                qos,
                packet_id,
            }],
            _ => vec![Action::Ack(publish_ack(
                self.version,
                qos,
                packet_id,
                ReasonCode::Success,
            ))],
        }
    }

    /// A QoS 1 acknowledgement is held back (for the log, or behind one
    /// that is): it counts against the Receive Maximum until it goes out.
    pub(crate) fn ack_held(&mut self) {
        self.inbound_pending += 1;
    }

    /// A held-back QoS 1 acknowledgement went out.
    pub(crate) fn held_ack_sent(&mut self) {
        self.inbound_pending = self.inbound_pending.saturating_sub(1);
    }

    fn subscribe(&mut self, client: &ClientId, s: SubscribePacket, now_ms: i64) -> Vec<Action> {
        let v5 = self.version == 5;
        let sub_id = match s.properties.get(PropertyId::SubscriptionIdentifier) {
            Some(PropertyValue::VariableByteInteger(0)) => {
                return self.fail(ReasonCode::ProtocolError);
            }
            Some(PropertyValue::VariableByteInteger(id)) => Some(*id),
            _ => None,
        };
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut accepted = Vec::new();
        let mut slots = Vec::new();
        for f in s.filters {
            let o = &f.options;
            let opts = SubOpts {
                qos: qos_of(o.qos),
                no_local: v5 && o.no_local,
                retain_as_published: v5 && o.retain_as_published,
                retain_handling: if v5 { o.retain_handling as u8 } else { 0 },
                id: sub_id,
            };
            let code = if !topic::valid_filter(&f.filter) {
                SubAckReasonCode::TopicFilterInvalid
            } else if opts.no_local && super::hub::shared(&f.filter).is_some() {
                // MQTT 5 §3.8.3.1: a protocol error on a shared subscription.
                return self.fail(ReasonCode::ProtocolError);
            } else if !self
                .access
                .may_subscribe(self.username.as_deref(), client, &f.filter)
            {
                SubAckReasonCode::NotAuthorized
            } else {
                slots.push(codes.len());
                let granted = match opts.qos {
                    0 => SubAckReasonCode::GrantedQoS0,
                    1 => SubAckReasonCode::GrantedQoS1,
                    _ => SubAckReasonCode::GrantedQoS2,
                };
                accepted.push((f.filter, opts));
                granted
            };
            codes.push(code);
        }
        self.hub.subscribe(client, accepted, now_ms);
        let mut ack = if v5 {
            SubAckPacket::new(s.packet_id)
        } else {
            SubAckPacket::new_v311(s.packet_id)
        };
        for c in codes {
            ack = ack.add_reason_code(c);
        }
        let mut out = vec![Action::Send(encode(&ack))];
        // Retained messages follow the SUBACK.
        out.extend(self.pump(now_ms));
        out
    }

    fn unsubscribe(&mut self, client: &ClientId, u: UnsubscribePacket) -> Vec<Action> {
        let existed = self.hub.unsubscribe(client, &u.filters);
        let ack = if self.version == 5 {
            let mut a = UnsubAckPacket::new(u.packet_id);
            for (f, e) in u.filters.iter().zip(existed) {
                a = a.add_reason_code(if !topic::valid_filter(f) {
                    UnsubAckReasonCode::TopicFilterInvalid
                } else if e {
                    UnsubAckReasonCode::Success
                } else {
                    UnsubAckReasonCode::NoSubscriptionExisted
                });
            }
            a
        } else {
            UnsubAckPacket::new_v311(u.packet_id)
        };
        vec![Action::Send(encode(&ack))]
    }

    /// Send what the session has for this connection, or notice that it
    /// was taken over.
    pub(crate) fn pump(&mut self, now_ms: i64) -> Vec<Action> {
        let Phase::Connected { client, link } = &self.phase else {
            return Vec::new();
        };
        let (client, link) = (client.clone(), *link);
        let Some(sends) = self.hub.next_sends(&client, link, now_ms) else {
            // Another connection took the session (MQTT 5 §3.1.4).
            let out = self.fail(ReasonCode::SessionTakenOver);
            self.phase = Phase::Closed;
            return out;
        };
        let mut out = Vec::with_capacity(sends.len());
        for s in sends {
            match s {
                Send::PubRel(pid) => {
                    out.push(Action::Send(encode(&PubRelPacket::new(pid))));
                }
                Send::Publish {
                    packet_id,
                    item,
                    dup,
                } => {
                    let mut p = publish_packet(
                        &item.msg,
                        self.version,
                        item.qos,
                        item.retain,
                        &item.sub_ids,
                        now_ms,
                    );
                    p.packet_id = packet_id;
                    p.dup = dup;
                    let new_alias = self.alias(&mut p);
                    let bytes = encode(&p);
                    // An empty encoding is a message the codec cannot
                    // write (an over-long property): dropped like one too
                    // large for the client.
                    if bytes.is_empty() || bytes.len() > self.client_max_packet {
                        // MQTT 5 §3.1.2.11.4: a message the client cannot
                        // take is dropped as if it had been delivered.
                        if let Some(t) = new_alias {
                            self.alias_out.remove(&t);
                        }
                        if let Some(pid) = packet_id {
                            self.hub.acked(&client, pid);
                        }
                        self.hub.note_dropped(Dropped::PacketTooLarge);
                        continue;
                    }
                    self.hub.count_out(item.qos);
                    out.push(Action::Send(bytes));
                }
            }
        }
        out
    }

    /// Replace the topic with an alias the client already knows, or give
    /// it one while aliases are left. Returns the topic newly aliased.
    fn alias(&mut self, p: &mut PublishPacket) -> Option<Arc<str>> {
        if self.alias_out_max == 0 {
            return None;
        }
        if let Some(&a) = self.alias_out.get(p.topic_name.as_str()) {
            p.properties.set_topic_alias(a);
            p.topic_name.clear();
            return None;
        }
        let next = u16::try_from(self.alias_out.len() + 1).ok()?;
        if next > self.alias_out_max {
            return None;
        }
        let t: Arc<str> = Arc::from(p.topic_name.as_str());
        self.alias_out.insert(t.clone(), next);
        p.properties.set_topic_alias(next);
        Some(t)
    }

    /// The connection ended (any way). Detaches the session; the will goes
    /// out unless the client said goodbye normally.
    pub(crate) fn closed(&mut self, now_ms: i64) {
        if let Phase::Connected { link, .. } = self.phase {
            self.close(link, now_ms);
        }
    }

    fn close(&mut self, link: u64, now_ms: i64) {
        if let Phase::Connected { client, .. } = &self.phase {
            self.hub
                .disconnect(client, link, self.send_will, self.disconnect_expiry, now_ms);
        }
        self.phase = Phase::Closed;
    }
}

#[cfg(test)]
mod tests {
    use bytes::Buf;
    use mqtt5_protocol::packet::subscribe::TopicFilter;
    use mqtt5_protocol::packet::subscribe_options::SubscriptionOptions;
    use mqtt5_protocol::types::QoS;

    use super::*;
    use crate::mqtt::hub::Limits;

    struct Client {
        proto: Protocol,
        version: u8,
    }

    fn hub() -> Arc<Hub> {
        Arc::new(Hub::new(Limits::default()))
    }

    fn frame(p: &impl MqttPacket) -> Frame {
        let b = encode(p);
        let mut buf = BytesMut::from(&b[..]);
        match super::super::frame::next(&mut buf, usize::MAX) {
            Ok(Some(f)) => f,
            other => panic!("not one frame: {other:?}"),
        }
    }

    fn raw_connect(version: u8, client: &str, flags: u8) -> Frame {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', version, flags, 0, 60];
        if version == 5 {
            body.push(0); // no properties
        }
        body.extend_from_slice(&u16::try_from(client.len()).unwrap().to_be_bytes());
        body.extend_from_slice(client.as_bytes());
        Frame {
            first_byte: 0x10,
            body: Bytes::from(body),
        }
    }

    /// The packets in the actions' sends, decoded.
    fn sent(actions: &[Action], version: u8) -> Vec<Packet> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(b) | Action::Ack(b) => Some(b.clone()),
                _ => None,
            })
            .map(|b| {
                let mut buf = b;
                let h = FixedHeader::decode(&mut buf).unwrap();
                let mut body = buf.copy_to_bytes(h.remaining_length as usize);
                Packet::decode_from_body_with_version(h.packet_type, &h, &mut body, version)
                    .unwrap()
            })
            .collect()
    }

    fn connect(hub: &Arc<Hub>, version: u8, client: &str, clean: bool) -> (Client, Vec<Action>) {
        let mut proto = Protocol::new(
            hub.clone(),
            Arc::new(Settings::default()),
            Arc::new(Access::open()),
            Arc::new(Notify::new()),
        );
        let actions = proto.handle(raw_connect(version, client, if clean { 2 } else { 0 }), 0);
        (Client { proto, version }, actions)
    }

    fn subscribe(c: &mut Client, filters: &[(&str, u8)], id: Option<u32>) -> Vec<Packet> {
        let mut s = if c.version == 5 {
            SubscribePacket::new(1)
        } else {
            SubscribePacket::new_v311(1)
        };
        for (f, q) in filters {
            s = s.add_filter_with_options(TopicFilter::with_options(
                *f,
                SubscriptionOptions::new(super::super::message::qos_from(*q)),
            ));
        }
        if let Some(id) = id {
            s = s.with_subscription_identifier(id);
        }
        let a = c.proto.handle(frame(&s), 0);
        sent(&a, c.version)
    }

    fn publish(c: &mut Client, topic: &str, qos: u8, pid: u16) -> Vec<Action> {
        let mut p = if c.version == 5 {
            PublishPacket::new(
                topic,
                Bytes::from_static(b"x"),
                super::super::message::qos_from(qos),
            )
        } else {
            PublishPacket::new_v311(
                topic,
                Bytes::from_static(b"x"),
                super::super::message::qos_from(qos),
            )
        };
        if qos > 0 {
            p = p.with_packet_id(pid);
        }
        c.proto.handle(frame(&p), 0)
    }

    #[test]
    fn connect_subscribe_publish_deliver() {
        let hub = hub();
        let (mut sub, a) = connect(&hub, 4, "sub", true);
        assert!(
            matches!(&sent(&a, 4)[0], Packet::ConnAck(c) if c.reason_code == ReasonCode::Success)
        );
        let acks = subscribe(&mut sub, &[("a/+", 1)], None);
        assert!(
            matches!(&acks[0], Packet::SubAck(s) if s.reason_codes == vec![SubAckReasonCode::GrantedQoS1])
        );
        let (mut pubc, _) = connect(&hub, 4, "pub", true);
        let a = publish(&mut pubc, "a/b", 2, 7);
        assert!(matches!(&sent(&a, 4)[0], Packet::PubRec(r) if r.packet_id == 7));
        let got = sent(&sub.proto.pump(0), 4);
        // Delivered at the subscription's QoS 1, not the publish's 2.
        assert!(
            matches!(&got[0], Packet::Publish(p) if p.topic_name == "a/b" && p.qos == QoS::AtLeastOnce)
        );
    }

    #[test]
    fn a_retransmitted_qos2_publish_is_routed_once() {
        let hub = hub();
        let (mut sub, _) = connect(&hub, 4, "sub", true);
        subscribe(&mut sub, &[("t", 2)], None);
        let (mut pubc, _) = connect(&hub, 4, "pub", true);
        publish(&mut pubc, "t", 2, 9);
        publish(&mut pubc, "t", 2, 9);
        assert_eq!(sent(&sub.proto.pump(0), 4).len(), 1);
        // After PUBREL the id is free again and a new message routes.
        let a = pubc.proto.handle(frame(&PubRelPacket::new(9)), 0);
        assert!(matches!(&sent(&a, 4)[0], Packet::PubComp(c) if c.packet_id == 9));
        publish(&mut pubc, "t", 2, 9);
        assert_eq!(sent(&sub.proto.pump(0), 4).len(), 1);
    }

    #[test]
    fn overlapping_subscriptions_deliver_once_with_every_identifier() {
        let hub = hub();
        let (mut sub, _) = connect(&hub, 5, "sub", true);
        subscribe(&mut sub, &[("a/#", 0)], Some(3));
        subscribe(&mut sub, &[("a/b", 1)], Some(4));
        let (mut pubc, _) = connect(&hub, 5, "pub", true);
        publish(&mut pubc, "a/b", 1, 1);
        let got = sent(&sub.proto.pump(0), 5);
        assert_eq!(got.len(), 1);
        let Packet::Publish(p) = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(p.qos, QoS::AtLeastOnce);
        let mut ids = p.properties.subscription_identifiers();
        ids.sort();
        assert_eq!(ids, vec![3, 4]);
    }

    #[test]
    fn takeover_disconnects_the_old_connection_with_0x8e() {
        let hub = hub();
        let (mut first, _) = connect(&hub, 5, "same", false);
        let (_second, a) = connect(&hub, 5, "same", false);
        assert!(matches!(&sent(&a, 5)[0], Packet::ConnAck(c) if c.session_present));
        let out = first.proto.pump(0);
        assert!(
            matches!(&sent(&out, 5)[0], Packet::Disconnect(d) if d.reason_code == ReasonCode::SessionTakenOver)
        );
        assert!(matches!(out.last(), Some(Action::Close)));
    }

    #[test]
    fn unknown_protocol_levels_get_return_code_1() {
        let hub = hub();
        let mut proto = Protocol::new(
            hub,
            Arc::new(Settings::default()),
            Arc::new(Access::open()),
            Arc::new(Notify::new()),
        );
        let a = proto.handle(raw_connect(6, "c", 2), 0);
        let Action::Send(b) = &a[0] else {
            panic!("{a:?}")
        };
        assert_eq!(&b[..], &[0x20, 0x02, 0x00, 0x01]);
        assert!(matches!(a.last(), Some(Action::Close)));
    }

    #[test]
    fn malformed_packets_close_the_connection() {
        let hub = hub();
        let (mut c, _) = connect(&hub, 5, "c", true);
        // A PUBLISH whose topic length runs past the packet.
        let a = c.proto.handle(
            Frame {
                first_byte: 0x30,
                body: Bytes::from_static(&[0x00, 0x09, b'a']),
            },
            0,
        );
        assert!(
            matches!(&sent(&a, 5)[0], Packet::Disconnect(d) if d.reason_code == ReasonCode::MalformedPacket)
        );
        assert!(matches!(a.last(), Some(Action::Close)));
        // A packet other than CONNECT first closes without an answer.
        let (mut fresh, _) = (
            Protocol::new(
                hub,
                Arc::new(Settings::default()),
                Arc::new(Access::open()),
                Arc::new(Notify::new()),
            ),
            (),
        );
        let a = fresh.handle(
            Frame {
                first_byte: 0xc0,
                body: Bytes::new(),
            },
            0,
        );
        assert!(matches!(a.as_slice(), [Action::Close]));
    }

    #[test]
    fn offline_persistent_sessions_queue_qos1_and_resend_unacked_with_dup() {
        let hub = hub();
        let (mut sub, _) = connect(&hub, 4, "s", false);
        subscribe(&mut sub, &[("t", 1)], None);
        let (mut pubc, _) = connect(&hub, 4, "p", true);
        publish(&mut pubc, "t", 1, 1);
        // Sent but never acknowledged, then the connection drops.
        assert_eq!(sent(&sub.proto.pump(0), 4).len(), 1);
        sub.proto.closed(0);
        publish(&mut pubc, "t", 1, 2);
        publish(&mut pubc, "t", 0, 0);
        let (mut back, a) = connect(&hub, 4, "s", false);
        let got = sent(&a, 4);
        assert!(matches!(&got[0], Packet::ConnAck(c) if c.session_present));
        let publishes: Vec<_> = got[1..]
            .iter()
            .chain(sent(&back.proto.pump(0), 4).iter())
            .filter_map(|p| match p {
                Packet::Publish(p) => Some((p.dup, p.qos)),
                _ => None,
            })
            .collect::<Vec<_>>();
        // The unacknowledged one again with DUP, the queued QoS 1 one; the
        // QoS 0 one was not kept for the offline session.
        assert_eq!(
            publishes,
            vec![(true, QoS::AtLeastOnce), (false, QoS::AtLeastOnce)]
        );
    }

    #[test]
    fn a_session_not_here_is_asked_of_the_other_brokers_before_connack() {
        let routes = Arc::new(crate::mqtt::routes::Routes::default());
        routes.set_remote(
            &[shoal_placement::MqttRoute {
                broker: 2,
                http_addr: "b2".into(),
                filters: vec![],
            }],
            1,
        );
        let hub = Arc::new(Hub::with_routes(Limits::default(), routes));
        // Clean Start waits for no one; the other brokers are told to end
        // the session they may have.
        let (_, actions) = connect(&hub, 5, "fresh", true);
        assert!(matches!(
            actions.first(),
            Some(Action::DiscardElsewhere { client, .. }) if &**client == "fresh"
        ));
        assert!(matches!(sent(&actions, 5).as_slice(), [Packet::ConnAck(_)]));
        let (mut c, actions) = connect(&hub, 5, "kept", false);
        assert!(matches!(
            actions.as_slice(),
            [Action::AskPeers { client, username: None }] if &**client == "kept"
        ));
        assert_eq!(c.proto.client_id(), None);
        let actions = c.proto.peers_answered(None, 0);
        assert!(matches!(sent(&actions, 5).as_slice(), [Packet::ConnAck(_)]));
        assert_eq!(c.proto.client_id(), Some("kept"));
        // Another user's session elsewhere: refused, as it would be here.
        let (mut c, _) = connect(&hub, 5, "theirs", false);
        let actions = c.proto.peers_answered(Some(ReasonCode::NotAuthorized), 0);
        match sent(&actions, 5).as_slice() {
            [Packet::ConnAck(a)] => assert_eq!(a.reason_code, ReasonCode::NotAuthorized),
            other => panic!("{other:?}"),
        }
        assert!(matches!(actions.last(), Some(Action::Close)));
    }

    #[test]
    fn a_v5_password_without_user_name_gets_a_connack() {
        let mut proto = Protocol::new(
            hub(),
            Arc::new(Settings::default()),
            Arc::new(Access::open()),
            Arc::new(Notify::new()),
        );
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x42, 0, 60, 0];
        body.extend_from_slice(&[0, 1, b'c', 0, 2, b'p', b'w']);
        let actions = proto.handle(
            Frame {
                first_byte: 0x10,
                body: Bytes::from(body),
            },
            0,
        );
        match sent(&actions, 5).as_slice() {
            [Packet::ConnAck(a)] => assert_eq!(a.reason_code, ReasonCode::BadUsernameOrPassword),
            other => panic!("{other:?}"),
        }
        assert!(matches!(actions.last(), Some(Action::Close)));
    }

    #[test]
    fn a_certificate_subject_is_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let acl = dir.path().join("acl");
        std::fs::write(&acl, "user CN=dev1,O=Shoal\ntopic write dev1/#\n").unwrap();
        let access = Arc::new(Access::load(None, Some(&acl), false).unwrap());
        let reason = |certificate: Option<&str>| {
            let mut proto = Protocol::new(
                hub(),
                Arc::new(Settings::default()),
                access.clone(),
                Arc::new(Notify::new()),
            )
            .with_certificate(certificate.map(str::to_string));
            let actions = proto.handle(raw_connect(5, "d1", 2), 0);
            let reason = match sent(&actions, 5).as_slice() {
                [Packet::ConnAck(a)] => a.reason_code,
                other => panic!("{other:?}"),
            };
            // A refused login waits before its CONNACK; an accepted one not.
            let delayed =
                matches!(actions.first(), Some(Action::Delay(d)) if *d == FAILED_LOGIN_DELAY);
            assert_eq!(delayed, reason != ReasonCode::Success, "{actions:?}");
            (reason, proto.username.clone())
        };
        // Anonymous clients are refused; the same CONNECT with a verified
        // certificate is accepted, under the certificate's subject.
        assert_eq!(reason(None).0, ReasonCode::NotAuthorized);
        assert_eq!(
            reason(Some("CN=dev1,O=Shoal")),
            (ReasonCode::Success, Some("CN=dev1,O=Shoal".to_string()))
        );
        assert!(access.may_publish(Some("CN=dev1,O=Shoal"), "d1", "dev1/temp"));
    }
}
