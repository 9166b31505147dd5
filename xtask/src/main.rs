//! Project commands: `cargo xtask setup | run | test | bench | fuzz | vm-test | ci`.
//!
//! Everything a fresh machine of this project's kind needs is installed here, idempotently, so
//! the README's two commands (`cargo xtask run`, `cargo xtask test`) work with no manual step.

mod bench;
mod fuzz;
mod setup;
mod vm;

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
        /// Fork+exec iterations per run (each side of a pair is the best of 3 runs).
        #[arg(long, default_value_t = 1000)]
        execs: u32,
        /// TCP connects per run.
        #[arg(long, default_value_t = 10000)]
        connects: u32,

        /// openat+close of an ordinary file per run.
        #[arg(long, default_value_t = 400_000)]
        opens: u32,
        /// HTTPS requests (one keep-alive connection) per run.
        #[arg(long, default_value_t = 1000)]
        tls_requests: u32,

        /// Paired runs (without / with the agent) per benchmark.
        #[arg(long, default_value_t = 7)]
        rounds: u32,
        /// Extra arguments for the agent under test, whitespace-separated.
        #[arg(long, default_value = "", allow_hyphen_values = true)]
        agent_args: String,

        /// Only these parts, comma-separated: exec, connect, open, tls, engine, replay, ingest, latency.
        #[arg(long, value_delimiter = ',')]
        only: Option<Vec<String>>,

        /// Where the JSON report goes.
        #[arg(long, default_value = "target/bench/report.json")]
        out: PathBuf,
    },
    /// Coverage-guided fuzzing of every parser of untrusted input (libFuzzer); a crash found is
    /// minimised and kept in fuzz/regressions/, which the tests then run.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets, comma-separated (fuzz/fuzz_targets/*.rs).
        #[arg(long, value_delimiter = ',')]
        only: Option<Vec<String>>,
    },
    /// The real-kernel tests on other kernels: each Debian kernel booted in qemu with this
    /// machine's filesystem shared in, or `host`; prints the matrix (target/vm/matrix.md).
    VmTest {
        /// Kernels, comma-separated: 6.1, 6.12 (the newest of each series in Debian's archive)
        /// and host.
        #[arg(long, value_delimiter = ',', default_value = "6.1,6.12,host")]
        kernel: Vec<String>,
        /// Only these test files, comma-separated (tests/tests/*.rs).
        #[arg(long, value_delimiter = ',')]
        only: Option<Vec<String>>,
        /// Boot with KVM instead of software emulation (these machines' /dev/kvm is PVM, which
        /// cannot boot a Debian kernel).
        #[arg(long)]
        kvm: bool,
        /// Guest memory in MiB (the guest's writes live in it).
        #[arg(long, default_value_t = 6144)]
        memory_mib: u32,
    },
    /// What CI runs: the test command.
    Ci,
    /// (Used by bench) connect to ADDR N times, closing each connection at once; prints seconds.
    #[command(hide = true)]
    ConnectLoop { addr: std::net::SocketAddr, count: u32 },
    /// (Used by bench) open and close PATH N times; prints seconds.
    #[command(hide = true)]
    OpenLoop { path: PathBuf, count: u32 },
    /// (Used by bench) runs COMMAND, prints its wall time in seconds.
    #[command(hide = true)]
    Timed {
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
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
        Task::VmTest { kernel, only, kvm, memory_mib } => {
            setup::run()?;
            setup::test_peers(&root)?;
            setup::vm_tools()?;
            build()?;
            let accel = if kvm { vm::Accel::Kvm } else { vm::Accel::Tcg };
            vm::run(&root, &vm::Options { kernels: kernel, only, accel, memory_mib })
        }
        Task::Fuzz { seconds, only } => {
            setup::run()?;
            setup::fuzz_tools()?;
            fuzz::run(&root, seconds, only.as_deref())
        }
        Task::Bench { execs, connects, opens, tls_requests, rounds, agent_args, only, out } => {
            if let Some(unknown) = only.iter().flatten().find(|p| !bench::PARTS.contains(&p.as_str())) {
                anyhow::bail!("--only: unknown part `{unknown}` (one of {})", bench::PARTS.join(", "));
            }
            setup::run()?;
            // The peers the client benchmarks drive (nghttpd, Go) are the tests' own.
            setup::test_peers(&root)?;
            build()?;
            let agent_args = agent_args.split_whitespace().map(str::to_string).collect();
            bench::run(&root, bench::Sizes { execs, connects, opens, tls_requests, rounds, agent_args, only }, &out)
        }
        Task::ConnectLoop { addr, count } => bench::connect_loop(addr, count),
        Task::OpenLoop { path, count } => bench::open_loop(&path, count),
        Task::Timed { command } => bench::timed(&command),
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
    setup::test_peers(&workspace_root())?;
    build()?;
    // default-members: the eBPF crate cannot build for the host.
    let mut args = vec!["test", "--release", "--no-fail-fast"];
    if let Some(f) = filter {
        args.push(f);
    }
    let (output, success) = cargo_capture(&args)?;
    let (passed, failed) = count_tests(&output);
    // One closing line over every test binary: cargo prints a `test result` per binary, and the
    // last is often a crate without tests.
    println!("{passed} passed, {failed} failed");
    if !success || failed > 0 || passed == 0 {
        bail!("tests failed");
    }
    Ok(())
}

/// Sums the `test result: ok. N passed; M failed; ...` lines.
fn count_tests(output: &str) -> (u64, u64) {
    let (mut passed, mut failed) = (0, 0);
    for line in output.lines().filter_map(|l| l.strip_prefix("test result: ")) {
        for part in line.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            match words.as_slice() {
                [.., n, "passed"] => passed += n.parse::<u64>().unwrap_or(0),
                [.., n, "failed"] => failed += n.parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    (passed, failed)
}

/// Runs cargo, echoing its stdout as it comes; returns that stdout and whether cargo succeeded.
fn cargo_capture(args: &[&str]) -> anyhow::Result<(String, bool)> {
    use std::io::{BufRead as _, BufReader};
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut child = Command::new(&cargo)
        .args(args)
        .env("MONITOR_BIN", workspace_root().join("target/release/monitor"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cargo}"))?;
    let mut all = String::new();
    for line in BufReader::new(child.stdout.take().context("cargo stdout")?).lines() {
        let line = line?;
        println!("{line}");
        all.push_str(&line);
        all.push('\n');
    }
    Ok((all, child.wait()?.success()))
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
