//! The Kafka side of ingest: an idempotent producer with `acks=all`, a probe that tells whether
//! the broker is reachable (for `/readyz` and fast 503 answers), and batch produce that reports
//! success only once the broker acknowledged every record.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use sluice_kafka::{BatchProducer, BatchRecord, EnqueueError, KafkaConfig};
use sluice_shutdown::{CancellationToken, TaskTracker};
use tracing::instrument;

use crate::config::ProducerConfig;
use crate::metrics::IngestMetrics;

/// Kafka header naming the writer schema (16 hex digits of its CRC-64-AVRO fingerprint).
pub const SCHEMA_FINGERPRINT_HEADER: &str = "sluice.schema.fingerprint";
/// Kafka header with the time ingest received the record, epoch microseconds in decimal.
pub const INGEST_TIME_HEADER: &str = "sluice.ingest.time";
/// Kafka header on dead letters: why the record was refused.
pub const DEAD_LETTER_REASON_HEADER: &str = "sluice.dlq.reason";
/// Kafka header on dead letters: where the record came from (for example the MQTT topic).
pub const DEAD_LETTER_SOURCE_HEADER: &str = "sluice.dlq.source";

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("failed to create the Kafka producer")]
    Create(#[source] KafkaError),
    #[error("the producer queue is full")]
    QueueFull,
    #[error("failed to hand records to the producer")]
    Enqueue(#[source] EnqueueError),
    #[error("the broker did not answer for {num_records} records within {timeout_ms} ms")]
    Unanswered { num_records: usize, timeout_ms: u64 },
    #[error("the Kafka broker is not reachable")]
    BrokerUnreachable,
    #[error("the broker did not acknowledge {num_failed} of {num_records} records")]
    Delivery {
        num_failed: usize,
        num_records: usize,
        #[source]
        source_opt: Option<KafkaError>,
    },
}

/// One record to produce: its key, event time and encoded value.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutgoingRecord<'a> {
    pub(crate) key: &'a str,
    pub(crate) event_time_micros: i64,
    pub(crate) value: &'a [u8],
}

#[derive(Clone)]
pub(crate) struct RecordProducer {
    producer: BatchProducer,
    broker_reachable: Arc<AtomicBool>,
    metrics: Arc<IngestMetrics>,
    /// librdkafka reports timed-out records on its own schedule (seconds late with the broker
    /// gone); this deadline keeps the answer time bounded regardless.
    answer_deadline: Duration,
}

impl std::fmt::Debug for RecordProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordProducer")
            .field("broker_reachable", &self.is_broker_reachable())
            .finish_non_exhaustive()
    }
}

impl RecordProducer {
    pub(crate) fn new(
        kafka: &KafkaConfig,
        settings: &ProducerConfig,
        metrics: Arc<IngestMetrics>,
    ) -> Result<Self, ProduceError> {
        let mut client_config = kafka.producer_config();
        kafka.set_defaults(
            &mut client_config,
            [
                ("linger.ms", settings.linger_ms.to_string()),
                ("queue.buffering.max.kbytes", settings.queue_max_kbytes.to_string()),
                ("compression.type", "lz4".to_string()),
            ],
        );
        // The delivery timeout bounds every request's wait, so it is not left to the passthrough.
        client_config.set("message.timeout.ms", settings.delivery_timeout_ms.to_string());
        let producer = BatchProducer::new(&client_config).map_err(ProduceError::Create)?;
        let answer_deadline =
            Duration::from_millis(settings.delivery_timeout_ms) + Duration::from_millis(500);
        Ok(Self { producer, broker_reachable: Arc::new(AtomicBool::new(false)), metrics, answer_deadline })
    }

    pub(crate) fn is_broker_reachable(&self) -> bool {
        self.broker_reachable.load(Ordering::Relaxed)
    }

