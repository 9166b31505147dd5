//! Reads and writes of watched credential files, from fanotify inode marks.
//!
//! Each watched file gets a mark on its inode, so the kernel matches it however the file is
//! named (relative path, symlink, hard link, another mount of it, another mount namespace) and
//! every other file on the host costs nothing: no syscall tracepoint, no probe on the open path.
//! (The `sys_exit_openat` tracepoints, the alternative, run for every open on the host and put
//! every syscall of every process on the kernel's slower syscall-tracing path; see
//! `cargo xtask bench --only open`.)
//!
//! What is reported is a read of the file's data (`FAN_ACCESS`) or a write (`FAN_MODIFY`), by
//! any process but the agent. An open that never reads is not a read of the secret and is not
//! reported; nor is a read through a shared memory mapping, which fanotify does not see.

use std::{
    collections::HashMap,
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::Path,
    sync::Mutex,
};

use crate::host::kernel_dev;

/// What the marks ask for.
const MASK: u64 = libc::FAN_ACCESS | libc::FAN_MODIFY;
/// Bytes read from the fanotify descriptor at a time (each event is 24 bytes).
const READ_BUFFER: usize = 16 * 1024;

/// One read or write of a watched file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileAccess {
    /// The process (thread group id).
    pub pid: u32,
    /// The file, by device (the kernel's encoding) and inode.
    pub dev: u32,
    pub ino: u64,
    pub write: bool,
}

/// A fanotify group holding one inode mark per watched file.
pub struct FileAccessWatch {
    fd: OwnedFd,
    /// Watched files with a mark, with the path they were marked through.
    marked: Mutex<HashMap<(u32, u64), String>>,
    agent_pid: u32,
    /// Allocated once: the queue is drained at every reader round, most of them empty.
    read_buffer: Mutex<Box<[u8]>>,
}

impl FileAccessWatch {
    /// A notification-only group: it never blocks the processes it watches.
    pub fn new() -> io::Result<Self> {
        // SAFETY: fanotify_init takes flags only; the result is a new descriptor or -1.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK,
                (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            marked: Mutex::new(HashMap::new()),
            agent_pid: std::process::id(),
            read_buffer: Mutex::new(vec![0u8; READ_BUFFER].into_boxed_slice()),
        })
    }

    /// Makes the marks cover exactly `watched` (by (device, inode), with a path to each).
    pub fn sync(&self, watched: &HashMap<(u32, u64), String>) {
        let mut marked = self.marked.lock().unwrap_or_else(|p| p.into_inner());
        marked.retain(|id, path| {
            if watched.contains_key(id) {
                return true;
            }
            // Only while the path still names the marked inode; a mark left on a replaced or
            // renamed file is harmless, since events are matched against the watch list.
            if identity(Path::new(path)) == Some(*id) {
                if let Err(e) = self.mark(libc::FAN_MARK_REMOVE, Path::new(path)) {
                    tracing::debug!(path, "removing a credential file mark: {e}");
                }
            }
            false
        });
        for (id, path) in watched {
            if marked.contains_key(id) {
                continue;
            }
            match self.mark(libc::FAN_MARK_ADD, Path::new(path)) {
                Ok(()) => {
                    marked.insert(*id, path.clone());
                }
                Err(e) => tracing::warn!(path, "credential file not watched: {e}"),
            }
        }
    }

    fn mark(&self, action: libc::c_uint, path: &Path) -> io::Result<()> {
        let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: a valid fanotify descriptor and a NUL-terminated path.
        let rc = unsafe { libc::fanotify_mark(self.fd.as_raw_fd(), action, MASK, libc::AT_FDCWD, c_path.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Appends every event waiting in the group to `out`, without blocking. Returns how many
    /// events the kernel dropped because its queue overflowed.
    pub fn drain(&self, out: &mut Vec<FileAccess>) -> u64 {
        let mut buffer = self.read_buffer.lock().unwrap_or_else(|p| p.into_inner());
        let mut overflows = 0;
        loop {
            // SAFETY: reads into a buffer of READ_BUFFER bytes.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
            if n <= 0 {
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                        tracing::warn!("reading credential file events: {e}");
                    }
                }
                return overflows;
            }
            overflows += self.parse(&buffer[..n as usize], out);
        }
    }

    /// Parses the events in `bytes` (whole events, as one read returns them).
    fn parse(&self, mut bytes: &[u8], out: &mut Vec<FileAccess>) -> u64 {
        let header = std::mem::size_of::<libc::fanotify_event_metadata>();
        let mut overflows = 0;
        while bytes.len() >= header {
            // SAFETY: at least `header` bytes; read_unaligned copies them out.
            let event: libc::fanotify_event_metadata = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let len = event.event_len as usize;
            if len < header || len > bytes.len() || event.vers != libc::FANOTIFY_METADATA_VERSION {
                tracing::warn!(vers = event.vers, "unexpected fanotify event layout; rest of the read dropped");
                break;
            }
            bytes = &bytes[len..];
            if event.mask & libc::FAN_Q_OVERFLOW != 0 {
                overflows += 1;
            }
            if event.fd < 0 {
                continue;
            }
            // SAFETY: the kernel opened this descriptor for us; it is ours to close.
            let file = unsafe { OwnedFd::from_raw_fd(event.fd) };
            let pid = event.pid as u32;
            if pid == self.agent_pid {
                continue;
            }
            let Ok(meta) = std::fs::File::from(file).metadata() else { continue };
            let (dev, ino) = (kernel_dev(meta.dev()), meta.ino());
            if event.mask & libc::FAN_ACCESS != 0 {
                out.push(FileAccess { pid, dev, ino, write: false });
            }
            if event.mask & libc::FAN_MODIFY != 0 {
                out.push(FileAccess { pid, dev, ino, write: true });
            }
        }
        overflows
    }
}

/// A file's (device in the kernel's encoding, inode), following symlinks.
fn identity(path: &Path) -> Option<(u32, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((kernel_dev(meta.dev()), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs CAP_SYS_ADMIN, as the agent does: `cargo xtask test` runs as root.
    #[test]
    fn reports_reads_and_writes_of_marked_files_only() {
        let watch = FileAccessWatch::new().expect("fanotify_init (run as root)");
        let dir = std::env::temp_dir().join(format!("monitor-fanotify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (secret, other) = (dir.join("secret"), dir.join("other"));
        std::fs::write(&secret, "s3cr3t").unwrap();
        std::fs::write(&other, "nothing").unwrap();
        std::os::unix::fs::symlink(&secret, dir.join("link")).unwrap();
        let id = identity(&secret).unwrap();
        watch.sync(&HashMap::from([(id, secret.display().to_string())]));

        // This test process is the agent here, whose own accesses are left out: a child reads.
        let status = std::process::Command::new("cat")
            .arg(dir.join("link"))
            .arg(&other)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::read(&secret).unwrap();
        let mut seen = Vec::new();
        watch.drain(&mut seen);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!((seen[0].dev, seen[0].ino, seen[0].write), (id.0, id.1, false));
        assert_ne!(seen[0].pid, std::process::id());

        // Unwatched: no more events.
        watch.sync(&HashMap::new());
        std::process::Command::new("cat").arg(&secret).stdout(std::process::Stdio::null()).status().unwrap();
        seen.clear();
        watch.drain(&mut seen);
        assert!(seen.is_empty(), "{seen:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
