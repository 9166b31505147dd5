//! `cargo xtask vm-test`: the real-kernel tests on the kernels users run, each booted in qemu.
//!
//! A guest is this machine itself on another kernel: the host's root filesystem is shared
//! read-only over virtiofs with the guest's writes kept in RAM (an overlay), so the built agent,
//! the test binaries and every peer the tests start (python, node, curl, Go...) are the same
//! files as on the host, and nothing is copied into an image. The guest has no network device:
//! the tests talk to loopback and to namespaces they make, as on the host. Each test binary's
//! output comes back over a second serial port, framed by markers; the kernel's own messages go
//! to the first, kept beside it (target/vm/<kernel>/console.log).
//!
//! `host` runs the same binaries on this machine's kernel, so the matrix has its row.

mod guest;
mod kernel;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use self::kernel::Kernel;

/// One `tests/tests/*.rs` file, built.
pub struct TestBinary {
    /// The file's name: `process`, `network`...
    pub name: String,
    pub path: PathBuf,
    /// Where cargo would run it (the tests crate), for paths relative to it.
    pub dir: PathBuf,
}

/// How a guest runs: qemu's accelerator, and how much longer than on the host the tests wait.
#[derive(Clone, Copy)]
pub enum Accel {
    /// Software emulation. These machines' /dev/kvm is PVM, which boots only kernels built as
    /// PVM guests, so a Debian kernel needs TCG here.
    Tcg,
    Kvm,
}

pub struct Options {
    pub kernels: Vec<String>,
    pub only: Option<Vec<String>>,
    pub accel: Accel,
    pub memory_mib: u32,
}

/// What one test did on one kernel.
#[derive(Debug, PartialEq)]
enum Outcome {
    Passed,
    Failed,
    /// Passed by saying what this kernel cannot do (see tests' `kernel_lacks`).
    Unsupported(String),
}

/// A test binary's results on one kernel.
#[derive(Default)]
struct FileResult {
    tests: BTreeMap<String, Outcome>,
    /// The binary's exit code; None when it never finished (timeout, guest crash).
    exit: Option<i32>,
}

impl FileResult {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.tests.values().filter(|o| f(o)).count()
    }

    fn ok(&self) -> bool {
        self.exit == Some(0) && self.count(|o| *o == Outcome::Failed) == 0 && !self.tests.is_empty()
    }

    fn cell(&self) -> String {
        let passed = self.count(|o| *o == Outcome::Passed);
        let failed = self.count(|o| *o == Outcome::Failed);
        let unsupported = self.count(|o| matches!(o, Outcome::Unsupported(_)));
        let mut cell = format!("{passed} pass");
        if unsupported > 0 {
            let _ = write!(cell, ", {unsupported} degraded");
        }
        if failed > 0 {
            let _ = write!(cell, ", {failed} FAIL");
        }
        match self.exit {
            None => cell.push_str(", DID NOT FINISH"),
            Some(0) => {}
            Some(_) if failed == 0 => cell.push_str(", EXIT FAILED"),
            Some(_) => {}
        }
        cell
    }
}

pub fn run(root: &Path, options: &Options) -> anyhow::Result<()> {
    let mut binaries = test_binaries(root)?;
    if let Some(only) = &options.only {
        if let Some(unknown) = only.iter().find(|o| !binaries.iter().any(|b| &b.name == *o)) {
            let names: Vec<&str> = binaries.iter().map(|b| b.name.as_str()).collect();
            bail!("--only: no test file `{unknown}` (one of {})", names.join(", "));
        }
        binaries.retain(|b| only.contains(&b.name));
    }
    remove_old_snapshots(root);
    let binaries = snapshot(root, &binaries)?;
    let mut matrix: Vec<(String, BTreeMap<String, FileResult>)> = Vec::new();
    for name in &options.kernels {
        let (label, results) = if name == "host" {
            let release = fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_string();
            (format!("host {release}"), on_host(root, &binaries)?)
        } else {
            let kernel = Kernel::fetch(root, name)?;
            let label = format!("{} {}", kernel.name, kernel.release);
            (label, in_guest(root, &kernel, &binaries, options)?)
        };
        print_kernel(&label, &results);
        matrix.push((label, results));
    }
    let report = report(&matrix, &binaries);
    println!("\n{report}");
    fs::create_dir_all(root.join("target/vm"))?;
    fs::write(root.join("target/vm/matrix.md"), &report)?;
    let failed: Vec<String> = matrix
        .iter()
        .flat_map(|(k, files)| files.iter().filter(|(_, r)| !r.ok()).map(move |(f, _)| format!("{k}: {f}")))
        .collect();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join("; "));
    }
    Ok(())
}

