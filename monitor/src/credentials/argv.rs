//! Secrets on command lines. `curl -H "Authorization: Bearer …"`, `--token=…`, `-u user:pass`,
//! `https://user:pass@host/`, `?access_token=…`, `TOKEN=… cmd`, a bare JWT, or any word that is a
//! session's token: each value is replaced in the argv by its keyed fingerprint before the argv
//! goes anywhere (engine, alerts, traces, logs). What was found is returned, so a session token
//! handed on a command line counts as a use of that token.

use super::{jwt, CredentialKind, JwtClaims};
use crate::sessions::fingerprint::FingerprintKey;

/// A credential found in an argument, by fingerprint.
#[derive(Debug, Clone, PartialEq)]
pub struct ArgvCredential {
    /// Index of the argument in argv.
    pub index: usize,
    pub kind: CredentialKind,
    pub fingerprint: String,
    pub jwt: Option<JwtClaims>,
}

/// Flags whose value is a secret: `--token X`, `--api-key=X`, `--password X` …
const SECRET_FLAG_WORDS: &[&str] =
    &["token", "password", "passwd", "secret", "api-key", "apikey", "api_key", "credential"];
/// Environment-style assignments (`NAME=value`) whose value is a secret when NAME contains one.
const SECRET_NAME_WORDS: &[&str] =
    &["TOKEN", "SECRET", "PASSWORD", "PASSWD", "API_KEY", "APIKEY", "CREDENTIAL", "PRIVATE_KEY"];
/// Pieces shorter than this are not fingerprinted against session tokens (cost, and no token is
/// that short).
const MIN_TOKEN_LEN: usize = 8;

/// Replaces every secret in `argv` by `[redacted FINGERPRINT]`. `is_session_token` says whether a
/// fingerprint belongs to a session, so a session's token in any word is found, whatever its
/// shape.
pub fn redact(
    argv: &mut [String],
    key: &FingerprintKey,
    api_key_headers: &[String],
    is_session_token: &dyn Fn(&str) -> bool,
) -> Vec<ArgvCredential> {
    let mut found = Vec::new();
    let mut next_is_secret: Option<CredentialKind> = None;
    for index in 0..argv.len() {
        let mut redactor = Redactor { key, index, found: &mut found };
        let arg = std::mem::take(&mut argv[index]);
        let arg = match next_is_secret.take() {
            Some(CredentialKind::Basic) => redactor.user_password(&arg),
            Some(kind) => redactor.replace(&arg, 0..arg.len(), kind),
            None => {
                next_is_secret = secret_flag(&arg);
                let arg = redactor.flag_value(&arg);
                let arg = redactor.header(&arg, api_key_headers);
                let arg = redactor.assignment(&arg);
                let arg = redactor.url(&arg);
                redactor.jwts(&arg)
            }
        };
        argv[index] = redactor.session_tokens(&arg, is_session_token);
    }
    found
}

/// The kind of the next argument's secret when `arg` is a flag that takes one as its next word.
fn secret_flag(arg: &str) -> Option<CredentialKind> {
    match arg {
        // curl, wget: user:password.
        "-u" | "--user" | "--proxy-user" => Some(CredentialKind::Basic),
        "--oauth2-bearer" => Some(CredentialKind::Bearer),
        _ if arg.starts_with("--") && !arg.contains('=') && is_secret_flag(&arg[2..]) => {
            Some(CredentialKind::Authorization)
        }
        _ => None,
    }
}

fn is_secret_flag(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_FLAG_WORDS.iter().any(|w| name.contains(w))
}

struct Redactor<'a> {
    key: &'a FingerprintKey,
    index: usize,
    found: &'a mut Vec<ArgvCredential>,
}

