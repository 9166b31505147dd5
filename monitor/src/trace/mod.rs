//! Session traces: every event the engine applied and every alert it raised, in order, as
//! checksummed MessagePack frames in rotated segment files. Live and replay run the same engine
//! on the same events, so a replay reproduces the live alerts. Events carry only fingerprints of
//! credentials, never raw values. The format is documented in docs/trace-format.md.

pub mod format;
pub mod frames;
pub mod reader;
pub mod writer;

pub use format::{Record, RunInfo, TracedAlert};
pub use writer::{TraceLimits, TraceWriter};
