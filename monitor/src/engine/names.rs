//! The names a session learnt for addresses: from getaddrinfo, from DNS answers its processes
//! received, and from the hosts file they see. A connect to an address is in a name scope when
//! one of the address's names that still holds is.
//!
//! - A numeric "name" (getaddrinfo("127.0.0.2"), which connection pools and happy-eyeballs code
//!   call on an address they already resolved) teaches nothing and replaces nothing.
//! - Several names may share an address (virtual hosts, a CDN): all of them count.
//! - A name holds for its DNS TTL, at least [`MIN_HOLD_NS`] (a TTL of 0 still covers the connect
//!   right after the answer), or [`RESOLVED_TTL_NS`] where the source has no TTL, the same time
//!   the kernel allows the addresses of an enforcing session's names. A hosts-file name holds
//!   for the session's life.
//! - The hosts-file names are shared between sessions (see [`HostsBook`]): thousands of sessions
//!   on a node read the same /etc/hosts, and a copy each was a third of a session's memory.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use monitor_common::RESOLVED_TTL_NS;

use super::interned::Interned;
use crate::event::{NameSource, Nanos, Resolve};

/// The least time a DNS answer's name holds for its addresses.
pub const MIN_HOLD_NS: Nanos = 30 * 1_000_000_000;
/// Names kept per address (the most recent).
const NAMES_PER_ADDRESS: usize = 8;
/// Addresses kept per session; past this, names that no longer hold are dropped, then the
/// oldest address.
const ADDRESSES: usize = 16_384;

#[derive(Debug, Default)]
pub struct Names {
    /// The hosts file's names, by address (sorted): they hold for the session's life.
    hosts: Option<HostsList>,
    /// Names from getaddrinfo and DNS answers, each with its hold; boxed, since most
    /// sessions learn none and a map's empty head is six words.
    #[allow(clippy::box_collection)]
    by_addr: Option<Box<HashMap<IpAddr, Vec<Learnt>>>>,
}

/// Hosts-file names by address, sorted; shared through a [`HostsBook`].
type HostsList = Arc<[(IpAddr, Arc<str>)]>;

/// Every hosts-file name list the sessions hold, each once, so sessions that saw the same file
/// share one list. The lists a session passes through while its file's names arrive one by one
/// are dropped by [`HostsBook::prune`] once no session holds them.
#[derive(Debug, Default)]
pub struct HostsBook {
    lists: Interned<[(IpAddr, Arc<str>)]>,
    names: Interned<str>,
}

impl HostsBook {
    /// Forgets the lists and names no session holds.
    pub fn prune(&mut self) {
        self.lists.prune();
        self.names.prune();
    }
}

#[derive(Debug, Clone)]
struct Learnt {
    name: String,
    at: Nanos,
    until: Nanos,
}

impl Names {
    pub fn learn(&mut self, r: &Resolve, book: &mut HostsBook) {
        let name = r.name.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() || name.parse::<IpAddr>().is_ok() {
            return;
        }
        let until = match (r.source, r.ttl_secs) {
            // The hosts file does not expire: its names hold for the session's life, as the
            // kernel allows their addresses until the session's own expiry.
            (NameSource::Hosts, _) => return self.learn_from_hosts(&name, &r.addrs, book),
            (_, Some(ttl)) => r.ts.saturating_add((ttl as Nanos * 1_000_000_000).max(MIN_HOLD_NS)),
            (_, None) => r.ts.saturating_add(RESOLVED_TTL_NS),
        };
        let by_addr = self.by_addr.get_or_insert_default();
        for addr in &r.addrs {
            if !by_addr.contains_key(addr) && by_addr.len() >= ADDRESSES {
                make_room(by_addr, r.ts);
            }
            let names = by_addr.entry(*addr).or_default();
            // A name learnt again keeps the longer of its holds (a DNS answer for a name the
            // hosts file also gives does not shorten it).
            let mut until = until;
            names.retain(|l| {
                if l.name == name {
                    until = until.max(l.until);
                }
                l.name != name
            });
            names.push(Learnt { name: name.clone(), at: r.ts, until });
            if names.len() > NAMES_PER_ADDRESS {
                names.remove(0);
            }
        }
    }

    fn learn_from_hosts(&mut self, name: &str, addrs: &[IpAddr], book: &mut HostsBook) {
        let mut entries = self.hosts.as_deref().unwrap_or_default().to_vec();
        let before = entries.len();
        for addr in addrs {
            if !entries.iter().any(|(a, n)| a == addr && **n == *name) {
                entries.push((*addr, book.names.get(name)));
            }
        }
        if entries.len() != before {
            entries.sort();
            self.hosts = Some(book.lists.get(entries));
        }
    }

    /// The names of `addr` that hold at `ts`: the most recently learnt first, then the hosts
    /// file's.
    pub fn of(&self, addr: IpAddr, ts: Nanos) -> Vec<String> {
        let mut names: Vec<String> = self
            .by_addr
            .as_deref()
            .and_then(|by_addr| by_addr.get(&addr))
            .into_iter()
            .flat_map(|names| names.iter().rev())
            .filter(|l| ts < l.until)
            .map(|l| l.name.clone())
            .collect();
        let hosts = self.hosts.as_deref().unwrap_or_default();
        let first = hosts.partition_point(|(a, _)| *a < addr);
        for (_, name) in hosts[first..].iter().take_while(|(a, _)| *a == addr) {
            if !names.iter().any(|n| **n == **name) {
                names.push(name.to_string());
            }
        }
        names
    }
}

