//! Command-line parsing (clap) and the dispatch of each command. Parsing is kept apart from
//! what the commands do: each command turns its arguments into validated settings first.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::{
    agent::{self, AgentSettings},
    engine::SessionSummary,
    policy::Policy,
    sessions::{
        client,
        fingerprint::DEFAULT_KEY_FILE,
        protocol::{BindRequest, Request},
        DEFAULT_CONTROL_SOCKET,
    },
    sinks::OutputSpec,
};

#[derive(Debug, Parser)]
#[command(
    name = "monitor",
    version,
    about = "Ties process activity to delegation sessions and catches what outlives or exceeds them"
)]
pub struct Cli {
    /// Log filter for messages on stderr (alerts never go there): error, warn, info, debug.
    #[arg(long, global = true, env = "MONITOR_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load the probes, serve the control socket, emit alerts.
    Agent(AgentArgs),
    /// Declare, end and inspect delegation sessions.
    #[command(subcommand)]
    Session(SessionCommand),
    /// Run COMMAND as a session's task: bound before its first instruction, ended when it exits.
    /// The exit code passes through.
    Run(RunArgs),
    /// Check agent policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Receive alerts from agents (Fluent Forward), store them durably, fan them out to sinks.
    Collector(CollectorArgs),
    /// Replay session traces: the delegation, process tree, timeline and alerts of each session,
    /// re-evaluated by the same engine (what-if with --policy).
    Replay(ReplayArgs),
    /// Look at alerts before the SIEM does.
    #[command(subcommand)]
    Alerts(AlertsCommand),
    /// The running agent's eBPF programs: where each attaches, whether it is attached now, and
    /// what it has cost (the kernel's run count and time; counted while
    /// `sysctl kernel.bpf_stats_enabled=1`).
    Probes {
        /// The agent's response as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// A table per session and rule: findings, occurrences, first and last seen, of a JSON-lines
    /// alert file or a collector's store directory (an update counts once, at its latest count).
    Summary { path: PathBuf },
}

#[derive(Debug, Args)]
pub struct CollectorArgs {
    /// Address to listen on for Fluent Forward (e.g. 0.0.0.0:24224).
    #[arg(long, value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// TLS certificate chain (PEM); with --tls-key, the listener speaks TLS only.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The Forward shared key clients must prove they know. Prefer --shared-key-file or the
    /// environment: a command line is visible to every user.
    #[arg(long, value_name = "KEY", env = "MONITOR_SHARED_KEY", hide_env_values = true)]
    pub shared_key: Option<String>,
    /// A file holding the shared key.
    #[arg(long, value_name = "FILE", conflicts_with = "shared_key")]
    pub shared_key_file: Option<PathBuf>,
    /// The store: append-only segments, synced before any ack.
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    /// Where stored alerts go: `jsonl:PATH`, `ocsf:PATH`, `cef:PATH`, `syslog+tls://HOST:PORT`,
    /// `kafka://BROKERS/TOPIC`. Repeatable; each resumes from its own position.
    #[arg(long = "sink", value_name = "SPEC")]
    pub sinks: Vec<crate::collector::SinkSpec>,
    /// Serve Prometheus metrics at http://ADDR/metrics (ingest, store, each sink's position),
    /// with /healthz and /readyz.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Connections served at once; a connection past it is refused (closed at once, logged).
    #[arg(long, value_name = "N", default_value_t = crate::collector::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Bytes of messages not yet whole that all connections may hold together; a connection
    /// that would pass it stops being read (TCP back-pressure) until others free some.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub max_buffered: u64,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Trace segment files or trace directories (as written by `monitor agent --trace-dir`).
    #[arg(required = true, value_name = "TRACE")]
    pub traces: Vec<PathBuf>,
    /// Only this session.
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
    /// Re-evaluate against this policy (what-if): which alerts appear and which disappear.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "timeline")]
    pub format: crate::replay::Format,
    /// Write to FILE instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file: errors name the file, line and field.
    Check { file: PathBuf },
    /// Make the running agent re-read its --policy file (as SIGHUP does); a bad file is refused
    /// with its error and the running policy stays.
    Reload {
        #[command(flatten)]
        control: ControlArg,
    },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// A TOML file of these settings, each under its flag's name (`output = ["stdout"]`,
    /// `trace-dir = "/var/lib/monitor/traces"`); a flag given here overrides the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where alerts go: `stdout` (JSON lines), `jsonl:PATH`, `ocsf:PATH`, `forward://HOST:PORT`
    /// or `forward+tls://HOST:PORT` (options: `?shared_key_file=PATH&ca=PATH&server_name=NAME`).
    /// Repeatable.
    #[arg(long = "output", value_name = "SPEC", default_value = "stdout")]
    pub outputs: Vec<OutputSpec>,
    #[command(flatten)]
    pub control: ControlArg,
    /// The per-deployment key for token fingerprints; generated (root-only) when absent.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_KEY_FILE)]
    pub key_file: PathBuf,
    /// The agent policy: default time bounds, severities, actor scopes, never-alert destinations.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// ttl of sessions whose file gives none (overrides the policy; built-in 1h).
    #[arg(long, value_name = "DURATION", value_parser = positive_duration)]
    pub default_ttl: Option<Duration>,
    /// grace of sessions whose file gives none (overrides the policy; built-in 5s).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub default_grace: Option<Duration>,
    /// Also write every session event as JSON lines to PATH (debugging).
    #[arg(long, value_name = "PATH")]
    pub event_log: Option<PathBuf>,
    /// The cgroup v2 directory whose processes the connect hooks watch and enforce (default:
    /// the root of the cgroup2 hierarchy, i.e. every process).
    #[arg(long = "cgroup", value_name = "PATH")]
    pub hook_cgroup: Option<PathBuf>,
    /// Do not attach this optional probe (repeatable), e.g. `sys_enter_connect`: the agent
    /// reports what it loses.
    #[arg(long = "disable-probe", value_name = "PROBE")]
    pub disabled_probes: Vec<String>,
    /// Attach an opt-in probe (repeatable): `sys_enter_connect` and `sys_exit_connect` add the
    /// socket fd and the outcome to connect events, at a cost to every syscall on the host.
    #[arg(long = "enable-probe", value_name = "PROBE")]
    pub enabled_probes: Vec<String>,
    /// Where forward outputs keep alerts until the receiver acknowledges them.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/monitor/spool")]
    pub spool_dir: PathBuf,
    /// Each forward output's spool is bounded to this; when full, the oldest alerts go, counted
    /// in a monitor_blind alert.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub spool_max_bytes: u64,
    /// Record session traces (every session event and alert) in DIR, for `monitor replay`.
    #[arg(long, value_name = "DIR")]
    pub trace_dir: Option<PathBuf>,
    /// Also forward every trace record to a collector (`forward://HOST:PORT` or
    /// `forward+tls://…`, options as for --output), so responders replay from the central store.
    #[arg(long, value_name = "SPEC", requires = "trace_dir", value_parser = trace_target)]
    pub trace_output: Option<crate::forward::ForwardTarget>,
    /// A trace segment is sealed and a new one begun past this size (bytes, or with K/M/G).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub trace_segment_size: u64,
    /// Oldest sealed trace segments are deleted while the directory holds more than this.
    #[arg(long, value_name = "SIZE", default_value = "2G", value_parser = parse_size)]
    pub trace_max_bytes: u64,
    /// Sealed trace segments older than this are deleted.
    #[arg(long, value_name = "DURATION", default_value = "30days", value_parser = positive_duration)]
    pub trace_max_age: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics, with /healthz and /readyz (e.g.
    /// 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Where the agent keeps its sessions, so a restarted or upgraded agent takes them over.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/monitor/state")]
    pub state_dir: PathBuf,
    /// Start without the sessions a previous agent left (they are not adopted, and the state
    /// is replaced).
    #[arg(long)]
    pub fresh: bool,
    /// Where the maps that bind processes and cgroups to sessions are pinned (on bpffs, mounted
    /// at /sys/fs/bpf if nothing is), so they outlive the agent and a restarted one finds them.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/monitor")]
    pub pin_dir: PathBuf,
    /// Do not pin them: they end with the agent.
    #[arg(long)]
    pub no_pin: bool,
    /// This host's name in alerts and on the fleet watchlist (default: the kernel's host name;
    /// in a DaemonSet, the node's name: a pod's host name is the pod's).
    #[arg(long, value_name = "NAME", env = "MONITOR_HOST_NAME")]
    pub host_name: Option<String>,
    /// Join the fleet watchlist on this Kafka topic (`kafka://BROKER[,BROKER]/TOPIC`, compacted):
    /// this host's sessions are published, and other hosts' tokens are caught here after their
    /// task ended or outside it. The fleet's agents must share --key-file.
    #[arg(long, value_name = "SPEC")]
    pub fleet: Option<crate::fleet::FleetTarget>,
    /// No contact with the fleet's brokers for this long raises monitor_blind.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = positive_duration)]
    pub fleet_stale_after: Duration,
}

#[derive(Debug, Args, Clone)]
pub struct ControlArg {
    /// The agent's control socket.
    #[arg(long = "control", value_name = "PATH", env = "MONITOR_CONTROL", default_value = DEFAULT_CONTROL_SOCKET)]
    pub path: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Declare a session from a session file.
    Start {
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Overrides the file's id.
        #[arg(long)]
        id: Option<String>,
        /// Bind a running process and its descendants.
        #[arg(long)]
        pid: Option<u32>,
        /// Bind every process of a cgroup v2 (absolute, or relative to the cgroup2 mount).
        #[arg(long, value_name = "PATH")]
        cgroup: Option<String>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Say that a session's task is done.
    End {
        id: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// List the agent's sessions.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Show one session, its scope and its live processes (JSON).
    Show {
        id: String,
        #[command(flatten)]
        control: ControlArg,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
    /// Overrides the file's id.
    #[arg(long)]
    pub id: Option<String>,
    #[command(flatten)]
    pub control: ControlArg,
    /// The task and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Runs a parsed command; returns the process exit code.
pub fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Agent(args) => {
            // The whole policy is read and checked before the agent does anything with it.
            let policy = match &args.policy {
                Some(path) => Policy::read(path)?,
                None => Policy::default(),
            };
            let host_name = args.host_name.filter(|h| !h.is_empty()).unwrap_or_else(crate::host::hostname);
            let settings = AgentSettings {
                outputs: args.outputs,
                control: args.control.path,
                key_file: args.key_file,
                default_ttl: args.default_ttl,
                default_grace: args.default_grace,
                policy,
                event_log: args.event_log,
                hook_cgroup: args.hook_cgroup,
                disabled_probes: args.disabled_probes,
                enabled_probes: args.enabled_probes,
                spool: crate::sinks::SpoolSettings { dir: args.spool_dir, max_bytes: args.spool_max_bytes },
                trace_dir: args.trace_dir,
                trace_output: args.trace_output,
                trace_limits: crate::trace::TraceLimits {
                    segment_bytes: args.trace_segment_size,
                    max_bytes: args.trace_max_bytes,
                    max_age: args.trace_max_age,
                },
                metrics: args.metrics,
                policy_path: args.policy.clone(),
                state_dir: args.state_dir,
                fresh: args.fresh,
                pin_dir: (!args.no_pin).then_some(args.pin_dir),
                host_name: host_name.clone(),
                fleet: args.fleet.map(|target| crate::fleet::FleetSettings {
                    target,
                    host: host_name,
                    stale_after: args.fleet_stale_after,
                }),
            };
            agent::memory::bound_allocator();
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(agent::run(settings))?;
            Ok(0)
        }
        Command::Session(command) => session(command),
        Command::Run(args) => crate::run::run(crate::run::Task {
            file: args.file,
            id: args.id,
            control: args.control.path,
            command: args.command,
        }),
        Command::Collector(args) => {
            let shared_key = match (args.shared_key, &args.shared_key_file) {
                (Some(k), _) => Some(k),
                (None, Some(path)) => {
                    let k =
                        std::fs::read_to_string(path).with_context(|| format!("shared key file {}", path.display()))?;
                    Some(k.trim_end_matches(['\n', '\r']).to_string())
                }
                (None, None) => None,
            };
            if shared_key.as_deref() == Some("") {
                anyhow::bail!("the shared key is empty");
            }
            let settings = crate::collector::CollectorSettings {
                listen: args.listen,
                tls: args.tls_cert.zip(args.tls_key),
                shared_key,
                store: args.store,
                sinks: args.sinks,
                metrics: args.metrics,
                limits: crate::collector::Limits {
                    connections: args.max_connections.max(1),
                    buffered: usize::try_from(args.max_buffered).unwrap_or(usize::MAX),
                },
            };
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(crate::collector::run(settings))?;
            Ok(0)
        }
        Command::Replay(args) => crate::replay::run(crate::replay::ReplaySettings {
            traces: args.traces,
            session: args.session,
            policy: args.policy.as_deref().map(Policy::read).transpose()?,
            format: args.format,
            output: args.output,
        }),
        Command::Probes { json, control } => {
            let data = client::call(&control.path, &Request::Probes)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&data)?);
                return Ok(0);
            }
            let programs: Vec<crate::probes::stats::ProgramStats> =
                serde_json::from_value(data["programs"].clone()).context("agent response")?;
            print!("{}", crate::probes::stats::table(&programs));
            if data["bpf_stats_enabled"] != true {
                println!("(run counts and times grow only while `sysctl kernel.bpf_stats_enabled=1`)");
            }
            Ok(0)
        }
        Command::Alerts(AlertsCommand::Summary { path }) => {
            crate::alerts_summary::run(&path)?;
            Ok(0)
        }
        Command::Policy(PolicyCommand::Check { file }) => {
            let policy = Policy::read(&file)?;
            println!("{}: ok: {}", file.display(), policy.summary());
            Ok(0)
        }
        Command::Policy(PolicyCommand::Reload { control }) => {
            let data = client::call(&control.path, &Request::ReloadPolicy)?;
            println!("{}", data["message"].as_str().unwrap_or_default());
            Ok(0)
        }
    }
}

fn session(command: SessionCommand) -> anyhow::Result<i32> {
    match command {
        SessionCommand::Start { file, id, pid, cgroup, control } => {
            let request = client::start_request(&file, id, BindRequest { pid, cgroup })?;
            let data = client::call(&control.path, &request)?;
            client::print_warnings("monitor session start", &data);
            println!("{}", data["id"].as_str().unwrap_or_default());
        }
        SessionCommand::End { id, control } => {
            let data = client::call(&control.path, &Request::End { id, reason: crate::event::EndReason::Requested })?;
            let s: SessionSummary = serde_json::from_value(data).context("agent response")?;
            println!("{} ended at {}", s.session.id, s.ended.unwrap_or_default());
        }
        SessionCommand::List { json, control } => {
            let data = client::call(&control.path, &Request::List)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&data)?);
            } else {
                let list: Vec<SessionSummary> = serde_json::from_value(data).context("agent response")?;
                print_table(&list);
            }
        }
        SessionCommand::Show { id, control } => {
            let data = client::call(&control.path, &Request::Show { id })?;
            println!("{}", serde_json::to_string_pretty(&data)?);
        }
    }
    Ok(0)
}

fn print_table(list: &[SessionSummary]) {
    println!("{:<28} {:<8} {:<24} {:<20} {:>5}  TASK", "ID", "STATE", "PRINCIPAL", "ACTOR", "PROCS");
    for s in list {
        println!(
            "{:<28} {:<8} {:<24} {:<20} {:>5}  {}",
            s.session.id,
            s.state.as_str(),
            s.session.principal,
            s.session.actor,
            s.live_processes.len(),
            s.session.task
        );
    }
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be longer than 0s".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `4096`, `64K`, `64M`, `2G` (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => (&text[..at], text[at..].trim()),
        None => (text, ""),
    };
    let n: u64 = digits.parse().map_err(|_| format!("`{text}` is not a size like 4096, 64K, 64M or 2G"))?;
    let shift = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift).filter(|n| *n > 0).ok_or_else(|| format!("`{text}` is out of range"))
}

/// A forward target for traces: tagged `monitor.trace` unless the spec names a tag.
fn trace_target(spec: &str) -> Result<crate::forward::ForwardTarget, String> {
    let mut target = crate::forward::ForwardTarget::parse(spec)?;
    if !spec.contains("tag=") {
        target.tag = "monitor.trace".into();
    }
    Ok(target)
}
