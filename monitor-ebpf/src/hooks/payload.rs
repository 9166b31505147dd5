//! The first bytes of outbound HTTP requests, where credentials travel: TLS plaintext from
//! uprobes on the write functions of TLS libraries (OpenSSL's `SSL_write`/`SSL_write_ex` and
//! GnuTLS's `gnutls_record_send`, attached to the library file so every process that loads it is
//! covered; OpenSSL linked into an executable and Go's `crypto/tls.(*Conn).Write`, attached to
//! each executable that has them), and plaintext TCP segments from a cgroup skb egress hook.
//!
//! Only data that starts like an HTTP/1.x request leaves the kernel, and on a connection that
//! sent the HTTP/2 client preface, every write (or segment) that may carry a header block: HPACK
//! compresses each block against the ones before it, so userspace must see them all, in order.
//! A write that is exactly one frame of another type (DATA, SETTINGS, WINDOW_UPDATE, PING ...)
//! stays in the kernel; frames stay aligned, since it is skipped whole. Userspace parses what
//! comes, fingerprints the credentials and drops the bytes. The hooks never change what the
//! kernel or the process does: the uprobes return 0 and the skb hook always returns 1 (pass).

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_probe_read_user, bpf_probe_read_user_buf, generated::bpf_loop},
    macros::{cgroup_skb, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext, SkBuffContext},
};
use monitor_common::{
    PayloadEvent, PayloadRecord, TcpOwner, TlsConnKey, TlsPeerEvent, CONFIG_TOKEN_COUNT, PAYLOAD_CAP, PAYLOAD_FLAG_H2,
    PAYLOAD_GNUTLS, PAYLOAD_GO_TLS, PAYLOAD_SMALL_CAP, PAYLOAD_SSL_READ, PAYLOAD_SSL_WRITE, PAYLOAD_SSL_WRITE_EX,
    PAYLOAD_TCP, TCP_OWNER_H2, TCP_OWNER_HTTP1,
};

use super::cred::comm;
use crate::{
    kernel,
    maps::{
        config, emit, Origin, Wakeup, GO_READS, H2_TLS_CONNS, H2_WALK, TCP_OWNERS, TLS_PEER_SOCKETS, TLS_PENDING_PEER,
        TLS_POSTS, TLS_READS,
    },
    session,
};

/// The first four bytes of the HTTP/2 client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
const H2_PREFACE_HEAD: [u8; 4] = *b"PRI ";
/// HTTP/2 frame header: 24-bit length, type, flags, stream id.
const H2_FRAME_HEADER: usize = 9;
const H2_HEADERS: u8 = 1;
const H2_PUSH_PROMISE: u8 = 5;
const H2_CONTINUATION: u8 = 9;

/// Whether data of `len` bytes starting with this frame header is exactly one frame that cannot
/// hold a header block: such a write is skipped whole, so the frames after it stay aligned.
#[inline(always)]
fn is_lone_frame_without_headers(frame: [u8; H2_FRAME_HEADER], len: usize) -> bool {
    let payload = ((frame[0] as usize) << 16) | ((frame[1] as usize) << 8) | frame[2] as usize;
    let kind = frame[3];
    H2_FRAME_HEADER + payload == len && kind != H2_HEADERS && kind != H2_CONTINUATION && kind != H2_PUSH_PROMISE
}

/// HEADERS frame flags that put fields before the header block (RFC 9113 §6.2).
const H2_FLAG_PADDED: u8 = 0x8;
const H2_FLAG_PRIORITY: u8 = 0x20;
/// `:method: POST` as HPACK encodes it when indexed (static table entry 3, RFC 7541 App. A):
/// what curl (nghttp2) and Go's http2 send for a POST.
const HPACK_METHOD_POST: u8 = 0x83;
/// `:method: GET` (entry 2).
const HPACK_METHOD_GET: u8 = 0x82;

/// Frames looked through for a HEADERS frame in one write (the client preface's write holds
/// SETTINGS and WINDOW_UPDATE before the first request).
const H2_FRAMES_WALKED: u64 = 4;
/// The client connection preface's length (RFC 9113 §3.4).
const H2_PREFACE_LEN: usize = 24;
/// Header fields looked through for `:method` at the start of a header block. Pseudo-header
/// fields come first (RFC 9113 §8.3) but in any order: Go sends `:authority` before `:method`.
const HPACK_FIELDS_WALKED: u64 = 4;
/// The static table's two `:method` entries (RFC 7541 App. A), as a literal field's name index.
const HPACK_NAME_METHOD: [u8; 2] = [2, 3];

