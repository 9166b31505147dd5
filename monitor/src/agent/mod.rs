//! `monitor agent`: loads the probes, serves the control socket, and runs the pipeline
//! kernel → decode → engine → sinks.

mod control;
mod core;
mod enforcer;
mod executables;
mod fleet;
pub mod memory;
mod reader;
mod reload;
mod state;
mod stats;
mod token_files;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::{mpsc, Mutex};

pub use self::{core::CoreHandle, reload::LivePolicy};
use crate::{
    alert::Alert,
    credentials::{self, CredentialIndex, Observer},
    decode::Clock,
    engine::{Engine, EngineConfig},
    probes,
    probes::KernelMaps,
    sessions::fingerprint::FingerprintKey,
    sinks::{self, OutputSpec, STOP_DRAIN},
};

/// Validated settings of `monitor agent`.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub outputs: Vec<OutputSpec>,
    pub control: PathBuf,
    pub key_file: PathBuf,
    /// `--default-ttl`/`--default-grace`: these, else the policy's `defaults` (live: a reload
    /// changes them), else the built-in ones.
    pub default_ttl: Option<Duration>,
    pub default_grace: Option<Duration>,
    /// Every session event as a JSON line, for debugging and tests.
    pub event_log: Option<PathBuf>,
    /// The cgroup v2 directory the connect hooks attach to (default: the hierarchy's root).
    pub hook_cgroup: Option<PathBuf>,
    pub policy: crate::policy::Policy,
    /// Optional probes not to attach.
    pub disabled_probes: Vec<String>,
    /// Opt-in probes to attach.
    pub enabled_probes: Vec<String>,
    /// Where forward outputs spool alerts until they are acknowledged.
    pub spool: sinks::SpoolSettings,
    /// Where session traces go, and their bounds.
    pub trace_dir: Option<PathBuf>,
    pub trace_limits: crate::trace::TraceLimits,
    /// Where trace records are also forwarded (tag `monitor.trace`).
    pub trace_output: Option<crate::forward::ForwardTarget>,
    /// Where Prometheus scrapes the agent's metrics.
    pub metrics: Option<std::net::SocketAddr>,
    /// The policy's file, re-read on SIGHUP and `monitor policy reload`.
    pub policy_path: Option<PathBuf>,
    /// Where sessions are kept across restarts (agent/state.rs); `fresh`: none adopted.
    pub state_dir: PathBuf,
    pub fresh: bool,
    /// Where the session binding maps are pinned (probes/pins.rs); None: not pinned.
    pub pin_dir: Option<PathBuf>,
    /// This host's name in alerts and on the fleet watchlist (`--host-name`).
    pub host_name: String,
    /// The fleet watchlist (`--fleet`), if on.
    pub fleet: Option<crate::fleet::FleetSettings>,
}

