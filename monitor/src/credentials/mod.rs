//! Credentials: which files and tokens belong to which sessions, what the kernel must watch for,
//! and turning the kernel's credential observations into events that carry only fingerprints.
//!
//! Raw secret values stop here. A token's value reaches the agent twice: once when a session
//! starts (from the control socket or the token file), where it becomes a keyed fingerprint and
//! a seeded kernel prefilter hash, and once on the wire (a request's header), where it becomes a
//! fingerprint before the request is dropped. Neither is ever logged, stored or sent.

pub mod argv;
pub mod fanotify;
pub mod h2;
pub mod http;
pub mod jwt;
mod kernel;
pub mod proc_connector;
pub mod token_response;
pub mod watch;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, RwLock},
};

pub use crate::event::{CredentialKind, JwtClaims};
use fanotify::FileAccessWatch;
use monitor_common::token_hash;

use crate::{
    decode::Decoded,
    event::{Actor, CredentialOpen, Event, SeenCredential, SessionKey, TokenUse, TokenVia},
    sessions::fingerprint::FingerprintKey,
};

/// What the credential probes look for, shared by the control plane (which adds sessions), the
/// watch task (which rescans files) and the reader (which resolves observations).
pub struct CredentialIndex {
    seed: u64,
    inner: RwLock<Inner>,
    /// Bumped whenever a session's tokens or paths change (see `generation`).
    changes: std::sync::atomic::AtomicU64,
    /// Reads and writes of the watched files, when fanotify is in use (the default; the
    /// `sys_exit_openat` tracepoints are the opt-in alternative).
    files: Option<FileAccessWatch>,
}

impl std::fmt::Debug for CredentialIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialIndex").field("files", &self.files.is_some()).finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// What each session of this host holds; `None` for the many that name neither a token
    /// nor a credential file (an entry then costs its key and a word, on nodes with thousands
    /// of sessions).
    sessions: BTreeMap<SessionKey, Option<Box<SessionCredentials>>>,
    /// Every watched file by (device in the kernel's encoding, inode), with its path.
    watched: HashMap<(u32, u64), String>,
    /// Other hosts' sessions' tokens (the fleet watchlist).
    remote: RemoteTokens,
}

#[derive(Debug, Default, Clone)]
struct SessionCredentials {
    /// Kernel hash of a token value -> its fingerprint.
    tokens: Vec<(u64, String)>,
    /// Credential paths named by the session (scope and token files).
    paths: Vec<String>,
}

impl Inner {
    fn tokens(&self) -> impl Iterator<Item = &(u64, String)> {
        self.sessions.values().flatten().flat_map(|c| &c.tokens)
    }
}

/// Other hosts' sessions (by `HOST/ID`): each token's fingerprint, and its kernel hash when it
/// was made with this agent's seed; indexed both ways, since a fleet's watchlist runs to
/// thousands of sessions and every request on the wire is looked up.
#[derive(Debug, Default)]
struct RemoteTokens {
    sessions: BTreeMap<String, Vec<(Option<u64>, String)>>,
    /// How many sessions hold each fingerprint.
    fingerprints: HashMap<String, u32>,
    /// Kernel hash -> (fingerprint, how many sessions hold it).
    hashes: HashMap<u64, (String, u32)>,
}

impl RemoteTokens {
    fn set(&mut self, key: String, tokens: Vec<(Option<u64>, String)>) -> bool {
        if self.sessions.get(&key) == Some(&tokens) {
            return false;
        }
        self.remove(&key);
        for (hash, fingerprint) in &tokens {
            *self.fingerprints.entry(fingerprint.clone()).or_default() += 1;
            if let Some(hash) = hash {
                self.hashes.entry(*hash).or_insert_with(|| (fingerprint.clone(), 0)).1 += 1;
            }
        }
        self.sessions.insert(key, tokens);
        true
    }

    fn remove(&mut self, key: &str) -> bool {
        let Some(tokens) = self.sessions.remove(key) else { return false };
        for (hash, fingerprint) in tokens {
            if let Some(n) = self.fingerprints.get_mut(&fingerprint) {
                *n -= 1;
                if *n == 0 {
                    self.fingerprints.remove(&fingerprint);
                }
            }
            if let Some((_, n)) = hash.and_then(|h| self.hashes.get_mut(&h)) {
                *n -= 1;
                if *n == 0 {
                    self.hashes.remove(&hash.unwrap_or_default());
                }
            }
        }
        true
    }
}

