//! Keeping the agent's resident memory to what it uses. Its start reads large things once (the
//! kernel's BTF while loading the probes, the symbol tables of Go executables while probing
//! them, thousands of sessions while adopting them), and glibc's allocator keeps what was freed:
//! after a large buffer is freed it raises its mmap threshold (so the next ones come from a
//! heap and stay there), and each thread that allocates gets an arena of its own. A DaemonSet
//! agent on every node is judged by its RSS, so it bounds both and gives the free pages back
//! after each such phase.

/// Allocations above this are mapped on their own and unmapped when freed (glibc's
/// starting threshold, kept fixed instead of growing).
const MMAP_THRESHOLD: i32 = 256 << 10;
/// Arenas at most (glibc's default is 8 per core): the agent's threads are mostly idle, and
/// with one arena the free space that one thread leaves is the next one's (measured at 10,000
/// sessions: 2-3 MB less resident than with two).
const ARENA_MAX: i32 = 1;
/// How often the allocator's free space is looked at.
const LOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// Free bytes inside the heap above which the free pages are handed back.
const GIVE_BACK_ABOVE: usize = 1 << 20;

/// Before any thread starts.
pub fn bound_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}

/// Returns the allocator's free pages to the kernel, after a phase that allocated much.
pub fn give_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim is thread-safe and only releases memory no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Hands the allocator's free pages back whenever more than [`GIVE_BACK_ABOVE`] bytes lie free
/// inside its heap: a burst of session starts leaves freed request and event buffers between
/// the sessions' records, pages glibc otherwise keeps (2-3 MB at 10,000 sessions). Looking costs
/// a walk of the allocator's bins every [`LOOK_EVERY`].
pub async fn keep_lean() {
    let mut every = tokio::time::interval(LOOK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if free_in_heap() > GIVE_BACK_ABOVE {
            give_back();
        }
    }
}

fn free_in_heap() -> usize {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    unsafe {
        libc::mallinfo2().fordblks
    }
    #[cfg(not(target_env = "gnu"))]
    0
}
