//! Trace segments, the collector's store and the agent's spool read from disk (a damaged or
//! planted file): frames read as a stream, damage skipped, each payload decoded.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| monitor_fuzz::trace_frames::run(data));
