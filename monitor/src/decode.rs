//! Wire events (monitor-common) to domain events. Pure: no host access, no clock.

use std::net::{IpAddr, Ipv6Addr};

use monitor_common::{
    ArgvTokenEvent, ConnectEvent, ConnectResultEvent, CredChangeEvent, DnsAnswerEvent, EnvTokenEvent, EventHeader,
    EventKind, ExecEvent, ExecutableEvent, ExitEvent, FileOpenEvent, ForkEvent, PayloadEvent, ResolveEvent,
    TlsPeerEvent, CRED_CAPSET, CRED_CAP_CHECK, CRED_SETRESUID, CRED_SETREUID, CRED_SETUID, DNS_TCP_PIECE, HOOK_CONNECT,
    PAYLOAD_CAP, PAYLOAD_FLAG_H2, PAYLOAD_SSL_READ, PAYLOAD_TCP, RESOLVE_ADDRS, VERDICT_BLOCKED_ENDED,
    VERDICT_BLOCKED_EXPIRED, VERDICT_BLOCKED_SCOPE, WIRE_VERSION,
};

use crate::event::{
    Actor, Connect, ConnectResult, CredCall, CredChange, Creds, Event, Exec, Exit, Fork, Nanos, Resolve, SessionKey,
    Transport, Verdict,
};

/// A decoded record: a domain event, or a credential observation the credentials stage must
/// still resolve (which token a hash is, which file an inode is, what a request carries).
#[derive(Debug, PartialEq)]
pub enum Decoded<'a> {
    Event(Event),
    /// A watched inode was opened.
    FileOpen {
        ts: Nanos,
        session: SessionKey,
        actor: Actor,
        dev: u32,
        ino: u64,
        fd: i32,
        write: bool,
    },
    /// A token's hash was the value of `name` in an exec's environment.
    EnvToken {
        ts: Nanos,
        session: SessionKey,
        actor: Actor,
        hash: u64,
        name: String,
    },
    /// A token's hash was word of argument `index` of the command line of an exec by a process
    /// outside sessions.
    ArgvToken {
        ts: Nanos,
        actor: Actor,
        hash: u64,
        index: usize,
    },
    /// The first bytes of an outbound request. `data` is raw and may hold secrets: it is parsed
    /// and fingerprinted, never stored.
    Payload {
        ts: Nanos,
        session: SessionKey,
        actor: Actor,
        tls: bool,
        dst: Option<std::net::SocketAddr>,
        /// The connection within the process (`SSL *` or socket cookie).
        conn: u64,
        /// A write on an HTTP/2 connection: part of a frame stream, not a request of its own.
        h2: bool,
        /// TCP: the sequence number of the segment's first byte.
        seq: Option<u32>,
        /// The whole write's length; `data` may hold only its start.
        total_len: usize,
        data: &'a [u8],
    },
    /// What a session process read on a TLS connection whose last request was a POST: maybe a
    /// token response. Raw like `Payload`.
    Received {
        ts: Nanos,
        session: SessionKey,
        actor: Actor,
        /// The connection, as for [`Decoded::Payload`]: the reads of one response follow it.
        conn: u64,
        data: &'a [u8],
    },
    /// A segment of a DNS-over-TCP stream a session process receives: one whole message
    /// without its length prefix (`whole`), or a piece of the stream, which
    /// [`crate::dns::TcpStreams`] joins into messages (by `seq`, so the whole ones count too).
    DnsPiece {
        ts: Nanos,
        session: SessionKey,
        pid: u32,
        /// The receiving socket's cookie.
        socket: u64,
        seq: u32,
        /// The segment's payload length (without the length prefix of a whole message);
        /// `data` may hold only its start.
        total_len: usize,
        whole: bool,
        data: &'a [u8],
    },
    /// An executable file exec'd for the first time (by any process): one to look at for TLS
    /// code to probe. Not an event of the engine.
    Executable {
        pid: u32,
        file: crate::probes::executables::FileId,
        filename: String,
    },
    /// Where a TLS connection of `pid` goes (see [`Decoded::Payload`]'s `conn`).
    TlsPeer {
        pid: u32,
        conn: u64,
        dst: std::net::SocketAddr,
    },
    /// A record that carries nothing for the engine (a DNS message without an answer).
    Nothing,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("wire version {0}, this agent reads {WIRE_VERSION}")]
    Version(u16),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} record of {got} bytes, expected {want}")]
    Size { kind: EventKind, got: usize, want: usize },
    #[error("event without a session")]
    NoSession,
}

