//! Fluent Forward: the protocol, the agent's spooled, acknowledged output, and the spool.

pub mod client;
pub mod protocol;
pub mod spool;

pub use client::{ForwardOutput, ForwardTarget};