impl Redactor<'_> {
    /// `arg` with `range` replaced by the fingerprint of what it held.
    fn replace(&mut self, arg: &str, range: std::ops::Range<usize>, kind: CredentialKind) -> String {
        let value = &arg[range.clone()];
        if value.is_empty() || value.starts_with("[redacted ") {
            return arg.to_string();
        }
        let fingerprint = self.key.fingerprint(value.as_bytes());
        let jwt = jwt::decode(value);
        let marker = format!("[redacted {fingerprint}]");
        self.found.push(ArgvCredential { index: self.index, kind, fingerprint, jwt });
        format!("{}{marker}{}", &arg[..range.start], &arg[range.end..])
    }

    /// `user:password` (or `-uuser:password`): the password.
    fn user_password(&mut self, arg: &str) -> String {
        match arg.find(':') {
            Some(at) => self.replace(arg, at + 1..arg.len(), CredentialKind::Basic),
            None => arg.to_string(),
        }
    }

    /// `--token=X`, `--api-key=X`: X.
    fn flag_value(&mut self, arg: &str) -> String {
        let Some(eq) = arg.find('=') else { return arg.to_string() };
        if arg.starts_with("--") && is_secret_flag(&arg[2..eq]) {
            return self.replace(arg, eq + 1..arg.len(), CredentialKind::Authorization);
        }
        if let Some(rest) = arg.strip_prefix("--user=").or(arg.strip_prefix("--proxy-user=")) {
            let at = arg.len() - rest.len();
            return match rest.find(':') {
                Some(colon) => self.replace(arg, at + colon + 1..arg.len(), CredentialKind::Basic),
                None => arg.to_string(),
            };
        }
        arg.to_string()
    }

    /// `Authorization: Bearer X`, `X-API-Key: X`, `Cookie: …`: the value after the scheme.
    fn header(&mut self, arg: &str, api_key_headers: &[String]) -> String {
        let Some(colon) = arg.find(':') else { return arg.to_string() };
        let name = &arg[..colon];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return arg.to_string();
        }
        let name = name.to_ascii_lowercase();
        let start = colon + 1 + (arg.len() - colon - 1 - arg[colon + 1..].trim_start().len());
        let value = arg[start..].trim_end();
        if value.is_empty() {
            return arg.to_string();
        }
        let end = start + value.len();
        match name.as_str() {
            "authorization" | "proxy-authorization" => {
                let (scheme, rest) = value.split_once(' ').unwrap_or(("", value));
                let rest_start = end - rest.len() + (rest.len() - rest.trim_start().len());
                let kind = match scheme.to_ascii_lowercase().as_str() {
                    "bearer" => CredentialKind::Bearer,
                    "basic" => CredentialKind::Basic,
                    _ => CredentialKind::Authorization,
                };
                self.replace(arg, rest_start..end, kind)
            }
            "cookie" => self.replace(arg, start..end, CredentialKind::Authorization),
            _ if super::http::DEFAULT_API_KEY_HEADERS.contains(&name.as_str())
                || api_key_headers.iter().any(|h| h.eq_ignore_ascii_case(&name)) =>
            {
                self.replace(arg, start..end, CredentialKind::ApiKey)
            }
            _ => arg.to_string(),
        }
    }

    /// `GITHUB_TOKEN=X` (as given to env, sudo, make …): X.
    fn assignment(&mut self, arg: &str) -> String {
        let Some(eq) = arg.find('=') else { return arg.to_string() };
        let name = &arg[..eq];
        let env_like = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        let upper = name.to_ascii_uppercase();
        if env_like && SECRET_NAME_WORDS.iter().any(|w| upper.contains(w)) {
            return self.replace(arg, eq + 1..arg.len(), CredentialKind::Authorization);
        }
        arg.to_string()
    }

    /// `scheme://user:password@host/…?token=X&…`: the password and secret query values.
    fn url(&mut self, arg: &str) -> String {
        let Some(scheme_end) = arg.find("://") else { return arg.to_string() };
        let mut arg = arg.to_string();
        let authority_start = scheme_end + 3;
        let authority_end = arg[authority_start..].find(['/', '?', '#']).map_or(arg.len(), |i| authority_start + i);
        if let Some(at) = arg[authority_start..authority_end].rfind('@') {
            if let Some(colon) = arg[authority_start..authority_start + at].find(':') {
                let range = authority_start + colon + 1..authority_start + at;
                arg = self.replace(&arg, range, CredentialKind::Basic);
            }
        }
        // Query parameters, right to left so earlier offsets stay valid.
        let Some(query) = arg.find('?') else { return arg };
        let query_end = arg[query..].find('#').map_or(arg.len(), |i| query + i);
        let mut params: Vec<(usize, usize, usize)> = Vec::new();
        let mut start = query + 1;
        for part in arg[query + 1..query_end].split('&') {
            if let Some(eq) = part.find('=') {
                params.push((start, start + eq, start + part.len()));
            }
            start += part.len() + 1;
        }
        for (name_start, eq, end) in params.into_iter().rev() {
            let name = arg[name_start..eq].to_ascii_lowercase();
            if super::http::SECRET_QUERY_PARAMS.contains(&name.as_str()) {
                arg = self.replace(&arg, eq + 1..end, CredentialKind::Authorization);
            }
        }
        arg
    }

    /// Any JWT (`eyJ….….…`) left in the argument.
    fn jwts(&mut self, arg: &str) -> String {
        let mut arg = arg.to_string();
        let mut from = 0;
        while let Some(offset) = arg[from..].find("eyJ") {
            let start = from + offset;
            let len = arg[start..]
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                .count();
            let candidate = &arg[start..start + len];
            // Three segments, or a long run that may be a JWT cut short by the argv capture.
            let whole = candidate.split('.').count() == 3 && candidate.split('.').take(2).all(|s| s.len() >= 4);
            if whole || len >= 16 {
                let before = arg.len();
                arg = self.replace(&arg, start..start + len, CredentialKind::Bearer);
                // Past the marker that took its place, whatever the fingerprint's format.
                from = start + len + arg.len() - before;
            } else {
                from = start + 3;
            }
            if from >= arg.len() {
                break;
            }
        }
        arg
    }

    /// Any word that is a session's token, whatever its shape.
    fn session_tokens(&mut self, arg: &str, is_session_token: &dyn Fn(&str) -> bool) -> String {
        let separators =
            |c: char| c.is_whitespace() || matches!(c, '=' | ':' | ',' | ';' | '&' | '?' | '"' | '\'' | '@');
        let mut pieces = Vec::new();
        let mut start = 0;
        for (i, c) in arg.char_indices().chain(std::iter::once((arg.len(), ' '))) {
            if separators(c) {
                if i - start >= MIN_TOKEN_LEN {
                    pieces.push(start..i);
                }
                start = i + c.len_utf8();
            }
        }
        let mut arg = arg.to_string();
        for range in pieces.into_iter().rev() {
            if is_session_token(&self.key.fingerprint(arg[range.clone()].as_bytes())) {
                arg = self.replace(&arg, range, CredentialKind::Authorization);
            }
        }
        arg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], session_token: Option<&str>) -> (Vec<String>, Vec<ArgvCredential>) {
        let key = FingerprintKey::from_bytes([7; 32]);
        let token_fp = session_token.map(|t| key.fingerprint(t.as_bytes()));
        let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let found = redact(&mut argv, &key, &["x-custom".to_string()], &|fp| token_fp.as_deref() == Some(fp));
        (argv, found)
    }

    fn assert_clean(argv: &[String], secrets: &[&str]) {
        for s in secrets {
            assert!(argv.iter().all(|a| !a.contains(s)), "{s} left in {argv:?}");
        }
    }

    #[test]
    fn headers_flags_and_user_passwords() {
        let (argv, found) = run(
            &[
                "curl",
                "-H",
                "Authorization: Bearer s3cr3t-bearer",
                "-H",
                "X-Custom: custom-key-1",
                "-u",
                "bob:hunter2pass",
                "--token",
                "tok-flag-value",
                "--api-key=tok-eq-value",
                "https://example.test/",
            ],
            None,
        );
        assert_clean(&argv, &["s3cr3t-bearer", "custom-key-1", "hunter2pass", "tok-flag-value", "tok-eq-value"]);
        assert!(argv[2].starts_with("Authorization: Bearer [redacted hmac-sha256:"), "{}", argv[2]);
        assert!(argv[6].starts_with("bob:[redacted "), "the user stays: {}", argv[6]);
        let kinds: Vec<_> = found.iter().map(|f| (f.index, f.kind)).collect();
        assert_eq!(
            kinds,
            [
                (2, CredentialKind::Bearer),
                (4, CredentialKind::ApiKey),
                (6, CredentialKind::Basic),
                (8, CredentialKind::Authorization),
                (9, CredentialKind::Authorization)
            ]
        );
        assert_eq!(argv[10], "https://example.test/");
    }

    #[test]
    fn urls_assignments_and_bare_jwts() {
        let jwt = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6MX0.c2ln";
        let (argv, found) = run(
            &[
                "env",
                "GITHUB_TOKEN=ghp_assigned",
                "PATH=/usr/bin",
                "git",
                "clone",
                "https://bot:pat-in-url@git.test/r.git?x=1&access_token=qs-secret#f",
                jwt,
            ],
            None,
        );
        assert_clean(&argv, &["ghp_assigned", "pat-in-url", "qs-secret", "c2ln", "eyJzdWIi"]);
        assert_eq!(argv[2], "PATH=/usr/bin");
        assert!(argv[5].starts_with("https://bot:[redacted "), "{}", argv[5]);
        assert!(argv[5].contains("?x=1&access_token=[redacted "), "{}", argv[5]);
        assert!(argv[5].ends_with("]#f"), "{}", argv[5]);
        let claims = found.iter().find(|f| f.index == 6).and_then(|f| f.jwt.clone()).unwrap();
        assert_eq!(claims.sub.as_deref(), Some("alice"));
    }

    #[test]
    fn a_session_token_of_any_shape_in_any_word() {
        let (argv, found) =
            run(&["deploy", "--target=prod", "plain-opaque-value-123,other"], Some("plain-opaque-value-123"));
        assert_clean(&argv, &["plain-opaque-value-123"]);
        assert!(argv[2].ends_with("],other"), "{}", argv[2]);
        assert_eq!(found.len(), 1);
        let (argv, found) = run(&["ls", "-la", "/tmp/some-long-directory"], Some("plain-opaque-value-123"));
        assert_eq!(argv, ["ls", "-la", "/tmp/some-long-directory"]);
        assert!(found.is_empty());
    }

    #[test]
    fn never_panics_on_odd_input() {
        let odd = [
            "",
            ":",
            "=",
            "://",
            "a://@",
            "x://u:@h",
            "?=&=",
            "eyJ",
            "eyJ.",
            "eyJa.eyJb.",
            "Authorization:",
            "é:é",
            "--=",
            "-u",
        ];
        for a in odd {
            for b in odd {
                let _ = run(&[a, b, a], Some("abcdefgh"));
            }
        }
    }
}
