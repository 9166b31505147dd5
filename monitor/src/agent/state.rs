//! Sessions that survive an agent restart or upgrade. The agent keeps in its state directory
//! (`--state-dir`, default /var/lib/monitor/state, 0700) what it needs to take its sessions
//! over: each session as resolved (scope, token fingerprints, binding), its start and end, its
//! processes alive (pid and kernel start time, so a reused pid is not taken for one), its tokens'
//! kernel hashes and the seed they were made with (never a token value). A new agent adopts them
//! before it serves its control socket: the engine gets them with their own times, the kernel
//! their policy and bindings (the processes still alive and their descendants now), and a
//! `monitor_blind` alert says how long no agent was looking. `--fresh` starts without them.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::control::ControlPlane;
use crate::engine::Adoptable;
use crate::event::SessionKey;
use crate::sessions::bind;

/// The state file's format; another one is refused (start with `--fresh`, or the matching agent).
pub const STATE_VERSION: u32 = 1;
const STATE_FILE: &str = "sessions.json";
/// Touched every second while nothing else changes: when the agent was last alive.
const HEARTBEAT: &str = "heartbeat";
/// How often the state is written while it changes.
const SAVE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SavedState {
    pub version: u32,
    /// When it was written (ns since the epoch): the agent was not looking from then on.
    pub saved_ns: u64,
    /// The seed the token hashes were made with (the kernel looks for those hashes).
    pub seed: u64,
    pub sessions: Vec<SavedSession>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SavedSession {
    #[serde(flatten)]
    pub session: Adoptable,
    /// Kernel hash and fingerprint of each token.
    pub tokens: Vec<(u64, String)>,
    pub paths: Vec<String>,
    /// The kernel start time (clock ticks since boot) of each pid in `session.pids`.
    pub start_times: Vec<u64>,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// The state a previous agent left, if any; an unreadable or foreign one is an error that says
/// what to do.
pub fn load(dir: &Path) -> Result<Option<SavedState>, String> {
    let file = path(dir);
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", file.display())),
    };
    let version = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| format!("{}: not a state file ({e}); start with --fresh to discard it", file.display()))?
        ["version"]
        .as_u64();
    if version != Some(STATE_VERSION as u64) {
        return Err(format!(
            "{}: state format {} is not this agent's ({STATE_VERSION}); start with --fresh to discard it",
            file.display(),
            version.map_or("unknown".to_string(), |v| v.to_string())
        ));
    }
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| format!("{}: {e}; start with --fresh to discard it", file.display()))
}

/// Writes the state atomically (a synced temporary file renamed over the old one).
pub fn save(dir: &Path, state: &SavedState) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::PermissionsExt as _};
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(state).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path(dir))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Keeps the state file current: written whenever what it holds changed. The engine and the
/// credential index each say when something did (a generation number), so an idle agent with
/// thousands of sessions does not gather and compare them every second.
pub async fn keep(plane: ControlPlane, dir: PathBuf) {
    let mut last: Option<(u64, u64)> = None;
    // What was written last, as a digest: a copy of thousands of sessions would double the
    // agent's memory for them.
    let mut saved: Option<u64> = None;
    // Kernel start time of each pid saved last time: read from /proc once per process.
    let mut start_times: HashMap<u32, u64> = HashMap::new();
    let mut interval = tokio::time::interval(SAVE_EVERY);
    loop {
        interval.tick().await;
        let credentials = plane.credentials.generation();
        let Ok(answer) = plane.core.adoptable(last.map(|(engine, _)| engine)).await else { return };
        let (engine, adoptable) = match answer {
            Some(fresh) => fresh,
            None if last.is_some_and(|(_, c)| c == credentials) => {
                // Unchanged: only say the agent is still alive (no sync: a lost beat costs a second).
                let _ = std::fs::write(dir.join(HEARTBEAT), b"");
                continue;
            }
            None => match plane.core.adoptable(None).await {
                Ok(Some(fresh)) => fresh,
                _ => return,
            },
        };
        let mut kept: HashMap<u32, u64> = HashMap::new();
        let sessions: Vec<SavedSession> = adoptable
            .into_iter()
            .map(|session| {
                let (tokens, paths) = plane.credentials.session_tokens(session.key);
                let start_times = session
                    .pids
                    .iter()
                    .map(|p| {
                        let t = start_times.get(p).copied().or_else(|| bind::start_time(*p)).unwrap_or(0);
                        kept.insert(*p, t);
                        t
                    })
                    .collect();
                SavedSession { session, tokens, paths, start_times }
            })
            .collect();
        start_times = kept;
        let digest = digest(&sessions);
        if saved == Some(digest) {
            last = Some((engine, credentials));
            let _ = std::fs::write(dir.join(HEARTBEAT), b"");
            continue;
        }
        let state = SavedState {
            version: STATE_VERSION,
            saved_ns: crate::host::now_ns(),
            seed: plane.credentials.seed(),
            sessions,
        };
        match save(&dir, &state) {
            Ok(()) => {
                last = Some((engine, credentials));
                saved = Some(digest);
            }
            Err(e) => tracing::error!(dir = %dir.display(), "writing the session state: {e}"),
        }
    }
}

