//! Delivery benchmarks, used by `cargo xtask bench`. Prints one JSON object.
//!
//! `delivery_bench ingest MONITOR_BIN SENDERS ALERTS [BATCH]`: starts `monitor collector` on
//! loopback and has SENDERS concurrent Forward clients send ALERTS distinct alerts in all, as
//! PackedForward batches of BATCH (default 1000) with a chunk id each, every batch waiting for its ack (which
//! the collector sends only once the batch is synced to its store). Reports acknowledged,
//! durable alerts per second.
//!
//! `delivery_bench latency STORE_DIR`: for every alert in a collector's store, the time from
//! the event (the syscall, as the kernel stamped it) to its storage; reports p50 and p99.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use monitor::{
    alert::{Action, Alert, SessionRef},
    collector::store,
    forward::{client::record_of, protocol},
    rules::Rule,
    rules::Severity,
};

const BATCH: usize = 1000;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("ingest") => {
            let batch = args.get(5).map(|b| b.parse()).transpose()?.unwrap_or(BATCH);
            ingest(&args[2], args[3].parse()?, args[4].parse()?, batch)
        }
        Some("flood") => flood(&args[2], args[3].parse()?, args[4].parse()?),
        Some("latency") => latency(std::path::Path::new(&args[2])),
        _ => anyhow::bail!(
            "usage: delivery_bench ingest MONITOR_BIN SENDERS ALERTS [BATCH] | flood MONITOR_BIN SENDERS ALERTS | latency STORE_DIR"
        ),
    }
}

fn alert(n: u64) -> Alert {
    Alert {
        id: format!("01BENCH{n:019}"),
        time: monitor::alert::rfc3339(1_795_000_000_000_000_000 + n),
        host: "bench-node".into(),
        rule: Rule::OutOfScopeConnect,
        severity: Severity::High,
        summary: format!("tcp connect to 127.0.0.3:{}, outside the session's connect scope", n % 65536),
        session: SessionRef {
            id: format!("bench-{}", n % 100),
            principal: "alice@example.com".into(),
            actor: "svc:bench".into(),
            task: "benchmark".into(),
            sponsor: "perf".into(),
            state: "active".into(),
            started: monitor::alert::rfc3339(1_795_000_000_000_000_000),
            ended: None,
            host: None,
        },
        process: None,
        network: None,
        credential: None,
        k8s: None,
        action: Action::Observed,
        mitre: vec!["T1021".into()],
        owasp_nhi: vec!["NHI5".into()],
        nist_csf: Vec::new(),
        count: 1,
        first_seen: String::new(),
        last_seen: String::new(),
        pids: Vec::new(),
        fold: 0,
        ts: 1_795_000_000_000_000_000 + n,
    }
}

