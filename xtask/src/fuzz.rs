//! `cargo xtask fuzz`: coverage-guided fuzzing of every parser of untrusted input (the targets in
//! fuzz/fuzz_targets, their bodies in fuzz/src/lib.rs) with libFuzzer through `libfuzzer-sys`,
//! instrumented with the flags cargo-fuzz passes (SanitizerCoverage: 8-bit counters, PC table,
//! comparison tracing), all stable rustc options, so it runs on this machine's stable toolchain
//! without cargo-fuzz. No address sanitizer: it needs nightly's `-Zsanitizer`, and the code is
//! safe Rust (panics, hangs and memory blow-ups are what is looked for; libFuzzer catches each).
//!
//! Each target runs for the given seconds from its committed seeds (fuzz/seeds/TARGET) and the
//! corpus earlier runs grew (target/fuzz/corpus/TARGET). A crash, hang or out-of-memory is
//! minimised (crashes) and kept in fuzz/regressions/TARGET/, which `cargo xtask test` runs through
//! the target from then on (fuzz/tests/corpus.rs), and the command fails naming it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

/// What cargo-fuzz gives rustc for a libFuzzer build, less the sanitizer.
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];
/// Memory a target may use before libFuzzer calls it out of memory.
const RSS_LIMIT_MB: u32 = 2048;
/// Seconds one input may take before libFuzzer calls it a hang.
const INPUT_TIMEOUT_SECS: u32 = 10;
/// Inputs are at most this long: every parser's own bounds are above it in the tests, and
/// longer inputs slow the search.
const MAX_LEN: u32 = 64 * 1024;

pub fn run(root: &Path, seconds: u64, only: Option<&[String]>) -> anyhow::Result<()> {
    let targets = targets(root)?;
    if let Some(unknown) = only.into_iter().flatten().find(|t| !targets.contains(t)) {
        bail!("--only: no fuzz target `{unknown}` (the targets: {})", targets.join(", "));
    }
    let host = host_triple()?;
    let target_dir = root.join("target/fuzz");
    build(&host, &target_dir)?;
    let bin_dir = target_dir.join(&host).join("release");
    let mut findings = Vec::new();
    let mut summary = Vec::new();
    for target in targets.iter().filter(|t| only.is_none_or(|o| o.contains(t))) {
        eprintln!("fuzz: {target}, {seconds} s");
        let corpus = target_dir.join("corpus").join(target);
        let artifacts = target_dir.join("artifacts").join(target);
        fs::create_dir_all(&corpus)?;
        let _ = fs::remove_dir_all(&artifacts);
        fs::create_dir_all(&artifacts)?;
        let binary = bin_dir.join(target);
        let output = Command::new(&binary)
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
            .arg(format!("-max_len={MAX_LEN}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .arg(&corpus)
            .arg(root.join("fuzz/seeds").join(target))
            .output()
            .with_context(|| format!("running {}", binary.display()))?;
        let log = String::from_utf8_lossy(&output.stderr);
        let stats = final_stats(&log);
        summary.push(format!("{target:<18} {stats}"));
        if output.status.success() {
            continue;
        }
        let kept = keep_findings(root, &binary, target, &artifacts)?;
        if kept.is_empty() {
            bail!("{target}: libFuzzer failed without a finding:\n{log}");
        }
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        findings.extend(kept);
    }
    println!("\n{:<18} runs, coverage (edges), features, corpus", "target");
    for line in &summary {
        println!("{line}");
    }
    if !findings.is_empty() {
        bail!(
            "fuzzing found {} input(s) that break a parser, kept for the tests:\n{}",
            findings.len(),
            findings.iter().map(|p| format!("  {}", p.display())).collect::<Vec<_>>().join("\n")
        );
    }
    println!("no crash, hang or out-of-memory in {} targets", summary.len());
    Ok(())
}

/// The fuzz targets: fuzz/fuzz_targets/*.rs.
fn targets(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(root.join("fuzz/fuzz_targets"))?
        .filter_map(|e| e.ok()?.path().file_stem()?.to_str().map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

fn host_triple() -> anyhow::Result<String> {
    let out = Command::new("rustc").arg("-vV").output().context("rustc -vV")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("host: ")).map(str::to_string).context("rustc -vV names no host")
}

/// The instrumented targets, in a target directory of their own (the flags change every crate).
/// `--target` keeps the flags off build scripts and proc macros, as cargo-fuzz does.
fn build(host: &str, target_dir: &Path) -> anyhow::Result<()> {
    let flags: Vec<String> = RUSTFLAGS.iter().map(|f| format!("\"{f}\"")).collect();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--package", "monitor-fuzz", "--features", "libfuzzer", "--bins"])
        .args(["--target", host])
        .arg("--target-dir")
        .arg(target_dir)
        .arg("--config")
        .arg(format!("target.{host}.rustflags=[{}]", flags.join(",")))
        .status()
        .context("building the fuzz targets")?;
    if !status.success() {
        bail!("building the fuzz targets failed");
    }
    Ok(())
}

/// Moves what libFuzzer left in `artifacts` to fuzz/regressions/TARGET/, a crash minimised first.
fn keep_findings(root: &Path, binary: &Path, target: &str, artifacts: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let keep_dir = root.join("fuzz/regressions").join(target);
    fs::create_dir_all(&keep_dir)?;
    let mut kept = Vec::new();
    for entry in fs::read_dir(artifacts)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else { continue };
        let kept_path = keep_dir.join(&name);
        if name.starts_with("crash-") {
            let minimised = Command::new(binary)
                .args(["-minimize_crash=1", "-runs=20000"])
                .arg(format!("-exact_artifact_path={}", kept_path.display()))
                .arg(&path)
                .output()?;
            if !kept_path.exists() {
                eprintln!("fuzz: {name} could not be minimised ({}); kept whole", minimised.status);
                fs::copy(&path, &kept_path)?;
            }
        } else {
            fs::copy(&path, &kept_path)?;
        }
        kept.push(kept_path);
    }
    Ok(kept)
}

/// `runs, cov, ft, corp` from libFuzzer's last status line (`#N DONE cov: X ft: Y corp: Z/...`).
fn final_stats(log: &str) -> String {
    let Some(line) = log.lines().rev().find(|l| l.starts_with('#') && l.contains("cov:")) else {
        return "no status line".into();
    };
    let field = |name: &str| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.iter().position(|w| *w == name).and_then(|i| words.get(i + 1)).copied().unwrap_or("?")
    };
    let runs = line.split_whitespace().next().unwrap_or("#?").trim_start_matches('#');
    format!("{runs:>10} runs, {:>6} edges, {:>6} features, corpus {}", field("cov:"), field("ft:"), field("corp:"))
}
