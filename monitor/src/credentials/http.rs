//! HTTP requests captured on the wire: the request line (or HTTP/2 pseudo-headers), the host,
//! and the credentials in its headers. The raw values are handed to the fingerprinting step and
//! go no further.

use base64::{engine::general_purpose::STANDARD, Engine as _};

/// What kind of credential a header carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    Bearer,
    Basic,
    /// `AWS4-HMAC-SHA256 Credential=AKID/...`: the access key id (the secret never travels).
    AwsSigv4,
    /// An API-key header (`X-API-Key`, ... configurable).
    ApiKey,
    /// Another `Authorization` scheme.
    Authorization,
    /// A token in an exec environment.
    Env,
    /// A credential file.
    File,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Bearer => "bearer",
            CredentialKind::Basic => "basic",
            CredentialKind::AwsSigv4 => "aws_sigv4",
            CredentialKind::ApiKey => "api_key",
            CredentialKind::Authorization => "authorization",
            CredentialKind::Env => "env",
            CredentialKind::File => "file",
        }
    }
}

/// A credential found in a request. `value` is the raw secret: fingerprint it and drop it.
pub struct RawCredential<'a> {
    pub kind: CredentialKind,
    /// The header it came in, lowercased.
    pub header: String,
    pub value: &'a [u8],
    /// An identifier that is not secret (the AWS access key id), reported as is.
    pub key_id: Option<String>,
}

impl std::fmt::Debug for RawCredential<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawCredential")
            .field("kind", &self.kind)
            .field("header", &self.header)
            .field("value", &"[redacted]")
            .field("key_id", &self.key_id)
            .finish()
    }
}

/// A request line and headers, as far as they were captured.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: String,
    /// The path without its query string (which may carry secrets).
    pub path: String,
    pub host: Option<String>,
    pub credentials: Vec<RawCredential<'a>>,
}

/// The API-key headers looked at by default; the policy adds more.
pub const DEFAULT_API_KEY_HEADERS: &[&str] =
    &["x-api-key", "api-key", "x-auth-token", "private-token", "x-goog-api-key", "x-amz-security-token"];

const MAX_HEADERS: usize = 64;

/// Parses the start of a request. A capture cut short in the headers still gives the headers
/// before the cut. `None` for anything that is not an HTTP/1.x request.
pub fn parse<'a>(data: &'a [u8], api_key_headers: &[String]) -> Option<Request<'a>> {
    // Only complete header lines are trusted: a line cut by the capture limit could carry half
    // a token, whose fingerprint would match nothing and mislead.
    let end = match find(data, b"\r\n\r\n") {
        Some(at) => at + 4,
        None => find_last(data, b"\r\n")? + 2,
    };
    // A head cut before its blank line parses as Partial: supply the blank line, so the
    // complete lines are returned.
    let mut head = data[..end].to_vec();
    if !head.ends_with(b"\r\n\r\n") {
        head.extend_from_slice(b"\r\n");
    }
    parse_head(data, &head, api_key_headers)
}

fn parse_head<'a>(data: &'a [u8], owned: &[u8], api_key_headers: &[String]) -> Option<Request<'a>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(owned) {
        Ok(httparse::Status::Complete(_)) => Some(build(data, owned, &req, api_key_headers)),
        _ => None,
    }
}

/// Builds the request; header values are sliced from `data` at their offset in `parsed` (the
/// same bytes, possibly with a blank line appended).
fn build<'a>(data: &'a [u8], parsed: &[u8], req: &httparse::Request, api_key_headers: &[String]) -> Request<'a> {
    let in_data = |value: &[u8]| -> &'a [u8] {
        let start = value.as_ptr() as usize - parsed.as_ptr() as usize;
        &data[start..start + value.len()]
    };
    let mut host = None;
    let mut credentials = Vec::new();
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let value = trim(in_data(h.value));
        if name == "host" {
            host = Some(String::from_utf8_lossy(value).into_owned());
        } else if let Some(c) = header_credential(name, value, api_key_headers) {
            credentials.push(c);
        }
    }
    let target = req.path.unwrap_or("");
    Request { method: req.method.unwrap_or("").to_string(), path: without_query(target), host, credentials }
}

