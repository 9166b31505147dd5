//! The process table: every session process the engine has seen, alive or dead, linked to its
//! parent by a serial number rather than by pid, so a reused pid never joins an old lineage.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use super::interned::Interned;

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
    /// Shared with the processes that run the same image (see [`ProcTable::intern`]).
    pub exe: Arc<str>,
    /// Shared with the fork children that have not exec'd since.
    pub argv: Argv,
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

/// A command line held in one allocation: each argument followed by a NUL (an argument never
/// holds one), so `[]`, `[""]` and `["a", "b"]` stay apart.
#[derive(Debug, Clone, Default)]
pub struct Argv(Option<Arc<str>>);

impl Argv {
    pub fn new(args: &[String]) -> Self {
        if args.is_empty() {
            return Self(None);
        }
        let mut joined = String::with_capacity(args.iter().map(|a| a.len() + 1).sum());
        for arg in args {
            joined.push_str(arg);
            joined.push('\0');
        }
        Self(Some(joined.into()))
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.0.as_deref().unwrap_or_default().split_terminator('\0').map(str::to_string).collect()
    }
}

/// Ancestors listed in an alert's chain, at most.
const MAX_CHAIN: usize = 64;
/// An exited process is kept this long after its exit (event time), for what reaches the engine
/// after it (uid changes from the process events connector, records still in the ring buffer),
/// and for as long as a process kept descends from it (its lineage).
const KEEP_EXITED_NS: Nanos = 30_000_000_000;
/// The table is compacted once it holds this many more processes than it kept last time, and
/// at least as many again: amortised, each process costs a constant share of the passes.
const COMPACT_SLACK: usize = 4096;

