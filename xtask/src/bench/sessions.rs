//! Part `sessions`: what an agent costs idle with many sessions active, and how long a restart
//! with all of them takes to be ready (they are adopted from the state directory).
//!
//! Each session is bound to its own sleeping process (so the agent follows a process per
//! session, as on a node running that many tasks), started over the control socket as the CLI
//! and the Python client do.

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::json;

use super::{figure_row, BenchAgent};

/// Session counts measured, in order; the restart is timed at the last.
const COUNTS: [usize; 3] = [0, 1_000, 10_000];
/// How long the idle CPU is sampled.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// Targets the issue sets at 10,000 sessions.
const TARGET_RSS_MB: f64 = 30.0;
const TARGET_CPU_PERCENT: f64 = 1.0;
const TARGET_RESTART_SECS: f64 = 2.0;

pub struct Measured {
    pub rows: Vec<String>,
    pub json: serde_json::Value,
}

/// Processes that hold the sessions; killed on drop.
struct Holders(Vec<Child>);

impl Holders {
    fn grow_to(&mut self, n: usize) -> anyhow::Result<()> {
        while self.0.len() < n {
            let child = Command::new("sleep")
                .arg("3600")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("spawning a session holder")?;
            self.0.push(child);
        }
        Ok(())
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

pub fn run(monitor: &Path, dir: &Path, agent_args: &[String]) -> anyhow::Result<Measured> {
    let state = dir.join("sessions-state");
    let _ = fs::remove_dir_all(&state);
    let extra = agent_args;
    let (agent, _) = BenchAgent::launch(monitor, dir, extra, &state, true, &dir.join("agent.log"))?;
    let mut holders = Holders(Vec::new());
    let mut points = Vec::new();
    let mut rows = Vec::new();
    for count in COUNTS {
        eprintln!("bench: agent idle with {count} active sessions");
        holders.grow_to(count)?;
        let started = Instant::now();
        for (i, child) in holders.0.iter().enumerate().skip(points_started(&points)) {
            start_session(&agent, i, child.id())?;
        }
        let start_secs = started.elapsed().as_secs_f64();
        let new = count - points_started(&points);
        // Settle: the state file written, the starts' work done.
        std::thread::sleep(Duration::from_secs(3));
        let (cpu, rss) = idle_usage(agent.pid(), IDLE_WINDOW)?;
        rows.push(figure_row(
            &format!("agent idle, {count} active sessions"),
            format!("{rss:>10.1} MB  {cpu:>5.2}% CPU"),
        ));
        points.push(json!({
            "sessions": count,
            "rss_mb": rss,
            "cpu_percent_of_a_core": cpu,
            "idle_window_secs": IDLE_WINDOW.as_secs(),
            "new_sessions": new,
            "start_us_per_session": if new > 0 { start_secs * 1e6 / new as f64 } else { 0.0 },
        }));
    }
    // A restart: SIGTERM (the agent keeps its state), a new agent adopts every session.
    let last = *COUNTS.last().unwrap_or(&0);
    eprintln!("bench: restart with {last} active sessions");
    drop(agent);
    let log = dir.join("agent-restart.log");
    let (restarted, ready_secs) = BenchAgent::restart(monitor, dir, extra, &state, &log)?;
    let adopted = adopted_count(&log)?;
    if adopted != last {
        bail!("the restarted agent adopted {adopted} sessions, not {last}: {}", log.display());
    }
    std::thread::sleep(Duration::from_secs(3));
    let (cpu, rss) = idle_usage(restarted.pid(), IDLE_WINDOW)?;
    drop(restarted);
    drop(holders);
    let _ = fs::remove_dir_all(&state);
    rows.push(figure_row(&format!("restart to ready, {last} sessions adopted"), format!("{ready_secs:>10.2} s")));
    rows.push(figure_row(
        &format!("restarted agent idle, {last} sessions"),
        format!("{rss:>10.1} MB  {cpu:>5.2}% CPU"),
    ));
    Ok(Measured {
        rows,
        json: json!({
            "idle": points,
            "restart": {
                "sessions": last,
                "adopted": adopted,
                "secs_to_ready": ready_secs,
                "rss_mb_after": rss,
                "cpu_percent_after": cpu,
            },
            "target_rss_mb_at_10k": TARGET_RSS_MB,
            "target_cpu_percent_at_10k": TARGET_CPU_PERCENT,
            "target_restart_secs_at_10k": TARGET_RESTART_SECS,
        }),
    })
}

fn points_started(points: &[serde_json::Value]) -> usize {
    points.last().and_then(|p| p["sessions"].as_u64()).unwrap_or(0) as usize
}

/// One `start` request on the control socket (docs/control-protocol.md).
fn start_session(agent: &BenchAgent, i: usize, pid: u32) -> anyhow::Result<()> {
    let request = json!({
        "op": "start",
        "origin": "bench",
        "file": {"id": format!("bench-{i}"), "principal": "bench@example.com", "actor": "svc:bench", "task": "benchmark"},
        "id": null,
        "bind": {"pid": pid, "cgroup": null},
        "env_tokens": [],
    });
    agent.request(request).with_context(|| format!("session {i} not started"))
}

/// The agent's CPU (percent of one core) over `window`, and its resident memory (MB) after.
pub(super) fn idle_usage(pid: u32, window: Duration) -> anyhow::Result<(f64, f64)> {
    let before = cpu_ticks(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(window);
    let ticks = cpu_ticks(pid)? - before;
    let elapsed = t0.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok((ticks as f64 / hz / elapsed * 100.0, rss_kb / 1024.0))
}

/// utime + stime of a process, in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("stat")? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// The count the agent logged when it took the sessions over.
fn adopted_count(log: &Path) -> anyhow::Result<usize> {
    let text = fs::read_to_string(log)?;
    let Some(line) = text.lines().find(|l| l.contains("sessions taken over from the previous agent")) else {
        return Ok(0);
    };
    let n = line.split("adopted=").nth(1).and_then(|v| v.split_whitespace().next()).context("adopted=")?;
    Ok(n.parse()?)
}
