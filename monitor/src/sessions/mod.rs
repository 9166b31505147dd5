//! Delegation sessions: the session file, the resolved session, the control plane that
//! registers them, and their binding to processes and cgroups in the kernel.

pub mod bind;
pub mod client;
pub mod fingerprint;
pub mod hosts;
pub mod kernel_policy;
pub mod protocol;
pub mod remote;
mod scope;
mod spec;

pub use scope::{mapped, mapped_prefix, with_real_paths, Destination, Host};
pub use spec::*;

/// Where the agent listens and the CLI connects by default.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/monitor/control.sock";
