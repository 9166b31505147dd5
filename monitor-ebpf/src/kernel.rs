//! Reads of kernel structures at offsets resolved by the loader from the running kernel's BTF.
//!
//! Rust eBPF built here carries no CO-RE relocations, so no struct offset is compiled in: the
//! loader fills these globals, and an offset left at 0 means "not resolved" and the field is
//! reported as unknown instead of read from a wrong place.

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};
use monitor_common::EventHeader;

macro_rules! offset_global {
    ($name:ident) => {
        #[unsafe(no_mangle)]
        static $name: u32 = 0;
    };
}

offset_global!(TASK_REAL_PARENT_OFF);
offset_global!(TASK_TGID_OFF);
offset_global!(TASK_CRED_OFF);
offset_global!(TASK_MM_OFF);
offset_global!(TASK_EXIT_CODE_OFF);
offset_global!(CRED_EUID_OFF);
offset_global!(CRED_EGID_OFF);
offset_global!(MM_ARG_START_OFF);
offset_global!(MM_ARG_END_OFF);
offset_global!(MM_ENV_START_OFF);
offset_global!(MM_ENV_END_OFF);
offset_global!(MM_EXE_FILE_OFF);
offset_global!(CRED_CAP_EFFECTIVE_OFF);
offset_global!(TASK_FILES_OFF);
offset_global!(FILES_FDT_OFF);
offset_global!(FDT_FD_OFF);
offset_global!(FILE_INODE_OFF);
offset_global!(FILE_FLAGS_OFF);
offset_global!(INODE_INO_OFF);
offset_global!(INODE_SB_OFF);
offset_global!(SB_DEV_OFF);
offset_global!(TASK_SIGNAL_OFF);
offset_global!(SIGNAL_PIDS_OFF);
offset_global!(PID_NUMBERS_OFF);
offset_global!(SYS_EXIT_RET_OFF);
offset_global!(NEWTASK_PID_OFF);
offset_global!(NEWTASK_CLONE_FLAGS_OFF);
offset_global!(EXEC_FILENAME_OFF);
offset_global!(EXEC_OLD_PID_OFF);
offset_global!(CONNECT_FD_OFF);
offset_global!(CONNECT_RET_OFF);

/// `u32::MAX` when the running kernel's sched_process_exit has no `group_dead` field.
#[unsafe(no_mangle)]
static EXIT_GROUP_DEAD_OFF: u32 = u32::MAX;

/// Reads a global the loader may have rewritten. `read_volatile` keeps the compiler from folding
/// the compile-time initialiser into the code.
#[inline(always)]
pub fn global(value: &'static u32) -> u32 {
    // SAFETY: a reference to a static is always valid to read.
    unsafe { core::ptr::read_volatile(value) }
}

pub fn newtask_pid_off() -> usize {
    global(&NEWTASK_PID_OFF) as usize
}
pub fn newtask_clone_flags_off() -> usize {
    global(&NEWTASK_CLONE_FLAGS_OFF) as usize
}
pub fn exec_filename_off() -> usize {
    global(&EXEC_FILENAME_OFF) as usize
}
pub fn exec_old_pid_off() -> usize {
    global(&EXEC_OLD_PID_OFF) as usize
}
pub fn connect_fd_off() -> usize {
    global(&CONNECT_FD_OFF) as usize
}
pub fn connect_ret_off() -> usize {
    global(&CONNECT_RET_OFF) as usize
}
pub fn sys_exit_ret_off() -> usize {
    global(&SYS_EXIT_RET_OFF) as usize
}
pub fn exit_group_dead_off() -> Option<usize> {
    match global(&EXIT_GROUP_DEAD_OFF) {
        u32::MAX => None,
        off => Some(off as usize),
    }
}

/// Reads a `T` at `base + offset`, or `None` when the offset is unresolved or the read fails.
#[inline(always)]
fn read_at<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel tolerates any address and reports faults as errors.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

fn current_task() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_current_task() }
}

/// Thread-group id of the current task's real parent.
pub fn parent_tgid() -> Option<u32> {
    let parent: u64 = read_at(current_task(), global(&TASK_REAL_PARENT_OFF))?;
    read_at(parent, global(&TASK_TGID_OFF))
}

