//! What the credential and client tests share: an agent with its test cgroup and traces, the
//! task's JWT, and the TLS and plaintext servers the workloads talk to (127.0.0.0/8 only).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use serde_json::{json, Value};

use crate::*;

/// A JWT for the task: principal alice, acting through the test bot (RFC 8693 `act`). Unsigned
/// for the test's purpose; the agent decodes, it never verifies.
pub fn jwt(exp_in_secs: i64, jti: &str) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let claims = json!({
        "iss": "https://idp.test", "sub": "alice@example.com", "jti": jti,
        "exp": now + exp_in_secs, "scope": "refunds:write",
        "act": {"sub": "svc:test-bot", "act": {"sub": "svc:orchestrator"}},
    });
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    // A random signature, so each test's token is unique.
    let sig = URL_SAFE_NO_PAD.encode(format!("sig-{jti}-{}-{}", std::process::id(), now).as_bytes());
    format!("{header}.{}.{sig}", URL_SAFE_NO_PAD.encode(claims.to_string()))
}

pub struct Creds {
    pub agent: Agent,
    pub cg: TestCgroup,
    /// The agent's session traces (`--trace-dir`): searched for secrets like every output.
    pub traces: Scratch,
}

impl Creds {
    pub fn start(name: &str, extra: &[&str]) -> Self {
        let cg = TestCgroup::new(name);
        let traces = Scratch::new(&format!("{name}-traces"));
        let trace_dir = traces.0.to_str().unwrap().to_string();
        let mut args = vec!["--cgroup", cg.0.to_str().unwrap(), "--trace-dir", &trace_dir];
        args.extend_from_slice(extra);
        Self { agent: Agent::start_with(name, &args), cg, traces }
    }

    /// Waits until the agent has probed, in advance, the executables with TLS code of their own
    /// (at start, in the background): each adds BPF links, which some tests count.
    pub fn wait_executables_probed(&self) {
        wait_for(
            "the start-up probing of executables",
            || {
                let log = fs::read_to_string(&self.agent.log).unwrap_or_default();
                log.contains("executables with their own TLS code probed in advance").then_some(())
            },
            || self.agent.diagnostics(),
        );
    }

