//! Network scope on the real kernel: the agent's connect hooks attach under a cgroup made by
//! the test, and the workloads run inside it, so a bug in the deny path cannot cut this
//! machine's other connections. Traffic goes to 127.0.0.0/8 and ::1 only.

use std::{fs, process::Command};

use monitor_tests::{net::*, *};
use serde_json::Value;

#[test]
fn connects_in_and_out_of_scope_over_tcp_udp_and_ipv6() {
    // With the opt-in syscall probes: connects also carry their fd, and their outcome follows.
    let net =
        Net::start_with("netscope", &["--enable-probe", "sys_enter_connect", "--enable-probe", "sys_exit_connect"]);
    let (tcp_in, tcp_out) = (tcp_listener("127.0.0.2"), tcp_listener("127.0.0.3"));
    let (udp_in, udp_out) = (udp_listener("127.0.0.2"), udp_listener("127.0.0.3"));
    let (v6_in, v6_out) = (tcp_listener("::1"), tcp_listener("::1"));
    let scope =
        format!("grace: 1s\nscope:\n  connect: [\"127.0.0.2:{tcp_in}\", \"127.0.0.2:{udp_in}\", \"[::1]:{v6_in}\"]\n");
    let session = session_file(&net.agent.dir, "net-1", &scope);
    let out = net.agent.dir.path("outcomes");
    let script = [
        net.connect(&out, "tcp_in", "tcp", "127.0.0.2", tcp_in),
        net.connect(&out, "udp_in", "udp-connected", "127.0.0.2", udp_in),
        net.connect(&out, "v6_in", "tcp", "::1", v6_in),
        net.connect(&out, "tcp_out", "tcp", "127.0.0.3", tcp_out),
        net.connect(&out, "udp_out", "udp", "127.0.0.3", udp_out),
        net.connect(&out, "v6_out", "tcp", "::1", v6_out),
    ]
    .join("; ");
    let o = net.run(&session, &script);
    assert!(o.status.success(), "{}", stderr(&o));
    let results = outcomes(&out);
    assert!(results.values().all(|r| r == "ok"), "an observing session changes nothing: {results:?}");
    assert_eq!(results.len(), 6);

    for (port, proto) in [(tcp_out, "tcp"), (udp_out, "udp"), (v6_out, "tcp")] {
        let alert = net.agent.wait_alert(&format!("out_of_scope_connect to port {port}"), |a| {
            a["rule"] == "out_of_scope_connect" && a["network"]["dst_port"] == port
        });
        assert_eq!(alert["network"]["protocol"], proto);
        assert_eq!(alert["action"], "observed");
        assert_eq!(alert["session"]["id"], "net-1");
        assert!(alert["process"]["exe"].as_str().unwrap().contains("python3"));
    }
    // In-scope destinations: connect events, no alert.
    let events = net.agent.events();
    for port in [tcp_in, udp_in, v6_in] {
        assert!(events.iter().any(|e| e["type"] == "connect" && e["port"] == port), "no connect event to {port}");
    }
    let tcp = events.iter().find(|e| e["type"] == "connect" && e["port"] == tcp_in).unwrap();
    let fd = tcp["fd"].as_i64().expect("the socket fd of a connect(2)");
    let outcome = events
        .iter()
        .find(|e| e["type"] == "connect_result" && e["pid"] == tcp["pid"] && e["fd"] == fd)
        .expect("the outcome of the connect");
    assert_eq!(outcome["ret"], 0, "a blocking connect to a listener succeeds");
    let alerts = out_of_scope(&net.agent);
    assert_eq!(alerts.len(), 3, "{alerts:#?}");

    let v6 = alerts.iter().find(|a| a["network"]["dst_port"] == v6_out).unwrap();
    assert_eq!(v6["network"]["dst_ip"], "::1");
}

#[test]
fn a_lateral_hop_through_a_child_is_attributed_with_its_chain() {
    let net = Net::start("lateral");
    let allowed = tcp_listener("127.0.0.2");
    let lateral = tcp_listener("127.0.0.4");
    let session = session_file(&net.agent.dir, "hop-1", &format!("scope:\n  connect: [\"127.0.0.2:{allowed}\"]\n"));
    let out = net.agent.dir.path("outcomes");
    let hop = net.connect(&out, "hop", "tcp", "127.0.0.4", lateral);
    let o = net.run(&session, &format!("/bin/sh -c \"{hop}\""));
    assert!(o.status.success(), "{}", stderr(&o));
    let alert = net.agent.wait_alert("out_of_scope_connect of the hop", |a| a["rule"] == "out_of_scope_connect");
    assert_eq!(alert["network"]["dst_ip"], "127.0.0.4");
    let chain: Vec<&str> =
        alert["process"]["chain"].as_array().unwrap().iter().map(|a| a["exe"].as_str().unwrap()).collect();
    assert_eq!(chain.len(), 2, "python3 <- sh <- sh (root): {chain:?}");
    assert!(chain.iter().all(|e| e.ends_with("sh") || e.ends_with("dash")), "{chain:?}");
}

