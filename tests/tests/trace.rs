//! Session traces on the real kernel: a live session with violations is recorded by the agent,
//! then `monitor replay` must reproduce exactly the alerts raised live, show the delegation and
//! timeline, answer what-if questions with another policy, survive a damaged trace, and render
//! an HTML report that headless Chromium shows with the session and its alerts. Traffic goes to
//! 127.0.0.0/8 only.

use std::{
    fs,
    path::Path,
    process::{Command, Output},
};

use monitor_tests::{peers::Collector, *};
use serde_json::Value;

fn replay(args: &[&str]) -> Output {
    Command::new(monitor_bin()).arg("replay").args(args).env("MONITOR_LOG", "warn").output().unwrap()
}

/// The alert identity replay compares on: ids and wall-clock stamps aside.
fn key(a: &Value) -> (String, String, String, u64, String) {
    (
        a["rule"].as_str().unwrap().to_string(),
        a["time"].as_str().unwrap().to_string(),
        a["session"]["id"].as_str().unwrap().to_string(),
        a["process"]["pid"].as_u64().unwrap_or(0),
        a["summary"].as_str().unwrap().to_string(),
    )
}

struct Recorded {
    traces: Scratch,
    live: Vec<Value>,
}

/// Runs a session with an out-of-scope connect, an out-of-scope exec and a process that
/// outlives the task, under an agent recording traces; stops the agent.
fn record_session() -> Recorded {
    record_session_with(&[])
}

fn record_session_with(extra: &[&str]) -> Recorded {
    let traces = Scratch::new("trace-dir");
    let cg = TestCgroup::new("trace");
    let trace_dir = traces.path("traces");
    let mut args = vec![
        "--cgroup",
        cg.0.to_str().unwrap(),
        "--trace-dir",
        trace_dir.to_str().unwrap(),
        "--trace-segment-size",
        "4K",
    ];
    args.extend_from_slice(extra);
    let mut agent = Agent::start_with("trace", &args);
    let allowed = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let denied = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
    let (ok_port, bad_port) = (allowed.local_addr().unwrap().port(), denied.local_addr().unwrap().port());
    let session = session_file(
        &agent.dir,
        "trace-1",
        &format!(
            "grace: 1s\nscope:\n  connect: [\"127.0.0.2:{ok_port}\"]\n  exec: [\"/bin/sh\", \"/usr/bin/python3\", \"/usr/bin/sleep\"]\n"
        ),
    );
    let connect = |port: u16, host: &str| {
        format!("/usr/bin/python3 -c 'import socket; socket.create_connection((\"{host}\", {port})).close()'")
    };
    let task = traces.script(
        "task.sh",
        &format!(
            "{}\n{}\n/usr/bin/id > /dev/null\nsleep 3 &\n",
            connect(ok_port, "127.0.0.2"),
            connect(bad_port, "127.0.0.3")
        ),
    );
    let line = format!(
        "{} {} run --file {} -- /bin/sh {}",
        cg.enter(),
        monitor_bin().display(),
        session.display(),
        task.display()
    );
    let o = Command::new("/bin/sh").args(["-c", &line]).env("MONITOR_CONTROL", &agent.control).output().unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    for rule in ["out_of_scope_connect", "exec_out_of_scope", "process_outlived_task"] {
        agent.wait_alert(rule, |a| a["rule"] == rule && a["session"]["id"] == "trace-1");
    }
    agent.stop();
    let live = agent.alerts();
    assert!(live.len() >= 3, "{}", agent.diagnostics());
    // Keep the agent's files (its directory goes with it) by copying what the checks need.
    Recorded { traces, live }
}

