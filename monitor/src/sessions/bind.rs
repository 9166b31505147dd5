//! Binding a session to processes and cgroups: the kernel maps, and a snapshot from /proc of
//! what already runs there, so the engine knows those processes from the start.

use std::{
    collections::{HashMap, VecDeque},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use monitor_common::{ProcBinding, CONFIG_CGROUP_BINDINGS, CONFIG_PROC_BINDINGS};

use crate::{
    event::{Creds, Nanos, Process, SessionKey},
    probes::KernelMaps,
};

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("process {0} does not exist")]
    NoProcess(u32),
    #[error("no cgroup v2 hierarchy is mounted (none in /proc/mounts)")]
    NoCgroup2,
    #[error("cgroup {0}: {1}")]
    Cgroup(String, std::io::Error),
    #[error("kernel map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
}

/// Where cgroup2 is mounted (here `/sys/fs/cgroup/unified`, elsewhere usually `/sys/fs/cgroup`).
/// Found once (a snapshot of each process of thousands of sessions asks), then kept: the
/// hierarchy does not move while the agent runs.
pub fn cgroup2_mount() -> Option<PathBuf> {
    static MOUNT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(dir) = MOUNT.get() {
        return Some(dir.clone());
    }
    let dir = find_cgroup2_mount()?;
    Some(MOUNT.get_or_init(|| dir).clone())
}

fn find_cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// A cgroup directory, absolute or relative to the cgroup2 mount, and its id (the inode
/// number, which is what `bpf_get_current_cgroup_id` returns).
pub fn resolve_cgroup(path: &str) -> Result<(PathBuf, u64), BindError> {
    let root = cgroup2_mount().ok_or(BindError::NoCgroup2)?;
    let dir =
        if Path::new(path).starts_with(&root) { PathBuf::from(path) } else { root.join(path.trim_start_matches('/')) };
    let meta = fs::metadata(&dir).map_err(|e| BindError::Cgroup(dir.display().to_string(), e))?;
    Ok((dir, meta.ino()))
}

/// `pid` and all its living descendants, parents first. Walks each process's children
/// (`/proc/PID/task/TID/children`, one file per thread that forked), so the cost is that of the
/// subtree, not of every process on the host: a session start or an adoption on a node with
/// thousands of processes reads a few files. Kernels without those files (no
/// CONFIG_PROC_CHILDREN) get the same answer from a scan of every process's parent.
pub fn descendants(pid: u32) -> Result<Vec<u32>, BindError> {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(BindError::NoProcess(pid));
    }
    let mut out = Vec::new();
    let mut queue = VecDeque::from([pid]);
    while let Some(p) = queue.pop_front() {
        out.push(p);
        match children(p) {
            Some(kids) => queue.extend(kids),
            None if p == pid => return Ok(descendants_by_scan(pid)),
            // Gone since its parent listed it: nothing of it to bind.
            None => {}
        }
    }
    Ok(out)
}

/// The children of `pid`, from every thread's `children` file; None when unreadable.
fn children(pid: u32) -> Option<Vec<u32>> {
    let mut kids = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let text = fs::read_to_string(task.path().join("children")).ok()?;
        kids.extend(text.split_whitespace().filter_map(|k| k.parse::<u32>().ok()));
    }
    Some(kids)
}

fn descendants_by_scan(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (p, ppid) in all_processes() {
        children.entry(ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut queue = VecDeque::from([pid]);
    while let Some(p) = queue.pop_front() {
        out.push(p);
        queue.extend(children.get(&p).into_iter().flatten());
    }
    out
}

/// A process's parent and Unix session (`getsid`; 0 when it has none), from /proc/PID/stat:
/// fields 4 and 6, after the parenthesised command name (which may hold spaces and parens).
/// Readable until the process is reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatIds {
    pub ppid: u32,
    pub sid: u32,
}

pub fn stat_ids(pid: u32) -> Option<StatIds> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // state, ppid, pgrp, session
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace().skip(1);
    let ppid = fields.next()?.parse().ok()?;
    let sid = fields.nth(1)?.parse().ok()?;
    Some(StatIds { ppid, sid })
}

