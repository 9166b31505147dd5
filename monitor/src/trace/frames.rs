//! Reading framed records from a file as a stream: a window of the file in memory (a few
//! frames, at most one frame over `MAX_FRAME`), never the whole file. The trace reader, the
//! collector's store and the agent's spool all read their segments through it, so a reader's
//! memory does not grow with what is stored.

use std::io::Read;

use super::format::{self, Frame, FRAME_HEADER_LEN, MAX_FRAME};

/// Bytes read from the file at a time.
const CHUNK: usize = 1 << 20;

/// What a [`Frames`] reader met next.
#[derive(Debug)]
pub enum Next<T> {
    /// A good record, and the file offset just after its frame.
    Record(T, u64),
    /// A damaged stretch starting at `offset`: `skipped` bytes up to the next good frame (or the
    /// end of the file).
    Damaged { offset: u64, reason: &'static str, skipped: u64 },
    /// Fewer bytes than a whole frame at `offset`, then the end of the file: the end of a
    /// segment still being written, or a cut. Nothing more follows.
    Truncated { offset: u64, remaining: u64 },
}

/// Frames read from `src` starting at file offset `start`.
pub struct Frames<R> {
    src: R,
    /// The bytes from file offset `base` on, as far as read.
    window: Vec<u8>,
    base: u64,
    /// The file offset of the next frame.
    at: u64,
    eof: bool,
}

impl<R: Read> Frames<R> {
    /// `src` must be positioned at file offset `start`.
    pub fn new(src: R, start: u64) -> Self {
        Self { src, window: Vec::new(), base: start, at: start, eof: false }
    }

    /// The file offset of the next frame.
    pub fn offset(&self) -> u64 {
        self.at
    }

    /// The next record or damage; `None` at the end of the file.
    pub fn next<T: serde::de::DeserializeOwned>(&mut self) -> std::io::Result<Option<Next<T>>> {
        if self.available(self.at, FRAME_HEADER_LEN)?.is_empty() {
            return Ok(None);
        }
        let start = self.at;
        match self.frame_at::<T>(start)? {
            Frame::Record(record, len) => {
                self.at = start + len as u64;
                Ok(Some(Next::Record(*record, self.at)))
            }
            Frame::Truncated => {
                let remaining = self.available(start, MAX_FRAME + FRAME_HEADER_LEN)?.len() as u64;
                self.at = start + remaining;
                Ok(Some(Next::Truncated { offset: start, remaining }))
            }
            Frame::Bad(reason) => {
                let next = self.resync::<T>(start + 1)?;
                self.at = next;
                Ok(Some(Next::Damaged { offset: start, reason, skipped: next - start }))
            }
        }
    }

    /// Decodes the frame at `offset`, reading as much of the file as its header says it needs.
    fn frame_at<T: serde::de::DeserializeOwned>(&mut self, offset: u64) -> std::io::Result<Frame<T>> {
        let header = self.available(offset, FRAME_HEADER_LEN)?;
        let need = match header.get(4..8) {
            Some(len) => FRAME_HEADER_LEN + (u32::from_le_bytes(len.try_into().unwrap()) as usize).min(MAX_FRAME + 1),
            None => FRAME_HEADER_LEN,
        };
        Ok(format::decode::<T>(self.available(offset, need)?))
    }

    /// The offset of the next frame after `from` that decodes whole, or the end of the file.
    fn resync<T: serde::de::DeserializeOwned>(&mut self, mut from: u64) -> std::io::Result<u64> {
        loop {
            let bytes = self.available(from, CHUNK)?;
            if bytes.len() < 4 {
                return Ok(from + bytes.len() as u64);
            }
            let Some(found) = format::next_sync(bytes, 0) else {
                // The last 3 bytes may start a sync word that the next chunk completes.
                from += (bytes.len() - 3) as u64;
                continue;
            };
            let candidate = from + found as u64;
            if let Frame::Record(..) = self.frame_at::<T>(candidate)? {
                return Ok(candidate);
            }
            from = candidate + 1;
        }
    }

