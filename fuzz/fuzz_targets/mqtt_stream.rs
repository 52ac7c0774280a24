//! A client's bytes into a fresh MQTT connection's state machine.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_broker::fuzzing::mqtt_stream(data));
