//! The engine on synthetic event sequences: every rule, positive and negative.

use super::*;
use crate::{
    event::{Connect, Creds, Exec, Exit, Fork},
    sessions::{Session, SessionId},
};

const S: Nanos = 1_000_000_000;
const KEY: SessionKey = 1;
const ROOT: u32 = 100;

fn session(exec: Option<&[&str]>) -> Session {
    Session::example(exec, 2 * S, ROOT)
}

fn creds(uid: u32, euid: u32) -> Creds {
    Creds { uid, gid: uid, euid: Some(euid), egid: Some(euid) }
}

fn start(ts: Nanos, s: Session) -> Event {
    Event::SessionStarted { ts, key: KEY, session: Box::new(s) }
}

fn exec(ts: Nanos, pid: u32, ppid: u32, exe: &str, c: Creds) -> Event {
    Event::Exec(Exec {
        ts,
        session: KEY,
        pid,
        ppid,
        sid: None,
        exe: exe.into(),
        exe_real: None,
        argv: vec![exe.into()],
        argv_truncated: false,
        creds: c,
        cgroup: 1,
        cap_effective: Some(0),
    })
}

fn fork(ts: Nanos, parent: u32, child: u32) -> Event {
    Event::Fork(Fork { ts, session: KEY, parent, child, creds: creds(1000, 1000), cgroup: 1 })
}

fn exit(ts: Nanos, pid: u32) -> Event {
    Event::Exit(Exit { ts, session: KEY, pid, exit_code: 0 })
}

fn run(events: &[Event]) -> Vec<Alert> {
    let mut engine = Engine::default();
    events.iter().flat_map(|e| engine.handle(e)).collect()
}

fn rules(alerts: &[Alert]) -> Vec<Rule> {
    alerts.iter().map(|a| a.rule).collect()
}

/// A root that forks a child which execs; both exit within the task.
fn clean_task() -> Vec<Event> {
    vec![
        start(0, session(None)),
        exec(S, ROOT, 1, "/bin/sh", creds(1000, 1000)),
        fork(2 * S, ROOT, 101),
        exec(3 * S, 101, ROOT, "/usr/bin/curl", creds(1000, 1000)),
        exit(4 * S, 101),
        exit(5 * S, ROOT),
        Event::Tick { ts: 60 * S },
    ]
}

#[test]
fn clean_task_raises_nothing_and_root_exit_ends_session() {
    let mut engine = Engine::default();
    let alerts: Vec<_> = clean_task().iter().flat_map(|e| engine.handle(e)).collect();
    assert!(alerts.is_empty(), "{alerts:?}");
    let s = engine.session("t-1", 60 * S).unwrap();
    assert_eq!(s.state, SessionState::Ended);
    assert_eq!(s.end_reason, Some(EndReason::RootExited));
    assert_eq!(s.ended.as_deref(), Some(rfc3339(5 * S).as_str()));
}

#[test]
fn process_outlived_task_fires_once_per_survivor_at_the_deadline() {
    let mut events = clean_task();
    events.truncate(4); // child 101 never exits
    events.push(fork(4 * S, 101, 102)); // daemonized grandchild
    events.push(exit(5 * S, ROOT));
    let mut engine = Engine::default();
    let mut alerts = Vec::new();
    for e in &events {
        alerts.extend(engine.handle(e));
    }
    assert_eq!(engine.next_deadline(), Some(7 * S));
    alerts.extend(engine.handle(&Event::Tick { ts: 6 * S }));
    assert!(alerts.is_empty(), "inside grace: {alerts:?}");
    alerts.extend(engine.handle(&Event::Tick { ts: 7 * S }));
    alerts.extend(engine.handle(&Event::Tick { ts: 9 * S }));
    assert_eq!(rules(&alerts), [Rule::ProcessOutlivedTask, Rule::ProcessOutlivedTask]);
    let pids: Vec<_> = alerts.iter().map(|a| a.process.as_ref().unwrap().pid).collect();
    assert_eq!(pids, [101, 102]);
    let chain: Vec<_> = alerts[1].process.as_ref().unwrap().chain.iter().map(|a| a.pid).collect();
    assert_eq!(chain, [101, ROOT], "chain up to the session root");
    assert_eq!(alerts[0].session.state, "ended");
    assert_eq!(alerts[0].time, rfc3339(7 * S));
    assert_eq!(engine.next_deadline(), None);
}

#[test]
fn survivor_that_exits_within_grace_is_not_reported() {
    let mut events = clean_task();
    events.truncate(4);
    events.push(exit(5 * S, ROOT));
    events.push(exit(6 * S, 101));
    events.push(Event::Tick { ts: 10 * S });
    assert!(run(&events).is_empty());
}

#[test]
fn exec_after_end_and_grace_is_activity_after_task_end() {
    let mut events = clean_task();
    events.truncate(4);
    events.push(Event::SessionEnded { ts: 5 * S, key: KEY, reason: EndReason::Requested });
    events.push(exec(6 * S, 101, ROOT, "/usr/bin/true", creds(1000, 1000))); // within grace
    events.push(exec(8 * S, 101, ROOT, "/usr/bin/curl", creds(1000, 1000)));
    let alerts = run(&events);
    // The deadline at 7s is settled before the exec at 8s: the root and 101 were still alive.
    assert_eq!(rules(&alerts), [Rule::ProcessOutlivedTask, Rule::ProcessOutlivedTask, Rule::ActivityAfterTaskEnd]);
    assert_eq!(alerts[2].process.as_ref().unwrap().exe, "/usr/bin/curl");
    assert_eq!(alerts[2].process.as_ref().unwrap().pid, 101);
}

