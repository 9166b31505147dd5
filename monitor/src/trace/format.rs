//! The trace file format, version 1 (documented in docs/trace-format.md).
//!
//! A segment file starts with a 16-byte header: the magic `MONTRACE`, the format version (u16
//! LE), 6 reserved zero bytes. Then frames, each:
//!
//! ```text
//! sync   u32 LE  0x4D4F4E46 ("FNOM" on disk): lets a reader find the next frame after damage
//! len    u32 LE  length of the payload, at most MAX_FRAME
//! crc    u32 LE  CRC-32 (IEEE) of the payload
//! payload        one Record in MessagePack, maps with field names (rmp-serde `to_vec_named`)
//! ```
//!
//! A reader that meets a bad frame (wrong sync, impossible length, checksum mismatch, payload
//! that does not decode, or a frame cut short) reports its offset, scans forward for the next
//! sync word whose frame checks out, and says how many bytes it skipped.

use serde::{Deserialize, Serialize};

use crate::{alert::Alert, engine::EngineConfig, event::Event};

pub const MAGIC: &[u8; 8] = b"MONTRACE";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;
pub const SYNC: u32 = 0x4D4F_4E46;
pub const FRAME_HEADER_LEN: usize = 12;
/// No record is near this; a larger length is damage.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// One trace record.
/// Externally tagged (`{"event": {...}}`): the events inside are internally tagged already, and
/// a second internal tag would make the decoder buffer every record twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// First record of every segment: which agent run the following records belong to, and the
    /// engine configuration they were evaluated with (replay without `--policy` uses it).
    Run(RunInfo),
    /// An event, in the order the engine applied it.
    Event(Event),
    /// An alert the engine raised live, right after the event that raised it.
    Alert(TracedAlert),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Unique per agent start: session keys are only meaningful within one run.
    pub run_id: String,
    pub host: String,
    pub agent_version: String,
    pub config: EngineConfig,
}

/// The same records, borrowed: what the agent writes without copying each event. Serializes
/// exactly as [`Record`] (externally tagged by the same variant names; the enum's own name is
/// not written).
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordRef<'a> {
    Run(&'a RunInfo),
    Event(&'a Event),
    Alert(TracedAlertRef<'a>),
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct TracedAlertRef<'a> {
    pub ts: u64,
    pub alert: &'a Alert,
}

/// An alert with its event time (the alert's own `ts` is not serialized in outputs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TracedAlert {
    pub ts: u64,
    pub alert: Alert,
}

/// The segment header.
pub fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HeaderError {
    #[error("not a monitor trace (no MONTRACE header)")]
    NotATrace,
    #[error("trace format version {found}; this monitor reads version {VERSION} and older: use a newer monitor")]
    NewerVersion { found: u16 },
}

/// Checks a segment header; returns the version.
pub fn check_header(bytes: &[u8]) -> Result<u16, HeaderError> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(HeaderError::NotATrace);
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version > VERSION || version == 0 {
        return Err(HeaderError::NewerVersion { found: version });
    }
    Ok(version)
}

/// Maps with field names, and the human-readable forms of addresses: the records are
/// internally tagged enums, which serde decodes through a buffer that reads addresses only in
/// their text form.
fn payload_serializer(
    out: &mut Vec<u8>,
) -> rmp_serde::Serializer<&mut Vec<u8>, impl rmp_serde::config::SerializerConfig> {
    rmp_serde::Serializer::new(out).with_struct_map().with_human_readable()
}

