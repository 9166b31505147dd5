//! The agent policy (`--policy FILE`, checked by `monitor policy check FILE`): default time
//! bounds, severity per rule, default scopes per actor, destinations that never alert. It is
//! read and validated whole before anything uses it: a bad policy never half-applies.

use std::{collections::BTreeMap, path::Path, time::Duration};

use serde::Deserialize;

use crate::{
    rules::{Rule, Severity},
    sessions::{Destination, ScopeFile},
    yaml::YamlError,
};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub defaults: Defaults,
    /// Severity overrides, by rule id.
    #[serde(default)]
    pub severity: BTreeMap<Rule, Severity>,
    /// Scope parts for sessions of an actor whose session file leaves them out.
    #[serde(default)]
    pub actors: BTreeMap<String, ScopeFile>,
    #[serde(default)]
    pub never_alert: NeverAlert,
    #[serde(default)]
    pub credentials: CredentialsPolicy,
    #[serde(default)]
    pub tls: TlsPolicy,
    #[serde(default)]
    pub alerts: AlertsPolicy,
    #[serde(default)]
    pub fleet: FleetPolicy,
}

/// What the fleet watchlist (`--fleet`) keeps of other hosts' sessions.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetPolicy {
    /// How long another host's session stays on the watchlist after its task ended or its ttl
    /// ran out: a use of its tokens until then raises token_after_task_end (default 24h).
    #[serde(default, with = "crate::sessions::opt_duration")]
    pub retention: Option<Duration>,
}

/// How repeats of a finding are reported.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsPolicy {
    /// Repeats of a finding (same rule, session, credential or destination, process lineage)
    /// within this window of its first occurrence are folded into that alert and sent as its
    /// updates (default 60s; `0s` turns folding off: every occurrence is an alert).
    #[serde(default, with = "crate::sessions::opt_duration")]
    pub fold_window: Option<Duration>,
}

/// The fold window when the policy does not set one.
pub const DEFAULT_FOLD_WINDOW: Duration = Duration::from_secs(60);

impl AlertsPolicy {
    pub fn fold_window_ns(&self) -> u64 {
        self.fold_window.unwrap_or(DEFAULT_FOLD_WINDOW).as_nanos().min(u64::MAX as u128) as u64
    }
}

/// Where the TLS probes look for executables with TLS code of their own (Go, a static OpenSSL)
/// before they first run, besides the executables' own first exec.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPolicy {
    /// More directories to look through at start (the defaults: /usr/local/bin, /usr/bin,
    /// /usr/sbin, /bin, /sbin, /opt, /snap/bin).
    #[serde(default)]
    pub executable_dirs: Vec<std::path::PathBuf>,
}

/// What the credential probes look for besides the built-in list.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsPolicy {
    /// More credential files or directories to watch (absolute paths).
    #[serde(default)]
    pub watch: Vec<String>,
    /// More request headers that carry API keys (besides X-API-Key, Api-Key, X-Auth-Token, ...).
    #[serde(default)]
    pub api_key_headers: Vec<String>,
    /// Whether a credential a session process sends or receives during its task, that no
    /// session declared, becomes that session's (on by default).
    #[serde(default = "yes")]
    pub learn_tokens: bool,
}

impl Default for CredentialsPolicy {
    fn default() -> Self {
        Self { watch: Vec::new(), api_key_headers: Vec::new(), learn_tokens: true }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    #[serde(default, with = "crate::sessions::opt_duration")]
    pub ttl: Option<Duration>,
    #[serde(default, with = "crate::sessions::opt_duration")]
    pub grace: Option<Duration>,
}

/// Destinations that are always allowed and never alert (the local resolver, say). Enforcing
/// sessions may connect to them too.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeverAlert {
    #[serde(default)]
    pub connect: Vec<Destination>,
}

