//! Alert delivery with real peers on loopback: the agent's forward outputs into the Fluent
//! project's own Forward server (plain, and TLS with a shared key), TLS reconnects after a dropped
//! connection and a receiver restart (Fluentd's TLS server setup, the Node server, the collector),
//! PyPI fluent-logger into the collector, the collector stopped and the agent killed mid-stream
//! without losing or duplicating an alert, bad input on the collector's ports, and the
//! collector's sinks into rsyslog (syslog over TLS), a Tansu broker (Kafka protocol, read back with confluent-kafka),
//! and OCSF findings checked against the OCSF models of py-ocsf-models.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read as _, Write as _},
    path::Path,
    process::Command,
    time::Duration,
};

use monitor_tests::{peers::*, *};
use serde_json::Value;

/// Runs a session whose task execs `/bin/true` `n` times outside its exec scope: n alerts.
/// An agent that sends every occurrence as an alert of its own (folding off): these tests count
/// deliveries of distinct alerts; tests/tests/alerts.rs covers folding.
fn delivery_agent(name: &str, extra: &[&str]) -> Agent {
    let policy = std::env::temp_dir().join(format!("monitor-{name}-nofold.yaml"));
    fs::write(&policy, "alerts:\n  fold_window: 0s\n").unwrap();
    let mut args = vec!["--policy", policy.to_str().unwrap()];
    args.extend_from_slice(extra);
    Agent::start_with(name, &args)
}

fn raise_alerts(agent: &Agent, id: &str, n: u32) {
    let file = session_file(&agent.dir, id, "grace: 30s\nscope:\n  exec: [\"/bin/sh\", \"/usr/bin/dash\"]\n");
    let o = agent.run(&file, &["/bin/sh", "-c", &format!("i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done")]);
    assert!(o.status.success(), "{}", stderr(&o));
}

fn exec_alert_ids(agent: &Agent, session: &str) -> BTreeSet<String> {
    agent
        .alerts()
        .into_iter()
        .filter(|a| a["rule"] == "exec_out_of_scope" && a["session"]["id"] == session)
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect()
}

fn wait_alert_count(agent: &Agent, session: &str, n: usize) -> BTreeSet<String> {
    wait_for(
        &format!("{n} alerts of {session}"),
        || Some(exec_alert_ids(agent, session)).filter(|ids| ids.len() >= n),
        || agent.diagnostics(),
    )
}

