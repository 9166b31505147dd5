//! Outbound destinations: cgroup sock_addr hooks (connect4/6 for TCP and connected UDP,
//! sendmsg4/6 for unconnected UDP), plus the connect syscall tracepoints for the socket fd and
//! the outcome.
//!
//! The sock_addr hooks return 1 to let the kernel go on and 0 to refuse with EPERM. Only the
//! enforcement path below returns 0, and only for a session whose file says `enforce: true`.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::bpf_ktime_get_boot_ns,
    macros::{cgroup_sock_addr, tracepoint},
    maps::lpm_trie::Key,
    programs::{SockAddrContext, TracePointContext},
};
use monitor_common::{
    ConnectEvent, ConnectResultEvent, DnsSocket, ResolvedKey, ScopeNet, SessionPolicy, TcpOwner, CONFIG_TCP_OWNERS,
    CONFIG_TOKEN_COUNT, HOOK_CONNECT, HOOK_SENDMSG, POLICY_CONNECT_SCOPED, POLICY_ENDED, POLICY_ENFORCE,
    VERDICT_ALLOWED, VERDICT_BLOCKED_ENDED, VERDICT_BLOCKED_EXPIRED, VERDICT_BLOCKED_SCOPE,
};

use crate::{
    kernel,
    maps::{
        config, emit, Origin, Wakeup, CONNECT_FDS, DNS_SOCKETS, RESOLVED, SCOPE_NETS, SESSION_POLICY, TCP_OWNERS,
        UDP_FLOWS,
    },
    session,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
const DNS_PORT: u16 = 53;
/// An unconnected UDP flow is reported again after this long.
const UDP_FLOW_INTERVAL_NS: u64 = 10_000_000_000;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    on_destination::<AF_INET>(&ctx, HOOK_CONNECT)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    on_destination::<AF_INET6>(&ctx, HOOK_CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    on_destination::<AF_INET>(&ctx, HOOK_SENDMSG)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    on_destination::<AF_INET6>(&ctx, HOOK_SENDMSG)
}

/// `FAMILY` is a const parameter so each entry point is compiled for one family only (see the
/// note on context reads below).
#[inline(always)]
fn on_destination<const FAMILY: u16>(ctx: &SockAddrContext, hook: u8) -> i32 {
    let family = FAMILY;
    let (_, tgid) = session::current_ids();
    let key = session::of_current(tgid);
    // Connects record their socket's owner for the plaintext hook while it is attached; outside
    // sessions only while sessions hold tokens (a request matters only for those). Otherwise
    // other processes' connects cost two config reads.
    let tcp_owners = config(CONFIG_TCP_OWNERS) != 0;
    let outsiders_matter = tcp_owners && config(CONFIG_TOKEN_COUNT) != 0;
    if key.is_none() && !outsiders_matter {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    let addr = if FAMILY == AF_INET { ipv4_mapped(sa) } else { ipv6(sa) };
    // SAFETY: a valid context pointer; each field is read at its constant offset.
    let (port, sock_type, protocol) = unsafe {
        (
            u16::from_be(read_volatile(&(*sa).user_port) as u16),
            read_volatile(&(*sa).type_),
            read_volatile(&(*sa).protocol),
        )
    };
    if hook == HOOK_CONNECT && sock_type == SOCK_STREAM && tcp_owners {
        record_tcp_owner(sa, tgid, key.unwrap_or(0), port, &addr);
    }
    let Some(key) = key else {
        return ALLOW;
    };
    if port == DNS_PORT {
        // Its answers tell which names this session's addresses have, whatever the resolver.
        // SAFETY: the cookie helper is valid for sock_addr programs and takes their context.
        let cookie = unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(sa as *mut _) };
        let _ = DNS_SOCKETS.insert(&cookie, &DnsSocket { tgid, session: key }, 0);
    }
    let sock_type = sock_type as u16;
    let verdict = verdict(key, &addr, port);

    if hook == HOOK_CONNECT || verdict != VERDICT_ALLOWED || new_udp_flow(tgid, port, &addr) {
        emit_connect(key, family, sock_type, protocol, port, hook, verdict, &addr);
    }
    // The enforcement path: refuse only what an enforcing session's policy refuses.
    if verdict == VERDICT_ALLOWED {
        ALLOW
    } else {
        DENY
    }
}

/// Remembers who connected a TCP socket, for the plaintext payload hook (hooks/payload.rs), which
/// may run where the current task is not the socket's owner. Every process, not only session
/// processes: a session's token sent by any process is a finding.
#[inline(always)]
fn record_tcp_owner(sa: *mut bpf_sock_addr, tgid: u32, session: u32, port: u16, addr: &[u8; 16]) {
    // SAFETY: the cookie helper is valid for sock_addr programs and takes their context.
    let cookie = unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(sa as *mut _) };
    let mut owner = TcpOwner { tgid, session, port, segments: 0, flags: 0, addr: *addr, comm: [0; 16] };
    // The raw helper writes into the struct in place: with `bpf_get_current_comm()` returning an
    // array, the compiler's copy read a register that one path never set ("R7 !read_ok").
    // SAFETY: the buffer is 16 writable bytes; on failure the helper zeroes it.
    unsafe {
        aya_ebpf::helpers::generated::bpf_get_current_comm(owner.comm.as_mut_ptr() as *mut _, owner.comm.len() as u32)
    };
    let _ = TCP_OWNERS.insert(&cookie, &owner, 0);
}

