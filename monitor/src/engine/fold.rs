//! One alert per finding. Repeats of a finding — the same rule, for the same session, about the
//! same credential or destination, from the same process lineage — within a window are folded
//! into the first alert: it is sent at once, the later occurrences add to its `count`,
//! `last_seen` and `pids`, and the total so far is sent again as an update of the same alert
//! (same `id`; see README "Alerts and their updates") a few seconds after the first occurrence
//! not yet sent, and when the window closes. Nothing is dropped: every occurrence is counted,
//! and the trace still holds every event.
//!
//! Time comes from the events (a Tick is an event too), so live and replay fold alike.

use std::collections::BTreeSet;

use crate::{
    alert::{rfc3339, Alert, ProcessRef, MAX_FOLDED_PIDS},
    event::Nanos,
    rules::Rule,
};

/// How long after an occurrence that was not sent yet its fold's update goes out (at most
/// one update per fold per this much time, however fast the occurrences come).
pub const UPDATE_DELAY_NS: Nanos = 5_000_000_000;
/// Findings folded at once; past this the oldest closes early (its update is sent) so that a
/// flood of distinct findings cannot grow the engine without bound.
const MAX_OPEN: usize = 4096;
/// Pids of a lineage remembered to match later occurrences (descendants of one that raised it).
const MAX_LINEAGE: usize = 1024;

/// What makes two alerts the same finding, besides their lineage.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FindingKey {
    rule: Rule,
    session: String,
    /// The acting process's other session, for a cross-session use.
    other_session: String,
    /// The credential (fingerprint or file, and where it was seen: an exec's environment
    /// holds a token, a request uses it), else the destination, else what the summary says
    /// without its numbers (pids, uids): the executable run, the privilege gained.
    subject: String,
}

impl FindingKey {
    fn of(alert: &Alert) -> Self {
        let subject = if let Some(c) = &alert.credential {
            let which = c.fingerprint.as_deref().or(c.path.as_deref()).unwrap_or_default();
            format!("{} {which}", c.seen_in)
        } else if let Some(n) = &alert.network {
            format!("{} {}:{}", n.protocol, n.dst_name.as_deref().unwrap_or(&n.dst_ip), n.dst_port)
        } else {
            alert.summary.chars().filter(|c| !c.is_ascii_digit()).collect()
        };
        let other_session =
            alert.process.as_ref().and_then(|p| p.session.as_ref()).map(|s| s.id.clone()).unwrap_or_default();
        Self { rule: alert.rule, session: alert.session.id.clone(), other_session, subject }
    }
}

#[derive(Debug)]
struct Fold {
    key: FindingKey,
    /// The first alert, with the count, last_seen and pids so far.
    alert: Alert,
    first_ts: Nanos,
    /// The pids that raised it: an occurrence from one of them, a child of one of them, or a
    /// process with one of them among its ancestors belongs to the lineage.
    lineage: BTreeSet<u32>,
    /// The first raiser's parent: its later children (a loop in one shell) are the lineage too.
    parent: u32,
    /// The first raiser's Unix session, when it is a session of its own (a terminal, a job
    /// started with setsid), not init's: everything run from that terminal is the lineage too,
    /// down any depth of subshells, which the parent alone misses for processes outside
    /// sessions (the engine knows no ancestors for them).
    sid: Option<u32>,
    /// The occurrence not yet sent that came first, if any.
    unsent_since: Option<Nanos>,
}

impl Fold {
    fn matches(&self, key: &FindingKey, alert: &Alert) -> bool {
        if self.key != *key {
            return false;
        }
        let Some(p) = &alert.process else { return true };
        self.lineage.contains(&p.pid)
            || self.lineage.contains(&p.ppid)
            || (p.ppid > 1 && p.ppid == self.parent)
            || (self.sid.is_some() && own_unix_session(p) == self.sid)
            || p.chain.iter().any(|a| self.lineage.contains(&a.pid))
    }

    fn add(&mut self, alert: &Alert) {
        self.alert.count += 1;
        self.alert.last_seen = rfc3339(alert.ts);
        if let Some(p) = &alert.process {
            if self.lineage.len() < MAX_LINEAGE {
                self.lineage.insert(p.pid);
            }
            if !self.alert.pids.contains(&p.pid) && self.alert.pids.len() < MAX_FOLDED_PIDS {
                self.alert.pids.push(p.pid);
            }
        }
        self.unsent_since.get_or_insert(alert.ts);
    }