#[test]
fn exec_after_ttl_is_authority_expired() {
    let mut s = session(None);
    s.ttl_ns = 10 * S;
    let events = [
        start(0, s),
        exec(S, ROOT, 1, "/bin/sh", creds(1000, 1000)),
        exec(9 * S, ROOT, 1, "/bin/ls", creds(1000, 1000)),
        exec(11 * S, ROOT, 1, "/bin/cat", creds(1000, 1000)),
    ];
    let alerts = run(&events);
    assert_eq!(rules(&alerts), [Rule::AuthorityExpired]);
    assert_eq!(alerts[0].session.state, "expired");
}

#[test]
fn exec_outside_the_exec_scope() {
    let events = [
        start(0, session(Some(&["/bin/sh", "/usr/bin/curl"]))),
        exec(S, ROOT, 1, "/bin/sh", creds(1000, 1000)),
        fork(2 * S, ROOT, 101),
        exec(3 * S, 101, ROOT, "/usr/bin/curl", creds(1000, 1000)),
        fork(4 * S, ROOT, 102),
        exec(5 * S, 102, ROOT, "/usr/bin/ssh", creds(1000, 1000)),
    ];
    let alerts = run(&events);
    assert_eq!(rules(&alerts), [Rule::ExecOutOfScope]);
    assert_eq!(alerts[0].process.as_ref().unwrap().pid, 102);
    assert_eq!(alerts[0].owasp_nhi, ["NHI5"]);
}

/// A reloaded policy applies from its event on: the same finding before it keeps its severity.
#[test]
fn a_policy_reload_applies_from_its_event_on() {
    let reloaded = EngineConfig {
        severity: [(Rule::ExecOutOfScope, Severity::Critical)].into_iter().collect(),
        ..Default::default()
    };
    let events = [
        start(0, session(Some(&["/bin/sh"]))),
        exec(S, ROOT, 1, "/bin/sh", creds(1000, 1000)),
        fork(2 * S, ROOT, 101),
        exec(3 * S, 101, ROOT, "/usr/bin/ssh", creds(1000, 1000)),
        Event::PolicyReloaded { ts: 4 * S, config: Box::new(reloaded) },
        fork(5 * S, ROOT, 102),
        exec(6 * S, 102, ROOT, "/usr/bin/scp", creds(1000, 1000)),
    ];
    let alerts = run(&events);
    let severities: Vec<Severity> = alerts.iter().map(|a| a.severity).collect();
    assert_eq!(severities, [Rule::ExecOutOfScope.default_severity(), Severity::Critical], "{alerts:#?}");
}

#[test]
fn setuid_exec_is_privilege_escalation_and_root_sessions_are_not() {
    let events = [
        start(0, session(None)),
        exec(S, ROOT, 1, "/bin/sh", creds(1000, 1000)),
        fork(2 * S, ROOT, 101),
        exec(3 * S, 101, ROOT, "/usr/bin/sudo", creds(1000, 0)),
    ];
    let alerts = run(&events);
    assert_eq!(rules(&alerts), [Rule::PrivilegeEscalation]);
    assert_eq!(alerts[0].severity, Severity::Critical);
    assert_eq!(alerts[0].mitre, ["T1548"]);

    // A task that runs as root from the start gains nothing.
    let events = [
        start(0, session(None)),
        exec(S, ROOT, 1, "/bin/sh", creds(0, 0)),
        fork(2 * S, ROOT, 101),
        exec(3 * S, 101, ROOT, "/bin/ls", creds(0, 0)),
    ];
    assert!(run(&events).is_empty());
}

#[test]
fn a_reused_pid_does_not_join_the_old_lineage() {
    let events = [
        start(0, session(None)),
        exec(S, ROOT, 1, "/bin/sh", creds(1000, 1000)),
        fork(2 * S, ROOT, 101),
        exit(3 * S, 101),
        // pid 101 comes back as a child of 101's sibling 102
        fork(4 * S, ROOT, 102),
        fork(5 * S, 102, 101),
        exit(6 * S, ROOT),
        Event::Tick { ts: 20 * S },
    ];
    let alerts = run(&events);
    assert_eq!(rules(&alerts), [Rule::ProcessOutlivedTask, Rule::ProcessOutlivedTask]);
    let reused = alerts.iter().find(|a| a.process.as_ref().unwrap().pid == 101).unwrap();
    let chain: Vec<_> = reused.process.as_ref().unwrap().chain.iter().map(|a| a.pid).collect();
    assert_eq!(chain, [102, ROOT]);
}

#[test]
fn lost_events_raise_monitor_blind() {
    let alerts = run(&[Event::Lost { ts: S, source: "ring buffer full".into(), count: 3, session: None }]);
    assert_eq!(rules(&alerts), [Rule::MonitorBlind]);
    assert!(alerts[0].summary.contains('3'));
    assert!(alerts[0].summary.contains("host-wide"), "{}", alerts[0].summary);
    assert!(alerts[0].session.id.is_empty());
}

#[test]
fn lost_events_of_a_session_name_it() {
    let alerts = run(&[
        start(S, session(None)),
        Event::Lost { ts: 2 * S, source: "kernel ring buffer full".into(), count: 7, session: Some(KEY) },
    ]);
    assert_eq!(rules(&alerts), [Rule::MonitorBlind]);
    assert_eq!(alerts[0].session.id, session(None).id.to_string());
    assert!(alerts[0].summary.contains("lost 7 event(s) of session"), "{}", alerts[0].summary);
}

