//! What the agent and the collector read of their host: the wall clock, the host name, their
//! own CPU time and memory, and device numbers as the kernel writes them.

/// This host's name, as alerts carry it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// The process's own CPU time and resident memory, from /proc.
pub struct Usage {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
}

pub fn self_usage() -> Option<Usage> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    Some(Usage {
        cpu_seconds: (utime + stime) as f64 / ticks.max(1) as f64,
        resident_bytes: resident_pages * page.max(1) as u64,
    })
}

/// Wall-clock nanoseconds since the epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// `st_dev` (the userspace encoding) to the kernel's `s_dev` (major << 20 | minor).
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = libc::major(st_dev);
    let minor = libc::minor(st_dev);
    (major << 20) | (minor & 0xf_ffff)
}

/// Whether the running kernel's release (`uname -r`) is at least `major.minor`; false when it
/// cannot be read.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    // SAFETY: all-zero is a valid utsname; uname fills it.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a utsname.
    if unsafe { libc::uname(&mut name) } != 0 {
        return false;
    }
    let release: String = name.release.iter().take_while(|&&c| c != 0).map(|&c| c as u8 as char).collect();
    release_at_least(&release, major, minor)
}

fn release_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut numbers = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_releases_compare_by_major_then_minor() {
        use super::release_at_least;
        assert!(release_at_least("6.18.44-cloud", 6, 6));
        assert!(release_at_least("6.6.0", 6, 6));
        assert!(!release_at_least("6.1.0-57-cloud-amd64", 6, 6));
        assert!(!release_at_least("5.15.0", 6, 6));
        assert!(release_at_least("7.0.0", 6, 6));
        assert!(!release_at_least("garbage", 6, 6));
    }
}
