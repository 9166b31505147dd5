//! Credential use: opens of watched credential files (by any process), session tokens in exec
//! environments (by any process), and credential changes of session processes (setuid family,
//! capset). Every hook returns 0: none changes what the kernel does.
//!
//! The open and credential hooks are `sys_exit_*` syscall tracepoints: they see the call's
//! outcome, and the file an open produced is read from the descriptor table, so a watched file
//! matches by device and inode however it was named (relative path, symlink, hard link).

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_current_comm, bpf_probe_read_kernel_buf, bpf_probe_read_user_buf},
    macros::{kprobe, tracepoint},
    programs::{ProbeContext, TracePointContext},
};
use monitor_common::{
    token_hash_step, ArgvTokenEvent, CredChangeEvent, EnvTokenEvent, FileOpenEvent, Stat, COMM_CAP, CONFIG_TOKEN_COUNT,
    CONFIG_TOKEN_SEED, CONFIG_WATCH_COUNT, CRED_CAPSET, CRED_CAP_CHECK, CRED_SETRESUID, CRED_SETREUID, CRED_SETUID,
    ENV_NAME_CAP, ENV_SCAN_CAP, SID_UNKNOWN, TOKEN_MIN_LEN,
};

use crate::{
    kernel,
    maps::{config, count, emit, Origin, Wakeup, ENV_SCRATCH, ENV_STATE, LAST_CAPS, TOKEN_HASHES, WATCHED_INODES},
    session,
};

// ---- opens of watched files -------------------------------------------------------------------

#[tracepoint(category = "syscalls", name = "sys_exit_openat")]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    on_open_exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_openat2")]
pub fn sys_exit_openat2(ctx: TracePointContext) -> u32 {
    on_open_exit(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_open")]
pub fn sys_exit_open(ctx: TracePointContext) -> u32 {
    on_open_exit(&ctx);
    0
}

#[inline(always)]
fn on_open_exit(ctx: &TracePointContext) {
    if config(CONFIG_WATCH_COUNT) == 0 {
        return;
    }
    // SAFETY: the offset comes from this kernel's tracefs format of sys_exit_openat.
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(kernel::sys_exit_ret_off()) }) else { return };
    if ret < 0 || ret > i32::MAX as i64 {
        return;
    }
    let Some((file, inode, ino)) = kernel::fd_inode(ret as u32) else { return };
    // Most opens stop here: one lookup by inode number.
    let Some(devs) = WATCHED_INODES.get_ptr(ino) else { return };
    let Some(dev) = kernel::inode_dev(inode) else { return };
    // SAFETY: valid map value pointer for this program run.
    if !unsafe { (*devs).contains(dev) } {
        return;
    }
    let (_, tgid) = session::current_ids();
    let key = session::of_current(tgid).unwrap_or(0);
    emit::<FileOpenEvent>(key, Origin::Task, Wakeup::WhenDue, |event| {
        // SAFETY: `event` points to a reservation of size_of::<FileOpenEvent>() bytes.
        unsafe {
            (*event).fd = ret as i32;
            (*event).flags = kernel::file_flags(file).unwrap_or(u32::MAX);
            (*event).dev = dev;
            (*event)._pad0 = 0;
            (*event).ino = ino;
            (*event).comm = comm();
        }
    });
}

pub fn comm() -> [u8; COMM_CAP] {
    bpf_get_current_comm().unwrap_or([0; COMM_CAP])
}

// ---- tokens in exec environments --------------------------------------------------------------

/// Hits one exec can report (a token set in more variables than this is still reported once).
const MAX_HITS: usize = 4;
/// Bytes one `bpf_loop` step looks at (the inner loop is unrolled).
const CHUNK: usize = 16;

/// The state of one environment scan, shared with the `bpf_loop` callback. It lives in a per-CPU
/// map, not on the stack: the verifier tracks stack values exactly and, with them, explored
/// every path through the callback ("BPF program is too large. Processed 1000001 insn"); map
/// values are opaque to it, so the callback is verified once.
#[repr(C)]
pub struct EnvScan {
    len: u64,
    seed: u64,
    hash: u64,
    /// Start of the current `NAME=value` entry (environments) or word (command lines).
    entry_start: u64,
    /// Where the value starts (after `=`), 0 while in the name.
    value_start: u64,
    hits: u64,
    /// Command lines: which argument the scan is in.
    arg_index: u64,
    hit_hash: [u64; MAX_HITS],
    /// Where the variable's name starts (environments), or the argument's index (command lines).
    hit_name: [u64; MAX_HITS],
    hit_name_len: [u64; MAX_HITS],
}

