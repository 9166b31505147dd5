//! RFC 5424 syslog: one alert per message, the alert's fields as structured data (SD-ID
//! `monitor@32473`, the example private enterprise number of RFC 5612), the summary as MSG.

use std::fmt::Write as _;

use crate::{alert::Alert, rules::Severity};

/// Facility 13 (log audit) as RFC 5424 numbers it; severity from the alert's.
const FACILITY: u8 = 13;

fn severity(s: Severity) -> u8 {
    match s {
        Severity::Critical => 2,
        Severity::High => 3,
        Severity::Medium => 4,
        Severity::Low => 5,
        Severity::Info => 6,
    }
}

/// `<PRI>1 TIMESTAMP HOSTNAME monitor - RULE [monitor@32473 k="v" ...] MSG` (no framing).
pub fn message(alert: &Alert, fallback_host: &str) -> String {
    let pri = FACILITY * 8 + severity(alert.severity);
    let host = if alert.host.is_empty() { fallback_host } else { &alert.host };
    let mut sd = String::from("[monitor@32473");
    let mut param = |k: &str, v: &str| {
        if !v.is_empty() {
            let _ = write!(sd, " {k}=\"{}\"", sd_escape(v));
        }
    };
    param("id", &alert.id);
    param("rule", alert.rule.id());
    param("action", action(alert));
    param("session", &alert.session.id);
    param("principal", &alert.session.principal);
    param("actor", &alert.session.actor);
    param("task", &alert.session.task);
    param("sponsor", &alert.session.sponsor);
    param("state", &alert.session.state);
    // A folded finding's update repeats the id with a larger count.
    param("count", &alert.count.to_string());
    param("first_seen", &alert.first_seen);
    param("last_seen", &alert.last_seen);
    if let Some(p) = &alert.process {
        param("pid", &p.pid.to_string());
        param("exe", &p.exe);
        param("uid", &p.uid.to_string());
        if let Some(other) = &p.session {
            param("process_session", &other.id);
            param("process_actor", &other.actor);
            param("process_principal", &other.principal);
        }
    }
    if let Some(n) = &alert.network {
        param("dst_ip", &n.dst_ip);
        param("dst_port", &n.dst_port.to_string());
        param("dst_name", n.dst_name.as_deref().unwrap_or(""));
    }
    if let Some(c) = &alert.credential {
        param("credential_kind", &c.kind);
        param("fingerprint", c.fingerprint.as_deref().unwrap_or(""));
        param("path", c.path.as_deref().unwrap_or(""));
    }
    param("mitre", &alert.mitre.join(","));
    param("owasp_nhi", &alert.owasp_nhi.join(","));
    param("nist_csf", &alert.nist_csf.join(","));
    sd.push(']');
    let time = if alert.time.is_empty() { crate::alert::rfc3339(alert.ts) } else { alert.time.clone() };
    format!("<{pri}>1 {time} {} monitor - {} {sd} {}", header_field(host), alert.rule.id(), alert.summary)
}

fn action(alert: &Alert) -> &'static str {
    match alert.action {
        crate::alert::Action::Observed => "observed",
        crate::alert::Action::Blocked => "blocked",
        crate::alert::Action::Killed => "killed",
    }
}

/// PARAM-VALUE escaping: `"`, `\` and `]`.
fn sd_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A header field: printable US-ASCII, no space, at most 255; `-` when empty.
fn header_field(v: &str) -> String {
    let s: String = v.chars().filter(|c| c.is_ascii_graphic()).take(255).collect();
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

/// Octet-counting framing (RFC 6587 3.4.1), as syslog over TLS (RFC 5425) requires.
pub fn octet_counted(message: &str) -> Vec<u8> {
    format!("{} {message}", message.len()).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Action, SessionRef};

    #[test]
    fn structured_data_is_escaped_and_framed() {
        let alert = Alert {
            id: "01J".into(),
            time: "2026-11-24T10:00:00.000000001Z".into(),
            host: "node 1".into(),
            rule: crate::rules::Rule::OutOfScopeConnect,
            severity: Severity::High,
            summary: "tcp connect to 10.0.0.1:22".into(),
            session: SessionRef { id: "s-1".into(), principal: "a\"b]".into(), ..Default::default() },
            process: None,
            network: None,
            credential: None,
            k8s: None,
            action: Action::Blocked,
            mitre: vec!["T1021".into()],
            owasp_nhi: vec![],
            nist_csf: Vec::new(),
            count: 1,
            first_seen: String::new(),
            last_seen: String::new(),
            pids: Vec::new(),
            ts: 0,
            fold: 0,
        };
        let m = message(&alert, "fallback");
        assert!(
            m.starts_with(
                "<107>1 2026-11-24T10:00:00.000000001Z node1 monitor - out_of_scope_connect [monitor@32473 id=\"01J\""
            ),
            "{m}"
        );
        assert!(m.contains("principal=\"a\\\"b\\]\""), "{m}");
        assert!(m.ends_with("] tcp connect to 10.0.0.1:22"));
        let framed = octet_counted(&m);
        assert!(framed.starts_with(format!("{} <107>", m.len()).as_bytes()));
    }
}