/// What [`H2Walk`] found.
const METHOD_UNKNOWN: u64 = 0;
const METHOD_POST: u64 = 1;
const METHOD_OTHER: u64 = 2;

/// The walk of one HTTP/2 write for its request's method, shared with its `bpf_loop` callback.
/// In a per-CPU map rather than on the stack, as the environment scan's state (cred.rs
/// `EnvScan`): the verifier checks the callback once, instead of every path through the frames
/// and fields walked (written as loops, this walk made each TLS write program ~60,000
/// instructions to verify, three times over).
#[repr(C)]
pub struct H2Walk {
    buf: u64,
    at: u64,
    len: u64,
    frames: u64,
    fields: u64,
    /// 0 while looking for the HEADERS frame, 1 in its header block.
    in_block: u64,
    method: u64,
}

/// For an HTTP/2 write (`at` past the preface if it has one): whether the first HEADERS frame in
/// it opens a POST (Some(true)), another request (Some(false)), or cannot be told (None: no
/// HEADERS frame among its first frames, or see [`h2_walk_step`]).
#[inline(always)]
fn h2_request_is_post(buf: u64, at: usize, len: usize) -> Option<bool> {
    let walk = H2_WALK.get_ptr_mut(0)?;
    // SAFETY: this CPU's entry, used by this program run only (uprobes do not nest).
    unsafe {
        (*walk).buf = buf;
        (*walk).at = at as u64;
        (*walk).len = len as u64;
        (*walk).frames = 0;
        (*walk).fields = 0;
        (*walk).in_block = 0;
        (*walk).method = METHOD_UNKNOWN;
        bpf_loop(
            (H2_FRAMES_WALKED + HPACK_FIELDS_WALKED) as u32,
            h2_walk_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
        // Re-read: the callback wrote it.
        match core::ptr::read_volatile(&(*walk).method) {
            METHOD_POST => Some(true),
            METHOD_OTHER => Some(false),
            _ => None,
        }
    }
}

/// One step of [`h2_request_is_post`]: a frame header (frames other than HEADERS are stepped
/// over), then one header field of the block. Indexed fields (one byte) and literal fields with
/// an indexed name and a short value are stepped over; `:method` as a literal is read as such.
/// A new name, a multi-byte index or length, or a Huffman-coded method ends the walk (no encoder
/// sends POST or GET that way: both are in the static table).
extern "C" fn h2_walk_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(walk) = H2_WALK.get_ptr_mut(0) else { return 1 };
    // SAFETY: the caller's live walk; bpf_probe_read_user tolerates any address and reports
    // faults as errors.
    unsafe {
        let (buf, at, len) = ((*walk).buf, (*walk).at, (*walk).len);
        if (*walk).in_block == 0 {
            if (*walk).frames >= H2_FRAMES_WALKED || at + H2_FRAME_HEADER as u64 > len {
                return 1;
            }
            (*walk).frames += 1;
            let Ok(frame) = bpf_probe_read_user((buf + at) as *const [u8; H2_FRAME_HEADER]) else { return 1 };
            let payload = ((frame[0] as u64) << 16) | ((frame[1] as u64) << 8) | frame[2] as u64;
            if frame[3] != H2_HEADERS {
                (*walk).at = at + H2_FRAME_HEADER as u64 + payload;
                return 0;
            }
            let mut block = at + H2_FRAME_HEADER as u64;
            if frame[4] & H2_FLAG_PADDED != 0 {
                block += 1;
            }
            if frame[4] & H2_FLAG_PRIORITY != 0 {
                block += 5;
            }
            (*walk).at = block;
            (*walk).in_block = 1;
            return 0;
        }
        if (*walk).fields >= HPACK_FIELDS_WALKED || at >= len {
            return 1;
        }
        (*walk).fields += 1;
        let Ok(first) = bpf_probe_read_user((buf + at) as *const u8) else { return 1 };
        let name = match first {
            HPACK_METHOD_POST => {
                (*walk).method = METHOD_POST;
                return 1;
            }
            HPACK_METHOD_GET => {
                (*walk).method = METHOD_OTHER;
                return 1;
            }
            // Another indexed field (`:scheme`, `:path`, an entry of the dynamic table), or a
            // dynamic table size update (001xxxxx) below 31: one byte.
            0x80..=0xfe | 0x20..=0x3e => {
                (*walk).at = at + 1;
                return 0;
            }
            // Literal with incremental indexing (01xxxxxx), 6-bit name index.
            0x41..=0x7e => first & 0x3f,
            // Literal without indexing (0000xxxx) or never indexed (0001xxxx), 4-bit name index.
            0x01..=0x0e | 0x11..=0x1e => first & 0x0f,
            _ => return 1,
        };
        if at + 1 >= len {
            return 1;
        }
        let Ok(length) = bpf_probe_read_user((buf + at + 1) as *const u8) else { return 1 };
        if length & 0x7f == 0x7f {
            return 1;
        }
        let value_len = (length & 0x7f) as u64;
        if name == HPACK_NAME_METHOD[0] || name == HPACK_NAME_METHOD[1] {
            if length & 0x80 == 0 {
                (*walk).method = if value_len != 4 {
                    METHOD_OTHER
                } else {
                    match bpf_probe_read_user((buf + at + 2) as *const [u8; 4]) {
                        Ok(method) if method == *b"POST" => METHOD_POST,
                        Ok(_) => METHOD_OTHER,
                        Err(_) => METHOD_UNKNOWN,
                    }
                };
            }
            return 1;
        }
        (*walk).at = at + 2 + value_len;
    }
    0
}