/// Converts kernel boot-clock nanoseconds to wall-clock nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// `realtime - boottime`, measured once at start.
    pub boot_to_wall: i128,
}

impl Clock {
    pub fn wall(&self, boot_ns: u64) -> Nanos {
        (boot_ns as i128 + self.boot_to_wall).max(0) as Nanos
    }

    /// The inverse of [`Clock::wall`]: a wall-clock time as boot-clock ns, for the kernel.
    pub fn boot(&self, wall: Nanos) -> u64 {
        (wall as i128 - self.boot_to_wall).clamp(0, u64::MAX as i128) as u64
    }
}

/// Decodes one ring-buffer record.
/// DnsAnswerEvent::transport of DNS over TCP.
const IPPROTO_TCP: u8 = 6;

pub fn decode(record: &[u8], clock: Clock) -> Result<Decoded<'_>, DecodeError> {
    let header: EventHeader = read(record).ok_or(DecodeError::Short(record.len()))?;
    if header.version != WIRE_VERSION {
        return Err(DecodeError::Version(header.version));
    }
    let kind = EventKind::try_from(header.kind).map_err(DecodeError::UnknownKind)?;
    let ts = clock.wall(header.ts_ns);
    // Credential observations come from any process; everything else only from session ones.
    let any_process = matches!(
        kind,
        EventKind::FileOpen
            | EventKind::EnvToken
            | EventKind::ArgvToken
            | EventKind::Payload
            | EventKind::Executable
            | EventKind::TlsPeer
    );
    if header.session == 0 && !any_process {
        return Err(DecodeError::NoSession);
    }
    let actor = |comm: &[u8]| Actor {
        pid: header.tgid,
        tid: header.pid,
        ppid: 0,
        sid: None,
        comm: lossy(comm),
        exe: String::new(),
        uid: header.uid,
        cgroup: header.cgroup_id,
    };
    let session = header.session;
    match kind {
        EventKind::FileOpen => {
            let e: FileOpenEvent = read_sized(record, kind)?;
            // O_ACCMODE: 1 is O_WRONLY, 2 is O_RDWR.
            let write = e.flags != u32::MAX && e.flags & 3 != 0;
            return Ok(Decoded::FileOpen {
                ts,
                session,
                actor: actor(&e.comm),
                dev: e.dev,
                ino: e.ino,
                fd: e.fd,
                write,
            });
        }
        EventKind::EnvToken => {
            let e: EnvTokenEvent = read_sized(record, kind)?;
            let name = lossy(e.name.as_slice());
            let actor = Actor { ppid: e.ppid, sid: known(e.sid), ..actor(&e.comm) };
            return Ok(Decoded::EnvToken { ts, session, actor, hash: e.hash, name });
        }
        EventKind::ArgvToken => {
            let e: ArgvTokenEvent = read_sized(record, kind)?;
            let actor = Actor { ppid: e.ppid, sid: known(e.sid), ..actor(&e.comm) };
            return Ok(Decoded::ArgvToken { ts, actor, hash: e.hash, index: e.index as usize });
        }
        EventKind::Payload => {
            // Read in place: the data is sliced from the record, not copied around.
            // Either size of payload record: everything up to the data is common, and the
            // data is bounded by what the record holds.
            let want = core::mem::offset_of!(PayloadEvent, data) + 4;
            if record.len() < want {
                return Err(DecodeError::Size { kind, got: record.len(), want });
            }
            let source = record[core::mem::offset_of!(PayloadEvent, source)];
            let port_at = core::mem::offset_of!(PayloadEvent, port);
            let port = u16::from_ne_bytes([record[port_at], record[port_at + 1]]);
            let addr_at = core::mem::offset_of!(PayloadEvent, addr);
            let addr: [u8; 16] = record[addr_at..addr_at + 16].try_into().unwrap_or([0; 16]);
            let comm_at = core::mem::offset_of!(PayloadEvent, comm);
            let data_at = core::mem::offset_of!(PayloadEvent, data);
            let len = u32::from_ne_bytes(record[data_at..data_at + 4].try_into().unwrap_or([0; 4])) as usize;
            let held = (record.len() - data_at - 4).min(PAYLOAD_CAP);
            let data = &record[data_at + 4..data_at + 4 + len.min(held)];
            let tls = source != PAYLOAD_TCP;
            let conn_at = core::mem::offset_of!(PayloadEvent, conn);
            let conn = u64::from_ne_bytes(record[conn_at..conn_at + 8].try_into().unwrap_or([0; 8]));
            if source == PAYLOAD_SSL_READ {
                return Ok(Decoded::Received { ts, session, actor: actor(&record[comm_at..comm_at + 16]), conn, data });
            }
            let dst = (!tls && port != 0).then(|| std::net::SocketAddr::new(unmap(addr), port));
            let u32_at = |at: usize| u32::from_ne_bytes(record[at..at + 4].try_into().unwrap_or([0; 4]));
            let h2 = record[core::mem::offset_of!(PayloadEvent, flags)] & PAYLOAD_FLAG_H2 != 0;
            let seq = (!tls).then(|| u32_at(core::mem::offset_of!(PayloadEvent, seq)));
            let total_len = (u32_at(core::mem::offset_of!(PayloadEvent, total_len)) as usize).max(data.len());
            return Ok(Decoded::Payload {
                ts,
                session,
                actor: actor(&record[comm_at..comm_at + 16]),
                tls,
                dst,
                conn,
                h2,
                seq,
                total_len,
                data,
            });
        }
        EventKind::TlsPeer => {
            let e: TlsPeerEvent = read_sized(record, kind)?;
            let dst = std::net::SocketAddr::new(unmap(e.addr), e.port);
            return Ok(Decoded::TlsPeer { pid: header.tgid, conn: e.conn, dst });
        }
        EventKind::DnsAnswer => {
            let e: DnsAnswerEvent = read_sized(record, kind)?;
            if e.transport == IPPROTO_TCP {
                let data_at = core::mem::offset_of!(DnsAnswerEvent, data) + 4;
                let data = &record[data_at..data_at + e.data.as_slice().len()];
                return Ok(Decoded::DnsPiece {
                    ts,
                    session,
                    pid: header.tgid,
                    socket: e.socket,
                    seq: e.seq,
                    total_len: e.total_len as usize,
                    whole: e.flags & DNS_TCP_PIECE == 0,
                    data,
                });
            }
            let Some(answer) = crate::dns::answer(e.data.as_slice()) else { return Ok(Decoded::Nothing) };
            return Ok(Decoded::Event(Event::Resolve(crate::dns::resolve(ts, session, header.tgid, answer))));
        }
        EventKind::Executable => {
            let e: ExecutableEvent = read_sized(record, kind)?;
            let file = crate::probes::executables::FileId { dev: e.dev, ino: e.ino };
            return Ok(Decoded::Executable { pid: header.tgid, file, filename: lossy(e.filename.as_slice()) });
        }
        _ => {}
    }
    let creds = |euid: Option<u32>, egid: Option<u32>| Creds { uid: header.uid, gid: header.gid, euid, egid };
    Ok(Decoded::Event(match kind {
        // Returned above; listed so the match stays exhaustive without a panic path.
        EventKind::FileOpen
        | EventKind::EnvToken
        | EventKind::ArgvToken
        | EventKind::Payload
        | EventKind::Executable
        | EventKind::DnsAnswer
        | EventKind::TlsPeer => return Err(DecodeError::UnknownKind(header.kind)),
        EventKind::CredChange => {
            let e: CredChangeEvent = read_sized(record, kind)?;
            let call = match e.call {
                CRED_SETUID => CredCall::Setuid,
                CRED_SETREUID => CredCall::Setreuid,
                CRED_SETRESUID => CredCall::Setresuid,
                CRED_CAPSET => CredCall::Capset,
                CRED_CAP_CHECK => CredCall::CapabilityCheck,
                _ => CredCall::Setfsuid,
            };
            Event::CredChange(CredChange {
                ts,
                session,
                pid: header.tgid,
                call,
                euid: (e.euid != u32::MAX).then_some(e.euid),
                cap_effective: (e.cap_effective != u64::MAX).then_some(e.cap_effective),
            })
        }
        EventKind::Fork => {
            let e: ForkEvent = read_sized(record, kind)?;
            Event::Fork(Fork {
                ts,
                session: header.session,
                parent: header.tgid,
                child: e.child_tgid,
                creds: creds(None, None),
                cgroup: header.cgroup_id,
            })
        }
        EventKind::Exec => {
            let e: ExecEvent = read_sized(record, kind)?;
            let (argv, argv_truncated) = split_argv(e.argv.as_slice(), e.argv.is_full());
            Event::Exec(Exec {
                ts,
                session: header.session,
                pid: header.tgid,
                ppid: e.ppid,
                sid: known(e.sid),
                exe: lossy(e.filename.as_slice()),
                exe_real: None,
                argv,
                argv_truncated,
                creds: creds(known(e.euid), known(e.egid)),
                cgroup: header.cgroup_id,
                cap_effective: (e.cap_effective != u64::MAX).then_some(e.cap_effective),
            })
        }
        EventKind::Exit => {
            let e: ExitEvent = read_sized(record, kind)?;
            Event::Exit(Exit { ts, session: header.session, pid: header.tgid, exit_code: e.exit_code })
        }
        EventKind::Connect => {
            let e: ConnectEvent = read_sized(record, kind)?;
            let addr = unmap(e.addr);
            Event::Connect(Connect {
                ts,
                session: header.session,
                pid: header.tgid,
                tid: header.pid,
                creds: creds(None, None),
                cgroup: header.cgroup_id,
                transport: match (e.sock_type, e.protocol) {
                    (1, _) | (_, 6) => Transport::Tcp,
                    (2, _) | (_, 17) => Transport::Udp,
                    _ => Transport::Other,
                },
                addr,
                port: e.port,
                connect: e.hook == HOOK_CONNECT,
                verdict: match e.verdict {
                    VERDICT_BLOCKED_SCOPE => Verdict::BlockedScope,
                    VERDICT_BLOCKED_ENDED => Verdict::BlockedEnded,
                    VERDICT_BLOCKED_EXPIRED => Verdict::BlockedExpired,
                    _ => Verdict::Allowed,
                },
                fd: (e.fd >= 0).then_some(e.fd),
            })
        }
        EventKind::Resolve => {
            let e: ResolveEvent = read_sized(record, kind)?;
            let count = (e.count as usize).min(RESOLVE_ADDRS);
            Event::Resolve(Resolve {
                source: crate::event::NameSource::Getaddrinfo,
                ttl_secs: None,
                ts,
                session: header.session,
                pid: header.tgid,
                name: lossy(e.name.as_slice()),
                addrs: e.addrs[..count].iter().map(|a| unmap(*a)).collect(),
            })
        }
        EventKind::ConnectResult => {
            let e: ConnectResultEvent = read_sized(record, kind)?;
            Event::ConnectResult(ConnectResult {
                ts,
                session: header.session,
                pid: header.tgid,
                tid: header.pid,
                fd: e.fd,
                ret: e.ret,
            })
        }
    }))
}

