//! Token responses (OAuth 2.0, RFC 6749 §5.1; token exchange, RFC 8693 §2.2.1) a session process
//! receives: the tokens in them become the session's, so a job that keeps one after the task is
//! caught when it uses it. The capture is a TLS read on a connection whose last request was a
//! POST; it may hold the response head, the body, or both, and a chunked body's size line; or,
//! on an HTTP/2 connection, frames, whose DATA payloads are the body.

/// The members of a token response that carry credentials.
const TOKEN_FIELDS: [&str; 3] = ["access_token", "id_token", "refresh_token"];
/// Tokens longer than this are not taken (no real one is; a huge string is not a token).
const MAX_TOKEN: usize = 16 * 1024;

/// The credentials in the JSON object the capture holds, by member name. The raw values: turn
/// them into fingerprints and drop them.
pub fn tokens(data: &[u8]) -> Vec<(&'static str, String)> {
    if let Some(bodies) = h2_data(data) {
        return bodies.into_iter().flat_map(body_tokens).collect();
    }
    let body = match data.strip_prefix(b"HTTP/") {
        Some(_) => match data.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => &data[end + 4..],
            None => return Vec::new(),
        },
        None => data,
    };
    body_tokens(body)
}

/// HTTP/2 frame types (RFC 9113 §6) and the DATA frame's PADDED flag.
const H2_DATA: u8 = 0x0;
const H2_LAST_TYPE: u8 = 0x9;
const H2_PADDED: u8 = 0x8;
const H2_FRAME_HEADER: usize = 9;

/// The DATA payloads of a capture that is a run of HTTP/2 frames (the last may be cut where the
/// capture ends); None when it is not one (an HTTP/1.x response does not parse as frames: its
/// first bytes would be a length of several MiB or an unknown type).
fn h2_data(data: &[u8]) -> Option<Vec<&[u8]>> {
    let mut rest = data;
    let mut payloads = Vec::new();
    while !rest.is_empty() {
        let header = rest.get(..H2_FRAME_HEADER)?;
        let len = (header[0] as usize) << 16 | (header[1] as usize) << 8 | header[2] as usize;
        let (kind, flags) = (header[3], header[4]);
        if kind > H2_LAST_TYPE || len > 1 << 24 {
            return None;
        }
        let payload = &rest[H2_FRAME_HEADER..];
        let (payload, next) = payload.split_at(len.min(payload.len()));
        if kind == H2_DATA {
            let unpadded = match flags & H2_PADDED {
                0 => payload,
                _ => {
                    let pad = *payload.first()? as usize;
                    payload.get(1..payload.len().saturating_sub(pad)).unwrap_or_default()
                }
            };
            payloads.push(unpadded);
        }
        rest = next;
    }
    (!payloads.is_empty() || data.len() >= H2_FRAME_HEADER).then_some(payloads)
}

fn body_tokens(body: &[u8]) -> Vec<(&'static str, String)> {
    // A chunked body starts with its size line; the object with its first brace.
    let Some(start) = body.iter().position(|b| *b == b'{') else { return Vec::new() };
    let mut values = serde_json::Deserializer::from_slice(&body[start..]).into_iter::<serde_json::Value>();
    let Some(Ok(serde_json::Value::Object(object))) = values.next() else { return Vec::new() };
    TOKEN_FIELDS
        .iter()
        .filter_map(|field| match object.get(*field) {
            Some(serde_json::Value::String(v)) if !v.is_empty() && v.len() <= MAX_TOKEN => Some((*field, v.clone())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_from_a_response_with_or_without_its_head_and_chunked() {
        let body =
            r#"{"access_token":"at-1","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-1","scope":"x"}"#;
        let whole = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{body}");
        assert_eq!(tokens(whole.as_bytes()), [("access_token", "at-1".into()), ("refresh_token", "rt-1".into())]);
        assert_eq!(tokens(body.as_bytes()).len(), 2);
        let chunked =
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
        assert_eq!(tokens(chunked.as_bytes()).len(), 2);
        // RFC 8693: the issued token is `access_token` too, with an id_token beside it.
        let exchange =
            r#"{"access_token":"ex-1","issued_token_type":"urn:ietf:params:oauth:token-type:jwt","id_token":"id-1"}"#;
        assert_eq!(tokens(exchange.as_bytes()), [("access_token", "ex-1".into()), ("id_token", "id-1".into())]);
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
        assert_eq!(tokens(&read), [("access_token", "h2-at".into())]);
        let mut padded = vec![3u8];
        padded.extend_from_slice(body);
        padded.extend_from_slice(&[0, 0, 0]);
        assert_eq!(tokens(&frame(0x0, 0x8 | 0x1, &padded)), [("access_token", "h2-at".into())]);
        // Headers alone: frames, no body, nothing (and no HTTP/1.x reading of the binary).
        assert!(tokens(&frame(0x1, 0x4, b"{\"access_token\":\"no\"}")).is_empty());
        for cut in 0..read.len() {
            let _ = tokens(&read[..cut]);
        }
    }

    #[test]
    fn other_bodies_and_damaged_input_give_nothing() {
        for data in [
            &b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html>{}</html>"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n",
            br#"{"access_token": 42}"#,
            br#"{"access_token": "cut"#,
            br#"["access_token", "x"]"#,
            b"",
        ] {
            assert!(tokens(data).is_empty(), "{:?}", String::from_utf8_lossy(data));
        }
        let text = r#"HTTP/1.1 200 OK\r\n\r\n{"access_token":"abc","refresh_token":"def"}"#.as_bytes();
        for cut in 0..text.len() {
            let _ = tokens(&text[..cut]);
        }
    }
}