/// Marks (or unmarks) an HTTP/2 connection whose response the reads capture: see
/// [`h2_request_is_post`].
#[inline(always)]
fn note_h2_method(conn: &TlsConnKey, buf: u64, at: usize, len: usize) {
    match h2_request_is_post(buf, at, len) {
        Some(true) => {
            let _ = TLS_POSTS.insert(conn, &0u8, 0);
        }
        Some(false) => {
            let _ = TLS_POSTS.remove(conn);
        }
        None => {}
    }
}

/// Whether the writes of `source` have their reads probed too (the response of a POST is read).
#[inline(always)]
fn reads_probed(source: u8) -> bool {
    source == PAYLOAD_SSL_WRITE
        || source == PAYLOAD_SSL_WRITE_EX
        || source == PAYLOAD_GO_TLS
        || source == PAYLOAD_GNUTLS
}

/// Whether the first four bytes are an HTTP/1.x method (the request line's start).
#[inline(always)]
fn is_http_request(head: [u8; 4]) -> bool {
    matches!(&head, b"GET " | b"POST" | b"PUT " | b"HEAD" | b"DELE" | b"PATC" | b"OPTI" | b"CONN" | b"TRAC")
}

// ---- TLS plaintext ----------------------------------------------------------------------------

/// `int SSL_write(SSL *ssl, const void *buf, int num)`, in libssl or linked into an executable.
#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    // SSL_write's `num` is an int: keep the low 32 bits.
    on_c_write(&ctx, PAYLOAD_SSL_WRITE, |num| num as u32 as i32);
    0
}

/// `int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)`
#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    on_c_write(&ctx, PAYLOAD_SSL_WRITE_EX, clamp_len);
    0
}

/// `ssize_t gnutls_record_send(gnutls_session_t session, const void *data, size_t data_size)`
#[uprobe]
pub fn gnutls_record_send(ctx: ProbeContext) -> u32 {
    on_c_write(&ctx, PAYLOAD_GNUTLS, clamp_len);
    0
}

/// `func (c *crypto/tls.Conn) Write(b []byte) (int, error)` in a Go executable. Go's register ABI
/// (Go >= 1.17 on amd64): the receiver in RAX, the slice's pointer and length in RBX and RCX.
/// Attached past the function's stack check (see probes/go.rs), so a call that grows its stack
/// and starts over is reported once.
#[uprobe]
pub fn go_tls_write(ctx: ProbeContext) -> u32 {
    // SAFETY: `regs` is the probed task's saved registers, valid for this program run.
    let (conn, buf, len) = unsafe { ((*ctx.regs).rax, (*ctx.regs).rbx, (*ctx.regs).rcx) };
    on_tls_write(conn, buf, clamp_len(len), PAYLOAD_GO_TLS);
    0
}