/// Appends one framed record to `out` (trace records here; the agent's spool and the
/// collector's store frame their records the same way).
pub fn encode<T: Serialize>(record: &T, out: &mut Vec<u8>) -> Result<(), rmp_serde::encode::Error> {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    record.serialize(&mut payload_serializer(out))?;
    let payload = &out[start + FRAME_HEADER_LEN..];
    let (len, crc) = (payload.len() as u32, crc32fast::hash(payload));
    out[start..start + 4].copy_from_slice(&SYNC.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// What is at an offset of a segment's frame area.
#[derive(Debug)]
pub enum Frame<T = Record> {
    /// A good record and the length of its frame.
    Record(Box<T>, usize),
    /// Fewer bytes than a whole frame: the end of a segment being written, or a cut.
    Truncated,
    /// Not a good frame, for this reason.
    Bad(&'static str),
}

/// Decodes the frame at the start of `bytes`.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Frame<T> {
    if bytes.len() < FRAME_HEADER_LEN {
        return Frame::Truncated;
    }
    let word = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    if word(0) != SYNC {
        return Frame::Bad("no frame sync word");
    }
    let len = word(4) as usize;
    if len > MAX_FRAME {
        return Frame::Bad("impossible frame length");
    }
    let Some(payload) = bytes.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else { return Frame::Truncated };
    if crc32fast::hash(payload) != word(8) {
        return Frame::Bad("checksum mismatch");
    }
    let mut deserializer = rmp_serde::Deserializer::from_read_ref(payload).with_human_readable();
    match T::deserialize(&mut deserializer) {
        Ok(record) => Frame::Record(Box::new(record), FRAME_HEADER_LEN + len),
        Err(_) => Frame::Bad("record does not decode"),
    }
}

/// The offset of the next sync word after `from` (a candidate frame), if any.
pub fn next_sync(bytes: &[u8], from: usize) -> Option<usize> {
    let sync = SYNC.to_le_bytes();
    bytes.get(from..)?.windows(4).position(|w| w == sync).map(|i| from + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(ts: u64) -> Record {
        Record::Event(Event::Tick { ts })
    }

    #[test]
    fn events_with_addresses_round_trip() {
        let connect = Record::Event(Event::Connect(crate::event::Connect {
            ts: 5,
            session: 1,
            pid: 2,
            tid: 2,
            creds: Default::default(),
            cgroup: 3,
            transport: crate::event::Transport::Tcp,
            addr: "127.0.0.3".parse().unwrap(),
            port: 443,
            connect: true,
            verdict: crate::event::Verdict::BlockedScope,
            fd: Some(4),
        }));
        let token = Record::Event(Event::TokenUse(crate::event::TokenUse {
            ts: 6,
            session: 0,
            actor: Default::default(),
            credential: crate::event::SeenCredential {
                kind: crate::credentials::CredentialKind::Bearer,
                fingerprint: "hmac-sha256:00".into(),
                header: Some("authorization".into()),
                key_id: None,
                jwt: Some(crate::credentials::JwtClaims {
                    sub: Some("alice".into()),
                    exp: Some(9),
                    ..Default::default()
                }),
            },
            via: crate::event::TokenVia::Http {
                tls: false,
                http2: false,
                method: "GET".into(),
                host: Some("h".into()),
                path: "/".into(),
                dst: Some("[::1]:8080".parse().unwrap()),
            },
        }));
        for record in [connect, token] {
            let mut buf = Vec::new();
            encode(&record, &mut buf).unwrap();
            let Frame::Record(back, _) = decode::<Record>(&buf) else { panic!() };
            assert_eq!(*back, record);
        }
    }

    #[test]
    fn borrowed_records_encode_as_owned_ones() {
        let event = Event::Tick { ts: 9 };
        let (mut owned, mut borrowed) = (Vec::new(), Vec::new());
        encode(&Record::Event(event.clone()), &mut owned).unwrap();
        encode(&RecordRef::Event(&event), &mut borrowed).unwrap();
        assert_eq!(owned, borrowed);
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        encode(&tick(1), &mut buf).unwrap();
        encode(&tick(2), &mut buf).unwrap();
        let Frame::Record(first, len) = decode::<Record>(&buf) else { panic!() };
        assert_eq!(*first, tick(1));
        let Frame::Record(second, _) = decode::<Record>(&buf[len..]) else { panic!() };
        assert_eq!(*second, tick(2));
    }

    #[test]
    fn damage_is_named_and_the_next_frame_found() {
        let mut buf = Vec::new();
        encode(&tick(1), &mut buf).unwrap();
        let second = buf.len();
        encode(&tick(2), &mut buf).unwrap();
        let mut bad = buf.clone();
        bad[FRAME_HEADER_LEN + 2] ^= 0xff;
        assert!(matches!(decode::<Record>(&bad), Frame::Bad("checksum mismatch")));
        assert_eq!(next_sync(&bad, 1), Some(second));
        assert!(matches!(decode::<Record>(&buf[..second - 1]), Frame::Truncated));
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode::<Record>(&bad), Frame::Bad("impossible frame length")));
        assert!(matches!(decode::<Record>(&[0u8; 20]), Frame::Bad("no frame sync word")));
    }

    #[test]
    fn header_versions() {
        assert_eq!(check_header(&header()), Ok(VERSION));
        let mut newer = header();
        newer[8..10].copy_from_slice(&7u16.to_le_bytes());
        assert_eq!(check_header(&newer), Err(HeaderError::NewerVersion { found: 7 }));
        assert_eq!(check_header(b"hello world, not a trace"), Err(HeaderError::NotATrace));
    }
}
