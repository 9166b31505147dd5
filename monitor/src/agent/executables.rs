//! Probes the TLS code linked into executables (Go's crypto/tls, a static OpenSSL). Two ways in:
//! - at start, the executables of the processes already running and those under the tool
//!   directories (probes/executables.rs: DEFAULT_DIRS and the policy's `tls.executable_dirs`),
//!   so a tool's first request finds its probe in place;
//! - every executable the exec probe reports as new, looked at when it first runs: a session
//!   process's always, another process's while sessions' tokens are looked for (otherwise the
//!   exec probe does not look, so that an exec costs other processes nothing). The processes a
//!   session takes in when it starts are looked at then, and the running processes' executables
//!   again when tokens start being looked for. Attaching a
//!   uprobe takes the kernel ~10-20 ms (measured: perf_event_open), so a program that is not in
//!   those directories and makes its first request sooner than that after its very first exec
//!   on the host sends that request unseen; every later run is seen.
//!
//! Shared libraries the same way: the library probes attach at start to the host's libssl,
//! GnuTLS and libc, which a container image's own copies (other files) are not. So the
//! libraries a process maps are looked at (`/proc/PID/maps`, opened through
//! `/proc/PID/map_files`, which reaches into any mount namespace) for each new executable and
//! each exec in a session, when it is reported and again shortly after (the dynamic loader maps
//! them after the exec, and `dlopen` later still, as Python does for `import ssl`); a library file
//! not seen before gets the same probes. A process outside sessions that runs a host executable
//! with a library of its own (LD_LIBRARY_PATH) is not looked at: its library is found only once
//! some session process or some new executable maps it.
//!
//! Files are read off the async threads (a Go binary's symbol table is megabytes), each once.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashSet},
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::mpsc;

use crate::probes::{
    executables::{self, FileId},
    Probes,
};

/// Executables probed at most: each attachment is a kernel uprobe and a descriptor.
const MAX_PROBED: usize = 1024;
/// New executables waiting to be looked at; past this the reader reports them as lost.
pub const QUEUE: usize = 1024;

/// Processes whose libraries wait for a later look, at most.
const LATER: usize = 4096;
/// When a process's libraries are looked at again after the first look: after the dynamic
/// loader (well within the first), after a program's start-up `dlopen`s.
const LOOK_AGAIN: [Duration; 2] = [Duration::from_millis(100), Duration::from_secs(1)];

/// What the reader asks to be looked at.
#[derive(Debug)]
pub enum Look {
    /// An executable the exec probe saw for the first time (and the libraries of the process
    /// that runs it).
    Executable { pid: u32, file: FileId, filename: String },
    /// A session process that exec'd: the libraries it maps.
    Libraries { pid: u32 },
    /// A process a session took in when it started (it exec'd before, perhaps unreported): its
    /// executable and the libraries it maps.
    Process { pid: u32 },
}

pub async fn run(
    probes: Arc<std::sync::Mutex<Probes>>,
    mut policy: tokio::sync::watch::Receiver<Arc<crate::policy::Policy>>,
    mut new: mpsc::Receiver<Look>,
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
    // (when, pid): processes whose libraries are looked at again.
    let mut later: BinaryHeap<Reverse<(tokio::time::Instant, u32)>> = BinaryHeap::new();
    loop {
        let next_later = later.peek().map(|Reverse((when, _))| *when);
        let work: Box<dyn FnOnce(&mut State) + Send> = tokio::select! {
            look = new.recv() => match look {
                Some(look) => {
                    // After an exec, the loader and the program's start-up map more: looked at
                    // again. A process a session took in has long been running.
                    if let Look::Executable { pid, .. } | Look::Libraries { pid } = &look {
                        let now = tokio::time::Instant::now();
                        for after in LOOK_AGAIN {
                            if later.len() < LATER {
                                later.push(Reverse((now + after, *pid)));
                            }
                        }
                    }
                    Box::new(move |state: &mut State| state.look(look))
                }
                None => return,
            },
            () = sleep_until(next_later) => {
                let now = tokio::time::Instant::now();
                let mut due = Vec::new();
                while let Some(Reverse((when, pid))) = later.peek().copied() {
                    if when > now {
                        break;
                    }
                    later.pop();
                    due.push(pid);
                }
                Box::new(move |state: &mut State| {
                    for pid in due {
                        state.probe_libraries(pid);
                    }
                })
            }
            Ok(()) = policy.changed() => {
                // A reload: directories it adds are looked through now (what was probed stays).
                let dirs = policy.borrow_and_update().tls.executable_dirs.clone();
                if dirs == extra_dirs {
                    continue;
                }
                extra_dirs = dirs.clone();
                Box::new(move |state: &mut State| state.probe_dirs(&dirs, false))
            }
            // Tokens started being looked for: the execs of processes outside sessions made
            // before reported nothing.
            () = rescan.notified() => Box::new(|state: &mut State| state.probe_running()),
        };
        state = match tokio::task::spawn_blocking(move || {
            work(&mut state);
            state
        })
        .await
        {
            Ok(state) => state,
            Err(_) => return,
        };
    }
}

