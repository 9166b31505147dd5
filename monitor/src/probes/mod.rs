//! Loading and attaching the eBPF programs: a declarative table of probes, a check of what the
//! kernel and the caller allow, and a report of what is attached and what is degraded.

mod btf;
pub mod executables;
mod go;
pub mod pins;
pub mod stats;
pub mod tracefs;
mod uprobe_site;

use std::{os::fd::AsRawFd as _, path::Path};

use aya::{
    maps::{lpm_trie::LpmTrie, Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        cgroup_sock_addr::CgroupSockAddr, uprobe::UProbeScope, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType,
        TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use monitor_common::{
    globals, NameKey, PortRanges, Resolved, ResolvedKey, ScopeNet, SessionPolicy, WatchedDevs, MAP_CGROUP_SESSIONS,
    MAP_CONFIG, MAP_EVENTS, MAP_PROC_SESSIONS, MAP_RESOLVED, MAP_SCOPE_NAMES, MAP_SCOPE_NETS, MAP_SESSION_LOSSES,
    MAP_SESSION_POLICY, MAP_STATS, MAP_TOKEN_HASHES, MAP_WATCHED_INODES,
};
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

/// Where a probe attaches.
#[derive(Debug, Clone, Copy)]
pub enum AttachPoint {
    TracePoint {
        category: &'static str,
        name: &'static str,
    },
    /// A cgroup sock_addr hook (connect4, connect6, sendmsg4, sendmsg6) on the agent's cgroup.
    CgroupSockAddr {
        hook: &'static str,
    },
    /// A uprobe (or uretprobe) on a function of the C library every dynamically linked process
    /// maps, attached to the library file so it covers all of them.
    Libc {
        symbol: &'static str,
    },
    /// An entry uprobe on a function of a shared library (OpenSSL 3's libssl.so.3, GnuTLS's
    /// libgnutls.so.30), attached to the library file, for a program that reads the first
    /// `args` arguments (see uprobe_site.rs).
    Library {
        file: &'static str,
        symbol: &'static str,
        args: usize,
    },
    /// A uretprobe on a function of a shared library, on its entry (where the return address is).
    LibraryReturn {
        file: &'static str,
        symbol: &'static str,
    },
    /// An entry uprobe loaded at start and attached to each executable that defines `symbol`,
    /// when it is first exec'd (see executables.rs).
    Executables {
        symbol: &'static str,
    },
    /// A cgroup skb egress hook on the agent's cgroup.
    CgroupSkbEgress,
    /// A cgroup skb ingress hook on the agent's cgroup.
    CgroupSkbIngress,
}

impl std::fmt::Display for AttachPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttachPoint::TracePoint { category, name } => write!(f, "tracepoint/{category}/{name}"),
            AttachPoint::CgroupSockAddr { hook } => write!(f, "cgroup/{hook}"),
            AttachPoint::Libc { symbol } => write!(f, "uprobe/libc:{symbol}"),
            AttachPoint::Library { file, symbol, .. } => write!(f, "uprobe/{file}:{symbol}"),
            AttachPoint::LibraryReturn { file, symbol } => write!(f, "uretprobe/{file}:{symbol}"),
            AttachPoint::Executables { symbol } => write!(f, "uprobe/<each executable>:{symbol}"),
            AttachPoint::CgroupSkbEgress => write!(f, "cgroup_skb/egress"),
            AttachPoint::CgroupSkbIngress => write!(f, "cgroup_skb/ingress"),
        }
    }
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
    pub when: When,
}

