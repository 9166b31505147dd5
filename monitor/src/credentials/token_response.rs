//! Token responses (OAuth 2.0, RFC 6749 §5.1; token exchange, RFC 8693 §2.2.1) a session process
//! receives: the tokens in them become the session's, so a job that keeps one after the task is
//! caught when it uses it. The capture is a TLS read on a connection whose last request was a
//! POST; it may hold the response head, the body, or both, and a chunked body's size line; or,
//! on an HTTP/2 connection, frames, whose DATA payloads are the body.

use std::collections::HashMap;

/// The members of a token response that carry credentials.
const TOKEN_FIELDS: [&str; 3] = ["access_token", "id_token", "refresh_token"];
/// Tokens longer than this are not taken (no real one is; a huge string is not a token).
const MAX_TOKEN: usize = 16 * 1024;
/// A response not whole after this many bytes is given up (no token response is this long).
const MAX_RESPONSE: usize = 64 * 1024;
/// Connections whose response is awaited at once; past this the one waiting longest is dropped.
const MAX_WAITING: usize = 256;
/// A response whose next read has not come after this long is given up.
const WAIT_NS: u64 = 30 * 1_000_000_000;

/// What a capture (or the reads of one response so far) holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// The credentials of the token response's JSON object, by member name. The raw values:
    /// turn them into fingerprints and drop them.
    Tokens(Vec<(&'static str, String)>),
    /// The start of a response that may still be a token response: its next read says.
    Incomplete,
    /// No token response.
    Nothing,
}

/// The responses being read, by connection: a body may come in several reads (a client that
/// reads 4 KiB at a time, a JWT longer than one TLS record, DATA frames split across reads).
#[derive(Debug, Default)]
pub struct Responses {
    waiting: HashMap<(u32, u64), (u64, Vec<u8>)>,
}

impl Responses {
    /// The tokens of the response that `data`, the next read of `(pid, conn)`, completes (none
    /// while it is not whole, and none when it is no token response).
    pub fn read(&mut self, ts: u64, pid: u32, conn: u64, data: &[u8]) -> Vec<(&'static str, String)> {
        let key = (pid, conn);
        let (mut response, found) = match self.waiting.remove(&key) {
            Some((at, mut held)) if ts.saturating_sub(at) < WAIT_NS => {
                held.extend_from_slice(data);
                let found = tokens(&held);
                (held, found)
            }
            _ => match tokens(data) {
                Found::Incomplete => (data.to_vec(), Found::Incomplete),
                found => (Vec::new(), found),
            },
        };
        match found {
            Found::Tokens(tokens) => tokens,
            Found::Incomplete if response.len() <= MAX_RESPONSE => {
                if self.waiting.len() >= MAX_WAITING {
                    self.waiting.retain(|_, (at, _)| ts.saturating_sub(*at) < WAIT_NS);
                    if let Some(oldest) = self.waiting.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| *k) {
                        self.waiting.remove(&oldest);
                    }
                }
                response.shrink_to_fit();
                self.waiting.insert(key, (ts, response));
                Vec::new()
            }
            Found::Incomplete | Found::Nothing => Vec::new(),
        }
    }

    /// Forgets the responses of a process that exited.
    pub fn forget_pid(&mut self, pid: u32) {
        self.waiting.retain(|(p, _), _| *p != pid);
    }
}

/// What one capture holds: an HTTP/1.x response with or without its head, a chunked body with
/// its size lines, or, on an HTTP/2 connection, frames, whose DATA payloads are the bodies.
pub fn tokens(data: &[u8]) -> Found {
    if let Some(streams) = h2_bodies(data) {
        return streams
            .into_iter()
            .fold(Found::Nothing, |found, (body, ended)| merge(found, body_tokens(&body, ended)));
    }
    if data.strip_prefix(b"HTTP/").is_none() {
        return body_tokens(data, false);
    }
    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else { return Found::Incomplete };
    let (head, body) = (&data[..end], &data[end + 4..]);
    let chunked = String::from_utf8_lossy(head)
        .to_ascii_lowercase()
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    match chunked.then(|| dechunk(body)).flatten() {
        Some((body, ended)) => body_tokens(&body, ended),
        None => body_tokens(body, false),
    }
}

/// Tokens found anywhere win; else a response not whole yet keeps the wait going.
fn merge(a: Found, b: Found) -> Found {
    match (a, b) {
        (Found::Tokens(mut a), Found::Tokens(b)) => {
            a.extend(b);
            Found::Tokens(a)
        }
        (t @ Found::Tokens(_), _) | (_, t @ Found::Tokens(_)) => t,
        (Found::Incomplete, _) | (_, Found::Incomplete) => Found::Incomplete,
        _ => Found::Nothing,
    }
}

