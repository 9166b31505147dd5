//! Session files (given to `monitor run` and `session start`, sent over the control socket) and
//! policy files: parsed and validated, or refused with the file, line and field.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| monitor_fuzz::yaml_files::run(data));
