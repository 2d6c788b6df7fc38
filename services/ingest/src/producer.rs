//! The Kafka side of ingest: an idempotent producer with `acks=all`, a probe that tells whether
//! the broker is reachable (for `/readyz` and fast 503 answers), and batch produce that reports
//! success only once the broker acknowledged every record.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sluice_kafka::KafkaConfig;
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
    #[error("the Kafka broker is not reachable")]
    BrokerUnreachable,
    #[error("the broker did not acknowledge {num_failed} of {num_records} records")]
    Delivery {
        num_failed: usize,
        num_records: usize,
        #[source]
        source: KafkaError,
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
    producer: FutureProducer,
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
        // Defaults for what the passthrough map did not set; the passthrough wins here on purpose.
        for (key, value) in [
            ("linger.ms", settings.linger_ms.to_string()),
            ("queue.buffering.max.kbytes", settings.queue_max_kbytes.to_string()),
            ("compression.type", "lz4".to_string()),
        ] {
            if !kafka.client.0.contains_key(key) {
                client_config.set(key, value);
            }
        }
        // The delivery timeout bounds every request's wait, so it is not left to the passthrough.
        client_config.set("message.timeout.ms", settings.delivery_timeout_ms.to_string());
        let producer: FutureProducer = client_config.create().map_err(ProduceError::Create)?;
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
            tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout).is_ok())
                .await
                .unwrap_or(false);
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
        let mut deliveries = Vec::with_capacity(num_records);
        for record in records {
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header { key: SCHEMA_FINGERPRINT_HEADER, value: Some(fingerprint_hex) })
                .insert(Header { key: INGEST_TIME_HEADER, value: Some(ingest_time.as_str()) });
            let future_record = FutureRecord::to(topic)
                .key(record.key)
                .payload(record.value)
                .timestamp(record.event_time_micros.div_euclid(1_000))
                .headers(headers);
            match self.producer.send_result(future_record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    return Err(ProduceError::QueueFull);
                }
                Err((source, _)) => {
                    return Err(ProduceError::Delivery {
                        num_failed: num_records - deliveries.len(),
                        num_records,
                        source,
                    });
                }
            }
        }
        let Ok(outcomes) = tokio::time::timeout(self.answer_deadline, join_all(deliveries)).await else {
            self.metrics.record_produce(topic, started.elapsed(), false);
            return Err(ProduceError::Delivery {
                num_failed: num_records,
                num_records,
                source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
            });
        };
        let mut first_error_opt = None;
        let mut num_failed = 0;
        for outcome in outcomes {
            let error = match outcome {
                Ok(Ok(_)) => continue,
                Ok(Err((error, _))) => error,
                Err(_canceled) => KafkaError::Canceled,
            };
            num_failed += 1;
            first_error_opt.get_or_insert(error);
        }
        self.metrics.record_produce(topic, started.elapsed(), first_error_opt.is_none());
        match first_error_opt {
            None => Ok(()),
            Some(source) => Err(ProduceError::Delivery { num_failed, num_records, source }),
        }
    }

    /// Produces one dead letter: the original bytes with the reason in headers.
    pub(crate) async fn produce_dead_letter(
        &self,
        topic: &str,
        key_opt: Option<&str>,
        payload: &[u8],
        reason: &str,
        source: &str,
    ) -> Result<(), ProduceError> {
        let ingest_time = now_micros().to_string();
        let headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header { key: DEAD_LETTER_REASON_HEADER, value: Some(reason) })
            .insert(Header { key: DEAD_LETTER_SOURCE_HEADER, value: Some(source) })
            .insert(Header { key: INGEST_TIME_HEADER, value: Some(ingest_time.as_str()) });
        let mut record = FutureRecord::to(topic).payload(payload).headers(headers);
        if let Some(key) = key_opt {
            record = record.key(key);
        }
        let delivery = self.producer.send_result(record).map_err(|(error, _)| match error {
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => ProduceError::QueueFull,
            source => ProduceError::Delivery { num_failed: 1, num_records: 1, source },
        })?;
        let timed_out = || ProduceError::Delivery {
            num_failed: 1,
            num_records: 1,
            source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        };
        match tokio::time::timeout(self.answer_deadline, delivery).await.map_err(|_| timed_out())? {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((source, _))) => Err(ProduceError::Delivery { num_failed: 1, num_records: 1, source }),
            Err(_canceled) => {
                Err(ProduceError::Delivery { num_failed: 1, num_records: 1, source: KafkaError::Canceled })
            }
        }
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