/// When the process started (clock ticks since boot, /proc/PID/stat's 22nd field): with the
/// pid, which process it is (a pid may be reused, its start time is not).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: state is field 3, starttime field 22.
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(19)?.parse().ok()
}

/// When a process started, in boot-clock ns (its start time in clock ticks, converted).
pub fn start_boot_ns(pid: u32) -> Option<u64> {
    start_time(pid).map(|ticks| ticks.saturating_mul(1_000_000_000) / clock_ticks_per_sec())
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64
}

/// Whether the process `pid` is the one a binding was made for: it started when the binding
/// says. /proc gives starts in clock ticks, truncated; the kernel's binding is stamped at the
/// fork's tracepoint, a moment after the start it records (longer on a loaded or emulated
/// machine, hence the slack). A process that reused the pid started after the first one
/// exited: in practice seconds later, never within the slack.
pub fn started_as_bound(pid: u32, binding: &ProcBinding) -> bool {
    const SLACK_NS: u64 = 100_000_000;
    let tick = 1_000_000_000 / clock_ticks_per_sec();
    match start_boot_ns(pid) {
        Some(started) if binding.started_ns != 0 => {
            started <= binding.started_ns + tick && binding.started_ns <= started + tick + SLACK_NS
        }
        _ => false,
    }
}

fn all_processes() -> Vec<(u32, u32)> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, read_status(pid)?.ppid)))
        .collect()
}

struct Status {
    ppid: u32,
    uid: u32,
    euid: u32,
    gid: u32,
    egid: u32,
}

fn read_status(pid: u32) -> Option<Status> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.split_whitespace());
    let mut uids = field("Uid:")?;
    let mut gids = field("Gid:")?;
    Some(Status {
        ppid: field("PPid:")?.next()?.parse().ok()?,
        uid: uids.next()?.parse().ok()?,
        euid: uids.next()?.parse().ok()?,
        gid: gids.next()?.parse().ok()?,
        egid: gids.next()?.parse().ok()?,
    })
}

/// What /proc says about a live process, as the engine's snapshot event.
pub fn snapshot(pid: u32, session: SessionKey, ts: Nanos) -> Option<Process> {
    let status = read_status(pid)?;
    let exe = fs::read_link(format!("/proc/{pid}/exe")).map(|p| p.display().to_string()).unwrap_or_default();
    let argv = fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        })
        .unwrap_or_default();
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)))
        .and_then(|p| resolve_cgroup(&p).ok())
        .map_or(0, |(_, id)| id);
    Some(Process {
        ts,
        session,
        pid,
        ppid: status.ppid,
        exe,
        argv,
        creds: Creds { uid: status.uid, gid: status.gid, euid: Some(status.euid), egid: Some(status.egid) },
        cgroup,
    })
}

