//! The detection engine: a pure, deterministic function of the event stream. It never reads the
//! host or the clock; time comes from the events. Live and replay run this same code, so a
//! recorded trace replays to the same alerts.

mod credentials;
mod fleet;
mod fold;
mod interned;
mod names;

pub use credentials::LEARNED_PER_SESSION;
pub use fleet::{WatchlistSize, DEFAULT_RETENTION_NS, WATCHLIST_CAPACITY};
mod procs;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    alert::{rfc3339, Action, Alert, NetworkRef, SessionRef},
    event::{Connect, EndReason, Event, Exec, Exit, Fork, Nanos, Process, SessionKey, Verdict},
    rules::{Rule, Severity},
    sessions::Session,
};
use procs::{Proc, ProcTable, Serial};

/// How long an ended session with nothing left alive stays listed.
const FORGET_AFTER_NS: Nanos = 3600 * 1_000_000_000;

/// Per-rule settings that come from the agent's policy (recorded in traces, so a replay
/// evaluates with what the live agent used).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    pub severity: BTreeMap<Rule, Severity>,
    /// Destinations that never raise out_of_scope_connect (the policy's `never_alert`).
    pub never_alert: Vec<crate::sessions::Destination>,
    /// Credentials session processes send or receive that no session declared become theirs
    /// (the policy's `credentials.learn_tokens`). Off in traces recorded before it existed.
    #[serde(default)]
    pub learn_tokens: bool,
    /// Repeats of a finding within this window are folded into its first alert (the policy's
    /// `alerts.fold_window`; 0: every occurrence is an alert, as in traces recorded before).
    #[serde(default)]
    pub fold_window_ns: Nanos,
    /// How long other hosts' ended sessions stay on the fleet watchlist (the policy's
    /// `fleet.retention`; None: [`DEFAULT_RETENTION_NS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_retention_ns: Option<Nanos>,
}

impl EngineConfig {
    pub fn from_policy(policy: &crate::policy::Policy) -> Self {
        Self {
            severity: policy.severity.clone(),
            never_alert: policy.never_alert.connect.clone(),
            learn_tokens: policy.credentials.learn_tokens,
            fold_window_ns: policy.alerts.fold_window_ns(),
            fleet_retention_ns: policy.fleet.retention.map(|r| r.as_nanos().min(u64::MAX as u128) as u64),
        }
    }
}

/// A session as a restarted agent takes it over: persisted in the state directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Adoptable {
    pub key: SessionKey,
    pub session: Session,
    pub started: Nanos,
    pub ended: Option<(Nanos, EndReason)>,
    pub outlived_checked: bool,
    /// Its processes alive when saved.
    pub pids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Active,
    Ended,
    Expired,
}

impl SessionState {
    pub const NAMES: [&'static str; 3] = ["active", "ended", "expired"];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Active => "active",
            SessionState::Ended => "ended",
            SessionState::Expired => "expired",
        }
    }
}

#[derive(Debug)]
struct Tracked {
    session: Session,
    started: Nanos,
    ended: Option<(Nanos, EndReason)>,
    /// Set once process_outlived_task has been evaluated after end + grace.
    outlived_checked: bool,
    /// The names each address was learnt under by the session (resolved, or in its hosts file).
    names: names::Names,
    /// Fingerprints of the credentials the session learnt during its task (see
    /// credentials.rs), bounded by [`credentials::LEARNED_PER_SESSION`].
    learned: std::collections::BTreeSet<String>,
}

impl Tracked {
    fn expires_at(&self) -> Nanos {
        self.started.saturating_add(self.session.ttl_ns)
    }

    fn grace_deadline(&self) -> Option<Nanos> {
        self.ended.map(|(at, _)| at.saturating_add(self.session.grace_ns))
    }

    fn as_process_session(&self) -> crate::alert::ProcessSession {
        crate::alert::ProcessSession {
            id: self.session.id.to_string(),
            actor: self.session.actor.clone(),
            principal: self.session.principal.clone(),
            task: self.session.task.clone(),
        }
    }