    /// Up to `len` bytes of the file from `offset` (fewer at its end). Offsets before the
    /// current window are not asked for: readers only move forward.
    fn available(&mut self, offset: u64, len: usize) -> std::io::Result<&[u8]> {
        debug_assert!(offset >= self.base);
        let skip = (offset - self.base) as usize;
        if skip >= self.window.len() {
            // Past everything held: drop it, and skip the file forward if the offset is beyond.
            let beyond = (skip - self.window.len()) as u64;
            self.window.clear();
            self.base = offset - beyond;
            if beyond > 0 {
                std::io::copy(&mut (&mut self.src).take(beyond), &mut std::io::sink())?;
                self.base = offset;
            }
        } else if skip > 0 && self.window.len() - skip < len {
            // About to read more: let go of what is behind the offset first.
            self.window.drain(..skip);
            self.base = offset;
        }
        let skip = (offset - self.base) as usize;
        while self.window.len() < skip + len && !self.eof {
            let want = (skip + len - self.window.len()).max(CHUNK);
            let before = self.window.len();
            (&mut self.src).take(want as u64).read_to_end(&mut self.window)?;
            if self.window.len() - before < want {
                self.eof = true;
            }
        }
        let end = self.window.len().min(skip + len);
        Ok(&self.window[skip.min(end)..end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use crate::trace::Record;

    fn tick(ts: u64) -> Record {
        Record::Event(Event::Tick { ts })
    }

    fn all(bytes: &[u8], start: u64) -> Vec<String> {
        let mut frames = Frames::new(&bytes[start as usize..], start);
        let mut out = Vec::new();
        while let Some(next) = frames.next::<Record>().unwrap() {
            out.push(match next {
                Next::Record(Record::Event(Event::Tick { ts }), after) => format!("tick {ts} -> {after}"),
                Next::Record(..) => "other".into(),
                Next::Damaged { offset, reason, skipped } => {
                    format!("damaged at {offset} ({reason}), {skipped} skipped")
                }
                Next::Truncated { offset, remaining } => format!("truncated at {offset}, {remaining} left"),
            });
        }
        out
    }

    #[test]
    fn reads_frames_resumes_after_damage_and_reports_a_cut() {
        let mut buf = Vec::new();
        for ts in 1..=3 {
            encode(&tick(ts), &mut buf);
        }
        let frame = buf.len() as u64 / 3;
        buf[frame as usize + FRAME_HEADER_LEN + 1] ^= 0xff;
        buf.truncate(buf.len() - 2);
        assert_eq!(
            all(&buf, 0),
            [
                format!("tick 1 -> {frame}"),
                format!("damaged at {frame} (checksum mismatch), {} skipped", buf.len() as u64 - frame),
            ]
        );
        let mut whole = Vec::new();
        for ts in 1..=3 {
            encode(&tick(ts), &mut whole);
        }
        whole[frame as usize + FRAME_HEADER_LEN + 1] ^= 0xff;
        assert_eq!(
            all(&whole, frame),
            [format!("damaged at {frame} (checksum mismatch), {frame} skipped"), format!("tick 3 -> {}", 3 * frame)]
        );
        whole.truncate(whole.len() - 2);
        assert_eq!(all(&whole, 2 * frame), [format!("truncated at {}, {} left", 2 * frame, frame - 2)]);
    }

    #[test]
    fn a_long_file_is_read_in_a_window_not_whole() {
        // Frames over several chunks, with garbage longer than a chunk in the middle.
        let mut buf = Vec::new();
        let mut n = 0u64;
        while buf.len() < 3 * CHUNK {
            n += 1;
            encode(&tick(n), &mut buf);
        }
        let garbage_at = buf.len() as u64;
        buf.extend(std::iter::repeat_n(0x46u8, CHUNK + 5));
        encode(&tick(n + 1), &mut buf);
        let mut frames = Frames::new(buf.as_slice(), 0);
        let (mut ticks, mut damaged, mut widest) = (0, Vec::new(), 0);
        while let Some(next) = frames.next::<Record>().unwrap() {
            widest = widest.max(frames.window.capacity());
            match next {
                Next::Record(..) => ticks += 1,
                Next::Damaged { offset, skipped, .. } => damaged.push((offset, skipped)),
                Next::Truncated { .. } => panic!("no cut"),
            }
        }
        assert_eq!(ticks, n + 1);
        assert_eq!(damaged, [(garbage_at, CHUNK as u64 + 5)]);
        assert!(widest <= 4 * CHUNK, "window grew to {widest} bytes");
    }

    fn encode(record: &Record, out: &mut Vec<u8>) {
        format::encode(record, out).unwrap();
    }
}
