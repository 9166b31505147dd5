//! What the agent costs per operation in the agent side of a paired round, measured in the same
//! run as the wall clock: each eBPF program's runs and nanoseconds (the kernel's own BPF
//! statistics, read through `monitor probes --json`) and the agent's own CPU time (the
//! scheduler's account of its threads). These do not move with the machine's noise the way a ratio does, and they
//! say which part of a ratio is the probes, which the agent, and which is left.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
    process::Command,
};

use anyhow::{bail, Context as _};
use serde_json::json;

use super::{median, BenchAgent};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the kernel's BPF run-time counting on for the benchmark, and back to what it was.
pub struct BpfStats(String);

impl BpfStats {
    pub fn enable() -> anyhow::Result<Self> {
        let was = fs::read_to_string(STATS_SYSCTL).context("reading kernel.bpf_stats_enabled")?;
        fs::write(STATS_SYSCTL, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(Self(was.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(STATS_SYSCTL, &self.0);
    }
}

/// The files a benchmark's processes map: its executable and the shared libraries it loads
/// (from `ldd`), by device and inode.
pub struct Workload(BTreeSet<(u64, u64)>);

impl Workload {
    pub fn of(executable: &Path) -> anyhow::Result<Self> {
        let mut files = vec![executable.to_path_buf()];
        // A static executable has no libraries: ldd says so and fails.
        if let Ok(o) = Command::new("ldd").arg(executable).output() {
            let text = String::from_utf8_lossy(&o.stdout);
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let paths = text.lines().filter_map(|l| l.split("=>").last()?.split_whitespace().next());
            files.extend(paths.filter(|p| p.starts_with('/')).map(std::path::PathBuf::from));
        }
        let ids = files.iter().filter_map(|f| file_id(f)).collect::<BTreeSet<_>>();
        if ids.is_empty() {
            bail!("{}: not found", executable.display());
        }
        Ok(Self(ids))
    }

    fn maps(&self, file: &str) -> bool {
        file_id(Path::new(file)).is_some_and(|id| self.0.contains(&id))
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Cumulative counts of a running agent.
pub struct Snapshot {
    /// (runs, ns) per program.
    programs: BTreeMap<String, (u64, u64)>,
    /// Attached uprobes: (program, file).
    uprobes: BTreeSet<(String, String)>,
    cpu_ns: u64,
}

impl Snapshot {
    pub fn take(monitor: &Path, agent: &BenchAgent) -> anyhow::Result<Self> {
        let o = Command::new(monitor)
            .args(["probes", "--json", "--control"])
            .arg(&agent.control)
            .env("MONITOR_LOG", "warn")
            .output()
            .context("running monitor probes")?;
        if !o.status.success() {
            bail!("monitor probes: {}", String::from_utf8_lossy(&o.stderr));
        }
        let data: serde_json::Value = serde_json::from_slice(&o.stdout).context("monitor probes --json")?;
        let listed = data["programs"].as_array().cloned().unwrap_or_default();
        let programs = listed
            .iter()
            .filter_map(|p| {
                Some((p["program"].as_str()?.to_string(), (p["run_cnt"].as_u64()?, p["run_time_ns"].as_u64()?)))
            })
            .collect();
        let uprobes = listed
            .iter()
            .filter(|p| p["attached"] == true)
            .flat_map(|p| {
                let program = p["program"].as_str().unwrap_or_default().to_string();
                let files = p["files"].as_array().cloned().unwrap_or_default();
                files.into_iter().filter_map(move |f| Some((program.clone(), f.as_str()?.to_string())))
            })
            .collect();
        Ok(Self { programs, uprobes, cpu_ns: cpu_ns(agent.pid())? })
    }
}

/// CPU time of a process's threads, in ns (the scheduler's own account in
/// /proc/PID/task/*/schedstat: exact, where utime and stime count 10 ms ticks). A thread that
/// exits between two snapshots takes its time with it.
fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).context("reading the agent's threads")?;
    Ok(tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

/// Costs per operation of one agent side.
#[derive(Clone, Default)]
pub struct PerOp {
    /// (runs, ns) per operation, for the programs that ran.
    pub programs: BTreeMap<String, (f64, f64)>,
    pub agent_cpu_ns: f64,
    /// The uprobes installed into the benchmark's processes: attached, at the end of the run, to
    /// a file they map ("program in file").
    pub uprobes_installed: BTreeSet<String>,
}

impl PerOp {
    pub fn between(before: &Snapshot, after: &Snapshot, ops: u64, workload: &Workload) -> Self {
        let ops = ops.max(1) as f64;
        let programs = after
            .programs
            .iter()
            .filter_map(|(name, (runs, ns))| {
                let (runs0, ns0) = before.programs.get(name).copied().unwrap_or_default();
                let runs = runs.saturating_sub(runs0);
                (runs > 0).then(|| (name.clone(), (runs as f64 / ops, ns.saturating_sub(ns0) as f64 / ops)))
            })
            .collect();
        let uprobes_installed = after
            .uprobes
            .iter()
            .filter(|(_, file)| workload.maps(file))
            .map(|(program, file)| format!("{program} in {file}"))
            .collect();
        Self { programs, agent_cpu_ns: after.cpu_ns.saturating_sub(before.cpu_ns) as f64 / ops, uprobes_installed }
    }

    /// The median, per figure, of several rounds.
    pub fn median(rounds: &[PerOp]) -> Self {
        let names: std::collections::BTreeSet<&String> = rounds.iter().flat_map(|r| r.programs.keys()).collect();
        let programs = names
            .into_iter()
            .map(|name| {
                let of = |pick: fn(&(f64, f64)) -> f64| {
                    median(&rounds.iter().map(|r| r.programs.get(name).map_or(0.0, pick)).collect::<Vec<_>>())
                };
                (name.clone(), (of(|p| p.0), of(|p| p.1)))
            })
            .collect();
        Self {
            programs,
            agent_cpu_ns: median(&rounds.iter().map(|r| r.agent_cpu_ns).collect::<Vec<_>>()),
            // Any round's: the same files are probed in each.
            uprobes_installed: rounds.iter().flat_map(|r| r.uprobes_installed.iter().cloned()).collect(),
        }
    }

    pub fn probes_ns(&self) -> f64 {
        self.programs.values().map(|(_, ns)| ns).sum()
    }

    /// The report line under a benchmark's row: the programs that ran at least once in a
    /// hundred operations, the agent's CPU, and what share of the baseline each is.
    pub fn line(&self, baseline_ns: f64, overhead_ns: f64) -> String {
        let mut programs: Vec<_> = self.programs.iter().filter(|(_, (runs, _))| *runs >= 0.01).collect();
        programs.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let listed: Vec<String> =
            programs.iter().map(|(name, (runs, ns))| format!("{name} {runs:.2}x {:.0} ns", ns / runs)).collect();
        let share = |ns: f64| 100.0 * ns / baseline_ns.max(1.0);
        let uprobes = match self.uprobes_installed.len() {
            0 => "none".to_string(),
            n => format!("{n} ({})", self.uprobes_installed.iter().cloned().collect::<Vec<_>>().join(", ")),
        };
        format!(
            "    per op: {} | agent CPU {:.1} µs | of the baseline: probes {:.2}%, agent CPU {:.2}%, rest {:.2}%\n    \
             uprobes installed into its processes: {uprobes}",
            if listed.is_empty() { "no probe ran".to_string() } else { listed.join(", ") },
            self.agent_cpu_ns / 1000.0,
            share(self.probes_ns()),
            share(self.agent_cpu_ns),
            share(overhead_ns - self.probes_ns() - self.agent_cpu_ns),
        )
    }

    pub fn json(&self, baseline_ns: f64, overhead_ns: f64) -> serde_json::Value {
        let programs: serde_json::Map<String, serde_json::Value> = self
            .programs
            .iter()
            .map(|(name, (runs, ns))| (name.clone(), json!({ "runs_per_op": runs, "ns_per_op": ns })))
            .collect();
        json!({
            "programs": programs,
            "probes_ns_per_op": self.probes_ns(),
            "agent_cpu_ns_per_op": self.agent_cpu_ns,
            "baseline_ns_per_op": baseline_ns,
            "overhead_ns_per_op": overhead_ns,
            "rest_ns_per_op": overhead_ns - self.probes_ns() - self.agent_cpu_ns,
            "uprobes_installed": self.uprobes_installed,
        })
    }
}

/// The processes' own hooks, fork to exit, whose run time outside every session is the target
/// (a lookup and a return).
const PROCESS_HOOKS: &[&str] = &["task_newtask", "sched_process_exec", "sched_process_exit"];

/// What a program costs on this machine before it does anything: an agent with the empty
/// `floor_exec` program beside its exec hook (monitor-ebpf hooks/floor.rs) runs `execs`
/// fork+exec+wait outside every session, with no session on the host. Reports the floor's ns
/// per run and each process hook's ns per run, absolute and above the floor.
pub fn floor(monitor: &Path, dir: &Path, agent_args: &[String], execs: u32) -> anyhow::Result<serde_json::Value> {
    eprintln!("bench: the BPF run-time floor, {execs} fork+exec+wait of /bin/true beside an empty program");
    let mut args = agent_args.to_vec();
    args.extend(["--enable-probe".to_string(), "floor_exec".to_string()]);
    let agent = BenchAgent::start(monitor, dir, &args)?;
    let before = Snapshot::take(monitor, &agent)?;
    super::exec_loop(execs)?;
    let after = Snapshot::take(monitor, &agent)?;
    let ns_per_run = |program: &str| {
        let (runs0, ns0) = before.programs.get(program).copied().unwrap_or_default();
        let (runs, ns) = after.programs.get(program).copied().unwrap_or_default();
        let runs = runs.saturating_sub(runs0);
        (runs > 0).then(|| ns.saturating_sub(ns0) as f64 / runs as f64)
    };
    let floor = ns_per_run("floor_exec").context("the floor program did not run: is floor_exec in the eBPF object?")?;
    let hooks: serde_json::Map<String, serde_json::Value> = PROCESS_HOOKS
        .iter()
        .filter_map(|p| {
            let ns = ns_per_run(p)?;
            Some((p.to_string(), json!({ "ns_per_run": ns, "above_floor_ns": ns - floor })))
        })
        .collect();
    Ok(
        json!({ "execs": execs, "floor_ns_per_run": floor, "outside_sessions_no_session_on_host": hooks, "target_ns_per_run": 150 }),
    )
}

/// The report line of [`floor`].
pub fn floor_row(floor: &serde_json::Value) -> String {
    let ns = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    let hooks = floor["outside_sessions_no_session_on_host"].as_object().cloned().unwrap_or_default();
    let listed: Vec<String> = hooks
        .iter()
        .map(|(name, v)| format!("{name} {:.0} ns ({:+.0})", ns(&v["ns_per_run"]), ns(&v["above_floor_ns"])))
        .collect();
    let hooks = if listed.is_empty() {
        "none ran: nothing is attached while no session runs".to_string()
    } else {
        listed.join(", ")
    };
    format!(
        "BPF run-time floor (an empty program on sched_process_exec): {:.0} ns per run\n    \
         outside sessions, none on the host, the process hooks per run (above the floor): {hooks}",
        ns(&floor["floor_ns_per_run"]),
    )
}
