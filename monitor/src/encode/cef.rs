//! ArcSight CEF: `CEF:0|Vendor|Product|Version|SignatureID|Name|Severity|Extension`.

use crate::{alert::Alert, rules::Severity};

fn severity(s: Severity) -> u8 {
    match s {
        Severity::Info => 1,
        Severity::Low => 3,
        Severity::Medium => 5,
        Severity::High => 8,
        Severity::Critical => 10,
    }
}

/// Header fields escape `|` and `\`.
fn header(v: &str) -> String {
    v.replace('\\', "\\\\").replace('|', "\\|").replace(['\r', '\n'], " ")
}

/// Extension values escape `\`, `=` and line breaks.
fn ext(v: &str) -> String {
    v.replace('\\', "\\\\").replace('=', "\\=").replace('\n', "\\n").replace('\r', "\\r")
}

pub fn line(alert: &Alert) -> String {
    let mut e: Vec<(&str, String)> = vec![
        ("rt", (alert.ts / 1_000_000).to_string()),
        ("dvchost", alert.host.clone()),
        ("externalId", alert.id.clone()),
        ("act", format!("{:?}", alert.action).to_lowercase()),
        ("msg", alert.summary.clone()),
        ("suser", alert.session.principal.clone()),
        ("duser", alert.session.actor.clone()),
        ("cs1Label", "session".into()),
        ("cs1", alert.session.id.clone()),
        ("cs2Label", "task".into()),
        ("cs2", alert.session.task.clone()),
        ("cs3Label", "sponsor".into()),
        ("cs3", alert.session.sponsor.clone()),
        ("cs4Label", "mitre".into()),
        ("cs4", alert.mitre.join(",")),
    ];
    // A folded finding: CEF's own repeat count and the span of its occurrences. An update
    // repeats externalId with a larger cnt.
    e.push(("cnt", alert.count.to_string()));
    e.extend(crate::alert::rfc3339_millis(&alert.first_seen).map(|v| ("start", v.to_string())));
    e.extend(crate::alert::rfc3339_millis(&alert.last_seen).map(|v| ("end", v.to_string())));
    if let Some(p) = &alert.process {
        e.push(("spid", p.pid.to_string()));
        e.push(("sproc", p.exe.clone()));
        e.push(("suid", p.uid.to_string()));
    }
    if let Some(n) = &alert.network {
        e.push(("dst", n.dst_ip.clone()));
        e.push(("dpt", n.dst_port.to_string()));
        if let Some(name) = &n.dst_name {
            e.push(("dhost", name.clone()));
        }
    }
    if let Some(other) = alert.process.as_ref().and_then(|p| p.session.as_ref()) {
        e.push(("cs6Label", "process_session".into()));
        e.push(("cs6", other.id.clone()));
    }
    if let Some(c) = &alert.credential {
        e.push(("cs5Label", "credential".into()));
        e.push(("cs5", c.fingerprint.clone().or_else(|| c.path.clone()).unwrap_or_default()));
    }
    let extension: Vec<String> =
        e.into_iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| format!("{k}={}", ext(&v))).collect();
    format!(
        "CEF:0|monitor|monitor|{}|{}|{}|{}|{}",
        header(env!("CARGO_PKG_VERSION")),
        header(alert.rule.id()),
        header(alert.rule.id()),
        severity(alert.severity),
        extension.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Action, SessionRef};

    #[test]
    fn escapes_header_and_extension() {
        let alert = Alert {
            id: "x".into(),
            time: String::new(),
            host: "h".into(),
            rule: crate::rules::Rule::TokenAfterTaskEnd,
            severity: Severity::Critical,
            summary: "a=b|c\nd".into(),
            session: SessionRef { id: "s".into(), ..Default::default() },
            process: None,
            network: None,
            credential: None,
            k8s: None,
            action: Action::Observed,
            mitre: vec![],
            owasp_nhi: vec![],
            nist_csf: Vec::new(),
            count: 1,
            first_seen: String::new(),
            last_seen: String::new(),
            pids: Vec::new(),
            ts: 5_000_000,
            fold: 0,
        };
        let l = line(&alert);
        assert!(l.starts_with("CEF:0|monitor|monitor|"), "{l}");
        assert!(l.contains("|token_after_task_end|token_after_task_end|10|rt=5 "), "{l}");
        assert!(l.contains("msg=a\\=b|c\\nd"), "{l}");
    }
}
