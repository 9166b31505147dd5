//! An empty program on the exec tracepoint, opt-in, for measurements only: its BPF statistics
//! (run count and time) are the floor that any program's run time sits on, on this kernel and
//! machine (the dispatch, the two clock reads of the statistics, the mitigations of indirect
//! calls). What another program of the same tracepoint takes above it is that program's own work.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn floor_exec(_ctx: TracePointContext) -> u32 {
    0
}
