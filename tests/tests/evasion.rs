//! Evasion on the real kernel: a session process that tries to leave its session (another
//! cgroup, a new pid namespace, reparenting, an exec from memory or through the dynamic loader,
//! a new name, a connect through io_uring) stays attributed, and its out-of-scope connect still
//! raises `out_of_scope_connect` naming the session. Attribution is by process (the kernel's
//! session map follows every fork by tgid), so none of these changes which session a process
//! belongs to. The connect hooks attach under the test's cgroup; everything a session does
//! happens below it. Traffic goes to 127.0.0.0/8 only.

use std::{fs, os::unix::fs::MetadataExt as _, process::Command};

use monitor_tests::{net::*, *};
use serde_json::Value;

/// A session whose scope allows 127.0.0.2:ALLOWED, and a listener on 127.0.0.3 it may not reach.
struct Evasion {
    net: Net,
    session: std::path::PathBuf,
    forbidden: u16,
    out: std::path::PathBuf,
}

impl Evasion {
    fn start(name: &str, extra_scope: &str) -> Self {
        let net = Net::start(name);
        let allowed = tcp_listener("127.0.0.2");
        let forbidden = tcp_listener("127.0.0.3");
        let scope = format!("grace: 1s\nscope:\n  connect: [\"127.0.0.2:{allowed}\"]\n{extra_scope}");
        let session = session_file(&net.agent.dir, name, &scope);
        let out = net.agent.dir.path("outcomes");
        Self { net, session, forbidden, out }
    }

    /// The Python client's connect to the forbidden listener, labelled `label`.
    fn connect(&self, label: &str) -> String {
        self.net.connect(&self.out, label, "tcp", "127.0.0.3", self.forbidden)
    }

    fn run(&self, script: &str) {
        let o = self.net.run(&self.session, script);
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    }

    /// The `out_of_scope_connect` alert for the forbidden listener, of this session.
    fn alert(&self, what: &str) -> Value {
        let id = self.session.file_stem().unwrap().to_str().unwrap().to_string();
        let alert = self
            .net
            .agent
            .wait_alert(what, |a| a["rule"] == "out_of_scope_connect" && a["network"]["dst_port"] == self.forbidden);
        assert_eq!(alert["session"]["id"], id.as_str(), "{alert}");
        alert
    }
}

#[test]
fn moving_into_another_cgroup_does_not_leave_the_session() {
    let e = Evasion::start("evade-cgroup", "");
    // Below the agent's hooked cgroup, as every cgroup is below the root an agent hooks in
    // production.
    let elsewhere = e.net.cg.child("elsewhere");
    let script = format!("echo $$ > {}/cgroup.procs && {}", elsewhere.0.display(), e.connect("moved"));
    e.run(&script);
    let alert = e.alert("out_of_scope_connect after the move");
    let moved_to = fs::metadata(&elsewhere.0).unwrap().ino();
    assert_eq!(alert["process"]["cgroup"], moved_to, "the process ran in the other cgroup: {alert}");
}

#[test]
fn a_new_pid_namespace_does_not_leave_the_session() {
    let e = Evasion::start("evade-pidns", "");
    e.run(&format!("unshare --pid --fork --mount-proc {}", e.connect("pidns")));
    let alert = e.alert("out_of_scope_connect from a new pid namespace");
    // Named by its pid on the host, not the 1 or 2 it has in its own namespace.
    assert!(alert["process"]["pid"].as_u64().unwrap() > 2, "{alert}");
    assert_eq!(outcomes(&e.out)["pidns"], "ok", "the connect went through (observing session)");
}

