//! The agent's forward output: alerts go to the disk spool first, and a sender task delivers
//! them as PackedForward batches with a chunk id, removing them from the spool only when the
//! receiver acknowledges the chunk. Reconnects with backoff; the shared-key handshake and TLS
//! when configured. Works with the collector, Fluentd, Fluent Bit and Vector.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::{mpsc, Notify},
};

use super::{
    protocol,
    spool::{Spool, SpoolRecord},
};
use crate::{alert::Alert, event::Event};

/// Where and how to forward: from `forward://HOST:PORT` or `forward+tls://HOST:PORT`, with
/// options as a query: `?shared_key_file=PATH&ca=PATH&server_name=NAME&tag=TAG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardTarget {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// The file holding the shared key (never the key itself on a command line).
    pub shared_key_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub server_name: Option<String>,
    pub tag: String,
}

pub const DEFAULT_TAG: &str = "monitor.alert";

impl ForwardTarget {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = spec.strip_prefix("forward+tls://") {
            (true, r)
        } else if let Some(r) = spec.strip_prefix("forward://") {
            (false, r)
        } else {
            return Err(format!("`{spec}` is not forward://HOST:PORT or forward+tls://HOST:PORT"));
        };
        let (addr, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| format!("`{spec}`: needs HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port: u16 = port.parse().map_err(|_| format!("`{spec}`: `{port}` is not a port"))?;
        if host.is_empty() || port == 0 {
            return Err(format!("`{spec}`: needs HOST:PORT"));
        }
        let mut target =
            Self { host, port, tls, shared_key_file: None, ca: None, server_name: None, tag: DEFAULT_TAG.into() };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| format!("`{spec}`: option `{pair}` needs a value"))?;
            match k {
                "shared_key_file" => target.shared_key_file = Some(PathBuf::from(v)),
                "ca" => target.ca = Some(PathBuf::from(v)),
                "server_name" => target.server_name = Some(v.to_string()),
                "tag" => target.tag = v.to_string(),
                "shared_key" => {
                    return Err(format!(
                        "`{spec}`: a shared key on the command line is visible to every user (ps); use shared_key_file=PATH"
                    ))
                }
                _ => return Err(format!("`{spec}`: unknown option `{k}` (shared_key_file, ca, server_name, tag)")),
            }
        }
        Ok(target)
    }

    /// A directory name for this target's spool.
    pub fn spool_name(&self) -> String {
        let scheme = if self.tls { "forward-tls" } else { "forward" };
        format!("{scheme}-{}-{}", self.host.replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "_"), self.port)
    }

    pub fn display(&self) -> String {
        format!("{}://{}:{}", if self.tls { "forward+tls" } else { "forward" }, self.host, self.port)
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An output: the spool, and the sender task that drains it.
pub struct ForwardOutput {
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
    target: ForwardTarget,
    /// Where a full spool reports what it dropped (the engine turns it into monitor_blind).
    lost: mpsc::Sender<Event>,
}

/// Alerts per batch, and bytes.
const BATCH_ALERTS: usize = 2000;
const BATCH_BYTES: usize = 4 << 20;
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl ForwardOutput {
    pub fn open(
        target: ForwardTarget,
        spool_dir: PathBuf,
        max_bytes: u64,
        lost: mpsc::Sender<Event>,
    ) -> anyhow::Result<Self> {
        // Fail at start, not at the first alert, on a bad CA, key file or spool.
        let key = read_shared_key(&target)?;
        let tls = if target.tls { Some(crate::tls::client_config(target.ca.as_deref())?) } else { None };
        let spool = Spool::open(&spool_dir, max_bytes).with_context(|| format!("spool {}", spool_dir.display()))?;
        let spool = Arc::new(Mutex::new(spool));
        crate::metrics::get().watch_spool(&target.display(), spool.clone());
        let wake = Arc::new(Notify::new());
        tokio::spawn(sender(target.clone(), key, tls, spool.clone(), wake.clone()));
        Ok(Self { spool, wake, target, lost })
    }

    /// Spools alerts (synced to disk) and wakes the sender.
    pub fn write(&mut self, alerts: &[Alert]) -> std::io::Result<()> {
        let records = alerts
            .iter()
            .map(|a| Ok(SpoolRecord { ts: a.ts, record: record_of(a)? }))
            .collect::<Result<Vec<_>, rmp_serde::encode::Error>>()
            .map_err(std::io::Error::other)?;
        self.write_records(&records)
    }

    /// Waits (up to `limit`) until the receiver acknowledged everything spooled: a stopping
    /// agent gives its sender that moment; what is left goes with the next start.
    pub async fn wait_drained(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self.spool.lock().unwrap_or_else(|p| p.into_inner()).is_drained() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(output = %self.target.display(), "stopping with alerts still spooled: they go with the next start");
    }

    /// Spools Forward records (synced to disk) and wakes the sender.
    pub fn write_records(&mut self, records: &[SpoolRecord]) -> std::io::Result<()> {
        let dropped = {
            let mut spool = self.spool.lock().unwrap_or_else(|p| p.into_inner());
            spool.append(records)?;
            std::mem::take(&mut spool.dropped)
        };
        self.wake.notify_one();
        if dropped > 0 {
            tracing::error!(output = %self.target.display(), dropped, "forward spool full: oldest alerts dropped");
            let event = Event::Lost {
                ts: crate::host::now_ns(),
                source: format!("forward spool for {} full: oldest alerts dropped", self.target.display()),
                count: dropped,
                session: None,
            };
            let _ = self.lost.try_send(event);
        }
        Ok(())
    }
}

fn read_shared_key(target: &ForwardTarget) -> anyhow::Result<Option<String>> {
    let Some(path) = &target.shared_key_file else { return Ok(None) };
    let key = std::fs::read_to_string(path).with_context(|| format!("shared key file {}", path.display()))?;
    let key = key.trim_end_matches(['\n', '\r']).to_string();
    if key.is_empty() {
        bail!("shared key file {} is empty", path.display());
    }
    Ok(Some(key))
}

/// Delivers the spool, batch by batch, reconnecting with backoff.
async fn sender(
    target: ForwardTarget,
    key: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    spool: Arc<Mutex<Spool>>,
    wake: Arc<Notify>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut conn = match connect(&target, key.as_deref(), tls.clone()).await {
            Ok(c) => {
                tracing::info!(output = %target.display(), "forward connected");
                backoff = Duration::from_millis(100);
                c
            }
            Err(e) => {
                tracing::warn!(output = %target.display(), "forward connect failed, retrying in {backoff:?}: {e:#}");
                crate::metrics::get().forward_retry(&target.display());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = deliver(&target, &mut conn, &spool, &wake).await {
            tracing::warn!(output = %target.display(), "forward connection lost, the spool keeps the alerts: {e:#}");
            crate::metrics::get().forward_retry(&target.display());
        }
    }
}

async fn deliver(
    target: &ForwardTarget,
    conn: &mut Box<dyn Stream>,
    spool: &Mutex<Spool>,
    wake: &Notify,
) -> anyhow::Result<()> {
    let mut acks = protocol::ValueBuffer::default();
    loop {
        let batch = {
            let spool = spool.lock().unwrap_or_else(|p| p.into_inner());
            spool.read_batch(BATCH_ALERTS, BATCH_BYTES)?
        };
        if batch.records.is_empty() {
            // Drained: wait for new alerts (or look again in a while).
            let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
            continue;
        }
        let entries: Vec<(u64, &[u8])> = batch.records.iter().map(|r| (r.ts, r.record.as_slice())).collect();
        let chunk = chunk_id();
        let message = protocol::packed_forward(&target.tag, &entries, &chunk);
        conn.write_all(&message).await?;
        conn.flush().await?;
        let acked = tokio::time::timeout(ACK_TIMEOUT, read_value(conn, &mut acks))
            .await
            .map_err(|_| anyhow::anyhow!("no ack within {ACK_TIMEOUT:?}"))??;
        match protocol::ack_of(&acked) {
            Some(a) if a == chunk => {}
            other => bail!("expected the ack of chunk {chunk}, got {other:?}"),
        }
        spool.lock().unwrap_or_else(|p| p.into_inner()).commit(batch.end)?;
        crate::metrics::get().forward_acked(&target.display(), batch.records.len() as u64);
    }
}

/// The alert as a Forward record: a MessagePack map with the alert's fields (as in its JSON).
pub fn record_of(alert: &Alert) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(alert)
}

async fn read_value(conn: &mut Box<dyn Stream>, buf: &mut protocol::ValueBuffer) -> anyhow::Result<rmpv::Value> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(v) = buf.next(1 << 20)? {
            return Ok(v);
        }
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            bail!("the receiver closed the connection");
        }
        buf.extend(&chunk[..n]);
    }
}

