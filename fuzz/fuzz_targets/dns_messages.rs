//! DNS answers received by session processes: UDP messages, and TCP streams in pieces (a length
//! prefix, then a message over several segments, out of order at times).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| monitor_fuzz::dns_messages::run(data));
