//! Alerts an analyst can act on (root, real kernel, deadlines, 127.0.0.1 only): a finding that
//! repeats is one alert and its updates, through the agent's outputs, the collector's store and
//! every SIEM sink (OCSF 1.8 validated against the schema); the launcher of a session is not an
//! outsider while the task is active; a cross-session use names both sessions.

use std::{collections::BTreeMap, fs, process::Command, time::Duration};

use monitor_tests::{
    most_alert_versions, peers::Collector, read_jsonl, session_file, stderr, stdout, timings_meaningful, wait_for,
    wait_for_within, wire::Creds, Agent, Scratch,
};
use serde_json::Value;

const SESSION: &str = "grace: 1s\ntokens:\n  - env: BOT_TOKEN\n";

fn random_token() -> String {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The latest count of each alert id among `alerts` of `rule`.
fn counts(alerts: &[Value], rule: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for a in alerts.iter().filter(|a| a["rule"] == rule) {
        let count = a["count"].as_u64().unwrap_or(0);
        let e = out.entry(a["id"].as_str().unwrap().to_string()).or_insert(0);
        *e = (*e).max(count);
    }
    out
}

/// The operator's shell (a terminal: a Unix session of its own) exports the token and runs the
/// task: while it is active, the commands it runs carry the token and raise nothing. After the
/// end, 50 execs carrying it are one token_after_task_end (past the grace period) whose update
/// counts them all, and so are 10 more run two subshells deep, whose parents the agent never saw
/// (processes outside sessions have no chain): the terminal's Unix session is their lineage.
#[test]
fn the_launcher_holds_the_token_and_a_flood_after_the_end_is_one_alert() {
    let t = Creds::start("alerts-launcher", &[]);
    let token = random_token();
    let session = session_file(&t.agent.dir, "launch-1", SESSION);
    let (started, done, during) =
        (t.agent.dir.path("task-started"), t.agent.dir.path("task-done"), t.agent.dir.path("during-done"));
    let monitor = monitor_tests::monitor_bin();
    let script = format!(
        "{monitor} run --file {session} -- /bin/sh -c \"touch {started}; while [ ! -f {done} ]; do sleep 0.05; done\" &
         while [ ! -f {started} ]; do sleep 0.05; done
         i=0; while [ $i -lt 20 ]; do /bin/true; i=$((i+1)); done
         touch {during}
         wait
         sleep 1.5
         i=0; while [ $i -lt 50 ]; do /bin/true; i=$((i+1)); done
         i=0; while [ $i -lt 5 ]; do ( ( /bin/true; /bin/true ); /bin/true ); i=$((i+1)); done",
        monitor = monitor.display(),
        session = session.display(),
        started = started.display(),
        done = done.display(),
        during = during.display(),
    );
    let mut terminal = t.command(&script, &[("BOT_TOKEN", &token)]);
    // SAFETY: setsid is async-signal-safe; the child only calls it before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut terminal, || match libc::setsid() {
            -1 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        });
    }
    let mut launcher = terminal.spawn().unwrap();
    wait_for("the launcher's commands during the task", || during.exists().then_some(()), || t.agent.diagnostics());
    // They were seen (token uses in the event log), and raised nothing.
    wait_for(
        "20 env token uses by the launcher's commands",
        || {
            let uses = t.agent.events().iter().filter(|e| e["type"] == "token_use" && e["via"] == "env").count();
            (uses >= 20).then_some(())
        },
        || t.agent.diagnostics(),
    );
    let flood = std::time::Instant::now();
    fs::write(&done, "").unwrap();
    assert!(launcher.wait().unwrap().success());
    assert!(t.alerts_of("token_outside_session").is_empty(), "{}", t.agent.diagnostics());

    let update = t.agent.wait_alert("token_after_task_end with count >= 65", |a| {
        a["rule"] == "token_after_task_end" && a["count"].as_u64().unwrap_or(0) >= 65
    });
    let all = t.agent.alerts();
    let ids = counts(&all, "token_after_task_end");
    assert_eq!(ids.len(), 1, "one finding, not one per exec: {ids:?}");
    let sent = all.iter().filter(|a| a["rule"] == "token_after_task_end").count();
    let most = most_alert_versions(flood.elapsed());
    assert!(sent <= most, "the first alert and few updates (at most {most}), not 50 alerts: {sent}");
    assert_eq!(update["session"]["id"], "launch-1");
    assert!(update["pids"].as_array().unwrap().len() >= 50);
    assert!(update["process"]["sid"].as_u64().is_some_and(|sid| sid > 1), "the terminal's Unix session: {update}");
    assert!(update["first_seen"].as_str().unwrap() < update["last_seen"].as_str().unwrap());
    t.assert_never_output(&token);
}

