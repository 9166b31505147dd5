//! What a replay finds: per session, the delegation, its processes, a timeline of what they did
//! and the alerts; and how the replayed alerts compare with those raised live.

use std::{collections::HashMap, sync::Arc};

use serde::Serialize;

use crate::{
    alert::{rfc3339, Alert},
    event::{Event, Nanos, SessionKey, TokenVia, Verdict},
    policy::Policy,
    sessions::Session,
};

#[derive(Debug, Serialize)]
pub struct Report {
    /// Events read from the trace.
    pub events: u64,
    pub sessions: Vec<SessionReport>,
    /// Damaged stretches met while reading, with file, offset and bytes skipped.
    pub damage: Vec<String>,
    pub comparison: Comparison,
}

impl Report {
    /// The report narrowed to one session; `Err` lists the session ids the trace holds.
    pub fn only_session(mut self, id: &str) -> Result<Self, Vec<String>> {
        if !self.sessions.iter().any(|s| s.session.id.as_str() == id) {
            let mut known: Vec<String> = self.sessions.iter().map(|s| s.session.id.to_string()).collect();
            known.dedup();
            return Err(known);
        }
        self.sessions.retain(|s| s.session.id.as_str() == id);
        self.comparison.retain_session(id);
        Ok(self)
    }
}

#[derive(Debug, Serialize)]
pub struct SessionReport {
    pub run_id: String,
    /// The run's ordinal in this replay.
    #[serde(skip)]
    pub run: usize,
    #[serde(skip)]
    pub key: SessionKey,
    pub session: Session,
    pub started: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    pub processes: Vec<ProcNode>,
    pub timeline: Vec<Entry>,
    pub alerts: Vec<Alert>,
    /// pid -> index in `processes` of its live node.
    #[serde(skip)]
    live: HashMap<u32, usize>,
}

/// A process of the session, for the tree.
#[derive(Debug, Clone, Serialize)]
pub struct ProcNode {
    pub pid: u32,
    pub ppid: u32,
    pub exe: String,
    pub argv: Vec<String>,
    #[serde(serialize_with = "as_rfc3339")]
    pub first_seen: Nanos,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "as_rfc3339_opt")]
    pub exited: Option<Nanos>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<u32>,
}

/// One line of the timeline: an event (described when output) or an alert no event carries.
#[derive(Debug, Clone)]
pub struct Entry {
    pub ts: Nanos,
    pub pid: u32,
    /// The process's executable (or task name).
    pub process: Arc<str>,
    source: Option<Box<Event>>,
    /// Alerts this event raised: `rule (severity): summary`.
    pub alerts: Vec<String>,
}

impl Entry {
    /// `session`, `process`, `exec`, `exit`, `connect`, `resolve`, `credential`, `token`,
    /// `privilege`, `lost`, or `alert`; and the detail.
    pub fn describe(&self) -> (&'static str, String) {
        match &self.source {
            Some(event) => describe(event),
            None => ("alert", String::new()),
        }
    }
}

impl Serialize for Entry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let (what, detail) = self.describe();
        let mut st = s.serialize_struct("Entry", 6)?;
        st.serialize_field("time", &rfc3339(self.ts))?;
        st.serialize_field("pid", &self.pid)?;
        st.serialize_field("process", &*self.process)?;
        st.serialize_field("what", what)?;
        st.serialize_field("detail", &detail)?;
        if !self.alerts.is_empty() {
            st.serialize_field("alerts", &self.alerts)?;
        }
        st.end()
    }
}

impl SessionReport {
    pub fn new(run_id: &str, run: usize, key: SessionKey, session: &Session, ts: Nanos) -> Self {
        Self {
            run_id: run_id.to_string(),
            run,
            key,
            session: session.clone(),
            started: rfc3339(ts),
            ended: None,
            end_reason: None,
            processes: Vec::new(),
            timeline: Vec::new(),
            alerts: Vec::new(),
            live: HashMap::new(),
        }
    }

