//! The agent's trace writer: append-only segment files in one directory, rotated by size, with a
//! per-segment session index written when a segment is sealed, and a retention bound in bytes
//! and age applied to sealed segments.
//!
//! Files: `trace-<run>-<seq>.mtr` (segments; the run id sorts by start time, so names sort in
//! write order) and `trace-<run>-<seq>.idx.json` beside each sealed one.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::format::{self, RecordRef, RunInfo, TracedAlertRef};
use crate::event::{Event, SessionKey};

/// Size and retention bounds of a trace directory.
#[derive(Debug, Clone)]
pub struct TraceLimits {
    /// A segment is sealed and a new one started past this size.
    pub segment_bytes: u64,
    /// Sealed segments are deleted, oldest first, while the directory holds more than this.
    pub max_bytes: u64,
    /// Sealed segments whose last write is older than this are deleted.
    pub max_age: Duration,
}

impl Default for TraceLimits {
    fn default() -> Self {
        Self { segment_bytes: 64 << 20, max_bytes: 2 << 30, max_age: Duration::from_secs(30 * 24 * 3600) }
    }
}

/// What a sealed segment holds, per session (the `.idx.json` file).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SegmentIndex {
    pub run_id: String,
    pub records: u64,
    pub first_ts: u64,
    pub last_ts: u64,
    /// Session id -> records of that session in this segment.
    pub sessions: BTreeMap<String, u64>,
}

pub struct TraceWriter {
    dir: PathBuf,
    limits: TraceLimits,
    run: RunInfo,
    seq: u32,
    file: Option<fs::File>,
    path: PathBuf,
    written: u64,
    buffer: Vec<u8>,
    index: SegmentIndex,
    /// Session key -> id, for the index (keys are per run).
    ids: BTreeMap<SessionKey, String>,
    /// Records written since start, and bytes: for the agent's metrics and the benchmark.
    pub total_records: u64,
    pub total_bytes: u64,
    /// The central copy: every record also forwarded (tag `monitor.trace`) to a collector.
    forward: Option<crate::forward::ForwardOutput>,
    pending: Vec<crate::forward::spool::SpoolRecord>,
}

/// Buffered bytes are written out past this (and on every flush).
const BUFFER_BYTES: usize = 256 << 10;

impl TraceWriter {
    /// `forward`: also send every record to a collector (through its own spool), so
    /// responders can replay from the central store.
    pub fn create(
        dir: &Path,
        limits: TraceLimits,
        run: RunInfo,
        forward: Option<crate::forward::ForwardOutput>,
    ) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        // Traces name processes, hosts and sessions: root only.
        fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let mut writer = Self {
            dir: dir.to_path_buf(),
            limits,
            index: SegmentIndex { run_id: run.run_id.clone(), ..Default::default() },
            run,
            seq: 0,
            file: None,
            path: PathBuf::new(),
            written: 0,
            buffer: Vec::with_capacity(BUFFER_BYTES * 2),
            ids: BTreeMap::new(),
            total_records: 0,
            total_bytes: 0,
            forward,
            pending: Vec::new(),
        };
        writer.open_segment()?;
        writer.apply_retention();
        Ok(writer)
    }

    /// Waits (up to `limit`) until the collector acknowledged every forwarded record.
    pub async fn wait_forwarded(&self, limit: std::time::Duration) {
        if let Some(forward) = &self.forward {
            forward.wait_drained(limit).await;
        }
    }

    fn open_segment(&mut self) -> std::io::Result<()> {
        self.seq += 1;
        self.path = self.dir.join(format!("trace-{}-{:06}.mtr", self.run.run_id, self.seq));
        let mut file = fs::OpenOptions::new().create_new(true).append(true).mode(0o600).open(&self.path)?;
        file.write_all(&format::header())?;
        self.written = format::HEADER_LEN as u64;
        self.file = Some(file);
        self.index = SegmentIndex { run_id: self.run.run_id.clone(), ..Default::default() };
        // Every segment names its run: session keys are only meaningful within one.
        let run = self.run.clone();
        self.append(RecordRef::Run(&run), 0, None)?;
        Ok(())
    }

    /// Records an event the engine applied.
    pub fn event(&mut self, event: &Event) -> std::io::Result<()> {
        if let Event::SessionStarted { key, session, .. } = event {
            self.ids.insert(*key, session.id.to_string());
        }
        let session = event.session_key();
        self.append(RecordRef::Event(event), event.ts(), session)
    }

    /// Records an alert the engine raised.
    pub fn alert(&mut self, alert: &crate::alert::Alert) -> std::io::Result<()> {
        self.index_session_id(&alert.session.id);
        self.append(RecordRef::Alert(TracedAlertRef { ts: alert.ts, alert }), alert.ts, None)
    }

    fn index_session_id(&mut self, id: &str) {
        if !id.is_empty() {
            *self.index.sessions.entry(id.to_string()).or_default() += 1;
        }
    }

    fn append(&mut self, record: RecordRef<'_>, ts: u64, session: Option<SessionKey>) -> std::io::Result<()> {
        let before = self.buffer.len();
        format::encode(&record, &mut self.buffer).map_err(std::io::Error::other)?;
        let len = (self.buffer.len() - before) as u64;
        if self.forward.is_some() {
            let frame = self.buffer[before..].to_vec();
            self.pending.push(forwarded_record(&self.run, self.total_records, ts, frame));
        }
        self.written += len;
        self.total_bytes += len;
        self.total_records += 1;
        self.index.records += 1;
        if ts != 0 {
            if self.index.first_ts == 0 {
                self.index.first_ts = ts;
            }
            self.index.last_ts = self.index.last_ts.max(ts);
        }
        if let Some(id) = session.and_then(|k| self.ids.get(&k)).cloned() {
            self.index_session_id(&id);
        }
        if self.buffer.len() >= BUFFER_BYTES {
            self.flush()?;
        }
        if self.written >= self.limits.segment_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    /// Writes buffered records to the segment file (the core calls it after each batch), and
    /// spools them for the collector.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if let Some(forward) = &mut self.forward {
            if !self.pending.is_empty() {
                forward.write_records(&self.pending)?;
                self.pending.clear();
            }
        }
        if let Some(file) = &mut self.file {
            if !self.buffer.is_empty() {
                file.write_all(&self.buffer)?;
                crate::metrics::get().trace_written(self.buffer.len() as u64);
                self.buffer.clear();
            }
        }
        Ok(())
    }

    /// Seals the current segment (fsync, index) and starts the next.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.seal()?;
        self.open_segment()?;
        self.apply_retention();
        Ok(())
    }

    fn seal(&mut self) -> std::io::Result<()> {
        self.flush()?;
        if let Some(file) = self.file.take() {
            file.sync_all()?;
        }
        let index = serde_json::to_vec_pretty(&self.index).map_err(std::io::Error::other)?;
        fs::write(index_path(&self.path), index)?;
        Ok(())
    }

    /// Deletes sealed segments past the age bound, then the oldest while over the byte bound.
    fn apply_retention(&mut self) {
        let Ok(mut segments) = segments_in(&self.dir) else { return };
        segments.retain(|p| *p != self.path);
        let now = SystemTime::now();
        let mut sized: Vec<(PathBuf, u64, SystemTime)> = segments
            .into_iter()
            .filter_map(|p| {
                let meta = fs::metadata(&p).ok()?;
                Some((p, meta.len(), meta.modified().unwrap_or(now)))
            })
            .collect();
        let mut total: u64 = sized.iter().map(|(_, len, _)| len).sum::<u64>() + self.written;
        sized.retain(|(path, len, modified)| {
            let too_old = now.duration_since(*modified).unwrap_or_default() > self.limits.max_age;
            if too_old {
                remove_segment(path);
                total -= len;
            }
            !too_old
        });
        for (path, len, _) in sized {
            if total <= self.limits.max_bytes {
                break;
            }
            remove_segment(&path);
            total -= len;
        }
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        if let Err(e) = self.seal() {
            tracing::warn!("sealing the trace segment {}: {e}", self.path.display());
        }
    }
}

