//! HTTP requests captured on the wire: the request line (or HTTP/2 pseudo-headers), the host,
//! and the credentials in its headers. The raw values are handed to the fingerprinting step and
//! go no further.

use base64::{engine::general_purpose::STANDARD, Engine as _};

use crate::event::CredentialKind;

/// Query parameters whose value is a secret (command lines are redacted by the same list).
pub const SECRET_QUERY_PARAMS: &[&str] = &[
    "access_token",
    "token",
    "id_token",
    "refresh_token",
    "api_key",
    "apikey",
    "key",
    "secret",
    "password",
    "client_secret",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-security-token",
    "code",
];

/// Of those, the values made for one request (signatures, authorization codes): never a token a
/// session holds, so not looked at on the wire.
const ONE_OFF_QUERY_PARAMS: &[&str] = &["sig", "signature", "x-amz-signature", "code"];

/// A credential found in a request. `value` is the raw secret: fingerprint it and drop it.
pub struct RawCredential<'a> {
    pub kind: CredentialKind,
    /// The header it came in, lowercased (`?name` for a query parameter).
    pub header: String,
    /// As sent, or percent-decoded for a query parameter.
    pub value: std::borrow::Cow<'a, [u8]>,
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
        } else if name == "cookie" {
            credentials.extend(cookie_credentials(value));
        } else if let Some(c) = header_credential(name, value, api_key_headers) {
            credentials.push(c);
        }
    }
    let target = req.path.unwrap_or("");
    if !target.is_empty() {
        credentials.extend(query_credentials(in_data(target.as_bytes())));
    }
    Request { method: req.method.unwrap_or("").to_string(), path: without_query(target), host, credentials }
}

/// The secret query parameters of a request target, percent-decoded (RFC 3986 §2.1).
fn query_credentials(target: &[u8]) -> Vec<RawCredential<'_>> {
    let Some(start) = target.iter().position(|b| *b == b'?') else { return Vec::new() };
    let end = target.iter().position(|b| *b == b'#').filter(|e| *e > start).unwrap_or(target.len());
    target[start + 1..end]
        .split(|b| *b == b'&')
        .filter_map(|param| {
            let eq = param.iter().position(|b| *b == b'=')?;
            let (name, value) = (param[..eq].to_ascii_lowercase(), &param[eq + 1..]);
            let name = std::str::from_utf8(&name).ok()?;
            let secret = SECRET_QUERY_PARAMS.contains(&name) && !ONE_OFF_QUERY_PARAMS.contains(&name);
            (secret && !value.is_empty()).then(|| RawCredential {
                kind: CredentialKind::Query,
                header: format!("?{name}"),
                value: percent_decoded(value),
                key_id: None,
            })
        })
        .collect()
}

fn percent_decoded(value: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !value.contains(&b'%') && !value.contains(&b'+') {
        return value.into();
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        match (value[i], value.get(i + 1).copied().and_then(hex), value.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                out.push(high << 4 | low);
                i += 3;
            }
            // A form-encoded space.
            (b'+', ..) => {
                out.push(b' ');
                i += 1;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out.into()
}

/// The cookies of a `Cookie` header (RFC 6265 §5.4: `name=value; name=value`), each a
/// credential: a session's token sent as a cookie is matched like one sent as a header.
fn cookie_credentials(value: &[u8]) -> impl Iterator<Item = RawCredential<'_>> {
    value.split(|b| *b == b';').filter_map(|pair| {
        let pair = trim(pair);
        let eq = pair.iter().position(|b| *b == b'=')?;
        let value = trim(&pair[eq + 1..]);
        let value = value.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(value);
        (!value.is_empty()).then(|| RawCredential {
            kind: CredentialKind::Cookie,
            header: "cookie".into(),
            value: value.into(),
            key_id: None,
        })
    })
}

/// The request an HTTP/2 header block describes (`:method`, `:authority`, `:path` and the
/// credential headers; HTTP/2 field names are lowercase already). gRPC metadata is the same.
pub fn from_h2_fields<'a>(fields: &'a [(Vec<u8>, Vec<u8>)], api_key_headers: &[String]) -> Request<'a> {
    let mut request = Request { method: String::new(), path: String::new(), host: None, credentials: Vec::new() };
    for (name, value) in fields {
        let text = || String::from_utf8_lossy(value).into_owned();
        match name.as_slice() {
            b":method" => request.method = text(),
            b":path" => {
                request.path = without_query(&text());
                request.credentials.extend(query_credentials(value));
            }
            // HTTP/2 may split cookies over several fields (RFC 9113 §8.2.3).
            b"cookie" => request.credentials.extend(cookie_credentials(trim(value))),
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
        Some(RawCredential { kind: CredentialKind::ApiKey, header: name, value: value.into(), key_id: None })
    } else {
        None
    }
}

