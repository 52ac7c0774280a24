//! A produce request's record batches: split, validated, turned into rows.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_broker::fuzzing::record_batches(data));