/// Builds the tests crate's test binaries and lists them. Built as `cargo xtask test` builds
/// them (the default members together), so one's build serves the other.
fn test_binaries(root: &Path) -> anyhow::Result<Vec<TestBinary>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = root.join("tests/Cargo.toml");
    let out = Command::new(cargo)
        .args(["test", "--release", "--no-run", "--message-format=json"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let target = &message["target"];
        let is_test_file = target["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test"))
            && message["manifest_path"].as_str().is_some_and(|m| Path::new(m) == manifest);
        if let (true, Some(path), Some(name)) = (is_test_file, message["executable"].as_str(), target["name"].as_str())
        {
            binaries.push(TestBinary { name: name.to_string(), path: path.into(), dir: root.join("tests") });
        }
    }
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    if binaries.is_empty() {
        bail!("cargo listed no test binaries of monitor-tests");
    }
    Ok(binaries)
}

/// Copies the agent and the test binaries to target/vm/bin, which the runs use: a guest reads
/// its files live from the host, so this keeps a run's binaries fixed while the host rebuilds.
fn snapshot(root: &Path, binaries: &[TestBinary]) -> anyhow::Result<Vec<TestBinary>> {
    let dir = snapshot_dir(root);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    fs::copy(root.join("target/release/monitor"), dir.join("monitor")).context("copying target/release/monitor")?;
    // The examples some tests run beside the agent (found next to it, as delivery_bench is):
    // cargo's own copies, without the hash suffix of their build directory's names.
    let examples = dir.join("examples");
    fs::create_dir_all(&examples)?;
    for entry in fs::read_dir(root.join("target/release/examples")).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.contains(['-', '.']) && entry.file_type().is_ok_and(|t| t.is_file()) {
            fs::copy(entry.path(), examples.join(&name)).with_context(|| format!("copying example {name}"))?;
        }
    }
    binaries
        .iter()
        .map(|b| {
            let path = dir.join(&b.name);
            fs::copy(&b.path, &path).with_context(|| format!("copying {}", b.path.display()))?;
            Ok(TestBinary { name: b.name.clone(), path, dir: b.dir.clone() })
        })
        .collect()
}

/// Where `snapshot` puts the binaries this run uses: a directory of its own, so two runs (two
/// kernels at once) do not replace each other's binaries under a running guest.
fn snapshot_dir(root: &Path) -> PathBuf {
    root.join("target/vm/bin").join(std::process::id().to_string())
}

/// Removes the snapshots of runs that are over (their process is gone).
fn remove_old_snapshots(root: &Path) {
    let Ok(entries) = fs::read_dir(root.join("target/vm/bin")) else { return };
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().parse::<u32>().ok();
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// What the tests need to know of where they run; `emulated` turns off their timing checks.
/// This machine's environment comes first, so the peers the tests start are found and run as
/// on the host (pyenv's python with the PyPI peers, cargo's bin, Node's CA file).
fn test_env(root: &Path, slowdown: u32, emulated: bool) -> Vec<(String, String)> {
    let shell_safe = |k: &str| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            shell_safe(k) && !k.starts_with("CARGO") && !k.starts_with("RUST") && !k.starts_with("MONITOR")
        })
        .filter(|(k, _)| !matches!(k.as_str(), "_" | "PWD" | "OLDPWD" | "SHLVL" | "HOSTNAME"))
        .collect();
    env.extend([
        ("MONITOR_BIN".into(), snapshot_dir(root).join("monitor").display().to_string()),
        ("MONITOR_TEST_SLOWDOWN".into(), slowdown.to_string()),
        ("HOME".into(), home()),
        ("RUST_BACKTRACE".into(), "0".into()),
    ]);
    if emulated {
        env.push(("MONITOR_TEST_EMULATED".into(), "1".into()));
    }
    env
}

fn home() -> String {
    std::env::var("HOME").unwrap_or_else(|_| "/root".into())
}

