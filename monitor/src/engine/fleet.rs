//! The fleet watchlist: sessions of other hosts (read from the fleet topic, see `crate::fleet`),
//! so a token whose task ended on host A is caught when it is used on this host, and a token of a
//! task running on A is caught when a process here that is not that task uses it.
//!
//! Bounded: an ended session is kept for the retention (the policy's `fleet.retention`, 24 h by
//! default) after its end or expiry, and at most [`WATCHLIST_CAPACITY`] sessions are kept, the
//! ones due to be forgotten first making room.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::Engine;
use crate::{
    alert::{rfc3339, SessionRef},
    event::{Nanos, TokenUse},
    rules::Rule,
    sessions::remote::RemoteSession,
};

/// Sessions of other hosts kept at most.
pub const WATCHLIST_CAPACITY: usize = 100_000;

/// How long another host's ended session stays on the watchlist unless the policy says.
pub const DEFAULT_RETENTION_NS: Nanos = 24 * 3600 * 1_000_000_000;

#[derive(Debug, Default)]
pub(super) struct Watchlist {
    /// By `HOST/ID`.
    sessions: BTreeMap<String, RemoteSession>,
    /// Which sessions hold each token fingerprint.
    holders: HashMap<String, BTreeSet<String>>,
    /// (when it is forgotten, key): the next to go first.
    due: BTreeSet<(Nanos, String)>,
    /// Sessions dropped for the bound before their retention ran out.
    evicted: u64,
}

impl Watchlist {
    /// Adds or replaces a session (a later record of it: ended, a token learnt).
    fn upsert(&mut self, session: RemoteSession, retention: Nanos) {
        let key = session.key();
        self.remove(&key, retention);
        for token in &session.tokens {
            self.holders.entry(token.fingerprint.clone()).or_default().insert(key.clone());
        }
        self.due.insert((session.forget_at(retention), key.clone()));
        self.sessions.insert(key, session);
        while self.sessions.len() > WATCHLIST_CAPACITY {
            let Some((_, first)) = self.due.first().cloned() else { break };
            self.remove(&first, retention);
            self.evicted += 1;
        }
    }

    fn remove(&mut self, key: &str, retention: Nanos) {
        let Some(old) = self.sessions.remove(key) else { return };
        self.due.remove(&(old.forget_at(retention), key.to_string()));
        for token in &old.tokens {
            if let Some(keys) = self.holders.get_mut(&token.fingerprint) {
                keys.remove(key);
                if keys.is_empty() {
                    self.holders.remove(&token.fingerprint);
                }
            }
        }
    }

    /// Forgets the sessions whose retention ran out by `ts`.
    fn prune(&mut self, ts: Nanos, retention: Nanos) {
        while let Some((at, key)) = self.due.first().cloned() {
            if at > ts {
                break;
            }
            self.remove(&key, retention);
        }
    }

    fn holding(&self, fingerprint: &str) -> impl Iterator<Item = &RemoteSession> {
        self.holders.get(fingerprint).into_iter().flatten().filter_map(|key| self.sessions.get(key))
    }

    pub(super) fn holds(&self, fingerprint: &str) -> bool {
        self.holders.contains_key(fingerprint)
    }
}

/// What the watchlist holds, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchlistSize {
    pub sessions: usize,
    pub tokens: usize,
    pub evicted: u64,
}

impl Engine {
    fn retention(&self) -> Nanos {
        self.config.fleet_retention_ns.unwrap_or(DEFAULT_RETENTION_NS)
    }

    pub(super) fn fleet_session(&mut self, session: &RemoteSession) {
        let retention = self.retention();
        self.fleet.upsert(session.clone(), retention);
    }

    /// Forgets other hosts' sessions whose retention ran out (cheap when none did).
    pub(super) fn prune_fleet(&mut self, ts: Nanos) {
        let retention = self.retention();
        self.fleet.prune(ts, retention);
    }

    pub fn watchlist_size(&self) -> WatchlistSize {
        WatchlistSize {
            sessions: self.fleet.sessions.len(),
            tokens: self.fleet.holders.len(),
            evicted: self.fleet.evicted,
        }
    }

    /// The misuse of another host's session token that `t` is, when no session of this host
    /// holds it: a use while that task runs (by a process here, which is not that task's), or
    /// after it ended. Names the session still running, else the latest one.
    pub(super) fn remote_misuse(&self, t: &TokenUse) -> Option<(Rule, RemoteSession)> {
        let holding = || self.fleet.holding(&t.credential.fingerprint);
        if let Some(active) = holding().find(|s| !s.authority_over(t.ts)) {
            return Some((Rule::TokenOutsideSession, active.clone()));
        }
        holding().max_by_key(|s| s.started_ns).map(|s| (Rule::TokenAfterTaskEnd, s.clone()))
    }
}

/// How an alert names another host's session.
pub(super) fn session_ref(s: &RemoteSession, ts: Nanos) -> SessionRef {
    SessionRef {
        id: s.id.clone(),
        principal: s.principal.clone(),
        actor: s.actor.clone(),
        task: s.task.clone(),
        sponsor: s.sponsor.clone(),
        state: s.state_at(ts).to_string(),
        started: rfc3339(s.started_ns),
        ended: s.ended_ns.map(rfc3339),
        host: Some(s.host.clone()),
    }
}
