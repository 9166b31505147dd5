//! The collector's metrics (`monitor collector --metrics ADDR`): what it received and stored,
//! what it refused, and how far behind each sink is. A registry of its own, so an agent's
//! `/metrics` and a collector's each show only their own.

use std::sync::LazyLock;

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{OutputLabels, ReasonLabels};

pub struct CollectorMetrics {
    registry: Registry,
    pub connections: Counter,
    pub open_connections: Gauge,
    closed_with_error: Family<ReasonLabels, Counter>,
    pub records: Counter,
    pub batches_acked: Counter,
    /// Messages finished beyond the buffering budget (see collector/server.rs `Budget`).
    pub overdrafts: Counter,
    pub store_failures: Counter,
    pub stored_seq: Gauge,
    sink_seq: Family<OutputLabels, Gauge>,
    sink_failures: Family<OutputLabels, Counter>,
}

static COLLECTOR: LazyLock<CollectorMetrics> = LazyLock::new(CollectorMetrics::new);

pub fn collector() -> &'static CollectorMetrics {
    &COLLECTOR
}

impl CollectorMetrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("monitor_collector");
        let connections = Counter::default();
        registry.register("connections", "Forward connections accepted", connections.clone());
        let open_connections = Gauge::default();
        registry.register("open_connections", "Forward connections open now", open_connections.clone());
        let closed_with_error = Family::default();
        registry.register(
            "connection_errors",
            "Connections closed on an error (bad TLS, a wrong shared key, malformed or oversized input, idle), by reason",
            closed_with_error.clone(),
        );
        let records = Counter::default();
        registry.register("records", "Records received and stored (synced) before their ack", records.clone());
        let batches_acked = Counter::default();
        registry.register("batches_acknowledged", "Forward chunks acknowledged", batches_acked.clone());
        let overdrafts = Counter::default();
        registry.register(
            "budget_overdrafts",
            "Messages finished beyond --max-buffered, one connection at a time, when the budget was all held by unfinished messages",
            overdrafts.clone(),
        );
        let store_failures = Counter::default();
        registry.register(
            "store_failures",
            "Store writes that failed (a full disk): nothing acknowledged",
            store_failures.clone(),
        );
        let stored_seq = Gauge::default();
        registry.register(
            "stored_sequence",
            "Sequence number of the last record synced to the store",
            stored_seq.clone(),
        );
        let sink_seq = Family::default();
        registry.register(
            "sink_sequence",
            "Sequence number of the last record each sink delivered (the store's minus it: the sink's lag)",
            sink_seq.clone(),
        );
        let sink_failures = Family::default();
        registry.register("sink_failures", "Failed deliveries to each sink (retried)", sink_failures.clone());
        Self {
            registry,
            connections,
            open_connections,
            closed_with_error,
            records,
            batches_acked,
            overdrafts,
            store_failures,
            stored_seq,
            sink_seq,
            sink_failures,
        }
    }

    /// A connection closed on an error; `reason` is its message, whose first words say the kind.
    pub fn connection_error(&self, reason: &str) {
        self.closed_with_error.get_or_create(&ReasonLabels { reason: error_kind(reason).to_string() }).inc();
    }

    pub fn sink_delivered(&self, sink: &str, seq: u64) {
        self.sink_seq.get_or_create(&OutputLabels { output: sink.to_string() }).set(seq as i64);
    }

    pub fn sink_failed(&self, sink: &str) {
        self.sink_failures.get_or_create(&OutputLabels { output: sink.to_string() }).inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("metrics encoding: {e}");
        }
        out
    }
}

/// A bounded label from a connection's error message (the messages name peers and sizes).
fn error_kind(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r == "refused" {
        "refused"
    } else if r.contains("budget") {
        "budget"
    } else if r.contains("within the time allowed") {
        "slow"
    } else if r.contains("tls") {
        "tls"
    } else if r.contains("shared key") || r.contains("helo") || r.contains("ping") || r.contains("handshake") {
        "auth"
    } else if r.contains("idle") {
        "idle"
    } else if r.contains("store") {
        "store"
    } else if r.contains("closed in the middle") {
        "truncated"
    } else if r.contains("too large")
        || r.contains("larger")
        || r.contains("malformed")
        || r.contains("invalid")
        || r.contains("expected")
    {
        "malformed"
    } else {
        "other"
    }
}
