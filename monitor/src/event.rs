//! The domain events the engine consumes: decoded kernel events, session lifecycle from the
//! control plane, and clock ticks. Live and replay feed the engine the same stream, so anything
//! the engine needs to decide must be in these events (never read from the host by the engine).

use serde::{Deserialize, Serialize};

use crate::sessions::Session;

/// Nanoseconds since the Unix epoch.
pub type Nanos = u64;

/// The agent's per-boot key for a session in kernel maps and events (never 0).
pub type SessionKey = u32;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    SessionStarted {
        ts: Nanos,
        key: SessionKey,
        session: Box<Session>,
    },
    SessionEnded {
        ts: Nanos,
        key: SessionKey,
        reason: EndReason,
    },
    /// A process that already existed when its session was bound (pid or cgroup binding).
    ProcessSeen(Process),
    Fork(Fork),
    Exec(Exec),
    Exit(Exit),
    Connect(Connect),
    ConnectResult(ConnectResult),
    Resolve(Resolve),
    /// A watched credential file was opened (by any process).
    CredentialOpen(CredentialOpen),
    /// A token was used: in an exec environment or in a request on the wire.
    TokenUse(TokenUse),
    /// A session process changed its credentials (setuid family, capset).
    CredChange(CredChange),
    /// Time passed; lets deadline rules fire without other activity.
    Tick {
        ts: Nanos,
    },
    /// The agent is stopping: the findings it folded send their counts so far.
    AgentStopping {
        ts: Nanos,
    },
    /// The agent lost events (ring buffer full, a failed probe): it is blind for `count` of them,
    /// of `session` where the loss is known to be one session's (else host-wide).
    Lost {
        ts: Nanos,
        source: String,
        count: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<SessionKey>,
    },
    /// The agent's policy was reloaded (SIGHUP, `monitor policy reload`): what the engine
    /// applies from now on. In the trace, so a replay applies it at the same point.
    PolicyReloaded {
        ts: Nanos,
        config: Box<crate::engine::EngineConfig>,
    },
    /// A token file the session declared now holds another value (a rotated credential:
    /// Kubernetes projects a new service-account token about every hour, by a symlink swap).
    /// The new value is the session's too; the ones before stay so.
    TokenRotated {
        ts: Nanos,
        key: SessionKey,
        /// `file:PATH`, as the session's token list names it.
        source: String,
        fingerprint: String,
    },
    /// A session of another host, as the fleet watchlist read it (started, ended, a token
    /// learnt or rotated there). In the trace, so a replay knows what the live agent knew.
    FleetSession {
        ts: Nanos,
        session: Box<crate::sessions::remote::RemoteSession>,
    },
    /// The agent has not heard from the fleet's brokers since `since`: sessions other hosts
    /// started or ended since then are not known here.
    FleetStale {
        ts: Nanos,
        since: Nanos,
        brokers: String,
    },
}

impl Event {
    /// The session the event names (`None` for processes outside sessions, ticks, losses).
    pub fn session_key(&self) -> Option<SessionKey> {
        let key = match self {
            Event::SessionStarted { key, .. } | Event::SessionEnded { key, .. } | Event::TokenRotated { key, .. } => {
                *key
            }
            Event::ProcessSeen(p) => p.session,
            Event::Fork(f) => f.session,
            Event::Exec(e) => e.session,
            Event::Exit(e) => e.session,
            Event::Connect(c) => c.session,
            Event::ConnectResult(r) => r.session,
            Event::Resolve(r) => r.session,
            Event::CredentialOpen(o) => o.session,
            Event::TokenUse(t) => t.session,
            Event::CredChange(c) => c.session,
            Event::Lost { session, .. } => session.unwrap_or(0),
            Event::Tick { .. }
            | Event::AgentStopping { .. }
            | Event::PolicyReloaded { .. }
            | Event::FleetSession { .. }
            | Event::FleetStale { .. } => 0,
        };
        (key != 0).then_some(key)
    }