    /// An event of this session, for the session's end and its process tree.
    pub fn apply(&mut self, event: &Event, procs: &Names) {
        let node = |pid: u32, ppid: u32, exe: &str, argv: &[String], ts: Nanos| ProcNode {
            pid,
            ppid,
            exe: exe.to_string(),
            argv: argv.to_vec(),
            first_seen: ts,
            exited: None,
            exit_code: None,
        };
        let add = |me: &mut Self, n: ProcNode| {
            me.live.insert(n.pid, me.processes.len());
            me.processes.push(n);
        };
        match event {
            Event::SessionEnded { ts, reason, .. } => {
                self.ended = Some(rfc3339(*ts));
                self.end_reason = Some(end_reason(*reason));
            }
            Event::ProcessSeen(p) => add(self, node(p.pid, p.ppid, &p.exe, &p.argv, p.ts)),
            Event::Fork(f) => {
                let exe = procs.get(&f.child).map(|(e, _)| &**e).unwrap_or("");
                add(self, node(f.child, f.parent, exe, &[], f.ts));
            }
            Event::Exec(e) => match self.live.get(&e.pid) {
                Some(&i) => {
                    self.processes[i].exe.clone_from(&e.exe);
                    self.processes[i].argv.clone_from(&e.argv);
                }
                None => add(self, node(e.pid, e.ppid, &e.exe, &e.argv, e.ts)),
            },
            Event::Exit(x) => {
                if let Some(i) = self.live.remove(&x.pid) {
                    self.processes[i].exited = Some(x.ts);
                    self.processes[i].exit_code = Some(x.exit_code);
                }
            }
            _ => {}
        }
    }

    pub fn push_entry(&mut self, entry: Entry, alert: Option<&Alert>) {
        self.timeline.push(entry);
        if let Some(alert) = alert {
            self.mark_last(alert);
        }
    }

    pub fn mark_last(&mut self, alert: &Alert) {
        if let Some(last) = self.timeline.last_mut() {
            last.alerts.push(format!("{} ({}): {}", alert.rule.id(), severity(alert), alert.summary));
        }
    }
}

