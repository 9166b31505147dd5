//! The session file (YAML, see DESIGN.md) and the resolved [`Session`] the agent works with.

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use super::scope::Destination;

/// Default time bounds when a session file gives none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// A session file as written. Unknown fields are errors: a typo in a scope must not silently
/// widen or narrow it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionFile {
    #[serde(default)]
    pub id: Option<SessionId>,
    pub principal: String,
    pub actor: String,
    pub task: String,
    #[serde(default)]
    pub sponsor: String,
    #[serde(default, with = "opt_duration")]
    pub ttl: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub grace: Option<Duration>,
    #[serde(default)]
    pub scope: ScopeFile,
    #[serde(default)]
    pub tokens: Vec<TokenSpec>,
    #[serde(default)]
    pub enforce: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ScopeFile {
    /// Absent means any destination; a list (even empty) restricts connects to it.
    #[serde(default)]
    pub connect: Option<Vec<Destination>>,
    #[serde(default)]
    pub credentials: Vec<String>,
    /// Absent means any executable.
    #[serde(default)]
    pub exec: Option<Vec<String>>,
}

/// Where a granted token comes from: exactly one of `env` or `file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TokenSpecFile", into = "TokenSpecFile")]
pub enum TokenSpec {
    /// The value of this variable in the environment of the CLI that starts the session.
    Env(String),
    File(String),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenSpecFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<String>,
}

impl TryFrom<TokenSpecFile> for TokenSpec {
    type Error = String;
    fn try_from(t: TokenSpecFile) -> Result<Self, String> {
        match (t.env, t.file) {
            (Some(env), None) if !env.is_empty() => Ok(TokenSpec::Env(env)),
            (None, Some(file)) if file.starts_with('/') => Ok(TokenSpec::File(file)),
            (None, Some(file)) => Err(format!("token file `{file}` must be an absolute path")),
            _ => Err("a token needs exactly one of `env: NAME` or `file: /PATH`".into()),
        }
    }
}

impl From<TokenSpec> for TokenSpecFile {
    fn from(t: TokenSpec) -> Self {
        match t {
            TokenSpec::Env(env) => Self { env: Some(env), file: None },
            TokenSpec::File(file) => Self { env: None, file: Some(file) },
        }
    }
}

/// A session id: 1 to 128 of `A-Z a-z 0-9 . _ : -`, so it is safe in file names and logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(String);

impl SessionId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SessionId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
        if ok {
            Ok(Self(s))
        } else {
            Err(format!("session id `{s}`: use 1 to 128 of A-Z a-z 0-9 . _ : -"))
        }
    }
}

impl From<SessionId> for String {
    fn from(id: SessionId) -> String {
        id.0
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(&self.0)
    }
}

pub(crate) mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else { return Ok(None) };
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("`{text}` is not a duration like 10m or 2s: {e}")))
    }
}

/// A session file that could not be used, with where.
pub type SessionFileError = crate::yaml::YamlError;

