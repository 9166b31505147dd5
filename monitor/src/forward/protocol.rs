//! The Fluent Forward protocol (v1), both ends: EventTime, the Message / Forward / PackedForward /
//! CompressedPackedForward modes, chunk acks, and the shared-key handshake (HELO, PING, PONG).
//! Interop notes (../shared/PEERS.md): the salt travels as a msgpack str; nonces and auth salts
//! from Fluent Bit are str holding non-UTF-8 bytes, so they are handled as bytes.

use std::io::Read as _;

use rmpv::Value;
use sha2::{Digest, Sha512};

/// EventTime: msgpack ext type 0, big-endian seconds and nanoseconds.
pub fn event_time(ns: u64) -> Value {
    let mut data = Vec::with_capacity(8);
    data.extend_from_slice(&((ns / 1_000_000_000) as u32).to_be_bytes());
    data.extend_from_slice(&((ns % 1_000_000_000) as u32).to_be_bytes());
    Value::Ext(0, data)
}

/// A time as Fluent sends it (EventTime, or integer seconds), in ns.
pub fn time_ns(v: &Value) -> Option<u64> {
    match v {
        Value::Ext(0, d) if d.len() == 8 => {
            let s = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as u64;
            let n = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as u64;
            Some(s * 1_000_000_000 + n)
        }
        Value::Integer(i) => i.as_u64().map(|s| s.saturating_mul(1_000_000_000)),
        Value::F64(f) if *f >= 0.0 => Some((*f * 1e9) as u64),
        _ => None,
    }
}

/// One event received: its record as the MessagePack bytes the client sent (a map).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub tag: String,
    pub time_ns: u64,
    pub record: Vec<u8>,
}

impl Entry {
    /// The record, decoded.
    pub fn value(&self) -> Value {
        rmpv::decode::read_value(&mut self.record.as_slice()).unwrap_or(Value::Nil)
    }

    /// A top-level string field of the record (such as an alert's `id`), without decoding it.
    pub fn str_field(&self, key: &str) -> Option<String> {
        str_field(&self.record, key)
    }

    pub fn uint_field(&self, key: &str) -> Option<u64> {
        uint_field(&self.record, key)
    }
}

