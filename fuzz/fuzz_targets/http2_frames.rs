//! HTTP/2 writes of one connection (the preface, HEADERS and CONTINUATION with HPACK, anything
//! else): fed in captures of any size, in and out of TCP order; the decoder must reset, never
//! panic or grow without bound. The first byte sets the capture size, the second whether the
//! writes come as TCP segments (with sequence numbers) or TLS writes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| monitor_fuzz::http2_frames::run(data));
