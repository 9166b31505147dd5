//! Delivery benchmarks: collector ingest of acknowledged, durable alerts from concurrent senders,
//! and the latency from the syscall to the alert in the collector's store.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::bail;
use serde_json::{json, Value};

use super::{median, BenchAgent};

fn example(args: &[&str]) -> anyhow::Result<Value> {
    super::run_example("delivery_bench", args)
}

/// 5 runs of 4 senders x 100,000 alerts; the median rate.
pub fn ingest(monitor: &Path) -> anyhow::Result<Value> {
    eprintln!("bench: collector ingest, 4 concurrent senders, 400,000 acknowledged durable alerts (5 runs)");
    let mut runs = Vec::new();
    for _ in 0..5 {
        let v = example(&["ingest", monitor.to_str().unwrap(), "4", "400000"])?;
        eprintln!("  {v}");
        runs.push(v);
    }
    let rates: Vec<f64> = runs.iter().map(|r| r["alerts_per_sec"].as_f64().unwrap_or(0.0)).collect();
    Ok(
        json!({ "senders": 4, "alerts": 400000, "alerts_per_sec_median": median(&rates), "target_alerts_per_sec": 200000, "runs": runs }),
    )
}

/// 3 runs of one sender of 4 messages of 42,000 alerts each (over 16 MiB a message: the
/// collector reads each in many reads, and must walk it once, not at every read).
pub fn ingest_large(monitor: &Path) -> anyhow::Result<Value> {
    eprintln!("bench: collector ingest of 16 MiB messages, 1 sender, 4 x 42,000 acknowledged durable alerts (3 runs)");
    let mut runs = Vec::new();
    for _ in 0..3 {
        let v = example(&["ingest", monitor.to_str().unwrap(), "1", "168000", "42000"])?;
        eprintln!("  {v}");
        runs.push(v);
    }
    let rates: Vec<f64> = runs.iter().map(|r| r["alerts_per_sec"].as_f64().unwrap_or(0.0)).collect();
    let bytes = runs.first().and_then(|r| r["largest_message_bytes"].as_u64()).unwrap_or(0);
    Ok(
        json!({ "senders": 1, "alerts": 168000, "message_bytes": bytes, "alerts_per_sec_median": median(&rates), "runs": runs }),
    )
}

/// The collector flooded by 40 senders (ten times the ingest part's) that never wait for an
/// ack, against an 8 MiB buffering budget: every acknowledged alert stored, memory bounded.
pub fn flood(monitor: &Path) -> anyhow::Result<Value> {
    eprintln!("bench: collector flooded, 40 pipelined senders, 400,000 alerts, 8 MiB buffering budget");
    let v = example(&["flood", monitor.to_str().unwrap(), "40", "400000"])?;
    eprintln!("  {v}");
    Ok(v)
}

/// An agent forwarding to a collector; a session process execs outside its scope every 20 ms,
/// 250 times; each alert's time from the exec to the collector's store.
pub fn latency(monitor: &Path, dir: &Path) -> anyhow::Result<Value> {
    eprintln!("bench: end-to-end latency, exec syscall to alert synced in the collector's store (250 alerts)");
    let store = dir.join("latency-store");
    let _ = fs::remove_dir_all(&store);
    let _ = fs::remove_dir_all(dir.join("latency-spool"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut collector = Command::new(monitor)
        .args(["collector", "--log", "warn", "--listen", &format!("127.0.0.1:{port}"), "--store"])
        .arg(&store)
        .stdout(Stdio::null())
        .spawn()?;
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the collector did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let spool = dir.join("latency-spool");
    let args: Vec<String> =
        ["--output", &format!("forward://127.0.0.1:{port}"), "--spool-dir", spool.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let agent = BenchAgent::start(monitor, dir, &args)?;
    let session = dir.join("latency-session.yaml");
    fs::write(&session, "principal: bench@example.com\nactor: svc:bench\ntask: latency\nscope:\n  exec: [\"/bin/sh\", \"/usr/bin/dash\", \"/usr/bin/sleep\"]\n")?;
    let status = Command::new(monitor)
        .args(["run", "--file"])
        .arg(&session)
        .arg("--control")
        .arg(&agent.control)
        .args(["--", "/bin/sh", "-c", "i=0; while [ $i -lt 250 ]; do /bin/true; sleep 0.02; i=$((i+1)); done"])
        .status()?;
    if !status.success() {
        bail!("the latency session failed");
    }
    // Wait until all 250 are stored (or a deadline), then read the store.
    let deadline = Instant::now() + Duration::from_secs(30);
    let result = loop {
        let v = example(&["latency", store.to_str().unwrap()]).unwrap_or(Value::Null);
        if v["alerts"].as_u64().unwrap_or(0) >= 250 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    drop(agent);
    let _ = collector.kill();
    let _ = collector.wait();
    eprintln!("  {result}");
    Ok(
        json!({ "alerts": result["alerts"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"], "max_ms": result["max_ms"],
               "target_p50_ms": 50, "target_p99_ms": 250 }),
    )
}