/// A decoded message from a client: its entries, and the chunk id to ack, if asked.
#[derive(Debug, PartialEq)]
pub struct Message {
    pub entries: Vec<Entry>,
    pub chunk: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    #[error("not a Forward message: {0}")]
    Shape(&'static str),
    #[error("bad gzip data in a CompressedPackedForward message")]
    Gzip,
    #[error("a decompressed batch is larger than {0} bytes")]
    TooLarge(usize),
}

/// What one decompressed PackedForward batch may expand to.
pub const MAX_UNPACKED: usize = 64 << 20;

/// Parses a client message: `[tag, time, record, option?]`, `[tag, [[time, record], ...],
/// option?]`, or `[tag, bin|str (packed entries), option?]` (gzip when option.compressed).
pub fn parse_message(v: Value) -> Result<Message, ProtocolError> {
    let Value::Array(mut items) = v else { return Err(ProtocolError::Shape("not an array")) };
    if items.len() < 2 || items.len() > 4 {
        return Err(ProtocolError::Shape("wrong number of elements"));
    }
    let tag = match &items[0] {
        Value::String(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        _ => return Err(ProtocolError::Shape("tag is not a string")),
    };
    let option_at = match &items[1] {
        Value::Array(_) | Value::Binary(_) | Value::String(_) => 2,
        _ => 3,
    };
    let option = items.get(option_at).cloned();
    let chunk = option.as_ref().and_then(|o| map_get(o, "chunk")).and_then(|c| c.as_str().map(str::to_string));
    let compressed = option.as_ref().and_then(|o| map_get(o, "compressed")).and_then(|c| c.as_str()) == Some("gzip");
    let mut entries = Vec::new();
    match items.swap_remove(1) {
        Value::Array(list) => {
            for e in list {
                entries.push(entry_of(&tag, e)?);
            }
        }
        Value::Binary(bytes) => entries = unpack(&tag, bytes, compressed)?,
        Value::String(s) => entries = unpack(&tag, s.into_bytes(), compressed)?,
        time => {
            if items.len() < 2 {
                return Err(ProtocolError::Shape("message without a record"));
            }
            let record = items.swap_remove(1);
            entries.push(entry_of(&tag, Value::Array(vec![time, record]))?);
        }
    }
    Ok(Message { entries, chunk })
}

fn entry_of(tag: &str, v: Value) -> Result<Entry, ProtocolError> {
    let Value::Array(mut pair) = v else { return Err(ProtocolError::Shape("entry is not [time, record]")) };
    if pair.len() != 2 {
        return Err(ProtocolError::Shape("entry is not [time, record]"));
    }
    let record = pair.pop().unwrap_or(Value::Nil);
    let time_ns = time_ns(&pair[0]).ok_or(ProtocolError::Shape("entry time is not a time"))?;
    if !record.is_map() {
        return Err(ProtocolError::Shape("record is not a map"));
    }
    let mut bytes = Vec::new();
    let _ = rmpv::encode::write_value(&mut bytes, &record);
    Ok(Entry { tag: tag.to_string(), time_ns, record: bytes })
}

/// The entries of a PackedForward stream (msgpack `[time, record]` values back to back).
fn unpack(tag: &str, bytes: Vec<u8>, gzip: bool) -> Result<Vec<Entry>, ProtocolError> {
    let bytes = if gzip {
        let mut out = Vec::new();
        let mut decoder = flate2::read::MultiGzDecoder::new(bytes.as_slice()).take(MAX_UNPACKED as u64 + 1);
        decoder.read_to_end(&mut out).map_err(|_| ProtocolError::Gzip)?;
        if out.len() > MAX_UNPACKED {
            return Err(ProtocolError::TooLarge(MAX_UNPACKED));
        }
        out
    } else {
        bytes
    };
    // Walked without decoding the records: each entry's record bytes are kept as sent.
    let mut entries = Vec::new();
    let mut at = 0;
    let bad = ProtocolError::Shape("bad packed entry");
    while at < bytes.len() {
        let rest = &bytes[at..];
        let (count, header) = array_header(rest).ok_or(ProtocolError::Shape("entry is not [time, record]"))?;
        if count != 2 {
            return Err(ProtocolError::Shape("entry is not [time, record]"));
        }
        let time_len = value_len(&rest[header..]).map_err(|_| bad.clone())?.ok_or(bad.clone())?;
        let time = rmpv::decode::read_value(&mut &rest[header..header + time_len]).map_err(|_| bad.clone())?;
        let time_ns = time_ns(&time).ok_or(ProtocolError::Shape("entry time is not a time"))?;
        let start = header + time_len;
        let record_len = value_len(&rest[start..]).map_err(|_| bad.clone())?.ok_or(bad.clone())?;
        let record = &rest[start..start + record_len];
        if map_header(record).is_none() {
            return Err(ProtocolError::Shape("record is not a map"));
        }
        entries.push(Entry { tag: tag.to_string(), time_ns, record: record.to_vec() });
        at += start + record_len;
    }
    Ok(entries)
}

/// The element count and header length of an array at the start of `b`.
fn array_header(b: &[u8]) -> Option<(usize, usize)> {
    match *b.first()? {
        m @ 0x90..=0x9f => Some(((m & 0x0f) as usize, 1)),
        0xdc => Some((u16::from_be_bytes([*b.get(1)?, *b.get(2)?]) as usize, 3)),
        0xdd => Some((u32::from_be_bytes([*b.get(1)?, *b.get(2)?, *b.get(3)?, *b.get(4)?]) as usize, 5)),
        _ => None,
    }
}

/// The pair count and header length of a map at the start of `b`.
fn map_header(b: &[u8]) -> Option<(usize, usize)> {
    match *b.first()? {
        m @ 0x80..=0x8f => Some(((m & 0x0f) as usize, 1)),
        0xde => Some((u16::from_be_bytes([*b.get(1)?, *b.get(2)?]) as usize, 3)),
        0xdf => Some((u32::from_be_bytes([*b.get(1)?, *b.get(2)?, *b.get(3)?, *b.get(4)?]) as usize, 5)),
        _ => None,
    }
}

/// The bytes of a string at the start of `b`, if it is one.
fn str_at(b: &[u8]) -> Option<&[u8]> {
    let (len, header) = match *b.first()? {
        m @ 0xa0..=0xbf => ((m & 0x1f) as usize, 1),
        0xd9 => (*b.get(1)? as usize, 2),
        0xda => (u16::from_be_bytes([*b.get(1)?, *b.get(2)?]) as usize, 3),
        0xdb => (u32::from_be_bytes([*b.get(1)?, *b.get(2)?, *b.get(3)?, *b.get(4)?]) as usize, 5),
        _ => return None,
    };
    b.get(header..header + len)
}

/// A top-level string field of a MessagePack map, found without decoding the map.
pub fn str_field(map: &[u8], key: &str) -> Option<String> {
    str_at(field(map, key)?).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// An unsigned integer field of a msgpack map (`None` when absent or of another type).
pub fn uint_field(map: &[u8], key: &str) -> Option<u64> {
    rmp_serde::from_slice::<u64>(field(map, key)?).ok()
}

/// The encoded value of `key` in a msgpack map, bounds-checked.
fn field<'a>(map: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let (pairs, mut at) = map_header(map)?;
    for _ in 0..pairs {
        let key_len = value_len(map.get(at..)?).ok()??;
        let value_at = at + key_len;
        let value_len = value_len(map.get(value_at..)?).ok()??;
        if str_at(&map[at..]) == Some(key.as_bytes()) {
            return map.get(value_at..value_at + value_len);
        }
        at = value_at + value_len;
    }
    None
}

/// The length of the MessagePack value at the start of `b`, walked without allocating:
/// `Ok(None)` if `b` holds only part of it, `Err` if it is not MessagePack.
pub fn value_len(b: &[u8]) -> Result<Option<usize>, StreamError> {
    Walk::default().resume(b)
}

/// A walk over one MessagePack value that can stop where the bytes end and resume there when
/// more come, so a large message arriving in many reads is walked once in all (linear), not
/// from its start at every read.
#[derive(Debug, Clone, Copy)]
pub struct Walk {
    /// Where the next element starts.
    at: usize,
    /// Values still to walk: containers add their elements.
    pending: u64,
}

impl Default for Walk {
    fn default() -> Self {
        Walk { at: 0, pending: 1 }
    }
}

impl Walk {
    /// Walks on over `b` (the same bytes as before, maybe more of them): the value's length once
    /// whole, `Ok(None)` while `b` holds only part of it.
    pub fn resume(&mut self, b: &[u8]) -> Result<Option<usize>, StreamError> {
        while self.pending > 0 {
            match element_len(b, self.at)? {
                Some((len, elements)) => {
                    self.at += len;
                    self.pending = (self.pending - 1).saturating_add(elements);
                }
                None => return Ok(None),
            }
        }
        Ok(Some(self.at))
    }
}

/// The length of the element's own bytes at `at` (its header and body, not a container's
/// elements) and how many elements it contains; `Ok(None)` if `b` ends before it does.
fn element_len(b: &[u8], at: usize) -> Result<Option<(usize, u64)>, StreamError> {
    let Some(&m) = b.get(at) else { return Ok(None) };
    let be = |from: usize, n: usize| -> Option<u64> {
        b.get(at + from..at + from + n).map(|s| s.iter().fold(0u64, |acc, x| acc << 8 | *x as u64))
    };
    let (header, body, elements): (usize, Option<u64>, u64) = match m {
        0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (1, Some(0), 0),
        0x80..=0x8f => (1, Some(0), 2 * (m & 0x0f) as u64),
        0x90..=0x9f => (1, Some(0), (m & 0x0f) as u64),
        0xa0..=0xbf => (1, Some((m & 0x1f) as u64), 0),
        0xc1 => return Err(StreamError::Malformed),
        0xc4 | 0xd9 => (2, be(1, 1), 0),
        0xc5 | 0xda => (3, be(1, 2), 0),
        0xc6 | 0xdb => (5, be(1, 4), 0),
        0xc7 => (3, be(1, 1), 0),
        0xc8 => (4, be(1, 2), 0),
        0xc9 => (6, be(1, 4), 0),
        0xca => (1, Some(4), 0),
        0xcb => (1, Some(8), 0),
        0xcc | 0xd0 => (1, Some(1), 0),
        0xcd | 0xd1 => (1, Some(2), 0),
        0xce | 0xd2 => (1, Some(4), 0),
        0xcf | 0xd3 => (1, Some(8), 0),
        0xd4 => (2, Some(1), 0),
        0xd5 => (2, Some(2), 0),
        0xd6 => (2, Some(4), 0),
        0xd7 => (2, Some(8), 0),
        0xd8 => (2, Some(16), 0),
        0xdc => (3, Some(0), be(1, 2).unwrap_or(u64::MAX)),
        0xdd => (5, Some(0), be(1, 4).unwrap_or(u64::MAX)),
        0xde => (3, Some(0), be(1, 2).map_or(u64::MAX, |n| 2 * n)),
        0xdf => (5, Some(0), be(1, 4).map_or(u64::MAX, |n| 2 * n)),
    };
    let Some(body) = body else { return Ok(None) };
    if elements == u64::MAX {
        return Ok(None);
    }
    let len = header.saturating_add(body as usize);
    if at.saturating_add(len) > b.len() {
        return Ok(None);
    }
    Ok(Some((len, elements)))
}

pub fn map_get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key) || k.as_slice() == Some(key.as_bytes())).map(|(_, v)| v)
}

fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Binary(b) => Some(b.clone()),
        _ => None,
    }
}

/// A PackedForward message: `[tag, bin(entries), {"chunk": id, "size": n}]`; each record is a
/// MessagePack map, as bytes.
pub fn packed_forward(tag: &str, entries: &[(u64, &[u8])], chunk: &str) -> Vec<u8> {
    let mut packed = Vec::new();
    for (ns, record) in entries {
        packed.push(0x92);
        let _ = rmpv::encode::write_value(&mut packed, &event_time(*ns));
        packed.extend_from_slice(record);
    }
    let option = Value::Map(vec![
        (Value::from("chunk"), Value::from(chunk)),
        (Value::from("size"), Value::from(entries.len() as u64)),
    ]);
    let message = Value::Array(vec![Value::from(tag), Value::Binary(packed), option]);
    let mut out = Vec::new();
    let _ = rmpv::encode::write_value(&mut out, &message);
    out
}

/// `{"ack": chunk}`.
pub fn ack(chunk: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = rmpv::encode::write_value(&mut out, &Value::Map(vec![(Value::from("ack"), Value::from(chunk))]));
    out
}

/// The chunk id of an ack response.
pub fn ack_of(v: &Value) -> Option<String> {
    map_get(v, "ack").and_then(|a| bytes_of(a)).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Compares a handshake digest in constant time: how long a wrong one takes to refuse says
/// nothing about how much of it was right.
fn same_digest(got: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    got.ct_eq(expected).into()
}

/// hex(SHA-512(parts...)), as the handshake digests are computed.
pub fn sha512_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha512::new();
    for p in parts {
        h.update(p);
    }
    crate::hex::lower(&h.finalize())
}

