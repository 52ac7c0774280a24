//! An application message as the broker routes it, independent of the
//! packet it came in (PUBLISH, a will, a Kafka record).

use std::sync::Arc;

use bytes::Bytes;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::types::QoS;
use mqtt5_protocol::{Properties, PropertyId, PropertyValue};

/// The v5 properties a message carries from publisher to subscribers.
/// Topic alias and subscription identifiers are per-connection, not here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProps {
    pub payload_format: Option<u8>,
    /// Seconds the message lives, as the publisher set it.
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub props: MessageProps,
    /// Wall-clock time the broker received it, for expiry.
    pub received_ms: i64,
    /// The client that published it (for no-local); `None` from Kafka.
    pub origin: Option<Arc<str>>,
}

impl Message {
    /// When it expires (wall clock ms), if it does.
    pub fn expires_at_ms(&self) -> Option<i64> {
        self.props
            .message_expiry
            .map(|s| self.received_ms + i64::from(s) * 1000)
    }

    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms().is_some_and(|t| t <= now_ms)
    }

    /// Seconds left to live, as forwarded to subscribers (MQTT 5 §3.3.2.3.3:
    /// the interval minus the time spent waiting in the server).
    pub fn remaining_expiry(&self, now_ms: i64) -> Option<u32> {
        self.expires_at_ms()
            .map(|t| u32::try_from(((t - now_ms).max(0) + 999) / 1000).unwrap_or(u32::MAX))
    }
}

pub(crate) fn qos_of(q: QoS) -> u8 {
    q as u8
}

pub(crate) fn qos_from(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl MessageProps {
    /// The message properties of a received PUBLISH (or will properties).
    pub(crate) fn from_properties(p: &Properties) -> Self {
        let mut m = MessageProps::default();
        for (id, v) in p.iter() {
            match (id, v) {
                (PropertyId::PayloadFormatIndicator, PropertyValue::Byte(b)) => {
                    m.payload_format = Some(*b)
                }
                (PropertyId::MessageExpiryInterval, PropertyValue::FourByteInteger(s)) => {
                    m.message_expiry = Some(*s)
                }
                (PropertyId::ContentType, PropertyValue::Utf8String(s)) => {
                    m.content_type = Some(s.clone())
                }
                (PropertyId::ResponseTopic, PropertyValue::Utf8String(s)) => {
                    m.response_topic = Some(s.clone())
                }
                (PropertyId::CorrelationData, PropertyValue::BinaryData(b)) => {
                    m.correlation_data = Some(b.clone())
                }
                _ => {}
            }
        }
        // User properties keep their order (the codec keeps them in one list).
        if let Some(all) = p.get_all(PropertyId::UserProperty) {
            for v in all {
                if let PropertyValue::Utf8StringPair(k, v) = v {
                    m.user.push((k.clone(), v.clone()));
                }
            }
        }
        m
    }

    /// Write these onto an outgoing PUBLISH's properties.
    pub(crate) fn write(&self, p: &mut Properties, now_ms: i64, msg: &Message) {
        if let Some(b) = self.payload_format {
            let _ = p.add(PropertyId::PayloadFormatIndicator, PropertyValue::Byte(b));
        }
        if let Some(s) = msg.remaining_expiry(now_ms) {
            let _ = p.add(
                PropertyId::MessageExpiryInterval,
                PropertyValue::FourByteInteger(s),
            );
        }
        if let Some(s) = &self.content_type {
            let _ = p.add(
                PropertyId::ContentType,
                PropertyValue::Utf8String(s.clone()),
            );
        }
        if let Some(s) = &self.response_topic {
            let _ = p.add(
                PropertyId::ResponseTopic,
                PropertyValue::Utf8String(s.clone()),
            );
        }
        if let Some(b) = &self.correlation_data {
            let _ = p.add(
                PropertyId::CorrelationData,
                PropertyValue::BinaryData(b.clone()),
            );
        }
        for (k, v) in &self.user {
            let _ = p.add(
                PropertyId::UserProperty,
                PropertyValue::Utf8StringPair(k.clone(), v.clone()),
            );
        }
    }
}

/// The PUBLISH that delivers `msg` at `qos` to one subscriber.
pub(crate) fn publish_packet(
    msg: &Message,
    version: u8,
    qos: u8,
    retain: bool,
    sub_ids: &[u32],
    now_ms: i64,
) -> PublishPacket {
    let mut p = if version == 5 {
        PublishPacket::new(msg.topic.to_string(), msg.payload.clone(), qos_from(qos))
    } else {
        PublishPacket::new_v311(msg.topic.to_string(), msg.payload.clone(), qos_from(qos))
    };
    p.retain = retain;
    if version == 5 {
        msg.props.write(&mut p.properties, now_ms, msg);
        for id in sub_ids {
            let _ = p.properties.add(
                PropertyId::SubscriptionIdentifier,
                PropertyValue::VariableByteInteger(*id),
            );
        }
    }
    p
}
