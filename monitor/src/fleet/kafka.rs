//! The fleet topic on Kafka: a producer that never gives a record up (the brokers may be away
//! for hours, and the latest record of each session must reach them), and a reader thread that
//! reads the whole topic from its start and follows it.

use std::{
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rdkafka::{
    config::ClientConfig,
    consumer::{BaseConsumer, Consumer as _},
    error::KafkaError,
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext},
    types::RDKafkaErrorCode,
    util::Timeout,
    ClientContext, Message as _, Offset, TopicPartitionList,
};
use tokio::sync::mpsc;

use super::FleetTarget;
use crate::sessions::remote::{RemoteSession, REMOTE_SESSION_VERSION};

/// How often the reader asks the brokers for the topic's partitions: its contact with them.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A record bigger than this is not a session's (a session has at most a few hundred tokens).
const MAX_RECORD: usize = 1 << 20;

/// What the reader tells the agent.
#[derive(Debug)]
pub enum Incoming {
    /// A session record of some host (this one's too: the reader does not filter).
    Session(Box<RemoteSession>),
    /// A record that is not one this agent reads (another version, not JSON, too big).
    Unreadable { key: String, why: String },
    /// Whether the brokers answered the last heartbeat.
    Contact(bool),
}

/// Keys of the records the brokers refused, to be sent again.
#[derive(Default)]
struct Refused(Mutex<Vec<String>>);

impl ClientContext for Refused {}

impl ProducerContext for Refused {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, message)) = result {
            let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
            tracing::warn!(key, "fleet record not delivered, sent again later: {e}");
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(key);
        }
    }
}

pub struct Publisher {
    producer: Arc<BaseProducer<Refused>>,
    topic: String,
}

