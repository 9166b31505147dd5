//! The collector's listener: one task per connection (TLS and the shared-key handshake when
//! configured), Forward messages parsed and handed to the store writer, acks sent only once the
//! batch is on disk. Bad input closes that connection only, with a logged reason.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
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
}

/// One message, at most (a PackedForward batch of many alerts is one message).
const MAX_MESSAGE: usize = 32 << 20;
/// A client that sends nothing for this long is disconnected.
const IDLE: Duration = Duration::from_secs(300);
const HANDSHAKE: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, config: Listener) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let config = config.clone();
                tokio::spawn(async move {
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

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connection(tcp: TcpStream, peer: SocketAddr, config: &Listener) -> Result<(), String> {
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
    let mut chunk = vec![0u8; 256 << 10];
    loop {
        while let Some(value) = buf.next(MAX_MESSAGE).map_err(|e| e.to_string())? {
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
        let n = match tokio::time::timeout(IDLE, conn.read(&mut chunk)).await {
            Ok(Ok(0)) => {
                return if buf.is_empty() { Ok(()) } else { Err("connection closed in the middle of a message".into()) }
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("idle".into()),
        };
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
