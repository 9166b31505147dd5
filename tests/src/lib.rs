//! Harness for the real-kernel tests: starts a real `monitor agent` (root, real probes) with its
//! own control socket, alert file and event log, and waits for expected output with deadlines.
//! A test that cannot get root fails: these tests never skip.

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod go;
pub mod net;
pub mod peers;
pub mod wire;

/// How long any expected event or alert may take to show up: 20 s, times `MONITOR_TEST_SLOWDOWN`
/// on a slower machine (`cargo xtask vm-test` runs the tests under software emulation).
pub fn deadline() -> Duration {
    Duration::from_secs(20) * slowdown()
}

/// Whether timings mean anything here: not under software emulation (`cargo xtask vm-test`
/// sets `MONITOR_TEST_EMULATED`), where a probe's run costs what the emulator makes it cost.
pub fn timings_meaningful() -> bool {
    std::env::var_os("MONITOR_TEST_EMULATED").is_none()
}

/// Records that the running test passes without checking `what` here, and why: on stderr, and
/// in the file `MONITOR_TEST_UNSUPPORTED` names, from which `cargo xtask vm-test` reports the
/// test as degraded on that kernel rather than as a plain pass.
pub fn not_checked(what: &str, why: &str) {
    let test = std::thread::current().name().unwrap_or("unnamed").to_string();
    eprintln!("not checked here: {what}: {why}");
    if let Some(path) = std::env::var_os("MONITOR_TEST_UNSUPPORTED") {
        use std::io::Write as _;
        let line = format!("{test}: {what}: {}\n", why.replace('\n', " "));
        let file = fs::OpenOptions::new().create(true).append(true).open(path);
        file.and_then(|mut f| f.write_all(line.as_bytes())).expect("recording what was not checked");
    }
}

/// `MONITOR_TEST_SLOWDOWN`, a whole factor of at least 1.
pub fn slowdown() -> u32 {
    std::env::var("MONITOR_TEST_SLOWDOWN").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1)
}
const POLL: Duration = Duration::from_millis(50);

/// The monitor binary: `MONITOR_BIN` (set by `cargo xtask test`), else the release build.
pub fn monitor_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MONITOR_BIN") {
        return bin.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin = root.join("target/release/monitor");
    assert!(bin.exists(), "{} is missing: run `cargo xtask test`, which builds it", bin.display());
    bin
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load eBPF programs into the kernel and must run as root (cargo xtask test as root)"
    );
}

