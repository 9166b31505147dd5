//! Engine throughput on synthetic events, one core: `cargo run --release --example engine_bench -- N`.
//! Prints one JSON object: events per second of wall clock and of the thread's CPU time. Used by
//! `cargo xtask bench`.

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
    let (start, cpu_start) = (Instant::now(), thread_cpu_secs());
    let mut alerts = 0usize;
    for e in &events {
        alerts += engine.handle(e).len();
    }
    let secs = start.elapsed().as_secs_f64();
    // Per core: the CPU time this thread was given, which a busy machine does not inflate the
    // way it inflates the wall clock.
    let cpu = thread_cpu_secs() - cpu_start;
    let n = events.len() as f64;
    println!(
        "{{\"events\": {}, \"seconds\": {secs:.6}, \"cpu_seconds\": {cpu:.6}, \"events_per_sec\": {:.0}, \
         \"events_per_cpu_sec\": {:.0}, \"alerts\": {alerts}}}",
        events.len(),
        n / secs,
        n / cpu
    );
}

fn thread_cpu_secs() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}
