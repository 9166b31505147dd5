//! Tokens on the wire from the clients delegated actors actually run, on the real kernel: curl
//! over HTTP/2 (h2 with TLS, h2c in cleartext) to Debian's nghttpd. The token is read from a
//! file by the client (`curl -H @file`), never handed in an environment or on a command line,
//! so only the wire can be what catches it. Traffic goes to 127.0.0.0/8 only.

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

/// In a session, a request with the token raises nothing; after the task ended, the same
/// request from a process the task left in the background raises `token_after_task_end`, seen
/// on the wire as an HTTP/2 request.
fn http2_after_the_end(t: &Creds, files: &TokenFiles, curl: &str, seen_in: &str, name: &str) -> Value {
    let dir = &t.agent.dir;
    let inside = session_file(dir, &format!("{name}-inside"), &files.session_extra);
    let o = t.run_session(&inside, curl, &[]);
    assert!(o.status.success(), "curl in the session: {}", stderr(&o));
    let used = t.agent.wait_event("the in-session HTTP/2 token use", |e| {
        e["type"] == "token_use" && e["via"] == "http" && e["http2"] == true && e["session"] != 0
    });
    assert_eq!(used["tls"], seen_in == "https");
    let fingerprint = used["credential"]["fingerprint"].clone();
    assert!(fingerprint.as_str().unwrap().starts_with("hmac-sha256:"));
    let in_session_pid = used["actor"]["pid"].clone();

    let ended = session_file(dir, &format!("{name}-ended"), &files.session_extra);
    let o = t.run_session(&ended, &format!("(sleep 2; {curl}) > /dev/null 2>&1 &"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let alert = t.agent.wait_alert(&format!("token_after_task_end over {seen_in} HTTP/2"), |a| {
        a["rule"] == "token_after_task_end"
            && a["session"]["id"] == format!("{name}-ended")
            && a["credential"]["seen_in"] == seen_in
    });
    assert_eq!(alert["session"]["state"], "ended");
    assert_eq!(alert["credential"]["fingerprint"], fingerprint, "the same token, by fingerprint");
    assert_eq!(alert["credential"]["kind"], "bearer");
    assert_eq!(alert["credential"]["jwt"]["sub"], "alice@example.com");
    assert!(alert["process"]["exe"].as_str().unwrap().ends_with("curl"), "{alert}");
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

#[test]
fn tokens_in_http2_requests_over_tls_after_the_end() {
    let t = Creds::start("clients-h2", &[]);
    let server = nghttpd(&t.agent.dir, "127.0.0.2", true);
    let files = token_files(&t.agent.dir, "h2-tls");
    let url = format!("https://127.0.0.2:{}/refunds?access_token=not-logged", server.port);
    let curl = format!("curl -sk --http2 -o /dev/null -H @{} {url}", files.headers.display());
    let alert = http2_after_the_end(&t, &files, &curl, "https", "h2");
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
    let alert = http2_after_the_end(&t, &files, &curl, "http", "h2c");
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