impl Policy {
    pub fn read(path: &Path) -> Result<Self, YamlError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| YamlError::Read { path: origin.clone(), source })?;
        Self::parse(&text, &origin)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, YamlError> {
        let policy: Policy = crate::yaml::parse(text, origin)?;
        policy.validate().map_err(|message| YamlError::Semantic { path: origin.to_string(), message })?;
        Ok(policy)
    }

    fn validate(&self) -> Result<(), String> {
        if self.defaults.ttl == Some(Duration::ZERO) {
            return Err("field `defaults.ttl` must be longer than 0s".into());
        }
        for (i, path) in self.credentials.watch.iter().enumerate() {
            if !path.starts_with('/') {
                return Err(format!("field `credentials.watch[{i}]`: `{path}` must be an absolute path"));
            }
        }
        for (i, header) in self.credentials.api_key_headers.iter().enumerate() {
            if header.is_empty() || !header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(format!("field `credentials.api_key_headers[{i}]`: `{header}` is not a header name"));
            }
        }
        for (actor, scope) in &self.actors {
            for (field, paths) in
                [("credentials", scope.credentials.as_slice()), ("exec", scope.exec.as_deref().unwrap_or(&[]))]
            {
                if let Some(bad) = paths.iter().find(|p| !p.starts_with('/')) {
                    return Err(format!("field `actors.{actor}.{field}`: `{bad}` must be an absolute path"));
                }
            }
        }
        Ok(())
    }

    /// A one-line description, for `monitor policy check`.
    pub fn summary(&self) -> String {
        format!(
            "{} actor scope(s), {} severity override(s), {} never-alert destination(s), default ttl {}, grace {}",
            self.actors.len(),
            self.severity.len(),
            self.never_alert.connect.len(),
            self.defaults.ttl.map_or("(built-in)".into(), |d| humantime::format_duration(d).to_string()),
            self.defaults.grace.map_or("(built-in)".into(), |d| humantime::format_duration(d).to_string()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
defaults:
  ttl: 30m
  grace: 3s
severity:
  out_of_scope_connect: critical
  exec_out_of_scope: low
actors:
  "svc:support-bot":
    connect: ["127.0.0.2:8443"]
    exec: ["/usr/bin/curl"]
never_alert:
  connect: ["127.0.0.53:53", "[::1]:53"]
"#;

    #[test]
    fn parses_every_section() {
        let p = Policy::parse(GOOD, "policy.yaml").unwrap();
        assert_eq!(p.defaults.ttl, Some(Duration::from_secs(1800)));
        assert_eq!(p.severity[&Rule::OutOfScopeConnect], Severity::Critical);
        assert_eq!(p.actors["svc:support-bot"].connect.as_ref().unwrap().len(), 1);
        assert_eq!(p.never_alert.connect.len(), 2);
        assert!(p.summary().contains("1 actor scope(s), 2 severity override(s), 2 never-alert"));
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = Policy::parse("severity:\n  out_of_scope_connekt: high\n", "p.yaml").unwrap_err().to_string();
        assert!(e.starts_with("p.yaml:2:") && e.contains("out_of_scope_connekt"), "{e}");
        let e = Policy::parse("severity:\n  out_of_scope_connect: loud\n", "p.yaml").unwrap_err().to_string();
        assert!(e.starts_with("p.yaml:2:") && e.contains("loud"), "{e}");
        let e = Policy::parse("never_alert:\n  connect: [\"127.0.0.53\"]\n", "p.yaml").unwrap_err().to_string();
        assert!(e.starts_with("p.yaml:2:") && e.contains("never_alert.connect[0]"), "{e}");
        let e = Policy::parse("defaults:\n  ttl: 0s\n", "p.yaml").unwrap_err().to_string();
        assert!(e.contains("defaults.ttl"), "{e}");
        let e = Policy::parse("actors:\n  bot:\n    exec: [curl]\n", "p.yaml").unwrap_err().to_string();
        assert!(e.contains("actors.bot.exec"), "{e}");
        let e = Policy::parse("extra: 1\n", "p.yaml").unwrap_err().to_string();
        assert!(e.starts_with("p.yaml:1:") && e.contains("extra"), "{e}");
    }
}
