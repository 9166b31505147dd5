//! The collector's listener: one task per connection (TLS and the shared-key handshake when
//! configured), Forward messages parsed and handed to the store writer, acks sent only once the
//! batch is on disk. Bad input closes that connection only, with a logged reason.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, Semaphore},
};

use super::store::Incoming;
use crate::forward::protocol::{self, ValueBuffer};

/// A batch for the store writer, and where to say it is durable.
pub struct StoreRequest {
    pub entries: Vec<Incoming>,
    pub reply: oneshot::Sender<Result<(), String>>,
}

#[derive(Clone)]
pub struct Listener {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub shared_key: Option<Arc<str>>,
    pub hostname: Arc<str>,
    pub store: mpsc::Sender<StoreRequest>,
    pub limits: Arc<Budget>,
}

/// The connection slots and the bytes of unfinished messages the network may hold.
pub struct Budget {
    connections: Arc<Semaphore>,
    /// In KiB, so a 256 MiB budget fits the semaphore's permit count.
    buffered_kib: Arc<Semaphore>,
    /// Held by the one connection that may finish its message beyond the budget: when the
    /// budget is all in unfinished messages of connections that each wait for more of it, none
    /// could finish and give any back. So memory is bounded by the budget and one message, and
    /// some message always completes.
    overdraft: Arc<tokio::sync::Mutex<()>>,
    max_connections: usize,
}

impl Budget {
    pub fn new(limits: super::Limits) -> Self {
        let kib = (limits.buffered / 1024).clamp(1, Semaphore::MAX_PERMITS);
        Budget {
            connections: Arc::new(Semaphore::new(limits.connections.min(Semaphore::MAX_PERMITS))),
            buffered_kib: Arc::new(Semaphore::new(kib)),
            overdraft: Arc::new(tokio::sync::Mutex::new(())),
            max_connections: limits.connections,
        }
    }
}

/// One message, at most (a PackedForward batch of many alerts is one message).
const MAX_MESSAGE: usize = 32 << 20;
/// A client that sends nothing for this long is disconnected.
const IDLE: Duration = Duration::from_secs(300);
const HANDSHAKE: Duration = Duration::from_secs(10);
/// The time for TLS and the shared-key handshake, all of it, and for each read while part of a
/// message is held: a peer that never authenticates, or sends the start of a frame and stalls
/// (a slow-loris), holds a slot and its bytes this long at most. An agent idle between alerts
/// holds nothing partial and keeps its connection for IDLE.
const SLOW: Duration = Duration::from_secs(10);
/// How long a connection waits for the buffer budget before it is closed.
const BUDGET_WAIT: Duration = Duration::from_secs(30);
/// How long a connection with part of a message waits for more of the budget before it asks
/// for the overdraft instead.
const BUDGET_TRY: Duration = Duration::from_millis(50);
/// Bytes read at a time.
const READ_CHUNK: usize = 16 << 10;

pub async fn serve(listener: TcpListener, config: Listener) {
    let mut refused = Refusals::default();
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let Ok(slot) = config.limits.connections.clone().try_acquire_owned() else {
                    // Closed at once: the peer retries later (the agent's spool keeps its alerts).
                    drop(tcp);
                    crate::metrics::collector().connection_error("refused");
                    refused.note(peer, config.limits.max_connections);
                    continue;
                };
                let config = config.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let metrics = crate::metrics::collector();
                    metrics.connections.inc();
                    metrics.open_connections.inc();
                    match connection(tcp, peer, &config).await {
                        Ok(()) => tracing::debug!(%peer, "connection closed"),
                        Err(reason) => {
                            tracing::warn!(%peer, "connection closed: {reason}");
                            metrics.connection_error(&reason);
                        }
                    }
                    metrics.open_connections.dec();
                });
            }
            Err(e) => {
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Refused connections, logged at most once a second with how many there were.
#[derive(Default)]
struct Refusals {
    since_log: u64,
    logged_at: Option<std::time::Instant>,
}

impl Refusals {
    fn note(&mut self, peer: SocketAddr, max: usize) {
        self.since_log += 1;
        if self.logged_at.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return;
        }
        tracing::warn!(
            %peer,
            refused = self.since_log,
            "refusing connections: {max} open already (--max-connections)"
        );
        self.since_log = 0;
        self.logged_at = Some(std::time::Instant::now());
    }
}

