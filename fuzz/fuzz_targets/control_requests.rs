//! Requests on the control socket (a line of JSON from any local client allowed to connect).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| monitor_fuzz::control_requests::run(data));