// ---- TLS responses to token requests ------------------------------------------------------

/// `int SSL_read(SSL *ssl, void *buf, int num)`: where the data goes, for the return probe.
#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    on_read_entry(&ctx, false);
    0
}

/// `int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)`
#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    on_read_entry(&ctx, true);
    0
}

#[uretprobe]
pub fn ssl_read_ret(ctx: RetProbeContext) -> u32 {
    let ret: i64 = ctx.ret::<i32>() as i64;
    on_read_return(ret, false);
    0
}

#[uretprobe]
pub fn ssl_read_ex_ret(ctx: RetProbeContext) -> u32 {
    let ret: i64 = ctx.ret::<i32>() as i64;
    on_read_return(ret, true);
    0
}

/// `ssize_t gnutls_record_recv(gnutls_session_t session, void *data, size_t data_size)` (wget,
/// apt): the session pointer names the connection as the `SSL *` does for OpenSSL.
#[uprobe]
pub fn gnutls_record_recv(ctx: ProbeContext) -> u32 {
    on_read_entry(&ctx, false);
    0
}

/// Its return: the bytes read, or a negative GnuTLS error.
#[uretprobe]
pub fn gnutls_record_recv_ret(ctx: RetProbeContext) -> u32 {
    on_read_return(ctx.ret::<i64>(), false);
    0
}

/// `func (c *crypto/tls.Conn) Read(b []byte) (int, error)`, past its stack check: where the data
/// goes, for the probes at its returns (Go's register ABI: the receiver in RAX, the buffer in
/// RBX; `g` in R14).
#[uprobe]
pub fn go_tls_read(ctx: ProbeContext) -> u32 {
    // SAFETY: `regs` is the probed task's saved registers, valid for this program run.
    let (conn, buf, g) = unsafe { ((*ctx.regs).rax, (*ctx.regs).rbx, (*ctx.regs).r14) };
    let (_, tgid) = session::current_ids();
    if session::of_current(tgid).is_none() || TLS_POSTS.get_ptr(&TlsConnKey { tgid, _pad0: 0, ssl: conn }).is_none() {
        return 0;
    }
    let _ = GO_READS.insert(&[tgid as u64, g], &[conn, buf], 0);
    0
}

/// At each `ret` of `(*crypto/tls.Conn).Read`: the bytes read (`n`) are in RAX.
#[uprobe]
pub fn go_tls_read_ret(ctx: ProbeContext) -> u32 {
    // SAFETY: as above.
    let (n, g) = unsafe { ((*ctx.regs).rax, (*ctx.regs).r14) };
    let (_, tgid) = session::current_ids();
    let id = [tgid as u64, g];
    let Some(args) = GO_READS.get_ptr(&id) else { return 0 };
    // SAFETY: valid map value pointer for this program run.
    let [conn, buf] = unsafe { *args };
    let _ = GO_READS.remove(&id);
    emit_read(conn, buf, clamp_len(n));
    0
}

/// Only session processes, and only on a connection whose last request was a POST: every other
/// read costs the trap and one lookup.
#[inline(always)]
fn on_read_entry(ctx: &ProbeContext, ex: bool) {
    let (_, tgid) = session::current_ids();
    if session::of_current(tgid).is_none() {
        return;
    }
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else { return };
    if TLS_POSTS.get_ptr(&TlsConnKey { tgid, _pad0: 0, ssl }).is_none() {
        return;
    }
    let readbytes = if ex { ctx.arg::<u64>(3).unwrap_or(0) } else { 0 };
    let _ = TLS_READS.insert(&aya_ebpf::helpers::bpf_get_current_pid_tgid(), &[ssl, buf, readbytes], 0);
}

#[inline(always)]
fn on_read_return(ret: i64, ex: bool) {
    let id = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    let Some(args) = TLS_READS.get_ptr(&id) else { return };
    // SAFETY: valid map value pointer for this program run.
    let [ssl, buf, readbytes] = unsafe { *args };
    let _ = TLS_READS.remove(&id);
    // SSL_read returns the bytes read; SSL_read_ex 1, with the count in *readbytes.
    let len = if ex {
        if ret != 1 || readbytes == 0 {
            return;
        }
        // SAFETY: bpf_probe_read_user reports faults as errors.
        match unsafe { bpf_probe_read_user(readbytes as *const u64) } {
            Ok(n) => clamp_len(n),
            Err(_) => return,
        }
    } else {
        ret as i32
    };
    emit_read(ssl, buf, len);
}

