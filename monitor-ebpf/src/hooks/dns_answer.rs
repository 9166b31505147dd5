//! Names from DNS answers, whatever the resolver (Go's, musl's, a static one, a script that
//! speaks DNS itself): a cgroup skb ingress hook reports the messages that come from port 53 to
//! a socket a session process sent a query from (the sock_addr hooks record those sockets, see
//! hooks/net.rs). Userspace reads the names and addresses. Attached only while sessions run: it
//! runs for every packet the host receives, and for all but DNS answers it returns after
//! reading two header fields. It never changes what the kernel does: it always returns 1.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use monitor_common::{DnsAnswerEvent, DnsSocket, EventKind, Stat, DNS_CAP};

use crate::{
    kernel,
    maps::{count, submit_flags, DNS_SOCKETS, EVENTS},
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
    let start = if proto == IPPROTO_UDP {
        l4 + UDP_HEADER
    } else {
        let Ok(doff) = ctx.load::<u8>(l4 + 12) else { return };
        // DNS over TCP: a two-byte length, then the message. Only a segment that holds a whole
        // message is read (answers are small); the rest of a longer one is not followed.
        let at = l4 + ((doff >> 4) as usize) * 4;
        let Ok(len) = ctx.load::<u16>(at) else { return };
        if at + 2 + u16::from_be(len) as usize != total {
            return;
        }
        at + 2
    };
    if total <= start {
        return;
    }
    // SAFETY: helper valid for cgroup skb programs.
    let cookie = unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    let Some(owner) = DNS_SOCKETS.get_ptr(&cookie) else { return };
    // SAFETY: valid map value pointer for this program run.
    let owner: DnsSocket = unsafe { *owner };
    let Some(mut entry) = EVENTS.reserve::<DnsAnswerEvent>(0) else {
        count(Stat::RingbufFull);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reservation of size_of::<DnsAnswerEvent>() bytes.
    unsafe {
        let size = core::mem::size_of::<DnsAnswerEvent>();
        let uid = ctx.get_socket_uid();
        kernel::fill_socket_header(&mut (*event).header, EventKind::DnsAnswer, size, owner.session, owner.tgid, uid);
        (*event).transport = proto;
        (*event)._pad0 = [0; 3];
        (*event).total_len = (total - start) as u32;
        (*event)._pad1 = 0;
        (*event).data.len = 0;
        let mut len = total - start;
        if len > DNS_CAP {
            len = DNS_CAP;
        }
        // 1..=DNS_CAP in a form the verifier keeps (see tcp_egress in payload.rs).
        let len = ((len - 1) & (DNS_CAP - 1)) + 1;
        let dst = (&mut (*event).data.buf).as_mut_ptr() as *mut core::ffi::c_void;
        let ret =
            aya_ebpf::helpers::generated::bpf_skb_load_bytes(ctx.skb.skb as *const _, start as u32, dst, len as u32);
        if ret == 0 {
            (*event).data.len = len as u32;
        }
    }
    entry.submit(submit_flags());
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
