//! The fleet watchlist's transport (`--fleet kafka://BROKERS/TOPIC`): every agent publishes its
//! sessions (start, end, tokens learnt or rotated: fingerprints only, never a token) to a
//! compacted topic keyed by `HOST/SESSION-ID`, and reads everyone's. What the agent does with
//! them is agent/fleet.rs; the rules are engine/fleet.rs.
//!
//! The agents of a fleet share the fingerprint key (`--key-file`, e.g. a Kubernetes Secret
//! mounted into the DaemonSet), so the same token has the same fingerprint everywhere; in fleet
//! mode the kernel's token hash seed is derived from that key too ([`kernel_seed`]), so a token
//! declared on host A is also found in an exec environment on host B.
//!
//! The topic is the operator's, as the collector's Kafka topics are: created with
//! `cleanup.policy=compact`, so it holds the latest record of each session.

mod kafka;

use std::{str::FromStr, time::Duration};

pub use kafka::{Incoming, Publisher, Reader};

use crate::sessions::fingerprint::FingerprintKey;

/// Where the fleet's records are: `kafka://BROKER[,BROKER]/TOPIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetTarget {
    pub brokers: String,
    pub topic: String,
}

impl FromStr for FleetTarget {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let usage = || format!("`{spec}`: expected kafka://BROKER[,BROKER]/TOPIC");
        let rest = spec.strip_prefix("kafka://").ok_or_else(usage)?;
        let (brokers, topic) = rest.split_once('/').ok_or_else(usage)?;
        if brokers.is_empty() || topic.is_empty() || topic.contains('/') {
            return Err(usage());
        }
        Ok(Self { brokers: brokers.to_string(), topic: topic.to_string() })
    }
}

impl std::fmt::Display for FleetTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kafka://{}/{}", self.brokers, self.topic)
    }
}

/// The fleet settings of an agent.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    pub target: FleetTarget,
    /// This agent's host as the fleet knows it (`--host-name`).
    pub host: String,
    /// No contact with the brokers for this long raises `monitor_blind`.
    pub stale_after: Duration,
}

/// The kernel token hash seed of a fleet's agents: derived from the shared fingerprint key, so
/// every agent hashes a token alike (and nobody without the key can).
pub fn kernel_seed(key: &FingerprintKey) -> u64 {
    let fingerprint = key.fingerprint(b"monitor fleet kernel token hash seed");
    let hex = fingerprint.rsplit(':').next().unwrap_or_default();
    u64::from_str_radix(&hex[..16.min(hex.len())], 16).unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_names_brokers_and_one_topic() {
        let t: FleetTarget = "kafka://127.0.0.1:9092,127.0.0.2:9092/monitor-fleet".parse().unwrap();
        assert_eq!((t.brokers.as_str(), t.topic.as_str()), ("127.0.0.1:9092,127.0.0.2:9092", "monitor-fleet"));
        assert_eq!(t.to_string(), "kafka://127.0.0.1:9092,127.0.0.2:9092/monitor-fleet");
        for bad in ["127.0.0.1:9092/t", "kafka://127.0.0.1:9092", "kafka:///t", "kafka://b/", "kafka://b/t/u"] {
            assert!(bad.parse::<FleetTarget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_kernel_seed_is_the_key_s() {
        let a = FingerprintKey::from_bytes([1; 32]);
        assert_eq!(kernel_seed(&a), kernel_seed(&FingerprintKey::from_bytes([1; 32])));
        assert_ne!(kernel_seed(&a), kernel_seed(&FingerprintKey::from_bytes([2; 32])));
    }
}
