//! Scope entries: where a session may connect. Parsed when the session file is read, so a bad
//! entry is reported with its line.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// A destination a session may connect to: `ADDR[/PREFIX]:PORTS`, `[V6[/PREFIX]]:PORTS`,
/// `NAME:PORTS` or `*.SUFFIX:PORTS`, where PORTS is a port, `LOW-HIGH` or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub host: Host,
    pub ports: (u16, u16),
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Net {
        addr: IpAddr,
        prefix: u8,
    },
    Name(String),
    /// `*.example.com`: any name ending in `.example.com`.
    Suffix(String),
}

impl Destination {
    pub fn allows_port(&self, port: u16) -> bool {
        (self.ports.0..=self.ports.1).contains(&port)
    }

    /// Whether `addr:port` is this destination, given the names `addr` was resolved from.
    pub fn matches(&self, addr: IpAddr, port: u16, names: &[String]) -> bool {
        if !self.allows_port(port) {
            return false;
        }
        match &self.host {
            Host::Net { addr: net, prefix } => in_prefix(addr, *net, *prefix),
            Host::Name(_) | Host::Suffix(_) => names.iter().any(|n| self.names(n)),
        }
    }

    /// Whether this is a name destination (`NAME` or `*.SUFFIX`) that `name` falls under.
    pub fn names(&self, name: &str) -> bool {
        match &self.host {
            Host::Net { .. } => false,
            Host::Name(exact) => name.eq_ignore_ascii_case(exact),
            Host::Suffix(suffix) => {
                let n = name.to_ascii_lowercase();
                n.len() > suffix.len() + 1
                    && n.ends_with(suffix.as_str())
                    && n.as_bytes()[n.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

/// An address as the kernel compares it: IPv6, IPv4 as IPv4-mapped (::ffff:a.b.c.d).
pub fn mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// A prefix length in the mapped address space.
pub fn mapped_prefix(addr: IpAddr, prefix: u8) -> u32 {
    if addr.is_ipv4() {
        96 + prefix as u32
    } else {
        prefix as u32
    }
}

fn in_prefix(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let bits = mapped_prefix(net, prefix);
    let (a, n) = (u128::from_be_bytes(mapped(addr)), u128::from_be_bytes(mapped(net)));
    let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
    a & mask == n & mask
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (host, ports) = text
            .rsplit_once(':')
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| format!("`{text}`: expected HOST:PORT (a port, LOW-HIGH or *)"))?;
        let ports = parse_ports(ports).ok_or_else(|| format!("`{text}`: bad port `{ports}`"))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let host = if let Some(suffix) = host.strip_prefix("*.") {
            valid_name(suffix).ok_or_else(|| format!("`{text}`: bad name suffix `{suffix}`"))?;
            Host::Suffix(suffix.to_ascii_lowercase())
        } else if let Some((addr, prefix)) = host.split_once('/') {
            let addr: IpAddr = addr.parse().map_err(|_| format!("`{text}`: bad address `{addr}`"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = prefix
                .parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{text}`: bad prefix length `{prefix}` (0..={max})"))?;
            Host::Net { addr, prefix }
        } else if let Ok(addr) = host.parse::<IpAddr>() {
            Host::Net { addr, prefix: if addr.is_ipv4() { 32 } else { 128 } }
        } else {
            valid_name(host).ok_or_else(|| format!("`{text}`: `{host}` is neither an address nor a DNS name"))?;
            Host::Name(host.to_ascii_lowercase())
        };
        Ok(Self { host, ports, text: text.to_string() })
    }
}

fn parse_ports(s: &str) -> Option<(u16, u16)> {
    if s == "*" {
        return Some((1, u16::MAX));
    }
    match s.split_once('-') {
        Some((lo, hi)) => {
            let (lo, hi) = (lo.parse().ok()?, hi.parse().ok()?);
            (lo <= hi && lo > 0).then_some((lo, hi))
        }
        None => s.parse().ok().filter(|p| *p > 0).map(|p| (p, p)),
    }
}

fn valid_name(name: &str) -> Option<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    ok.then_some(())
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Destination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let d: Destination = "127.0.0.2:8443".parse().unwrap();
        assert_eq!(d.host, Host::Net { addr: "127.0.0.2".parse().unwrap(), prefix: 32 });
        assert_eq!(d.ports, (8443, 8443));
        let d: Destination = "10.20.0.0/24:80-90".parse().unwrap();
        assert_eq!(d.host, Host::Net { addr: "10.20.0.0".parse().unwrap(), prefix: 24 });
        assert!(d.allows_port(85) && !d.allows_port(91));
        let d: Destination = "[::1]:*".parse().unwrap();
        assert_eq!(d.host, Host::Net { addr: "::1".parse().unwrap(), prefix: 128 });
        assert!(d.allows_port(1));
        assert_eq!(
            "API.internal.example:443".parse::<Destination>().unwrap().host,
            Host::Name("api.internal.example".into())
        );
        assert_eq!(
            "*.payments.example:443".parse::<Destination>().unwrap().host,
            Host::Suffix("payments.example".into())
        );
        assert_eq!("[fd00::/64]:443".parse::<Destination>().unwrap().to_string(), "[fd00::/64]:443");
    }

    #[test]
    fn matches_addresses_prefixes_names_and_suffixes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let d: Destination = "127.0.0.2:8443".parse().unwrap();
        assert!(d.matches(ip("127.0.0.2"), 8443, &[]));
        assert!(!d.matches(ip("127.0.0.3"), 8443, &[]));
        assert!(!d.matches(ip("127.0.0.2"), 80, &[]));
        let d: Destination = "10.20.0.0/24:80".parse().unwrap();
        assert!(d.matches(ip("10.20.0.77"), 80, &[]) && !d.matches(ip("10.20.1.1"), 80, &[]));
        let d: Destination = "[::1]:*".parse().unwrap();
        assert!(d.matches(ip("::1"), 5, &[]) && !d.matches(ip("127.0.0.1"), 5, &[]));
        let d: Destination = "api.internal.example:443".parse().unwrap();
        assert!(d.matches(ip("127.0.0.9"), 443, &["API.internal.example".into()]));
        assert!(!d.matches(ip("127.0.0.9"), 443, &["evil.example".into()]));
        let d: Destination = "*.payments.example:443".parse().unwrap();
        assert!(d.matches(ip("127.0.0.9"), 443, &["eu.payments.example".into()]));
        assert!(!d.matches(ip("127.0.0.9"), 443, &["payments.example".into()]));
        assert!(!d.matches(ip("127.0.0.9"), 443, &["evilpayments.example".into()]));
    }

    #[test]
    fn rejects_bad_entries() {
        for bad in ["127.0.0.2", ":80", "1.2.3.4:0", "1.2.3.4:70000", "1.2.3.0/33:80", "bad name:80", "x:9-3", "*.:80"]
        {
            assert!(bad.parse::<Destination>().is_err(), "{bad} should be rejected");
        }
    }
}

/// Each allowed executable also under its symlink-resolved path (`/bin/sh` is `/usr/bin/dash`
/// on Debian), so the scope matches however the program was invoked.
pub fn with_real_paths(exec: Vec<String>) -> Vec<String> {
    let mut all = exec.clone();
    for path in exec {
        if let Ok(real) = std::fs::canonicalize(&path) {
            let real = real.display().to_string();
            if !all.contains(&real) {
                all.push(real);
            }
        }
    }
    all
}