/// `PIDTYPE_SID` in `enum pid_type` (PID, TGID, PGID, SID), stable since Linux 4.19.
const PIDTYPE_SID: u64 = 3;

/// The current task's Unix session id in the initial pid namespace (what the agent's /proc
/// says): `task->signal->pids[PIDTYPE_SID]->numbers[0].nr`. Read here, at the event, because a
/// process that calls `setsid` and execs may be gone before userspace could ask.
pub fn session_id() -> Option<u32> {
    let signal: u64 = read_at(current_task(), global(&TASK_SIGNAL_OFF))?;
    let pids = global(&SIGNAL_PIDS_OFF);
    if pids == 0 {
        return None;
    }
    let pid: u64 = read_at(signal, pids + (PIDTYPE_SID * 8) as u32)?;
    // `numbers[0]` is a `struct upid` whose first member is `nr`.
    read_at(pid, global(&PID_NUMBERS_OFF))
}

/// Effective uid and gid of the current task (its own credentials, `real_cred`: see btf.rs).
pub fn effective_ids() -> Option<(u32, u32)> {
    let cred: u64 = read_at(current_task(), global(&TASK_CRED_OFF))?;
    Some((read_at(cred, global(&CRED_EUID_OFF))?, read_at(cred, global(&CRED_EGID_OFF))?))
}

/// `[arg_start, arg_end)` of the current task's memory map: where argv lives in user memory.
pub fn arg_area() -> Option<(u64, u64)> {
    let mm: u64 = read_at(current_task(), global(&TASK_MM_OFF))?;
    Some((read_at(mm, global(&MM_ARG_START_OFF))?, read_at(mm, global(&MM_ARG_END_OFF))?))
}

/// `[env_start, env_end)` of the current task's memory map: where the environment lives.
pub fn env_area() -> Option<(u64, u64)> {
    let mm: u64 = read_at(current_task(), global(&TASK_MM_OFF))?;
    Some((read_at(mm, global(&MM_ENV_START_OFF))?, read_at(mm, global(&MM_ENV_END_OFF))?))
}

/// Effective capabilities of the current task (`real_cred`; `kernel_cap_t` is one u64 since
/// Linux 6.3, and two u32 in the same order before).
pub fn cap_effective() -> Option<u64> {
    let cred: u64 = read_at(current_task(), global(&TASK_CRED_OFF))?;
    read_at(cred, global(&CRED_CAP_EFFECTIVE_OFF))
}

/// The inode number of the file behind the current task's descriptor `fd`:
/// `task->files->fdt->fd[fd]->f_inode->i_ino`. Returns the file and inode pointers too, so the
/// caller reads the device only for inodes it watches.
#[inline(always)]
pub fn fd_inode(fd: u32) -> Option<(u64, u64, u64)> {
    let files: u64 = read_at(current_task(), global(&TASK_FILES_OFF))?;
    let fdt: u64 = read_at(files, global(&FILES_FDT_OFF))?;
    let fds: u64 = read_at(fdt, global(&FDT_FD_OFF))?;
    if fds == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel tolerates any address and reports faults as errors.
    let file: u64 = unsafe { bpf_probe_read_kernel((fds + fd as u64 * 8) as *const u64).ok()? };
    let inode: u64 = read_at(file, global(&FILE_INODE_OFF))?;
    let ino: u64 = read_at(inode, global(&INODE_INO_OFF))?;
    Some((file, inode, ino))
}

/// `inode->i_sb->s_dev`, in the kernel's encoding.
pub fn inode_dev(inode: u64) -> Option<u32> {
    let sb: u64 = read_at(inode, global(&INODE_SB_OFF))?;
    read_at(sb, global(&SB_DEV_OFF))
}

/// Loads a field of a kernel object directly: `base` comes from a BTF-typed pointer (see
/// [`exe_inode`]) and `offset` from a read-only global, which the verifier knows as a constant
/// (aya freezes .rodata) and checks against the kernel's BTF type of `base`. The JIT makes it a
/// plain load that a fault turns into 0, where each `bpf_probe_read_kernel` cost ~250 ns on
/// the 2-vCPU VM this was measured on.
#[inline(always)]
fn load_at<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
    if base.is_null() || offset == 0 {
        return None;
    }
    // SAFETY: a BTF-typed kernel pointer; the verifier checks the access and the JIT guards it.
    Some(unsafe { core::ptr::read_volatile(base.add(offset as usize) as *const T) })
}

