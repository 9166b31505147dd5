//! What the agent costs per operation in the agent side of a paired round, measured in the same
//! run as the wall clock: each eBPF program's runs and nanoseconds (the kernel's own BPF
//! statistics, read through `monitor probes --json`) and the agent's own CPU time (the
//! scheduler's account of its threads). These do not move with the machine's noise the way a ratio does, and they
//! say which part of a ratio is the probes, which the agent, and which is left.

use std::{collections::BTreeMap, fs, path::Path, process::Command};

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

/// Cumulative counts of a running agent.
pub struct Snapshot {
    /// (runs, ns) per program.
    programs: BTreeMap<String, (u64, u64)>,
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
        let programs = data["programs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some((p["program"].as_str()?.to_string(), (p["run_cnt"].as_u64()?, p["run_time_ns"].as_u64()?)))
            })
            .collect();
        Ok(Self { programs, cpu_ns: cpu_ns(agent.pid())? })
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
}

impl PerOp {
    pub fn between(before: &Snapshot, after: &Snapshot, ops: u64) -> Self {
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
        Self { programs, agent_cpu_ns: after.cpu_ns.saturating_sub(before.cpu_ns) as f64 / ops }
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
        Self { programs, agent_cpu_ns: median(&rounds.iter().map(|r| r.agent_cpu_ns).collect::<Vec<_>>()) }
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
        format!(
            "    per op: {} | agent CPU {:.1} µs | of the baseline: probes {:.2}%, agent CPU {:.2}%, rest {:.2}%",
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
        })
    }
}
