//! Ring-buffer events. Each starts with [`EventHeader`]; `kind` says which struct follows.

/// Bumped whenever the layout of any event changes; userspace refuses other versions.
pub const WIRE_VERSION: u16 = 3;

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
    FileOpen = 7,
    EnvToken = 8,
    Payload = 9,
    CredChange = 10,
    Executable = 11,
    DnsAnswer = 12,
    TlsPeer = 13,
    ArgvToken = 14,
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
            7 => Ok(Self::FileOpen),
            8 => Ok(Self::EnvToken),
            9 => Ok(Self::Payload),
            10 => Ok(Self::CredChange),
            11 => Ok(Self::Executable),
            12 => Ok(Self::DnsAnswer),
            13 => Ok(Self::TlsPeer),
            14 => Ok(Self::ArgvToken),
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
    /// The kernel-side session key the process belongs to; 0 for a process outside every session
    /// (only credential events are emitted for those).
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

/// A Unix session id the kernel could not read (0 is a real one: init's session).
pub const SID_UNKNOWN: u32 = u32::MAX;

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
    /// Its Unix session at the exec ([`SID_UNKNOWN`] when the offsets were not resolved; 0 is
    /// init's session, that of every process no one called `setsid` for).
    pub sid: u32,
    pub _pad0: u32,
    /// Effective capabilities after the exec (`u64::MAX` when the offset was not resolved).
    pub cap_effective: u64,
    /// The path given to exec, as the kernel resolved it.
    pub filename: Bytes<FILENAME_CAP>,
    /// argv of the new image, NUL-separated, read from its `mm->arg_start..arg_end`.
    pub argv: Bytes<ARGV_CAP>,
}
const _: () = assert!(core::mem::size_of::<ExecEvent>() == 48 + 24 + 8 + 4 + FILENAME_CAP + 4 + ARGV_CAP);
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

pub const COMM_CAP: usize = 16;

/// A process (any process) opened a watched credential file. The file is identified by the
/// device and inode the open resolved to, so relative paths, symlinks and hard links all match.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileOpenEvent {
    pub header: EventHeader,
    /// The new descriptor.
    pub fd: i32,
    /// `file->f_flags` (O_RDONLY, O_WRONLY, O_RDWR, ...); `u32::MAX` when unresolved.
    pub flags: u32,
    /// `sb->s_dev` in the kernel's encoding (major << 20 | minor).
    pub dev: u32,
    pub _pad0: u32,
    pub ino: u64,
    pub comm: [u8; COMM_CAP],
}
const _: () = assert!(core::mem::size_of::<FileOpenEvent>() == 48 + 24 + COMM_CAP);

pub const ENV_NAME_CAP: usize = 60;

/// A process exec'd with a watched token as the value of an environment variable.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EnvTokenEvent {
    pub header: EventHeader,
    /// [`token_hash`] of the value (under the agent's seed): which token it is.
    pub hash: u64,
    /// The exec'ing process's parent: which lineage carried the token (alerts fold by it).
    pub ppid: u32,
    /// Its Unix session at the exec ([`SID_UNKNOWN`] when the offsets were not resolved):
    /// whether it is the session launcher's.
    pub sid: u32,
    pub comm: [u8; COMM_CAP],
    /// The variable's name (never its value).
    pub name: Bytes<ENV_NAME_CAP>,
}
const _: () = assert!(core::mem::size_of::<EnvTokenEvent>() == 48 + 8 + 8 + COMM_CAP + 4 + ENV_NAME_CAP);

/// A process outside every session exec'd with a watched token as a word of its command line
/// (`--token=X`, `Bearer X`, `user:X@host`, a bare `X`). Session processes' command lines go to
/// userspace whole, in [`ExecEvent`], and are searched there.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ArgvTokenEvent {
    pub header: EventHeader,
    /// [`token_hash`] of the word: which token it is.
    pub hash: u64,
    /// As in [`EnvTokenEvent`].
    pub ppid: u32,
    pub sid: u32,
    pub comm: [u8; COMM_CAP],
    /// Which argument held it (0 is the program's name).
    pub index: u32,
    pub _pad0: u32,
}
const _: () = assert!(core::mem::size_of::<ArgvTokenEvent>() == 48 + 8 + 8 + COMM_CAP + 8);