async fn connect(
    target: &ForwardTarget,
    key: Option<&str>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<Box<dyn Stream>> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((target.host.as_str(), target.port)))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))??;
    tcp.set_nodelay(true)?;
    let mut conn: Box<dyn Stream> = match tls {
        Some(config) => {
            let name = target.server_name.clone().unwrap_or_else(|| target.host.clone());
            let name = rustls_pki_types::ServerName::try_from(name).context("server name")?;
            Box::new(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.context("TLS handshake")?)
        }
        None => Box::new(tcp),
    };
    if let Some(key) = key {
        let mut buf = protocol::ValueBuffer::default();
        let helo = tokio::time::timeout(CONNECT_TIMEOUT, read_value(&mut conn, &mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("no HELO from the receiver (is it asking for a shared key?)"))??;
        let helo = protocol::parse_helo(&helo).context("expected HELO")?;
        let salt = chunk_id();
        let hostname = crate::host::hostname();
        conn.write_all(&protocol::ping(&hostname, &salt, &helo.nonce, key)).await?;
        let pong = tokio::time::timeout(CONNECT_TIMEOUT, read_value(&mut conn, &mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("no PONG from the receiver"))??;
        protocol::check_pong(&pong, &salt, &helo.nonce, key).map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok(conn)
}

/// A random chunk id (also the handshake salt): 16 bytes from the kernel's CSPRNG, as hex.
fn chunk_id() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom fills the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Fall back to time and a counter: unique is what matters for a chunk id.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let t = crate::host::now_ns() ^ N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes[..8].copy_from_slice(&t.to_le_bytes());
    }
    crate::hex::lower(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = ForwardTarget::parse(
            "forward+tls://127.0.0.1:24224?shared_key_file=/etc/k&ca=/etc/ca.pem&server_name=collector",
        )
        .unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 24224));
        assert_eq!(t.server_name.as_deref(), Some("collector"));
        assert_eq!(t.tag, DEFAULT_TAG);
        assert!(ForwardTarget::parse("forward://[::1]:24224").is_ok());
        assert!(ForwardTarget::parse("forward://h:0").is_err());
        assert!(ForwardTarget::parse("forward://h:1?shared_key=x").unwrap_err().contains("shared_key_file"));
        assert!(ForwardTarget::parse("forward://h:1?what=x").unwrap_err().contains("unknown option"));
    }
}