    /// Every event's `type` in its JSON form, in the order of [`Event::kind_index`].
    pub const KINDS: [&'static str; 19] = [
        "session_started",
        "session_ended",
        "process_seen",
        "fork",
        "exec",
        "exit",
        "connect",
        "connect_result",
        "resolve",
        "credential_open",
        "token_use",
        "cred_change",
        "tick",
        "agent_stopping",
        "lost",
        "policy_reloaded",
        "token_rotated",
        "fleet_session",
        "fleet_stale",
    ];

    /// Where the event's `type` is in [`Event::KINDS`] (counters per kind are kept in an array).
    pub fn kind_index(&self) -> usize {
        match self {
            Event::SessionStarted { .. } => 0,
            Event::SessionEnded { .. } => 1,
            Event::ProcessSeen(_) => 2,
            Event::Fork(_) => 3,
            Event::Exec(_) => 4,
            Event::Exit(_) => 5,
            Event::Connect(_) => 6,
            Event::ConnectResult(_) => 7,
            Event::Resolve(_) => 8,
            Event::CredentialOpen(_) => 9,
            Event::TokenUse(_) => 10,
            Event::CredChange(_) => 11,
            Event::Tick { .. } => 12,
            Event::AgentStopping { .. } => 13,
            Event::Lost { .. } => 14,
            Event::PolicyReloaded { .. } => 15,
            Event::TokenRotated { .. } => 16,
            Event::FleetSession { .. } => 17,
            Event::FleetStale { .. } => 18,
        }
    }

    /// The event's `type` in its JSON form.
    pub fn kind(&self) -> &'static str {
        Self::KINDS[self.kind_index()]
    }

    pub fn ts(&self) -> Nanos {
        match self {
            Event::SessionStarted { ts, .. }
            | Event::SessionEnded { ts, .. }
            | Event::Tick { ts }
            | Event::AgentStopping { ts }
            | Event::Lost { ts, .. }
            | Event::PolicyReloaded { ts, .. }
            | Event::TokenRotated { ts, .. }
            | Event::FleetSession { ts, .. }
            | Event::FleetStale { ts, .. } => *ts,
            Event::ProcessSeen(p) => p.ts,
            Event::Fork(f) => f.ts,
            Event::Exec(e) => e.ts,
            Event::Exit(e) => e.ts,
            Event::Connect(c) => c.ts,
            Event::ConnectResult(r) => r.ts,
            Event::Resolve(r) => r.ts,
            Event::CredentialOpen(o) => o.ts,
            Event::TokenUse(t) => t.ts,
            Event::CredChange(c) => c.ts,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// `monitor session end` or `monitor run` said the task is done.
    Requested,
    /// The session's root process exited.
    RootExited,
}

/// Credentials of a process. `euid`/`egid` are `None` where the kernel offsets were unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub euid: Option<u32>,
    pub egid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Process {
    pub ts: Nanos,
    pub session: SessionKey,
    pub pid: u32,
    pub ppid: u32,
    pub exe: String,
    pub argv: Vec<String>,
    pub creds: Creds,
    pub cgroup: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fork {
    pub ts: Nanos,
    pub session: SessionKey,
    pub parent: u32,
    pub child: u32,
    pub creds: Creds,
    pub cgroup: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exec {
    pub ts: Nanos,
    pub session: SessionKey,
    pub pid: u32,
    pub ppid: u32,
    /// Its Unix session at the exec, as the kernel saw it (None: unknown; 0 is init's session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<u32>,
    /// The path given to exec; for an exec through a descriptor (fexecve, execveat with an
    /// empty path), the file it named as the process's executable shows it (`/memfd:NAME (deleted)`).
    pub exe: String,
    /// The same path with symlinks resolved, when it differs (filled by enrichment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe_real: Option<String>,
    pub argv: Vec<String>,
    pub argv_truncated: bool,
    pub creds: Creds,
    pub cgroup: u64,
    /// Effective capabilities after the exec, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_effective: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exit {
    pub ts: Nanos,
    pub session: SessionKey,
    pub pid: u32,
    /// Wait-status form: `code << 8 | signal`.
    pub exit_code: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Tcp,
    Udp,
    Other,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
            Transport::Other => "other",
        }
    }
}

/// What the kernel's connect hook did with a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allowed,
    /// Refused: outside an enforcing session's scope.
    BlockedScope,
    /// Refused: the enforcing session's task ended.
    BlockedEnded,
    /// Refused: the enforcing session's ttl passed.
    BlockedExpired,
}

