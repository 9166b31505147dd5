//! Polls the kernel's per-CPU loss counters and turns any increase into a `Lost` event, so the
//! agent is never silently blind. Records lost to a full ring buffer are also counted by the
//! session whose process made them: those name the session; the rest are host-wide.

use std::{collections::HashMap, time::Duration};

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use monitor_common::Stat;
use tokio::sync::mpsc;

use crate::event::{Event, SessionKey};

const POLL: Duration = Duration::from_secs(1);
const RINGBUF_FULL: &str = "kernel ring buffer full";

pub async fn run(
    stats: PerCpuArray<MapData, u64>,
    session_losses: PerCpuHashMap<MapData, u32, u64>,
    out: mpsc::Sender<Event>,
) {
    // Every counter the kernel side keeps (monitor-common Stat): each is something not seen.
    let env_truncated = format!(
        "exec environments longer than the {} KiB scanned: a token past it was not looked for",
        monitor_common::ENV_SCAN_CAP / 1024
    );
    let watched: [(Stat, &str); 4] = [
        (Stat::RingbufFull, RINGBUF_FULL),
        (Stat::InheritFailed, "session map full: a child was not attributed"),
        (Stat::ReadFailed, "kernel reads failed (an exec's filename, argv or environment, a parent, credentials)"),
        (Stat::EnvTruncated, &env_truncated),
    ];
    let mut last = [0u64; 4];
    let mut by_session = SessionLosses::default();
    let mut interval = tokio::time::interval(POLL);
    loop {
        interval.tick().await;
        let now = crate::host::now_ns();
        let mut events = Vec::new();
        // Read before the host-wide counter: a loss counted between the two reads is then
        // host-wide this round and not twice.
        let of_sessions = by_session.increases(&session_losses);
        for (i, (stat, source)) in watched.iter().enumerate() {
            let Ok(per_cpu) = stats.get(&(*stat as u32), 0) else { continue };
            let total: u64 = per_cpu.iter().sum();
            if total <= last[i] {
                continue;
            }
            let mut count = total - last[i];
            last[i] = total;
            if *stat == Stat::RingbufFull {
                for (key, lost) in &of_sessions {
                    let source = (*source).to_string();
                    events.push(Event::Lost { ts: now, source, count: *lost, session: Some(*key) });
                    count = count.saturating_sub(*lost);
                }
                if count == 0 {
                    continue;
                }
            }
            events.push(Event::Lost { ts: now, source: (*source).to_string(), count, session: None });
        }
        for event in events {
            if out.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// The per-session loss counts read last, to report only what grew.
#[derive(Default)]
struct SessionLosses {
    last: HashMap<SessionKey, u64>,
}

impl SessionLosses {
    /// The sessions whose count grew since the last read, and by how much.
    fn increases(&mut self, map: &PerCpuHashMap<MapData, u32, u64>) -> Vec<(SessionKey, u64)> {
        let mut grew = Vec::new();
        let mut now = HashMap::new();
        for entry in map.iter() {
            let Ok((key, per_cpu)) = entry else { continue };
            let total: u64 = per_cpu.iter().sum();
            let before = self.last.get(&key).copied().unwrap_or(0);
            if total > before {
                grew.push((key, total - before));
            }
            now.insert(key, total);
        }
        self.last = now;
        grew
    }
}