/// A request target without its query string and fragment (which may carry secrets).
fn without_query(target: &str) -> String {
    target.split(['?', '#']).next().unwrap_or("").to_string()
}

fn authorization<'a>(header: String, value: &'a [u8]) -> Option<RawCredential<'a>> {
    let split = value.iter().position(|b| *b == b' ').unwrap_or(value.len());
    let (scheme, rest) = (&value[..split], trim(&value[split..]));
    if rest.is_empty() {
        return None;
    }
    let scheme = scheme.to_ascii_lowercase();
    let credential = |kind, value: &'a [u8], key_id| {
        Some(RawCredential { kind, header: header.clone(), value: value.into(), key_id })
    };
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
        let found: Vec<_> = r.credentials.iter().map(|c| (c.kind, c.header.as_str(), &*c.value)).collect();
        assert_eq!(
            found,
            [
                (CredentialKind::Bearer, "authorization", &b"abc.def.ghi"[..]),
                (CredentialKind::Query, "?access_token", b"zzz")
            ]
        );
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
        assert_eq!(basic_password(&r.credentials[0].value).unwrap(), b"s3cret");
        assert_eq!(r.credentials[3].key_id.as_deref(), Some("AKIAEXAMPLE123"));
        assert_eq!(&*r.credentials[3].value, b"AKIAEXAMPLE123");
        let r = parse_str("GET / HTTP/1.1\r\nAuthorization: token ghp_x\r\n\r\n").unwrap();
        assert_eq!(r.credentials[0].kind, CredentialKind::Authorization);
        assert_eq!(&*r.credentials[0].value, b"ghp_x");
    }

    #[test]
    fn a_capture_cut_short_keeps_only_complete_lines() {
        let r = parse_str("GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer abc\r\nX-API-Key: cut-he").unwrap();
        assert_eq!(r.credentials.len(), 1);
        assert_eq!(&*r.credentials[0].value, b"abc");
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
        let found: Vec<_> = r.credentials.iter().map(|c| (c.kind, &*c.value)).collect();
        assert_eq!(
            found,
            [
                (CredentialKind::Query, &b"zzz"[..]),
                (CredentialKind::Bearer, b"abc.def.ghi"),
                (CredentialKind::ApiKey, b"key-2")
            ]
        );
    }

    #[test]
    fn tokens_in_the_query_string_and_in_cookies() {
        let r = parse_str(concat!(
            "GET /cb?state=x&ACCESS_TOKEN=a%2Bb%3D&code=one-off&sig=s1&empty=&token=t-2#frag HTTP/1.1\r\n",
            "Cookie: theme=dark; session=\"c-1\"\r\n",
            "\r\n"
        ))
        .unwrap();
        assert_eq!(r.path, "/cb");
        let found: Vec<_> = r.credentials.iter().map(|c| (c.kind, c.header.as_str(), &*c.value)).collect();
        assert_eq!(
            found,
            [
                (CredentialKind::Cookie, "cookie", &b"dark"[..]),
                (CredentialKind::Cookie, "cookie", b"c-1"),
                // Percent-decoded; signatures and codes are made for one request and skipped.
                (CredentialKind::Query, "?access_token", b"a+b="),
                (CredentialKind::Query, "?token", b"t-2"),
            ]
        );
        assert!(CredentialKind::Query.learnable() && !CredentialKind::Cookie.learnable());
        // HTTP/2: cookies may come in several fields.
        let fields = vec![(b"cookie".to_vec(), b"a=1".to_vec()), (b"cookie".to_vec(), b"b=2; c=3".to_vec())];
        assert_eq!(from_h2_fields(&fields, &[]).credentials.len(), 3);
        // Damaged encodings never panic and give what they can.
        for target in ["/x?token=%", "/x?token=%G1", "/x?=&&token", "/x?token=%e2%82"] {
            let _ = query_credentials(target.as_bytes());
        }
        assert_eq!(&*query_credentials(b"/x?token=%zz")[0].value, b"%zz");
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
