//! Tokens on the wire from the clients delegated actors actually run, on the real kernel: curl
//! over HTTP/2 (h2 with TLS, h2c in cleartext) to Debian's nghttpd, a Go net/http client built
//! here (Go's own crypto/tls, HTTP/2 and HTTP/1.1, plain and stripped), and wget (GnuTLS). The
//! token is read from a file by the client (`curl -H @file`, a wgetrc, the Go client itself),
//! never handed in an environment or on a command line, so only the wire can be what catches
//! it. Traffic goes to 127.0.0.0/8 only.

use std::{fs, path::PathBuf, process::Command};

use monitor_tests::{wire::*, *};
use serde_json::Value;

/// Debian's nghttpd (nghttp2-server) on `addr`, over TLS with ALPN h2, or h2c with `--no-tls`.
fn nghttpd(dir: &Scratch, addr: &str, tls: bool) -> Server {
    let docroot = dir.path("docroot");
    fs::create_dir_all(&docroot).unwrap();
    fs::write(docroot.join("refunds"), "ok\n").unwrap();
    let port = free_port_on(addr);
    let mut cmd = Command::new("nghttpd");
    cmd.args(["-a", addr, "-d"]).arg(&docroot);
    if tls {
        let (cert, key) = self_signed(dir, "nghttpd", addr);
        cmd.arg(port.to_string()).arg(&key).arg(&cert);
    } else {
        cmd.arg("--no-tls").arg(port.to_string());
    }
    Server::spawn(dir, "nghttpd.log", cmd, addr, port)
}

/// The session's token in a file it declares (`tokens: - file:`), and a curl header file that
/// carries it: what a client configured from files sends, with nothing in its environment.
struct TokenFiles {
    token: String,
    session_extra: String,
    headers: PathBuf,
}

fn token_files(dir: &Scratch, name: &str) -> TokenFiles {
    let token = jwt(3600, name);
    let token_path = dir.write(&format!("{name}.token"), &format!("{token}\n"));
    let headers = dir.write(&format!("{name}.headers"), &format!("Authorization: Bearer {token}\n"));
    let session_extra = format!("grace: 1s\ntokens:\n  - file: {}\n", token_path.display());
    TokenFiles { token, session_extra, headers }
}

/// How a client's request is expected on the wire.
struct Wire<'a> {
    /// `https` or `http`.
    seen_in: &'a str,
    http2: bool,
    /// The executable's file name.
    exe: &'a str,
}

