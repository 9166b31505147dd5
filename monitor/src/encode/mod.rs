//! Encodings of the one alert type for SIEMs: OCSF Detection Finding, RFC 5424 syslog, CEF.
//! (JSON lines and MessagePack are the alert's own serde forms.)

pub mod cef;
pub mod ocsf;
pub mod syslog;