#[test]
fn same_stream_same_alerts() {
    let mut events = clean_task();
    events.truncate(4);
    events.push(exit(5 * S, ROOT));
    events.push(Event::Tick { ts: 30 * S });
    assert_eq!(run(&events), run(&events));
    assert_eq!(run(&events).len(), 1);
}

#[test]
fn finished_sessions_are_forgotten_after_an_hour() {
    let mut engine = Engine::default();
    for e in clean_task() {
        engine.handle(&e);
    }
    engine.handle(&Event::Tick { ts: 3000 * S });
    assert!(engine.session("t-1", 3000 * S).is_some());
    engine.handle(&Event::Tick { ts: 5 * S + FORGET_AFTER_NS + S });
    assert!(engine.session("t-1", 0).is_none());
}

fn connect(ts: Nanos, pid: u32, addr: &str, port: u16, verdict: Verdict) -> Event {
    Event::Connect(Connect {
        ts,
        session: KEY,
        pid,
        tid: pid,
        creds: creds(1000, 1000),
        cgroup: 1,
        transport: crate::event::Transport::Tcp,
        addr: addr.parse().unwrap(),
        port,
        connect: true,
        verdict,
        fd: Some(3),
    })
}

fn scoped(connect: &[&str], enforce: bool) -> Session {
    let mut s = session(None);
    s.scope.connect = Some(connect.iter().map(|c| c.parse().unwrap()).collect());
    s.enforce = enforce;
    s
}

#[test]
fn connect_outside_the_scope_is_out_of_scope_connect_with_network_fields() {
    let events = [
        start(0, scoped(&["127.0.0.2:8443", "[::1]:9000-9100"], false)),
        exec(S, ROOT, 1, "/usr/bin/curl", creds(1000, 1000)),
        connect(2 * S, ROOT, "127.0.0.2", 8443, Verdict::Allowed),
        connect(3 * S, ROOT, "::1", 9050, Verdict::Allowed),
        connect(4 * S, ROOT, "127.0.0.3", 8443, Verdict::Allowed),
        connect(5 * S, ROOT, "127.0.0.2", 22, Verdict::Allowed),
    ];
    let alerts = run(&events);
    assert_eq!(rules(&alerts), [Rule::OutOfScopeConnect, Rule::OutOfScopeConnect]);
    let net = alerts[0].network.as_ref().unwrap();
    assert_eq!((net.dst_ip.as_str(), net.dst_port, net.protocol.as_str()), ("127.0.0.3", 8443, "tcp"));
    assert_eq!(alerts[0].action, Action::Observed);
    assert_eq!(alerts[0].mitre, ["T1021", "T1550.001"]);
    assert_eq!(alerts[1].network.as_ref().unwrap().dst_port, 22);
    assert_eq!(alerts[0].process.as_ref().unwrap().exe, "/usr/bin/curl");
}

#[test]
fn a_session_without_a_connect_scope_may_connect_anywhere() {
    let events = [start(0, session(None)), connect(S, ROOT, "127.0.0.9", 1, Verdict::Allowed)];
    assert!(run(&events).is_empty());
}

#[test]
fn kernel_refusals_are_blocked_alerts_of_the_matching_rule() {
    let events = [
        start(0, scoped(&["127.0.0.2:80"], true)),
        connect(S, ROOT, "127.0.0.3", 80, Verdict::BlockedScope),
        Event::SessionEnded { ts: 2 * S, key: KEY, reason: EndReason::Requested },
        connect(3 * S, ROOT, "127.0.0.2", 80, Verdict::BlockedEnded),
    ];
    let alerts = run(&events);
    assert_eq!(rules(&alerts), [Rule::OutOfScopeConnect, Rule::ActivityAfterTaskEnd]);
    assert!(alerts.iter().all(|a| a.action == Action::Blocked));
}

#[test]
fn connects_after_the_end_or_the_ttl_break_the_time_rules() {
    let mut s = scoped(&["127.0.0.2:80"], false);
    s.ttl_ns = 10 * S;
    let events = [
        start(0, s),
        connect(11 * S, ROOT, "127.0.0.2", 80, Verdict::Allowed),
        Event::SessionEnded { ts: 12 * S, key: KEY, reason: EndReason::Requested },
        connect(13 * S, ROOT, "127.0.0.2", 80, Verdict::Allowed), // within grace
        connect(15 * S, ROOT, "127.0.0.2", 80, Verdict::Allowed),
    ];
    let alerts = run(&events);
    assert_eq!(
        rules(&alerts),
        [Rule::AuthorityExpired, Rule::ProcessOutlivedTask, Rule::ActivityAfterTaskEnd],
        "{alerts:#?}"
    );
}

#[test]
fn an_enforcing_session_kills_what_outlives_its_task() {
    let mut engine = Engine::default();
    let mut s = session(None);
    s.enforce = true;
    for e in [start(0, s), exec(S, ROOT, 1, "/bin/sh", creds(1000, 1000)), fork(2 * S, ROOT, 101), exit(3 * S, ROOT)] {
        engine.handle(&e);
    }
    assert_eq!(engine.drain_effects(), [Effect::SessionEnded(KEY)]);
    let alerts = engine.handle(&Event::Tick { ts: 10 * S });
    assert_eq!(rules(&alerts), [Rule::ProcessOutlivedTask]);
    assert_eq!(alerts[0].action, Action::Killed);
    assert_eq!(engine.drain_effects(), [Effect::Kill { session: KEY, pid: 101 }]);
}

