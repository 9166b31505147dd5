//! Every map of the eBPF side. Names must match `monitor_common::maps::MAP_*`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use monitor_common::{Stat, CGROUP_SESSIONS_CAPACITY, CONFIG_LEN, EVENTS_BYTES, PROC_SESSIONS_CAPACITY, STAT_COUNT};

#[map]
pub static PROC_SESSIONS: HashMap<u32, u32> = HashMap::with_max_entries(PROC_SESSIONS_CAPACITY, 0);

#[map]
pub static CGROUP_SESSIONS: HashMap<u64, u32> = HashMap::with_max_entries(CGROUP_SESSIONS_CAPACITY, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

#[map]
pub static CONFIG: Array<u64> = Array::with_max_entries(CONFIG_LEN, 0);

/// Counts a failure the hook could not report otherwise. Per-CPU, so no atomics are needed.
#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the pointer comes from the map and is valid for this CPU for this program run.
        unsafe { *slot += 1 };
    }
}
