//! The hosts file a session's processes see (through the root process's own root directory, so
//! a container's or a mount namespace's file, not the agent's): resolvers read it before any DNS
//! query, Go's own resolver included, so its names are the session's too from the start.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use crate::event::{NameSource, Nanos, Resolve, SessionKey};

/// Names taken from one hosts file at most.
const MAX_NAMES: usize = 1024;
/// Bytes read at most.
const MAX_BYTES: u64 = 1 << 20;

/// The hosts file at `path` as name events for session `key` (none when it cannot be read).
pub fn names(path: &Path, session: SessionKey, ts: Nanos) -> Vec<Resolve> {
    use std::io::Read as _;
    let mut text = String::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(MAX_BYTES).read_to_string(&mut text));
    if let Err(e) = read {
        tracing::debug!(path = %path.display(), "hosts file not read: {e}");
        return Vec::new();
    }
    parse(&text)
        .into_iter()
        .map(|(name, addrs)| Resolve { ts, session, pid: 0, name, addrs, source: NameSource::Hosts, ttl_secs: None })
        .collect()
}

/// `ADDRESS NAME [ALIAS...]` lines (hosts(5)), by name.
fn parse(text: &str) -> BTreeMap<String, Vec<IpAddr>> {
    let mut names: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        // A scoped IPv6 address (fe80::1%eth0) is the address without its zone.
        let Some(addr) = words.next().and_then(|w| w.split('%').next()?.parse::<IpAddr>().ok()) else { continue };
        for name in words {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if names.len() >= MAX_NAMES && !names.contains_key(&name) {
                break;
            }
            let addrs = names.entry(name).or_default();
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_their_addresses_comments_and_junk_skipped() {
        let hosts = "127.0.0.1\tlocalhost\n::1 localhost ip6-localhost # loopback\n\n# a comment\n\
                     127.0.0.2 api.example.test API.Alias.test.\nnot-an-address name\nfe80::1%eth0 link.test\n";
        let names = parse(hosts);
        let addrs = |n: &str| names[n].iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(addrs("localhost"), ["127.0.0.1", "::1"]);
        assert_eq!(addrs("api.example.test"), ["127.0.0.2"]);
        assert_eq!(addrs("api.alias.test"), ["127.0.0.2"]);
        assert_eq!(addrs("link.test"), ["fe80::1"]);
        assert!(!names.contains_key("name"));
    }

    #[test]
    fn a_huge_file_is_bounded() {
        let hosts: String = (0..5000).map(|i| format!("10.0.{}.{} host{i}.test\n", i / 250, i % 250)).collect();
        assert_eq!(parse(&hosts).len(), MAX_NAMES);
    }
}
