//! Credential use on the real kernel: tokens on the wire (curl over TLS to `openssl s_server`,
//! and over plaintext HTTP), tokens in exec environments, watched credential files, and
//! credential changes. The agent's cgroup hooks attach under a cgroup made by the test and the
//! workloads run inside it. Traffic goes to 127.0.0.0/8 only. Every test ends by searching the
//! agent's outputs (alerts, event log, debug log) for the raw token.

use std::{fs, process::Command};

use monitor_tests::{wire::*, *};
use serde_json::json;

const SESSION: &str = "grace: 1s\ntokens:\n  - env: BOT_TOKEN\n";

/// The curl command sending the session's token (by variable, never spelled out in a script).
fn curl(url: &str) -> String {
    format!("curl -sk -o /dev/null -H \"Authorization: Bearer $BOT_TOKEN\" {url}")
}

/// Checks the wire scenario over one transport: in-session use observed without alert, use by
/// a process outside the session while it is active, use by a backgrounded session process
/// after the task ended, and an expired JWT.
fn wire_scenario(t: &Creds, url: &str, seen_in: &str, token: &str) {
    let dir = &t.agent.dir;
    // 1. Outside the session while it is active: the session's root waits for the test.
    let active = session_file(dir, &format!("{seen_in}-active"), SESSION);
    let (started, done) = (dir.path(&format!("{seen_in}-started")), dir.path(&format!("{seen_in}-done")));
    let script =
        format!("{}; touch {}; while [ ! -f {} ]; do sleep 0.05; done", curl(url), started.display(), done.display());
    let mut root = t.spawn_session(&active, &script, &[("BOT_TOKEN", token)]);
    wait_for("the session's first request", || started.exists().then_some(()), || t.agent.diagnostics());
    let o = t.sh(&format!("echo $$ > {}/outside.pid; exec {}", dir.0.display(), curl(url)), &[("BOT_TOKEN", token)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let outside_pid: u64 = fs::read_to_string(dir.path("outside.pid")).unwrap().trim().parse().unwrap();
    // The outside curl also has the token in its environment: that is its own alert (via env).
    let alert = t.agent.wait_alert("token_outside_session", |a| {
        a["rule"] == "token_outside_session"
            && a["process"]["pid"] == outside_pid
            && a["credential"]["seen_in"] == seen_in
    });
    assert_eq!(alert["session"]["id"], format!("{seen_in}-active"));
    let credential = &alert["credential"];
    assert_eq!(credential["kind"], "bearer");
    assert_eq!(credential["seen_in"], seen_in);
    assert!(credential["fingerprint"].as_str().unwrap().starts_with("hmac-sha256:"));
    assert_eq!(credential["jwt"]["sub"], "alice@example.com");
    assert_eq!(credential["jwt"]["act"], json!(["svc:test-bot", "svc:orchestrator"]));
    assert!(alert["process"]["exe"].as_str().unwrap().ends_with("curl"), "{alert}");
    // The socket's destination, on TLS and plaintext request alerts alike.
    let dst: std::net::SocketAddr = url.split('/').nth(2).unwrap().parse().unwrap();
    if seen_in == "http" || t.agent.names_tls_peers() {
        assert_eq!(alert["network"]["dst_ip"], dst.ip().to_string(), "{alert}");
        assert_eq!(alert["network"]["dst_port"], dst.port(), "{alert}");
    }
    fs::write(&done, "").unwrap();
    assert!(root.wait().unwrap().success());

    // The session's own request was seen and raised nothing.
    let inside = t.agent.wait_event("the in-session token use", |e| {
        e["type"] == "token_use"
            && e["via"] == "http"
            && e["session"] != 0
            && e["credential"]["fingerprint"] == credential["fingerprint"]
    });
    assert_eq!(inside["via"], "http");
    assert_eq!(inside["tls"], seen_in == "https");
    let in_session_pid = inside["actor"]["pid"].clone();
    assert!(
        t.agent.alerts().iter().all(|a| a["process"]["pid"] != in_session_pid),
        "an in-scope use raised an alert: {}",
        t.agent.diagnostics()
    );

    // 2. After the task ended, from a process the task left in the background.
    let ended = session_file(dir, &format!("{seen_in}-ended"), SESSION);
    let script = format!("(sleep 2; {}) > /dev/null 2>&1 &", curl(url));
    let o = t.run_session(&ended, &script, &[("BOT_TOKEN", token)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let alert = t.agent.wait_alert("token_after_task_end", |a| {
        a["rule"] == "token_after_task_end"
            && a["session"]["id"] == format!("{seen_in}-ended")
            && a["credential"]["seen_in"] == seen_in
    });
    assert_eq!(alert["session"]["state"], "ended");
    assert_eq!(alert["credential"]["seen_in"], seen_in);
    assert!(alert["process"]["exe"].as_str().unwrap().ends_with("curl"));
    assert!(!alert["process"]["chain"].as_array().unwrap().is_empty(), "the chain leads to the session root");

    // 3. An expired JWT, inside a session.
    let expired = jwt(-120, &format!("expired-{seen_in}"));
    let session = session_file(dir, &format!("{seen_in}-expired"), "grace: 1s\n");
    let o = t.run_session(&session, &curl(url), &[("BOT_TOKEN", &expired)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let alert = t.agent.wait_alert("expired_token_use", |a| {
        a["rule"] == "expired_token_use" && a["session"]["id"] == format!("{seen_in}-expired")
    });
    assert!(alert["summary"].as_str().unwrap().contains("expired"), "{alert}");
    assert!(alert["credential"]["jwt"]["exp"].as_i64().is_some());
    t.assert_never_output(&expired);
}

#[test]
fn tokens_over_tls_in_session_outside_and_after_the_end() {
    let t = Creds::start("cred-tls", &[]);
    let server = tls_server(&t.agent.dir);
    let token = jwt(3600, "tls");
    wire_scenario(&t, &format!("https://127.0.0.2:{}/refunds/4711?access_token=x", server.port), "https", &token);
    let alerts = t.alerts_of("token_outside_session");
    let alert = alerts.iter().find(|a| a["credential"]["seen_in"] != "env").unwrap();
    assert_eq!(
        alert["credential"]["request"],
        format!("GET https://127.0.0.2:{}/refunds/4711", server.port),
        "method, host and path, without the query string"
    );
    // The socket's peer, paired with the TLS write in the kernel.
    if t.agent.names_tls_peers() {
        assert_eq!(alert["network"]["dst_ip"], "127.0.0.2", "{alert}");
        assert_eq!(alert["network"]["dst_port"], server.port);
    }
    t.assert_never_output(&token);
}

#[test]
fn tokens_over_plaintext_http_in_session_outside_and_after_the_end() {
    let t = Creds::start("cred-http", &[]);
    let server = http_server(&t.agent.dir);
    let token = jwt(3600, "http");
    wire_scenario(&t, &format!("http://127.0.0.3:{}/refunds", server.port), "http", &token);
    let alerts = t.alerts_of("token_outside_session");
    let alert = alerts.iter().find(|a| a["credential"]["seen_in"] != "env").unwrap();
    assert_eq!(alert["network"]["dst_ip"], "127.0.0.3");
    assert_eq!(alert["network"]["dst_port"], server.port);
    t.assert_never_output(&token);
}

#[test]
fn watched_credential_files_read_directly_relatively_and_through_a_symlink() {
    let scratch = Scratch::new("cred-files-data");
    let secrets = scratch.path("secrets");
    fs::create_dir_all(&secrets).unwrap();
    let granted = secrets.join("granted.token");
    let other = secrets.join("other.token");
    fs::write(&granted, "granted-value\n").unwrap();
    fs::write(&other, "other-value\n").unwrap();
    let link = scratch.path("innocent-looking-link");
    std::os::unix::fs::symlink(&other, &link).unwrap();
    // Folding off: each of the three reads of one file is looked for as an alert of its own
    // (folded, they are one finding: tests/tests/alerts.rs).
    let policy = scratch.write(
        "policy.yaml",
        &format!("credentials:\n  watch: [\"{}\"]\nalerts:\n  fold_window: 0s\n", secrets.display()),
    );
    let t = Creds::start("cred-files", &["--policy", policy.to_str().unwrap()]);

    let session = session_file(
        &t.agent.dir,
        "files-1",
        &format!("grace: 1s\nscope:\n  credentials: [\"{}\"]\n", granted.display()),
    );
    let script = format!(
        "cat {granted} > /dev/null; cat {other} > /dev/null; cd {dir} && cat ./other.token > /dev/null; cat {link} > /dev/null",
        granted = granted.display(),
        other = other.display(),
        dir = secrets.display(),
        link = link.display()
    );
    let o = t.run_session(&session, &script, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let wanted = [other.display().to_string(), "./other.token".to_string(), link.display().to_string()];
    for arg in &wanted {
        let alert = t.agent.wait_alert(&format!("credential_out_of_scope for `cat {arg}`"), |a| {
            a["rule"] == "credential_out_of_scope"
                && a["process"]["argv"].as_array().is_some_and(|v| v.last() == Some(&json!(arg)))
        });
        assert_eq!(alert["credential"]["path"], other.display().to_string(), "reported under the watched path");
        assert_eq!(alert["credential"]["kind"], "file");
        assert_eq!(alert["session"]["id"], "files-1");
    }
    // The granted file was opened (the event is there) and raised nothing.
    t.agent.wait_event("the open of the granted file", |e| {
        e["type"] == "credential_open" && e["path"] == granted.display().to_string() && e["session"] != 0
    });
    assert_eq!(t.alerts_of("credential_out_of_scope").len(), 3, "{}", t.agent.diagnostics());
    // Outside sessions, a read is an event only.
    let o = t.sh(&format!("cat {} > /dev/null", other.display()), &[]);
    assert!(o.status.success());
    t.agent.wait_event("an open outside sessions", |e| e["type"] == "credential_open" && e["session"] == 0);
    assert_eq!(t.alerts_of("credential_out_of_scope").len(), 3);
}

/// Credential files are watched through fanotify, which names only the reading process: the
/// agent finds its session. Here a shell joins a session's bound cgroup and reads the file with a
/// builtin (no fork, no exec), so only its cgroup says which session it is in.
#[test]
fn a_credential_read_by_a_process_that_joined_a_bound_cgroup_is_its_sessions() {
    let scratch = Scratch::new("cred-cgroup-data");
    let secret = scratch.path("db.password");
    fs::write(&secret, "not-a-real-password\n").unwrap();
    let policy = scratch.write("policy.yaml", &format!("credentials:\n  watch: [\"{}\"]\n", secret.display()));
    let t = Creds::start("cred-cgroup", &["--policy", policy.to_str().unwrap()]);
    let bound = TestCgroup::new("cred-bound");
    let session = session_file(&t.agent.dir, "pod-cred", "grace: 1s\n");
    let o =
        t.agent.cli(&["session", "start", "--file", session.to_str().unwrap(), "--cgroup", bound.0.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));

    let script = format!("echo $$ > {}; read line < {}; exec sleep 30", bound.procs().display(), secret.display());
    let mut member = Command::new("/bin/sh").args(["-c", &script]).spawn().unwrap();
    let alert = t.agent.wait_alert("credential_out_of_scope by the cgroup member", |a| {
        a["rule"] == "credential_out_of_scope" && a["process"]["pid"] == member.id()
    });
    assert_eq!(alert["session"]["id"], "pod-cred");
    assert_eq!(alert["credential"]["path"], secret.display().to_string());
    let _ = member.kill();
    let _ = member.wait();
}

#[test]
fn a_token_in_the_environment_of_a_detached_child_that_execs_after_the_end() {
    let t = Creds::start("cred-env", &[]);
    let token = jwt(3600, "env");
    let session = session_file(&t.agent.dir, "env-1", SESSION);
    let marker = t.agent.dir.path("late-exec-done");
    // The child leaves the task's process group and session, outlives the task, then execs a
    // program that exits at once; the token is still in its environment.
    let script = format!("setsid /bin/sh -c 'sleep 2; /bin/true; touch {}' > /dev/null 2>&1 &", marker.display());
    let o = t.run_session(&session, &script, &[("BOT_TOKEN", &token)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let alert = t.agent.wait_alert("token_after_task_end through the environment", |a| {
        a["rule"] == "token_after_task_end" && a["credential"]["seen_in"] == "env" && a["process"]["exe"] == "/bin/true"
    });
    assert_eq!(alert["credential"]["carrier"], "BOT_TOKEN");
    assert_eq!(alert["credential"]["kind"], "env");
    assert_eq!(alert["session"]["id"], "env-1");
    // While the task was active, execs with the token were only observed.
    t.agent.wait_event("an env token use during the task", |e| e["type"] == "token_use" && e["via"] == "env");
    wait_for("the late exec", || marker.exists().then_some(()), || t.agent.diagnostics());
    assert!(t.alerts_of("token_outside_session").is_empty());

    // The same token in a process outside the session while another session holding it is
    // active: token_outside_session, caught in a process that exits at once.
    let active = session_file(&t.agent.dir, "env-2", SESSION);
    let (started, done) = (t.agent.dir.path("env2-started"), t.agent.dir.path("env2-done"));
    let mut root = t.spawn_session(
        &active,
        &format!("touch {}; while [ ! -f {} ]; do sleep 0.05; done", started.display(), done.display()),
        &[("BOT_TOKEN", &token)],
    );
    wait_for("session env-2 running", || started.exists().then_some(()), || t.agent.diagnostics());
    // In a Unix session of its own (setsid): not the launcher's, whose processes held the token
    // before the task (engine/credentials.rs). It exits at once: the kernel says which session
    // it was in at the exec, /proc could not any more.
    let o = Command::new("setsid").env("COPIED", &token).arg("/bin/true").output().unwrap();
    assert!(o.status.success());
    let alert = t.agent.wait_alert("token_outside_session through the environment", |a| {
        a["rule"] == "token_outside_session" && a["credential"]["carrier"] == "COPIED"
    });
    assert_eq!(alert["session"]["id"], "env-2");

    // An environment longer than the kernel scans: the token past it is not seen, and the agent
    // says so instead of staying silent.
    let padding = "x".repeat(9 * 1024);
    let o = Command::new("/bin/true").env("PADDING", &padding).env("LATE_COPY", &token).output().unwrap();
    assert!(o.status.success());
    let blind = t.agent.wait_alert("monitor_blind for the environment past the scan", |a| {
        a["rule"] == "monitor_blind" && a["summary"].as_str().unwrap_or("").contains("8 KiB scanned")
    });
    assert_eq!(blind["severity"], "high", "{blind}");
    fs::write(&done, "").unwrap();
    assert!(root.wait().unwrap().success());
    t.assert_never_output(&token);
}

/// `/bin/true ARGS` in a Unix session of its own (not the launcher's, whose processes are
/// excused): a process outside every session that exits at once.
fn true_in_own_unix_session(args: &[&str]) {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new("/bin/true");
    command.args(args);
    // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    assert!(command.status().unwrap().success());
}

#[test]
fn a_token_on_the_command_line_of_a_process_outside_sessions() {
    let t = Creds::start("cred-argv", &[]);
    let token = jwt(3600, "argv");
    let session = session_file(&t.agent.dir, "argv-1", SESSION);
    let (started, done) = (t.agent.dir.path("argv-started"), t.agent.dir.path("argv-done"));
    let mut root = t.spawn_session(
        &session,
        &format!("touch {}; while [ ! -f {} ]; do sleep 0.05; done", started.display(), done.display()),
        &[("BOT_TOKEN", &token)],
    );
    wait_for("session argv-1 running", || started.exists().then_some(()), || t.agent.diagnostics());

    // While the task runs, a process outside it has the token in a header on its command line:
    // the kernel looks at the words of the command line of a process that exits at once.
    let header = format!("Authorization: Bearer {token}");
    true_in_own_unix_session(&["-s", "-H", &header]);
    let alert = t.agent.wait_alert("token_outside_session on the command line", |a| {
        a["rule"] == "token_outside_session" && a["credential"]["seen_in"] == "argv"
    });
    assert_eq!(alert["session"]["id"], "argv-1");
    assert_eq!(alert["credential"]["carrier"], "argv[3]", "{alert}");
    assert!(alert["credential"]["fingerprint"].as_str().unwrap().starts_with("hmac-sha256:"));
    assert_eq!(alert["process"]["in_session"], false);
    assert!(alert["summary"].as_str().unwrap().contains("on the command line (argument 3)"), "{alert}");

    // After the task (and its grace): token_after_task_end, for a word of a URL this time.
    fs::write(&done, "").unwrap();
    assert!(root.wait().unwrap().success());
    let url = format!("https://bot:{token}@127.0.0.2:9/?x=1");
    let after = wait_for(
        "token_after_task_end on the command line",
        || {
            // Until the grace has run out, a use is still inside the task's authority.
            true_in_own_unix_session(&[&url]);
            t.alerts_of("token_after_task_end").into_iter().find(|a| a["credential"]["seen_in"] == "argv")
        },
        || t.agent.diagnostics(),
    );
    assert_eq!(after["session"]["id"], "argv-1");
    assert_eq!(after["session"]["state"], "ended");
    assert_eq!(after["credential"]["carrier"], "argv[1]", "{after}");
    t.assert_never_output(&token);
}

/// Drops root to `nobody` keeping the saved uid, then takes root back (setuid family to uid 0).
const SETUID_BACK_TO_ROOT: &str = r#"
import os
os.setresuid(65534, 65534, 0)
os.setresuid(0, 0, 0)
"#;

/// Run as `nobody` from an image whose file capabilities grant CAP_NET_RAW as permitted only (not
/// effective): raises it into the effective set with capset, then uses it. Restoring what the
/// image was given at exec is not an escalation; this is.
const CAPSET_RAISE: &str = r#"
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
header, data = Header(0x20080522, 0), (Data * 2)()
assert libc.capget(ctypes.byref(header), data) == 0
assert data[0].effective == 0 and data[0].permitted == 1 << 13, (data[0].effective, data[0].permitted)
data[0].effective = data[0].permitted
assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
# Use it: a raw socket (nothing is sent).
import socket
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
"#;

/// A copy of python3 with the file capability `cap_net_raw=p` (a VFS_CAP_REVISION_2 xattr).
fn python_with_permitted_net_raw(dir: &Scratch) -> std::path::PathBuf {
    let python = dir.path("python3-netraw");
    let real = fs::canonicalize("/usr/bin/python3").unwrap();
    fs::copy(real, &python).unwrap();
    let set = format!(
        "import os, struct; os.setxattr('{}', 'security.capability', struct.pack('<IIIII', 0x02000000, 1 << 13, 0, 0, 0))",
        python.display()
    );
    let o = Command::new("python3").args(["-c", &set]).output().unwrap();
    assert!(o.status.success(), "setting file capabilities: {}", stderr(&o));
    python
}

/// Probes the agent holds attached, each a BPF link descriptor it keeps open.

/// The plaintext payload hook runs for every packet the host sends, so it is attached only once
/// a session holds a token: a session without tokens brings in only the session-time probes
/// (DNS answers, capability checks, getaddrinfo, the TLS libraries), one with a token the
/// plaintext hook too. Asked from inside each session's task, so while it runs.
#[test]
fn plaintext_capture_is_attached_only_once_a_session_holds_a_token() {
    let t = Creds::start("cred-token-time", &[]);
    let idle = t.agent.attached_probes();
    // Where this kernel lacks one, its stand-in (the capability kprobe before 6.14).
    let [tcp_egress, cap_capable] = ["tcp_egress", "cap_capable"].map(|p| t.agent.doing(p));
    for on_demand in [&tcp_egress, "dns_ingress", &cap_capable, "getaddrinfo_enter", "ssl_write"] {
        assert!(!idle.contains(on_demand), "{on_demand} attached with no session: {idle:?}");
    }
    let data = Scratch::new("cred-token-time-data");
    let attached_while = |id: &str, extra: &str, env: &[(&str, &str)]| {
        let session = session_file(&t.agent.dir, id, extra);
        let out = data.path(&format!("{id}.probes"));
        let script = format!("{} probes --json > {}", monitor_tests::monitor_bin().display(), out.display());
        let o = t.run_session(&session, &script, env);
        assert!(o.status.success(), "{}", stderr(&o));
        attached_names(&programs_from_json(&fs::read_to_string(&out).unwrap()))
    };
    let no_tokens = attached_while("no-tokens-1", "grace: 1s\n", &[]);
    let session_time =
        ["dns_ingress", &cap_capable, "getaddrinfo_enter", "getaddrinfo_exit", "ssl_write", "ssl_write_ex"];
    for probe in session_time {
        assert!(no_tokens.contains(probe), "{probe} not attached while a session runs: {no_tokens:?}");
    }
    assert!(!no_tokens.contains(&tcp_egress), "no token: the plaintext hook stays detached");
    let token = "t0k3n-for-the-plaintext-hook-4f9a2c";
    let with_token = attached_while("with-token-1", SESSION, &[("BOT_TOKEN", token)]);
    assert!(with_token.contains(&tcp_egress), "a session token attaches the plaintext hook: {with_token:?}");
}

/// The opt-in privilege-change syscall tracepoints slow every syscall on the host, so even when
/// enabled they are attached only while a process or cgroup is bound to a session, with the
/// other session-time probes, and detached once its processes are gone.
#[test]
fn privilege_change_syscall_probes_are_attached_only_while_sessions_run() {
    let mut args = Vec::new();
    let syscall_probes = ["sys_exit_setuid", "sys_exit_setreuid", "sys_exit_setresuid", "sys_exit_capset"];
    for probe in syscall_probes {
        args.extend(["--enable-probe", probe]);
    }
    let t = Creds::start("cred-ondemand", &args);
    let idle = t.agent.attached_probes();
    assert!(syscall_probes.iter().all(|p| !idle.contains(*p)), "{idle:?}");
    let session = session_file(&t.agent.dir, "ondemand-1", "grace: 1s\n");
    let data = Scratch::new("cred-ondemand-data");
    let done = data.path("done");
    let script = format!("while [ ! -e {} ]; do sleep 0.05; done", done.display());
    let mut task = t.spawn_session(&session, &script, &[]);
    let running = wait_for(
        "the privilege-change probes attached",
        || Some(t.agent.attached_probes()).filter(|a| syscall_probes.iter().all(|p| a.contains(*p))),
        || format!("{:?}\n{}", t.agent.attached_probes(), t.agent.diagnostics()),
    );
    assert!(running.contains(&t.agent.doing("cap_capable")), "{running:?}");
    fs::write(&done, "").unwrap();
    assert!(task.wait().unwrap().success());
    wait_for(
        "every session-time probe detached",
        || (t.agent.attached_probes() == idle).then_some(()),
        || format!("{:?}, {idle:?} idle\n{}", t.agent.attached_probes(), t.agent.diagnostics()),
    );
}

#[test]
fn setuid_family_and_capset_raising_privileges_in_a_session() {
    let t = Creds::start("cred-priv", &[]);
    // Beside the agent's directory, which is root-only: `nobody` reads these.
    let data = Scratch::new("cred-priv-data");
    let setuid = data.write("setuid.py", SETUID_BACK_TO_ROOT);
    let capset = data.script("capset.py", CAPSET_RAISE);
    let python = python_with_permitted_net_raw(&data);
    let session = session_file(&t.agent.dir, "priv-1", "grace: 1s\n");
    let script = format!(
        "python3 {} && setpriv --reuid=65534 --regid=65534 --clear-groups -- {} {}",
        setuid.display(),
        python.display(),
        capset.display()
    );
    let o = t.run_session(&session, &script, &[]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let setuid = t.agent.wait_alert("privilege_escalation by setresuid", |a| {
        a["rule"] == "privilege_escalation" && a["summary"].as_str().unwrap_or("").contains("root (euid 65534 -> 0)")
    });
    assert_eq!(setuid["session"]["id"], "priv-1");
    let capset = t.agent.wait_alert("privilege_escalation by capset", |a| {
        a["rule"] == "privilege_escalation"
            && a["summary"].as_str().unwrap_or("").contains("raised the effective capabilities")
    });
    assert!(capset["summary"].as_str().unwrap().contains("gained 0x2000"), "{capset}");
    assert_eq!(capset["process"]["uid"], 65534);
    // setpriv's own drop and restore of its capabilities is not an escalation.
    assert_eq!(t.alerts_of("privilege_escalation").len(), 2, "{}", t.agent.diagnostics());
}

/// A plaintext HTTP/1.1 server that keeps connections open (Python's http.server speaks 1.0 and
/// closes each): `keepalive_server.py ADDR PORT`.
const KEEPALIVE_SERVER: &str = r#"
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *args):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"#;

/// The keep-alive server on 127.0.0.3, and its port.
fn keepalive_server(dir: &Scratch) -> (Server, u16) {
    let port = free_port_on("127.0.0.3");
    let mut cmd = Command::new("python3");
    cmd.arg(dir.write("keepalive_server.py", KEEPALIVE_SERVER)).arg("127.0.0.3").arg(port.to_string());
    (Server::spawn(dir, "keepalive.log", cmd, "127.0.0.3", port), port)
}

/// A keep-alive client: eight requests on one connection, the token only in the last
/// (`keepalive_client.py HOST PORT TOKEN_FILE`).
const KEEPALIVE_CLIENT: &str = r#"
import http.client, sys
connection = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]))
token = open(sys.argv[3]).read().strip()
for i in range(8):
    headers = {"Authorization": "Bearer " + token} if i == 7 else {}
    connection.request("GET", "/refunds/%d" % i, headers=headers)
    connection.getresponse().read()
"#;

/// The token in the eighth request of a keep-alive connection (plaintext HTTP/1.1), sent after
/// the task ended: every request of the connection is looked at, not only its first segments.
#[test]
fn a_token_in_a_later_request_of_a_keep_alive_connection() {
    let t = Creds::start("cred-keepalive", &[]);
    let dir = &t.agent.dir;
    let (_server, port) = keepalive_server(dir);
    let client = dir.write("keepalive_client.py", KEEPALIVE_CLIENT);
    let token = jwt(3600, "keepalive");
    let token_file = dir.write("keepalive.token", &format!("{token}\n"));
    // The client reads a copy (a file the session does not declare, so not watched): the wire is
    // where the token is seen.
    let copy = dir.write("keepalive.copy", &format!("{token}\n"));
    let session = session_file(dir, "keepalive", &format!("grace: 1s\ntokens:\n  - file: {}\n", token_file.display()));
    let script =
        format!("(sleep 2; python3 {} 127.0.0.3 {port} {}) > /dev/null 2>&1 &", client.display(), copy.display());
    let o = t.run_session(&session, &script, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let alert = t.agent.wait_alert("token_after_task_end from the eighth request", |a| {
        a["rule"] == "token_after_task_end" && a["session"]["id"] == "keepalive" && a["credential"]["seen_in"] == "http"
    });
    assert_eq!(alert["credential"]["request"], format!("GET http://127.0.0.3:{port}/refunds/7"));
    assert_eq!(alert["network"]["dst_port"], port);
    t.assert_never_output(&token);
}

/// A client that sends the token in the query string or as a cookie
/// (`query_or_cookie.py query|cookie HOST PORT TOKEN_FILE`).
const QUERY_OR_COOKIE_CLIENT: &str = r#"
import http.client, sys, urllib.parse
mode, host, port, token = sys.argv[1], sys.argv[2], int(sys.argv[3]), open(sys.argv[4]).read().strip()
connection = http.client.HTTPConnection(host, port)
if mode == "query":
    connection.request("GET", "/export?format=csv&access_token=" + urllib.parse.quote(token, safe=""))
else:
    connection.request("GET", "/export", headers={"Cookie": "theme=dark; session=" + token})
connection.getresponse().read()
"#;

/// After the task ended, one job sends its session's token as `?access_token=` (percent-encoded),
/// another its session's token as a cookie: each is token_after_task_end, with the kind and
/// where in the request it was.
#[test]
fn tokens_in_the_query_string_and_in_a_cookie_after_the_end() {
    let t = Creds::start("cred-query-cookie", &[]);
    let dir = &t.agent.dir;
    let (_server, port) = keepalive_server(dir);
    let client = dir.write("query_or_cookie.py", QUERY_OR_COOKIE_CLIENT);
    for (mode, kind, header) in [("query", "query", "?access_token"), ("cookie", "cookie", "cookie")] {
        // A token with characters a URL must encode: the agent decodes it before fingerprinting.
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let token = format!("tok/{mode}+{nonce:x}{}=", std::process::id());
        let declared = dir.write(&format!("{mode}.token"), &format!("{token}\n"));
        let copy = dir.write(&format!("{mode}.copy"), &format!("{token}\n"));
        let id = format!("sent-as-{mode}");
        let session = session_file(dir, &id, &format!("grace: 1s\ntokens:\n  - file: {}\n", declared.display()));
        let script = format!(
            "(sleep 2; python3 {} {mode} 127.0.0.3 {port} {}) > /dev/null 2>&1 &",
            client.display(),
            copy.display()
        );
        let o = t.run_session(&session, &script, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let alert = t.agent.wait_alert(&format!("token_after_task_end for the token sent as {mode}"), |a| {
            a["rule"] == "token_after_task_end" && a["session"]["id"] == id && a["credential"]["seen_in"] == "http"
        });
        assert_eq!(alert["credential"]["kind"], kind, "{alert}");
        assert_eq!(alert["credential"]["carrier"], header, "{alert}");
        assert_eq!(alert["credential"]["request"], format!("GET http://127.0.0.3:{port}/export"));
        t.assert_never_output(&token);
        t.assert_never_output(&token.replace('/', "%2F").replace('+', "%2B").replace('=', "%3D"));
    }
}

/// A declared token the agent cannot know (an unset variable, a token file it cannot read) is
/// said where the operator started the session, and in the agent's log: its uses would go
/// unrecognised. The task still runs.
#[test]
fn a_declared_token_that_cannot_be_known_is_warned_about_at_start() {
    let t = Creds::start("cred-unknown-token", &[]);
    let dir = &t.agent.dir;
    let missing = dir.path("no-such.token");
    let session = session_file(
        dir,
        "unknown-token",
        &format!("grace: 1s\ntokens:\n  - env: NOT_SET_TOKEN\n  - file: {}\n", missing.display()),
    );
    let o = t.run_session(&session, "exit 0", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("monitor run: warning: token env:NOT_SET_TOKEN: the variable is not set"), "{err}");
    let file_warning = format!("monitor run: warning: token file:{}: the agent cannot read it", missing.display());
    assert!(err.contains(&file_warning), "{err}");
    let log = fs::read_to_string(&t.agent.log).unwrap();
    assert!(log.contains("token env:NOT_SET_TOKEN") && log.contains("WARN"), "{log}");
}

/// A projected token rotated as the kubelet rotates one: the session declares DIR/token, a
/// symlink to ..data/token, where ..data is a symlink to a timestamped directory; the kubelet
/// writes a new directory and swaps ..data. The new value is the session's too: a job that uses
/// it after the end raises token_after_task_end for it.
#[test]
fn a_rotated_token_file_is_followed() {
    use std::os::unix::fs::symlink;
    let t = Creds::start("cred-rotation", &[]);
    let dir = &t.agent.dir;
    let (_server, port) = keepalive_server(dir);
    let client = dir.write("keepalive_client.py", KEEPALIVE_CLIENT);
    let projected = dir.path("projected");
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let (first, second) = (format!("sa-token-1-{nonce:x}"), format!("sa-token-2-{nonce:x}"));
    fs::create_dir_all(projected.join("..2026_12_06_v1")).unwrap();
    fs::write(projected.join("..2026_12_06_v1/token"), &first).unwrap();
    symlink("..2026_12_06_v1", projected.join("..data")).unwrap();
    symlink("..data/token", projected.join("token")).unwrap();
    let session =
        session_file(dir, "rotated", &format!("grace: 1s\ntokens:\n  - file: {}\n", projected.join("token").display()));
    let (go, copy) = (dir.path("go"), dir.path("rotated.copy"));
    let script = format!(
        "(while [ ! -f {go} ]; do sleep 0.05; done; python3 {} 127.0.0.3 {port} {}) > /dev/null 2>&1 &",
        client.display(),
        copy.display(),
        go = go.display()
    );
    let o = t.run_session(&session, &script, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The kubelet's rotation: a new directory, then ..data swapped to it in one rename.
    fs::create_dir_all(projected.join("..2026_12_06_v2")).unwrap();
    fs::write(projected.join("..2026_12_06_v2/token"), &second).unwrap();
    symlink("..2026_12_06_v2", projected.join("..data_tmp")).unwrap();
    fs::rename(projected.join("..data_tmp"), projected.join("..data")).unwrap();
    let rotated = t.agent.wait_event("the rotation seen", |e| e["type"] == "token_rotated");
    assert_eq!(rotated["source"], format!("file:{}", projected.join("token").display()));
    // The job uses the new token after the end.
    fs::write(&copy, &second).unwrap();
    fs::write(&go, "").unwrap();
    let alert = t.agent.wait_alert("token_after_task_end for the rotated token", |a| {
        a["rule"] == "token_after_task_end" && a["session"]["id"] == "rotated" && a["credential"]["seen_in"] == "http"
    });
    assert_eq!(alert["credential"]["fingerprint"], rotated["fingerprint"], "{alert}");
    t.assert_never_output(&first);
    t.assert_never_output(&second);
}
