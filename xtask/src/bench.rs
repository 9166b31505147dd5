//! `cargo xtask bench`: paired runs with and without the agent on this machine, medians and
//! ratios, printed as a table and written as JSON.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::json;

pub fn run(root: &Path, execs: u32, rounds: u32, out: &Path) -> anyhow::Result<()> {
    let dir = root.join("target/bench");
    fs::create_dir_all(&dir)?;
    let monitor = root.join("target/release/monitor");

    eprintln!("bench: exec overhead, {rounds} paired rounds of {execs} fork+exec+wait of /bin/true");
    let mut without = Vec::new();
    let mut with = Vec::new();
    let mut ratios = Vec::new();
    for round in 0..rounds {
        // Alternate the order so drift on the machine does not favour one side.
        let (a, b) = if round % 2 == 0 {
            let a = exec_loop(execs)?;
            let b = with_agent(&monitor, &dir, || exec_loop(execs))?;
            (a, b)
        } else {
            let b = with_agent(&monitor, &dir, || exec_loop(execs))?;
            let a = exec_loop(execs)?;
            (a, b)
        };
        eprintln!("  round {round}: without {:.1} µs/exec, with {:.1} µs/exec", per_exec(a, execs), per_exec(b, execs));
        without.push(a);
        with.push(b);
        ratios.push(b / a);
    }
    let exec_without = median(&without);
    let exec_with = median(&with);
    let exec_ratio = median(&ratios);

    eprintln!("bench: engine throughput on synthetic events (one core)");
    let engine_events = 1_000_000u64;
    let mut rates = Vec::new();
    for _ in 0..5 {
        let output = Command::new("cargo")
            .args(["run", "--quiet", "--release", "--package", "monitor", "--example", "engine_bench", "--"])
            .arg(engine_events.to_string())
            .output()
            .context("running the engine benchmark")?;
        if !output.status.success() {
            bail!("engine_bench failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        rates.push(v["events_per_sec"].as_f64().unwrap_or(0.0));
    }
    let engine_rate = median(&rates);

    println!();
    println!("{:<52} {:>14} {:>14} {:>8}", "benchmark", "without agent", "with agent", "ratio");
    println!(
        "{:<52} {:>11.1} µs {:>11.1} µs {:>8.3}",
        "exec of /bin/true, process outside sessions (median)",
        per_exec(exec_without, execs),
        per_exec(exec_with, execs),
        exec_ratio
    );
    println!("{:<52} {:>14} {:>11.0}/s", "engine throughput, synthetic events (median)", "", engine_rate);
    println!("targets: exec ratio <= 1.03, engine >= 1,000,000 events/s");

    let report = json!({
        "exec_overhead": {
            "iterations": execs,
            "rounds": rounds,
            "without_agent_us_per_exec_median": per_exec(exec_without, execs),
            "with_agent_us_per_exec_median": per_exec(exec_with, execs),
            "ratio_median_of_pairs": exec_ratio,
            "ratios": ratios,
            "target_ratio": 1.03,
        },
        "engine": {
            "events": engine_events,
            "events_per_sec_median": engine_rate,
            "runs": rates,
            "target_events_per_sec": 1_000_000,
        },
    });
    let out = if out.is_absolute() { out.to_path_buf() } else { root.join(out) };
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("report: {}", out.display());
    Ok(())
}

/// Seconds for `n` fork+exec+wait of /bin/true.
fn exec_loop(n: u32) -> anyhow::Result<f64> {
    let start = Instant::now();
    for _ in 0..n {
        let status = Command::new("/bin/true").status()?;
        if !status.success() {
            bail!("/bin/true failed");
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

fn per_exec(secs: f64, n: u32) -> f64 {
    secs * 1e6 / n as f64
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Runs `measure` while an agent is loaded with a session active for another process.
fn with_agent(monitor: &Path, dir: &Path, measure: impl FnOnce() -> anyhow::Result<f64>) -> anyhow::Result<f64> {
    let agent = BenchAgent::start(monitor, dir)?;
    let mut holder = Command::new("sleep").arg("600").spawn()?;
    let session = dir.join("bench-session.yaml");
    fs::write(&session, "principal: bench@example.com\nactor: svc:bench\ntask: benchmark\n")?;
    let status = Command::new(monitor)
        .args(["session", "start", "--file"])
        .arg(&session)
        .args(["--pid", &holder.id().to_string(), "--control"])
        .arg(&agent.control)
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("could not start the benchmark session");
    }
    let result = measure();
    let _ = holder.kill();
    let _ = holder.wait();
    drop(agent);
    result
}

struct BenchAgent {
    child: Child,
    control: PathBuf,
}

impl BenchAgent {
    fn start(monitor: &Path, dir: &Path) -> anyhow::Result<Self> {
        let control = dir.join("control.sock");
        let log = dir.join("agent.log");
        let child = Command::new(monitor)
            .arg("agent")
            .arg("--control")
            .arg(&control)
            .arg("--key-file")
            .arg(dir.join("fingerprint.key"))
            .arg("--output")
            .arg(format!("jsonl:{}", dir.join("alerts.jsonl").display()))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()?;
        let agent = Self { child, control };
        let start = Instant::now();
        while !fs::read_to_string(&log).unwrap_or_default().contains("agent ready") {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("agent not ready: {}", fs::read_to_string(&log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}