/// A chunked body (RFC 9112 §7.1) without its size lines, and whether its last chunk came;
/// None when it is not one.
fn dechunk(mut rest: &[u8]) -> Option<(Vec<u8>, bool)> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else { return Some((body, false)) };
        let line = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some((body, true));
        }
        rest = &rest[line_end + 2..];
        if rest.len() < size {
            body.extend_from_slice(rest);
            return Some((body, false));
        }
        body.extend_from_slice(&rest[..size]);
        rest = rest[size..].strip_prefix(b"\r\n").unwrap_or_default();
    }
}

/// HTTP/2 frame types (RFC 9113 §6), the flags read, and the frame header's size.
const H2_DATA: u8 = 0x0;
const H2_HEADERS: u8 = 0x1;
const H2_LAST_TYPE: u8 = 0x9;
const H2_END_STREAM: u8 = 0x1;
const H2_PADDED: u8 = 0x8;
const H2_FRAME_HEADER: usize = 9;

/// The bodies of the streams whose response a capture of HTTP/2 frames starts or carries, each
/// with whether it ended (the last frame may be cut where the capture ends); None when the
/// capture is not frames (an HTTP/1.x response does not parse as frames: its first bytes would
/// be a length of several MiB or an unknown type).
fn h2_bodies(data: &[u8]) -> Option<Vec<(Vec<u8>, bool)>> {
    if data.len() < H2_FRAME_HEADER {
        return None;
    }
    let mut rest = data;
    let mut streams: Vec<(u32, Vec<u8>, bool)> = Vec::new();
    while !rest.is_empty() {
        // A frame header cut by the end of the read: the next read has the rest.
        let Some(header) = rest.get(..H2_FRAME_HEADER) else { break };
        let len = (header[0] as usize) << 16 | (header[1] as usize) << 8 | header[2] as usize;
        let (kind, flags) = (header[3], header[4]);
        let stream = u32::from_be_bytes([header[5] & 0x7f, header[6], header[7], header[8]]);
        if kind > H2_LAST_TYPE || len > 1 << 24 {
            return None;
        }
        let payload = &rest[H2_FRAME_HEADER..];
        let (payload, next) = payload.split_at(len.min(payload.len()));
        let whole = payload.len() == len;
        if kind == H2_DATA || kind == H2_HEADERS {
            let at = match streams.iter().position(|(id, _, _)| *id == stream) {
                Some(at) => at,
                None => {
                    streams.push((stream, Vec::new(), false));
                    streams.len() - 1
                }
            };
            let entry = &mut streams[at];
            entry.2 |= whole && flags & H2_END_STREAM != 0;
            if kind == H2_DATA {
                let unpadded = match flags & H2_PADDED {
                    0 => payload,
                    // A cut padded frame: its padding length is known, where it starts is not.
                    _ if !whole => payload.get(1..).unwrap_or_default(),
                    _ => {
                        let pad = payload.first().copied().unwrap_or(0) as usize;
                        payload.get(1..payload.len().saturating_sub(pad)).unwrap_or_default()
                    }
                };
                entry.1.extend_from_slice(unpadded);
            }
        }
        rest = next;
    }
    Some(streams.into_iter().map(|(_, body, ended)| (body, ended)).collect())
}

