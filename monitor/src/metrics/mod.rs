//! The agent's Prometheus metrics (`--metrics ADDR`): what it saw, what it said, what it lost,
//! and what is still waiting to be delivered.
//!
//! One process-wide registry: the pipeline's stages count into it with atomic adds (the hot
//! path's counters are created once, never looked up per event), and what is a state rather than
//! a count (probes attached, sessions by state, spools, CPU and memory) is read when scraped.
//! Names follow the Prometheus conventions: `monitor_` prefix, `_total` counters, base units.

mod collector;
mod server;

use std::{
    collections::BTreeMap,
    sync::{atomic::AtomicU64, Arc, LazyLock, Mutex},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

pub use self::{
    collector::{collector, CollectorMetrics},
    server::{serve, Health},
};
use crate::{alert::Alert, event::Event, forward::spool::Spool};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub rule: String,
    pub severity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutputLabels {
    pub output: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    events: Family<KindLabels, Counter>,
    alerts: Family<AlertLabels, Counter>,
    lost: Family<ReasonLabels, Counter>,
    probe_attached: Family<ProgramLabels, Gauge>,
    sessions: Family<StateLabels, Gauge>,
    spool_bytes: Family<OutputLabels, Gauge>,
    spool_oldest_age: Family<OutputLabels, FloatGauge>,
    forward_acked: Family<OutputLabels, Counter>,
    forward_retries: Family<OutputLabels, Counter>,
    trace_bytes: Counter,
    event_delay: Histogram,
    cpu_seconds: Counter<f64, AtomicU64>,
    resident_bytes: Gauge,
    /// The fleet watchlist (`--fleet`): other hosts' sessions looked for, records read and
    /// skipped, and how long since the brokers last answered.
    pub fleet_sessions: Gauge,
    pub fleet_records: Counter,
    pub fleet_unreadable: Counter,
    pub fleet_evicted: Counter,
    pub fleet_staleness: Gauge,
    /// The CPU time reported so far (the counter grows by the difference at each scrape).
    cpu_reported: Mutex<f64>,
    /// The forward spools, by output, read at each scrape.
    spools: Mutex<BTreeMap<String, Arc<Mutex<Spool>>>>,
    /// What else is read at each scrape (the probes, which the agent owns).
    on_scrape: Mutex<Vec<ScrapeHook>>,
}

type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("monitor");
        let events = Family::default();
        registry.register("events", "Events the engine received, by kind", events.clone());
        let alerts = Family::default();
        registry.register(
            "alerts",
            "Alerts sent to the outputs, by rule and severity (an update of a finding counts again)",
            alerts.clone(),
        );
        let lost = Family::default();
        registry.register(
            "lost_events",
            "Events the agent did not see (kernel ring buffer full, failed reads, full spools), by reason",
            lost.clone(),
        );
        let probe_attached = Family::default();
        registry.register(
            "probe_attached",
            "1 while the program is attached (many are attached only while sessions run), 0 otherwise",
            probe_attached.clone(),
        );
        let sessions = Family::default();
        registry.register("sessions", "Sessions the agent tracks, by state", sessions.clone());
        let spool_bytes = Family::default();
        registry.register_with_unit(
            "spool",
            "Bytes of alerts spooled and not yet acknowledged, per forward output",
            Unit::Bytes,
            spool_bytes.clone(),
        );
        let spool_oldest_age = Family::default();
        registry.register_with_unit(
            "spool_oldest_age",
            "Age of the oldest alert not yet acknowledged, per forward output (0 when drained)",
            Unit::Seconds,
            spool_oldest_age.clone(),
        );
        let forward_acked = Family::default();
        registry.register(
            "forward_acked_records",
            "Records the receiver acknowledged, per forward output",
            forward_acked.clone(),
        );
        let forward_retries = Family::default();
        registry.register(
            "forward_retries",
            "Failed connects and lost connections, per forward output",
            forward_retries.clone(),
        );
        let trace_bytes = Counter::default();
        registry.register_with_unit(
            "trace_written",
            "Bytes of session traces written",
            Unit::Bytes,
            trace_bytes.clone(),
        );
        // From 100 us to ~3 s: a drained ring buffer is in the first buckets, a backlog shows.
        let event_delay = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1e-4, 2.0, 16));
        registry.register_with_unit(
            "event_delay",
            "Time from the kernel's event to the engine",
            Unit::Seconds,
            event_delay.clone(),
        );
        let cpu_seconds = Counter::default();
        registry.register_with_unit(
            "process_cpu",
            "CPU time of the agent (user and system)",
            Unit::Seconds,
            cpu_seconds.clone(),
        );
        let resident_bytes = Gauge::default();
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory of the agent",
            Unit::Bytes,
            resident_bytes.clone(),
        );
        let fleet_sessions = Gauge::default();
        registry.register(
            "fleet_sessions",
            "Other hosts' sessions on the fleet watchlist (their tokens are looked for here)",
            fleet_sessions.clone(),
        );
        let fleet_records = Counter::default();
        registry.register(
            "fleet_records",
            "Other hosts' session records read from the fleet topic",
            fleet_records.clone(),
        );
        let fleet_unreadable = Counter::default();
        registry.register(
            "fleet_unreadable_records",
            "Records of the fleet topic skipped (another format version, not JSON, too big)",
            fleet_unreadable.clone(),
        );
        let fleet_evicted = Counter::default();
        registry.register(
            "fleet_evicted_sessions",
            "Other hosts' sessions dropped from a full watchlist before their retention ran out",
            fleet_evicted.clone(),
        );
        let fleet_staleness = Gauge::default();
        registry.register_with_unit(
            "fleet_staleness",
            "Time since the fleet's Kafka brokers last answered (0 while they do)",
            Unit::Seconds,
            fleet_staleness.clone(),
        );
        Self {
            registry,
            events,
            alerts,
            lost,
            probe_attached,
            sessions,
            spool_bytes,
            spool_oldest_age,
            forward_acked,
            forward_retries,
            trace_bytes,
            event_delay,
            cpu_seconds,
            resident_bytes,
            fleet_sessions,
            fleet_records,
            fleet_unreadable,
            fleet_evicted,
            fleet_staleness,
            cpu_reported: Mutex::new(0.0),
            spools: Mutex::new(BTreeMap::new()),
            on_scrape: Mutex::new(Vec::new()),
        }
    }

    /// The counter of events of `kind`, to keep: the per-event path adds to it without a lookup.
    pub fn events_of(&self, kind: &str) -> Counter {
        self.events.get_or_create(&KindLabels { kind: kind.to_string() }).clone()
    }

    pub fn alert(&self, alert: &Alert) {
        let labels = AlertLabels { rule: alert.rule.id().to_string(), severity: alert.severity.as_str().to_string() };
        self.alerts.get_or_create(&labels).inc();
    }

    pub fn lost(&self, reason: &str, count: u64) {
        self.lost.get_or_create(&ReasonLabels { reason: reason.to_string() }).inc_by(count);
    }

    /// How long the event took from the kernel to the engine, for events the kernel stamped.
    pub fn event_delay(&self, now_ns: u64, event: &Event) {
        let ts = event.ts();
        if ts > 0 && now_ns >= ts {
            self.event_delay.observe((now_ns - ts) as f64 / 1e9);
        }
    }

    pub fn trace_written(&self, bytes: u64) {
        self.trace_bytes.inc_by(bytes);
    }

    pub fn forward_acked(&self, output: &str, records: u64) {
        self.forward_acked.get_or_create(&OutputLabels { output: output.to_string() }).inc_by(records);
    }

    pub fn forward_retry(&self, output: &str) {
        self.forward_retries.get_or_create(&OutputLabels { output: output.to_string() }).inc();
    }

    /// Makes a forward output's spool visible at each scrape.
    pub fn watch_spool(&self, output: &str, spool: Arc<Mutex<Spool>>) {
        self.spools.lock().unwrap_or_else(|p| p.into_inner()).insert(output.to_string(), spool);
    }

    /// Replaces the sessions-by-state gauges.
    pub fn set_sessions(&self, by_state: &BTreeMap<&'static str, i64>) {
        for state in crate::engine::SessionState::NAMES {
            self.sessions
                .get_or_create(&StateLabels { state: state.to_string() })
                .set(*by_state.get(state).unwrap_or(&0));
        }
    }

    /// Replaces the probe gauges: every program the agent knows, attached or not.
    pub fn set_probes(&self, programs: impl IntoIterator<Item = (String, bool)>) {
        for (program, attached) in programs {
            self.probe_attached.get_or_create(&ProgramLabels { program }).set(attached as i64);
        }
    }

    /// Runs `hook` before each scrape, to set what is a state rather than a count.
    pub fn on_scrape(&self, hook: ScrapeHook) {
        self.on_scrape.lock().unwrap_or_else(|p| p.into_inner()).push(hook);
    }

    /// The text exposition, after reading the states that are not counted as they happen.
    pub fn render(&self) -> String {
        self.read_process();
        self.read_spools();
        for hook in self.on_scrape.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            hook(self);
        }
        let mut out = String::new();
        // Encoding into a String cannot fail but for a metric's own encoder; none here does.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("metrics encoding: {e}");
        }
        out
    }

    fn read_process(&self) {
        let Some(usage) = crate::host::self_usage() else { return };
        self.resident_bytes.set(usage.resident_bytes as i64);
        let mut reported = self.cpu_reported.lock().unwrap_or_else(|p| p.into_inner());
        if usage.cpu_seconds > *reported {
            self.cpu_seconds.inc_by(usage.cpu_seconds - *reported);
            *reported = usage.cpu_seconds;
        }
    }

    fn read_spools(&self) {
        let now = crate::host::now_ns();
        let spools = self.spools.lock().unwrap_or_else(|p| p.into_inner());
        for (output, spool) in spools.iter() {
            let (bytes, oldest) = {
                let spool = spool.lock().unwrap_or_else(|p| p.into_inner());
                (spool.pending_bytes(), spool.oldest_ts())
            };
            let labels = OutputLabels { output: output.clone() };
            self.spool_bytes.get_or_create(&labels).set(bytes as i64);
            let age = oldest.map_or(0.0, |ts| now.saturating_sub(ts) as f64 / 1e9);
            self.spool_oldest_age.get_or_create(&labels).set(age);
        }
    }
}
