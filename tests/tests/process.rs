//! Process attribution on the real kernel: the real agent, real probes, real processes.
//! Root is required; without it these tests fail (they never skip).

use std::{fs, process::Command};

use monitor_tests::*;
use serde_json::Value;

fn key_of(event: &Value) -> u64 {
    event.get("session").and_then(Value::as_u64).unwrap_or(0)
}

fn execs(agent: &Agent) -> Vec<Value> {
    agent.events().into_iter().filter(|e| e["type"] == "exec").collect()
}

/// The chain script: five levels of fork+exec, then a multi-threaded process and a daemon
/// (double fork + setsid) at the bottom. Each writes `name=pid` to $1.
const CHAIN: &str = r#"#!/bin/sh
out=$1; depth=$2
echo "level$depth=$$" >> "$out"
if [ "$depth" -lt 5 ]; then
  /bin/sh "$0" "$out" $((depth + 1))
  exit 0
fi
python3 -c '
import os, sys, threading
tids = []
ready = threading.Barrier(4)
def work():
    tids.append(threading.get_native_id()); ready.wait()
ts = [threading.Thread(target=work) for _ in range(3)]
[t.start() for t in ts]; ready.wait(); [t.join() for t in ts]
with open(sys.argv[1], "a") as f:
    f.write("threaded=%d %s\n" % (os.getpid(), " ".join("tid%d=%d" % (i, t) for i, t in enumerate(tids))))
' "$out"
sh -c 'setsid /bin/sh -c "echo daemon=\$\$ >> $1; exec sleep 30" &' daemonizer "$out"
while ! grep -q daemon= "$out"; do sleep 0.05; done
echo done >> "$out"
"#;

#[test]
fn run_attributes_a_five_deep_chain_threads_and_a_daemon() {
    let agent = Agent::start("chain");
    let script = agent.dir.script("chain.sh", CHAIN);
    let out = agent.dir.path("pids");
    let file = session_file(&agent.dir, "chain-1", "grace: 1s\n");
    let o = agent.run(&file, &[script.to_str().unwrap(), out.to_str().unwrap(), "1"]);
    assert!(o.status.success(), "monitor run failed: {}", stderr(&o));
    let pids = read_pids(&out);
    let daemon = pids["daemon"];

    // The daemon outlived the task: one alert for it, with the whole lineage to the root.
    let alert = agent.wait_alert("process_outlived_task for the daemon", |a| {
        a["rule"] == "process_outlived_task" && a["process"]["pid"] == daemon
    });
    kill(daemon);
    assert_eq!(alert["session"]["id"], "chain-1");
    assert_eq!(alert["session"]["state"], "ended");
    assert_eq!(alert["process"]["exe"], "/usr/bin/sleep");
    let chain: Vec<u64> =
        alert["process"]["chain"].as_array().unwrap().iter().map(|a| a["pid"].as_u64().unwrap()).collect();
    let levels: Vec<u64> = (1..=5).rev().map(|d| pids[&format!("level{d}")] as u64).collect();
    let chain_levels: Vec<u64> = chain.iter().copied().filter(|p| levels.contains(p)).collect();
    assert_eq!(chain_levels, levels, "chain {chain:?} must pass through every level up to the root");
    assert_eq!(*chain.last().unwrap(), levels[4], "the chain ends at the session root");

    // Every process is attributed to the one session, from its first exec.
    let execs = execs(&agent);
    let key = execs.iter().find(|e| e["pid"] == pids["level1"]).map(key_of).expect("root exec attributed");
    for name in ["level1", "level2", "level3", "level4", "level5", "threaded", "daemon"] {
        let pid = pids[name];
        assert!(
            execs.iter().any(|e| e["pid"] == pid && key_of(e) == key),
            "{name} (pid {pid}) has no attributed exec\n{}",
            agent.diagnostics()
        );
    }
    // Forks link each level to the next.
    let events = agent.events();
    for d in 1..5 {
        let (parent, child) = (pids[&format!("level{d}")], pids[&format!("level{}", d + 1)]);
        assert!(
            events.iter().any(|e| e["type"] == "fork" && e["parent"] == parent && e["child"] == child),
            "no fork {parent} -> {child}"
        );
    }
    // Threads belong to their process: no fork and no exit of their own, one exit for the process.
    let threaded = pids["threaded"];
    let tids: Vec<u32> = pids.iter().filter(|(k, _)| k.starts_with("tid")).map(|(_, v)| *v).collect();
    assert_eq!(tids.len(), 3);
    for tid in tids.iter().filter(|t| **t != threaded) {
        assert!(
            !events.iter().any(|e| e["type"] == "fork" && e["child"] == *tid),
            "thread {tid} reported as a process"
        );
        assert!(!events.iter().any(|e| e["type"] == "exit" && e["pid"] == *tid), "thread {tid} exit reported");
    }
    let exits = events.iter().filter(|e| e["type"] == "exit" && e["pid"] == threaded).count();
    assert_eq!(exits, 1, "one exit for the multi-threaded process");
    // Only the daemon outlived the task.
    let outlived: Vec<_> = agent.alerts().into_iter().filter(|a| a["rule"] == "process_outlived_task").collect();
    assert_eq!(outlived.len(), 1, "{outlived:?}");
}