pub async fn run(settings: AgentSettings) -> anyhow::Result<()> {
    // First, so a taken port fails the start and /healthz answers while the probes load.
    let health = crate::metrics::Health::default();
    let metrics_server = match settings.metrics {
        Some(addr) => Some(crate::metrics::serve(addr, health.clone(), || crate::metrics::get().render()).await?),
        None => None,
    };
    let key = FingerprintKey::load_or_create(&settings.key_file)
        .with_context(|| format!("fingerprint key {}", settings.key_file.display()))?;
    let key = Arc::new(key);
    let (event_tx, event_rx) = mpsc::channel(8192);
    let policy = LivePolicy::new(settings.policy.clone(), settings.policy_path.clone(), event_tx.clone());
    let sinks = sinks::open(&settings.outputs, &settings.spool, event_tx.clone())?;
    let pins = settings.pin_dir.as_deref().and_then(|dir| match probes::pins::PinDir::prepare(dir, settings.fresh) {
        Ok(pins) => Some(pins),
        Err(e) => {
            tracing::warn!(
                "session bindings not pinned ({e}): they end with this agent, and a restarted one takes sessions over from the state directory alone"
            );
            None
        }
    });
    let (loaded, probes::Handles { mut maps, events: ring, stats: stats_map, session_losses }) =
        probes::load(pins.as_ref())?;
    let pinned = pins.as_ref().is_some_and(|p| p.reused);

    // A previous agent's sessions, adopted below; their token hashes were made with its seed.
    let saved = if settings.fresh { None } else { state::load(&settings.state_dir).map_err(anyhow::Error::msg)? };
    // A fleet's agents hash tokens alike (their seed comes from the shared key), so a token
    // declared on one host is found in exec environments on the others.
    let fleet_seed = settings.fleet.as_ref().map(|_| crate::fleet::kernel_seed(&key));
    let seed = match (&saved, fleet_seed) {
        (Some(state), Some(fleet)) if state.seed != fleet => {
            tracing::warn!(
                "the adopted sessions' tokens were hashed with the previous agent's seed, not the fleet's: \
                 other hosts' tokens are not found in exec environments here until the agent starts with --fresh"
            );
            state.seed
        }
        (Some(state), _) => state.seed,
        (None, Some(fleet)) => fleet,
        (None, None) => random_seed()?,
    };
    if saved.is_none() && pinned {
        state::clear_bindings(&mut maps).map_err(anyhow::Error::msg)?;
    }
    let credentials = CredentialIndex::new(seed, file_access_watch(&settings.enabled_probes));
    let observer = Observer::new(credentials.clone(), key.clone(), policy.subscribe());
    maps.sync_token_hashes(credentials.seed(), &credentials.token_hashes());
    credentials::watch::refresh(&credentials, &mut maps, &settings.policy.credentials.watch);

    let (alert_tx, alert_rx) = mpsc::channel(4096);
    // The reader starts before any probe is attached, so no early event waits unread.
    let uid_changes = proc_connector(&settings.enabled_probes);
    let (executable_tx, executable_rx) = mpsc::channel(executables::QUEUE);
    let executables_for_sessions = executable_tx.clone();
    let (watched_tx, watched_rx) = tokio::sync::watch::channel(false);
    let mut reader =
        tokio::spawn(reader::run(ring, clock(), observer, uid_changes, executable_tx, event_tx.clone(), watched_rx));
    let mut probes =
        loaded.attach(settings.hook_cgroup.as_deref(), &settings.disabled_probes, &settings.enabled_probes)?;
    probes.tell_watched(watched_tx);
    let tokens_now_known = Arc::new(tokio::sync::Notify::new());
    probes.tell_tokens_now_known(tokens_now_known.clone());
    report(&probes.report);
    // The plaintext hook, or its stand-in on kernels that refuse it (6.1): both find a packet's
    // process through the owner its connect recorded.
    if probes.report.is_attached("tcp_egress") || probes.report.is_attached("tcp_egress_compat") {
        // Connects now record their socket's owner for the plaintext payload hook.
        let _ = maps.config.set(monitor_common::CONFIG_TCP_OWNERS, 1, 0);
    }

    let event_log = match &settings.event_log {
        Some(path) => Some(sinks::EventLog::create(path)?),
        None => None,
    };
    let stamp = Stamp::new(settings.host_name.clone());
    let engine_config = EngineConfig::from_policy(&settings.policy);
    let trace = match &settings.trace_dir {
        Some(dir) => {
            let run = crate::trace::RunInfo {
                run_id: ulid::Ulid::new().to_string(),
                host: stamp.host.clone(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                config: engine_config.clone(),
            };
            let forward = match &settings.trace_output {
                Some(target) => {
                    let spool = settings.spool.dir.join(format!("trace-{}", target.spool_name()));
                    tracing::info!(output = %target.display(), "forwarding session traces");
                    Some(crate::forward::ForwardOutput::open(
                        target.clone(),
                        spool,
                        settings.spool.max_bytes,
                        event_tx.clone(),
                    )?)
                }
                None => None,
            };
            let writer = crate::trace::TraceWriter::create(dir, settings.trace_limits.clone(), run, forward)
                .with_context(|| format!("trace directory {}", dir.display()))?;
            tracing::info!(dir = %dir.display(), "recording session traces");
            Some(writer)
        }
        None => None,
    };
    let maps = Arc::new(Mutex::new(maps));
    let (effect_tx, effect_rx) = mpsc::channel(1024);
    let (core, handle) =
        core::Core::new(Engine::new(engine_config), event_rx, alert_tx, stamp, event_log, trace, effect_tx);
    let core = tokio::spawn(core.run());
    let probes = Arc::new(std::sync::Mutex::new(probes));
    let enforcer = tokio::spawn(enforcer::run(maps.clone(), credentials.clone(), probes.clone(), effect_rx));
    let watcher = tokio::spawn(watch_credentials(credentials.clone(), maps.clone(), probes.clone(), policy.clone()));
    let sink_task = tokio::spawn(sinks::run(sinks, alert_rx));
    let stats_task = tokio::spawn(stats::run(stats_map, session_losses, event_tx));

    let stopper = handle.clone();
    let listener = control::listen(&settings.control).await?;
    let plane = control::ControlPlane {
        core: handle,
        maps,
        key,
        default_ttl: settings.default_ttl,
        default_grace: settings.default_grace,
        clock: clock(),
        policy: policy.clone(),
        credentials,
        probes: probes.clone(),
        executables: executables_for_sessions,
        token_files: Default::default(),
    };
    if let Some(state) = saved {
        // Before the socket serves: no new session races the adopted ones for a key.
        let started = std::time::Instant::now();
        let adopted = state::adopt(&plane, &settings.state_dir, state, pinned).await.map_err(anyhow::Error::msg)?;
        if adopted > 0 {
            let took = started.elapsed();
            tracing::info!(adopted, state = %settings.state_dir.display(), ?took, "sessions taken over from the previous agent");
        }
    }
    // Loading the probes (the kernel's BTF) and adopting allocated much that is free now.
    memory::give_back();
    // Only now: its first look at every running process's executable and libraries (thousands
    // of /proc reads on a node) would compete with adoption for the CPU, and it covers what the
    // adopted sessions' processes ran while no agent was looking.
    let executable_task =
        tokio::spawn(executables::run(probes.clone(), policy.subscribe(), executable_rx, tokens_now_known));
    tokio::spawn(memory::keep_lean());
    let keeper = tokio::spawn(state::keep(plane.clone(), settings.state_dir.clone()));
    let token_files = tokio::spawn(token_files::run(plane.clone()));
    if let Some(fleet) = settings.fleet.clone() {
        tracing::info!(fleet = %fleet.target, host = fleet.host, "on the fleet watchlist");
        fleet::start(fleet, Arc::new(plane.clone()))?;
    }
    let control = tokio::spawn(control::serve(listener, plane));
    let probes_seen = probes.clone();
    crate::metrics::get().on_scrape(Box::new(move |metrics| {
        metrics.set_probes(probes_seen.lock().unwrap_or_else(|p| p.into_inner()).program_states());
    }));
    health.set_ready(true);
    tracing::info!(control = %settings.control.display(), "agent ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let outcome = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = term.recv() => break Ok(()),
            _ = hangup.recv() => match policy.reload().await {
                Ok(message) => tracing::info!("{message}"),
                Err(message) => tracing::error!("{message}"),
            },
            r = &mut reader => break r.context("ring buffer reader")?.context("ring buffer reader"),
        }
    };
    tracing::info!("agent stopping");
    health.set_ready(false);
    control.abort();
    keeper.abort();
    token_files.abort();
    stats_task.abort();
    reader.abort();
    enforcer.abort();
    watcher.abort();
    executable_task.abort();
    let _ = std::fs::remove_file(&settings.control);
    drop(probes);
    // The core applies what is queued and ends; the sinks end when it drops their channel. Both
    // give their forward spools a moment to be acknowledged.
    let finished = tokio::time::timeout(STOP_DRAIN * 2 + Duration::from_secs(2), async {
        stopper.stop().await;
        let _ = core.await;
        let _ = sink_task.await;
    })
    .await;
    if finished.is_err() {
        tracing::warn!("stopping without waiting further for the core and the sinks");
    }
    if let Some(server) = metrics_server {
        server.abort();
    }
    outcome
}

