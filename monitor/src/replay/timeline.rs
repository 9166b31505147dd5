//! The terminal timeline: per session, the delegation at the top (principal → actor → task,
//! sponsor, scope, tokens by fingerprint), the process tree, then what happened in time order
//! with the alerts marked, and the comparison with the live alerts at the end.

use std::fmt::Write as _;

use super::report::{ProcNode, Report, SessionReport};
use crate::alert::rfc3339;

struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
    fn bold(&self, t: &str) -> String {
        self.paint("1", t)
    }
    fn red(&self, t: &str) -> String {
        self.paint("1;31", t)
    }
    fn dim(&self, t: &str) -> String {
        self.paint("2", t)
    }
}

pub fn render(report: &Report, color: bool) -> String {
    let style = Style { color };
    let mut out = String::new();
    if report.sessions.is_empty() {
        let _ = writeln!(out, "no sessions in this trace ({} events read)", report.events);
    }
    for session in &report.sessions {
        render_session(&mut out, session, &style);
    }
    render_comparison(&mut out, report, &style);
    if !report.damage.is_empty() {
        let _ = writeln!(out, "{}", style.red(&format!("damaged trace: {} stretch(es) skipped", report.damage.len())));
        for d in &report.damage {
            let _ = writeln!(out, "  {d}");
        }
    }
    out
}

fn render_session(out: &mut String, r: &SessionReport, style: &Style) {
    let s = &r.session;
    let _ = writeln!(out, "{}", style.bold(&format!("session {}", s.id)));
    let _ = writeln!(out, "  delegation  {} → {} → {} process(es)", s.principal, s.actor, r.processes.len());
    let _ = writeln!(out, "  task        {}", s.task);
    if !s.sponsor.is_empty() {
        let _ = writeln!(out, "  sponsor     {}", s.sponsor);
    }
    let ended = match (&r.ended, &r.end_reason) {
        (Some(at), Some(why)) => format!("ended {at} ({why})"),
        _ => "not ended in this trace".to_string(),
    };
    let _ = writeln!(out, "  time        started {}, {ended}", r.started);
    let _ = writeln!(
        out,
        "  bounds      ttl {}, grace {}, enforce {}",
        humantime::format_duration(std::time::Duration::from_nanos(s.ttl_ns)),
        humantime::format_duration(std::time::Duration::from_nanos(s.grace_ns)),
        if s.enforce { "yes" } else { "no" }
    );
    let connect = match &s.scope.connect {
        Some(list) => list.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
        None => "any".into(),
    };
    let _ = writeln!(out, "  scope       connect: {connect}");
    if !s.scope.credentials.is_empty() {
        let _ = writeln!(out, "              credentials: {}", s.scope.credentials.join(", "));
    }
    if let Some(exec) = &s.scope.exec {
        let _ = writeln!(out, "              exec: {}", exec.join(", "));
    }
    for t in &s.tokens {
        let _ =
            writeln!(out, "  token       {} {}", t.source, t.fingerprint.as_deref().unwrap_or("(value not provided)"));
    }
    let _ = writeln!(
        out,
        "  alerts      {}",
        if r.alerts.is_empty() { "none".to_string() } else { style.red(&r.alerts.len().to_string()) }
    );

    let _ = writeln!(out, "\n  {}", style.bold("process tree"));
    for (depth, p) in tree_order(&r.processes) {
        let exit = match (&p.exited, p.exit_code) {
            (Some(_), Some(code)) if code & 0x7f != 0 => format!(" (killed by signal {})", code & 0x7f),
            (Some(_), Some(code)) => format!(" (exit {})", code >> 8),
            _ => " (alive at the end of the trace)".to_string(),
        };
        let argv = if p.argv.is_empty() { p.exe.clone() } else { p.argv.join(" ") };
        let _ = writeln!(out, "  {}{} {}{}", "  ".repeat(depth), p.pid, argv, style.dim(&exit));
    }

    let _ = writeln!(out, "\n  {}", style.bold("timeline"));
    for e in &r.timeline {
        let time = rfc3339(e.ts);
        let time = time.get(11..23).unwrap_or(&time);
        let process = short(&e.process);
        let (what, detail) = e.describe();
        let line = format!("  {time}  {:>7}  {:<16} {:<10} {}", e.pid, process, what, detail);
        let _ = writeln!(out, "{}", line.trim_end());
        for a in &e.alerts {
            let _ = writeln!(out, "  {}", style.red(&format!("  !! {a}")));
        }
    }
    let _ = writeln!(out);
}

fn render_comparison(out: &mut String, report: &Report, style: &Style) {
    let c = &report.comparison;
    if c.what_if {
        let _ = writeln!(
            out,
            "{}",
            style.bold(&format!("what-if: {} alerts live, {} with this policy", c.live, c.replayed))
        );
        for k in &c.only_replayed {
            let _ = writeln!(out, "  + appears     {} {} {} (pid {}): {}", k.time, k.rule, k.session, k.pid, k.summary);
        }
        for k in &c.only_live {
            let _ = writeln!(out, "  - disappears  {} {} {} (pid {}): {}", k.time, k.rule, k.session, k.pid, k.summary);
        }
        if c.identical() {
            let _ = writeln!(out, "  no alert appears or disappears");
        }
    } else if c.identical() {
        let _ = writeln!(out, "replay: {} alerts, the same as the {} raised live", c.replayed, c.live);
    } else {
        let _ = writeln!(
            out,
            "{}",
            style.red(&format!(
                "replay differs from live: {} alerts replayed, {} live ({} only live, {} only replayed)",
                c.replayed,
                c.live,
                c.only_live.len(),
                c.only_replayed.len()
            ))
        );
    }
}

/// The processes depth-first from the roots (those whose parent is not in the session).
fn tree_order(procs: &[ProcNode]) -> Vec<(usize, &ProcNode)> {
    let mut out = Vec::new();
    let is_child_of = |p: &ProcNode, parent: &ProcNode| p.ppid == parent.pid && p.first_seen >= parent.first_seen;
    fn walk<'a>(
        at: usize,
        depth: usize,
        procs: &'a [ProcNode],
        is_child_of: &dyn Fn(&ProcNode, &ProcNode) -> bool,
        seen: &mut Vec<bool>,
        out: &mut Vec<(usize, &'a ProcNode)>,
    ) {
        if seen[at] || depth > 64 {
            return;
        }
        seen[at] = true;
        out.push((depth, &procs[at]));
        for child in 0..procs.len() {
            if !seen[child] && is_child_of(&procs[child], &procs[at]) {
                walk(child, depth + 1, procs, is_child_of, seen, out);
            }
        }
    }
    let mut seen = vec![false; procs.len()];
    for root in 0..procs.len() {
        let has_parent = procs.iter().enumerate().any(|(i, p)| i != root && is_child_of(&procs[root], p));
        if !has_parent {
            walk(root, 0, procs, &is_child_of, &mut seen, &mut out);
        }
    }
    for i in 0..procs.len() {
        if !seen[i] {
            walk(i, 0, procs, &is_child_of, &mut seen, &mut out);
        }
    }
    out
}

pub(super) fn tree(procs: &[ProcNode]) -> Vec<(usize, &ProcNode)> {
    tree_order(procs)
}

fn short(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.chars().take(16).collect()
}