/// The processes a previous agent's pinned map binds to the sessions adopted, by session: those
/// still alive that are the processes bound (same pid, same start: a pid reused since is another
/// process). Every other entry is removed, and cgroup bindings of sessions not adopted.
fn pinned_processes(
    maps: &mut crate::probes::KernelMaps,
    state: &SavedState,
) -> Result<HashMap<SessionKey, Vec<u32>>, String> {
    let keys: std::collections::HashSet<SessionKey> = state.sessions.iter().map(|s| s.session.key).collect();
    let (procs, cgroups) = maps.bindings();
    let mut kept: HashMap<SessionKey, Vec<u32>> = HashMap::new();
    let mut dropped = Vec::new();
    for (pid, binding) in procs {
        if keys.contains(&binding.session) && bind::started_as_bound(pid, &binding) {
            kept.entry(binding.session).or_default().push(pid);
        } else {
            dropped.push(pid);
        }
    }
    let stale_cgroups: Vec<u64> =
        cgroups.into_iter().filter(|(_, key)| !keys.contains(key)).map(|(id, _)| id).collect();
    tracing::info!(
        processes = kept.values().map(Vec::len).sum::<usize>(),
        dropped = dropped.len(),
        stale_cgroups = stale_cgroups.len(),
        "bindings taken from the pinned maps"
    );
    maps.unbind(&dropped, &stale_cgroups).map_err(|e| e.to_string())?;
    Ok(kept)
}

/// Empties pinned binding maps that no session takes over (no state, or `--fresh`).
pub fn clear_bindings(maps: &mut crate::probes::KernelMaps) -> Result<(), String> {
    let (procs, cgroups) = maps.bindings();
    let pids: Vec<u32> = procs.into_iter().map(|(pid, _)| pid).collect();
    let cgroups: Vec<u64> = cgroups.into_iter().map(|(id, _)| id).collect();
    if !pids.is_empty() || !cgroups.is_empty() {
        tracing::info!(processes = pids.len(), cgroups = cgroups.len(), "pinned bindings of no session removed");
    }
    maps.unbind(&pids, &cgroups).map_err(|e| e.to_string())
}

/// A digest of the sessions as they would be written (not a security boundary: it only saves
/// rewriting an unchanged file).
fn digest(sessions: &[SavedSession]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(sessions).unwrap_or_default().hash(&mut hasher);
    hasher.finish()
}

/// When the previous agent was last known to be running (its last write, or heartbeat).
fn last_alive(dir: &Path, state: &SavedState) -> u64 {
    let heartbeat = std::fs::metadata(dir.join(HEARTBEAT))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    state.saved_ns.max(heartbeat)
}

/// Takes over the sessions a previous agent left, before the control socket is served; with
/// `pinned`, the kernel's binding maps are that agent's (probes/pins.rs) and their entries are
/// checked. Returns how many it adopted.
/// Sessions named in the alert that says how long no agent ran.
const NAMED_IN_BLIND: usize = 20;

/// Sessions whose names and processes go to the engine together at adoption.
const ADOPT_BATCH: usize = 256;

/// A saved session's processes still alive (same pid, same start: not a reused pid), those the
/// pinned map still had, and what they started while no agent was looking.
fn adopted_processes(saved: &SavedSession, pinned_roots: Vec<u32>) -> Vec<u32> {
    let saved_roots = saved
        .session
        .pids
        .iter()
        .zip(&saved.start_times)
        .filter(|(pid, started)| !pinned_roots.contains(pid) && bind::start_time(**pid) == Some(**started))
        .map(|(pid, _)| *pid)
        .collect::<Vec<_>>();
    let mut pids: Vec<u32> = Vec::new();
    for root in pinned_roots.into_iter().chain(saved_roots) {
        if !pids.contains(&root) {
            for p in bind::descendants(root).unwrap_or_default() {
                if !pids.contains(&p) {
                    pids.push(p);
                }
            }
        }
    }
    pids
}

/// `f` of each item, in order, the items shared out over the machine's cores (scoped threads:
/// this runs once, at start, before anything else needs them).
fn on_all_cores<T: Sync, R: Send>(items: Vec<T>, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let share = items.len().div_ceil(cores).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> =
            items.chunks(share).map(|chunk| scope.spawn(|| chunk.iter().map(&f).collect::<Vec<R>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    })
}