/// An address as the kernel reports it (IPv4 as IPv4-mapped IPv6) to its natural form.
/// A value the kernel could not read is `u32::MAX` (an unresolved offset, [`monitor_common::SID_UNKNOWN`]).
fn known(v: u32) -> Option<u32> {
    (v != u32::MAX).then_some(v)
}

fn unmap(addr: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(addr);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

fn read<T: Copy>(record: &[u8]) -> Option<T> {
    if record.len() < core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked above, T is a plain-old-data wire type (every bit pattern is
    // valid), and read_unaligned makes no alignment assumption about the ring-buffer record.
    Some(unsafe { core::ptr::read_unaligned(record.as_ptr().cast::<T>()) })
}

fn read_sized<T: Copy>(record: &[u8], kind: EventKind) -> Result<T, DecodeError> {
    let want = core::mem::size_of::<T>();
    read(record).ok_or(DecodeError::Size { kind, got: record.len(), want })
}

/// A C string buffer up to its first NUL, as UTF-8 (invalid bytes replaced).
fn lossy(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Splits a NUL-separated argv area. The area ends with a NUL unless it was cut short.
fn split_argv(area: &[u8], full: bool) -> (Vec<String>, bool) {
    let area = area.strip_suffix(&[0]).unwrap_or(area);
    if area.is_empty() {
        return (Vec::new(), full);
    }
    let argv = area.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    (argv, full)
}

#[cfg(test)]
mod tests {
    use monitor_common::{
        Bytes, SmallPayloadEvent, ARGV_CAP, FILENAME_CAP, PAYLOAD_SMALL_CAP, PAYLOAD_SSL_WRITE_EX, SID_UNKNOWN,
    };

    use crate::event::Event;

    use super::*;

    const CLOCK: Clock = Clock { boot_to_wall: 1_000 };

    fn header(kind: EventKind, size: usize) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            version: WIRE_VERSION,
            _pad0: 0,
            size: size as u32,
            session: 7,
            ts_ns: 5,
            pid: 101,
            tgid: 100,
            uid: 1000,
            gid: 1001,
            cgroup_id: 42,
        }
    }

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: test-only view of a repr(C) wire struct without implicit padding.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()).to_vec() }
    }

    fn buf<const N: usize>(content: &[u8]) -> Bytes<N> {
        let mut b = Bytes { len: content.len() as u32, buf: [0xAA; N] };
        b.buf[..content.len()].copy_from_slice(content);
        b
    }

    fn event(record: &[u8]) -> Event {
        match decode(record, CLOCK).unwrap() {
            Decoded::Event(e) => e,
            other => panic!("not a plain event: {other:?}"),
        }
    }

    #[test]
    fn decodes_credential_observations_from_any_process() {
        let mut h = header(EventKind::FileOpen, size_of::<FileOpenEvent>());
        h.session = 0;
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"cat\0");
        let e = FileOpenEvent { header: h, fd: 3, flags: 2, dev: 0x80_0001, _pad0: 0, ino: 77, comm };
        let Decoded::FileOpen { session, actor, dev, ino, fd, write, .. } = decode(&bytes_of(&e), CLOCK).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (session, actor.pid, actor.comm.as_str(), dev, ino, fd, write),
            (0, 100, "cat", 0x80_0001, 77, 3, true)
        );

        let e = EnvTokenEvent {
            header: header(EventKind::EnvToken, size_of::<EnvTokenEvent>()),
            hash: 9,
            ppid: 41,
            sid: 40,
            comm,
            name: buf(b"SUPPORT_BOT_TOKEN"),
        };
        let Decoded::EnvToken { hash, name, session, actor, .. } = decode(&bytes_of(&e), CLOCK).unwrap() else {
            panic!()
        };
        assert_eq!((hash, name.as_str(), session, actor.ppid, actor.sid), (9, "SUPPORT_BOT_TOKEN", 7, 41, Some(40)));

        let e = ArgvTokenEvent {
            header: EventHeader { session: 0, ..header(EventKind::ArgvToken, size_of::<ArgvTokenEvent>()) },
            hash: 11,
            ppid: 42,
            sid: SID_UNKNOWN,
            comm,
            index: 3,
            _pad0: 0,
        };
        let Decoded::ArgvToken { hash, index, actor, .. } = decode(&bytes_of(&e), CLOCK).unwrap() else { panic!() };
        assert_eq!((hash, index, actor.ppid, actor.sid), (11, 3, 42, None), "a process outside sessions");

        let mut e = PayloadEvent {
            header: header(EventKind::Payload, size_of::<PayloadEvent>()),
            source: PAYLOAD_TCP,
            flags: PAYLOAD_FLAG_H2,
            port: 8080,
            total_len: 100,
            addr: std::net::Ipv4Addr::new(127, 0, 0, 3).to_ipv6_mapped().octets(),
            conn: 0xc00c1e,
            comm,
            seq: 12345,
            data: buf(b"GET / HTTP/1.1\r\n\r\n"),
        };
        let record = bytes_of(&e);
        let Decoded::Payload { tls, dst, data, conn, h2, seq, total_len, .. } = decode(&record, CLOCK).unwrap() else {
            panic!()
        };
        assert!(!tls);
        assert_eq!(dst, Some("127.0.0.3:8080".parse().unwrap()));
        assert_eq!(data, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!((conn, h2, seq, total_len), (0xc00c1e, true, Some(12345), 100));
        e.data.len = u32::MAX; // corrupt: bounded by the buffer
        let record = bytes_of(&e);
        let Decoded::Payload { data, .. } = decode(&record, CLOCK).unwrap() else { panic!() };
        assert_eq!(data.len(), PAYLOAD_CAP);

        // The short record: same layout, less room; a corrupt length is bounded by the record.
        let mut small = SmallPayloadEvent {
            header: header(EventKind::Payload, size_of::<SmallPayloadEvent>()),
            source: PAYLOAD_SSL_WRITE_EX,
            flags: 0,
            port: 0,
            total_len: 18,
            addr: [0; 16],
            conn: 0x7f00_0000_1000,
            comm,
            seq: 0,
            data: buf(b"GET / HTTP/1.1\r\n\r\n"),
        };
        let record = bytes_of(&small);
        let Decoded::Payload { tls, dst, data, seq, h2, .. } = decode(&record, CLOCK).unwrap() else { panic!() };
        assert!(tls && dst.is_none() && seq.is_none() && !h2);
        assert_eq!(data, b"GET / HTTP/1.1\r\n\r\n");
        small.data.len = u32::MAX;
        let record = bytes_of(&small);
        let Decoded::Payload { data, .. } = decode(&record, CLOCK).unwrap() else { panic!() };
        assert_eq!(data.len(), PAYLOAD_SMALL_CAP);
        let data_at = core::mem::offset_of!(SmallPayloadEvent, data);
        assert!(decode(&record[..data_at + 2], CLOCK).is_err(), "a record cut before its data is refused");
    }

    #[test]
    fn decodes_fork() {
        let e = ForkEvent { header: header(EventKind::Fork, 56), child_tgid: 200, _pad0: 0 };
        let Event::Fork(f) = event(&bytes_of(&e)) else { panic!() };
        assert_eq!((f.parent, f.child, f.session, f.ts, f.cgroup), (100, 200, 7, 1_005, 42));
        assert_eq!(f.creds.uid, 1000);
    }

    #[test]
    fn decodes_exec_with_argv_and_creds() {
        let e = ExecEvent {
            header: header(EventKind::Exec, size_of::<ExecEvent>()),
            ppid: 99,
            euid: 0,
            egid: u32::MAX,
            old_pid: 100,
            sid: 98,
            _pad0: 0,
            cap_effective: 0,
            filename: buf::<FILENAME_CAP>(b"/usr/bin/curl\0"),
            argv: buf::<ARGV_CAP>(b"curl\0-s\0http://x\0"),
        };
        let Event::Exec(x) = event(&bytes_of(&e)) else { panic!() };
        assert_eq!(x.exe, "/usr/bin/curl");
        assert_eq!(x.argv, ["curl", "-s", "http://x"]);
        assert!(!x.argv_truncated);
        assert_eq!((x.pid, x.ppid, x.sid), (100, 99, Some(98)));
        assert_eq!(x.creds, Creds { uid: 1000, gid: 1001, euid: Some(0), egid: None });
    }

    #[test]
    fn exec_with_full_argv_is_marked_truncated_and_bad_len_is_bounded() {
        let mut e = ExecEvent {
            header: header(EventKind::Exec, size_of::<ExecEvent>()),
            ppid: 1,
            euid: 1,
            egid: 1,
            old_pid: 1,
            sid: 0,
            _pad0: 0,
            cap_effective: u64::MAX,
            filename: buf::<FILENAME_CAP>(b"/bin/x"),
            argv: buf::<ARGV_CAP>(&[b'a'; ARGV_CAP]),
        };
        e.filename.len = u32::MAX; // corrupt: must not read past the buffer
        let Event::Exec(x) = event(&bytes_of(&e)) else { panic!() };
        assert!(x.argv_truncated);
        assert_eq!(x.argv[0].len(), ARGV_CAP);
        assert!(x.exe.starts_with("/bin/x"));
    }

    #[test]
    fn decodes_exit() {
        let e = ExitEvent { header: header(EventKind::Exit, 56), exit_code: 3 << 8, _pad0: 0 };
        let Event::Exit(x) = event(&bytes_of(&e)) else { panic!() };
        assert_eq!((x.pid, x.exit_code, x.session), (100, 768, 7));
    }

    #[test]
    fn decodes_connect_v4_v6_and_verdicts() {
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[127, 0, 0, 2]);
        let e = ConnectEvent {
            header: header(EventKind::Connect, size_of::<ConnectEvent>()),
            family: 2,
            sock_type: 1,
            protocol: 6,
            port: 8443,
            hook: HOOK_CONNECT,
            verdict: VERDICT_BLOCKED_SCOPE,
            fd: 5,
            addr: mapped,
        };
        let Event::Connect(c) = event(&bytes_of(&e)) else { panic!() };
        assert_eq!(c.addr, "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(
            (c.port, c.transport, c.connect, c.verdict, c.fd),
            (8443, Transport::Tcp, true, Verdict::BlockedScope, Some(5))
        );
        assert_eq!((c.pid, c.tid), (100, 101));

        let e = ConnectEvent {
            family: 10,
            sock_type: 2,
            protocol: 17,
            hook: monitor_common::HOOK_SENDMSG,
            verdict: 0,
            fd: -1,
            addr: Ipv6Addr::LOCALHOST.octets(),
            ..e
        };
        let Event::Connect(c) = event(&bytes_of(&e)) else { panic!() };
        assert_eq!(c.addr, "::1".parse::<IpAddr>().unwrap());
        assert_eq!((c.transport, c.connect, c.verdict, c.fd), (Transport::Udp, false, Verdict::Allowed, None));
    }

    #[test]
    fn decodes_resolve_with_a_bounded_count() {
        let mut addrs = [[0u8; 16]; RESOLVE_ADDRS];
        addrs[0] = std::net::Ipv4Addr::new(127, 0, 0, 5).to_ipv6_mapped().octets();
        addrs[1] = Ipv6Addr::LOCALHOST.octets();
        let mut e = ResolveEvent {
            header: header(EventKind::Resolve, size_of::<ResolveEvent>()),
            count: 2,
            name: buf(b"api.allowed.test\0"),
            addrs,
        };
        let Event::Resolve(r) = event(&bytes_of(&e)) else { panic!() };
        assert_eq!(r.name, "api.allowed.test");
        assert_eq!(r.addrs, ["127.0.0.5".parse::<IpAddr>().unwrap(), "::1".parse().unwrap()]);
        e.count = 1000;
        let Event::Resolve(r) = event(&bytes_of(&e)) else { panic!() };
        assert_eq!(r.addrs.len(), RESOLVE_ADDRS);
    }

    #[test]
    fn decodes_connect_result() {
        let e = ConnectResultEvent { header: header(EventKind::ConnectResult, 56), fd: 4, ret: -111 };
        let Event::ConnectResult(r) = event(&bytes_of(&e)) else { panic!() };
        assert_eq!((r.fd, r.ret, r.pid), (4, -111, 100));
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[0; 10], CLOCK), Err(DecodeError::Short(10)));
        let mut h = header(EventKind::Exit, 56);
        h.version = 99;
        assert_eq!(decode(&bytes_of(&h), CLOCK), Err(DecodeError::Version(99)));
        let mut h = header(EventKind::Exit, 56);
        h.kind = 77;
        assert_eq!(decode(&bytes_of(&h), CLOCK), Err(DecodeError::UnknownKind(77)));
        let h = header(EventKind::Exec, 56);
        assert!(matches!(decode(&bytes_of(&h), CLOCK), Err(DecodeError::Size { kind: EventKind::Exec, .. })));
        let mut h = header(EventKind::Exit, 56);
        h.session = 0;
        assert_eq!(decode(&bytes_of(&h), CLOCK), Err(DecodeError::NoSession));
    }
}
