//! The fuzz targets' bodies: every parser of untrusted input the agent and the collector run,
//! driven the way their callers drive them. `fuzz_targets/` runs each under libFuzzer
//! (`cargo xtask fuzz`); `tests/corpus.rs` runs the committed seeds and every crash ever found
//! (`regressions/`) through the same functions in `cargo xtask test`. Each must return, whatever
//! the input: an error is fine, a panic, a hang or unbounded memory is a finding.

pub mod control_requests {
    use monitor::sessions::protocol::Request;

    /// Requests on the control socket (a line of JSON from any local client allowed to connect).
    pub fn run(data: &[u8]) {
        let _ = serde_json::from_slice::<Request>(data);
    }
}

pub mod dns_messages {
    use monitor::dns::{self, TcpStreams};

    /// DNS answers received by session processes: UDP messages, and TCP streams in pieces (a length
    /// prefix, then a message over several segments, out of order at times).
    pub fn run(data: &[u8]) {
        if let Some(answer) = dns::answer(data) {
            let _ = dns::resolve(1, 1, 1, answer);
        }
        let Some((&size, data)) = data.split_first() else { return };
        let mut streams = TcpStreams::default();
        let mut seq = 0u32;
        for piece in data.chunks(usize::from(size).max(1)) {
            let total = piece.len() + usize::from(size & 3);
            let _ = streams.piece(1, 1, 1, seq, total, piece);
            seq = seq.wrapping_add(total as u32);
        }
        let _ = TcpStreams::default().message(1, 1, 1, 0, data.len(), data);
    }
}

pub mod forward_stream {
    use monitor::forward::protocol::{self, ValueBuffer};

    /// The collector's bound on one message in these runs (small, so oversized input is met).
    const MAX_MESSAGE: usize = 1 << 20;

    /// Fluent Forward from the network (the collector's listener): bytes in reads of any size, the
    /// MessagePack stream cut into values, each value taken as a Forward message, a handshake PING
    /// and an ack. The first byte sets the read size.
    pub fn run(data: &[u8]) {
        let Some((&chunk, data)) = data.split_first() else { return };
        let mut buffer = ValueBuffer::default();
        for read in data.chunks(usize::from(chunk).max(1)) {
            buffer.extend(read);
            loop {
                match buffer.next(MAX_MESSAGE) {
                    Ok(Some(value)) => {
                        let _ = protocol::check_ping(&value, b"nonce", "key");
                        let _ = protocol::ack_of(&value);
                        if let Ok(message) = protocol::parse_message(value) {
                            for entry in message.entries {
                                let _ = entry.str_field("id");
                                let _ = entry.uint_field("count");
                            }
                        }
                    }
                    // The collector closes this connection: done with it.
                    Err(_) => return,
                    Ok(None) => break,
                }
            }
        }
    }
}

pub mod http2_frames {
    use monitor::credentials::{
        h2::{ConnId, Connections},
        http,
    };

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    /// HTTP/2 writes of one connection (the preface, HEADERS and CONTINUATION with HPACK, anything
    /// else): fed in captures of any size, in and out of TCP order; the decoder must reset, never
    /// panic or grow without bound. The first byte sets the capture size, the second whether the
    /// writes come as TCP segments (with sequence numbers) or TLS writes.
    pub fn run(data: &[u8]) {
        let [size, mode, data @ ..] = data else { return };
        let mut conns = Connections::default();
        let id = ConnId { pid: 1, conn: 1 };
        // Most inputs start with the preface, as a real connection does, so the frames get read.
        let stream: Vec<u8> = if mode & 1 == 0 { [PREFACE, data].concat() } else { data.to_vec() };
        let mut seq = 1000u32;
        for capture in stream.chunks(usize::from(*size).max(1)) {
            let tcp = mode & 2 != 0;
            let feed = conns.feed(id, tcp.then_some(seq), capture, capture.len());
            for block in &feed.blocks {
                let _ = http::from_h2_fields(block, &["x-api-key".to_string()]);
            }
            // A dropped or repeated segment now and then.
            seq = seq.wrapping_add(capture.len() as u32);
            if mode & 4 != 0 && capture.first() == Some(&0) {
                seq = seq.wrapping_sub(1);
            }
        }
    }
}

