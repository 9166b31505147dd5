//! A Debian kernel from the archive, ready to boot: its package downloaded and unpacked under
//! target/vm/kernels/, its modules indexed (depmod), and an initramfs that mounts this machine's
//! root filesystem over virtiofs, read-only, under a writable tmpfs overlay.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};

use crate::setup::sh;

/// What the initramfs loads, with what they need, when the kernel has them as modules (6.1 has
/// virtio_pci, fuse and virtiofs as modules; 6.12 builds them in).
const BOOT_MODULES: &[&str] = &["virtio_pci", "virtiofs", "overlay"];

/// The initramfs's /init: busybox, the boot modules, then the host's root filesystem as a
/// read-only lower layer with the guest's writes kept in RAM, and the run script named on the
/// kernel command line (`vmtest.script=`) as the real init.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules); do insmod /lib/$m || echo "VMTEST insmod $m failed"; done
fail() { echo "VMTEST BOOT FAILED: $1"; echo o > /proc/sysrq-trigger; sleep 10; }
mount -t virtiofs -o ro host /lower || fail "virtiofs mount"
mount -t tmpfs -o size=75% upper /upper && mkdir /upper/data /upper/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work /newroot || fail "overlay mount"
script=$(sed -n 's/.*vmtest.script=\([^ ]*\).*/\1/p' /proc/cmdline)
umount /proc /sys /dev
exec switch_root /newroot /bin/sh "$script"
"#;

/// One kernel of the matrix, unpacked.
pub struct Kernel {
    /// As the user names it: `6.1`, `6.12`.
    pub name: String,
    /// The package's kernel release, e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    pub image: PathBuf,
    pub initramfs: PathBuf,
    /// lib/modules/<release> of the package, bind-mounted where the guest's modprobe looks.
    pub modules: PathBuf,
}

impl Kernel {
    /// The newest cloud kernel of the series `name` in the archive, fetched once.
    pub fn fetch(root: &Path, name: &str) -> anyhow::Result<Self> {
        let package = newest_package(name)?;
        let dir = root.join("target/vm/kernels").join(&package);
        let unpacked = dir.join("unpacked");
        if !unpacked.join("boot").is_dir() {
            eprintln!("vm-test: fetching {package}");
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir)?;
            // apt's sandbox user cannot write into target/: download as root, on purpose.
            sh(Command::new("apt-get")
                .args(["download", "-q", "-o", "APT::Sandbox::User=root", &package])
                .current_dir(&dir))?;
            let deb = fs::read_dir(&dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|e| e == "deb"))
                .with_context(|| format!("apt-get download {package} left no .deb in {}", dir.display()))?;
            let partial = dir.join("partial");
            sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
            fs::rename(&partial, &unpacked)?;
            fs::remove_file(deb)?;
        }
        let modules_root = unpacked.join("lib/modules");
        let release = fs::read_dir(&modules_root)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .next()
            .with_context(|| format!("{} is empty", modules_root.display()))?;
        let modules = modules_root.join(&release);
        if !modules.join("modules.dep").exists() {
            sh(Command::new("depmod").arg("-b").arg(&unpacked).arg(&release))?;
        }
        let image = unpacked.join("boot").join(format!("vmlinuz-{release}"));
        let initramfs = dir.join("initramfs.cpio");
        if !initramfs.exists() {
            build_initramfs(&modules, &dir, &initramfs)?;
        }
        Ok(Self { name: name.to_string(), release, image, initramfs, modules })
    }
}

/// `linux-image-<series>...-cloud-amd64` with the highest version the archive has.
fn newest_package(series: &str) -> anyhow::Result<String> {
    let pattern = match series {
        "6.1" => r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$",
        "6.12" => r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$",
        other => bail!("--kernel {other}: one of 6.1, 6.12, host"),
    };
    let out = Command::new("apt-cache").args(["search", "--names-only", pattern]).output()?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    names.sort_by_key(|n| version_key(n));
    names.pop().with_context(|| format!("no package matching {pattern} in the archive (apt-get update?)"))
}