mod credentials {
    use super::*;
    use crate::{
        credentials::{CredentialKind, JwtClaims},
        event::{Actor, CredCall, CredChange, CredentialOpen, SeenCredential, TokenUse, TokenVia},
        sessions::TokenRef,
    };

    const TOKEN: &str = "hmac-sha256:00112233445566778899aabbccddeeff";

    fn with_token() -> Session {
        let mut s = session(None);
        s.tokens = vec![
            TokenRef { source: "env:BOT_TOKEN".into(), fingerprint: Some(TOKEN.into()) },
            TokenRef { source: "file:/run/secrets/bot/token".into(), fingerprint: Some("hmac-sha256:ff".into()) },
        ];
        s.scope.credentials = vec!["/run/secrets/bot/ca.pem".into()];
        s
    }

    fn actor(pid: u32) -> Actor {
        Actor {
            pid,
            tid: pid,
            ppid: 0,
            sid: None,
            comm: "curl".into(),
            exe: "/usr/bin/curl".into(),
            uid: 1000,
            cgroup: 1,
        }
    }

    fn http(ts: Nanos, session: SessionKey, pid: u32, fingerprint: &str, jwt: Option<JwtClaims>) -> Event {
        Event::TokenUse(TokenUse {
            ts,
            session,
            actor: actor(pid),
            credential: SeenCredential {
                kind: CredentialKind::Bearer,
                fingerprint: fingerprint.into(),
                header: Some("authorization".into()),
                key_id: None,
                jwt,
            },
            via: TokenVia::Http {
                tls: true,
                http2: false,
                method: "GET".into(),
                host: Some("127.0.0.2:8443".into()),
                path: "/refunds".into(),
                dst: None,
            },
        })
    }

    fn open(ts: Nanos, session: SessionKey, pid: u32, path: &str, write: bool) -> Event {
        Event::CredentialOpen(CredentialOpen { ts, session, actor: actor(pid), path: path.into(), fd: 3, write })
    }

    fn task() -> Vec<Event> {
        vec![start(0, with_token()), exec(S, ROOT, 1, "/bin/sh", creds(1000, 1000))]
    }

    /// File reads seen through fanotify carry only the reader's pid (and its cgroup while it
    /// lives): the engine names the session, by live session process first, then by bound cgroup.
    #[test]
    fn file_reads_are_attributed_by_pid_then_by_bound_cgroup() {
        let mut engine = Engine::default();
        let mut bound = with_token();
        bound.binding.cgroup = Some(crate::sessions::CgroupBinding { path: "/sys/fs/cgroup/pod".into(), id: 77 });
        for e in [start(0, bound), exec(S, ROOT, 1, "/bin/sh", creds(1000, 1000))] {
            engine.handle(&e);
        }
        let read = |engine: &Engine, pid: u32, cgroup: u64| {
            let mut e = open(2 * S, 0, pid, "/etc/other-secret", false);
            if let Event::CredentialOpen(o) = &mut e {
                o.actor.cgroup = cgroup;
            }
            assert!(engine.attribute(&mut e), "a file read is always kept");
            e.session_key()
        };
        assert_eq!(read(&engine, ROOT, 0), Some(KEY), "a live session process, by pid");
        assert_eq!(read(&engine, 555, 77), Some(KEY), "an unknown pid in the bound cgroup");
        assert_eq!(read(&engine, 555, 78), None, "neither: outside sessions");
        engine.handle(&exit(3 * S, ROOT));
        assert_eq!(read(&engine, ROOT, 0), None, "an exited process is no longer the session's");
    }

    /// A declared token file rotated: the new value is the session's, used by a process outside
    /// after the end it is token_after_task_end; the same rotation seen twice adds nothing.
    #[test]
    fn a_rotated_token_is_the_session_s_too() {
        const ROTATED: &str = "hmac-sha256:0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f";
        let rotation = |ts| Event::TokenRotated {
            ts,
            key: KEY,
            source: "file:/run/secrets/bot/token".into(),
            fingerprint: ROTATED.into(),
        };
        let mut events = task();
        events.extend([rotation(2 * S), rotation(3 * S), exit(4 * S, ROOT), http(10 * S, 0, 900, ROTATED, None)]);
        let alerts = run(&events);
        assert_eq!(rules(&alerts), [Rule::TokenAfterTaskEnd]);
        assert_eq!(alerts[0].credential.as_ref().unwrap().fingerprint.as_deref(), Some(ROTATED));
        let mut engine = Engine::default();
        for e in &events[..4] {
            engine.handle(e);
        }
        let tokens = &engine.adoptable()[0].session.tokens;
        assert_eq!(tokens.iter().filter(|t| t.fingerprint.as_deref() == Some(ROTATED)).count(), 1, "{tokens:?}");
        assert_eq!(tokens.len(), 3, "the old values stay the session's");
    }

    #[test]
    fn token_inside_its_active_session_is_only_observed() {
        let mut events = task();
        events.push(http(2 * S, KEY, ROOT, TOKEN, None));
        events.push(open(3 * S, KEY, ROOT, "/run/secrets/bot/token", false));
        events.push(open(3 * S, KEY, ROOT, "/run/secrets/bot/ca.pem", false));
        assert_eq!(rules(&run(&events)), []);
    }

