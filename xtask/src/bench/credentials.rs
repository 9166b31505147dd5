//! Benchmarks of the credential probes: openat of ordinary files by a process outside sessions
//! (what the agent's presence costs every syscall; credential files are watched by fanotify
//! inode marks, which cost other files nothing), and HTTPS requests carrying a
//! session token by a session process (the SSL_write uprobe, the payload event, the parse and
//! the fingerprint).

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use super::{seconds_from, Paired, Plan};

/// Paired runs of `count` openat+close of an ordinary (unwatched) file.
pub fn open_overhead(
    monitor: &Path,
    dir: &Path,
    agent_args: &[String],
    count: u32,
    rounds: u32,
    session_on_host: bool,
) -> anyhow::Result<Paired> {
    let host = if session_on_host { "a session running on the host" } else { "no session on the host" };
    eprintln!(
        "bench: openat overhead, {rounds} paired rounds of {count} openat+close (CPU time), outside sessions, {host}"
    );
    let file = dir.join("ordinary-file");
    fs::write(&file, "not a credential\n")?;
    let xtask = std::env::current_exe()?;
    let open_loop =
        || seconds_from(Command::new(&xtask).arg("open-loop").arg(&file).arg(count.to_string()), "open loop");
    let plan =
        Plan { rounds, target: 1.03, n: count, unit: "µs/open", key: "us_per_open", workload: &xtask, warm_up: false };
    Paired::run(monitor, dir, agent_args, &plan, |agent| match agent {
        Some(agent) if session_on_host => super::with_session_holder(monitor, dir, agent, None, open_loop),
        _ => open_loop(),
    })
}

/// The client side of the openat benchmark.
/// Prints the CPU time (user + system) the loop took: the cost the probes add to each syscall,
/// without the noise of this shared machine's scheduling that wall time carries at this scale.
pub fn open_loop(path: &Path, count: u32) -> anyhow::Result<()> {
    let before = cpu_seconds();
    for _ in 0..count {
        drop(fs::File::open(path)?);
    }
    println!("{:.6}", cpu_seconds() - before);
    Ok(())
}

/// This process's user + system CPU time, in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

/// Runs a command and prints its wall time: the same measurement inside and outside `monitor run`.
pub fn timed(command: &[String]) -> anyhow::Result<()> {
    let start = Instant::now();
    let status = Command::new(&command[0]).args(&command[1..]).stdout(Stdio::null()).status()?;
    if !status.success() {
        bail!("{} failed: {status}", command[0]);
    }
    println!("{:.6}", start.elapsed().as_secs_f64());
    Ok(())
}

/// Paired runs of `count` HTTPS requests with `Authorization: Bearer <token>`, made by curl over
/// one keep-alive connection to a Python TLS server on 127.0.0.9. With the agent, curl runs in a
/// session that holds the token.
pub fn tls_overhead(
    monitor: &Path,
    dir: &Path,
    agent_args: &[String],
    count: u32,
    rounds: u32,
) -> anyhow::Result<Paired> {
    eprintln!("bench: HTTPS requests, {rounds} paired rounds of {count} requests with a bearer token, session process");
    let server = TlsServer::start(dir)?;
    let session = super::clients::token_session(dir)?;
    let token = super::clients::random_token()?;
    let url = format!("https://127.0.0.9:{}/bench/[1-{count}]", server.port);
    let curl = ["curl", "-sk", "--http1.1", "-o", "/dev/null", "-H", &format!("Authorization: Bearer {token}"), &url]
        .map(String::from);
    let workload = Path::new("/usr/bin/curl");
    let plan =
        Plan { rounds, target: 1.10, n: count, unit: "µs/request", key: "us_per_request", workload, warm_up: true };
    Paired::run(monitor, dir, agent_args, &plan, |agent| {
        super::clients::timed_in_session(monitor, &session, agent, &curl, &token)
    })
}

/// An HTTP/1.1 keep-alive server over TLS (Python's http.server and ssl) with a self-signed
/// certificate, answering every GET with a short body.
pub(crate) struct TlsServer {
    /// Kept for its drop: the server is killed with it.
    #[allow(dead_code)]
    server: Server,
    pub port: u16,
}

const SERVER: &str = r#"
import http.server, ssl, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per response and no Nagle: otherwise delayed ACKs (40 ms) dominate.
    disable_nagle_algorithm = True
    def do_GET(self):
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.9", int(sys.argv[1])), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[2], sys.argv[3])
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// A self-signed certificate and key for 127.0.0.9 under `dir` (`{name}-cert.pem`, `-key.pem`).
pub(crate) fn self_signed(dir: &Path, name: &str) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let (cert, key) = (dir.join(format!("{name}-cert.pem")), dir.join(format!("{name}-key.pem")));
    let o = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.9"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("openssl req")?;
    if !o.status.success() {
        bail!("openssl req: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok((cert, key))
}

/// A benchmark's server process on 127.0.0.9, killed on drop.
pub(crate) struct Server {
    child: Child,
}

impl Server {
    /// Spawns `cmd` (stderr to `dir/log`) and waits until it accepts connections on `port`.
    pub fn spawn(dir: &Path, log: &str, mut cmd: Command, port: u16) -> anyhow::Result<Self> {
        let child = cmd.stdout(Stdio::null()).stderr(fs::File::create(dir.join(log))?).spawn().context("server")?;
        let server = Self { child };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.9", port)).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the server did not start: {}", fs::read_to_string(dir.join(log))?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsServer {
    pub(crate) fn start(dir: &Path) -> anyhow::Result<Self> {
        let (cert, key) = self_signed(dir, "bench")?;
        let port = std::net::TcpListener::bind("127.0.0.9:0")?.local_addr()?.port();
        let script = dir.join("bench-tls-server.py");
        fs::write(&script, SERVER)?;
        let mut cmd = Command::new("python3");
        cmd.arg(&script).arg(port.to_string()).arg(&cert).arg(&key);
        Ok(Self { server: Server::spawn(dir, "bench-tls-server.log", cmd, port)?, port })
    }
}
