//! monitor: ties process activity to delegation sessions (see DESIGN.md and README.md).
//!
//! The pipeline, one module a stage: [`probes`] load the eBPF programs, [`decode`] turns wire
//! events into [`event`]s, [`engine`] applies the rules, [`sinks`] write [`alert`]s; [`sessions`]
//! is the control plane that declares sessions; [`agent`] wires it together; [`cli`] and [`run`]
//! are the commands.

pub mod agent;
pub mod alert;
pub mod alerts_summary;
pub mod cli;
pub mod collector;
pub mod config;
pub mod credentials;
pub mod decode;
pub mod dns;
pub mod encode;
pub mod engine;
pub mod event;
pub mod fleet;
pub mod forward;
pub mod hex;
pub mod host;
pub mod k8s;
pub mod metrics;
pub mod policy;
pub mod probes;
pub mod replay;
pub mod rules;
pub mod run;
pub mod sessions;
pub mod sinks;
pub mod tls;
pub mod trace;
pub mod yaml;