#[test]
fn double_forking_to_init_or_to_a_subreaper_outside_does_not_leave_the_session() {
    // To init: a detached grandchild (setsid, its parent gone) connects.
    let e = Evasion::start("evade-reparent", "");
    // bash's /dev/tcp connects at once, where an interpreter's start took longer than the task
    // under emulation (the connect then came after the task's end).
    let connect = e.net.connect_quickly(&e.out, "to-init", "127.0.0.3", e.forbidden);
    e.run(&format!("(setsid sh -c 'sleep 1; {}' &) ; sleep 3", connect.replace('\'', "'\\''")));
    e.alert("out_of_scope_connect from a grandchild reparented to init");

    // To a subreaper outside the session: `monitor run` is started by a process that adopts
    // orphans (PR_SET_CHILD_SUBREAPER), so the grandchild is reparented out of the session's tree.
    let e = Evasion::start("evade-subreaper", "");
    let reaper = e.net.agent.dir.write(
        "subreaper.py",
        r#"
import ctypes, os, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
open(sys.argv[1], "w").write(str(os.getpid()))
status = subprocess.run(sys.argv[2:]).returncode
while True:  # reap the orphans it adopted
    try:
        os.wait()
    except ChildProcessError:
        break
sys.exit(status)
"#,
    );
    let reaper_pid = e.net.agent.dir.path("reaper.pid");
    let parent_seen = e.net.agent.dir.path("grandchild.ppid");
    // The grandchild records its parent, then becomes the client (exec: the same process).
    let grandchild = format!(
        "sleep 1; awk \"{{print \\$4}}\" /proc/$$/stat > {}; exec {}",
        parent_seen.display(),
        e.connect("to-subreaper")
    );
    let line = format!(
        "{} python3 {} {} {} run --file {} -- /bin/sh -c '(sh -c '\\''{}'\\'' &) ; sleep 3'",
        e.net.cg.enter(),
        reaper.display(),
        reaper_pid.display(),
        monitor_bin().display(),
        e.session.display(),
        grandchild.replace('\'', "'\\''\\''\\''"),
    );
    let o = Command::new("/bin/sh")
        .args(["-c", &line])
        .env("MONITOR_CONTROL", &e.net.agent.control)
        .env("MONITOR_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let alert = e.alert("out_of_scope_connect from a grandchild adopted by a subreaper outside");
    let reaper = fs::read_to_string(&reaper_pid).unwrap();
    let adopted_by = fs::read_to_string(&parent_seen).unwrap();
    assert_eq!(adopted_by.trim(), reaper.trim(), "the grandchild was the subreaper's when it connected");
    assert_eq!(alert["process"]["ppid"].to_string(), reaper.trim(), "{alert}");
}

#[test]
fn an_exec_from_memory_is_still_the_session_s_and_out_of_its_exec_scope() {
    let e = Evasion::start("evade-memfd", "  exec: [\"/bin/sh\", \"/usr/bin/python3\"]\n");
    let url = format!("http://127.0.0.3:{}/", e.forbidden);
    let loader = e.net.agent.dir.write(
        "memfd_exec.py",
        r#"
import os, sys
fd = os.memfd_create("payload", 0)
with open("/usr/bin/curl", "rb") as f:
    os.write(fd, f.read())
os.execve(fd, ["curl", "-s", "-o", "/dev/null", "--max-time", "2", sys.argv[1]], dict(os.environ))  # fexecve
"#,
    );
    e.run(&format!("python3 {} {url}; true", loader.display()));
    let alert = e.alert("out_of_scope_connect from a program exec'd from a memfd");
    let exe = alert["process"]["exe"].as_str().unwrap();
    assert!(exe.contains("memfd:payload"), "{alert}");
    let exec = e.net.agent.wait_alert("exec_out_of_scope of the memfd", |a| {
        a["rule"] == "exec_out_of_scope" && a["process"]["exe"].as_str().is_some_and(|x| x.contains("memfd:payload"))
    });
    assert_eq!(exec["session"]["id"], "evade-memfd");
}

#[test]
fn running_a_program_through_the_dynamic_loader_is_an_exec_of_the_loader() {
    let e = Evasion::start("evade-ldso", "  exec: [\"/bin/sh\", \"/usr/bin/curl\"]\n");
    let loader = ["/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("the dynamic loader");
    let url = format!("http://127.0.0.3:{}/", e.forbidden);
    e.run(&format!("{loader} /usr/bin/curl -s -o /dev/null --max-time 2 {url}; true"));
    // curl itself is in scope; what ran is the loader, which is not: the exec is an alert, and
    // the command line names what it loaded.
    let exec = e.net.agent.wait_alert("exec_out_of_scope of the loader", |a| {
        a["rule"] == "exec_out_of_scope" && a["process"]["exe"].as_str().is_some_and(|x| x.contains("ld-linux"))
    });
    let argv: Vec<&str> = exec["process"]["argv"].as_array().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert!(argv.contains(&"/usr/bin/curl"), "{exec}");
    let alert = e.alert("out_of_scope_connect of curl run by the loader");
    assert!(alert["process"]["exe"].as_str().unwrap().contains("ld-linux"), "{alert}");
}

#[test]
fn a_new_process_name_changes_nothing() {
    let e = Evasion::start("evade-comm", "");
    let rename = e.net.agent.dir.write(
        "rename.py",
        r#"
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, b"kworker/0:1", 0, 0, 0)  # PR_SET_NAME
os.execvp("python3", ["python3"] + sys.argv[1:])
"#,
    );
    // The renamed process connects itself, and after an exec that keeps the name given.
    let client = e.connect("renamed");
    e.run(&format!("python3 {} {}", rename.display(), client.trim_start_matches("python3 ")));
    let alert = e.alert("out_of_scope_connect from a renamed process");
    assert!(alert["process"]["exe"].as_str().unwrap().contains("python3"), "named by its executable: {alert}");
}

/// `uring_connect HOST PORT`: one TCP connect submitted through io_uring (IORING_OP_CONNECT),
/// raw system calls; prints the completion's result.
const URING_CONNECT: &str = r#"
#include <arpa/inet.h>
#include <linux/io_uring.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int ring = syscall(__NR_io_uring_setup, 4, &p);
    if (ring < 0) { perror("io_uring_setup"); return 2; }
    char *sq = mmap(0, p.sq_off.array + p.sq_entries * sizeof(unsigned), PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
    char *cq = mmap(0, p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe), PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
    struct io_uring_sqe *sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) { perror("mmap"); return 2; }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    struct io_uring_sqe *e = &sqes[0];
    memset(e, 0, sizeof *e);
    e->opcode = IORING_OP_CONNECT;
    e->fd = s;
    e->addr = (unsigned long)&a;
    e->off = sizeof a;
    unsigned *tail = (unsigned *)(sq + p.sq_off.tail);
    unsigned mask = *(unsigned *)(sq + p.sq_off.ring_mask);
    ((unsigned *)(sq + p.sq_off.array))[*tail & mask] = 0;
    __atomic_store_n(tail, *tail + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) {
        perror("io_uring_enter");
        return 2;
    }
    unsigned head = *(unsigned *)(cq + p.cq_off.head);
    struct io_uring_cqe *c =
        (struct io_uring_cqe *)(cq + p.cq_off.cqes) + (head & *(unsigned *)(cq + p.cq_off.ring_mask));
    printf("%d\n", c->res);
    return c->res == 0 ? 0 : 1;
}
"#;

#[test]
fn a_connect_through_io_uring_is_seen() {
    // The switch came with 6.6; before it, io_uring is open to every process.
    if let Ok(io_uring) = fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        assert_eq!(io_uring.trim(), "0", "this kernel refuses io_uring to processes (kernel.io_uring_disabled)");
    }
    let e = Evasion::start("evade-uring", "");
    let source = e.net.agent.dir.write("uring_connect.c", URING_CONNECT);
    let binary = e.net.agent.dir.path("uring_connect");
    let cc = Command::new("cc").arg("-O2").arg("-o").arg(&binary).arg(&source).output().expect("cc");
    assert!(cc.status.success(), "{}", stderr(&cc));
    let result = e.net.agent.dir.path("uring.out");
    e.run(&format!("{} 127.0.0.3 {} > {}", binary.display(), e.forbidden, result.display()));
    assert_eq!(fs::read_to_string(&result).unwrap().trim(), "0", "the io_uring connect succeeded");
    let alert = e.alert("out_of_scope_connect through io_uring");
    assert!(alert["process"]["exe"].as_str().unwrap().ends_with("uring_connect"), "{alert}");
}