/// Called from sched_process_exec for every exec while some session has tokens: the new image's
/// environment is scanned in the kernel, and only matches leave it (the variable's name and which
/// token, never a value).
#[inline(always)]
pub fn scan_exec_env(session_key: u32) {
    if config(CONFIG_TOKEN_COUNT) == 0 {
        return;
    }
    let Some(scan) = start_scan(kernel::env_area()) else { return };
    // SAFETY: bpf_loop calls `env_step`, which finds its state in ENV_STATE.
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(steps(scan), env_step as *mut c_void, core::ptr::null_mut(), 0);
    }
    let mut i = 0;
    while i < MAX_HITS {
        // SAFETY: as above; the map value is re-read, since the callback wrote it.
        let (hits, hash, name, name_len) =
            unsafe { ((*scan).hits, (*scan).hit_hash[i], (*scan).hit_name[i], (*scan).hit_name_len[i]) };
        if (i as u64) < hits {
            emit_env_token(session_key, hash, name, name_len);
        }
        i += 1;
    }
}

/// Called from sched_process_exec for every exec of a process outside sessions while some
/// session has tokens: each word of the command line (split where userspace splits a session
/// process's, see credentials/argv.rs) is looked up among the tokens. Session processes' command
/// lines are sent whole and searched in userspace instead.
#[inline(always)]
pub fn scan_exec_argv() {
    if config(CONFIG_TOKEN_COUNT) == 0 {
        return;
    }
    let Some(scan) = start_scan(kernel::arg_area()) else { return };
    // SAFETY: bpf_loop calls `argv_step`, which finds its state in ENV_STATE.
    unsafe {
        aya_ebpf::helpers::generated::bpf_loop(steps(scan), argv_step as *mut c_void, core::ptr::null_mut(), 0);
    }
    let mut i = 0;
    while i < MAX_HITS {
        // SAFETY: as above.
        let (hits, hash, index) = unsafe { ((*scan).hits, (*scan).hit_hash[i], (*scan).hit_name[i]) };
        if (i as u64) < hits {
            emit_argv_token(hash, index as u32);
        }
        i += 1;
    }
}

/// Copies `[start, end)` of the exec'ing process's memory (its environment or its arguments) into
/// this CPU's scratch and resets the scan state; None when there is nothing to scan.
#[inline(always)]
fn start_scan(area: Option<(u64, u64)>) -> Option<*mut EnvScan> {
    let Some((start, end)) = area else {
        count(Stat::ReadFailed);
        return None;
    };
    let mut len = end.saturating_sub(start) as usize;
    if len == 0 {
        return None;
    }
    if len > ENV_SCAN_CAP {
        count(Stat::EnvTruncated);
        len = ENV_SCAN_CAP;
    }
    let buf = ENV_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch owned by this program run; `len` is at most its size.
    if unsafe { bpf_probe_read_user_buf(start as *const u8, &mut (&mut *buf)[..len]) }.is_err() {
        count(Stat::ReadFailed);
        return None;
    }
    let scan = ENV_STATE.get_ptr_mut(0)?;
    let seed = config(CONFIG_TOKEN_SEED);
    // SAFETY: per-CPU state owned by this program run.
    unsafe {
        (*scan).len = len as u64;
        (*scan).seed = seed;
        (*scan).hash = seed;
        (*scan).entry_start = 0;
        (*scan).value_start = 0;
        (*scan).hits = 0;
        (*scan).arg_index = 0;
    }
    Some(scan)
}

#[inline(always)]
fn steps(scan: *mut EnvScan) -> u32 {
    // SAFETY: the caller's live EnvScan.
    (unsafe { (*scan).len } as usize).div_ceil(CHUNK) as u32
}