/// When a probe is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// From start to stop.
    Always,
    /// Only when asked for (`--enable-probe`): a probe whose cost falls on the whole host.
    OptIn,
    /// Only when asked for, and then only while some process or cgroup is bound to a session
    /// (see [`Probes::set_sessions_running`]): syscall tracepoints that report on session
    /// processes only, but whose mere presence puts every syscall of every process on the
    /// kernel's slower syscall-tracing path (measured: +5% on an openat loop).
    OptInWhileSessions,
    /// Attached only while some process or cgroup is bound to a session (see
    /// [`Probes::set_sessions_running`]): probes that report on session processes only but run
    /// for everything on the host: a cgroup skb program for every packet received, the
    /// capability check tracepoint for every capability check, the libc uprobes installed into
    /// every dynamically linked process at exec.
    WhileSessions,
    /// Attached only while sessions hold tokens (see [`Probes::set_tokens_known`]): a cgroup skb
    /// program runs for every packet the host sends, and until some session holds a token no
    /// request can carry one (measured: +7% on a loopback connect loop with it attached).
    WhileTokens,
    /// Attached while sessions run (their processes' requests teach tokens, see
    /// credentials/learn) or hold tokens (anyone's request may carry one, even after every
    /// session ended): the TLS library uprobes, installed into every process that maps the
    /// library; and the process and connect hooks, which have nothing to do while nothing is
    /// watched (no process to attribute, no token to look for), so that a host with no session
    /// runs no program of the agent at all on fork, exec, exit or connect.
    WhileSessionsOrTokens,
}

impl When {
    /// Whether an on-demand probe is wanted now; `None` for the probes attached from the start.
    fn wanted(self, sessions_running: bool, tokens_known: bool) -> Option<bool> {
        match self {
            When::Always | When::OptIn => None,
            When::OptInWhileSessions | When::WhileSessions => Some(sessions_running),
            When::WhileTokens => Some(tokens_known),
            When::WhileSessionsOrTokens => Some(sessions_running || tokens_known),
        }
    }
}

const LIBSSL: &str = "libssl.so.3";
/// GnuTLS 3 (Debian's wget and apt link it).
const LIBGNUTLS: &str = "libgnutls.so.30";

