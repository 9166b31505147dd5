//! The CLI's side of the control plane: synchronous, one request per connection.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::protocol::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no agent is listening on {0}: start one with `monitor agent` (or `cargo xtask run`)")]
    NoAgent(String),
    #[error("permission denied on {0}: the control socket is root only; run this as root")]
    Permission(String),
    #[error("control socket {0}: {1}")]
    Io(String, std::io::Error),
    #[error("the agent sent a malformed response: {0}")]
    Protocol(String),
    /// The agent refused the request; its message says why.
    #[error("{0}")]
    Refused(String),
}

pub fn call(socket: &Path, request: &Request) -> Result<serde_json::Value, ClientError> {
    let name = socket.display().to_string();
    let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => ClientError::NoAgent(name.clone()),
        std::io::ErrorKind::PermissionDenied => ClientError::Permission(name.clone()),
        _ => ClientError::Io(name.clone(), e),
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| ClientError::Io(name.clone(), e))?;
    let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(|e| ClientError::Io(name.clone(), e))?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(|e| ClientError::Io(name.clone(), e))?;
    match serde_json::from_str::<Response>(&reply).map_err(|e| ClientError::Protocol(e.to_string()))? {
        Response::Ok { data } => Ok(data),
        Response::Error { message } => Err(ClientError::Refused(message)),
    }
}

/// Prints the agent's warnings about a session it started (a declared token it cannot know) on
/// stderr: the operator sees them where the command ran, not only in the agent's log.
pub fn print_warnings(command: &str, started: &serde_json::Value) {
    for warning in started["warnings"].as_array().into_iter().flatten().filter_map(|w| w.as_str()) {
        eprintln!("{command}: warning: {warning}");
    }
}

/// Reads and validates a session file and collects its env tokens from this process's
/// environment. Errors name the file, line and field.
pub fn start_request(
    file: &std::path::Path,
    id: Option<String>,
    bind: super::protocol::BindRequest,
) -> anyhow::Result<Request> {
    let parsed = super::SessionFile::read(file)?;
    let id = id.map(super::SessionId::try_from).transpose().map_err(|e| anyhow::anyhow!("--id: {e}"))?;
    let env_tokens = parsed
        .tokens
        .iter()
        .filter_map(|t| match t {
            crate::sessions::TokenSpec::Env(name) => {
                Some(std::env::var(name).ok().map(crate::sessions::fingerprint::Secret::new))
            }
            crate::sessions::TokenSpec::File(_) => None,
        })
        .collect();
    Ok(Request::Start { origin: file.display().to_string(), file: parsed, id, bind, env_tokens })
}