#[test]
fn run_passes_the_exit_code_through_and_ends_the_session() {
    let agent = Agent::start("exitcode");
    let file = session_file(&agent.dir, "exit-7", "");
    let o = agent.run(&file, &["/bin/sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let o = agent.cli(&["session", "show", "exit-7"]);
    let shown: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["state"], "ended");
    assert_eq!(shown["end_reason"], "root_exited");
    let o = agent.run(&file.with_file_name("missing.yaml"), &["/bin/true"]);
    assert_eq!(o.status.code(), Some(1));
    let o = agent.run(&session_file(&agent.dir, "noexec", ""), &["/nonexistent/tool"]);
    assert_eq!(o.status.code(), Some(127), "{}", stderr(&o));
}

#[test]
fn a_process_that_outlives_its_task_is_reported_with_its_pid() {
    let agent = Agent::start("outlive");
    let out = agent.dir.path("pids");
    let file = session_file(&agent.dir, "outlive-1", "grace: 1s\n");
    let script = format!("sleep 30 & echo \"bg=$! done\" > {}; sleep 0.2; exit 0", out.display());
    let o = agent.run(&file, &["/bin/sh", "-c", &script]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bg = read_pids(&out)["bg"];
    let alert = agent.wait_alert("process_outlived_task", |a| a["rule"] == "process_outlived_task");
    kill(bg);
    assert_eq!(alert["process"]["pid"], bg);
    assert_eq!(alert["severity"], "medium");
    assert_eq!(alert["owasp_nhi"][0], "NHI1");
    assert_eq!(alert["session"]["principal"], "alice@example.com");
    assert!(alert["id"].as_str().unwrap().len() == 26, "ULID id");
    assert!(alert["time"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn the_same_actions_outside_any_session_give_no_event() {
    let agent = Agent::start("outside");
    // A session is active for another process, so the probes are busy attributing something.
    let mut holder = Command::new("sleep").arg("30").spawn().unwrap();
    let file = session_file(&agent.dir, "holder", "");
    let o = agent.cli(&["session", "start", "--file", file.to_str().unwrap(), "--pid", &holder.id().to_string()]);
    assert!(o.status.success(), "{}", stderr(&o));

    let script = agent.dir.script("chain.sh", CHAIN);
    let out = agent.dir.path("pids");
    let status = Command::new(&script).arg(&out).arg("1").status().unwrap();
    assert!(status.success());
    let pids = read_pids(&out);
    kill(pids["daemon"]);

    // A marker inside a session, after the outside run: once it is seen, anything the outside
    // run produced would have been seen before it.
    let marker = session_file(&agent.dir, "marker", "");
    agent.run(&marker, &["/usr/bin/env", "true", "outside-marker"]);
    agent.wait_event("the marker exec", |e| e["type"] == "exec" && e["argv"].to_string().contains("outside-marker"));

    let outside: Vec<u32> = pids.values().copied().collect();
    let leaked: Vec<Value> = agent
        .events()
        .into_iter()
        .filter(|e| {
            [&e["pid"], &e["child"], &e["parent"]]
                .iter()
                .any(|p| p.as_u64().is_some_and(|p| outside.contains(&(p as u32))))
        })
        .collect();
    assert!(leaked.is_empty(), "events for processes outside every session: {leaked:?}");
    assert!(agent.alerts().is_empty(), "{:?}", agent.alerts());
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn a_reused_pid_is_not_attributed_to_the_old_session() {
    let agent = Agent::start("pidreuse");
    let out = agent.dir.path("pids");
    let file = session_file(&agent.dir, "reuse-1", "");
    let script = format!("/bin/sh -c 'exit 0' & child=$!; wait $child; echo \"child=$child done\" > {}", out.display());
    let o = agent.run(&file, &["/bin/sh", "-c", &script]);
    assert!(o.status.success());
    let old = read_pids(&out)["child"];
    agent.wait_event("the session child's exit", |e| e["type"] == "exit" && e["pid"] == old);

    // Make the kernel hand out `old` again, to a process outside every session.
    let mut reused = false;
    for _ in 0..50 {
        fs::write("/proc/sys/kernel/ns_last_pid", (old - 1).to_string()).expect("writing ns_last_pid (root)");
        let child = Command::new("/usr/bin/env").args(["true", "reuse-marker"]).spawn().unwrap();
        let pid = child.id();
        child.wait_with_output().unwrap();
        if pid == old {
            reused = true;
            break;
        }
    }
    assert!(reused, "could not get pid {old} reused");
    let marker = session_file(&agent.dir, "marker", "");
    agent.run(&marker, &["/usr/bin/env", "true", "after-reuse-marker"]);
    agent
        .wait_event("the marker exec", |e| e["type"] == "exec" && e["argv"].to_string().contains("after-reuse-marker"));
    let leaked: Vec<Value> =
        agent.events().into_iter().filter(|e| e["argv"].to_string().contains("\"reuse-marker\"")).collect();
    assert!(leaked.is_empty(), "the reused pid was attributed: {leaked:?}");
}

#[test]
fn a_cgroup_bound_session_owns_every_process_in_the_cgroup() {
    let agent = Agent::start("cgroup");
    let cg = TestCgroup::new("bound");
    let file = session_file(&agent.dir, "pod-1", "grace: 1s\n");
    let o = agent.cli(&["session", "start", "--file", file.to_str().unwrap(), "--cgroup", cg.0.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "pod-1");

    // A process joins the cgroup, then execs: attributed through the cgroup.
    let procs = cg.0.join("cgroup.procs");
    let join = format!("echo $$ > {}; exec /usr/bin/env cg-marker=1 sleep 30", procs.display());
    let mut member = Command::new("/bin/sh").args(["-c", &join]).spawn().unwrap();
    let exec = agent
        .wait_event("the cgroup member's exec", |e| e["type"] == "exec" && e["argv"].to_string().contains("cg-marker"));
    assert_eq!(exec["pid"], member.id());

    // Ending the session leaves that process running: outlived, then anything new is after the end.
    let o = agent.cli(&["session", "end", "pod-1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let alert = agent.wait_alert("process_outlived_task in the cgroup", |a| a["rule"] == "process_outlived_task");
    assert_eq!(alert["process"]["pid"], member.id());
    let late = format!("echo $$ > {}; exec /usr/bin/env true late-marker", procs.display());
    Command::new("/bin/sh").args(["-c", &late]).status().unwrap();
    let alert = agent.wait_alert("activity_after_task_end", |a| a["rule"] == "activity_after_task_end");
    assert!(alert["process"]["argv"].to_string().contains("late-marker"));
    assert_eq!(alert["session"]["id"], "pod-1");
    let _ = member.kill();
    let _ = member.wait();
}

#[test]
fn exec_and_privilege_rules_on_the_real_kernel() {
    let agent = Agent::start("rules");
    // A setuid-root copy of id(1), run as nobody inside the session.
    let suid = agent.dir.path("suid-id");
    fs::copy("/usr/bin/id", &suid).unwrap();
    fs::set_permissions(&suid, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    let file = session_file(&agent.dir, "rules-1", "scope:\n  exec: [\"/bin/sh\", \"/usr/bin/setpriv\"]\n");
    let run = format!("setpriv --reuid=65534 --regid=65534 --clear-groups -- {} -u", suid.display());
    let o = agent.run(&file, &["/bin/sh", "-c", &run]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "0", "the setuid binary ran as root");
    let alert = agent.wait_alert("privilege_escalation", |a| a["rule"] == "privilege_escalation");
    assert_eq!(alert["process"]["exe"], suid.to_str().unwrap());
    assert_eq!(alert["process"]["uid"], 65534);
    assert_eq!(alert["process"]["euid"], 0);
    assert_eq!(alert["severity"], "critical");
    let out_of_scope = agent.wait_alert("exec_out_of_scope", |a| a["rule"] == "exec_out_of_scope");
    assert_eq!(out_of_scope["process"]["exe"], suid.to_str().unwrap());
    // /bin/sh and setpriv were in scope: only the one out-of-scope exec.
    let n = agent.alerts().iter().filter(|a| a["rule"] == "exec_out_of_scope").count();
    assert_eq!(n, 1, "{}", agent.diagnostics());

    // The setuid binary's exec also changed the process's uid, which the process events
    // connector reports: that is the exec's escalation, not a second one. A later alert marks
    // the point by which a second one would have been written.
    let marker = session_file(&agent.dir, "rules-2", "scope:\n  exec: [\"/bin/sh\"]\n");
    let o = agent.run(&marker, &["/bin/sh", "-c", "/usr/bin/true marker"]);
    assert!(o.status.success(), "{}", stderr(&o));
    agent.wait_alert("the marker's exec_out_of_scope", |a| {
        a["rule"] == "exec_out_of_scope" && a["session"]["id"] == "rules-2"
    });
    let n = agent.alerts().iter().filter(|a| a["rule"] == "privilege_escalation").count();
    assert_eq!(n, 1, "{}", agent.diagnostics());
}

#[test]
fn bad_input_gets_one_line_errors_and_changes_nothing() {
    let agent = Agent::start("badinput");
    let bad = agent.dir.write("bad.yaml", "principal: a\nactor: b\ntask: c\nttl: soon\n");
    let o = agent.cli(&["session", "start", "--file", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("bad.yaml:4:") && err.contains("ttl"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let good = session_file(&agent.dir, "dup-1", "");
    let mut holder = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = holder.id().to_string();
    assert!(agent.cli(&["session", "start", "--file", good.to_str().unwrap(), "--pid", &pid]).status.success());
    let o = agent.cli(&["session", "start", "--file", good.to_str().unwrap(), "--pid", &pid]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));

    let o = agent.cli(&["session", "end", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no session nope") && stderr(&o).contains("dup-1"), "{}", stderr(&o));

    let o = agent.cli(&["session", "list", "--json"]);
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "only the one good session");
    assert_eq!(list[0]["state"], "active");
    assert_eq!(list[0]["live_processes"][0]["pid"].as_u64(), Some(holder.id() as u64));

    let o = agent.cli(&["session", "end", "dup-1"]);
    assert!(o.status.success());
    let o = agent.cli(&["session", "end", "dup-1"]);
    assert!(stderr(&o).contains("already ended"), "{}", stderr(&o));

    // A caller that is not root.
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(monitor_bin())
        .args(["session", "list", "--control"])
        .arg(&agent.control)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("permission denied"), "{}", stderr(&o));

    // No agent behind the socket.
    let o = Command::new(monitor_bin())
        .args(["session", "list", "--control", "/nonexistent/monitor.sock"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no agent is listening") && stderr(&o).contains("monitor agent"), "{}", stderr(&o));

    // The agent still serves.
    assert!(agent.cli(&["session", "list"]).status.success());
    let _ = holder.kill();
    let _ = holder.wait();
}