/// A trace record as a Forward record: `{id, run_id, host, seq, frame}`, where `frame` is the
/// record framed as in a segment file and `id` (`trace:RUN:SEQ`) lets the collector store it
/// once however often it is resent.
pub fn forwarded_record(run: &RunInfo, seq: u64, ts: u64, frame: Vec<u8>) -> crate::forward::spool::SpoolRecord {
    use rmpv::Value;
    let map = Value::Map(vec![
        (Value::from("id"), Value::from(format!("trace:{}:{seq}", run.run_id))),
        (Value::from("run_id"), Value::from(run.run_id.as_str())),
        (Value::from("host"), Value::from(run.host.as_str())),
        (Value::from("seq"), Value::from(seq)),
        (Value::from("frame"), Value::Binary(frame)),
    ]);
    let mut record = Vec::new();
    let _ = rmpv::encode::write_value(&mut record, &map);
    crate::forward::spool::SpoolRecord { ts, record }
}

fn remove_segment(path: &Path) {
    tracing::info!(segment = %path.display(), "trace retention: segment deleted");
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(index_path(path));
}

/// `trace-….mtr` -> `trace-….idx.json`.
pub fn index_path(segment: &Path) -> PathBuf {
    segment.with_extension("idx.json")
}

/// The segment files of a directory, in write order.
pub fn segments_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut segments: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "mtr"))
        .collect();
    segments.sort();
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_rotate_and_retention_bounds_the_directory() {
        let dir = std::env::temp_dir().join(format!("monitor-trace-retention-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let run =
            RunInfo { run_id: "r".into(), host: "h".into(), agent_version: "t".into(), config: Default::default() };
        let limits = TraceLimits { segment_bytes: 2000, max_bytes: 10_000, max_age: Duration::from_secs(3600) };
        let mut writer = TraceWriter::create(&dir, limits, run, None).unwrap();
        for ts in 1..2000u64 {
            writer.event(&Event::Tick { ts }).unwrap();
        }
        writer.flush().unwrap();
        let segments = segments_in(&dir).unwrap();
        let total: u64 = segments.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
        assert!(segments.len() >= 3, "{segments:?}");
        assert!(total <= 10_000 + 2_100, "{total} bytes kept");
        // The oldest went first: the first segment left is not the first written.
        assert!(!segments[0].to_string_lossy().ends_with("-000001.mtr"), "{segments:?}");
        // Sealed segments have their index; removed ones took theirs along.
        for s in &segments[..segments.len() - 1] {
            assert!(index_path(s).exists(), "{} has no index", s.display());
        }
        assert!(!dir.join("trace-r-000001.idx.json").exists());
        drop(writer);
        fs::remove_dir_all(&dir).unwrap();
    }
}
