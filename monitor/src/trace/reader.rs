//! Reading traces: segment files or directories of them, in order, tolerating damage. A bad
//! frame is reported with its file and offset, the reader resumes at the next frame that checks
//! out, and the bytes skipped are counted.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use super::{
    format::{self, Frame, Record},
    frames::{Frames, Next},
};

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
    #[error("{path}: this collector store holds no session traces (agents send them with --trace-output)")]
    NoForwardedTraces { path: String },
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

/// Reads one segment file as a stream; calls `on_record` for each good record and `on_damage`
/// for each damaged stretch. `progress` gets the bytes read so far.
pub fn read_segment(
    path: &Path,
    on_record: &mut dyn FnMut(Record),
    on_damage: &mut dyn FnMut(Damage),
    progress: &mut dyn FnMut(u64),
) -> Result<(), TraceError> {
    let read_err = |source| TraceError::Read { path: path.display().to_string(), source };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut header = Vec::with_capacity(format::HEADER_LEN);
    (&mut file).take(format::HEADER_LEN as u64).read_to_end(&mut header).map_err(read_err)?;
    format::check_header(&header).map_err(|source| TraceError::Header { path: path.display().to_string(), source })?;
    let mut frames = Frames::new(file, format::HEADER_LEN as u64);
    let mut last_progress = 0;
    while let Some(next) = frames.next::<Record>().map_err(read_err)? {
        match next {
            Next::Record(record, _) => on_record(record),
            Next::Damaged { offset, reason, skipped } => {
                on_damage(Damage { file: path.to_path_buf(), offset, reason, skipped })
            }
            Next::Truncated { offset, remaining } => on_damage(Damage {
                file: path.to_path_buf(),
                offset,
                reason: "frame cut short at the end of the file",
                skipped: remaining,
            }),
        }
        if frames.offset() - last_progress > 1 << 20 {
            last_progress = frames.offset();
            progress(last_progress);
        }
    }
    progress(frames.offset());
    Ok(())
}

/// One trace frame an agent forwarded to a collector (`--trace-output`).
pub struct Forwarded {
    /// The agent run it belongs to.
    pub run_id: String,
    /// Its position in the run: 0, 1, 2 …
    pub seq: u64,
    pub record: Record,
}

/// Streams the session traces stored in a collector's store directory, in the order they were
/// stored, which is each run's order (an agent resends in order, and the store keeps each
/// frame once). Runs of several agents interleave: `Forwarded::run_id` tells them apart.
/// `progress` gets the store bytes read so far.
pub fn read_collector_store(
    dir: &Path,
    on_frame: &mut dyn FnMut(Forwarded),
    on_damage: &mut dyn FnMut(Damage),
    progress: &mut dyn FnMut(u64),
) -> Result<(), TraceError> {
    use crate::collector::store;
    let read_err = |source| TraceError::Read { path: dir.display().to_string(), source };
    let mut done = 0;
    for seg in store::segments(dir).map_err(read_err)? {
        let path = store::segment_path(dir, seg);
        let end = store::read_segment(&path, 0, &mut |s, after| {
            progress(done + after);
            if s.tag != crate::collector::store::TRACE_TAG {
                return;
            }
            let Ok(v) = rmpv::decode::read_value(&mut s.record.as_slice()) else { return };
            let field = |k: &str| crate::forward::protocol::map_get(&v, k);
            let (Some(run_id), Some(seq), Some(rmpv::Value::Binary(frame))) =
                (field("run_id").and_then(|r| r.as_str()), field("seq").and_then(|n| n.as_u64()), field("frame"))
            else {
                return;
            };
            match format::decode::<Record>(frame) {
                Frame::Record(record, _) => on_frame(Forwarded { run_id: run_id.to_string(), seq, record: *record }),
                Frame::Truncated | Frame::Bad(_) => on_damage(Damage {
                    file: dir.join(format!("run-{run_id}")),
                    offset: seq,
                    reason: "forwarded trace frame does not decode",
                    skipped: frame.len() as u64,
                }),
            }
        })
        .map_err(read_err)?;
        done += end;
    }
    Ok(())
}

/// Whether `dir` is a collector's store (rather than an agent's trace directory).
pub fn is_collector_store(dir: &Path) -> bool {
    crate::collector::store::segments(dir).is_ok_and(|s| !s.is_empty())
}
