//! Map names, sizes, value types, and the names of the globals the loader sets.

/// `tgid -> ProcBinding`: processes bound to a session, inherited at fork, removed at exit.
pub const MAP_PROC_SESSIONS: &str = "PROC_SESSIONS";
/// `cgroup id -> session key`: every process in that cgroup v2 belongs to the session.
pub const MAP_CGROUP_SESSIONS: &str = "CGROUP_SESSIONS";
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_STATS: &str = "STATS";
pub const MAP_SESSION_LOSSES: &str = "SESSION_LOSSES";
/// One-element array; element 0 is the number of cgroup bindings, so a process outside every
/// session costs one lookup when no cgroup is bound.
pub const MAP_CONFIG: &str = "CONFIG";

/// `session key -> SessionPolicy`: what the connect hooks enforce for a session.
pub const MAP_SESSION_POLICY: &str = "SESSION_POLICY";
/// LPM trie `(session, address prefix) -> PortRanges`: a session's allowed networks.
pub const MAP_SCOPE_NETS: &str = "SCOPE_NETS";

/// `NameKey -> PortRanges`: the DNS names (exact or suffix) an enforcing session may connect to.
pub const MAP_SCOPE_NAMES: &str = "SCOPE_NAMES";
/// `ResolvedKey -> Resolved`: addresses a session resolved from an allowed name, with expiry.
pub const MAP_RESOLVED: &str = "RESOLVED";

/// `inode number -> WatchedDevs`: credential files watched for opens, by any process.
pub const MAP_WATCHED_INODES: &str = "WATCHED_INODES";
/// `token_hash -> 1`: values of the tokens granted to sessions, looked for in exec environments.
pub const MAP_TOKEN_HASHES: &str = "TOKEN_HASHES";

pub const PROC_SESSIONS_CAPACITY: u32 = 65_536;
pub const WATCHED_INODES_CAPACITY: u32 = 16_384;
pub const TOKEN_HASHES_CAPACITY: u32 = 4_096;
/// How many devices one watched inode number can be on (an inode number is per filesystem).
pub const WATCHED_DEVS: usize = 4;

/// The devices (`s_dev`, kernel encoding) on which a watched inode number is a watched file;
/// unused slots are 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchedDevs {
    pub devs: [u32; WATCHED_DEVS],
}
const _: () = assert!(core::mem::size_of::<WatchedDevs>() == 16);

impl WatchedDevs {
    pub fn contains(&self, dev: u32) -> bool {
        dev != 0 && (self.devs[0] == dev || self.devs[1] == dev || self.devs[2] == dev || self.devs[3] == dev)
    }
}

/// Who connected a TCP socket (keyed by socket cookie), for the plaintext payload hook, which
/// runs where the current task is not always the socket's owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpOwner {
    pub tgid: u32,
    pub session: u32,
    pub port: u16,
    /// How many payload segments were looked at; the hook stops after a few unless the first was
    /// an HTTP/1.x request.
    pub segments: u16,
    /// `TCP_OWNER_*` flags.
    pub flags: u32,
    pub addr: [u8; 16],
    /// The connecting task's name.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<TcpOwner>() == 48);

/// The connection sent the HTTP/2 client preface: every later segment that may hold a header
/// block is reported (HPACK needs each block of the connection, in order).
pub const TCP_OWNER_H2: u32 = 1;
/// The connection's first payload segment was an HTTP/1.x request: every later segment that
/// starts like one is reported too (keep-alive requests, whose tokens may differ).
pub const TCP_OWNER_HTTP1: u32 = 2;

/// Key of an HTTP/2 connection over TLS: the process and its `SSL *`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsConnKey {
    pub tgid: u32,
    pub _pad0: u32,
    pub ssl: u64,
}
const _: () = assert!(core::mem::size_of::<TlsConnKey>() == 16);

/// A process's binding to a session (`PROC_SESSIONS`), with when the process started: the map
/// is pinned and outlives an agent, and an entry whose process exited while no agent ran may
/// meet a new process with the same pid. The next agent keeps an entry only if the process
/// with that pid started when the entry says (see agent/state.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcBinding {
    pub session: u32,
    pub _pad0: u32,
    /// The process's start, boot-clock ns: at its fork, when the kernel bound it; from
    /// /proc/PID/stat (a clock tick's precision) when userspace did.
    pub started_ns: u64,
}
const _: () = assert!(core::mem::size_of::<ProcBinding>() == 16);