    #[test]
    fn token_after_the_task_ended_and_its_grace() {
        let mut events = task();
        events.push(fork(2 * S, ROOT, 101));
        events.push(exit(3 * S, ROOT));
        events.push(http(4 * S, KEY, 101, TOKEN, None)); // within the grace: tolerated
        events.push(http(6 * S, KEY, 101, TOKEN, None));
        events.push(open(7 * S, KEY, 101, "/run/secrets/bot/token", false));
        let alerts = run(&events);
        let token: Vec<_> = alerts.iter().filter(|a| a.rule == Rule::TokenAfterTaskEnd).collect();
        assert_eq!(token.len(), 2, "{alerts:#?}");
        let c = token[0].credential.as_ref().unwrap();
        assert_eq!((c.fingerprint.as_deref(), c.seen_in.as_str()), (Some(TOKEN), "https"));
        assert_eq!(c.request.as_deref(), Some("GET https://127.0.0.2:8443/refunds"));
        assert_eq!(token[0].process.as_ref().unwrap().chain[0].pid, ROOT);
        assert_eq!(token[1].credential.as_ref().unwrap().path.as_deref(), Some("/run/secrets/bot/token"));
    }

    /// A short-lived client's request can reach the engine after its exit did (the request took
    /// the credential path, the exit the process path): the alert still has its chain.
    #[test]
    fn a_use_that_arrives_after_its_process_exited_keeps_the_chain() {
        let mut events = task();
        events.push(fork(2 * S, ROOT, 101));
        events.push(exit(3 * S, ROOT));
        events.push(exit(7 * S, 101));
        events.push(http(6 * S, KEY, 101, TOKEN, None));
        let alerts = run(&events);
        let token = alerts.iter().find(|a| a.rule == Rule::TokenAfterTaskEnd).expect("token_after_task_end");
        let process = token.process.as_ref().unwrap();
        assert_eq!(process.pid, 101);
        assert_eq!(process.chain.iter().map(|a| a.pid).collect::<Vec<_>>(), [ROOT]);
    }

    #[test]
    fn token_used_by_a_process_outside_the_session() {
        let mut events = task();
        events.push(http(2 * S, 0, 4242, TOKEN, None));
        events.push(open(3 * S, 0, 4243, "/run/secrets/bot/token", false));
        events.push(open(3 * S, 0, 4244, "/run/secrets/bot/token", true)); // provisioning: not a use
        events.push(http(4 * S, 0, 4245, "hmac-sha256:unrelated", None));
        let alerts = run(&events);
        assert_eq!(rules(&alerts), [Rule::TokenOutsideSession, Rule::TokenOutsideSession]);
        assert_eq!(alerts[0].session.id, "t-1");
        assert_eq!(alerts[0].process.as_ref().unwrap().pid, 4242);
        assert!(alerts[0].summary.contains("a process in no session"), "{}", alerts[0].summary);
    }

    #[test]
    fn outside_use_after_the_end_is_a_token_after_task_end() {
        let mut events = task();
        events.push(exit(2 * S, ROOT));
        events.push(http(10 * S, 0, 4242, TOKEN, None));
        assert_eq!(rules(&run(&events)), [Rule::TokenAfterTaskEnd]);
    }

    #[test]
    fn credential_files_outside_the_scope() {
        let mut events = task();
        events.push(open(2 * S, KEY, ROOT, "/root/.aws/credentials", false));
        events.push(open(2 * S, 0, 555, "/root/.aws/credentials", false)); // outside sessions: not a rule
        let alerts = run(&events);
        assert_eq!(rules(&alerts), [Rule::CredentialOutOfScope]);
        assert_eq!(alerts[0].credential.as_ref().unwrap().kind, "file");
    }

    #[test]
    fn expired_jwt_on_the_wire() {
        let exp = |secs| Some(JwtClaims { exp: Some(secs), act: vec!["svc:bot".into()], ..Default::default() });
        let mut events = task();
        events.push(http(100 * S, KEY, ROOT, TOKEN, exp(50)));
        events.push(http(100 * S, KEY, ROOT, TOKEN, exp(500)));
        let alerts = run(&events);
        assert_eq!(rules(&alerts), [Rule::ExpiredTokenUse]);
        assert!(alerts[0].summary.contains("expired 50 s ago"), "{}", alerts[0].summary);
        assert_eq!(alerts[0].credential.as_ref().unwrap().jwt.as_ref().unwrap().act, ["svc:bot"]);
    }

    #[test]
    fn setuid_to_root_and_raised_capabilities() {
        let change = |ts, call, euid, caps| {
            Event::CredChange(CredChange {
                ts,
                session: KEY,
                pid: ROOT,
                call,
                euid: Some(euid),
                cap_effective: Some(caps),
            })
        };
        let mut events = task();
        events.push(change(2 * S, CredCall::Capset, 1000, 0)); // dropping nothing: fine
        events.push(change(3 * S, CredCall::Capset, 1000, 1 << 21)); // CAP_SYS_ADMIN raised
        events.push(change(4 * S, CredCall::Setresuid, 0, 1 << 21));
        let alerts = run(&events);
        assert_eq!(rules(&alerts), [Rule::PrivilegeEscalation, Rule::PrivilegeEscalation]);
        assert!(alerts[0].summary.contains("capset"), "{}", alerts[0].summary);
        assert!(alerts[1].summary.contains("setresuid made process 100 root"), "{}", alerts[1].summary);
    }