/// Reports what a session process read on a connection whose last request was a POST.
#[inline(always)]
fn emit_read(conn: u64, buf: u64, len: i32) {
    if len < 4 || buf == 0 {
        return;
    }
    let (_, tgid) = session::current_ids();
    let Some(key) = session::of_current(tgid) else { return };
    if len as usize <= PAYLOAD_SMALL_CAP {
        emit_tls_write::<PAYLOAD_SMALL_CAP>(buf, len, PAYLOAD_SSL_READ, key, conn, 0);
        return;
    }
    // A read longer than one capture (a whole 16 KiB TLS record holding a response with long
    // JWTs) goes out as consecutive captures, which userspace joins again.
    let mut chunk = 0;
    while chunk < READ_CAPTURES {
        let offset = chunk * PAYLOAD_CAP as i32;
        if offset >= len {
            break;
        }
        emit_tls_write::<PAYLOAD_CAP>(buf + offset as u64, len - offset, PAYLOAD_SSL_READ, key, conn, 0);
        chunk += 1;
    }
}

/// Captures one TLS read gives at most (16 KiB: a TLS record's plaintext).
const READ_CAPTURES: i32 = 4;

/// A `size_t` length as the `int` the capture works with (a write over 2 GiB is reported as
/// one of 2 GiB: only its start is read).
#[inline(always)]
fn clamp_len(len: u64) -> i32 {
    if len > i32::MAX as u64 {
        i32::MAX
    } else {
        len as i32
    }
}

/// A C TLS library's write: (connection, buffer, length) in the first three argument registers.
#[inline(always)]
fn on_c_write(ctx: &ProbeContext, source: u8, len: impl Fn(u64) -> i32) {
    let (Some(conn), Some(buf), Some(num)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1), ctx.arg::<u64>(2)) else {
        return;
    };
    on_tls_write(conn, buf, len(num), source);
}

#[inline(always)]
fn on_tls_write(conn_ptr: u64, buf: u64, num: i32, source: u8) {
    if buf == 0 || num < 4 {
        return;
    }
    let (_, tgid) = session::current_ids();
    let key = session::of_current(tgid).unwrap_or(0);
    // Outside sessions a request matters only for the tokens sessions hold: while there are
    // none, other processes' TLS writes stay in the kernel.
    if key == 0 && config(CONFIG_TOKEN_COUNT) == 0 {
        return;
    }
    // SAFETY: bpf_probe_read_user tolerates any address and reports faults as errors.
    let Ok(head) = (unsafe { bpf_probe_read_user(buf as *const [u8; 4]) }) else { return };
    let conn = TlsConnKey { tgid: session::current_ids().1, _pad0: 0, ssl: conn_ptr };
    // A request line first: an `SSL *` freed by an HTTP/2 connection may be reused by an
    // HTTP/1.x one (a frame cannot start like a method: that would be a length over 4 MiB).
    let flags = if is_http_request(head) {
        if key != 0 && reads_probed(source) {
            // Token requests are POSTs (RFC 6749 §3.2): the response is read (see ssl_read).
            if head == *b"POST" {
                let _ = TLS_POSTS.insert(&conn, &0u8, 0);
            } else if TLS_POSTS.get_ptr(&conn).is_some() {
                let _ = TLS_POSTS.remove(&conn);
            }
        }
        0
    } else if head == H2_PREFACE_HEAD {
        let _ = H2_TLS_CONNS.insert(&conn, &0u8, 0);
        if key != 0 && reads_probed(source) {
            note_h2_method(&conn, buf, H2_PREFACE_LEN, num as usize);
        }
        PAYLOAD_FLAG_H2
    } else if H2_TLS_CONNS.get_ptr(&conn).is_some() {
        if num as usize >= H2_FRAME_HEADER {
            // SAFETY: as above.
            let Ok(frame) = (unsafe { bpf_probe_read_user(buf as *const [u8; H2_FRAME_HEADER]) }) else { return };
            if is_lone_frame_without_headers(frame, num as usize) {
                return;
            }
            // A POST's response is read as over HTTP/1.x (token endpoints, see ssl_read).
            if key != 0 && reads_probed(source) {
                note_h2_method(&conn, buf, 0, num as usize);
            }
        }
        PAYLOAD_FLAG_H2
    } else {
        return;
    };
    if num as usize <= PAYLOAD_SMALL_CAP {
        emit_tls_write::<PAYLOAD_SMALL_CAP>(buf, num, source, key, conn_ptr, flags);
    } else {
        emit_tls_write::<PAYLOAD_CAP>(buf, num, source, key, conn_ptr, flags);
    }
    // The thread's next TCP segment out is this write's: it names the peer (see tcp_egress).
    let _ = TLS_PENDING_PEER.insert(&aya_ebpf::helpers::bpf_get_current_pid_tgid(), &conn_ptr, 0);
}