#[test]
fn replay_reproduces_live_alerts_and_shows_the_session() {
    let rec = record_session();
    let dir = rec.traces.path("traces");
    let segments: Vec<_> = fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).collect();
    assert!(
        segments.iter().filter(|p| p.extension().is_some_and(|x| x == "mtr")).count() > 1,
        "4K segments rotate: {segments:?}"
    );
    assert!(segments.iter().any(|p| p.to_string_lossy().ends_with(".idx.json")), "sealed segments are indexed");

    // Determinism: the same alerts as live, ids and wall times aside.
    let o = replay(&[dir.to_str().unwrap(), "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["comparison"]["only_live"], serde_json::json!([]), "{}", report["comparison"]);
    assert_eq!(report["comparison"]["only_replayed"], serde_json::json!([]));
    let mut replayed: Vec<_> = report["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["alerts"].as_array().unwrap().iter().map(key))
        .collect();
    let mut live: Vec<_> = rec.live.iter().map(key).collect();
    replayed.sort();
    live.sort();
    assert_eq!(replayed, live);
    let session = &report["sessions"][0];
    assert_eq!(session["session"]["principal"], "alice@example.com");
    assert!(session["processes"].as_array().unwrap().len() >= 4, "{}", session["processes"]);
    let whats: Vec<&str> =
        session["timeline"].as_array().unwrap().iter().map(|e| e["what"].as_str().unwrap()).collect();
    for what in ["session", "exec", "connect", "exit"] {
        assert!(whats.contains(&what), "{what} missing from the timeline: {whats:?}");
    }

    // The terminal timeline of one session: the delegation on top, alerts marked.
    let o = replay(&[dir.to_str().unwrap(), "--session", "trace-1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("delegation  alice@example.com → svc:test-bot"), "{text}");
    for rule in ["!! out_of_scope_connect", "!! exec_out_of_scope", "!! process_outlived_task"] {
        assert!(text.contains(rule), "{rule} not in:\n{text}");
    }
    assert!(text.contains("the same as the"), "{text}");

    // OCSF findings, one per alert.
    let o = replay(&[dir.to_str().unwrap(), "--format", "ocsf"]);
    let findings: Vec<Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(findings.len(), rec.live.len());
    assert!(findings.iter().all(|f| f["class_uid"] == 2004 && f["finding_info"]["uid"].is_string()));

    // A session that is not there: say so, and name the ones that are.
    let o = replay(&[dir.to_str().unwrap(), "--session", "no-such-session"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no session no-such-session in the trace; sessions in it: trace-1"), "{}", stderr(&o));
}

#[test]
fn what_if_policy_shows_alerts_that_appear_and_disappear() {
    let rec = record_session();
    let dir = rec.traces.path("traces");
    // The actor may connect anywhere on 127.0.0.3, and may no longer run sleep.
    let policy = rec.traces.write(
        "what-if.yaml",
        "actors:\n  \"svc:test-bot\":\n    connect: [\"127.0.0.0/8:*\"]\n    exec: [\"/bin/sh\", \"/usr/bin/python3\", \"/usr/bin/id\"]\n",
    );
    let o = replay(&[dir.to_str().unwrap(), "--policy", policy.to_str().unwrap(), "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    let rules = |list: &Value| -> Vec<String> {
        let mut v: Vec<String> =
            list.as_array().unwrap().iter().map(|k| k["rule"].as_str().unwrap().to_string()).collect();
        v.sort();
        v.dedup();
        v
    };
    assert_eq!(report["comparison"]["what_if"], true);
    assert_eq!(rules(&report["comparison"]["only_live"]), ["exec_out_of_scope", "out_of_scope_connect"]);
    assert_eq!(rules(&report["comparison"]["only_replayed"]), ["exec_out_of_scope"]);
    let o = replay(&[dir.to_str().unwrap(), "--policy", policy.to_str().unwrap()]);
    let text = stdout(&o);
    assert!(text.contains("- disappears") && text.contains("+ appears"), "{text}");
}

#[test]
fn damaged_traces_are_reported_and_read_past() {
    let rec = record_session();
    let dir = rec.traces.path("traces");
    let mut segments: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "mtr"))
        .collect();
    segments.sort();
    let first = fs::read(&segments[0]).unwrap();
    assert!(first.len() > 600, "a segment of {} bytes", first.len());
    let damaged = rec.traces.path("damaged.mtr");
    let mut bytes = first.clone();
    for b in &mut bytes[200..260] {
        *b ^= 0x5a;
    }
    fs::write(&damaged, &bytes).unwrap();
    let o = replay(&[damaged.to_str().unwrap(), "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("damaged.mtr: bad frame at offset"), "{err}");
    assert!(err.contains("resumed at offset"), "{err}");
    let report: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["events"].as_u64().unwrap() > 0, "frames after the damage were read");

    let cut = rec.traces.path("cut.mtr");
    fs::write(&cut, &first[..first.len() - 7]).unwrap();
    let o = replay(&[cut.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("frame cut short at the end of the file"), "{}", stderr(&o));

    let newer = rec.traces.path("newer.mtr");
    let mut bytes = first.clone();
    bytes[8] = 99;
    fs::write(&newer, &bytes).unwrap();
    let o = replay(&[newer.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("trace format version 99"), "{}", stderr(&o));
}

#[test]
fn html_report_opens_in_headless_chromium_with_the_session_and_its_alerts() {
    let rec = record_session();
    let dir = rec.traces.path("traces");
    let html = rec.traces.path("report.html");
    let o = replay(&[dir.to_str().unwrap(), "--session", "trace-1", "--format", "html", "-o", html.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let page = fs::read_to_string(&html).unwrap();
    assert!(!page.contains("http://") && !page.contains("https://"), "self-contained: no external resource");

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("target/test-artifacts");
    fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("replay-report.png");
    let _ = fs::remove_file(&screenshot);
    let profile = rec.traces.path("chromium-profile");
    let chromium = |extra: &[&str]| {
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,1600",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(format!("file://{}", html.display()))
            .output()
            .expect("chromium (Debian package chromium) must be installed: cargo xtask setup installs it")
    };
    let o = chromium(&[&format!("--screenshot={}", screenshot.display())]);
    assert!(screenshot.exists(), "no screenshot: {}", stderr(&o));
    assert!(fs::metadata(&screenshot).unwrap().len() > 10_000, "an empty page?");
    // What the browser rendered: the DOM after parsing.
    let o = chromium(&["--dump-dom"]);
    let dom = stdout(&o);
    assert!(dom.contains("Session trace-1"), "{dom}");
    assert!(dom.contains("alice@example.com"));
    for rule in ["out_of_scope_connect", "exec_out_of_scope", "process_outlived_task"] {
        assert!(dom.contains(rule), "{rule} not on the page");
    }
    assert!(dom.contains("class=\"alert\""), "alerts are highlighted");
}

#[test]
fn traces_forwarded_to_the_collector_replay_like_the_node_copy() {
    let central = Scratch::new("trace-collector");
    let collector = Collector::start(&central, &[]);
    let output = format!("forward://127.0.0.1:{}", collector.port);
    let spool = central.path("agent-spool");
    let rec = record_session_with(&["--trace-output", &output, "--spool-dir", spool.to_str().unwrap()]);
    let mut live: Vec<_> = rec.live.iter().map(key).collect();
    live.sort();
    // What the stopped agent had not delivered yet is in its spool: the next agent on this node
    // delivers it.
    let next_traces = rec.traces.path("next-traces");
    let _next = Agent::start_with(
        "trace-next",
        &[
            "--trace-dir",
            next_traces.to_str().unwrap(),
            "--trace-output",
            &output,
            "--spool-dir",
            spool.to_str().unwrap(),
        ],
    );
    let report = wait_for(
        "the forwarded trace replayed from the collector's store",
        || {
            let o = replay(&[collector.store.to_str().unwrap(), "--session", "trace-1", "--format", "json"]);
            let report: Value = serde_json::from_slice(&o.stdout).ok()?;
            let mut replayed: Vec<_> = report["sessions"][0]["alerts"].as_array()?.iter().map(key).collect();
            replayed.sort();
            (replayed == live).then_some(report)
        },
        || collector.logs(),
    );
    assert_eq!(report["comparison"]["only_live"], serde_json::json!([]));
    assert_eq!(report["sessions"][0]["session"]["principal"], "alice@example.com");
}
