//! Writes the fuzz targets' seed corpora (`fuzz/seeds/TARGET/`): small inputs made with the
//! encoders the agent and the collector themselves use (Forward messages, trace frames, HPACK,
//! kernel record layouts) and the example files of the README, so that fuzzing starts from
//! inputs that reach deep into each parser. `cargo run -p monitor-fuzz --example seeds`.

use std::{fs, path::Path};

use monitor::{
    event::{Creds, Event, Exec},
    forward::protocol,
    trace::{format, Record},
};
use monitor_common::{EventHeader, EventKind, ExecEvent, ForkEvent, PayloadEvent, WIRE_VERSION};

const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
eyJzdWIiOiJhbGljZUBleGFtcGxlLmNvbSIsImV4cCI6MTk5OTk5OTk5OSwiYXVkIjoiYXBpIn0.\
c2lnbmF0dXJlLW5vdC1jaGVja2Vk";

const SESSION: &str = "id: refund-4711
principal: alice@example.com
actor: svc:support-bot
task: refund ticket 4711
sponsor: payments-team
ttl: 10m
grace: 2s
scope:
  connect: [\"127.0.0.2:8443\", \"api.internal.example:443\", \"*.payments.example:443\"]
  credentials: [\"/run/secrets/support-bot/token\"]
  exec: [\"/usr/bin/curl\", \"/bin/sh\"]
tokens:
  - env: SUPPORT_BOT_TOKEN
  - file: /run/secrets/support-bot/token
enforce: false
";

const POLICY: &str = "defaults: {ttl: 30m, grace: 3s}
severity: {out_of_scope_connect: critical}
actors:
  \"svc:support-bot\":
    connect: [\"127.0.0.2:8443\", \"*.payments.example:443\"]
never_alert:
  connect: [\"127.0.0.53:53\"]
alerts:
  fold_window: 60s
credentials:
  watch: [\"/etc/ci/deploy-keys\"]
  api_key_headers: [\"X-Tenant-Key\"]
  learn_tokens: true
tls:
  executable_dirs: [\"/opt/ci/tools\"]
";

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let put = |target: &str, name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(name), bytes)?;
        Ok(())
    };

    // Control socket requests.
    let start = serde_json::json!({
        "op": "start", "origin": "refund.yaml", "id": null, "bind": {"pid": 4242, "cgroup": null},
        "env_tokens": ["not-a-real-token-0123456789"],
        "file": serde_norway::from_str::<serde_json::Value>(SESSION)?,
    });
    put("control_requests", "start.json", start.to_string().as_bytes())?;
    put("control_requests", "end.json", br#"{"op":"end","id":"refund-4711","reason":"root_exited"}"#)?;
    put("control_requests", "show.json", br#"{"op":"show","id":"refund-4711"}"#)?;

    // Session and policy files.
    put("yaml_files", "session.yaml", SESSION.as_bytes())?;
    put("yaml_files", "policy.yaml", POLICY.as_bytes())?;

    // DNS: an answer for api.example.test (a CNAME to edge.example.test, then its A record).
    let answer = dns_answer();
    put("dns_messages", "answer.bin", &answer)?;
    // Over TCP: a read size byte, the length prefix, the message.
    let mut tcp = vec![7u8];
    tcp.extend_from_slice(&(answer.len() as u16).to_be_bytes());
    tcp.extend_from_slice(&answer);
    put("dns_messages", "tcp-stream.bin", &tcp)?;

    // Fluent Forward: a read size, then a PackedForward message of two alerts, a PING and an ack.
    let alert = |id: &str| {
        let map = rmpv::Value::Map(vec![
            ("id".into(), id.into()),
            ("rule".into(), "token_after_task_end".into()),
            ("count".into(), 3.into()),
        ]);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &map).expect("encodes");
        out
    };
    let (a, b) = (alert("a1"), alert("a2"));
    let mut forward = vec![64u8];
    forward.extend(protocol::packed_forward("monitor.alert", &[(1, &a), (2, &b)], "chunk-1"));
    put("forward_stream", "packed-forward.bin", &forward)?;
    let mut ping = vec![255u8];
    ping.extend(protocol::ping("node-a", "salt", b"0123456789abcdef", "shared-key"));
    ping.extend(protocol::ack("chunk-1"));
    put("forward_stream", "ping-and-ack.bin", &ping)?;

    // HTTP/1.x requests.
    let get = format!(
        "GET /refunds/4711?access_token=q-0123456789abcdef&x=1 HTTP/1.1\r\nHost: api.internal.example\r\n\
         Authorization: Bearer {JWT}\r\nCookie: session=c-0123456789abcdef; theme=dark\r\n\r\n"
    );
    put("http_requests", "bearer-query-cookie.txt", get.as_bytes())?;
    put(
        "http_requests",
        "basic-and-api-key.txt",
        b"POST /v1/charges HTTP/1.0\r\nhost: 127.0.0.2:8443\r\nauthorization: Basic YWxpY2U6czNjcmV0LXBhc3N3b3Jk\r\n\
          X-Api-Key: k-0123456789abcdef\r\ncontent-length: 2\r\n\r\n{}",
    )?;

    // HTTP/2: capture size 16, TLS writes, the preface added by the target; SETTINGS, then a
    // HEADERS frame without END_HEADERS and its CONTINUATION.
    let block = hpack(&[
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "127.0.0.2:8443"),
        (":path", "/refunds?access_token=q-0123456789abcdef"),
        ("authorization", &format!("Bearer {JWT}")),
        ("x-api-key", "k-0123456789abcdef"),
    ]);
    let mut h2 = vec![16u8, 0u8];
    h2.extend(frame(0x4, 0, 0, &[]));
    let (first, rest) = block.split_at(block.len() / 2);
    h2.extend(frame(0x1, 0x1, 1, first));
    h2.extend(frame(0x9, 0x4, 1, rest));
    // The same fields again on stream 3: indexed from the dynamic table.
    h2.extend(frame(0x1, 0x5, 3, &hpack(&[(":method", "GET"), ("authorization", &format!("Bearer {JWT}"))])));
    put("http2_frames", "headers-continuation.bin", &h2)?;

    // Token endpoint responses: a read size, then the response.
    let body = format!("{{\"access_token\":\"{JWT}\",\"token_type\":\"Bearer\",\"expires_in\":3600,\"refresh_token\":\"r-0123456789abcdef\"}}");
    let response = format!(
        "\u{40}HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    put("token_responses", "oauth-json.txt", response.as_bytes())?;

    // Command lines.
    let argv = format!(
        "curl\0-H\0Authorization: Bearer {JWT}\0-u\0alice:s3cret-password\0\
         https://bot:p4ss@api.internal.example/refunds?token=t-0123456789abcdef\0--password=hunter2-hunter2\0{JWT}"
    );
    put("jwt_and_argv", "curl-argv.bin", argv.as_bytes())?;
    put("jwt_and_argv", "jwt.txt", JWT.as_bytes())?;

    // Trace segments: a header, a run record, an exec, an alert-free tick; and a store frame.
    let mut trace = format::header().to_vec();
    let run = monitor::trace::RunInfo {
        run_id: "01HZX".into(),
        host: "node-a".into(),
        agent_version: "0.1.0".into(),
        config: Default::default(),
    };
    format::encode(&Record::Run(run), &mut trace)?;
    format::encode(&Record::Event(exec_event()), &mut trace)?;
    format::encode(&Record::Event(Event::Tick { ts: 9 }), &mut trace)?;
    put("trace_frames", "segment.mtr", &trace)?;
    let stored = monitor::collector::store::Stored {
        seq: 1,
        tag: "monitor.alert".into(),
        time_ns: 1,
        id: Some("a1".into()),
        count: 1,
        record: a.clone(),
        stored_ns: 2,
    };
    let mut store = Vec::new();
    format::encode(&stored, &mut store)?;
    put("trace_frames", "store-frame.bin", &store)?;

    // Kernel records, laid out as the eBPF side writes them.
    let mut exec: ExecEvent = zeroed();
    exec.header = header(EventKind::Exec, std::mem::size_of::<ExecEvent>());
    exec.filename.buf[..13].copy_from_slice(b"/usr/bin/curl");
    exec.filename.len = 13;
    let args = b"curl\0-s\0https://127.0.0.2:8443/\0";
    exec.argv.buf[..args.len()].copy_from_slice(args);
    exec.argv.len = args.len() as u32;
    put("kernel_records", "exec.bin", bytes_of(&exec))?;
    let mut fork: ForkEvent = zeroed();
    fork.header = header(EventKind::Fork, std::mem::size_of::<ForkEvent>());
    fork.child_tgid = 4243;
    put("kernel_records", "fork.bin", bytes_of(&fork))?;
    let mut payload: PayloadEvent = zeroed();
    payload.header = header(EventKind::Payload, std::mem::size_of::<PayloadEvent>());
    let request = get.as_bytes();
    payload.data.buf[..request.len()].copy_from_slice(request);
    payload.data.len = request.len() as u32;
    payload.total_len = request.len() as u32;
    payload.source = monitor_common::PAYLOAD_TCP;
    put("kernel_records", "payload.bin", bytes_of(&payload))?;
    println!("seeds written under {}", root.display());
    Ok(())
}

fn exec_event() -> Event {
    Event::Exec(Exec {
        ts: 5,
        session: 1,
        pid: 4243,
        ppid: 4242,
        sid: Some(4242),
        exe: "/usr/bin/curl".into(),
        exe_real: None,
        argv: vec!["curl".into(), "-s".into(), "https://127.0.0.2:8443/".into()],
        argv_truncated: false,
        creds: Creds::default(),
        cgroup: 1,
        cap_effective: None,
    })
}

fn header(kind: EventKind, size: usize) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        version: WIRE_VERSION,
        size: size as u32,
        session: 1,
        ts_ns: 1_000,
        pid: 4243,
        tgid: 4243,
        uid: 1000,
        gid: 1000,
        ..Default::default()
    }
}

/// A kernel record type, all zero (every field is an integer or an array of them).
fn zeroed<T: Copy>() -> T {
    // SAFETY: the record types are plain `#[repr(C)]` integers and arrays: all-zero is valid.
    unsafe { std::mem::zeroed() }
}

fn bytes_of<T: Copy>(record: &T) -> &[u8] {
    // SAFETY: reading a `#[repr(C)]` value's own bytes (its padding is explicit fields).
    unsafe { std::slice::from_raw_parts((record as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut encoder = loona_hpack::Encoder::new();
    encoder.encode(fields.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())))
}

/// An HTTP/2 frame: 24-bit length, type, flags, stream id.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn dns_answer() -> Vec<u8> {
    let name = |labels: &[&str]| {
        let mut out = Vec::new();
        for l in labels {
            out.push(l.len() as u8);
            out.extend_from_slice(l.as_bytes());
        }
        out.push(0);
        out
    };
    let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
    m.extend(name(&["api", "example", "test"]));
    m.extend([0, 1, 0, 1]);
    // api.example.test CNAME edge.example.test (the question's name by pointer).
    let edge = name(&["edge", "example", "test"]);
    m.extend([0xc0, 0x0c, 0, 5, 0, 1, 0, 0, 0, 60]);
    m.extend((edge.len() as u16).to_be_bytes());
    let edge_at = m.len();
    m.extend(&edge);
    // edge.example.test A 127.0.0.2.
    m.extend([0xc0, edge_at as u8, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 2]);
    m
}
