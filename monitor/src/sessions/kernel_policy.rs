//! What the connect hooks enforce for a session: its policy flags and ttl, and its allowed
//! networks as LPM-trie entries.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::lpm_trie::Key;
use monitor_common::{name_hash, NameKey, NAME_EXACT, NAME_SUFFIX};
use monitor_common::{
    PortRanges, Resolved, ResolvedKey, ScopeNet, SessionPolicy, POLICY_CONNECT_SCOPED, POLICY_ENDED, POLICY_ENFORCE,
    PORT_RANGES,
};

use super::{mapped, mapped_prefix, Host, Session};
use crate::{event::SessionKey, probes::KernelMaps};

/// The policy of a session whose authority ends at `expires_at` (boot-clock ns).
pub fn policy(session: &Session, expires_at: u64) -> SessionPolicy {
    let mut flags = 0;
    if session.enforce {
        flags |= POLICY_ENFORCE;
    }
    if session.scope.connect.is_some() {
        flags |= POLICY_CONNECT_SCOPED;
    }
    SessionPolicy { flags, _pad0: 0, expires_at }
}

/// The LPM entries of a session's address scope. Each prefix carries the ports of every shorter
/// prefix that contains it too: the kernel's lookup returns only the longest match.
pub fn scope_nets(session: &Session) -> Result<Vec<(u32, [u8; 16], PortRanges)>, String> {
    let mut by_prefix: BTreeMap<(u32, [u8; 16]), Vec<(u16, u16)>> = BTreeMap::new();
    for d in session.scope.connect.iter().flatten() {
        if let Host::Net { addr, prefix } = d.host {
            let bits = mapped_prefix(addr, prefix);
            by_prefix.entry((bits, masked(addr, bits))).or_default().push(d.ports);
        }
    }
    let mut entries = Vec::new();
    for ((bits, net), _) in &by_prefix {
        let mut ports: Vec<(u16, u16)> = by_prefix
            .iter()
            .filter(|((outer_bits, outer), _)| outer_bits <= bits && mask(*net, *outer_bits) == *outer)
            .flat_map(|(_, p)| p.iter().copied())
            .collect();
        ports.sort();
        entries.push((32 + bits, *net, port_ranges(session, merge(ports))?));
    }
    Ok(entries)
}

/// The name entries of a session's scope: `name` exactly, or `*.suffix` (any name ending in
/// `.suffix`), keyed by the hash the kernel computes on getaddrinfo's name.
pub fn scope_names(key: SessionKey, session: &Session) -> Result<Vec<(NameKey, PortRanges)>, String> {
    let mut by_name: BTreeMap<(u32, u64), Vec<(u16, u16)>> = BTreeMap::new();
    for d in session.scope.connect.iter().flatten() {
        let (kind, name) = match &d.host {
            Host::Name(name) => (NAME_EXACT, name),
            Host::Suffix(suffix) => (NAME_SUFFIX, suffix),
            Host::Net { .. } => continue,
        };
        by_name.entry((kind, name_hash(name.as_bytes()))).or_default().push(d.ports);
    }
    by_name
        .into_iter()
        .map(|((kind, hash), mut ports)| {
            ports.sort();
            Ok((NameKey { session: key, kind, hash }, port_ranges(session, merge(ports))?))
        })
        .collect()
}

fn port_ranges(session: &Session, ports: Vec<(u16, u16)>) -> Result<PortRanges, String> {
    if ports.len() > PORT_RANGES {
        return Err(format!(
            "session {}: more than {PORT_RANGES} separate port ranges apply to one destination; merge them",
            session.id
        ));
    }
    let mut ranges = PortRanges { count: ports.len() as u32, ranges: [0; PORT_RANGES] };
    for (i, (lo, hi)) in ports.iter().enumerate() {
        ranges.ranges[i] = (*lo as u32) << 16 | *hi as u32;
    }
    Ok(ranges)
}

fn masked(addr: IpAddr, bits: u32) -> [u8; 16] {
    mask(mapped(addr), bits)
}

