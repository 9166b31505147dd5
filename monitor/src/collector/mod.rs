//! `monitor collector`: receives Fluent Forward from many agents (and from any Fluent client),
//! over TLS and with shared-key authentication when configured, acknowledges a batch only after
//! it is synced to the store, de-duplicates alerts by id, and fans the store out to sinks, each
//! from its own position.

pub mod destination;
pub mod fanout;
mod kafka;
mod lines_file;
pub mod server;
pub mod store;
mod syslog;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
pub use fanout::SinkSpec;
use tokio::sync::{mpsc, watch};

use self::server::StoreRequest;

#[derive(Debug, Clone)]
pub struct CollectorSettings {
    pub listen: SocketAddr,
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The Forward shared key; clients must prove they know it (HELO/PING/PONG).
    pub shared_key: Option<String>,
    pub store: PathBuf,
    pub sinks: Vec<SinkSpec>,
    /// Where Prometheus scrapes the collector's metrics.
    pub metrics: Option<SocketAddr>,
    pub limits: Limits,
}

/// What the network may make the collector hold: applied from the moment a connection is
/// accepted, before TLS or the shared key, so an unauthenticated peer is bounded too.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub connections: usize,
    /// Bytes of messages not yet whole, all connections together.
    pub buffered: usize,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;

pub async fn run(settings: CollectorSettings) -> anyhow::Result<()> {
    let health = crate::metrics::Health::default();
    let _metrics = match settings.metrics {
        Some(addr) => Some(crate::metrics::serve(addr, health.clone(), || crate::metrics::collector().render()).await?),
        None => None,
    };
    let tls = match &settings.tls {
        Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(cert, key)?)),
        None => None,
    };
    let shared_key: Option<Arc<str>> = settings.shared_key.as_deref().map(Arc::from);
    let store = store::Store::open(&settings.store).with_context(|| format!("store {}", settings.store.display()))?;
    let (durable_tx, durable_rx) = watch::channel(store.last_seq());
    crate::metrics::collector().stored_seq.set(store.last_seq() as i64);
    let (store_tx, store_rx) = mpsc::channel::<StoreRequest>(1024);
    std::thread::Builder::new().name("store-writer".into()).spawn(move || writer(store, store_rx, durable_tx))?;

    let hostname: Arc<str> = Arc::from(crate::host::hostname());
    for spec in settings.sinks.clone() {
        let (dir, rx, host) = (settings.store.clone(), durable_rx.clone(), hostname.clone());
        std::thread::Builder::new()
            .name(format!("sink-{}", spec.name()))
            .spawn(move || fanout::run(spec, dir, rx, host))?;
    }

    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        tls = settings.tls.is_some(),
        shared_key = settings.shared_key.is_some(),
        store = %settings.store.display(),
        "collector ready"
    );
    health.set_ready(true);
    raise_open_files(settings.limits.connections);
    let config = server::Listener {
        tls,
        shared_key,
        hostname,
        store: store_tx,
        limits: Arc::new(server::Budget::new(settings.limits)),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = server::serve(listener, config) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("collector stopping");
    Ok(())
}

/// Batches arriving together are written with one sync (group commit), then acknowledged.
fn writer(mut store: store::Store, mut requests: mpsc::Receiver<StoreRequest>, durable: watch::Sender<u64>) {
    while let Some(first) = requests.blocking_recv() {
        let mut group = vec![first];
        while let Ok(more) = requests.try_recv() {
            group.push(more);
            if group.len() >= 256 {
                break;
            }
        }
        let entries: Vec<store::Incoming> = group.iter_mut().flat_map(|r| std::mem::take(&mut r.entries)).collect();
        let result = store.append(entries).map_err(|e| e.to_string());
        match &result {
            Ok(last) => {
                crate::metrics::collector().stored_seq.set(*last as i64);
                let _ = durable.send(*last);
            }
            Err(e) => {
                crate::metrics::collector().store_failures.inc();
                tracing::error!(store = %store.dir().display(), "store write failed: {e}");
            }
        }
        for request in group {
            let _ = request.reply.send(result.clone().map(|_| ()));
        }
    }
}

/// Lets the process open a descriptor per allowed connection and some to spare: past the soft
/// limit, accept itself would fail (EMFILE) before the connection limit could refuse cleanly.
fn raise_open_files(connections: usize) {
    let want = (connections as u64).saturating_add(256);
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= want {
            return;
        }
        limit.rlim_cur = want.min(limit.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            tracing::warn!("could not raise the open files limit to {want}: connections past it fail at accept");
        }
    }
}
