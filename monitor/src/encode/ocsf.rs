//! OCSF 1.8 Detection Finding (class_uid 2004): the alert as a finding, with the process, the
//! destination and the delegation session as its evidence. Fields OCSF has no place for (the
//! session, the credential's fingerprint) go in `evidences[].data` and `unmapped`.
//!
//! A folded finding's update (same alert id, a larger count) is the same finding again with
//! `activity_id` 2 (Update): `finding_info.uid` stays the alert id, `count` is the occurrences
//! so far, `finding_info.first_seen_time`/`last_seen_time` (and `start_time`/`end_time`) span
//! them, and `metadata.uid` is unique per record (the id, then `-` and the count).

use serde_json::{json, Map, Value};

use crate::{
    alert::{Action, Alert},
    rules::Severity,
};

pub const OCSF_VERSION: &str = "1.8.0";

/// Milliseconds since the epoch (OCSF `timestamp_t`).
fn millis(ns: u64) -> u64 {
    ns / 1_000_000
}

fn severity(s: Severity) -> (u8, &'static str) {
    match s {
        Severity::Info => (1, "Informational"),
        Severity::Low => (2, "Low"),
        Severity::Medium => (3, "Medium"),
        Severity::High => (4, "High"),
        Severity::Critical => (5, "Critical"),
    }
}

/// The alert as an OCSF Detection Finding.
pub fn finding(alert: &Alert) -> Value {
    let (severity_id, severity_name) = severity(alert.severity);
    let (action_id, action, disposition_id, disposition) = match alert.action {
        Action::Observed => (1, "Allowed", 1, "Allowed"),
        Action::Blocked => (2, "Denied", 2, "Blocked"),
        // The process was killed: OCSF's nearest disposition is "Dropped" (the activity stopped).
        Action::Killed => (2, "Denied", 6, "Dropped"),
    };
    let time = millis(alert.ts);
    let first_seen = crate::alert::rfc3339_millis(&alert.first_seen).unwrap_or(time);
    let last_seen = crate::alert::rfc3339_millis(&alert.last_seen).unwrap_or(first_seen);
    let (activity_id, activity_name) = if alert.is_update() { (2, "Update") } else { (1, "Create") };
    let record_uid = if alert.is_update() { format!("{}-{}", alert.id, alert.count) } else { alert.id.clone() };
    let attacks: Vec<Value> =
        alert.mitre.iter().map(|t| json!({ "technique": { "uid": t }, "version": "v15" })).collect();
    let mut evidence = Map::new();
    if let Some(p) = &alert.process {
        let name = p.exe.rsplit('/').next().unwrap_or(&p.exe);
        let mut process = json!({
            "pid": p.pid,
            "cmd_line": p.argv.join(" "),
            "file": { "path": p.exe, "name": name, "type_id": 1 },
            "user": { "uid": p.uid.to_string() },
            "parent_process": { "pid": p.ppid },
        });
        if let Some(parent) = p.chain.first() {
            process["parent_process"]["file"] = json!({ "path": parent.exe, "name": parent.exe.rsplit('/').next().unwrap_or(&parent.exe), "type_id": 1 });
        }
        evidence.insert("process".into(), process);
    }
    // OCSF's container needs its uid (or a name): a pod's own cgroup, with no container, is
    // only in `unmapped.k8s`.
    if let Some(k) = alert.k8s.as_ref() {
        if let Some(id) = &k.container_id {
            evidence
                .insert("container".into(), json!({ "uid": id, "pod_uuid": k.pod_uid, "orchestrator": "Kubernetes" }));
        }
    }
    evidence.insert(
        "actor".into(),
        // The delegated non-human identity; the principal it acts for is in `data.session`.
        json!({ "user": { "name": alert.session.actor, "type_id": 99, "type": "Non-human identity" } }),
    );
    if let Some(n) = &alert.network {
        let mut dst = json!({ "port": n.dst_port });
        if !n.dst_ip.is_empty() {
            dst["ip"] = json!(n.dst_ip);
        }
        if let Some(name) = &n.dst_name {
            dst["hostname"] = json!(name);
        }
        evidence.insert("dst_endpoint".into(), dst);
        evidence.insert(
            "connection_info".into(),
            json!({ "protocol_name": n.protocol, "direction_id": 2, "direction": "Outbound" }),
        );
    }
    let mut data = json!({ "session": alert.session });
    if let Some(other) = alert.process.as_ref().and_then(|p| p.session.as_ref()) {
        // A cross-session use: the acting process's own session.
        data["process_session"] = json!(other);
    }
    if let Some(c) = &alert.credential {
        data["credential"] = serde_json::to_value(c).unwrap_or(Value::Null);
        if let Some(path) = &c.path {
            evidence.insert(
                "file".into(),
                json!({ "path": path, "name": path.rsplit('/').next().unwrap_or(path), "type_id": 1 }),
            );
        }
    }
    evidence.insert("data".into(), data);

    let mut finding = json!({
        "class_uid": 2004,
        "class_name": "Detection Finding",
        "category_uid": 2,
        "category_name": "Findings",
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": 200400 + activity_id,
        "type_name": format!("Detection Finding: {activity_name}"),
        "time": last_seen,
        "count": alert.count,
        "start_time": first_seen,
        "end_time": last_seen,
        "is_alert": true,
        "severity_id": severity_id,
        "severity": severity_name,
        "status_id": 1,
        "status": "New",
        "action_id": action_id,
        "action": action,
        "disposition_id": disposition_id,
        "disposition": disposition,
        "message": alert.summary,
        "metadata": {
            "version": OCSF_VERSION,
            // action and disposition (allowed, blocked, killed) come from this profile.
            "profiles": ["security_control"],
            "uid": record_uid,
            "product": { "name": "monitor", "vendor_name": "monitor", "version": env!("CARGO_PKG_VERSION") },
            "labels": alert.owasp_nhi,
        },
        "finding_info": {
            "uid": alert.id,
            "title": alert.rule.id(),
            "desc": alert.summary,
            "types": [alert.rule.id()],
            "created_time": first_seen,
            "first_seen_time": first_seen,
            "last_seen_time": last_seen,
            "analytic": { "uid": alert.rule.id(), "name": alert.rule.id(), "type_id": 1, "type": "Rule" },
            "attacks": attacks,
        },
        "device": { "hostname": alert.host, "type_id": 0, "type": "Unknown" },
        "evidences": [Value::Object(evidence)],
        "unmapped": {
            "owasp_nhi": alert.owasp_nhi,
            "nist_csf": alert.nist_csf,
            "rule": alert.rule.id(),
            "pids": alert.pids,
        },
    });
    if let Some(k) = &alert.k8s {
        finding["unmapped"]["k8s"] = json!(k);
    }
    finding
}
