//! A Kafka request frame body: header and request decoding.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_broker::fuzzing::kafka_request(data));
