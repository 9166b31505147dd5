//! Sinks of the collector: each reads the store from its own position (kept in
//! `cursor-<name>` in the store directory) and moves on only once its destination took the
//! records, so a sink that is down neither stops ingestion nor loses anything; it resumes
//! where it was.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;

use super::{
    destination::{Destination, Item},
    lines_file::{LineFormat, LinesFile},
    store,
};

/// A `--sink` SPEC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    /// Every stored record as JSON lines (alerts as the agent writes them).
    Jsonl(PathBuf),
    /// Alerts as OCSF Detection Findings, JSON lines.
    Ocsf(PathBuf),
    /// Alerts as CEF lines.
    Cef(PathBuf),
    /// Alerts as RFC 5424 syslog over TLS, octet-counted: `syslog+tls://HOST:PORT?ca=PATH`.
    SyslogTls { host: String, port: u16, ca: Option<PathBuf>, server_name: Option<String> },
    /// Alerts as JSON messages to a Kafka topic: `kafka://BROKER[,BROKER]/TOPIC`.
    Kafka { brokers: String, topic: String },
}

impl std::str::FromStr for SinkSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        if let Some(p) = spec.strip_prefix("jsonl:").filter(|p| !p.is_empty()) {
            return Ok(Self::Jsonl(p.into()));
        }
        if let Some(p) = spec.strip_prefix("ocsf:").filter(|p| !p.is_empty()) {
            return Ok(Self::Ocsf(p.into()));
        }
        if let Some(p) = spec.strip_prefix("cef:").filter(|p| !p.is_empty()) {
            return Ok(Self::Cef(p.into()));
        }
        if let Some(rest) = spec.strip_prefix("syslog+tls://") {
            let (addr, query) = rest.split_once('?').unwrap_or((rest, ""));
            let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("`{spec}`: needs HOST:PORT"))?;
            let port = port.parse().map_err(|_| format!("`{spec}`: `{port}` is not a port"))?;
            let (mut ca, mut server_name) = (None, None);
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some(("ca", v)) => ca = Some(PathBuf::from(v)),
                    Some(("server_name", v)) => server_name = Some(v.to_string()),
                    _ => return Err(format!("`{spec}`: unknown option `{pair}` (ca, server_name)")),
                }
            }
            return Ok(Self::SyslogTls { host: host.to_string(), port, ca, server_name });
        }
        if let Some(rest) = spec.strip_prefix("kafka://") {
            let (brokers, topic) =
                rest.split_once('/').ok_or_else(|| format!("`{spec}`: needs kafka://BROKERS/TOPIC"))?;
            if brokers.is_empty() || topic.is_empty() {
                return Err(format!("`{spec}`: needs kafka://BROKERS/TOPIC"));
            }
            return Ok(Self::Kafka { brokers: brokers.into(), topic: topic.into() });
        }
        Err(format!("unknown sink `{spec}`: jsonl:PATH, ocsf:PATH, syslog+tls://HOST:PORT or kafka://BROKERS/TOPIC"))
    }
}

impl SinkSpec {
    /// A stable name, for the sink's cursor file.
    pub fn name(&self) -> String {
        let raw = match self {
            Self::Jsonl(p) => format!("jsonl-{}", p.display()),
            Self::Ocsf(p) => format!("ocsf-{}", p.display()),
            Self::Cef(p) => format!("cef-{}", p.display()),
            Self::SyslogTls { host, port, .. } => format!("syslog-{host}-{port}"),
            Self::Kafka { brokers, topic } => format!("kafka-{brokers}-{topic}"),
        };
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
    }
}

