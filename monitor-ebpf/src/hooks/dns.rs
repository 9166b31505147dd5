//! Names: uprobes on libc's getaddrinfo(3) tell which names a session process resolved to which
//! addresses. The event lets userspace put `dst_name` on connects and match name scopes; for an
//! enforcing session the kernel also allows, right here, the addresses of names its scope grants,
//! so the connect that follows the lookup is not refused for lack of a userspace round trip.

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_ktime_get_boot_ns, bpf_probe_read_user, bpf_probe_read_user_str_bytes, generated::bpf_loop},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use monitor_common::{
    name_hash_step, NameKey, PortRanges, ResolveEvent, Resolved, ResolvedKey, SessionPolicy, NAME_CAP, NAME_EXACT,
    NAME_HASH_SEED, NAME_SUFFIX, POLICY_ENFORCE, RESOLVED_TTL_NS, RESOLVE_ADDRS,
};

use crate::{
    maps::{emit, Origin, Wakeup, ADDRINFO_WALK, GAI_ARGS, NAME_LOOKUP, RESOLVED, SCOPE_NAMES, SESSION_POLICY},
    session,
};

/// glibc's `struct addrinfo` on LP64 (x86_64, aarch64): the user-space ABI, not a kernel layout.
const AI_FAMILY: u64 = 4;
const AI_ADDR: u64 = 24;
const AI_NEXT: u64 = 40;
/// `struct sockaddr_in.sin_addr` and `struct sockaddr_in6.sin6_addr`.
const SIN_ADDR: u64 = 4;
const SIN6_ADDR: u64 = 8;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// getaddrinfo returns one entry per socket type for each address: walk this many at most.
const MAX_ENTRIES: u32 = 24;

#[uprobe]
pub fn getaddrinfo_enter(ctx: ProbeContext) -> u32 {
    let (tid, tgid) = session::current_ids();
    if session::of_current(tgid).is_none() {
        return 0;
    }
    if let (Some(node), Some(res)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(3)) {
        let _ = GAI_ARGS.insert(tid, [node, res], 0);
    }
    0
}

#[uretprobe]
pub fn getaddrinfo_exit(ctx: RetProbeContext) -> u32 {
    let (tid, tgid) = session::current_ids();
    let Some(args) = GAI_ARGS.get_ptr(tid) else {
        return 0;
    };
    // SAFETY: valid map value pointer for this program run.
    let [node, res] = unsafe { *args };
    let _ = GAI_ARGS.remove(tid);
    let rc: i32 = ctx.ret();
    if rc != 0 || node == 0 || res == 0 {
        return 0;
    }
    let Some(key) = session::of_current(tgid) else {
        return 0;
    };
    emit::<ResolveEvent>(key, Origin::Task, Wakeup::WhenDue, |event| {
        // SAFETY: `event` points to a reservation of size_of::<ResolveEvent>() bytes; the name and
        // the first `count` addresses are written, userspace reads nothing past them.
        unsafe {
            (*event).name.len = match bpf_probe_read_user_str_bytes(node as *const u8, &mut (*event).name.buf) {
                Ok(name) => name.len() as u32,
                Err(_) => 0,
            };
            (*event).count = read_addresses(res, &mut (*event).addrs);
            if let Some(ports) = granted_ports::<IN_TASK>(key, &(*event).name.buf, (*event).name.len as usize) {
                allow_addresses(key, &ports, &(*event).addrs, (*event).count);
            }
        }
    });
    0
}

/// The walk of a `struct addrinfo` list in progress on this CPU, shared with its `bpf_loop`
/// callback: in a map, so the verifier checks one step once rather than all 24 (see
/// [`NameLookup`]).
#[repr(C)]
pub struct AddrinfoWalk {
    next: u64,
    count: u64,
    addrs: [[u8; 16]; RESOLVE_ADDRS],
}

/// Walks the `struct addrinfo` list at `*res` into `out`; returns how many distinct addresses
/// it stored.
#[inline(always)]
fn read_addresses(res: u64, out: &mut [[u8; 16]; RESOLVE_ADDRS]) -> u32 {
    let Some(walk) = ADDRINFO_WALK.get_ptr_mut(0) else { return 0 };
    // SAFETY: bpf_probe_read_user reports faults as errors; `walk` is this CPU's entry, used by
    // this program run only (uprobes do not nest).
    unsafe {
        let Ok(first) = bpf_probe_read_user(res as *const u64) else { return 0 };
        (*walk).next = first;
        (*walk).count = 0;
        bpf_loop(MAX_ENTRIES, addrinfo_step as *mut c_void, core::ptr::null_mut(), 0);
        *out = (*walk).addrs;
        core::ptr::read_volatile(&(*walk).count) as u32
    }
}

/// One entry of the list. Entries come grouped by address (one per socket type): a repeat of
/// the last address is skipped.
extern "C" fn addrinfo_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(walk) = ADDRINFO_WALK.get_ptr_mut(0) else { return 1 };
    // SAFETY: the caller's live walk; bpf_probe_read_user reports faults as errors.
    unsafe {
        let (ai, n) = ((*walk).next, (*walk).count as usize);
        if ai == 0 || n >= RESOLVE_ADDRS {
            return 1;
        }
        if let Some(addr) = read_entry(ai) {
            if n == 0 || (*walk).addrs[(n - 1) & (RESOLVE_ADDRS - 1)] != addr {
                (*walk).addrs[n & (RESOLVE_ADDRS - 1)] = addr;
                (*walk).count += 1;
            }
        }
        match bpf_probe_read_user((ai + AI_NEXT) as *const u64) {
            Ok(next) => (*walk).next = next,
            Err(_) => return 1,
        }
    }
    0
}