/// The tokens of a body's JSON object; `ended` says no more of the body will come.
fn body_tokens(body: &[u8], ended: bool) -> Found {
    // A body cut in the read before may start anywhere; the object starts at its first brace.
    let Some(start) = body.iter().position(|b| *b == b'{') else {
        let waiting = !ended && body.iter().all(u8::is_ascii_whitespace);
        return if waiting { Found::Incomplete } else { Found::Nothing };
    };
    let mut values = serde_json::Deserializer::from_slice(&body[start..]).into_iter::<serde_json::Value>();
    let object = match values.next() {
        Some(Ok(serde_json::Value::Object(object))) => object,
        Some(Err(e)) if e.is_eof() && !ended => return Found::Incomplete,
        _ => return Found::Nothing,
    };
    let tokens: Vec<_> = TOKEN_FIELDS
        .iter()
        .filter_map(|field| match object.get(*field) {
            Some(serde_json::Value::String(v)) if !v.is_empty() && v.len() <= MAX_TOKEN => Some((*field, v.clone())),
            _ => None,
        })
        .collect();
    if tokens.is_empty() {
        Found::Nothing
    } else {
        Found::Tokens(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(data: &[u8]) -> Vec<(&'static str, String)> {
        match tokens(data) {
            Found::Tokens(tokens) => tokens,
            _ => Vec::new(),
        }
    }

    #[test]
    fn tokens_from_a_response_with_or_without_its_head_and_chunked() {
        let body =
            r#"{"access_token":"at-1","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-1","scope":"x"}"#;
        let whole = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{body}");
        assert_eq!(found(whole.as_bytes()), [("access_token", "at-1".into()), ("refresh_token", "rt-1".into())]);
        assert_eq!(found(body.as_bytes()).len(), 2);
        let chunked =
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
        assert_eq!(found(chunked.as_bytes()).len(), 2);
        // Several chunks: the size lines between them are not part of the object.
        let (a, b) = body.split_at(20);
        let chunks = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        assert_eq!(found(chunks.as_bytes()).len(), 2);
        // RFC 8693: the issued token is `access_token` too, with an id_token beside it.
        let exchange =
            r#"{"access_token":"ex-1","issued_token_type":"urn:ietf:params:oauth:token-type:jwt","id_token":"id-1"}"#;
        assert_eq!(found(exchange.as_bytes()), [("access_token", "ex-1".into()), ("id_token", "id-1".into())]);
    }

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn tokens_from_http2_data_frames_padded_or_not() {
        let body = br#"{"access_token":"h2-at","token_type":"Bearer"}"#;
        // SETTINGS, then the response's HEADERS (an HPACK block: binary, a brace among it), then
        // its DATA, as one read may hold them.
        let mut read = frame(0x4, 0, &[]);
        read.extend(frame(0x1, 0x4, &[0x88, 0x7b, 0x5f, 0x8b]));
        read.extend(frame(0x0, 0x1, body));
        assert_eq!(found(&read), [("access_token", "h2-at".into())]);
        let mut padded = vec![3u8];
        padded.extend_from_slice(body);
        padded.extend_from_slice(&[0, 0, 0]);
        assert_eq!(found(&frame(0x0, 0x8 | 0x1, &padded)), [("access_token", "h2-at".into())]);
        // The body over two DATA frames of the stream.
        let mut two = frame(0x0, 0, &body[..10]);
        two.extend(frame(0x0, 0x1, &body[10..]));
        assert_eq!(found(&two), [("access_token", "h2-at".into())]);
        // Headers alone: the body is still to come (and no HTTP/1.x reading of the binary).
        assert_eq!(tokens(&frame(0x1, 0x4, b"{\"access_token\":\"no\"}")), Found::Incomplete);
        // Frames of no response at all: nothing to wait for.
        assert_eq!(tokens(&frame(0x4, 0x1, &[])), Found::Nothing);
        for cut in 0..read.len() {
            let _ = tokens(&read[..cut]);
        }
    }

    #[test]
    fn a_response_split_across_reads_is_read_whole() {
        let token = "t".repeat(6000);
        let body = format!(r#"{{"access_token":"{token}","token_type":"Bearer"}}"#);
        let h1 = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let mut h2 = frame(0x1, 0x4, &[0x88]);
        h2.extend(frame(0x0, 0x1, body.as_bytes()));
        for response in [h1.as_bytes(), &h2] {
            // Every cut into two reads, and reads of 4 KiB as a client's buffered reader makes.
            for cut in (1..response.len()).step_by(97) {
                let mut responses = Responses::default();
                assert!(responses.read(1, 7, 9, &response[..cut]).is_empty(), "cut at {cut}");
                assert_eq!(
                    responses.read(2, 7, 9, &response[cut..]),
                    [("access_token", token.clone())],
                    "cut at {cut}"
                );
                assert!(responses.waiting.is_empty());
            }
            let mut responses = Responses::default();
            let got: Vec<_> = response.chunks(4096).flat_map(|read| responses.read(1, 7, 9, read)).collect();
            assert_eq!(got, [("access_token", token.clone())]);
        }
    }

    #[test]
    fn what_is_waited_for_is_bounded() {
        let mut responses = Responses::default();
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 9999\r\n\r\n{\"access_token\":\"";
        for conn in 0..(MAX_WAITING as u64 + 50) {
            responses.read(conn, 7, conn, head);
        }
        assert!(responses.waiting.len() <= MAX_WAITING);
        // A body that never ends is given up past the largest response, and after the wait.
        let mut responses = Responses::default();
        responses.read(1, 7, 1, head);
        for _ in 0..(MAX_RESPONSE / 4096 + 1) {
            responses.read(1, 7, 1, &[b'x'; 4096]);
        }
        assert!(responses.waiting.is_empty());
        responses.read(1, 7, 1, head);
        assert!(responses.read(1 + WAIT_NS, 7, 1, b"x\"}").is_empty());
        responses.forget_pid(7);
        assert!(responses.waiting.is_empty());
    }

    #[test]
    fn other_bodies_and_damaged_input_give_nothing() {
        for data in [
            &b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html>{}</html>"[..],
            br#"{"access_token": 42}"#,
            br#"["access_token", "x"]"#,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}",
        ] {
            assert_eq!(tokens(data), Found::Nothing, "{:?}", String::from_utf8_lossy(data));
        }
        for data in [&b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n"[..], br#"{"access_token": "cut"#, b""] {
            assert_eq!(tokens(data), Found::Incomplete, "{:?}", String::from_utf8_lossy(data));
        }
        let text = r#"HTTP/1.1 200 OK\r\n\r\n{"access_token":"abc","refresh_token":"def"}"#.as_bytes();
        for cut in 0..text.len() {
            let _ = tokens(&text[..cut]);
        }
    }
}
