//! HTTP/2 requests from the client side of a connection (h2 over TLS, h2c, gRPC): the frame
//! stream is reassembled from the writes the probes captured, header blocks (HEADERS and
//! CONTINUATION frames) are decoded with HPACK, one decoder per connection, fed every block of
//! the connection in order from its preface, so fields indexed against earlier blocks resolve.
//!
//! Only the outbound direction is decoded: requests carry the credentials. Hardening, since the
//! bytes come from any process on the host:
//! - every buffer is bounded (a frame of a header block, a whole block, the dynamic table, the
//!   number of connections followed);
//! - a block that fails to decode, a frame that breaks the protocol, or bytes the capture did not
//!   hold where a header block was (a cut write, a TCP gap) end the following of that connection:
//!   its decoder is dropped, never reused with a table that may have taken half a block, and the
//!   loss is reported ([`Feed::lost`]);
//! - nothing here panics on any input (the unit tests feed it garbage).

use std::collections::HashMap;

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
#[cfg(test)]
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PUSH_PROMISE: u8 = 5;
const CONTINUATION: u8 = 9;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Larger header frames or blocks than this end the following of the connection (real clients
/// send a few KiB; the default SETTINGS_MAX_HEADER_LIST_SIZE of servers is 8-64 KiB).
const MAX_BLOCK: usize = 64 * 1024;
/// The largest dynamic table a client's encoder may announce before its decoder is dropped.
const MAX_TABLE: usize = 64 * 1024;
/// Connections followed at once; the least recently written is forgotten past this.
const MAX_CONNECTIONS: usize = 4096;

/// One connection of one process: the `SSL *` for TLS, the socket cookie for plaintext TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub pid: u32,
    pub conn: u64,
}

/// One decoded header block: the fields in order, values raw (they may be secrets: turn them
/// into fingerprints and drop them).
pub type HeaderList = Vec<(Vec<u8>, Vec<u8>)>;

/// What one captured write gave.
#[derive(Debug, Default)]
pub struct Feed {
    pub blocks: Vec<HeaderList>,
    /// Why the connection stopped being followed, when it did with this write.
    pub lost: Option<&'static str>,
}

/// The HTTP/2 connections being followed.
#[derive(Default)]
pub struct Connections {
    conns: HashMap<ConnId, Conn>,
    /// Bumped at each write: the least recent connection goes first when there are too many.
    clock: u64,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections").field("followed", &self.conns.len()).finish()
    }
}

struct Conn {
    decoder: loona_hpack::Decoder<'static>,
    /// TCP: the sequence number of the next byte expected.
    next_seq: Option<u32>,
    /// Bytes of the preface still to come.
    preface_left: usize,
    /// The frame header being read.
    head: Vec<u8>,
    /// Payload bytes of the current frame that are skipped (not part of a header block).
    skip: usize,
    /// The current header frame's payload, while it is read.
    frame: Option<HeaderFrame>,
    /// A header block waiting for its CONTINUATION frames.
    block: Option<Vec<u8>>,
    last_write: u64,
}

struct HeaderFrame {
    kind: u8,
    flags: u8,
    len: usize,
    payload: Vec<u8>,
}

impl Connections {
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Forgets a connection (it is known to be something else now).
    pub fn forget(&mut self, id: ConnId) {
        self.conns.remove(&id);
    }

    /// Feeds one captured write: `data` is what the capture holds of it, `total` its whole
    /// length; `seq` the TCP sequence number of its first byte (`None` for TLS writes, which
    /// come whole and in order).
    pub fn feed(&mut self, id: ConnId, seq: Option<u32>, data: &[u8], total: usize) -> Feed {
        self.clock += 1;
        let starts_connection = data.starts_with(&PREFACE[..4]);
        if starts_connection {
            if !self.conns.contains_key(&id) && self.conns.len() >= MAX_CONNECTIONS {
                self.forget_least_recent();
            }
            // A preface always starts anew: the `SSL *` or cookie was reused.
            self.conns.insert(id, Conn::new(seq));
        }
        let Some(conn) = self.conns.get_mut(&id) else {
            // Not followed: it started before the agent, or was dropped after a loss.
            return Feed::default();
        };
        conn.last_write = self.clock;
        let mut feed = Feed::default();
        let (data, total) = match conn.in_order(seq, data, total) {
            Ok(Some(fresh)) => fresh,
            Ok(None) => return feed, // a retransmission
            Err(why) => {
                self.conns.remove(&id);
                feed.lost = Some(why);
                return feed;
            }
        };
        let result = conn.consume(data, &mut feed.blocks).and_then(|()| conn.skip_unseen(total - data.len()));
        if let Err(why) = result {
            self.conns.remove(&id);
            feed.lost = Some(why);
        }
        feed
    }