/// The request an HTTP/2 header block describes (`:method`, `:authority`, `:path` and the
/// credential headers; HTTP/2 field names are lowercase already). gRPC metadata is the same.
pub fn from_h2_fields<'a>(fields: &'a [(Vec<u8>, Vec<u8>)], api_key_headers: &[String]) -> Request<'a> {
    let mut request = Request { method: String::new(), path: String::new(), host: None, credentials: Vec::new() };
    for (name, value) in fields {
        let text = || String::from_utf8_lossy(value).into_owned();
        match name.as_slice() {
            b":method" => request.method = text(),
            b":path" => request.path = without_query(&text()),
            b":authority" => request.host = Some(text()),
            // HTTP/1.1 style, allowed by RFC 9113 §8.3.1 when :authority is absent.
            b"host" if request.host.is_none() => request.host = Some(text()),
            _ => {
                let name = String::from_utf8_lossy(name).to_ascii_lowercase();
                if let Some(c) = header_credential(name, trim(value), api_key_headers) {
                    request.credentials.push(c);
                }
            }
        }
    }
    request
}

/// The credential a header carries, for a lowercased header name.
fn header_credential<'a>(name: String, value: &'a [u8], api_key_headers: &[String]) -> Option<RawCredential<'a>> {
    if name == "authorization" || name == "proxy-authorization" {
        authorization(name, value)
    } else if !value.is_empty()
        && (DEFAULT_API_KEY_HEADERS.contains(&name.as_str()) || api_key_headers.iter().any(|k| k == &name))
    {
        Some(RawCredential { kind: CredentialKind::ApiKey, header: name, value, key_id: None })
    } else {
        None
    }
}

/// A request target without its query string and fragment (which may carry secrets).
fn without_query(target: &str) -> String {
    target.split(['?', '#']).next().unwrap_or("").to_string()
}

fn authorization(header: String, value: &[u8]) -> Option<RawCredential<'_>> {
    let split = value.iter().position(|b| *b == b' ').unwrap_or(value.len());
    let (scheme, rest) = (&value[..split], trim(&value[split..]));
    if rest.is_empty() {
        return None;
    }
    let scheme = scheme.to_ascii_lowercase();
    let credential = |kind, value, key_id| Some(RawCredential { kind, header: header.clone(), value, key_id });
    match scheme.as_slice() {
        b"bearer" => credential(CredentialKind::Bearer, rest, None),
        // Fingerprinted by its password (see `basic_password`): a token is often sent as one.
        b"basic" => credential(CredentialKind::Basic, rest, None),
        b"aws4-hmac-sha256" => {
            let text = String::from_utf8_lossy(rest);
            let key_id = text
                .split(',')
                .map(str::trim)
                .find_map(|p| p.strip_prefix("Credential="))
                .and_then(|c| c.split('/').next())
                .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()))
                .map(str::to_string)?;
            let start = find(rest, key_id.as_bytes())?;
            credential(CredentialKind::AwsSigv4, &rest[start..start + key_id.len()], Some(key_id))
        }
        _ => credential(CredentialKind::Authorization, rest, None),
    }
}

