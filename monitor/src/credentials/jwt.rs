//! JWTs seen on the wire are decoded, never verified and never stored: only the claims that say
//! who acts for whom, with what scope and until when, enrich the alert.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use serde_json::Value;

use crate::event::JwtClaims;

/// How deep an `act` chain is followed (a hostile token could nest without end).
const MAX_ACT_DEPTH: usize = 16;

/// Decodes `header.payload.signature`; `None` for anything that is not a JWT with a JSON
/// object payload.
pub fn decode(token: &str) -> Option<JwtClaims> {
    let mut parts = token.split('.');
    let (header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || header.is_empty() || payload.is_empty() {
        return None;
    }
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header.trim_end_matches('=')).ok()?).ok()?;
    header.as_object()?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?).ok()?;
    let claims = claims.as_object()?;
    let text = |v: Option<&Value>| v.and_then(|v| v.as_str()).map(str::to_string);
    let mut act = Vec::new();
    let mut next = claims.get("act");
    while let Some(actor) = next.and_then(Value::as_object) {
        if act.len() == MAX_ACT_DEPTH {
            break;
        }
        act.push(text(actor.get("sub")).unwrap_or_else(|| "?".into()));
        next = actor.get("act");
    }
    let scope = match (claims.get("scope"), claims.get("scp")) {
        (Some(Value::String(s)), _) => s.split_whitespace().map(str::to_string).collect(),
        (_, Some(Value::Array(list))) => list.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        (_, Some(Value::String(s))) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    };
    Some(JwtClaims {
        iss: text(claims.get("iss")),
        sub: text(claims.get("sub")),
        act,
        scope,
        exp: claims.get("exp").and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64))),
        jti: text(claims.get("jti")),
    })
}

#[cfg(test)]
pub(crate) fn encode_unsigned(claims: &serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.c2lnbmF0dXJl")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_delegation_chain_scope_and_expiry() {
        let token = encode_unsigned(&serde_json::json!({
            "iss": "https://idp.example", "sub": "alice@example.com", "exp": 1_900_000_000, "jti": "j-1",
            "scope": "refunds:write tickets:read",
            "act": {"sub": "svc:support-bot", "act": {"sub": "svc:orchestrator"}}
        }));
        let c = decode(&token).unwrap();
        assert_eq!(c.sub.as_deref(), Some("alice@example.com"));
        assert_eq!(c.act, ["svc:support-bot", "svc:orchestrator"]);
        assert_eq!(c.scope, ["refunds:write", "tickets:read"]);
        assert_eq!(c.exp, Some(1_900_000_000));
        assert_eq!(c.jti.as_deref(), Some("j-1"));
    }

    #[test]
    fn scp_lists_are_scopes_too() {
        let c = decode(&encode_unsigned(&serde_json::json!({"scp": ["a", "b"]}))).unwrap();
        assert_eq!(c.scope, ["a", "b"]);
    }

    #[test]
    fn anything_else_is_not_a_jwt() {
        for bad in ["", "abc", "a.b", "a.b.c.d", "!!.??.x", "e30.bm90IGpzb24.x", "e30.WzFd.x"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
        // A hostile nesting depth is cut, not followed.
        let mut act = serde_json::json!({"sub": "leaf"});
        for _ in 0..100 {
            act = serde_json::json!({"sub": "x", "act": act});
        }
        let c = decode(&encode_unsigned(&serde_json::json!({"act": act}))).unwrap();
        assert_eq!(c.act.len(), MAX_ACT_DEPTH);
    }
}
