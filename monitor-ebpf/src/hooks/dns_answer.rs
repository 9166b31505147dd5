//! Names from DNS answers, whatever the resolver (Go's, musl's, a static one, a script that
//! speaks DNS itself): a cgroup skb ingress hook reports the messages that come from port 53 to
//! a socket a session process sent a query from (the sock_addr hooks record those sockets, see
//! hooks/net.rs). Userspace reads the names and addresses. For an enforcing session the hook
//! also allows, right here, the addresses an answer gives for a name its scope grants (the
//! question's name, directly or through CNAME records), before the process can read the answer
//! and connect: Go's resolver and the like never call getaddrinfo, whose probe does the same.
//! Attached only while sessions run: it runs for every packet the host receives, and for all but
//! DNS answers it returns after reading two header fields. It never changes what the kernel does:
//! it always returns 1.

use aya_ebpf::{cty::c_void, helpers::generated::bpf_loop, macros::cgroup_skb, programs::SkBuffContext};
use monitor_common::{DnsAnswerEvent, DnsSocket, DNS_CAP, DNS_TCP_PIECE, NAME_CAP, RESOLVE_ADDRS};

use super::dns::{allow_addresses, granted_ports, IN_SOCKET};

use crate::{
    kernel,
    maps::{emit, Origin, Wakeup, DNS_SCRATCH, DNS_SOCKETS},
};

const PASS: i32 = 1;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const DNS_PORT: u16 = 53;
const UDP_HEADER: usize = 8;

#[cgroup_skb(ingress)]
pub fn dns_ingress(ctx: SkBuffContext) -> i32 {
    on_ingress(&ctx);
    PASS
}

#[inline(always)]
fn on_ingress(ctx: &SkBuffContext) {
    let Some((proto, l4)) = transport(ctx) else { return };
    let Ok(source_port) = ctx.load::<u16>(l4) else { return };
    if u16::from_be(source_port) != DNS_PORT {
        return;
    }
    let total = ctx.len() as usize;
    let (start, seq, piece) = if proto == IPPROTO_UDP {
        (l4 + UDP_HEADER, 0, false)
    } else {
        let Ok(doff) = ctx.load::<u8>(l4 + 12) else { return };
        let Ok(seq) = ctx.load::<u32>(l4 + 4) else { return };
        // DNS over TCP: a two-byte length, then the message. A segment that holds a whole
        // message (the usual answer) is read here; any other segment with data (a length sent
        // on its own, a message over several segments) goes to userspace as a piece of the
        // stream, which joins them: its names count, but an enforcing session's addresses are
        // allowed only from whole messages, here, before the process reads them.
        let at = l4 + ((doff >> 4) as usize) * 4;
        match ctx.load::<u16>(at) {
            Ok(len) if at + 2 + u16::from_be(len) as usize == total => (at + 2, u32::from_be(seq), false),
            _ => (at, u32::from_be(seq), true),
        }
    };
    if total <= start {
        return;
    }
    // SAFETY: helper valid for cgroup skb programs.
    let cookie = unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    let Some(owner) = DNS_SOCKETS.get_ptr(&cookie) else { return };
    // SAFETY: valid map value pointer for this program run.
    let owner: DnsSocket = unsafe { *owner };
    emit::<DnsAnswerEvent>(
        owner.session,
        Origin::Socket { tgid: owner.tgid, uid: ctx.get_socket_uid() },
        Wakeup::WhenDue,
        |event| {
            // SAFETY: `event` points to a reservation of size_of::<DnsAnswerEvent>() bytes.
            unsafe {
                (*event).transport = proto;
                (*event).flags = if piece { DNS_TCP_PIECE } else { 0 };
                (*event)._pad0 = [0; 2];
                (*event).total_len = (total - start) as u32;
                (*event).socket = cookie;
                (*event).seq = seq;
                let len = kernel::skb_copy(ctx, start, total - start, &mut (*event).data.buf);
                (*event).data.len = len as u32;
                if len > 0 && !piece {
                    allow_answered(owner.session, &(*event).data.buf, len);
                }
            }
        },
    );
}

