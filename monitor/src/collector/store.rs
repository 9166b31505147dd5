//! The collector's store: append-only segments of checksummed frames (the trace frame format),
//! each record one received event with a sequence number. A batch is acknowledged to its sender
//! only after it is synced to disk. Alerts are de-duplicated by id and count, so an agent that
//! resends a batch whose ack it never got does not store an alert twice, while each update of
//! a folded finding (same id, a larger count) is stored once; readers take an id's largest
//! count as the alert (see [`latest_alerts`]).

use std::{
    collections::HashSet,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::trace::format::{self, Frame};

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

pub struct Store {
    dir: PathBuf,
    segment_bytes: u64,
    head: u64,
    file: fs::File,
    head_len: u64,
    next_seq: u64,
    ids: HashSet<Version>,
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let segments = segments(dir)?;
        let mut ids = HashSet::new();
        let mut next_seq = 1;
        for seg in &segments {
            read_segment(&segment_path(dir, *seg), 0, &mut |s: Stored, _| {
                next_seq = s.seq + 1;
                if let Some(id) = s.id {
                    ids.insert((id, s.count));
                }
            })?;
        }
        let head = segments.last().copied().unwrap_or(1);
        let file = open_segment(dir, head)?;
        let head_len = file.metadata()?.len();
        Ok(Self { dir: dir.to_path_buf(), segment_bytes: 64 << 20, head, file, head_len, next_seq, ids })
    }

    /// Appends the batch (skipping alerts already stored) and syncs it. Returns the last
    /// sequence number now durable.
    pub fn append(&mut self, batch: Vec<Incoming>) -> std::io::Result<u64> {
        let mut buf = Vec::new();
        let mut new_ids = HashSet::new();
        let now = crate::agent::now_ns();
        for e in batch {
            if let Some(id) = &e.id {
                let version = (id.clone(), e.count);
                if self.ids.contains(&version) || new_ids.contains(&version) {
                    continue;
                }
                new_ids.insert(version);
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
        self.ids.extend(new_ids);
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

/// Reads a segment from `offset`; calls `f` with each record and the offset after it. Damaged
/// frames are skipped (logged). Returns the offset where reading stopped.
pub fn read_segment(path: &Path, offset: u64, f: &mut dyn FnMut(Stored, u64)) -> std::io::Result<u64> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(offset),
        Err(e) => return Err(e),
    };
    let mut at = offset as usize;
    while at < data.len() {
        match format::decode::<Stored>(&data[at..]) {
            Frame::Record(s, len) => {
                at += len;
                f(*s, at as u64);
            }
            Frame::Truncated => break,
            Frame::Bad(reason) => {
                let next = format::next_sync(&data, at + 1).unwrap_or(data.len());
                tracing::warn!(segment = %path.display(), offset = at, reason, skipped = next - at, "damaged store frame skipped");
                at = next;
            }
        }
    }
    Ok(at as u64)
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
