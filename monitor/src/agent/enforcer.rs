//! Applies the engine's effects: the kernel's view of ended and forgotten sessions, and the
//! killing of processes an enforcing session's task left behind.

use std::sync::Arc;

use tokio::sync::{mpsc, Mutex};

use crate::{engine::Effect, probes::KernelMaps};

pub async fn run(maps: Arc<Mutex<KernelMaps>>, mut effects: mpsc::Receiver<Effect>) {
    while let Some(effect) = effects.recv().await {
        match effect {
            Effect::SessionEnded(key) => maps.lock().await.mark_ended(key),
            Effect::Forget(key) => maps.lock().await.forget(key),
            Effect::Kill { session, pid } => {
                // SAFETY: sending a signal; the engine saw no exit of this pid, so it is still
                // the session's process.
                if unsafe { libc::kill(pid as i32, libc::SIGKILL) } != 0 {
                    let e = std::io::Error::last_os_error();
                    tracing::warn!(session, pid, "killing a process that outlived its task: {e}");
                } else {
                    tracing::info!(session, pid, "killed a process that outlived its task");
                }
            }
        }
    }
}
