//! Process lifecycle: fork (task_newtask), exec (sched_process_exec), exit (sched_process_exit).
//!
//! Session membership is inherited in the kernel at fork, before the child runs its first
//! instruction, and dropped when the last thread of a process exits, so a reused pid never
//! inherits a dead process's session. Every hook returns 0: none of them changes what the kernel
//! does.

use aya_ebpf::{
    helpers::{bpf_ktime_get_boot_ns, bpf_probe_read_kernel_str_bytes, bpf_probe_read_user_buf},
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};
use monitor_common::{
    ExecEvent, ExecutableEvent, ExitEvent, ForkEvent, ProcBinding, Stat, ARGV_CAP, EXECUTABLES_SEEN_CAPACITY,
    SID_UNKNOWN,
};

use super::cred;
use crate::{
    kernel,
    maps::{count, emit, Origin, Wakeup, EXECUTABLES_SEEN, LAST_CAPS, PROC_SESSIONS},
    session,
};

/// `CLONE_THREAD` from include/uapi/linux/sched.h: a new thread, not a new process.
const CLONE_THREAD: u64 = 0x0001_0000;

#[tracepoint(category = "task", name = "task_newtask")]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let _ = try_task_newtask(&ctx);
    0
}

fn try_task_newtask(ctx: &TracePointContext) -> Result<(), i64> {
    let (_, parent_tgid) = session::current_ids();
    let Some(key) = session::of_current(parent_tgid) else {
        return Ok(());
    };
    // SAFETY: offsets come from this kernel's tracefs format of task_newtask.
    let flags: u64 = unsafe { ctx.read_at(kernel::newtask_clone_flags_off()) }.map_err(|e| e as i64)?;
    if flags & CLONE_THREAD != 0 {
        // Threads are attributed through their thread-group id; nothing to record.
        return Ok(());
    }
    let child: i32 = unsafe { ctx.read_at(kernel::newtask_pid_off()) }.map_err(|e| e as i64)?;
    let child = child as u32;
    // The child is not running yet: recording it now makes its first instruction attributed.
    // Its start (set by the kernel just before this tracepoint, to within a clock tick of now)
    // tells a later agent it is the process this entry was made for.
    // SAFETY: helper without preconditions.
    let binding = ProcBinding { session: key, _pad0: 0, started_ns: unsafe { bpf_ktime_get_boot_ns() } };
    if PROC_SESSIONS.insert(child, binding, 0).is_err() {
        count(Stat::InheritFailed);
    }
    // The child starts with the parent's credentials.
    cred::remember_caps(child);
    emit::<ForkEvent>(key, Origin::Task, Wakeup::WhenDue, |event| {
        // SAFETY: `event` points to a reservation of size_of::<ForkEvent>() bytes.
        unsafe {
            (*event).child_tgid = child;
            (*event)._pad0 = 0;
        }
    });
    Ok(())
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exec(&ctx);
    0
}

fn try_sched_process_exec(ctx: &TracePointContext) -> Result<(), i64> {
    let (_, tgid) = session::current_ids();
    let key = session::of_current(tgid);
    if let Some(key) = key {
        emit_exec(ctx, key);
        cred::remember_caps(tgid);
    }
    // Any process, in a session or not, may exec with a session's token in its environment or
    // on its command line (a session process's command line is searched in userspace).
    if key.is_none() {
        cred::scan_exec_argv();
    }
    cred::scan_exec_env(key.unwrap_or(0));
    // A session process's TLS writes are read for what it sends; another process's only for a
    // session's token, so while none is looked for its executable is not even looked at.
    if key.is_some() || session::tokens_looked_for() {
        note_executable(ctx, key.unwrap_or(0));
    }
    Ok(())
}