/// Drops the names that no longer hold, then, if the table is still full, the address learnt
/// longest ago.
fn make_room(by_addr: &mut HashMap<IpAddr, Vec<Learnt>>, ts: Nanos) {
    by_addr.retain(|_, names| {
        names.retain(|l| ts < l.until);
        !names.is_empty()
    });
    if by_addr.len() >= ADDRESSES {
        let oldest = by_addr
            .iter()
            .min_by_key(|(_, names)| names.iter().map(|l| l.at).max().unwrap_or(0))
            .map(|(addr, _)| *addr);
        if let Some(addr) = oldest {
            by_addr.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    impl Names {
        fn learn_alone(&mut self, r: &Resolve) {
            self.learn(r, &mut HostsBook::default());
        }
    }

    fn resolve(ts: Nanos, name: &str, addr: &str, ttl_secs: Option<u32>) -> Resolve {
        Resolve {
            ts,
            session: 1,
            pid: 7,
            name: name.into(),
            addrs: vec![addr.parse().unwrap()],
            source: if ttl_secs.is_some() { NameSource::Dns } else { NameSource::Getaddrinfo },
            ttl_secs,
        }
    }

    #[test]
    fn a_numeric_lookup_never_replaces_a_learnt_name() {
        let mut names = Names::default();
        names.learn_alone(&resolve(S, "api.example.test", "127.0.0.2", None));
        names.learn_alone(&resolve(2 * S, "127.0.0.2", "127.0.0.2", None));
        names.learn_alone(&resolve(2 * S, "::ffff:127.0.0.2", "127.0.0.2", None));
        assert_eq!(names.of("127.0.0.2".parse().unwrap(), 3 * S), ["api.example.test"]);
    }

    #[test]
    fn several_names_share_an_address_most_recent_first() {
        let mut names = Names::default();
        names.learn_alone(&resolve(S, "a.example.test", "127.0.0.2", None));
        names.learn_alone(&resolve(2 * S, "B.Example.Test.", "127.0.0.2", None));
        names.learn_alone(&resolve(3 * S, "a.example.test", "127.0.0.2", None));
        assert_eq!(names.of("127.0.0.2".parse().unwrap(), 4 * S), ["a.example.test", "b.example.test"]);
        assert!(names.of("127.0.0.3".parse().unwrap(), 4 * S).is_empty());
    }

    #[test]
    fn a_dns_name_holds_for_its_ttl_with_a_floor() {
        let mut names = Names::default();
        let addr: IpAddr = "10.0.0.1".parse().unwrap();
        names.learn_alone(&resolve(S, "ttl300.example.test", "10.0.0.1", Some(300)));
        names.learn_alone(&resolve(S, "ttl0.example.test", "10.0.0.1", Some(0)));
        assert_eq!(names.of(addr, S + MIN_HOLD_NS - 1), ["ttl0.example.test", "ttl300.example.test"]);
        assert_eq!(names.of(addr, S + MIN_HOLD_NS), ["ttl300.example.test"]);
        assert!(names.of(addr, S + 300 * S).is_empty());
        // getaddrinfo gives no TTL: the kernel's hold for resolved addresses.
        names.learn_alone(&resolve(S, "gai.example.test", "10.0.0.1", None));
        assert_eq!(names.of(addr, S + RESOLVED_TTL_NS - 1), ["gai.example.test"]);
    }

    #[test]
    fn a_hosts_file_name_holds_for_the_session_s_life() {
        let mut names = Names::default();
        let addr: IpAddr = "127.0.0.2".parse().unwrap();
        let hosts = Resolve { source: NameSource::Hosts, ..resolve(S, "api.example.test", "127.0.0.2", None) };
        names.learn_alone(&hosts);
        // A day later (a Go client, whose resolver reads the hosts file without getaddrinfo).
        assert_eq!(names.of(addr, S + 86_400 * S), ["api.example.test"]);
        // A short DNS answer for the same name does not shorten it.
        names.learn_alone(&resolve(2 * S, "api.example.test", "127.0.0.2", Some(5)));
        assert_eq!(names.of(addr, S + 86_400 * S), ["api.example.test"]);
    }

    #[test]
    fn sessions_that_saw_the_same_hosts_file_share_its_names() {
        let mut book = HostsBook::default();
        let hosts = |name: &str, addr: &str| Resolve { source: NameSource::Hosts, ..resolve(S, name, addr, None) };
        let file = [hosts("localhost", "127.0.0.1"), hosts("api.example.test", "127.0.0.2"), hosts("vm", "127.0.0.1")];
        let mut sessions: Vec<Names> = (0..3).map(|_| Names::default()).collect();
        for names in &mut sessions {
            for r in &file {
                names.learn(r, &mut book);
            }
        }
        let list = |n: &Names| n.hosts.clone().expect("hosts names");
        assert!(Arc::ptr_eq(&list(&sessions[0]), &list(&sessions[2])));
        assert_eq!(sessions[1].of("127.0.0.1".parse().unwrap(), 2 * S), ["localhost", "vm"]);
        // The lists passed through on the way (one name, two names) go once nothing holds them.
        assert_eq!(book.lists.len(), 3);
        book.prune();
        assert_eq!(book.lists.len(), 1);
        sessions.clear();
        book.prune();
        assert!(book.lists.is_empty() && book.names.is_empty());
    }

    #[test]
    fn the_table_is_bounded() {
        let mut names = Names::default();
        for i in 0..(ADDRESSES as u32 + 100) {
            let addr = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            names.learn_alone(&resolve(S + i as Nanos, "many.example.test", &addr, Some(1)));
        }
        assert!(names.by_addr.as_ref().expect("names learnt").len() <= ADDRESSES);
        for i in 0..20 {
            names.learn_alone(&resolve(S, &format!("n{i}.example.test"), "127.0.0.9", None));
        }
        assert_eq!(names.of("127.0.0.9".parse().unwrap(), 2 * S).len(), NAMES_PER_ADDRESS);
    }
}
