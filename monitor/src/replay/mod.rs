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
    sources.extend(stores.iter().cloned().map(Source::CollectorStore));
    let mut sized = all_files.clone();
    for store in &stores {
        let segments = crate::collector::store::segments(store).unwrap_or_default();
        sized.extend(segments.into_iter().map(|seg| crate::collector::store::segment_path(store, seg)));
    }
    let mut progress = Progress::new(&sized);
    // OCSF findings are written as the replay raises them; the other formats are documents
    // built from the whole report.
    let mut ocsf_out = match settings.format {
        Format::Ocsf => Some(OcsfLines::open(settings.output.as_deref(), settings.session.clone())?),
        _ => None,
    };
    let mut write_finding = |alert: &Alert| {
        if let Some(out) = &mut ocsf_out {
            out.write(alert);
        }
    };
    let (detail, stream) = match settings.format {
        Format::Ocsf => (Detail::Alerts, Some(&mut write_finding as &mut dyn FnMut(&Alert))),
        _ => (Detail::Timeline, None),
    };
    let report = replay_sources(sources, settings.policy.as_ref(), detail, stream, &mut progress)?;
    progress.done();
    if let Some(out) = ocsf_out {
        out.finish()?;
    }
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
        // Written while replaying.
        Format::Ocsf => return Ok(0),
        Format::Html => html::render(&report),
    };
    match &settings.output {
        Some(path) => std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?,
        None => std::io::stdout().write_all(text.as_bytes())?,
    }
    Ok(0)
}

/// OCSF findings, one JSON line per alert, written as they are raised (of one session with
/// `--session`). The first write error is kept and reported at the end.
struct OcsfLines {
    out: std::io::BufWriter<Box<dyn std::io::Write>>,
    session: Option<String>,
    failed: Option<std::io::Error>,
    path: Option<PathBuf>,
}

impl OcsfLines {
    fn open(path: Option<&Path>, session: Option<String>) -> anyhow::Result<Self> {
        let out: Box<dyn std::io::Write> = match path {
            Some(path) => Box::new(std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?),
            None => Box::new(std::io::stdout()),
        };
        Ok(Self { out: std::io::BufWriter::new(out), session, failed: None, path: path.map(Path::to_path_buf) })
    }