/// A scratch directory under target/, removed on drop. Not under /tmp: no nosuid surprises,
/// and its artifacts stay with the build.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("target/test-scratch");
        let dir = root.join(format!("{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, text).unwrap();
        p
    }

    pub fn script(&self, name: &str, text: &str) -> PathBuf {
        let p = self.write(name, text);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

/// A directory on bpffs for an agent's pinned maps (`--pin-dir`), removed (the maps unpinned,
/// so the kernel frees them) when dropped. Agents of one test share one to take over each
/// other's maps; every other agent gets its own.
pub struct PinScratch(pub PathBuf);

impl PinScratch {
    pub fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = Path::new("/sys/fs/bpf/monitor-tests").join(format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        Self(dir)
    }

    pub fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for PinScratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // MONITOR_TEST_KEEP_SCRATCH=1 keeps every test's files (to count or read its outputs).
        if !std::thread::panicking() && std::env::var_os("MONITOR_TEST_KEEP_SCRATCH").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A running agent, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Agent {
    child: Child,
    pub dir: Scratch,
    pub control: PathBuf,
    pub alerts: PathBuf,
    pub events: PathBuf,
    pub log: PathBuf,
    _cgroup: Option<TestCgroup>,
    _pins: Option<PinScratch>,
    stopped: bool,
}

impl Agent {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Starts an agent. Its connect hooks attach under a cgroup of the test's own (made here
    /// unless `extra` names one with `--cgroup`), so a bug in the deny path cannot cut this
    /// machine's other connections.
    pub fn start_with(name: &str, extra: &[&str]) -> Self {
        Self::start_under(name, &[], extra)
    }

    /// Starts an agent under `wrapper` (e.g. `setpriv --bounding-set …`: the agent runs with
    /// only the capabilities the wrapper leaves it).
    pub fn start_under(name: &str, wrapper: &[&str], extra: &[&str]) -> Self {
        require_root();
        let dir = Scratch::new(name);
        let own_cgroup = (!extra.contains(&"--cgroup")).then(|| TestCgroup::new(&format!("agent-{name}")));
        // Each agent its own pinned maps unless the test shares some between its agents.
        let own_pins = (!extra.contains(&"--pin-dir") && !extra.contains(&"--no-pin")).then(|| PinScratch::new(name));
        let control = dir.path("control.sock");
        let alerts = dir.path("alerts.jsonl");
        let events = dir.path("events.jsonl");
        let log = dir.path("agent.log");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(monitor_bin());
                c
            }
            None => Command::new(monitor_bin()),
        };
        let child = command
            .arg("agent")
            .arg("--control")
            .arg(&control)
            .args(
                (!extra.contains(&"--key-file"))
                    .then(|| ["--key-file".into(), dir.path("fingerprint.key").into_os_string()])
                    .into_iter()
                    .flatten(),
            )
            .arg("--output")
            .arg(format!("jsonl:{}", alerts.display()))
            .arg("--event-log")
            .arg(&events)
            .args(["--log", "debug,aya=info,aya_obj=info,loona_hpack=info"])
            .args(own_cgroup.iter().flat_map(|cg| [std::ffi::OsStr::new("--cgroup"), cg.0.as_os_str()]))
            // Each agent its own state: tests run side by side and must not adopt each other's.
            .args(
                (!extra.contains(&"--state-dir"))
                    .then(|| ["--state-dir".into(), dir.path("state").into_os_string()])
                    .into_iter()
                    .flatten(),
            )
            .args(own_pins.iter().flat_map(|p| ["--pin-dir", p.arg()]))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting monitor agent");
        let mut agent =
            Self { child, dir, control, alerts, events, log, _cgroup: own_cgroup, _pins: own_pins, stopped: false };
        agent.wait_ready();
        agent
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if fs::read_to_string(&self.log).unwrap_or_default().contains("agent ready") {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "agent exited with {status} before it was ready:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < deadline(),
                "agent not ready after {:?}:\n{}",
                deadline(),
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(POLL);
        }
    }

    /// `monitor ARGS...` against this agent's socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(monitor_bin());
        cmd.args(args).env("MONITOR_CONTROL", &self.control).env("MONITOR_LOG", "warn");
        cmd.output().expect("running monitor")
    }

    /// `monitor probes --json`: each of the agent's programs with whether it is attached now and
    /// the kernel's run count and time.
    pub fn probes(&self) -> Vec<Value> {
        let o = self.cli(&["probes", "--json"]);
        assert!(o.status.success(), "monitor probes: {}", String::from_utf8_lossy(&o.stderr));
        programs_from_json(&String::from_utf8_lossy(&o.stdout))
    }

    /// Why this agent runs without `program` because of this kernel (it refused the program or
    /// lacks its hook), from `monitor probes`; None when it is loaded, or left out by choice.
    /// A test that meets one checks what it still can and says what it did not ([`not_checked`]).
    pub fn kernel_lacks(&self, program: &str) -> Option<String> {
        let programs = self.probes();
        let why = programs.iter().find(|p| p["program"] == program)?["not_loaded"].as_str()?;
        (!why.starts_with("opt-in") && !why.starts_with("disabled")).then(|| why.to_string())
    }

    /// The program that does `program`'s job on this kernel: itself, or the stand-in the agent
    /// loaded where the kernel lacks it (`monitor probes` says "restored by NAME (...)").
    pub fn doing(&self, program: &str) -> String {
        let stand_in = self.kernel_lacks(program).and_then(|why| {
            why.split("restored by ").nth(1).and_then(|r| r.split_whitespace().next()).map(str::to_string)
        });
        stand_in.unwrap_or_else(|| program.to_string())
    }

    /// Whether a TLS request's alert can name its connection's peer here: the plaintext hook
    /// pairs each TLS write with its socket, which kernels before 6.x do not let a cgroup skb
    /// program do (the agent runs its stand-in). Says so ([`not_checked`]) when it cannot.
    pub fn names_tls_peers(&self) -> bool {
        match self.kernel_lacks("tcp_egress") {
            Some(why) => {
                not_checked("the peer address of a TLS request's connection", &why);
                false
            }
            None => true,
        }
    }

    /// The names of the programs attached now.
    pub fn attached_probes(&self) -> std::collections::BTreeSet<String> {
        attached_names(&self.probes())
    }

    /// `monitor run --file FILE -- COMMAND...`.
    pub fn run(&self, file: &Path, command: &[&str]) -> Output {
        let mut args = vec!["run", "--file", file.to_str().unwrap(), "--"];
        args.extend_from_slice(command);
        self.cli(&args)
    }

    pub fn alerts(&self) -> Vec<Value> {
        read_jsonl(&self.alerts)
    }

    pub fn events(&self) -> Vec<Value> {
        read_jsonl(&self.events)
    }

    /// Waits until `pick` finds what it looks for in the alerts, or fails at the deadline.
    pub fn wait_alert(&self, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, || self.alerts().into_iter().find(|a| pick(a)), || self.diagnostics())
    }

    /// Waits until `pick` finds what it looks for in the event log.
    pub fn wait_event(&self, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
        wait_for(what, || self.events().into_iter().find(|e| pick(e)), || self.diagnostics())
    }

    /// Fails if the agent has exited (a crash in a library's own thread leaves no line in its
    /// log: the exit status says it).
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the agent exited with {status}\n{}", self.diagnostics());
        }
    }

    pub fn diagnostics(&self) -> String {
        format!(
            "--- alerts\n{}\n--- events\n{}\n--- agent log (tail)\n{}",
            fs::read_to_string(&self.alerts).unwrap_or_default(),
            fs::read_to_string(&self.events).unwrap_or_default(),
            tail(&fs::read_to_string(&self.log).unwrap_or_default(), 40),
        )
    }
}