    /// `sh -c SCRIPT` moved into the test cgroup first, with `env` added.
    pub fn command(&self, script: &str, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", &format!("{} /bin/sh -c '{}'", self.cg.enter(), script.replace('\'', "'\\''"))])
            .env("MONITOR_CONTROL", &self.agent.control)
            .env("MONITOR_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn sh(&self, script: &str, env: &[(&str, &str)]) -> Output {
        self.command(script, env).output().unwrap()
    }

    /// `monitor run --file SESSION -- /bin/sh -c SCRIPT` in the test cgroup.
    pub fn run_session(&self, session: &Path, script: &str, env: &[(&str, &str)]) -> Output {
        let line = format!(
            "{} run --file {} -- /bin/sh -c '{}'",
            monitor_bin().display(),
            session.display(),
            script.replace('\'', "'\\''")
        );
        self.sh(&line, env)
    }

    pub fn spawn_session(&self, session: &Path, script: &str, env: &[(&str, &str)]) -> Child {
        let line = format!(
            "{} run --file {} -- /bin/sh -c '{}'",
            monitor_bin().display(),
            session.display(),
            script.replace('\'', "'\\''")
        );
        self.command(&line, env).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
    }

    pub fn alerts_of(&self, rule: &str) -> Vec<Value> {
        self.agent.alerts().into_iter().filter(|a| a["rule"] == rule).collect()
    }

    /// The raw secret appears in none of the agent's outputs.
    pub fn assert_never_output(&self, secret: &str) {
        // The token's signature part is checked too: a partial leak is a leak.
        let tail = &secret[secret.len().saturating_sub(16)..];
        for file in [&self.agent.alerts, &self.agent.events, &self.agent.log] {
            let text = fs::read_to_string(file).unwrap_or_default();
            assert!(!text.is_empty() || file != &self.agent.log, "{} is empty", file.display());
            assert!(!text.contains(secret) && !text.contains(tail), "the raw token leaked into {}", file.display());
        }
        // The trace is MessagePack: searched as bytes, every segment and index. It must hold
        // the token's uses (by fingerprint, as the alerts name it), or the search proves nothing.
        let contains = |bytes: &[u8], needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        let fingerprints: Vec<String> = self
            .agent
            .alerts()
            .iter()
            .filter_map(|a| a["credential"]["fingerprint"].as_str().map(str::to_string))
            .collect();
        assert!(!fingerprints.is_empty(), "no alert names a credential fingerprint");
        let mut recorded = false;
        for entry in fs::read_dir(&self.traces.0).unwrap() {
            let path = entry.unwrap().path();
            let bytes = fs::read(&path).unwrap();
            for needle in [secret.as_bytes(), tail.as_bytes()] {
                assert!(!contains(&bytes, needle), "the raw token leaked into {}", path.display());
            }
            recorded |= fingerprints.iter().any(|f| contains(&bytes, f.as_bytes()));
        }
        assert!(recorded, "the trace in {} records no use of the token", self.traces.0.display());
    }
}

/// A server process a test started, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    /// Spawns `cmd` (output to `DIR/{log}`) and waits until it accepts connections on
    /// `addr:port`.
    pub fn spawn(dir: &Scratch, log: &str, mut cmd: Command, addr: &str, port: u16) -> Self {
        let log_path = dir.path(log);
        let file = fs::File::create(&log_path).unwrap();
        let child = cmd.stdin(Stdio::null()).stdout(file.try_clone().unwrap()).stderr(file).spawn().unwrap();
        let server = Self { child, port };
        wait_for(
            &format!("{log}: listening on {addr}:{port}"),
            || std::net::TcpStream::connect((addr, port)).ok(),
            || fs::read_to_string(&log_path).unwrap_or_default(),
        );
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A self-signed certificate and its key for `cn`: `DIR/{name}-cert.pem`, `DIR/{name}-key.pem`.
pub fn self_signed(dir: &Scratch, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.path(&format!("{name}-cert.pem")), dir.path(&format!("{name}-key.pem")));
    let o = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj"])
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(o.status.success(), "openssl req: {}", stderr(&o));
    (cert, key)
}

/// `openssl s_server -www` on 127.0.0.2 with a self-signed certificate.
pub fn tls_server(dir: &Scratch) -> Server {
    let (cert, key) = self_signed(dir, "s_server", "127.0.0.2");
    let port = free_port_on("127.0.0.2");
    let mut cmd = Command::new("openssl");
    cmd.args(["s_server", "-quiet", "-www", "-accept"])
        .arg(format!("127.0.0.2:{port}"))
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key);
    Server::spawn(dir, "s_server.log", cmd, "127.0.0.2", port)
}

/// A plaintext HTTP server (Python's http.server) on 127.0.0.3, serving `dir`.
pub fn http_server(dir: &Scratch) -> Server {
    let port = free_port_on("127.0.0.3");
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "http.server", "--bind", "127.0.0.3", &port.to_string()]).current_dir(&dir.0);
    Server::spawn(dir, "http.server.log", cmd, "127.0.0.3", port)
}

/// A port nothing listens on at `addr`, for a server a test starts next. Taken below the
/// kernel's ephemeral range (32768 and up by default): a port the kernel hands out for `bind(0)`
/// is also handed out as the source port of outgoing connections, so while other tests connect
/// (the flood test opens 40 at once) it can be taken again between this check and the server's
/// bind, or while a server is restarted on it. Each call starts from a different place (process
/// id and a counter), and the port is checked free by binding it.
pub fn free_port_on(addr: &str) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const COUNT: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id().wrapping_mul(7919);
    for _ in 0..COUNT {
        let offset = base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(131)) % COUNT;
        let port = (FIRST + offset) as u16;
        if std::net::TcpListener::bind((addr, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {addr} between {FIRST} and {}", FIRST + COUNT)
}
