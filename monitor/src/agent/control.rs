//! The agent's side of the control plane: a root-only Unix socket. Each connection carries one
//! request; a malformed request gets an error response and closes that connection only.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};

use super::{core::CoreHandle, reload::LivePolicy};
use crate::{
    probes::KernelMaps,
    sessions::{
        self, bind,
        fingerprint::FingerprintKey,
        protocol::{BindRequest, Request, Response, MAX_REQUEST_BYTES},
        with_real_paths, Binding, CgroupBinding, Scope, Session, SessionFile, SessionId, TokenRef, TokenSpec,
    },
};

/// What a connection handler needs; cheap to clone.
#[derive(Clone)]
pub struct ControlPlane {
    pub core: CoreHandle,
    pub maps: Arc<Mutex<KernelMaps>>,
    pub key: Arc<FingerprintKey>,
    /// The flags' defaults, over the policy's (see `AgentSettings`).
    pub default_ttl: Option<Duration>,
    pub default_grace: Option<Duration>,
    pub clock: crate::decode::Clock,
    pub policy: Arc<LivePolicy>,
    pub credentials: Arc<crate::credentials::CredentialIndex>,
    /// For the probes attached only while sessions run.
    pub probes: Arc<std::sync::Mutex<crate::probes::Probes>>,
    /// Asks the executable prober (agent/executables.rs) to look at the processes a session
    /// takes in when it starts: their execs may have gone unreported.
    pub executables: tokio::sync::mpsc::Sender<super::executables::Look>,
    /// The sessions' declared token files, looked at for rotation (agent/token_files.rs).
    pub token_files: Arc<super::token_files::TokenFiles>,
}

impl ControlPlane {
    /// Makes the kernel look for exactly the tokens the credential index holds now (after tokens
    /// were added outside a session start: rotated, or other hosts'), and attaches or detaches
    /// the probes tokens need.
    pub async fn look_for_tokens(&self) {
        let mut maps = self.maps.lock().await;
        let tokens_known = maps.sync_token_hashes(self.credentials.seed(), &self.credentials.token_hashes());
        self.probes.lock().unwrap_or_else(|p| p.into_inner()).set_tokens_known(tokens_known);
    }
}

