//! Credential rules: token_after_task_end, token_outside_session, credential_out_of_scope,
//! expired_token_use, and privilege_escalation through setuid-family calls and capset.

use super::{Engine, Tracked};
use crate::{
    alert::{Alert, CredentialRef, NetworkRef, ProcessRef},
    event::{Actor, CredCall, CredChange, CredentialOpen, Nanos, SessionKey, TokenUse, TokenVia},
    rules::Rule,
};

/// Credentials a session learns at most (a client that mints a token per request must not grow
/// the engine without bound).
pub const LEARNED_PER_SESSION: usize = 256;

impl Engine {
    /// The sessions a token fingerprint was granted to, or that learnt it.
    fn token_owners(&self, fingerprint: &str) -> Vec<SessionKey> {
        self.sessions
            .iter()
            .filter(|(_, t)| {
                t.session.tokens.iter().any(|tok| tok.fingerprint.as_deref() == Some(fingerprint))
                    || t.learned.contains(fingerprint)
            })
            .map(|(k, _)| *k)
            .collect()
    }

    /// A declared token file of the session holds a new value: it is the session's too (its
    /// use after the end or by another process is caught like the first one's). Bounded like
    /// the tokens a session learns.
    pub(super) fn token_rotated(&mut self, key: SessionKey, source: &str, fingerprint: &str) {
        let Some(tracked) = self.sessions.get_mut(&key) else { return };
        let tokens = &mut tracked.session.tokens;
        if tokens.iter().any(|t| t.fingerprint.as_deref() == Some(fingerprint)) || tokens.len() >= LEARNED_PER_SESSION {
            return;
        }
        tokens
            .push(crate::sessions::TokenRef { source: source.to_string(), fingerprint: Some(fingerprint.to_string()) });
        // The state directory keeps the session's tokens (their fingerprints).
        self.session_changes += 1;
    }

    /// A credential a process of an active session sent or received that no session holds
    /// becomes that session's: its use after the task, or by another process, is then caught
    /// like a declared one's (the delegation's "token transformation": a token exchanged or
    /// minted during the task). Returns whether it was learnt now.
    fn learn_token(&mut self, t: &TokenUse) -> bool {
        if !self.config.learn_tokens || !t.credential.kind.learnable() || self.authority_over(t.session, t.ts) {
            return false;
        }
        if !self.token_owners(&t.credential.fingerprint).is_empty() || self.fleet.holds(&t.credential.fingerprint) {
            return false;
        }
        let Some(tracked) = self.sessions.get_mut(&t.session) else { return false };
        if tracked.learned.len() >= LEARNED_PER_SESSION {
            return false;
        }
        tracked.learned.insert(t.credential.fingerprint.clone())
    }

    /// Whether a token found at an exec (environment, command line) of a process outside the
    /// session comes from the session's launcher: a process of the Unix session that declared
    /// it (the shell that ran `monitor run` with the token exported, whatever it starts, its
    /// pipelines and subshells). Another login, a daemon, a `setsid` child is not the launcher.
    fn from_launcher(&self, owner: SessionKey, t: &TokenUse) -> bool {
        matches!(t.via, TokenVia::Env { .. } | TokenVia::Argv { .. })
            && t.actor.sid.is_some()
            && self.sessions.get(&owner).is_some_and(|o| o.session.binding.launcher_sid == t.actor.sid)
    }

    fn is_learned(&self, session: SessionKey, fingerprint: &str) -> bool {
        self.sessions.get(&session).is_some_and(|t| t.learned.contains(fingerprint))
    }

    /// Whether a session's authority is over at `ts`: its task ended and the grace ran out, or its
    /// ttl passed.
    fn authority_over(&self, key: SessionKey, ts: Nanos) -> bool {
        self.time_violation(key, ts).is_some()
    }

    /// The alert's process: the session's record with its chain when the engine knows it, else
    /// what the credential probe said about it. The record is the one that had the pid at `ts`:
    /// a use can reach the engine after its process's exit (a short-lived curl, a slow host).
    fn actor_process(&self, session: SessionKey, actor: &Actor, ts: Nanos) -> Option<ProcessRef> {
        let known = self.procs.at(actor.pid, ts).filter(|s| self.procs.get(*s).is_some_and(|p| p.session == session));
        if let Some(mut p) = known.and_then(|s| self.procs.describe(s)) {
            p.sid = actor.sid;
            return Some(p);
        }
        Some(ProcessRef {
            pid: actor.pid,
            ppid: actor.ppid,
            exe: if actor.exe.is_empty() { actor.comm.clone() } else { actor.exe.clone() },
            argv: Vec::new(),
            uid: actor.uid,
            euid: None,
            cgroup: actor.cgroup,
            chain: Vec::new(),
            session: None,
            in_session: true,
            sid: actor.sid,
        })
    }

