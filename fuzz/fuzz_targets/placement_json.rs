//! The placement API's request bodies: commands and queries as JSON.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<shoal_placement::Command>(data);
    let _ = serde_json::from_slice::<shoal_placement::Query>(data);
    let _ = serde_json::from_slice::<shoal_placement::Heartbeat>(data);
});