/// Where a payload was captured.
pub const PAYLOAD_SSL_WRITE: u8 = 1;
pub const PAYLOAD_SSL_WRITE_EX: u8 = 2;
pub const PAYLOAD_TCP: u8 = 3;
/// Go's `crypto/tls.(*Conn).Write`, in the executable.
pub const PAYLOAD_GO_TLS: u8 = 4;
/// GnuTLS `gnutls_record_send`.
pub const PAYLOAD_GNUTLS: u8 = 5;
/// Data a session process read (OpenSSL `SSL_read`/`SSL_read_ex`, Go `(*tls.Conn).Read`) on a connection whose
/// last request was a POST (a token endpoint's response, RFC 6749 §5.1).
pub const PAYLOAD_SSL_READ: u8 = 6;

/// `PayloadRecord::flags`: the data belongs to an HTTP/2 connection (from its client preface on),
/// to be decoded as a frame stream in order, not as a request of its own.
pub const PAYLOAD_FLAG_H2: u8 = 1;

pub const PAYLOAD_CAP: usize = 4096;
/// The data capacity of the short payload record: most requests, a bearer JWT included, fit
/// in it, and a quarter of the ring buffer per event means a quarter of the reader's wakeups.
pub const PAYLOAD_SMALL_CAP: usize = 1024;

/// The first bytes of an outbound request that starts like HTTP/1.x, or of a write on an HTTP/2
/// connection: TLS plaintext given to OpenSSL, or a plaintext TCP segment. Userspace parses it
/// and keeps only fingerprints.
/// Two sizes share this layout ([`PayloadEvent`], [`SmallPayloadEvent`]); `header.size` says
/// which, and the data sits at the same offset in both.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PayloadRecord<const N: usize> {
    pub header: EventHeader,
    /// One of the `PAYLOAD_*` values.
    pub source: u8,
    /// `PAYLOAD_FLAG_*`.
    pub flags: u8,
    /// Destination port, host byte order (0 when unknown: TLS).
    pub port: u16,
    /// Length of the whole write or segment (`data` holds at most `N` bytes of it).
    pub total_len: u32,
    /// Destination address, IPv4-mapped for IPv4; all zero when unknown (TLS).
    pub addr: [u8; 16],
    /// The connection within the process: the `SSL *` for TLS, the socket cookie for TCP.
    pub conn: u64,
    pub comm: [u8; COMM_CAP],
    /// TCP: the segment's sequence number (retransmissions repeat one); TLS: 0.
    pub seq: u32,
    pub data: Bytes<N>,
}
pub type PayloadEvent = PayloadRecord<PAYLOAD_CAP>;
pub type SmallPayloadEvent = PayloadRecord<PAYLOAD_SMALL_CAP>;
const _: () =
    assert!(core::mem::size_of::<SmallPayloadEvent>() == 48 + 8 + 16 + 8 + COMM_CAP + 4 + 4 + PAYLOAD_SMALL_CAP);
const _: () = assert!(core::mem::size_of::<PayloadEvent>() == 48 + 8 + 16 + 8 + COMM_CAP + 4 + 4 + PAYLOAD_CAP);

/// An executable file exec'd for the first time since the agent started (any process): userspace
/// looks in it once for TLS code to probe (Go's crypto/tls, a statically linked OpenSSL).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecutableEvent {
    pub header: EventHeader,
    /// `sb->s_dev` in the kernel's encoding (major << 20 | minor).
    pub dev: u32,
    pub _pad0: u32,
    pub ino: u64,
    /// The path given to exec (may be relative to the caller's directory).
    pub filename: Bytes<FILENAME_CAP>,
    pub _pad1: u32,
}
const _: () = assert!(core::mem::size_of::<ExecutableEvent>() == 48 + 16 + 4 + FILENAME_CAP + 4);

pub const DNS_CAP: usize = 1024;

/// A DNS message received from port 53 by a socket a session process sent a query from (UDP, or
/// one TCP segment that holds a whole message): userspace reads the names and addresses in it.
/// Or, with [`DNS_TCP_PIECE`], a TCP segment that holds part of the stream (a length prefix sent
/// on its own, a message over several segments): userspace joins the pieces by `seq`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DnsAnswerEvent {
    pub header: EventHeader,
    /// IPPROTO_UDP (17) or IPPROTO_TCP (6).
    pub transport: u8,
    /// [`DNS_TCP_PIECE`] or 0.
    pub flags: u8,
    pub _pad0: [u8; 2],
    /// Length of the whole message, or of the segment's payload for a piece (`data` holds at
    /// most [`DNS_CAP`] bytes of it).
    pub total_len: u32,
    /// The receiving socket (its cookie): the stream a piece belongs to.
    pub socket: u64,
    /// The TCP sequence number of the segment's first payload byte (TCP only).
    pub seq: u32,
    pub data: Bytes<DNS_CAP>,
}
const _: () = assert!(core::mem::size_of::<DnsAnswerEvent>() == 48 + 8 + 8 + 4 + 4 + DNS_CAP);