/// Binds the socket: its directory 0700, the socket 0600, a stale socket replaced, a live one
/// (another agent) refused.
pub async fn listen(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!("another agent is already listening on {}", path.display());
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, plane: ControlPlane) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let plane = plane.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, plane).await {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

async fn connection(stream: UnixStream, plane: ControlPlane) -> std::io::Result<()> {
    let peer = stream.peer_cred()?;
    let (uid, caller) = (peer.uid(), peer.pid().and_then(|p| u32::try_from(p).ok()));
    let (read, mut write) = stream.into_split();
    let response = if uid != 0 {
        Response::Error {
            message: format!("permission denied: the control socket accepts root only (caller uid {uid})"),
        }
    } else {
        let mut line = Vec::new();
        let n = BufReader::new(read).take(MAX_REQUEST_BYTES as u64 + 1).read_until(b'\n', &mut line).await?;
        if n > MAX_REQUEST_BYTES {
            Response::Error { message: format!("request larger than {MAX_REQUEST_BYTES} bytes") }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(request) => handle(request, &plane, caller).await,
                Err(e) => Response::Error { message: format!("malformed request: {e}") },
            }
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await
}

async fn handle(request: Request, plane: &ControlPlane, caller: Option<u32>) -> Response {
    let result = match request {
        Request::Start { origin, file, id, bind, env_tokens } => {
            start(plane, &origin, file, id, bind, env_tokens, caller).await
        }
        Request::End { id, reason } => plane.core.end(id, reason).await.map(|s| json!(s)),

        Request::List => plane.core.list().await.map(|s| json!(s)),
        Request::Show { id } => plane.core.show(id).await.map(|s| json!(s)),
        Request::Probes => {
            let programs = plane.probes.lock().unwrap_or_else(|p| p.into_inner()).program_stats();
            Ok(json!({ "bpf_stats_enabled": crate::probes::stats::counting_enabled(), "programs": programs }))
        }
        Request::ReloadPolicy => plane.policy.reload().await.map(|message| json!({ "message": message })),
    };
    match result {
        Ok(data) => Response::Ok { data },
        Err(message) => Response::Error { message },
    }
}

async fn start(
    plane: &ControlPlane,
    origin: &str,
    file: SessionFile,
    id: Option<SessionId>,
    bind: BindRequest,
    env_tokens: Vec<Option<sessions::fingerprint::Secret>>,
    caller: Option<u32>,
) -> Result<serde_json::Value, String> {
    let (session, token_hashes, warnings) = resolve(plane, origin, file, id, &bind, env_tokens, caller)?;
    let id = session.id.to_string();
    for warning in &warnings {
        tracing::warn!(session = %id, "{warning}");
    }
    let cgroup = session.binding.cgroup.clone();
    let key = plane.core.start(session.clone()).await?;
    // The names its processes will find in their hosts file, before any of them runs.
    let hosts_file = match bind.pid {
        Some(pid) => std::path::PathBuf::from(format!("/proc/{pid}/root/etc/hosts")),
        None => std::path::PathBuf::from("/etc/hosts"),
    };
    let hosts_names = sessions::hosts::names(&hosts_file, key, crate::host::now_ns());
    plane.core.names(hosts_names.clone()).await;
    let mut paths = session.scope.credentials.clone();
    paths.extend(session.tokens.iter().filter_map(|t| t.source.strip_prefix("file:").map(str::to_string)));
    plane.credentials.add_session(key, token_hashes, paths);
    plane.token_files.add(key, session.tokens.iter().map(|t| t.source.as_str()));

    // The policy goes in before any process is bound, so the first connect is already enforced.
    let now = crate::host::now_ns();
    let expires_at = plane.clock.boot(now.saturating_add(session.ttl_ns));
    let mut maps = plane.maps.lock().await;
    // The session's tokens and credential files are watched before any process is bound.
    let tokens_known = maps.sync_token_hashes(plane.credentials.seed(), &plane.credentials.token_hashes());
    crate::credentials::watch::refresh(&plane.credentials, &mut maps, &plane.policy.get().credentials.watch);
    if let Err(e) = install_scope(plane, &mut maps, key, &session, &hosts_names, expires_at) {
        drop(maps);
        let _ = plane.core.end(id.clone(), crate::event::EndReason::Requested).await;
        return Err(e);
    }
    // Before any process is bound, so its first credential change is seen.
    {
        let mut probes = plane.probes.lock().unwrap_or_else(|p| p.into_inner());
        probes.set_sessions_running(true);
        probes.set_tokens_known(tokens_known);
    }
    // Snapshot first, bind second: a process's own events then always follow its snapshot.
    if let Some(pid) = bind.pid {
        let mut bound: Vec<u32> = Vec::new();
        // Twice: children forked between the first walk and the binding are caught by the second.
        for _ in 0..2 {
            let pids = bind::descendants(pid).map_err(|e| e.to_string())?;
            let new: Vec<u32> = pids.into_iter().filter(|p| !bound.contains(p)).collect();
            let seen = snapshots(&plane, &new, key, now);
            plane.core.seen(seen).await;
            maps.bind_pids(&new, key).map_err(|e| e.to_string())?;
            bound.extend(new);
        }
        look_at_executables(&plane, &bound);
    }
    if let Some(cgroup) = &cgroup {
        let members = bind_cgroup(plane, &mut maps, key, cgroup, now).await?;
        look_at_executables(&plane, &members);
    }
    tracing::info!(session = %id, key, "session started");
    Ok(json!({ "id": id, "key": key, "warnings": warnings }))
}

/// The kernel's part of a session before any process is bound: its connect scope (with the
/// policy's never_alert exemptions) and the addresses of the names its hosts file gives.
pub(crate) fn install_scope(
    plane: &ControlPlane,
    maps: &mut KernelMaps,
    key: crate::event::SessionKey,
    session: &Session,
    names: &[crate::event::Resolve],
    expires_at: u64,
) -> Result<(), String> {
    maps.install_policy(key, session, expires_at, &plane.policy.get().never_alert.connect)
        .and_then(|()| maps.allow_named_addresses(key, session, names, expires_at))
}

/// Binds a session's cgroup: its members' snapshots first, so their own events follow them.
/// Returns the members.
pub(super) async fn bind_cgroup(
    plane: &ControlPlane,
    maps: &mut KernelMaps,
    key: crate::event::SessionKey,
    cgroup: &CgroupBinding,
    now: u64,
) -> Result<Vec<u32>, String> {
    let members = bind::cgroup_members(Path::new(&cgroup.path));
    plane.core.seen(snapshots(plane, &members, key, now)).await;
    maps.bind_cgroup(cgroup.id, key).map_err(|e| e.to_string())?;
    Ok(members)
}

/// The executables of processes a session took in as it started were exec'd outside it, and
/// reported by the exec probe only if tokens were looked for then: they are looked at now (a
/// file already looked at costs a stat). A full queue loses a look only; the process's next
/// exec is reported. (An adopting agent looks at every running process anyway.)
fn look_at_executables(plane: &ControlPlane, pids: &[u32]) {
    for pid in pids {
        let _ = plane.executables.try_send(super::executables::Look::Process { pid: *pid });
    }
}

/// Turns a session file into a [`Session`]: id, default time bounds, fingerprints, binding.
/// Also returns, for each token whose value is known, its kernel prefilter hash and fingerprint,
/// and a warning for each declared token whose value is not (its uses would go unrecognised).
fn resolve(
    plane: &ControlPlane,
    origin: &str,
    file: SessionFile,
    id: Option<SessionId>,
    bind: &BindRequest,
    env_tokens: Vec<Option<sessions::fingerprint::Secret>>,
    caller: Option<u32>,
) -> Result<(Session, Vec<(u64, String)>, Vec<String>), String> {
    let id = match id.or(file.id) {
        Some(id) => id,
        None => SessionId::try_from(format!("s-{}", ulid::Ulid::new().to_string().to_lowercase()))?,
    };
    if let Some(pid) = bind.pid {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(format!("{origin}: process {pid} does not exist"));
        }
    }
    let cgroup = match &bind.cgroup {
        Some(path) => {
            let (dir, cgroup_id) = bind::resolve_cgroup(path).map_err(|e| e.to_string())?;
            Some(CgroupBinding { path: dir.display().to_string(), id: cgroup_id })
        }
        None => None,
    };
    // Scope parts the file leaves out come from the policy's defaults for this actor.
    let policy = plane.policy.get();
    let actor = policy.actors.get(&file.actor).cloned().unwrap_or_default();
    let mut env_values = env_tokens.into_iter();
    let mut hashes = Vec::new();
    let mut known = |raw: &[u8]| {
        let fingerprint = plane.key.fingerprint(raw);
        hashes.push((plane.credentials.token_hash(raw), fingerprint.clone()));
        fingerprint
    };
    let mut warnings = Vec::new();
    let tokens = file
        .tokens
        .iter()
        .map(|t| match t {
            TokenSpec::Env(name) => {
                let value = env_values.next().flatten();
                if value.is_none() {
                    warnings.push(format!(
                        "token env:{name}: the variable is not set in the environment of the command that \
                         started the session, so its uses will not be recognised"
                    ));
                }
                TokenRef { source: format!("env:{name}"), fingerprint: value.map(|v| known(v.expose())) }
            }
            TokenSpec::File(path) => {
                let fingerprint = match std::fs::read(path) {
                    Ok(raw) if !trim_newline(&raw).is_empty() => Some(known(trim_newline(&raw))),
                    Ok(_) => {
                        warnings
                            .push(format!("token file:{path}: the file is empty, so its uses will not be recognised"));
                        None
                    }
                    Err(e) => {
                        warnings.push(format!(
                            "token file:{path}: the agent cannot read it ({e}), so its uses will not be recognised"
                        ));
                        None
                    }
                };
                TokenRef { source: format!("file:{path}"), fingerprint }
            }
        })
        .collect();
    let session = Session {
        id,
        principal: file.principal,
        actor: file.actor,
        task: file.task,
        sponsor: file.sponsor,
        ttl_ns: file.ttl.or(plane.default_ttl).or(policy.defaults.ttl).unwrap_or(sessions::DEFAULT_TTL).as_nanos()
            as u64,
        grace_ns: file
            .grace
            .or(plane.default_grace)
            .or(policy.defaults.grace)
            .unwrap_or(sessions::DEFAULT_GRACE)
            .as_nanos() as u64,
        scope: Scope {
            connect: file.scope.connect.or(actor.connect),
            credentials: if file.scope.credentials.is_empty() { actor.credentials } else { file.scope.credentials },
            exec: file.scope.exec.or(actor.exec).map(with_real_paths),
        },

        tokens,
        enforce: file.enforce,
        binding: Binding {
            root_pid: bind.pid,
            cgroup,
            launcher_sid: caller.and_then(bind::stat_ids).map(|ids| ids.sid),
        },
    };
    Ok((session, hashes, warnings))
}

pub(crate) fn trim_newline(raw: &[u8]) -> &[u8] {
    raw.strip_suffix(b"\n").map(|r| r.strip_suffix(b"\r").unwrap_or(r)).unwrap_or(raw)
}

/// What /proc says of processes joining a session, with secrets on their command lines redacted.
pub(crate) fn snapshots(
    plane: &ControlPlane,
    pids: &[u32],
    key: crate::event::SessionKey,
    now: u64,
) -> Vec<crate::event::Process> {
    let mut seen: Vec<_> = pids.iter().filter_map(|p| bind::snapshot(*p, key, now)).collect();
    for p in &mut seen {
        crate::credentials::argv::redact(
            &mut p.argv,
            &plane.key,
            &plane.policy.get().credentials.api_key_headers,
            &|fp| plane.credentials.is_session_token(fp),
        );
    }
    seen
}