    /// The update to send, when occurrences came since the last one sent.
    fn take_update(&mut self) -> Option<Alert> {
        self.unsent_since.take().map(|_| self.alert.clone())
    }
}

/// A process's Unix session when it is a lineage: not init's (0, 1), where every process of a
/// CI runner or container that never called setsid shares one.
fn own_unix_session(p: &ProcessRef) -> Option<u32> {
    p.sid.filter(|&sid| sid > 1)
}

/// The findings folded so far.
#[derive(Debug, Default)]
pub(super) struct Folds {
    /// 0: folding is off, every occurrence is an alert.
    window_ns: Nanos,
    open: Vec<Fold>,
    next_serial: u64,
    /// The earliest time something is due (an update, or a window's end): until then `settle`
    /// costs one comparison, since it runs before every event.
    wake: Option<Nanos>,
}

impl Folds {
    pub fn new(window_ns: Nanos) -> Self {
        Self { window_ns, ..Default::default() }
    }

    /// A reloaded policy's window: findings open now keep folding until it closes.
    pub fn set_window(&mut self, window_ns: Nanos) {
        self.window_ns = window_ns;
    }

    /// Takes one raised alert: returns what to send now (the alert itself when it is a new
    /// finding, nothing when it was folded into an open one; an early-closed fold's update).
    pub fn offer(&mut self, mut alert: Alert, out: &mut Vec<Alert>) {
        self.next_serial += 1;
        alert.fold = self.next_serial;
        alert.count = 1;
        alert.first_seen = alert.time.clone();
        alert.last_seen = alert.time.clone();
        alert.pids = alert.process.as_ref().map(|p| vec![p.pid]).unwrap_or_default();
        // Blindness is reported as it happens, with its own count of lost events.
        if self.window_ns == 0 || alert.rule == Rule::MonitorBlind {
            out.push(alert);
            return;
        }
        let key = FindingKey::of(&alert);
        let window = self.window_ns;
        if let Some(fold) =
            self.open.iter_mut().find(|f| alert.ts < f.first_ts.saturating_add(window) && f.matches(&key, &alert))
        {
            let first_unsent = fold.unsent_since.is_none();
            fold.add(&alert);
            if first_unsent {
                self.wake_by(alert.ts.saturating_add(UPDATE_DELAY_NS.min(window)));
            }
            return;
        }
        if self.open.len() >= MAX_OPEN {
            let mut oldest = self.open.remove(0);
            out.extend(oldest.take_update());
        }
        let (lineage, parent, sid) = match &alert.process {
            Some(p) => (BTreeSet::from([p.pid]), p.ppid, own_unix_session(p)),
            None => (BTreeSet::new(), 0, None),
        };
        self.wake_by(alert.ts.saturating_add(window));
        self.open.push(Fold {
            key,
            first_ts: alert.ts,
            lineage,
            parent,
            sid,
            unsent_since: None,
            alert: alert.clone(),
        });
        out.push(alert);
    }

    /// Sends the updates due at `now` and closes the findings whose window is over.
    pub fn settle(&mut self, now: Nanos, out: &mut Vec<Alert>) {
        if self.wake.is_none_or(|wake| now < wake) {
            return;
        }
        let window = self.window_ns;
        let delay = UPDATE_DELAY_NS.min(window);
        for fold in &mut self.open {
            let closes = now >= fold.first_ts.saturating_add(window);
            if fold.unsent_since.is_some_and(|since| closes || now >= since.saturating_add(delay)) {
                out.extend(fold.take_update());
            }
        }
        self.open.retain(|f| now < f.first_ts.saturating_add(window));
        let window_ends = self.open.iter().map(|f| f.first_ts.saturating_add(window)).min();
        self.wake = window_ends.into_iter().chain(self.next_due()).min();
    }

    fn wake_by(&mut self, at: Nanos) {
        self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
    }

    /// The earliest time an update is due, for the agent's timer.
    pub fn next_due(&self) -> Option<Nanos> {
        let delay = UPDATE_DELAY_NS.min(self.window_ns);
        self.open
            .iter()
            .filter_map(|f| {
                f.unsent_since.map(|since| since.saturating_add(delay).min(f.first_ts.saturating_add(self.window_ns)))
            })
            .min()
    }

    /// Sends every pending update (the agent is stopping).
    pub fn flush(&mut self, out: &mut Vec<Alert>) {
        for fold in &mut self.open {
            out.extend(fold.take_update());
        }
    }
}
