//! The maps that bind processes and cgroups to sessions (`PROC_SESSIONS`, `CGROUP_SESSIONS`),
//! pinned in bpffs (`--pin-dir`, default /sys/fs/bpf/monitor) so they outlive an agent: the
//! next one loads its programs onto the same maps, and what the kernel knew (a process forked
//! a moment before the crash, not yet in the state file, whose parent has since exited) is still
//! there. The state directory (agent/state.rs) says which sessions exist; entries of other
//! sessions, and of processes that exited or whose pid was reused while no agent ran, are
//! removed when the sessions are adopted.
//!
//! Pinned maps of another layout (an upgrade that changed a key, a value or a capacity) are
//! not reused: they are unpinned with a warning, and the new agent adopts from the state file
//! alone.

use std::path::{Path, PathBuf};

use aya::maps::{MapInfo, MapType};
use monitor_common::{
    ProcBinding, CGROUP_SESSIONS_CAPACITY, MAP_CGROUP_SESSIONS, MAP_PROC_SESSIONS, PROC_SESSIONS_CAPACITY,
};

/// The pinned maps: name, key and value sizes, capacity.
const PINNED: [(&str, u32, u32, u32); 2] = [
    (MAP_PROC_SESSIONS, 4, PROC_BINDING_SIZE, PROC_SESSIONS_CAPACITY),
    (MAP_CGROUP_SESSIONS, 8, 4, CGROUP_SESSIONS_CAPACITY),
];
const PROC_BINDING_SIZE: u32 = std::mem::size_of::<ProcBinding>() as u32;
/// `statfs` type of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted by convention; mounted there if nothing is.
const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug)]
pub struct PinDir {
    dir: PathBuf,
    /// A previous agent's maps are there (compatible ones): their entries are to be checked.
    pub reused: bool,
}

impl PinDir {
    /// Readies `dir` for the pinned maps: bpffs mounted at /sys/fs/bpf if it is not (as
    /// Cilium and Tetragon do), the directory made (0700), a previous agent's maps of another
    /// layout removed, and with `fresh` every previous map removed.
    pub fn prepare(dir: &Path, fresh: bool) -> Result<Self, String> {
        ensure_bpffs(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut reused = false;
        for (name, key_size, value_size, max_entries) in PINNED {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            if fresh {
                unpin(&path)?;
                continue;
            }
            match MapInfo::from_pin(&path) {
                Ok(info)
                    if matches!(info.map_type(), Ok(MapType::Hash))
                        && info.key_size() == key_size
                        && info.value_size() == value_size
                        && info.max_entries() == max_entries =>
                {
                    reused = true;
                }
                Ok(_) => {
                    tracing::warn!(
                        map = %path.display(),
                        "a pinned map of another layout (another agent version): unpinned; sessions are adopted from the state directory alone"
                    );
                    unpin(&path)?;
                }
                Err(e) => {
                    tracing::warn!(map = %path.display(), "a pinned map that cannot be read ({e}): unpinned");
                    unpin(&path)?;
                }
            }
        }
        Ok(Self { dir: dir.to_path_buf(), reused })
    }

    /// Each pinned map's name and pin path, for the loader.
    pub fn maps(&self) -> impl Iterator<Item = (&'static str, PathBuf)> + '_ {
        PINNED.iter().map(|(name, ..)| (*name, self.dir.join(name)))
    }
}

fn unpin(path: &Path) -> Result<(), String> {
    std::fs::remove_file(path).map_err(|e| format!("unpinning {}: {e}", path.display()))
}

/// Makes sure `dir` is (or will be) on a bpf filesystem.
fn ensure_bpffs(dir: &Path) -> Result<(), String> {
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    if fs_type(existing)? == BPF_FS_MAGIC {
        return Ok(());
    }
    if !dir.starts_with(BPFFS) || !Path::new(BPFFS).is_dir() {
        return Err(format!("{} is not on a bpf filesystem", dir.display()));
    }
    if fs_type(Path::new(BPFFS))? != BPF_FS_MAGIC {
        let (source, target, kind, options) = (c"bpf", c"/sys/fs/bpf", c"bpf", c"mode=0700");
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), kind.as_ptr(), 0, options.as_ptr().cast()) };
        if rc != 0 {
            return Err(format!("mounting bpffs at {BPFFS}: {}", std::io::Error::last_os_error()));
        }
        tracing::info!("mounted a bpf filesystem at {BPFFS} for the pinned maps");
    }
    Ok(())
}

fn fs_type(path: &Path) -> Result<i64, String> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: statfs writes only into `out`, which is large enough.
    let mut out: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `out` is a valid statfs.
    if unsafe { libc::statfs(c.as_ptr(), &mut out) } != 0 {
        return Err(format!("{}: {}", path.display(), std::io::Error::last_os_error()));
    }
    Ok(out.f_type as i64)
}
