//! Engine throughput on synthetic events, one core: `cargo run --release --example engine_bench -- N`.
//! Prints one JSON object. Used by `cargo xtask bench`.

use std::time::Instant;

use monitor::engine::{Engine, EngineConfig};

#[path = "common/synthetic.rs"]
mod synthetic;
use synthetic::synthetic;

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let events = synthetic(n);
    // As the agent runs by default: alerts folded within the policy's default window.
    let fold_window_ns = monitor::policy::DEFAULT_FOLD_WINDOW.as_nanos() as u64;
    let mut engine = Engine::new(EngineConfig { fold_window_ns, ..Default::default() });
    let start = Instant::now();
    let mut alerts = 0usize;
    for e in &events {
        alerts += engine.handle(e).len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"events\": {}, \"seconds\": {secs:.6}, \"events_per_sec\": {:.0}, \"alerts\": {alerts}}}",
        events.len(),
        events.len() as f64 / secs
    );
}
