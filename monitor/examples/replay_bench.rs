//! Trace recording and replay on synthetic events: `cargo run --release --example replay_bench -- N [KEEP]`.
//! Writes N events (and the alerts the engine raises on them) with the agent's trace writer,
//! then replays the trace with detection. Prints one JSON object. Used by `cargo xtask bench`.
//! With KEEP, leaves the trace in KEEP/trace and the same trace as agents forward it, in a
//! collector's store, in KEEP/store (for measuring `monitor replay`'s memory on each), and
//! spaces the commands 1 ms apart (a fleet of sessions running 1,000 commands a second) rather
//! than 1 µs: a trace that spans time, as a real one does.

use std::time::Instant;

use monitor::{
    collector::store::{self, TRACE_TAG},
    engine::{Engine, EngineConfig},
    replay::{replay_files, Detail, Progress},
    trace::{format, reader, writer::forwarded_record, RunInfo, TraceLimits, TraceWriter},
};

#[path = "common/synthetic.rs"]
mod synthetic;
use synthetic::{synthetic, synthetic_spaced};

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let keep = std::env::args().nth(2).map(std::path::PathBuf::from);
    let dir = match &keep {
        Some(keep) => keep.join("trace"),
        None => std::env::temp_dir().join(format!("monitor-replay-bench-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let events = if keep.is_some() { synthetic_spaced(n, 1_000_000) } else { synthetic(n) };
    let mut engine = Engine::new(EngineConfig::default());
    let alerts: Vec<_> = events.iter().map(|e| engine.handle(e)).collect();

    // Recording: what the agent's core does per event, the engine aside.
    let run_info = RunInfo {
        run_id: "bench".into(),
        host: "bench".into(),
        agent_version: "bench".into(),
        config: EngineConfig::default(),
    };
    let start = Instant::now();
    let mut writer =
        TraceWriter::create(&dir, TraceLimits { max_bytes: u64::MAX, ..Default::default() }, run_info.clone(), None)?;
    for (event, raised) in events.iter().zip(&alerts) {
        writer.event(event)?;
        for alert in raised {
            writer.alert(alert)?;
        }
    }
    writer.flush()?;
    let (records, bytes) = (writer.total_records, writer.total_bytes);
    drop(writer);
    let write_secs = start.elapsed().as_secs_f64();

    let files = reader::expand(std::slice::from_ref(&dir))?;
    // Reading and decoding alone, to tell the format's cost from the engine's and the report's.
    let start = Instant::now();
    let mut decoded = 0u64;
    for file in &files {
        reader::read_segment(file, &mut |_| decoded += 1, &mut |_| {}, &mut |_| {})?;
    }
    let decode_secs = start.elapsed().as_secs_f64();
    // Detection alone (alerts, OCSF output, the check against live), then the full report
    // (process trees and timelines of every session, for timeline, JSON and HTML output).
    let start = Instant::now();
    let alerts_only = replay_files(&files, None, Detail::Alerts, &mut Progress::quiet())?;
    let detect_secs = start.elapsed().as_secs_f64();
    drop(alerts_only);
    let start = Instant::now();
    let report = replay_files(&files, None, Detail::Timeline, &mut Progress::quiet())?;
    let replay_secs = start.elapsed().as_secs_f64();
    match &keep {
        Some(keep) => forward_to_store(&files, &run_info, &keep.join("store"))?,
        None => std::fs::remove_dir_all(&dir)?,
    }
    println!(
        "{}",
        serde_json::json!({
            "events": events.len(),
            "records": records,
            "trace_bytes": bytes,
            "write_seconds": write_secs,
            "written_events_per_sec": events.len() as f64 / write_secs,
            "decode_seconds": decode_secs,
            "replay_detection_seconds": detect_secs,
            "replay_full_report_seconds": replay_secs,
            "replayed_events": report.events,
            "alerts_live": report.comparison.live,
            "alerts_replayed": report.comparison.replayed,
            "identical": report.comparison.identical(),
        })
    );
    Ok(())
}

/// Stores the trace's records in a collector's store as an agent's `--trace-output` sends them.
fn forward_to_store(files: &[std::path::PathBuf], run: &RunInfo, store_dir: &std::path::Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(store_dir);
    let mut store = store::Store::open(store_dir)?;
    let mut batch = Vec::new();
    let mut seq = 0u64;
    let mut failed = None;
    for file in files {
        reader::read_segment(
            file,
            &mut |record| {
                let mut frame = Vec::new();
                format::encode(&record, &mut frame).expect("a decoded record encodes");
                let forwarded = forwarded_record(run, seq, 0, frame);
                batch.push(store::Incoming {
                    tag: TRACE_TAG.into(),
                    time_ns: forwarded.ts,
                    id: Some(format!("trace:{}:{seq}", run.run_id)),
                    count: 1,
                    record: forwarded.record,
                });
                seq += 1;
                if batch.len() == 10_000 {
                    if let Err(e) = store.append(std::mem::take(&mut batch)) {
                        failed = Some(e);
                    }
                }
            },
            &mut |_| {},
            &mut |_| {},
        )?;
    }
    store.append(batch)?;
    failed.map_or(Ok(()), |e| Err(e.into()))
}
