//! The watch list: credential files whose opens the kernel reports, by device and inode. The
//! well-known homes of non-human-identity credentials, the files sessions name, and what the
//! policy adds. Rescanned periodically, since credential files come and go (a rotated
//! service-account token is a new inode behind the same path).

use crate::host::kernel_dev;
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Well-known credential locations, absolute. Directories are watched file by file.
pub const WELL_KNOWN: &[&str] = &[
    "/var/run/secrets/kubernetes.io/serviceaccount/token",
    "/run/secrets",
    "/var/run/secrets",
    "/etc/kubernetes/admin.conf",
];

/// Well-known credential locations under each home directory.
pub const WELL_KNOWN_IN_HOME: &[&str] = &[
    ".aws/credentials",
    ".config/gcloud",
    ".azure",
    ".kube/config",
    ".docker/config.json",
    ".netrc",
    ".git-credentials",
    ".config/gh/hosts.yml",
];

/// Rescans the watch list (well-known files, `extra` from the policy, the files sessions name)
/// and writes it to the kernel.
pub fn refresh(index: &super::CredentialIndex, maps: &mut crate::probes::KernelMaps, extra: &[String]) {
    let mut extra = extra.to_vec();
    extra.extend(index.session_paths());
    let watched = scan(&roots(&extra));
    if watched != index.watched() {
        tracing::debug!(files = watched.len(), "credential watch list changed");
        // The index first: an open the kernel reports must find its path.
        index.set_watched(watched.clone());
        maps.sync_watched(&watched);
    }
}

/// Bounds of a directory walk, so a huge tree named by mistake cannot stall the agent.
const MAX_DEPTH: usize = 4;
const MAX_FILES_PER_ROOT: usize = 512;

/// The roots to watch: `extra`, then the well-known ones (expanded for every home directory).
pub fn roots(extra: &[String]) -> Vec<PathBuf> {
    // `extra` first: a file found under several names is reported under the first, and the
    // names sessions use are the ones their scopes are matched against.
    let mut roots: Vec<PathBuf> = extra.iter().map(PathBuf::from).collect();
    roots.extend(WELL_KNOWN.iter().map(PathBuf::from));
    for home in homes() {
        roots.extend(WELL_KNOWN_IN_HOME.iter().map(|rel| home.join(rel)));
    }
    roots
}

/// Home directories of the accounts in /etc/passwd that exist, and /root.
fn homes() -> Vec<PathBuf> {
    let mut homes = vec![PathBuf::from("/root")];
    if let Ok(passwd) = std::fs::read_to_string("/etc/passwd") {
        for line in passwd.lines() {
            if let Some(home) = line.split(':').nth(5) {
                let home = PathBuf::from(home);
                if home.is_absolute() && home != Path::new("/") && !homes.contains(&home) && home.is_dir() {
                    homes.push(home);
                }
            }
        }
    }
    homes
}

/// The files under `roots` by (device in the kernel's encoding, inode), each with the path it
/// was found under. Missing roots are skipped: a credential file may appear later.
pub fn scan(roots: &[PathBuf]) -> HashMap<(u32, u64), String> {
    let mut found = HashMap::new();
    for root in roots {
        let mut budget = MAX_FILES_PER_ROOT;
        walk(root, 0, &mut budget, &mut found);
    }
    found
}

fn walk(path: &Path, depth: usize, budget: &mut usize, found: &mut HashMap<(u32, u64), String>) {
    if *budget == 0 {
        return;
    }
    // Follows symlinks: the inode the kernel sees on open is the target's.
    let Ok(meta) = std::fs::metadata(path) else { return };
    if meta.is_file() {
        *budget -= 1;
        found.entry((kernel_dev(meta.dev()), meta.ino())).or_insert_with(|| path.display().to_string());
    } else if meta.is_dir() && depth < MAX_DEPTH {
        let Ok(entries) = std::fs::read_dir(path) else { return };
        let mut children: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        children.sort();
        for child in children {
            walk(&child, depth + 1, budget, found);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_files_through_symlinks_once_per_inode() {
        let dir = std::env::temp_dir().join(format!("monitor-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("d/sub")).unwrap();
        std::fs::write(dir.join("d/a"), "x").unwrap();
        std::fs::write(dir.join("d/sub/b"), "y").unwrap();
        std::os::unix::fs::symlink(dir.join("d/a"), dir.join("link")).unwrap();
        let found = scan(&[dir.join("link"), dir.join("d"), dir.join("missing")]);
        assert_eq!(found.len(), 2, "{found:?}");
        let a = std::fs::metadata(dir.join("d/a")).unwrap();
        assert_eq!(found[&(kernel_dev(a.dev()), a.ino())], dir.join("link").display().to_string());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn device_numbers_use_the_kernel_encoding() {
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(259, 300)), (259 << 20) | 300);
    }
}