/// Who sent a DNS query from a socket (by socket cookie): its answers are that session's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DnsSocket {
    pub tgid: u32,
    pub session: u32,
}
const _: () = assert!(core::mem::size_of::<DnsSocket>() == 8);

/// Sockets of session processes that sent to port 53.
pub const DNS_SOCKETS_CAPACITY: u32 = 8_192;

/// Slots of the cache of executables (device, inode) already reported at exec: a power of two,
/// in sets of two.
pub const EXECUTABLES_SEEN_CAPACITY: u32 = 16_384;

/// HTTP/2 connections over TLS that the probes follow.
pub const H2_TLS_CAPACITY: u32 = 16_384;

pub const CGROUP_SESSIONS_CAPACITY: u32 = 16_384;
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
    /// An exec environment (or an outsider's command line) was longer than the scanned part: a
    /// token past it was not looked for.
    EnvTruncated = 3,
}
pub const STAT_COUNT: u32 = 4;

pub const SESSION_POLICY_CAPACITY: u32 = 16_384;
/// Sessions whose lost records are counted apart (LRU: the oldest counts go first).
pub const SESSION_LOSSES_CAPACITY: u32 = 4_096;
pub const SCOPE_NETS_CAPACITY: u32 = 65_536;

/// The session enforces its scope: out-of-scope connects are refused.
pub const POLICY_ENFORCE: u32 = 1;
/// The session's task ended: an enforcing session refuses every connect.
pub const POLICY_ENDED: u32 = 2;
/// Connect destinations are restricted (the session file has a `scope.connect` list).
pub const POLICY_CONNECT_SCOPED: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionPolicy {
    pub flags: u32,
    pub _pad0: u32,
    /// Boot-clock ns after which the session's authority expired (ttl).
    pub expires_at: u64,
}
const _: () = assert!(core::mem::size_of::<SessionPolicy>() == 16);

/// Data of an LPM key of `SCOPE_NETS`: the session (always matched in full: the prefix length
/// counts its 32 bits) then the address, IPv4 as IPv4-mapped IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ScopeNet {
    pub session: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ScopeNet>() == 20);

pub const PORT_RANGES: usize = 8;

/// Allowed ports: `count` ranges, each `low << 16 | high`. A prefix's value also holds the
/// ports of every shorter prefix containing it, since an LPM lookup returns only the longest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PortRanges {
    pub count: u32,
    pub ranges: [u32; PORT_RANGES],
}
const _: () = assert!(core::mem::size_of::<PortRanges>() == 36);

impl PortRanges {
    pub fn allows(&self, port: u16) -> bool {
        let mut i = 0;
        while i < PORT_RANGES {
            if (i as u32) < self.count {
                let r = self.ranges[i];
                if port >= (r >> 16) as u16 && port <= r as u16 {
                    return true;
                }
            }
            i += 1;
        }
        false
    }
}

pub const SCOPE_NAMES_CAPACITY: u32 = 16_384;
pub const RESOLVED_CAPACITY: u32 = 16_384;
/// How long an address resolved from an allowed name stays allowed (getaddrinfo does not give
/// the DNS TTL).
pub const RESOLVED_TTL_NS: u64 = 600 * 1_000_000_000;