/// In a session, a request with the token raises nothing; after the task ended, the same
/// request from a process the task left in the background raises `token_after_task_end`, seen
/// on the wire as `wire` says.
fn after_the_end(t: &Creds, files: &TokenFiles, client: &str, wire: &Wire, name: &str) -> Value {
    let dir = &t.agent.dir;
    let inside = session_file(dir, &format!("{name}-inside"), &files.session_extra);
    let o = t.run_session(&inside, client, &[]);
    assert!(o.status.success(), "{client} in the session: {}{}", stdout(&o), stderr(&o));
    let started = t.agent.wait_event("the session's start", |e| {
        e["type"] == "session_started" && e["session"]["id"] == format!("{name}-inside")
    });
    let used = t.agent.wait_event(&format!("the in-session token use by {}", wire.exe), |e| {
        e["type"] == "token_use"
            && e["via"] == "http"
            && e["session"] == started["key"]
            // The Authorization header's token (a request may carry a query token too).
            && e["credential"]["kind"] == "bearer"
            // The task name: the process may be gone before its exe could be read.
            && e["actor"]["comm"] == wire.exe
    });
    assert_eq!(used["tls"], wire.seen_in == "https", "{used}");
    assert_eq!(used["http2"].as_bool().unwrap_or(false), wire.http2, "{used}");
    let fingerprint = used["credential"]["fingerprint"].clone();
    assert!(fingerprint.as_str().unwrap().starts_with("hmac-sha256:"));
    let in_session_pid = used["actor"]["pid"].clone();

    let ended = session_file(dir, &format!("{name}-ended"), &files.session_extra);
    let o = t.run_session(&ended, &format!("(sleep 2; {client}) > /dev/null 2>&1 &"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let alert = t.agent.wait_alert(&format!("token_after_task_end from {} over {}", wire.exe, wire.seen_in), |a| {
        a["rule"] == "token_after_task_end"
            && a["session"]["id"] == format!("{name}-ended")
            && a["credential"]["seen_in"] == wire.seen_in
    });
    assert_eq!(alert["session"]["state"], "ended");
    assert_eq!(alert["credential"]["fingerprint"], fingerprint, "the same token, by fingerprint");
    assert_eq!(alert["credential"]["kind"], "bearer");
    assert_eq!(alert["credential"]["jwt"]["sub"], "alice@example.com");
    assert!(alert["process"]["exe"].as_str().unwrap().ends_with(wire.exe), "{alert}");
    // The destination of the socket, for TLS (paired with the write in the kernel) as for
    // plaintext.
    if wire.seen_in == "http" || t.agent.names_tls_peers() {
        assert!(alert["network"]["dst_ip"].as_str().is_some_and(|ip| ip.starts_with("127.0.0.")), "{alert}");
        assert!(alert["network"]["dst_port"].as_u64().is_some_and(|p| p > 0), "{alert}");
    }
    assert!(
        t.agent
            .alerts()
            .iter()
            .all(|a| a["process"]["pid"] != in_session_pid || !a["rule"].as_str().unwrap().starts_with("token")),
        "the in-session use raised a token alert: {}",
        t.agent.diagnostics()
    );
    alert
}

const CURL_H2: Wire = Wire { seen_in: "https", http2: true, exe: "curl" };
const CURL_H2C: Wire = Wire { seen_in: "http", http2: true, exe: "curl" };

#[test]
fn tokens_in_http2_requests_over_tls_after_the_end() {
    let t = Creds::start("clients-h2", &[]);
    let server = nghttpd(&t.agent.dir, "127.0.0.2", true);
    let files = token_files(&t.agent.dir, "h2-tls");
    let url = format!("https://127.0.0.2:{}/refunds?access_token=not-logged", server.port);
    let curl = format!("curl -sk --http2 -o /dev/null -H @{} {url}", files.headers.display());
    let alert = after_the_end(&t, &files, &curl, &CURL_H2, "h2");
    assert_eq!(
        alert["credential"]["request"],
        format!("GET https://127.0.0.2:{}/refunds HTTP/2", server.port),
        "method, :authority and :path without the query"
    );
    t.assert_never_output(&files.token);
}

#[test]
fn tokens_in_h2c_requests_after_the_end_and_outside_the_session() {
    let t = Creds::start("clients-h2c", &[]);
    let server = nghttpd(&t.agent.dir, "127.0.0.3", false);
    let files = token_files(&t.agent.dir, "h2c");
    let url = format!("http://127.0.0.3:{}/refunds", server.port);
    let curl = format!("curl -s --http2-prior-knowledge -o /dev/null -H @{} {url}", files.headers.display());
    let alert = after_the_end(&t, &files, &curl, &CURL_H2C, "h2c");
    assert_eq!(alert["network"]["dst_ip"], "127.0.0.3");
    assert_eq!(alert["network"]["dst_port"], server.port);
    assert_eq!(alert["credential"]["request"], format!("GET http://127.0.0.3:{}/refunds HTTP/2", server.port));

    // While a session holding the token is active, a process outside it sends the token.
    let active = session_file(&t.agent.dir, "h2c-active", &files.session_extra);
    let (started, done) = (t.agent.dir.path("h2c-started"), t.agent.dir.path("h2c-done"));
    let script = format!("touch {}; while [ ! -f {} ]; do sleep 0.05; done", started.display(), done.display());
    let mut root = t.spawn_session(&active, &script, &[]);
    wait_for("the active session", || started.exists().then_some(()), || t.agent.diagnostics());
    let o = t.sh(&format!("echo $$ > {}/outside.pid; exec {curl}", t.agent.dir.0.display()), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let outside_pid: u64 = fs::read_to_string(t.agent.dir.path("outside.pid")).unwrap().trim().parse().unwrap();
    let alert = t.agent.wait_alert("token_outside_session over h2c", |a| {
        a["rule"] == "token_outside_session" && a["process"]["pid"] == outside_pid
    });
    assert_eq!(alert["session"]["id"], "h2c-active");
    assert_eq!(alert["credential"]["seen_in"], "http");
    fs::write(&done, "").unwrap();
    assert!(root.wait().unwrap().success());
    t.assert_never_output(&files.token);
}

/// A Go `net/http` client (Go's own crypto/tls, HTTP/2 when `H2` is set and the server offers
/// it), plain or stripped (`-ldflags=-s -w`: no `.symtab`, the probe finds crypto/tls through
/// `.gopclntab`). It reads the token from the file named by its second argument.
fn go_client(stripped: bool) -> PathBuf {
    if stripped {
        go::build("client-stripped", GO_CLIENT, "-s -w")
    } else {
        go::build("client", GO_CLIENT, "")
    }
}

const GO_CLIENT: &str = r#"package main

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: client URL TOKEN_FILE")
		os.Exit(2)
	}
	token, err := os.ReadFile(os.Args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	tr := &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
		ForceAttemptHTTP2: os.Getenv("H2") != "",
	}
	req, _ := http.NewRequest("GET", os.Args[1], nil)
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	io.Copy(io.Discard, resp.Body)
	fmt.Println(resp.Proto, resp.Status)
}
"#;

/// Runs `exe` without arguments (it exits with 2) as a session's task, and waits until the
/// agent has probed it.
fn first_run_in_a_session(t: &Creds, exe: &std::path::Path) {
    let name = exe.file_name().unwrap().to_str().unwrap();
    let session = session_file(&t.agent.dir, &format!("first-run-{name}"), "grace: 1s\n");
    let o = t.run_session(&session, &format!("{}; test $? -eq 2", exe.display()), &[]);
    assert!(o.status.success(), "the client without arguments: {}", stderr(&o));
    wait_probe_attached(t, exe);
}

/// Waits until the agent says it probed the TLS code of `exe` (at start, for the tool
/// directories; or at its first exec while something is watched).
fn wait_probe_attached(t: &Creds, exe: &std::path::Path) {
    let line = format!("executable probed path={}", exe.display());
    wait_for(
        &format!("the TLS probe on {}", exe.display()),
        || fs::read_to_string(&t.agent.log).unwrap_or_default().contains(&line).then_some(()),
        || t.agent.diagnostics(),
    );
}

/// The Go client is in a directory the policy lists (`tls.executable_dirs`): probed when the
/// agent starts, before it ever runs.
#[test]
fn tokens_from_a_go_client_over_http2_and_http1_after_the_end() {
    let client = go_client(false);
    let scratch = Scratch::new("clients-go-policy");
    let policy = scratch
        .write("policy.yaml", &format!("tls:\n  executable_dirs: [\"{}\"]\n", client.parent().unwrap().display()));
    let t = Creds::start("clients-go", &["--policy", policy.to_str().unwrap()]);
    wait_probe_attached(&t, &client);
    let h2 = nghttpd(&t.agent.dir, "127.0.0.2", true);
    let files = token_files(&t.agent.dir, "go");
    let token_path = t.agent.dir.path("go.token");
    let go_h2 = format!("H2=1 {} https://127.0.0.2:{}/refunds {}", client.display(), h2.port, token_path.display());
    let wire = Wire { seen_in: "https", http2: true, exe: "client" };
    let alert = after_the_end(&t, &files, &go_h2, &wire, "go-h2");
    assert_eq!(alert["credential"]["request"], format!("GET https://127.0.0.2:{}/refunds HTTP/2", h2.port));

    let h1 = tls_server(&t.agent.dir);
    let go_h1 = format!("{} https://127.0.0.2:{}/refunds {}", client.display(), h1.port, token_path.display());
    let wire = Wire { seen_in: "https", http2: false, exe: "client" };
    let alert = after_the_end(&t, &files, &go_h1, &wire, "go-h1");
    assert_eq!(alert["credential"]["request"], format!("GET https://127.0.0.2:{}/refunds", h1.port));
    t.assert_never_output(&files.token);
}

/// The stripped Go binary is a copy in a directory nothing lists: probed at its first exec.
#[test]
fn tokens_from_a_stripped_go_binary_and_from_wget_over_gnutls_after_the_end() {
    let t = Creds::start("clients-go-stripped", &[]);
    let client = t.agent.dir.path("client-stripped");
    fs::copy(go_client(true), &client).unwrap();
    let server = tls_server(&t.agent.dir);
    let files = token_files(&t.agent.dir, "stripped");
    let token_path = t.agent.dir.path("stripped.token");
    // Its first run while a session exists is where the agent learns of it (it asks for
    // nothing here). With no session on the host, execs are not looked at.
    first_run_in_a_session(&t, &client);
    let go = format!("{} https://127.0.0.2:{}/refunds {}", client.display(), server.port, token_path.display());
    let wire = Wire { seen_in: "https", http2: false, exe: "client-stripped" };
    after_the_end(&t, &files, &go, &wire, "go-stripped");

    // wget links GnuTLS; its header comes from a config file (`header = ...` in a wgetrc).
    let wgetrc =
        t.agent.dir.write("wgetrc", &format!("header = {}\n", fs::read_to_string(&files.headers).unwrap().trim()));
    let wget = format!(
        "WGETRC={} wget -q --no-check-certificate -O /dev/null https://127.0.0.2:{}/refunds",
        wgetrc.display(),
        server.port
    );
    let wire = Wire { seen_in: "https", http2: false, exe: "wget" };
    let alert = after_the_end(&t, &files, &wget, &wire, "wget");
    assert_eq!(alert["credential"]["request"], format!("GET https://127.0.0.2:{}/refunds", server.port));
    t.assert_never_output(&files.token);
}

/// A copy of libssl in a directory of its own (another file, as a container image's own libssl
/// is), loaded by curl through LD_LIBRARY_PATH: the host's libssl probes do not cover it. The
/// agent finds it among the libraries a session process maps and probes it too, so a token sent
/// through it is seen, in the session and after the task ended.
#[test]
fn tokens_over_a_copy_of_libssl_from_another_path_after_the_end() {
    let t = Creds::start("clients-libssl-copy", &[]);
    // The agent's look at executables at start comes first: a session process's libraries are
    // looked at after it (on a loaded machine, after the short first session ended).
    t.wait_executables_probed();
    let libdir = t.agent.dir.path("image-lib");
    fs::create_dir_all(&libdir).unwrap();
    let copy = libdir.join("libssl.so.3");
    fs::copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", &copy).unwrap();
    let server = tls_server(&t.agent.dir);
    let files = token_files(&t.agent.dir, "libssl-copy");
    let curl = format!(
        "LD_LIBRARY_PATH={} curl -sk -o /dev/null -H @{} https://127.0.0.2:{}/refunds",
        libdir.display(),
        files.headers.display(),
        server.port
    );
    // The first session process to map the copy is where the agent learns of it: curl reading
    // its configuration from a pipe for a second, with libssl mapped and nothing sent.
    let session = session_file(&t.agent.dir, "libssl-copy-first", "grace: 1s\n");
    let first = format!("sleep 1 | LD_LIBRARY_PATH={} curl -s -K - ; true", libdir.display());
    let o = t.run_session(&session, &first, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = format!("library probed path={}", copy.display());
    wait_for(
        "the TLS probes on the copy of libssl",
        || fs::read_to_string(&t.agent.log).unwrap_or_default().contains(&line).then_some(()),
        || t.agent.diagnostics(),
    );
    let probes = t.agent.cli(&["probes"]);
    assert!(stdout(&probes).contains(&format!("in {}", copy.display())), "{}", stdout(&probes));
    let wire = Wire { seen_in: "https", http2: false, exe: "curl" };
    let alert = after_the_end(&t, &files, &curl, &wire, "libssl-copy");
    assert_eq!(alert["credential"]["request"], format!("GET https://127.0.0.2:{}/refunds", server.port));
    t.assert_never_output(&files.token);
}

/// A token endpoint (RFC 6749 §5.1) over TLS on 127.0.0.2: POST gives a fresh access token as
/// JSON (and writes it where the test can read it, to search the outputs for it); any other
/// request is answered 200. The response is longer than one kernel capture (4 KiB) and the token
/// comes after the first 4 KiB of the body, as in a response whose long id_token or scope list
/// comes first: the clients read it in more than one piece (Go's reader takes 4 KiB at a time),
/// which the agent joins again.
const TOKEN_ENDPOINT: &str = r#"
import http.server, json, secrets, ssl, sys
port, cert, key, issued = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        token = "at-" + secrets.token_urlsafe(24)
        with open(issued, "a") as f:
            f.write(token + "\n")
        scope = " ".join("refunds:%d:write" % i for i in range(400))
        body = json.dumps({"scope": scope, "access_token": token, "token_type": "Bearer", "expires_in": 3600}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.2", port), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// A job that reads the token the task saved and calls the API with it (Python's ssl: OpenSSL).
const USE_SAVED_TOKEN: &str = r#"
import json, ssl, sys, urllib.request
token = json.load(open(sys.argv[2]))["access_token"]
request = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + token})
urllib.request.urlopen(request, context=ssl._create_unverified_context()).read()
"#;

/// The token endpoint running on 127.0.0.2, the file it writes what it issued to, the job that
/// uses a saved token, and where the task saves it.
struct TokenEndpoint {
    _server: Server,
    port: u16,
    issued: PathBuf,
    job: PathBuf,
    saved: PathBuf,
}

fn token_endpoint(dir: &Scratch) -> TokenEndpoint {
    let (cert, key) = self_signed(dir, "token-endpoint", "127.0.0.2");
    let port = free_port_on("127.0.0.2");
    let issued = dir.path("issued.tokens");
    let endpoint = dir.write("token_endpoint.py", TOKEN_ENDPOINT);
    let mut cmd = Command::new("python3");
    cmd.arg(&endpoint).arg(port.to_string()).arg(&cert).arg(&key).arg(&issued);
    let _server = Server::spawn(dir, "token-endpoint.log", cmd, "127.0.0.2", port);
    let job = dir.write("use_saved_token.py", USE_SAVED_TOKEN);
    TokenEndpoint { _server, port, issued, job, saved: dir.path("token.json") }
}

/// An agent with the opt-in probes that read OpenSSL's TLS reads (token responses).
fn with_ssl_read_probes(name: &str) -> Creds {
    let mut args = Vec::new();
    for probe in ["ssl_read", "ssl_read_ret", "ssl_read_ex", "ssl_read_ex_ret"] {
        args.extend(["--enable-probe", probe]);
    }
    Creds::start(name, &args)
}

/// The task obtains a token from a token endpoint (and never sends it); a job it leaves behind
/// uses it after the end: the token was learnt from the response (the opt-in SSL_read probes),
/// so that use is caught.
#[test]
fn a_token_obtained_during_the_task_and_used_after_the_end_is_learnt() {
    let t = with_ssl_read_probes("clients-oauth");
    let dir = &t.agent.dir;
    let TokenEndpoint { _server, port, issued, job, saved } = token_endpoint(dir);
    let session = session_file(dir, "oauth", "grace: 1s\n");
    let script = format!(
        "curl -sk -X POST -d grant_type=client_credentials -o {saved} https://127.0.0.2:{port}/token || exit 1; \
         (sleep 2; python3 {job} https://127.0.0.2:{port}/refunds {saved}) > /dev/null 2>&1 &",
        saved = saved.display(),
        job = job.display()
    );
    let o = t.run_session(&session, &script, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let received = t.agent.wait_event("the token response", |e| e["type"] == "token_use" && e["via"] == "received");
    assert_eq!(received["field"], "access_token");
    let alert = t.agent.wait_alert("token_after_task_end for the learnt token", |a| {
        a["rule"] == "token_after_task_end" && a["session"]["id"] == "oauth" && a["credential"]["seen_in"] == "https"
    });
    assert_eq!(alert["credential"]["learned"], true, "{alert}");
    assert_eq!(alert["credential"]["fingerprint"], received["credential"]["fingerprint"]);
    assert_eq!(alert["credential"]["request"], format!("GET https://127.0.0.2:{port}/refunds"));
    let token = fs::read_to_string(&issued).unwrap().trim().to_string();
    t.assert_never_output(&token);
}

/// The same over HTTP/2: curl `--http2` POSTs to nghttpd's token resource, and the token is
/// learnt from the response's DATA frame (the POST is told from the HEADERS frame's indexed
/// `:method`); the job left behind uses it, over HTTP/2 too, after the end.
#[test]
fn a_token_obtained_over_http2_during_the_task_and_used_after_the_end_is_learnt() {
    let t = with_ssl_read_probes("clients-oauth-h2");
    let dir = &t.agent.dir;
    let server = nghttpd(dir, "127.0.0.2", true);
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let token = format!("at-h2-{nonce:x}-{}", std::process::id());
    fs::write(dir.path("docroot/token"), format!("{{\"access_token\":\"{token}\",\"token_type\":\"Bearer\"}}"))
        .unwrap();
    let (saved, header) = (dir.path("token.json"), dir.path("auth.header"));
    let session = session_file(dir, "oauth-h2", "grace: 1s\n");
    let script = format!(
        "curl -sk --http2 -X POST -d grant_type=client_credentials -o {saved} https://127.0.0.2:{port}/token || exit 1; \
         (sleep 2; python3 -c 'import json, sys; print(\"Authorization: Bearer \" + json.load(open(sys.argv[1]))[\"access_token\"])' \
         {saved} > {header}; curl -sk --http2 -H @{header} https://127.0.0.2:{port}/refunds) > /dev/null 2>&1 &",
        saved = saved.display(),
        header = header.display(),
        port = server.port
    );
    let o = t.run_session(&session, &script, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let received =
        t.agent.wait_event("the token response over HTTP/2", |e| e["type"] == "token_use" && e["via"] == "received");
    assert_eq!(received["field"], "access_token");
    let alert = t.agent.wait_alert("token_after_task_end for the token learnt over HTTP/2", |a| {
        a["rule"] == "token_after_task_end" && a["session"]["id"] == "oauth-h2" && a["credential"]["seen_in"] == "https"
    });
    assert_eq!(alert["credential"]["learned"], true, "{alert}");
    assert_eq!(alert["credential"]["fingerprint"], received["credential"]["fingerprint"]);
    t.assert_never_output(&token);
}

/// The same with wget, whose TLS is GnuTLS: its response is read at `gnutls_record_recv`'s
/// return (opt-in probes, like OpenSSL's).
#[test]
fn a_token_wget_obtained_during_the_task_and_used_after_the_end_is_learnt() {
    let args = ["--enable-probe", "gnutls_record_recv", "--enable-probe", "gnutls_record_recv_ret"];
    let t = Creds::start("clients-oauth-wget", &args);
    let dir = &t.agent.dir;
    let TokenEndpoint { _server, port, issued, job, saved } = token_endpoint(dir);
    let session = session_file(dir, "oauth-wget", "grace: 1s\n");
    let script = format!(
        "wget -q --no-check-certificate --post-data grant_type=client_credentials -O {saved} https://127.0.0.2:{port}/token || exit 1; \
         (sleep 2; python3 {job} https://127.0.0.2:{port}/refunds {saved}) > /dev/null 2>&1 &",
        saved = saved.display(),
        job = job.display()
    );
    let o = t.run_session(&session, &script, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let received =
        t.agent.wait_event("the token response read by wget", |e| e["type"] == "token_use" && e["via"] == "received");
    assert_eq!(received["actor"]["comm"], "wget");
    let alert = t.agent.wait_alert("token_after_task_end for the token wget got", |a| {
        a["rule"] == "token_after_task_end"
            && a["session"]["id"] == "oauth-wget"
            && a["credential"]["seen_in"] == "https"
    });
    assert_eq!(alert["credential"]["learned"], true, "{alert}");
    assert_eq!(alert["credential"]["fingerprint"], received["credential"]["fingerprint"]);
    let token = fs::read_to_string(&issued).unwrap().trim().to_string();
    t.assert_never_output(&token);
}

/// `gettoken URL OUT`: a Go client of a token endpoint (client credentials grant) that saves the
/// response body; without arguments it exits at once. It speaks HTTP/2 where the server offers
/// it (ALPN), HTTP/1.1 otherwise.
const GO_GET_TOKEN: &str = r#"package main

import (
	"crypto/tls"
	"io"
	"net/http"
	"net/url"
	"os"
)

func main() {
	if len(os.Args) < 3 {
		os.Exit(2)
	}
	transport := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, ForceAttemptHTTP2: true}
	client := &http.Client{Transport: transport}
	resp, err := client.PostForm(os.Args[1], url.Values{"grant_type": {"client_credentials"}})
	if err != nil {
		os.Exit(1)
	}
	body, _ := io.ReadAll(resp.Body)
	os.WriteFile(os.Args[2], body, 0o600)
}
"#;

/// The same with a Go client of the token endpoint: its response is read at the returns of
/// `(*crypto/tls.Conn).Read` (opt-in probes, no uretprobe).
#[test]
fn a_token_a_go_client_obtained_during_the_task_and_used_after_the_end_is_learnt() {
    let t = Creds::start("clients-oauth-go", &["--enable-probe", "go_tls_read", "--enable-probe", "go_tls_read_ret"]);
    let dir = &t.agent.dir;
    let gettoken = dir.path("gettoken");
    fs::copy(go::build("gettoken", GO_GET_TOKEN, ""), &gettoken).unwrap();
    // Its first run while a session exists is where the agent learns of it.
    first_run_in_a_session(&t, &gettoken);
    let TokenEndpoint { _server, port, issued, job, saved } = token_endpoint(dir);
    let session = session_file(dir, "oauth-go", "grace: 1s\n");
    let script = format!(
        "{gettoken} https://127.0.0.2:{port}/token {saved} || exit 1; \
         (sleep 2; python3 {job} https://127.0.0.2:{port}/refunds {saved}) > /dev/null 2>&1 &",
        gettoken = gettoken.display(),
        saved = saved.display(),
        job = job.display()
    );
    let o = t.run_session(&session, &script, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let received =
        t.agent.wait_event("the token response read by Go", |e| e["type"] == "token_use" && e["via"] == "received");
    assert_eq!(received["actor"]["comm"], "gettoken");
    let alert = t.agent.wait_alert("token_after_task_end for the token the Go client got", |a| {
        a["rule"] == "token_after_task_end" && a["session"]["id"] == "oauth-go" && a["credential"]["seen_in"] == "https"
    });
    assert_eq!(alert["credential"]["learned"], true, "{alert}");
    let token = fs::read_to_string(&issued).unwrap().trim().to_string();
    t.assert_never_output(&token);
}

/// A Go client gets its token over HTTP/2: Go's header block starts with `:authority`, a literal,
/// and `:method` follows it, so the kernel steps over the first field to tell the POST whose
/// response is read. The job left behind uses the token with curl over HTTP/2 after the end.
#[test]
fn a_token_a_go_client_obtained_over_http2_during_the_task_and_used_after_the_end_is_learnt() {
    let t =
        Creds::start("clients-oauth-go-h2", &["--enable-probe", "go_tls_read", "--enable-probe", "go_tls_read_ret"]);
    let dir = &t.agent.dir;
    let gettoken = dir.path("gettoken");
    fs::copy(go::build("gettoken", GO_GET_TOKEN, ""), &gettoken).unwrap();
    first_run_in_a_session(&t, &gettoken);
    let server = nghttpd(dir, "127.0.0.2", true);
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let token = format!("at-go-h2-{nonce:x}-{}", std::process::id());
    fs::write(dir.path("docroot/token"), format!("{{\"access_token\":\"{token}\",\"token_type\":\"Bearer\"}}"))
        .unwrap();
    let (saved, header) = (dir.path("token.json"), dir.path("auth.header"));
    let session = session_file(dir, "oauth-go-h2", "grace: 1s\n");
    let script = format!(
        "{gettoken} https://127.0.0.2:{port}/token {saved} || exit 1; \
         (sleep 2; python3 -c 'import json, sys; print(\"Authorization: Bearer \" + json.load(open(sys.argv[1]))[\"access_token\"])' \
         {saved} > {header}; curl -sk --http2 -H @{header} https://127.0.0.2:{port}/refunds) > /dev/null 2>&1 &",
        gettoken = gettoken.display(),
        saved = saved.display(),
        header = header.display(),
        port = server.port
    );
    let o = t.run_session(&session, &script, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let received = t
        .agent
        .wait_event("the token response Go read over HTTP/2", |e| e["type"] == "token_use" && e["via"] == "received");
    assert_eq!(received["actor"]["comm"], "gettoken");
    let alert = t.agent.wait_alert("token_after_task_end for the token Go got over HTTP/2", |a| {
        a["rule"] == "token_after_task_end"
            && a["session"]["id"] == "oauth-go-h2"
            && a["credential"]["seen_in"] == "https"
    });
    assert_eq!(alert["credential"]["learned"], true, "{alert}");
    assert_eq!(alert["credential"]["fingerprint"], received["credential"]["fingerprint"]);
    t.assert_never_output(&token);
}