pub async fn adopt(plane: &ControlPlane, dir: &Path, state: SavedState, pinned: bool) -> Result<usize, String> {
    let now = crate::host::now_ns();
    let down_since = last_alive(dir, &state);
    let count = state.sessions.len();
    if count == 0 {
        if pinned {
            clear_bindings(&mut *plane.maps.lock().await)?;
        }
        return Ok(0);
    }
    // The alert names the first sessions and counts the rest: a node's thousands of ids in one
    // summary would be unreadable (and 100 KB in every sink).
    let mut ids: Vec<String> =
        state.sessions.iter().take(NAMED_IN_BLIND).map(|s| s.session.session.id.to_string()).collect();
    if count > NAMED_IN_BLIND {
        ids.push(format!("and {} more", count - NAMED_IN_BLIND));
    }
    let source = format!(
        "no agent was running for {:.1} s before this one took over sessions {}: their events in that time were not seen",
        now.saturating_sub(down_since) as f64 / 1e9,
        ids.join(", ")
    );
    plane.core.adopt(state.sessions.iter().map(|s| s.session.clone()).collect(), Some(source)).await;
    for s in &state.sessions {
        plane.credentials.add_session(s.session.key, s.tokens.clone(), s.paths.clone());
        plane.token_files.adopt(s.session.key, s.session.session.tokens.iter().map(|t| t.source.as_str()));
    }
    let mut maps = plane.maps.lock().await;
    let tokens_known = maps.sync_token_hashes(plane.credentials.seed(), &plane.credentials.token_hashes());
    crate::credentials::watch::refresh(&plane.credentials, &mut maps, &plane.policy.get().credentials.watch);
    {
        let mut probes = plane.probes.lock().unwrap_or_else(|p| p.into_inner());
        probes.set_sessions_running(true);
        probes.set_tokens_known(tokens_known);
    }
    // The hosts file is read once for every session, and the engine gets the sessions' names
    // and processes a batch at a time, before the kernel binds them (so their first events find
    // them known): thousands adopt in well under a second. Batches keep what is built for the
    // engine small and short-lived, so the sessions' records are not left among the holes of
    // one large build (10,000 sessions adopted in one batch left 5 MB more resident).
    let hosts = crate::sessions::hosts::names(Path::new("/etc/hosts"), 0, now);
    let mut in_pinned_map = if pinned { pinned_processes(&mut maps, &state)? } else { HashMap::new() };
    for batch in state.sessions.chunks(ADOPT_BATCH) {
        let mut names = Vec::new();
        let mut seen = Vec::new();
        // Per session: its processes, and those of them the pinned map binds already.
        let pinned_in_batch: Vec<Vec<u32>> =
            batch.iter().map(|saved| in_pinned_map.remove(&saved.session.key).unwrap_or_default()).collect();
        // The /proc reads (a dozen per process) on every core.
        let read = on_all_cores(batch.iter().zip(&pinned_in_batch).collect(), |(saved, pinned_here)| {
            let pids = adopted_processes(saved, pinned_here.to_vec());
            let snapshots = super::control::snapshots(plane, &pids, saved.session.key, now);
            (pids, snapshots)
        });
        let mut bound: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
        for ((saved, pinned_here), (pids, snapshots)) in batch.iter().zip(pinned_in_batch).zip(read) {
            let key = saved.session.key;
            names.extend(hosts.iter().cloned().map(|n| crate::event::Resolve { session: key, ..n }));
            seen.extend(snapshots);
            bound.push((pids, pinned_here));
        }
        plane.core.names(names).await;
        plane.core.seen(seen).await;
        for (saved, (pids, pinned_here)) in batch.iter().zip(bound) {
            let (a, key) = (&saved.session, saved.session.key);
            let expires_at = plane.clock.boot(a.started.saturating_add(a.session.ttl_ns));
            let session_names: Vec<_> =
                hosts.iter().cloned().map(|n| crate::event::Resolve { session: key, ..n }).collect();
            super::control::install_scope(plane, &mut maps, key, &a.session, &session_names, expires_at)?;
            if a.ended.is_some() {
                maps.mark_ended(key);
            }
            // Entries the pinned map holds (checked above) stay as the kernel stamped them.
            let unbound: Vec<u32> = pids.iter().copied().filter(|p| !pinned_here.contains(p)).collect();
            maps.bind_pids(&unbound, key).map_err(|e| e.to_string())?;
            if let Some(cgroup) = &a.session.binding.cgroup {
                super::control::bind_cgroup(plane, &mut maps, key, cgroup, now).await?;
            }
            tracing::debug!(session = %a.session.id, key, processes = pids.len(), "session adopted from the previous agent");
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("monitor-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_saved_state_loads_back_and_a_foreign_one_is_refused() {
        let d = dir("roundtrip");
        assert_eq!(load(&d), Ok(None), "no state: a first start");
        let state = SavedState { version: STATE_VERSION, saved_ns: 7, seed: 42, sessions: vec![] };
        save(&d, &state).unwrap();
        assert_eq!(load(&d).unwrap(), Some(state));
        std::fs::write(path(&d), r#"{"version": 99, "sessions": []}"#).unwrap();
        let e = load(&d).unwrap_err();
        assert!(e.contains("state format 99 is not this agent's (1)") && e.contains("--fresh"), "{e}");
        std::fs::write(path(&d), "{not json").unwrap();
        let e = load(&d).unwrap_err();
        assert!(e.contains("not a state file") && e.contains("--fresh"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