impl Publisher {
    pub fn connect(target: &FleetTarget) -> anyhow::Result<Self> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &target.brokers)
            .set("acks", "all")
            // The topic is the operator's (compacted): never one the producer made by asking.
            .set("allow.auto.create.topics", "false")
            // 0: a record waits for the brokers for as long as they are away.
            .set("message.timeout.ms", "0")
            // One request in flight keeps a session's records in order without the idempotent
            // producer, whose state a broker restarted without its storage no longer knows.
            .set("enable.idempotence", "false")
            .set("max.in.flight.requests.per.connection", "1")
            .set("linger.ms", "10")
            .set("queue.buffering.max.messages", "100000")
            // Back within a second of the brokers (librdkafka's default backs off up to 10 s).
            .set("reconnect.backoff.max.ms", "1000")
            // A topic that went (a broker restarted without its storage) is looked for again
            // within seconds, not librdkafka's default five minutes.
            .set("topic.metadata.refresh.interval.ms", "2000")
            .create_with_context(Refused::default())
            .context("creating the fleet's Kafka producer")?;
        let producer: Arc<BaseProducer<Refused>> = Arc::new(producer);
        // Delivery reports are served by a thread that waits for them without a timeout.
        // (rdkafka's ThreadedProducer polls in 100 ms windows whose last millisecond it spins
        // through with zero timeouts: 1.5% of a core on an idle node.) The thread holds the
        // producer for the life of the process.
        let served = producer.clone();
        thread::Builder::new()
            .name("fleet-deliveries".into())
            .spawn(move || served.poll(Timeout::Never))
            .context("starting the fleet's delivery thread")?;
        Ok(Self { producer, topic: target.topic.clone() })
    }

    /// Queues `record` for the brokers; false when it could not be (the queue is full): the
    /// caller sends it again later.
    pub fn publish(&self, record: &RemoteSession) -> bool {
        let Ok(payload) = serde_json::to_vec(record) else { return false };
        let key = record.key();
        match self.producer.send(BaseRecord::to(&self.topic).key(&key).payload(&payload)) {
            Ok(()) => true,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => false,
            Err((e, _)) => {
                tracing::warn!(key, "fleet record not queued: {e}");
                false
            }
        }
    }

    /// The keys of records the brokers refused since the last call.
    pub fn refused(&self) -> Vec<String> {
        std::mem::take(&mut *self.producer.context().0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

pub struct Reader;

impl Reader {
    /// Starts the reader thread, which sends what it reads to `tx` until `tx` is closed.
    pub fn start(target: &FleetTarget, host: &str, tx: mpsc::Sender<Incoming>) -> anyhow::Result<()> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &target.brokers)
            // Partitions are assigned, not balanced in a group: every agent reads everything.
            .set("group.id", format!("monitor-fleet-{host}"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("allow.auto.create.topics", "false")
            .set("reconnect.backoff.max.ms", "1000")
            // A broker that does not answer a fetch as soon as records come (Tansu) holds it
            // this long: the bound on how late another host's session end is read.
            .set("fetch.wait.max.ms", "100")
            // A topic that went (a broker restarted without its storage) is looked for again
            // within seconds, not librdkafka's default five minutes.
            .set("topic.metadata.refresh.interval.ms", "2000");
        let consumer: BaseConsumer = config.create().context("creating the fleet's Kafka consumer")?;
        let topic = target.topic.clone();
        thread::Builder::new().name("fleet-reader".into()).spawn(move || read(consumer, &config, &topic, &tx))?;
        Ok(())
    }
}

fn read(mut consumer: BaseConsumer, config: &ClientConfig, topic: &str, tx: &mpsc::Sender<Incoming>) {
    let mut assigned = 0;
    // Set when the brokers were away or the topic went: the next assignment is made by a new
    // client, since the old one may keep positions and partition state from before.
    let mut renew = false;
    let mut in_contact = false;
    let mut last_heartbeat: Option<Instant> = None;
    while !tx.is_closed() {
        if last_heartbeat.is_none_or(|at| at.elapsed() >= HEARTBEAT) {
            last_heartbeat = Some(Instant::now());
            let partitions = match consumer.fetch_metadata(Some(topic), HEARTBEAT) {
                Ok(metadata) => Some(
                    metadata
                        .topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map_or(0, |t| t.partitions().len()),
                ),
                Err(e) => {
                    tracing::debug!("fleet brokers not answering: {e}");
                    None
                }
            };
            // Back in contact, or the topic gone (a broker that lost its storage): read it
            // again from the start, since offsets may have started over.
            let regained = partitions.is_some() && !in_contact;
            if partitions.is_none() && assigned > 0 {
                // The brokers are away: stop fetching until they are back, then read with a new
                // consumer. A consumer that kept fetching through a broker's restart was handed
                // responses that librdkafka 2.12 turns into a metadata update without a topic
                // name, and it crashed the agent in its own thread (a NULL strcmp under
                // rd_kafka_metadata_update_op; core dumps of the fleet test, 3 in 6 runs).
                if let Err(e) = consumer.unassign() {
                    tracing::debug!("fleet topic {topic}: unassign: {e}");
                }
                assigned = 0;
                renew = true;
            }
            in_contact = partitions.is_some();
            let partitions = partitions.unwrap_or(assigned);
            if regained || partitions < assigned {
                assigned = 0;
                renew = true;
            }
            if partitions > assigned && renew {
                match config.create::<BaseConsumer>() {
                    Ok(fresh) => (consumer, renew) = (fresh, false),
                    Err(e) => tracing::warn!("fleet topic {topic}: a new consumer: {e}"),
                }
            }
            if partitions > assigned {
                let mut list = TopicPartitionList::new();
                for p in 0..partitions {
                    let _ = list.add_partition_offset(topic, p as i32, Offset::Beginning);
                }
                match consumer.assign(&list) {
                    Ok(()) => assigned = partitions,
                    Err(e) => tracing::warn!("fleet topic {topic}: {e}"),
                }
            }
            if tx.blocking_send(Incoming::Contact(in_contact)).is_err() {
                return;
            }
        }
        let incoming = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(e)) => {
                tracing::debug!("fleet topic {topic}: {e}");
                continue;
            }
            Some(Ok(message)) => {
                let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                match message.payload() {
                    // A tombstone: compaction's way to drop a key.
                    None => continue,
                    Some(payload) => decode(key, payload),
                }
            }
        };
        if tx.blocking_send(incoming).is_err() {
            return;
        }
    }
}

fn decode(key: String, payload: &[u8]) -> Incoming {
    if payload.len() > MAX_RECORD {
        return Incoming::Unreadable { key, why: format!("{} bytes, over {MAX_RECORD}", payload.len()) };
    }
    let version = serde_json::from_slice::<serde_json::Value>(payload).map(|v| v["version"].as_u64());
    match version {
        Ok(Some(v)) if v == u64::from(REMOTE_SESSION_VERSION) => match serde_json::from_slice(payload) {
            Ok(session) => Incoming::Session(Box::new(session)),
            Err(e) => Incoming::Unreadable { key, why: e.to_string() },
        },
        Ok(v) => Incoming::Unreadable { key, why: format!("record version {v:?}, not {REMOTE_SESSION_VERSION}") },
        Err(e) => Incoming::Unreadable { key, why: e.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_another_version_or_shape_are_unreadable_not_fatal() {
        for bad in [&b"{\"version\": 2}"[..], b"not json", b"{\"version\": 1, \"host\": 3}", &[b'x'; MAX_RECORD + 1]] {
            assert!(matches!(decode("k".into(), bad), Incoming::Unreadable { .. }), "{:?}", &bad[..bad.len().min(20)]);
        }
    }
}
