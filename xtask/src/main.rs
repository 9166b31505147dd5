//! Project commands: `cargo xtask setup | run | test | bench | ci`.
//!
//! Everything a fresh machine of this project's kind needs is installed here, idempotently, so
//! the README's two commands (`cargo xtask run`, `cargo xtask test`) work with no manual step.

mod bench;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF build chain (Debian packages, bpf-linker, toolchain link) if missing.
    Setup,
    /// Set up if needed, build, and run the agent with the embedded defaults: alerts to stdout
    /// and to target/monitor/alerts.jsonl, control socket at /run/monitor/control.sock.
    Run {
        /// Extra arguments for `monitor agent`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up if needed, build, and run every test: unit tests and the real-kernel tests (root).
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Benchmarks: exec overhead with and without the agent, engine throughput.
    Bench {
        /// Fork+exec iterations per run.
        #[arg(long, default_value_t = 2000)]
        execs: u32,
        /// Paired runs (without / with the agent) per benchmark.
        #[arg(long, default_value_t = 7)]
        rounds: u32,
        /// Where the JSON report goes.
        #[arg(long, default_value = "target/bench/report.json")]
        out: PathBuf,
    },
    /// What CI runs: the test command.
    Ci,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Setup => setup::run(),
        Task::Run { args } => {
            setup::run()?;
            build()?;
            let mut cmd = Command::new(root.join("target/release/monitor"));
            cmd.args(["agent", "--output", "stdout", "--output", "jsonl:target/monitor/alerts.jsonl"]).args(args);
            let status = cmd.status().context("starting target/release/monitor")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Test { filter } => test(filter.as_deref()),
        Task::Ci => test(None),
        Task::Bench { execs, rounds, out } => {
            setup::run()?;
            build()?;
            bench::run(&root, execs, rounds, &out)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// One profile for run, test and bench, so the eBPF object and the agent are built once.
fn build() -> anyhow::Result<()> {
    cargo(&["build", "--release", "--package", "monitor"])
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    setup::run()?;
    build()?;
    // default-members: the eBPF crate cannot build for the host.
    let mut args = vec!["test", "--release", "--no-fail-fast"];
    if let Some(f) = filter {
        args.push(f);
    }
    cargo(&args)
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .env("MONITOR_BIN", workspace_root().join("target/release/monitor"))
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}