/// One entry's address, IPv4 as IPv4-mapped IPv6.
unsafe fn read_entry(ai: u64) -> Option<[u8; 16]> {
    unsafe {
        let family: u32 = bpf_probe_read_user((ai + AI_FAMILY) as *const u32).ok()?;
        let sockaddr: u64 = bpf_probe_read_user((ai + AI_ADDR) as *const u64).ok()?;
        let mut addr = [0u8; 16];
        if family == AF_INET {
            let v4: [u8; 4] = bpf_probe_read_user((sockaddr + SIN_ADDR) as *const [u8; 4]).ok()?;
            addr[10] = 0xff;
            addr[11] = 0xff;
            addr[12..16].copy_from_slice(&v4);
        } else if family == AF_INET6 {
            addr = bpf_probe_read_user((sockaddr + SIN6_ADDR) as *const [u8; 16]).ok()?;
        } else {
            return None;
        }
        Some(addr)
    }
}

/// The slots of [`NAME_LOOKUP`]: one per context a lookup runs in, since a socket hook can
/// interrupt a uprobe on the same CPU.
pub(crate) const IN_TASK: u32 = 0;
pub(crate) const IN_SOCKET: u32 = 1;

/// A scope lookup by name in progress on this CPU, shared with its `bpf_loop` callback. In a
/// map rather than on the stack, as the environment scan's state (cred.rs `EnvScan`): map values
/// are opaque to the verifier, which checks the callback once instead of each of the lookup's
/// up to 128 steps (this walk made most of the DNS hooks' verification time).
#[repr(C)]
pub struct NameLookup {
    len: u64,
    hash: u64,
    session: u32,
    found: u32,
    granted: PortRanges,
    /// After the other fields: `name[i - 1]` is formed as an address before its index is
    /// masked, which at offset 0 of a map value the verifier refuses.
    name: [u8; NAME_CAP],
}

/// The ports an enforcing session's scope grants to `name`, exactly or through a `*.suffix`.
/// `SLOT` is the context's slot of [`NAME_LOOKUP`].
#[inline(always)]
pub(crate) fn granted_ports<const SLOT: u32>(key: u32, name: &[u8; NAME_CAP], len: usize) -> Option<PortRanges> {
    // SAFETY: valid map value pointer for this program run.
    let policy: SessionPolicy = unsafe { *SESSION_POLICY.get_ptr(key)? };
    if policy.flags & POLICY_ENFORCE == 0 {
        return None;
    }
    let lookup = NAME_LOOKUP.get_ptr_mut(SLOT)?;
    // SAFETY: this CPU's slot for this context, used by this program run only.
    unsafe {
        (*lookup).name = *name;
        // `len` excludes the NUL (bpf_probe_read_user_str_bytes drops it).
        (*lookup).len = len.min(NAME_CAP) as u64;
        (*lookup).hash = NAME_HASH_SEED;
        (*lookup).session = key;
        (*lookup).found = 0;
        bpf_loop((*lookup).len as u32, name_step::<SLOT> as *mut c_void, core::ptr::null_mut(), 0);
        // Re-read: the callback wrote them.
        (core::ptr::read_volatile(&(*lookup).found) != 0).then(|| (*lookup).granted)
    }
}

/// One step of [`granted_ports`], from the name's end: the hash of `name[i..]` grows by a byte,
/// and is looked up where `name[i..]` is a whole label sequence (the name, or after a dot).
/// The last match (the longest) wins.
extern "C" fn name_step<const SLOT: u32>(step: u64, _ctx: *mut c_void) -> i64 {
    let Some(lookup) = NAME_LOOKUP.get_ptr_mut(SLOT) else { return 1 };
    // SAFETY: the caller's live NameLookup.
    unsafe {
        let len = (*lookup).len;
        if step >= len {
            return 1;
        }
        let i = (len - 1 - step) as usize & (NAME_CAP - 1);
        (*lookup).hash = name_hash_step((*lookup).hash, (*lookup).name[i]);
        let kind = if i == 0 {
            NAME_EXACT
        } else if (*lookup).name[(i - 1) & (NAME_CAP - 1)] == b'.' {
            NAME_SUFFIX
        } else {
            return 0;
        };
        let key = NameKey { session: (*lookup).session, kind, hash: (*lookup).hash };
        if let Some(ports) = SCOPE_NAMES.get_ptr(&key) {
            (*lookup).granted = *ports;
            (*lookup).found = 1;
        }
    }
    0
}

pub(crate) fn allow_addresses(key: u32, ports: &PortRanges, addrs: &[[u8; 16]; RESOLVE_ADDRS], count: u32) {
    // SAFETY: helper without preconditions.
    let expires_at = unsafe { bpf_ktime_get_boot_ns() } + RESOLVED_TTL_NS;
    let value = Resolved { ports: *ports, _pad0: 0, expires_at };
    for i in 0..RESOLVE_ADDRS {
        if i as u32 >= count {
            break;
        }
        let _ = RESOLVED.insert(&ResolvedKey { session: key, addr: addrs[i] }, &value, 0);
    }
}
