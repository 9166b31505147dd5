//! Loading the eBPF object with this kernel's offsets, and attaching the probes of the table:
//! what the kernel and the caller allow, and where each uprobe goes.

use std::path::Path;

use aya::{
    programs::{cgroup_sock_addr::CgroupSockAddr, CgroupSkb, TracePoint, UProbe},
    Ebpf, EbpfLoader,
};
use monitor_common::{
    globals, MAP_CGROUP_SESSIONS, MAP_CONFIG, MAP_EVENTS, MAP_PROC_SESSIONS, MAP_RESOLVED, MAP_SCOPE_NAMES,
    MAP_SCOPE_NETS, MAP_SESSION_LOSSES, MAP_SESSION_POLICY, MAP_STATS, MAP_TOKEN_HASHES, MAP_WATCHED_INODES,
};

use super::{btf, tracefs, tracefs::Format, *};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

/// The embedded object (1.4 MB) is parsed once, into the loader's own copy: its pages leave
/// the agent's resident set after that. They are the executable file's, never written, so a
/// later read would fault them back in from the file.
fn drop_object_pages() {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
    let start = EBPF_OBJECT.as_ptr() as usize;
    let first = start.next_multiple_of(page);
    let end = (start + EBPF_OBJECT.len()) / page * page;
    if end > first {
        // SAFETY: the range lies inside the object's read-only, file-backed mapping; dropping
        // its pages changes no content anyone can read.
        unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) };
    }
}

/// Checks what loading needs, before touching the kernel, and says what is wrong.
pub fn check_environment() -> Result<(), ProbeError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ProbeError::NotRoot);
    }
    if !Path::new(btf::VMLINUX_BTF).exists() {
        return Err(ProbeError::NoBtf(btf::VMLINUX_BTF));
    }
    tracefs::ensure_mounted()
}

/// Loads the eBPF object with this kernel's offsets. The ring buffer is returned separately so
/// the caller can start reading it before [`Loaded::attach`] produces the first event.
pub struct Loaded {
    ebpf: Ebpf,
    missing_offsets: Vec<&'static str>,
}