    #[test]
    fn restoring_capabilities_the_image_was_given_is_not_an_escalation() {
        let full = (1u64 << 41) - 1;
        let mut events = vec![start(0, with_token())];
        if let Event::Exec(mut e) = exec(S, ROOT, 1, "/usr/bin/setpriv", creds(0, 0)) {
            e.cap_effective = Some(full);
            events.push(Event::Exec(e));
        }
        let change = |ts, caps| {
            Event::CredChange(CredChange {
                ts,
                session: KEY,
                pid: ROOT,
                call: CredCall::Capset,
                euid: Some(65534),
                cap_effective: Some(caps),
            })
        };
        events.push(change(2 * S, 0));
        events.push(change(3 * S, full));
        assert_eq!(rules(&run(&events)), []);
    }

    /// A token no session declared, sent or received by a session process during its task,
    /// becomes that session's: its use after the task, or by a process outside it, is caught and
    /// marked `learned`. With learning off, nothing is.
    #[test]
    fn tokens_obtained_during_the_task_are_learnt() {
        const MINTED: &str = "hmac-sha256:99999999999999999999999999999999";
        const RECEIVED: &str = "hmac-sha256:88888888888888888888888888888888";
        let received = Event::TokenUse(TokenUse {
            ts: 2 * S,
            session: KEY,
            actor: actor(ROOT),
            credential: SeenCredential {
                kind: CredentialKind::Bearer,
                fingerprint: RECEIVED.into(),
                header: None,
                key_id: None,
                jwt: None,
            },
            via: TokenVia::Received { field: "access_token".into() },
        });
        let mut events = task();
        events.push(http(2 * S, KEY, ROOT, MINTED, None));
        events.push(received);
        events.push(Event::SessionEnded { ts: 3 * S, key: KEY, reason: EndReason::Requested });
        // After the grace, from a process the task left behind, and from outside.
        events.push(http(10 * S, KEY, ROOT, MINTED, None));
        events.push(http(11 * S, 0, 900, RECEIVED, None));
        let mut engine = Engine::new(EngineConfig { learn_tokens: true, ..Default::default() });
        let alerts: Vec<Alert> = events.iter().flat_map(|e| engine.handle(e)).collect();
        let token_alerts: Vec<&Alert> = alerts.iter().filter(|a| a.rule == Rule::TokenAfterTaskEnd).collect();
        assert_eq!(token_alerts.len(), 2, "{alerts:#?}");
        for a in &token_alerts {
            let credential = a.credential.as_ref().unwrap();
            assert!(credential.learned, "{a:#?}");
            assert_eq!(a.session.id, session(None).id.to_string());
        }
        assert!(rules(&run(&events)).iter().all(|r| *r != Rule::TokenAfterTaskEnd), "learning off: nothing learnt");
        // A token first seen after the end is not learnt: it is the session's activity after
        // its end (another rule), not a credential of its task.
        let mut late = task();
        late.push(Event::SessionEnded { ts: 3 * S, key: KEY, reason: EndReason::Requested });
        late.push(http(10 * S, KEY, ROOT, MINTED, None));
        late.push(http(11 * S, 0, 900, MINTED, None));
        let mut engine = Engine::new(EngineConfig { learn_tokens: true, ..Default::default() });
        let alerts: Vec<Alert> = late.iter().flat_map(|e| engine.handle(e)).collect();
        assert!(alerts.iter().all(|a| a.rule != Rule::TokenAfterTaskEnd), "{alerts:#?}");
    }

    fn env_exec(ts: Nanos, pid: u32, ppid: u32) -> Event {
        Event::TokenUse(TokenUse {
            ts,
            session: 0,
            actor: Actor { ppid, ..actor(pid) },
            credential: SeenCredential {
                kind: CredentialKind::Env,
                fingerprint: TOKEN.into(),
                header: None,
                key_id: None,
                jwt: None,
            },
            via: TokenVia::Env { name: "BOT_TOKEN".into() },
        })
    }

    fn folding(window: Nanos) -> Engine {
        Engine::new(EngineConfig { fold_window_ns: window, ..Default::default() })
    }

    /// A shell that exported the token runs 50 commands after the task ended: one alert, sent at
    /// once, then one update with the count, by event time (a Tick), never 50 alerts.
    #[test]
    fn repeats_of_a_finding_fold_into_one_alert_and_its_update() {
        let mut engine = folding(60 * S);
        let mut sent = Vec::new();
        for e in task() {
            sent.extend(engine.handle(&e));
        }
        sent.extend(engine.handle(&exit(2 * S, ROOT)));
        for i in 0..50 {
            sent.extend(engine.handle(&env_exec(10 * S + i * 1_000_000, 5000 + i as u32, 4000)));
        }
        assert_eq!(sent.len(), 1, "{sent:#?}");
        assert_eq!((sent[0].rule, sent[0].count), (Rule::TokenAfterTaskEnd, 1));
        let due = engine.next_deadline().expect("an update is due");
        assert_eq!(due, 10 * S + 1_000_000 + fold::UPDATE_DELAY_NS, "the first repeat not sent, plus the delay");
        let update = engine.handle(&Event::Tick { ts: due });
        assert_eq!(update.len(), 1, "{update:#?}");
        assert_eq!(update[0].count, 50);
        assert_eq!(update[0].fold, sent[0].fold, "an update of the same finding");
        assert_eq!(update[0].first_seen, sent[0].time);
        assert_eq!(update[0].last_seen, rfc3339(10 * S + 49 * 1_000_000));
        assert_eq!(update[0].pids.len(), 50);
        assert!(engine.handle(&Event::Tick { ts: 30 * S }).is_empty(), "nothing new: no update");
        // Past the window a repeat is a new alert.
        let later = engine.handle(&env_exec(71 * S, 6000, 4000));
        assert_eq!((later.len(), later[0].count), (1, 1));
        assert_ne!(later[0].fold, sent[0].fold);
    }

