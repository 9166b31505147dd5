//! Encodings of the one alert type for SIEMs: OCSF Detection Finding.

pub mod ocsf;
