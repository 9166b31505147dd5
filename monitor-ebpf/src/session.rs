//! Which session, if any, the current task belongs to.

use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid};
use monitor_common::{CONFIG_CGROUP_BINDINGS, CONFIG_PROC_BINDINGS, CONFIG_TOKEN_COUNT};

use crate::maps::{config, CGROUP_SESSIONS, PROC_SESSIONS};

/// The session key of `tgid`, first by process binding (only when some process may be bound),
/// then (only when some cgroup is bound) by the current cgroup. A task outside every session
/// costs one hash lookup when no cgroup is bound, and none when no session exists.
#[inline(always)]
pub fn of_current(tgid: u32) -> Option<u32> {
    // With no session on the host, every process costs this one array read (inlined by the
    // verifier), not a hash lookup into a cold table.
    if config(CONFIG_PROC_BINDINGS) != 0 {
        if let Some(binding) = PROC_SESSIONS.get_ptr(tgid) {
            // SAFETY: valid map value pointer for the duration of this program run.
            return Some(unsafe { (*binding).session });
        }
    }
    if config(CONFIG_CGROUP_BINDINGS) == 0 {
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

/// Whether some session's token is looked for (in environments, command lines and on the wire
/// of processes outside sessions).
#[inline(always)]
pub fn tokens_looked_for() -> bool {
    config(CONFIG_TOKEN_COUNT) != 0
}
