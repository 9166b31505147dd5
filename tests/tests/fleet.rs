//! The fleet watchlist (`--fleet`): two agents on this machine, each with a host name of its
//! own and the fleet's shared key, joined through a real Kafka-protocol broker (Tansu). One
//! kernel means both agents see every process; what node-b says of node-a's session it can only
//! know from the fleet topic (node-b has no session of its own), which is what is asserted.

use std::{fs, time::Duration};

use monitor_tests::{
    peers::Tansu,
    session_file, stderr, wait_for, wait_for_within,
    wire::{free_port_on, jwt, tls_server, Creds},
    Scratch,
};
use serde_json::Value;

const TOPIC: &str = "monitor-fleet";
const SESSION: &str = "grace: 1s\ntokens:\n  - env: BOT_TOKEN\n";

/// The curl command sending the session's token (by variable, never spelled out in a script).
fn curl(url: &str) -> String {
    format!("curl -sk -o /dev/null -H \"Authorization: Bearer $BOT_TOKEN\" {url}")
}

fn agent(name: &str, host: &str, fleet: &str, key: &str, metrics: &str) -> Creds {
    let args = ["--fleet", fleet, "--host-name", host, "--key-file", key, "--fleet-stale-after", "5s"];
    Creds::start(name, &[&args[..], &["--metrics", metrics]].concat())
}