impl Agent {
    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the agent (SIGKILL: no chance to clean up, as a crash or an OOM kill) and reaps it.
    pub fn kill(&mut self) {
        self.stopped = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the agent (SIGTERM) and waits for it: its outputs and trace are then complete.
    pub fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) * slowdown() {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn wait_for<T>(what: &str, probe: impl FnMut() -> Option<T>, diagnostics: impl Fn() -> String) -> T {
    wait_for_within(what, deadline(), probe, diagnostics)
}

/// [`wait_for`] with a deadline of its own, for work the test itself makes long (thousands of
/// execs), scaled like [`deadline`].
pub fn wait_for_within<T>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> Option<T>,
    diagnostics: impl Fn() -> String,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(start.elapsed() < within, "waited {within:?} for {what}\n{}", diagnostics());
        std::thread::sleep(POLL);
    }
}

/// The most versions of one alert the agent may send over `elapsed`: the first, then at most
/// one update per fold per 5 s (engine/fold.rs UPDATE_DELAY_NS), and the one as the window
/// closes. Speed-independent, so it holds on a slow machine too.
pub fn most_alert_versions(elapsed: Duration) -> usize {
    2 + (elapsed.as_secs() / 5) as usize
}

/// The whole lines of a JSON lines file another process is appending to (a last line without
/// its newline is still being written, and left for the next read).
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: bad JSON line {l:?}: {e}", path.display())))
        .collect()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Reads whitespace-separated `name=pid` pairs a test script wrote.
pub fn read_pids(path: &Path) -> std::collections::HashMap<String, u32> {
    wait_for(
        &format!("pids in {}", path.display()),
        || {
            let text = fs::read_to_string(path).ok()?;
            text.contains("done").then_some(text)
        },
        String::new,
    )
    .split_whitespace()
    .filter_map(|kv| kv.split_once('='))
    .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
    .collect()
}

