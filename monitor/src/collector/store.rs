//! The collector's store: append-only segments of checksummed frames (the trace frame format),
//! each record one received event with a sequence number. A batch is acknowledged to its sender
//! only after it is synced to disk. Alerts are de-duplicated by id and count, so an agent that
//! resends a batch whose ack it never got does not store an alert twice, while each update of
//! a folded finding (same id, a larger count) is stored once; readers take an id's largest
//! count as the alert (see [`latest_alerts`]).

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::trace::{
    format::{self, Frame},
    frames::{Frames, Next},
};

/// The tag of forwarded session traces.
pub const TRACE_TAG: &str = "monitor.trace";

/// One stored event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    /// Position in the store: 1, 2, 3 … with no gap.
    pub seq: u64,
    pub tag: String,
    pub time_ns: u64,
    /// The alert id, when the record is a monitor alert (the de-duplication key, with `count`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The alert's count: 1, or more for an update of a folded finding.
    #[serde(default = "one")]
    pub count: u64,
    /// The record as received, MessagePack.
    #[serde(with = "bytes")]
    pub record: Vec<u8>,
    /// When the collector stored it (wall clock, ns): delivery latency is this minus `time_ns`.
    #[serde(default)]
    pub stored_ns: u64,
}

/// Bytes as a msgpack bin (rmp-serde writes `Vec<u8>` as an array of integers otherwise).
pub mod bytes {
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_bytes(V)
    }
}

fn one() -> u64 {
    1
}

/// An event to store.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub tag: String,
    pub time_ns: u64,
    pub id: Option<String>,
    pub count: u64,
    pub record: Vec<u8>,
}

/// The de-duplication key of a stored alert version.
type Version = (String, u64);

/// What the store holds already, so that each alert version and each trace frame is stored once
/// however often an agent resends it.
#[derive(Default)]
struct Seen {
    alerts: HashSet<Version>,
    /// Session trace frames (id `trace:RUN:SEQ`): an agent sends a run's frames in order and
    /// resends only from its oldest unacknowledged one, so a run's last seq tells a resent frame
    /// from a new one. Memory per agent run, not per frame (traces are most of a store).
    trace_runs: HashMap<String, u64>,
}

enum Key {
    Alert(Version),
    Trace(String, u64),
}

impl Key {
    fn of(tag: &str, id: &str, count: u64) -> Self {
        let trace = (tag == TRACE_TAG).then(|| id.strip_prefix("trace:")?.rsplit_once(':')).flatten();
        match trace.and_then(|(run, seq)| Some((run, seq.parse().ok()?))) {
            Some((run, seq)) => Key::Trace(run.to_string(), seq),
            None => Key::Alert((id.to_string(), count)),
        }
    }
}

impl Seen {
    fn holds(&self, key: &Key) -> bool {
        match key {
            Key::Alert(version) => self.alerts.contains(version),
            Key::Trace(run, seq) => self.trace_runs.get(run).is_some_and(|last| seq <= last),
        }
    }

    fn insert(&mut self, key: Key) {
        match key {
            Key::Alert(version) => {
                self.alerts.insert(version);
            }
            Key::Trace(run, seq) => {
                let last = self.trace_runs.entry(run).or_insert(seq);
                *last = (*last).max(seq);
            }
        }
    }

    fn merge(&mut self, other: Seen) {
        self.alerts.extend(other.alerts);
        for (run, seq) in other.trace_runs {
            self.insert(Key::Trace(run, seq));
        }
    }
}

pub struct Store {
    dir: PathBuf,
    segment_bytes: u64,
    head: u64,
    file: fs::File,
    head_len: u64,
    next_seq: u64,
    seen: Seen,
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let segments = segments(dir)?;
        let mut seen = Seen::default();
        let mut next_seq = 1;
        for seg in &segments {
            read_segment(&segment_path(dir, *seg), 0, &mut |s: Stored, _| {
                next_seq = s.seq + 1;
                if let Some(id) = &s.id {
                    seen.insert(Key::of(&s.tag, id, s.count));
                }
            })?;
        }
        let head = segments.last().copied().unwrap_or(1);
        let file = open_segment(dir, head)?;
        let head_len = file.metadata()?.len();
        Ok(Self { dir: dir.to_path_buf(), segment_bytes: 64 << 20, head, file, head_len, next_seq, seen })
    }

    /// Appends the batch (skipping alerts already stored) and syncs it. Returns the last
    /// sequence number now durable.
    pub fn append(&mut self, batch: Vec<Incoming>) -> std::io::Result<u64> {
        let mut buf = Vec::new();
        let mut new = Seen::default();
        let now = crate::host::now_ns();
        for e in batch {
            if let Some(id) = &e.id {
                let key = Key::of(&e.tag, id, e.count);
                if self.seen.holds(&key) || new.holds(&key) {
                    continue;
                }
                new.insert(key);
            }
            let stored = Stored {
                seq: self.next_seq,
                tag: e.tag,
                time_ns: e.time_ns,
                id: e.id,
                count: e.count,
                record: e.record,
                stored_ns: now,
            };
            format::encode(&stored, &mut buf).map_err(std::io::Error::other)?;
            self.next_seq += 1;
        }
        if buf.is_empty() {
            return Ok(self.next_seq - 1);
        }
        if self.head_len > 0 && self.head_len + buf.len() as u64 > self.segment_bytes {
            self.head += 1;
            self.file = open_segment(&self.dir, self.head)?;
            self.head_len = 0;
        }
        let written = self.file.write_all(&buf).and_then(|_| self.file.sync_data());
        if let Err(e) = written {
            // Nothing of this batch counts: cut the file back to where it was, so a retry
            // (the sender never got its ack) starts clean.
            let _ = self.file.set_len(self.head_len);
            self.next_seq -= buf_records(&buf);
            return Err(e);
        }
        self.head_len += buf.len() as u64;
        self.seen.merge(new);
        Ok(self.next_seq - 1)
    }

    /// The last durable sequence number.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn buf_records(buf: &[u8]) -> u64 {
    let mut at = 0;
    let mut n = 0;
    while let Frame::Record(_, len) = format::decode::<Stored>(&buf[at..]) {
        n += 1;
        at += len;
    }
    n
}

pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("store-{seq:016}.log"))
}

fn open_segment(dir: &Path, seq: u64) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new().create(true).append(true).mode(0o600).open(segment_path(dir, seq))
}

pub fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut seqs: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok()?.strip_prefix("store-")?.strip_suffix(".log")?.parse().ok())
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// Reads a segment from `offset` as a stream; calls `f` with each record and the offset after
/// it. Damaged frames are skipped (logged). Returns the offset where reading stopped: the end,
/// or the start of a frame still being written.
pub fn read_segment(path: &Path, offset: u64, f: &mut dyn FnMut(Stored, u64)) -> std::io::Result<u64> {
    use std::io::{Seek as _, SeekFrom};
    let mut file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(offset),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut frames = Frames::new(file, offset);
    while let Some(next) = frames.next::<Stored>()? {
        match next {
            Next::Record(s, after) => f(s, after),
            Next::Truncated { offset, .. } => return Ok(offset),
            Next::Damaged { offset, reason, skipped } => {
                tracing::warn!(segment = %path.display(), offset, reason, skipped, "damaged store frame skipped");
            }
        }
    }
    Ok(frames.offset())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(id: &str) -> Incoming {
        update(id, 1)
    }

    fn update(id: &str, count: u64) -> Incoming {
        Incoming { tag: "monitor.alert".into(), time_ns: 1, id: Some(id.into()), count, record: vec![0x80] }
    }

    #[test]
    fn stores_each_update_of_an_alert_once() {
        let dir = std::env::temp_dir().join(format!("monitor-store-upd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.append(vec![incoming("a"), update("a", 7), update("a", 7)]).unwrap(), 2);
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.append(vec![update("a", 7), update("a", 9)]).unwrap(), 3);
        let mut seen = Vec::new();
        read_segment(&segment_path(&dir, 1), 0, &mut |s, _| seen.push((s.id.unwrap(), s.count))).unwrap();
        assert_eq!(seen, [("a".into(), 1), ("a".into(), 7), ("a".into(), 9)]);
        fs::remove_dir_all(dir).unwrap();
    }

    fn trace_frame(run: &str, seq: u64) -> Incoming {
        Incoming {
            tag: TRACE_TAG.into(),
            time_ns: 1,
            id: Some(format!("trace:{run}:{seq}")),
            count: 1,
            record: vec![0x80],
        }
    }

    #[test]
    fn stores_each_trace_frame_once_remembering_only_runs() {
        let dir = std::env::temp_dir().join(format!("monitor-store-trace-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir).unwrap();
        let batch = |run: &str, seqs: std::ops::Range<u64>| seqs.map(|n| trace_frame(run, n)).collect::<Vec<_>>();
        assert_eq!(store.append(batch("a", 0..3)).unwrap(), 3);
        // A resend of an unacknowledged batch, then the run goes on; another agent's run.
        assert_eq!(store.append([batch("a", 1..3), batch("a", 3..5), batch("b:1", 0..2)].concat()).unwrap(), 7);
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.seen.trace_runs.len(), 2);
        assert!(store.seen.alerts.is_empty());
        assert_eq!(store.append([batch("a", 4..6), batch("b:1", 0..3)].concat()).unwrap(), 9);
        let mut seen = Vec::new();
        read_segment(&segment_path(&dir, 1), 0, &mut |s, _| seen.push(s.id.unwrap())).unwrap();
        let expected: Vec<String> = ["a:0", "a:1", "a:2", "a:3", "a:4", "b:1:0", "b:1:1", "a:5", "b:1:2"]
            .iter()
            .map(|s| format!("trace:{s}"))
            .collect();
        assert_eq!(seen, expected);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn stores_once_per_alert_id_across_reopens() {
        let dir = std::env::temp_dir().join(format!("monitor-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.append(vec![incoming("a"), incoming("b"), incoming("a")]).unwrap(), 2);
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.append(vec![incoming("b"), incoming("c")]).unwrap(), 3);
        let mut seen = Vec::new();
        read_segment(&segment_path(&dir, 1), 0, &mut |s, _| seen.push((s.seq, s.id.unwrap()))).unwrap();
        assert_eq!(seen, [(1, "a".into()), (2, "b".into()), (3, "c".into())]);
        fs::remove_dir_all(dir).unwrap();
    }
}