/// The server's HELO: `["HELO", {"nonce": n, "auth": salt, "keepalive": true}]`.
pub fn helo(nonce: &[u8], auth_salt: &[u8]) -> Vec<u8> {
    let v = Value::Array(vec![
        Value::from("HELO"),
        Value::Map(vec![
            (Value::from("nonce"), Value::Binary(nonce.to_vec())),
            (Value::from("auth"), Value::Binary(auth_salt.to_vec())),
            (Value::from("keepalive"), Value::Boolean(true)),
        ]),
    ]);
    let mut out = Vec::new();
    let _ = rmpv::encode::write_value(&mut out, &v);
    out
}

/// What a HELO asks of the client.
pub struct Helo {
    pub nonce: Vec<u8>,
    /// The user-auth salt; empty when the server does not ask for a user.
    pub auth: Vec<u8>,
}

pub fn parse_helo(v: &Value) -> Option<Helo> {
    let items = v.as_array()?;
    if items.first()?.as_str()? != "HELO" {
        return None;
    }
    let options = items.get(1)?;
    Some(Helo {
        nonce: bytes_of(map_get(options, "nonce")?)?,
        auth: map_get(options, "auth").and_then(bytes_of).unwrap_or_default(),
    })
}

/// The client's PING: `["PING", hostname, salt, hex(sha512(salt + hostname + nonce + key)), "", ""]`.
pub fn ping(hostname: &str, salt: &str, nonce: &[u8], shared_key: &str) -> Vec<u8> {
    let digest = sha512_hex(&[salt.as_bytes(), hostname.as_bytes(), nonce, shared_key.as_bytes()]);
    let v = Value::Array(vec![
        Value::from("PING"),
        Value::from(hostname),
        Value::from(salt),
        Value::from(digest),
        Value::from(""),
        Value::from(""),
    ]);
    let mut out = Vec::new();
    let _ = rmpv::encode::write_value(&mut out, &v);
    out
}

