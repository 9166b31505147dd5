//! Binding a session to processes and cgroups: the kernel maps, and a snapshot from /proc of
//! what already runs there, so the engine knows those processes from the start.

use std::{
    collections::{HashMap, VecDeque},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use monitor_common::{CONFIG_CGROUP_BINDINGS, CONFIG_PROC_BINDINGS};

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
pub fn cgroup2_mount() -> Option<PathBuf> {
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

/// `pid` and all its living descendants, parents first.
pub fn descendants(pid: u32) -> Result<Vec<u32>, BindError> {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(BindError::NoProcess(pid));
    }
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
    Ok(out)
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
            self.proc_sessions.insert(pid, key, 0).map_err(|e| BindError::Map("PROC_SESSIONS", e))?;
        }
        Ok(())
    }

    pub fn bind_cgroup(&mut self, cgroup: u64, key: SessionKey) -> Result<(), BindError> {
        self.cgroup_sessions.insert(cgroup, key, 0).map_err(|e| BindError::Map("CGROUP_SESSIONS", e))?;
        self.sync_cgroup_count().map_err(|e| BindError::Map("CONFIG", e))
    }

    /// Tells the probes how many cgroups are bound: with none, they skip the cgroup lookup.
    pub fn sync_cgroup_count(&mut self) -> Result<(), aya::maps::MapError> {
        let count = self.cgroup_sessions.keys().filter(Result::is_ok).count() as u64;
        self.config.set(CONFIG_CGROUP_BINDINGS, count, 0)
    }
}
