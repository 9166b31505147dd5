//! Fluent Forward from the network (the collector's listener): bytes in reads of any size, the
//! MessagePack stream cut into values, each value taken as a Forward message, a handshake PING
//! and an ack. The first byte sets the read size.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| monitor_fuzz::forward_stream::run(data));
