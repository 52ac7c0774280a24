//! Entry points for fuzzers and property tests: each feeds arbitrary bytes
//! to one decoder that network input reaches. None may panic, hang or
//! allocate beyond what its input's limits allow; results are ignored.
//! Built with the `fuzzing` feature (the `fuzz/` targets) and in tests.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

/// One Kafka request frame body (after the length prefix).
pub fn kafka_request(data: &[u8]) {
    let _ = crate::kafka::conn::decode_frame(Bytes::copy_from_slice(data));
}

/// A produce request's records: split into batches, each checked and
/// turned into rows as the broker would.
pub fn record_batches(data: &[u8]) {
    let Ok(batches) = crate::batch::split(Bytes::copy_from_slice(data)) else {
        return;
    };
    for b in batches {
        if crate::batch::validate(&b).is_ok() {
            let _ = crate::batch::to_rows(&b);
        }
    }
}

/// A client's byte stream into a fresh MQTT connection's state machine,
/// packet by packet, until it closes.
pub fn mqtt_stream(data: &[u8]) {
    use crate::mqtt::conn::{Action, Protocol};
    let hub = Arc::new(crate::mqtt::hub::Hub::with_routes(
        crate::mqtt::Limits::default(),
        Default::default(),
    ));
    let settings = Arc::new(crate::mqtt::Settings::default());
    let mut proto = Protocol::new(
        hub,
        settings.clone(),
        Arc::new(crate::mqtt::Access::open()),
        Arc::new(tokio::sync::Notify::new()),
    );
    let mut buf = BytesMut::from(data);
    loop {
        match crate::mqtt::frame::next(&mut buf, settings.max_packet_size) {
            Ok(Some(f)) => {
                let actions = proto.handle(f, 0);
                if matches!(actions.last(), Some(Action::Close)) {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = proto.frame_error(&e);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A valid request header (api key, version, correlation id, client
    /// id) in front of arbitrary body bytes.
    fn kafka_frame() -> impl Strategy<Value = Vec<u8>> {
        (
            0i16..70,
            0i16..16,
            proptest::collection::vec(any::<u8>(), 0..512),
        )
            .prop_map(|(key, version, body)| {
                let mut f = Vec::new();
                f.extend_from_slice(&key.to_be_bytes());
                f.extend_from_slice(&version.to_be_bytes());
                f.extend_from_slice(&7i32.to_be_bytes());
                f.extend_from_slice(&4i16.to_be_bytes());
                f.extend_from_slice(b"fuzz");
                f.extend_from_slice(&body);
                f
            })
    }

    /// A record batch header with a consistent length and magic 2, then
    /// arbitrary bytes.
    fn record_batch() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 49..600).prop_map(|mut b| {
            let len = i32::try_from(b.len() - 12).unwrap_or(0);
            b[8..12].copy_from_slice(&len.to_be_bytes());
            b[16] = 2;
            b
        })
    }

    /// A CONNECT (3.1.1 or 5) followed by arbitrary packets.
    fn mqtt_session() -> impl Strategy<Value = Vec<u8>> {
        (
            prop_oneof![Just(4u8), Just(5u8)],
            proptest::collection::vec(
                (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)),
                0..8,
            ),
        )
            .prop_map(|(version, packets)| {
                let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', version, 0x02, 0, 60];
                if version == 5 {
                    body.push(0);
                }
                body.extend_from_slice(&[0, 1, b'c']);
                let mut out = vec![0x10, u8::try_from(body.len()).unwrap_or(0)];
                out.extend_from_slice(&body);
                for (first, p) in packets {
                    out.push(first);
                    out.push(u8::try_from(p.len()).unwrap_or(0));
                    out.extend_from_slice(&p);
                }
                out
            })
    }

    /// Found by the property test below: kafka-protocol as released
    /// reserves a declared array length before decoding (see the workspace
    /// Cargo.toml), so this 24-byte request aborted the process.
    #[test]
    fn a_huge_declared_array_is_an_error_not_an_abort() {
        let mut f = Vec::new();
        f.extend_from_slice(&19i16.to_be_bytes()); // CreateTopics
        f.extend_from_slice(&2i16.to_be_bytes());
        f.extend_from_slice(&1i32.to_be_bytes());
        f.extend_from_slice(&(-1i16).to_be_bytes());
        f.extend_from_slice(&i32::MAX.to_be_bytes());
        f.extend_from_slice(&[0; 8]);
        assert!(crate::kafka::conn::decode_frame(Bytes::from(f)).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn kafka_requests_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
            kafka_request(&data);
        }

        #[test]
        fn kafka_requests_with_valid_headers_never_panic(data in kafka_frame()) {
            kafka_request(&data);
        }

        #[test]
        fn record_batches_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
            record_batches(&data);
        }

        #[test]
        fn shaped_record_batches_never_panic(data in record_batch()) {
            record_batches(&data);
        }

        #[test]
        fn mqtt_streams_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
            mqtt_stream(&data);
        }

        #[test]
        fn mqtt_sessions_never_panic(data in mqtt_session()) {
            mqtt_stream(&data);
        }
    }
}