/// The device and inode of the current task's executable (`mm->exe_file`), set by exec. On
/// every exec of the host while sessions run, so it walks the pointers with direct loads from
/// `bpf_get_current_task_btf` (5.11) instead of five helper reads (measured: the exec hook took
/// 1.3-1.9 µs per run for processes outside sessions that way).
#[inline(always)]
pub fn exe_inode() -> Option<(u32, u64)> {
    // SAFETY: helper without preconditions.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task_btf() } as *const u8;
    let mm: *const u8 = load_at(task, global(&TASK_MM_OFF))?;
    let file: *const u8 = load_at(mm, global(&MM_EXE_FILE_OFF))?;
    let inode: *const u8 = load_at(file, global(&FILE_INODE_OFF))?;
    let ino: u64 = load_at(inode, global(&INODE_INO_OFF))?;
    let sb: *const u8 = load_at(inode, global(&INODE_SB_OFF))?;
    let dev: u32 = load_at(sb, global(&SB_DEV_OFF))?;
    Some((dev, ino))
}

/// `file->f_flags`.
pub fn file_flags(file: u64) -> Option<u32> {
    read_at(file, global(&FILE_FLAGS_OFF))
}

/// `task->exit_code` of the current task.
pub fn exit_code() -> Option<u32> {
    read_at(current_task(), global(&TASK_EXIT_CODE_OFF))
}

/// Copies up to `N` bytes of the packet from `offset` (`available` bytes are there) into `dst`;
/// returns how many were copied (0 on failure). `N` is a power of two.
///
/// The helper refuses a length the verifier cannot prove non-zero ("R4 invalid zero-sized read:
/// u64=[0,4095]"), and a plain `len > 0` test is dropped by the compiler's rewrite of the clamp:
/// hence 1..=N in the masked form below.
#[inline(always)]
pub fn skb_copy<const N: usize>(
    ctx: &aya_ebpf::programs::SkBuffContext,
    offset: usize,
    available: usize,
    dst: &mut [u8; N],
) -> usize {
    if available == 0 {
        return 0;
    }
    let len = if available > N { N } else { available };
    let len = ((len - 1) & (N - 1)) + 1;
    // SAFETY: `dst` has room for N >= len bytes; the helper bounds-checks the packet side.
    let ret = unsafe {
        aya_ebpf::helpers::generated::bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            offset as u32,
            dst.as_mut_ptr() as *mut core::ffi::c_void,
            len as u32,
        )
    };
    if ret == 0 {
        len
    } else {
        0
    }
}

/// Fills the common header for an event about a socket, which a cgroup skb hook may see in
/// softirq context: the socket's owner, not the current task, is the process.
#[inline(always)]
pub fn fill_socket_header(
    header: &mut EventHeader,
    kind: monitor_common::EventKind,
    size: usize,
    session: u32,
    tgid: u32,
    uid: u32,
) {
    *header = EventHeader {
        kind: kind as u32,
        version: monitor_common::WIRE_VERSION,
        _pad0: 0,
        size: size as u32,
        session,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_boot_ns() },
        pid: tgid,
        tgid,
        uid,
        gid: u32::MAX,
        cgroup_id: 0,
    };
}

/// Fills the common header for the current task.
#[inline(always)]
pub fn fill_header(header: &mut EventHeader, kind: monitor_common::EventKind, size: usize, session: u32) {
    use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_get_current_uid_gid, bpf_ktime_get_boot_ns};
    let (tid, tgid) = crate::session::current_ids();
    let uid_gid = bpf_get_current_uid_gid();
    *header = EventHeader {
        kind: kind as u32,
        version: monitor_common::WIRE_VERSION,
        _pad0: 0,
        size: size as u32,
        session,
        // SAFETY: helpers without preconditions.
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        pid: tid,
        tgid,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    };
}
