//! Reads the ring buffer, decodes and enriches each record, and passes it to the core task.
//! When the core falls behind, the channel fills, this task waits, the ring buffer fills, and
//! the kernel counts what it drops: loss is always visible as `monitor_blind`.

use std::collections::HashMap;

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::{
    credentials::{proc_connector::ProcConnector, Observer},
    decode::{decode, Clock, Decoded},
    event::{CredCall, CredChange, Event, Nanos},
};

/// How long an event may wait in the ring buffer when the probes did not wake the reader.
/// Shorter costs idle CPU on every host (measured: 10 ms added ~2% to an exec loop on 2
/// cores); longer delays alerts. Enforcement does not wait for it: the kernel decides.
const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(40);
/// The same while no session runs and no token is looked for: the probes then report only new
/// executables (and wake the reader for those), and the file and uid-change queues concern no
/// session. 25 wakeups a second cost an idle agent ~4 ms of CPU a second on a 2-vCPU VM.
const IDLE_DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

pub async fn run(
    ring: RingBuf<MapData>,
    clock: Clock,
    mut observer: Observer,
    uid_changes: Option<ProcConnector>,
    executables: mpsc::Sender<super::executables::Look>,
    out: mpsc::Sender<Event>,
    mut watched: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // SAFETY: the AsyncFd owns the ring buffer, so its fd stays open while it is registered.
    let mut fd =
        unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow::anyhow!("ring buffer fd: {}", e.into_parts().1))?;
    let mut batch = Vec::new();
    let mut uid_changes_held = Vec::new();
    let mut recent_execs = RecentExecs::default();
    let mut library_looks = LibraryLooks::default();
    let mut dns_streams = crate::dns::TcpStreams::default();
    let mut watch_open = true;
    loop {
        // The probes wake this task only when a lot is waiting (see submit_flags in
        // monitor-ebpf); otherwise it drains on a short timer.
        let interval = if *watched.borrow() { DRAIN_INTERVAL } else { IDLE_DRAIN_INTERVAL };
        tokio::select! {
            guard = fd.readable_mut() => guard?.clear_ready(),
            _ = tokio::time::sleep(interval) => {}
            // A session started (or the last one went): drain now, at the new pace.
            changed = watched.changed(), if watch_open => watch_open = changed.is_ok(),
        }
        // What comes from outside the ring buffer first (credential file accesses, uid
        // changes), the ring buffer second: each was queued when it happened, so the fork or
        // exec that made its process is already in the ring buffer, and read below; the
        // process's exit may be too, and the observation goes before it.
        let now = crate::host::now_ns();
        let mut outside = Vec::new();
        let lost = observer.drain_file_accesses(now, &mut outside);
        if lost > 0 {
            let source = "credential file events (fanotify queue overflow)".into();
            batch.push(Event::Lost { ts: now, source, count: lost, session: None });
        }
        let mut new_uid_changes = Vec::new();
        if let Some(connector) = &uid_changes {
            let mut changes = Vec::new();
            if connector.drain(&mut changes) {
                let source = "uid change events (process events connector overflow)".into();
                batch.push(Event::Lost { ts: now, source, count: 1, session: None });
            }
            // Every thread of a process reports the same change (glibc applies it to each).
            changes.dedup_by_key(|c| (c.pid, c.ruid, c.euid));
            new_uid_changes.extend(changes.into_iter().map(|c| CredChange {
                ts: monotonic_to_wall(clock, c.monotonic_ns),
                session: 0,
                pid: c.pid,
                call: CredCall::UidChange,
                euid: Some(c.euid),
                cap_effective: None,
            }));
        }
        let ring = fd.get_mut();
        let mut undecodable = 0u64;
        while let Some(record) = ring.next() {
            // Credential observations are resolved here, while the record is borrowed: raw
            // request bytes never outlive it.
            match decode(&record, clock) {
                Ok(Decoded::Executable { pid, file, filename }) => {
                    // Never waits: the exec path must not stall behind ELF reads. One dropped
                    // is an executable left unprobed, and says so.
                    let new = super::executables::Look::Executable { pid, file, filename };
                    if executables.try_send(new).is_err() {
                        batch.push(Event::Lost {
                            ts: now,
                            source: "new executables to look at for TLS code (queue full)".into(),
                            count: 1,
                            session: None,
                        });
                    }
                }
                Ok(Decoded::DnsPiece { ts, session, pid, socket, seq, total_len, whole, data }) => {
                    let answers = match whole {
                        true => dns_streams.message(ts, pid, socket, seq, total_len, data),
                        false => dns_streams.piece(ts, pid, socket, seq, total_len, data),
                    };
                    batch.extend(answers.into_iter().map(|a| Event::Resolve(crate::dns::resolve(ts, session, pid, a))));
                }
                Ok(decoded) => {
                    match &decoded {
                        Decoded::Event(Event::Exit(exit)) => dns_streams.forget_pid(exit.pid),
                        Decoded::Event(Event::Exec(exec)) if exec.session != 0 => {
                            // The TLS libraries it maps may be a container's own (another file).
                            library_looks.ask(&executables, exec.pid, &exec.exe, now);
                        }
                        _ => {}
                    }
                    batch.extend(observer.observe(decoded))
                }
                Err(e) => {
                    if undecodable == 0 {
                        tracing::warn!("dropping undecodable kernel record: {e}");
                    }
                    undecodable += 1;
                }
            }
        }
        if undecodable > 0 {
            // An event the kernel sent and the agent could not read is one it did not see.
            let source = "kernel records that did not decode".into();
            batch.push(Event::Lost { ts: now, source, count: undecodable, session: None });
        }
        batch.extend(observer.take_awaiting_peer());

        // A uid change waits one round, for the exec that may have made it (a setuid binary:
        // the exec reports it, and alerts on it, itself) to be read from the ring buffer.
        recent_execs.note(&batch, now);
        for change in std::mem::replace(&mut uid_changes_held, new_uid_changes) {
            if !recent_execs.made(&change) {
                outside.push(Event::CredChange(change));
            }
        }
        for event in outside {
            place(&mut batch, event);
        }
        // One /proc read per process and round, however many events it made: a request loop
        // makes hundreds a round, and readlink of /proc/PID/exe walks a path each time.
        let mut procs = ProcFacts::default();
        for mut event in batch.drain(..) {
            enrich(&mut event, &mut procs);
            if out.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Puts an observation made outside the ring buffer (a file access, a uid change: they name a
/// pid) into `batch` before the first event that is later, and before the exit of its process,
/// so the engine still knows the process; else at the end.
fn place(batch: &mut Vec<Event>, mut event: Event) {
    let pid = match &event {
        Event::CredentialOpen(open) => open.actor.pid,
        Event::CredChange(change) => change.pid,
        _ => return batch.push(event),
    };
    let ts = event.ts();
    let at = batch.iter().position(|e| e.ts() > ts || matches!(e, Event::Exit(x) if x.pid == pid));
    match at {
        Some(at) => {
            if let Event::Exit(x) = &batch[at] {
                // It happened no later than the exit.
                let exit_ts = x.ts;
                match &mut event {
                    Event::CredentialOpen(open) => open.ts = open.ts.min(exit_ts),
                    Event::CredChange(change) => change.ts = change.ts.min(exit_ts),
                    _ => {}
                }
            }
            batch.insert(at, event);
        }
        None => batch.push(event),
    }
}

/// Which session execs get their libraries looked at: one process per executable path every
/// [`LIBRARY_LOOK_EVERY`] (the runs of one program map the same libraries; a storm of
/// `/bin/true` needs one look, not ten thousand). Every executable a session runs is still looked
/// at, within that time.
#[derive(Default)]
struct LibraryLooks {
    /// Executable path -> when its last look was asked for.
    asked: HashMap<String, Nanos>,
}

const LIBRARY_LOOK_EVERY: Nanos = 10_000_000_000;
/// Paths remembered at most; past this the memory starts again.
const LIBRARY_LOOK_PATHS: usize = 4096;

impl LibraryLooks {
    fn ask(&mut self, looks: &mpsc::Sender<super::executables::Look>, pid: u32, exe: &str, now: Nanos) {
        if self.asked.get(exe).is_some_and(|at| now.saturating_sub(*at) < LIBRARY_LOOK_EVERY) {
            return;
        }
        if self.asked.len() >= LIBRARY_LOOK_PATHS {
            self.asked.clear();
        }
        self.asked.insert(exe.to_string(), now);
        if looks.try_send(super::executables::Look::Libraries { pid }).is_err() {
            // Not an event lost (the exec itself was read): a look at its libraries skipped.
            crate::metrics::get().lost("library looks skipped (queue full)", 1);
        }
    }
}

/// Execs read lately, to tell the uid change a setuid binary's exec makes from a setuid-family
/// call.
#[derive(Default)]
struct RecentExecs {
    /// (pid, exec time, effective uid after it, when it was read).
    execs: Vec<(u32, Nanos, Option<u32>, Nanos)>,
}

/// How long an exec is remembered; a held uid change is at most two drains old.
const RECENT_EXEC: Nanos = 2_000_000_000;
/// An exec's uid change comes microseconds before the exec's own event.
const EXEC_UID_CHANGE_WINDOW: Nanos = 50_000_000;

impl RecentExecs {
    fn note(&mut self, batch: &[Event], now: Nanos) {
        self.execs.retain(|e| e.3 + RECENT_EXEC > now);
        for event in batch {
            if let Event::Exec(exec) = event {
                self.execs.push((exec.pid, exec.ts, exec.creds.euid, now));
            }
        }
    }

    /// Whether `change` is the one an exec of its process made.
    fn made(&self, change: &CredChange) -> bool {
        self.execs.iter().any(|(pid, ts, euid, _)| {
            *pid == change.pid
                && *ts >= change.ts
                && *ts - change.ts <= EXEC_UID_CHANGE_WINDOW
                && (euid.is_none() || *euid == change.euid)
        })
    }
}

/// A CLOCK_MONOTONIC time (the process events connector's) as wall-clock time.
fn monotonic_to_wall(clock: Clock, monotonic_ns: u64) -> Nanos {
    let now = |id| {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(id, &mut t) };
        t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128
    };
    // BOOTTIME runs ahead of MONOTONIC by the time the host spent suspended.
    let suspended = now(libc::CLOCK_BOOTTIME) - now(libc::CLOCK_MONOTONIC);
    clock.wall((monotonic_ns as i128 + suspended).clamp(0, u64::MAX as i128) as u64)
}

/// What /proc said about a process during one drain round (read at most once each).
#[derive(Default)]
struct ProcFacts {
    exe: HashMap<u32, Option<String>>,
    comm: HashMap<u32, Option<String>>,
    ids: HashMap<u32, Option<crate::sessions::bind::StatIds>>,
}

impl ProcFacts {
    fn exe(&mut self, pid: u32) -> Option<String> {
        let read = || std::fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| p.display().to_string());
        self.exe.entry(pid).or_insert_with(read).clone()
    }

    /// Its parent and Unix session.
    fn ids(&mut self, pid: u32) -> Option<crate::sessions::bind::StatIds> {
        *self.ids.entry(pid).or_insert_with(|| crate::sessions::bind::stat_ids(pid))
    }

    fn comm(&mut self, pid: u32) -> Option<String> {
        let read = || std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|c| c.trim_end().to_string());
        self.comm.entry(pid).or_insert_with(read).clone()
    }
}