#[test]
fn an_enforcing_session_is_refused_out_of_scope_and_after_its_end_and_an_observing_one_is_not() {
    let net = Net::start("enforce");
    let allowed = tcp_listener("127.0.0.2");
    let denied = tcp_listener("127.0.0.3");
    // The grace covers the background process's start and its late connect (seconds under
    // emulation: the kernel matrix).
    let grace = 3 * slowdown();
    let scope = format!("grace: {grace}s\nscope:\n  connect: [\"127.0.0.2:{allowed}\"]\n");
    let enforcing = session_file(&net.agent.dir, "enforce-1", &format!("enforce: true\n{scope}"));
    let observing = session_file(&net.agent.dir, "observe-1", &scope);
    let (out_e, out_o) = (net.agent.dir.path("enforcing"), net.agent.dir.path("observing"));
    let pids = net.agent.dir.path("pids");

    // The observing session runs alongside: nothing is refused there.
    let observe = [
        net.connect(&out_o, "in", "tcp", "127.0.0.2", allowed),
        net.connect(&out_o, "out", "tcp", "127.0.0.3", denied),
    ]
    .join("; ");
    // In the enforcing one, a background process outlives the task and connects after its end.
    let late = net.connect_quickly(&out_e, "late", "127.0.0.2", allowed);
    let enforce = format!(
        "{}; {}; ( sleep 1; {late}; exec sleep 60 ) & echo \"bg=$! done\" > {}",
        net.connect(&out_e, "in", "tcp", "127.0.0.2", allowed),
        net.connect(&out_e, "out", "tcp", "127.0.0.3", denied),
        pids.display()
    );
    let o = net.run(&observing, &observe);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = net.run(&enforcing, &enforce);
    assert!(o.status.success(), "{}", stderr(&o));
    let bg = read_pids(&pids)["bg"];

    let observed = outcomes(&out_o);
    assert_eq!(observed.get("in").map(String::as_str), Some("ok"));
    assert_eq!(observed.get("out").map(String::as_str), Some("ok"), "the observing session is never refused");

    let blocked = net.agent.wait_alert("the blocked connect after the end", |a| {
        a["rule"] == "activity_after_task_end" && a["action"] == "blocked"
    });
    assert_eq!(blocked["network"]["dst_ip"], "127.0.0.2", "refused although in scope: the task ended");
    let enforced = outcomes(&out_e);
    assert_eq!(enforced.get("in").map(String::as_str), Some("ok"));
    assert_eq!(enforced.get("out").map(String::as_str), Some("EPERM"));
    assert_eq!(enforced.get("late").map(String::as_str), Some("EPERM"));

    let killed = net.agent.wait_alert("the kill of the background process", |a| {
        a["rule"] == "process_outlived_task" && a["action"] == "killed"
    });
    assert_eq!(killed["process"]["pid"], bg);
    wait_for("the background process to die", || (!alive(bg)).then_some(()), || net.agent.diagnostics());

    let refused = out_of_scope(&net.agent);
    let by_session = |id: &str| refused.iter().filter(|a| a["session"]["id"] == id).cloned().collect::<Vec<_>>();
    assert_eq!(by_session("enforce-1").len(), 1);
    assert_eq!(by_session("enforce-1")[0]["action"], "blocked");
    assert_eq!(by_session("observe-1").len(), 1);
    assert_eq!(by_session("observe-1")[0]["action"], "observed");
}

/// Names added to /etc/hosts for one test, so getaddrinfo resolves them locally; the file is
/// restored on drop (panics included).
struct HostsEntries {
    original: String,
}

impl HostsEntries {
    fn add(entries: &[(&str, &str)]) -> Self {
        let original = fs::read_to_string("/etc/hosts").unwrap();
        let mut text = original.clone();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        for (addr, name) in entries {
            text.push_str(&format!("{addr} {name} # monitor test\n"));
        }
        fs::write("/etc/hosts", text).unwrap();
        Self { original }
    }
}

impl Drop for HostsEntries {
    fn drop(&mut self) {
        let _ = fs::write("/etc/hosts", &self.original);
    }
}

