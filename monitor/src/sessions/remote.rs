//! A session of another host, as the fleet watchlist carries it (see `crate::fleet`): who acted
//! for whom, on which host, from when to when, and the fingerprints of its tokens. Never a raw
//! token: fingerprints are keyed by the fleet's shared key, and the kernel prefilter hashes by a
//! seed derived from it.

use serde::{Deserialize, Serialize};

use crate::event::Nanos;

/// The record format; a record of another version is skipped (and counted) by its readers.
pub const REMOTE_SESSION_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteSession {
    pub version: u32,
    /// The host whose agent runs the session (its `--host-name`).
    pub host: String,
    pub id: String,
    pub principal: String,
    pub actor: String,
    pub task: String,
    pub sponsor: String,
    pub started_ns: Nanos,
    /// When its ttl runs out.
    pub expires_ns: Nanos,
    /// When its task ended, if it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ns: Option<Nanos>,
    pub grace_ns: Nanos,
    /// What it was allowed (connect destinations, credential files, executables), for the
    /// responder reading an alert on another host.
    pub scope: String,
    pub tokens: Vec<RemoteToken>,
    /// `token_hash(seed, "monitor fleet seed check")` of the publisher's kernel seed: the
    /// tokens' `kernel_hash` is usable by an agent whose own check is the same.
    pub seed_check: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteToken {
    pub fingerprint: String,
    /// The kernel prefilter hash (exec environments), under the publisher's seed.
    pub kernel_hash: u64,
    /// Learnt during the task (see `credential.learned`) rather than declared.
    #[serde(default)]
    pub learned: bool,
}

impl RemoteSession {
    /// The record's key on the topic: a session id is unique only on its host.
    pub fn key(&self) -> String {
        watch_key(&self.host, &self.id)
    }

    /// Whether the session's authority is over at `ts`: its task ended and the grace ran out, or
    /// its ttl passed.
    pub fn authority_over(&self, ts: Nanos) -> bool {
        ts >= self.expires_ns || self.ended_ns.is_some_and(|end| ts >= end.saturating_add(self.grace_ns))
    }

    /// When it stops being of interest to others: `retention` after its end (or its expiry).
    pub fn forget_at(&self, retention: Nanos) -> Nanos {
        self.ended_ns.unwrap_or(self.expires_ns).min(self.expires_ns).saturating_add(retention)
    }

    /// `active`, `ended` or `expired` at `ts`, as a local session's state reads.
    pub fn state_at(&self, ts: Nanos) -> &'static str {
        if self.ended_ns.is_some() {
            "ended"
        } else if ts >= self.expires_ns {
            "expired"
        } else {
            "active"
        }
    }
}

/// `HOST/ID`: how the watchlist and the topic key a session.
pub fn watch_key(host: &str, id: &str) -> String {
    format!("{host}/{id}")
}

/// The value every agent of a fleet hashes with its kernel seed to tell whether its seed is
/// the publisher's.
pub const SEED_CHECK_INPUT: &[u8] = b"monitor fleet seed check";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_ends_with_the_grace_or_the_ttl() {
        let mut s = RemoteSession {
            version: REMOTE_SESSION_VERSION,
            host: "node-a".into(),
            id: "ci-1".into(),
            principal: "alice".into(),
            actor: "svc:ci".into(),
            task: "build".into(),
            sponsor: String::new(),
            started_ns: 100,
            expires_ns: 1_000,
            ended_ns: None,
            grace_ns: 10,
            scope: String::new(),
            tokens: vec![],
            seed_check: 0,
        };
        assert_eq!(s.key(), "node-a/ci-1");
        assert!(!s.authority_over(999));
        assert!(s.authority_over(1_000));
        assert_eq!(s.state_at(1_000), "expired");
        s.ended_ns = Some(500);
        assert!(!s.authority_over(509));
        assert!(s.authority_over(510));
        assert_eq!(s.state_at(600), "ended");
        assert_eq!(s.forget_at(5_000), 5_500);
    }
}
