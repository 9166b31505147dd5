//! Running the agent as operations teams do: a real Prometheus (Debian's) scrapes its metrics,
//! and its health endpoints answer.

use std::process::{Command, Stdio};

use monitor_tests::{
    monitor_bin,
    peers::{free_port, http_get, Collector, Prometheus},
    session_file, stderr, wait_for, Agent, Scratch,
};

/// The agent's `/metrics`, scraped by Prometheus every second while a session runs, raises an
/// alert and ends, and its alerts go to a collector: what an on-call engineer's dashboard reads.
#[test]
fn prometheus_scrapes_what_the_agent_saw_said_and_delivered() {
    let dir = Scratch::new("ops-metrics-collector");
    let collector = Collector::start(&dir, &[]);
    let addr = format!("127.0.0.1:{}", free_port());
    let forward = format!("forward://127.0.0.1:{}", collector.port);
    let spool = dir.path("spool");
    let agent = Agent::start_with(
        "ops-metrics",
        &["--metrics", &addr, "--output", &forward, "--spool-dir", spool.to_str().unwrap()],
    );
    assert_eq!(http_get(&format!("http://{addr}/healthz")).0, 200);
    assert_eq!(http_get(&format!("http://{addr}/readyz")), (200, "ready\n".to_string()));
    assert_eq!(http_get(&format!("http://{addr}/nothing-here")).0, 404);
    let (status, text) = http_get(&format!("http://{addr}/metrics"));
    assert_eq!(status, 200);
    // Idle: the host-wide hooks are known and not attached.
    assert!(text.contains("monitor_probe_attached{program=\"sched_process_exec\"} 0"), "{text}");

    let prometheus = Prometheus::start(&agent.dir, std::slice::from_ref(&addr));
    prometheus.wait_value("up{job=\"monitor\"}", |v| v == 1.0);

    // While a session runs, its hooks are attached, and Prometheus says so.
    let running = session_file(&agent.dir, "ops-running", "");
    let done = agent.dir.path("running-done");
    let mut task = Command::new(monitor_bin())
        .args(["run", "--file", running.to_str().unwrap(), "--", "/bin/sh", "-c"])
        .arg(format!("while [ ! -f {} ]; do sleep 0.05; done", done.display()))
        .env("MONITOR_CONTROL", &agent.control)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    prometheus.wait_value("monitor_probe_attached{program=\"sched_process_exec\"}", |v| v == 1.0);
    prometheus.wait_value("monitor_sessions{state=\"active\"}", |v| v == 1.0);

    // A session whose scope allows only the shell runs two other programs: one finding, sent,
    // updated, acknowledged by the collector.
    let file = session_file(&agent.dir, "ops-1", "grace: 30s\nscope:\n  exec: [\"/bin/sh\", \"/usr/bin/dash\"]\n");
    let o = agent.run(&file, &["/bin/sh", "-c", "/bin/true; /bin/true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    agent.wait_alert("exec_out_of_scope", |a| a["rule"] == "exec_out_of_scope");
    std::fs::write(&done, "").unwrap();
    assert!(task.wait().unwrap().success());

    prometheus.wait_value("monitor_alerts_total{rule=\"exec_out_of_scope\",severity=\"medium\"}", |v| v >= 1.0);
    prometheus.wait_value("monitor_events_total{kind=\"exec\"}", |v| v >= 3.0);
    prometheus.wait_value("monitor_events_total{kind=\"session_started\"}", |v| v == 2.0);
    prometheus.wait_value("monitor_sessions{state=\"ended\"}", |v| v == 2.0);
    prometheus.wait_value(&format!("monitor_forward_acked_records_total{{output=\"{forward}\"}}"), |v| v >= 1.0);
    prometheus.wait_value(&format!("monitor_spool_bytes{{output=\"{forward}\"}}"), |v| v == 0.0);
    prometheus.wait_value("monitor_event_delay_seconds_count", |v| v >= 3.0);
    prometheus.wait_value("monitor_process_resident_memory_bytes", |v| v > 1e6);
    prometheus.wait_value("monitor_process_cpu_seconds_total", |v| v > 0.0);
    // Nothing was lost: the family has no sample.
    assert!(
        prometheus.query("monitor_lost_events_total").is_empty(),
        "{:?}",
        prometheus.query("monitor_lost_events_total")
    );
}

/// A collector that is down: the spool holds the alert, and its age grows where Prometheus
/// sees it; the forward output's retries are counted.
#[test]
fn an_undelivered_alert_shows_as_spooled_bytes_and_age() {
    let addr = format!("127.0.0.1:{}", free_port());
    // Nothing listens on this port: every connect fails.
    let forward = format!("forward://127.0.0.1:{}", free_port());
    let dir = Scratch::new("ops-metrics-down");
    let spool = dir.path("spool");
    let agent = Agent::start_with(
        "ops-metrics-down-agent",
        &["--metrics", &addr, "--output", &forward, "--spool-dir", spool.to_str().unwrap()],
    );
    let file = session_file(&agent.dir, "ops-down", "scope:\n  exec: [\"/bin/sh\", \"/usr/bin/dash\"]\n");
    let o = agent.run(&file, &["/bin/sh", "-c", "/bin/true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    agent.wait_alert("exec_out_of_scope", |a| a["rule"] == "exec_out_of_scope");
    let spooled = format!("monitor_spool_bytes{{output=\"{forward}\"}}");
    let age = format!("monitor_spool_oldest_age_seconds{{output=\"{forward}\"}}");
    let retries = format!("monitor_forward_retries_total{{output=\"{forward}\"}}");
    wait_for(
        "spooled bytes, an oldest age past 1 s and retries in /metrics",
        || {
            let (_, text) = http_get(&format!("http://{addr}/metrics"));
            let ok = sample(&text, &spooled).is_some_and(|v| v > 0.0)
                && sample(&text, &age).is_some_and(|v| v > 1.0)
                && sample(&text, &retries).is_some_and(|v| v >= 2.0);
            ok.then_some(())
        },
        || http_get(&format!("http://{addr}/metrics")).1,
    );
}

/// `--config agent.toml` sets what flags would, a flag overrides it, and a bad value is refused
/// before anything starts, naming the file, the line and the key.
#[test]
fn the_agent_reads_its_settings_from_a_config_file() {
    let dir = Scratch::new("ops-config");
    let (port, flag_port) = (free_port(), free_port());
    let traces = dir.path("traces");
    let config = dir.write(
        "agent.toml",
        &format!(
            "# as a ConfigMap would hold it\nmetrics = \"127.0.0.1:{port}\"\ntrace-dir = \"{}\"\ndisable_probe = [\"gnutls_record_send\"]\n",
            traces.display()
        ),
    );
    let flag_metrics = format!("127.0.0.1:{flag_port}");
    let agent =
        Agent::start_with("ops-config-agent", &["--config", config.to_str().unwrap(), "--metrics", &flag_metrics]);
    // The flag won over the file's metrics address; the file's other settings hold.
    assert_eq!(http_get(&format!("http://{flag_metrics}/healthz")).0, 200);
    assert_eq!(http_get(&format!("http://127.0.0.1:{port}/healthz")).0, 0, "the file's address is not served");
    let file = session_file(&agent.dir, "ops-cfg", "");
    let o = agent.run(&file, &["/bin/true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let segment = wait_for(
        "a trace segment in the config's trace-dir",
        || std::fs::read_dir(&traces).ok()?.next(),
        || agent.diagnostics(),
    );
    assert!(segment.is_ok());
    let log = std::fs::read_to_string(&agent.log).unwrap();
    assert!(
        log.lines().any(|l| l.contains("gnutls_record_send") && l.contains("disabled by --disable-probe")),
        "the file's disable-probe: {log}"
    );

    let bad = dir.write("bad.toml", "metrics = \"127.0.0.1:1\"\n\nspool-max-bytes = \"lots\"\n");
    let o = Command::new(monitor_bin()).args(["agent", "--config", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let message = stderr(&o);
    assert!(message.contains(&format!("{}:3: `spool-max-bytes`: invalid value 'lots'", bad.display())), "{message}");
}

/// SIGHUP and `monitor policy reload` re-read the policy: a bad file is refused with its error
/// and the old policy (an actor's exec scope, a severity) still applies; a good one applies to
/// the next alert and the next session.
#[test]
fn a_reload_applies_a_good_policy_and_refuses_a_bad_one() {
    let dir = Scratch::new("ops-reload");
    let policy = dir.write(
        "policy.yaml",
        "severity: {exec_out_of_scope: low}\nactors:\n  \"svc:test-bot\":\n    exec: [\"/bin/sh\", \"/usr/bin/dash\"]\n",
    );
    let agent = Agent::start_with("ops-reload-agent", &["--policy", policy.to_str().unwrap()]);
    let run = |id: &str, script: &str| {
        let file = session_file(&agent.dir, id, "");
        let o = agent.run(&file, &["/bin/sh", "-c", script]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let out_of_scope = |session: &str, exe: &str| {
        let (session, exe) = (session.to_string(), exe.to_string());
        move |a: &serde_json::Value| {
            a["rule"] == "exec_out_of_scope"
                && a["session"]["id"] == session.as_str()
                && a["process"]["exe"] == exe.as_str()
        }
    };
    run("reload-1", "/bin/true");
    let first = agent.wait_alert("exec_out_of_scope under the first policy", out_of_scope("reload-1", "/bin/true"));
    assert_eq!(first["severity"], "low");

    // A broken file and SIGHUP: refused, logged with the file and line; the old policy stays.
    std::fs::write(&policy, "severity: {exec_out_of_scope: low\nactors: [\n").unwrap();
    // SAFETY: a signal to the agent this test started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    wait_for(
        "the refused reload in the agent's log",
        || {
            let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
            log.lines()
                .find(|l| l.contains("policy not reloaded") && l.contains(&*policy.to_string_lossy()))
                .map(str::to_string)
        },
        || agent.diagnostics(),
    );
    let o = agent.cli(&["policy", "reload"]);
    assert!(!o.status.success(), "a bad policy is refused");
    assert!(stderr(&o).contains("policy not reloaded") && stderr(&o).contains("policy.yaml"), "{}", stderr(&o));
    run("reload-2", "/bin/true");
    let second = agent.wait_alert("exec_out_of_scope under the kept policy", out_of_scope("reload-2", "/bin/true"));
    assert_eq!(second["severity"], "low");

    // A good file: the new severity, actor scope, session defaults and tool directory hold from
    // now on.
    let tools = dir.path("tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::write(
        &policy,
        format!(
            "severity: {{exec_out_of_scope: critical}}\nactors:\n  \"svc:test-bot\":\n    exec: [\"/bin/sh\", \"/usr/bin/dash\", \"/bin/true\"]\n\
             defaults: {{ttl: 7m, grace: 4s}}\ntls:\n  executable_dirs: [{:?}]\n",
            tools.display().to_string()
        ),
    )
    .unwrap();
    let o = agent.cli(&["policy", "reload"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(monitor_tests::stdout(&o).contains("reloaded"), "{}", monitor_tests::stdout(&o));
    run("reload-3", "/bin/true; /bin/cat /dev/null");
    let third = agent.wait_alert("exec_out_of_scope under the new policy", out_of_scope("reload-3", "/bin/cat"));
    assert_eq!(third["severity"], "critical");
    assert!(
        !agent.alerts().iter().any(out_of_scope("reload-3", "/bin/true")),
        "/bin/true is in the new scope: {:?}",
        agent.alerts()
    );
    let reloaded = agent.events().iter().filter(|e| e["type"] == "policy_reloaded").count();
    assert_eq!(reloaded, 1, "one reload reached the engine");
    // A session file without ttl and grace gets the reloaded defaults.
    let file = session_file(&agent.dir, "reload-4", "");
    let o = agent.cli(&["session", "start", "--file", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let shown: serde_json::Value = serde_json::from_slice(&agent.cli(&["session", "show", "reload-4"]).stdout).unwrap();
    assert_eq!(shown["session"]["ttl_ns"], 420_000_000_000u64, "{shown}");
    assert_eq!(shown["session"]["grace_ns"], 4_000_000_000u64, "{shown}");
    // The new tool directory is looked through at once (the first look was at start).
    wait_for(
        "the reloaded executable_dirs looked through",
        || {
            let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
            (log.matches("executables with their own TLS code probed in advance").count() == 2).then_some(())
        },
        || agent.diagnostics(),
    );
}

/// A session bound to a pod's container cgroup (laid out as the kubelet's systemd driver does,
/// under a test cgroup as under a kind node's prefix): its alerts say the pod, the container
/// and the QoS class, read from the process's cgroup path.
#[test]
fn alerts_of_a_pod_bound_session_name_the_pod_and_the_container() {
    let dir = Scratch::new("ops-k8s-ocsf");
    let ocsf = dir.path("alerts-ocsf.jsonl");
    let agent = Agent::start_with("ops-k8s", &["--output", &format!("ocsf:{}", ocsf.display())]);
    let node = monitor_tests::TestCgroup::new("k8s-node");
    let uid = "8dbf2f1e-6b1c-4a4c-9e0e-0c1e2b3a4d5f";
    let container = "4f1e3c0b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    let levels = [
        "kubepods.slice".to_string(),
        "kubepods-burstable.slice".to_string(),
        format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")),
        format!("cri-containerd-{container}.scope"),
    ];
    let mut dirs = vec![node.0.clone()];
    for level in &levels {
        let dir = dirs.last().unwrap().join(level);
        std::fs::create_dir(&dir).unwrap();
        dirs.push(dir);
    }
    let scope = dirs.last().unwrap().clone();
    let file = session_file(&agent.dir, "pod-task", "scope:\n  exec: [\"/bin/sh\", \"/usr/bin/dash\"]\n");
    let o = agent.cli(&["session", "start", "--file", file.to_str().unwrap(), "--cgroup", scope.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let script = format!("echo $$ > {}/cgroup.procs && exec /bin/sh -c '/bin/true; sleep 0.5'", scope.display());
    let o = Command::new("/bin/sh").args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let alert = agent.wait_alert("exec_out_of_scope in the pod", |a| a["rule"] == "exec_out_of_scope");
    assert_eq!(alert["k8s"]["pod_uid"], uid, "{alert}");
    assert_eq!(alert["k8s"]["container_id"], container);
    assert_eq!(alert["k8s"]["qos"], "burstable");
    // For SIEMs: OCSF's container object (uid, pod_uuid), valid OCSF 1.8.
    let findings = wait_for(
        "the OCSF finding with its container",
        || {
            Some(monitor_tests::read_jsonl(&ocsf))
                .filter(|f| f.iter().any(|f| f["evidences"][0]["container"]["uid"] == container))
        },
        || agent.diagnostics(),
    );
    let finding = findings.iter().find(|f| f["evidences"][0]["container"]["uid"] == container).unwrap();
    assert_eq!(finding["evidences"][0]["container"]["pod_uuid"], uid);
    assert_eq!(finding["unmapped"]["k8s"]["qos"], "burstable");
    assert_eq!(monitor_tests::validate_ocsf(&dir, &ocsf), findings.len());
    let o = agent.cli(&["session", "end", "pod-task"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The pod's cgroups go deepest first (the test cgroup itself on drop).
    for dir in dirs.iter().skip(1).rev() {
        wait_for(&format!("rmdir {}", dir.display()), || std::fs::remove_dir(dir).ok(), String::new);
    }
}

/// The value of the first sample in a Prometheus text exposition whose line starts with `name`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn helm() -> std::path::PathBuf {
    let helm = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/peers/bin/helm");
    assert!(helm.exists(), "helm missing: cargo xtask test installs it under target/peers/bin");
    helm
}

/// The Helm chart lints, renders manifests valid against the Kubernetes 1.37 schemas, and its
/// DaemonSet is not privileged: it adds only the capabilities the agent was measured to need.
/// The agent, given only those (a capability bounding set), attaches every probe it attaches
/// as root and does what each one is there for; given none, it refuses to start.
#[test]
fn the_helm_chart_is_valid_least_privilege_and_enough() {
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/monitor");
    let o = Command::new(helm()).arg("lint").arg(&chart).output().unwrap();
    assert!(o.status.success(), "helm lint: {}{}", monitor_tests::stdout(&o), stderr(&o));
    let o =
        Command::new(helm()).args(["template", "mon"]).arg(&chart).args(["--namespace", "security"]).output().unwrap();
    assert!(o.status.success(), "helm template: {}", stderr(&o));
    let rendered = monitor_tests::stdout(&o);
    let dir = Scratch::new("ops-helm");
    let manifests = dir.write("rendered.yaml", &rendered);
    let o = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.37"])
        .arg(&manifests)
        .output()
        .unwrap();
    assert!(o.status.success(), "kubernetes-validate: {}{}", monitor_tests::stdout(&o), stderr(&o));
    for kind in ["DaemonSet", "ConfigMap", "ServiceAccount", "Service"] {
        assert!(rendered.contains(&format!("kind: {kind}\n")), "no {kind} rendered");
    }
    assert!(!rendered.contains("privileged: true"), "{rendered}");
    for line in [
        "privileged: false",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "hostPID: true",
        "drop: [\"ALL\"]",
    ] {
        assert!(rendered.contains(line), "missing `{line}`:\n{rendered}");
    }
    // The `add:` list of the rendered DaemonSet.
    let added: Vec<String> = rendered
        .lines()
        .skip_while(|l| l.trim() != "add:")
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- ").map(str::to_string))
        .collect();
    assert_eq!(added, ["SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH", "KILL"], "{rendered}");

    // The chart's agent.toml is one the agent takes (its node paths replaced by the test's).
    let toml: String = rendered
        .lines()
        .skip_while(|l| l.trim() != "agent.toml: |")
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with("policy.yaml"))
        .map(|l| format!("{}\n", l.trim()))
        .collect();
    assert!(toml.contains("metrics = \"0.0.0.0:9464\""), "{toml}");
    let config = dir.write("agent.toml", &toml);
    let policy_dir = Scratch::new("ops-helm-policy");
    let secret = policy_dir.path("token");
    std::fs::write(&secret, "not-a-real-token\n").unwrap();
    let policy = policy_dir.write("policy.yaml", &format!("credentials:\n  watch: [\"{}\"]\n", secret.display()));
    // Only the owner (nobody) may read the file: the agent needs DAC_READ_SEARCH to watch it.
    let o = Command::new("chown").args(["65534:65534"]).arg(&secret).output().unwrap();
    assert!(o.status.success());
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let bounding =
        format!("-all,{}", added.iter().map(|c| format!("+{}", c.to_lowercase())).collect::<Vec<_>>().join(","));
    let metrics = format!("127.0.0.1:{}", free_port());
    let spool = dir.path("spool");
    let traces = dir.path("traces");
    let flags = [
        "--config",
        config.to_str().unwrap(),
        "--metrics",
        &metrics,
        "--policy",
        policy.to_str().unwrap(),
        "--spool-dir",
        spool.to_str().unwrap(),
        "--trace-dir",
        traces.to_str().unwrap(),
    ];
    let agent =
        Agent::start_under("ops-helm-agent", &["setpriv", "--bounding-set", &bounding, "--inh-caps", "-all"], &flags);
    let log = std::fs::read_to_string(&agent.log).unwrap();
    // A probe this kernel refuses but whose stand-in restores what it provides (6.1: the
    // capability kprobe, the plaintext stand-in) loses nothing.
    let degraded: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("degraded") && !l.contains("opt-in") && !l.contains("; restored by "))
        .collect();
    assert!(degraded.is_empty(), "with the chart's capabilities nothing is degraded:\n{}", degraded.join("\n"));
    // DAC_READ_SEARCH: the file only nobody reads is watched; KILL: enforcement kills nobody's
    // process left behind; SYS_ADMIN: all of it loaded (an exec out of scope is seen).
    let file = session_file(
        &agent.dir,
        "helm-1",
        "grace: 1s\nenforce: true\nscope:\n  exec: [\"/bin/sh\", \"/usr/bin/dash\", \"/usr/bin/setpriv\"]\n",
    );
    let script = format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups /bin/sh -c 'cat {} > /dev/null; setsid sleep 30 > /dev/null 2>&1 &'",
        secret.display()
    );
    let o = agent.run(&file, &["/bin/sh", "-c", &script]);
    assert!(o.status.success(), "{}", stderr(&o));
    agent.wait_alert("credential_out_of_scope for the 0600 file", |a| a["rule"] == "credential_out_of_scope");
    agent.wait_alert("exec_out_of_scope", |a| a["rule"] == "exec_out_of_scope");
    wait_for(
        "the left-behind process of another user killed",
        || {
            std::fs::read_to_string(&agent.log)
                .ok()?
                .lines()
                .find(|l| l.contains("killed a process that outlived its task"))
                .map(str::to_string)
        },
        || agent.diagnostics(),
    );
    drop(agent);

    // With no capability at all the agent cannot load its programs, and says so.
    let o = Command::new("setpriv")
        .args(["--bounding-set", "-all", "--inh-caps", "-all"])
        .arg(monitor_bin())
        .args(["agent", "--control"])
        .arg(dir.path("none.sock"))
        .args(["--key-file"])
        .arg(dir.path("none.key"))
        .args(["--spool-dir", spool.to_str().unwrap()])
        // Nothing of this machine's default pin directory or state is touched by a test.
        .args(["--no-pin", "--state-dir"])
        .arg(dir.path("none-state"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("Operation not permitted"), "{}", stderr(&o));
}

/// The Python client (clients/python) an agent framework or a CI runner uses: it runs a task in
/// a session (exit code passed through), binds a running worker for a `with` block, lists and
/// shows sessions, and gets the agent's refusals as exceptions; the agent's alerts name both.
#[test]
fn the_python_client_runs_tasks_in_sessions() {
    let agent = Agent::start("ops-python");
    let client = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/python");
    let script = agent.dir.write("task.py", PYTHON_TASKS);
    let o = Command::new("python3").arg(&script).arg(&agent.control).env("PYTHONPATH", &client).output().unwrap();
    assert!(o.status.success(), "{}{}", monitor_tests::stdout(&o), stderr(&o));
    assert_eq!(monitor_tests::stdout(&o).trim(), "ok");
    for id in ["py-run", "py-with"] {
        let alert = agent.wait_alert(&format!("exec_out_of_scope in {id}"), |a| {
            a["rule"] == "exec_out_of_scope" && a["session"]["id"] == id && a["process"]["exe"] == "/bin/true"
        });
        assert_eq!(alert["session"]["actor"], "svc:py-bot");
    }
}

const PYTHON_TASKS: &str = r#"
import subprocess, sys
from monitor_client import Agent, MonitorError

agent = Agent(sys.argv[1])
def session(id):
    return {"id": id, "principal": "alice@example.com", "actor": "svc:py-bot", "task": "python " + id,
            "grace": "30s", "scope": {"exec": ["/bin/sh", "/usr/bin/dash"]}}

code = agent.run(session("py-run"), ["/bin/sh", "-c", "/bin/true; exit 3"])
assert code == 3, code
assert any(s["session"]["id"] == "py-run" for s in agent.list()), agent.list()
assert agent.show("py-run")["state"] == "ended", agent.show("py-run")

worker = subprocess.Popen(["/bin/sh", "-c", "read go; /bin/true"], stdin=subprocess.PIPE)
with agent.session(session("py-with"), pid=worker.pid) as started:
    assert started["id"] == "py-with", started
    assert agent.show("py-with")["state"] == "active"
    worker.communicate(b"go\n")
assert agent.show("py-with")["state"] == "ended"

try:
    agent.show("nothing-here")
    raise SystemExit("an unknown session was not refused")
except MonitorError as e:
    assert "no session nothing-here" in str(e), e
try:
    agent.start({"principal": "p", "actor": "a", "task": "t", "scope": {"connect": ["not a destination"]}})
    raise SystemExit("a bad session was not refused")
except MonitorError as e:
    assert "not a destination" in str(e) and "HOST:PORT" in str(e), e
print("ok")
"#;

/// The systemd unit passes `systemd-analyze verify` without a warning and bounds the agent to
/// the same measured capabilities as the Helm chart.
#[test]
fn the_systemd_unit_verifies_and_has_the_charts_capabilities() {
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/monitor-agent.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = Scratch::new("ops-systemd");
    let local = dir
        .write("monitor-agent.service", &text.replace("/usr/local/bin/monitor", &monitor_bin().display().to_string()));
    let o = Command::new("systemd-analyze").arg("verify").arg(&local).output().unwrap();
    assert!(o.status.success() && stderr(&o).trim().is_empty(), "systemd-analyze verify: {}", stderr(&o));
    let bounding = text.lines().find_map(|l| l.strip_prefix("CapabilityBoundingSet=")).expect("a bounding set");
    let caps: Vec<&str> = bounding.split_whitespace().map(|c| c.trim_start_matches("CAP_")).collect();
    let values = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/monitor/values.yaml"),
    )
    .unwrap();
    let chart = values.lines().find_map(|l| l.trim().strip_prefix("add: [")).expect("the chart's capabilities");
    let chart: Vec<&str> = chart.trim_end_matches(']').split(',').map(str::trim).collect();
    assert_eq!(caps, chart);
    for setting in
        ["NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=monitor", "ExecReload=/bin/kill -HUP $MAINPID"]
    {
        assert!(text.contains(setting), "missing {setting}");
    }
}

/// The collector's own /metrics: records stored and acknowledged, each sink caught up with the
/// store, and a connection of garbage counted as malformed input.
#[test]
fn the_collector_reports_ingest_store_and_sinks() {
    let dir = Scratch::new("ops-collector-metrics");
    let addr = format!("127.0.0.1:{}", free_port());
    let sink = dir.path("sink.jsonl");
    let sink_spec = format!("jsonl:{}", sink.display());
    let collector = Collector::start(&dir, &["--metrics", &addr, "--sink", &sink_spec]);
    assert_eq!(http_get(&format!("http://{addr}/readyz")).0, 200);
    let forward = format!("forward://127.0.0.1:{}", collector.port);
    let spool = dir.path("spool");
    let agent =
        Agent::start_with("ops-collector-agent", &["--output", &forward, "--spool-dir", spool.to_str().unwrap()]);
    let file = session_file(&agent.dir, "coll-1", "scope:\n  exec: [\"/bin/sh\", \"/usr/bin/dash\"]\n");
    let o = agent.run(&file, &["/bin/sh", "-c", "/bin/true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Garbage on the Forward port: that connection is closed, counted, and nothing else is hurt.
    let mut garbage = std::net::TcpStream::connect(("127.0.0.1", collector.port)).unwrap();
    std::io::Write::write_all(&mut garbage, &[0xc1; 64]).unwrap();
    // The sink is labelled by its name (as its cursor file is).
    let sink_seq = "monitor_collector_sink_sequence{output=\"jsonl-";
    let text = wait_for(
        "records stored, acknowledged, delivered to the sink, and the garbage counted",
        || {
            let (_, text) = http_get(&format!("http://{addr}/metrics"));
            let stored = sample(&text, "monitor_collector_stored_sequence")?;
            let ok = sample(&text, "monitor_collector_records_total")? >= 1.0
                && sample(&text, "monitor_collector_batches_acknowledged_total")? >= 1.0
                && stored >= 1.0
                && sample(&text, sink_seq)? == stored
                && sample(&text, "monitor_collector_connection_errors_total{reason=\"malformed\"}")? >= 1.0;
            ok.then_some(text)
        },
        || format!("{}\n{}", http_get(&format!("http://{addr}/metrics")).1, collector.logs()),
    );
    assert!(!text.contains("monitor_events_total"), "the agent's metrics are not the collector's: {text}");
}

/// 500 peers connect and each sends the start of a frame, then nothing (a slow-loris, no
/// authentication): the collector holds them within its limits, a well-behaved agent's alert is
/// still stored and acknowledged meanwhile, its memory stays bounded, and the slow ones are
/// closed once the time for a first message runs out. Past --max-connections, new connections
/// are refused with a log line.
#[test]
fn slow_peers_cannot_exhaust_the_collector() {
    let dir = Scratch::new("ops-collector-slow");
    let addr = format!("127.0.0.1:{}", free_port());
    let collector = Collector::start(&dir, &["--metrics", &addr, "--max-connections", "600"]);
    let rss = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix(" kB")?.parse().ok()).unwrap()
    };
    let pid = collector.process.child.id();
    let before = rss(pid);
    // A fixarray of 3 (a Forward message), a str of 13 announced, 5 of its bytes sent.
    let slow: Vec<std::net::TcpStream> = (0..500)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", collector.port)).unwrap();
            std::io::Write::write_all(&mut s, b"\x93\xadmonit").unwrap();
            s
        })
        .collect();
    wait_for(
        "500 slow connections open",
        || {
            (sample(&http_get(&format!("http://{addr}/metrics")).1, "monitor_collector_open_connections")? >= 500.0)
                .then_some(())
        },
        || collector.logs(),
    );
    // Past the limit: refused at once, and said so. Tried while the slow ones are surely open
    // (they are closed 10 s after their last byte, which a slow machine can spend starting an
    // agent).
    let extra: Vec<std::net::TcpStream> =
        (0..150).filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", collector.port)).ok()).collect();
    wait_for(
        "connections past --max-connections refused and logged",
        || collector.logs().contains("refusing connections").then_some(()),
        || collector.logs(),
    );
    drop(extra);
    let forward = format!("forward://127.0.0.1:{}", collector.port);
    let spool = dir.path("spool");
    let agent = Agent::start_with("ops-slow-agent", &["--output", &forward, "--spool-dir", spool.to_str().unwrap()]);
    let file = session_file(&agent.dir, "slow-1", "scope:\n  exec: [\"/bin/sh\", \"/usr/bin/dash\"]\n");
    let o = agent.run(&file, &["/bin/sh", "-c", "/bin/true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for(
        "the agent's alert stored and acknowledged beside the slow peers",
        || {
            let text = http_get(&format!("http://{addr}/metrics")).1;
            (sample(&text, "monitor_collector_batches_acknowledged_total")? >= 1.0).then_some(())
        },
        || collector.logs(),
    );
    let during = rss(pid);
    assert!(during < before + 64 * 1024, "RSS {before} kB before, {during} kB with 500 slow peers");
    // The slow ones never sent a whole message: closed when their time ran out.
    let text = wait_for(
        "the slow peers closed",
        || {
            let text = http_get(&format!("http://{addr}/metrics")).1;
            (sample(&text, "monitor_collector_connection_errors_total{reason=\"slow\"}")? >= 500.0).then_some(text)
        },
        || collector.logs(),
    );
    assert!(
        sample(&text, "monitor_collector_connection_errors_total{reason=\"refused\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    drop(slow);
}

/// Kill -9 the agent while a session with a background process is active, start another: the
/// process is still the session's (its out-of-scope connect is caught), a monitor_blind says how
/// long no agent looked, and process_outlived_task still fires at end + grace. After a normal
/// restart (SIGTERM) the ended session and its process are still known, and the process's next
/// connect is still the session's.
#[test]
fn sessions_survive_an_agent_restart() {
    let dir = Scratch::new("ops-restart");
    let state = dir.path("state");
    // The connect hooks watch a cgroup of the test's own, which the worker joins.
    let cg = monitor_tests::TestCgroup::new("restart");
    let state_arg = ["--state-dir", state.to_str().unwrap(), "--cgroup", cg.0.to_str().unwrap()];
    let port = monitor_tests::tcp_listener("127.0.0.3");
    let (go1, go2) = (dir.path("go1"), dir.path("go2"));
    // The session's worker: connects out of scope when told, twice; then lingers.
    let worker_script = format!(
        "import os, socket, time\n\
         for go in ({go1:?}, {go2:?}):\n\
         \x20   while not os.path.exists(go): time.sleep(0.02)\n\
         \x20   socket.create_connection(('127.0.0.3', {port})).close()\n\
         time.sleep(60)\n",
        go1 = go1.display().to_string(),
        go2 = go2.display().to_string()
    );
    let worker = worker_in(&cg, &worker_script);
    let pid = worker.0.id();
    let mut first = Agent::start_with("ops-restart-1", &state_arg);
    start_and_save(&first, &state, "survive-1", "grace: 2s\nscope:\n  connect: [\"127.0.0.2:80\"]\n", pid);
    first.kill();

    let mut second = Agent::start_with("ops-restart-2", &state_arg);
    let shown = second.cli(&["session", "show", "survive-1"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let summary: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(summary["state"], "active", "{summary}");
    assert!(summary["live_processes"].as_array().unwrap().iter().any(|p| p["pid"] == pid), "{summary}");
    let blind = second.wait_alert("monitor_blind for the time no agent ran", |a| {
        a["rule"] == "monitor_blind" && a["summary"].as_str().unwrap_or("").contains("no agent was running")
    });
    // The agent's own alert (no session's), naming the sessions that were not watched.
    assert!(blind["summary"].as_str().unwrap().contains("survive-1"), "{blind}");
    std::fs::write(&go1, "").unwrap();
    let alert = second.wait_alert("out_of_scope_connect by the adopted process", |a| {
        a["rule"] == "out_of_scope_connect" && a["process"]["pid"] == pid
    });
    assert_eq!(alert["session"]["id"], "survive-1");
    let o = second.cli(&["session", "end", "survive-1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    second.wait_alert("process_outlived_task at end + grace", |a| {
        a["rule"] == "process_outlived_task" && a["process"]["pid"] == pid
    });

    // A normal restart: the ended session and its lingering process are taken over too.
    second.stop();
    let third = Agent::start_with("ops-restart-3", &state_arg);
    let shown = third.cli(&["session", "show", "survive-1"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let summary: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(summary["state"], "ended", "{summary}");
    std::fs::write(&go2, "").unwrap();
    let after = third.wait_alert("the adopted process's connect after the end", |a| {
        a["process"]["pid"] == pid && a["rule"] != "monitor_blind"
    });
    assert_eq!(after["session"]["id"], "survive-1", "{after}");

    // --fresh: the state is not adopted.
    drop(third);
    let fresh_args = [state_arg.as_slice(), &["--fresh"]].concat();
    let fresh = Agent::start_with("ops-restart-fresh", &fresh_args);
    let o = fresh.cli(&["session", "show", "survive-1"]);
    assert!(!o.status.success() && stderr(&o).contains("no session survive-1"), "{}", stderr(&o));
}

/// The maps that bind processes to sessions are pinned: a process the state file never saw (a
/// session process forked it, then exited, while the agent could not save: here the agent is
/// SIGSTOPped, then killed) is still the session's after a restart, because the kernel's map
/// kept it. Without the pins the new agent would know only the saved processes and their
/// descendants, and this daemonised grandchild is neither.
#[test]
fn pinned_maps_keep_a_process_the_state_file_never_saw() {
    let dir = Scratch::new("ops-pins");
    let state = dir.path("state");
    let pins = monitor_tests::PinScratch::new("ops-pins");
    let cg = monitor_tests::TestCgroup::new("pins");
    let args = ["--state-dir", state.to_str().unwrap(), "--pin-dir", pins.arg(), "--cgroup", cg.0.to_str().unwrap()];
    let port = monitor_tests::tcp_listener("127.0.0.3");
    let (fork, grandchild_pid, go) = (dir.path("fork"), dir.path("grandchild.pid"), dir.path("go"));
    // The worker double-forks when told: the middle process exits at once, so the grandchild
    // is reparented away from the session's root; it connects out of scope when told.
    let worker_script = format!(
        "import os, socket, time\n\
         while not os.path.exists({fork:?}): time.sleep(0.02)\n\
         if os.fork() == 0:\n\
         \x20   if os.fork() == 0:\n\
         \x20       open({pidfile:?}, 'w').write(str(os.getpid()))\n\
         \x20       while not os.path.exists({go:?}): time.sleep(0.02)\n\
         \x20       socket.create_connection(('127.0.0.3', {port})).close()\n\
         \x20       time.sleep(60)\n\
         \x20   os._exit(0)\n\
         time.sleep(60)\n",
        fork = fork.display().to_string(),
        pidfile = grandchild_pid.display().to_string(),
        go = go.display().to_string(),
    );
    let worker = worker_in(&cg, &worker_script);
    let pid = worker.0.id();
    let mut first = Agent::start_with("ops-pins-1", &args);
    let saved = start_and_save(&first, &state, "pinned-1", "scope:\n  connect: [\"127.0.0.2:80\"]\n", pid);
    // The agent can no longer save anything; its programs still run in the kernel and bind the
    // grandchild at its fork, with its start (by which the next agent knows it is that process
    // and not another that reused its pid).
    // SAFETY: signalling the agent, our own child.
    unsafe { libc::kill(first.pid() as i32, libc::SIGSTOP) };
    std::fs::write(&fork, "").unwrap();
    let grandchild: u32 = wait_for(
        "the grandchild's pid",
        || std::fs::read_to_string(&grandchild_pid).ok().and_then(|t| t.trim().parse().ok()),
        || first.diagnostics(),
    );
    let state_text = std::fs::read_to_string(&saved).unwrap();
    let state_json: serde_json::Value = serde_json::from_str(&state_text).unwrap();
    let saved_pids: Vec<u64> =
        state_json["sessions"][0]["pids"].as_array().unwrap().iter().filter_map(|p| p.as_u64()).collect();
    assert!(!saved_pids.contains(&(grandchild as u64)), "the state file must not know the grandchild: {saved_pids:?}");
    first.kill();

    let second = Agent::start_with("ops-pins-2", &args);
    let log = std::fs::read_to_string(&second.log).unwrap();
    assert!(log.contains("bindings taken from the pinned maps"), "{}", second.diagnostics());
    let shown = second.cli(&["session", "show", "pinned-1"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let summary: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert!(
        summary["live_processes"].as_array().unwrap().iter().any(|p| p["pid"] == grandchild),
        "the grandchild is the session's again: {summary}"
    );
    std::fs::write(&go, "").unwrap();
    let alert = second.wait_alert("out_of_scope_connect by the grandchild only the pinned map knew", |a| {
        a["rule"] == "out_of_scope_connect" && a["process"]["pid"] == grandchild
    });
    assert_eq!(alert["session"]["id"], "pinned-1", "{alert}");
    drop(second);

    // --fresh: the pinned bindings go too; the grandchild belongs to no session.
    let fresh_args = [args.as_slice(), &["--fresh"]].concat();
    let fresh = Agent::start_with("ops-pins-fresh", &fresh_args);
    let o = fresh.cli(&["session", "show", "pinned-1"]);
    assert!(!o.status.success(), "{}", stderr(&o));
    let log = std::fs::read_to_string(&fresh.log).unwrap();
    assert!(!log.contains("bindings taken from the pinned maps"), "{}", fresh.diagnostics());
}

/// The Dockerfile's runtime stage builds and runs the agent with the Helm chart's settings.
/// podman builds it: the same lines, with this build's binary in place of the build stage's
/// (which needs an image registry and the network), on a Debian image of the same release made
/// with mmdebstrap (no registry is reachable from these machines; see xtask's setup). The
/// container runs as the chart runs it: root with only the chart's capabilities, the default
/// seccomp profile, a read-only root filesystem, the host's pids and network, tracefs, cgroup2
/// and bpffs, the chart's rendered ConfigMap as /etc/monitor; the agent loads its probes, pins
/// its maps, says it is ready with nothing degraded, and `monitor probes` on the host reaches
/// it through the shared control socket directory.
#[test]
fn the_image_runs_the_agent_as_the_chart_does() {
    monitor_tests::require_root();
    let dir = Scratch::new("ops-image");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let base = root.join("target/peers/debian-bookworm-minbase.tar");
    assert!(base.exists(), "{} is made by the test setup (cargo xtask test)", base.display());
    podman(&["import", "--quiet", base.to_str().unwrap(), "docker.io/library/debian:bookworm-slim"]);
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let (_, runtime) = dockerfile.split_once("AS runtime\n").expect("a runtime stage");
    let copy = "COPY --from=build /usr/local/bin/monitor /usr/local/bin/monitor";
    assert!(runtime.contains(copy), "{runtime}");
    let context = dir.path("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::copy(monitor_bin(), context.join("monitor")).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "ARG DEBIAN_RELEASE=bookworm\nFROM docker.io/library/debian:${{DEBIAN_RELEASE}}-slim AS runtime\n{}",
            runtime.replace(copy, "COPY monitor /usr/local/bin/monitor")
        ),
    )
    .unwrap();
    let image = Image(format!("localhost/monitor-test:{}", std::process::id()));
    podman(&["build", "--quiet", "--pull=never", "-t", &image.0, context.to_str().unwrap()]);

    // The chart's own agent.toml and policy.yaml, from its rendered ConfigMap.
    let config = dir.path("config");
    let rendered = Command::new(root.join("target/peers/bin/helm"))
        .args(["template", "monitor"])
        .arg(root.join("deploy/helm/monitor"))
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{}", stderr(&rendered));
    let extract = "import pathlib, sys, yaml\n\
                   out = pathlib.Path(sys.argv[1]); out.mkdir()\n\
                   for doc in yaml.safe_load_all(sys.stdin):\n\
                   \x20   if doc and doc['kind'] == 'ConfigMap':\n\
                   \x20       for name, text in doc['data'].items(): (out / name).write_text(text)\n";
    let mut python = Command::new("python3").args(["-c", extract]).arg(&config).stdin(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut python.stdin.take().unwrap(), &rendered.stdout).unwrap();
    assert!(python.wait().unwrap().success());
    assert!(config.join("agent.toml").exists() && config.join("policy.yaml").exists());
    let shared = dir.path("run");
    let state = dir.path("state");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let cg = monitor_tests::TestCgroup::new("image");
    let cgroup2 = cg.0.parent().unwrap();
    let pins = monitor_tests::PinScratch::new("ops-image");
    let metrics = format!("127.0.0.1:{}", monitor_tests::peers::free_port());
    let container = Container(format!("monitor-test-{}", std::process::id()));
    let mounts = [
        format!("{}:/etc/monitor:ro", config.display()),
        format!("{}:/run/monitor", shared.display()),
        format!("{}:/var/lib/monitor", state.display()),
        "/sys/kernel/tracing:/sys/kernel/tracing:ro".to_string(),
        format!("{}:/sys/fs/cgroup:ro", cgroup2.display()),
        "/sys/fs/bpf:/sys/fs/bpf".to_string(),
    ];
    let cgroup_in_container = format!("/sys/fs/cgroup/{}", cg.0.file_name().unwrap().to_str().unwrap());
    let mut run: Vec<&str> = vec![
        "run",
        "--detach",
        "--name",
        &container.0,
        // crun refuses this machine's hybrid cgroups; the defaults' rlimits exceed what this
        // sandbox lets even root raise.
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
        "--pid=host",
        "--network=host",
        "--read-only",
        "--cap-drop=ALL",
    ];
    for cap in ["SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH", "KILL"] {
        run.extend(["--cap-add", cap]);
    }
    for m in &mounts {
        run.extend(["--volume", m]);
    }
    // The chart's arguments, then this test's own: loopback metrics on a free port (the host's
    // network), the test cgroup, a pin directory of its own.
    run.extend([
        &image.0,
        "agent",
        "--config",
        "/etc/monitor/agent.toml",
        "--metrics",
        &metrics,
        "--cgroup",
        &cgroup_in_container,
        "--pin-dir",
        pins.arg(),
    ]);
    podman(&run);
    let logs = || {
        let o = Command::new("podman").args(["logs", &container.0]).output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };
    wait_for("the agent in the container ready", || logs().contains("agent ready").then_some(()), logs);
    let log = logs();
    assert!(!log.contains("degraded:") && !log.contains("ERROR"), "{log}");
    assert!(pins.0.join("PROC_SESSIONS").exists(), "pinned from the container: {log}");
    let o = Command::new(monitor_bin())
        .args(["probes", "--json"])
        .env("MONITOR_CONTROL", shared.join("control.sock"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let probes = String::from_utf8_lossy(&o.stdout);
    assert!(probes.contains("sched_process_exec") && probes.contains("connect4"), "{probes}");
    assert_eq!(http_get(&format!("http://{metrics}/readyz")), (200, "ready\n".to_string()));
}

fn podman(args: &[&str]) -> String {
    let o = Command::new("podman").args(args).output().expect("podman (installed by the test setup)");
    assert!(o.status.success(), "podman {args:?}: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A container removed when the test ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "--force", "--time", "5", &self.0]).output();
    }
}

/// An image removed when the test ends.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rmi", "--force", &self.0]).output();
    }
}

/// A Python worker running `script`, in the test cgroup `cg` (whose connects the agent sees).
fn worker_in(cg: &monitor_tests::TestCgroup, script: &str) -> KillOnDrop {
    let worker = KillOnDrop(
        Command::new("python3").args(["-c", script]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap(),
    );
    std::fs::write(cg.procs(), worker.0.id().to_string()).unwrap();
    worker
}

/// Starts session `id` (`extra` appended to its file) bound to `pid`, and waits until the
/// agent has saved it with that process in `state`; returns the state file.
fn start_and_save(agent: &Agent, state: &std::path::Path, id: &str, extra: &str, pid: u32) -> std::path::PathBuf {
    let file = session_file(&agent.dir, id, extra);
    let o = agent.cli(&["session", "start", "--file", file.to_str().unwrap(), "--pid", &pid.to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let saved = state.join("sessions.json");
    // The process among the session's saved processes, not merely its pid anywhere in the file
    // (the binding's root names it too, and is saved before the process table is).
    let process_saved = |text: &str| {
        let state: serde_json::Value = serde_json::from_str(text).ok()?;
        let session = state["sessions"].as_array()?.iter().find(|s| s["session"]["id"] == id)?;
        session["pids"].as_array()?.iter().any(|p| p == pid).then_some(())
    };
    wait_for(
        "the session and its process in the state file",
        || std::fs::read_to_string(&saved).ok().and_then(|text| process_saved(&text)),
        || agent.diagnostics(),
    );
    saved
}

/// A child killed and reaped when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
