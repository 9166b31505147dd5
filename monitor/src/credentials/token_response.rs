//! Token responses (OAuth 2.0, RFC 6749 §5.1; token exchange, RFC 8693 §2.2.1) a session process
//! receives: the tokens in them become the session's, so a job that keeps one after the task is
//! caught when it uses it. The capture is a TLS read on a connection whose last request was a
//! POST; it may hold the response head, the body, or both, and a chunked body's size line.

/// The members of a token response that carry credentials.
const TOKEN_FIELDS: [&str; 3] = ["access_token", "id_token", "refresh_token"];
/// Tokens longer than this are not taken (no real one is; a huge string is not a token).
const MAX_TOKEN: usize = 16 * 1024;

/// The credentials in the JSON object the capture holds, by member name. The raw values: turn
/// them into fingerprints and drop them.
pub fn tokens(data: &[u8]) -> Vec<(&'static str, String)> {
    let body = match data.strip_prefix(b"HTTP/") {
        Some(_) => match data.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => &data[end + 4..],
            None => return Vec::new(),
        },
        None => data,
    };
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
