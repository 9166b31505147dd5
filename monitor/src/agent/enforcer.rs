//! Applies the engine's effects: the kernel's view of ended and forgotten sessions, and the
//! killing of processes an enforcing session's task left behind.

use std::{collections::HashSet, sync::Arc};

use tokio::sync::{mpsc, Mutex};

use crate::{
    credentials::CredentialIndex,
    engine::Effect,
    probes::{KernelMaps, Probes},
};

pub async fn run(
    maps: Arc<Mutex<KernelMaps>>,
    credentials: Arc<CredentialIndex>,
    probes: Arc<std::sync::Mutex<Probes>>,
    mut effects: mpsc::Receiver<Effect>,
) {
    // An effect taken from the queue while gathering forgotten sessions, handled next.
    let mut held: Option<Effect> = None;
    loop {
        let effect = match held.take() {
            Some(effect) => effect,
            None => match effects.recv().await {
                Some(effect) => effect,
                None => return,
            },
        };
        match effect {
            Effect::SessionEnded(key) => maps.lock().await.mark_ended(key),
            Effect::Forget(key) => {
                // Sessions are forgotten together (all those done by one housekeeping pass):
                // one walk of the kernel maps for all of them, not one per session.
                let mut keys = HashSet::from([key]);
                while let Ok(next) = effects.try_recv() {
                    match next {
                        Effect::Forget(key) => {
                            keys.insert(key);
                        }
                        other => {
                            held = Some(other);
                            break;
                        }
                    }
                }
                // A forgotten session's tokens are no longer looked for; its files go at the
                // next rescan.
                for key in &keys {
                    credentials.forget_session(*key);
                }
                let mut maps = maps.lock().await;
                maps.forget(&keys);
                let tokens_known = maps.sync_token_hashes(credentials.seed(), &credentials.token_hashes());
                probes.lock().unwrap_or_else(|p| p.into_inner()).set_tokens_known(tokens_known);
            }
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