/// One payload record with room for `N` bytes: the smallest that holds the write, so the ring
/// buffer fills (and wakes the reader) at the rate of the data, not of the largest record.
#[inline(always)]
fn emit_tls_write<const N: usize>(buf: u64, num: i32, source: u8, key: u32, conn: u64, flags: u8) {
    emit::<PayloadRecord<N>>(key, Origin::Task, Wakeup::WhenDue, |event| {
        let mut len = num as u32 as usize;
        if len > N {
            len = N;
        }
        // 1..=N in a form the verifier keeps whatever register the compiler reuses for `num` (it
        // once passed the sign-extended one: "R2 min value is negative, either use unsigned or
        // 'var &= const'"). N is a power of two; the callers checked num >= 4.
        let len = ((len.wrapping_sub(1)) & (N - 1)) + 1;
        // SAFETY: `event` points to a reservation of size_of::<PayloadRecord<N>>() bytes; `len` is
        // at most the buffer's size.
        unsafe {
            (*event).source = source;
            (*event).flags = flags;
            (*event).port = 0;
            (*event).total_len = num as u32;
            (*event).addr = [0; 16];
            (*event).conn = conn;
            (*event).comm = comm();
            (*event).seq = 0;
            (*event).data.len = 0;
            if bpf_probe_read_user_buf(buf as *const u8, &mut (&mut (*event).data.buf)[..len]).is_ok() {
                (*event).data.len = len as u32;
            }
        }
    });
}

// ---- plaintext TCP ----------------------------------------------------------------------------

/// Payload segments of a connection looked at before the hook gives up on it, unless its first
/// was an HTTP/1.x request (a protocol that is not HTTP, or TLS, whose first segment is a
/// ClientHello).
const SEGMENTS_LOOKED_AT: u16 = 4;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
const PASS: i32 = 1;

#[cgroup_skb(egress)]
pub fn tcp_egress(ctx: SkBuffContext) -> i32 {
    on_egress::<true>(&ctx);
    PASS
}

/// The same without the TLS peer, for kernels whose cgroup skb programs cannot call
/// `bpf_get_current_pid_tgid` (6.1: "unknown func bpf_get_current_pid_tgid#14"). The agent
/// loads it only where `tcp_egress` is refused.
#[cgroup_skb(egress)]
pub fn tcp_egress_compat(ctx: SkBuffContext) -> i32 {
    on_egress::<false>(&ctx);
    PASS
}