/// Reports an executable file the first time it is exec'd, so userspace can probe the TLS code
/// linked into it (Go's crypto/tls, a static OpenSSL). Every later exec of it costs one lookup.
/// Executables exec'd while they were not looked at are found by userspace's look at the running
/// processes when a session starts or tokens start being looked for (agent/executables.rs).
#[inline(always)]
fn note_executable(ctx: &TracePointContext, key: u32) {
    let Some((dev, ino)) = kernel::exe_inode() else { return };
    let id = [dev as u64, ino];
    // Fibonacci hashing of the file to its set of two slots.
    let hash = (ino ^ ((dev as u64) << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    let set = (hash as u32) & (EXECUTABLES_SEEN_CAPACITY - 2);
    let (Some(first), Some(second)) = (EXECUTABLES_SEEN.get_ptr_mut(set), EXECUTABLES_SEEN.get_ptr_mut(set + 1)) else {
        return;
    };
    // SAFETY: valid map value pointers for this program run. Concurrent execs may tear a slot:
    // the worst is a file reported twice.
    unsafe {
        if *first == id || *second == id {
            return;
        }
        // A new file takes the empty slot, else the second: the first keeps the file that came
        // first to its set.
        if *first == [0, 0] {
            *first = id;
        } else {
            *second = id;
        }
    }
    // Woken at once: the process is starting, and its first TLS write should find the probe
    // attached.
    emit::<ExecutableEvent>(key, Origin::Task, Wakeup::Now, |event| {
        // SAFETY: `event` points to a reservation of size_of::<ExecutableEvent>() bytes.
        unsafe {
            (*event).dev = dev;
            (*event)._pad0 = 0;
            (*event).ino = ino;
            (*event)._pad1 = 0;
            (*event).filename.len = 0;
            if let Ok(loc) = ctx.read_at::<u32>(kernel::exec_filename_off()) {
                let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
                if let Ok(name) = bpf_probe_read_kernel_str_bytes(src, &mut (*event).filename.buf) {
                    (*event).filename.len = name.len() as u32;
                }
            }
        }
    });
}

fn emit_exec(ctx: &TracePointContext, key: u32) {
    emit::<ExecEvent>(key, Origin::Task, Wakeup::WhenDue, |event| {
        // SAFETY: `event` points to a reservation of size_of::<ExecEvent>() bytes; only this program
        // writes it until submit. Bytes past each buffer's `len` are left as they were: userspace
        // reads only up to `len`.
        unsafe {
            (*event).ppid = kernel::parent_tgid().unwrap_or(0);
            let (euid, egid) = kernel::effective_ids().unwrap_or((u32::MAX, u32::MAX));
            (*event).euid = euid;
            (*event).egid = egid;
            (*event).old_pid = ctx.read_at::<i32>(kernel::exec_old_pid_off()).unwrap_or(0) as u32;
            (*event).sid = kernel::session_id().unwrap_or(SID_UNKNOWN);
            (*event)._pad0 = 0;
            (*event).cap_effective = kernel::cap_effective().unwrap_or(u64::MAX);

            // filename is a __data_loc: low 16 bits offset into the record, high 16 bits length.
            (*event).filename.len = 0;
            if let Ok(loc) = ctx.read_at::<u32>(kernel::exec_filename_off()) {
                let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
                match bpf_probe_read_kernel_str_bytes(src, &mut (*event).filename.buf) {
                    Ok(name) => (*event).filename.len = name.len() as u32,
                    Err(_) => count(Stat::ReadFailed),
                }
            }

            (*event).argv.len = 0;
            if let Some((start, end)) = kernel::arg_area() {
                let mut len = end.saturating_sub(start) as usize;
                if len > ARGV_CAP {
                    len = ARGV_CAP;
                }
                let buf = &mut (*event).argv.buf;
                if len > 0 && bpf_probe_read_user_buf(start as *const u8, &mut buf[..len]).is_ok() {
                    (*event).argv.len = len as u32;
                } else if len > 0 {
                    count(Stat::ReadFailed);
                }
            } else {
                count(Stat::ReadFailed);
            }
        }
    });
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exit(&ctx);
    0
}

fn try_sched_process_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let (tid, tgid) = session::current_ids();
    // The process ends when its last thread does. Kernels without `group_dead` in the
    // tracepoint fall back to the leader's exit.
    let process_ends = match kernel::exit_group_dead_off() {
        Some(off) => unsafe { ctx.read_at::<u8>(off) }.map_err(|e| e as i64)? != 0,
        None => tid == tgid,
    };
    if !process_ends {
        return Ok(());
    }
    let Some(key) = session::of_current(tgid) else {
        return Ok(());
    };
    // Dropped before anything else can fail: a later process reusing this pid must start clean.
    let _ = PROC_SESSIONS.remove(tgid);
    let _ = LAST_CAPS.remove(&tgid);
    emit::<ExitEvent>(key, Origin::Task, Wakeup::WhenDue, |event| {
        // SAFETY: `event` points to a reservation of size_of::<ExitEvent>() bytes.
        unsafe {
            (*event).exit_code = kernel::exit_code().unwrap_or(0);
            (*event)._pad0 = 0;
        }
    });
    Ok(())
}
