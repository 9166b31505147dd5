//! Builds monitor-ebpf for the BPF target and embeds it (see ../shared/TOOLCHAIN.md).
//!
//! The eBPF crate is compiled by a nested cargo under the rustup toolchain named by
//! `MONITOR_BPF_TOOLCHAIN` (default `debian-bpf`, which `cargo xtask setup` links to Debian's
//! Rust with a precompiled `core` for bpfel). A machine with nightly and rust-src can set
//! `MONITOR_BPF_TOOLCHAIN=nightly`.
use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=MONITOR_BPF_TOOLCHAIN");
    let toolchain = std::env::var("MONITOR_BPF_TOOLCHAIN").unwrap_or_else(|_| "debian-bpf".into());
    let metadata_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("monitor has no parent directory"))?
        .join("monitor-ebpf");
    let root_dir = metadata_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [Package { name: "monitor-ebpf", root_dir, ..Default::default() }],
        Toolchain::Custom(&toolchain),
    )
    .context("building monitor-ebpf: run `cargo xtask setup` first (it installs the BPF toolchain)")
}
