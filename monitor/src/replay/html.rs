//! `--format html`: one self-contained page (inline CSS, no script, no external resource), so it
//! opens offline and can be attached to an incident ticket as is.

use std::fmt::Write as _;

use super::{
    report::{Report, SessionReport},
    timeline::tree,
};

const STYLE: &str = "
body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#1d2330;background:#fff}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:2em;border-bottom:2px solid #dde}
table{border-collapse:collapse;width:100%}td,th{padding:3px 8px;text-align:left;vertical-align:top}
tr:nth-child(even){background:#f6f7fa}th{background:#e9ecf3}
.kv td:first-child{color:#556;width:9em}
.alert{background:#fde8e8!important;color:#8a1010;font-weight:600}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;background:#c62828;color:#fff;font-size:.85em}
.ok{background:#2e7d32}.mono{font-family:ui-monospace,monospace;font-size:.92em}
ul.tree,ul.tree ul{list-style:none;padding-left:1.4em;margin:0}ul.tree li{margin:2px 0}
.dim{color:#778}.summary{margin:1em 0;padding:.6em 1em;background:#f1f4fb;border-left:4px solid #4a67c7}
";

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let title = match report.sessions.as_slice() {
        [one] => format!("monitor: session {}", one.session.id),
        _ => format!("monitor: {} sessions", report.sessions.len()),
    };
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>",
        esc(&title)
    );
    let _ = write!(out, "<h1>{}</h1>", esc(&title));
    let c = &report.comparison;
    let verdict = if c.what_if {
        format!(
            "What-if replay: {} alerts live, {} with the given policy ({} appear, {} disappear).",
            c.live,
            c.replayed,
            c.only_replayed.len(),
            c.only_live.len()
        )
    } else if c.identical() {
        format!("Replay reproduces the {} alerts raised live.", c.live)
    } else {
        format!("Replay differs from live: {} replayed, {} live.", c.replayed, c.live)
    };
    let _ = write!(out, "<p class=\"summary\">{} events read. {}</p>", report.events, esc(&verdict));
    if !report.damage.is_empty() {
        let _ = write!(out, "<p class=\"alert\">Damaged trace: {} stretch(es) skipped.</p><ul>", report.damage.len());
        for d in &report.damage {
            let _ = write!(out, "<li class=\"mono\">{}</li>", esc(d));
        }
        out.push_str("</ul>");
    }
    for session in &report.sessions {
        render_session(&mut out, session);
    }
    out.push_str("</body></html>\n");
    out
}

fn render_session(out: &mut String, r: &SessionReport) {
    let s = &r.session;
    let badge = if r.alerts.is_empty() {
        "<span class=\"badge ok\">no alerts</span>".to_string()
    } else {
        format!("<span class=\"badge\">{} alert(s)</span>", r.alerts.len())
    };
    let _ =
        write!(out, "<section id=\"session-{}\"><h2>Session {} {badge}</h2>", esc(s.id.as_str()), esc(s.id.as_str()));
    out.push_str("<table class=\"kv\">");
    let mut row = |k: &str, v: String| {
        let _ = write!(out, "<tr><td>{}</td><td>{}</td></tr>", esc(k), v);
    };
    row(
        "Delegation",
        format!("{} &rarr; {} &rarr; {} process(es)", esc(&s.principal), esc(&s.actor), r.processes.len()),
    );
    row("Task", esc(&s.task));
    row("Sponsor", esc(&s.sponsor));
    let ended = match (&r.ended, &r.end_reason) {
        (Some(at), Some(why)) => format!("{} ({})", esc(at), esc(why)),
        _ => "not ended in this trace".into(),
    };
    row("Started", esc(&r.started));
    row("Ended", ended);
    let connect = match &s.scope.connect {
        Some(list) => list.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
        None => "any".into(),
    };
    row("Scope: connect", format!("<span class=\"mono\">{}</span>", esc(&connect)));
    if !s.scope.credentials.is_empty() {
        row("Scope: credentials", format!("<span class=\"mono\">{}</span>", esc(&s.scope.credentials.join(", "))));
    }
    if let Some(exec) = &s.scope.exec {
        row("Scope: exec", format!("<span class=\"mono\">{}</span>", esc(&exec.join(", "))));
    }
    for t in &s.tokens {
        row(
            "Token",
            format!("<span class=\"mono\">{} {}</span>", esc(&t.source), esc(t.fingerprint.as_deref().unwrap_or(""))),
        );
    }
    row("Enforce", if s.enforce { "yes".into() } else { "no".into() });
    out.push_str("</table>");

    if !r.alerts.is_empty() {
        out.push_str("<h3>Alerts</h3><table><tr><th>Time</th><th>Rule</th><th>Severity</th><th>Process</th><th>Summary</th></tr>");
        for a in &r.alerts {
            let process = a.process.as_ref().map(|p| format!("{} {}", p.pid, p.exe)).unwrap_or_default();
            let severity =
                serde_json::to_value(a.severity).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            let _ = write!(
                out,
                "<tr class=\"alert\"><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td>{}</td></tr>",
                esc(&a.time),
                esc(a.rule.id()),
                esc(&severity),
                esc(&process),
                esc(&a.summary)
            );
        }
        out.push_str("</table>");
    }

    out.push_str("<h3>Process tree</h3><ul class=\"tree mono\">");
    let mut depth = 0;
    let mut first = true;
    for (d, p) in tree(&r.processes) {
        if first {
            first = false;
        } else if d > depth {
            out.push_str("<ul>");
        } else {
            out.push_str("</li>");
            for _ in d..depth {
                out.push_str("</ul></li>");
            }
        }
        depth = d;
        let argv = if p.argv.is_empty() { p.exe.clone() } else { p.argv.join(" ") };
        let status = match p.exit_code {
            Some(code) if code & 0x7f != 0 => format!("killed by signal {}", code & 0x7f),
            Some(code) => format!("exit {}", code >> 8),
            None => "alive at the end".into(),
        };
        let _ = write!(out, "<li>{} {} <span class=\"dim\">({})</span>", p.pid, esc(&argv), esc(&status));
    }
    if !first {
        out.push_str("</li>");
        for _ in 0..depth {
            out.push_str("</ul></li>");
        }
    }
    out.push_str("</ul>");

    out.push_str(
        "<h3>Timeline</h3><table><tr><th>Time</th><th>PID</th><th>Process</th><th>What</th><th>Detail</th></tr>",
    );
    for e in &r.timeline {
        let class = if e.alerts.is_empty() { "" } else { " class=\"alert\"" };
        let (what, detail) = e.describe();
        let mut detail = esc(&detail);
        for a in &e.alerts {
            let _ = write!(detail, "<br>&#9888; {}", esc(a));
        }
        let _ = write!(
            out,
            "<tr{class}><td class=\"mono\">{}</td><td>{}</td><td class=\"mono\">{}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
            esc(&crate::alert::rfc3339(e.ts)),
            e.pid,
            esc(&e.process),
            what,
            detail
        );
    }
    out.push_str("</table></section>");
}

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}
