//! `monitor replay`: reads traces, runs the same engine over the recorded events, and shows each
//! session — the delegation, its process tree, a timeline of what its processes did, and the
//! alerts — as a terminal timeline, JSON, OCSF or a self-contained HTML page. Without
//! `--policy` the replayed alerts are those raised live (checked, and said); with `--policy`
//! it is a what-if: which alerts would appear and which would disappear.

mod html;
mod report;
mod timeline;

use std::{
    collections::{BTreeMap, HashMap},
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
pub use report::{AlertKey, Comparison, Entry, ProcNode, Report, SessionReport};

use crate::{
    alert::Alert,
    engine::{Engine, EngineConfig},
    event::{Event, SessionKey},
    policy::Policy,
    trace::{
        reader::{self, Damage},
        writer::{index_path, SegmentIndex},
        Record,
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Timeline,
    Json,
    Ocsf,
    Html,
}

#[derive(Debug)]
pub struct ReplaySettings {
    pub traces: Vec<PathBuf>,
    pub session: Option<String>,
    /// What-if: evaluate with this policy instead of the recorded configuration.
    pub policy: Option<Policy>,
    pub format: Format,
    pub output: Option<PathBuf>,
}

/// Runs `monitor replay`; returns the exit code (2 when the session is not in the trace).
pub fn run(settings: ReplaySettings) -> anyhow::Result<i32> {
    // Agents' trace directories and segment files, and collectors' stores (forwarded traces).
    let (stores, traces): (Vec<PathBuf>, Vec<PathBuf>) =
        settings.traces.iter().cloned().partition(|p| p.is_dir() && reader::is_collector_store(p));
    let all_files = if traces.is_empty() { Vec::new() } else { reader::expand(&traces)? };
    let mut sources: Vec<Source> =
        select_segments(all_files.clone(), settings.session.as_deref()).into_iter().map(Source::File).collect();
    for store in &stores {
        let runs = reader::from_collector_store(store)?;
        if runs.is_empty() {
            anyhow::bail!(
                "{}: this collector store holds no session traces (agents send them with --trace-output)",
                store.display()
            );
        }
        sources.extend(runs.into_iter().map(|(name, bytes)| Source::Bytes(name, bytes)));
    }
    let mut progress = Progress::new(&all_files);
    let detail = if settings.format == Format::Ocsf { Detail::Alerts } else { Detail::Timeline };
    let report = replay_sources(sources, settings.policy.as_ref(), detail, &mut progress)?;
    progress.done();
    for damage in &report.damage {
        eprintln!("warning: {damage}");
    }
    let report = match &settings.session {
        Some(id) => match report.only_session(id) {
            Ok(r) => r,
            Err(mut known) => {
                // Runs left out by their index still name their sessions there.
                for file in &all_files {
                    if let Some(index) = read_index(file) {
                        known.extend(index.sessions.into_keys());
                    }
                }
                known.sort();
                known.dedup();
                if known.is_empty() {
                    eprintln!("error: no session {id} in the trace: it holds no sessions");
                } else {
                    eprintln!("error: no session {id} in the trace; sessions in it: {}", known.join(", "));
                }
                return Ok(2);
            }
        },
        None => report,
    };
    let text = match settings.format {
        Format::Timeline => timeline::render(&report, color_for(&settings.output)),
        Format::Json => serde_json::to_string_pretty(&report)? + "\n",
        Format::Ocsf => {
            let mut out = String::new();
            for alert in report.sessions.iter().flat_map(|s| &s.alerts) {
                out.push_str(&serde_json::to_string(&crate::encode::ocsf::finding(alert))?);
                out.push('\n');
            }
            out
        }
        Format::Html => html::render(&report),
    };
    match &settings.output {
        Some(path) => std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(0)
}

fn color_for(output: &Option<PathBuf>) -> bool {
    output.is_none() && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// How much a replay builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Sessions, process trees, timelines and alerts.
    Timeline,
    /// Sessions and alerts (OCSF output, the determinism check).
    Alerts,
}

/// Replays segment files in order. Pure apart from reading the files. Reading and decoding run
/// on their own thread, ahead of the engine, in batches.
pub fn replay_files(
    files: &[PathBuf],
    policy: Option<&Policy>,
    detail: Detail,
    progress: &mut Progress,
) -> anyhow::Result<Report> {
    replay_sources(files.iter().cloned().map(Source::File).collect(), policy, detail, progress)
}

/// Where trace records come from: a segment file, or a segment assembled in memory.
pub enum Source {
    File(PathBuf),
    Bytes(PathBuf, Vec<u8>),
}

fn replay_sources(
    sources: Vec<Source>,
    policy: Option<&Policy>,
    detail: Detail,
    progress: &mut Progress,
) -> anyhow::Result<Report> {
    enum Msg {
        Records(Vec<Record>),
        Damage(Damage),
        At(u64),
        FileDone,
    }
    const BATCH: usize = 4096;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(8);
    let decoder = std::thread::spawn(move || -> Result<(), reader::TraceError> {
        for source in &sources {
            let mut batch = Vec::with_capacity(BATCH);
            let mut on_record = |record| {
                batch.push(record);
                if batch.len() == BATCH {
                    let _ = tx.send(Msg::Records(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))));
                }
            };
            let mut damage = Vec::new();
            let mut at = 0;
            match source {
                Source::File(file) => {
                    reader::read_segment(file, &mut on_record, &mut |d| damage.push(d), &mut |a| at = a)?
                }
                Source::Bytes(name, bytes) => {
                    reader::read_bytes(name, bytes, &mut on_record, &mut |d| damage.push(d), &mut |a| at = a)?
                }
            }
            let _ = tx.send(Msg::Records(batch));
            for d in damage {
                let _ = tx.send(Msg::Damage(d));
            }
            let _ = tx.send(Msg::At(at));
            let _ = tx.send(Msg::FileDone);
        }
        Ok(())
    });
    let mut replay = Replay::new(policy, detail == Detail::Timeline);
    for msg in rx {
        match msg {
            Msg::Records(records) => {
                for record in records {
                    replay.record(record);
                }
            }
            Msg::Damage(d) => replay.damage.push(d),
            Msg::At(at) => progress.at(at),
            Msg::FileDone => progress.file_done(),
        }
    }
    decoder.join().map_err(|_| anyhow::anyhow!("the trace decoder thread panicked"))??;
    Ok(replay.finish())
}

/// The replay state: one engine per agent run, the sessions found, live and replayed alerts.
struct Replay<'p> {
    policy: Option<&'p Policy>,
    run_id: Option<String>,
    /// Counts agent runs met so far: session keys are per run.
    run: usize,
    engine: Engine,
    /// (run, key) -> index in `sessions`.
    keys: HashMap<(usize, SessionKey), usize>,
    sessions: Vec<SessionReport>,
    /// pid -> what is known of it in the current run, to name the actor of an event.
    procs: report::Names,
    live: Vec<Alert>,
    replayed: Vec<Alert>,
    damage: Vec<Damage>,
    events: u64,
    /// Build process trees and timelines (not needed for alert-only output).
    timeline: bool,
}

