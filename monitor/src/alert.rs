//! The alert: the one output type every sink encodes (fields as in DESIGN.md).

use serde::{Deserialize, Serialize};

use crate::rules::{Rule, Severity};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Unique and sortable (a ULID); stamped by the agent after the engine.
    pub id: String,
    /// RFC 3339 with nanoseconds.
    pub time: String,
    pub host: String,
    pub rule: Rule,
    pub severity: Severity,
    pub summary: String,
    pub session: SessionRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialRef>,
    /// The pod and container of the process, from its cgroup path (stamped by the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<crate::k8s::K8sRef>,
    pub action: Action,
    pub mitre: Vec<String>,
    pub owasp_nhi: Vec<String>,
    /// NIST CSF 2.0 subcategories the finding bears on (`PR.AA-05` …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nist_csf: Vec<String>,
    /// Occurrences of this finding folded into the alert (see engine/fold.rs): 1 when first
    /// sent; an update of the same `id` carries the count so far.
    #[serde(default = "one")]
    pub count: u64,
    /// The first and the latest occurrence (RFC 3339, ns); `first_seen` is `time`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub first_seen: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_seen: String,
    /// The processes whose occurrences were folded in, when more than one (at most
    /// [`MAX_FOLDED_PIDS`], the first ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<u32>,
    /// Event time in ns since the epoch; `time` is its text form.
    #[serde(skip)]
    pub ts: u64,
    /// The engine's number for the finding: every update of it gets the first one's id.
    #[serde(skip)]
    pub fold: u64,
}

/// Pids an alert lists at most; `count` says how many occurrences there were.
pub const MAX_FOLDED_PIDS: usize = 64;

fn one() -> u64 {
    1
}

impl Alert {
    /// Whether this is an update of an alert sent before (same `id`, a larger `count`).
    pub fn is_update(&self) -> bool {
        self.count > 1
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Observed,
    Blocked,
    Killed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SessionRef {
    pub id: String,
    pub principal: String,
    pub actor: String,
    pub task: String,
    pub sponsor: String,
    pub state: String,
    pub started: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// The host whose agent runs the session, when it is another host's (a fleet alert: the
    /// session came from the fleet watchlist, see `crate::fleet`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    pub ppid: u32,
    pub exe: String,
    pub argv: Vec<String>,
    pub uid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub euid: Option<u32>,
    pub cgroup: u64,
    /// Ancestors, nearest first, up to the session root.
    pub chain: Vec<Ancestor>,
    /// The session the process belongs to, when it is not the alert's (a token of session A
    /// used by a process of session B names B here). Absent for a process of the alert's own
    /// session; `in_session: false` says the process belongs to no session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<ProcessSession>,
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub in_session: bool,
    /// Its Unix session (`getsid`), where the kernel reported it (a token found at an exec):
    /// the terminal session or job an analyst traces the process back to, and a lineage alerts
    /// fold by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<u32>,
}

fn yes() -> bool {
    true
}

fn is_true(v: &bool) -> bool {
    *v
}

/// The other session of a cross-session use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessSession {
    pub id: String,
    pub actor: String,
    pub principal: String,
    pub task: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkRef {
    pub dst_ip: String,
    pub dst_port: u16,
    pub protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_name: Option<String>,
}

/// The credential an alert is about. Never a raw value: a keyed fingerprint, the file's path,
/// and the decoded claims of a JWT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CredentialRef {
    /// `bearer`, `basic`, `aws_sigv4`, `api_key`, `authorization`, `query` (a secret query
    /// parameter), `cookie`, `env` or `file`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The credential file, for `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<crate::credentials::JwtClaims>,
    /// Where it was seen: `https`, `http`, `env` or `file`.
    pub seen_in: String,
    /// The request header or environment variable that carried it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<String>,
    /// A non-secret identifier (the AWS access key id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The request, for `http`/`https`: method, host and path (without the query string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// A token no session declared, that the agent learnt from what a session process sent or
    /// received during its task.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub learned: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ancestor {
    pub pid: u32,
    pub exe: String,
}

/// RFC 3339 with nanoseconds, UTC.
pub fn rfc3339(ns: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    humantime::format_rfc3339_nanos(t).to_string()
}

/// Milliseconds since the epoch of an RFC 3339 time (`first_seen`, `last_seen`), for encoders.
pub fn rfc3339_millis(text: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(text).ok()?;
    t.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_millis().min(u64::MAX as u128) as u64)
}