fn severity(alert: &Alert) -> String {
    serde_json::to_value(alert.severity).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// The process names known so far in a run, by pid.
pub type Names = HashMap<u32, (Arc<str>, u32)>;

/// The timeline line of an event, if it is one a responder reads. The event is kept and
/// described only when the report is output.
pub fn entry(event: Event, procs: &Names) -> Option<Entry> {
    let name = |pid: u32| procs.get(&pid).map(|(exe, _)| exe.clone()).unwrap_or_else(|| Arc::from(""));
    let actor = |a: &crate::event::Actor| Arc::from(if a.exe.is_empty() { a.comm.as_str() } else { a.exe.as_str() });
    let (pid, process) = match &event {
        Event::Fork(_)
        | Event::ConnectResult(_)
        | Event::Tick { .. }
        | Event::AgentStopping { .. }
        | Event::PolicyReloaded { .. }
        | Event::FleetSession { .. }
        | Event::FleetStale { .. } => return None,
        Event::TokenRotated { .. } => (0, Arc::from("")),
        Event::SessionStarted { session, .. } => (session.binding.root_pid.unwrap_or(0), Arc::from("")),
        Event::SessionEnded { .. } | Event::Lost { .. } => (0, Arc::from("")),
        Event::ProcessSeen(p) => (p.pid, Arc::from(p.exe.as_str())),
        Event::Exec(e) => (e.pid, Arc::from(e.exe.as_str())),
        Event::Exit(x) => (x.pid, name(x.pid)),
        Event::Connect(c) => (c.pid, name(c.pid)),
        Event::Resolve(r) => (r.pid, name(r.pid)),
        Event::CredentialOpen(o) => (o.actor.pid, actor(&o.actor)),
        Event::TokenUse(t) => (t.actor.pid, actor(&t.actor)),
        Event::CredChange(c) => (c.pid, name(c.pid)),
    };
    Some(Entry { ts: event.ts(), pid, process, source: Some(Box::new(event)), alerts: Vec::new() })
}

/// What an event was, and what it said, for a timeline line.
pub fn describe(event: &Event) -> (&'static str, String) {
    match event {
        Event::SessionStarted { session, .. } => {
            ("session", format!("started: {} acting for {} ({})", session.actor, session.principal, session.task))
        }
        Event::SessionEnded { reason, .. } => ("session", format!("ended ({})", end_reason(*reason))),
        Event::ProcessSeen(p) => ("process", format!("bound: {}", p.argv.join(" "))),
        Event::Fork(f) => ("fork", format!("child {}", f.child)),
        Event::ConnectResult(r) => ("connect", format!("fd {} returned {}", r.fd, r.ret)),
        Event::Tick { .. } => ("tick", String::new()),
        Event::AgentStopping { .. } => ("agent stopping", String::new()),
        Event::PolicyReloaded { .. } => ("policy", "reloaded".to_string()),
        Event::TokenRotated { source, fingerprint, .. } => ("token", format!("rotated: {source} now {fingerprint}")),
        Event::FleetSession { ts, session } => {
            ("fleet", format!("session {} on {}: {}", session.id, session.host, session.state_at(*ts)))
        }
        Event::FleetStale { brokers, since, .. } => {
            ("fleet", format!("no contact with {brokers} since {}", crate::alert::rfc3339(*since)))
        }
        Event::Exec(e) => ("exec", e.argv.join(" ")),
        Event::Exit(x) => ("exit", exit_status(x.exit_code)),
        Event::Connect(c) => {
            let verdict = match c.verdict {
                Verdict::Allowed => "",
                Verdict::BlockedScope => " [blocked: out of scope]",
                Verdict::BlockedEnded => " [blocked: task ended]",
                Verdict::BlockedExpired => " [blocked: ttl passed]",
            };
            let dst = std::net::SocketAddr::new(c.addr, c.port);
            let how = if c.connect { "" } else { " (send)" };
            ("connect", format!("{} {dst}{how}{verdict}", c.transport.as_str()))
        }
        Event::Resolve(r) => {
            let addrs: Vec<String> = r.addrs.iter().map(|a| a.to_string()).collect();
            ("resolve", format!("{} -> {}", r.name, addrs.join(", ")))
        }
        Event::CredentialOpen(o) => {
            let mode = if o.write { "write" } else { "read" };
            ("credential", format!("opened {} ({mode})", o.path))
        }
        Event::TokenUse(t) => {
            let via = match &t.via {
                TokenVia::Env { name } => format!("in the environment as ${name}"),
                TokenVia::Argv { index } => format!("on the command line (argument {index})"),
                TokenVia::Http { tls, method, host, path, .. } => format!(
                    "{method} {}://{}{path}",
                    if *tls { "https" } else { "http" },
                    host.as_deref().unwrap_or("?")
                ),
                TokenVia::Received { field } => format!("received as `{field}` in a token response"),
            };
            let jwt = t
                .credential
                .jwt
                .as_ref()
                .and_then(|j| j.sub.as_ref())
                .map(|s| format!(", JWT sub {s}"))
                .unwrap_or_default();
            ("token", format!("{} {} {via}{jwt}", t.credential.kind.as_str(), t.credential.fingerprint))
        }
        Event::CredChange(c) => {
            let euid = c.euid.map(|u| format!(" euid {u}")).unwrap_or_default();
            let caps = c.cap_effective.map(|x| format!(" caps {x:#x}")).unwrap_or_default();
            ("privilege", format!("{:?}{euid}{caps}", c.call).to_lowercase())
        }
        Event::Lost { source, count, .. } => ("lost", format!("{count} events lost ({source})")),
    }
}

/// The timeline line of an alert that no event of the session carries (deadline rules).
pub fn alert_entry(alert: &Alert) -> Entry {
    let (pid, process) = alert.process.as_ref().map_or((0, Arc::from("")), |p| (p.pid, Arc::from(p.exe.as_str())));
    Entry { ts: alert.ts, pid, process, source: None, alerts: Vec::new() }
}

fn end_reason(reason: crate::event::EndReason) -> String {
    serde_json::to_value(reason).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn exit_status(code: u32) -> String {
    match (code >> 8, code & 0x7f) {
        (status, 0) => format!("exited with status {status}"),
        (_, signal) => format!("killed by signal {signal}"),
    }
}

/// What-if: the policy's scope for the session's actor replaces the recorded scope parts it gives.
pub fn apply_actor_scope(session: &mut Session, policy: &Policy) {
    let Some(scope) = policy.actors.get(&session.actor) else { return };
    if let Some(connect) = &scope.connect {
        session.scope.connect = Some(connect.clone());
    }
    if !scope.credentials.is_empty() {
        session.scope.credentials = scope.credentials.clone();
    }
    if let Some(exec) = &scope.exec {
        session.scope.exec = Some(crate::sessions::with_real_paths(exec.clone()));
    }
}

/// An alert's identity for comparing live and replayed alerts (ids and wall times aside).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct AlertKey {
    pub rule: String,
    pub time: String,
    pub session: String,
    pub pid: u32,
    pub summary: String,
    /// An update of a folded finding (count > 1) is an alert record of its own.
    pub count: u64,
}

impl AlertKey {
    pub fn of(alert: &Alert) -> Self {
        Self {
            rule: alert.rule.id().to_string(),
            time: rfc3339(alert.ts),
            session: alert.session.id.clone(),
            pid: alert.process.as_ref().map_or(0, |p| p.pid),
            summary: alert.summary.clone(),
            count: alert.count,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Comparison {
    /// `--policy` was given: differences are the what-if, not a fault.
    pub what_if: bool,
    pub live: usize,
    pub replayed: usize,
    /// Raised live, not by the replay (with `--policy`: would disappear).
    pub only_live: Vec<AlertKey>,
    /// Raised by the replay, not live (with `--policy`: would appear).
    pub only_replayed: Vec<AlertKey>,
    /// Session id -> (live, replayed) counts, for `--session`.
    #[serde(skip)]
    per_session: HashMap<String, (usize, usize)>,
}

impl Comparison {
    fn retain_session(&mut self, id: &str) {
        (self.live, self.replayed) = self.per_session.get(id).copied().unwrap_or_default();
        self.only_live.retain(|k| k.session == id);
        self.only_replayed.retain(|k| k.session == id);
    }

    pub fn identical(&self) -> bool {
        self.only_live.is_empty() && self.only_replayed.is_empty()
    }
}

/// Live and replayed alerts compared as they come. A trace holds each live alert right after
/// the event that raised it, which the replay has just evaluated: where the replay reproduces
/// them, what is unmatched at any moment is an event's worth, so this holds the differences,
/// not every alert of a long trace.
#[derive(Debug, Default)]
pub struct Tally {
    /// Replayed minus live, per alert identity; zero entries are dropped.
    unmatched: HashMap<AlertKey, i64>,
    per_session: HashMap<String, (usize, usize)>,
    live: usize,
    replayed: usize,
}

impl Tally {
    pub fn live(&mut self, key: AlertKey) {
        self.live += 1;
        self.per_session.entry(key.session.clone()).or_default().0 += 1;
        self.add(key, -1);
    }

    pub fn replayed(&mut self, key: AlertKey) {
        self.replayed += 1;
        self.per_session.entry(key.session.clone()).or_default().1 += 1;
        self.add(key, 1);
    }

    fn add(&mut self, key: AlertKey, delta: i64) {
        let entry = self.unmatched.entry(key);
        let std::collections::hash_map::Entry::Occupied(mut held) = entry else {
            entry.or_insert(delta);
            return;
        };
        *held.get_mut() += delta;
        if *held.get() == 0 {
            held.remove();
        }
    }

    pub fn finish(self, what_if: bool) -> Comparison {
        let (mut only_live, mut only_replayed) = (Vec::new(), Vec::new());
        for (key, n) in self.unmatched {
            let side = if n < 0 { &mut only_live } else { &mut only_replayed };
            side.extend(std::iter::repeat_n(key, n.unsigned_abs() as usize));
        }
        only_live.sort();
        only_replayed.sort();
        Comparison {
            what_if,
            live: self.live,
            replayed: self.replayed,
            only_live,
            only_replayed,
            per_session: self.per_session,
        }
    }
}

fn as_rfc3339<S: serde::Serializer>(ts: &Nanos, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*ts))
}

fn as_rfc3339_opt<S: serde::Serializer>(ts: &Option<Nanos>, s: S) -> Result<S::Ok, S::Error> {
    match ts {
        Some(ts) => s.serialize_str(&rfc3339(*ts)),
        None => s.serialize_none(),
    }
}