impl<'p> Replay<'p> {
    fn new(policy: Option<&'p Policy>, timeline: bool) -> Self {
        Self {
            timeline,
            policy,
            run_id: None,
            run: 0,
            engine: Engine::new(EngineConfig::default()),
            keys: HashMap::new(),
            sessions: Vec::new(),
            procs: HashMap::new(),
            live: Vec::new(),
            replayed: Vec::new(),
            damage: Vec::new(),
            events: 0,
        }
    }

    fn record(&mut self, record: Record) {
        match record {
            Record::Run(run) => {
                if self.run_id.as_deref() != Some(run.run_id.as_str()) {
                    // A new agent run: fresh engine state, session keys start again.
                    let config = match self.policy {
                        Some(p) => EngineConfig::from_policy(p),
                        None => run.config,
                    };
                    self.engine = Engine::new(config);
                    self.procs.clear();
                    self.run_id = Some(run.run_id);
                    self.run += 1;
                }
            }
            Record::Alert(traced) => {
                let mut alert = traced.alert;
                alert.ts = traced.ts;
                self.live.push(alert);
            }
            Record::Event(event) => self.event(event),
        }
    }

    fn event(&mut self, mut event: Event) {
        self.events += 1;
        if self.policy.is_some() && matches!(event, Event::PolicyReloaded { .. }) {
            // What-if: the given policy holds for the whole replay, not the one reloaded live.
            return;
        }
        let run = self.run;
        if let Event::SessionStarted { key, session, ts } = &mut event {
            if let Some(policy) = self.policy {
                report::apply_actor_scope(session, policy);
            }
            self.keys.insert((run, *key), self.sessions.len());
            let run_id = self.run_id.clone().unwrap_or_default();
            self.sessions.push(SessionReport::new(&run_id, run, *key, session, *ts));
        }
        if self.timeline {
            // Names for timeline lines only.
            self.learn_process(&event);
        }
        let alerts = self.engine.handle(&event);
        let own = event.session_key().and_then(|k| self.keys.get(&(run, k)).copied());
        if let (Some(index), true) = (own, self.timeline) {
            self.sessions[index].apply(&event, &self.procs);
        }
        // A timeline line only for what a session's report shows: its own events, and events
        // of other processes that raised an alert about it.
        let mut entry = match (own, alerts.is_empty(), self.timeline) {
            (_, _, false) | (None, true, _) => None,
            _ => report::entry(event, &self.procs),
        };
        if let Some(index) = own {
            if let Some(e) = entry.take() {
                self.sessions[index].timeline.push(e);
            }
        }
        for alert in alerts {
            let target = self.sessions.iter().rposition(|s| s.run == run && s.session.id.as_str() == alert.session.id);
            if let Some(index) = target {
                let session = &mut self.sessions[index];
                if !self.timeline {
                    // Alerts only.
                } else if own == Some(index) {
                    // The event is already in this session's timeline: mark it.
                    session.mark_last(&alert);
                } else {
                    let e = entry.clone().unwrap_or_else(|| report::alert_entry(&alert));
                    session.push_entry(e, Some(&alert));
                }
                session.alerts.push(alert.clone());
            }
            self.replayed.push(alert);
        }
    }

