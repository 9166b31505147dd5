//! Declared token files that change while their session is known: a rotated credential
//! (Kubernetes projects a new service-account token about every hour, by swapping a symlink to
//! a new directory), a file rewritten in place, or one that could not be read at start and now
//! can. Each declared file is looked at every few seconds (a stat through its symlinks: another
//! inode, size or modification time is a change), and a new value becomes the session's too:
//! its fingerprint for the engine, as an event the trace keeps (so a replay knows it at the same
//! point), and its hash for the kernel's scan of exec environments. The values before stay the
//! session's: a copy of the old token used after the end is still caught.

use std::{os::unix::fs::MetadataExt as _, time::Duration};

use super::control::{trim_newline, ControlPlane};
use crate::event::{Event, SessionKey};

/// How often the declared token files are looked at. Kubernetes rotates a projected token
/// when 80% of its life (an hour by default) has passed; a new token's first use within this
/// long after its rotation is matched once this has caught it up.
const POLL: Duration = Duration::from_secs(2);

/// The declared token files of the sessions the agent knows.
#[derive(Default)]
pub struct TokenFiles {
    files: std::sync::Mutex<Vec<Watched>>,
}

struct Watched {
    key: SessionKey,
    path: String,
    /// What the file was when last read; None when it could not be.
    stamp: Option<Stamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

fn stamp(path: &str) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.len(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
    })
}

impl TokenFiles {
    /// Looks after the token files of session `key` (`file:PATH` sources) from their state now,
    /// whose values the session just read.
    pub fn add<'a>(&self, key: SessionKey, sources: impl IntoIterator<Item = &'a str>) {
        self.push(key, sources, true);
    }

    /// The same for a session taken over from a previous agent: each file is read again at the
    /// next look, since it may have been rotated while no agent ran.
    pub fn adopt<'a>(&self, key: SessionKey, sources: impl IntoIterator<Item = &'a str>) {
        self.push(key, sources, false);
    }

    fn push<'a>(&self, key: SessionKey, sources: impl IntoIterator<Item = &'a str>, read_now: bool) {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        for path in sources.into_iter().filter_map(|s| s.strip_prefix("file:")) {
            let stamp = if read_now { stamp(path) } else { None };
            files.push(Watched { key, path: path.to_string(), stamp });
        }
    }

    /// The files that changed since they were last read, of the sessions `known` still knows
    /// (the others are dropped).
    fn changed(&self, known: impl Fn(SessionKey) -> bool) -> Vec<(SessionKey, String)> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.retain(|w| known(w.key));
        let mut out = Vec::new();
        for w in files.iter_mut() {
            let now = stamp(&w.path);
            if now.is_some() && now != w.stamp {
                w.stamp = now;
                out.push((w.key, w.path.clone()));
            }
        }
        out
    }
}

/// Looks at the declared token files every [`POLL`], for as long as the agent runs.
pub async fn run(plane: ControlPlane) {
    let mut interval = tokio::time::interval(POLL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let changed = plane.token_files.changed(|key| plane.credentials.has_session(key));
        let mut rotated = Vec::new();
        for (key, path) in changed {
            let Ok(raw) = std::fs::read(&path) else { continue };
            let value = trim_newline(&raw);
            if value.is_empty() {
                continue;
            }
            let fingerprint = plane.key.fingerprint(value);
            // False when the value is known already (the file was touched, not rotated).
            if !plane.credentials.learn(key, plane.credentials.token_hash(value), fingerprint.clone()) {
                continue;
            }
            tracing::info!(key, path, "a declared token file holds a new value: it is the session's too");
            let source = format!("file:{path}");
            rotated.push(Event::TokenRotated { ts: crate::host::now_ns(), key, source, fingerprint });
        }
        if rotated.is_empty() {
            continue;
        }
        plane.core.apply(rotated).await;
        plane.look_for_tokens().await;
    }
}