fn mask(addr: [u8; 16], bits: u32) -> [u8; 16] {
    let m = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
    (u128::from_be_bytes(addr) & m).to_be_bytes()
}

fn merge(sorted: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (lo, hi) in sorted {
        match out.last_mut() {
            Some(last) if lo as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

impl KernelMaps {
    /// Installs a session's policy and scope before any of its processes is bound.
    /// `always` are destinations every session may reach (the policy's `never_alert`).
    pub fn install_policy(
        &mut self,
        key: SessionKey,
        session: &Session,
        expires_at: u64,
        always: &[super::Destination],
    ) -> Result<(), String> {
        let mut effective = session.clone();
        if let Some(connect) = &mut effective.scope.connect {
            connect.extend(always.iter().cloned());
        }
        let session = &effective;
        let entries = scope_nets(session)?;
        let names = scope_names(key, session)?;

        let err = |what: &str, e: aya::maps::MapError| format!("kernel map {what}: {e}");
        for (name, ports) in names {
            self.scope_names.insert(name, ports, 0).map_err(|e| err("SCOPE_NAMES", e))?;
        }
        for (prefix_len, addr, ports) in entries {
            let k = Key::new(prefix_len, ScopeNet { session: key.to_ne_bytes(), addr });
            self.scope_nets.insert(&k, ports, 0).map_err(|e| err("SCOPE_NETS", e))?;
        }
        self.session_policy.insert(key, policy(session, expires_at), 0).map_err(|e| err("SESSION_POLICY", e))
    }

    /// Lets an enforcing session connect to the addresses of the names in its scope that the
    /// agent learnt for it (its hosts file): its processes find them without getaddrinfo, whose
    /// probe would otherwise allow them (Go's resolver reads the file itself). They are allowed
    /// until the session's authority ends (`expires_at`, boot-clock ns).
    pub fn allow_named_addresses(
        &mut self,
        key: SessionKey,
        session: &Session,
        names: &[crate::event::Resolve],
        expires_at: u64,
    ) -> Result<(), String> {
        if !session.enforce {
            return Ok(());
        }
        for r in names {
            let mut ports: Vec<(u16, u16)> =
                session.scope.connect.iter().flatten().filter(|d| d.names(&r.name)).map(|d| d.ports).collect();
            if ports.is_empty() {
                continue;
            }
            ports.sort();
            let ports = port_ranges(session, merge(ports))?;
            for addr in &r.addrs {
                let k = ResolvedKey { session: key, addr: mapped(*addr) };
                let v = Resolved { ports, _pad0: 0, expires_at };
                self.resolved.insert(k, v, 0).map_err(|e| format!("kernel map RESOLVED: {e}"))?;
            }
        }
        Ok(())
    }

    /// The task ended: an enforcing session refuses every further connect.
    pub fn mark_ended(&mut self, key: SessionKey) {
        if let Ok(mut p) = self.session_policy.get(&key, 0) {
            p.flags |= POLICY_ENDED;
            if let Err(e) = self.session_policy.insert(key, p, 0) {
                tracing::error!(key, "marking the session ended in the kernel: {e}");
            }
        }
    }

    /// Drops everything the kernel holds for forgotten sessions, in one walk of each map.
    pub fn forget(&mut self, keys: &std::collections::HashSet<SessionKey>) {
        for key in keys {
            let _ = self.session_policy.remove(key);
        }
        let nets: Vec<_> = self
            .scope_nets
            .keys()
            .filter_map(Result::ok)
            .filter(|k| keys.contains(&SessionKey::from_ne_bytes(k.data().session)))
            .collect();
        for k in nets {
            let _ = self.scope_nets.remove(&k);
        }
        let names: Vec<NameKey> =
            self.scope_names.keys().filter_map(Result::ok).filter(|k| keys.contains(&k.session)).collect();
        for k in names {
            let _ = self.scope_names.remove(&k);
        }

        let cgroups: Vec<u64> = self
            .cgroup_sessions
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, session)| keys.contains(session))
            .map(|(cgroup, _)| cgroup)
            .collect();
        for cgroup in &cgroups {
            let _ = self.cgroup_sessions.remove(cgroup);
        }
        if !cgroups.is_empty() {
            let _ = self.sync_cgroup_count();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::{Binding, Scope, SessionId};

    fn session(connect: &[&str]) -> Session {
        Session {
            id: SessionId::try_from("k".to_string()).unwrap(),
            principal: "p".into(),
            actor: "a".into(),
            task: "t".into(),
            sponsor: String::new(),
            ttl_ns: 1,
            grace_ns: 1,
            scope: Scope { connect: Some(connect.iter().map(|c| c.parse().unwrap()).collect()), ..Default::default() },
            tokens: vec![],
            enforce: true,
            binding: Binding::default(),
        }
    }

    #[test]
    fn longer_prefixes_inherit_the_ports_of_the_shorter_ones() {
        let s = session(&["127.0.0.0/8:443", "127.0.0.2:80", "127.0.0.2:81", "[::1]:8000-8100", "10.0.0.0/8:22"]);
        let entries = scope_nets(&s).unwrap();
        let find = |bits: u32, addr: &str| {
            let a = mapped(addr.parse().unwrap());
            entries.iter().find(|(b, x, _)| *b == bits && *x == a).map(|(_, _, p)| *p).unwrap()
        };
        let host = find(32 + 128, "127.0.0.2");
        assert!(host.allows(80) && host.allows(81) && host.allows(443) && !host.allows(82));
        assert_eq!(host.count, 2, "80-81 merged, and 443");
        let net = find(32 + 104, "127.0.0.0");
        assert!(net.allows(443) && !net.allows(80));
        let v6 = find(32 + 128, "::1");
        assert!(v6.allows(8050) && !v6.allows(443));
        let ten = find(32 + 104, "10.0.0.0");
        assert!(ten.allows(22) && !ten.allows(443));
    }

    #[test]
    fn name_entries_hash_like_the_kernel() {
        let s = session(&["api.allowed.test:443", "API.allowed.test:80", "*.payments.test:8443", "127.0.0.1:1"]);
        let names = scope_names(7, &s).unwrap();
        assert_eq!(names.len(), 2);
        let exact = names.iter().find(|(k, _)| k.kind == NAME_EXACT).unwrap();
        assert_eq!(exact.0.hash, name_hash(b"api.allowed.test"));
        assert_eq!(exact.0.session, 7);
        assert!(exact.1.allows(80) && exact.1.allows(443) && !exact.1.allows(81));
        let suffix = names.iter().find(|(k, _)| k.kind == NAME_SUFFIX).unwrap();
        assert_eq!(suffix.0.hash, name_hash(b"payments.test"));
        // The kernel hashes the looked-up name backwards, byte by byte, lowercased: the hash of
        // `eu.payments.test` passes through the hash of its suffix `payments.test`.
        let looked_up = b"EU.Payments.test";
        let mut h = monitor_common::NAME_HASH_SEED;
        let mut suffix_hashes = Vec::new();
        for i in (0..looked_up.len()).rev() {
            h = monitor_common::name_hash_step(h, looked_up[i]);
            if i > 0 && looked_up[i - 1] == b'.' {
                suffix_hashes.push(h);
            }
        }
        assert!(suffix_hashes.contains(&suffix.0.hash));
        assert_eq!(h, name_hash(b"eu.payments.test"));
    }

    #[test]
    fn policy_flags() {
        let mut s = session(&["127.0.0.2:80"]);
        assert_eq!(policy(&s, 9).flags, POLICY_ENFORCE | POLICY_CONNECT_SCOPED);
        s.enforce = false;
        s.scope.connect = None;
        assert_eq!(policy(&s, 9).flags, 0);
        assert_eq!(policy(&s, 9).expires_at, 9);
    }
}
