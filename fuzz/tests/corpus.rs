//! Every committed seed and every crash fuzzing ever found (`regressions/TARGET/`, kept by
//! `cargo xtask fuzz` when it finds one) through its target, in `cargo xtask test`: each input
//! must be taken without a panic, and in bounded time.

use std::{fs, path::Path, time::Instant};

#[test]
fn seeds_and_found_crashes_are_taken_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut inputs = 0;
    for (target, run) in monitor_fuzz::TARGETS {
        let mut seeds = 0;
        for dir in ["seeds", "regressions"] {
            let Ok(entries) = fs::read_dir(root.join(dir).join(target)) else { continue };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = fs::read(&path).unwrap();
                let started = Instant::now();
                run(&data);
                assert!(started.elapsed().as_secs() < 5, "{} took {:?}", path.display(), started.elapsed());
                seeds += usize::from(dir == "seeds");
                inputs += 1;
            }
        }
        assert!(seeds > 0, "no seeds for {target}: run `cargo run -p monitor-fuzz --example seeds`");
    }
    assert!(inputs >= monitor_fuzz::TARGETS.len());
}
