//! What each of the agent's eBPF programs has cost: the kernel's own run count and run time per
//! program (counted while `kernel.bpf_stats_enabled` is 1), read from the agent's descriptors
//! (`/proc/self/fdinfo`), for `monitor probes` and the benchmarks. These figures do not move
//! with the machine's noise the way wall-clock ratios do.

use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _},
};

use serde::{Deserialize, Serialize};

use super::spec;

/// Where the kernel is told to count BPF run time (the counting itself costs two clock reads per
/// run, so it is off by default).
pub const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// One program the agent holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgramStats {
    /// The program's function name in monitor-ebpf (the kernel keeps 15 characters of it).
    pub program: String,
    /// Where it attaches, from the probe table.
    pub attach: String,
    /// Attached now (an on-demand probe may be loaded and detached).
    pub attached: bool,
    pub prog_id: u32,
    /// Runs and nanoseconds since it was loaded, while counting was enabled.
    pub run_cnt: u64,
    pub run_time_ns: u64,
    /// For a uprobe: the files it is attached to now (a library, or each executable found
    /// with that TLS code); every process that maps one of them has the probe installed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// Why a program is not loaded: this kernel refused it or lacks its hook, or it is opt-in
    /// or disabled; with what that loses (the agent's load report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_loaded: Option<String>,
}

impl ProgramStats {
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.run_cnt > 0).then(|| self.run_time_ns as f64 / self.run_cnt as f64)
    }
}

/// Whether the kernel counts BPF run time now.
pub fn counting_enabled() -> bool {
    fs::read_to_string(STATS_SYSCTL).is_ok_and(|v| v.trim() == "1")
}

impl super::Probes {
    /// Each loaded program with the kernel's counts, sorted by name. Read from the agent's own
    /// descriptors: the kernel keeps only 15 characters of a name, which would not tell
    /// `sched_process_exec` from `sched_process_exit`.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        let mut programs: Vec<ProgramStats> = self
            .ebpf
            .programs()
            .filter_map(|(name, program)| {
                let fd = program.fd().ok()?.as_fd().as_raw_fd();
                let (prog_id, (run_cnt, run_time_ns)) =
                    parse_fdinfo(&fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?)?;
                let spec = spec(name);
                Some(ProgramStats {
                    program: name.to_string(),
                    attach: spec.map(|s| s.attach.to_string()).unwrap_or_default(),
                    attached: self.is_attached_now(name),
                    prog_id,
                    run_cnt,
                    run_time_ns,
                    files: self.uprobe_files(name),
                    not_loaded: None,
                })
            })
            .collect();
        for status in &self.report.probes {
            if let (Some(why), false) = (&status.error, programs.iter().any(|p| p.program == status.probe)) {
                programs.push(ProgramStats {
                    program: status.probe.to_string(),
                    attach: status.attach.clone(),
                    attached: false,
                    prog_id: 0,
                    run_cnt: 0,
                    run_time_ns: 0,
                    files: Vec::new(),
                    not_loaded: Some(why.clone()),
                });
            }
        }
        programs.sort_by(|a, b| a.program.cmp(&b.program));
        programs
    }
}

/// `prog_id`, `run_cnt` and `run_time_ns` of a program descriptor's fdinfo.
fn parse_fdinfo(text: &str) -> Option<(u32, (u64, u64))> {
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).and_then(|v| v.trim().parse::<u64>().ok())
    };
    let id = u32::try_from(field("prog_id")?).ok()?;
    Some((id, (field("run_cnt").unwrap_or(0), field("run_time_ns").unwrap_or(0))))
}

/// `monitor probes`: a table.
pub fn table(programs: &[ProgramStats]) -> String {
    let mut out = format!(
        "{:<20} {:<44} {:<9} {:>12} {:>14} {:>8}\n",
        "PROGRAM", "ATTACH", "ATTACHED", "RUNS", "RUN TIME", "NS/RUN"
    );
    for p in programs {
        let per_run = p.ns_per_run().map_or_else(|| "-".to_string(), |ns| format!("{ns:.0}"));
        let attached = if p.attached { "yes" } else { "no" };
        let time = format!("{}µs", p.run_time_ns / 1_000);
        out.push_str(&format!(
            "{:<20} {:<44} {:<9} {:>12} {:>14} {:>8}\n",
            p.program, p.attach, attached, p.run_cnt, time, per_run
        ));
        for file in &p.files {
            out.push_str(&format!("{:<20} in {file}\n", ""));
        }
        if let Some(why) = &p.not_loaded {
            out.push_str(&format!("{:<20} not loaded: {why}\n", ""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_program_descriptors_counts() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1053\nprog_type:\t5\nprog_jited:\t1\n\
                    prog_tag:\t3b185187f1855c4c\nmemlock:\t4096\nprog_id:\t812\nrun_time_ns:\t123456\n\
                    run_cnt:\t789\nrecursion_misses:\t0\nverified_insns:\t33\n";
        assert_eq!(parse_fdinfo(text), Some((812, (789, 123456))));
        assert_eq!(parse_fdinfo("pos:\t0\n"), None);
        assert_eq!(parse_fdinfo("prog_id:\tx\n"), None);
    }
}
