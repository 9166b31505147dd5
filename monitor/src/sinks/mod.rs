//! Alert sinks: where alerts go. Each alert is written and flushed before the next, so an agent
//! that is killed loses at most the alert being written.

use std::{
    fs::OpenOptions,
    io::{BufWriter, Write},
    path::PathBuf,
    str::FromStr,
};

use tokio::sync::mpsc;

use crate::alert::Alert;

/// An `--output` SPEC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    /// JSON lines on standard output.
    Stdout,
    /// JSON lines appended to a file.
    Jsonl(PathBuf),
}

impl FromStr for OutputSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        if spec == "stdout" {
            return Ok(Self::Stdout);
        }
        if let Some(path) = spec.strip_prefix("jsonl:") {
            if path.is_empty() {
                return Err("jsonl: needs a path, as in jsonl:/var/log/monitor/alerts.jsonl".into());
            }
            return Ok(Self::Jsonl(PathBuf::from(path)));
        }
        Err(format!("unknown output `{spec}`: this agent writes `stdout` or `jsonl:PATH`"))
    }
}

/// Opens a JSON-lines file for appending, creating it and its directory as needed.
fn open_append(path: &std::path::Path, what: &str) -> anyhow::Result<std::fs::File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{what} {}: {e}", dir.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
}

pub struct Sink {
    spec: OutputSpec,
    out: Box<dyn Write + Send>,
}

pub fn open(specs: &[OutputSpec]) -> anyhow::Result<Vec<Sink>> {
    specs
        .iter()
        .map(|spec| {
            let out: Box<dyn Write + Send> = match spec {
                OutputSpec::Stdout => Box::new(std::io::stdout()),
                OutputSpec::Jsonl(path) => Box::new(BufWriter::new(open_append(path, "output")?)),
            };
            Ok(Sink { spec: spec.clone(), out })
        })
        .collect()
}

pub async fn run(mut sinks: Vec<Sink>, mut alerts: mpsc::Receiver<Alert>) {
    while let Some(alert) = alerts.recv().await {
        let mut line = match serde_json::to_vec(&alert) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!("alert not encodable: {e}");
                continue;
            }
        };
        line.push(b'\n');
        for sink in &mut sinks {
            if let Err(e) = sink.out.write_all(&line).and_then(|_| sink.out.flush()) {
                tracing::error!(output = ?sink.spec, "writing alert: {e}");
            }
        }
    }
}

/// Every event the engine sees, as JSON lines (ticks left out): what the agent attributed, for
/// debugging and for tests that must show that nothing was attributed.
pub struct EventLog {
    out: BufWriter<std::fs::File>,
}

impl EventLog {
    pub fn create(path: &std::path::Path) -> anyhow::Result<Self> {
        Ok(Self { out: BufWriter::new(open_append(path, "event log")?) })
    }

    pub fn write(&mut self, event: &crate::event::Event) {
        if matches!(event, crate::event::Event::Tick { .. }) {
            return;
        }
        let written = serde_json::to_writer(&mut self.out, event)
            .map_err(std::io::Error::from)
            .and_then(|_| self.out.write_all(b"\n"))
            .and_then(|_| self.out.flush());
        if let Err(e) = written {
            tracing::warn!("event log: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!("stdout".parse(), Ok(OutputSpec::Stdout));
        assert_eq!("jsonl:/tmp/a.jsonl".parse(), Ok(OutputSpec::Jsonl("/tmp/a.jsonl".into())));
        assert!("jsonl:".parse::<OutputSpec>().is_err());
        assert!("carrier-pigeon://x".parse::<OutputSpec>().unwrap_err().contains("unknown output"));
    }
}
