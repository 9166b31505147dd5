//! Ring-buffer events. Each starts with [`EventHeader`]; `kind` says which struct follows.

/// Bumped whenever the layout of any event changes; userspace refuses other versions.
pub const WIRE_VERSION: u16 = 1;

/// Which event follows the header. Numbers are fixed and never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Fork = 1,
    Exec = 2,
    Exit = 3,
    Connect = 4,
    ConnectResult = 5,
    Resolve = 6,
}

impl TryFrom<u32> for EventKind {
    type Error = u32;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Fork),
            2 => Ok(Self::Exec),
            3 => Ok(Self::Exit),
            4 => Ok(Self::Connect),
            5 => Ok(Self::ConnectResult),
            6 => Ok(Self::Resolve),
            other => Err(other),
        }
    }
}

/// The common head of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    pub version: u16,
    pub _pad0: u16,
    /// Size in bytes of the whole event, header included.
    pub size: u32,
    /// The kernel-side session key the process belongs to (never 0 in an emitted event).
    pub session: u32,
    /// `bpf_ktime_get_boot_ns`: nanoseconds since boot, suspend included.
    pub ts_ns: u64,
    /// Thread id of the task that triggered the event.
    pub pid: u32,
    /// Process id (thread-group id).
    pub tgid: u32,
    /// Real uid and gid.
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
}
const _: () = assert!(core::mem::size_of::<EventHeader>() == 48);

/// A length-carrying fixed buffer. `len` may be less than `N`; `len == N` means it may have been
/// cut short.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Bytes<const N: usize> {
    pub len: u32,
    pub buf: [u8; N],
}

impl<const N: usize> Bytes<N> {
    /// The valid part, bounds-checked: a corrupt `len` gives at most the whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        let len = (self.len as usize).min(N);
        &self.buf[..len]
    }

    pub fn is_full(&self) -> bool {
        self.len as usize >= N
    }
}

/// A new process (not a thread) created by a session process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForkEvent {
    pub header: EventHeader,
    /// pid of the new process; the header's tgid is its parent.
    pub child_tgid: u32,
    pub _pad0: u32,
}
const _: () = assert!(core::mem::size_of::<ForkEvent>() == 56);

pub const FILENAME_CAP: usize = 256;
pub const ARGV_CAP: usize = 1024;

/// A successful exec by a session process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Thread-group id of the real parent at exec time (0 when the offset was not resolved).
    pub ppid: u32,
    /// Effective uid and gid after the exec (`u32::MAX` when the offset was not resolved).
    pub euid: u32,
    pub egid: u32,
    /// The thread id that called exec (differs from pid when a non-leader thread execs).
    pub old_pid: u32,
    /// The path given to exec, as the kernel resolved it.
    pub filename: Bytes<FILENAME_CAP>,
    /// argv of the new image, NUL-separated, read from its `mm->arg_start..arg_end`.
    pub argv: Bytes<ARGV_CAP>,
}
const _: () = assert!(core::mem::size_of::<ExecEvent>() == 48 + 16 + 4 + FILENAME_CAP + 4 + ARGV_CAP);
const _: () = assert!(core::mem::size_of::<ExecEvent>() % 8 == 0);

/// The last thread of a session process exited.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    pub header: EventHeader,
    /// `task->exit_code` in wait-status form (`code << 8 | signal`); 0 when unresolved.
    pub exit_code: u32,
    pub _pad0: u32,
}
const _: () = assert!(core::mem::size_of::<ExitEvent>() == 56);

/// Which hook saw an outbound destination.
pub const HOOK_CONNECT: u8 = 0;
pub const HOOK_SENDMSG: u8 = 1;

/// What the connect hook decided. Only enforcing sessions are ever blocked.
pub const VERDICT_ALLOWED: u8 = 0;
pub const VERDICT_BLOCKED_SCOPE: u8 = 1;
pub const VERDICT_BLOCKED_ENDED: u8 = 2;
pub const VERDICT_BLOCKED_EXPIRED: u8 = 3;

/// An outbound connect (TCP, connected UDP) or unconnected UDP send by a session process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectEvent {
    pub header: EventHeader,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// SOCK_STREAM (1), SOCK_DGRAM (2), ...
    pub sock_type: u16,
    pub protocol: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// [`HOOK_CONNECT`] or [`HOOK_SENDMSG`].
    pub hook: u8,
    /// One of the `VERDICT_*` values.
    pub verdict: u8,
    /// The socket's fd in the caller (from sys_enter_connect), -1 when unknown.
    pub fd: i32,
    /// Destination address; IPv4 as an IPv4-mapped IPv6 address (::ffff:a.b.c.d).
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<ConnectEvent>() == 48 + 8 + 8 + 16);

/// The return value of a session process's connect(2).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectResultEvent {
    pub header: EventHeader,
    pub fd: i32,
    /// 0, or a negative errno (-EINPROGRESS for a non-blocking connect under way).
    pub ret: i32,
}
const _: () = assert!(core::mem::size_of::<ConnectResultEvent>() == 56);

pub const NAME_CAP: usize = 128;
pub const RESOLVE_ADDRS: usize = 8;

/// A successful getaddrinfo(3) in a session process: the name and up to 8 distinct addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ResolveEvent {
    pub header: EventHeader,
    /// How many of `addrs` are valid.
    pub count: u32,
    pub name: Bytes<NAME_CAP>,
    /// IPv4 as IPv4-mapped IPv6.
    pub addrs: [[u8; 16]; RESOLVE_ADDRS],
}
const _: () = assert!(core::mem::size_of::<ResolveEvent>() == 48 + 4 + 4 + NAME_CAP + 16 * RESOLVE_ADDRS);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, and have no implicit padding (asserted by size
    // above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::ForkEvent {}
    unsafe impl aya::Pod for super::ExecEvent {}
    unsafe impl aya::Pod for super::ExitEvent {}
    unsafe impl aya::Pod for super::ConnectEvent {}
    unsafe impl aya::Pod for super::ConnectResultEvent {}
    unsafe impl aya::Pod for super::ResolveEvent {}
}