/// Per-CPU room for the walk of an answer: a copy of the message, the question's name, the
/// addresses found and the walk's position. In a map, and walked by `bpf_loop` callbacks: the
/// verifier tracks stack values exactly and, with them, every path through loops over them;
/// map values are opaque to it, so each callback is verified once (as the environment scan in
/// cred.rs).
#[repr(C)]
pub struct Scratch {
    pos: u64,
    len: u64,
    name_len: u64,
    label_left: u64,
    count: u64,
    /// Offsets of the names followed besides the question's (CNAME targets), 0 when unused.
    alias1: u64,
    alias2: u64,
    /// 1 once the question's name is read whole, 2 when the walk is to stop.
    done: u64,
    pub name: [u8; NAME_CAP],
    pub addrs: [[u8; 16]; RESOLVE_ADDRS],
    msg: [u8; DNS_CAP],
}

/// Answer records looked at.
const MAX_ANSWERS: u32 = 8;
const DNS_MASK: usize = DNS_CAP - 1;
const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
/// The question's name starts right after the 12-byte header; answers point back to it there.
const QUESTION_AT: u64 = 12;
const NAME_READ: u64 = 1;
const STOP: u64 = 2;

/// For an enforcing session, allows the addresses a DNS answer gives for a name its scope
/// grants. Only records owned by the question's name, or by a name a CNAME of it points to
/// (compression pointers, as every resolver writes them), count.
#[inline(always)]
fn allow_answered(session: u32, msg: &[u8; DNS_CAP], len: usize) {
    if len < QUESTION_AT as usize || be16(msg, 4) != 1 || be16(msg, 6) == 0 {
        return;
    }
    let Some(scratch) = DNS_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's entry, used by this program run only.
    unsafe {
        (*scratch).msg = *msg;
        (*scratch).len = len.min(DNS_CAP) as u64;
        (*scratch).pos = QUESTION_AT;
        (*scratch).name_len = 0;
        (*scratch).label_left = 0;
        (*scratch).done = 0;
        bpf_loop(NAME_CAP as u32 + 2, name_byte as *mut c_void, core::ptr::null_mut(), 0);
        // Re-read: the callback wrote it.
        if core::ptr::read_volatile(&(*scratch).done) != NAME_READ {
            return;
        }
        // granted_ports returns None unless the session enforces.
        let name_len = ((*scratch).name_len as usize).min(NAME_CAP);
        let Some(ports) = granted_ports::<IN_SOCKET>(session, &(*scratch).name, name_len) else { return };
        (*scratch).pos += 4; // QTYPE, QCLASS
        (*scratch).count = 0;
        (*scratch).alias1 = 0;
        (*scratch).alias2 = 0;
        (*scratch).done = 0;
        bpf_loop(MAX_ANSWERS, answer_record as *mut c_void, core::ptr::null_mut(), 0);
        let count = core::ptr::read_volatile(&(*scratch).count) as u32;
        if count > 0 {
            allow_addresses(session, &ports, &(*scratch).addrs, count);
        }
    }
}

/// One byte of the question's name, into `name` (dotted, lower-cased). Stops at its end, or at
/// anything but a plain label (a pointer, an overlong name).
extern "C" fn name_byte(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(scratch) = DNS_SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: the caller's live scratch.
    unsafe {
        if (*scratch).done != 0 || (*scratch).pos >= (*scratch).len {
            return 1;
        }
        let b = (*scratch).msg[dns_index((*scratch).pos as usize)];
        (*scratch).pos += 1;
        let n = (*scratch).name_len as usize;
        if (*scratch).label_left > 0 {
            if n >= NAME_CAP {
                (*scratch).done = STOP;
                return 1;
            }
            (*scratch).name[n & (NAME_CAP - 1)] = b.to_ascii_lowercase();
            (*scratch).name_len += 1;
            (*scratch).label_left -= 1;
        } else if b == 0 {
            (*scratch).done = NAME_READ;
            return 1;
        } else if b & 0xc0 != 0 || n >= NAME_CAP {
            (*scratch).done = STOP;
            return 1;
        } else {
            if n > 0 {
                (*scratch).name[n & (NAME_CAP - 1)] = b'.';
                (*scratch).name_len += 1;
            }
            (*scratch).label_left = b as u64;
        }
    }
    0
}