    fn forget_least_recent(&mut self) {
        if let Some(oldest) = self.conns.iter().min_by_key(|(_, c)| c.last_write).map(|(id, _)| *id) {
            self.conns.remove(&oldest);
        }
    }
}

impl Conn {
    fn new(seq: Option<u32>) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE);
        Conn {
            decoder,
            next_seq: seq,
            preface_left: PREFACE.len(),
            head: Vec::with_capacity(FRAME_HEADER),
            skip: 0,
            frame: None,
            block: None,
            last_write: 0,
        }
    }

    /// The part of a TCP segment not seen before (`None`: all of it was: a retransmission), or
    /// an error for a gap (bytes the hook never saw).
    fn in_order<'d>(
        &mut self,
        seq: Option<u32>,
        data: &'d [u8],
        total: usize,
    ) -> Result<Option<(&'d [u8], usize)>, &'static str> {
        let (Some(seq), Some(next)) = (seq, self.next_seq) else { return Ok(Some((data, total))) };
        let end = seq.wrapping_add(total as u32);
        // Sequence numbers wrap: compare by signed distance (RFC 1982 style).
        let ahead = |a: u32, b: u32| (a.wrapping_sub(b) as i32) > 0;
        if ahead(seq, next) {
            return Err("a TCP segment of the connection was not seen");
        }
        if !ahead(end, next) {
            return Ok(None);
        }
        let already = next.wrapping_sub(seq) as usize;
        self.next_seq = Some(end);
        if already == 0 {
            return Ok(Some((data, total)));
        }
        // A retransmission that also carries new bytes: keep only those.
        if already > data.len() {
            // The new bytes start past what the capture holds of this segment.
            return self.skip_unseen(total - already).map(|()| Some((&data[..0], 0)));
        }
        Ok(Some((&data[already..], total - already)))
    }

    /// Walks the frames in `data`, decoding each complete header block into `blocks`.
    fn consume(&mut self, mut data: &[u8], blocks: &mut Vec<HeaderList>) -> Result<(), &'static str> {
        while !data.is_empty() {
            if self.preface_left > 0 {
                let at = PREFACE.len() - self.preface_left;
                let n = self.preface_left.min(data.len());
                if data[..n] != PREFACE[at..at + n] {
                    return Err("not an HTTP/2 client preface");
                }
                self.preface_left -= n;
                data = &data[n..];
            } else if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
            } else if let Some(frame) = &mut self.frame {
                let n = (frame.len - frame.payload.len()).min(data.len());
                frame.payload.extend_from_slice(&data[..n]);
                data = &data[n..];
                if frame.payload.len() == frame.len {
                    let frame = self.frame.take().ok_or("frame state")?;
                    self.header_frame(frame, blocks)?;
                }
            } else {
                let n = (FRAME_HEADER - self.head.len()).min(data.len());
                self.head.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.head.len() == FRAME_HEADER {
                    self.frame_header()?;
                }
            }
        }
        Ok(())
    }

    fn frame_header(&mut self) -> Result<(), &'static str> {
        let h = std::mem::take(&mut self.head);
        let len = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
        let (kind, flags) = (h[3], h[4]);
        // RFC 9113 §6.10: once a block is open, only its CONTINUATION frames may follow.
        if self.block.is_some() != (kind == CONTINUATION) {
            return Err("a header block interrupted, or a CONTINUATION frame without one");
        }
        match kind {
            HEADERS | CONTINUATION | PUSH_PROMISE => {
                if len > MAX_BLOCK {
                    return Err("a header frame over the size followed");
                }
                let frame = HeaderFrame { kind, flags, len, payload: Vec::with_capacity(len) };
                if len == 0 {
                    let mut none = Vec::new();
                    return self.header_frame(frame, &mut none);
                }
                self.frame = Some(frame);
            }
            // DATA, SETTINGS, PING, WINDOW_UPDATE, RST_STREAM, GOAWAY, PRIORITY, unknown types.
            _ => self.skip = len,
        }
        Ok(())
    }

    /// A header frame read whole: its fragment joins the block, decoded at END_HEADERS.
    fn header_frame(&mut self, frame: HeaderFrame, blocks: &mut Vec<HeaderList>) -> Result<(), &'static str> {
        let mut fragment = &frame.payload[..];
        if frame.kind != CONTINUATION {
            if frame.flags & FLAG_PADDED != 0 {
                let (&pad, rest) = fragment.split_first().ok_or("padding length missing")?;
                fragment = rest
                    .get(..rest.len().checked_sub(pad as usize).ok_or("padding longer than the frame")?)
                    .ok_or("padding")?;
            }
            if frame.kind == HEADERS && frame.flags & FLAG_PRIORITY != 0 {
                fragment = fragment.get(5..).ok_or("priority fields missing")?;
            }
            if frame.kind == PUSH_PROMISE {
                // Sent by servers only; a client's block is skipped but must still be decoded
                // to keep the table in step.
                fragment = fragment.get(4..).ok_or("promised stream id missing")?;
            }
        }
        let block = self.block.get_or_insert_with(Vec::new);
        if block.len() + fragment.len() > MAX_BLOCK {
            return Err("a header block over the size followed");
        }
        block.extend_from_slice(fragment);
        if frame.flags & FLAG_END_HEADERS == 0 {
            return Ok(());
        }
        let block = self.block.take().unwrap_or_default();
        let mut fields = Vec::new();
        self.decoder
            .decode_with_cb(&block, |name, value| fields.push((name.into_owned(), value.into_owned())))
            .map_err(|_| "a header block that does not decode")?;
        if frame.kind != PUSH_PROMISE {
            blocks.push(fields);
        }
        Ok(())
    }

    /// Accounts for `unseen` bytes past the capture: harmless inside a skipped payload, a loss
    /// anywhere else.
    fn skip_unseen(&mut self, unseen: usize) -> Result<(), &'static str> {
        if unseen == 0 {
            return Ok(());
        }
        if self.preface_left == 0 && self.frame.is_none() && self.head.is_empty() && self.skip >= unseen {
            self.skip -= unseen;
            return Ok(());
        }
        Err("a write was captured only in part, and the part left out was not a DATA payload")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn encode(encoder: &mut loona_hpack::Encoder, fields: &[(&str, &str)]) -> Vec<u8> {
        encoder.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    fn request(token: &str) -> Vec<(&'static str, String)> {
        vec![
            (":method", "GET".into()),
            (":scheme", "https".into()),
            (":authority", "api.example:8443".into()),
            (":path", "/v1/items?x=1".into()),
            ("authorization", format!("Bearer {token}")),
        ]
    }

    fn names(block: &HeaderList) -> Vec<(String, String)> {
        block
            .iter()
            .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    const ID: ConnId = ConnId { pid: 7, conn: 0xabc };

    fn connection_bytes(requests: usize) -> (Vec<u8>, Vec<usize>) {
        let mut encoder = loona_hpack::Encoder::new();
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
        let mut block_ends = Vec::new();
        for i in 0..requests {
            let fields = request(&format!("tok-{}", i % 2));
            let refs: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let block = encode(&mut encoder, &refs);
            // Split the block over HEADERS + CONTINUATION to exercise both.
            let (a, b) = block.split_at(block.len() / 2);
            bytes.extend(frame(HEADERS, FLAG_PRIORITY, 1 + 2 * i as u32, &[&[0, 0, 0, 0, 16][..], a].concat()));
            bytes.extend(frame(CONTINUATION, FLAG_END_HEADERS, 1 + 2 * i as u32, b));
            block_ends.push(bytes.len());
            bytes.extend(frame(DATA, 1, 1 + 2 * i as u32, &[b'x'; 300]));
        }
        (bytes, block_ends)
    }

    #[test]
    fn blocks_decode_in_order_across_any_split_of_the_writes() {
        let (bytes, _) = connection_bytes(4);
        for chunk in [1, 2, 7, 9, 10, 64, 1000, bytes.len()] {
            let mut conns = Connections::default();
            let mut blocks = Vec::new();
            // The first write holds at least the preface's start: the probes look for it there.
            let (first, rest) = bytes.split_at(chunk.max(4));
            for part in std::iter::once(first).chain(rest.chunks(chunk)) {
                let feed = conns.feed(ID, None, part, part.len());
                assert!(feed.lost.is_none(), "chunk {chunk}: {:?}", feed.lost);
                blocks.extend(feed.blocks);
            }
            assert_eq!(blocks.len(), 4, "chunk {chunk}");
            for (i, block) in blocks.iter().enumerate() {
                let fields = names(block);
                assert_eq!(fields[2], (":authority".into(), "api.example:8443".into()));
                // Indexed fields (the repeated token) resolve against the earlier blocks.
                assert_eq!(fields[4], ("authorization".into(), format!("Bearer tok-{}", i % 2)));
            }
        }
    }

    #[test]
    fn a_connection_seen_from_its_middle_is_not_followed() {
        let (bytes, _) = connection_bytes(2);
        let mut conns = Connections::default();
        let feed = conns.feed(ID, None, &bytes[40..], bytes.len() - 40);
        assert!(feed.blocks.is_empty() && feed.lost.is_none());
        assert!(conns.is_empty());
    }

    #[test]
    fn tcp_retransmissions_are_read_once_and_gaps_end_the_following() {
        let (bytes, _) = connection_bytes(3);
        let seq0 = u32::MAX - 50; // wraps inside the stream
        let mut conns = Connections::default();
        let mut blocks = 0;
        let mut at = 0;
        for part in bytes.chunks(100) {
            let seq = seq0.wrapping_add(at as u32);
            blocks += conns.feed(ID, Some(seq), part, part.len()).blocks.len();
            // The same segment again, and one that overlaps it and the next.
            blocks += conns.feed(ID, Some(seq), part, part.len()).blocks.len();
            let overlap = &bytes[at + part.len() / 2..(at + part.len() + 30).min(bytes.len())];
            let overlap_seq = seq.wrapping_add((part.len() / 2) as u32);
            blocks += conns.feed(ID, Some(overlap_seq), overlap, overlap.len()).blocks.len();
            at += part.len();
        }
        assert_eq!(blocks, 3);
        // A gap: the connection is dropped, and says why.
        let (bytes, _) = connection_bytes(2);
        let mut conns = Connections::default();
        conns.feed(ID, Some(1000), &bytes[..30], 30);
        let feed = conns.feed(ID, Some(1100), &bytes[130..], bytes.len() - 130);
        assert!(feed.lost.is_some());
        assert!(conns.feed(ID, Some(1100 + 20), &bytes[150..], bytes.len() - 150).blocks.is_empty());
    }

    #[test]
    fn a_capture_cut_in_a_data_payload_keeps_the_connection_one_cut_in_a_block_drops_it() {
        let (bytes, ends) = connection_bytes(2);
        let mut conns = Connections::default();
        // First write: up to the end of the first block plus 10 bytes of its DATA frame header
        // and payload; the rest of that DATA frame "was not captured".
        let first = ends[0] + FRAME_HEADER + 10;
        let feed = conns.feed(ID, None, &bytes[..first], ends[0] + FRAME_HEADER + 300);
        assert_eq!(feed.blocks.len(), 1);
        assert!(feed.lost.is_none());
        let rest = &bytes[ends[0] + FRAME_HEADER + 300..];
        assert_eq!(conns.feed(ID, None, rest, rest.len()).blocks.len(), 1);
        // Cut inside a header block.
        let mut conns = Connections::default();
        let feed = conns.feed(ID, None, &bytes[..ends[0] - 5], ends[0]);
        assert!(feed.blocks.is_empty());
        assert!(feed.lost.is_some());
        assert!(conns.is_empty());
    }

    #[test]
    fn a_block_that_does_not_decode_drops_the_decoder_and_a_new_preface_starts_again() {
        let mut conns = Connections::default();
        let mut bytes = PREFACE.to_vec();
        // Index 200 refers to nothing: the dynamic table is empty.
        bytes.extend(frame(HEADERS, FLAG_END_HEADERS, 1, &[0x80 | 0x7f, 200 - 127]));
        let feed = conns.feed(ID, None, &bytes, bytes.len());
        assert!(feed.blocks.is_empty());
        assert_eq!(feed.lost, Some("a header block that does not decode"));
        assert!(conns.is_empty());
        let (good, _) = connection_bytes(1);
        assert_eq!(conns.feed(ID, None, &good, good.len()).blocks.len(), 1);
    }

    #[test]
    fn protocol_errors_and_oversized_frames_are_losses_not_panics() {
        let cases: Vec<Vec<u8>> = vec![
            [PREFACE, &frame(CONTINUATION, FLAG_END_HEADERS, 1, b"x")].concat(),
            [PREFACE, &frame(HEADERS, 0, 1, &[0x82]), &frame(DATA, 0, 1, b"x")].concat(),
            [PREFACE, &frame(HEADERS, FLAG_PADDED | FLAG_END_HEADERS, 1, &[9, 0x82])].concat(),
            [PREFACE, &frame(HEADERS, FLAG_PRIORITY | FLAG_END_HEADERS, 1, &[0, 0])].concat(),
            [PREFACE, &[0xff, 0xff, 0xff, HEADERS, 0, 0, 0, 0, 1][..]].concat(),
            [&b"PRI * HTTP/1.1\r\n"[..]].concat(),
        ];
        for (i, case) in cases.iter().enumerate() {
            let mut conns = Connections::default();
            let feed = conns.feed(ID, None, case, case.len());
            assert!(feed.blocks.is_empty() && feed.lost.is_some(), "case {i}");
        }
        // A size update over the bound followed.
        let mut conns = Connections::default();
        let mut update = vec![0x3f];
        let mut n = MAX_TABLE * 4 - 31;
        while n >= 128 {
            update.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        update.push(n as u8);
        update.push(0x82);
        let bytes = [PREFACE, &frame(HEADERS, FLAG_END_HEADERS, 1, &update)].concat();
        assert!(conns.feed(ID, None, &bytes, bytes.len()).lost.is_some());
    }

    #[test]
    fn garbage_after_a_preface_never_panics() {
        for seed in 0..3000u32 {
            let mut conns = Connections::default();
            let noise: Vec<u8> =
                (0..(seed % 400)).map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 40503) >> 9) as u8).collect();
            let mut bytes = PREFACE.to_vec();
            // Mostly well-formed frame headers around random payloads, to reach the decoder.
            for (i, chunk) in noise.chunks(1 + (seed % 37) as usize).enumerate() {
                let kind = [HEADERS, CONTINUATION, DATA, 4][(i + seed as usize) % 4];
                bytes.extend(frame(kind, (seed >> 3) as u8 & 0x2d, 1, chunk));
            }
            for part in bytes.chunks(1 + (seed % 50) as usize) {
                let total = part.len() + (seed % 3) as usize;
                let _ = conns.feed(ID, Some(seed.wrapping_mul(7)), part, total);
            }
        }
    }

    #[test]
    fn too_many_connections_forget_the_least_recent() {
        let (bytes, _) = connection_bytes(1);
        let mut conns = Connections::default();
        for conn in 0..(MAX_CONNECTIONS as u64 + 10) {
            conns.feed(ConnId { pid: 1, conn }, None, &bytes[..30], 30);
        }
        assert_eq!(conns.len(), MAX_CONNECTIONS);
    }
}
