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