/// The numbers in a package name, in order, so `6.12.118` sorts after `6.12.99`.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect()
}

/// busybox, /init and the boot modules (decompressed: busybox's insmod reads plain .ko files),
/// as an uncompressed newc archive.
fn build_initramfs(modules: &Path, dir: &Path, out: &Path) -> anyhow::Result<()> {
    let stage = dir.join("initramfs");
    let _ = fs::remove_dir_all(&stage);
    for sub in ["bin", "lib", "proc", "sys", "dev", "lower", "upper", "newroot"] {
        fs::create_dir_all(stage.join(sub))?;
    }
    fs::copy("/bin/busybox", stage.join("bin/busybox")).context("copying /bin/busybox (busybox-static)")?;
    write_executable(&stage.join("init"), INIT)?;
    let mut order = Vec::new();
    let deps = fs::read_to_string(modules.join("modules.dep"))?;
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    for name in BOOT_MODULES {
        if !load_order(&deps, name, &mut order) && !builtin.lines().any(|l| module_name(l) == *name) {
            bail!("kernel {} has no {name}, as a module or built in", modules.display());
        }
    }
    let mut listed = String::new();
    for path in &order {
        let file = Path::new(path).file_name().context("module path")?.to_string_lossy().into_owned();
        let plain = file.trim_end_matches(".xz").trim_end_matches(".zst").to_string();
        let source = modules.join(path);
        let target = stage.join("lib").join(&plain);
        if file.ends_with(".xz") {
            decompress("xz", &source, &target)?;
        } else if file.ends_with(".zst") {
            decompress("zstd", &source, &target)?;
        } else {
            fs::copy(&source, &target)?;
        }
        listed.push_str(&plain);
        listed.push('\n');
    }
    fs::write(stage.join("modules"), listed)?;
    let partial = out.with_extension("partial");
    sh(Command::new("sh")
        .arg("-c")
        .arg(format!("find . | cpio --quiet -o -H newc > '{}'", partial.display()))
        .current_dir(&stage))?;
    fs::rename(partial, out)?;
    Ok(())
}

/// Appends `name` after what it needs (modules.dep lists each module's dependencies, the
/// deepest last); false when it is not a module of this kernel.
fn load_order(deps: &str, name: &str, order: &mut Vec<String>) -> bool {
    let Some(line) = deps.lines().find(|l| l.split(':').next().is_some_and(|p| module_name(p) == name)) else {
        return false;
    };
    let (path, needs) = line.split_once(':').unwrap_or((line, ""));
    for need in needs.split_whitespace().rev() {
        if !order.iter().any(|p| p == need) {
            order.push(need.to_string());
        }
    }
    if !order.iter().any(|p| p == path) {
        order.push(path.to_string());
    }
    true
}

/// `kernel/fs/fuse/virtiofs.ko.xz` → `virtiofs`.
fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file)
}

fn decompress(tool: &str, source: &Path, target: &Path) -> anyhow::Result<()> {
    let out = Command::new(tool).arg("-dc").arg(source).output().with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed: {}", source.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(fs::write(target, out.stdout)?)
}

pub fn write_executable(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, text)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_load_first_and_once() {
        let deps = "kernel/drivers/virtio/virtio_ring.ko:\n\
            kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
            kernel/fs/fuse/fuse.ko:\n\
            kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko\n\
            kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n";
        let mut order = Vec::new();
        assert!(load_order(deps, "virtio_pci", &mut order));
        assert!(load_order(deps, "virtiofs", &mut order));
        assert!(!load_order(deps, "overlay", &mut order));
        let names: Vec<&str> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(names, ["virtio_ring", "virtio", "virtio_pci", "fuse", "virtiofs"]);
    }

    #[test]
    fn newer_versions_sort_last() {
        let mut names = vec!["linux-image-6.12.99+deb12-cloud-amd64", "linux-image-6.12.118+deb12-cloud-amd64"];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names[1], "linux-image-6.12.118+deb12-cloud-amd64");
    }
}