    #[test]
    fn other_lineages_and_credentials_are_other_findings_and_a_stop_flushes() {
        let mut engine = folding(60 * S);
        for e in task() {
            engine.handle(&e);
        }
        engine.handle(&exit(2 * S, ROOT));
        let first = engine.handle(&env_exec(10 * S, 5000, 4000));
        let child = engine.handle(&env_exec(10 * S + 1, 5001, 5000));
        let other = engine.handle(&env_exec(10 * S + 2, 7000, 6999));
        assert_eq!((first.len(), child.len(), other.len()), (1, 0, 1), "a child folds, a stranger does not");
        let stop = engine.handle(&Event::AgentStopping { ts: 11 * S });
        assert_eq!(stop.len(), 1);
        assert_eq!((stop[0].fold, stop[0].count), (first[0].fold, 2));
    }

    /// Outside sessions the engine knows no ancestors: a command run from a subshell of the
    /// terminal that raised the finding folds by the terminal's Unix session; in init's session
    /// (0, 1), shared by everything a CI runner starts, the session is no lineage.
    #[test]
    fn a_terminal_session_is_one_lineage_but_init_s_is_not() {
        let in_sid = |e: Event, sid: u32| match e {
            Event::TokenUse(mut t) => {
                t.actor.sid = Some(sid);
                Event::TokenUse(t)
            }
            e => e,
        };
        for (sid, folded) in [(4000, true), (0, false), (1, false)] {
            let mut engine = folding(60 * S);
            for e in task() {
                engine.handle(&e);
            }
            engine.handle(&exit(2 * S, ROOT));
            let first = engine.handle(&in_sid(env_exec(10 * S, 5000, 4000), sid));
            // A grandchild of the terminal by a subshell (pid 5100, never seen).
            let deeper = engine.handle(&in_sid(env_exec(10 * S + 1, 5101, 5100), sid));
            assert_eq!(first.len(), 1);
            assert_eq!(deeper.is_empty(), folded, "session {sid}: {deeper:#?}");
            assert_eq!(first[0].process.as_ref().unwrap().sid, Some(sid), "the alert names the Unix session");
        }
    }

    #[test]
    fn folding_off_sends_every_occurrence() {
        let mut engine = folding(0);
        for e in task() {
            engine.handle(&e);
        }
        engine.handle(&exit(2 * S, ROOT));
        let sent: usize = (0..5).map(|i| engine.handle(&env_exec(10 * S + i, 5000 + i as u32, 4000)).len()).sum();
        assert_eq!(sent, 5);
    }

    /// The launcher's shell holds the token while the task is active; its later children are
    /// caught again once it ended. Init's session (0: a CI runner or a container entrypoint that
    /// never called setsid) is a session like another; an exec whose session is unknown is not
    /// the launcher's.
    #[test]
    fn the_launcher_lineage_holds_the_token_while_the_task_is_active() {
        for launcher in [200, 0] {
            let mut engine = Engine::default();
            let mut s = with_token();
            s.binding.launcher_sid = Some(launcher);
            let mut alerts = Vec::new();
            for e in [start(0, s), exec(S, ROOT, 300, "/bin/sh", creds(1000, 1000))] {
                alerts.extend(engine.handle(&e));
            }
            let in_sid = |e: Event, sid: Option<u32>| match e {
                Event::TokenUse(mut t) => {
                    t.actor.sid = sid;
                    Event::TokenUse(t)
                }
                e => e,
            };
            alerts.extend(engine.handle(&in_sid(env_exec(2 * S, 400, 200), Some(launcher))));
            alerts.extend(engine.handle(&in_sid(env_exec(2 * S, 401, 400), Some(launcher))));
            assert!(alerts.is_empty(), "launcher in session {launcher}: {alerts:#?}");
            let stranger = engine.handle(&in_sid(env_exec(2 * S, 900, 200), Some(900)));
            assert_eq!(rules(&stranger), [Rule::TokenOutsideSession], "launcher in session {launcher}");
            let p = stranger[0].process.as_ref().unwrap();
            assert!(!p.in_session && stranger[0].summary.contains("in no session"), "{:?}", stranger[0]);
            let unknown = engine.handle(&in_sid(env_exec(2 * S, 901, 200), None));
            assert_eq!(unknown.len(), 1, "an exec of unknown session is not excused: {unknown:#?}");
            assert_eq!(unknown[0].rule, Rule::TokenOutsideSession);
            engine.handle(&exit(3 * S, ROOT));
            let after = engine.handle(&in_sid(env_exec(10 * S, 402, 200), Some(launcher)));
            assert_eq!(rules(&after), [Rule::TokenAfterTaskEnd], "launcher in session {launcher}");
        }
    }