    fn state_at(&self, ts: Nanos) -> SessionState {
        if self.ended.is_some() {
            SessionState::Ended
        } else if ts >= self.expires_at() {
            SessionState::Expired
        } else {
            SessionState::Active
        }
    }
}

/// A session as `monitor session list/show` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionSummary {
    pub key: SessionKey,
    pub session: Session,
    pub state: SessionState,
    pub started: String,
    pub ended: Option<String>,
    pub end_reason: Option<EndReason>,
    pub live_processes: Vec<LiveProcess>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveProcess {
    pub pid: u32,
    pub ppid: u32,
    pub exe: String,
}

/// What the agent must do in the kernel or to processes because of what the engine decided.
/// Replay ignores them; the engine itself never acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The session's task ended: an enforcing session's connect hooks must refuse everything.
    SessionEnded(SessionKey),
    /// An enforcing session's process outlived the task: kill it.
    Kill { session: SessionKey, pid: u32 },
    /// The session is forgotten: drop its kernel state.
    Forget(SessionKey),
}

#[derive(Debug, Default)]
pub struct Engine {
    config: EngineConfig,
    /// Boxed: a node of the map then holds keys and pointers, and its free slots (about half
    /// of them, as sessions come in key order) cost a pointer each, not a session (thousands
    /// of sessions on a node).
    sessions: BTreeMap<SessionKey, Box<Tracked>>,
    procs: ProcTable,
    /// The hosts-file names the sessions share.
    hosts_book: names::HostsBook,
    /// The earliest unsettled grace deadline: lets every event skip the scan of all sessions.
    next_due: Option<Nanos>,
    effects: Vec<Effect>,
    folds: fold::Folds,
    /// Bumped whenever a session starts, ends, is checked for outliving processes or is
    /// forgotten (see `generation`).
    session_changes: u64,
    /// Other hosts' sessions (fleet.rs).
    fleet: fleet::Watchlist,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        Self { folds: fold::Folds::new(config.fold_window_ns), config, ..Default::default() }
    }

    /// Fills in the session of an observation made where the kernel's session tracking is not:
    /// a credential file read seen through fanotify, a uid change from the process events
    /// connector, both of which carry only a pid. The session is the live session process's
    /// with that pid, else (for a file read) the latest session bound to the reader's cgroup.
    /// Called before the event is recorded, so traces and replays carry the session. Returns
    /// false for an event that concerns nothing the engine follows (a uid change outside
    /// sessions), which is then dropped.
    pub fn attribute(&self, event: &mut Event) -> bool {
        let by_pid = |pid: u32| self.procs.live(pid).and_then(|s| self.procs.get(s)).map(|p| p.session);
        match event {
            Event::CredentialOpen(open) if open.session == 0 => {
                let by_cgroup = || {
                    (open.actor.cgroup != 0)
                        .then(|| {
                            self.sessions
                                .iter()
                                .filter(|(_, t)| {
                                    t.session.binding.cgroup.as_ref().is_some_and(|c| c.id == open.actor.cgroup)
                                })
                                .max_by_key(|(_, t)| t.started)
                                .map(|(k, _)| *k)
                        })
                        .flatten()
                };
                open.session = by_pid(open.actor.pid).or_else(by_cgroup).unwrap_or(0);
                true
            }
            Event::CredChange(change) if change.session == 0 => {
                let at = self.procs.at(change.pid, change.ts).and_then(|s| self.procs.get(s));
                change.session = at.map_or(0, |p| p.session);
                change.session != 0
            }
            _ => true,
        }
    }

    /// Feeds one event; returns the alerts to send because of it, in a deterministic order:
    /// updates of folded findings that came due, then what the event raised (new findings;
    /// repeats are folded, see fold.rs).
    pub fn handle(&mut self, event: &Event) -> Vec<Alert> {
        let mut out = Vec::new();
        self.folds.settle(event.ts(), &mut out);
        let raised = self.raise(event);
        for alert in raised {
            self.folds.offer(alert, &mut out);
        }
        if let Event::AgentStopping { .. } = event {
            self.folds.flush(&mut out);
        }
        out
    }

    /// The alerts the rules raise on one event, each occurrence on its own.
    fn raise(&mut self, event: &Event) -> Vec<Alert> {
        let mut alerts = Vec::new();
        // Deadlines that passed before this event are settled first, so the outcome does not
        // depend on whether a tick happened to arrive in between.
        self.settle_deadlines(event.ts(), &mut alerts);
        self.prune_fleet(event.ts());
        match event {
            Event::SessionStarted { ts, key, session } => {
                self.session_changes += 1;
                self.sessions.insert(
                    *key,
                    Box::new(Tracked {
                        session: (**session).clone(),
                        started: *ts,
                        ended: None,
                        outlived_checked: false,
                        names: names::Names::default(),
                        learned: Default::default(),
                    }),
                );
            }
            Event::SessionEnded { ts, key, reason } => self.end_session(*key, *ts, *reason),
            Event::ProcessSeen(p) => self.process_seen(p),
            Event::Fork(f) => self.fork(f),
            Event::Exec(e) => self.exec(e, &mut alerts),
            Event::Exit(e) => self.exit(e),
            Event::Connect(c) => self.connect(c, &mut alerts),
            // Recorded for the trace; no rule depends on a connect's outcome yet.
            Event::ConnectResult(_) => {}
            Event::Resolve(r) => {
                if let Some(t) = self.sessions.get_mut(&r.session) {
                    t.names.learn(r, &mut self.hosts_book);
                }
            }
            Event::CredentialOpen(o) => self.credential_open(o, &mut alerts),
            Event::TokenUse(t) => self.token_use(t, &mut alerts),
            Event::CredChange(c) => self.cred_change(c, &mut alerts),
            Event::Tick { ts } => self.forget_finished(*ts),
            Event::AgentStopping { .. } => {}
            Event::Lost { ts, source, count, session } => alerts.push(self.blind(*ts, source, *count, *session)),
            Event::PolicyReloaded { config, .. } => {
                self.folds.set_window(config.fold_window_ns);
                self.config = (**config).clone();
            }
            Event::TokenRotated { key, source, fingerprint, .. } => self.token_rotated(*key, source, fingerprint),
            Event::FleetSession { session, .. } => self.fleet_session(session),
            Event::FleetStale { ts, since, brokers } => alerts.push(self.fleet_stale(*ts, *since, brokers)),
        }
        alerts
    }

    /// Takes what the agent must enforce because of the events handled so far.
    pub fn drain_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// The earliest time at which a deadline rule could fire without another event.
    pub fn next_deadline(&self) -> Option<Nanos> {
        self.next_due.into_iter().chain(self.folds.next_due()).min()
    }

    fn scan_next_deadline(&self) -> Option<Nanos> {
        self.sessions.values().filter(|t| !t.outlived_checked).filter_map(|t| t.grace_deadline()).min()
    }

    pub fn sessions(&self, now: Nanos) -> Vec<SessionSummary> {
        self.sessions.iter().map(|(key, t)| self.summary(*key, t, now)).collect()
    }

    /// A number that changes whenever a session starts, ends or learns a token (what the fleet
    /// publishes of it).
    pub fn session_changes(&self) -> u64 {
        self.session_changes
    }

    /// A number that changes whenever what `adoptable` returns may have: the state
    /// directory's keeper asks for the sessions only then (thousands of them on a busy node).
    pub fn generation(&self) -> u64 {
        self.session_changes.wrapping_add(self.procs.changes())
    }

    /// What a restarted agent needs to take the sessions over (see agent/state.rs).
    pub fn adoptable(&self) -> Vec<Adoptable> {
        let mut out: Vec<Adoptable> = self
            .sessions
            .iter()
            .map(|(key, t)| Adoptable {
                key: *key,
                session: t.session.clone(),
                started: t.started,
                ended: t.ended,
                outlived_checked: t.outlived_checked,
                pids: self.procs.live_in(*key).into_iter().filter_map(|s| self.procs.get(s)).map(|p| p.pid).collect(),
            })
            .collect();
        out.sort_by_key(|a| a.key);
        out
    }

    /// For a session taken over from a previous agent: whether its outlived check already ran
    /// there (so it does not run twice).
    pub fn set_outlived_checked(&mut self, key: SessionKey, checked: bool) {
        if let Some(t) = self.sessions.get_mut(&key) {
            t.outlived_checked = checked;
            self.session_changes += 1;
            if !checked {
                let deadline = t.grace_deadline();
                self.due_by(deadline);
            }
        }
        // A deadline checked already may leave `next_due` early: the next settle finds nothing
        // due there and rescans. No scan of every session here: adoption calls this for each.
    }

    /// Makes sure `next_due` is no later than `deadline`.
    fn due_by(&mut self, deadline: Option<Nanos>) {
        if let Some(d) = deadline {
            self.next_due = Some(self.next_due.map_or(d, |n| n.min(d)));
        }
    }

    /// How many sessions are in each state at `now` (for the metrics).
    pub fn sessions_by_state(&self, now: Nanos) -> std::collections::BTreeMap<&'static str, i64> {
        let mut by_state = std::collections::BTreeMap::new();
        for t in self.sessions.values() {
            *by_state.entry(t.state_at(now).as_str()).or_insert(0) += 1;
        }
        by_state
    }

    pub fn session(&self, id: &str, now: Nanos) -> Option<SessionSummary> {
        self.sessions.iter().find(|(_, t)| t.session.id.as_str() == id).map(|(key, t)| self.summary(*key, t, now))
    }

    pub fn key_of(&self, id: &str) -> Option<SessionKey> {
        self.sessions.iter().find(|(_, t)| t.session.id.as_str() == id).map(|(k, _)| *k)
    }

    fn summary(&self, key: SessionKey, t: &Tracked, now: Nanos) -> SessionSummary {
        SessionSummary {
            key,
            session: t.session.clone(),
            state: t.state_at(now),
            started: rfc3339(t.started),
            ended: t.ended.map(|(at, _)| rfc3339(at)),
            end_reason: t.ended.map(|(_, r)| r),
            live_processes: self
                .procs
                .live_in(key)
                .into_iter()
                .filter_map(|s| self.procs.get(s))
                .map(|p| LiveProcess { pid: p.pid, ppid: p.ppid, exe: p.exe.to_string() })
                .collect(),
        }
    }

    fn end_session(&mut self, key: SessionKey, ts: Nanos, reason: EndReason) {
        if let Some(t) = self.sessions.get_mut(&key) {
            if t.ended.is_none() {
                self.session_changes += 1;
                t.ended = Some((ts, reason));
                self.effects.push(Effect::SessionEnded(key));
                let deadline = (!t.outlived_checked).then(|| t.grace_deadline()).flatten();
                self.due_by(deadline);
            }
        }
    }

    fn settle_deadlines(&mut self, now: Nanos, alerts: &mut Vec<Alert>) {
        if self.next_due.is_none_or(|due| due > now) {
            return;
        }
        let due: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, t)| !t.outlived_checked && t.grace_deadline().is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            let deadline = self.sessions[&key].grace_deadline().unwrap_or(now);
            let enforce = self.sessions[&key].session.enforce;
            for serial in self.procs.live_in(key) {
                let pid = self.procs.get(serial).map(|p| p.pid).unwrap_or(0);
                let summary =
                    format!("process {pid} is still running after the task ended and its grace period ran out");
                let mut alert = self.alert(Rule::ProcessOutlivedTask, key, Some(serial), deadline, summary);
                if enforce {
                    alert.action = Action::Killed;
                    self.effects.push(Effect::Kill { session: key, pid });
                }
                alerts.push(alert);
            }
            if let Some(t) = self.sessions.get_mut(&key) {
                t.outlived_checked = true;
                self.session_changes += 1;
            }
        }
        self.next_due = self.scan_next_deadline();
    }

    /// Drops sessions that ended long ago and have nothing left alive, so a long-running agent
    /// does not grow without bound.
    fn forget_finished(&mut self, now: Nanos) {
        let done: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(key, t)| {
                t.outlived_checked
                    && t.ended.is_some_and(|(at, _)| now.saturating_sub(at) > FORGET_AFTER_NS)
                    && self.procs.live_in(**key).is_empty()
            })
            .map(|(k, _)| *k)
            .collect();
        for key in &done {
            self.session_changes += 1;
            self.sessions.remove(key);
            self.effects.push(Effect::Forget(*key));
        }
        if !done.is_empty() {
            self.procs.forget(&done.into_iter().collect());
            self.hosts_book.prune();
        }
    }

    fn process_seen(&mut self, p: &Process) {
        let parent = self.procs.live(p.ppid).filter(|s| self.procs.get(*s).is_some_and(|q| q.session == p.session));
        let exe = self.procs.intern(&p.exe);
        self.procs.insert(Proc {
            session: p.session,
            pid: p.pid,
            ppid: p.ppid,
            parent,
            exe,
            argv: procs::Argv::new(&p.argv),
            creds: p.creds,
            caps: None,
            exec_caps: None,
            cgroup: p.cgroup,
            started: p.ts,
            exited: None,
        });
    }

    fn fork(&mut self, f: &Fork) {
        let parent = self.procs.live(f.parent);
        // A fork without exec runs the parent's image with the parent's credentials.
        let (exe, argv, creds, caps, exec_caps) = match parent.and_then(|s| self.procs.get(s)) {
            Some(p) => (p.exe.clone(), p.argv.clone(), p.creds, p.caps, p.exec_caps),
            None => (self.procs.intern(""), procs::Argv::default(), f.creds, None, None),
        };
        self.procs.insert(Proc {
            session: f.session,
            pid: f.child,
            ppid: f.parent,
            parent,
            exe,
            argv,
            creds,
            caps,
            exec_caps,
            cgroup: f.cgroup,
            started: f.ts,
            exited: None,
        });
    }

    /// The live record of `pid`, or a new one for a session process the engine meets without a
    /// fork (the root of `monitor run`, a process that joined a bound cgroup).
    fn live_or_first_seen(
        &mut self,
        session: SessionKey,
        pid: u32,
        ppid: u32,
        creds: crate::event::Creds,
        cgroup: u64,
        ts: Nanos,
    ) -> Serial {
        if let Some(serial) = self.procs.live(pid) {
            return serial;
        }
        let parent = self.procs.live(ppid);
        let exe = self.procs.intern("");
        self.procs.insert(Proc {
            session,
            pid,
            ppid,
            parent,
            exe,
            argv: procs::Argv::default(),
            creds,
            caps: None,
            exec_caps: None,
            cgroup,
            started: ts,
            exited: None,
        })
    }

    fn exec(&mut self, e: &Exec, alerts: &mut Vec<Alert>) {
        let serial = self.live_or_first_seen(e.session, e.pid, e.ppid, e.creds, e.cgroup, e.ts);
        let before = self.procs.get(serial).map(|p| p.creds).unwrap_or(e.creds);
        let exe = self.procs.intern(&e.exe);
        if let Some(p) = self.procs.get_mut(serial) {
            p.exe = exe;
            p.argv = procs::Argv::new(&e.argv);
            p.creds = e.creds;
            p.caps = e.cap_effective.or(p.caps);
            p.exec_caps = e.cap_effective;
            p.ppid = e.ppid;
            p.cgroup = e.cgroup;
        }
        let Some(tracked) = self.sessions.get(&e.session) else { return };

        // Root gained through exec: effective uid 0 while the real uid is not (a setuid
        // binary), or effective uid 0 where it was not before.
        let gained_root = e.creds.euid == Some(0) && (e.creds.uid != 0 || before.euid.is_some_and(|u| u != 0));
        if gained_root {
            let summary = format!(
                "{} gained root through exec (uid {}, euid {} -> 0)",
                e.exe,
                e.creds.uid,
                before.euid.map_or("?".to_string(), |u| u.to_string())
            );
            alerts.push(self.alert(Rule::PrivilegeEscalation, e.session, Some(serial), e.ts, summary));
        }
        if !tracked.session.scope.allows_exec(&e.exe, e.exe_real.as_deref()) {
            let summary = format!("{} is not among the executables the session may run", e.exe);
            alerts.push(self.alert(Rule::ExecOutOfScope, e.session, Some(serial), e.ts, summary));
        }
        if let Some(rule) = self.time_violation(e.session, e.ts) {
            let summary = Self::time_summary(rule, &format!("exec of {}", e.exe));
            alerts.push(self.alert(rule, e.session, Some(serial), e.ts, summary));
        }
    }

    /// The time rule an action at `ts` breaks, if any: after the task's end and grace, or after
    /// the ttl of a task that never said it ended.
    fn time_violation(&self, key: SessionKey, ts: Nanos) -> Option<Rule> {
        let t = self.sessions.get(&key)?;
        match t.grace_deadline() {
            Some(deadline) => (ts > deadline).then_some(Rule::ActivityAfterTaskEnd),
            None => (ts >= t.expires_at()).then_some(Rule::AuthorityExpired),
        }
    }

    fn time_summary(rule: Rule, what: &str) -> String {
        match rule {
            Rule::ActivityAfterTaskEnd => format!("{what} after the task ended (grace period over)"),
            _ => format!("{what} after the session's authority expired (ttl)"),
        }
    }

    fn connect(&mut self, c: &Connect, alerts: &mut Vec<Alert>) {
        let serial = self.live_or_first_seen(c.session, c.pid, 0, c.creds, c.cgroup, c.ts);
        let Some(t) = self.sessions.get(&c.session) else { return };

        // The names this address was learnt under that still hold, the most recent first.
        let names = t.names.of(c.addr, c.ts);
        let rule = match c.verdict {
            Verdict::BlockedScope => Some(Rule::OutOfScopeConnect),
            Verdict::BlockedEnded => Some(Rule::ActivityAfterTaskEnd),
            Verdict::BlockedExpired => Some(Rule::AuthorityExpired),
            Verdict::Allowed => self.time_violation(c.session, c.ts).or_else(|| {
                let allowed = t.session.scope.allows_connect(c.addr, c.port, &names)
                    || self.config.never_alert.iter().any(|d| d.matches(c.addr, c.port, &names));
                (!allowed).then_some(Rule::OutOfScopeConnect)
            }),
        };
        let Some(rule) = rule else { return };
        let verb = if c.connect { "connect" } else { "send" };
        let what = format!("{} {verb} to {}", c.transport.as_str(), socket_addr(c));
        let summary = match rule {
            Rule::OutOfScopeConnect => format!("{what}, outside the session's connect scope"),
            Rule::ActivityAfterTaskEnd if c.verdict != Verdict::Allowed => format!("{what} after the task ended"),
            _ => Self::time_summary(rule, &what),
        };
        let mut alert = self.alert(rule, c.session, Some(serial), c.ts, summary);
        alert.network = Some(NetworkRef {
            dst_ip: c.addr.to_string(),
            dst_port: c.port,
            protocol: c.transport.as_str().to_string(),
            dst_name: names.first().cloned(),
        });
        if c.verdict != Verdict::Allowed {
            alert.action = Action::Blocked;
        }
        alerts.push(alert);
    }

    fn exit(&mut self, e: &Exit) {
        let Some(serial) = self.procs.exit(e.pid, e.ts) else { return };
        let Some(t) = self.sessions.get(&e.session) else { return };
        let is_root =
            t.session.binding.root_pid == Some(e.pid) && self.procs.get(serial).is_some_and(|p| p.parent.is_none());
        if is_root {
            self.end_session(e.session, e.ts, EndReason::RootExited);
        }
    }

    /// The agent lost events: of one session where the kernel or the agent knows whose, else
    /// host-wide (processes outside sessions may have been sessions' too: a loss is never
    /// assumed harmless).
    fn blind(&self, ts: Nanos, source: &str, count: u64, session: Option<SessionKey>) -> Alert {
        let (summary, session) = match session.and_then(|key| self.session_ref(key, ts)) {
            Some(session) => (
                format!("the agent lost {count} event(s) of session {} ({source}): it was blind for them", session.id),
                session,
            ),
            None => (
                format!("the agent lost {count} event(s) host-wide ({source}): it was blind for them"),
                SessionRef::default(),
            ),
        };
        self.blind_alert(ts, summary, session)
    }

    /// The fleet view went stale: this agent no longer learns other hosts' sessions.
    fn fleet_stale(&self, ts: Nanos, since: Nanos, brokers: &str) -> Alert {
        let summary = format!(
            "the fleet view is stale: no contact with the Kafka brokers {brokers} for {} s; sessions other \
             hosts started or ended since are not known here, and their tokens are not looked for",
            ts.saturating_sub(since) / 1_000_000_000
        );
        self.blind_alert(ts, summary, SessionRef::default())
    }

    fn blind_alert(&self, ts: Nanos, summary: String, session: SessionRef) -> Alert {
        Alert {
            id: String::new(),
            time: rfc3339(ts),
            host: String::new(),
            rule: Rule::MonitorBlind,
            severity: self.severity(Rule::MonitorBlind),
            summary,
            session,
            process: None,
            network: None,
            credential: None,
            k8s: None,
            action: Action::Observed,
            mitre: Vec::new(),
            owasp_nhi: Vec::new(),
            nist_csf: Vec::new(),
            count: 1,
            first_seen: String::new(),
            last_seen: String::new(),
            pids: Vec::new(),
            ts,
            fold: 0,
        }
    }

    fn severity(&self, rule: Rule) -> Severity {
        self.config.severity.get(&rule).copied().unwrap_or(rule.default_severity())
    }

    /// A session as an alert names it, in its state at `ts`.
    fn session_ref(&self, key: SessionKey, ts: Nanos) -> Option<SessionRef> {
        self.sessions.get(&key).map(|t| SessionRef {
            id: t.session.id.to_string(),
            principal: t.session.principal.clone(),
            actor: t.session.actor.clone(),
            task: t.session.task.clone(),
            sponsor: t.session.sponsor.clone(),
            state: t.state_at(ts).as_str().to_string(),
            started: rfc3339(t.started),
            ended: t.ended.map(|(at, _)| rfc3339(at)),
            host: None,
        })
    }

    fn alert(&self, rule: Rule, key: SessionKey, serial: Option<Serial>, ts: Nanos, summary: String) -> Alert {
        let session = self.session_ref(key, ts);
        Alert {
            id: String::new(),
            time: rfc3339(ts),
            host: String::new(),
            rule,
            severity: self.severity(rule),
            summary,
            session: session.unwrap_or_default(),
            process: serial.and_then(|s| self.procs.describe(s)),
            network: None,
            credential: None,
            k8s: None,
            action: Action::Observed,
            mitre: rule.mitre().iter().map(|s| s.to_string()).collect(),
            owasp_nhi: rule.owasp_nhi().iter().map(|s| s.to_string()).collect(),
            nist_csf: rule.nist_csf().iter().map(|s| s.to_string()).collect(),
            count: 1,
            first_seen: String::new(),
            last_seen: String::new(),
            pids: Vec::new(),
            ts,
            fold: 0,
        }
    }
}

fn socket_addr(c: &Connect) -> String {
    std::net::SocketAddr::new(c.addr, c.port).to_string()
}