/// An outbound connect (TCP, connected UDP) or unconnected UDP send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connect {
    pub ts: Nanos,
    pub session: SessionKey,
    pub pid: u32,
    pub tid: u32,
    pub creds: Creds,
    pub cgroup: u64,
    pub transport: Transport,
    pub addr: std::net::IpAddr,
    pub port: u16,
    /// `false` for an unconnected UDP send (sendto/sendmsg).
    pub connect: bool,
    pub verdict: Verdict,
    /// The socket fd, when the connect came through connect(2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
}

/// The return value of connect(2) in a session process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectResult {
    pub ts: Nanos,
    pub session: SessionKey,
    pub pid: u32,
    pub tid: u32,
    pub fd: i32,
    /// 0 or a negative errno.
    pub ret: i32,
}

/// A name a session process resolved, and the addresses it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolve {
    pub ts: Nanos,
    pub session: SessionKey,
    /// The resolving process (0 for names the agent read for the session: the hosts file).
    pub pid: u32,
    pub name: String,
    pub addrs: Vec<std::net::IpAddr>,
    #[serde(default)]
    pub source: NameSource,
    /// How long the answer holds (the DNS TTL), when the source says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u32>,
}

/// Where a name came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NameSource {
    /// libc's getaddrinfo(3), returning.
    #[default]
    Getaddrinfo,
    /// A DNS answer received by the process (any resolver: Go's, musl's, a static one).
    Dns,
    /// The hosts file the session's processes see, read when the session started.
    Hosts,
}

/// The process behind a credential event. It may be outside every session, so the event carries
/// what an alert needs to name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Actor {
    pub pid: u32,
    pub tid: u32,
    /// The parent, where the probe knows it (0 otherwise): the lineage alerts fold by.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ppid: u32,
    /// Its Unix session (`getsid`) for a token found at an exec, as the kernel saw it at the
    /// exec (None: unknown; 0 is init's session): whether it is the launcher's (see
    /// `Binding::launcher_sid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<u32>,
    /// The kernel's task name (16 bytes).
    pub comm: String,
    /// The executable, read from /proc by enrichment (empty when the process was already gone).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub exe: String,
    pub uid: u32,
    pub cgroup: u64,
}

/// An open of a watched credential file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CredentialOpen {
    pub ts: Nanos,
    /// 0 when the process is outside every session.
    pub session: SessionKey,
    pub actor: Actor,
    /// The watched file, by the path the agent knows it under (the open may have used a
    /// relative path, a symlink or a hard link to the same inode).
    pub path: String,
    pub fd: i32,
    /// Opened for writing.
    pub write: bool,
}

/// How a token was seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "via", rename_all = "snake_case")]
pub enum TokenVia {
    /// In the environment of an exec, as the value of `name`.
    Env { name: String },
    /// On the command line of an exec, as argument `index` (redacted there).
    Argv { index: usize },
    /// In an HTTP request (HTTP/1.x, or HTTP/2 when `http2`), over TLS or in plaintext.
    Http {
        tls: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        http2: bool,
        method: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        /// The path, without its query string.
        path: String,
        /// The destination, when the capture knows it (plaintext).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dst: Option<std::net::SocketAddr>,
    },
    /// Received by a session process in a token response over TLS (OAuth 2.0, RFC 6749; token
    /// exchange, RFC 8693), as the JSON member `field` (`access_token`, `id_token`,
    /// `refresh_token`): the session learns it.
    Received { field: String },
}