    fn credential_alert(
        &self,
        rule: Rule,
        session: SessionKey,
        actor_session: SessionKey,
        actor: &Actor,
        ts: Nanos,
        summary: String,
        credential: CredentialRef,
    ) -> Alert {
        let mut alert = self.alert(rule, session, None, ts, summary);
        alert.process = self.actor_process(actor_session, actor, ts);
        if actor_session != session {
            if let Some(p) = &mut alert.process {
                match self.sessions.get(&actor_session) {
                    Some(t) => p.session = Some(t.as_process_session()),
                    None => p.in_session = false,
                }
            }
        }
        alert.credential = Some(credential);
        alert
    }

    /// How a summary names the acting process's side of a use: its own session (id, actor,
    /// principal) or none.
    fn actor_side(&self, actor_session: SessionKey) -> String {
        match self.sessions.get(&actor_session) {
            Some(t) => {
                format!("a process of session {} (actor {} for {})", t.session.id, t.session.actor, t.session.principal)
            }
            None => "a process in no session".to_string(),
        }
    }

    /// The summary of a use of `owner`'s token by `who`, a process of another session or of
    /// none, `how` it was seen, and `when` (empty, or after the owner's task).
    fn used_by_another(&self, who: &str, t: &TokenUse, owner: SessionKey, how: &str, when: &str) -> String {
        format!(
            "{who} (pid {}), {}, used session {}'s token {how}{when}",
            t.actor.pid,
            self.actor_side(t.session),
            self.session_id(owner)
        )
    }

    /// Which misuse of a session's token `t` is, if any.
    fn token_misuse(&self, t: &TokenUse, owners: &[SessionKey]) -> Option<Misuse> {
        if owners.contains(&t.session) {
            return self.authority_over(t.session, t.ts).then_some(Misuse::AfterOwnTask);
        }
        if let Some(owner) = owners.iter().copied().find(|o| !self.authority_over(*o, t.ts)) {
            if t.session == 0 && self.from_launcher(owner, t) {
                return Some(Misuse::Excused);
            }
            return Some(Misuse::OutsideSession(owner));
        }
        owners.iter().copied().max_by_key(|o| self.sessions[o].started).map(Misuse::AfterOwnersTask)
    }