/// One answer record: its address kept if the record is owned by the question's name or an
/// alias of it, its alias followed if it is a CNAME. Stops at a record whose owner is not a
/// pointer (resolvers always write one), at the message's end, or with every slot taken.
extern "C" fn answer_record(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(scratch) = DNS_SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: the caller's live scratch.
    unsafe {
        let (pos, len) = ((*scratch).pos, (*scratch).len);
        if pos + 12 > len || (*scratch).count >= RESOLVE_ADDRS as u64 {
            return 1;
        }
        let msg = &(*scratch).msg;
        let first = msg[dns_index(pos as usize)];
        if first & 0xc0 != 0xc0 {
            return 1;
        }
        let owner = (((first & 0x3f) as u64) << 8) | msg[dns_index(pos as usize + 1)] as u64;
        let kind = be16(msg, pos as usize + 2);
        let rdlen = be16(msg, pos as usize + 10) as u64;
        let data = pos + 12;
        (*scratch).pos = data + rdlen;
        let (a1, a2) = ((*scratch).alias1, (*scratch).alias2);
        if owner != QUESTION_AT && (a1 == 0 || owner != a1) && (a2 == 0 || owner != a2) {
            return 0;
        }
        if kind == TYPE_A && rdlen == 4 && data + 4 <= len {
            let addr = &mut (*scratch).addrs[next_slot(scratch)];
            *addr = [0; 16];
            addr[10] = 0xff;
            addr[11] = 0xff;
            for i in 0..4 {
                addr[12 + i] = (*scratch).msg[dns_index(data as usize + i)];
            }
            (*scratch).count += 1;
        } else if kind == TYPE_AAAA && rdlen == 16 && data + 16 <= len {
            let addr = &mut (*scratch).addrs[next_slot(scratch)];
            for i in 0..16 {
                addr[i] = (*scratch).msg[dns_index(data as usize + i)];
            }
            (*scratch).count += 1;
        } else if kind == TYPE_CNAME {
            // The alias's name is this record's data: later records point there.
            if a1 == 0 {
                (*scratch).alias1 = data;
            } else if a2 == 0 {
                (*scratch).alias2 = data;
            }
        }
    }
    0
}

/// The next free address slot, read from the scratch value where it is used and masked there:
/// with the masked value computed once before the branches, the compiler spilled it to the
/// stack, and 6.1's verifier lost its bounds across the spill ("math between map_value pointer
/// and register with unbounded min value is not allowed").
///
/// # Safety
/// `scratch` is this CPU's scratch map value.
#[inline(always)]
unsafe fn next_slot(scratch: *mut Scratch) -> usize {
    // SAFETY: the caller's pointer; a volatile read keeps the load (and its mask) here.
    unsafe { core::ptr::read_volatile(&(*scratch).count) as usize & (RESOLVE_ADDRS - 1) }
}

#[inline(always)]
fn be16(msg: &[u8; DNS_CAP], at: usize) -> u16 {
    ((msg[dns_index(at)] as u16) << 8) | msg[dns_index(at + 1)] as u16
}

/// The transport protocol (UDP or TCP) and where its header starts, or `None` for anything else.
#[inline(always)]
fn transport(ctx: &SkBuffContext) -> Option<(u8, usize)> {
    let (proto, l4) = match u16::from_be(ctx.skb.protocol() as u16) as u32 {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(0).ok()?;
            (ctx.load::<u8>(9).ok()?, ((vihl & 0x0f) as usize) * 4)
        }
        // Extension headers are not followed.
        ETH_P_IPV6 => (ctx.load::<u8>(6).ok()?, 40),
        _ => return None,
    };
    (proto == IPPROTO_UDP || proto == IPPROTO_TCP).then_some((proto, l4))
}

/// `at` within the message buffer. The value goes through the stack unseen by the compiler,
/// so the mask stays in the program even where the compiler can prove `at` is in bounds from
/// an earlier comparison with the message's length: older verifiers (6.1) do not learn bounds
/// from comparing two registers, and refused the unmasked index ("math between alloc_mem
/// pointer and register with unbounded min value is not allowed").
#[inline(always)]
fn dns_index(at: usize) -> usize {
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&at) & DNS_MASK }
}
