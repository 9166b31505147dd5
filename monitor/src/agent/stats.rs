//! Polls the kernel's per-CPU loss counters and turns any increase into a `Lost` event, so the
//! agent is never silently blind.

use std::time::Duration;

use aya::maps::{MapData, PerCpuArray};
use monitor_common::Stat;
use tokio::sync::mpsc;

use crate::event::Event;

const POLL: Duration = Duration::from_secs(1);

pub async fn run(stats: PerCpuArray<MapData, u64>, out: mpsc::Sender<Event>) {
    // Every counter the kernel side keeps (monitor-common Stat): each is something not seen.
    let env_truncated = format!(
        "exec environments longer than the {} KiB scanned: a token past it was not looked for",
        monitor_common::ENV_SCAN_CAP / 1024
    );
    let watched: [(Stat, &str); 4] = [
        (Stat::RingbufFull, "kernel ring buffer full"),
        (Stat::InheritFailed, "session map full: a child was not attributed"),
        (Stat::ReadFailed, "kernel reads failed (an exec's filename, argv or environment, a parent, credentials)"),
        (Stat::EnvTruncated, &env_truncated),
    ];
    let mut last = [0u64; 4];
    let mut interval = tokio::time::interval(POLL);
    loop {
        interval.tick().await;
        for (i, (stat, source)) in watched.iter().enumerate() {
            let Ok(per_cpu) = stats.get(&(*stat as u32), 0) else { continue };
            let total: u64 = per_cpu.iter().sum();
            if total > last[i] {
                let event = Event::Lost { ts: super::now_ns(), source: (*source).to_string(), count: total - last[i] };
                last[i] = total;
                if out.send(event).await.is_err() {
                    return;
                }
            }
        }
    }
}