/// A PING checked by the server: the client's hostname and salt, or why it is refused.
pub fn check_ping(v: &Value, nonce: &[u8], shared_key: &str) -> Result<(String, Vec<u8>), &'static str> {
    let items = v.as_array().ok_or("PING is not an array")?;
    if items.len() < 4 || items[0].as_str() != Some("PING") {
        return Err("expected PING");
    }
    let hostname = bytes_of(&items[1]).ok_or("PING hostname")?;
    let salt = bytes_of(&items[2]).ok_or("PING salt")?;
    let digest = bytes_of(&items[3]).ok_or("PING digest")?;
    let expected = sha512_hex(&[&salt, &hostname, nonce, shared_key.as_bytes()]);
    if !same_digest(&digest, expected.as_bytes()) {
        return Err("shared key mismatch");
    }
    Ok((String::from_utf8_lossy(&hostname).into_owned(), salt))
}

/// The server's PONG.
pub fn pong(ok: bool, reason: &str, server: &str, salt: &[u8], nonce: &[u8], shared_key: &str) -> Vec<u8> {
    let digest = if ok { sha512_hex(&[salt, server.as_bytes(), nonce, shared_key.as_bytes()]) } else { String::new() };
    let v = Value::Array(vec![
        Value::from("PONG"),
        Value::Boolean(ok),
        Value::from(reason),
        Value::from(server),
        Value::from(digest),
    ]);
    let mut out = Vec::new();
    let _ = rmpv::encode::write_value(&mut out, &v);
    out
}

/// Checks a PONG: the server knows the key too. `Err` says why not.
pub fn check_pong(v: &Value, salt: &str, nonce: &[u8], shared_key: &str) -> Result<(), String> {
    let items = v.as_array().ok_or("PONG is not an array")?;
    if items.len() < 5 || items[0].as_str() != Some("PONG") {
        return Err("expected PONG".into());
    }
    if items[1].as_bool() != Some(true) {
        let reason = bytes_of(&items[2]).map(|r| String::from_utf8_lossy(&r).into_owned()).unwrap_or_default();
        return Err(format!("the server refused the shared key: {reason}"));
    }
    let server = bytes_of(&items[3]).unwrap_or_default();
    let digest = bytes_of(&items[4]).unwrap_or_default();
    if !same_digest(&digest, sha512_hex(&[salt.as_bytes(), &server, nonce, shared_key.as_bytes()]).as_bytes()) {
        return Err("the server's PONG digest does not match the shared key".into());
    }
    Ok(())
}

