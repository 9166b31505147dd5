//! The agent's disk spool for one forward output: alerts are appended (and synced) before they
//! are sent, and leave only when the receiver acknowledges them, so neither a receiver that is
//! down nor a `kill -9` of the agent loses an alert. Bounded in bytes: when full, the oldest
//! segment goes, and the count of alerts dropped is reported (as a `monitor_blind` alert).
//!
//! Files: `spool-<seq>.log` segments of frames (the trace frame format, each payload one
//! `{ts, alert}` record), and `cursor`: the segment and offset of the first unacknowledged
//! alert, replaced atomically on each ack.

use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::trace::format::{self, Frame};

/// One spooled record: its event time and the Forward record (a MessagePack map) as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpoolRecord {
    pub ts: u64,
    #[serde(with = "crate::collector::store::bytes")]
    pub record: Vec<u8>,
}

/// A position in the spool: segment number and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// The segment being appended to.
    head: u64,
    file: fs::File,
    head_len: u64,
    /// First unacknowledged alert.
    cursor: Position,
    /// Alerts dropped because the spool was full, not yet reported.
    pub dropped: u64,
}

#[derive(Debug)]
pub struct Batch {
    pub records: Vec<SpoolRecord>,
    /// Where the spool resumes once this batch is acknowledged.
    pub end: Position,
}

impl Spool {
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let segments = segments(dir)?;
        let cursor =
            read_cursor(dir).unwrap_or(Position { segment: segments.first().copied().unwrap_or(1), offset: 0 });
        let head = segments.last().copied().unwrap_or(1).max(cursor.segment);
        let file = open_segment(dir, head)?;
        let head_len = file.metadata()?.len();
        let segment_bytes = (max_bytes / 8).clamp(64 << 10, 64 << 20);
        Ok(Self { dir: dir.to_path_buf(), max_bytes, segment_bytes, head, file, head_len, cursor, dropped: 0 })
    }

    /// Appends records and syncs them to disk.
    pub fn append(&mut self, records: &[SpoolRecord]) -> std::io::Result<()> {
        let mut buf = Vec::new();
        for record in records {
            format::encode(record, &mut buf).map_err(std::io::Error::other)?;
        }
        if self.head_len > 0 && self.head_len + buf.len() as u64 > self.segment_bytes {
            self.head += 1;
            self.file = open_segment(&self.dir, self.head)?;
            self.head_len = 0;
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.head_len += buf.len() as u64;
        self.enforce_bound()
    }

    /// Drops the oldest segments while the spool is over its bound, counting their unsent alerts.
    fn enforce_bound(&mut self) -> std::io::Result<()> {
        loop {
            let segments = segments(&self.dir)?;
            let total: u64 =
                segments.iter().filter_map(|s| fs::metadata(segment_path(&self.dir, *s)).ok()).map(|m| m.len()).sum();
            let Some(&oldest) = segments.first() else { return Ok(()) };
            if total <= self.max_bytes || oldest == self.head {
                return Ok(());
            }
            let from = if oldest == self.cursor.segment { self.cursor.offset } else { 0 };
            if oldest >= self.cursor.segment {
                self.dropped += count_frames(&segment_path(&self.dir, oldest), from);
                self.cursor = Position { segment: oldest + 1, offset: 0 };
                write_cursor(&self.dir, self.cursor)?;
            }
            fs::remove_file(segment_path(&self.dir, oldest))?;
        }
    }

    /// Up to `max` unacknowledged alerts from the cursor (none: the spool is drained).
    pub fn read_batch(&self, max: usize, max_bytes: usize) -> std::io::Result<Batch> {
        let mut records = Vec::new();
        let mut pos = self.cursor;
        let mut bytes_read = 0;
        while records.len() < max && bytes_read < max_bytes && pos.segment <= self.head {
            let path = segment_path(&self.dir, pos.segment);
            let mut data = Vec::new();
            match fs::File::open(&path) {
                Ok(mut f) => {
                    f.seek(SeekFrom::Start(pos.offset))?;
                    f.take((max_bytes - bytes_read) as u64 + (1 << 20)).read_to_end(&mut data)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let mut at = 0;
            while records.len() < max && bytes_read < max_bytes {
                match format::decode::<SpoolRecord>(&data[at..]) {
                    Frame::Record(a, len) => {
                        records.push(*a);
                        at += len;
                        bytes_read += len;
                    }
                    Frame::Truncated => break,
                    Frame::Bad(reason) => {
                        // A frame damaged on disk (a crash mid-write): skip to the next one.
                        let next = format::next_sync(&data, at + 1).unwrap_or(data.len());
                        tracing::warn!(spool = %path.display(), offset = pos.offset + at as u64, reason, "skipping a damaged spool frame");
                        at = next;
                        if at >= data.len() {
                            break;
                        }
                    }
                }
            }
            pos.offset += at as u64;
            if at < data.len() || pos.segment == self.head {
                break;
            }
            pos = Position { segment: pos.segment + 1, offset: 0 };
        }
        Ok(Batch { records, end: pos })
    }

    /// The receiver acknowledged everything before `end`.
    pub fn commit(&mut self, end: Position) -> std::io::Result<()> {
        if end <= self.cursor {
            return Ok(());
        }
        for seg in segments(&self.dir)? {
            if seg < end.segment && seg != self.head {
                let _ = fs::remove_file(segment_path(&self.dir, seg));
            }
        }
        self.cursor = end;
        write_cursor(&self.dir, end)
    }

    pub fn is_drained(&self) -> bool {
        self.cursor.segment == self.head && self.cursor.offset >= self.head_len
    }

    /// Bytes spooled and not yet acknowledged.
    pub fn pending_bytes(&self) -> u64 {
        let mut bytes = 0;
        for seg in self.cursor.segment..=self.head {
            let len = if seg == self.head {
                self.head_len
            } else {
                fs::metadata(segment_path(&self.dir, seg)).map_or(0, |m| m.len())
            };
            let from = if seg == self.cursor.segment { self.cursor.offset } else { 0 };
            bytes += len.saturating_sub(from);
        }
        bytes
    }

    /// The time of the oldest record not yet acknowledged (none: drained).
    pub fn oldest_ts(&self) -> Option<u64> {
        if self.is_drained() {
            return None;
        }
        self.read_batch(1, 1 << 16).ok()?.records.first().map(|r| r.ts)
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("spool-{seq:016}.log"))
}

fn open_segment(dir: &Path, seq: u64) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new().create(true).append(true).mode(0o600).open(segment_path(dir, seq))
}

fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut seqs: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("spool-")?.strip_suffix(".log")?.parse().ok()
        })
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