#[inline(always)]
fn on_egress<const TLS_PEER: bool>(ctx: &SkBuffContext) {
    // SAFETY: helper valid for cgroup skb programs.
    let cookie = unsafe { aya_ebpf::helpers::generated::bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    // Only sockets connected while the agent ran have an owner: one lookup for everything else.
    let Some(owner) = TCP_OWNERS.get_ptr_mut(cookie) else { return };
    // SAFETY: valid map value pointer for this program run.
    let owner = unsafe { &mut *owner };
    if TLS_PEER {
        report_tls_peer(owner, cookie, ctx.get_socket_uid());
    }
    let h2 = owner.flags & TCP_OWNER_H2 != 0;
    let http1 = owner.flags & TCP_OWNER_HTTP1 != 0;
    if !h2 && !http1 && owner.segments >= SEGMENTS_LOOKED_AT {
        return;
    }
    let Some((tcp_at, offset)) = payload_offset(ctx) else { return };
    let total = ctx.len() as usize;
    if total <= offset {
        return; // no payload: SYN, ACK, FIN
    }
    let Ok(head) = ctx.load::<[u8; 4]>(offset) else { return };
    let flags = if h2 {
        if let Ok(frame) = ctx.load::<[u8; H2_FRAME_HEADER]>(offset) {
            if is_lone_frame_without_headers(frame, total - offset) {
                return;
            }
        }
        PAYLOAD_FLAG_H2
    } else {
        owner.segments = owner.segments.saturating_add(1);
        if head == H2_PREFACE_HEAD {
            owner.flags |= TCP_OWNER_H2;
            PAYLOAD_FLAG_H2
        } else if is_http_request(head) {
            // Every later request of the connection is looked at, not only its first few
            // segments: a keep-alive client may send a token in its hundredth request. A body
            // segment costs the 4-byte load above.
            if owner.segments == 1 {
                owner.flags |= TCP_OWNER_HTTP1;
            }
            0
        } else {
            return;
        }
    };
    let seq = u32::from_be(ctx.load::<u32>(tcp_at + 4).unwrap_or(0));
    let owner: TcpOwner = *owner;
    emit::<PayloadEvent>(
        owner.session,
        Origin::Socket { tgid: owner.tgid, uid: ctx.get_socket_uid() },
        Wakeup::WhenDue,
        |event| {
            // SAFETY: `event` points to a reservation of size_of::<PayloadEvent>() bytes.
            unsafe {
                (*event).source = PAYLOAD_TCP;
                (*event).flags = flags;
                (*event).port = owner.port;
                (*event).total_len = (total - offset) as u32;
                (*event).addr = owner.addr;
                (*event).conn = cookie;
                (*event).comm = owner.comm;
                (*event).seq = seq;
                (*event).data.len = kernel::skb_copy(ctx, offset, total - offset, &mut (*event).data.buf) as u32;
            }
        },
    );
}

/// The first segment out after a reported TLS write, sent in the writer's own context (the write
/// syscall transmits it): the socket's peer is that connection's. Softirq sends (a delayed
/// segment) are not the writer's and are left alone: the pid check fails for them.
#[inline(always)]
fn report_tls_peer(owner: &TcpOwner, cookie: u64, uid: u32) {
    let id = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    if (id >> 32) as u32 != owner.tgid {
        return;
    }
    let Some(conn) = TLS_PENDING_PEER.get_ptr(&id) else { return };
    // SAFETY: valid map value pointer for this program run.
    let conn = unsafe { *conn };
    let _ = TLS_PENDING_PEER.remove(&id);
    // Once per connection and socket: later writes on it go to the same peer.
    let key = TlsConnKey { tgid: owner.tgid, _pad0: 0, ssl: conn };
    if TLS_PEER_SOCKETS.get_ptr(&key).is_some_and(|known| unsafe { *known } == cookie) {
        return;
    }
    let _ = TLS_PEER_SOCKETS.insert(&key, &cookie, 0);
    // The socket's owner, not the current task's credentials: a cgroup skb program may not read
    // those (6.12: "program of this type cannot use helper bpf_get_current_uid_gid#15").
    emit::<TlsPeerEvent>(owner.session, Origin::Socket { tgid: owner.tgid, uid }, Wakeup::WhenDue, |event| {
        // SAFETY: `event` points to a reservation of size_of::<TlsPeerEvent>() bytes.
        unsafe {
            (*event).conn = conn;
            (*event).addr = owner.addr;
            (*event).port = owner.port;
            (*event)._pad0 = [0; 6];
        }
    });
}

/// Where the TCP header and the TCP payload start in the packet (the skb starts at the network
/// header), or `None` for anything but TCP.
#[inline(always)]
fn payload_offset(ctx: &SkBuffContext) -> Option<(usize, usize)> {
    let ip_len = match u16::from_be(ctx.skb.protocol() as u16) as u32 {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(0).ok()?;
            let proto: u8 = ctx.load(9).ok()?;
            if proto != IPPROTO_TCP {
                return None;
            }
            ((vihl & 0x0f) as usize) * 4
        }
        ETH_P_IPV6 => {
            // Extension headers are not followed: such packets are not looked at.
            let next: u8 = ctx.load(6).ok()?;
            if next != IPPROTO_TCP {
                return None;
            }
            40
        }
        _ => return None,
    };
    let doff: u8 = ctx.load(ip_len + 12).ok()?;
    Some((ip_len, ip_len + ((doff >> 4) as usize) * 4))
}
