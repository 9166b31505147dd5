//! Kubernetes terms for a process, read from its cgroup v2 path: the pod's uid, the container's
//! id and the pod's QoS class, as the kubelet lays cgroups out with either cgroup driver:
//!
//! ```text
//! cgroupfs: /kubepods/burstable/pod<uid>/<container id>
//! systemd:  /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, _ for ->.slice/cri-containerd-<id>.scope
//! ```
//!
//! Guaranteed pods sit right under kubepods (no QoS level). A kubelet in a container (kind, a
//! nested runtime) prefixes the path; the layout is found wherever `kubepods` starts.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct K8sRef {
    pub pod_uid: String,
    /// The container's id (none for the pod's own cgroup, where no container is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// `guaranteed`, `burstable` or `besteffort`.
    pub qos: String,
}

/// The Kubernetes terms of a cgroup path, if it is a pod's or a pod's container's.
pub fn from_cgroup_path(path: &str) -> Option<K8sRef> {
    let mut segments = path.split('/').skip_while(|s| *s != "kubepods" && *s != "kubepods.slice");
    segments.next()?;
    let mut qos = None;
    let mut pod_uid = None;
    let mut container_id = None;
    for segment in segments {
        if pod_uid.is_none() {
            if let Some(class) = qos_of(segment) {
                qos = Some(class);
            } else if let Some(uid) = pod_of(segment) {
                pod_uid = Some(uid);
            } else {
                return None;
            }
        } else {
            container_id = container_of(segment);
            break;
        }
    }
    Some(K8sRef { pod_uid: pod_uid?, container_id, qos: qos.unwrap_or("guaranteed").to_string() })
}

fn qos_of(segment: &str) -> Option<&'static str> {
    match segment {
        "burstable" | "kubepods-burstable.slice" => Some("burstable"),
        "besteffort" | "kubepods-besteffort.slice" => Some("besteffort"),
        _ => None,
    }
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid with _>.slice` (systemd).
fn pod_of(segment: &str) -> Option<String> {
    let uid = match segment.strip_suffix(".slice") {
        Some(unit) => unit.rsplit_once("-pod")?.1.replace('_', "-"),
        None => segment.strip_prefix("pod")?.to_string(),
    };
    let plausible = !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    plausible.then_some(uid)
}

/// `<id>` (cgroupfs) or `<runtime>-<id>.scope` (systemd: cri-containerd-, crio-, docker-).
fn container_of(segment: &str) -> Option<String> {
    let id = match segment.strip_suffix(".scope") {
        Some(unit) if unit.contains("conmon") => return None,
        Some(unit) => unit.rsplit_once('-')?.1,
        None => segment,
    };
    let plausible = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_hexdigit());
    plausible.then(|| id.to_string())
}

/// Cgroup paths by cgroup id (the cgroup v2 directory's inode), for processes already gone.
pub struct CgroupPaths {
    root: PathBuf,
    known: HashMap<u64, Option<String>>,
}

/// Ids remembered; past it the cache starts over (a node's cgroups are far fewer).
const KNOWN_MAX: usize = 65_536;

impl CgroupPaths {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf(), known: HashMap::new() }
    }

    /// The path of a process's cgroup: from /proc while it runs, else by its id.
    pub fn path_of(&mut self, pid: u32, id: u64) -> Option<String> {
        if let Some(path) = proc_cgroup(pid) {
            return Some(path);
        }
        if id == 0 {
            return None;
        }
        if let Some(known) = self.known.get(&id) {
            return known.clone();
        }
        if self.known.len() >= KNOWN_MAX {
            self.known.clear();
        }
        let found = find_by_inode(&self.root, id, 0).map(|p| {
            let relative = p.strip_prefix(&self.root).unwrap_or(&p).to_string_lossy().into_owned();
            format!("/{relative}")
        });
        self.known.insert(id, found.clone());
        found
    }
}

/// The cgroup v2 path of a running process (`0::/path` in /proc/PID/cgroup).
fn proc_cgroup(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}

/// The cgroup directory whose inode is `id`, under `dir`. Only the kubelet's subtrees are
/// walked once past the top levels, so a busy host's other cgroups cost nothing.
fn find_by_inode(dir: &Path, id: u64, depth: usize) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    if depth > 8 {
        return None;
    }
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_dir() {
            continue;
        }
        let path = entry.path();
        if meta.ino() == id {
            return Some(path);
        }
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let worth = depth < 3 || path.to_string_lossy().contains("kubepods") || name.ends_with(".slice");
        if worth {
            if let Some(found) = find_by_inode(&path, id, depth + 1) {
                return Some(found);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8dbf2f1e-6b1c-4a4c-9e0e-0c1e2b3a4d5f";
    const CID: &str = "4f1e3c0b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";

    fn k8s(uid: &str, cid: Option<&str>, qos: &str) -> Option<K8sRef> {
        Some(K8sRef { pod_uid: uid.into(), container_id: cid.map(Into::into), qos: qos.into() })
    }

    #[test]
    fn both_cgroup_drivers_and_every_qos_class() {
        let systemd_uid = UID.replace('-', "_");
        let cases = [
            (format!("/kubepods/burstable/pod{UID}/{CID}"), k8s(UID, Some(CID), "burstable")),
            (format!("/kubepods/besteffort/pod{UID}/{CID}"), k8s(UID, Some(CID), "besteffort")),
            (format!("/kubepods/pod{UID}/{CID}"), k8s(UID, Some(CID), "guaranteed")),
            (format!("/kubepods/pod{UID}"), k8s(UID, None, "guaranteed")),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/cri-containerd-{CID}.scope"),
                k8s(UID, Some(CID), "burstable"),
            ),
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice/crio-{CID}.scope"),
                k8s(UID, Some(CID), "besteffort"),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{systemd_uid}.slice/docker-{CID}.scope"),
                k8s(UID, Some(CID), "guaranteed"),
            ),
            // A kubelet in a container (kind): the node's own prefix first.
            (
                format!("/system.slice/docker-abc.scope/kubepods/burstable/pod{UID}/{CID}"),
                k8s(UID, Some(CID), "burstable"),
            ),
            // CRI-O's monitor process is not the container.
            (
                format!("/kubepods.slice/kubepods-pod{systemd_uid}.slice/crio-conmon-{CID}.scope"),
                k8s(UID, None, "guaranteed"),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(from_cgroup_path(&path), want, "{path}");
        }
    }

    #[test]
    fn other_cgroups_are_not_pods() {
        for path in [
            "/",
            "/user.slice/user-1000.slice/session-2.scope",
            "/system.slice/kubelet.service",
            "/kubepods",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable/notapod/x",
            "/kubepods/pod../etc",
            "/mykubepods/pod1234",
        ] {
            assert_eq!(from_cgroup_path(path), None, "{path}");
        }
    }
}