fn count_frames(path: &Path, from: u64) -> u64 {
    let Ok(mut file) = fs::File::open(path) else { return 0 };
    if file.seek(SeekFrom::Start(from)).is_err() {
        return 0;
    }
    let mut frames = crate::trace::frames::Frames::new(file, from);
    let mut n = 0;
    while let Ok(Some(next)) = frames.next::<SpoolRecord>() {
        if let crate::trace::frames::Next::Record(..) = next {
            n += 1;
        }
    }
    n
}

fn read_cursor(dir: &Path) -> Option<Position> {
    let text = fs::read_to_string(dir.join("cursor")).ok()?;
    let (segment, offset) = text.trim().split_once(' ')?;
    Some(Position { segment: segment.parse().ok()?, offset: offset.parse().ok()? })
}

fn write_cursor(dir: &Path, pos: Position) -> std::io::Result<()> {
    replace_file(&dir.join("cursor"), &format!("{} {}\n", pos.segment, pos.offset))
}

/// Replaces a small file atomically (write a sibling, sync it, rename it over): a crash leaves
/// the old contents or the new, never a mix. Used for the spool's and the sinks' positions.
pub fn replace_file(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_data()?;
    fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(n: u64) -> SpoolRecord {
        SpoolRecord { ts: n, record: format!("record {n:06} of some length, like an alert's").into_bytes() }
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("monitor-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn alerts_leave_only_when_acknowledged_and_survive_a_reopen() {
        let dir = tempdir("ack");
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        spool.append(&(0..10).map(alert).collect::<Vec<_>>()).unwrap();
        let batch = spool.read_batch(4, 1 << 20).unwrap();
        assert_eq!(batch.records.iter().map(|a| a.ts).collect::<Vec<_>>(), [0, 1, 2, 3]);
        // Not acknowledged: a reopened spool (the agent restarted) starts over at alert 0.
        drop(spool);
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        let batch = spool.read_batch(4, 1 << 20).unwrap();
        assert_eq!(batch.records[0].ts, 0);
        spool.commit(batch.end).unwrap();
        drop(spool);
        let mut spool = Spool::open(&dir, 1 << 20).unwrap();
        // What the metrics say: the oldest waiting alert, and the bytes of the six left.
        assert_eq!(spool.oldest_ts(), Some(4));
        let pending = spool.pending_bytes();
        let rest = spool.read_batch(100, 1 << 20).unwrap();
        assert_eq!(rest.records.iter().map(|a| a.ts).collect::<Vec<_>>(), [4, 5, 6, 7, 8, 9]);
        assert!(pending > 0 && pending == rest.end.offset - batch.end.offset, "{pending} bytes pending");
        spool.commit(rest.end).unwrap();
        assert!(spool.is_drained());
        assert_eq!((spool.pending_bytes(), spool.oldest_ts()), (0, None));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_counts_them() {
        let dir = tempdir("full");
        let mut spool = Spool::open(&dir, 64 << 10).unwrap();
        for n in 0..2000 {
            spool.append(&[alert(n)]).unwrap();
        }
        assert!(spool.dropped > 0, "nothing dropped");
        let total: u64 = fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
        assert!(total <= (64 << 10) + (64 << 10), "spool of {total} bytes");
        let mut seen = 0;
        loop {
            let b = spool.read_batch(500, 4 << 20).unwrap();
            if b.records.is_empty() {
                break;
            }
            seen += b.records.len() as u64;
            spool.commit(b.end).unwrap();
        }
        assert_eq!(seen + spool.dropped, 2000, "every alert either delivered or counted as dropped");
        fs::remove_dir_all(dir).unwrap();
    }
}