#[test]
fn name_scopes_allow_what_their_names_resolve_to_and_nothing_else() {
    let net = Net::start("names");
    let port = tcp_listener("127.0.0.5");
    let (denied, suffixed) = (tcp_listener("127.0.0.6"), tcp_listener("127.0.0.7"));
    let _hosts = HostsEntries::add(&[
        ("127.0.0.5", "api.allowed.test"),
        ("127.0.0.6", "evil.denied.test"),
        ("127.0.0.7", "eu.payments.test"),
    ]);
    let scope = format!("scope:\n  connect: [\"api.allowed.test:{port}\", \"*.payments.test:{suffixed}\"]\n");
    for (id, enforce) in [("names-observe", false), ("names-enforce", true)] {
        let session = session_file(&net.agent.dir, id, &format!("enforce: {enforce}\n{scope}"));
        let out = net.agent.dir.path(id);
        let script = [
            net.connect(&out, "allowed", "tcp", "api.allowed.test", port),
            net.connect(&out, "denied", "tcp", "evil.denied.test", denied),
            net.connect(&out, "suffix", "tcp", "eu.payments.test", suffixed),
        ]
        .join("; ");
        let o = net.run(&session, &script);
        assert!(o.status.success(), "{}", stderr(&o));
        let results = outcomes(&out);
        assert_eq!(results.get("allowed").map(String::as_str), Some("ok"), "{id}: {results:?}");
        assert_eq!(results.get("suffix").map(String::as_str), Some("ok"), "{id}: {results:?}");
        let denied_outcome = if enforce { "EPERM" } else { "ok" };
        assert_eq!(results.get("denied").map(String::as_str), Some(denied_outcome), "{id}: {results:?}");

        let alert = net.agent.wait_alert(&format!("{id}: the denied name"), |a| {
            a["rule"] == "out_of_scope_connect" && a["session"]["id"] == id
        });
        assert_eq!(alert["network"]["dst_name"], "evil.denied.test");
        assert_eq!(alert["network"]["dst_ip"], "127.0.0.6");
        assert_eq!(alert["action"], if enforce { "blocked" } else { "observed" });
    }
    // Exactly the one denied name per session, and resolutions were seen.
    assert_eq!(out_of_scope(&net.agent).len(), 2, "{}", net.agent.diagnostics());
    let resolved: Vec<Value> = net.agent.events().into_iter().filter(|e| e["type"] == "resolve").collect();
    assert!(resolved.iter().any(|e| e["name"] == "eu.payments.test" && e["addrs"][0] == "127.0.0.7"));
}

#[test]
fn the_policy_gives_actor_scopes_severities_and_never_alert_destinations() {
    let (allowed, resolver, other) = (tcp_listener("127.0.0.2"), tcp_listener("127.0.0.8"), tcp_listener("127.0.0.3"));
    let dir = Scratch::new("policy-files");
    let policy = dir.write(
        "policy.yaml",
        &format!(
            "defaults:\n  grace: 2s\nseverity:\n  out_of_scope_connect: critical\nactors:\n  \"svc:test-bot\":\n    connect: [\"127.0.0.2:{allowed}\"]\nnever_alert:\n  connect: [\"127.0.0.8:{resolver}\"]\n"
        ),
    );
    let o = Command::new(monitor_bin()).args(["policy", "check"]).arg(&policy).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("ok: 1 actor scope(s), 1 severity override(s), 1 never-alert destination(s)"),
        "{}",
        stdout(&o)
    );

    let bad = dir.write("bad.yaml", "severity:\n  out_of_scope_connect: loud\n");
    let o = Command::new(monitor_bin()).args(["policy", "check"]).arg(&bad).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bad.yaml:2:") && stderr(&o).contains("loud"), "{}", stderr(&o));
    // An agent given a bad policy does not start.
    let o = Command::new(monitor_bin())
        .args(["agent", "--control"])
        .arg(dir.path("never.sock"))
        .arg("--policy")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bad.yaml:2:"), "{}", stderr(&o));

    let cg = TestCgroup::new("policy");
    let agent =
        Agent::start_with("policy", &["--cgroup", cg.0.to_str().unwrap(), "--policy", policy.to_str().unwrap()]);
    let net = Net { client: agent.dir.write("client.py", CLIENT).display().to_string(), agent, cg };
    // No scope in the file: the actor's scope from the policy applies, and it is enforced.
    let session = session_file(&net.agent.dir, "policy-1", "enforce: true\n");
    let out = net.agent.dir.path("outcomes");
    let script = [
        net.connect(&out, "allowed", "tcp", "127.0.0.2", allowed),
        net.connect(&out, "resolver", "tcp", "127.0.0.8", resolver),
        net.connect(&out, "other", "tcp", "127.0.0.3", other),
    ]
    .join("; ");
    let o = net.run(&session, &script);
    assert!(o.status.success(), "{}", stderr(&o));
    let results = outcomes(&out);
    assert_eq!(results.get("allowed").map(String::as_str), Some("ok"), "{results:?}");
    assert_eq!(results.get("resolver").map(String::as_str), Some("ok"), "{results:?}");
    assert_eq!(results.get("other").map(String::as_str), Some("EPERM"), "{results:?}");
    let alert = net.agent.wait_alert("out_of_scope_connect", |a| a["rule"] == "out_of_scope_connect");
    assert_eq!(alert["severity"], "critical");
    assert_eq!(alert["network"]["dst_ip"], "127.0.0.3");
    let shown: Value = serde_json::from_slice(&net.agent.cli(&["session", "show", "policy-1"]).stdout).unwrap();
    assert_eq!(shown["session"]["grace_ns"], 2_000_000_000u64, "the policy's default grace");
    assert_eq!(out_of_scope(&net.agent).len(), 1, "{}", net.agent.diagnostics());
}
