//! Every map of the eBPF side. Names must match `monitor_common::maps::MAP_*`.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use monitor_common::{
    DnsSocket, EventHeader, NameKey, PortRanges, ProcBinding, Record, Resolved, ResolvedKey, ScopeNet, SessionPolicy,
    Stat, TcpOwner, TlsConnKey, WatchedDevs, CGROUP_SESSIONS_CAPACITY, CONFIG_LEN, DNS_SOCKETS_CAPACITY, ENV_NAME_CAP,
    ENV_SCAN_CAP, EVENTS_BYTES, EXECUTABLES_SEEN_CAPACITY, H2_TLS_CAPACITY, PROC_SESSIONS_CAPACITY, RESOLVED_CAPACITY,
    SCOPE_NAMES_CAPACITY, SCOPE_NETS_CAPACITY, SESSION_LOSSES_CAPACITY, SESSION_POLICY_CAPACITY, STAT_COUNT,
    TOKEN_HASHES_CAPACITY, WATCHED_INODES_CAPACITY,
};

#[map]
pub static PROC_SESSIONS: HashMap<u32, ProcBinding> = HashMap::with_max_entries(PROC_SESSIONS_CAPACITY, 0);

#[map]
pub static CGROUP_SESSIONS: HashMap<u64, u32> = HashMap::with_max_entries(CGROUP_SESSIONS_CAPACITY, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Records lost to a full ring buffer, by the session whose process made them (per CPU, summed
/// by userspace): `monitor_blind` names the sessions whose events it did not see.
#[map]
pub static SESSION_LOSSES: LruPerCpuHashMap<u32, u64> = LruPerCpuHashMap::with_max_entries(SESSION_LOSSES_CAPACITY, 0);

#[map]
pub static SESSION_POLICY: HashMap<u32, SessionPolicy> = HashMap::with_max_entries(SESSION_POLICY_CAPACITY, 0);

#[map]
pub static SCOPE_NETS: LpmTrie<ScopeNet, PortRanges> = LpmTrie::with_max_entries(SCOPE_NETS_CAPACITY, 0);

/// `tid -> [fd, seen]` between sys_enter_connect and sys_exit_connect of a session process;
/// `seen` is set when a sock_addr hook ran for it. LRU: a connect that never returns through
/// sys_exit (io_uring) cannot leak entries.
#[map]
pub static CONNECT_FDS: LruHashMap<u32, [i32; 2]> = LruHashMap::with_max_entries(4_096, 0);

/// The effective capabilities each session process was last seen with (at fork, exec or a
/// capability check), by tgid: a capability check reports only a change.
#[map]
pub static LAST_CAPS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(65_536, 0);

/// Last time an unconnected UDP flow `(tgid, port, addr)` was reported, so a chatty UDP client
/// emits one event per flow per interval instead of one per datagram.
#[map]
pub static UDP_FLOWS: LruHashMap<[u8; 24], u64> = LruHashMap::with_max_entries(8_192, 0);

#[map]
pub static SCOPE_NAMES: HashMap<NameKey, PortRanges> = HashMap::with_max_entries(SCOPE_NAMES_CAPACITY, 0);

#[map]
pub static RESOLVED: LruHashMap<ResolvedKey, Resolved> = LruHashMap::with_max_entries(RESOLVED_CAPACITY, 0);

/// `tid -> [node, res]`: getaddrinfo's arguments, from its entry to its return.
#[map]
pub static GAI_ARGS: LruHashMap<u32, [u64; 2]> = LruHashMap::with_max_entries(4_096, 0);

#[map]
pub static CONFIG: Array<u64> = Array::with_max_entries(CONFIG_LEN, 0);

#[map]
pub static WATCHED_INODES: HashMap<u64, WatchedDevs> = HashMap::with_max_entries(WATCHED_INODES_CAPACITY, 0);

#[map]
pub static TOKEN_HASHES: HashMap<u64, u32> = HashMap::with_max_entries(TOKEN_HASHES_CAPACITY, 0);

/// `socket cookie -> TcpOwner`, written at connect, read by the plaintext payload hook. LRU: a
/// socket's entry needs no cleanup when it closes.
#[map]
pub static TCP_OWNERS: LruHashMap<u64, TcpOwner> = LruHashMap::with_max_entries(65_536, 0);

/// TLS connections (`tgid`, `SSL *`) that sent the HTTP/2 client preface: their later writes
/// are reported too (see hooks/payload.rs). LRU: a freed `SSL *` needs no cleanup.
#[map]
pub static H2_TLS_CONNS: LruHashMap<TlsConnKey, u8> = LruHashMap::with_max_entries(H2_TLS_CAPACITY, 0);

/// `socket cookie -> DnsSocket`: sockets a session process sent a DNS query from (written by
/// the sock_addr hooks), whose answers the DNS ingress hook reports. LRU: no cleanup at close.
#[map]
pub static DNS_SOCKETS: LruHashMap<u64, DnsSocket> = LruHashMap::with_max_entries(DNS_SOCKETS_CAPACITY, 0);

/// Per-CPU walk of an HTTP/2 write for its request's method (hooks/payload.rs).
#[map]
pub static H2_WALK: PerCpuArray<crate::hooks::payload::H2Walk> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU walk of getaddrinfo's result list (hooks/dns.rs).
#[map]
pub static ADDRINFO_WALK: PerCpuArray<crate::hooks::dns::AddrinfoWalk> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scope lookups by name (hooks/dns.rs), a slot per context (task, socket).
#[map]
pub static NAME_LOOKUP: PerCpuArray<crate::hooks::dns::NameLookup> = PerCpuArray::with_max_entries(2, 0);

/// Per-CPU room for the DNS answer hook's parse (hooks/dns_answer.rs).
#[map]
pub static DNS_SCRATCH: PerCpuArray<crate::hooks::dns_answer::Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Executables `[dev, ino]` already reported at exec (hooks/process.rs), as a two-way
/// set-associative cache indexed by a hash of the file: each exec of the host looks at one pair
/// of slots (an array lookup the verifier inlines) where an LRU hash lookup cost ~700 ns per exec
/// (measured with the BPF statistics). A file evicted by others of its set is reported again,
/// which userspace's own record of the files it looked at absorbs.
#[map]
pub static EXECUTABLES_SEEN: Array<[u64; 2]> = Array::with_max_entries(EXECUTABLES_SEEN_CAPACITY, 0);

/// `pid_tgid -> conn`: a TLS write was reported and the thread's next TCP segment out says where
/// the connection goes (hooks/payload.rs, tcp_egress).
#[map]
pub static TLS_PENDING_PEER: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4_096, 0);

/// `(tgid, conn) -> socket cookie` of the TLS connections whose peer was reported: a write on
/// the same socket again reports nothing; one on another (a reused `SSL *`) reports anew.
#[map]
pub static TLS_PEER_SOCKETS: LruHashMap<TlsConnKey, u64> = LruHashMap::with_max_entries(16_384, 0);

/// `[tgid, g] -> [conn, buf]`: a Go `(*tls.Conn).Read`'s receiver and buffer, from its entry to
/// its returns, keyed by goroutine (R14 holds `g` in Go's register ABI): a read that blocks may
/// resume on another thread.
#[map]
pub static GO_READS: LruHashMap<[u64; 2], [u64; 2]> = LruHashMap::with_max_entries(4_096, 0);

/// TLS connections (`tgid`, `SSL *`) of session processes whose last request was a POST: what
/// they read next may be a token response (hooks/payload.rs). LRU: no cleanup at free.
#[map]
pub static TLS_POSTS: LruHashMap<TlsConnKey, u8> = LruHashMap::with_max_entries(4_096, 0);

/// `pid_tgid -> [ssl, buf, readbytes]`: SSL_read(_ex)'s arguments, from its entry to its return,
/// for reads on [`TLS_POSTS`] connections.
#[map]
pub static TLS_READS: LruHashMap<u64, [u64; 3]> = LruHashMap::with_max_entries(4_096, 0);

/// Per-CPU room for an exec's environment while it is scanned for tokens (too big for the stack).
#[map]
// ENV_NAME_CAP bytes past the scanned area, so a variable's name is always copied out at its
// full capacity: a copy of a computed length is refused by older verifiers (6.1 loses the bound
// of a length compared as `len - 1`).
pub static ENV_SCRATCH: PerCpuArray<[u8; ENV_SCAN_CAP + ENV_NAME_CAP]> = PerCpuArray::with_max_entries(1, 0);

/// The state of the environment scan in progress on this CPU (see hooks/cred.rs).
#[map]
pub static ENV_STATE: PerCpuArray<crate::hooks::cred::EnvScan> = PerCpuArray::with_max_entries(1, 0);

/// A value of `CONFIG`, 0 when absent.
#[inline(always)]
pub fn config(index: u32) -> u64 {
    CONFIG.get(index).copied().unwrap_or(0)
}

/// Unread bytes in the ring buffer past which a submit wakes the reader: a quarter of it. Below
/// it the reader is not woken per event: it drains on its own short timer (agent/reader.rs),
/// which spares a wakeup and a context switch per event on busy hosts; past it, three quarters
/// are left for the time the reader takes to come. (64 KiB woke the reader every ~15 HTTPS
/// requests of a session: measured 1.30 against 1.10 with a quarter, on a 2-CPU VM.)
const WAKEUP_BYTES: u64 = EVENTS_BYTES as u64 / 4;

/// The flags for `submit`: no wakeup unless enough data is waiting.
#[inline(always)]
pub fn submit_flags() -> u64 {
    use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Whose record it is.
pub enum Origin {
    /// The current task's (hooks that run in the process's own context).
    Task,
    /// A socket owner's: cgroup skb hooks may run in softirq context, in no task of the owner.
    Socket { tgid: u32, uid: u32 },
}

/// When the reader hears of a record.
pub enum Wakeup {
    /// When enough is waiting (see [`submit_flags`]), else at its next drain.
    WhenDue,
    /// At once.
    Now,
}

/// Sends one record of session `session` (0: none): reserves room for a `T` in the ring buffer,
/// writes its header, lets `fill` write the rest, and submits it. A full ring buffer drops the
/// record and counts it, for its session too.
#[inline(always)]
pub fn emit<T: Record + 'static>(session: u32, origin: Origin, wakeup: Wakeup, fill: impl FnOnce(*mut T)) {
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        ringbuf_full(session);
        return;
    };
    let event = entry.as_mut_ptr();
    let size = core::mem::size_of::<T>();
    // SAFETY: `T: Record` is `#[repr(C)]` with its header first, and the reservation holds a
    // whole `T`; only this program writes it until submit.
    let header = unsafe { &mut *event.cast::<EventHeader>() };
    match origin {
        Origin::Task => crate::kernel::fill_header(header, T::KIND, size, session),
        Origin::Socket { tgid, uid } => crate::kernel::fill_socket_header(header, T::KIND, size, session, tgid, uid),
    }
    fill(event);
    entry.submit(match wakeup {
        Wakeup::WhenDue => submit_flags(),
        Wakeup::Now => aya_ebpf::bindings::BPF_RB_FORCE_WAKEUP as u64,
    });
}

/// A record that did not fit in the ring buffer: counted host-wide, and for its session (0: a
/// process outside sessions).
#[inline(always)]
pub fn ringbuf_full(session: u32) {
    count(Stat::RingbufFull);
    if session == 0 {
        return;
    }
    match SESSION_LOSSES.get_ptr_mut(&session) {
        // SAFETY: the pointer comes from the map and is this CPU's value for this program run.
        Some(lost) => unsafe { *lost += 1 },
        None => {
            let _ = SESSION_LOSSES.insert(&session, &1, 0);
        }
    }
}

/// Counts a failure the hook could not report otherwise. Per-CPU, so no atomics are needed.
#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: the pointer comes from the map and is valid for this CPU for this program run.
        unsafe { *slot += 1 };
    }
}