/// Loads the eBPF object; with `pins`, the session binding maps are the pinned ones (see
/// pins.rs), made and pinned if none are there.
pub fn load(pins: Option<&pins::PinDir>) -> Result<(Loaded, Handles), ProbeError> {
    check_environment()?;
    raise_memlock_limit();
    let offsets = KernelOffsets::from_sys()?;
    let newtask = Format::read("task", "task_newtask")?;
    let exec = Format::read("sched", "sched_process_exec")?;
    let exit = Format::read("sched", "sched_process_exit")?;

    let newtask_pid = newtask.require("task_newtask", "pid")?;
    let newtask_flags = newtask.require("task_newtask", "clone_flags")?;
    let exec_filename = exec.require("sched_process_exec", "filename")?;
    let exec_old_pid = exec.require("sched_process_exec", "old_pid")?;
    let exit_group_dead = exit.offset("group_dead").unwrap_or(u32::MAX);
    // The connect tracepoints only add the fd and the outcome: a kernel without them degrades.
    let connect_fd = Format::read("syscalls", "sys_enter_connect").ok().and_then(|f| f.offset("fd")).unwrap_or(0);
    let connect_ret = Format::read("syscalls", "sys_exit_connect").ok().and_then(|f| f.offset("ret")).unwrap_or(0);
    // Every sys_exit_* tracepoint has the same layout: `ret` after the syscall number.
    let sys_exit_ret = Format::read("syscalls", "sys_exit_openat").ok().and_then(|f| f.offset("ret")).unwrap_or(0);
    let o = |v: Option<u32>| v.unwrap_or(0);
    let values = [
        (globals::TASK_REAL_PARENT, o(offsets.task_real_parent)),
        (globals::TASK_TGID, o(offsets.task_tgid)),
        (globals::TASK_CRED, o(offsets.task_cred)),
        (globals::TASK_MM, o(offsets.task_mm)),
        (globals::TASK_EXIT_CODE, o(offsets.task_exit_code)),
        (globals::CRED_EUID, o(offsets.cred_euid)),
        (globals::CRED_EGID, o(offsets.cred_egid)),
        (globals::MM_ARG_START, o(offsets.mm_arg_start)),
        (globals::MM_ARG_END, o(offsets.mm_arg_end)),
        (globals::NEWTASK_PID, newtask_pid),
        (globals::NEWTASK_CLONE_FLAGS, newtask_flags),
        (globals::EXEC_FILENAME, exec_filename),
        (globals::EXEC_OLD_PID, exec_old_pid),
        (globals::EXIT_GROUP_DEAD, exit_group_dead),
        (globals::CONNECT_FD, connect_fd),
        (globals::CONNECT_RET, connect_ret),
        (globals::SYS_EXIT_RET, sys_exit_ret),
        (globals::MM_ENV_START, o(offsets.mm_env_start)),
        (globals::MM_ENV_END, o(offsets.mm_env_end)),
        (globals::MM_EXE_FILE, o(offsets.mm_exe_file)),
        (globals::CRED_CAP_EFFECTIVE, o(offsets.cred_cap_effective)),
        (globals::TASK_FILES, o(offsets.task_files)),
        (globals::FILES_FDT, o(offsets.files_fdt)),
        (globals::FDT_FD, o(offsets.fdt_fd)),
        (globals::FILE_INODE, o(offsets.file_inode)),
        (globals::FILE_FLAGS, o(offsets.file_flags)),
        (globals::INODE_INO, o(offsets.inode_ino)),
        (globals::INODE_SB, o(offsets.inode_sb)),
        (globals::SB_DEV, o(offsets.sb_dev)),
        (globals::TASK_SIGNAL, o(offsets.task_signal)),
        (globals::SIGNAL_PIDS, o(offsets.signal_pids)),
        (globals::PID_NUMBERS, o(offsets.pid_numbers)),
    ];
    let mut loader = EbpfLoader::new();
    for (name, value) in &values {
        loader.override_global(*name, value, true);
    }
    let pinned: Vec<(&'static str, std::path::PathBuf)> = pins.map(|p| p.maps().collect()).unwrap_or_default();
    for (name, path) in &pinned {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    drop_object_pages();
    let maps = KernelMaps {
        proc_sessions: take(&mut ebpf, MAP_PROC_SESSIONS)?,
        cgroup_sessions: take(&mut ebpf, MAP_CGROUP_SESSIONS)?,
        config: take(&mut ebpf, MAP_CONFIG)?,
        session_policy: take(&mut ebpf, MAP_SESSION_POLICY)?,
        scope_nets: take(&mut ebpf, MAP_SCOPE_NETS)?,
        scope_names: take(&mut ebpf, MAP_SCOPE_NAMES)?,
        watched_inodes: take(&mut ebpf, MAP_WATCHED_INODES)?,
        token_hashes: take(&mut ebpf, MAP_TOKEN_HASHES)?,
        token_hashes_held: Default::default(),
        resolved: take(&mut ebpf, MAP_RESOLVED)?,
    };
    let handles = Handles {
        maps,
        events: take(&mut ebpf, MAP_EVENTS)?,
        stats: take(&mut ebpf, MAP_STATS)?,
        session_losses: take(&mut ebpf, MAP_SESSION_LOSSES)?,
    };
    let mut missing_offsets = offsets.missing();
    if exit_group_dead == u32::MAX {
        missing_offsets.push("sched_process_exit.group_dead (falls back to the leader's exit)");
    }
    Ok((Loaded { ebpf, missing_offsets }, handles))
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(ProbeError::Missing(name))?;
    T::try_from(map).map_err(|e| ProbeError::Map(name, e))
}

impl Loaded {
    /// Attaches every probe of [`PROBES`]; the cgroup hooks to `cgroup` (a cgroup v2 directory,
    /// by default the root of the hierarchy). A required probe that fails is an error; an
    /// optional one is reported as degraded.
    ///
    /// Optional probes named in `disabled` are left out (and reported so); a required one cannot
    /// be. Opt-in probes are attached only when named in `enabled`.
    pub fn attach(
        mut self,
        cgroup: Option<&Path>,
        disabled: &[String],
        enabled: &[String],
    ) -> Result<Probes, ProbeError> {
        if let Some(name) = disabled.iter().find(|d| PROBES.iter().any(|p| p.program == d.as_str() && p.required)) {
            return Err(ProbeError::Required(name.clone()));
        }
        if let Some(name) = disabled.iter().chain(enabled).find(|d| !PROBES.iter().any(|p| p.program == d.as_str())) {
            return Err(ProbeError::Unknown { name: name.clone() });
        }
        let mut report = LoadReport { missing_offsets: self.missing_offsets.clone(), ..Default::default() };
        let mut on_demand = Vec::new();
        let cgroup = cgroup.map(Path::to_path_buf).or_else(crate::sessions::bind::cgroup2_mount);
        let cgroup = match cgroup.as_deref().map(std::fs::File::open) {
            Some(Ok(dir)) => Some(dir),
            Some(Err(e)) => {
                tracing::warn!("cgroup for the connect hooks: {e}");
                None
            }
            None => None,
        };
        for spec in PROBES {
            self.take(spec, cgroup.as_ref(), left_out(spec, disabled, enabled), &mut report, &mut on_demand)?;
        }
        // A stand-in where this kernel refused a probe or lacks its hook.
        for stand_in in STAND_INS {
            let lost = report.probes.iter().position(|p| p.probe == stand_in.instead_of).filter(|&i| {
                let spec = PROBES.iter().find(|p| p.program == stand_in.instead_of);
                !report.probes[i].attached && spec.is_some_and(|spec| left_out(spec, disabled, enabled).is_none())
            });
            let Some(lost) = lost else { continue };
            self.take(&stand_in.spec, cgroup.as_ref(), None, &mut report, &mut on_demand)?;
            if report.probes.last().is_some_and(|p| p.attached) {
                let status = &mut report.probes[lost];
                let why = status.error.take().unwrap_or_default();
                status.error = Some(format!("{why}; restored by {} ({})", stand_in.spec.program, stand_in.spec.attach));
            }
        }
        Ok(Probes {
            ebpf: self.ebpf,
            report,
            on_demand,
            executable_sites: Vec::new(),
            sessions_running: false,
            tokens_known: false,
            watched: None,
            tokens_now_known: None,
            cgroup,
        })
    }

    /// Loads (and for a probe attached from start to stop, attaches) one probe, into the report;
    /// an on-demand one joins `on_demand`. `off` says why it is left out, if it is.
    fn take(
        &mut self,
        spec: &'static ProbeSpec,
        cgroup: Option<&std::fs::File>,
        off: Option<&'static str>,
        report: &mut LoadReport,
        on_demand: &mut Vec<OnDemand>,
    ) -> Result<(), ProbeError> {
        let attach = spec.attach.to_string();
        if let Some(why) = off {
            let error = Some(format!("{why} (lost: {})", spec.provides));
            report.probes.push(ProbeStatus {
                probe: spec.program,
                attach,
                attached: false,
                while_sessions: false,
                error,
            });
            return Ok(());
        }
        // Loaded now, attached while they are needed (see `Probes`).
        if spec.when.wanted(false, false).is_some() {
            let loaded = load_program(&mut self.ebpf, spec, cgroup.is_some());
            let attached = loaded.is_ok();
            let error = match loaded {
                // An executable probe has a site per executable, taken as they are found.
                Ok(_) if matches!(spec.attach, AttachPoint::Executables { .. }) => None,
                Ok(site) => {
                    on_demand.push(OnDemand { spec, site, link: None });
                    None
                }
                Err(e) if spec.required => return Err(e),
                Err(e) => Some(format!("{} (lost: {})", error_chain(&e), spec.provides)),
            };
            report.probes.push(ProbeStatus { probe: spec.program, attach, attached, while_sessions: attached, error });
            return Ok(());
        }
        let result = attach_one(&mut self.ebpf, spec, cgroup);
        match result {
            Ok(()) => report.probes.push(ProbeStatus {
                probe: spec.program,
                attach,
                attached: true,
                while_sessions: false,
                error: None,
            }),
            Err(e) if !spec.required => report.probes.push(ProbeStatus {
                probe: spec.program,
                attach,
                attached: false,
                while_sessions: false,
                error: Some(format!("{} (lost: {})", error_chain(&e), spec.provides)),
            }),
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Why `spec` is left out by the agent's options, if it is.
fn left_out(spec: &ProbeSpec, disabled: &[String], enabled: &[String]) -> Option<&'static str> {
    let opt_in = matches!(spec.when, When::OptIn | When::OptInWhileSessions);
    if disabled.iter().any(|d| d == spec.program) {
        Some("disabled by --disable-probe")
    } else if opt_in && !enabled.iter().any(|e| e == spec.program) {
        Some("opt-in, enable with --enable-probe")
    } else {
        None
    }
}

/// Loads a probe's program without attaching it, and finds where a uprobe goes.
fn load_program(ebpf: &mut Ebpf, spec: &ProbeSpec, have_cgroup: bool) -> Result<Option<UprobeSite>, ProbeError> {
    let started = std::time::Instant::now();
    let loaded = verify_program(ebpf, spec, have_cgroup);
    // The kernel's verifier takes most of the agent's start (dns_ingress 333 ms, the exec hook
    // 188 ms on a 2-CPU VM; verifying two at once on two CPUs was no faster there).
    tracing::debug!(probe = spec.program, took = ?started.elapsed(), ok = loaded.is_ok(), "program loaded");
    loaded
}

fn verify_program(ebpf: &mut Ebpf, spec: &ProbeSpec, have_cgroup: bool) -> Result<Option<UprobeSite>, ProbeError> {
    let program = ebpf.program_mut(spec.program).ok_or(ProbeError::Missing(spec.program))?;
    let err = |source| ProbeError::Program { probe: spec.program, source };
    match spec.attach {
        AttachPoint::TracePoint { category, name } => {
            super::tracefs::exists(category, name)?;
            <&mut TracePoint>::try_from(program).map_err(err)?.load().map_err(err)?;
            Ok(None)
        }
        AttachPoint::KProbe { .. } => {
            <&mut KProbe>::try_from(program).map_err(err)?.load().map_err(err)?;
            Ok(None)
        }
        AttachPoint::CgroupSkbEgress | AttachPoint::CgroupSkbIngress => {
            if !have_cgroup {
                return Err(ProbeError::NoCgroup2);
            }
            <&mut CgroupSkb>::try_from(program).map_err(err)?.load().map_err(err)?;
            Ok(None)
        }
        AttachPoint::Libc { symbol } => {
            let file = libc_path().ok_or(ProbeError::NoLibc)?;
            <&mut UProbe>::try_from(program).map_err(err)?.load().map_err(err)?;
            Ok(Some(UprobeSite { location: SiteLocation::Symbol(symbol), file }))
        }
        AttachPoint::Library { file, symbol, args } => {
            // Loaded even without the library: the same program also attaches to executables
            // that link it statically (see `Probes::attach_to_executable`).
            <&mut UProbe>::try_from(program).map_err(err)?.load().map_err(err)?;
            let file = library_path(file).ok_or(ProbeError::NoLibrary(file))?;
            Ok(Some(library_site(&file, symbol, args)))
        }
        AttachPoint::LibraryReturn { file, symbol } => {
            let file = library_path(file).ok_or(ProbeError::NoLibrary(file))?;
            <&mut UProbe>::try_from(program).map_err(err)?.load().map_err(err)?;
            Ok(Some(UprobeSite { location: SiteLocation::Symbol(symbol), file }))
        }
        AttachPoint::Executables { .. } => {
            // Attached to each executable as it is found (see `Probes::attach_to_executable`).
            <&mut UProbe>::try_from(program).map_err(err)?.load().map_err(err)?;
            Ok(None)
        }
        AttachPoint::CgroupSockAddr { .. } => {
            if !have_cgroup {
                return Err(ProbeError::NoCgroup2);
            }
            <&mut CgroupSockAddr>::try_from(program).map_err(err)?.load().map_err(err)?;
            Ok(None)
        }
    }
}

/// Where a library function's uprobe goes: past its frame setup on an instruction the kernel
/// emulates (uprobe_site), or its entry.
fn library_site(file: &Path, symbol: &'static str, args: usize) -> UprobeSite {
    let location = match uprobe_site::entry_site(file, symbol, args) {
        Ok(site) => {
            tracing::debug!(symbol, past_entry = site.past_entry, emulated = site.emulated, "uprobe site");
            SiteLocation::Offset(site.file_offset)
        }
        Err(e) => {
            tracing::debug!(symbol, "no uprobe site found ({e}); probing the entry");
            SiteLocation::Symbol(symbol)
        }
    };
    UprobeSite { location, file: file.to_path_buf() }
}

/// Loads and attaches a probe for the agent's whole run, through the same load and attach as
/// the on-demand ones; the executables' programs are only loaded (they attach per executable,
/// see `Probes::attach_to_executable`).
fn attach_one(ebpf: &mut Ebpf, spec: &'static ProbeSpec, cgroup: Option<&std::fs::File>) -> Result<(), ProbeError> {
    let site = load_program(ebpf, spec, cgroup.is_some())?;
    if !matches!(spec.attach, AttachPoint::Executables { .. }) {
        // The link stays with the program until it is dropped with the agent.
        attach_link(ebpf, &OnDemand { spec, site, link: None }, cgroup)?;
    }
    Ok(())
}

/// Older kernels charge BPF memory to RLIMIT_MEMLOCK; newer ones to the memory cgroup. Raising
/// the limit can fail without CAP_SYS_RESOURCE, which is harmless on the latter.
fn raise_memlock_limit() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid pointer to an initialised struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        tracing::debug!("setrlimit(RLIMIT_MEMLOCK) failed; fine on kernels that account BPF memory to cgroups");
    }
}

/// An error with its sources, `a: b: c`.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The C library this agent itself runs with (from /proc/self/maps): the one the host's
/// dynamically linked programs use too.
fn libc_path() -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find_map(|path| {
        let name = Path::new(path).file_name()?.to_str()?;
        executables::is_libc(name).then(|| std::path::PathBuf::from(path))
    })
}

/// A shared library (`libssl.so.3`) from the usual library directories, symlinks resolved (a
/// uprobe attaches to the file, so /lib and /usr/lib on a merged-/usr system are the same one).
pub(super) fn library_path(file: &str) -> Option<std::path::PathBuf> {
    const DIRS: &[&str] = &[
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/lib64",
        "/usr/local/lib64",
        "/usr/local/lib",
    ];
    DIRS.iter().map(|d| Path::new(d).join(file)).find_map(|p| std::fs::canonicalize(p).ok())
}
