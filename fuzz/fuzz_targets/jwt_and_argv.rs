//! Command lines of session processes (argv redaction: flags, URLs, user:password, query
//! parameters, any word that may be a token) and JWTs found in them or on the wire.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| monitor_fuzz::jwt_and_argv::run(data));