extern "C" fn env_step(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(scan) = ENV_STATE.get_ptr_mut(0) else { return 1 };
    let Some(buf) = ENV_SCRATCH.get_ptr(0) else { return 1 };
    let base = index as usize * CHUNK;
    let mut j = 0;
    while j < CHUNK {
        let at = base + j;
        // SAFETY: `scan` is the caller's live EnvScan; `buf` is this CPU's scratch.
        unsafe {
            if at as u64 >= (*scan).len {
                return 1;
            }
            let byte = (*buf)[at & (ENV_SCAN_CAP - 1)];
            if byte == 0 {
                end_entry(scan, at as u64);
                (*scan).entry_start = at as u64 + 1;
                (*scan).value_start = 0;
            } else if (*scan).value_start == 0 {
                if byte == b'=' {
                    (*scan).value_start = at as u64 + 1;
                    (*scan).hash = (*scan).seed;
                }
            } else {
                (*scan).hash = token_hash_step((*scan).hash, byte);
            }
        }
        j += 1;
    }
    0
}

/// At the NUL ending an entry: looks the value's hash up among the tokens.
#[inline(always)]
unsafe fn end_entry(scan: *mut EnvScan, at: u64) {
    let s = unsafe { &mut *scan };
    if s.value_start == 0 || at < s.value_start + TOKEN_MIN_LEN as u64 || s.hits >= MAX_HITS as u64 {
        return;
    }
    if TOKEN_HASHES.get_ptr(s.hash).is_none() {
        return;
    }
    let slot = (s.hits as usize) & (MAX_HITS - 1);
    s.hit_hash[slot] = s.hash;
    s.hit_name[slot] = s.entry_start;
    s.hit_name_len[slot] = s.value_start - 1 - s.entry_start;
    s.hits += 1;
}

/// The command-line twin of `env_step`. The two are kept apart on purpose: a shared chunk walk
/// taking a closure (and a shared hit record) made an exec program 6.1's verifier refused.
extern "C" fn argv_step(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(scan) = ENV_STATE.get_ptr_mut(0) else { return 1 };
    let Some(buf) = ENV_SCRATCH.get_ptr(0) else { return 1 };
    let base = index as usize * CHUNK;
    let mut j = 0;
    while j < CHUNK {
        let at = base + j;
        // SAFETY: `scan` is the caller's live EnvScan; `buf` is this CPU's scratch.
        unsafe {
            if at as u64 >= (*scan).len {
                return 1;
            }
            let byte = (*buf)[at & (ENV_SCAN_CAP - 1)];
            if is_word_separator(byte) {
                end_word(scan, at as u64);
                (*scan).entry_start = at as u64 + 1;
                (*scan).hash = (*scan).seed;
                if byte == 0 {
                    (*scan).arg_index += 1;
                }
            } else {
                (*scan).hash = token_hash_step((*scan).hash, byte);
            }
        }
        j += 1;
    }
    0
}

/// Where a command-line word ends: the NUL between arguments and the separators of
/// credentials/argv.rs (`Bearer X`, `--token=X`, `user:X@host`, `?token=X&`, quotes).
#[inline(always)]
fn is_word_separator(byte: u8) -> bool {
    matches!(byte, 0 | b' ' | b'\t' | b'\n' | b'\r' | b'=' | b':' | b',' | b';' | b'&' | b'?' | b'"' | b'\'' | b'@')
}

/// At a separator: looks the word's hash up among the tokens.
#[inline(always)]
unsafe fn end_word(scan: *mut EnvScan, at: u64) {
    let s = unsafe { &mut *scan };
    if at < s.entry_start + TOKEN_MIN_LEN as u64 || s.hits >= MAX_HITS as u64 {
        return;
    }
    if TOKEN_HASHES.get_ptr(s.hash).is_none() {
        return;
    }
    let slot = (s.hits as usize) & (MAX_HITS - 1);
    s.hit_hash[slot] = s.hash;
    s.hit_name[slot] = s.arg_index;
    s.hits += 1;
}

fn emit_argv_token(hash: u64, index: u32) {
    emit::<ArgvTokenEvent>(0, Origin::Task, Wakeup::WhenDue, |event| {
        // SAFETY: `event` points to a reservation of size_of::<ArgvTokenEvent>() bytes.
        unsafe {
            (*event).hash = hash;
            (*event).ppid = kernel::parent_tgid().unwrap_or(0);
            (*event).sid = kernel::session_id().unwrap_or(SID_UNKNOWN);
            (*event).comm = comm();
            (*event).index = index;
            (*event)._pad0 = 0;
        }
    });
}