/// Whether the spool under `dir` has no unacknowledged alert: its cursor is at the end.
fn spool_drained(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else { return false };
    entries.filter_map(|e| e.ok()).all(|spool| {
        let cursor = fs::read_to_string(spool.path().join("cursor")).unwrap_or_default();
        let Some((seg, off)) = cursor.trim().split_once(' ') else { return false };
        let (seg, off): (u64, u64) = (seg.parse().unwrap(), off.parse().unwrap());
        let last = fs::read_dir(spool.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_prefix("spool-")?.strip_suffix(".log")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let len = fs::metadata(spool.path().join(format!("spool-{last:016}.log"))).map(|m| m.len()).unwrap_or(0);
        seg == last && off == len
    })
}

/// Ids in a JSON-lines file of alerts, with how often each appears.
fn id_counts(path: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for v in read_jsonl(path) {
        if let Some(id) = v["id"].as_str() {
            *counts.entry(id.to_string()).or_default() += 1;
        }
    }
    counts
}

#[test]
fn agent_forwards_to_the_fluent_project_server_with_acks() {
    let dir = Scratch::new("fwd-node");
    let server = FluentServer::start(&dir, &[]);
    let spool = dir.path("spool");
    let output = format!("forward://127.0.0.1:{}", server.port);
    let agent = delivery_agent("fwd-node-agent", &["--output", &output, "--spool-dir", spool.to_str().unwrap()]);
    raise_alerts(&agent, "fwd-1", 20);
    let ids = wait_alert_count(&agent, "fwd-1", 20);
    let received = wait_for(
        "20 alerts at the Fluent server",
        || {
            let got: BTreeSet<String> =
                server.entries().iter().filter_map(|e| e["record"]["id"].as_str().map(str::to_string)).collect();
            ids.is_subset(&got).then_some(got)
        },
        || format!("{}\n{}", server.process.log_text(), agent.diagnostics()),
    );
    assert!(ids.is_subset(&received));
    let entry = server.entries().into_iter().find(|e| e["record"]["session"]["id"] == "fwd-1").unwrap();
    assert_eq!(entry["tag"], "monitor.alert");
    assert_eq!(entry["record"]["session"]["principal"], "alice@example.com");
    // The server acknowledged every chunk: nothing is left in the spool.
    wait_for("the spool drained by acks", || spool_drained(&spool).then_some(()), || agent.diagnostics());
}

#[test]
fn agent_forward_tls_with_a_shared_key_to_the_fluent_project_server() {
    let dir = Scratch::new("fwd-node-tls");
    let tls = tls_cert(&dir);
    let (cert, key, ca) = (&tls.cert, &tls.key, &tls.ca);
    let server = FluentServer::start(
        &dir,
        &["--tls", cert.to_str().unwrap(), key.to_str().unwrap(), "--shared-key", "s3cret-k3y"],
    );
    let key_file = dir.write("shared.key", "s3cret-k3y\n");
    let spool = dir.path("spool");
    let output =
        format!("forward+tls://127.0.0.1:{}?shared_key_file={}&ca={}", server.port, key_file.display(), ca.display());
    let agent = delivery_agent("fwd-tls-agent", &["--output", &output, "--spool-dir", spool.to_str().unwrap()]);
    raise_alerts(&agent, "fwd-tls-1", 10);
    let ids = wait_alert_count(&agent, "fwd-tls-1", 10);
    wait_for(
        "10 alerts at the TLS Fluent server",
        || {
            let got: BTreeSet<String> =
                server.entries().iter().filter_map(|e| e["record"]["id"].as_str().map(str::to_string)).collect();
            ids.is_subset(&got).then_some(())
        },
        || format!("{}\n{}", server.process.log_text(), agent.diagnostics()),
    );
    wait_for("the spool drained by acks", || spool_drained(&spool).then_some(()), || agent.diagnostics());

    // A wrong key: the server refuses, nothing is delivered, the alerts stay spooled.
    let wrong = dir.write("wrong.key", "not-the-key\n");
    let spool2 = dir.path("spool-wrong");
    let output =
        format!("forward+tls://127.0.0.1:{}?shared_key_file={}&ca={}", server.port, wrong.display(), ca.display());
    let agent2 = delivery_agent("fwd-tls-wrong", &["--output", &output, "--spool-dir", spool2.to_str().unwrap()]);
    raise_alerts(&agent2, "fwd-tls-2", 3);
    wait_alert_count(&agent2, "fwd-tls-2", 3);
    wait_for(
        "the refusal logged",
        || fs::read_to_string(&agent2.log).unwrap_or_default().contains("shared key").then_some(()),
        || agent2.diagnostics(),
    );
    assert!(!spool_drained(&spool2), "alerts refused by the receiver stay in the spool");
    assert!(server.entries().iter().all(|e| e["record"]["session"]["id"] != "fwd-tls-2"));
}

/// A Forward receiver over TLS, as the reconnect tests see it.
trait TlsReceiver {
    fn port(&self) -> u16;
    /// The ids of the alerts of `session` it received.
    fn ids(&self, session: &str) -> BTreeSet<String>;
    fn restart(&mut self);
    fn logs(&self) -> String;
}

impl TlsReceiver for FluentServer {
    fn port(&self) -> u16 {
        self.port
    }
    fn ids(&self, session: &str) -> BTreeSet<String> {
        self.entries()
            .iter()
            .filter(|e| e["record"]["session"]["id"] == session)
            .filter_map(|e| e["record"]["id"].as_str().map(str::to_string))
            .collect()
    }
    fn restart(&mut self) {
        FluentServer::restart(self)
    }
    fn logs(&self) -> String {
        FluentServer::logs(self)
    }
}

/// The collector and the JSON-lines sink it stores into.
struct CollectorWithSink(Collector, std::path::PathBuf);

impl TlsReceiver for CollectorWithSink {
    fn port(&self) -> u16 {
        self.0.port
    }
    fn ids(&self, session: &str) -> BTreeSet<String> {
        read_jsonl(&self.1)
            .iter()
            .filter(|a| a["session"]["id"] == session)
            .filter_map(|a| a["id"].as_str().map(str::to_string))
            .collect()
    }
    fn restart(&mut self) {
        self.0.process.kill();
        self.0.restart()
    }
    fn logs(&self) -> String {
        self.0.logs()
    }
}

/// Destroys the agent's connections to `port` (`ss -K`: the kernel kills the sockets, as a reset
/// from a middlebox or a load balancer would); asserts there was one to drop.
fn drop_connections_to(port: u16) {
    let o = Command::new("ss")
        .args(["-K", "-t", "-n", "dst", "127.0.0.1", "dport", "=", &format!(":{port}")])
        .output()
        .unwrap();
    assert!(o.status.success(), "ss -K: {}", stderr(&o));
    let listing = String::from_utf8_lossy(&o.stdout);
    assert!(listing.contains(&format!("127.0.0.1:{port}")), "no connection to {port} to drop: {listing}");
}

/// Alerts reach `receiver` over TLS before and after the agent's connection is dropped, and
/// after the receiver restarts: each reconnect is a full handshake that succeeds.
fn forward_tls_survives_a_drop_and_a_restart(name: &str, dir: &Scratch, receiver: &mut dyn TlsReceiver, ca: &Path) {
    let spool = dir.path("spool");
    let output = format!("forward+tls://127.0.0.1:{}?ca={}", receiver.port(), ca.display());
    let agent = delivery_agent(name, &["--output", &output, "--spool-dir", spool.to_str().unwrap()]);
    let deliver = |receiver: &dyn TlsReceiver, step: &str| {
        let session = format!("{name}-{step}");
        raise_alerts(&agent, &session, 3);
        let ids = wait_alert_count(&agent, &session, 3);
        wait_for(
            &format!("the alerts of {session} at the receiver"),
            || ids.is_subset(&receiver.ids(&session)).then_some(()),
            || format!("{}\n{}", receiver.logs(), agent.diagnostics()),
        );
    };
    deliver(receiver, "first");
    drop_connections_to(receiver.port());
    deliver(receiver, "after-drop");
    receiver.restart();
    deliver(receiver, "after-restart");
    wait_for("the spool drained by acks", || spool_drained(&spool).then_some(()), || agent.diagnostics());
    let logs = receiver.logs();
    assert!(!logs.contains("handshake failed"), "a handshake was refused:\n{logs}");
}

#[test]
fn forward_tls_reconnects_to_fluentds_tls_server_after_a_drop_and_a_restart() {
    let dir = Scratch::new("fwd-fluentd-reconnect");
    let tls = tls_cert(&dir);
    let mut server = FluentServer::fluentd_tls(&dir, &tls);
    forward_tls_survives_a_drop_and_a_restart("fwd-fluentd-reconnect", &dir, &mut server, &tls.ca);
}

#[test]
fn forward_tls_reconnects_to_the_fluent_project_server_after_a_drop_and_a_restart() {
    let dir = Scratch::new("fwd-node-reconnect");
    let tls = tls_cert(&dir);
    let mut server = FluentServer::start(&dir, &["--tls", tls.cert.to_str().unwrap(), tls.key.to_str().unwrap()]);
    forward_tls_survives_a_drop_and_a_restart("fwd-node-reconnect", &dir, &mut server, &tls.ca);
}

#[test]
fn forward_tls_reconnects_to_the_collector_after_a_drop_and_a_restart() {
    let dir = Scratch::new("coll-reconnect");
    let tls = tls_cert(&dir);
    let sink = dir.path("sink.jsonl");
    let collector = Collector::start(
        &dir,
        &[
            "--tls-cert",
            tls.cert.to_str().unwrap(),
            "--tls-key",
            tls.key.to_str().unwrap(),
            "--sink",
            &format!("jsonl:{}", sink.display()),
        ],
    );
    let mut receiver = CollectorWithSink(collector, sink);
    forward_tls_survives_a_drop_and_a_restart("coll-reconnect", &dir, &mut receiver, &tls.ca);
}

#[test]
fn the_collector_stores_what_fluent_logger_sends() {
    let dir = Scratch::new("coll-fluent-logger");
    let sink = dir.path("sink.jsonl");
    let collector = Collector::start(&dir, &["--sink", &format!("jsonl:{}", sink.display())]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/fluent_sender.py");
    let o = Command::new("python3")
        .arg(&script)
        .args(["127.0.0.1", &collector.port.to_string(), "app", "50"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let records = wait_for(
        "50 records in the jsonl sink",
        || Some(read_jsonl(&sink)).filter(|r| r.len() >= 50),
        || collector.logs(),
    );
    assert_eq!(records.len(), 50);
    assert_eq!(records[0]["tag"], "app.event");
    let ns: BTreeSet<u64> = records.iter().map(|r| r["record"]["n"].as_u64().unwrap()).collect();
    assert_eq!(ns, (0..50).collect());
}

#[test]
fn collector_down_and_agent_killed_mid_stream_lose_nothing_and_store_nothing_twice() {
    let dir = Scratch::new("coll-faults");
    let tls = tls_cert(&dir);
    let (cert, key, ca) = (&tls.cert, &tls.key, &tls.ca);
    let key_file = dir.write("shared.key", "fleet-key\n");
    let sink = dir.path("sink.jsonl");
    let mut collector = Collector::start(
        &dir,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--shared-key-file",
            key_file.to_str().unwrap(),
            "--sink",
            &format!("jsonl:{}", sink.display()),
        ],
    );
    let spool = dir.path("spool");
    let output = format!(
        "forward+tls://127.0.0.1:{}?shared_key_file={}&ca={}",
        collector.port,
        key_file.display(),
        ca.display()
    );
    let agent_args = ["--output", &output, "--spool-dir", spool.to_str().unwrap()];
    let mut agent = delivery_agent("faults-agent", &agent_args);

    // 1. The collector stops for a while in the middle of a stream, then comes back.
    let file = session_file(&agent.dir, "faults-1", "grace: 30s\nscope:\n  exec: [\"/bin/sh\", \"/usr/bin/dash\"]\n");
    let mut task = Command::new(monitor_bin())
        .args(["run", "--file", file.to_str().unwrap(), "--", "/bin/sh", "-c"])
        .arg("i=0; while [ $i -lt 300 ]; do /bin/true; sleep 0.01; i=$((i+1)); done")
        .env("MONITOR_CONTROL", &agent.control)
        .spawn()
        .unwrap();
    wait_for("the first alerts stored", || (id_counts(&sink).len() >= 20).then_some(()), || collector.logs());
    collector.process.kill();
    wait_for(
        "alerts raised while the collector is down",
        || (exec_alert_ids(&agent, "faults-1").len() >= 150).then_some(()),
        || agent.diagnostics(),
    );
    collector.restart();
    assert!(task.wait().unwrap().success());
    let live = wait_alert_count(&agent, "faults-1", 300);
    wait_for(
        "every alert in the collector's store",
        || live.iter().all(|id| id_counts(&sink).contains_key(id)).then_some(()),
        || collector.logs(),
    );

    // 2. The collector is down, the agent spools, then is killed (-9); a new agent on the same
    //    spool delivers what the first one could not.
    collector.process.kill();
    raise_alerts(&agent, "faults-2", 40);
    let spooled = wait_alert_count(&agent, "faults-2", 40);
    // SAFETY: signalling the agent we started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
    agent.stop();
    collector.restart();
    let _agent2 = delivery_agent("faults-agent-2", &agent_args);
    wait_for(
        "the killed agent's spooled alerts delivered by its successor",
        || spooled.iter().all(|id| id_counts(&sink).contains_key(id)).then_some(()),
        || collector.logs(),
    );

    // Exactly once: the store de-duplicates resent batches by alert id.
    let counts = id_counts(&sink);
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    assert!(live.iter().chain(&spooled).all(|id| counts.get(id) == Some(&1)));
}

#[test]
fn the_collector_survives_bad_input_and_keeps_serving() {
    let dir = Scratch::new("coll-bad-input");
    let sink = dir.path("sink.jsonl");
    let collector = Collector::start(&dir, &["--sink", &format!("jsonl:{}", sink.display())]);
    let send = |bytes: &[u8]| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", collector.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest
    };
    // Random bytes, a frame cut short, a frame claiming 4 GiB, a valid msgpack that is no message.
    // 0xc1 is a byte MessagePack never uses.
    let random: Vec<u8> =
        std::iter::once(0xc1).chain((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)).collect();
    assert!(send(&random).is_empty(), "no ack for garbage");
    assert!(send(&[0x93, 0xa3, b'a', b'b']).is_empty());
    let mut huge = vec![0x92, 0xa1, b't', 0xc6, 0xff, 0xff, 0xff, 0xff];
    huge.extend(vec![0u8; 1 << 16]);
    assert!(send(&huge).is_empty());
    assert!(send(&[0x81, 0xa1, b'k', 0x01]).is_empty());
    wait_for(
        "the reasons logged",
        || {
            let log = collector.logs();
            let closed = log.matches("connection closed: ").count();
            (closed >= 4 && log.contains("closed in the middle of a message") && log.contains("not a Forward message"))
                .then_some(())
        },
        || collector.logs(),
    );
    // Everyone else is still served.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/fluent_sender.py");
    let o = Command::new("python3")
        .arg(&script)
        .args(["127.0.0.1", &collector.port.to_string(), "ok", "5"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("the good client's records", || (read_jsonl(&sink).len() == 5).then_some(()), || collector.logs());

    // TLS with a shared key: a plaintext client and a wrong key are each refused.
    let tls = tls_cert(&dir);
    let (cert, key, ca) = (&tls.cert, &tls.key, &tls.ca);
    let tls_dir = Scratch::new("coll-bad-input-tls");
    let tls_collector = Collector::start(
        &tls_dir,
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap(), "--shared-key", "right-key"],
    );
    // fluent-logger sends without waiting for an ack: it cannot tell; the collector must.
    let _ = Command::new("python3")
        .arg(&script)
        .args(["127.0.0.1", &tls_collector.port.to_string(), "plain", "1"])
        .output()
        .unwrap();
    let wrong = dir.write("wrong.key", "wrong-key\n");
    let spool = dir.path("spool");
    let output = format!(
        "forward+tls://127.0.0.1:{}?shared_key_file={}&ca={}",
        tls_collector.port,
        wrong.display(),
        ca.display()
    );
    let agent = delivery_agent("bad-input-agent", &["--output", &output, "--spool-dir", spool.to_str().unwrap()]);
    raise_alerts(&agent, "bad-key", 1);
    wait_for(
        "both refusals logged",
        || {
            let log = tls_collector.logs();
            (log.contains("TLS handshake failed") && log.contains("shared key mismatch")).then_some(())
        },
        || tls_collector.logs(),
    );
}

/// An agent forwarding to a collector with `sinks`; returns the alert ids it raised.
fn through_collector(name: &str, dir: &Scratch, sinks: &[String], n: u32) -> (Collector, Agent, BTreeSet<String>) {
    let mut args = vec![];
    for s in sinks {
        args.push("--sink");
        args.push(s.as_str());
    }
    let collector = Collector::start(dir, &args);
    let output = format!("forward://127.0.0.1:{}", collector.port);
    let spool = dir.path("spool");
    let agent = delivery_agent(name, &["--output", &output, "--spool-dir", spool.to_str().unwrap()]);
    raise_alerts(&agent, name, n);
    let ids = wait_alert_count(&agent, name, n as usize);
    (collector, agent, ids)
}

#[test]
fn syslog_tls_sink_into_rsyslog_resumes_after_being_down() {
    let dir = Scratch::new("sink-rsyslog");
    let tls = tls_cert(&dir);
    // rsyslog is not there yet: the syslog sink waits, the jsonl sink and ingestion go on.
    let port = free_port();
    let jsonl = dir.path("sink.jsonl");
    let sinks =
        [format!("syslog+tls://127.0.0.1:{port}?ca={}", tls.ca.display()), format!("jsonl:{}", jsonl.display())];
    let (collector, _agent, ids) = through_collector("syslog-1", &dir, &sinks, 5);
    wait_for(
        "the alerts in the jsonl sink while rsyslog is down",
        || ids.iter().all(|id| id_counts(&jsonl).contains_key(id)).then_some(()),
        || collector.logs(),
    );
    wait_for(
        "the syslog sink retrying",
        || collector.logs().contains("sink unavailable").then_some(()),
        || collector.logs(),
    );
    let rsyslog = Rsyslog::start_on(&dir, &tls, port);
    let lines = wait_for(
        "5 messages at rsyslog once it is up",
        || {
            let lines = rsyslog.lines();
            ids.iter().all(|id| lines.iter().any(|l| l.contains(&format!("id=\"{id}\"")))).then_some(lines)
        },
        || format!("{}\n{}", collector.logs(), rsyslog.process.log_text()),
    );
    let line = lines.iter().find(|l| l.contains("exec_out_of_scope")).unwrap();
    assert!(line.starts_with("<"), "{line}");
    assert!(line.contains(" monitor - exec_out_of_scope [monitor@32473 "), "{line}");
    assert!(line.contains("session=\"syslog-1\"") && line.contains("principal=\"alice@example.com\""), "{line}");
}

#[test]
fn a_full_spool_drops_the_oldest_and_says_so_in_monitor_blind() {
    let dir = Scratch::new("spool-full");
    // Nothing listens there: every alert stays spooled.
    let output = format!("forward://127.0.0.1:{}", free_port());
    let spool = dir.path("spool");
    let agent = delivery_agent(
        "spool-full-agent",
        &["--output", &output, "--spool-dir", spool.to_str().unwrap(), "--spool-max-bytes", "192K"],
    );
    raise_alerts(&agent, "full-1", 600);
    let blind = agent.wait_alert("monitor_blind for the full spool", |a| {
        a["rule"] == "monitor_blind" && a["summary"].as_str().unwrap_or("").contains("forward spool")
    });
    assert!(blind["summary"].as_str().unwrap().contains("oldest alerts dropped"), "{blind}");
    let total: u64 = fs::read_dir(&spool)
        .unwrap()
        .filter_map(|d| d.ok())
        .flat_map(|d| fs::read_dir(d.path()).unwrap().filter_map(|e| e.ok()?.metadata().ok()))
        .map(|m| m.len())
        .sum();
    assert!(total <= 192 * 1024 + 64 * 1024, "the spool holds {total} bytes");
}

#[test]
fn kafka_sink_into_a_tansu_broker_read_by_confluent_kafka() {
    let dir = Scratch::new("sink-kafka");
    let broker = Tansu::start(&dir);
    broker.create_topic("monitor-alerts");
    let sink = format!("kafka://127.0.0.1:{}/monitor-alerts", broker.port);
    let (collector, _agent, ids) = through_collector("kafka-1", &dir, &[sink], 5);
    let consumer = dir.write(
        "consume.py",
        r#"
import json, sys, time
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
c = Consumer({"bootstrap.servers": sys.argv[1], "group.id": "monitor-test", "enable.auto.commit": False})
# Every partition from its start, without a consumer group's coordination.
partitions = c.list_topics("monitor-alerts", timeout=10).topics["monitor-alerts"].partitions
c.assign([TopicPartition("monitor-alerts", p, OFFSET_BEGINNING) for p in partitions])
want, seen, deadline = int(sys.argv[2]), {}, time.time() + 8
while len(seen) < want and time.time() < deadline:
    m = c.poll(0.5)
    if m is None or m.error():
        continue
    a = json.loads(m.value())
    seen[a["id"]] = {"key": m.key().decode(), "rule": a["rule"]}
c.close()
print(json.dumps(seen))
"#,
    );
    let seen = wait_for(
        "the alerts read back from the topic",
        || {
            let o = Command::new("python3")
                .arg(&consumer)
                .arg(format!("127.0.0.1:{}", broker.port))
                .arg("5")
                .output()
                .ok()?;
            let seen: Value = serde_json::from_slice(&o.stdout).ok()?;
            ids.iter().all(|id| seen.get(id).is_some()).then_some(seen)
        },
        || format!("{}\n{}", collector.logs(), broker.process.log_text()),
    );
    for id in &ids {
        assert_eq!(seen[id]["key"], "kafka-1", "keyed by session");
        assert_eq!(seen[id]["rule"], "exec_out_of_scope");
    }
}

#[test]
fn ocsf_findings_validate_against_the_ocsf_models() {
    let dir = Scratch::new("sink-ocsf");
    let ocsf = dir.path("findings.jsonl");
    let cef = dir.path("alerts.cef");
    let (collector, _agent, ids) =
        through_collector("ocsf-1", &dir, &[format!("ocsf:{}", ocsf.display()), format!("cef:{}", cef.display())], 3);
    let findings = wait_for("3 findings", || Some(read_jsonl(&ocsf)).filter(|f| f.len() >= 3), || collector.logs());
    for f in &findings {
        assert_eq!(f["class_uid"], 2004);
        assert!(ids.contains(f["finding_info"]["uid"].as_str().unwrap()));
    }
    let validate = dir.write(
        "validate.py",
        r#"
import json, sys
from py_ocsf_models.events.findings.detection_finding import DetectionFinding
n = 0
for line in open(sys.argv[1]):
    DetectionFinding.model_validate(json.loads(line))
    n += 1
print(n)
"#,
    );
    let o = Command::new("python3").arg(&validate).arg(&ocsf).output().unwrap();
    assert!(o.status.success(), "OCSF validation failed:\n{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), findings.len().to_string());
    let cef_lines = wait_for(
        "3 CEF lines",
        || Some(fs::read_to_string(&cef).unwrap_or_default()).filter(|t| t.lines().count() >= 3),
        || collector.logs(),
    );
    assert!(cef_lines.lines().all(|l| l.starts_with("CEF:0|monitor|monitor|") && l.contains("|exec_out_of_scope|")));
}

/// A small tmpfs the test mounts (and unmounts on drop): a disk that fills up.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Self {
        fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "mount tmpfs: {}", stderr(&o));
        Self(dir.to_path_buf())
    }

    fn grow(&self, size: &str) {
        let o = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0).output().unwrap();
        assert!(o.status.success(), "remount: {}", stderr(&o));
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_collector_disk_acknowledges_nothing_and_the_agents_keep_their_alerts() {
    let dir = Scratch::new("coll-disk-full");
    let disk = SmallDisk::mount(&dir.path("disk"), "256k");
    let sink = dir.path("sink.jsonl");
    let collector =
        Collector::start_with_store(&dir, disk.0.join("store"), &["--sink", &format!("jsonl:{}", sink.display())]);
    let output = format!("forward://127.0.0.1:{}", collector.port);
    let spool = dir.path("spool");
    let agent = delivery_agent("disk-full-agent", &["--output", &output, "--spool-dir", spool.to_str().unwrap()]);
    raise_alerts(&agent, "disk-1", 800);
    let ids = wait_alert_count(&agent, "disk-1", 800);
    wait_for(
        "the collector refusing to ack",
        || collector.logs().contains("batch not acknowledged").then_some(()),
        || collector.logs(),
    );
    assert!(!spool_drained(&spool), "unacknowledged alerts stay in the agent's spool");
    // Room again: the agent's retries go through, every alert stored exactly once.
    disk.grow("16m");
    let counts = wait_for(
        "every alert stored once there is room",
        || Some(id_counts(&sink)).filter(|c| ids.iter().all(|id| c.contains_key(id))),
        || collector.logs(),
    );
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    wait_for("the spool drained", || spool_drained(&spool).then_some(()), || agent.diagnostics());
}

/// The collector flooded: 40 connections each write all their batches at once without waiting
/// for acks (far more than it stores per second, offered at once) against an 8 MiB buffering
/// budget. Back-pressure holds it: every batch is acknowledged, every acknowledged alert is in
/// the store once, its memory stays bounded. Before the overdraft, the budget filled with
/// unfinished messages that each waited for more of it, and every connection was closed.
/// (The benchmark's flood mode, built by `cargo test` with the monitor crate's examples.)
#[test]
fn a_flooded_collector_applies_back_pressure_and_stores_every_acknowledged_alert() {
    let bench = monitor_bin().parent().unwrap().join("examples/delivery_bench");
    let o = std::process::Command::new(&bench)
        .arg("flood")
        .arg(monitor_bin())
        .args(["40", "200000"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", bench.display()));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["stored"], 200000, "{v}");
    assert_eq!(v["acked_batches"], 200, "{v}");
    assert!(v["collector_peak_rss_mb"].as_f64().unwrap() < 512.0, "{v}");
}