/// The binaries on this machine's own kernel.
fn on_host(root: &Path, binaries: &[TestBinary]) -> anyhow::Result<BTreeMap<String, FileResult>> {
    let dir = root.join("target/vm/host");
    fs::create_dir_all(&dir)?;
    let mut results = BTreeMap::new();
    for binary in binaries {
        eprintln!("vm-test: host: {}", binary.name);
        let unsupported = dir.join(format!("{}.unsupported", binary.name));
        let _ = fs::remove_file(&unsupported);
        let out = Command::new(&binary.path)
            .args(["--test-threads=2", "--color=never"])
            .current_dir(&binary.dir)
            .envs(test_env(root, 1, false))
            .env("MONITOR_TEST_UNSUPPORTED", &unsupported)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        fs::write(dir.join(format!("{}.log", binary.name)), &text)?;
        let notes = fs::read_to_string(&unsupported).unwrap_or_default();
        results.insert(binary.name.clone(), parse_file(&text, &notes, out.status.code()));
    }
    Ok(results)
}

/// Boots `kernel` and runs the binaries in it.
fn in_guest(
    root: &Path,
    kernel: &Kernel,
    binaries: &[TestBinary],
    options: &Options,
) -> anyhow::Result<BTreeMap<String, FileResult>> {
    let dir = root.join("target/vm/run").join(&kernel.name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let slowdown = match options.accel {
        Accel::Tcg => 5,
        Accel::Kvm => 2,
    };
    let binary_timeout = Duration::from_secs(900 * u64::from(slowdown));
    let script = dir.join("guest.sh");
    let text = guest::script(
        &kernel.modules,
        &kernel.release,
        binaries,
        &test_env(root, slowdown, matches!(options.accel, Accel::Tcg)),
        binary_timeout.as_secs(),
    );
    kernel::write_executable(&script, &text)?;

    let socket = dir.join("virtiofs.sock");
    let mut virtiofsd = Command::new("/usr/lib/qemu/virtiofsd")
        .arg(format!("--socket-path={}", socket.display()))
        .args(["-o", "source=/", "-o", "cache=auto", "-o", "sandbox=chroot"])
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("virtiofsd.log"))?)
        .spawn()
        .context("starting /usr/lib/qemu/virtiofsd (package qemu-system-x86)")?;
    let result = (|| {
        wait_for_path(&socket, &mut virtiofsd)?;
        let console = dir.join("console.log");
        let results = dir.join("results.log");
        let memory = format!("{}M", options.memory_mib);
        let mut qemu = Command::new("qemu-system-x86_64");
        match options.accel {
            Accel::Tcg => qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
            Accel::Kvm => qemu.args(["-accel", "kvm", "-cpu", "host"]),
        };
        qemu.args(["-smp", "2", "-m", &memory, "-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none"])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
                "-numa",
                "node,memdev=mem",
            ])
            .args(["-chardev", &format!("socket,id=vfs,path={}", socket.display())])
            .args(["-device", "vhost-user-fs-pci,chardev=vfs,tag=host"])
            .args(["-serial", &format!("file:{}", console.display())])
            .args(["-serial", &format!("file:{}", results.display())])
            .arg("-kernel")
            .arg(&kernel.image)
            .arg("-initrd")
            .arg(&kernel.initramfs)
            .args(["-append", &format!("console=ttyS0 panic=-1 loglevel=4 vmtest.script={}", script.display())]);
        let limit = binary_timeout * binaries.len() as u32 + Duration::from_secs(600);
        eprintln!("vm-test: booting {} ({} test files, at most {:?})", kernel.release, binaries.len(), limit);
        let started = Instant::now();
        let mut child = qemu.stderr(Stdio::inherit()).spawn().context("starting qemu-system-x86_64")?;
        let status = wait_with_limit(&mut child, limit)?;
        eprintln!("vm-test: {} done in {:.0?} ({status})", kernel.release, started.elapsed());
        // A serial port is a terminal: its lines end in CR LF.
        let text = fs::read_to_string(&results).unwrap_or_default().replace('\r', "");
        if !text.contains(guest::READY) {
            let console = fs::read_to_string(&console).unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(30).collect();
            bail!("the guest on {} never started its tests; its console ended with:\n{}", kernel.release, {
                let mut t = tail;
                t.reverse();
                t.join("\n")
            });
        }
        Ok(parse_guest(&text, binaries))
    })();
    let _ = virtiofsd.kill();
    let _ = virtiofsd.wait();
    result
}

