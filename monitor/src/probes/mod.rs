//! Loading and attaching the eBPF programs: a declarative table of probes (table.rs), a check of
//! what the kernel and the caller allow and the load itself (load.rs), and here the running
//! agent's probes: attached and detached as sessions and tokens come and go, per executable and
//! per library file, with a report of what is attached and what is degraded.

mod btf;
pub mod executables;
mod go;
mod load;
pub mod pins;
pub mod stats;
mod table;
pub mod tracefs;
mod uprobe_site;

use std::{os::fd::AsRawFd as _, path::Path};

use aya::{
    maps::{lpm_trie::LpmTrie, Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        cgroup_sock_addr::CgroupSockAddr, uprobe::UProbeScope, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType,
        KProbe, TracePoint, UProbe,
    },
    Ebpf,
};
use monitor_common::{NameKey, PortRanges, Resolved, ResolvedKey, ScopeNet, SessionPolicy, WatchedDevs};
use serde::Serialize;

pub use btf::KernelOffsets;
use load::error_chain;
pub use load::{check_environment, load, Loaded};
pub use table::{spec, AttachPoint, ProbeSpec, When, PROBES, STAND_INS};

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
    #[error("probe {0} is not loaded (disabled, or opt-in and not enabled)")]
    NotLoaded(&'static str),
    #[error("probe {0} is required and cannot be disabled")]
    Required(String),
    #[error("there is no probe {name}; the probes are: {}", PROBES.iter().map(|p| p.program).collect::<Vec<_>>().join(", "))]
    Unknown { name: String },
    #[error("no C library found in this agent's own memory map to attach uprobes to")]
    NoLibc,
    #[error("no {0} found in the library directories to attach the TLS uprobes to")]
    NoLibrary(&'static str),
    #[error("no cgroup v2 hierarchy to attach the connect hooks to")]
    NoCgroup2,
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] aya::maps::MapError),
    #[error("keeping {0} open to probe it: {1}")]
    Executable(std::path::PathBuf, #[source] std::io::Error),
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeStatus {
    pub probe: &'static str,
    pub attach: String,
    pub attached: bool,
    /// Loaded, and attached only while sessions need it: while they run
    /// ([`When::OptInWhileSessions`]) or while they hold tokens ([`When::WhileTokens`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub while_sessions: bool,
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
    pub fn is_attached(&self, probe: &str) -> bool {
        self.probes.iter().any(|p| p.probe == probe && p.attached)
    }

    pub fn degraded(&self) -> bool {
        !self.missing_offsets.is_empty() || self.probes.iter().any(|p| !p.attached)
    }
}

/// The maps userspace works with.
pub struct KernelMaps {
    pub proc_sessions: HashMap<MapData, u32, monitor_common::ProcBinding>,
    pub cgroup_sessions: HashMap<MapData, u64, u32>,
    pub config: Array<MapData, u64>,
    pub session_policy: HashMap<MapData, u32, SessionPolicy>,
    pub scope_nets: LpmTrie<MapData, ScopeNet, PortRanges>,
    pub scope_names: HashMap<MapData, NameKey, PortRanges>,
    pub watched_inodes: HashMap<MapData, u64, WatchedDevs>,
    pub token_hashes: HashMap<MapData, u64, u32>,
    /// What `token_hashes` holds (the map is the agent's own, empty at start): a sync writes
    /// only what changed, not thousands of entries each time the fleet adds a few.
    pub token_hashes_held: std::collections::HashSet<u64>,
    /// Addresses an enforcing session may connect to because a name of its scope resolved to
    /// them (the getaddrinfo probe writes most; the agent the hosts file's).
    pub resolved: HashMap<MapData, ResolvedKey, Resolved>,
}

/// Everything userspace takes from the loaded object.
pub struct Handles {
    pub maps: KernelMaps,
    pub events: RingBuf<MapData>,
    pub stats: PerCpuArray<MapData, u64>,
    /// Ring-buffer losses by session (see agent/stats.rs).
    pub session_losses: aya::maps::PerCpuHashMap<MapData, u32, u64>,
}

/// The loaded programs. Dropping this detaches every probe.
pub struct Probes {
    ebpf: Ebpf,
    pub report: LoadReport,
    /// The probes attached only while they are needed (see [`When::wanted`]), with their links
    /// while attached.
    on_demand: Vec<OnDemand>,
    /// The executables the TLS probes of executables.rs go into, attached like the on-demand
    /// probes: while their program's [`When`] wants them.
    executable_sites: Vec<ExecutableSite>,
    sessions_running: bool,
    tokens_known: bool,
    /// Told whether anything is watched (the reader drains slower while nothing is).
    watched: Option<tokio::sync::watch::Sender<bool>>,
    /// Told when tokens start being looked for: the executables run outside sessions until
    /// then were not reported by the exec probe (agent/executables.rs looks at them).
    tokens_now_known: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// The cgroup the cgroup hooks attach to.
    cgroup: Option<std::fs::File>,
}

/// A probe loaded at start and attached on demand.
struct OnDemand {
    spec: &'static ProbeSpec,
    /// Where a uprobe goes, resolved at start (a library that is missing degrades it then).
    site: Option<UprobeSite>,
    link: Option<Link>,
}

/// One executable a probe of executables.rs goes into (a Go program's crypto/tls, an OpenSSL
/// linked in). The file stays open: the probe is attached to it again whenever it is wanted,
/// whatever happened to its path meanwhile.
struct ExecutableSite {
    /// Attached and detached like the library uprobes, at an offset of `/proc/self/fd/N`.
    probe: OnDemand,
    /// Kept open: the kernel resolves the descriptor's path when attaching, to this very file.
    _file: std::fs::File,
    /// The path it was found under, for `monitor probes`.
    path: std::path::PathBuf,
}

impl ExecutableSite {
    fn attach(&mut self, ebpf: &mut Ebpf) -> Result<(), ProbeError> {
        self.probe.link = Some(attach_link(ebpf, &self.probe, None)?);
        Ok(())
    }

    fn detach(&mut self, ebpf: &mut Ebpf) -> Result<(), ProbeError> {
        let Some(link) = self.probe.link.take() else { return Ok(()) };
        detach_link(ebpf, self.probe.spec, link)
    }
}

/// A uprobe's place: an offset (past the frame setup, see uprobe_site) or a symbol of a file.
struct UprobeSite {
    location: SiteLocation,
    file: std::path::PathBuf,
}

enum SiteLocation {
    Symbol(&'static str),
    Offset(u64),
}

enum Link {
    TracePoint(aya::programs::trace_point::TracePointLinkId),
    KProbe(aya::programs::kprobe::KProbeLinkId),
    UProbe(aya::programs::uprobe::UProbeLinkId),
    Skb(aya::programs::cgroup_skb::CgroupSkbLinkId),
    SockAddr(aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId),
}

impl Probes {
    /// Attaches the probes sessions need (see [`When::wanted`]) when sessions start running,
    /// detaches them when none is left. A failure degrades what they provide and is logged.
    pub fn set_sessions_running(&mut self, running: bool) {
        self.sessions_running = running;
        self.refresh_on_demand();
        tracing::debug!(running, "session-time probes");
    }

    /// Attaches the probes tokens need while some session's tokens are looked for, detaches
    /// them when none is. Called under the kernel maps' lock, after the token hashes are
    /// written, so a session's processes are bound only once its tokens are watched for.
    pub fn set_tokens_known(&mut self, known: bool) {
        if known && !self.tokens_known {
            if let Some(notify) = &self.tokens_now_known {
                notify.notify_one();
            }
        }
        self.tokens_known = known;
        self.refresh_on_demand();
        tracing::debug!(known, "token-time probes");
    }

    /// Whether no session runs and no token is looked for: nothing then reports events but
    /// the host-wide probes (the reader drains slower).
    fn nothing_watched(&self) -> bool {
        !self.sessions_running && !self.tokens_known
    }

    /// Whether `program` is attached now: an on-demand one while it is needed, the others as
    /// the load report says.
    pub fn is_attached_now(&self, program: &str) -> bool {
        if let Some(p) = self.on_demand.iter().find(|p| p.spec.program == program) {
            return p.link.is_some();
        }
        let per_executable =
            PROBES.iter().any(|p| p.program == program && matches!(p.attach, AttachPoint::Executables { .. }));
        if per_executable {
            // Attached where it is attached to some executable now.
            return self.executable_sites.iter().any(|s| s.probe.spec.program == program && s.probe.link.is_some());
        }
        self.report.is_attached(program)
    }

    /// Every program of the load report and whether it is attached now (for the metrics).
    pub fn program_states(&self) -> Vec<(String, bool)> {
        self.report.probes.iter().map(|p| (p.probe.to_string(), self.is_attached_now(p.probe))).collect()
    }

    /// The files each uprobe program is attached to now.
    pub fn uprobe_files(&self, program: &str) -> Vec<String> {
        let library = self.on_demand.iter().filter(|p| p.spec.program == program && p.link.is_some());
        let library = library.filter_map(|p| p.site.as_ref()).map(|s| s.file.display().to_string());
        let executables =
            self.executable_sites.iter().filter(|s| s.probe.spec.program == program && s.probe.link.is_some());
        library.chain(executables.map(|s| s.path.display().to_string())).collect()
    }

    /// The shared library files the library probes took at start (libssl, GnuTLS, libc).
    pub fn library_files(&self) -> Vec<std::path::PathBuf> {
        let sites = self.on_demand.iter().filter_map(|p| p.site.as_ref());
        let mut files: Vec<_> = sites.map(|s| s.file.clone()).collect();
        files.sort();
        files.dedup();
        files
    }

    /// Whom to tell, from now on, when tokens start being looked for.
    pub fn tell_tokens_now_known(&mut self, notify: std::sync::Arc<tokio::sync::Notify>) {
        self.tokens_now_known = Some(notify);
    }

    /// Where to say, from now on, whether anything is watched.
    pub fn tell_watched(&mut self, watched: tokio::sync::watch::Sender<bool>) {
        watched.send_replace(!self.nothing_watched());
        self.watched = Some(watched);
    }

    fn refresh_on_demand(&mut self) {
        if let Some(watched) = &self.watched {
            let now = !self.nothing_watched();
            watched.send_if_modified(|w| std::mem::replace(w, now) != now);
        }
        for probe in &mut self.on_demand {
            let Some(want) = probe.spec.when.wanted(self.sessions_running, self.tokens_known) else { continue };
            let spec = probe.spec;
            match (want, probe.link.take()) {
                (true, None) => match attach_link(&mut self.ebpf, probe, self.cgroup.as_ref()) {
                    Ok(link) => probe.link = Some(link),
                    Err(e) => {
                        tracing::warn!(probe = spec.program, "degraded (lost: {}): {}", spec.provides, error_chain(&e))
                    }
                },
                (false, Some(link)) => {
                    if let Err(e) = detach_link(&mut self.ebpf, spec, link) {
                        tracing::warn!(probe = spec.program, "detaching: {}", error_chain(&e));
                    }
                }
                (_, current) => probe.link = current,
            }
        }
        for site in &mut self.executable_sites {
            let want = site.probe.spec.when.wanted(self.sessions_running, self.tokens_known).unwrap_or(true);
            let done = match (want, site.probe.link.is_some()) {
                (true, false) => site.attach(&mut self.ebpf),
                (false, true) => site.detach(&mut self.ebpf),
                _ => Ok(()),
            };
            if let Err(e) = done {
                tracing::warn!(probe = site.probe.spec.program, path = %site.path.display(), "{}", error_chain(&e));
            }
        }
    }

    /// Takes one of the executable probes (see executables.rs) for `file`, found at `path`: it is
    /// attached now if its program is wanted now (see [`When`]), and from then on whenever it
    /// is. Returns whether it is attached now.
    pub fn attach_to_executable(
        &mut self,
        probe: &executables::ExecutableProbe,
        file: &std::fs::File,
        path: &Path,
    ) -> Result<bool, ProbeError> {
        let program = self.ebpf.program_mut(probe.program).ok_or(ProbeError::Missing(probe.program))?;
        if program.fd().is_err() {
            // Not loaded: disabled, or opt-in and not enabled (see PROBES).
            return Err(ProbeError::NotLoaded(probe.program));
        }
        let spec = spec(probe.program).ok_or(ProbeError::Missing(probe.program))?;
        let file = file.try_clone().map_err(|e| ProbeError::Executable(path.to_path_buf(), e))?;
        let location = SiteLocation::Offset(probe.file_offset);
        let site = UprobeSite { location, file: format!("/proc/self/fd/{}", file.as_raw_fd()).into() };
        let probe = OnDemand { spec, site: Some(site), link: None };
        let mut site = ExecutableSite { probe, _file: file, path: path.to_path_buf() };
        let now = spec.when.wanted(self.sessions_running, self.tokens_known).unwrap_or(true);
        if now {
            site.attach(&mut self.ebpf)?;
        }
        self.executable_sites.push(site);
        Ok(now)
    }
}

fn attach_link(ebpf: &mut Ebpf, probe: &OnDemand, cgroup: Option<&std::fs::File>) -> Result<Link, ProbeError> {
    let spec = probe.spec;
    let program = ebpf.program_mut(spec.program).ok_or(ProbeError::Missing(spec.program))?;
    let err = |source| ProbeError::Program { probe: spec.program, source };
    Ok(match spec.attach {
        AttachPoint::TracePoint { category, name } => {
            let tp: &mut TracePoint = program.try_into().map_err(err)?;
            Link::TracePoint(tp.attach(category, name).map_err(err)?)
        }
        AttachPoint::KProbe { function } => {
            let kprobe: &mut KProbe = program.try_into().map_err(err)?;
            Link::KProbe(kprobe.attach(function, 0).map_err(err)?)
        }
        AttachPoint::CgroupSkbEgress | AttachPoint::CgroupSkbIngress => {
            let cgroup = cgroup.ok_or(ProbeError::NoCgroup2)?;
            let hook: &mut CgroupSkb = program.try_into().map_err(err)?;
            let direction = match spec.attach {
                AttachPoint::CgroupSkbIngress => CgroupSkbAttachType::Ingress,
                _ => CgroupSkbAttachType::Egress,
            };
            Link::Skb(hook.attach(cgroup, direction, CgroupAttachMode::default()).map_err(err)?)
        }
        AttachPoint::CgroupSockAddr { .. } => {
            let cgroup = cgroup.ok_or(ProbeError::NoCgroup2)?;
            let hook: &mut CgroupSockAddr = program.try_into().map_err(err)?;
            // Attached as a BPF link (kernel >= 5.7), which always coexists with other programs on
            // the same cgroup (another agent, a CNI): a connect goes through only if every one of
            // them allows it. `link_create` refuses attach flags, hence the default mode.
            Link::SockAddr(hook.attach(cgroup, CgroupAttachMode::default()).map_err(err)?)
        }
        _ => {
            let site = probe.site.as_ref().ok_or(ProbeError::Missing(spec.program))?;
            let uprobe: &mut UProbe = program.try_into().map_err(err)?;
            let id = match site.location {
                SiteLocation::Symbol(symbol) => uprobe.attach(symbol, &site.file, UProbeScope::AllProcesses),
                SiteLocation::Offset(offset) => uprobe.attach(offset, &site.file, UProbeScope::AllProcesses),
            };
            Link::UProbe(id.map_err(err)?)
        }
    })
}

fn detach_link(ebpf: &mut Ebpf, spec: &ProbeSpec, link: Link) -> Result<(), ProbeError> {
    let program = ebpf.program_mut(spec.program).ok_or(ProbeError::Missing(spec.program))?;
    let err = |source| ProbeError::Program { probe: spec.program, source };
    match link {
        Link::TracePoint(id) => <&mut TracePoint>::try_from(program).map_err(err)?.detach(id).map_err(err),
        Link::KProbe(id) => <&mut KProbe>::try_from(program).map_err(err)?.detach(id).map_err(err),
        Link::UProbe(id) => <&mut UProbe>::try_from(program).map_err(err)?.detach(id).map_err(err),
        Link::Skb(id) => <&mut CgroupSkb>::try_from(program).map_err(err)?.detach(id).map_err(err),
        Link::SockAddr(id) => <&mut CgroupSockAddr>::try_from(program).map_err(err)?.detach(id).map_err(err),
    }
}