/// What kind of credential was seen (credentials/ finds them; events and alerts carry the kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    Bearer,
    Basic,
    /// `AWS4-HMAC-SHA256 Credential=AKID/...`: the access key id (the secret never travels).
    AwsSigv4,
    /// An API-key header (`X-API-Key`, ... configurable).
    ApiKey,
    /// Another `Authorization` scheme.
    Authorization,
    /// A token in an exec environment.
    Env,
    /// A credential file.
    File,
    /// A secret query parameter of the request target (`?access_token=`, `?token=` …).
    Query,
    /// A cookie's value (`Cookie: name=value`).
    Cookie,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Bearer => "bearer",
            CredentialKind::Basic => "basic",
            CredentialKind::AwsSigv4 => "aws_sigv4",
            CredentialKind::ApiKey => "api_key",
            CredentialKind::Authorization => "authorization",
            CredentialKind::Env => "env",
            CredentialKind::File => "file",
            CredentialKind::Query => "query",
            CredentialKind::Cookie => "cookie",
        }
    }

    /// Whether a credential of this kind that a session process sends during its task, and no
    /// session holds, becomes the session's. Not a cookie: servers set many (tracking, state),
    /// and a cookie is a session's token only when the session declared it.
    pub fn learnable(self) -> bool {
        matches!(
            self,
            CredentialKind::Bearer
                | CredentialKind::Basic
                | CredentialKind::ApiKey
                | CredentialKind::Authorization
                | CredentialKind::Query
        )
    }
}

/// The claims of a JWT that matter to a responder. The signature is not checked: the agent only
/// describes what was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct JwtClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The RFC 8693 delegation chain, outermost actor first: `act.sub`, then `act.act.sub`, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub act: Vec<String>,
    /// `scope` (space-separated) or `scp` (a list).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scope: Vec<String>,
    /// Expiry, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// A credential as the agent keeps it: a keyed fingerprint and what can be said without the
/// value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeenCredential {
    pub kind: CredentialKind,
    /// HMAC-SHA-256 under the deployment key: matches the fingerprints of session tokens.
    pub fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A non-secret identifier (the AWS access key id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtClaims>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenUse {
    pub ts: Nanos,
    /// 0 when the process is outside every session.
    pub session: SessionKey,
    pub actor: Actor,
    pub credential: SeenCredential,
    #[serde(flatten)]
    pub via: TokenVia,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredCall {
    Setuid,
    Setreuid,
    Setresuid,
    Setfsuid,
    Capset,
    /// A uid change reported by the kernel's process events connector: one of the setuid
    /// family, which one is not said.
    UidChange,
    /// Effective capabilities seen changed at a capability check (after a capset, say).
    CapabilityCheck,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CredChange {
    pub ts: Nanos,
    pub session: SessionKey,
    pub pid: u32,
    pub call: CredCall,
    /// Effective uid after the call, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub euid: Option<u32>,
    /// Effective capabilities after the call, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_effective: Option<u64>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metrics' `kind` label is the event's `type` in the event log and the trace.
    #[test]
    fn kinds_are_the_json_types() {
        let events = [
            Event::Tick { ts: 1 },
            Event::AgentStopping { ts: 1 },
            Event::Lost { ts: 1, source: "x".into(), count: 1, session: None },
            Event::Exit(Exit { ts: 1, session: 1, pid: 2, exit_code: 0 }),
            Event::SessionEnded { ts: 1, key: 1, reason: EndReason::Requested },
        ];
        for e in events {
            assert_eq!(serde_json::to_value(&e).unwrap()["type"], e.kind());
        }
        let unique: std::collections::BTreeSet<_> = Event::KINDS.iter().collect();
        assert_eq!(unique.len(), Event::KINDS.len());
    }
}