    fn write(&mut self, alert: &Alert) {
        if self.failed.is_some() || self.session.as_ref().is_some_and(|id| alert.session.id != *id) {
            return;
        }
        let written = serde_json::to_writer(&mut self.out, &crate::encode::ocsf::finding(alert))
            .map_err(std::io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"));
        self.failed = written.err();
    }

    fn finish(mut self) -> anyhow::Result<()> {
        let flushed = self.out.flush();
        let name = self.path.as_ref().map_or("standard output".to_string(), |p| p.display().to_string());
        match self.failed.take().map_or(flushed, Err) {
            Ok(()) => Ok(()),
            Err(e) => Err(anyhow::anyhow!("writing {name}: {e}")),
        }
    }
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
    replay_sources(files.iter().cloned().map(Source::File).collect(), policy, detail, None, progress)
}

/// Where trace records come from.
pub enum Source {
    /// An agent's segment file.
    File(PathBuf),
    /// A collector's store: the traces agents forwarded (`--trace-output`), streamed.
    CollectorStore(PathBuf),
}

/// Replays `sources`; with `stream`, the sessions' alerts go there as they are raised and the
/// report's sessions hold none.
fn replay_sources<'a>(
    sources: Vec<Source>,
    policy: Option<&'a Policy>,
    detail: Detail,
    stream: Option<&'a mut dyn FnMut(&Alert)>,
    progress: &mut Progress,
) -> anyhow::Result<Report> {
    enum Msg {
        Records(Vec<Record>),
        /// The following records belong to this agent run (from a collector's store, where
        /// the runs of several agents interleave).
        Run(String),
        Damage(Damage),
        At(u64),
        FileDone,
    }
    const BATCH: usize = 4096;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Msg>(8);
    let decoder = std::thread::spawn(move || -> Result<(), reader::TraceError> {
        for source in &sources {
            let mut batch = Vec::with_capacity(BATCH);
            let flush = |batch: &mut Vec<Record>| {
                let _ = tx.send(Msg::Records(std::mem::replace(batch, Vec::with_capacity(BATCH))));
            };
            let mut damage = Vec::new();
            let mut at = 0;
            match source {
                Source::File(file) => reader::read_segment(
                    file,
                    &mut |record| {
                        batch.push(record);
                        if batch.len() == BATCH {
                            flush(&mut batch);
                        }
                    },
                    &mut |d| damage.push(d),
                    &mut |a| at = a,
                )?,
                Source::CollectorStore(dir) => {
                    let mut runs = ForwardedRuns::default();
                    reader::read_collector_store(
                        dir,
                        &mut |frame| {
                            match runs.admit(dir, &frame) {
                                Admit::Duplicate => return,
                                Admit::SameRun => {}
                                Admit::OtherRun => {
                                    flush(&mut batch);
                                    let _ = tx.send(Msg::Run(frame.run_id.clone()));
                                }
                            }
                            batch.push(frame.record);
                            if batch.len() == BATCH {
                                flush(&mut batch);
                            }
                        },
                        &mut |d| damage.push(d),
                        &mut |a| at = a,
                    )?;
                    if runs.last.is_empty() {
                        return Err(reader::TraceError::NoForwardedTraces { path: dir.display().to_string() });
                    }
                    damage.append(&mut runs.missing);
                }
            }
            flush(&mut batch);
            for d in damage {
                let _ = tx.send(Msg::Damage(d));
            }
            let _ = tx.send(Msg::At(at));
            let _ = tx.send(Msg::FileDone);
        }
        Ok(())
    });
    let mut replay = Replay::new(policy, detail == Detail::Timeline, stream);
    for msg in rx {
        match msg {
            Msg::Records(records) => {
                for record in records {
                    replay.record(record);
                }
            }
            Msg::Run(run_id) => replay.switch_run(&run_id, None),
            Msg::Damage(d) => replay.damage.push(d),
            Msg::At(at) => progress.at(at),
            Msg::FileDone => progress.file_done(),
        }
    }
    decoder.join().map_err(|_| anyhow::anyhow!("the trace decoder thread panicked"))??;
    Ok(replay.finish())
}

/// The runs met in a collector's store, in the order frames were stored.
#[derive(Default)]
struct ForwardedRuns {
    /// Run -> the last frame's seq.
    last: HashMap<String, u64>,
    current: Option<String>,
    /// Frames a run's numbering says were never stored (lost before they reached the
    /// collector, or deleted with the store's oldest segments).
    missing: Vec<Damage>,
}

enum Admit {
    /// Stored twice (a resend before the store de-duplicated traces): skip.
    Duplicate,
    SameRun,
    /// A different run than the previous frame's.
    OtherRun,
}

impl ForwardedRuns {
    fn admit(&mut self, store: &Path, frame: &reader::Forwarded) -> Admit {
        let expected = self.last.get(&frame.run_id).map_or(0, |last| last + 1);
        if frame.seq < expected {
            return Admit::Duplicate;
        }
        if frame.seq > expected {
            self.missing.push(Damage {
                file: store.join(format!("run-{}", frame.run_id)),
                offset: expected,
                reason: "forwarded trace frames missing from the store (the offset and skipped count are frames)",
                skipped: frame.seq - expected,
            });
        }
        self.last.insert(frame.run_id.clone(), frame.seq);
        if self.current.as_deref() == Some(frame.run_id.as_str()) {
            Admit::SameRun
        } else {
            self.current = Some(frame.run_id.clone());
            Admit::OtherRun
        }
    }
}