/// How often the credential watch list is rescanned (files appear, rotate, disappear).
const WATCH_RESCAN: Duration = Duration::from_secs(10);

/// Rescans the credential watch list, and detaches the session-time probes once no process or
/// cgroup is bound to a session any more (session start attaches them, under the same lock).
async fn watch_credentials(
    index: Arc<CredentialIndex>,
    maps: Arc<Mutex<KernelMaps>>,
    probes: Arc<std::sync::Mutex<probes::Probes>>,
    policy: Arc<LivePolicy>,
) {
    loop {
        tokio::time::sleep(WATCH_RESCAN).await;
        // The policy's watch list as it is now: a reload takes effect here.
        let extra = policy.get().credentials.watch.clone();
        let mut maps = maps.lock().await;
        credentials::watch::refresh(&index, &mut maps, &extra);
        // Tokens sessions learnt since (see CredentialIndex::learn) are looked for in the kernel.
        let tokens_known = maps.sync_token_hashes(index.seed(), &index.token_hashes());
        let mut probes = probes.lock().unwrap_or_else(|p| p.into_inner());
        probes.set_tokens_known(tokens_known);
        maps.note_no_process_bound();
        if !maps.any_binding() {
            probes.set_sessions_running(false);
        }
    }
}

/// The fanotify group that watches credential files, unless the opt-in openat tracepoints do
/// (both would report each access twice) or this kernel has no fanotify.
fn file_access_watch(enabled_probes: &[String]) -> Option<credentials::fanotify::FileAccessWatch> {
    if enabled_probes.iter().any(|p| p.starts_with("sys_exit_open")) {
        tracing::info!("credential files watched by the openat tracepoints (--enable-probe), not fanotify");
        return None;
    }
    match credentials::fanotify::FileAccessWatch::new() {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::warn!(
                "degraded: fanotify unavailable ({e}); credential files are not watched \
                 (--enable-probe sys_exit_openat watches them through syscall tracepoints)"
            );
            None
        }
    }
}

