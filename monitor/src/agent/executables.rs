//! Probes the TLS code linked into executables (Go's crypto/tls, a static OpenSSL). Two ways in:
//! - at start, the executables of the processes already running and those under the tool
//!   directories (probes/executables.rs: DEFAULT_DIRS and the policy's `tls.executable_dirs`),
//!   so a tool's first request finds its probe in place;
//! - while a session runs or sessions' tokens are looked for, every executable the exec probe
//!   reports as new, looked at when it first runs (with nothing watched the exec probe does not
//!   look, so that an exec costs other processes nothing; the running processes' executables are
//!   looked at again when a session starts). Attaching a
//!   uprobe takes the kernel ~10-20 ms (measured: perf_event_open), so a program that is not in
//!   those directories and makes its first request sooner than that after its very first exec
//!   on the host sends that request unseen; every later run is seen.
//!
//! Files are read off the async threads (a Go binary's symbol table is megabytes), each once.

use std::{collections::HashSet, fs::File, path::PathBuf, sync::Arc};

use tokio::sync::mpsc;

use crate::probes::{
    executables::{self, FileId},
    Probes,
};

/// Executables probed at most: each attachment is a kernel uprobe and a descriptor.
const MAX_PROBED: usize = 1024;
/// New executables waiting to be looked at; past this the reader reports them as lost.
pub const QUEUE: usize = 1024;

/// An executable the exec probe saw for the first time.
#[derive(Debug)]
pub struct NewExecutable {
    pub pid: u32,
    pub file: FileId,
    pub filename: String,
}

pub async fn run(
    probes: Arc<std::sync::Mutex<Probes>>,
    mut policy: tokio::sync::watch::Receiver<Arc<crate::policy::Policy>>,
    mut new: mpsc::Receiver<NewExecutable>,
    rescan: Arc<tokio::sync::Notify>,
) {
    let mut state = State { probes, seen: HashSet::new(), probed: 0 };
    let mut extra_dirs = policy.borrow_and_update().tls.executable_dirs.clone();
    let dirs = extra_dirs.clone();
    let state_at_start = tokio::task::spawn_blocking(move || {
        state.probe_at_start(&dirs);
        state
    })
    .await;
    let Ok(mut state) = state_at_start else { return };
    loop {
        let exe = tokio::select! {
            exe = new.recv() => match exe {
                Some(exe) => exe,
                None => return,
            },
            Ok(()) = policy.changed() => {
                // A reload: directories it adds are looked through now (what was probed stays).
                let dirs = policy.borrow_and_update().tls.executable_dirs.clone();
                if dirs == extra_dirs {
                    continue;
                }
                extra_dirs = dirs.clone();
                state = match tokio::task::spawn_blocking(move || {
                    state.probe_dirs(&dirs, false);
                    state
                })
                .await
                {
                    Ok(state) => state,
                    Err(_) => return,
                };
                continue;
            }
            () = rescan.notified() => {
                // A session started: the execs made while nothing was watched reported nothing.
                state = match tokio::task::spawn_blocking(move || {
                    state.probe_running();
                    state
                })
                .await
                {
                    Ok(state) => state,
                    Err(_) => return,
                };
                continue;
            }
        };
        // The kernel reports a file again after its LRU forgot it: looked at once all the same.
        if state.seen.contains(&exe.file) {
            continue;
        }
        state = match tokio::task::spawn_blocking(move || {
            if let Some((file, _)) = executables::open(exe.pid, &exe.filename, exe.file) {
                // Logged by the name it was exec'd with, not the /proc path it was read through.
                state.probe(exe.file, &file, std::path::Path::new(&exe.filename));
            } else {
                tracing::debug!(pid = exe.pid, filename = exe.filename, "executable gone before it was looked at");
            }
            state
        })
        .await
        {
            Ok(state) => state,
            Err(_) => return,
        };
    }
}

struct State {
    probes: Arc<std::sync::Mutex<Probes>>,
    seen: HashSet<FileId>,
    probed: usize,
}

impl State {
    /// The executables of running processes, then those in the tool directories.
    fn probe_at_start(&mut self, extra_dirs: &[PathBuf]) {
        self.probe_running();
        self.probe_dirs(extra_dirs, true);
    }

    /// The executables in the tool directories (the defaults with `extra_dirs`, or those alone)
    /// not looked at yet.
    fn probe_dirs(&mut self, extra_dirs: &[PathBuf], with_defaults: bool) {
        let started = std::time::Instant::now();
        let defaults = executables::DEFAULT_DIRS.iter().filter(|_| with_defaults).map(PathBuf::from);
        let dirs: Vec<PathBuf> = defaults.chain(extra_dirs.iter().cloned()).collect();
        let candidates = executables::candidates(&dirs);
        let looked_at = candidates.len();
        for (path, id) in candidates {
            if self.seen.contains(&id) {
                continue;
            }
            match File::open(&path) {
                Ok(file) => self.probe(id, &file, &path),
                Err(e) => tracing::debug!(path = %path.display(), "not looked at: {e}"),
            }
        }
        super::memory::give_back();
        tracing::info!(
            took = ?started.elapsed(),
            looked_at,
            probed = self.probed,
            "executables with their own TLS code probed in advance"
        );
    }

    /// The executables of the running processes not looked at yet (a stat each for the others).
    fn probe_running(&mut self) {
        let mut running = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let link = PathBuf::from(format!("/proc/{pid}/exe"));
            let Ok(file) = File::open(&link) else { continue };
            // Named by where it was run from (the link's text), opened through the link.
            let path = std::fs::read_link(&link).unwrap_or(link);
            let Ok(meta) = file.metadata() else { continue };
            use std::os::unix::fs::MetadataExt as _;
            let id = FileId { dev: crate::credentials::watch::kernel_dev(meta.dev()), ino: meta.ino() };
            running.push((id, file, path));
        }
        for (id, file, path) in running {
            if !self.seen.contains(&id) {
                self.probe(id, &file, &path);
            }
        }
    }

    /// Looks at one executable and attaches the probes it needs.
    fn probe(&mut self, id: FileId, file: &File, path: &std::path::Path) {
        self.seen.insert(id);
        let started = std::time::Instant::now();
        let inspection = match executables::inspect(file) {
            Ok(inspection) => inspection,
            Err(e) => {
                tracing::debug!(path = %path.display(), "not looked at for TLS code: {e}");
                return;
            }
        };
        if let Some(why) = &inspection.unsupported {
            tracing::warn!(path = %path.display(), "TLS requests of this executable are not seen: {why}");
        }
        if inspection.probes.is_empty() {
            return;
        }
        if self.probed >= MAX_PROBED {
            tracing::warn!(path = %path.display(), "not probed: {MAX_PROBED} executables are already");
            return;
        }
        let mut probes = self.probes.lock().unwrap_or_else(|p| p.into_inner());
        let mut attached = false;
        for p in &inspection.probes {
            match probes.attach_to_executable(p, file, path) {
                Err(crate::probes::ProbeError::NotLoaded(_)) => {}
                Ok(now) => {
                    attached = true;
                    let took = started.elapsed();
                    let symbol = p.symbol;
                    tracing::info!(path = %path.display(), symbol, offset = p.file_offset, ?took, now, "TLS probe taken");
                }
                Err(e) => tracing::warn!(path = %path.display(), symbol = p.symbol, "TLS probe not attached: {e}"),
            }
        }
        self.probed += usize::from(attached);
        if attached {
            tracing::info!(path = %path.display(), "executable probed");
        }
    }
}
