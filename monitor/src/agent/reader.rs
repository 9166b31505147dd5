//! Reads the ring buffer, decodes and enriches each record, and passes it to the core task.
//! When the core falls behind, the channel fills, this task waits, the ring buffer fills, and
//! the kernel counts what it drops: loss is always visible as `monitor_blind`.

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::{
    credentials::Observer,
    decode::{decode, Clock},
    event::Event,
};

/// How long an event may wait in the ring buffer when the probes did not wake the reader.
/// Shorter costs idle CPU on every host (measured: 10 ms added ~2% to an exec loop on 2
/// cores); longer delays alerts. Enforcement does not wait for it: the kernel decides.

const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(40);

pub async fn run(
    ring: RingBuf<MapData>,
    clock: Clock,
    observer: Observer,
    out: mpsc::Sender<Event>,
) -> anyhow::Result<()> {
    // SAFETY: the AsyncFd owns the ring buffer, so its fd stays open while it is registered.
    let mut fd =
        unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow::anyhow!("ring buffer fd: {}", e.into_parts().1))?;
    let mut batch = Vec::new();
    loop {
        // The probes wake this task only when a lot is waiting (see submit_flags in
        // monitor-ebpf); otherwise it drains on a short timer.
        tokio::select! {
            guard = fd.readable_mut() => guard?.clear_ready(),
            _ = tokio::time::sleep(DRAIN_INTERVAL) => {}
        }
        // Credential file accesses first, the ring buffer second: an access was queued when it
        // happened, so the fork or exec that made its process is already in the ring buffer,
        // and read below; the process's exit may be too, and the access goes before it.
        let now = crate::agent::now_ns();
        let mut accesses = Vec::new();
        let lost = observer.drain_file_accesses(now, &mut accesses);
        if lost > 0 {
            batch.push(Event::Lost {
                ts: now,
                source: "credential file events (fanotify queue overflow)".into(),
                count: lost,
            });
        }
        let ring = fd.get_mut();
        while let Some(record) = ring.next() {
            // Credential observations are resolved here, while the record is borrowed: raw
            // request bytes never outlive it.
            match decode(&record, clock) {
                Ok(decoded) => batch.extend(observer.observe(decoded)),
                Err(e) => tracing::warn!("dropping undecodable kernel record: {e}"),
            }
        }

        for access in accesses {
            place_before_exit(&mut batch, access);
        }
        for mut event in batch.drain(..) {
            enrich(&mut event);
            if out.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Puts a file access (a `CredentialOpen` from fanotify) into `batch` just before the exit of its
/// process, if the batch holds it, so the engine still knows the process; else at the end.
fn place_before_exit(batch: &mut Vec<Event>, mut access: Event) {
    let Event::CredentialOpen(open) = &mut access else { return };
    let exit = batch.iter().position(|e| matches!(e, Event::Exit(x) if x.pid == open.actor.pid));
    match exit {
        Some(at) => {
            if let Event::Exit(x) = &batch[at] {
                open.ts = open.ts.min(x.ts);
            }
            batch.insert(at, access);
        }
        None => batch.push(access),
    }
}

/// Host facts the engine may not read itself (it is pure), recorded in the event instead.
fn enrich(event: &mut Event) {
    let actor = match event {
        Event::Exec(exec) => {
            if exec.exe.starts_with('/') {
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
        Event::TokenUse(token) => &mut token.actor,
        _ => return,
    };
    // Best effort: a short-lived process may be gone; its comm still names it.
    if let Ok(exe) = std::fs::read_link(format!("/proc/{}/exe", actor.pid)) {
        actor.exe = exe.display().to_string();
    }
    if actor.comm.is_empty() {
        // The plaintext hook may run in softirq context, where the task name is not the sender's.
        if let Ok(comm) = std::fs::read_to_string(format!("/proc/{}/comm", actor.pid)) {
            actor.comm = comm.trim_end().to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Actor, CredentialOpen, Exit};

    fn access(pid: u32, ts: u64) -> Event {
        let actor = Actor { pid, tid: pid, comm: String::new(), exe: String::new(), uid: u32::MAX, cgroup: 0 };
        Event::CredentialOpen(CredentialOpen { ts, session: 0, actor, path: "/secret".into(), fd: -1, write: false })
    }

    fn exit(pid: u32, ts: u64) -> Event {
        Event::Exit(Exit { ts, session: 1, pid, exit_code: 0 })
    }

    #[test]
    fn a_file_access_goes_before_its_process_exit_else_last() {
        let mut batch = vec![exit(7, 10), exit(8, 20), exit(9, 30)];
        place_before_exit(&mut batch, access(8, 99));
        place_before_exit(&mut batch, access(5, 99));
        let order: Vec<(&str, u64)> = batch
            .iter()
            .map(|e| match e {
                Event::Exit(x) => ("exit", x.ts),
                Event::CredentialOpen(o) => ("access", o.ts),
                _ => unreachable!(),
            })
            .collect();
        // The access of pid 8 takes its exit's time: it happened no later.
        assert_eq!(order, [("exit", 10), ("access", 20), ("exit", 20), ("exit", 30), ("access", 99)]);
    }
}
