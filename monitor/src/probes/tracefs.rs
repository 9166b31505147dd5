//! Tracepoint payload layouts from tracefs, so no field offset is assumed: the layouts differ
//! between kernel versions (sched_process_fork changed its comm fields in 6.x, for one).

use std::{collections::HashMap, fs, path::Path};

use super::ProbeError;

const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs at /sys/kernel/tracing when nothing is there (aya reads tracepoint ids
/// from it). Machines without systemd often leave it unmounted.
pub fn ensure_mounted() -> Result<(), ProbeError> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    let output = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", TRACEFS])
        .output()
        .map_err(|e| ProbeError::Tracefs(format!("running mount: {e}")))?;
    // Judged by the result, not by mount's status: another agent starting at the same moment
    // may have mounted it first, and then this mount fails with "already mounted".
    if !Path::new(TRACEFS).join("events").is_dir() {
        return Err(ProbeError::Tracefs(format!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed ({}); mount it with \
             `mount -t tracefs tracefs {TRACEFS}`",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Whether this kernel has the tracepoint (a program for a missing one loads, and fails only
/// when attached).
pub fn exists(category: &str, name: &str) -> Result<(), ProbeError> {
    let path = Path::new(TRACEFS).join("events").join(category).join(name).join("id");
    match path.exists() {
        true => Ok(()),
        false => {
            Err(ProbeError::Tracefs(format!("this kernel has no tracepoint {category}/{name} ({})", path.display())))
        }
    }
}

/// The field offsets of one tracepoint's payload.
#[derive(Debug, Clone, Default)]
pub struct Format {
    fields: HashMap<String, u32>,
}

impl Format {
    pub fn read(category: &str, name: &str) -> Result<Self, ProbeError> {
        let path = Path::new(TRACEFS).join("events").join(category).join(name).join("format");
        let text = fs::read_to_string(&path).map_err(|e| ProbeError::Tracefs(format!("{}: {e}", path.display())))?;
        Ok(Self::parse(&text))
    }

    /// Parses lines like `field:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;`.
    pub fn parse(text: &str) -> Self {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let mut decl = None;
            let mut offset = None;
            for part in line.trim().split(';') {
                let part = part.trim();
                if let Some(d) = part.strip_prefix("field:") {
                    decl = d.split_whitespace().last().map(|n| n.split('[').next().unwrap_or(n).to_string());
                } else if let Some(o) = part.strip_prefix("offset:") {
                    offset = o.parse::<u32>().ok();
                }
            }
            if let (Some(name), Some(off)) = (decl, offset) {
                fields.insert(name, off);
            }
        }
        Self { fields }
    }

    pub fn offset(&self, field: &str) -> Option<u32> {
        self.fields.get(field).copied()
    }

    pub fn require(&self, tracepoint: &str, field: &str) -> Result<u32, ProbeError> {
        self.offset(field).ok_or_else(|| {
            ProbeError::Tracefs(format!("tracepoint {tracepoint} has no field `{field}` on this kernel"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_arrays() {
        let f = Format::parse(
            "name: sched_process_exit\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
             \tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
             \tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\
             \tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n\
             \tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;\n",
        );
        assert_eq!(f.offset("comm"), Some(8));
        assert_eq!(f.offset("pid"), Some(24));
        assert_eq!(f.offset("group_dead"), Some(32));
        assert_eq!(f.offset("filename"), Some(8));
        assert_eq!(f.offset("nope"), None);
    }
}