/// Incremental reading of msgpack values from a byte stream.
#[derive(Default)]
pub struct ValueBuffer {
    buf: Vec<u8>,
    /// Where the unread bytes start: values read are skipped, not shifted out one by one.
    start: usize,
    /// How far the next value was walked.
    walk: Walk,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StreamError {
    #[error("malformed MessagePack")]
    Malformed,
    #[error("a message larger than {0} bytes")]
    Oversized(usize),
}

impl ValueBuffer {
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held that are not a value read yet.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole value, if the buffer holds one. `max` bounds a value's size.
    pub fn next(&mut self, max: usize) -> Result<Option<Value>, StreamError> {
        if self.is_empty() {
            return Ok(None);
        }
        // Only a whole value is decoded, and a value arriving in many reads is walked once: the
        // walk resumes where the last read's bytes ended.
        let unread = &self.buf[self.start..];
        let Some(len) = self.walk.resume(unread)? else {
            return if unread.len() > max { Err(StreamError::Oversized(max)) } else { Ok(None) };
        };
        if len > max {
            return Err(StreamError::Oversized(max));
        }
        let value =
            rmpv::decode::read_value_with_max_depth(&mut &unread[..len], 64).map_err(|_| StreamError::Malformed)?;
        self.start += len;
        self.walk = Walk::default();
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= self.buf.len() / 2 {
            // Shifted once the read part is the larger: each byte moves a bounded number of times.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> Value {
        Value::Map(vec![(Value::from("n"), Value::from(n))])
    }

    fn encoded(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    #[test]
    fn packed_forward_round_trips_with_its_chunk() {
        let (r1, r2) = (encoded(&record(1)), encoded(&record(2)));
        let bytes = packed_forward("monitor.alert", &[(1_700_000_000_123_456_789, &r1), (5, &r2)], "c1");
        let mut buf = ValueBuffer::default();
        buf.extend(&bytes[..10]);
        assert_eq!(buf.next(1 << 20), Ok(None), "incomplete");
        buf.extend(&bytes[10..]);
        let m = parse_message(buf.next(1 << 20).unwrap().unwrap()).unwrap();
        assert_eq!(m.chunk.as_deref(), Some("c1"));
        assert_eq!(m.entries.len(), 2);
        assert_eq!(m.entries[0].time_ns, 1_700_000_000_123_456_789);
        assert_eq!(m.entries[1].value(), record(2));
        assert_eq!(m.entries[1].str_field("n"), None);
    }

    #[test]
    fn message_and_forward_modes() {
        let msg = Value::Array(vec![Value::from("t"), Value::from(10u64), record(1)]);
        let m = parse_message(msg).unwrap();
        assert_eq!((m.entries[0].time_ns, m.chunk), (10_000_000_000, None));
        let fwd = Value::Array(vec![
            Value::from("t"),
            Value::Array(vec![Value::Array(vec![event_time(7), record(3)])]),
            Value::Map(vec![(Value::from("chunk"), Value::from("x"))]),
        ]);
        let m = parse_message(fwd).unwrap();
        assert_eq!((m.entries[0].time_ns, m.chunk.as_deref()), (7, Some("x")));
    }

    #[test]
    fn gzip_packed_forward() {
        use std::io::Write as _;
        let mut packed = Vec::new();
        rmpv::encode::write_value(&mut packed, &Value::Array(vec![event_time(9), record(4)])).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&packed).unwrap();
        let option = Value::Map(vec![(Value::from("compressed"), Value::from("gzip"))]);
        let m =
            parse_message(Value::Array(vec![Value::from("t"), Value::Binary(gz.finish().unwrap()), option])).unwrap();
        assert_eq!(m.entries[0].value(), record(4));
        let bad = Value::Array(vec![
            Value::from("t"),
            Value::Binary(vec![1, 2, 3]),
            Value::Map(vec![(Value::from("compressed"), Value::from("gzip"))]),
        ]);
        assert_eq!(parse_message(bad), Err(ProtocolError::Gzip));
    }

    #[test]
    fn handshake_digests_check_both_ways() {
        let nonce = [0xffu8, 0x00, 0x80];
        let ping_bytes = ping("agent-1", "salt", &nonce, "k3y");
        let mut buf = ValueBuffer::default();
        buf.extend(&ping_bytes);
        let ping = buf.next(1 << 20).unwrap().unwrap();
        let (host, salt) = check_ping(&ping, &nonce, "k3y").unwrap();
        assert_eq!(host, "agent-1");
        assert_eq!(check_ping(&ping, &nonce, "wrong"), Err("shared key mismatch"));
        buf.extend(&pong(true, "", "collector", &salt, &nonce, "k3y"));
        let pong = buf.next(1 << 20).unwrap().unwrap();
        assert_eq!(check_pong(&pong, "salt", &nonce, "k3y"), Ok(()));
        assert!(check_pong(&pong, "salt", &nonce, "other").is_err());
    }

    #[test]
    fn walks_values_without_decoding_them() {
        let v = Value::Map(vec![
            (Value::from("id"), Value::from("01ABC")),
            (Value::from("nested"), Value::Array(vec![Value::from(1u64), Value::F64(2.5), Value::Ext(0, vec![0; 8])])),
            (Value::from("big"), Value::Binary(vec![7; 70_000])),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &v).unwrap();
        assert_eq!(value_len(&bytes), Ok(Some(bytes.len())));
        for cut in [1, 5, bytes.len() / 2, bytes.len() - 1] {
            assert_eq!(value_len(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(str_field(&bytes, "id").as_deref(), Some("01ABC"));
        assert_eq!(str_field(&bytes, "nested"), None);
        assert_eq!(value_len(&[0xc1]), Err(StreamError::Malformed));
        // A walk resumed over the same bytes, more at a time, ends where a whole walk does.
        for step in [1, 7, 4096] {
            let mut walk = Walk::default();
            let mut end = None;
            for upto in (step..bytes.len() + step).step_by(step) {
                end = walk.resume(&bytes[..upto.min(bytes.len())]).unwrap();
                if end.is_some() {
                    break;
                }
            }
            assert_eq!(end, Some(bytes.len()), "step {step}");
        }
    }

    /// A 16 MiB Forward-mode message (320,000 small entries) arriving 4 KiB at a
    /// time, then several messages in one read: each is read whole and once. Walking from the
    /// start at every read would walk up to 16 MiB 4,096 times.
    #[test]
    fn a_16_mib_message_in_4_kib_reads_is_walked_once() {
        let record = encoded(&Value::Map(vec![(Value::from("alert"), Value::from("x".repeat(40)))]));
        let entries: Vec<Value> = (0..320_000)
            .map(|i| Value::Array(vec![Value::from(i as u64), rmpv::decode::read_value(&mut &record[..]).unwrap()]))
            .collect();
        let message = encoded(&Value::Array(vec![Value::from("monitor.alert"), Value::Array(entries)]));
        assert!(message.len() > 16 << 20, "{}", message.len());
        let started = std::time::Instant::now();
        let mut buf = ValueBuffer::default();
        let mut read = Vec::new();
        for piece in message.chunks(4096) {
            buf.extend(piece);
            while let Some(v) = buf.next(32 << 20).unwrap() {
                read.push(v);
            }
        }
        assert_eq!(read.len(), 1);
        assert!(buf.is_empty());
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
        let small = encoded(&record_value(7));
        let mut many = Vec::new();
        for _ in 0..1000 {
            many.extend_from_slice(&small);
        }
        buf.extend(&many);
        let mut n = 0;
        while buf.next(1 << 20).unwrap().is_some() {
            n += 1;
        }
        assert_eq!((n, buf.len()), (1000, 0));
    }

    fn record_value(n: u64) -> Value {
        record(n)
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        for seed in 0..3000u32 {
            let bytes: Vec<u8> =
                (0..(seed % 200)).map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i * 40503) >> 5) as u8).collect();
            let mut buf = ValueBuffer::default();
            buf.extend(&bytes);
            while let Ok(Some(v)) = buf.next(1 << 16) {
                let _ = parse_message(v);
            }
        }
        let mut buf = ValueBuffer::default();
        buf.extend(&[0xdb, 0xff, 0xff, 0xff, 0xff]); // a str claiming 4 GiB
        buf.extend(&[0u8; 100]);
        assert_eq!(buf.next(64), Err(StreamError::Oversized(64)));
    }
}