fn wait_for_path(path: &Path, server: &mut Child) -> anyhow::Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if let Some(status) = server.try_wait()? {
            bail!("virtiofsd exited with {status}");
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("virtiofsd made no socket at {} in 10 s", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn wait_with_limit(child: &mut Child, limit: Duration) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.to_string());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(format!("stopped after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Splits the guest's results by the BEGIN/END markers.
fn parse_guest(text: &str, binaries: &[TestBinary]) -> BTreeMap<String, FileResult> {
    let mut results = BTreeMap::new();
    for binary in binaries {
        let begin = format!("{}{}\n", guest::BEGIN, binary.name);
        let Some(start) = text.find(&begin) else {
            results.insert(binary.name.clone(), FileResult::default());
            continue;
        };
        let body = &text[start + begin.len()..];
        let end = format!("{}{} ", guest::END, binary.name);
        let (body, exit) = match body.find(&end) {
            Some(at) => {
                let code = body[at + end.len()..].lines().next().and_then(|c| c.trim().parse().ok());
                (&body[..at], code)
            }
            None => (body, None),
        };
        let notes: String =
            body.lines().filter_map(|l| l.strip_prefix(guest::UNSUPPORTED)).map(|l| format!("{l}\n")).collect();
        results.insert(binary.name.clone(), parse_file(body, &notes, exit));
    }
    results
}

/// A libtest run's `test NAME ... ok|FAILED` lines; a passed test named in `notes`
/// (`name: what this kernel lacks`) passed as unsupported.
fn parse_file(output: &str, notes: &str, exit: Option<i32>) -> FileResult {
    let mut result = FileResult { exit, ..Default::default() };
    let lacks: BTreeMap<&str, &str> =
        notes.lines().filter_map(|l| l.split_once(": ")).map(|(t, why)| (t.trim(), why.trim())).collect();
    for line in output.lines() {
        let Some(rest) = line.strip_prefix("test ") else { continue };
        let Some((name, verdict)) = rest.rsplit_once(" ... ") else { continue };
        let outcome = match verdict.trim() {
            "ok" => match lacks.get(name) {
                Some(why) => Outcome::Unsupported(why.to_string()),
                None => Outcome::Passed,
            },
            "FAILED" => Outcome::Failed,
            _ => continue,
        };
        result.tests.insert(name.to_string(), outcome);
    }
    result
}

fn print_kernel(label: &str, results: &BTreeMap<String, FileResult>) {
    println!("\n{label}");
    for (file, result) in results {
        println!("  {file:<12} {}", result.cell());
        for (test, outcome) in &result.tests {
            match outcome {
                Outcome::Failed => println!("      FAILED {test}"),
                Outcome::Unsupported(why) => println!("      degraded {test}: {why}"),
                Outcome::Passed => {}
            }
        }
    }
}

/// The matrix as a Markdown table: kernel × test file, then what each kernel lacked.
fn report(matrix: &[(String, BTreeMap<String, FileResult>)], binaries: &[TestBinary]) -> String {
    let mut s = String::from("| test file |");
    for (kernel, _) in matrix {
        let _ = write!(s, " {kernel} |");
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(matrix.len()));
    s.push('\n');
    for binary in binaries {
        let _ = write!(s, "| {} |", binary.name);
        for (_, files) in matrix {
            let cell = files.get(&binary.name).map(FileResult::cell).unwrap_or_default();
            let _ = write!(s, " {cell} |");
        }
        s.push('\n');
    }
    for (kernel, files) in matrix {
        for (file, result) in files {
            for (test, outcome) in &result.tests {
                if let Outcome::Unsupported(why) = outcome {
                    let _ = writeln!(s, "\n{kernel}, {file}::{test}: not supported by this kernel: {why}");
                }
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_run_is_read_per_file_with_unsupported_tests() {
        let binaries = ["a", "b", "c"]
            .map(|n| TestBinary { name: n.into(), path: PathBuf::new(), dir: PathBuf::new() })
            .into_iter()
            .collect::<Vec<_>>();
        let text = "VMTEST READY 6.1.0\nVMTEST BEGIN a\nrunning 2 tests\ntest one ... ok\ntest two ... FAILED\n\
            VMTEST END a 101\nVMTEST BEGIN b\ntest three ... ok\ntest four ... ok\n\
            VMTEST UNSUPPORTED four: no cap_capable tracepoint\nVMTEST END b 0\nVMTEST BEGIN c\ntest five ... ok\n";
        let results = parse_guest(text, &binaries);
        assert_eq!(results["a"].tests["two"], Outcome::Failed);
        assert!(!results["a"].ok());
        assert_eq!(results["b"].tests["four"], Outcome::Unsupported("no cap_capable tracepoint".into()));
        assert!(results["b"].ok());
        assert_eq!(results["c"].exit, None, "no END: the guest stopped mid-file");
        assert!(!results["c"].ok());
        assert_eq!(results["b"].cell(), "1 pass, 1 degraded");
    }
}