    fn learn_process(&mut self, event: &Event) {
        match event {
            Event::ProcessSeen(p) => {
                self.procs.insert(p.pid, (p.exe.as_str().into(), p.ppid));
            }
            Event::Fork(f) => {
                let exe = self.procs.get(&f.parent).map(|(e, _)| e.clone()).unwrap_or_else(|| "".into());
                self.procs.insert(f.child, (exe, f.parent));
            }
            Event::Exec(e) => {
                self.procs.insert(e.pid, (e.exe.as_str().into(), e.ppid));
            }
            _ => {}
        }
    }

    fn finish(mut self) -> Report {
        // Kernel events reach the engine a little after control-plane ones (the ring buffer is
        // drained on a timer): responders read the timeline in time order.
        for session in &mut self.sessions {
            session.timeline.sort_by_key(|e| e.ts);
        }
        let comparison = Comparison::new(&self.live, &self.replayed, self.policy.is_some());
        Report {
            events: self.events,
            sessions: self.sessions,
            damage: self.damage.iter().map(|d| d.to_string()).collect(),
            comparison,
        }
    }
}

/// With `--session`, the runs whose sealed segments all say (in their index) that they hold
/// nothing of that session are left out. Segments without an index (the one being written) are
/// always read.
fn select_segments(files: Vec<PathBuf>, session: Option<&str>) -> Vec<PathBuf> {
    let Some(session) = session else { return files };
    let mut runs: BTreeMap<String, (bool, Vec<PathBuf>)> = BTreeMap::new();
    let mut order = Vec::new();
    for file in files {
        let run = run_of(&file);
        let index = read_index(&file);
        let needed = index.is_none_or(|i| i.sessions.contains_key(session));
        if !runs.contains_key(&run) {
            order.push(run.clone());
        }
        let entry = runs.entry(run).or_default();
        entry.0 |= needed;
        entry.1.push(file);
    }
    order.into_iter().filter_map(|run| runs.remove(&run)).filter(|(needed, _)| *needed).flat_map(|(_, f)| f).collect()
}

fn read_index(segment: &Path) -> Option<SegmentIndex> {
    std::fs::read(index_path(segment)).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok())
}

/// The run id in a segment's name (`trace-<run>-<seq>.mtr`), or the whole name.
fn run_of(file: &Path) -> String {
    let name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    name.strip_prefix("trace-").and_then(|r| r.rsplit_once('-')).map_or(name.clone(), |(run, _)| run.to_string())
}