fn emit_env_token(session_key: u32, hash: u64, name_at: u64, name_len: u64) {
    let Some(buf) = ENV_SCRATCH.get_ptr(0) else { return };
    emit::<EnvTokenEvent>(session_key, Origin::Task, Wakeup::WhenDue, |event| {
        let at = (name_at as usize) & (ENV_SCAN_CAP - 1);
        let len = (name_len as usize).min(ENV_NAME_CAP).min(ENV_SCAN_CAP - at);
        // SAFETY: `event` points to a reservation of size_of::<EnvTokenEvent>() bytes; the name is
        // copied at its full capacity from inside this CPU's scratch, which has ENV_NAME_CAP bytes
        // to spare past any `at`, and `len` says how much of it is the name.
        unsafe {
            (*event).hash = hash;
            (*event).ppid = kernel::parent_tgid().unwrap_or(0);
            (*event).sid = kernel::session_id().unwrap_or(SID_UNKNOWN);
            (*event).comm = comm();
            (*event).name.len = 0;
            let src = (buf as *const u8).add(at);
            if bpf_probe_read_kernel_buf(src, &mut (*event).name.buf).is_ok() {
                (*event).name.len = len as u32;
            }
        }
    });
}

// ---- credential changes of session processes --------------------------------------------------

#[tracepoint(category = "syscalls", name = "sys_exit_setuid")]
pub fn sys_exit_setuid(ctx: TracePointContext) -> u32 {
    on_cred_change(&ctx, CRED_SETUID);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_setreuid")]
pub fn sys_exit_setreuid(ctx: TracePointContext) -> u32 {
    on_cred_change(&ctx, CRED_SETREUID);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_setresuid")]
pub fn sys_exit_setresuid(ctx: TracePointContext) -> u32 {
    on_cred_change(&ctx, CRED_SETRESUID);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_capset")]
pub fn sys_exit_capset(ctx: TracePointContext) -> u32 {
    on_cred_change(&ctx, CRED_CAPSET);
    0
}

#[inline(always)]
fn on_cred_change(ctx: &TracePointContext, call: u32) {
    let (_, tgid) = session::current_ids();
    let Some(key) = session::of_current(tgid) else { return };
    // SAFETY: the offset comes from this kernel's tracefs format (shared by sys_exit_*).
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(kernel::sys_exit_ret_off()) }) else { return };
    if ret != 0 {
        return;
    }
    emit_cred_change(key, call);
}

/// A capability check by any task (not a syscall tracepoint: it costs nothing on the syscall
/// path). For a session process whose effective capabilities changed since it was last seen
/// (fork, exec, an earlier check), reports them: that is how a capset that raised them shows,
/// when the process goes on to use what it raised. Everything else returns after one lookup.
#[tracepoint(category = "capability", name = "cap_capable")]
pub fn cap_capable(_ctx: TracePointContext) -> u32 {
    on_capability_check();
    0
}

/// The same, on kernels before 6.14, which have no capability tracepoint: a kprobe on the
/// kernel's cap_capable() (the agent loads it only when the tracepoint is missing).
#[kprobe]
pub fn cap_capable_kprobe(_ctx: ProbeContext) -> u32 {
    on_capability_check();
    0
}

#[inline(always)]
fn on_capability_check() {
    let (_, tgid) = session::current_ids();
    let Some(key) = session::of_current(tgid) else { return };
    let Some(caps) = kernel::cap_effective() else { return };
    match LAST_CAPS.get_ptr_mut(&tgid) {
        // SAFETY: valid map value pointer for this program run.
        Some(last) if unsafe { *last } == caps => return,
        // SAFETY: as above.
        Some(last) => unsafe { *last = caps },
        None => {
            let _ = LAST_CAPS.insert(&tgid, &caps, 0);
        }
    }
    emit_cred_change(key, CRED_CAP_CHECK);
}

/// Records the current task's effective capabilities as the baseline of process `tgid`.
#[inline(always)]
pub fn remember_caps(tgid: u32) {
    if let Some(caps) = kernel::cap_effective() {
        let _ = LAST_CAPS.insert(&tgid, &caps, 0);
    }
}

#[inline(always)]
fn emit_cred_change(key: u32, call: u32) {
    emit::<CredChangeEvent>(key, Origin::Task, Wakeup::WhenDue, |event| {
        // SAFETY: `event` points to a reservation of size_of::<CredChangeEvent>() bytes.
        unsafe {
            (*event).call = call;
            (*event).euid = kernel::effective_ids().map_or(u32::MAX, |(euid, _)| euid);
            (*event).cap_effective = kernel::cap_effective().unwrap_or(u64::MAX);
        }
    });
}
