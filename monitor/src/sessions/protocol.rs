//! The control protocol: one JSON request line, one JSON response line, over a Unix socket
//! that only root may use.

use serde::{Deserialize, Serialize};

use super::{fingerprint::Secret, SessionFile, SessionId};
use crate::event::EndReason;

fn requested() -> EndReason {
    EndReason::Requested
}

/// Requests are bounded; a larger one is refused and its connection closed.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Start {
        /// The session file's path, for messages.
        origin: String,
        file: SessionFile,
        /// Overrides the file's id.
        id: Option<SessionId>,
        bind: BindRequest,
        /// Values of the file's `tokens: env:` entries, in order, read by the CLI from its own
        /// environment (`None` where the variable is unset). Fingerprinted on receipt.
        env_tokens: Vec<Option<Secret>>,
    },
    End {
        id: String,
        /// `root_exited` when `monitor run` reports that its task's process exited.
        #[serde(default = "requested")]
        reason: EndReason,
    },

    List,
    Show {
        id: String,
    },
    /// The agent's eBPF programs, attached or not, with the kernel's run counts and times.
    Probes,
    /// Re-read the agent's policy file (as SIGHUP does).
    ReloadPolicy,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindRequest {
    /// A root process: it and its descendants join the session.
    pub pid: Option<u32>,
    /// A cgroup v2 directory, absolute or relative to the cgroup2 mount.
    pub cgroup: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Ok {
        #[serde(default)]
        data: serde_json::Value,
    },
    Error {
        message: String,
    },
}
