//! What runs inside the guest: the mounts a host gives the agent (cgroup2, bpffs, tracefs), the
//! kernel's own modules where modprobe looks, then each test binary, its output framed on the
//! console for the host to read.

use std::{fmt::Write as _, path::Path};

use super::TestBinary;

/// Markers on the console; the host reads nothing else as a result.
pub const BEGIN: &str = "VMTEST BEGIN ";
pub const END: &str = "VMTEST END ";
pub const UNSUPPORTED: &str = "VMTEST UNSUPPORTED ";
pub const READY: &str = "VMTEST READY ";

/// The guest's init script.
pub fn script(
    modules: &Path,
    release: &str,
    binaries: &[TestBinary],
    env: &[(String, String)],
    binary_timeout_s: u64,
) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Results on the second serial port; the kernel's messages stay on the first.
exec > /dev/ttyS1 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
# Podman's overlay storage cannot sit on the guest's root, itself an overlay: its own tmpfs.
mkdir -p /var/lib/containers && mount -t tmpfs containers /var/lib/containers
ip link set lo up
hostname vmtest
ulimit -n 65536
"#,
    );
    let _ =
        writeln!(s, "mkdir -p /lib/modules/{release} && mount --bind '{}' /lib/modules/{release}", modules.display());
    for (key, value) in env {
        let _ = writeln!(s, "export {key}='{}'", value.replace('\'', "'\\''"));
    }
    let _ = writeln!(s, "echo \"{READY}$(uname -r)\"");
    s.push_str("mkdir -p /tmp/vmtest\n");
    for binary in binaries {
        let name = &binary.name;
        let _ = writeln!(
            s,
            "echo '{BEGIN}{name}'\n\
             export MONITOR_TEST_UNSUPPORTED=/tmp/vmtest/{name}.unsupported\n\
             touch /tmp/vmtest/{name}.start\n\
             cd '{dir}' && timeout {binary_timeout_s} '{path}' --test-threads=2 --color=never > /tmp/vmtest/{name}.out 2>&1\n\
             rc=$?\n\
             cat /tmp/vmtest/{name}.out\n\
             # The guest's writes are gone when it stops: a failed file's agents say what they did (all\n\
             # but their debug lines: the probes loaded and attached, warnings, errors).\n\
             [ $rc -eq 0 ] || for log in $(find '{dir}/../target/test-scratch' -name agent.log -newer /tmp/vmtest/{name}.start); do \
               echo \"VMTEST LOG $log\"; grep -v -E ' (DEBUG|TRACE) ' \"$log\" | head -60; done\n\
             sed 's/^/{UNSUPPORTED}/' /tmp/vmtest/{name}.unsupported 2>/dev/null\n\
             echo \"{END}{name} $rc\"",
            dir = binary.dir.display(),
            path = binary.path.display(),
        );
    }
    // Power off (the VM exits): sysrq needs no init system.
    s.push_str("echo o > /proc/sysrq-trigger\nsleep 30\n");
    s
}
