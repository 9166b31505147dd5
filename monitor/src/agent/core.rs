//! The core task: owns the engine, applies control-plane commands and kernel events in one
//! order, fires deadline ticks, and hands alerts to the sinks. Nothing else touches the engine,
//! so it needs no lock.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};

use crate::{
    alert::Alert,
    engine::{Adoptable, Effect, Engine, SessionState, SessionSummary},
    event::{EndReason, Event, Nanos, Process, SessionKey},
    sessions::Session,
    trace::TraceWriter,
};
use crate::{host::now_ns, sinks::STOP_DRAIN};

/// How long after a deadline the tick fires, so events already in the ring buffer (an exit just
/// before the deadline) are applied first.
const DEADLINE_SLACK: Duration = Duration::from_millis(100);
/// Housekeeping tick (forgetting finished sessions) when nothing else happens.
const HOUSEKEEPING: Duration = Duration::from_secs(60);

enum Command {
    Start {
        session: Box<Session>,
        reply: oneshot::Sender<Result<SessionKey, String>>,
    },
    /// Processes found in /proc when they were bound, answered once applied: the kernel's
    /// events of a process come from the ring buffer on another channel, and must find its
    /// snapshot already there (an exec applied before it would be undone by it).
    Seen {
        processes: Vec<Process>,
        applied: oneshot::Sender<()>,
    },
    /// Events the control plane observed itself (a session's hosts-file names, before its first
    /// connect can be; a rotated token file), in order with the rest: answered once applied.
    Apply {
        events: Vec<Event>,
        applied: oneshot::Sender<()>,
    },
    End {
        id: String,
        reason: EndReason,
        reply: oneshot::Sender<Result<SessionSummary, String>>,
    },
    List {
        reply: oneshot::Sender<Vec<SessionSummary>>,
    },
    Show {
        id: String,
        reply: oneshot::Sender<Result<SessionSummary, String>>,
    },
    /// The agent is stopping: apply what is queued, write the trace out, end.
    Stop {
        reply: oneshot::Sender<()>,
    },
    /// What the state directory keeps (agent/state.rs).
    /// Unless the engine's generation is still `unless` (nothing changed).
    Adoptable {
        unless: Option<u64>,
        reply: oneshot::Sender<Option<(u64, Vec<Adoptable>)>>,
    },
    /// Sessions a previous agent had: started (and ended) as they were, and what was not seen
    /// while no agent ran; answered once applied.
    Adopt {
        sessions: Vec<Adoptable>,
        blind: Option<String>,
        applied: oneshot::Sender<()>,
    },
}

/// The control plane's handle on the core task.
#[derive(Clone)]
pub struct CoreHandle {
    tx: mpsc::Sender<Command>,
    /// The engine's count of session changes (start, end, a token learnt), sent as it moves.
    session_changes: tokio::sync::watch::Receiver<u64>,
}

const GONE: &str = "the agent is shutting down";

