//! Loading and attaching the eBPF programs: a declarative table of probes, a check of what the
//! kernel and the caller allow, and a report of what is attached and what is degraded.

mod btf;
pub mod tracefs;

use std::path::Path;

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use monitor_common::{globals, MAP_CGROUP_SESSIONS, MAP_CONFIG, MAP_EVENTS, MAP_PROC_SESSIONS, MAP_STATS};
use serde::Serialize;

pub use btf::KernelOffsets;
use tracefs::Format;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("the agent must run as root (it loads eBPF programs); run it with sudo or as root")]
    NotRoot,
    #[error("this kernel exposes no BTF at {0}: monitor needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf(&'static str),
    #[error("reading kernel BTF: {0}")]
    Btf(String),
    #[error("tracefs: {0}")]
    Tracefs(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("probe {probe}: {source}")]
    Program {
        probe: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the eBPF object has no {0}: it was built from other sources than this agent")]
    Missing(&'static str),
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
}

/// Where a probe attaches.
#[derive(Debug, Clone, Copy)]
pub enum AttachPoint {
    TracePoint { category: &'static str, name: &'static str },
}

/// One row of the probe table.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSpec {
    /// The program's function name in monitor-ebpf.
    pub program: &'static str,
    pub attach: AttachPoint,
    /// A required probe that fails stops the agent; an optional one degrades it.
    pub required: bool,
    /// What the agent loses without it, for the report.
    pub provides: &'static str,
}

/// Every probe the agent knows about.
pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: "task_newtask",
        attach: AttachPoint::TracePoint { category: "task", name: "task_newtask" },
        required: true,
        provides: "session inheritance at fork",
    },
    ProbeSpec {
        program: "sched_process_exec",
        attach: AttachPoint::TracePoint { category: "sched", name: "sched_process_exec" },
        required: true,
        provides: "exec events",
    },
    ProbeSpec {
        program: "sched_process_exit",
        attach: AttachPoint::TracePoint { category: "sched", name: "sched_process_exit" },
        required: true,
        provides: "exit events and session cleanup",
    },
];

#[derive(Debug, Clone, Serialize)]
pub struct ProbeStatus {
    pub probe: &'static str,
    pub attach: String,
    pub attached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What was attached and what is degraded.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LoadReport {
    pub probes: Vec<ProbeStatus>,
    /// Kernel struct members this kernel's BTF lacks: the fields read through them are unknown.
    pub missing_offsets: Vec<&'static str>,
}

impl LoadReport {
    pub fn degraded(&self) -> bool {
        !self.missing_offsets.is_empty() || self.probes.iter().any(|p| !p.attached)
    }
}

/// The maps userspace works with.
pub struct KernelMaps {
    pub proc_sessions: HashMap<MapData, u32, u32>,
    pub cgroup_sessions: HashMap<MapData, u64, u32>,
    pub config: Array<MapData, u64>,
}

/// Everything userspace takes from the loaded object.
pub struct Handles {
    pub maps: KernelMaps,
    pub events: RingBuf<MapData>,
    pub stats: PerCpuArray<MapData, u64>,
}

/// The loaded programs. Dropping this detaches every probe.
pub struct Probes {
    _ebpf: Ebpf,
    pub report: LoadReport,
}

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"));

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

pub fn load() -> Result<(Loaded, Handles), ProbeError> {
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
    ];
    let mut loader = EbpfLoader::new();
    for (name, value) in &values {
        loader.override_global(*name, value, true);
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    let maps = KernelMaps {
        proc_sessions: take(&mut ebpf, MAP_PROC_SESSIONS)?,
        cgroup_sessions: take(&mut ebpf, MAP_CGROUP_SESSIONS)?,
        config: take(&mut ebpf, MAP_CONFIG)?,
    };
    let handles = Handles { maps, events: take(&mut ebpf, MAP_EVENTS)?, stats: take(&mut ebpf, MAP_STATS)? };
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
    /// Attaches every probe of [`PROBES`]. A required probe that fails is an error; an optional
    /// one is reported as degraded.
    pub fn attach(mut self) -> Result<Probes, ProbeError> {
        let mut report = LoadReport { missing_offsets: self.missing_offsets.clone(), ..Default::default() };
        for spec in PROBES {
            let result = attach_one(&mut self.ebpf, spec);
            let AttachPoint::TracePoint { category, name } = spec.attach;
            let attach = format!("tracepoint/{category}/{name}");
            match result {
                Ok(()) => report.probes.push(ProbeStatus { probe: spec.program, attach, attached: true, error: None }),
                Err(e) if !spec.required => report.probes.push(ProbeStatus {
                    probe: spec.program,
                    attach,
                    attached: false,
                    error: Some(format!("{e} (lost: {})", spec.provides)),
                }),
                Err(e) => return Err(e),
            }
        }
        Ok(Probes { _ebpf: self.ebpf, report })
    }
}

fn attach_one(ebpf: &mut Ebpf, spec: &ProbeSpec) -> Result<(), ProbeError> {
    let program = ebpf.program_mut(spec.program).ok_or(ProbeError::Missing(spec.program))?;
    let err = |source| ProbeError::Program { probe: spec.program, source };
    match spec.attach {
        AttachPoint::TracePoint { category, name } => {
            let tp: &mut TracePoint = program.try_into().map_err(err)?;
            tp.load().map_err(err)?;
            tp.attach(category, name).map_err(err)?;
        }
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
