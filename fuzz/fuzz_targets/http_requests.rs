//! The start of an HTTP/1.x request as a process sends it (TLS plaintext or a TCP segment):
//! method, target, headers, credentials in Authorization, API-key headers, the query string and
//! cookies.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| monitor_fuzz::http_requests::run(data));
