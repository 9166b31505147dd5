//! Which session, if any, the current task belongs to.

use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid};
use monitor_common::CONFIG_CGROUP_BINDINGS;

use crate::maps::{CGROUP_SESSIONS, CONFIG, PROC_SESSIONS};

/// The session key of `tgid`, first by process binding, then (only when some cgroup is bound) by
/// the current cgroup. A task outside every session costs one hash lookup when no cgroup is bound.
#[inline(always)]
pub fn of_current(tgid: u32) -> Option<u32> {
    if let Some(key) = PROC_SESSIONS.get_ptr(tgid) {
        // SAFETY: valid map value pointer for the duration of this program run.
        return Some(unsafe { *key });
    }
    let cgroup_bindings = CONFIG.get(CONFIG_CGROUP_BINDINGS).copied().unwrap_or(0);
    if cgroup_bindings == 0 {
        return None;
    }
    // SAFETY: helper without preconditions.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    CGROUP_SESSIONS.get_ptr(cgroup).map(|key| unsafe { *key })
}

/// `(tid, tgid)` of the current task.
#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    (id as u32, (id >> 32) as u32)
}
