//! The alert: the one output type every sink encodes (fields as in DESIGN.md).

use serde::{Deserialize, Serialize};

use crate::rules::Rule;

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
    pub action: Action,
    pub mitre: Vec<String>,
    pub owasp_nhi: Vec<String>,
    /// Event time in ns since the epoch; `time` is its text form.
    #[serde(skip)]
    pub ts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
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
    /// `bearer`, `basic`, `aws_sigv4`, `api_key`, `authorization`, `env` or `file`.
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