impl CoreHandle {
    pub async fn start(&self, session: Session) -> Result<SessionKey, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Start { session: Box::new(session), reply }).await?;
        rx.await.map_err(|_| GONE.to_string())?
    }

    /// Returns once the engine has the snapshots: bind the processes only then.
    pub async fn seen(&self, processes: Vec<Process>) {
        let (applied, rx) = oneshot::channel();
        if self.send(Command::Seen { processes, applied }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Returns once the engine has the names.
    pub async fn names(&self, names: Vec<crate::event::Resolve>) {
        self.apply(names.into_iter().map(Event::Resolve).collect()).await;
    }

    /// Returns once the engine has the events.
    pub async fn apply(&self, events: Vec<Event>) {
        let (applied, rx) = oneshot::channel();
        if self.send(Command::Apply { events, applied }).await.is_ok() {
            let _ = rx.await;
        }
    }

    pub async fn end(&self, id: String, reason: EndReason) -> Result<SessionSummary, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::End { id, reason, reply }).await?;
        rx.await.map_err(|_| GONE.to_string())?
    }

    pub async fn list(&self) -> Result<Vec<SessionSummary>, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::List { reply }).await?;
        rx.await.map_err(|_| GONE.to_string())
    }

    pub async fn show(&self, id: String) -> Result<SessionSummary, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Show { id, reply }).await?;
        rx.await.map_err(|_| GONE.to_string())?
    }

    /// Changes whenever a session starts, ends or learns a token: who publishes sessions waits
    /// on it instead of asking every so often.
    pub fn session_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.session_changes.clone()
    }

    /// The sessions as the state directory keeps them, with the engine's generation; None when
    /// the generation is still `unless`.
    pub async fn adoptable(&self, unless: Option<u64>) -> Result<Option<(u64, Vec<Adoptable>)>, String> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Adoptable { unless, reply }).await?;
        rx.await.map_err(|_| GONE.to_string())
    }

    pub async fn adopt(&self, sessions: Vec<Adoptable>, blind: Option<String>) {
        let (applied, rx) = oneshot::channel();
        if self.send(Command::Adopt { sessions, blind, applied }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Asks the core to finish: the events already queued are applied, the trace is written
    /// out and its forward spool given a moment to drain, then the core ends (and with it the
    /// alert channel, so the sinks finish too).
    pub async fn stop(&self) {
        let (reply, rx) = oneshot::channel();
        if self.send(Command::Stop { reply }).await.is_ok() {
            let _ = rx.await;
        }
    }

    async fn send(&self, command: Command) -> Result<(), String> {
        self.tx.send(command).await.map_err(|_| GONE.to_string())
    }
}

pub struct Core {
    engine: Engine,
    next_key: SessionKey,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Receiver<Event>,
    alerts: mpsc::Sender<Alert>,
    stamp: super::Stamp,
    event_log: Option<crate::sinks::EventLog>,
    trace: Option<TraceWriter>,
    effects: mpsc::Sender<Effect>,
    /// The metrics' event counters, by [`Event::kind_index`].
    counted: [Counter; Event::KINDS.len()],
    /// Applying the sessions a previous agent left (see `Command::Adopt`).
    adopting: bool,
    /// See [`CoreHandle::session_changes`].
    session_changed: tokio::sync::watch::Sender<u64>,
}

impl Core {
    pub fn new(
        engine: Engine,
        events: mpsc::Receiver<Event>,
        alerts: mpsc::Sender<Alert>,
        stamp: super::Stamp,
        event_log: Option<crate::sinks::EventLog>,
        trace: Option<TraceWriter>,
        effects: mpsc::Sender<Effect>,
    ) -> (Self, CoreHandle) {
        let (tx, commands) = mpsc::channel(64);
        let (session_changed, session_changes) = tokio::sync::watch::channel(engine.session_changes());
        let counted = std::array::from_fn(|i| crate::metrics::get().events_of(Event::KINDS[i]));
        let core = Self {
            engine,
            next_key: 1,
            commands,
            events,
            alerts,
            stamp,
            event_log,
            trace,
            effects,
            counted,
            adopting: false,
            session_changed,
        };
        (core, CoreHandle { tx, session_changes })
    }

    pub async fn run(mut self) {
        let mut last_tick = std::time::Instant::now();
        loop {
            // A busy agent still ticks: housekeeping (forgetting finished sessions, the
            // sessions gauge) must not wait for a quiet moment that may never come.
            if last_tick.elapsed() >= HOUSEKEEPING {
                self.apply(Event::Tick { ts: now_ns() }).await;
                last_tick = std::time::Instant::now();
            }
            let wake = self.engine.next_deadline().map(until).unwrap_or(HOUSEKEEPING);
            tokio::select! {
                event = self.events.recv() => match event {
                    Some(event) => self.apply(event).await,
                    None => break,
                },
                Some(command) = self.commands.recv() => {
                    if let Command::Stop { reply } = command {
                        while let Ok(event) = self.events.try_recv() {
                            self.apply(event).await;
                        }
                        // Folded findings send their counts so far (recorded, so replay does too).
                        self.apply(Event::AgentStopping { ts: now_ns() }).await;
                        self.flush_trace();
                        if let Some(trace) = &self.trace {
                            trace.wait_forwarded(STOP_DRAIN).await;
                        }
                        let _ = reply.send(());
                        break;
                    }
                    self.command(command).await
                }
                _ = tokio::time::sleep(wake) => {
                    self.apply(Event::Tick { ts: now_ns() }).await;
                    last_tick = std::time::Instant::now();
                }
            }
            // The trace is written out whenever the core catches up, so it is current on disk
            // without a write per event.
            if self.events.is_empty() {
                self.flush_trace();
            }
        }
        self.flush_trace();
    }

    fn flush_trace(&mut self) {
        if let Some(trace) = &mut self.trace {
            if let Err(e) = trace.flush() {
                tracing::error!("trace write failed, tracing stops: {e}");
                self.trace = None;
            }
        }
    }

    fn record(&mut self, write: impl FnOnce(&mut TraceWriter) -> std::io::Result<()>) {
        if let Some(trace) = &mut self.trace {
            if let Err(e) = write(trace) {
                tracing::error!("trace write failed, tracing stops: {e}");
                self.trace = None;
            }
        }
    }

    async fn apply(&mut self, mut event: Event) {
        self.counted[event.kind_index()].inc();
        let metrics = crate::metrics::get();
        match &event {
            Event::Tick { .. }
            | Event::AgentStopping { .. }
            | Event::SessionStarted { .. }
            | Event::SessionEnded { .. } => {}
            Event::Lost { source, count, .. } => metrics.lost(source, *count),
            _ => metrics.event_delay(now_ns(), &event),
        }
        if !self.engine.attribute(&mut event) {
            return;
        }
        if let Some(log) = &mut self.event_log {
            log.write(&event);
        }
        self.record(|trace| trace.event(&event));
        let alerts = self.engine.handle(&event);
        let changes = self.engine.session_changes();
        self.session_changed.send_if_modified(|seen| std::mem::replace(seen, changes) != changes);
        // Effects first: a kill or a refusal should not wait for the alert to be written.
        for effect in self.engine.drain_effects() {
            if self.effects.send(effect).await.is_err() {
                tracing::error!("the enforcer is gone; effect dropped");
            }
        }
        // A scan of every session: not for each of the thousands an adoption starts (it sets
        // the gauge once, after).
        if !self.adopting
            && matches!(event, Event::SessionStarted { .. } | Event::SessionEnded { .. } | Event::Tick { .. })
        {
            metrics.set_sessions(&self.engine.sessions_by_state(event.ts()));
        }
        for alert in alerts {
            let alert = self.stamp.stamp(alert);
            metrics.alert(&alert);
            self.record(|trace| trace.alert(&alert));
            if self.alerts.send(alert).await.is_err() {
                tracing::error!("the alert sinks are gone; alert dropped");
            }
        }
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Start { session, reply } => {
                if self.engine.key_of(session.id.as_str()).is_some() {
                    let _ = reply.send(Err(format!("session {} already exists", session.id)));
                    return;
                }
                let key = self.next_key;
                self.next_key += 1;
                self.apply(Event::SessionStarted { ts: now_ns(), key, session }).await;
                let _ = reply.send(Ok(key));
            }
            Command::Seen { processes, applied } => {
                for p in processes {
                    self.apply(Event::ProcessSeen(p)).await;
                }
                let _ = applied.send(());
            }
            Command::Apply { events, applied } => {
                for event in events {
                    self.apply(event).await;
                }
                let _ = applied.send(());
            }
            Command::End { id, reason, reply } => {
                let now = now_ns();
                let result = match self.engine.session(&id, now) {
                    None => Err(self.unknown(&id, now)),
                    Some(s) if s.state == SessionState::Ended => {
                        Err(format!("session {id} already ended at {}", s.ended.unwrap_or_default()))
                    }
                    Some(s) => {
                        self.apply(Event::SessionEnded { ts: now, key: s.key, reason }).await;

                        self.engine.session(&id, now).ok_or_else(|| self.unknown(&id, now))
                    }
                };
                let _ = reply.send(result);
            }
            Command::List { reply } => {
                let _ = reply.send(self.engine.sessions(now_ns()));
            }
            Command::Stop { .. } => {}
            Command::Adoptable { unless, reply } => {
                let generation = self.engine.generation();
                let _ = reply.send((unless != Some(generation)).then(|| (generation, self.engine.adoptable())));
            }
            Command::Adopt { sessions, blind, applied } => {
                self.adopting = true;
                for a in sessions {
                    self.next_key = self.next_key.max(a.key + 1);
                    self.apply(Event::SessionStarted { ts: a.started, key: a.key, session: Box::new(a.session) }).await;
                    if let Some((ts, reason)) = a.ended {
                        self.apply(Event::SessionEnded { ts, key: a.key, reason }).await;
                    }
                    self.engine.set_outlived_checked(a.key, a.outlived_checked);
                }
                self.adopting = false;
                crate::metrics::get().set_sessions(&self.engine.sessions_by_state(now_ns()));
                if let Some(source) = blind {
                    self.apply(Event::Lost { ts: now_ns(), source, count: 1, session: None }).await;
                }
                let _ = applied.send(());
            }
            Command::Show { id, reply } => {
                let now = now_ns();
                let _ = reply.send(self.engine.session(&id, now).ok_or_else(|| self.unknown(&id, now)));
            }
        }
    }

    fn unknown(&self, id: &str, now: Nanos) -> String {
        let known: Vec<String> = self.engine.sessions(now).into_iter().map(|s| s.session.id.to_string()).collect();
        if known.is_empty() {
            format!("no session {id}: the agent has no sessions")
        } else {
            format!("no session {id}; known: {}", known.join(", "))
        }
    }
}

fn until(deadline: Nanos) -> Duration {
    Duration::from_nanos(deadline.saturating_sub(now_ns())) + DEADLINE_SLACK
}
