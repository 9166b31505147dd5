//! Network scope tests' harness: an agent whose connect hooks attach under a cgroup the test
//! made, sessions run inside it, and a Python client that connects or sends once and records
//! the outcome. Traffic goes to 127.0.0.0/8 and ::1 only.

use std::{fs, process::Command};

use serde_json::Value;

use crate::{monitor_bin, Agent, TestCgroup};

/// `client.py OUT LABEL tcp|udp|udp-connected HOST PORT`: one connect or send, and its outcome
/// appended to OUT as `LABEL=ok` or `LABEL=EPERM` (or another errno name).
pub const CLIENT: &str = r#"
import errno, socket, sys
out, label, proto, host, port = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(family, kind)
try:
    if proto == "udp":
        s.sendto(b"x", (host, port))
    else:
        s.connect((host, port))
        if proto == "udp-connected":
            s.send(b"x")
    result = "ok"
except OSError as e:
    result = errno.errorcode.get(e.errno, str(e.errno))
with open(out, "a") as f:
    f.write("%s=%s\n" % (label, result))
"#;

pub struct Net {
    pub agent: Agent,
    pub cg: TestCgroup,
    pub client: String,
}

impl Net {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    pub fn start_with(name: &str, extra: &[&str]) -> Self {
        let cg = TestCgroup::new(name);
        let mut args = vec!["--cgroup", cg.0.to_str().unwrap()];
        args.extend_from_slice(extra);
        let agent = Agent::start_with(name, &args);
        let client = agent.dir.write("client.py", CLIENT).display().to_string();
        Self { agent, cg, client }
    }

    /// `monitor run` of a shell script, started inside the test cgroup.
    pub fn run(&self, session: &std::path::Path, script: &str) -> std::process::Output {
        self.command(session, script).output().unwrap()
    }

    /// The command that runs `script` as `session`'s task inside the test cgroup.
    pub fn command(&self, session: &std::path::Path, script: &str) -> Command {
        let line = format!(
            "{} {} run --file {} -- /bin/sh -c '{}'",
            self.cg.enter(),
            monitor_bin().display(),
            session.display(),
            script.replace('\'', "'\\''")
        );
        let mut command = Command::new("/bin/sh");
        command.args(["-c", &line]).env("MONITOR_CONTROL", &self.agent.control).env("MONITOR_LOG", "warn");
        command
    }

    pub fn connect(&self, out: &std::path::Path, label: &str, proto: &str, host: &str, port: u16) -> String {
        format!("python3 {} {} {label} {proto} {host} {port}", self.client, out.display())
    }

    /// A TCP connect by bash's /dev/tcp, with the same outcome line as [`Net::connect`]: for
    /// what must connect soon after it starts (an interpreter's start takes seconds under
    /// emulation, in the kernel matrix).
    pub fn connect_quickly(&self, out: &std::path::Path, label: &str, host: &str, port: u16) -> String {
        let (out, err) = (out.display(), format!("{}.{label}.err", out.display()));
        format!(
            "if bash -c 'exec 3<>/dev/tcp/{host}/{port}' 2>{err}; then echo {label}=ok >> {out}; \
             elif grep -q 'not permitted' {err}; then echo {label}=EPERM >> {out}; \
             else echo {label}=error >> {out}; fi"
        )
    }
}

pub fn outcomes(path: &std::path::Path) -> std::collections::HashMap<String, String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn out_of_scope(agent: &Agent) -> Vec<Value> {
    agent.alerts().into_iter().filter(|a| a["rule"] == "out_of_scope_connect").collect()
}