fn ingest(monitor: &str, senders: usize, alerts: usize, batch: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("monitor-ingest-bench-{}", std::process::id()));
    let (mut collector, port) = start_collector(monitor, &dir, &[])?;
    // Encoded before the clock starts: the senders measure the collector, not themselves.
    let per_sender = alerts / senders;
    let batches: Vec<Vec<(String, Vec<u8>)>> = (0..senders)
        .map(|s| {
            (0..per_sender.div_ceil(batch))
                .map(|b| {
                    let chunk = format!("c{s}-{b}");
                    let first = s * per_sender + b * batch;
                    let bytes = alert_batch(first, batch.min(per_sender - b * batch), &chunk);
                    (chunk, bytes)
                })
                .collect()
        })
        .collect();
    let largest_message = batches.iter().flatten().map(|(_, bytes)| bytes.len()).max().unwrap_or(0);
    let start = Instant::now();
    let threads: Vec<_> = batches
        .into_iter()
        .map(|mine| {
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut conn = TcpStream::connect(("127.0.0.1", port))?;
                conn.set_nodelay(true)?;
                let mut acks = protocol::ValueBuffer::default();
                let mut buf = [0u8; 4096];
                for (chunk, bytes) in mine {
                    conn.write_all(&bytes)?;
                    let ack = loop {
                        if let Some(v) = acks.next(1 << 20)? {
                            break v;
                        }
                        let n = conn.read(&mut buf)?;
                        anyhow::ensure!(n > 0, "collector closed the connection");
                        acks.extend(&buf[..n]);
                    };
                    anyhow::ensure!(protocol::ack_of(&ack).as_deref() == Some(chunk.as_str()), "wrong ack");
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = collector.kill();
    let _ = collector.wait();
    let sent = per_sender * senders;
    let store_bytes: u64 =
        std::fs::read_dir(dir.join("store"))?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        serde_json::json!({ "senders": senders, "alerts": sent, "batch": batch, "largest_message_bytes": largest_message,
            "seconds": secs, "alerts_per_sec": sent as f64 / secs, "store_bytes": store_bytes })
    );
    Ok(())
}

/// A collector on a free loopback port storing into `dir/store` (emptied first), with `extra`
/// flags; returned once it accepts connections.
fn start_collector(monitor: &str, dir: &std::path::Path, extra: &[&str]) -> anyhow::Result<(std::process::Child, u16)> {
    let _ = std::fs::remove_dir_all(dir);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let collector = Command::new(monitor)
        .args(["collector", "--log", "warn", "--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .arg("--store")
        .arg(dir.join("store"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "collector did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((collector, port))
}

/// Alerts `first..first + count` as one PackedForward message with `chunk` for its ack.
fn alert_batch(first: usize, count: usize, chunk: &str) -> Vec<u8> {
    let first = first as u64;
    let records: Vec<_> = (first..first + count as u64).map(|n| (n, record_of(&alert(n)).unwrap())).collect();
    let entries: Vec<(u64, &[u8])> = records.iter().map(|(n, r)| (*n, r.as_slice())).collect();
    protocol::packed_forward("monitor.alert", &entries, chunk)
}

/// The collector flooded: `senders` connections each write all their batches at once, never
/// waiting for an ack (many times what it stores per second, offered at once), against a small
/// buffering budget (8 MiB). Back-pressure must hold it: every batch is acknowledged in the
/// end, every acknowledged alert is in the store exactly once, and its memory stays bounded.
fn flood(monitor: &str, senders: usize, alerts: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("monitor-flood-bench-{}", std::process::id()));
    let (mut collector, port) = start_collector(monitor, &dir, &["--max-buffered", "8M"])?;
    let per_sender = alerts / senders;
    let start = Instant::now();
    let threads: Vec<_> = (0..senders)
        .map(|s| {
            std::thread::spawn(move || -> anyhow::Result<usize> {
                let conn = TcpStream::connect(("127.0.0.1", port))?;
                // A collector that stops taking or acknowledging fails the run, never hangs it.
                conn.set_read_timeout(Some(Duration::from_secs(60)))?;
                conn.set_write_timeout(Some(Duration::from_secs(60)))?;
                let mut reader = conn.try_clone()?;
                let batches = per_sender.div_ceil(BATCH);
                // Acks are read while the writes go on: the sender never waits for one.
                let acks = std::thread::spawn(move || -> anyhow::Result<usize> {
                    let (mut buffer, mut buf, mut acked) = (protocol::ValueBuffer::default(), [0u8; 4096], 0);
                    while acked < batches {
                        match buffer.next(1 << 20)? {
                            Some(v) => {
                                anyhow::ensure!(protocol::ack_of(&v).is_some(), "not an ack");
                                acked += 1;
                            }
                            None => {
                                let n = reader.read(&mut buf)?;
                                anyhow::ensure!(n > 0, "collector closed the connection after {acked} acks");
                                buffer.extend(&buf[..n]);
                            }
                        }
                    }
                    Ok(acked)
                });
                let mut writer = conn;
                for b in 0..batches {
                    let first = s * per_sender + b * BATCH;
                    writer.write_all(&alert_batch(first, BATCH.min(per_sender - b * BATCH), &format!("f{s}-{b}")))?;
                }
                acks.join().map_err(|_| anyhow::anyhow!("ack reader panicked"))?
            })
        })
        .collect();
    let mut acked_batches = 0;
    for t in threads {
        acked_batches += t.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    let status = std::fs::read_to_string(format!("/proc/{}/status", collector.id()))?;
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let _ = collector.kill();
    let _ = collector.wait();
    let mut stored = std::collections::HashSet::new();
    for seg in store::segments(&dir.join("store"))? {
        store::read_segment(&store::segment_path(&dir.join("store"), seg), 0, &mut |s, _| {
            if let Some(id) = s.id {
                stored.insert(id);
            }
        })?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let sent = per_sender * senders;
    anyhow::ensure!(stored.len() == sent, "{} of {sent} acknowledged alerts in the store", stored.len());
    println!(
        "{}",
        serde_json::json!({ "senders": senders, "alerts": sent, "acked_batches": acked_batches, "stored": stored.len(),
            "seconds": secs, "alerts_per_sec": sent as f64 / secs, "collector_peak_rss_mb": peak_kb as f64 / 1024.0,
            "max_buffered_mb": 8 })
    );
    Ok(())
}

fn latency(dir: &std::path::Path) -> anyhow::Result<()> {
    let mut ms = Vec::new();
    for seg in store::segments(dir)? {
        store::read_segment(&store::segment_path(dir, seg), 0, &mut |s, _| {
            if s.id.is_some() && s.stored_ns > s.time_ns {
                ms.push((s.stored_ns - s.time_ns) as f64 / 1e6);
            }
        })?;
    }
    anyhow::ensure!(!ms.is_empty(), "no alert in the store");
    ms.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
    println!(
        "{}",
        serde_json::json!({ "alerts": ms.len(), "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": ms[ms.len() - 1] })
    );
    Ok(())
}