/// [`DnsAnswerEvent::flags`]: the data is a TCP segment's payload, not a whole message.
pub const DNS_TCP_PIECE: u8 = 1;

/// The TCP peer of a TLS connection (`conn` as in [`PayloadRecord::conn`]): seen when the first
/// segment a reported TLS write made leaves the host, from the same thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TlsPeerEvent {
    pub header: EventHeader,
    pub conn: u64,
    /// IPv4-mapped for IPv4.
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad0: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<TlsPeerEvent>() == 48 + 8 + 16 + 8);

/// Which credential-changing call succeeded.
pub const CRED_SETUID: u32 = 1;
pub const CRED_SETREUID: u32 = 2;
pub const CRED_SETRESUID: u32 = 3;
pub const CRED_SETFSUID: u32 = 4;
pub const CRED_CAPSET: u32 = 5;
/// Seen at a capability check (`capability:cap_capable`): the effective set changed since the
/// process's last exec, fork or check.
pub const CRED_CAP_CHECK: u32 = 6;

/// A session process changed its credentials (setuid family, capset) successfully.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CredChangeEvent {
    pub header: EventHeader,
    /// One of the `CRED_*` values.
    pub call: u32,
    /// Effective uid after the call (`u32::MAX` when unresolved).
    pub euid: u32,
    /// Effective capabilities after the call (`u64::MAX` when unresolved).
    pub cap_effective: u64,
}
const _: () = assert!(core::mem::size_of::<CredChangeEvent>() == 48 + 16);

/// The token hash: FNV-1a 64 over the value, started from a per-agent random seed so the kernel
/// map holds nothing precomputable. A prefilter only: userspace fingerprints with HMAC.
#[inline(always)]
pub const fn token_hash_step(hash: u64, byte: u8) -> u64 {
    (hash ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

pub fn token_hash(seed: u64, value: &[u8]) -> u64 {
    let mut hash = seed;
    let mut i = 0;
    while i < value.len() {
        hash = token_hash_step(hash, value[i]);
        i += 1;
    }
    hash
}

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
    unsafe impl aya::Pod for super::FileOpenEvent {}
    unsafe impl aya::Pod for super::EnvTokenEvent {}
    unsafe impl aya::Pod for super::ArgvTokenEvent {}
    unsafe impl aya::Pod for super::PayloadEvent {}
    unsafe impl aya::Pod for super::SmallPayloadEvent {}
    unsafe impl aya::Pod for super::CredChangeEvent {}
    unsafe impl aya::Pod for super::ExecutableEvent {}
    unsafe impl aya::Pod for super::DnsAnswerEvent {}
    unsafe impl aya::Pod for super::TlsPeerEvent {}
}

/// A ring-buffer record of one kind: what the eBPF side's `emit` reserves, heads and sends.
///
/// # Safety
/// Implementors are `#[repr(C)]` structs whose first field is their [`EventHeader`].
pub unsafe trait Record: Sized {
    const KIND: EventKind;
}

macro_rules! records {
    ($($record:ty => $kind:ident),* $(,)?) => {
        $(
            // SAFETY: each is `#[repr(C)]` with `header: EventHeader` first (see above).
            unsafe impl Record for $record {
                const KIND: EventKind = EventKind::$kind;
            }
        )*
    };
}

records! {
    ForkEvent => Fork,
    ExecEvent => Exec,
    ExitEvent => Exit,
    ConnectEvent => Connect,
    ConnectResultEvent => ConnectResult,
    ResolveEvent => Resolve,
    FileOpenEvent => FileOpen,
    EnvTokenEvent => EnvToken,
    ArgvTokenEvent => ArgvToken,
    ExecutableEvent => Executable,
    DnsAnswerEvent => DnsAnswer,
    TlsPeerEvent => TlsPeer,
    CredChangeEvent => CredChange,
}

// SAFETY: `#[repr(C)]` with `header: EventHeader` first, for every size.
unsafe impl<const N: usize> Record for PayloadRecord<N> {
    const KIND: EventKind = EventKind::Payload;
}