/// One sample of the agent's Prometheus metrics (a scrape is tried again until it answers).
fn metric(addr: &str, name: &str) -> f64 {
    let sample = || {
        let o = std::process::Command::new("curl")
            .args(["-sf", "-m", "5", &format!("http://{addr}/metrics")])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let line = text.lines().find(|l| l.split_whitespace().next() == Some(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    wait_for(&format!("{name} from {addr}"), sample, String::new)
}

/// node-b's record of node-a's session `id` that `pick` accepts.
fn wait_fleet_record(b: &Creds, id: &str, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
    b.agent.wait_event(what, |e| e["type"] == "fleet_session" && e["session"]["id"] == id && pick(&e["session"]))
}

#[test]
fn a_token_of_a_task_on_one_host_is_caught_on_another() {
    let dir = Scratch::new("fleet");
    let mut broker = Tansu::start(&dir);
    broker.create_topic_with(TOPIC, &["cleanup.policy=compact"]);
    let fleet = format!("kafka://127.0.0.1:{}/{TOPIC}", broker.port);
    // The fleet's shared key (as a Kubernetes Secret would hold it).
    let key = dir.path("fleet.key");
    fs::write(&key, (0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect::<Vec<u8>>()).unwrap();
    let key = key.to_str().unwrap();
    let metrics_b = format!("127.0.0.1:{}", free_port_on("127.0.0.1"));
    let mut a = agent("fleet-a", "node-a", &fleet, key, &format!("127.0.0.1:{}", free_port_on("127.0.0.1")));
    let mut b = agent("fleet-b", "node-b", &fleet, key, &metrics_b);
    let server = tls_server(&a.agent.dir);
    let url = format!("https://127.0.0.2:{}/deploy", server.port);
    let token = jwt(3600, "fleet");

    // A task runs on node-a, holding the token; node-b learns of it from the topic.
    let session = session_file(&a.agent.dir, "fleet-task", SESSION);
    let (started, done) = (dir.path("started"), dir.path("done"));
    // Its processes are in no session of node-b's (one kernel): the task keeps the token out of
    // their environments, or node-b would rightly flag each of them.
    let script =
        format!("unset BOT_TOKEN; touch {}; while [ ! -f {} ]; do sleep 0.05; done", started.display(), done.display());
    let mut root = a.spawn_session(&session, &script, &[("BOT_TOKEN", &token)]);
    wait_for("node-a's task running", || started.exists().then_some(()), || a.agent.diagnostics());
    let record =
        wait_fleet_record(&b, "fleet-task", "node-a's session on node-b's watchlist", |s| s["ended_ns"].is_null());
    assert_eq!(record["session"]["host"], "node-a");
    assert_eq!(record["session"]["actor"], "svc:test-bot");
    let fingerprint = record["session"]["tokens"][0]["fingerprint"].as_str().unwrap().to_string();
    assert!(fingerprint.starts_with("hmac-sha256:"), "{record}");

    // While it runs, a process on node-b that is not that task uses its token: over TLS, in its
    // environment and on its command line (the kernel's token hash is the fleet's, so node-b's
    // exec scans find it).
    wait_for(
        "node-b looking for node-a's token on the wire (its TLS probes attached)",
        || b.agent.attached_probes().contains("ssl_write").then_some(()),
        || b.agent.diagnostics(),
    );
    let o = b.sh(&format!("echo $$ > {}/outside.pid; exec {}", dir.0.display(), curl(&url)), &[("BOT_TOKEN", &token)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let outside: u64 = fs::read_to_string(dir.path("outside.pid")).unwrap().trim().parse().unwrap();
    for seen_in in ["https", "env", "argv"] {
        let alert = b.agent.wait_alert(&format!("node-b: token_outside_session ({seen_in})"), |a| {
            // Repeats of a finding are folded into its first alert, which lists their pids.
            let by_outside =
                a["process"]["pid"] == outside || a["pids"].as_array().is_some_and(|p| p.iter().any(|p| *p == outside));
            a["rule"] == "token_outside_session"
                && by_outside
                && a["credential"]["seen_in"] == seen_in
                && a["session"]["host"] == "node-a"
        });
        assert_eq!(alert["session"]["id"], "fleet-task");
        assert_eq!(alert["session"]["state"], "active");
        assert_eq!(alert["host"], "node-b", "the alert is node-b's");
        assert_eq!(alert["credential"]["fingerprint"], fingerprint.as_str());
        assert!(alert["summary"].as_str().unwrap().contains("session fleet-task of host node-a"), "{alert}");
    }

    // The task ends on node-a; node-b hears of it, and a later use there is after the task.
    fs::write(&done, "").unwrap();
    assert!(root.wait().unwrap().success());
    wait_fleet_record(&b, "fleet-task", "node-a's session ended, on node-b", |s| !s["ended_ns"].is_null());
    let after = wait_for(
        "node-b: token_after_task_end naming node-a's session",
        || {
            // Until node-a's grace has run out, a use is still inside the task's authority.
            b.sh(&curl(&url), &[("BOT_TOKEN", &token)]);
            b.agent.alerts().into_iter().find(|a| {
                a["rule"] == "token_after_task_end"
                    && a["session"]["host"] == "node-a"
                    && a["credential"]["seen_in"] == "https"
            })
        },
        || b.agent.diagnostics(),
    );
    assert_eq!(after["session"]["id"], "fleet-task");
    assert_eq!(after["session"]["state"], "ended");
    assert!(after["summary"].as_str().unwrap().contains("after that task ended"), "{after}");
    assert_eq!(after["process"]["in_session"], false);

    // The brokers go away: node-b says how stale its view is, and both keep working.
    broker.stop();
    let stale = b.agent.wait_alert("node-b: the fleet view is stale", |a| {
        a["rule"] == "monitor_blind" && a["summary"].as_str().unwrap_or_default().contains("fleet view is stale")
    });
    assert!(stale["summary"].as_str().unwrap().contains(&format!("127.0.0.1:{}", broker.port)), "{stale}");
    assert!(metric(&metrics_b, "monitor_fleet_staleness_seconds") >= 5.0);
    assert_eq!(metric(&metrics_b, "monitor_fleet_sessions"), 1.0, "node-a's session, still on the watchlist");
    assert!(metric(&metrics_b, "monitor_fleet_records_total") >= 2.0, "its start and its end");
    // Back (empty: memory storage), with the operator's topic again: node-b is in contact again.
    broker.start_again();
    broker.create_topic_with(TOPIC, &["cleanup.policy=compact"]);
    wait_for_within(
        "node-b in contact with the brokers again",
        Duration::from_secs(60),
        || (metric(&metrics_b, "monitor_fleet_staleness_seconds") == 0.0).then_some(()),
        || b.agent.diagnostics(),
    );
    // Local work went on: node-a's own sessions are its own whatever the brokers do.
    let later = session_file(&a.agent.dir, "fleet-later", SESSION);
    let o = a.run_session(&later, "true", &[("BOT_TOKEN", "another-token-value-0123456789")]);
    assert!(o.status.success(), "{}", stderr(&o));
    // And what node-a publishes after the restart reaches node-b.
    wait_fleet_record(&b, "fleet-later", "node-a's session after the brokers' restart, on node-b", |s| {
        !s["ended_ns"].is_null()
    });

    // Both agents lived through the brokers' going and coming back.
    for t in [&mut a, &mut b] {
        t.agent.assert_running();
        t.assert_never_output(&token);
    }
}
