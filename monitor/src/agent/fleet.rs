//! The agent's part in the fleet watchlist (`--fleet`, see `crate::fleet`): it publishes this
//! host's sessions as they change, and applies the other hosts' to what the probes look for
//! and to the engine.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use tokio::sync::mpsc;

use super::control::ControlPlane;
use crate::{
    engine::{Adoptable, WATCHLIST_CAPACITY},
    event::{Event, Nanos},
    fleet::{FleetSettings, Incoming, Publisher, Reader},
    host::now_ns,
    sessions::remote::{RemoteSession, RemoteToken, REMOTE_SESSION_VERSION, SEED_CHECK_INPUT},
};

/// How often this host's sessions are compared with what was published when no session
/// changed (a rotated token file changes a record too; so may the brokers' coming back).
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// After a session change, how long more changes are gathered into one round (a burst of
/// starts is one look at the sessions, not one each).
const GATHER: Duration = Duration::from_millis(20);
/// Other hosts' records applied in one go at most (one kernel map sync for all).
const APPLY_BATCH: usize = 1024;

/// Starts publishing this host's sessions and reading the fleet's.
pub fn start(settings: FleetSettings, plane: Arc<ControlPlane>) -> anyhow::Result<()> {
    let publisher = Publisher::connect(&settings.target)?;
    let (tx, rx) = mpsc::channel(4096);
    let (contact_tx, contact_rx) = tokio::sync::watch::channel(0u64);
    Reader::start(&settings.target, &settings.host, tx)?;
    let settings = Arc::new(settings);
    tokio::spawn(publish(settings.clone(), plane.clone(), publisher, contact_rx));
    tokio::spawn(apply(settings, plane, rx, contact_tx));
    Ok(())
}

/// Publishes each of this host's sessions whenever its record changes (started, ended, a token
/// learnt or rotated), and all of them again when the brokers come back (they may have lost
/// the topic) or refused some.
async fn publish(
    settings: Arc<FleetSettings>,
    plane: Arc<ControlPlane>,
    publisher: Publisher,
    mut reconnects: tokio::sync::watch::Receiver<u64>,
) {
    let seed_check = plane.credentials.token_hash(SEED_CHECK_INPUT);
    let mut published: HashMap<String, RemoteSession> = HashMap::new();
    let mut unsent: HashMap<String, RemoteSession> = HashMap::new();
    let mut seen = None;
    let mut interval = tokio::time::interval(PUBLISH_EVERY);
    let mut session_changes = plane.core.session_changes();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            changed = session_changes.changed() => {
                if changed.is_err() {
                    return;
                }
                tokio::time::sleep(GATHER).await;
                session_changes.borrow_and_update();
            }
        }
        let credentials = plane.credentials.generation();
        let Ok(answer) = plane.core.adoptable(seen.filter(|(_, c)| *c == credentials).map(|(e, _)| e)).await else {
            return;
        };
        if let Some((engine, sessions)) = answer {
            seen = Some((engine, credentials));
            for session in sessions {
                let record = record(&settings.host, &plane, &session, seed_check);
                if published.get(&record.key()) != Some(&record) {
                    unsent.insert(record.key(), record);
                }
            }
        }
        if reconnects.has_changed().unwrap_or(false) {
            reconnects.borrow_and_update();
            unsent.extend(published.drain());
        }
        for key in publisher.refused() {
            if let Some(record) = published.remove(&key) {
                unsent.entry(key).or_insert(record);
            }
        }
        let mut queue_full = false;
        unsent.retain(|key, record| {
            if queue_full || !publisher.publish(record) {
                queue_full = true;
                return true;
            }
            published.insert(key.clone(), record.clone());
            false
        });
    }
}

/// This host's session as the fleet reads it.
fn record(host: &str, plane: &ControlPlane, a: &Adoptable, seed_check: u64) -> RemoteSession {
    let s = &a.session;
    let (tokens, _) = plane.credentials.session_tokens(a.key);
    let declared = |fingerprint: &str| s.tokens.iter().any(|t| t.fingerprint.as_deref() == Some(fingerprint));
    RemoteSession {
        version: REMOTE_SESSION_VERSION,
        host: host.to_string(),
        id: s.id.to_string(),
        principal: s.principal.clone(),
        actor: s.actor.clone(),
        task: s.task.clone(),
        sponsor: s.sponsor.clone(),
        started_ns: a.started,
        expires_ns: a.started.saturating_add(s.ttl_ns),
        ended_ns: a.ended.map(|(at, _)| at),
        grace_ns: s.grace_ns,
        scope: s.scope.summary(),
        tokens: tokens
            .into_iter()
            .map(|(kernel_hash, fingerprint)| RemoteToken {
                learned: !declared(&fingerprint),
                fingerprint,
                kernel_hash,
            })
            .collect(),
        seed_check,
    }
}