/// The part of the buffer budget one connection holds; given back when it ends.
struct Held {
    budget: Arc<Semaphore>,
    kib: u32,
    overdraft: Arc<tokio::sync::Mutex<()>>,
    /// Held while this connection finishes a message beyond the budget.
    overdrawn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Held {
    fn new(budget: &Budget) -> Self {
        Held { budget: budget.buffered_kib.clone(), kib: 0, overdraft: budget.overdraft.clone(), overdrawn: None }
    }

    /// Holds enough for `bytes`: more is waited for (the connection is not read meanwhile: TCP
    /// back-pressure), less is given back. A connection in the middle of a message that cannot
    /// get more soon takes the overdraft (one at a time) and finishes its message beyond the
    /// budget, which it gives back, with the overdraft, when the message is done.
    async fn resize(&mut self, bytes: usize) -> Result<(), String> {
        if self.overdrawn.is_some() && bytes > 0 {
            return Ok(());
        }
        let want = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        if want > self.kib {
            let more = want - self.kib;
            let mid_message = self.kib > 0;
            let first_try = if mid_message { BUDGET_TRY } else { BUDGET_WAIT };
            match tokio::time::timeout(first_try, self.budget.acquire_many(more)).await {
                Ok(Ok(permits)) => permits.forget(),
                Ok(Err(_)) => return Err("the collector is stopping".to_string()),
                Err(_) if mid_message => {
                    let overdraft = tokio::time::timeout(BUDGET_WAIT, self.overdraft.clone().lock_owned())
                        .await
                        .map_err(|_| "buffered-bytes budget exhausted (--max-buffered) for too long".to_string())?;
                    crate::metrics::collector().overdrafts.inc();
                    self.overdrawn = Some(overdraft);
                    return Ok(());
                }
                Err(_) => return Err("buffered-bytes budget exhausted (--max-buffered) for too long".to_string()),
            }
        } else if want < self.kib {
            self.budget.add_permits((self.kib - want) as usize);
        }
        self.kib = want;
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.add_permits(self.kib as usize);
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connection(tcp: TcpStream, peer: SocketAddr, config: &Listener) -> Result<(), String> {
    let (conn, buf) = tokio::time::timeout(SLOW, open(tcp, peer, config))
        .await
        .map_err(|_| "no handshake within the time allowed".to_string())??;
    serve_messages(conn, buf, config).await
}

/// TLS and the shared-key handshake, as configured.
async fn open(tcp: TcpStream, peer: SocketAddr, config: &Listener) -> Result<(Box<dyn Stream>, ValueBuffer), String> {
    let _ = tcp.set_nodelay(true);
    let mut conn: Box<dyn Stream> = match &config.tls {
        Some(acceptor) => match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => Box::new(tls),
            Ok(Err(e)) => return Err(format!("TLS handshake failed (a plaintext client on the TLS port?): {e}")),
            Err(_) => return Err("TLS handshake timed out".into()),
        },
        None => Box::new(tcp),
    };
    let mut buf = ValueBuffer::default();
    if let Some(key) = &config.shared_key {
        handshake(&mut conn, &mut buf, key, &config.hostname).await?;
        tracing::debug!(%peer, "shared key accepted");
    }
    Ok((conn, buf))
}

/// Reads messages until the peer closes: each batch stored, then acknowledged.
async fn serve_messages(mut conn: Box<dyn Stream>, mut buf: ValueBuffer, config: &Listener) -> Result<(), String> {
    let mut held = Held::new(&config.limits);
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        while let Some(value) = buf.next(MAX_MESSAGE).map_err(|e| e.to_string())? {
            // A message done: the overdraft, if it was needed for it, is for others now.
            held.overdrawn = None;
            let message = protocol::parse_message(value).map_err(|e| e.to_string())?;
            let entries: Vec<Incoming> = message.entries.into_iter().map(incoming).collect();
            let received = entries.len() as u64;
            let (reply, durable) = oneshot::channel();
            config.store.send(StoreRequest { entries, reply }).await.map_err(|_| "the collector is stopping")?;
            match durable.await {
                Ok(Ok(())) => {
                    crate::metrics::collector().records.inc_by(received);
                    if let Some(chunk) = message.chunk {
                        conn.write_all(&protocol::ack(&chunk)).await.map_err(|e| e.to_string())?;
                        crate::metrics::collector().batches_acked.inc();
                    }
                }
                // No ack: the sender keeps the batch and sends it again.
                Ok(Err(e)) => return Err(format!("store write failed, batch not acknowledged: {e}")),
                Err(_) => return Err("the store writer is gone".into()),
            }
        }
        held.resize(buf.len()).await?;
        let partial = !buf.is_empty();
        let n = match tokio::time::timeout(if partial { SLOW } else { IDLE }, conn.read(&mut chunk)).await {
            Ok(Ok(0)) => {
                return if buf.is_empty() { Ok(()) } else { Err("connection closed in the middle of a message".into()) }
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) if partial => return Err("a message's next bytes not within the time allowed".into()),
            Err(_) => return Err("idle".into()),
        };
        // The budget is held before the bytes are: a connection never holds more than it got.
        held.resize(buf.len() + n).await?;
        buf.extend(&chunk[..n]);
    }
}

async fn handshake(conn: &mut Box<dyn Stream>, buf: &mut ValueBuffer, key: &str, hostname: &str) -> Result<(), String> {
    let nonce = random16().ok_or("no randomness from the kernel for the handshake nonce")?;
    conn.write_all(&protocol::helo(&nonce, b"")).await.map_err(|e| e.to_string())?;
    let mut chunk = [0u8; 4096];
    let ping = loop {
        if let Some(v) = buf.next(64 << 10).map_err(|e| e.to_string())? {
            break v;
        }
        let n = match tokio::time::timeout(HANDSHAKE, conn.read(&mut chunk)).await {
            Ok(Ok(0)) => return Err("closed during the handshake".into()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no PING within the handshake time".into()),
        };
        buf.extend(&chunk[..n]);
    };
    match protocol::check_ping(&ping, &nonce, key) {
        Ok((_client, salt)) => {
            conn.write_all(&protocol::pong(true, "", hostname, &salt, &nonce, key)).await.map_err(|e| e.to_string())?;
            Ok(())
        }
        Err(reason) => {
            let _ = conn.write_all(&protocol::pong(false, reason, hostname, b"", &nonce, key)).await;
            Err(format!("handshake refused: {reason}"))
        }
    }
}

/// A received entry for the store, with its alert id (and count: an update of a folded
/// finding has a larger one) when it is a monitor alert.
fn incoming(e: protocol::Entry) -> Incoming {
    let alert = e.tag.starts_with("monitor.");
    let id = if alert { e.str_field("id") } else { None };
    let count = if alert { e.uint_field("count").unwrap_or(1) } else { 1 };
    Incoming { tag: e.tag, time_ns: e.time_ns, id, count, record: e.record }
}

/// 16 bytes from the kernel's CSPRNG, or none: a handshake never runs on a predictable nonce.
fn random16() -> Option<[u8; 16]> {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom fills the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    (n == bytes.len() as isize).then_some(bytes)
}