/// Thousands of sessions on a node each hold a few processes: a record is boxed (the table's
/// free slots then cost a pointer, not a record), executables' paths are shared, and the live
/// set by session is one ordered set rather than a set per session.
#[derive(Debug, Default)]
pub struct ProcTable {
    procs: HashMap<Serial, Box<Proc>>,
    live: HashMap<u32, Serial>,
    /// The live processes of each session, so asking for one session's costs that session's
    /// processes, not the whole table's (thousands of sessions on a node).
    live_by_session: BTreeSet<(SessionKey, Serial)>,
    /// The executables' paths the table holds, each once.
    exes: Interned<str>,
    next: Serial,
    /// Bumped whenever a process joins or leaves the live set (see `changes`).
    changes: u64,
    /// The table's size that starts the next compaction (see [`ProcTable::compact`]).
    compact_at: usize,
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
        self.procs.get(&serial).map(|p| &**p)
    }

    pub fn get_mut(&mut self, serial: Serial) -> Option<&mut Proc> {
        self.procs.get_mut(&serial).map(|p| &mut **p)
    }

    /// The table's shared copy of an executable's path.
    pub fn intern(&mut self, exe: &str) -> Arc<str> {
        self.exes.get(exe)
    }

    /// Adds a live process, replacing whatever held its pid (a missed exit).
    pub fn insert(&mut self, proc: Proc) -> Serial {
        self.next += 1;
        let serial = self.next;
        self.changes += 1;
        if let Some(stale) = self.live.insert(proc.pid, serial) {
            if let Some(old) = self.procs.get_mut(&stale) {
                old.exited.get_or_insert(proc.started);
                let session = old.session;
                self.unlist(session, stale);
            }
        }
        let now = proc.started;
        self.live_by_session.insert((proc.session, serial));
        self.procs.insert(serial, Box::new(proc));
        if self.procs.len() > self.compact_at.max(COMPACT_SLACK) {
            self.compact(now);
        }
        serial
    }

    /// Forgets the processes that exited more than [`KEEP_EXITED_NS`] before `now` and from
    /// which no process kept descends: a session that runs a million short commands holds its
    /// live processes, their lineage and the last moments' exits, not a million entries.
    fn compact(&mut self, now: Nanos) {
        let recent = |p: &Proc| p.exited.is_none_or(|at| now.saturating_sub(at) <= KEEP_EXITED_NS);
        let mut keep = std::collections::HashSet::new();
        for (serial, _) in self.procs.iter().filter(|(_, p)| recent(p)) {
            let mut cursor = Some(*serial);
            while let Some(s) = cursor {
                if !keep.insert(s) {
                    break;
                }
                cursor = self.procs.get(&s).and_then(|p| p.parent);
            }
        }
        self.procs.retain(|s, _| keep.contains(s));
        self.procs.shrink_to(self.procs.len() * 2);
        self.exes.prune();
        self.compact_at = self.procs.len() * 2 + COMPACT_SLACK;
    }

    pub fn exit(&mut self, pid: u32, ts: Nanos) -> Option<Serial> {
        let serial = self.live.remove(&pid)?;
        self.changes += 1;
        if let Some(p) = self.procs.get_mut(&serial) {
            p.exited = Some(ts);
            let session = p.session;
            self.unlist(session, serial);
        }
        Some(serial)
    }

    fn unlist(&mut self, session: SessionKey, serial: Serial) {
        self.live_by_session.remove(&(session, serial));
    }

    /// Live processes of a session, by pid.
    pub fn live_in(&self, session: SessionKey) -> Vec<Serial> {
        let mut v: Vec<_> =
            self.live_by_session.range((session, Serial::MIN)..=(session, Serial::MAX)).map(|(_, s)| *s).collect();
        v.sort_by_key(|s| self.procs[s].pid);
        v
    }

    /// A number that changes whenever a process joins or leaves the live set: the state
    /// directory's keeper rewrites its file only then.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Forgets every process of these sessions (once they are over and nothing of them lives),
    /// in one pass over the table.
    pub fn forget(&mut self, sessions: &std::collections::HashSet<SessionKey>) {
        self.procs.retain(|_, p| !sessions.contains(&p.session));
        self.exes.prune();
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
            chain.push(Ancestor { pid: a.pid, exe: a.exe.to_string() });
            cursor = a.parent;
        }
        Some(ProcessRef {
            pid: p.pid,
            ppid: p.ppid,
            exe: p.exe.to_string(),
            argv: p.argv.to_vec(),
            uid: p.creds.uid,
            euid: p.creds.euid,
            cgroup: p.cgroup,
            chain,
            session: None,
            in_session: true,
            sid: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    fn proc(session: SessionKey, pid: u32, parent: Option<Serial>, started: Nanos) -> Proc {
        Proc {
            session,
            pid,
            ppid: 1,
            parent,
            exe: "/bin/true".into(),
            argv: Argv::default(),
            creds: Creds::default(),
            caps: None,
            exec_caps: None,
            cgroup: 0,
            started,
            exited: None,
        }
    }

    #[test]
    fn a_command_line_keeps_its_arguments_empty_ones_included() {
        for args in [vec![], vec![String::new()], vec!["sleep".to_string(), "".to_string(), "3600".to_string()]] {
            assert_eq!(Argv::new(&args).to_vec(), args);
        }
    }

    #[test]
    fn a_session_of_many_short_commands_keeps_the_living_their_lineage_and_recent_exits() {
        let mut table = ProcTable::default();
        let root = table.insert(proc(1, 100, None, 0));
        let shell = table.insert(proc(1, 101, Some(root), 0));
        // The root exits; its child lives on: the root stays, as the shell's lineage.
        table.exit(100, 1);
        let commands = 200_000u32;
        for i in 0..commands {
            let ts = 2 * S + u64::from(i) * 1_000_000;
            let pid = 1000 + i % 30_000;
            table.insert(proc(1, pid, Some(shell), ts));
            table.exit(pid, ts + 10);
        }
        let now = 2 * S + u64::from(commands) * 1_000_000;
        // 30 s of exits at 1,000 a second, and at most what a compaction lets grow before it.
        assert!(table.procs.len() < 30_000 * 2 + COMPACT_SLACK + 10, "{} kept", table.procs.len());
        let chain = table.describe(table.live(101).unwrap()).unwrap().chain;
        assert_eq!(chain.len(), 1, "the root, exited long ago, is still the shell's parent");
        // A process that exited a moment ago is still found for what comes late.
        let last = 1000 + (commands - 1) % 30_000;
        assert!(table.at(last, now - 1_000_000).is_some());
    }
}