/// The subscription to uid changes (the setuid family), unless the opt-in syscall tracepoints
/// report them.
fn proc_connector(enabled_probes: &[String]) -> Option<credentials::proc_connector::ProcConnector> {
    if enabled_probes.iter().any(|p| p.starts_with("sys_exit_set")) {
        tracing::info!("uid changes reported by the setuid-family tracepoints (--enable-probe), not the connector");
        return None;
    }
    match credentials::proc_connector::ProcConnector::subscribe() {
        Ok(connector) => Some(connector),
        Err(e) => {
            tracing::warn!(
                "degraded: no process events connector ({e}); uid changes of session processes are not seen \
                 (--enable-probe sys_exit_setuid, sys_exit_setreuid, sys_exit_setresuid see them through syscall tracepoints)"
            );
            None
        }
    }
}

/// The seed of the kernel's token hash: random per start, so its map holds nothing an attacker
/// could have precomputed.
fn random_seed() -> anyhow::Result<u64> {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(u64::from_ne_bytes(bytes))
}

fn report(report: &probes::LoadReport) {
    for p in &report.probes {
        if p.while_sessions {
            tracing::info!(probe = p.probe, attach = %p.attach, "loaded; attached while sessions or tokens need it");
        } else if p.attached {
            tracing::info!(probe = p.probe, attach = %p.attach, "attached");
        } else {
            tracing::warn!(probe = p.probe, attach = %p.attach, error = p.error.as_deref().unwrap_or(""), "degraded");
        }
    }
    if !report.missing_offsets.is_empty() {
        tracing::warn!(missing = ?report.missing_offsets, "kernel BTF lacks members: those fields are reported as unknown");
    }
}

fn clock() -> Clock {
    let read = |id| {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the valid timespec.
        unsafe { libc::clock_gettime(id, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    Clock { boot_to_wall: read(libc::CLOCK_REALTIME) - read(libc::CLOCK_BOOTTIME) }
}

/// Gives each alert its id (a ULID: unique and sortable) and the host name; an update of a
/// folded finding gets the id its first alert got.
pub struct Stamp {
    ids: ulid::Generator,
    pub host: String,
    /// The id of each finding the engine may still update, by its fold number (which only
    /// grows, so the smallest are the oldest).
    fold_ids: std::collections::BTreeMap<u64, String>,
    /// For the pod and container of an alert's process.
    cgroups: crate::k8s::CgroupPaths,
}

/// Findings whose id is remembered: far more than the engine keeps open at once.
const FOLD_IDS: usize = 16_384;

impl Stamp {
    pub fn new(host: String) -> Self {
        Self {
            ids: ulid::Generator::new(),
            host,
            fold_ids: Default::default(),
            cgroups: crate::k8s::CgroupPaths::new(
                &crate::sessions::bind::cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into()),
            ),
        }
    }

    pub fn stamp(&mut self, mut alert: Alert) -> Alert {
        let known = if alert.is_update() { self.fold_ids.get(&alert.fold).cloned() } else { None };
        alert.id = match known {
            Some(id) => id,
            None => {
                let id = self.ids.generate().map(|u| u.to_string()).unwrap_or_else(|_| ulid::Ulid::new().to_string());
                if alert.fold != 0 {
                    if self.fold_ids.len() >= FOLD_IDS {
                        self.fold_ids.pop_first();
                    }
                    self.fold_ids.insert(alert.fold, id.clone());
                }
                id
            }
        };
        alert.host = self.host.clone();
        if let Some(p) = &alert.process {
            alert.k8s = self.cgroups.path_of(p.pid, p.cgroup).and_then(|path| crate::k8s::from_cgroup_path(&path));
        }
        alert
    }
}

impl Default for Stamp {
    fn default() -> Self {
        Self::new(crate::host::hostname())
    }
}