/// Session B's process uses session A's token: one alert, on A, naming B.
#[test]
fn a_token_of_one_session_used_in_another_names_both() {
    let t = Creds::start("alerts-cross", &[]);
    let token = random_token();
    let a = session_file(&t.agent.dir, "cross-a", SESSION);
    let (started, done) = (t.agent.dir.path("a-started"), t.agent.dir.path("a-done"));
    let mut root = t.spawn_session(
        &a,
        &format!("touch {}; while [ ! -f {} ]; do sleep 0.05; done", started.display(), done.display()),
        &[("BOT_TOKEN", &token)],
    );
    wait_for("session cross-a running", || started.exists().then_some(()), || t.agent.diagnostics());
    let b = t.agent.dir.write(
        "cross-b.yaml",
        "id: cross-b\nprincipal: bob@example.com\nactor: svc:other-bot\ntask: other task\nsponsor: qa-team\n",
    );
    // B's task got A's token (a copied file, a shared secret store) and runs a tool with it.
    let copied = t.agent.dir.write("copied-token", &token);
    let o = t.run_session(&b, &format!("SHARED=$(cat {}) /bin/sleep 0.2", copied.display()), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let alert = t.agent.wait_alert("token_outside_session naming both sessions", |a| {
        a["rule"] == "token_outside_session" && a["process"]["session"]["id"] == "cross-b"
    });
    assert_eq!(alert["session"]["id"], "cross-a");
    assert_eq!(alert["process"]["session"]["actor"], "svc:other-bot");
    assert_eq!(alert["process"]["session"]["principal"], "bob@example.com");
    let summary = alert["summary"].as_str().unwrap();
    assert!(summary.contains("session cross-b (actor svc:other-bot for bob@example.com)"), "{summary}");
    assert!(summary.contains("session cross-a's token"), "{summary}");
    assert!(!alert["process"]["chain"].as_array().unwrap().is_empty(), "the process's chain in B: {alert}");
    fs::write(&done, "").unwrap();
    assert!(root.wait().unwrap().success());
    t.assert_never_output(&token);
}

/// One finding repeated 30 times in a session: the agent sends it and an update (same id,
/// count 30); the collector stores each version once and every sink gets the update; OCSF is
/// an Update of the same finding, valid OCSF 1.8; `monitor alerts summary` counts it once.
#[test]
fn an_updated_alert_reaches_the_store_and_every_sink_once() {
    let dir = Scratch::new("alerts-update");
    let (jsonl, ocsf, cef) = (dir.path("sink.jsonl"), dir.path("sink-ocsf.jsonl"), dir.path("sink.cef"));
    let sinks =
        [format!("jsonl:{}", jsonl.display()), format!("ocsf:{}", ocsf.display()), format!("cef:{}", cef.display())];
    let mut args = vec![];
    for s in &sinks {
        args.extend(["--sink", s.as_str()]);
    }
    let collector = Collector::start(&dir, &args);
    let output = format!("forward://127.0.0.1:{}", collector.port);
    let spool = dir.path("spool");
    let agent =
        Agent::start_with("alerts-update-agent", &["--output", &output, "--spool-dir", spool.to_str().unwrap()]);
    let file = session_file(&agent.dir, "upd-1", "grace: 30s\nscope:\n  exec: [\"/bin/sh\", \"/usr/bin/dash\"]\n");
    let started = std::time::Instant::now();
    let o = agent.run(&file, &["/bin/sh", "-c", "i=0; while [ $i -lt 30 ]; do /bin/true; i=$((i+1)); done"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let update = agent.wait_alert("the update with count 30", |a| a["rule"] == "exec_out_of_scope" && a["count"] == 30);
    let id = update["id"].as_str().unwrap().to_string();
    assert_eq!(counts(&agent.alerts(), "exec_out_of_scope"), BTreeMap::from([(id.clone(), 30)]));

    let in_sink = wait_for(
        "the first alert and its update in the collector's jsonl sink",
        || Some(read_jsonl(&jsonl)).filter(|l| l.iter().any(|a| a["id"] == id.as_str() && a["count"] == 30)),
        || collector.logs(),
    );
    let versions: Vec<u64> =
        in_sink.iter().filter(|a| a["id"] == id.as_str()).map(|a| a["count"].as_u64().unwrap()).collect();
    // The first at once; updates a few seconds apart (one here, unless the 30 execs take longer).
    assert_eq!(versions.first(), Some(&1), "the first alert first: {versions:?}");
    assert_eq!(versions.last(), Some(&30), "the last update last: {versions:?}");
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "each version once, in order: {versions:?}");
    assert!(versions.len() <= most_alert_versions(started.elapsed()), "few updates: {versions:?}");
    // The last update (a slow machine sends more than one: the 30 execs span their delay).
    let last_update = |f: &Value| f["activity_id"] == 2 && f["count"] == 30;
    let findings = wait_for(
        "the OCSF update",
        || Some(read_jsonl(&ocsf)).filter(|f| f.iter().any(last_update)),
        || collector.logs(),
    );
    let ocsf_update = findings.iter().find(|f| last_update(f)).unwrap();
    assert_eq!(ocsf_update["finding_info"]["uid"], id.as_str());
    assert_eq!(ocsf_update["count"], 30);
    assert_eq!(ocsf_update["metadata"]["version"], "1.8.0");
    assert!(
        ocsf_update["finding_info"]["first_seen_time"].as_u64()
            <= ocsf_update["finding_info"]["last_seen_time"].as_u64()
    );
    let cef_text = wait_for(
        "the CEF update",
        || Some(fs::read_to_string(&cef).unwrap_or_default()).filter(|t| t.contains("cnt=30")),
        || collector.logs(),
    );
    assert!(cef_text.lines().any(|l| l.contains(&format!("externalId={id}")) && l.contains("cnt=30")), "{cef_text}");

    assert_eq!(monitor_tests::validate_ocsf(&dir, &ocsf), findings.len());

    // The operator's table, from the agent's file and from the collector's store: one finding of
    // 30 occurrences.
    for source in [&agent.alerts, &collector.store] {
        let o = Command::new(monitor_tests::monitor_bin()).args(["alerts", "summary"]).arg(source).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let table = stdout(&o);
        let row = table.lines().find(|l| l.contains("exec_out_of_scope")).unwrap_or_else(|| panic!("{table}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cols[..4], ["upd-1", "exec_out_of_scope", "1", "30"], "{table}");
    }
}

/// The agent stops reading (SIGSTOP, as a starved or paused agent would) while a session's
/// process storms: fork, exec and exit records overflow the ring buffer. Once it reads again,
/// `monitor_blind` names that session and how many of its records were lost (the kernel counts
/// losses by session), not only "host-wide".
#[test]
fn a_ring_buffer_overflow_names_the_session_whose_events_were_lost() {
    let t = Creds::start("alerts-blind", &[]);
    let dir = &t.agent.dir;
    let session = session_file(dir, "storm", "grace: 1s\n");
    let (started, go, done, end) = (dir.path("started"), dir.path("go"), dir.path("done"), dir.path("end"));
    let script = format!(
        "touch {started}; while [ ! -f {go} ]; do sleep 0.02; done; \
         i=0; while [ $i -lt 4000 ]; do /bin/true; i=$((i+1)); done; touch {done}; \
         while [ ! -f {end} ]; do sleep 0.05; done",
        started = started.display(),
        go = go.display(),
        done = done.display(),
        end = end.display()
    );
    let mut root = t.spawn_session(&session, &script, &[]);
    wait_for("the storm session running", || started.exists().then_some(()), || t.agent.diagnostics());
    // SAFETY: signalling the agent, our own child.
    unsafe { libc::kill(t.agent.pid() as i32, libc::SIGSTOP) };
    fs::write(&go, "").unwrap();
    // Each fork and exec of a dynamically linked program costs far more under emulation (the
    // loader maps and relocates it instruction by instruction) than the slowdown of a wait.
    let execs = if timings_meaningful() { Duration::from_secs(60) } else { Duration::from_secs(1200) };
    wait_for_within("4,000 execs while the agent is stopped", execs, || done.exists().then_some(()), String::new);
    // SAFETY: as above.
    unsafe { libc::kill(t.agent.pid() as i32, libc::SIGCONT) };
    let blind = t.agent.wait_alert("monitor_blind naming the storm session", |a| {
        a["rule"] == "monitor_blind" && a["session"]["id"] == "storm"
    });
    let summary = blind["summary"].as_str().unwrap();
    assert!(summary.contains("of session storm") && summary.contains("ring buffer full"), "{summary}");
    let lost: u64 = summary.split_whitespace().nth(3).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(lost > 0, "how many were lost: {summary}");
    assert_eq!(blind["session"]["actor"], "svc:test-bot");
    fs::write(&end, "").unwrap();
    assert!(root.wait().unwrap().success());
}