/// The replay state: one engine per agent run, the sessions found, live and replayed alerts.
struct Replay<'p> {
    policy: Option<&'p Policy>,
    run_id: Option<String>,
    /// The current run's number (1, 2 … in the order runs were met): session keys are per run.
    run: usize,
    /// Runs met so far.
    runs: usize,
    engine: Engine,
    /// Runs set aside while another one's records are read: run id -> (number, engine, names).
    /// An agent's segment files hold one run each, in order; a collector's store interleaves
    /// the runs of the agents that forwarded to it at the same time.
    parked: HashMap<String, (usize, Engine, report::Names)>,
    /// (run, key) -> index in `sessions`.
    keys: HashMap<(usize, SessionKey), usize>,
    sessions: Vec<SessionReport>,
    /// pid -> what is known of it in the current run, to name the actor of an event.
    procs: report::Names,
    /// The alerts raised live and by the replay, compared as they come.
    tally: report::Tally,
    /// Where the sessions' alerts go as they are raised, instead of into their reports (OCSF
    /// output: memory does not grow with the alerts).
    stream: Option<&'p mut dyn FnMut(&Alert)>,
    damage: Vec<Damage>,
    events: u64,
    /// Build process trees and timelines (not needed for alert-only output).
    timeline: bool,
}

impl<'p> Replay<'p> {
    fn new(policy: Option<&'p Policy>, timeline: bool, stream: Option<&'p mut dyn FnMut(&Alert)>) -> Self {
        Self {
            tally: report::Tally::default(),
            stream,
            timeline,
            policy,
            run_id: None,
            run: 0,
            runs: 0,
            engine: Engine::new(EngineConfig::default()),
            parked: HashMap::new(),
            keys: HashMap::new(),
            sessions: Vec::new(),
            procs: HashMap::new(),
            damage: Vec::new(),
            events: 0,
        }
    }

    fn record(&mut self, record: Record) {
        match record {
            Record::Run(run) => self.switch_run(&run.run_id, Some(run.config)),
            Record::Alert(traced) => {
                let mut alert = traced.alert;
                alert.ts = traced.ts;
                self.tally.live(AlertKey::of(&alert));
            }
            Record::Event(event) => self.event(event),
        }
    }

