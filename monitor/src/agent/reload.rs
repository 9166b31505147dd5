//! The policy in force, and its reload (SIGHUP, `monitor policy reload`). The file is read and
//! checked whole first: a bad one is refused with its error and the running policy stays.
//!
//! What a reload changes at once: severities, `never_alert` (for alerts), the fold window and
//! token learning (the engine gets them as an event, so traces replay them in order); for the
//! sessions started from then on, actor scopes and the kernel's `never_alert` exemptions; the
//! credential watch list at its next rescan; the default ttl and grace of the sessions started
//! from then on (where no `--default-ttl`/`--default-grace` flag sets them); `api_key_headers`
//! for the next requests read; `tls.executable_dirs`, looked through again at once.

use std::{path::PathBuf, sync::Arc};

use tokio::sync::{mpsc, watch};

use crate::{engine::EngineConfig, event::Event, policy::Policy};

pub struct LivePolicy {
    /// The policy in force; the reader and the executables task watch it for changes.
    current: watch::Sender<Arc<Policy>>,
    /// The agent's `--policy` file (none: the built-in policy, nothing to reload).
    path: Option<PathBuf>,
    /// The core's event queue: the engine's part of a reload goes in order with the events.
    events: mpsc::Sender<Event>,
}

impl LivePolicy {
    pub fn new(policy: Policy, path: Option<PathBuf>, events: mpsc::Sender<Event>) -> Arc<Self> {
        Arc::new(Self { current: watch::Sender::new(Arc::new(policy)), path, events })
    }

    /// The policy in force now.
    pub fn get(&self) -> Arc<Policy> {
        self.current.borrow().clone()
    }

    /// Told of each reload (see [`watch::Receiver::has_changed`]).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Policy>> {
        self.current.subscribe()
    }

    /// Re-reads the policy file; on success it is in force when this returns.
    pub async fn reload(&self) -> Result<String, String> {
        let Some(path) = &self.path else {
            return Err("the agent runs with the built-in policy (no --policy): nothing to reload".to_string());
        };
        let policy = Policy::read(path).map_err(|e| format!("policy not reloaded, the running one stays: {e}"))?;
        let config = EngineConfig::from_policy(&policy);
        self.current.send_replace(Arc::new(policy));
        let event = Event::PolicyReloaded { ts: crate::host::now_ns(), config: Box::new(config) };
        self.events.send(event).await.map_err(|_| "the agent is stopping".to_string())?;
        Ok(format!("policy {} reloaded", path.display()))
    }
}