/// Runs one sink: follows the store, delivers, advances its cursor. Retries with backoff.
pub fn run(spec: SinkSpec, store_dir: PathBuf, mut durable: watch::Receiver<u64>, hostname: Arc<str>) {
    let name = spec.name();
    let cursor_path = store_dir.join(format!("cursor-{name}"));
    let mut cursor = read_cursor(&cursor_path);
    let mut destination: Option<Box<dyn Destination>> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let last = *durable.borrow_and_update();
        if cursor.seq >= last {
            // Caught up: look again shortly (the writer publishes after each sync).
            if durable.has_changed().is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let (items, next) = match read_from(&store_dir, cursor, 2000) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(sink = %name, "reading the store: {e:#}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if items.is_empty() {
            cursor = next;
            continue;
        }
        if destination.is_none() {
            match open(&spec, &hostname, cursor.sink_end) {
                Ok(d) => destination = Some(d),
                Err(e) => {
                    tracing::warn!(sink = %name, "sink unavailable, retrying in {backoff:?}: {e:#}");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        let Some(dest) = destination.as_mut() else { continue };
        match dest.deliver(&items) {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                cursor = Cursor { sink_end: dest.end(), ..next };
                crate::metrics::collector().sink_delivered(&name, cursor.seq);
                if let Err(e) = write_cursor(&cursor_path, cursor) {
                    tracing::error!(sink = %name, "saving the sink's position: {e}");
                }
            }
            Err(e) => {
                tracing::warn!(sink = %name, "delivery failed, retrying in {backoff:?}: {e:#}");
                crate::metrics::collector().sink_failed(&name);
                destination = None;
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Cursor {
    segment: u64,
    offset: u64,
    seq: u64,
    /// The destination's `end()` after the batch that brought it here.
    sink_end: Option<u64>,
}

fn read_cursor(path: &Path) -> Cursor {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<u64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    match v.as_slice() {
        [segment, offset, seq] => Cursor { segment: *segment, offset: *offset, seq: *seq, sink_end: None },
        [segment, offset, seq, end] => Cursor { segment: *segment, offset: *offset, seq: *seq, sink_end: Some(*end) },
        _ => Cursor { segment: 1, offset: 0, seq: 0, sink_end: None },
    }
}

fn write_cursor(path: &Path, c: Cursor) -> std::io::Result<()> {
    let end = c.sink_end.map(|e| format!(" {e}")).unwrap_or_default();
    crate::forward::spool::replace_file(path, &format!("{} {} {}{end}\n", c.segment, c.offset, c.seq))
}

/// Up to `max` records after the cursor, and the cursor after them.
fn read_from(dir: &Path, mut cursor: Cursor, max: usize) -> anyhow::Result<(Vec<Item>, Cursor)> {
    let segments = store::segments(dir)?;
    let mut items = Vec::new();
    let first = cursor.segment;
    for seg in segments.into_iter().filter(|s| *s >= first) {
        if seg > cursor.segment {
            cursor = Cursor { segment: seg, offset: 0, ..cursor };
        }
        let mut last = cursor;
        store::read_segment(&store::segment_path(dir, seg), cursor.offset, &mut |s, after| {
            if items.len() < max && s.seq > last.seq {
                // Session traces are kept for `monitor replay`, not streamed to SIEMs.
                if s.tag != store::TRACE_TAG {
                    items.push(Item::of(&s));
                }
                last = Cursor { segment: seg, offset: after, seq: s.seq, ..last };
            }
        })?;
        cursor = last;
        if items.len() >= max {
            break;
        }
    }
    Ok((items, cursor))
}

/// Opens a sink's destination; `sink_end` is what it reported at its last saved position.
fn open(spec: &SinkSpec, hostname: &Arc<str>, sink_end: Option<u64>) -> anyhow::Result<Box<dyn Destination>> {
    Ok(match spec {
        SinkSpec::Jsonl(path) => Box::new(LinesFile::open(path, LineFormat::Json, sink_end)?),
        SinkSpec::Ocsf(path) => Box::new(LinesFile::open(path, LineFormat::Ocsf, sink_end)?),
        SinkSpec::Cef(path) => Box::new(LinesFile::open(path, LineFormat::Cef, sink_end)?),
        SinkSpec::SyslogTls { host, port, ca, server_name } => {
            Box::new(super::syslog::SyslogTls::connect(host, *port, ca.as_deref(), server_name.as_deref(), hostname)?)
        }
        SinkSpec::Kafka { brokers, topic } => Box::new(super::kafka::KafkaSink::connect(brokers, topic)?),
    })
}
