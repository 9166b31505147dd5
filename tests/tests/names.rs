//! Names for every resolver, on the real kernel: a Go program with Go's own resolver (no libc,
//! so no getaddrinfo) asking a real DNS server (dnsmasq on 127.0.0.53) or reading its hosts
//! file, and Python resolving a name and then connecting by the address it got. Each workload
//! runs in a mount namespace of its own whose /etc/resolv.conf and /etc/hosts the test wrote, so
//! the machine's resolver is untouched. Traffic goes to 127.0.0.0/8 only.

use std::process::Command;

use monitor_tests::{wire::*, *};
use serde_json::Value;

/// `dial HOST:PORT`: one TCP connection through Go's own resolver (`CGO_ENABLED=0`).
const DIAL: &str = r#"package main

import (
	"fmt"
	"net"
	"os"
)

func main() {
	c, err := net.Dial("tcp", os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	c.Close()
}
"#;

/// Python's usual two steps: resolve, then connect to the address (create_connection looks the
/// address up again, numerically).
const RESOLVE_THEN_CONNECT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
socket.create_connection((addr, port)).close()
"#;

/// dnsmasq answering for the given names only, on `addr`:53 (each test its own address).
fn dnsmasq(dir: &Scratch, addr: &str, names: &[(&str, &str)]) -> Server {
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--port=53",
        "--local-ttl=60",
        "--log-queries",
    ])
    .arg(format!("--listen-address={addr}"))
    .arg(format!("--pid-file={}", dir.path("dnsmasq.pid").display()));
    for (name, addr) in names {
        cmd.arg(format!("--address=/{name}/{addr}"));
    }
    // dnsmasq also serves TCP: reachable means ready.
    Server::spawn(dir, "dnsmasq.log", cmd, addr, 53)
}

/// `monitor run` of `script` inside the test cgroup and a mount namespace whose resolv.conf
/// points at `nameserver` and whose hosts file is `hosts`.
fn run_namespaced(
    t: &Creds,
    session: &std::path::Path,
    nameserver: &str,
    hosts: &str,
    script: &str,
) -> std::process::Output {
    let resolv = t.agent.dir.write("resolv.conf", &format!("nameserver {nameserver}\noptions attempts:1 timeout:2\n"));
    let hosts = t.agent.dir.write("hosts", hosts);
    let inner = format!(
        "mount --bind {} /etc/resolv.conf && mount --bind {} /etc/hosts && exec {} run --file {} -- /bin/sh -c '{}'",
        resolv.display(),
        hosts.display(),
        monitor_bin().display(),
        session.display(),
        script.replace('\'', "'\\''")
    );
    let line = format!("unshare --mount --propagation private /bin/sh -c \"{}\"", inner.replace('"', "\\\""));
    t.sh(&line, &[])
}

