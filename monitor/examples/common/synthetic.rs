//! Synthetic session events shared by the benchmarks (included with `#[path]`).

use monitor::{
    event::{Creds, EndReason, Event, Exec, Exit, Fork},
    sessions::{Binding, Scope, Session, SessionId},
};

const SESSIONS: u32 = 100;

/// Sessions whose processes fork, exec (some out of scope) and exit; a tenth of the sessions end
/// midway and keep acting, so the time rules and alert building are exercised too.
pub fn synthetic(n: usize) -> Vec<Event> {
    synthetic_spaced(n, 1_000)
}

/// The same, with `step_ns` between one command and the next (all sessions together).
#[allow(dead_code)] // engine_bench includes this file too, and needs only the default spacing.
pub fn synthetic_spaced(n: usize, step_ns: u64) -> Vec<Event> {
    let s = 1_000_000_000u64;
    let mut events = Vec::with_capacity(n);
    for key in 1..=SESSIONS {
        let session = Session {
            id: SessionId::try_from(format!("bench-{key}")).unwrap(),
            principal: "alice@example.com".into(),
            actor: "svc:bench".into(),
            task: "bench".into(),
            sponsor: "perf".into(),
            ttl_ns: 3600 * s,
            grace_ns: s,
            scope: Scope { exec: Some(vec!["/bin/sh".into(), "/usr/bin/curl".into()]), ..Default::default() },
            tokens: vec![],
            enforce: false,
            binding: Binding { root_pid: Some(100_000 + key), cgroup: None, launcher_sid: None },
        };
        events.push(Event::SessionStarted { ts: 0, key, session: Box::new(session) });
    }
    let creds = Creds { uid: 1000, gid: 1000, euid: Some(1000), egid: Some(1000) };
    let mut ts = s;
    let mut i = 0u32;
    while events.len() < n {
        let key = 1 + i % SESSIONS;
        let root = 100_000 + key;
        let child = 200_000 + i % 50_000;
        ts += step_ns;
        if i % 100_000 == 50_000 && key % 10 == 0 {
            events.push(Event::SessionEnded { ts, key, reason: EndReason::Requested });
        }
        events.push(Event::Fork(Fork { ts, session: key, parent: root, child, creds, cgroup: 1 }));
        let exe = if i % 7 == 0 { "/usr/bin/wget" } else { "/usr/bin/curl" };
        events.push(Event::Exec(Exec {
            ts: ts + 10,
            session: key,
            pid: child,
            ppid: root,
            sid: None,
            exe: exe.into(),
            exe_real: None,
            argv: vec![exe.into(), "-s".into(), "http://127.0.0.2/".into()],
            argv_truncated: false,
            creds,
            cap_effective: None,
            cgroup: 1,
        }));
        events.push(Event::Exit(Exit { ts: ts + 20, session: key, pid: child, exit_code: 0 }));
        i += 1;
    }
    events.truncate(n);
    events
}
