//! Responses a session process reads from a token endpoint (JSON bodies, HTTP/1.x or HTTP/2
//! DATA frames), in reads of any size: tokens found or not, the held parts bounded.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| monitor_fuzz::token_responses::run(data));
