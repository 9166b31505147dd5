//! The probe table: every program the agent has, where it attaches, whether the agent needs it,
//! what is lost without it, and when it is attached.

use super::executables;

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
    /// A kprobe on a kernel function: only as a stand-in (see [`STAND_INS`]), where this
    /// kernel lacks the tracepoint and allows kprobes.
    KProbe {
        function: &'static str,
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
            AttachPoint::KProbe { function } => write!(f, "kprobe/{function}"),
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

/// A probe loaded only when another could not be, on this kernel: it restores what the other
/// provides, from another hook.
pub struct StandIn {
    pub instead_of: &'static str,
    pub spec: ProbeSpec,
}

/// The capability tracepoint is new in 6.14; older kernels (Debian 12's 6.1, 6.12) allow a
/// kprobe on the function itself. This machine's kernel refuses kprobes, and has the tracepoint.
///
/// A cgroup skb program may call `bpf_get_current_pid_tgid` only on newer kernels (6.1 refuses
/// it: "unknown func bpf_get_current_pid_tgid#14"), which the plaintext hook uses to pair a TLS
/// write with its socket; its stand-in captures plaintext requests as well, but names no TLS
/// connection's peer.
pub static STAND_INS: &[StandIn] = &[
    StandIn {
        instead_of: "cap_capable",
        spec: ProbeSpec {
            program: "cap_capable_kprobe",
            attach: AttachPoint::KProbe { function: "cap_capable" },
            required: false,
            provides: "capabilities raised by session processes (capset), seen when used",
            when: When::WhileSessions,
        },
    },
    StandIn {
        instead_of: "tcp_egress",
        spec: ProbeSpec {
            program: "tcp_egress_compat",
            attach: AttachPoint::CgroupSkbEgress,
            required: false,
            provides: "tokens in plaintext HTTP requests (not the peer address of TLS connections)",
            when: When::WhileTokens,
        },
    },
];

/// The probe whose program is `program`, stand-ins included.
pub fn spec(program: &str) -> Option<&'static ProbeSpec> {
    PROBES.iter().chain(STAND_INS.iter().map(|s| &s.spec)).find(|p| p.program == program)
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
    pub(super) fn wanted(self, sessions_running: bool, tokens_known: bool) -> Option<bool> {
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
