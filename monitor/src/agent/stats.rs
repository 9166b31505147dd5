//! Polls the kernel's per-CPU loss counters and turns any increase into a `Lost` event, so the
//! agent is never silently blind.

use std::time::Duration;

use aya::maps::{MapData, PerCpuArray};
use monitor_common::Stat;
use tokio::sync::mpsc;

use crate::event::Event;

const POLL: Duration = Duration::from_secs(1);

pub async fn run(stats: PerCpuArray<MapData, u64>, out: mpsc::Sender<Event>) {
    let watched = [
        (Stat::RingbufFull, "kernel ring buffer full"),
        (Stat::InheritFailed, "session map full: a child was not attributed"),
    ];
    let mut last = [0u64; 2];
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
