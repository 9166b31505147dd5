//! Benchmarks of the clients delegated actors run: HTTPS requests with a session token over
//! HTTP/2 (curl to nghttpd: the h2 connection tracking, every header block decoded with HPACK)
//! and from a Go client (the uprobe on Go's crypto/tls in the executable), and the exec of a Go
//! binary by a process outside sessions (the per-executable check at exec).

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context as _};

use super::{exec_loop_of, seconds_from, Paired, Plan};

/// `gobench URL N`: N GETs over one keep-alive connection with `Authorization: Bearer
/// $BENCH_TOKEN`; with no arguments it exits at once (the exec benchmark).
const GO_BENCH: &str = r#"package main

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
)

func main() {
	if len(os.Args) < 3 {
		return
	}
	n, _ := strconv.Atoi(os.Args[2])
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	token := os.Getenv("BENCH_TOKEN")
	for i := 0; i < n; i++ {
		req, _ := http.NewRequest("GET", os.Args[1], nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := client.Do(req)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}
"#;

/// Builds the Go benchmark client under `dir` with Debian's Go (CGO_ENABLED=0, as Go CLIs ship).
pub fn go_bench_binary(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let src = dir.join("gobench");
    fs::create_dir_all(&src)?;
    fs::write(src.join("go.mod"), "module gobench\n\ngo 1.19\n")?;
    fs::write(src.join("main.go"), GO_BENCH)?;
    let o = Command::new("go")
        .args(["build", "-o", "gobench", "."])
        .current_dir(&src)
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", dir.join("go-cache"))
        .env("GOPATH", dir.join("gopath"))
        .env("GOPROXY", "off")
        .output()
        .context("go build (Debian golang-go)")?;
    if !o.status.success() {
        bail!("go build: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(src.join("gobench"))
}

/// A random token per run, so nothing of value is ever in a benchmark artefact.
pub fn random_token() -> anyhow::Result<String> {
    let mut random = [0u8; 16];
    std::io::Read::read_exact(&mut fs::File::open("/dev/urandom")?, &mut random)?;
    Ok(random.iter().map(|b| format!("{b:02x}")).collect())
}

/// Runs `client` timed, inside a session holding `$BENCH_TOKEN` when the agent is there.
pub(crate) fn timed_in_session(
    monitor: &Path,
    session: &Path,
    agent: Option<&super::BenchAgent>,
    client: &[String],
    token: &str,
) -> anyhow::Result<f64> {
    let xtask = std::env::current_exe()?;
    let mut cmd = match agent {
        Some(agent) => {
            let mut c = Command::new(monitor);
            c.arg("run").arg("--file").arg(session).arg("--control").arg(&agent.control).arg("--");
            c.arg(&xtask);
            c
        }
        None => Command::new(&xtask),
    };
    seconds_from(cmd.arg("timed").arg("--").args(client).env("BENCH_TOKEN", token), "request loop")
}

pub(crate) fn token_session(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let session = dir.join("bench-clients-session.yaml");
    fs::write(
        &session,
        "principal: bench@example.com\nactor: svc:bench\ntask: client benchmark\ntokens:\n  - env: BENCH_TOKEN\n",
    )?;
    Ok(session)
}

/// Paired runs of `count` HTTP/2 requests over TLS (one connection) by curl to nghttpd.
pub fn h2_overhead(
    monitor: &Path,
    dir: &Path,
    agent_args: &[String],
    count: u32,
    rounds: u32,
) -> anyhow::Result<Paired> {
    eprintln!(
        "bench: HTTP/2 requests, {rounds} paired rounds of {count} curl --http2 requests with a token, session process"
    );
    let docroot = dir.join("h2-docroot");
    fs::create_dir_all(&docroot)?;
    fs::write(docroot.join("ok"), "ok")?;
    let (cert, key) = super::credentials::self_signed(dir, "bench-h2")?;
    let port = std::net::TcpListener::bind("127.0.0.9:0")?.local_addr()?.port();
    let mut cmd = Command::new("nghttpd");
    cmd.args(["-a", "127.0.0.9", "-d"]).arg(&docroot).arg(port.to_string()).arg(&key).arg(&cert);
    let _server = super::credentials::Server::spawn(dir, "bench-nghttpd.log", cmd, port)?;
    let token = random_token()?;
    let session = token_session(dir)?;
    let url = format!("https://127.0.0.9:{port}/ok?[1-{count}]");
    let curl = ["curl", "-sk", "--http2", "-o", "/dev/null", "-H", &format!("Authorization: Bearer {token}"), &url]
        .map(String::from);
    let curl_path = Path::new("/usr/bin/curl");
    let plan = request_plan(rounds, count, curl_path);
    Paired::run(monitor, dir, agent_args, &plan, |agent| timed_in_session(monitor, &session, agent, &curl, &token))
}

/// Paired runs of `count` HTTPS requests (HTTP/1.1, one keep-alive connection) by a Go client.
pub fn go_tls_overhead(
    monitor: &Path,
    dir: &Path,
    gobench: &Path,
    agent_args: &[String],
    count: u32,
    rounds: u32,
) -> anyhow::Result<Paired> {
    eprintln!("bench: Go HTTPS requests, {rounds} paired rounds of {count} requests with a token, session process");
    let server = super::credentials::TlsServer::start(dir)?;
    let token = random_token()?;
    let session = token_session(dir)?;
    let client = [gobench.display().to_string(), format!("https://127.0.0.9:{}/bench", server.port), count.to_string()];
    let plan = request_plan(rounds, count, gobench);
    Paired::run(monitor, dir, agent_args, &plan, |agent| timed_in_session(monitor, &session, agent, &client, &token))
}

/// Paired runs of `count` fork+exec+wait of a Go binary by a process outside sessions.
pub fn go_exec_overhead(
    monitor: &Path,
    dir: &Path,
    gobench: &Path,
    agent_args: &[String],
    count: u32,
    rounds: u32,
) -> anyhow::Result<Paired> {
    eprintln!("bench: Go exec overhead, {rounds} paired rounds of {count} fork+exec+wait of a Go binary");
    let plan =
        Plan {
            rounds, target: 1.03, n: count, unit: "µs/exec", key: "us_per_exec", workload: gobench, warm_up: false
        };
    Paired::run(monitor, dir, agent_args, &plan, |_| exec_loop_of(gobench, count))
}

/// The plan of an HTTPS request benchmark: `count` requests a run, warmed up (the agent's one-time
/// look at a new executable is not a request's cost), target ratio 1.10.
fn request_plan(rounds: u32, count: u32, workload: &Path) -> Plan<'_> {
    Plan { rounds, target: 1.10, n: count, unit: "µs/request", key: "us_per_request", workload, warm_up: true }
}