    pub(super) fn token_use(&mut self, t: &TokenUse, alerts: &mut Vec<Alert>) {
        if self.learn_token(t) || matches!(t.via, TokenVia::Received { .. }) {
            // Learnt now, or received (a token response): nothing to alert on yet.
            return;
        }
        let owners = self.token_owners(&t.credential.fingerprint);
        let misuse = self.token_misuse(t, &owners);
        // A token no session here holds may be another host's (the fleet watchlist).
        let remote = if owners.is_empty() { self.remote_misuse(t) } else { None };
        let expired =
            t.credential.jwt.as_ref().and_then(|j| j.exp).filter(|exp| exp.saturating_mul(1_000_000_000) < t.ts as i64);
        if matches!(misuse, Some(Misuse::Excused)) || (misuse.is_none() && remote.is_none() && expired.is_none()) {
            // The common case (a session's own token during its task): no alert, nothing built.
            return;
        }
        let (seen_in, carrier, request, network) = match &t.via {
            TokenVia::Env { name } => ("env", Some(name.clone()), None, None),
            TokenVia::Argv { index } => ("argv", Some(format!("argv[{index}]")), None, None),
            TokenVia::Http { tls, http2, method, host, path, dst } => {
                let scheme = if *tls { "https" } else { "http" };
                let version = if *http2 { " HTTP/2" } else { "" };
                let request = format!("{method} {scheme}://{}{path}{version}", host.as_deref().unwrap_or("?"));
                let network = match dst {
                    Some(dst) => Some(NetworkRef {
                        dst_ip: dst.ip().to_string(),
                        dst_port: dst.port(),
                        protocol: scheme.to_string(),
                        dst_name: host.clone(),
                    }),
                    None => host.as_ref().map(|h| NetworkRef {
                        dst_ip: String::new(),
                        dst_port: 0,
                        protocol: scheme.to_string(),
                        dst_name: Some(h.clone()),
                    }),
                };
                (scheme, t.credential.header.clone(), Some(request), network)
            }
            TokenVia::Received { field, .. } => ("https", Some(field.clone()), None, None),
        };
        let credential = CredentialRef {
            kind: t.credential.kind.as_str().to_string(),
            fingerprint: Some(t.credential.fingerprint.clone()),
            path: None,
            jwt: t.credential.jwt.clone(),
            seen_in: seen_in.to_string(),
            carrier: carrier.clone(),
            key_id: t.credential.key_id.clone(),
            request,
            learned: false,
        };
        let how = match (&t.via, &carrier) {
            (TokenVia::Env { .. }, Some(name)) => format!("in the environment (${name}) of an exec"),
            (TokenVia::Argv { index }, _) => format!("on the command line (argument {index}) of an exec"),
            (_, _) => format!("in a {seen_in} request"),
        };
        let who = if t.actor.exe.is_empty() { t.actor.comm.clone() } else { t.actor.exe.clone() };
        if let Some((rule, owner)) = remote {
            let when = if rule == Rule::TokenAfterTaskEnd { " after that task ended" } else { "" };
            let summary = format!(
                "{who} (pid {}), {}, used the token of session {} of host {} {how}{when}",
                t.actor.pid,
                self.actor_side(t.session),
                owner.id,
                owner.host
            );
            let mut credential = credential.clone();
            credential.learned =
                owner.tokens.iter().any(|tok| tok.learned && tok.fingerprint == t.credential.fingerprint);
            let mut alert = self.credential_alert(rule, 0, t.session, &t.actor, t.ts, summary, credential);
            alert.session = super::fleet::session_ref(&owner, t.ts);
            if let Some(p) = alert.process.as_mut().filter(|_| t.session == 0) {
                p.in_session = false;
            }
            alert.network = network.clone();
            alerts.push(alert);
        }

        let mut push = |engine: &Self, rule, session, summary: String| {
            let mut credential = credential.clone();
            credential.learned = engine.is_learned(session, &t.credential.fingerprint);
            let mut alert = engine.credential_alert(rule, session, t.session, &t.actor, t.ts, summary, credential);
            alert.network = network.clone();
            alerts.push(alert);
        };

        match misuse {
            Some(Misuse::AfterOwnTask) => {
                let summary =
                    format!("{who} (pid {}) used the session's token {how} after its task ended", t.actor.pid);
                push(self, Rule::TokenAfterTaskEnd, t.session, summary);
            }
            Some(Misuse::OutsideSession(owner)) => {
                push(self, Rule::TokenOutsideSession, owner, self.used_by_another(&who, t, owner, &how, ""));
            }
            Some(Misuse::AfterOwnersTask(owner)) => {
                let summary = self.used_by_another(&who, t, owner, &how, " after that task ended");
                push(self, Rule::TokenAfterTaskEnd, owner, summary);
            }
            Some(Misuse::Excused) | None => {}
        }

        if let Some(exp) = expired {
            let session =
                if self.sessions.contains_key(&t.session) { t.session } else { owners.first().copied().unwrap_or(0) };
            let ago = (t.ts as i64 / 1_000_000_000).saturating_sub(exp);
            let summary = format!("{who} (pid {}) sent a JWT that expired {ago} s ago {how}", t.actor.pid);
            push(self, Rule::ExpiredTokenUse, session, summary);
        }
    }