    /// Session B's process sends session A's token: the alert is A's, and names B.
    #[test]
    fn a_cross_session_use_names_both_sessions() {
        let mut engine = Engine::default();
        let mut b = session(None);
        b.id = SessionId::try_from("t-2".to_string()).unwrap();
        b.actor = "svc:other".into();
        b.binding.root_pid = Some(800);
        for e in task() {
            engine.handle(&e);
        }
        engine.handle(&Event::SessionStarted { ts: S, key: 2, session: Box::new(b) });
        engine.handle(&Event::Exec(Exec {
            session: 2,
            ..match exec(S, 800, 1, "/usr/bin/curl", creds(1000, 1000)) {
                Event::Exec(e) => e,
                _ => unreachable!(),
            }
        }));
        let alerts = engine.handle(&http(2 * S, 2, 800, TOKEN, None));
        assert_eq!(rules(&alerts), [Rule::TokenOutsideSession]);
        let a = &alerts[0];
        assert_eq!(a.session.id, "t-1");
        let other = a.process.as_ref().and_then(|p| p.session.as_ref()).expect("process.session");
        assert_eq!((other.id.as_str(), other.actor.as_str()), ("t-2", "svc:other"));
        assert!(a.summary.contains("session t-2 (actor svc:other for alice@example.com)"), "{}", a.summary);
    }

    /// A session of another host (the fleet watchlist), holding TOKEN and a learnt token.
    fn remote(ended_ns: Option<Nanos>) -> Event {
        use crate::sessions::remote::{RemoteSession, RemoteToken, REMOTE_SESSION_VERSION};
        let token =
            |fingerprint: &str, learned| RemoteToken { fingerprint: fingerprint.into(), kernel_hash: 7, learned };
        Event::FleetSession {
            ts: S,
            session: Box::new(RemoteSession {
                version: REMOTE_SESSION_VERSION,
                host: "node-a".into(),
                id: "ci-77".into(),
                principal: "bob@example.com".into(),
                actor: "svc:ci".into(),
                task: "release".into(),
                sponsor: "platform".into(),
                started_ns: 0,
                expires_ns: 600 * S,
                ended_ns,
                grace_ns: 2 * S,
                scope: "connect: 127.0.0.2:8443".into(),
                tokens: vec![token(TOKEN, false), token("hmac-sha256:1e", true)],
                seed_check: 0,
            }),
        }
    }

    /// A token of a task that ended on node-a, used here by a process in no session:
    /// token_after_task_end naming node-a's session and host; while that task runs, the same use
    /// is token_outside_session.
    #[test]
    fn another_host_s_token_used_here_after_its_task_and_during_it() {
        let alerts = run(&[remote(Some(10 * S)), http(20 * S, 0, 4242, TOKEN, None)]);
        assert_eq!(rules(&alerts), [Rule::TokenAfterTaskEnd]);
        let a = &alerts[0];
        assert_eq!((a.session.id.as_str(), a.session.host.as_deref()), ("ci-77", Some("node-a")));
        assert_eq!((a.session.state.as_str(), a.session.actor.as_str()), ("ended", "svc:ci"));
        assert!(a.summary.contains("session ci-77 of host node-a") && a.summary.contains("after that task ended"));
        assert!(!a.process.as_ref().unwrap().in_session);
        let alerts = run(&[remote(None), http(20 * S, 0, 4242, "hmac-sha256:1e", None)]);
        assert_eq!(rules(&alerts), [Rule::TokenOutsideSession]);
        assert!(alerts[0].credential.as_ref().unwrap().learned, "learnt on node-a");
        // Within node-a's grace, and an unrelated token: nothing.
        assert_eq!(
            rules(&run(&[remote(Some(10 * S)), http(11 * S, 0, 4242, TOKEN, None)])),
            [Rule::TokenOutsideSession]
        );
        assert_eq!(rules(&run(&[remote(Some(10 * S)), http(20 * S, 0, 4242, "hmac-sha256:22", None)])), []);
    }

    /// A session here that sends another host's token does not learn it (it is node-a's), and
    /// the use is node-a's finding naming this host's session.
    #[test]
    fn a_session_here_does_not_learn_another_host_s_token() {
        let mut engine = Engine::new(EngineConfig { learn_tokens: true, ..Default::default() });
        let mut events = vec![remote(Some(10 * S))];
        events.extend(task());
        events.push(http(20 * S, KEY, ROOT, "hmac-sha256:1e", None));
        events.push(http(21 * S, KEY, ROOT, "hmac-sha256:1e", None));
        let alerts: Vec<Alert> = events.iter().flat_map(|e| engine.handle(e)).collect();
        assert_eq!(rules(&alerts), [Rule::TokenAfterTaskEnd, Rule::TokenAfterTaskEnd], "{alerts:#?}");
        assert_eq!(alerts[0].session.host.as_deref(), Some("node-a"));
        let actor = alerts[0].process.as_ref().and_then(|p| p.session.as_ref()).expect("process.session");
        assert_eq!(actor.id, "t-1");
    }

    /// Another host's ended session is forgotten after the retention (a policy setting).
    #[test]
    fn another_host_s_session_is_forgotten_after_the_retention() {
        let config = EngineConfig { fleet_retention_ns: Some(100 * S), ..Default::default() };
        let mut engine = Engine::new(config);
        engine.handle(&remote(Some(10 * S)));
        assert_eq!(engine.watchlist_size().sessions, 1);
        assert_eq!(rules(&engine.handle(&http(109 * S, 0, 4242, TOKEN, None))), [Rule::TokenAfterTaskEnd]);
        assert_eq!(rules(&engine.handle(&http(111 * S, 0, 4242, TOKEN, None))), []);
        assert_eq!(engine.watchlist_size(), crate::engine::WatchlistSize::default());
    }
}
