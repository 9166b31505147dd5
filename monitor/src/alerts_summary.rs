//! `monitor alerts summary FILE|STORE`: a terminal table of the alerts in a JSON-lines file (an
//! agent's `jsonl:` output, a collector's `jsonl:` sink) or in a collector's store, per session
//! and rule: the findings, their occurrences, first and last seen. An alert sent again as an
//! update of a folded finding (same id, larger count) counts once, at its latest count.

use std::{
    collections::BTreeMap,
    io::BufRead as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

use crate::alert::Alert;

#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    #[error("{path}:{line}: not an alert: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
}

/// The latest version of each alert, by id, in the order first seen.
pub fn latest(alerts: impl IntoIterator<Item = Alert>) -> Vec<Alert> {
    let mut order: Vec<String> = Vec::new();
    let mut by_id: BTreeMap<String, Alert> = BTreeMap::new();
    for alert in alerts {
        match by_id.get_mut(&alert.id) {
            Some(known) if known.count >= alert.count => {}
            Some(known) => *known = alert,
            None => {
                order.push(alert.id.clone());
                by_id.insert(alert.id.clone(), alert);
            }
        }
    }
    order.into_iter().filter_map(|id| by_id.remove(&id)).collect()
}

/// Reads the alerts of a JSON-lines file or of a collector store directory.
pub fn read(path: &Path) -> anyhow::Result<Vec<Alert>> {
    if path.is_dir() {
        return read_store(path);
    }
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut alerts = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let alert: Alert = serde_json::from_str(&line).map_err(|e| SummaryError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        alerts.push(alert);
    }
    Ok(alerts)
}

fn read_store(dir: &Path) -> anyhow::Result<Vec<Alert>> {
    let segments = crate::collector::store::segments(dir).with_context(|| format!("reading {}", dir.display()))?;
    if segments.is_empty() {
        anyhow::bail!("{}: neither a JSON-lines file nor a collector store (no store-*.log)", dir.display());
    }
    let mut alerts = Vec::new();
    for seg in segments {
        let path = crate::collector::store::segment_path(dir, seg);
        crate::collector::store::read_segment(&path, 0, &mut |stored, _| {
            if stored.id.is_some() {
                if let Ok(alert) = rmp_serde::from_slice::<Alert>(&stored.record) {
                    alerts.push(alert);
                }
            }
        })
        .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(alerts)
}

/// One row: a session's findings of one rule.
#[derive(Debug, Default, PartialEq)]
pub struct Row {
    pub session: String,
    pub rule: String,
    pub findings: usize,
    pub occurrences: u64,
    pub first_seen: String,
    pub last_seen: String,
}

pub fn rows(alerts: &[Alert]) -> Vec<Row> {
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    for a in latest(alerts.iter().cloned()) {
        let session = if a.session.id.is_empty() { "-".to_string() } else { a.session.id.clone() };
        let row = rows.entry((session.clone(), a.rule.id().to_string())).or_insert_with(|| Row {
            session,
            rule: a.rule.id().to_string(),
            ..Default::default()
        });
        let first = if a.first_seen.is_empty() { a.time.clone() } else { a.first_seen.clone() };
        let last = if a.last_seen.is_empty() { a.time.clone() } else { a.last_seen.clone() };
        row.findings += 1;
        row.occurrences += a.count;
        // RFC 3339 in UTC with the same precision: text order is time order.
        if row.first_seen.is_empty() || first < row.first_seen {
            row.first_seen = first;
        }
        if last > row.last_seen {
            row.last_seen = last;
        }
    }
    rows.into_values().collect()
}

pub fn render(rows: &[Row]) -> String {
    let header = ["SESSION", "RULE", "FINDINGS", "OCCURRENCES", "FIRST SEEN", "LAST SEEN"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.session.clone(),
                r.rule.clone(),
                r.findings.to_string(),
                r.occurrences.to_string(),
                r.first_seen.clone(),
                r.last_seen.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let padded: Vec<String> = cols.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(&header.map(String::from));
    for row in &cells {
        out.push_str(&line(row));
    }
    let findings: usize = rows.iter().map(|r| r.findings).sum();
    let occurrences: u64 = rows.iter().map(|r| r.occurrences).sum();
    out.push_str(&format!("{findings} finding(s), {occurrences} occurrence(s)\n"));
    out
}

pub fn run(path: &Path) -> anyhow::Result<()> {
    let alerts = read(path)?;
    print!("{}", render(&rows(&alerts)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(id: &str, session: &str, count: u64, first: &str, last: &str) -> Alert {
        let json = serde_json::json!({
            "id": id, "time": first, "host": "h", "rule": "token_after_task_end", "severity": "high",
            "summary": "s", "session": {"id": session, "principal": "", "actor": "", "task": "", "sponsor": "",
            "state": "ended", "started": ""}, "action": "observed", "mitre": [], "owasp_nhi": [],
            "count": count, "first_seen": first, "last_seen": last,
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn an_update_counts_once_at_its_latest_count() {
        let alerts = [
            alert("A", "s-1", 1, "2026-01-01T00:00:01Z", "2026-01-01T00:00:01Z"),
            alert("A", "s-1", 50, "2026-01-01T00:00:01Z", "2026-01-01T00:00:09Z"),
            alert("B", "s-1", 1, "2026-01-01T00:00:20Z", "2026-01-01T00:00:20Z"),
        ];
        let rows = rows(&alerts);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].findings, rows[0].occurrences), (2, 51));
        assert_eq!(
            (rows[0].first_seen.as_str(), rows[0].last_seen.as_str()),
            ("2026-01-01T00:00:01Z", "2026-01-01T00:00:20Z")
        );
        let text = render(&rows);
        assert!(text.contains("token_after_task_end") && text.contains("2 finding(s), 51 occurrence(s)"), "{text}");
    }

    #[test]
    fn a_bad_line_names_file_and_line() {
        let path = std::env::temp_dir().join(format!("monitor-summary-{}.jsonl", std::process::id()));
        std::fs::write(&path, "\n{\"id\": 1}\n").unwrap();
        let e = read(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(e.contains(&format!("{}:2: not an alert", path.display())), "{e}");
    }
}