// The context may only be read at constant offsets: the verifier refuses a load through a
// computed context pointer ("dereference of modified ctx ptr R2 off=4 disallowed"), which is
// what the compiler makes of a field chosen by `family` or of a loop over `user_ip6`. Hence one
// function per family and volatile reads of each word.
#[inline(always)]
fn ipv4_mapped(sa: *const bpf_sock_addr) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    // SAFETY: a valid context pointer, constant offset.
    addr[12..16].copy_from_slice(&unsafe { read_volatile(&(*sa).user_ip4) }.to_ne_bytes());
    addr
}

#[inline(always)]
fn ipv6(sa: *const bpf_sock_addr) -> [u8; 16] {
    // SAFETY: a valid context pointer, constant offsets.
    let words = unsafe {
        [
            read_volatile(&(*sa).user_ip6[0]),
            read_volatile(&(*sa).user_ip6[1]),
            read_volatile(&(*sa).user_ip6[2]),
            read_volatile(&(*sa).user_ip6[3]),
        ]
    };
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&words[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&words[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&words[2].to_ne_bytes());
    addr[12..16].copy_from_slice(&words[3].to_ne_bytes());
    addr
}

/// What an enforcing session allows; every other session is always allowed (and only observed).
fn verdict(key: u32, addr: &[u8; 16], port: u16) -> u8 {
    let Some(policy) = SESSION_POLICY.get_ptr(key) else {
        return VERDICT_ALLOWED;
    };
    // SAFETY: valid map value pointer for this program run.
    let policy: SessionPolicy = unsafe { *policy };
    if policy.flags & POLICY_ENFORCE == 0 {
        return VERDICT_ALLOWED;
    }
    if policy.flags & POLICY_ENDED != 0 {
        return VERDICT_BLOCKED_ENDED;
    }
    // SAFETY: helper without preconditions.
    if unsafe { bpf_ktime_get_boot_ns() } >= policy.expires_at {
        return VERDICT_BLOCKED_EXPIRED;
    }
    if policy.flags & POLICY_CONNECT_SCOPED == 0 {
        return VERDICT_ALLOWED;
    }
    let lookup = Key::new(32 + 128, ScopeNet { session: key.to_ne_bytes(), addr: *addr });
    if SCOPE_NETS.get(&lookup).is_some_and(|ports| ports.allows(port)) {
        return VERDICT_ALLOWED;
    }
    // An address the session resolved from an allowed name (see hooks/dns.rs).
    match RESOLVED.get_ptr(&ResolvedKey { session: key, addr: *addr }) {
        // SAFETY: valid map value pointer for this program run.
        Some(r) if unsafe { (*r).ports.allows(port) && (*r).expires_at > bpf_ktime_get_boot_ns() } => VERDICT_ALLOWED,
        _ => VERDICT_BLOCKED_SCOPE,
    }
}

fn new_udp_flow(tgid: u32, port: u16, addr: &[u8; 16]) -> bool {
    let mut flow = [0u8; 24];
    flow[0..4].copy_from_slice(&tgid.to_ne_bytes());
    flow[4..6].copy_from_slice(&port.to_ne_bytes());
    flow[8..24].copy_from_slice(addr);
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let fresh = match UDP_FLOWS.get_ptr(&flow) {
        // SAFETY: valid map value pointer for this program run.
        Some(last) => now.saturating_sub(unsafe { *last }) >= UDP_FLOW_INTERVAL_NS,
        None => true,
    };
    if fresh {
        let _ = UDP_FLOWS.insert(&flow, &now, 0);
    }
    fresh
}

// Inlined: BPF calls take at most five arguments in registers ("stack arguments are not
// supported").
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn emit_connect(
    key: u32,
    family: u16,
    sock_type: u16,
    protocol: u32,
    port: u16,
    hook: u8,
    verdict: u8,
    addr: &[u8; 16],
) {
    let (tid, _) = session::current_ids();
    let fd = match CONNECT_FDS.get_ptr_mut(tid) {
        Some(pending) if hook == HOOK_CONNECT => {
            // SAFETY: valid map value pointer for this program run. Marked so sys_exit_connect
            // reports the outcome of this connect (and not of an AF_UNIX one).
            unsafe {
                (*pending)[1] = 1;
                (*pending)[0]
            }
        }
        _ => -1,
    };
    emit::<ConnectEvent>(key, Origin::Task, Wakeup::WhenDue, |event| {
        // SAFETY: `event` points to a reservation of size_of::<ConnectEvent>() bytes; every field
        // is written.
        unsafe {
            (*event).family = family;
            (*event).sock_type = sock_type;
            (*event).protocol = protocol;
            (*event).port = port;
            (*event).hook = hook;
            (*event).verdict = verdict;
            (*event).fd = fd;
            (*event).addr = *addr;
        }
    });
}

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let (tid, tgid) = session::current_ids();
    if session::of_current(tgid).is_some() {
        // SAFETY: offset from this kernel's tracefs format of sys_enter_connect.
        if let Ok(fd) = unsafe { ctx.read_at::<u64>(kernel::connect_fd_off()) } {
            let _ = CONNECT_FDS.insert(tid, [fd as i32, 0], 0);
        }
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let (tid, tgid) = session::current_ids();
    let Some(pending) = CONNECT_FDS.get_ptr(tid) else {
        return 0;
    };
    // SAFETY: valid map value pointer for this program run.
    let [fd, seen] = unsafe { *pending };
    let _ = CONNECT_FDS.remove(tid);
    if seen == 0 {
        // No sock_addr hook ran: not an inet connect (AF_UNIX, say).
        return 0;
    }
    let Some(key) = session::of_current(tgid) else {
        return 0;
    };
    // SAFETY: offset from this kernel's tracefs format of sys_exit_connect.
    let ret = unsafe { ctx.read_at::<i64>(kernel::connect_ret_off()) }.unwrap_or(0);
    emit::<ConnectResultEvent>(key, Origin::Task, Wakeup::WhenDue, |event| {
        // SAFETY: `event` points to a reservation of size_of::<ConnectResultEvent>() bytes.
        unsafe {
            (*event).fd = fd;
            (*event).ret = ret as i32;
        }
    });
    0
}