pub const NAME_EXACT: u32 = 1;
pub const NAME_SUFFIX: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NameKey {
    pub session: u32,
    /// [`NAME_EXACT`] or [`NAME_SUFFIX`].
    pub kind: u32,
    /// [`name_hash`] of the name, or of the suffix without its leading `*.`.
    pub hash: u64,
}
const _: () = assert!(core::mem::size_of::<NameKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ResolvedKey {
    pub session: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ResolvedKey>() == 20);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Resolved {
    pub ports: PortRanges,
    pub _pad0: u32,
    /// Boot-clock ns after which the address is no longer allowed.
    pub expires_at: u64,
}
const _: () = assert!(core::mem::size_of::<Resolved>() == 48);

/// One step of the name hash: FNV-1a 64 over the name's bytes, **last byte first**, ASCII
/// lowercased. Hashing backwards gives the hash of every suffix on the way, so the kernel checks
/// `*.suffix` scopes in one pass over the name.
#[inline(always)]
pub const fn name_hash_step(hash: u64, byte: u8) -> u64 {
    let b = if byte >= b'A' && byte <= b'Z' { byte | 0x20 } else { byte };
    (hash ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

pub const NAME_HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// The hash of a whole name (what userspace stores; the kernel reaches it byte by byte).
pub fn name_hash(name: &[u8]) -> u64 {
    let mut hash = NAME_HASH_SEED;
    let mut i = name.len();
    while i > 0 {
        i -= 1;
        hash = name_hash_step(hash, name[i]);
    }
    hash
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), Copy, no implicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::NameKey {}
    unsafe impl aya::Pod for super::ResolvedKey {}
    unsafe impl aya::Pod for super::Resolved {}
    unsafe impl aya::Pod for super::SessionPolicy {}
    unsafe impl aya::Pod for super::ScopeNet {}
    unsafe impl aya::Pod for super::PortRanges {}
    unsafe impl aya::Pod for super::WatchedDevs {}
    unsafe impl aya::Pod for super::TcpOwner {}
    unsafe impl aya::Pod for super::TlsConnKey {}
    unsafe impl aya::Pod for super::ProcBinding {}
}

/// Index of each value in the `CONFIG` array.
pub const CONFIG_CGROUP_BINDINGS: u32 = 0;
/// Number of entries in `TOKEN_HASHES`: 0 spares every exec the environment scan.
pub const CONFIG_TOKEN_COUNT: u32 = 1;
/// The seed of [`crate::token_hash`], random per agent start.
pub const CONFIG_TOKEN_SEED: u32 = 2;
/// Number of entries in `WATCHED_INODES`: 0 spares every open the inode lookup.
pub const CONFIG_WATCH_COUNT: u32 = 3;
/// Non-zero when the plaintext payload hook is attached: connects then record their socket's owner.
pub const CONFIG_TCP_OWNERS: u32 = 4;
/// Non-zero while some process may be bound to a session: with none, the per-process hooks
/// (fork, exec, exit, connect, ...) skip the `PROC_SESSIONS` lookup and return.
pub const CONFIG_PROC_BINDINGS: u32 = 5;
pub const CONFIG_LEN: u32 = 6;

/// How much of an exec's environment the kernel scans for tokens.
pub const ENV_SCAN_CAP: usize = 8192;
/// Environment values shorter than this are never looked up as tokens.
pub const TOKEN_MIN_LEN: u32 = 8;

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
    pub const MM_ENV_START: &str = "MM_ENV_START_OFF";
    pub const MM_ENV_END: &str = "MM_ENV_END_OFF";
    pub const MM_EXE_FILE: &str = "MM_EXE_FILE_OFF";
    pub const CRED_CAP_EFFECTIVE: &str = "CRED_CAP_EFFECTIVE_OFF";
    pub const TASK_FILES: &str = "TASK_FILES_OFF";
    pub const FILES_FDT: &str = "FILES_FDT_OFF";
    pub const FDT_FD: &str = "FDT_FD_OFF";
    pub const FDT_MAX_FDS: &str = "FDT_MAX_FDS_OFF";
    pub const FILE_INODE: &str = "FILE_INODE_OFF";
    pub const FILE_FLAGS: &str = "FILE_FLAGS_OFF";
    pub const INODE_INO: &str = "INODE_INO_OFF";
    pub const INODE_SB: &str = "INODE_SB_OFF";
    pub const SB_DEV: &str = "SB_DEV_OFF";
    /// `task->signal->pids[PIDTYPE_SID]->numbers[0].nr`: the Unix session, as the host sees it.
    pub const TASK_SIGNAL: &str = "TASK_SIGNAL_OFF";
    pub const SIGNAL_PIDS: &str = "SIGNAL_PIDS_OFF";
    pub const PID_NUMBERS: &str = "PID_NUMBERS_OFF";
    /// `ret` of every `syscalls/sys_exit_*` tracepoint (they share one layout).
    pub const SYS_EXIT_RET: &str = "SYS_EXIT_RET_OFF";
    /// Offsets of tracepoint payload fields, from /sys/kernel/tracing/events/*/*/format.
    pub const NEWTASK_PID: &str = "NEWTASK_PID_OFF";
    pub const NEWTASK_CLONE_FLAGS: &str = "NEWTASK_CLONE_FLAGS_OFF";
    pub const EXEC_FILENAME: &str = "EXEC_FILENAME_OFF";
    pub const EXEC_OLD_PID: &str = "EXEC_OLD_PID_OFF";
    pub const EXIT_GROUP_DEAD: &str = "EXIT_GROUP_DEAD_OFF";
    pub const CONNECT_FD: &str = "CONNECT_FD_OFF";
    pub const CONNECT_RET: &str = "CONNECT_RET_OFF";
}
