//! The `kafka://BROKERS/TOPIC` sink: each alert a JSON message keyed by its session id (so one
//! session's alerts stay in order on one partition), produced with acks from all in-sync
//! replicas and idempotence; a batch counts as delivered when every message was acknowledged.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _};
use rdkafka::{
    config::ClientConfig,
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext},
    ClientContext,
};

/// Counts messages the brokers did not acknowledge.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            tracing::warn!("kafka delivery failed: {e}");
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

use super::destination::{Destination, Item};

pub struct KafkaSink {
    producer: BaseProducer<Deliveries>,
    topic: String,
}

impl KafkaSink {
    pub fn connect(brokers: &str, topic: &str) -> anyhow::Result<Self> {
        let producer: BaseProducer<Deliveries> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "30000")
            .set("linger.ms", "5")
            .create_with_context(Deliveries::default())
            .context("creating the Kafka producer")?;
        Ok(Self { producer, topic: topic.to_string() })
    }
}

impl Destination for KafkaSink {
    fn deliver(&mut self, items: &[Item]) -> anyhow::Result<()> {
        for item in items {
            let Item::Alert(alert) = item else { continue };
            let payload = serde_json::to_vec(alert)?;
            let key = alert.session.id.clone();
            let mut record = BaseRecord::to(&self.topic).payload(&payload).key(&key);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        r,
                    )) => {
                        record = r;
                        self.producer.poll(Duration::from_millis(50));
                    }
                    Err((e, _)) => bail!("producing to {}: {e}", self.topic),
                }
            }
        }
        // Delivered means acknowledged by the brokers.
        self.producer.flush(Duration::from_secs(30)).context("waiting for the brokers' acks")?;
        let failed = self.producer.context().failed.swap(0, Ordering::Relaxed);
        if failed > 0 {
            // The whole batch again: at least once (consumers de-duplicate by alert id).
            bail!("{failed} message(s) not acknowledged by the brokers");
        }
        Ok(())
    }
}