/// A session file with the given extra YAML lines.
pub fn session_file(dir: &Scratch, id: &str, extra: &str) -> PathBuf {
    let mut text =
        format!("id: {id}\nprincipal: alice@example.com\nactor: svc:test-bot\ntask: test {id}\nsponsor: qa-team\n");
    text.push_str(extra);
    dir.write(&format!("{id}.yaml"), &text)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Kills a process by pid if it is still alive (test cleanup).
pub fn kill(pid: u32) {
    // SAFETY: sending a signal to a pid.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

pub fn append(path: &Path, text: &str) {
    let mut f = fs::OpenOptions::new().append(true).create(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// A cgroup v2 directory made for one test; its processes are killed and it is removed on drop.
pub struct TestCgroup(pub PathBuf);

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let mounts = fs::read_to_string("/proc/mounts").unwrap();
        let root = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_string())
            })
            .expect("a cgroup2 mount");
        // Unique per call: tests of one binary run in parallel in one process.
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = Path::new(&root).join(format!("monitor-test-{name}-{}-{n}", std::process::id()));
        let _ = fs::create_dir(&dir);
        Self(dir)
    }

    pub fn procs(&self) -> PathBuf {
        self.0.join("cgroup.procs")
    }

    /// A cgroup below this one (dropped, like this one, with its processes killed); drop it first.
    pub fn child(&self, name: &str) -> TestCgroup {
        let dir = self.0.join(name);
        fs::create_dir(&dir).unwrap();
        TestCgroup(dir)
    }

    /// A shell prefix that moves the shell into this cgroup before it execs what follows.
    pub fn enter(&self) -> String {
        format!("echo $$ > {} && exec", self.procs().display())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for pid in fs::read_to_string(self.procs()).unwrap_or_default().lines() {
            if let Ok(pid) = pid.trim().parse() {
                kill(pid);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5) * slowdown();
        while fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A TCP listener on `addr` (port chosen by the kernel) that accepts and drops connections.
pub fn tcp_listener(addr: &str) -> u16 {
    let listener = std::net::TcpListener::bind((addr, 0)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    port
}

/// A UDP socket on `addr` that receives and ignores datagrams.
pub fn udp_listener(addr: &str) -> u16 {
    let socket = std::net::UdpSocket::bind((addr, 0)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let port = socket.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while socket.recv(&mut buf).is_ok() {}
    });
    port
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// The programs of a `monitor probes --json` answer, attached or not.
pub fn programs_from_json(json: &str) -> Vec<Value> {
    let data: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("monitor probes --json: {e}: {json}"));
    data["programs"].as_array().cloned().unwrap_or_default()
}

/// The names of the attached programs among `programs` (from [`programs_from_json`]).
pub fn attached_names(programs: &[Value]) -> std::collections::BTreeSet<String> {
    programs.iter().filter(|p| p["attached"] == true).filter_map(|p| Some(p["program"].as_str()?.to_string())).collect()
}

/// Checks OCSF findings against the OCSF 1.8 JSON schema (PyPI ocsf-json-schema, offline).
const VALIDATE_OCSF_18: &str = r#"
import json, sys
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from ocsf_json_schema import get_ocsf_schema, OcsfJsonSchema
schema = OcsfJsonSchema(get_ocsf_schema("1.8.0"))
def retrieve(uri):
    return Resource.from_contents(schema.get_schema_from_uri(uri))
registry = Registry(retrieve=retrieve)
n = 0
for line in open(sys.argv[1]):
    record = json.loads(line)
    # Validated with the profiles the record declares (monitor: security_control).
    profiles = record.get("metadata", {}).get("profiles", [])
    validator = Draft202012Validator(schema.get_class_schema("detection_finding", profiles), registry=registry)
    errors = sorted(validator.iter_errors(record), key=lambda e: list(e.path))
    for e in errors:
        print(f"line {n + 1}: {list(e.path)}: {e.message}", file=sys.stderr)
    if errors:
        sys.exit(1)
    n += 1
print(n)
"#;

/// Validates each OCSF finding of the JSON lines file `ocsf` against the OCSF 1.8 schema
/// (failing the test on the first error); returns how many there were.
pub fn validate_ocsf(dir: &Scratch, ocsf: &Path) -> usize {
    let validate = dir.write("validate_ocsf.py", VALIDATE_OCSF_18);
    let o = Command::new("python3").arg(&validate).arg(ocsf).output().unwrap();
    assert!(o.status.success(), "OCSF 1.8 validation failed:\n{}", stderr(&o));
    stdout(&o).trim().parse().unwrap()
}
