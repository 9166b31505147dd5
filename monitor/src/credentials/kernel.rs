//! Writing the watch list and the token hashes into the kernel's maps.

use std::collections::{BTreeMap, HashMap, HashSet};

use monitor_common::{
    WatchedDevs, CONFIG_TOKEN_COUNT, CONFIG_TOKEN_SEED, CONFIG_WATCH_COUNT, TOKEN_HASHES_CAPACITY, WATCHED_DEVS,
};

use crate::probes::KernelMaps;

impl KernelMaps {
    /// Makes `TOKEN_HASHES` hold `hashes` (as many as it can, in their order); the count tells
    /// every exec whether to scan. Returns whether any token is now looked for.
    pub fn sync_token_hashes(&mut self, seed: u64, hashes: &[u64]) -> bool {
        let _ = self.config.set(CONFIG_TOKEN_SEED, seed, 0);
        let wanted: HashSet<u64> = hashes.iter().copied().collect();
        let stale: Vec<u64> = self.token_hashes_held.iter().copied().filter(|h| !wanted.contains(h)).collect();
        for hash in stale {
            let _ = self.token_hashes.remove(&hash);
            self.token_hashes_held.remove(&hash);
        }
        let mut left_out = 0usize;
        for hash in hashes {
            if self.token_hashes_held.contains(hash) {
                continue;
            }
            match self.token_hashes.insert(hash, 1, 0) {
                Ok(()) => {
                    self.token_hashes_held.insert(*hash);
                }
                Err(_) => left_out += 1,
            }
        }
        if left_out > 0 {
            tracing::warn!(
                left_out,
                "the kernel's token list is full ({TOKEN_HASHES_CAPACITY}): these tokens are not looked for in exec environments (on the wire and in command lines they are)"
            );
        }
        let count = self.token_hashes_held.len() as u64;
        let _ = self.config.set(CONFIG_TOKEN_COUNT, count, 0);
        count > 0
    }

    /// Makes `WATCHED_INODES` hold exactly the files of `watched`.
    pub fn sync_watched(&mut self, watched: &HashMap<(u32, u64), String>) {
        let mut by_ino: BTreeMap<u64, WatchedDevs> = BTreeMap::new();
        for (dev, ino) in watched.keys() {
            let slot = by_ino.entry(*ino).or_default();
            match slot.devs.iter().position(|d| *d == 0) {
                Some(free) => slot.devs[free] = *dev,
                None => tracing::warn!(ino, "more than {WATCHED_DEVS} watched files share an inode number"),
            }
        }
        let stale: Vec<u64> =
            self.watched_inodes.keys().filter_map(Result::ok).filter(|i| !by_ino.contains_key(i)).collect();
        for ino in stale {
            let _ = self.watched_inodes.remove(&ino);
        }
        let mut count = 0u64;
        for (ino, devs) in &by_ino {
            match self.watched_inodes.insert(ino, devs, 0) {
                Ok(()) => count += 1,
                Err(e) => tracing::warn!("credential watch list full, a file is not watched: {e}"),
            }
        }
        let _ = self.config.set(CONFIG_WATCH_COUNT, count, 0);
    }
}
