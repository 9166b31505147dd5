//! Rule ids (part of the interface: stable) and what each maps to.

use serde::{Deserialize, Serialize};

/// How bad a finding is; the policy may set it per rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    OutOfScopeConnect,
    TokenAfterTaskEnd,
    TokenOutsideSession,
    ActivityAfterTaskEnd,
    ProcessOutlivedTask,
    AuthorityExpired,
    CredentialOutOfScope,
    ExecOutOfScope,
    PrivilegeEscalation,
    ExpiredTokenUse,
    MonitorBlind,
}

impl Rule {
    pub const ALL: [Rule; 11] = [
        Rule::OutOfScopeConnect,
        Rule::TokenAfterTaskEnd,
        Rule::TokenOutsideSession,
        Rule::ActivityAfterTaskEnd,
        Rule::ProcessOutlivedTask,
        Rule::AuthorityExpired,
        Rule::CredentialOutOfScope,
        Rule::ExecOutOfScope,
        Rule::PrivilegeEscalation,
        Rule::ExpiredTokenUse,
        Rule::MonitorBlind,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Rule::OutOfScopeConnect => "out_of_scope_connect",
            Rule::TokenAfterTaskEnd => "token_after_task_end",
            Rule::TokenOutsideSession => "token_outside_session",
            Rule::ActivityAfterTaskEnd => "activity_after_task_end",
            Rule::ProcessOutlivedTask => "process_outlived_task",
            Rule::AuthorityExpired => "authority_expired",
            Rule::CredentialOutOfScope => "credential_out_of_scope",
            Rule::ExecOutOfScope => "exec_out_of_scope",
            Rule::PrivilegeEscalation => "privilege_escalation",
            Rule::ExpiredTokenUse => "expired_token_use",
            Rule::MonitorBlind => "monitor_blind",
        }
    }

    pub fn default_severity(self) -> Severity {
        match self {
            Rule::TokenOutsideSession | Rule::PrivilegeEscalation => Severity::Critical,
            Rule::OutOfScopeConnect
            | Rule::TokenAfterTaskEnd
            | Rule::ActivityAfterTaskEnd
            | Rule::AuthorityExpired
            | Rule::CredentialOutOfScope
            | Rule::MonitorBlind => Severity::High,
            Rule::ProcessOutlivedTask | Rule::ExecOutOfScope | Rule::ExpiredTokenUse => Severity::Medium,
        }
    }

    pub fn mitre(self) -> &'static [&'static str] {
        match self {
            Rule::OutOfScopeConnect => &["T1021", "T1550.001"],
            Rule::TokenAfterTaskEnd => &["T1550.001"],
            Rule::TokenOutsideSession => &["T1528"],
            Rule::CredentialOutOfScope => &["T1552.001"],
            Rule::PrivilegeEscalation => &["T1548"],
            _ => &[],
        }
    }

    pub fn owasp_nhi(self) -> &'static [&'static str] {
        match self {
            Rule::OutOfScopeConnect => &["NHI5"],
            Rule::TokenAfterTaskEnd => &["NHI1", "NHI7"],
            Rule::TokenOutsideSession => &["NHI9", "NHI2"],
            Rule::ActivityAfterTaskEnd | Rule::ProcessOutlivedTask => &["NHI1"],
            Rule::AuthorityExpired | Rule::ExpiredTokenUse => &["NHI7"],
            Rule::CredentialOutOfScope => &["NHI5", "NHI2"],
            Rule::ExecOutOfScope | Rule::PrivilegeEscalation => &["NHI5"],
            Rule::MonitorBlind => &[],
        }
    }

    /// NIST CSF 2.0 subcategories: PR.AA-01 (identities and credentials of services are
    /// managed), PR.AA-03 (services are authenticated), PR.AA-05 (access permissions are
    /// defined, managed and enforced, least privilege), DE.CM-01 (networks are monitored),
    /// DE.CM-03 (technology usage is monitored), DE.CM-09 (runtime environments are monitored).
    pub fn nist_csf(self) -> &'static [&'static str] {
        match self {
            Rule::OutOfScopeConnect => &["PR.AA-05", "DE.CM-01"],
            Rule::TokenAfterTaskEnd => &["PR.AA-01", "PR.AA-05"],
            Rule::TokenOutsideSession | Rule::ExpiredTokenUse => &["PR.AA-01", "PR.AA-03"],
            Rule::ActivityAfterTaskEnd => &["PR.AA-05", "DE.CM-03"],
            Rule::ProcessOutlivedTask | Rule::ExecOutOfScope | Rule::PrivilegeEscalation => &["PR.AA-05", "DE.CM-09"],
            Rule::AuthorityExpired | Rule::CredentialOutOfScope => &["PR.AA-05"],
            Rule::MonitorBlind => &["DE.CM-09"],
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}
