//! Reads the ring buffer, decodes and enriches each record, and passes it to the core task.
//! When the core falls behind, the channel fills, this task waits, the ring buffer fills, and
//! the kernel counts what it drops: loss is always visible as `monitor_blind`.

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::{
    decode::{decode, Clock},
    event::Event,
};

/// How long an event may wait in the ring buffer when the probes did not wake the reader.
/// Shorter costs idle CPU on every host (measured: 10 ms added ~2% to an exec loop on 2
/// cores); longer delays alerts. Enforcement does not wait for it: the kernel decides.

const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(40);

pub async fn run(ring: RingBuf<MapData>, clock: Clock, out: mpsc::Sender<Event>) -> anyhow::Result<()> {
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
        let ring = fd.get_mut();
        while let Some(record) = ring.next() {
            match decode(&record, clock) {
                Ok(event) => batch.push(event),
                Err(e) => tracing::warn!("dropping undecodable kernel record: {e}"),
            }
        }

        for mut event in batch.drain(..) {
            enrich(&mut event);
            if out.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Host facts the engine may not read itself (it is pure), recorded in the event instead.
fn enrich(event: &mut Event) {
    if let Event::Exec(exec) = event {
        if exec.exe.starts_with('/') {
            if let Ok(real) = std::fs::canonicalize(&exec.exe) {
                let real = real.display().to_string();
                if real != exec.exe {
                    exec.exe_real = Some(real);
                }
            }
        }
    }
}
