//! DNS answers received by session processes (hooks/dns_answer.rs in the kernel): the name
//! asked for, the addresses it resolved to through any CNAME chain, and the TTL. hickory-proto
//! decodes the message; it returns errors on malformed input, never panics (fuzzed upstream and
//! in the tests below).

use std::net::IpAddr;

use hickory_proto::{
    op::{Message, MessageType},
    rr::RData,
};

/// What an answer says: `name` resolves to `addrs`, for `ttl_secs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub name: String,
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL along the chain.
    pub ttl_secs: u32,
}

/// Addresses kept from one answer.
const MAX_ADDRS: usize = 32;
/// CNAME links followed.
const MAX_CHAIN: usize = 16;

/// The answer in a DNS response, or `None` for a query, an error, or a response without
/// addresses for the name asked.
pub fn answer(message: &[u8]) -> Option<Answer> {
    let message = Message::from_vec(message).ok()?;
    if message.metadata.message_type != MessageType::Response {
        return None;
    }
    let asked = message.queries.first()?.name().clone();
    // Follow the chain from the name asked for: answers for other names are not the asker's.
    let mut wanted = vec![asked.clone()];
    let mut ttl = u32::MAX;
    for _ in 0..MAX_CHAIN {
        let mut grew = false;
        for record in &message.answers {
            if let RData::CNAME(target) = &record.data {
                if wanted.contains(&record.name) && !wanted.contains(&target.0) {
                    wanted.push(target.0.clone());
                    ttl = ttl.min(record.ttl);
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }
    let mut addrs = Vec::new();
    for record in message.answers.iter().filter(|r| wanted.contains(&r.name)) {
        let addr = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        if !addrs.contains(&addr) && addrs.len() < MAX_ADDRS {
            addrs.push(addr);
            ttl = ttl.min(record.ttl);
        }
    }
    if addrs.is_empty() {
        return None;
    }
    let name = asked.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    Some(Answer { name, addrs, ttl_secs: ttl })
}

/// The event of an answer a session process (`pid`) received.
pub fn resolve(ts: u64, session: crate::event::SessionKey, pid: u32, answer: Answer) -> crate::event::Resolve {
    crate::event::Resolve {
        ts,
        session,
        pid,
        name: answer.name,
        addrs: answer.addrs,
        source: crate::event::NameSource::Dns,
        ttl_secs: Some(answer.ttl_secs),
    }
}

/// The DNS-over-TCP streams of session processes whose answers came in pieces (a length prefix
/// sent on its own, a message over several segments), joined by TCP sequence number: RFC 7766
/// frames each message with a two-byte length. Retransmitted bytes are read once; a gap (a
/// segment lost to the reader, or longer than one kernel capture) drops the stream, whose next
/// piece starts a new one. Everything waited for is bounded.
#[derive(Debug, Default)]
pub struct TcpStreams {
    streams: std::collections::HashMap<(u32, u64), Stream>,
}

#[derive(Debug)]
struct Stream {
    /// The sequence number of the next byte expected.
    next_seq: u32,
    /// Bytes received and not yet a whole message.
    held: Vec<u8>,
    last_ts: u64,
}

/// Streams followed at once; past this the one idle longest is dropped.
const MAX_STREAMS: usize = 256;
/// A DNS message is at most 65,535 bytes (its length prefix says so).
const MAX_HELD: usize = 2 + u16::MAX as usize;

impl TcpStreams {
    /// The answers that the piece `data` (at `seq` on `(pid, socket)`, of a segment of
    /// `total_len` bytes) completes.
    pub fn piece(&mut self, ts: u64, pid: u32, socket: u64, seq: u32, total_len: usize, data: &[u8]) -> Vec<Answer> {
        let key = (pid, socket);
        let mut stream = match self.streams.remove(&key) {
            Some(s) if s.next_seq == seq => s,
            // Bytes already read, sent again: nothing new.
            Some(s)
                if (s.next_seq.wrapping_sub(seq) as i32) > 0 && seq.wrapping_add(total_len as u32) == s.next_seq =>
            {
                self.streams.insert(key, s);
                return Vec::new();
            }
            // A new stream, or one whose bytes went missing: the piece starts a message only if
            // the stream is new; a gap drops what was held, and the piece with it.
            Some(_) => return Vec::new(),
            None => Stream { next_seq: seq, held: Vec::new(), last_ts: ts },
        };
        if data.len() < total_len || stream.held.len() + data.len() > MAX_HELD {
            // Cut by the kernel's capture: the rest of this stream cannot be framed.
            return Vec::new();
        }
        stream.held.extend_from_slice(data);
        stream.next_seq = seq.wrapping_add(total_len as u32);
        stream.last_ts = ts;
        let mut answers = Vec::new();
        let mut at = 0;
        while let Some(len) = stream.held.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize) {
            let Some(message) = stream.held.get(at + 2..at + 2 + len) else { break };
            answers.extend(answer(message));
            at += 2 + len;
        }
        stream.held.drain(..at);
        if self.streams.len() >= MAX_STREAMS {
            if let Some(idle) = self.streams.iter().min_by_key(|(_, s)| s.last_ts).map(|(k, _)| *k) {
                self.streams.remove(&idle);
            }
        }
        self.streams.insert(key, stream);
        answers
    }

    /// The answer of a segment that held one whole message (`message`, without its length
    /// prefix), which the stream's sequence numbers count too.
    pub fn message(
        &mut self,
        ts: u64,
        pid: u32,
        socket: u64,
        seq: u32,
        total_len: usize,
        message: &[u8],
    ) -> Vec<Answer> {
        let Ok(len) = u16::try_from(total_len) else { return Vec::new() };
        // A whole message starts one: a stream that expected other bytes starts over here.
        if self.streams.get(&(pid, socket)).is_some_and(|s| s.next_seq != seq) {
            self.streams.remove(&(pid, socket));
        }
        let mut framed = Vec::with_capacity(2 + message.len());
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(message);
        self.piece(ts, pid, socket, seq, 2 + total_len, &framed)
    }

    /// Forgets the streams of a process that exited.
    pub fn forget_pid(&mut self, pid: u32) {
        self.streams.retain(|(p, _), _| *p != pid);
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use hickory_proto::{
        op::{Message, MessageType, Query},
        rr::{
            rdata::{A, AAAA, CNAME},
            Name, RData, Record, RecordType,
        },
    };

    use super::*;

    fn response(asked: &str, answers: Vec<Record>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.message_type = MessageType::Response;
        m.add_query(Query::query(Name::from_str(asked).unwrap(), RecordType::A));
        for a in answers {
            m.add_answer(a);
        }
        m.to_vec().unwrap()
    }

    fn record(name: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(Name::from_str(name).unwrap(), ttl, data)
    }

    #[test]
    fn a_and_aaaa_through_a_cname_chain_with_the_smallest_ttl() {
        let bytes = response(
            "api.example.test.",
            vec![
                record("api.example.test.", 300, RData::CNAME(CNAME(Name::from_str("edge.cdn.test.").unwrap()))),
                record("edge.cdn.test.", 60, RData::A(A::new(127, 0, 0, 2))),
                record("edge.cdn.test.", 60, RData::AAAA(AAAA::from_str("::1").unwrap())),
                // Not on the chain: someone else's.
                record("other.test.", 60, RData::A(A::new(127, 0, 0, 9))),
            ],
        );
        let a = answer(&bytes).unwrap();
        assert_eq!(a.name, "api.example.test");
        assert_eq!(a.addrs, ["127.0.0.2".parse::<IpAddr>().unwrap(), "::1".parse().unwrap()]);
        assert_eq!(a.ttl_secs, 60);
    }

    #[test]
    fn queries_errors_and_empty_answers_give_nothing() {
        let mut q = Message::query();
        q.add_query(Query::query(Name::from_str("a.test.").unwrap(), RecordType::A));
        assert_eq!(answer(&q.to_vec().unwrap()), None);
        assert_eq!(answer(&response("a.test.", vec![])), None);
        assert_eq!(answer(b""), None);
    }

    #[test]
    fn a_tcp_stream_in_pieces_gives_each_message_once() {
        let one = response("api.example.test.", vec![record("api.example.test.", 60, RData::A(A::new(127, 0, 0, 2)))]);
        let two = response("db.example.test.", vec![record("db.example.test.", 60, RData::A(A::new(127, 0, 0, 3)))]);
        let mut stream = Vec::new();
        for m in [&one, &two] {
            stream.extend_from_slice(&(m.len() as u16).to_be_bytes());
            stream.extend_from_slice(m);
        }
        // Every way to cut the stream into three pieces, with the first piece sent twice.
        for a in 1..stream.len() {
            for b in (a + 1..stream.len()).step_by(7) {
                let mut streams = TcpStreams::default();
                let seq0 = u32::MAX - 5; // across the wrap of the sequence space
                let mut names = Vec::new();
                for (at, piece) in [(0, &stream[..a]), (0, &stream[..a]), (a, &stream[a..b]), (b, &stream[b..])] {
                    let seq = seq0.wrapping_add(at as u32);
                    names.extend(streams.piece(1, 7, 9, seq, piece.len(), piece).into_iter().map(|x| x.name));
                }
                assert_eq!(names, ["api.example.test", "db.example.test"], "cut at {a}, {b}");
            }
        }
    }

    #[test]
    fn a_tcp_stream_with_a_gap_or_a_cut_piece_gives_nothing_wrong() {
        let one = response("api.example.test.", vec![record("api.example.test.", 60, RData::A(A::new(127, 0, 0, 2)))]);
        let mut stream = (one.len() as u16).to_be_bytes().to_vec();
        stream.extend_from_slice(&one);
        let mut streams = TcpStreams::default();
        assert!(streams.piece(1, 7, 9, 100, 2, &stream[..2]).is_empty());
        // The next piece skips 3 bytes: the stream is dropped.
        assert!(streams.piece(1, 7, 9, 105, stream.len() - 5, &stream[5..]).is_empty());
        // A piece the kernel cut (its segment was longer than the capture).
        let mut streams = TcpStreams::default();
        assert!(streams.piece(1, 7, 9, 100, stream.len() + 10, &stream).is_empty());
        // Bounded: many streams at once.
        let mut streams = TcpStreams::default();
        for socket in 0..(MAX_STREAMS as u64 + 20) {
            streams.piece(socket, 7, socket, 0, 1, &stream[..1]);
        }
        assert!(streams.streams.len() <= MAX_STREAMS);
        streams.forget_pid(7);
        assert!(streams.streams.is_empty());
    }

    #[test]
    fn malformed_messages_never_panic() {
        let good = response("api.example.test.", vec![record("api.example.test.", 5, RData::A(A::new(1, 2, 3, 4)))]);
        for cut in 0..good.len() {
            let _ = answer(&good[..cut]);
        }
        for seed in 0..5000u32 {
            let mut bytes = good.clone();
            for i in 0..(1 + seed % 6) {
                let at = (seed.wrapping_mul(2654435761).wrapping_add(i * 7919) as usize) % bytes.len();
                bytes[at] = (seed >> (i % 24)) as u8;
            }
            let _ = answer(&bytes);
        }
        // A compression pointer loop.
        let mut looped = good[..12].to_vec();
        looped[5] = 1; // one question
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        let _ = answer(&looped);
    }
}