/// Progress on stderr for long replays, when stderr is a terminal.
pub struct Progress {
    enabled: bool,
    total: u64,
    done: u64,
    current: u64,
    last_shown: std::time::Instant,
}

impl Progress {
    pub fn new(files: &[PathBuf]) -> Self {
        let total = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
        // Only worth showing for traces that take a while.
        let enabled = std::io::stderr().is_terminal() && total > 16 << 20;
        Self { enabled, total, done: 0, current: 0, last_shown: std::time::Instant::now() }
    }

    /// No progress output (tests, benchmarks).
    pub fn quiet() -> Self {
        Self { enabled: false, total: 0, done: 0, current: 0, last_shown: std::time::Instant::now() }
    }

    fn at(&mut self, at: u64) {
        self.current = at;
        if self.enabled && self.last_shown.elapsed() > std::time::Duration::from_millis(200) {
            self.last_shown = std::time::Instant::now();
            let read = self.done + self.current;
            eprint!(
                "\rreplaying: {:.0} of {:.0} MiB ({:.0}%)",
                read as f64 / 1048576.0,
                self.total as f64 / 1048576.0,
                100.0 * read as f64 / self.total.max(1) as f64
            );
        }
    }

    fn file_done(&mut self) {
        self.done += self.current;
        self.current = 0;
    }

    fn done(&mut self) {
        if self.enabled {
            eprintln!("\rreplaying: done ({:.0} MiB)                ", self.total as f64 / 1048576.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{Creds, EndReason, Exec, Exit},
        sessions::Session,
        trace::{RunInfo, TraceLimits, TraceWriter},
    };

    const S: u64 = 1_000_000_000;

    fn session() -> Session {
        Session::example(Some(&["/bin/sh"]), S, 100)
    }

    fn exec(ts: u64, pid: u32, exe: &str) -> Event {
        Event::Exec(Exec {
            ts,
            session: 1,
            pid,
            ppid: 100,
            sid: None,
            exe: exe.into(),
            exe_real: None,
            argv: vec![exe.into(), "--flag".into()],
            argv_truncated: false,
            creds: Creds::default(),
            cgroup: 1,
            cap_effective: None,
        })
    }

    /// Records like the agent's core: each event, then the alerts the engine raised on it.
    fn record(dir: &Path, events: &[Event]) {
        let run = RunInfo {
            run_id: "r1".into(),
            host: "h".into(),
            agent_version: "t".into(),
            config: EngineConfig::default(),
        };
        let mut writer =
            TraceWriter::create(dir, TraceLimits { segment_bytes: 600, ..Default::default() }, run, None).unwrap();
        let mut engine = Engine::new(EngineConfig::default());
        for e in events {
            writer.event(e).unwrap();
            for alert in engine.handle(e) {
                writer.alert(&alert).unwrap();
            }
        }
    }

    #[test]
    fn a_recorded_session_replays_to_the_same_alerts_and_a_timeline() {
        let dir = std::env::temp_dir().join(format!("monitor-replay-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let events = vec![
            Event::SessionStarted { ts: 0, key: 1, session: Box::new(session()) },
            exec(S, 100, "/bin/sh"),
            exec(2 * S, 101, "/usr/bin/wget"),
            Event::Exit(Exit { ts: 3 * S, session: 1, pid: 101, exit_code: 0 }),
            Event::SessionEnded { ts: 4 * S, key: 1, reason: EndReason::Requested },
            Event::Tick { ts: 6 * S },
        ];
        record(&dir, &events);
        let files = reader::expand(std::slice::from_ref(&dir)).unwrap();
        assert!(files.len() > 1, "600-byte segments rotate");
        let report = replay_files(&files, None, Detail::Timeline, &mut Progress::quiet()).unwrap();
        assert!(report.comparison.identical() && report.comparison.live == 2, "{:?}", report.comparison);
        let text = timeline::render(&report, false);
        assert!(text.contains("delegation  alice@example.com → svc:bot"), "{text}");
        assert!(text.contains("!! exec_out_of_scope (medium)"), "{text}");
        assert!(text.contains("!! process_outlived_task"), "{text}");
        assert!(text.contains("replay: 2 alerts, the same as the 2 raised live"), "{text}");
        let html = html::render(&report);
        assert!(html.contains("<h2>Session t-1") && html.contains("class=\"alert\""));
        assert!(report.only_session("nope").unwrap_err() == ["t-1"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
