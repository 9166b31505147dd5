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

mod credentials;
pub use credentials::{open_loop, timed};

pub struct Sizes {
    pub execs: u32,
    pub connects: u32,
    pub opens: u32,
    pub tls_requests: u32,
    pub rounds: u32,
    /// Extra arguments for the agent under test (e.g. `--disable-probe X`).
    pub agent_args: Vec<String>,
}

pub fn run(root: &Path, sizes: Sizes, out: &Path) -> anyhow::Result<()> {
    let Sizes { execs, connects, opens, tls_requests, rounds, agent_args } = sizes;
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
            let b = with_agent(&monitor, &dir, &agent_args, || exec_loop(execs))?;
            (a, b)
        } else {
            let b = with_agent(&monitor, &dir, &agent_args, || exec_loop(execs))?;
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

    let connect = connect_overhead(&monitor, &dir, &agent_args, connects, rounds)?;
    let open = credentials::open_overhead(&monitor, &dir, &agent_args, opens, rounds)?;
    let tls = credentials::tls_overhead(&monitor, &dir, &agent_args, tls_requests, rounds)?;

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
    let replay = replay_bench()?;

    println!();
    println!("{:<52} {:>14} {:>14} {:>8}", "benchmark", "without agent", "with agent", "ratio");
    println!(
        "{:<52} {:>11.1} µs {:>11.1} µs {:>8.3}",
        "exec of /bin/true, process outside sessions (median)",
        per_exec(exec_without, execs),
        per_exec(exec_with, execs),
        exec_ratio
    );
    println!(
        "{:<52} {:>11.1} µs {:>11.1} µs {:>8.3}",
        "TCP connect, process outside sessions (median)",
        per_exec(connect.none, connects),
        per_exec(connect.outside, connects),
        connect.outside_ratio
    );
    println!(
        "{:<52} {:>11.1} µs {:>11.1} µs {:>8.3}",
        "TCP connect, session process, in scope (median)",
        per_exec(connect.none, connects),
        per_exec(connect.inside, connects),
        connect.inside_ratio
    );
    println!(
        "{:<52} {:>11.2} µs {:>11.2} µs {:>8.3}",
        "openat+close, process outside sessions (median)",
        per_exec(open.without, opens),
        per_exec(open.with, opens),
        open.ratio
    );
    println!(
        "{:<52} {:>11.1} µs {:>11.1} µs {:>8.3}",
        "HTTPS request with a token, session process (median)",
        per_exec(tls.without, tls_requests),
        per_exec(tls.with, tls_requests),
        tls.ratio
    );
    println!("{:<52} {:>14} {:>11.0}/s", "engine throughput, synthetic events (median)", "", engine_rate);
    println!(
        "{:<52} {:>14} {:>11.0}/s",
        "trace recording, events written (median)",
        "",
        replay["written_events_per_sec"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<52} {:>14} {:>12.2} s",
        "replay with detection, 1,000,000 events (median)",
        "",
        replay["replay_detection_seconds"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<52} {:>14} {:>12.2} s",
        "replay with full report, 1,000,000 events (median)",
        "",
        replay["replay_full_report_seconds"].as_f64().unwrap_or(0.0)
    );
    println!("targets: exec ratio <= 1.03; connect ratio <= 1.03 outside, <= 1.15 in a session; openat <= 1.03; HTTPS <= 1.10; engine >= 1,000,000 events/s; replay of 1M events <= 2 s");

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
        "connect_overhead": {
            "iterations": connects,
            "rounds": rounds,
            "no_agent_us_per_connect_median": per_exec(connect.none, connects),
            "agent_outside_session_us_per_connect_median": per_exec(connect.outside, connects),
            "agent_in_session_us_per_connect_median": per_exec(connect.inside, connects),
            "ratio_outside_median_of_pairs": connect.outside_ratio,
            "ratio_in_session_median_of_pairs": connect.inside_ratio,
            "target_ratio_outside": 1.03,
            "target_ratio_in_session": 1.15,
        },
        "open_overhead": open.json(opens, rounds, "us_per_open", 1.03),
        "tls_request_overhead": tls.json(tls_requests, rounds, "us_per_request", 1.10),
        "trace_replay": replay,
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

pub(crate) fn per_exec(secs: f64, n: u32) -> f64 {
    secs * 1e6 / n as f64
}

pub(crate) fn median(values: &[f64]) -> f64 {
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
fn with_agent(
    monitor: &Path,
    dir: &Path,
    agent_args: &[String],
    measure: impl FnOnce() -> anyhow::Result<f64>,
) -> anyhow::Result<f64> {
    let agent = BenchAgent::start(monitor, dir, agent_args)?;
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

pub(crate) struct BenchAgent {
    child: Child,
    pub control: PathBuf,
}

impl BenchAgent {
    pub fn start(monitor: &Path, dir: &Path, extra: &[String]) -> anyhow::Result<Self> {
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
            .args(extra)
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

struct ConnectResults {
    none: f64,
    outside: f64,
    inside: f64,
    outside_ratio: f64,
    inside_ratio: f64,
}

/// Paired rounds of `count` TCP connects to a loopback listener: (a) no agent, (b) agent loaded,
/// process outside every session, (c) agent loaded, process in a session, destination in scope.
fn connect_overhead(
    monitor: &Path,
    dir: &Path,
    agent_args: &[String],
    count: u32,
    rounds: u32,
) -> anyhow::Result<ConnectResults> {
    eprintln!("bench: connect overhead, {rounds} paired rounds of {count} TCP connects to 127.0.0.9");
    let listener = std::net::TcpListener::bind("127.0.0.9:0")?;
    // std listens with a backlog of 128: a connect burst overflows it and SYN retransmits (1 s)
    // would dominate the measurement. listen(2) again raises it.
    // SAFETY: listen on the listener's own open socket.
    if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) } != 0 {
        bail!("listen: {}", std::io::Error::last_os_error());
    }
    let addr = listener.local_addr()?;

    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let xtask = std::env::current_exe()?;
    let session = dir.join("bench-connect-session.yaml");
    fs::write(
        &session,
        format!("principal: bench@example.com\nactor: svc:bench\ntask: connect benchmark\nscope:\n  connect: [\"{addr}\"]\n"),
    )?;
    let client = |in_session: Option<&Path>| -> anyhow::Result<f64> {
        let mut cmd = match in_session {
            Some(control) => {
                let mut c = Command::new(monitor);
                c.arg("run").arg("--file").arg(&session).arg("--control").arg(control).arg("--").arg(&xtask);
                c
            }
            None => Command::new(&xtask),
        };
        let output = cmd.args(["connect-loop", &addr.to_string(), &count.to_string()]).output()?;
        if !output.status.success() {
            bail!("connect loop failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().parse()?)
    };
    let (mut none, mut outside, mut inside, mut r_out, mut r_in) = (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let with = |client: &dyn Fn(Option<&Path>) -> anyhow::Result<f64>| -> anyhow::Result<(f64, f64)> {
            let agent = BenchAgent::start(monitor, dir, agent_args)?;
            let b = client(None)?;
            let c = client(Some(&agent.control))?;
            Ok((b, c))
        };
        let (a, (b, c)) = if round % 2 == 0 {
            let a = client(None)?;
            (a, with(&client)?)
        } else {
            let bc = with(&client)?;
            (client(None)?, bc)
        };
        eprintln!(
            "  round {round}: none {:.1} µs, outside {:.1} µs, in session {:.1} µs",
            per_exec(a, count),
            per_exec(b, count),
            per_exec(c, count)
        );
        none.push(a);
        outside.push(b);
        inside.push(c);
        r_out.push(b / a);
        r_in.push(c / a);
    }
    Ok(ConnectResults {
        none: median(&none),
        outside: median(&outside),
        inside: median(&inside),
        outside_ratio: median(&r_out),
        inside_ratio: median(&r_in),
    })
}

/// The client side of the connect benchmark: `count` connects, each closed with a reset
/// (SO_LINGER 0) so no TIME_WAIT piles up and exhausts the ephemeral ports.
pub fn connect_loop(addr: std::net::SocketAddr, count: u32) -> anyhow::Result<()> {
    let start = Instant::now();
    for _ in 0..count {
        let stream = std::net::TcpStream::connect(addr)?;
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: setsockopt on an open socket with a valid, correctly sized option value.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&stream),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("SO_LINGER: {}", std::io::Error::last_os_error());
        }
        drop(stream);
    }
    println!("{:.6}", start.elapsed().as_secs_f64());
    Ok(())
}

/// Medians of paired runs without and with the agent.
pub(crate) struct Paired {
    pub without: f64,
    pub with: f64,
    pub ratio: f64,
    pub ratios: Vec<f64>,
}

impl Paired {
    /// `rounds` pairs of `measure(None)` (no agent) and `measure(Some(agent))`, alternating which
    /// goes first so drift on the machine does not favour one side.
    pub fn run(
        monitor: &Path,
        dir: &Path,
        agent_args: &[String],
        rounds: u32,
        unit: &str,
        n: u32,
        mut measure: impl FnMut(Option<&BenchAgent>) -> anyhow::Result<f64>,
    ) -> anyhow::Result<Self> {
        let (mut without, mut with, mut ratios) = (vec![], vec![], vec![]);
        for round in 0..rounds {
            let agent_side = |measure: &mut dyn FnMut(Option<&BenchAgent>) -> anyhow::Result<f64>| {
                let agent = BenchAgent::start(monitor, dir, agent_args)?;
                measure(Some(&agent))
            };
            let (a, b) = if round % 2 == 0 {
                let a = measure(None)?;
                (a, agent_side(&mut measure)?)
            } else {
                let b = agent_side(&mut measure)?;
                (measure(None)?, b)
            };
            eprintln!("  round {round}: without {:.2} {unit}, with {:.2} {unit}", per_exec(a, n), per_exec(b, n));
            without.push(a);
            with.push(b);
            ratios.push(b / a);
        }
        Ok(Self { without: median(&without), with: median(&with), ratio: median(&ratios), ratios })
    }

    pub fn json(&self, n: u32, rounds: u32, unit: &str, target: f64) -> serde_json::Value {
        json!({
            "iterations": n,
            "rounds": rounds,
            format!("without_agent_{unit}_median"): per_exec(self.without, n),
            format!("with_agent_{unit}_median"): per_exec(self.with, n),
            "ratio_median_of_pairs": self.ratio,
            "ratios": self.ratios,
            "target_ratio": target,
        })
    }
}

/// Trace recording and replay of 1,000,000 synthetic events, 3 runs; medians of each figure.
fn replay_bench() -> anyhow::Result<serde_json::Value> {
    eprintln!("bench: trace recording and replay of 1,000,000 events (3 runs)");
    let mut runs = Vec::new();
    for _ in 0..3 {
        let output = Command::new("cargo")
            .args(["run", "--quiet", "--release", "--package", "monitor", "--example", "replay_bench", "--", "1000000"])
            .output()
            .context("running the replay benchmark")?;
        if !output.status.success() {
            bail!("replay_bench failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        if v["identical"] != true {
            bail!("the replayed alerts differ from those raised while recording: {v}");
        }
        eprintln!("  {v}");
        runs.push(v);
    }
    let med = |k: &str| median(&runs.iter().map(|r| r[k].as_f64().unwrap_or(0.0)).collect::<Vec<_>>());
    Ok(json!({
        "events": 1_000_000,
        "trace_bytes": runs[0]["trace_bytes"],
        "written_events_per_sec": med("written_events_per_sec"),
        "decode_seconds": med("decode_seconds"),
        "replay_detection_seconds": med("replay_detection_seconds"),
        "replay_full_report_seconds": med("replay_full_report_seconds"),
        "target_replay_seconds": 2.0,
        "runs": runs,
    }))
}