    /// The following records belong to agent run `run_id`, whose engine was configured with
    /// `config` (when its run record is at hand).
    fn switch_run(&mut self, run_id: &str, config: Option<EngineConfig>) {
        if self.run_id.as_deref() == Some(run_id) {
            return;
        }
        if let Some(current) = self.run_id.take() {
            let engine = std::mem::replace(&mut self.engine, Engine::new(EngineConfig::default()));
            self.parked.insert(current, (self.run, engine, std::mem::take(&mut self.procs)));
        }
        if let Some((run, engine, procs)) = self.parked.remove(run_id) {
            (self.run, self.engine, self.procs) = (run, engine, procs);
        } else {
            // A new agent run: fresh engine state, session keys start again.
            let config = match self.policy {
                Some(p) => EngineConfig::from_policy(p),
                None => config.unwrap_or_default(),
            };
            self.engine = Engine::new(config);
            self.procs.clear();
            self.runs += 1;
            self.run = self.runs;
        }
        self.run_id = Some(run_id.to_string());
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
                match &mut self.stream {
                    Some(stream) => stream(&alert),
                    None => session.alerts.push(alert.clone()),
                }
            }
            self.tally.replayed(AlertKey::of(&alert));
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
        let comparison = self.tally.finish(self.policy.is_some());
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
        record_run(dir, "r1", events)
    }

    fn record_run(dir: &Path, run_id: &str, events: &[Event]) {
        let run = RunInfo {
            run_id: run_id.into(),
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
        record(&dir, &session_events());
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

    fn session_events() -> Vec<Event> {
        vec![
            Event::SessionStarted { ts: 0, key: 1, session: Box::new(session()) },
            exec(S, 100, "/bin/sh"),
            exec(2 * S, 101, "/usr/bin/wget"),
            Event::Exit(Exit { ts: 3 * S, session: 1, pid: 101, exit_code: 0 }),
            Event::SessionEnded { ts: 4 * S, key: 1, reason: EndReason::Requested },
            Event::Tick { ts: 6 * S },
        ]
    }

    fn replay_store(dir: &Path, detail: Detail) -> Report {
        let sources = vec![Source::CollectorStore(dir.to_path_buf())];
        replay_sources(sources, None, detail, None, &mut Progress::quiet()).unwrap()
    }

    /// A collector's store as two agents forwarding at the same time leave it: their runs'
    /// frames interleaved, one resent, and a run whose first frames never arrived.
    #[test]
    fn forwarded_runs_interleaved_in_a_collector_store_replay_each_on_its_own() {
        let base = std::env::temp_dir().join(format!("monitor-replay-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let mut runs = Vec::new();
        for run in ["r1", "r2"] {
            let dir = base.join(run);
            record_run(&dir, run, &session_events());
            let mut records = Vec::new();
            for file in reader::expand(std::slice::from_ref(&dir)).unwrap() {
                reader::read_segment(&file, &mut |r| records.push(r), &mut |d| panic!("{d}"), &mut |_| {}).unwrap();
            }
            let run_info = RunInfo {
                run_id: run.into(),
                host: "h".into(),
                agent_version: "t".into(),
                config: EngineConfig::default(),
            };
            let frames: Vec<_> = records
                .iter()
                .enumerate()
                .map(|(seq, record)| {
                    let mut frame = Vec::new();
                    crate::trace::format::encode(record, &mut frame).unwrap();
                    let forwarded = crate::trace::writer::forwarded_record(&run_info, seq as u64, 0, frame);
                    crate::collector::store::Incoming {
                        tag: crate::collector::store::TRACE_TAG.into(),
                        time_ns: 0,
                        id: Some(format!("trace:{run}:{seq}")),
                        count: 1,
                        record: forwarded.record,
                    }
                })
                .collect();
            runs.push(frames);
        }
        let mut store = crate::collector::store::Store::open(&base.join("store")).unwrap();
        let (r1, r2) = (runs[0].clone(), runs[1].clone());
        for i in 0..r1.len().max(r2.len()) {
            store.append(r1.get(i).into_iter().chain(r2.get(i)).cloned().collect()).unwrap();
        }
        drop(store);
        let report = replay_store(&base.join("store"), Detail::Timeline);
        assert!(report.comparison.identical() && report.comparison.live == 4, "{:?}", report.comparison);
        assert_eq!(report.sessions.len(), 2);
        for session in &report.sessions {
            assert_eq!(session.alerts.len(), 2, "{}", session.run_id);
            assert!(session.timeline.len() >= 4, "{}: {:?}", session.run_id, session.timeline.len());
        }
        assert!(report.damage.is_empty(), "{:?}", report.damage);

        // A third agent whose first frames were lost: the gap is reported, the rest replayed.
        let mut store = crate::collector::store::Store::open(&base.join("store")).unwrap();
        let r3: Vec<_> = runs[0]
            .iter()
            .cloned()
            .map(|mut i| {
                i.id = i.id.map(|id| id.replace("r1", "r3"));
                let mut v = rmpv::decode::read_value(&mut i.record.as_slice()).unwrap();
                if let rmpv::Value::Map(fields) = &mut v {
                    for (k, val) in fields {
                        if k.as_str() == Some("run_id") {
                            *val = "r3".into();
                        }
                    }
                }
                i.record.clear();
                rmpv::encode::write_value(&mut i.record, &v).unwrap();
                i
            })
            .collect();
        store.append(r3[3..].to_vec()).unwrap();
        drop(store);
        let report = replay_store(&base.join("store"), Detail::Alerts);
        assert_eq!(report.damage.len(), 1, "{:?}", report.damage);
        assert!(report.damage[0].contains("run-r3") && report.damage[0].contains("missing"), "{:?}", report.damage);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