/// Whether an exec path names a descriptor of the calling process rather than a file.
fn through_descriptor(path: &str) -> bool {
    ["/dev/fd/", "/proc/self/fd/", "/proc/thread-self/fd/"].iter().any(|p| path.starts_with(p))
        || path.strip_prefix("/proc/").and_then(|rest| rest.split_once("/fd/")).is_some()
}

/// Host facts the engine may not read itself (it is pure), recorded in the event instead.
fn enrich(event: &mut Event, procs: &mut ProcFacts) {
    let actor = match event {
        Event::Exec(exec) => {
            if through_descriptor(&exec.exe) {
                // fexecve / execveat(fd, "", AT_EMPTY_PATH): the kernel names the file
                // `/dev/fd/N`, which means nothing here (resolved in the agent it would even be
                // the agent's own descriptor N). The file is the process's executable: a memfd
                // shows as `/memfd:NAME (deleted)`, a deleted file with its old path.
                if let Some(real) = procs.exe(exec.pid) {
                    exec.exe = real;
                }
            } else if exec.exe.starts_with('/') {
                if let Ok(real) = std::fs::canonicalize(&exec.exe) {
                    let real = real.display().to_string();
                    if real != exec.exe {
                        exec.exe_real = Some(real);
                    }
                }
            }
            return;
        }
        Event::CredentialOpen(open) => {
            // Seen through fanotify: only the pid is known; the rest from /proc while it lives.
            if open.actor.uid == u32::MAX {
                if let Some(p) = crate::sessions::bind::snapshot(open.actor.pid, 0, 0) {
                    open.actor.uid = p.creds.uid;
                    open.actor.cgroup = p.cgroup;
                }
            }
            &mut open.actor
        }
        Event::TokenUse(token) => {
            // Outside sessions, at an exec: is it the launcher's Unix session (engine/credentials.rs)?
            // The exec'ing process may be gone (reaped) already; its parent then says.
            let at_exec = matches!(token.via, crate::event::TokenVia::Env { .. } | crate::event::TokenVia::Argv { .. });
            if token.session == 0 && at_exec && token.actor.sid.is_none() {
                let parent = (token.actor.ppid > 1).then_some(token.actor.ppid);
                let ids = procs.ids(token.actor.pid).or_else(|| parent.and_then(|p| procs.ids(p)));
                token.actor.sid = ids.map(|ids| ids.sid);
            }
            &mut token.actor
        }
        _ => return,
    };
    // Best effort: a short-lived process may be gone; its comm still names it.
    if let Some(exe) = procs.exe(actor.pid) {
        actor.exe = exe;
    }
    if actor.ppid == 0 {
        if let Some(ids) = procs.ids(actor.pid) {
            actor.ppid = ids.ppid;
        }
    }
    if actor.comm.is_empty() {
        // The plaintext hook may run in softirq context, where the task name is not the sender's.
        if let Some(comm) = procs.comm(actor.pid) {
            actor.comm = comm;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Actor, CredentialOpen, Exit};

    fn access(pid: u32, ts: u64) -> Event {
        let actor = Actor {
            pid,
            tid: pid,
            ppid: 0,
            sid: None,
            comm: String::new(),
            exe: String::new(),
            uid: u32::MAX,
            cgroup: 0,
        };
        Event::CredentialOpen(CredentialOpen { ts, session: 0, actor, path: "/secret".into(), fd: -1, write: false })
    }

    fn exit(pid: u32, ts: u64) -> Event {
        Event::Exit(Exit { ts, session: 1, pid, exit_code: 0 })
    }

    #[test]
    fn a_uid_change_made_by_an_exec_is_told_from_a_setuid_call() {
        let exec = |pid: u32, ts: u64, euid: u32| {
            Event::Exec(crate::event::Exec {
                ts,
                session: 1,
                pid,
                ppid: 1,
                sid: None,
                exe: "/usr/bin/sudo".into(),
                exe_real: None,
                argv: vec![],
                argv_truncated: false,
                creds: crate::event::Creds { uid: 1000, gid: 1000, euid: Some(euid), egid: Some(euid) },
                cgroup: 0,
                cap_effective: None,
            })
        };
        let change = |pid: u32, ts: u64, euid: u32| CredChange {
            ts,
            session: 0,
            pid,
            call: CredCall::UidChange,
            euid: Some(euid),
            cap_effective: None,
        };
        let mut recent = RecentExecs::default();
        recent.note(&[exec(7, 1_000_000, 0)], 1_000_000);
        assert!(recent.made(&change(7, 999_000, 0)), "just before its exec, to the exec's uid");
        assert!(!recent.made(&change(7, 1_000_001, 0)), "after the exec: a call");
        assert!(!recent.made(&change(8, 999_000, 0)), "another process");
        assert!(!recent.made(&change(7, 999_000, 65534)), "another uid");
        recent.note(&[], 1_000_000 + RECENT_EXEC);
        assert!(!recent.made(&change(7, 999_000, 0)), "forgotten");
    }

    #[test]
    fn an_outside_observation_goes_by_its_time_and_before_its_process_exit() {
        let mut batch = vec![exit(7, 10), exit(8, 20), exit(9, 30)];
        place(&mut batch, access(8, 99));
        place(&mut batch, access(5, 99));
        place(&mut batch, access(6, 15));
        let order: Vec<(&str, u64)> = batch
            .iter()
            .map(|e| match e {
                Event::Exit(x) => ("exit", x.ts),
                Event::CredentialOpen(o) => ("access", o.ts),
                _ => unreachable!(),
            })
            .collect();
        // The access of pid 8 takes its exit's time: it happened no later.
        // The access of pid 6 at 15 goes by its time.
        assert_eq!(order, [("exit", 10), ("access", 15), ("access", 20), ("exit", 20), ("exit", 30), ("access", 99)]);
    }
}
