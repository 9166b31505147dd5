//! Alert sinks: where alerts go. Each alert is written and flushed before the next, so an agent
//! that is killed loses at most the alert being written.

use std::{
    fs::OpenOptions,
    io::{BufWriter, Write},
    path::PathBuf,
    str::FromStr,
};

use tokio::sync::mpsc;

use crate::{
    alert::Alert,
    forward::{ForwardOutput, ForwardTarget},
};

/// An `--output` SPEC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputSpec {
    /// JSON lines on standard output.
    Stdout,
    /// JSON lines appended to a file.
    Jsonl(PathBuf),
    /// OCSF Detection Findings as JSON lines appended to a file.
    Ocsf(PathBuf),
    /// Fluent Forward to a collector (or Fluentd, Fluent Bit, Vector), through a disk spool.
    Forward(ForwardTarget),
}

impl FromStr for OutputSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        if spec == "stdout" {
            return Ok(Self::Stdout);
        }
        for (prefix, make) in [("jsonl:", Self::Jsonl as fn(PathBuf) -> Self), ("ocsf:", Self::Ocsf)] {
            if let Some(path) = spec.strip_prefix(prefix) {
                if path.is_empty() {
                    return Err(format!("{prefix} needs a path, as in {prefix}/var/log/monitor/alerts.jsonl"));
                }
                return Ok(make(PathBuf::from(path)));
            }
        }
        if spec.starts_with("forward://") || spec.starts_with("forward+tls://") {
            return ForwardTarget::parse(spec).map(Self::Forward);
        }
        Err(format!(
            "unknown output `{spec}`: this agent writes `stdout`, `jsonl:PATH`, `ocsf:PATH`, `forward://HOST:PORT` or `forward+tls://HOST:PORT`"
        ))
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

/// How line outputs encode an alert.
#[derive(Debug, Clone, Copy)]
enum Lines {
    Json,
    Ocsf,
}

enum Out {
    Lines(Lines, Box<dyn Write + Send>),
    Forward(ForwardOutput),
}

pub struct Sink {
    spec: OutputSpec,
    out: Out,
}

/// Where forward outputs keep their spools, and how large each may grow.
#[derive(Debug, Clone)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

/// Opens every output; `lost` takes the reports of spools that had to drop alerts.
pub fn open(
    specs: &[OutputSpec],
    spool: &SpoolSettings,
    lost: mpsc::Sender<crate::event::Event>,
) -> anyhow::Result<Vec<Sink>> {
    specs
        .iter()
        .map(|spec| {
            let out = match spec {
                OutputSpec::Stdout => Out::Lines(Lines::Json, Box::new(std::io::stdout())),
                OutputSpec::Jsonl(path) => {
                    Out::Lines(Lines::Json, Box::new(BufWriter::new(open_append(path, "output")?)))
                }
                OutputSpec::Ocsf(path) => {
                    Out::Lines(Lines::Ocsf, Box::new(BufWriter::new(open_append(path, "output")?)))
                }
                OutputSpec::Forward(target) => Out::Forward(ForwardOutput::open(
                    target.clone(),
                    spool.dir.join(target.spool_name()),
                    spool.max_bytes,
                    lost.clone(),
                )?),
            };
            Ok(Sink { spec: spec.clone(), out })
        })
        .collect()
}

/// Alerts taken from the channel at once, so a burst is spooled with one sync.
const BURST: usize = 512;
/// How long a stopping agent waits for its forward spools (alerts, and the traces it forwards)
/// to be acknowledged.
pub const STOP_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

pub async fn run(mut sinks: Vec<Sink>, mut alerts: mpsc::Receiver<Alert>) {
    let mut burst = Vec::with_capacity(BURST);
    while alerts.recv_many(&mut burst, BURST).await > 0 {
        for sink in &mut sinks {
            if let Err(e) = sink.write(&burst) {
                tracing::error!(output = ?sink.spec, "writing alerts: {e}");
            }
        }
        burst.clear();
    }
    // The agent is stopping: give forward outputs a moment to deliver what they spooled.
    for sink in sinks {
        if let Out::Forward(forward) = sink.out {
            forward.wait_drained(STOP_DRAIN).await;
        }
    }
}

impl Sink {
    fn write(&mut self, alerts: &[Alert]) -> std::io::Result<()> {
        match &mut self.out {
            Out::Lines(kind, out) => {
                for alert in alerts {
                    let mut line = match kind {
                        Lines::Json => serde_json::to_vec(alert)?,
                        Lines::Ocsf => serde_json::to_vec(&crate::encode::ocsf::finding(alert))?,
                    };
                    line.push(b'\n');
                    out.write_all(&line)?;
                }
                out.flush()
            }
            Out::Forward(forward) => forward.write(alerts),
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
        assert_eq!("ocsf:/tmp/o.jsonl".parse(), Ok(OutputSpec::Ocsf("/tmp/o.jsonl".into())));
        assert!(matches!("forward://127.0.0.1:24224".parse(), Ok(OutputSpec::Forward(_))));
    }
}
