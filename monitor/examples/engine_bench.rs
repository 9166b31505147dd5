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
    let mut engine = Engine::new(EngineConfig::default());
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
