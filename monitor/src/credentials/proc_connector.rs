//! Uid changes of processes (the setuid family), from the kernel's process events connector
//! (netlink, `cn_proc`), subscribed to `PROC_EVENT_UID` only.
//!
//! Why not the `sys_exit_set*uid` syscall tracepoints: any syscall tracepoint puts every syscall
//! of every process on the host through the kernel's slower syscall-tracing path (measured +5%
//! on an openat loop, more while busy). The connector costs nothing per syscall: the kernel
//! reports from `commit_creds`, when a uid actually changed, and filters by event type before
//! the message reaches this socket. It reports in the initial pid namespace, as the agent runs.
//!
//! What it gives: the thread, its process, and the real and effective uids after the change; not
//! which call made it (setuid, setreuid, setresuid, setfsuid all look alike).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// `struct nlmsghdr`, `struct cn_msg`: the headers before a `struct proc_event`.
const NLMSG_HEADER: usize = 16;
const CN_MSG_HEADER: usize = 20;
/// Offsets in `struct proc_event` (linux/cn_proc.h).
const WHAT: usize = 0;
const TIMESTAMP: usize = 8;
const PROCESS_PID: usize = 16;
const PROCESS_TGID: usize = 20;
const RUID: usize = 24;
const EUID: usize = 28;
/// Receive buffer asked for: bursts of uid changes (a login storm) should not overflow it.
const RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// One uid change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UidChange {
    /// The process (thread group id).
    pub pid: u32,
    pub ruid: u32,
    pub euid: u32,
    /// When the kernel reported it, CLOCK_MONOTONIC ns.
    pub monotonic_ns: u64,
}

/// A netlink socket subscribed to the kernel's uid change events.
pub struct ProcConnector {
    fd: OwnedFd,
}

impl ProcConnector {
    /// Subscribes. Needs CAP_NET_ADMIN, in the initial user and pid namespaces.
    pub fn subscribe() -> io::Result<Self> {
        // SAFETY: plain socket creation; the result is a new descriptor or -1.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_CONNECTOR,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_nl; the fields are set below.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        address.nl_groups = libc::CN_IDX_PROC;
        // SAFETY: a valid socket and a sockaddr_nl of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // Best effort: the default buffer still works, with more risk of overflow.
        // SAFETY: a valid socket and an int option value.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&RECEIVE_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let connector = Self { fd };
        connector.send_listen()?;
        Ok(connector)
    }

    /// `PROC_CN_MCAST_LISTEN` with the event filter (`struct proc_input`, kernel >= 6.6). Older
    /// kernels ignore a listen request of any other length than the bare operation's (4 bytes),
    /// and have no filter: there the bare operation is sent, every process event on the host
    /// reaches this socket, and [`parse`] keeps the uid changes.
    fn send_listen(&self) -> io::Result<()> {
        let filtered = crate::host::kernel_at_least(6, 6);
        if !filtered {
            tracing::info!("this kernel's process events connector cannot filter (before 6.6): the agent reads every process event and keeps the uid changes");
        }
        let payload_len = if filtered { 8usize } else { 4 };
        let total = NLMSG_HEADER + CN_MSG_HEADER + payload_len;
        let mut message = Vec::with_capacity(total);
        // struct nlmsghdr
        message.extend_from_slice(&(total as u32).to_ne_bytes());
        message.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        message.extend_from_slice(&0u16.to_ne_bytes()); // flags
        message.extend_from_slice(&0u32.to_ne_bytes()); // seq
        message.extend_from_slice(&std::process::id().to_ne_bytes());
        // struct cn_msg
        message.extend_from_slice(&libc::CN_IDX_PROC.to_ne_bytes());
        message.extend_from_slice(&libc::CN_VAL_PROC.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes()); // seq
        message.extend_from_slice(&0u32.to_ne_bytes()); // ack
        message.extend_from_slice(&(payload_len as u16).to_ne_bytes());
        message.extend_from_slice(&0u16.to_ne_bytes()); // flags
                                                        // struct proc_input
        message.extend_from_slice(&(libc::PROC_CN_MCAST_LISTEN as u32).to_ne_bytes());
        if filtered {
            message.extend_from_slice(&(libc::PROC_EVENT_UID as u32).to_ne_bytes());
        }
        // SAFETY: sends `message.len()` bytes from a live buffer.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Appends the uid changes waiting on the socket to `out`, without blocking. Returns whether
    /// the kernel dropped some (the socket's buffer overflowed).
    pub fn drain(&self, out: &mut Vec<UidChange>) -> bool {
        let mut buffer = [0u8; 8192];
        let mut overflowed = false;
        loop {
            // SAFETY: receives into a live buffer of the given size.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::ENOBUFS) => {
                        overflowed = true;
                        continue;
                    }
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return overflowed,
                    _ => {
                        tracing::warn!("reading process events: {e}");
                        return overflowed;
                    }
                }
            }
            if let Some(change) = parse(&buffer[..n as usize]) {
                out.push(change);
            }
        }
    }
}

/// The uid change in one datagram (one netlink message carrying one `proc_event`), if it is one.
fn parse(datagram: &[u8]) -> Option<UidChange> {
    let event = datagram.get(NLMSG_HEADER + CN_MSG_HEADER..)?;
    let u32_at = |at: usize| Some(u32::from_ne_bytes(event.get(at..at + 4)?.try_into().ok()?));
    if u32_at(WHAT)? != libc::PROC_EVENT_UID as u32 {
        return None;
    }
    let monotonic_ns = u64::from_ne_bytes(event.get(TIMESTAMP..TIMESTAMP + 8)?.try_into().ok()?);
    let _thread = u32_at(PROCESS_PID)?;
    Some(UidChange { pid: u32_at(PROCESS_TGID)?, ruid: u32_at(RUID)?, euid: u32_at(EUID)?, monotonic_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(what: u32, tgid: u32, ruid: u32, euid: u32) -> Vec<u8> {
        let mut d = vec![0u8; NLMSG_HEADER + CN_MSG_HEADER];
        d.extend_from_slice(&what.to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes()); // cpu
        d.extend_from_slice(&42u64.to_ne_bytes());
        d.extend_from_slice(&(tgid + 1).to_ne_bytes()); // the thread
        d.extend_from_slice(&tgid.to_ne_bytes());
        d.extend_from_slice(&ruid.to_ne_bytes());
        d.extend_from_slice(&euid.to_ne_bytes());
        d
    }

    #[test]
    fn parses_uid_events_and_nothing_else() {
        let uid = libc::PROC_EVENT_UID as u32;
        assert_eq!(
            parse(&datagram(uid, 700, 65534, 0)),
            Some(UidChange { pid: 700, ruid: 65534, euid: 0, monotonic_ns: 42 })
        );
        assert_eq!(parse(&datagram(libc::PROC_EVENT_GID as u32, 700, 1, 1)), None);
        assert_eq!(parse(&datagram(uid, 700, 1, 1)[..40]), None, "truncated");
        assert_eq!(parse(&[]), None);
    }

    /// Needs root, as the agent does: `cargo xtask test` runs as root.
    #[test]
    fn sees_a_child_change_its_uid() {
        let connector = ProcConnector::subscribe().expect("subscribing to process events (run as root)");
        let status = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "true"])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut seen = Vec::new();
        while !seen.iter().any(|c: &UidChange| c.euid == 65534 && c.ruid == 65534) {
            assert!(std::time::Instant::now() < deadline, "no uid change seen: {seen:?}");
            connector.drain(&mut seen);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