/// Sleeps until `when`, or forever.
async fn sleep_until(when: Option<tokio::time::Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

struct State {
    probes: Arc<std::sync::Mutex<Probes>>,
    seen: HashSet<FileId>,
    probed: usize,
}

impl State {
    /// The executables of running processes and the libraries they map, then the executables
    /// in the tool directories.
    fn probe_at_start(&mut self, extra_dirs: &[PathBuf]) {
        // The library files the library probes took already.
        let host_libraries = self.probes.lock().unwrap_or_else(|p| p.into_inner()).library_files();
        for path in host_libraries {
            if let Ok(meta) = std::fs::metadata(&path) {
                self.seen.insert(file_id(&meta));
            }
        }
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

    fn look(&mut self, look: Look) {
        match look {
            Look::Executable { pid, file, filename } => {
                // The kernel reports a file again after its LRU forgot it: looked at once all the same.
                if !self.seen.contains(&file) {
                    if let Some((opened, _)) = executables::open(pid, &filename, file) {
                        // Logged by the name it was exec'd with, not the /proc path it was read through.
                        self.probe(file, &opened, Path::new(&filename));
                    } else {
                        tracing::debug!(pid, filename, "executable gone before it was looked at");
                    }
                }
                self.probe_libraries(pid);
            }
            Look::Libraries { pid } => self.probe_libraries(pid),
            Look::Process { pid } => self.probe_process(pid),
        }
    }

    /// The probed libraries (libssl, GnuTLS, libc) a process maps from files not looked at yet.
    fn probe_libraries(&mut self, pid: u32) {
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return };
        // Every running process's maps are read at start (thousands on a node): the lines of
        // files that are no shared library cost one search, not a split.
        for line in maps.lines().filter(|l| l.contains(".so")) {
            // START-END PERMS OFFSET MAJOR:MINOR INODE PATH
            let mut fields = line.split_whitespace();
            let (Some(range), Some(_), Some(_), Some(dev), Some(inode), Some(path), None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                continue;
            };
            let Some(name) = Path::new(path).file_name().and_then(|n| n.to_str()) else { continue };
            if !executables::is_probed_library(name) {
                continue;
            }
            // The file's identity as the maps line gives it: a library looked at before costs
            // no open.
            let Some(id) = maps_file_id(dev, inode) else { continue };
            if !self.seen.insert(id) {
                continue;
            }
            // The file the process maps, wherever its mount namespace has it.
            let Ok(file) = File::open(format!("/proc/{pid}/map_files/{range}")) else { continue };
            match executables::inspect_library(&file, name) {
                Ok(inspection) => self.attach(&file, Path::new(path), inspection, "library"),
                Err(e) => tracing::debug!(pid, path, "library not looked at: {e}"),
            }
        }
    }

    /// The executables of the running processes not looked at yet (a stat each for the others),
    /// and the libraries they map.
    fn probe_running(&mut self) {
        // The pids first (the listing is not held open while each is looked at); a file is
        // opened for one process at a time, so thousands of processes never take as many
        // descriptors.
        let pids: Vec<u32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
            .collect();
        for pid in pids {
            self.probe_process(pid);
        }
    }

    /// A running process's executable, unless looked at already (a stat), and its libraries.
    fn probe_process(&mut self, pid: u32) {
        let link = PathBuf::from(format!("/proc/{pid}/exe"));
        if let Ok(meta) = std::fs::metadata(&link) {
            let id = file_id(&meta);
            if !self.seen.contains(&id) {
                if let Ok(file) = File::open(&link) {
                    // Named by where it was run from (the link's text), opened through the link.
                    let path = std::fs::read_link(&link).unwrap_or(link);
                    self.probe(id, &file, &path);
                }
            }
        }
        self.probe_libraries(pid);
    }

    /// Looks at one executable and attaches the probes it needs.
    fn probe(&mut self, id: FileId, file: &File, path: &Path) {
        self.seen.insert(id);
        match executables::inspect(file) {
            Ok(inspection) => self.attach(file, path, inspection, "executable"),
            Err(e) => tracing::debug!(path = %path.display(), "not looked at for TLS code: {e}"),
        }
    }

    /// Attaches what an inspection found in `file` (an executable or a library, `what`).
    fn attach(&mut self, file: &File, path: &Path, inspection: executables::Inspection, what: &str) {
        let started = std::time::Instant::now();
        if let Some(why) = &inspection.unsupported {
            tracing::warn!(path = %path.display(), "TLS requests of this {what} are not seen: {why}");
        }
        if inspection.probes.is_empty() {
            return;
        }
        if self.probed >= MAX_PROBED {
            tracing::warn!(path = %path.display(), "not probed: {MAX_PROBED} files are already");
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
                    tracing::info!(path = %path.display(), symbol, offset = p.file_offset, ?took, now, "probe taken");
                }
                Err(e) => tracing::warn!(path = %path.display(), symbol = p.symbol, "probe not attached: {e}"),
            }
        }
        self.probed += usize::from(attached);
        if attached {
            tracing::info!(path = %path.display(), "{what} probed");
        }
    }
}

/// A mapping's file from its `/proc/PID/maps` fields: `MAJOR:MINOR` in hex (the kernel's `s_dev`
/// split) and the inode; none for an anonymous mapping.
fn maps_file_id(dev: &str, inode: &str) -> Option<FileId> {
    let (major, minor) = dev.split_once(':')?;
    let (major, minor) = (u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?);
    let ino = inode.parse().ok().filter(|i| *i != 0)?;
    Some(FileId { dev: (major << 20) | (minor & 0xf_ffff), ino })
}

fn file_id(meta: &std::fs::Metadata) -> FileId {
    FileId { dev: crate::host::kernel_dev(meta.dev()), ino: meta.ino() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_maps_line_names_the_file_as_a_stat_of_it_does() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps.lines().find(|l| l.contains("libc.so")).expect("this test process maps libc");
        let fields: Vec<&str> = line.split_whitespace().collect();
        let from_maps = maps_file_id(fields[3], fields[4]).unwrap();
        assert_eq!(from_maps, file_id(&std::fs::metadata(fields[5]).unwrap()));
        assert_eq!(maps_file_id("00:00", "0"), None, "an anonymous mapping");
    }
}
