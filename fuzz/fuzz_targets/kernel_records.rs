//! Ring-buffer records as the kernel side writes them (a record of a newer layout, a short
//! one, garbage): decoded into events, or refused.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| monitor_fuzz::kernel_records::run(data));