pub mod http_requests {
    use monitor::credentials::http;

    /// The start of an HTTP/1.x request as a process sends it (TLS plaintext or a TCP segment):
    /// method, target, headers, credentials in Authorization, API-key headers, the query string and
    /// cookies.
    pub fn run(data: &[u8]) {
        let api_key_headers = ["x-api-key".to_string(), "private-token".to_string()];
        if let Some(request) = http::parse(data, &api_key_headers) {
            let _ = format!("{request:?}");
        }
        let _ = http::basic_password(data);
    }
}

pub mod jwt_and_argv {
    use monitor::{
        credentials::{argv, jwt},
        sessions::fingerprint::FingerprintKey,
    };

    /// Command lines of session processes (argv redaction: flags, URLs, user:password, query
    /// parameters, any word that may be a token) and JWTs found in them or on the wire.
    pub fn run(data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        let _ = jwt::decode(&text);
        let mut words: Vec<String> = text.split(['\0', ' ']).map(str::to_string).collect();
        let key = FingerprintKey::from_bytes([7; 32]);
        let found = argv::redact(&mut words, &key, &["x-api-key".to_string()], &|f| f.ends_with('0'));
        // What was redacted is gone from the words.
        for credential in found {
            let _ = format!("{credential:?}");
        }
    }
}

pub mod kernel_records {
    use monitor::decode::{decode, Clock};

    /// Ring-buffer records as the kernel side writes them (a record of a newer layout, a short
    /// one, garbage): decoded into events, or refused.
    pub fn run(data: &[u8]) {
        let _ = decode(data, Clock { boot_to_wall: 1_700_000_000_000_000_000 });
    }
}

pub mod token_responses {
    use monitor::credentials::token_response::{self, Responses};

    /// Responses a session process reads from a token endpoint (JSON bodies, HTTP/1.x or HTTP/2
    /// DATA frames), in reads of any size: tokens found or not, the held parts bounded.
    pub fn run(data: &[u8]) {
        let _ = token_response::tokens(data);
        let Some((&size, data)) = data.split_first() else { return };
        let mut responses = Responses::default();
        for (i, read) in data.chunks(usize::from(size).max(1)).enumerate() {
            let _ = responses.read(i as u64, 7, 9, read);
        }
    }
}

pub mod trace_frames {
    use monitor::{
        collector::store::Stored,
        trace::{
            format,
            frames::{Frames, Next},
            Record,
        },
    };

    /// Trace segments, the collector's store and the agent's spool read from disk (a damaged or
    /// planted file): frames read as a stream, damage skipped, each payload decoded.
    pub fn run(data: &[u8]) {
        let _ = format::check_header(data);
        let mut frames = Frames::new(data, 0);
        while let Ok(Some(next)) = frames.next::<Record>() {
            if let Next::Truncated { .. } = next {
                break;
            }
        }
        let mut frames = Frames::new(data, 0);
        while let Ok(Some(next)) = frames.next::<Stored>() {
            if let Next::Truncated { .. } = next {
                break;
            }
        }
    }
}

pub mod yaml_files {
    use monitor::{policy::Policy, sessions::SessionFile};

    /// Session files (given to `monitor run` and `session start`, sent over the control socket) and
    /// policy files: parsed and validated, or refused with the file, line and field.
    pub fn run(data: &[u8]) {
        let Ok(text) = std::str::from_utf8(data) else { return };
        if let Err(e) = SessionFile::parse(text, "fuzz.yaml") {
            let _ = e.to_string();
        }
        if let Err(e) = Policy::parse(text, "fuzz.yaml") {
            let _ = e.to_string();
        }
    }
}

/// Every target, by name: what `cargo xtask fuzz` runs and the corpus test reads seeds for.
pub const TARGETS: &[(&str, fn(&[u8]))] = &[
    ("control_requests", control_requests::run),
    ("dns_messages", dns_messages::run),
    ("forward_stream", forward_stream::run),
    ("http2_frames", http2_frames::run),
    ("http_requests", http_requests::run),
    ("jwt_and_argv", jwt_and_argv::run),
    ("kernel_records", kernel_records::run),
    ("token_responses", token_responses::run),
    ("trace_frames", trace_frames::run),
    ("yaml_files", yaml_files::run),
];