/// Applies other hosts' records: their tokens are looked for (on the wire, in command lines,
/// in exec environments where the hash is usable here) and the engine knows their sessions.
/// Says when the fleet view goes stale, and bumps `reconnects` when the brokers are back.
async fn apply(
    settings: Arc<FleetSettings>,
    plane: Arc<ControlPlane>,
    mut rx: mpsc::Receiver<Incoming>,
    reconnects: tokio::sync::watch::Sender<u64>,
) {
    let seed_check = plane.credentials.token_hash(SEED_CHECK_INPUT);
    let mut forget_at: BTreeMap<String, Nanos> = BTreeMap::new();
    let mut last_contact = now_ns();
    let mut in_contact = true;
    let mut said_stale = false;
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, APPLY_BATCH).await > 0 {
        let retention = plane
            .policy
            .get()
            .fleet
            .retention
            .map_or(crate::engine::DEFAULT_RETENTION_NS, |r| r.as_nanos().min(u64::MAX as u128) as u64);
        let now = now_ns();
        let tokens_before = plane.credentials.generation();
        let mut events = Vec::new();
        for incoming in batch.drain(..) {
            match incoming {
                Incoming::Session(session) if session.host == settings.host => {}
                Incoming::Session(session) => {
                    let usable = session.seed_check == seed_check;
                    let tokens = session
                        .tokens
                        .iter()
                        .map(|t| (usable.then_some(t.kernel_hash), t.fingerprint.clone()))
                        .collect();
                    plane.credentials.set_remote(session.key(), tokens);
                    forget_at.insert(session.key(), session.forget_at(retention));
                    crate::metrics::get().fleet_records.inc();
                    events.push(Event::FleetSession { ts: now, session });
                }
                Incoming::Unreadable { key, why } => {
                    crate::metrics::get().fleet_unreadable.inc();
                    tracing::warn!(key, "fleet record skipped: {why}");
                }
                Incoming::Contact(true) => {
                    if !in_contact {
                        tracing::info!("fleet brokers {} answer again", settings.target.brokers);
                        reconnects.send_modify(|n| *n += 1);
                    }
                    (in_contact, said_stale, last_contact) = (true, false, now);
                }
                Incoming::Contact(false) => in_contact = false,
            }
        }
        let stale_for = now.saturating_sub(last_contact);
        crate::metrics::get().fleet_staleness.set((stale_for / 1_000_000_000) as i64);
        if !in_contact && !said_stale && stale_for >= settings.stale_after.as_nanos() as u64 {
            said_stale = true;
            tracing::warn!(
                "fleet view stale: no contact with {} for {} s",
                settings.target.brokers,
                stale_for / 1_000_000_000
            );
            events.push(Event::FleetStale { ts: now, since: last_contact, brokers: settings.target.brokers.clone() });
        }
        forget_at.retain(|key, at| {
            let keep = *at > now;
            if !keep {
                plane.credentials.forget_remote(key);
            }
            keep
        });
        // As many as the engine's watchlist keeps: the ones due to be forgotten first make room.
        if forget_at.len() > WATCHLIST_CAPACITY {
            let mut by_due: Vec<(Nanos, String)> = forget_at.iter().map(|(k, at)| (*at, k.clone())).collect();
            by_due.sort_unstable();
            for (_, key) in by_due.into_iter().take(forget_at.len() - WATCHLIST_CAPACITY) {
                forget_at.remove(&key);
                plane.credentials.forget_remote(&key);
                crate::metrics::get().fleet_evicted.inc();
            }
        }
        crate::metrics::get().fleet_sessions.set(plane.credentials.remote_sessions() as i64);
        if events.is_empty() {
            continue;
        }
        plane.core.apply(events).await;
        // The kernel's token list and the TLS probes change only with what the sessions hold.
        if plane.credentials.generation() != tokens_before {
            plane.look_for_tokens().await;
        }
    }
}