/// Every probe the agent knows about.
pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: "task_newtask",
        attach: AttachPoint::TracePoint { category: "task", name: "task_newtask" },
        required: true,
        provides: "session inheritance at fork",
        when: When::WhileSessionsOrTokens,
    },
    ProbeSpec {
        program: "sched_process_exec",
        attach: AttachPoint::TracePoint { category: "sched", name: "sched_process_exec" },
        required: true,
        provides: "exec events",
        when: When::WhileSessionsOrTokens,
    },
    ProbeSpec {
        // Measures, not watches: an empty program beside sched_process_exec (monitor-ebpf
        // hooks/floor.rs), whose run time is the floor under every program's (bench, tests).
        program: "floor_exec",
        attach: AttachPoint::TracePoint { category: "sched", name: "sched_process_exec" },
        required: false,
        provides: "nothing: the BPF statistics floor, for measurements",
        when: When::OptIn,
    },
    ProbeSpec {
        program: "sched_process_exit",
        attach: AttachPoint::TracePoint { category: "sched", name: "sched_process_exit" },
        required: true,
        provides: "exit events and session cleanup",
        when: When::WhileSessionsOrTokens,
    },
    ProbeSpec {
        program: "connect4",
        attach: AttachPoint::CgroupSockAddr { hook: "connect4" },
        required: false,
        provides: "IPv4 connects and their enforcement",
        when: When::WhileSessionsOrTokens,
    },
    ProbeSpec {
        program: "connect6",
        attach: AttachPoint::CgroupSockAddr { hook: "connect6" },
        required: false,
        provides: "IPv6 connects and their enforcement",
        when: When::WhileSessionsOrTokens,
    },
    ProbeSpec {
        program: "sendmsg4",
        attach: AttachPoint::CgroupSockAddr { hook: "sendmsg4" },
        required: false,
        provides: "unconnected IPv4 UDP sends and their enforcement",
        when: When::WhileSessions,
    },
    ProbeSpec {
        program: "sendmsg6",
        attach: AttachPoint::CgroupSockAddr { hook: "sendmsg6" },
        required: false,
        provides: "unconnected IPv6 UDP sends and their enforcement",
        when: When::WhileSessions,
    },
    ProbeSpec {
        program: "getaddrinfo_enter",
        attach: AttachPoint::Libc { symbol: "getaddrinfo" },
        required: false,
        provides: "names resolved through libc (name scopes, dst_name)",
        when: When::WhileSessions,
    },
    ProbeSpec {
        program: "getaddrinfo_exit",
        attach: AttachPoint::Libc { symbol: "getaddrinfo" },
        required: false,
        provides: "names resolved through libc (name scopes, dst_name)",
        when: When::WhileSessions,
    },
    ProbeSpec {
        program: "sys_exit_openat",
        attach: AttachPoint::TracePoint { category: "syscalls", name: "sys_exit_openat" },
        required: false,
        // The alternative to fanotify (credentials/fanotify.rs), for kernels without it. A
        // syscall tracepoint turns on the syscall-tracing slow path for every process, and this
        // one runs for every open on the host: the openat benchmark measures what that costs.
        provides: "opens of watched credential files (instead of fanotify)",
        when: When::OptIn,
    },
    ProbeSpec {
        program: "sys_exit_openat2",
        attach: AttachPoint::TracePoint { category: "syscalls", name: "sys_exit_openat2" },
        required: false,
        provides: "opens of watched credential files through openat2 (instead of fanotify)",
        when: When::OptIn,
    },
    ProbeSpec {
        program: "sys_exit_open",
        attach: AttachPoint::TracePoint { category: "syscalls", name: "sys_exit_open" },
        required: false,
        provides: "opens of watched credential files through open(2) (instead of fanotify)",
        when: When::OptIn,
    },
    ProbeSpec {
        program: "cap_capable",
        attach: AttachPoint::TracePoint { category: "capability", name: "cap_capable" },
        required: false,
        provides: "capabilities raised by session processes (capset), seen when used",
        when: When::WhileSessions,
    },
    ProbeSpec {
        program: "sys_exit_setuid",
        attach: AttachPoint::TracePoint { category: "syscalls", name: "sys_exit_setuid" },
        required: false,
        // The process events connector (credentials/proc_connector.rs) reports uid changes
        // without a syscall tracepoint; this one adds which call made them.
        provides: "which setuid-family call changed a session process's uid",
        when: When::OptInWhileSessions,
    },
    ProbeSpec {
        program: "sys_exit_setreuid",
        attach: AttachPoint::TracePoint { category: "syscalls", name: "sys_exit_setreuid" },
        required: false,
        provides: "which setuid-family call changed a session process's uid (setreuid)",
        when: When::OptInWhileSessions,
    },
    ProbeSpec {
        program: "sys_exit_setresuid",
        attach: AttachPoint::TracePoint { category: "syscalls", name: "sys_exit_setresuid" },
        required: false,
        provides: "which setuid-family call changed a session process's uid (setresuid)",
        when: When::OptInWhileSessions,
    },
    ProbeSpec {
        program: "sys_exit_capset",
        attach: AttachPoint::TracePoint { category: "syscalls", name: "sys_exit_capset" },
        required: false,
        // cap_capable sees raised capabilities when they are used, without a syscall tracepoint.
        provides: "capset by session processes, when it happens rather than at the next capability use",
        when: When::OptInWhileSessions,
    },
    ProbeSpec {
        program: "ssl_write",
        attach: AttachPoint::Library { file: LIBSSL, symbol: "SSL_write", args: 3 },
        required: false,
        provides: "tokens in TLS requests made with OpenSSL 3",
        when: When::WhileSessionsOrTokens,
    },
    ProbeSpec {
        program: "ssl_write_ex",
        attach: AttachPoint::Library { file: LIBSSL, symbol: "SSL_write_ex", args: 3 },
        required: false,
        provides: "tokens in TLS requests made with OpenSSL 3 (SSL_write_ex)",
        when: When::WhileSessionsOrTokens,
    },
    ProbeSpec {
        program: "ssl_read",
        attach: AttachPoint::Library { file: LIBSSL, symbol: "SSL_read", args: 3 },
        required: false,
        // A uretprobe traps on every return of every TLS read on the host, for every process
        // (measured: curl --http2 in a session 1.42 with these four, 1.10 without): learning
        // from token responses is opt-in; learning from what session processes send is not.
        provides: "tokens session processes receive from token endpoints over OpenSSL 3 (SSL_read)",
        when: When::OptIn,
    },
    ProbeSpec {
        program: "ssl_read_ret",
        attach: AttachPoint::LibraryReturn { file: LIBSSL, symbol: "SSL_read" },
        required: false,
        provides: "tokens session processes receive from token endpoints over OpenSSL 3 (SSL_read)",
        when: When::OptIn,
    },
    ProbeSpec {
        program: "ssl_read_ex",
        attach: AttachPoint::Library { file: LIBSSL, symbol: "SSL_read_ex", args: 4 },
        required: false,
        provides: "tokens session processes receive from token endpoints over OpenSSL 3 (SSL_read_ex)",
        when: When::OptIn,
    },
    ProbeSpec {
        program: "ssl_read_ex_ret",
        attach: AttachPoint::LibraryReturn { file: LIBSSL, symbol: "SSL_read_ex" },
        required: false,
        provides: "tokens session processes receive from token endpoints over OpenSSL 3 (SSL_read_ex)",
        when: When::OptIn,
    },
    ProbeSpec {
        program: "gnutls_record_send",
        attach: AttachPoint::Library { file: LIBGNUTLS, symbol: "gnutls_record_send", args: 3 },
        required: false,
        provides: "tokens in TLS requests made with GnuTLS (wget, apt)",
        when: When::WhileSessionsOrTokens,
    },
    ProbeSpec {
        program: "gnutls_record_recv",
        attach: AttachPoint::Library { file: LIBGNUTLS, symbol: "gnutls_record_recv", args: 3 },
        required: false,
        // Opt-in like ssl_read, for the same cost (a uretprobe on every TLS read).
        provides: "tokens session processes receive from token endpoints over GnuTLS (gnutls_record_recv)",
        when: When::OptIn,
    },
    ProbeSpec {
        program: "gnutls_record_recv_ret",
        attach: AttachPoint::LibraryReturn { file: LIBGNUTLS, symbol: "gnutls_record_recv" },
        required: false,
        provides: "tokens session processes receive from token endpoints over GnuTLS (gnutls_record_recv)",
        when: When::OptIn,
    },
    ProbeSpec {
        program: "go_tls_write",
        attach: AttachPoint::Executables { symbol: executables::GO_TLS_WRITE },
        required: false,
        provides: "tokens in TLS requests made by Go programs (crypto/tls)",
        when: When::WhileSessionsOrTokens,
    },
    ProbeSpec {
        program: "go_tls_read",
        attach: AttachPoint::Executables { symbol: executables::GO_TLS_READ },
        required: false,
        // Opt-in like ssl_read: the probes at its returns trap on every TLS read of every Go
        // program on the host.
        provides: "tokens Go programs in sessions receive from token endpoints (crypto/tls reads)",
        when: When::OptInWhileSessions,
    },
    ProbeSpec {
        program: "go_tls_read_ret",
        attach: AttachPoint::Executables { symbol: executables::GO_TLS_READ },
        required: false,
        provides: "tokens Go programs in sessions receive from token endpoints (crypto/tls reads)",
        when: When::OptInWhileSessions,
    },
    ProbeSpec {
        program: "tcp_egress",
        attach: AttachPoint::CgroupSkbEgress,
        required: false,
        provides: "tokens in plaintext HTTP requests",
        when: When::WhileTokens,
    },
    ProbeSpec {
        program: "dns_ingress",
        attach: AttachPoint::CgroupSkbIngress,
        required: false,
        provides: "names from DNS answers to session processes, for any resolver (name scopes, dst_name)",
        when: When::WhileSessions,
    },
    ProbeSpec {
        program: "sys_enter_connect",
        attach: AttachPoint::TracePoint { category: "syscalls", name: "sys_enter_connect" },
        required: false,
        // Any syscall tracepoint turns on the syscall-tracing slow path for every syscall of
        // every process: measured +5-10% on a connect loop outside sessions.
        provides: "the socket fd of connects",
        when: When::OptIn,
    },
    ProbeSpec {
        program: "sys_exit_connect",
        attach: AttachPoint::TracePoint { category: "syscalls", name: "sys_exit_connect" },
        required: false,
        provides: "the outcome of connects",
        when: When::OptIn,
    },
];

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
    pub proc_sessions: HashMap<MapData, u32, u32>,
    pub cgroup_sessions: HashMap<MapData, u64, u32>,
    pub config: Array<MapData, u64>,
    pub session_policy: HashMap<MapData, u32, SessionPolicy>,
    pub scope_nets: LpmTrie<MapData, ScopeNet, PortRanges>,
    pub scope_names: HashMap<MapData, NameKey, PortRanges>,
    pub watched_inodes: HashMap<MapData, u64, WatchedDevs>,
    pub token_hashes: HashMap<MapData, u64, u32>,
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
        self.tokens_known = known;
        self.refresh_on_demand();
        tracing::debug!(known, "token-time probes");
    }

    /// Whether no session runs and no token is looked for: the exec probe then does not report
    /// new executables (monitor-ebpf session.rs, `anything_watched`).
    pub fn nothing_watched(&self) -> bool {
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
        let spec = PROBES.iter().find(|p| p.program == probe.program).ok_or(ProbeError::Missing(probe.program))?;
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
        Link::UProbe(id) => <&mut UProbe>::try_from(program).map_err(err)?.detach(id).map_err(err),
        Link::Skb(id) => <&mut CgroupSkb>::try_from(program).map_err(err)?.detach(id).map_err(err),
        Link::SockAddr(id) => <&mut CgroupSockAddr>::try_from(program).map_err(err)?.detach(id).map_err(err),
    }
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
    let maps = KernelMaps {
        proc_sessions: take(&mut ebpf, MAP_PROC_SESSIONS)?,
        cgroup_sessions: take(&mut ebpf, MAP_CGROUP_SESSIONS)?,
        config: take(&mut ebpf, MAP_CONFIG)?,
        session_policy: take(&mut ebpf, MAP_SESSION_POLICY)?,
        scope_nets: take(&mut ebpf, MAP_SCOPE_NETS)?,
        scope_names: take(&mut ebpf, MAP_SCOPE_NAMES)?,
        watched_inodes: take(&mut ebpf, MAP_WATCHED_INODES)?,
        token_hashes: take(&mut ebpf, MAP_TOKEN_HASHES)?,
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
            let attach = spec.attach.to_string();
            let opt_in = matches!(spec.when, When::OptIn | When::OptInWhileSessions);
            let off =
                disabled.iter().any(|d| d == spec.program) || (opt_in && !enabled.iter().any(|e| e == spec.program));
            if off {
                let why = if opt_in { "opt-in, enable with --enable-probe" } else { "disabled by --disable-probe" };
                let error = Some(format!("{why} (lost: {})", spec.provides));
                report.probes.push(ProbeStatus {
                    probe: spec.program,
                    attach,
                    attached: false,
                    while_sessions: false,
                    error,
                });
                continue;
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
                report.probes.push(ProbeStatus {
                    probe: spec.program,
                    attach,
                    attached,
                    while_sessions: attached,
                    error,
                });
                continue;
            }
            let result = attach_one(&mut self.ebpf, spec, cgroup.as_ref());
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
        }
        Ok(Probes {
            ebpf: self.ebpf,
            report,
            on_demand,
            executable_sites: Vec::new(),
            sessions_running: false,
            tokens_known: false,
            watched: None,
            cgroup,
        })
    }
}

/// Loads a probe's program without attaching it, and finds where a uprobe goes.
fn load_program(ebpf: &mut Ebpf, spec: &ProbeSpec, have_cgroup: bool) -> Result<Option<UprobeSite>, ProbeError> {
    let program = ebpf.program_mut(spec.program).ok_or(ProbeError::Missing(spec.program))?;
    let err = |source| ProbeError::Program { probe: spec.program, source };
    match spec.attach {
        AttachPoint::TracePoint { .. } => {
            <&mut TracePoint>::try_from(program).map_err(err)?.load().map_err(err)?;
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
fn error_chain(e: &dyn std::error::Error) -> String {
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
fn library_path(file: &str) -> Option<std::path::PathBuf> {
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
