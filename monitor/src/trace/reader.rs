//! Reading traces: segment files or directories of them, in order, tolerating damage. A bad
//! frame is reported with its file and offset, the reader resumes at the next frame that checks
//! out, and the bytes skipped are counted.

use std::path::{Path, PathBuf};

use super::format::{self, Frame, Record};

/// Damage met while reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Damage {
    pub file: PathBuf,
    pub offset: u64,
    pub reason: &'static str,
    /// Bytes skipped before the next good frame (or the end of the file).
    pub skipped: u64,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: bad frame at offset {} ({}): skipped {} bytes, resumed at offset {}",
            self.file.display(),
            self.offset,
            self.reason,
            self.skipped,
            self.offset + self.skipped
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Header { path: String, source: format::HeaderError },
    #[error("{path}: no trace segments (*.mtr) in this directory")]
    EmptyDir { path: String },
}

/// The segment files named by `paths` (files, or directories of segments), in order.
pub fn expand(paths: &[PathBuf]) -> Result<Vec<PathBuf>, TraceError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let segments = super::writer::segments_in(path)
                .map_err(|source| TraceError::Read { path: path.display().to_string(), source })?;
            if segments.is_empty() {
                return Err(TraceError::EmptyDir { path: path.display().to_string() });
            }
            files.extend(segments);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// Reads one segment file whole; calls `on_record` for each good record and `on_damage` for
/// each damaged stretch. `progress` gets the bytes read so far.
pub fn read_segment(
    path: &Path,
    on_record: &mut dyn FnMut(Record),
    on_damage: &mut dyn FnMut(Damage),
    progress: &mut dyn FnMut(u64),
) -> Result<(), TraceError> {
    let bytes = std::fs::read(path).map_err(|source| TraceError::Read { path: path.display().to_string(), source })?;
    read_bytes(path, &bytes, on_record, on_damage, progress)
}

/// Reads a segment held in memory (`path` names it in reports).
pub fn read_bytes(
    path: &Path,
    bytes: &[u8],
    on_record: &mut dyn FnMut(Record),
    on_damage: &mut dyn FnMut(Damage),
    progress: &mut dyn FnMut(u64),
) -> Result<(), TraceError> {
    format::check_header(bytes).map_err(|source| TraceError::Header { path: path.display().to_string(), source })?;
    let mut at = format::HEADER_LEN;
    let mut last_progress = 0;
    while at < bytes.len() {
        match format::decode::<Record>(&bytes[at..]) {
            Frame::Record(record, len) => {
                on_record(*record);
                at += len;
            }
            Frame::Truncated => {
                on_damage(Damage {
                    file: path.to_path_buf(),
                    offset: at as u64,
                    reason: "frame cut short at the end of the file",
                    skipped: (bytes.len() - at) as u64,
                });
                break;
            }
            Frame::Bad(reason) => {
                let next = resync(bytes, at + 1).unwrap_or(bytes.len());
                on_damage(Damage { file: path.to_path_buf(), offset: at as u64, reason, skipped: (next - at) as u64 });
                at = next;
            }
        }
        if at - last_progress > 1 << 20 {
            last_progress = at;
            progress(at as u64);
        }
    }
    progress(bytes.len() as u64);
    Ok(())
}

/// The offset of the next frame after `from` that decodes whole.
fn resync(bytes: &[u8], mut from: usize) -> Option<usize> {
    while let Some(candidate) = format::next_sync(bytes, from) {
        if let Frame::Record(..) = format::decode::<Record>(&bytes[candidate..]) {
            return Some(candidate);
        }
        from = candidate + 1;
    }
    None
}

/// The session traces agents forwarded to a collector (`--trace-output`), read from the
/// collector's store directory: one in-memory segment per agent run, records in their order.
pub fn from_collector_store(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, TraceError> {
    use std::collections::BTreeMap;
    let read_err = |source| TraceError::Read { path: dir.display().to_string(), source };
    let mut runs: Vec<String> = Vec::new();
    let mut frames: BTreeMap<String, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
    for seg in crate::collector::store::segments(dir).map_err(read_err)? {
        crate::collector::store::read_segment(&crate::collector::store::segment_path(dir, seg), 0, &mut |s, _| {
            if s.tag != crate::collector::fanout::TRACE_TAG {
                return;
            }
            let Ok(v) = rmpv::decode::read_value(&mut s.record.as_slice()) else { return };
            let field = |k: &str| crate::forward::protocol::map_get(&v, k);
            let (Some(run), Some(seq), Some(rmpv::Value::Binary(frame))) =
                (field("run_id").and_then(|r| r.as_str()), field("seq").and_then(|n| n.as_u64()), field("frame"))
            else {
                return;
            };
            if !frames.contains_key(run) {
                runs.push(run.to_string());
            }
            frames.entry(run.to_string()).or_default().insert(seq, frame.clone());
        })
        .map_err(read_err)?;
    }
    Ok(runs
        .into_iter()
        .map(|run| {
            let mut bytes = format::header().to_vec();
            for frame in frames.remove(&run).unwrap_or_default().into_values() {
                bytes.extend_from_slice(&frame);
            }
            (dir.join(format!("run-{run}")), bytes)
        })
        .collect())
}

/// Whether `dir` is a collector's store (rather than an agent's trace directory).
pub fn is_collector_store(dir: &Path) -> bool {
    crate::collector::store::segments(dir).is_ok_and(|s| !s.is_empty())
}