impl SessionFile {
    pub fn read(path: &Path) -> Result<Self, SessionFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| SessionFileError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates. `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SessionFileError> {
        let file: SessionFile = crate::yaml::parse(text, origin)?;
        file.validate().map_err(|message| SessionFileError::Semantic { path: origin.to_string(), message })?;
        Ok(file)
    }

    fn validate(&self) -> Result<(), String> {
        for (field, value) in [("principal", &self.principal), ("actor", &self.actor), ("task", &self.task)] {
            if value.trim().is_empty() {
                return Err(format!("field `{field}` is empty"));
            }
        }
        if self.ttl == Some(Duration::ZERO) {
            return Err("field `ttl` must be longer than 0s".into());
        }
        for (i, c) in self.scope.credentials.iter().enumerate() {
            if !c.starts_with('/') {
                return Err(format!("field `scope.credentials[{i}]`: `{c}` must be an absolute path"));
            }
        }
        for (i, e) in self.scope.exec.iter().flatten().enumerate() {
            if !e.starts_with('/') {
                return Err(format!("field `scope.exec[{i}]`: `{e}` must be an absolute path"));
            }
        }
        Ok(())
    }
}

/// A session as the agent holds it: the file resolved (id, defaults, token fingerprints,
/// binding). This is what the engine and the traces see; it never holds a raw token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: SessionId,
    pub principal: String,
    pub actor: String,
    pub task: String,
    pub sponsor: String,
    pub ttl_ns: u64,
    pub grace_ns: u64,
    pub scope: Scope,
    pub tokens: Vec<TokenRef>,
    pub enforce: bool,
    pub binding: Binding,
}

#[cfg(test)]
impl Session {
    /// The session the unit tests share: t-1, alice@example.com's svc:bot on a refund, ten
    /// minutes of authority, rooted at `root_pid`.
    pub fn example(exec: Option<&[&str]>, grace_ns: u64, root_pid: u32) -> Self {
        Session {
            id: SessionId::try_from("t-1".to_string()).expect("a valid id"),
            principal: "alice@example.com".into(),
            actor: "svc:bot".into(),
            task: "refund".into(),
            sponsor: "payments".into(),
            ttl_ns: 600 * 1_000_000_000,
            grace_ns,
            scope: Scope { exec: exec.map(|e| e.iter().map(|s| s.to_string()).collect()), ..Default::default() },
            tokens: vec![],
            enforce: false,
            binding: Binding { root_pid: Some(root_pid), cgroup: None, launcher_sid: None },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Scope {
    /// `None`: any destination.
    pub connect: Option<Vec<Destination>>,
    pub credentials: Vec<String>,
    /// The allowed executables, each also under its symlink-resolved path. `None`: any.
    pub exec: Option<Vec<String>>,
}

impl Scope {
    pub fn allows_connect(&self, addr: std::net::IpAddr, port: u16, names: &[String]) -> bool {
        self.connect.as_ref().is_none_or(|list| list.iter().any(|d| d.matches(addr, port, names)))
    }

    /// One line for a responder: `connect: A, B; credentials: F; exec: any`.
    pub fn summary(&self) -> String {
        let list = |items: Option<Vec<String>>| items.map_or("any".to_string(), |i| i.join(", "));
        let connect = list(self.connect.as_ref().map(|c| c.iter().map(|d| d.to_string()).collect()));
        let credentials = if self.credentials.is_empty() { "none".to_string() } else { self.credentials.join(", ") };
        format!("connect: {connect}; credentials: {credentials}; exec: {}", list(self.exec.clone()))
    }

    pub fn allows_exec(&self, exe: &str, exe_real: Option<&str>) -> bool {
        let Some(allowed) = &self.exec else { return true };
        let matches =
            |path: &str| allowed.iter().any(|a| a == path || (a.ends_with('/') && path.starts_with(a.as_str())));
        matches(exe) || exe_real.is_some_and(matches)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRef {
    pub source: String,
    /// Keyed fingerprint (HMAC-SHA-256 under the deployment key); `None` if the value was not
    /// available when the session started.
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Binding {
    /// A root process: it and all its descendants belong to the session.
    pub root_pid: Option<u32>,
    /// A cgroup v2: every process in it belongs to the session.
    pub cgroup: Option<CgroupBinding>,
    /// The Unix session of the process that declared the session (the `monitor run` CLI, the
    /// caller of `session start`): its terminal or job session, `getsid`. Its processes
    /// held the session's tokens before the task started (the operator's shell that exported
    /// one and ran `monitor run`): while the task is active, an exec of theirs carrying a token
    /// is not a use outside the session. 0 is init's session: a launcher that no one ever
    /// called `setsid` for (a CI runner, a container entrypoint) shares it with every such process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launcher_sid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupBinding {
    pub path: String,
    pub id: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id: refund-4711
principal: alice@example.com
actor: svc:support-bot
task: refund ticket 4711
sponsor: payments-team
ttl: 10m
grace: 2s
scope:
  connect: ["127.0.0.2:8443", "10.20.0.0/24:80", "api.internal.example:443", "*.payments.example:443"]
  credentials: ["/run/secrets/support-bot/token"]
  exec: ["/usr/bin/curl", "/bin/sh"]
tokens:
  - env: SUPPORT_BOT_TOKEN
  - file: /run/secrets/support-bot/token
enforce: false
"#;

    #[test]
    fn parses_the_design_example() {
        let f = SessionFile::parse(GOOD, "s.yaml").unwrap();
        assert_eq!(f.id.as_ref().unwrap().as_str(), "refund-4711");
        assert_eq!(f.ttl, Some(Duration::from_secs(600)));
        assert_eq!(f.grace, Some(Duration::from_secs(2)));
        assert_eq!(f.scope.connect.as_ref().unwrap().len(), 4);
        assert_eq!(
            f.tokens,
            [TokenSpec::Env("SUPPORT_BOT_TOKEN".into()), TokenSpec::File("/run/secrets/support-bot/token".into())]
        );
        assert_eq!(f.scope.exec.as_deref().unwrap(), ["/usr/bin/curl", "/bin/sh"]);
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let f = SessionFile::parse("principal: a\nactor: b\ntask: c\n", "s.yaml").unwrap();
        assert!(f.id.is_none() && f.ttl.is_none() && f.scope.exec.is_none() && !f.enforce);
    }

    fn err(text: &str) -> String {
        SessionFile::parse(text, "s.yaml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = err("principal: a\nactor: b\ntask: c\nttl: soon\n");
        assert!(e.starts_with("s.yaml:4:"), "{e}");
        assert!(e.contains("`ttl`") && e.contains("soon"), "{e}");

        let e = err("principal: a\nactor: b\ntask: c\nscope:\n  connect: [\"127.0.0.2:8443\", \"nowhere\"]\n");
        assert!(e.starts_with("s.yaml:5:"), "{e}");
        assert!(e.contains("scope.connect[1]") && e.contains("nowhere"), "{e}");

        let e = err("principal: a\nactor: b\ntask: c\nscope:\n  conect: []\n");
        assert!(e.starts_with("s.yaml:5:") && e.contains("conect"), "{e}");

        let e = err("principal: a\nactor: b\n");
        assert!(e.contains("task"), "{e}");

        let e = err("principal: a\nactor: b\ntask: c\ntokens:\n  - {env: A, file: /b}\n");
        assert!(e.starts_with("s.yaml:5:3:") && e.contains("tokens[0]"), "{e}");
        assert!(!e.contains("tokens: a token"), "{e}");

        let e = err("principal: a\nactor: b\ntask: c\nscope:\n  connect:\n    - 127.0.0.2:80\n    - 'x y:80'\n");
        assert!(e.starts_with("s.yaml:7:") && e.contains("scope.connect[1]"), "{e}");

        let e = err("id: 'bad id'\nprincipal: a\nactor: b\ntask: c\n");
        assert!(e.starts_with("s.yaml:1:") && e.contains("`id`"), "{e}");

        let e = err("principal: a\nactor: b\ntask: c\nscope: {exec: [curl]}\n");
        assert!(e.contains("scope.exec[0]"), "{e}");
    }

    #[test]
    fn exec_scope_matches_path_real_path_and_directories() {
        let scope = Scope { exec: Some(vec!["/usr/bin/curl".into(), "/opt/tools/".into()]), ..Default::default() };
        assert!(scope.allows_exec("/usr/bin/curl", None));
        assert!(scope.allows_exec("/bin/curl", Some("/usr/bin/curl")));
        assert!(scope.allows_exec("/opt/tools/x", None));
        assert!(!scope.allows_exec("/usr/bin/wget", None));
        assert!(Scope::default().allows_exec("/anything", None));
    }
}