impl CredentialIndex {
    /// `seed` seeds the kernel's token hash (random per agent start); `files` watches the
    /// credential files (see fanotify.rs).
    pub fn new(seed: u64, files: Option<FileAccessWatch>) -> Arc<Self> {
        Arc::new(Self { seed, inner: RwLock::new(Inner::default()), changes: Default::default(), files })
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The kernel prefilter hash of a token value.
    pub fn token_hash(&self, value: &[u8]) -> u64 {
        token_hash(self.seed, value)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A number that changes whenever the sessions' tokens or paths have. Bumped while the
    /// write lock is held, after the change: whoever reads the new number then reads the data.
    pub fn generation(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    fn changed(&self) {
        self.changes.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Registers a session's tokens (kernel hash, fingerprint) and credential paths.
    pub fn add_session(&self, key: SessionKey, tokens: Vec<(u64, String)>, paths: Vec<String>) {
        let held = (!tokens.is_empty() || !paths.is_empty()).then(|| Box::new(SessionCredentials { tokens, paths }));
        self.write().sessions.insert(key, held);
        self.changed();
    }

    /// Adds a credential a session learnt (see engine/credentials.rs) to what the probes look
    /// for; false when it was known already or the session has learnt too many.
    pub fn learn(&self, key: SessionKey, hash: u64, fingerprint: String) -> bool {
        let mut inner = self.write();
        if inner.tokens().any(|(_, f)| *f == fingerprint) {
            return false;
        }
        let tokens = &mut inner.sessions.entry(key).or_default().get_or_insert_default().tokens;
        if tokens.len() >= crate::engine::LEARNED_PER_SESSION {
            return false;
        }
        tokens.push((hash, fingerprint));
        self.changed();
        true
    }

    /// A session's tokens (kernel hash, fingerprint) and credential paths, for the state
    /// directory.
    pub fn session_tokens(&self, key: SessionKey) -> (Vec<(u64, String)>, Vec<String>) {
        let held = self.read().sessions.get(&key).cloned().flatten().unwrap_or_default();
        (held.tokens, held.paths)
    }

    /// Whether the session is known (not forgotten yet).
    pub fn has_session(&self, key: SessionKey) -> bool {
        self.read().sessions.contains_key(&key)
    }

    pub fn forget_session(&self, key: SessionKey) {
        self.write().sessions.remove(&key);
        self.changed();
    }

    /// Every token hash the kernel should look for in exec environments, this host's sessions'
    /// first (the kernel's list is bounded: other hosts' come after).
    pub fn token_hashes(&self) -> Vec<u64> {
        let inner = self.read();
        let mut seen = HashSet::new();
        let local = inner.tokens().map(|(hash, _)| *hash);
        local.chain(inner.remote.hashes.keys().copied()).filter(|h| seen.insert(*h)).collect()
    }

    /// Sets what another host's session holds (the fleet watchlist, `key` `HOST/ID`): its tokens
    /// are looked for like this host's sessions' ones, on the wire, in command lines and, where
    /// `hash` is usable here, in exec environments.
    pub fn set_remote(&self, key: String, tokens: Vec<(Option<u64>, String)>) {
        if self.write().remote.set(key, tokens) {
            self.changed();
        }
    }

    pub fn forget_remote(&self, key: &str) {
        if self.write().remote.remove(key) {
            self.changed();
        }
    }

    /// How many other hosts' sessions are looked for.
    pub fn remote_sessions(&self) -> usize {
        self.read().remote.sessions.len()
    }

    /// Every path sessions name (to be watched besides the well-known ones).
    pub fn session_paths(&self) -> Vec<String> {
        self.read().sessions.values().flatten().flat_map(|c| c.paths.iter().cloned()).collect()
    }

    /// Replaces the watched files (after a scan) and moves the file marks to them.
    pub fn set_watched(&self, watched: HashMap<(u32, u64), String>) {
        if let Some(files) = &self.files {
            files.sync(&watched);
        }
        self.write().watched = watched;
    }

    /// Reads and writes of watched files since the last call, as events of processes whose
    /// session the engine fills in (`session` 0). Returns the events lost to a queue overflow.
    pub fn drain_file_accesses(&self, ts: crate::event::Nanos, out: &mut Vec<Event>) -> u64 {
        let Some(files) = &self.files else { return 0 };
        let mut accesses = Vec::new();
        let lost = files.drain(&mut accesses);
        // One event per process, file and kind per drain: a shell's builtin `read` reads a
        // byte at a time.
        let mut seen = HashSet::new();
        accesses.retain(|a| seen.insert(a.clone()));
        for access in accesses {
            let Some(path) = self.path_of(access.dev, access.ino) else { continue };
            let actor = Actor {
                pid: access.pid,
                tid: access.pid,
                ppid: 0,
                sid: None,
                comm: String::new(),
                exe: String::new(),
                uid: u32::MAX,
                cgroup: 0,
            };
            out.push(Event::CredentialOpen(CredentialOpen {
                ts,
                session: 0,
                actor,
                path,
                fd: -1,
                write: access.write,
            }));
        }
        lost
    }

    pub fn watched(&self) -> HashMap<(u32, u64), String> {
        self.read().watched.clone()
    }

    fn fingerprint_of_hash(&self, hash: u64) -> Option<String> {
        let inner = self.read();
        let local = inner.tokens().find(|(h, _)| *h == hash).map(|(_, f)| f.clone());
        local.or_else(|| inner.remote.hashes.get(&hash).map(|(f, _)| f.clone()))
    }

    /// Whether a session, of this host or (the fleet watchlist) of another, holds the token.
    pub fn is_session_token(&self, fingerprint: &str) -> bool {
        let inner = self.read();
        inner.tokens().any(|(_, f)| f == fingerprint) || inner.remote.fingerprints.contains_key(fingerprint)
    }

    fn path_of(&self, dev: u32, ino: u64) -> Option<String> {
        self.read().watched.get(&(dev, ino)).cloned()
    }
}

/// Turns the kernel's credential observations into events (in the reader, before the engine).
pub struct Observer {
    index: Arc<CredentialIndex>,
    key: Arc<FingerprintKey>,
    /// The policy in force: its API-key headers and token learning, taken again after a reload.
    policy: tokio::sync::watch::Receiver<Arc<crate::policy::Policy>>,
    api_key_headers: Vec<String>,
    /// Whether credentials session processes send or receive are learnt (the policy's
    /// `credentials.learn_tokens`).
    learn_tokens: bool,
    /// The HTTP/2 connections followed, each with its HPACK decoder.
    h2: h2::Connections,
    /// Where each TLS connection goes, by (pid, conn), once the probes said.
    tls_peers: HashMap<(u32, u64), std::net::SocketAddr>,
    /// Token uses from TLS writes whose connection's peer is not known yet: it follows the write
    /// in the ring buffer, from the first segment the write sends.
    awaiting_peer: Vec<((u32, u64), Event)>,
    /// The token responses session processes are reading, until each is whole.
    responses: token_response::Responses,
}

/// TLS connections whose peer is remembered; past this the table starts over.
const TLS_PEERS: usize = 16_384;

impl Observer {
    pub fn new(
        index: Arc<CredentialIndex>,
        key: Arc<FingerprintKey>,
        mut policy: tokio::sync::watch::Receiver<Arc<crate::policy::Policy>>,
    ) -> Self {
        let (api_key_headers, learn_tokens) = Self::settings(&policy.borrow_and_update());
        Self {
            index,
            key,
            policy,
            api_key_headers,
            learn_tokens,
            h2: h2::Connections::default(),
            tls_peers: HashMap::new(),
            awaiting_peer: Vec::new(),
            responses: token_response::Responses::default(),
        }
    }

    fn settings(policy: &crate::policy::Policy) -> (Vec<String>, bool) {
        let headers = policy.credentials.api_key_headers.iter().map(|h| h.to_ascii_lowercase()).collect();
        (headers, policy.credentials.learn_tokens)
    }

    /// The events an observation gives: none for what concerns no session (an unknown token in
    /// a process outside sessions), one per credential otherwise.
    pub fn observe(&mut self, decoded: Decoded<'_>) -> Vec<Event> {
        if self.policy.has_changed().unwrap_or(false) {
            (self.api_key_headers, self.learn_tokens) = Self::settings(&self.policy.borrow_and_update());
        }
        match decoded {
            Decoded::Event(Event::Exec(mut exec)) => {
                let found = self.redact_argv(&mut exec.argv);
                if found.is_empty() {
                    return vec![Event::Exec(exec)];
                }
                let actor = Actor {
                    pid: exec.pid,
                    tid: exec.pid,
                    ppid: exec.ppid,
                    sid: exec.sid,
                    comm: String::new(),
                    exe: exec.exe.clone(),
                    uid: exec.creds.uid,
                    cgroup: exec.cgroup,
                };
                let (ts, session) = (exec.ts, exec.session);
                let mut events = vec![Event::Exec(exec)];
                for f in found {
                    let credential = SeenCredential {
                        kind: f.kind,
                        fingerprint: f.fingerprint,
                        header: None,
                        key_id: None,
                        jwt: f.jwt,
                    };
                    let via = TokenVia::Argv { index: f.index };
                    events.push(Event::TokenUse(TokenUse { ts, session, actor: actor.clone(), credential, via }));
                }
                events
            }
            Decoded::Event(Event::Exit(exit)) => {
                self.responses.forget_pid(exit.pid);
                vec![Event::Exit(exit)]
            }
            Decoded::Event(event) => vec![event],
            // The reader hands these to the executable probes (agent/executables.rs) and to the
            // DNS-over-TCP streams.
            Decoded::Executable { .. } | Decoded::DnsPiece { .. } | Decoded::Nothing => Vec::new(),
            Decoded::TlsPeer { pid, conn, dst } => {
                if self.tls_peers.len() >= TLS_PEERS {
                    self.tls_peers.clear();
                }
                self.tls_peers.insert((pid, conn), dst);
                let (ready, waiting): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut self.awaiting_peer).into_iter().partition(|(id, _)| *id == (pid, conn));
                self.awaiting_peer = waiting;
                ready.into_iter().map(|(_, event)| with_dst(event, dst)).collect()
            }
            Decoded::Received { ts, session, actor, conn, data } => self.received(ts, session, actor, conn, data),
            Decoded::FileOpen { ts, session, actor, dev, ino, fd, write } => {
                // An inode no longer watched (the list changed since the kernel saw it) is dropped.
                let Some(path) = self.index.path_of(dev, ino) else { return Vec::new() };
                vec![Event::CredentialOpen(CredentialOpen { ts, session, actor, path, fd, write })]
            }
            Decoded::EnvToken { ts, session, actor, hash, name } => {
                let Some(fingerprint) = self.index.fingerprint_of_hash(hash) else { return Vec::new() };
                let credential =
                    SeenCredential { kind: CredentialKind::Env, fingerprint, header: None, key_id: None, jwt: None };
                vec![Event::TokenUse(TokenUse { ts, session, actor, credential, via: TokenVia::Env { name } })]
            }
            Decoded::ArgvToken { ts, actor, hash, index } => {
                let Some(fingerprint) = self.index.fingerprint_of_hash(hash) else { return Vec::new() };
                let credential = SeenCredential {
                    kind: CredentialKind::Authorization,
                    fingerprint,
                    header: None,
                    key_id: None,
                    jwt: None,
                };
                vec![Event::TokenUse(TokenUse { ts, session: 0, actor, credential, via: TokenVia::Argv { index } })]
            }
            Decoded::Payload { ts, session, actor, tls, dst, conn, h2, seq, total_len, data } => {
                let wire = Wire { ts, session, actor, tls, dst };
                let events = self.payload(&wire, conn, h2, seq, total_len, data);
                if tls && !events.is_empty() {
                    // Held until the probes name the connection's peer, which they do right after
                    // the write when it is new (or its `SSL *` was reused for another socket);
                    // else, at the end of the round, the peer already known for it.
                    self.awaiting_peer.extend(events.into_iter().map(|e| ((wire.actor.pid, conn), e)));
                    return Vec::new();
                }
                events
            }
        }
    }

    /// The token uses still waiting for their connection's peer, with the peer known for it
    /// (if any): called at the end of each reading round, so nothing waits longer than one.
    pub fn take_awaiting_peer(&mut self) -> Vec<Event> {
        let awaiting = std::mem::take(&mut self.awaiting_peer);
        awaiting
            .into_iter()
            .map(|(peer, e)| match self.tls_peers.get(&peer) {
                Some(dst) => with_dst(e, *dst),
                None => e,
            })
            .collect()
    }

    /// The token uses in one captured write: an HTTP/1.x request, or part of an HTTP/2
    /// connection's frame stream.
    fn payload(&mut self, wire: &Wire, conn: u64, h2: bool, seq: Option<u32>, total: usize, data: &[u8]) -> Vec<Event> {
        let id = h2::ConnId { pid: wire.actor.pid, conn };
        if !h2 {
            // A request line: whatever the connection was before, it is HTTP/1.x now.
            self.h2.forget(id);
            let Some(request) = http::parse(data, &self.api_key_headers) else { return Vec::new() };
            return self.request_events(wire, false, &request);
        }
        let feed = self.h2.feed(id, seq, data, total);
        let mut events = Vec::new();
        for block in &feed.blocks {
            let request = http::from_h2_fields(block, &self.api_key_headers);
            events.extend(self.request_events(wire, true, &request));
        }
        if let Some(why) = feed.lost {
            // Only connections that concern a session: outside them, unknown tokens are
            // dropped anyway, and this would report every busy client on the host.
            if wire.session != 0 {
                let source = format!("HTTP/2 requests of pid {} on one connection: {why}", wire.actor.pid);
                events.push(Event::Lost { ts: wire.ts, source, count: 1, session: Some(wire.session) });
            }
        }
        events
    }

    /// Reads and writes of watched credential files since the last call (see
    /// [`CredentialIndex::drain_file_accesses`]).
    pub fn drain_file_accesses(&self, ts: crate::event::Nanos, out: &mut Vec<Event>) -> u64 {
        self.index.drain_file_accesses(ts, out)
    }

    /// Replaces the secrets in a command line by their fingerprints; returns what was found.
    pub fn redact_argv(&self, argv: &mut [String]) -> Vec<argv::ArgvCredential> {
        argv::redact(argv, &self.key, &self.api_key_headers, &|fp| self.index.is_session_token(fp))
    }

    /// The tokens of a token response a session process received: each becomes the session's.
    fn received(&mut self, ts: u64, session: SessionKey, actor: Actor, conn: u64, data: &[u8]) -> Vec<Event> {
        if session == 0 || !self.learn_tokens {
            return Vec::new();
        }
        self.responses
            .read(ts, actor.pid, conn, data)
            .into_iter()
            .map(|(field, value)| {
                let fingerprint = self.key.fingerprint(value.as_bytes());
                self.index.learn(session, self.index.token_hash(value.as_bytes()), fingerprint.clone());
                let credential = SeenCredential {
                    kind: CredentialKind::Bearer,
                    fingerprint,
                    header: None,
                    key_id: None,
                    jwt: jwt::decode(&value),
                };
                let via = TokenVia::Received { field: field.to_string() };
                Event::TokenUse(TokenUse { ts, session, actor: actor.clone(), credential, via })
            })
            .collect()
    }

    /// One event per credential of a request that concerns a session.
    fn request_events(&self, wire: &Wire, http2: bool, request: &http::Request<'_>) -> Vec<Event> {
        let Wire { ts, session, ref actor, tls, dst } = *wire;
        let mut events = Vec::new();
        for raw in &request.credentials {
            let secret: std::borrow::Cow<[u8]> = match raw.kind {
                CredentialKind::Basic => http::basic_password(&raw.value).map_or(raw.value.clone(), Into::into),
                _ => raw.value.clone(),
            };
            let fingerprint = self.key.fingerprint(&secret);
            let jwt = match raw.kind {
                CredentialKind::Bearer
                | CredentialKind::Authorization
                | CredentialKind::ApiKey
                | CredentialKind::Query
                | CredentialKind::Cookie => std::str::from_utf8(&raw.value).ok().and_then(jwt::decode),
                _ => None,
            };
            // Outside sessions only what concerns a session is kept: its token, or an expired JWT.
            let expired =
                jwt.as_ref().and_then(|j| j.exp).is_some_and(|exp| exp.saturating_mul(1_000_000_000) < ts as i64);
            if session == 0 && !expired && !self.index.is_session_token(&fingerprint) {
                continue;
            }
            if session != 0 && self.learn_tokens && raw.kind.learnable() && !self.index.is_session_token(&fingerprint) {
                // Looked for from now on: by other processes, in exec environments (the kernel's
                // hash is synced by the credential watch), after the task.
                self.index.learn(session, self.index.token_hash(&secret), fingerprint.clone());
            }
            let credential = SeenCredential {
                kind: raw.kind,
                fingerprint,
                header: Some(raw.header.clone()),
                key_id: raw.key_id.clone(),
                jwt,
            };
            let via = TokenVia::Http {
                tls,
                http2,
                method: request.method.clone(),
                host: request.host.clone(),
                path: request.path.clone(),
                dst,
            };
            events.push(Event::TokenUse(TokenUse { ts, session, actor: actor.clone(), credential, via }));
        }
        events
    }
}

/// Where a captured write was seen: the process, the session it belongs to, and the socket.
struct Wire {
    ts: u64,
    session: SessionKey,
    actor: Actor,
    tls: bool,
    dst: Option<std::net::SocketAddr>,
}

/// A token use from a TLS write, with its connection's peer.
fn with_dst(mut event: Event, peer: std::net::SocketAddr) -> Event {
    if let Event::TokenUse(TokenUse { via: TokenVia::Http { dst, .. }, .. }) = &mut event {
        *dst = Some(peer);
    }
    event
}