/// Runs an enforcing session's `script` (an in-scope dial that must pass, then `! dial` of an
/// out-of-scope name) and returns the alert of the refused connect, checked blocked with EPERM.
fn enforced(t: &Creds, session: &std::path::Path, nameserver: &str, hosts: &str, script: &str, id: &str) -> Value {
    let o = run_namespaced(t, session, nameserver, hosts, script);
    assert!(o.status.success(), "the in-scope dial must pass and the other be refused: {}{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("operation not permitted"), "the refusal is EPERM: {}", stderr(&o));
    let alert =
        t.agent.wait_alert("the refused connect", |a| a["rule"] == "out_of_scope_connect" && a["session"]["id"] == id);
    assert_eq!(alert["action"], "blocked");
    alert
}

fn out_of_scope(t: &Creds, session: &str) -> Vec<Value> {
    t.agent
        .alerts()
        .into_iter()
        .filter(|a| a["rule"] == "out_of_scope_connect" && a["session"]["id"] == session)
        .collect()
}

#[test]
fn go_s_own_resolver_names_come_from_dns_answers() {
    let t = Creds::start("names-dns", &[]);
    let (allowed, denied) = (tcp_listener("127.0.0.2"), tcp_listener("127.0.0.3"));
    let _dns =
        dnsmasq(&t.agent.dir, "127.0.0.53", &[("api.example.test", "127.0.0.2"), ("evil.example.test", "127.0.0.3")]);
    let dial = go::build("dial", DIAL, "");
    let session = session_file(
        &t.agent.dir,
        "dns-go",
        &format!("grace: 1s\nscope:\n  connect: [\"api.example.test:{allowed}\", \"127.0.0.53:53\"]\n"),
    );
    let script =
        format!("{dial} api.example.test:{allowed} && {dial} evil.example.test:{denied}", dial = dial.display());
    let o = run_namespaced(&t, &session, "127.0.0.53", "127.0.0.1 localhost\n", &script);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let alert = t.agent.wait_alert("out_of_scope_connect to the name outside the scope", |a| {
        a["rule"] == "out_of_scope_connect" && a["session"]["id"] == "dns-go"
    });
    assert_eq!(alert["network"]["dst_ip"], "127.0.0.3");
    assert_eq!(alert["network"]["dst_port"], denied);
    assert_eq!(alert["network"]["dst_name"], "evil.example.test");
    // The names came from DNS answers (Go never called getaddrinfo), with their TTL.
    let learnt = t.agent.wait_event("the DNS answer for the in-scope name", |e| {
        e["type"] == "resolve" && e["source"] == "dns" && e["name"] == "api.example.test"
    });
    assert_eq!(learnt["addrs"][0], "127.0.0.2");
    assert_eq!(learnt["ttl_secs"], 60);
    assert_eq!(out_of_scope(&t, "dns-go").len(), 1, "only the out-of-scope name: {}", t.agent.diagnostics());
}

#[test]
fn names_in_the_sessions_hosts_file_and_resolve_then_connect_by_address() {
    let t = Creds::start("names-hosts", &[]);
    let (from_hosts, by_dns, denied) =
        (tcp_listener("127.0.0.4"), tcp_listener("127.0.0.5"), tcp_listener("127.0.0.6"));
    let _dns = dnsmasq(&t.agent.dir, "127.0.0.54", &[("pool.example.test", "127.0.0.5")]);
    let dial = go::build("dial", DIAL, "");
    let python = t.agent.dir.write("resolve_then_connect.py", RESOLVE_THEN_CONNECT);
    let scope = format!(
        "grace: 1s\nscope:\n  connect: [\"static.example.test:{from_hosts}\", \"pool.example.test:{by_dns}\", \"127.0.0.54:53\"]\n"
    );
    let session = session_file(&t.agent.dir, "hosts-go", &scope);
    let hosts = "127.0.0.1 localhost\n127.0.0.4 static.example.test\n127.0.0.6 other.example.test\n";
    let script = [
        // Go reads the hosts file itself: no DNS, no getaddrinfo.
        format!("{} static.example.test:{from_hosts}", dial.display()),
        // getaddrinfo of the name (over DNS), then of the address it gave.
        format!("python3 {} pool.example.test {by_dns}", python.display()),
        format!("{} other.example.test:{denied}", dial.display()),
    ]
    .join(" && ");
    let o = run_namespaced(&t, &session, "127.0.0.54", hosts, &script);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let alert = t.agent.wait_alert("out_of_scope_connect to the hosts-file name outside the scope", |a| {
        a["rule"] == "out_of_scope_connect" && a["session"]["id"] == "hosts-go"
    });
    assert_eq!(alert["network"]["dst_ip"], "127.0.0.6");
    assert_eq!(alert["network"]["dst_name"], "other.example.test");
    // Python's numeric lookup of 127.0.0.5 was seen, and did not hide the name.
    t.agent.wait_event("the numeric lookup", |e| e["type"] == "resolve" && e["name"] == "127.0.0.5");
    assert!(
        t.agent
            .events()
            .iter()
            .any(|e| e["type"] == "resolve" && e["source"] == "hosts" && e["name"] == "static.example.test"),
        "the session's hosts file was read"
    );
    assert_eq!(out_of_scope(&t, "hosts-go").len(), 1, "only the out-of-scope name: {}", t.agent.diagnostics());
}

/// An enforcing session whose tool resolves through the hosts file itself (Go): the in-scope
/// name's address is allowed from the start (the agent put it in the kernel when the session
/// started), the out-of-scope one refused.
#[test]
fn an_enforcing_session_reaches_in_scope_names_from_its_hosts_file_without_getaddrinfo() {
    let t = Creds::start("names-enforce", &[]);
    let (allowed, denied) = (tcp_listener("127.0.0.7"), tcp_listener("127.0.0.8"));
    let dial = go::build("dial", DIAL, "");
    let scope = format!("grace: 1s\nenforce: true\nscope:\n  connect: [\"static.example.test:{allowed}\"]\n");
    let session = session_file(&t.agent.dir, "hosts-enforce", &scope);
    let hosts = "127.0.0.1 localhost\n127.0.0.7 static.example.test\n127.0.0.8 other.example.test\n";
    let script =
        format!("{dial} static.example.test:{allowed} && ! {dial} other.example.test:{denied}", dial = dial.display());
    let alert = enforced(&t, &session, "127.0.0.55", hosts, &script, "hosts-enforce");
    assert_eq!(alert["network"]["dst_name"], "other.example.test");
    assert_eq!(out_of_scope(&t, "hosts-enforce").len(), 1, "{}", t.agent.diagnostics());
}

/// An enforcing session whose tool asks a DNS server itself (Go): the kernel allows the
/// addresses the answer gives for the in-scope name before the tool can connect; the
/// out-of-scope name's address stays refused.
#[test]
fn an_enforcing_session_reaches_the_in_scope_names_its_resolver_answers() {
    let t = Creds::start("names-enforce-dns", &[]);
    let (allowed, denied) = (tcp_listener("127.0.0.9"), tcp_listener("127.0.0.10"));
    let _dns =
        dnsmasq(&t.agent.dir, "127.0.0.56", &[("api.example.test", "127.0.0.9"), ("evil.example.test", "127.0.0.10")]);
    let dial = go::build("dial", DIAL, "");
    let scope =
        format!("grace: 1s\nenforce: true\nscope:\n  connect: [\"api.example.test:{allowed}\", \"127.0.0.56:53\"]\n");
    let session = session_file(&t.agent.dir, "dns-enforce", &scope);
    let script =
        format!("{dial} api.example.test:{allowed} && ! {dial} evil.example.test:{denied}", dial = dial.display());
    let alert = enforced(&t, &session, "127.0.0.56", "127.0.0.1 localhost\n", &script, "dns-enforce");
    assert_eq!(alert["network"]["dst_ip"], "127.0.0.10");
    assert_eq!(out_of_scope(&t, "dns-enforce").len(), 1, "{}", t.agent.diagnostics());
}

/// A DNS server over TCP (RFC 7766) that answers in pieces, as a server that writes the length
/// prefix on its own and the message in two writes does: three segments, not one whole message.
/// `dns_tcp_pieces.py ADDR NAME=IP...`.
const DNS_TCP_PIECES: &str = r#"
import socket, struct, sys, time
addr, answers = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((addr, 53))
server.listen()
def exactly(c, n):
    b = b""
    while len(b) < n:
        more = c.recv(n - len(b))
        if not more:
            return None
        b += more
    return b
while True:
    c, _ = server.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = exactly(c, 2)
    query = head and exactly(c, struct.unpack(">H", head)[0])
    if not query:
        c.close()
        continue
    i, labels = 12, []
    while query[i]:
        labels.append(query[i + 1:i + 1 + query[i]].decode())
        i += 1 + query[i]
    ip = answers.get(".".join(labels))
    body = struct.pack(">HHHHHH", struct.unpack(">H", query[:2])[0], 0x8180, 1, 1 if ip else 0, 0, 0) + query[12:i + 5]
    if ip:
        body += struct.pack(">HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(ip)
    for piece in (struct.pack(">H", len(body)), body[:10], body[10:]):
        c.sendall(piece)
        time.sleep(0.02)
    c.close()
"#;

/// A tool that speaks DNS itself, over TCP (no getaddrinfo, no resolv.conf), then connects by
/// the address: `dns_tcp_connect.py SERVER NAME PORT`.
const DNS_TCP_CONNECT: &str = r#"
import socket, struct, sys
server, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
query = struct.pack(">HHHHHH", 0x4711, 0x0100, 1, 0, 0, 0)
query += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.create_connection((server, 53))
s.sendall(struct.pack(">H", len(query)) + query)
def exactly(n):
    b = b""
    while len(b) < n:
        b += s.recv(n - len(b))
    return b
answer = exactly(struct.unpack(">H", exactly(2))[0])
socket.create_connection((socket.inet_ntoa(answer[-4:]), port)).close()
"#;

/// Names from DNS answers over TCP that arrive in pieces (a length prefix on its own, a message
/// over two segments): the agent joins the stream, so the in-scope name raises nothing and the
/// out-of-scope one is named on its alert.
#[test]
fn names_from_dns_over_tcp_answers_in_pieces() {
    let t = Creds::start("names-dns-tcp", &[]);
    let (allowed, denied) = (tcp_listener("127.0.0.11"), tcp_listener("127.0.0.12"));
    let server = t.agent.dir.write("dns_tcp_pieces.py", DNS_TCP_PIECES);
    let mut cmd = Command::new("python3");
    cmd.arg(&server).args(["127.0.0.57", "api.example.test=127.0.0.11", "evil.example.test=127.0.0.12"]);
    let _dns = Server::spawn(&t.agent.dir, "dns-tcp.log", cmd, "127.0.0.57", 53);
    let client = t.agent.dir.write("dns_tcp_connect.py", DNS_TCP_CONNECT);
    let session = session_file(
        &t.agent.dir,
        "dns-tcp",
        &format!("grace: 1s\nscope:\n  connect: [\"api.example.test:{allowed}\", \"127.0.0.57:53\"]\n"),
    );
    let script = format!(
        "python3 {c} 127.0.0.57 api.example.test {allowed} && python3 {c} 127.0.0.57 evil.example.test {denied}",
        c = client.display()
    );
    let o = t.run_session(&session, &script, &[]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let alert = t.agent.wait_alert("out_of_scope_connect to the name outside the scope", |a| {
        a["rule"] == "out_of_scope_connect" && a["session"]["id"] == "dns-tcp"
    });
    assert_eq!(alert["network"]["dst_ip"], "127.0.0.12");
    assert_eq!(alert["network"]["dst_name"], "evil.example.test");
    let learnt = t.agent.wait_event("the in-scope name from the TCP answer", |e| {
        e["type"] == "resolve" && e["source"] == "dns" && e["name"] == "api.example.test"
    });
    assert_eq!(learnt["addrs"][0], "127.0.0.11");
    assert_eq!(out_of_scope(&t, "dns-tcp").len(), 1, "only the out-of-scope name: {}", t.agent.diagnostics());
}