    pub(super) fn credential_open(&mut self, o: &CredentialOpen, alerts: &mut Vec<Alert>) {
        let credential = CredentialRef {
            kind: "file".into(),
            fingerprint: None,
            path: Some(o.path.clone()),
            jwt: None,
            seen_in: "file".into(),
            carrier: None,
            key_id: None,
            request: None,
            learned: false,
        };
        let who = if o.actor.exe.is_empty() { o.actor.comm.clone() } else { o.actor.exe.clone() };
        let names = |t: &Tracked| t.session.scope.credentials.contains(&o.path) || token_file(t, &o.path);

        if let Some(t) = self.sessions.get(&o.session) {
            let alert = if !names(t) {
                let summary =
                    format!("{who} (pid {}) opened {}, a credential its session was not granted", o.actor.pid, o.path);
                Some((Rule::CredentialOutOfScope, summary))
            } else if self.authority_over(o.session, o.ts) {
                let summary = format!(
                    "{who} (pid {}) opened the session's credential {} after its task ended",
                    o.actor.pid, o.path
                );
                Some((Rule::TokenAfterTaskEnd, summary))
            } else {
                None
            };
            if let Some((rule, summary)) = alert {
                alerts.push(self.credential_alert(rule, o.session, o.session, &o.actor, o.ts, summary, credential));
            }
            return;
        }
        // A process outside every session read a session's token file (writes are its
        // provisioning, not a use).
        if o.write {
            return;
        }
        let owners: Vec<SessionKey> =
            self.sessions.iter().filter(|(_, t)| token_file(t, &o.path)).map(|(k, _)| *k).collect();
        let (rule, owner) = match owners.iter().copied().find(|k| !self.authority_over(*k, o.ts)) {
            Some(active) => (Rule::TokenOutsideSession, active),
            None => match owners.iter().copied().max_by_key(|k| self.sessions[k].started) {
                Some(ended) => (Rule::TokenAfterTaskEnd, ended),
                None => return,
            },
        };
        let summary = format!(
            "{who} (pid {}), {}, opened session {}'s token file {}",
            o.actor.pid,
            self.actor_side(o.session),
            self.session_id(owner),
            o.path
        );
        alerts.push(self.credential_alert(rule, owner, o.session, &o.actor, o.ts, summary, credential));
    }

    pub(super) fn cred_change(&mut self, c: &CredChange, alerts: &mut Vec<Alert>) {
        let Some(serial) = self.procs.at(c.pid, c.ts) else { return };
        let Some(p) = self.procs.get(serial) else { return };
        // A process first seen through a capability check compares with what its image got.
        let (before_euid, before_caps, exec_caps) = (p.creds.euid, p.caps.or(p.exec_caps), p.exec_caps.unwrap_or(0));
        if let Some(p) = self.procs.get_mut(serial) {
            if c.euid.is_some() {
                p.creds.euid = c.euid;
            }
            if c.cap_effective.is_some() {
                p.caps = c.cap_effective;
            }
        }
        if !self.sessions.contains_key(&c.session) {
            return;
        }
        let call = match c.call {
            CredCall::Setuid => "setuid",
            CredCall::Setreuid => "setreuid",
            CredCall::Setresuid => "setresuid",
            CredCall::Setfsuid => "setfsuid",
            CredCall::Capset => "capset",
            CredCall::UidChange => "a setuid-family call",
            CredCall::CapabilityCheck => "a capset (seen when the process next used a capability)",
        };
        let gained_root = c.euid == Some(0) && before_euid.is_some_and(|u| u != 0);
        let gained_caps = match (before_caps, c.cap_effective) {
            // Beyond both what it held just before and what its image was given at exec.
            (Some(before), Some(after)) => after & !before & !exec_caps,
            _ => 0,
        };
        let summary = if gained_root {
            format!("{call} made process {} root (euid {} -> 0)", c.pid, before_euid.unwrap_or(0))
        } else if gained_caps != 0 {
            format!("{call} raised the effective capabilities of process {} (gained {gained_caps:#x})", c.pid)
        } else {
            return;
        };
        alerts.push(self.alert(Rule::PrivilegeEscalation, c.session, Some(serial), c.ts, summary));
    }

    fn session_id(&self, key: SessionKey) -> String {
        self.sessions.get(&key).map(|t| t.session.id.to_string()).unwrap_or_default()
    }
}

/// Whether `path` is one of the session's `tokens: file:` entries.
fn token_file(t: &Tracked, path: &str) -> bool {
    t.session.tokens.iter().any(|tok| tok.source.strip_prefix("file:") == Some(path))
}

/// How a use of a session's token breaks the session's bounds.
enum Misuse {
    /// By the session's own process, after its task ended.
    AfterOwnTask,
    /// By a process of another session or of none, while the owner's task runs.
    OutsideSession(SessionKey),
    /// By a process of another session or of none, after the owner's task ended.
    AfterOwnersTask(SessionKey),
    /// By the owner's launcher (see `from_launcher`): not a misuse, and nothing else is said.
    Excused,
}
