//! File sinks (`jsonl:`, `ocsf:`, `cef:`): one line per record, appended and synced per batch.
//!
//! A sink saves its store position after its destination took a batch. For a file the two
//! writes cannot be one, so a collector killed between them finds, on restart, lines past the
//! position it saved: the batch it is about to deliver again. The sink's saved position carries
//! the file's length after its last batch; the lines past it are compared with the batch as it
//! renders now (rendering is deterministic) and the ones already there are not written twice. A
//! line cut short by the kill is removed first; a tailer (Fluent Bit, Filebeat) only reads whole
//! lines, so it never saw it.

use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::Path,
};

use anyhow::Context as _;

use super::destination::{Destination, Item};
use crate::encode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    Json,
    Ocsf,
    Cef,
}

pub struct LinesFile {
    file: fs::File,
    format: LineFormat,
    /// The file's length after the last batch written.
    end: u64,
    /// Whole lines found past the saved position at open, not yet matched with a batch.
    unconfirmed: Vec<u8>,
}

impl LinesFile {
    /// Opens (creates) `path` for appending. `saved_end` is the file's length recorded with the
    /// sink's position, when there is one.
    pub fn open(path: &Path, format: LineFormat, saved_end: Option<u64>) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir)?;
        }
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)
            .with_context(|| format!("{}", path.display()))?;
        let len = file.metadata()?.len();
        let mut unconfirmed = Vec::new();
        // Shorter than saved: the file was rotated or truncated by someone else; carry on.
        if let Some(saved) = saved_end.filter(|saved| *saved < len) {
            file.seek(SeekFrom::Start(saved))?;
            file.read_to_end(&mut unconfirmed)?;
            let whole = unconfirmed.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            if whole < unconfirmed.len() {
                tracing::warn!(
                    file = %path.display(),
                    bytes = unconfirmed.len() - whole,
                    "removing a line cut short by an earlier stop"
                );
                file.set_len(saved + whole as u64)?;
                file.sync_data()?;
                unconfirmed.truncate(whole);
            }
        }
        let end = file.metadata()?.len();
        Ok(Self { file, format, end, unconfirmed })
    }

    fn render(&self, items: &[Item]) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        for item in items {
            let line = match (item, self.format) {
                (Item::Alert(a), LineFormat::Json) => serde_json::to_vec(a)?,
                (Item::Alert(a), LineFormat::Ocsf) => serde_json::to_vec(&encode::ocsf::finding(a))?,
                (Item::Alert(a), LineFormat::Cef) => encode::cef::line(a).into_bytes(),
                (Item::Other { tag, time_ns, record }, LineFormat::Json) => serde_json::to_vec(&serde_json::json!({
                    "tag": tag, "time": crate::alert::rfc3339(*time_ns), "record": record,
                }))?,
                (Item::Other { .. }, _) => continue,
            };
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
        Ok(out)
    }
}

/// How many leading bytes of `batch` are the whole lines `written` holds, when `written` is
/// exactly the batch's first lines; `None` when it is anything else.
fn already_written(written: &[u8], batch: &[u8]) -> Option<usize> {
    batch.starts_with(written).then_some(written.len())
}

impl Destination for LinesFile {
    fn deliver(&mut self, items: &[Item]) -> anyhow::Result<()> {
        let out = self.render(items)?;
        let unconfirmed = std::mem::take(&mut self.unconfirmed);
        let skip = if unconfirmed.is_empty() {
            0
        } else {
            match already_written(&unconfirmed, &out) {
                Some(n) => {
                    let lines = unconfirmed.iter().filter(|b| **b == b'\n').count();
                    tracing::info!(lines, "lines written before a restart kept, not written again");
                    n
                }
                None => {
                    tracing::warn!(
                        bytes = unconfirmed.len(),
                        "the file has lines past the sink's saved position that are not its next batch; \
                         writing the batch after them"
                    );
                    0
                }
            }
        };
        self.file.write_all(&out[skip..])?;
        self.file.sync_data()?;
        self.end = self.file.metadata()?.len();
        Ok(())
    }

    fn end(&self) -> Option<u64> {
        Some(self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_saved_end_are_matched_with_the_batch() {
        assert_eq!(already_written(b"a\nb\n", b"a\nb\nc\n"), Some(4));
        assert_eq!(already_written(b"a\nb\nc\n", b"a\nb\nc\n"), Some(6));
        assert_eq!(already_written(b"x\n", b"a\nb\n"), None);
        assert_eq!(already_written(b"a\nb\nc\nd\n", b"a\nb\n"), None);
    }

    #[test]
    fn a_batch_interrupted_before_its_position_was_saved_is_not_written_twice() {
        let dir = std::env::temp_dir().join(format!("monitor-lines-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("sink.jsonl");
        let item = |n: u64| Item::Other { tag: "t".into(), time_ns: n, record: serde_json::json!({ "n": n }) };

        let mut sink = LinesFile::open(&path, LineFormat::Json, None).unwrap();
        sink.deliver(&[item(1)]).unwrap();
        let saved = sink.end();
        // The next batch is written, then the collector dies before saving its position, in
        // the middle of one more write.
        sink.deliver(&[item(2), item(3)]).unwrap();
        drop(sink);
        fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"cut").unwrap();

        let mut sink = LinesFile::open(&path, LineFormat::Json, saved).unwrap();
        sink.deliver(&[item(2), item(3), item(4)]).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let ns: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["record"]["n"].as_u64().unwrap())
            .collect();
        assert_eq!(ns, [1, 2, 3, 4]);
        assert_eq!(sink.end(), Some(text.len() as u64));
        fs::remove_dir_all(dir).unwrap();
    }
}