    /// Checks reachability once; the probe task repeats it.
    pub(crate) async fn probe_broker(&self, timeout: Duration) -> bool {
        let producer = self.producer.clone();
        let reachable =
            tokio::task::spawn_blocking(move || producer.fetch_metadata_ok(timeout)).await.unwrap_or(false);
        let was_reachable = self.broker_reachable.swap(reachable, Ordering::Relaxed);
        if was_reachable != reachable {
            if reachable {
                tracing::info!("Kafka broker reachable");
            } else {
                tracing::warn!("Kafka broker unreachable: answering 503 until it is back");
            }
        }
        reachable
    }

    pub(crate) fn spawn_health_probe(
        &self,
        interval: Duration,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) {
        let this = self.clone();
        tracker.spawn(async move {
            loop {
                this.probe_broker(interval.max(Duration::from_millis(500))).await;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
    }

    /// Produces every record and waits for the broker's acknowledgement of each. On error some
    /// records may still have been written: the caller answers "retry", and readers drop the
    /// duplicates by (device_id, seq).
    #[instrument(skip_all, fields(topic = %topic, num_records = records.len()))]
    pub(crate) async fn produce_batch(
        &self,
        topic: &str,
        fingerprint_hex: &str,
        records: impl ExactSizeIterator<Item = OutgoingRecord<'_>>,
    ) -> Result<(), ProduceError> {
        if !self.is_broker_reachable() {
            return Err(ProduceError::BrokerUnreachable);
        }
        let started = Instant::now();
        let ingest_time = now_micros().to_string();
        let num_records = records.len();
        let batch_records = records.map(|record| BatchRecord {
            key: record.key.as_bytes(),
            value: record.value,
            timestamp_millis: record.event_time_micros.div_euclid(1_000),
            headers_opt: Some(
                OwnedHeaders::new_with_capacity(2)
                    .insert(Header { key: SCHEMA_FINGERPRINT_HEADER, value: Some(fingerprint_hex) })
                    .insert(Header { key: INGEST_TIME_HEADER, value: Some(ingest_time.as_str()) }),
            ),
        });
        let result = self.send_and_wait(topic, num_records, batch_records).await;
        self.metrics.record_produce(topic, started.elapsed(), result.is_ok());
        result
    }

    async fn send_and_wait<'a>(
        &self,
        topic: &str,
        num_records: usize,
        records: impl ExactSizeIterator<Item = BatchRecord<'a>>,
    ) -> Result<(), ProduceError> {
        let batch = self.producer.send_batch(topic, records).map_err(|error| match error {
            EnqueueError::QueueFull { .. } => ProduceError::QueueFull,
            other => ProduceError::Enqueue(other),
        })?;
        let outcome =
            BatchProducer::wait(&batch, self.answer_deadline).await.ok_or(ProduceError::Unanswered {
                num_records,
                timeout_ms: self.answer_deadline.as_millis() as u64,
            })?;
        match outcome.num_failed {
            0 => Ok(()),
            num_failed => {
                Err(ProduceError::Delivery { num_failed, num_records, source_opt: outcome.first_error_opt })
            }
        }
    }

    /// Produces one dead letter: the original bytes with the reason in headers.
    pub(crate) async fn produce_dead_letter(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        reason: &str,
        source: &str,
    ) -> Result<(), ProduceError> {
        let ingest_time = now_micros().to_string();
        let headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header { key: DEAD_LETTER_REASON_HEADER, value: Some(reason) })
            .insert(Header { key: DEAD_LETTER_SOURCE_HEADER, value: Some(source) })
            .insert(Header { key: INGEST_TIME_HEADER, value: Some(ingest_time.as_str()) });
        let record = BatchRecord {
            key: key.as_bytes(),
            value: payload,
            timestamp_millis: now_micros().div_euclid(1_000),
            headers_opt: Some(headers),
        };
        self.send_and_wait(topic, 1, std::iter::once(record)).await
    }

    /// Waits for everything queued to be acknowledged, up to `timeout`.
    pub(crate) fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}

pub(crate) fn now_micros() -> i64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since_epoch.as_micros()).unwrap_or(i64::MAX)
}