/// Processes currently in a cgroup.
pub fn cgroup_members(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

impl KernelMaps {
    /// Whether any process or cgroup is bound to a session (running or ended).
    pub fn any_binding(&self) -> bool {
        self.proc_sessions.keys().next().is_some() || self.cgroup_sessions.keys().next().is_some()
    }

    /// Once no process is bound (they all exited): the hooks stop looking processes up. Only
    /// a bound process's fork adds an entry in the kernel, so none can appear meanwhile.
    pub fn note_no_process_bound(&mut self) {
        if self.proc_sessions.keys().next().is_none() {
            let _ = self.config.set(CONFIG_PROC_BINDINGS, 0, 0);
        }
    }

    /// Puts processes into a session; a process already in another session is moved.
    pub fn bind_pids(&mut self, pids: &[u32], key: SessionKey) -> Result<(), BindError> {
        // Before the first entry: the hooks look processes up only while this is set.
        self.config.set(CONFIG_PROC_BINDINGS, 1, 0).map_err(|e| BindError::Map("CONFIG", e))?;
        for pid in pids {
            // A process gone meanwhile is bound with no start, which no later agent takes over.
            let binding = ProcBinding { session: key, _pad0: 0, started_ns: start_boot_ns(*pid).unwrap_or(0) };
            self.proc_sessions.insert(pid, binding, 0).map_err(|e| BindError::Map("PROC_SESSIONS", e))?;
        }
        Ok(())
    }

    pub fn bind_cgroup(&mut self, cgroup: u64, key: SessionKey) -> Result<(), BindError> {
        self.cgroup_sessions.insert(cgroup, key, 0).map_err(|e| BindError::Map("CGROUP_SESSIONS", e))?;
        self.sync_cgroup_count().map_err(|e| BindError::Map("CONFIG", e))
    }

    /// What the binding maps hold: a previous agent's bindings when they are pinned (see
    /// probes/pins.rs).
    pub fn bindings(&self) -> (Vec<(u32, ProcBinding)>, Vec<(u64, SessionKey)>) {
        let procs = self.proc_sessions.iter().filter_map(Result::ok).collect();
        let cgroups = self.cgroup_sessions.iter().filter_map(Result::ok).collect();
        (procs, cgroups)
    }

    /// Drops bindings that no session takes over (gone processes, unknown sessions).
    pub fn unbind(&mut self, pids: &[u32], cgroups: &[u64]) -> Result<(), BindError> {
        for pid in pids {
            let _ = self.proc_sessions.remove(pid);
        }
        for cgroup in cgroups {
            let _ = self.cgroup_sessions.remove(cgroup);
        }
        self.sync_cgroup_count().map_err(|e| BindError::Map("CONFIG", e))
    }

    /// Tells the probes whether any cgroup is bound: with none, they skip the cgroup lookup.
    /// (One key is looked for, not all counted: a node binds thousands of pods' cgroups.)
    pub fn sync_cgroup_count(&mut self) -> Result<(), aya::maps::MapError> {
        let any = self.cgroup_sessions.keys().next().is_some_and(|k| k.is_ok());
        self.config.set(CONFIG_CGROUP_BINDINGS, any as u64, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_holds_only_for_the_process_that_started_when_it_says() {
        let me = std::process::id();
        let started = start_boot_ns(me).unwrap();
        let binding = |started_ns| ProcBinding { session: 1, _pad0: 0, started_ns };
        assert!(started_as_bound(me, &binding(started)), "stamped from /proc, as userspace binds");
        assert!(started_as_bound(me, &binding(started + 3_000_000)), "stamped at the fork, a moment later");
        assert!(
            !started_as_bound(me, &binding(started + 5_000_000_000)),
            "a process that started before the pid's reuse"
        );
        assert!(
            !started_as_bound(me, &binding(started.saturating_sub(5_000_000_000))),
            "bound before this process started"
        );
        assert!(!started_as_bound(me, &binding(0)), "bound with no start known");
        assert!(!started_as_bound(u32::MAX, &binding(started)), "no such process");
    }

    #[test]
    fn descendants_from_children_files_match_a_scan_of_every_process() {
        // A shell with two children, one of which has a child of its own.
        let mut root =
            std::process::Command::new("sh").args(["-c", "sleep 30 & sh -c 'sleep 30 & wait' & wait"]).spawn().unwrap();
        let pid = root.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut found = descendants(pid).unwrap();
        while found.len() < 4 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            found = descendants(pid).unwrap();
        }
        let mut scanned = descendants_by_scan(pid);
        for p in found.iter().skip(1) {
            let _ = std::process::Command::new("kill").arg(p.to_string()).status();
        }
        let _ = root.kill();
        let _ = root.wait();
        assert_eq!(found.len(), 4, "{found:?}");
        assert_eq!(found[0], pid, "the root first");
        found.sort();
        scanned.sort();
        assert_eq!(found, scanned);
        assert!(matches!(descendants(u32::MAX - 1), Err(BindError::NoProcess(_))));
    }
}