/// The password of a Basic credential (`base64(user:password)`), decoded. A token handed out
/// for a task is often sent as a Basic password; its fingerprint is what matches the session's.
pub fn basic_password(value: &[u8]) -> Option<Vec<u8>> {
    let decoded = STANDARD.decode(value).ok()?;
    let at = decoded.iter().position(|b| *b == b':')?;
    Some(decoded[at + 1..].to_vec())
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn find_last(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Option<Request<'_>> {
        parse(text.as_bytes(), &["x-custom-key".to_string()])
    }

    #[test]
    fn bearer_host_and_path_without_query() {
        let r = parse_str(
            "GET /v1/refunds/4711?access_token=zzz HTTP/1.1\r\nHost: api.example:8443\r\nAuthorization: Bearer abc.def.ghi\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/v1/refunds/4711"));
        assert_eq!(r.host.as_deref(), Some("api.example:8443"));
        assert_eq!(r.credentials.len(), 1);
        assert_eq!(r.credentials[0].kind, CredentialKind::Bearer);
        assert_eq!(r.credentials[0].value, b"abc.def.ghi");
        assert!(!format!("{r:?}").contains("abc.def"), "Debug must not show secrets");
    }

    #[test]
    fn basic_sigv4_api_keys_and_other_schemes() {
        let r = parse_str(concat!(
            "POST /x HTTP/1.1\r\n",
            "Authorization: Basic dXNlcjpzM2NyZXQ=\r\n",
            "X-API-Key: key-1\r\n",
            "X-Custom-Key: key-2\r\n",
            "Proxy-Authorization: AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE123/20261123/eu-west-1/s3/aws4_request, SignedHeaders=host, Signature=abcd\r\n",
            "\r\n"
        ))
        .unwrap();
        let kinds: Vec<_> = r.credentials.iter().map(|c| (c.kind, c.header.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (CredentialKind::Basic, "authorization"),
                (CredentialKind::ApiKey, "x-api-key"),
                (CredentialKind::ApiKey, "x-custom-key"),
                (CredentialKind::AwsSigv4, "proxy-authorization"),
            ]
        );
        assert_eq!(basic_password(r.credentials[0].value).unwrap(), b"s3cret");
        assert_eq!(r.credentials[3].key_id.as_deref(), Some("AKIAEXAMPLE123"));
        assert_eq!(r.credentials[3].value, b"AKIAEXAMPLE123");
        let r = parse_str("GET / HTTP/1.1\r\nAuthorization: token ghp_x\r\n\r\n").unwrap();
        assert_eq!(r.credentials[0].kind, CredentialKind::Authorization);
        assert_eq!(r.credentials[0].value, b"ghp_x");
    }

    #[test]
    fn a_capture_cut_short_keeps_only_complete_lines() {
        let r = parse_str("GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer abc\r\nX-API-Key: cut-he").unwrap();
        assert_eq!(r.credentials.len(), 1);
        assert_eq!(r.credentials[0].value, b"abc");
        let r = parse_str("GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer ab").unwrap();
        assert!(r.credentials.is_empty());
    }

    #[test]
    fn http2_fields_give_the_same_request() {
        let fields: Vec<(Vec<u8>, Vec<u8>)> = [
            (":method", "POST"),
            (":authority", "api.example:8443"),
            (":path", "/pkg.Service/Call?token=zzz"),
            ("authorization", "Bearer abc.def.ghi"),
            ("x-custom-key", "key-2"),
            ("content-type", "application/grpc"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
        let r = from_h2_fields(&fields, &["x-custom-key".to_string()]);
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/pkg.Service/Call"));
        assert_eq!(r.host.as_deref(), Some("api.example:8443"));
        let found: Vec<_> = r.credentials.iter().map(|c| (c.kind, c.value)).collect();
        assert_eq!(found, [(CredentialKind::Bearer, &b"abc.def.ghi"[..]), (CredentialKind::ApiKey, &b"key-2"[..])]);
    }

    #[test]
    fn not_http_is_none_and_never_panics() {
        assert!(parse_str("\x16\x03\x01\x02\x00").is_none());
        assert!(parse_str("GET\r\n\r\n").is_none());
        for seed in 0..2000u32 {
            let bytes: Vec<u8> =
                (0..(seed % 300)).map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 40503) >> 7) as u8).collect();
            let mut data = b"GET / HTTP/1.1\r\n".to_vec();
            data.extend_from_slice(&bytes);
            let _ = parse(&data, &[]);
        }
    }
}
