//! Map names, sizes, value types, and the names of the globals the loader sets.

/// `tgid -> session key`: processes bound to a session, inherited at fork, removed at exit.
pub const MAP_PROC_SESSIONS: &str = "PROC_SESSIONS";
/// `cgroup id -> session key`: every process in that cgroup v2 belongs to the session.
pub const MAP_CGROUP_SESSIONS: &str = "CGROUP_SESSIONS";
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_STATS: &str = "STATS";
/// One-element array; element 0 is the number of cgroup bindings, so a process outside every
/// session costs one lookup when no cgroup is bound.
pub const MAP_CONFIG: &str = "CONFIG";

pub const PROC_SESSIONS_CAPACITY: u32 = 65_536;
pub const CGROUP_SESSIONS_CAPACITY: u32 = 4_096;
pub const EVENTS_BYTES: u32 = 4 * 1024 * 1024;

/// Index of each counter in the per-CPU `STATS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// The ring buffer was full: an event was lost.
    RingbufFull = 0,
    /// A session inherited at fork could not be recorded (map full).
    InheritFailed = 1,
    /// A kernel read failed (filename, argv, parent, credentials).
    ReadFailed = 2,
}
pub const STAT_COUNT: u32 = 3;

/// Index of each value in the `CONFIG` array.
pub const CONFIG_CGROUP_BINDINGS: u32 = 0;
pub const CONFIG_LEN: u32 = 1;

/// Globals (read-only data) the loader fills from the running kernel's BTF and tracefs formats.
/// Offsets that could not be resolved stay 0 (and `GROUP_DEAD_OFF` stays `u32::MAX`).
pub mod globals {
    pub const TASK_REAL_PARENT: &str = "TASK_REAL_PARENT_OFF";
    pub const TASK_TGID: &str = "TASK_TGID_OFF";
    pub const TASK_CRED: &str = "TASK_CRED_OFF";
    pub const TASK_MM: &str = "TASK_MM_OFF";
    pub const TASK_EXIT_CODE: &str = "TASK_EXIT_CODE_OFF";
    pub const CRED_EUID: &str = "CRED_EUID_OFF";
    pub const CRED_EGID: &str = "CRED_EGID_OFF";
    pub const MM_ARG_START: &str = "MM_ARG_START_OFF";
    pub const MM_ARG_END: &str = "MM_ARG_END_OFF";
    /// Offsets of tracepoint payload fields, from /sys/kernel/tracing/events/*/*/format.
    pub const NEWTASK_PID: &str = "NEWTASK_PID_OFF";
    pub const NEWTASK_CLONE_FLAGS: &str = "NEWTASK_CLONE_FLAGS_OFF";
    pub const EXEC_FILENAME: &str = "EXEC_FILENAME_OFF";
    pub const EXEC_OLD_PID: &str = "EXEC_OLD_PID_OFF";
    pub const EXIT_GROUP_DEAD: &str = "EXIT_GROUP_DEAD_OFF";
}
