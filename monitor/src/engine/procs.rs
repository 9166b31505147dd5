//! The process table: every session process the engine has seen, alive or dead, linked to its
//! parent by a serial number rather than by pid, so a reused pid never joins an old lineage.

use std::collections::HashMap;

use crate::{
    alert::{Ancestor, ProcessRef},
    event::{Creds, Nanos, SessionKey},
};

pub type Serial = u64;

#[derive(Debug, Clone)]
pub struct Proc {
    pub session: SessionKey,
    pub pid: u32,
    pub ppid: u32,
    pub parent: Option<Serial>,
    pub exe: String,
    pub argv: Vec<String>,
    pub creds: Creds,
    /// Effective capabilities, when known (from an exec or a capset).
    pub caps: Option<u64>,
    /// Effective capabilities right after the last exec: what the image was given. Raising
    /// effective capabilities back within these is not an escalation (setpriv, dropping and
    /// restoring around a privileged step).
    pub exec_caps: Option<u64>,
    pub cgroup: u64,
    pub started: Nanos,
    pub exited: Option<Nanos>,
}

/// Ancestors listed in an alert's chain, at most.
const MAX_CHAIN: usize = 64;

#[derive(Debug, Default)]
pub struct ProcTable {
    procs: HashMap<Serial, Proc>,
    live: HashMap<u32, Serial>,
    next: Serial,
}

impl ProcTable {
    pub fn live(&self, pid: u32) -> Option<Serial> {
        self.live.get(&pid).copied()
    }

    /// The process that had `pid` at time `ts`: the live one if it had started by then, else
    /// one that has since exited. For observations that reach the engine after their process's
    /// exit (uid changes from the process events connector carry their own time).
    pub fn at(&self, pid: u32, ts: Nanos) -> Option<Serial> {
        if let Some(serial) = self.live(pid).filter(|s| self.procs.get(s).is_some_and(|p| p.started <= ts)) {
            return Some(serial);
        }
        self.procs
            .iter()
            .filter(|(_, p)| p.pid == pid && p.started <= ts && p.exited.is_some_and(|e| e >= ts))
            .map(|(s, _)| *s)
            .max()
    }

    pub fn get(&self, serial: Serial) -> Option<&Proc> {
        self.procs.get(&serial)
    }

    pub fn get_mut(&mut self, serial: Serial) -> Option<&mut Proc> {
        self.procs.get_mut(&serial)
    }

    /// Adds a live process, replacing whatever held its pid (a missed exit).
    pub fn insert(&mut self, proc: Proc) -> Serial {
        self.next += 1;
        let serial = self.next;
        if let Some(stale) = self.live.insert(proc.pid, serial) {
            if let Some(old) = self.procs.get_mut(&stale) {
                old.exited.get_or_insert(proc.started);
            }
        }
        self.procs.insert(serial, proc);
        serial
    }

    pub fn exit(&mut self, pid: u32, ts: Nanos) -> Option<Serial> {
        let serial = self.live.remove(&pid)?;
        if let Some(p) = self.procs.get_mut(&serial) {
            p.exited = Some(ts);
        }
        Some(serial)
    }

    /// Live processes of a session, by pid.
    pub fn live_in(&self, session: SessionKey) -> Vec<Serial> {
        let mut v: Vec<_> =
            self.live.values().copied().filter(|s| self.procs.get(s).is_some_and(|p| p.session == session)).collect();
        v.sort_by_key(|s| self.procs[s].pid);
        v
    }

    /// Forgets every process of a session (once it is over and nothing of it lives).
    pub fn forget(&mut self, session: SessionKey) {
        self.procs.retain(|_, p| p.session != session);
    }

    /// The alert's view of a process, with its ancestors up to the session root.
    pub fn describe(&self, serial: Serial) -> Option<ProcessRef> {
        let p = self.procs.get(&serial)?;
        let mut chain = Vec::new();
        let mut cursor = p.parent;
        while let Some(s) = cursor {
            let Some(a) = self.procs.get(&s) else { break };
            if chain.len() == MAX_CHAIN {
                break;
            }
            chain.push(Ancestor { pid: a.pid, exe: a.exe.clone() });
            cursor = a.parent;
        }
        Some(ProcessRef {
            pid: p.pid,
            ppid: p.ppid,
            exe: p.exe.clone(),
            argv: p.argv.clone(),
            uid: p.creds.uid,
            euid: p.creds.euid,
            cgroup: p.cgroup,
            chain,
            session: None,
            in_session: true,
        })
    }
}
