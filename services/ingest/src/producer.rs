//! The Kafka side of ingest: an idempotent producer with `acks=all`, a probe that tells whether
//! the broker is reachable (for `/readyz` and fast 503 answers), and batch produce that reports
//! success only once the broker acknowledged every record.
//!
//! An idempotent producer can get into a state it never leaves, where every record fails: when
//! the broker stalls past the delivery timeout and then answers the producer's epoch bump with
//! `ProducerFenced` (what Tansu does), when it comes back without the producer's state
//! (`UnknownProducerId`), or in librdkafka's fatal state. The probe and every failed batch look
//! for it and replace the producer with a new one; until the new one reached the broker,
//! `/readyz` is 503 and requests are refused at once.
//!
//! The file passes 500 lines only with its tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use sluice_kafka::{BatchProducer, BatchRecord, EnqueueError, KafkaConfig, TopicSpec, ensure_topics};
use sluice_shutdown::CancellationToken;
use tracing::instrument;

use crate::config::ProducerConfig;
use crate::metrics::ProducerMetrics;
use sluice_device_api::{DeadLetter, DeadLetterWritten, Supervisor};
use sluice_errors::chain_text;

pub use sluice_schema::wire::{
    DEAD_LETTER_ORIGINAL_SIZE_HEADER, DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER,
    EDGE_FLOOR_HEADER, EDGE_ID_HEADER, EDGE_POSITION_HEADER, INGEST_TIME_HEADER, SCHEMA_FINGERPRINT_HEADER,
};

/// Bytes of the producer's message limit kept for a dead letter's key, headers and framing; the
/// payload gets the rest. The key, reason and source are cut to fit in it.
pub const DEAD_LETTER_RESERVED_BYTES: usize = 8 * 1024;
/// librdkafka's `message.max.bytes` default, which ingest keeps unless `kafka.client` sets it.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;
const MAX_DEAD_LETTER_KEY_BYTES: usize = 1024;
const MAX_DEAD_LETTER_SOURCE_BYTES: usize = 1024;
const MAX_DEAD_LETTER_REASON_BYTES: usize = 4096;

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

impl ProduceError {
    /// Whether producing the same records again must fail the same way: the records themselves
    /// are refused (too large for the producer or the broker), not the broker's state.
    pub(crate) fn is_permanent(&self) -> bool {
        let refuses_record = |error: &KafkaError| {
            matches!(
                error.rdkafka_error_code(),
                Some(
                    RDKafkaErrorCode::MessageSizeTooLarge
                        | RDKafkaErrorCode::InvalidMessageSize
                        | RDKafkaErrorCode::MessageBatchTooLarge
                        | RDKafkaErrorCode::InvalidRecord
                )
            )
        };
        match self {
            Self::Enqueue(EnqueueError::Enqueue { source, .. }) => refuses_record(source),
            Self::Delivery { source_opt: Some(source), .. } => refuses_record(source),
            _ => false,
        }
    }
}

impl ProduceError {
    /// Whether records were not answered in time (the broker stalled or went away).
    pub(crate) fn timed_out(&self) -> bool {
        match self {
            Self::Unanswered { .. } => true,
            Self::Delivery { source_opt: Some(source), .. } => {
                source.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut)
            }
            _ => false,
        }
    }

    /// Whether the broker refused the producer itself: its id, epoch or sequence numbers are
    /// not (or no longer) the broker's. librdkafka keeps using them, so every later record fails
    /// the same way (`ProducerFenced` after a broker stalled past the delivery timeout and the
    /// producer bumped its epoch, `UnknownProducerId` from a broker that came back empty).
    pub(crate) fn lost_producer_state_opt(&self) -> Option<RDKafkaErrorCode> {
        let source_opt = match self {
            Self::Enqueue(EnqueueError::Enqueue { source, .. }) => Some(source),
            Self::Delivery { source_opt, .. } => source_opt.as_ref(),
            _ => None,
        };
        source_opt
            .and_then(KafkaError::rdkafka_error_code)
            .filter(|code| sluice_kafka::is_producer_state_lost(*code))
    }
}

/// The topics ingest writes, for the probe to restore on a broker that lost them.
#[derive(Debug, Clone)]
pub(crate) struct TopicSetup {
    pub(crate) kafka: KafkaConfig,
    pub(crate) specs: Vec<TopicSpec>,
    pub(crate) timeout: Duration,
}

/// One record to produce: its key, event time and encoded value.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutgoingRecord<'a> {
    pub(crate) key: &'a str,
    pub(crate) event_time_micros: i64,
    pub(crate) value: &'a [u8],
    /// For a record an edge gateway forwarded: where in all the gateway accepted it is.
    pub(crate) edge_opt: Option<ForwardedAt<'a>>,
}

/// A forwarded record's gateway, its position, and the first position of its request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForwardedAt<'a> {
    pub(crate) edge_id: &'a str,
    pub(crate) position: i64,
    pub(crate) floor: i64,
}

/// The librdkafka settings of ingest's producer: the shared durable producer settings, ingest's
/// tuning where `kafka.client` does not set it, and the delivery timeout. Public so that the
/// ingest benchmark's ceiling produces with exactly these settings, not a copy that can drift.
pub fn producer_client_config(kafka: &KafkaConfig, settings: &ProducerConfig) -> ClientConfig {
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
    client_config
}

#[derive(Clone)]
pub(crate) struct RecordProducer {
    /// The producer in use and its generation; swapped for a new one (next generation) when it
    /// can no longer produce.
    current: Arc<RwLock<(u64, BatchProducer)>>,
    client_config: Arc<ClientConfig>,
    /// One replacement at a time: the probe and failed requests may notice the same fatal error.
    replacing: Arc<tokio::sync::Mutex<()>>,
    broker_reachable: Arc<AtomicBool>,
    /// Records timed out since the last probe that found the broker: the producer then bumps
    /// its epoch, which a broker may refuse for every later record (Tansu answers
    /// `ProducerFenced`), so it is replaced when the broker answers again.
    records_timed_out: Arc<AtomicBool>,
    metrics: Arc<ProducerMetrics>,
    /// librdkafka reports timed-out records on its own schedule (seconds late with the broker
    /// gone); this deadline keeps the answer time bounded regardless.
    answer_deadline: Duration,
    max_message_bytes: usize,
}

impl std::fmt::Debug for RecordProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordProducer")
            .field("broker_reachable", &self.is_broker_reachable())
            .field("max_message_bytes", &self.max_message_bytes)
            .finish_non_exhaustive()
    }
}

impl RecordProducer {
    pub(crate) fn new(
        kafka: &KafkaConfig,
        settings: &ProducerConfig,
        metrics: Arc<ProducerMetrics>,
    ) -> Result<Self, ProduceError> {
        let client_config = producer_client_config(kafka, settings);
        let max_message_bytes = max_message_bytes_of(&client_config);
        let producer = BatchProducer::new(&client_config).map_err(ProduceError::Create)?;
        let answer_deadline =
            Duration::from_millis(settings.delivery_timeout_ms) + Duration::from_millis(500);
        Ok(Self {
            current: Arc::new(RwLock::new((0, producer))),
            client_config: Arc::new(client_config),
            replacing: Arc::new(tokio::sync::Mutex::new(())),
            broker_reachable: Arc::new(AtomicBool::new(false)),
            records_timed_out: Arc::new(AtomicBool::new(false)),
            metrics,
            answer_deadline,
            max_message_bytes,
        })
    }

    /// Reachable and able to produce: a producer in a fatal state is never reported reachable.
    pub(crate) fn is_broker_reachable(&self) -> bool {
        self.broker_reachable.load(Ordering::Relaxed)
    }

    /// The largest record the producer sends (`message.max.bytes`), key and headers included.
    pub(crate) fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// The most payload bytes a dead letter carries; longer payloads are cut to this.
    pub(crate) fn dead_letter_payload_limit(&self) -> usize {
        self.max_message_bytes.saturating_sub(DEAD_LETTER_RESERVED_BYTES)
    }

    fn producer(&self) -> (u64, BatchProducer) {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces generation `generation` of the producer, unless another caller already did
    /// (the probe and every request of a batch that failed notice the same state). While the
    /// new one has not reached the broker, the service reports itself unreachable.
    async fn replace(&self, generation: u64, code: RDKafkaErrorCode, cause: &str) {
        let _replacing = self.replacing.lock().await;
        let (current_generation, failed) = self.producer();
        if current_generation != generation {
            return;
        }
        self.broker_reachable.store(false, Ordering::Relaxed);
        tracing::error!(
            error_code = ?code,
            %cause,
            "the Kafka producer can no longer produce; replacing it (records it holds are answered 503)"
        );
        self.metrics.record_producer_replaced(&format!("{code:?}"));
        let replacement = match BatchProducer::new(&self.client_config) {
            Ok(replacement) => replacement,
            Err(error) => {
                tracing::error!(error = %sluice_errors::Chain(&error), "failed to create a replacement Kafka producer; trying again at the next failure or probe");
                return;
            }
        };
        match self.current.write() {
            Ok(mut current) => *current = (generation + 1, replacement),
            Err(poisoned) => *poisoned.into_inner() = (generation + 1, replacement),
        }
        // Dropping purges what the failed producer still holds (their batches fail, and their
        // requests are answered 503) and joins its threads: blocking work, and not awaited, so
        // that a broker that is still frozen cannot hold up the caller. It ends by itself.
        tokio::task::spawn_blocking(move || drop(failed));
    }

    /// Checks reachability once; the probe task repeats it. A producer in librdkafka's fatal
    /// state is replaced first: it would answer metadata requests but never produce again. A
    /// broker that came back without ingest's topics (an empty broker in place of the old one)
    /// gets them created again when `kafka.topics.create_missing` allows, and a new producer:
    /// records for a missing topic would wait in the old one until they time out.
    pub(crate) async fn probe_broker(&self, timeout: Duration, topics: &TopicSetup) -> bool {
        let (generation, producer) = self.producer();
        if let Some((code, reason)) = producer.fatal_error() {
            self.replace(generation, code, &reason).await;
        }
        let (generation, producer) = self.producer();
        let names = tokio::task::spawn_blocking(move || {
            if producer.fatal_error().is_some() {
                return None;
            }
            producer.fetch_topic_names(timeout).ok()
        })
        .await
        .ok()
        .flatten();
        let mut reachable = names.is_some();
        if let Some(names) = names {
            let missing: Vec<TopicSpec> =
                topics.specs.iter().filter(|spec| !names.contains(&spec.name)).cloned().collect();
            if !missing.is_empty() {
                reachable = self.restore_topics(generation, &missing, topics).await;
            }
        }
        if reachable && !self.is_broker_reachable() && self.records_timed_out.swap(false, Ordering::Relaxed) {
            // Ready must mean able to produce: a new producer rather than the first requests
            // finding out that the old one's epoch bump was refused.
            self.replace(
                generation,
                RDKafkaErrorCode::MessageTimedOut,
                "records timed out while the broker did not answer",
            )
            .await;
            reachable = false;
        }
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

    /// Creates topics the broker lost and replaces the producer. Returns false: the service is
    /// not ready until the next probe found the topics with the new producer.
    async fn restore_topics(&self, generation: u64, missing: &[TopicSpec], topics: &TopicSetup) -> bool {
        let names: Vec<&str> = missing.iter().map(|spec| spec.name.as_str()).collect();
        if !topics.kafka.topics.create_missing {
            tracing::error!(
                ?names,
                "topics are missing on the Kafka broker and kafka.topics.create_missing is off; answering 503 until they exist"
            );
            return false;
        }
        tracing::error!(
            ?names,
            "topics are missing on the Kafka broker (a broker that came back empty?); creating them again"
        );
        if let Err(error) = ensure_topics(&topics.kafka, missing, topics.timeout).await {
            tracing::error!(error = %chain_text(&error), "failed to create the missing topics; trying again at the next probe");
            return false;
        }
        self.replace(
            generation,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            "the broker lost ingest's topics",
        )
        .await;
        false
    }

    pub(crate) fn spawn_health_probe(
        &self,
        interval: Duration,
        topics: TopicSetup,
        supervisor: &Supervisor,
        shutdown: CancellationToken,
    ) {
        let this = self.clone();
        supervisor.spawn("kafka_health_probe", async move {
            loop {
                this.probe_broker(interval.max(Duration::from_millis(500)), &topics).await;
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok::<(), std::convert::Infallible>(()),
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
        let batch_records = records.map(|record| {
            let mut headers = OwnedHeaders::new_with_capacity(5)
                .insert(Header { key: SCHEMA_FINGERPRINT_HEADER, value: Some(fingerprint_hex) })
                .insert(Header { key: INGEST_TIME_HEADER, value: Some(ingest_time.as_str()) });
            if let Some(edge) = record.edge_opt {
                headers = headers
                    .insert(Header { key: EDGE_ID_HEADER, value: Some(edge.edge_id) })
                    .insert(Header {
                        key: EDGE_POSITION_HEADER,
                        value: Some(edge.position.to_string().as_str()),
                    })
                    .insert(Header { key: EDGE_FLOOR_HEADER, value: Some(edge.floor.to_string().as_str()) });
            }
            BatchRecord {
                key: record.key.as_bytes(),
                value: record.value,
                timestamp_millis: record.event_time_micros.div_euclid(1_000),
                headers_opt: Some(headers),
            }
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
        let (generation, producer) = self.producer();
        let result = self.send_and_wait_with(&producer, topic, num_records, records).await;
        if let Err(error) = &result {
            if error.timed_out() {
                self.records_timed_out.store(true, Ordering::Relaxed);
            }
            // The records went to a producer that cannot deliver them: a fresh one for the next
            // request; this one is answered with the error (nothing of it was acknowledged).
            if let Some((code, reason)) = producer.fatal_error() {
                self.replace(generation, code, &reason).await;
            } else if let Some(code) = error.lost_producer_state_opt() {
                self.replace(generation, code, &chain_text(error)).await;
            }
        }
        result
    }

    async fn send_and_wait_with<'a>(
        &self,
        producer: &BatchProducer,
        topic: &str,
        num_records: usize,
        records: impl ExactSizeIterator<Item = BatchRecord<'a>>,
    ) -> Result<(), ProduceError> {
        let batch = producer.send_batch(topic, records).map_err(|error| match error {
            EnqueueError::QueueFull { .. } => ProduceError::QueueFull,
            other => ProduceError::Enqueue(other),
        })?;
        let outcome =
            BatchProducer::wait(&batch, self.answer_deadline).await.ok_or(ProduceError::Unanswered {
                num_records,
                timeout_ms: u64::try_from(self.answer_deadline.as_millis()).unwrap_or(u64::MAX),
            })?;
        match outcome.num_failed {
            0 => Ok(()),
            num_failed => {
                Err(ProduceError::Delivery { num_failed, num_records, source_opt: outcome.first_error_opt })
            }
        }
    }

    /// Produces one dead letter: the original bytes, cut to the dead-letter limit when longer,
    /// with the reason, source and (when cut) original size in headers. A dead letter the broker
    /// still refuses as too large is sent again without payload, so that its headers survive.
    pub(crate) async fn produce_dead_letter(
        &self,
        topic: &str,
        dead_letter: DeadLetter<'_>,
    ) -> Result<DeadLetterWritten, ProduceError> {
        let limit = self.dead_letter_payload_limit();
        let original_size = dead_letter.original_size_opt.unwrap_or(dead_letter.payload.len());
        let kept = &dead_letter.payload[..dead_letter.payload.len().min(limit)];
        match self.send_dead_letter(topic, &dead_letter, kept, original_size).await {
            Err(error) if error.is_permanent() && !kept.is_empty() => {
                tracing::warn!(%topic, error = %chain_text(&error), "dead letter refused as too large; sending it without payload");
                self.send_dead_letter(topic, &dead_letter, &[], original_size).await?;
                Ok(DeadLetterWritten::Truncated)
            }
            Err(error) => Err(error),
            Ok(()) if kept.len() < original_size => Ok(DeadLetterWritten::Truncated),
            Ok(()) => Ok(DeadLetterWritten::Whole),
        }
    }

    async fn send_dead_letter(
        &self,
        topic: &str,
        dead_letter: &DeadLetter<'_>,
        payload: &[u8],
        original_size: usize,
    ) -> Result<(), ProduceError> {
        let ingest_time = now_micros().to_string();
        let original_size_text = original_size.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(5)
            .insert(Header {
                key: DEAD_LETTER_REASON_HEADER,
                value: Some(prefix_at_char_boundary(dead_letter.reason, MAX_DEAD_LETTER_REASON_BYTES)),
            })
            .insert(Header {
                key: DEAD_LETTER_SOURCE_HEADER,
                value: Some(prefix_at_char_boundary(dead_letter.source, MAX_DEAD_LETTER_SOURCE_BYTES)),
            })
            .insert(Header { key: INGEST_TIME_HEADER, value: Some(ingest_time.as_str()) });
        if payload.len() < original_size {
            headers = headers.insert(Header {
                key: DEAD_LETTER_ORIGINAL_SIZE_HEADER,
                value: Some(original_size_text.as_str()),
            });
        }
        let record = BatchRecord {
            key: prefix_at_char_boundary(dead_letter.key, MAX_DEAD_LETTER_KEY_BYTES).as_bytes(),
            value: payload,
            timestamp_millis: now_micros().div_euclid(1_000),
            headers_opt: Some(headers),
        };
        self.send_and_wait(topic, 1, std::iter::once(record)).await
    }

    /// Waits for everything queued to be acknowledged, up to `timeout`.
    pub(crate) fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer().1.flush(timeout)
    }
}

/// The producer's `message.max.bytes`: librdkafka refuses larger records before sending them.
fn max_message_bytes_of(client_config: &ClientConfig) -> usize {
    client_config
        .get("message.max.bytes")
        .and_then(|value| value.trim().parse::<usize>().ok())
        .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES)
}

/// The longest prefix of `text` of at most `max_bytes` bytes that ends on a character boundary.
pub(crate) fn prefix_at_char_boundary(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

use sluice_clock::now_micros;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_cut_on_a_character_boundary() {
        assert_eq!(prefix_at_char_boundary("abc", 3), "abc");
        assert_eq!(prefix_at_char_boundary("abc", 2), "ab");
        assert_eq!(prefix_at_char_boundary("aé", 2), "a", "é is two bytes: not split");
        assert_eq!(prefix_at_char_boundary("é", 0), "");
    }

    #[test]
    fn only_refused_records_are_permanent() {
        let too_large = |code| {
            ProduceError::Enqueue(EnqueueError::Enqueue {
                index: 0,
                num_records: 1,
                source: KafkaError::MessageProduction(code),
            })
        };
        assert!(too_large(RDKafkaErrorCode::MessageSizeTooLarge).is_permanent());
        assert!(!too_large(RDKafkaErrorCode::QueueFull).is_permanent());
        let refused_by_broker = ProduceError::Delivery {
            num_failed: 1,
            num_records: 3,
            source_opt: Some(KafkaError::MessageProduction(RDKafkaErrorCode::MessageBatchTooLarge)),
        };
        assert!(refused_by_broker.is_permanent());
        let timed_out = ProduceError::Delivery {
            num_failed: 1,
            num_records: 1,
            source_opt: Some(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)),
        };
        assert!(!timed_out.is_permanent());
        assert!(!ProduceError::BrokerUnreachable.is_permanent());
        assert!(!ProduceError::Unanswered { num_records: 1, timeout_ms: 1 }.is_permanent());
    }

    #[test]
    fn a_fenced_or_unknown_producer_has_lost_its_state() {
        let delivery = |code| ProduceError::Delivery {
            num_failed: 1,
            num_records: 1,
            source_opt: Some(KafkaError::MessageProduction(code)),
        };
        assert_eq!(
            delivery(RDKafkaErrorCode::ProducerFenced).lost_producer_state_opt(),
            Some(RDKafkaErrorCode::ProducerFenced)
        );
        assert_eq!(
            delivery(RDKafkaErrorCode::UnknownProducerId).lost_producer_state_opt(),
            Some(RDKafkaErrorCode::UnknownProducerId)
        );
        assert_eq!(
            delivery(RDKafkaErrorCode::OutOfOrderSequenceNumber).lost_producer_state_opt(),
            Some(RDKafkaErrorCode::OutOfOrderSequenceNumber)
        );
        assert_eq!(delivery(RDKafkaErrorCode::MessageTimedOut).lost_producer_state_opt(), None);
        assert_eq!(delivery(RDKafkaErrorCode::MessageSizeTooLarge).lost_producer_state_opt(), None);
        assert_eq!(ProduceError::QueueFull.lost_producer_state_opt(), None);
    }

    #[test]
    fn unanswered_and_timed_out_records_count_as_timed_out() {
        assert!(ProduceError::Unanswered { num_records: 1, timeout_ms: 1 }.timed_out());
        let delivery = |code| ProduceError::Delivery {
            num_failed: 1,
            num_records: 1,
            source_opt: Some(KafkaError::MessageProduction(code)),
        };
        assert!(delivery(RDKafkaErrorCode::MessageTimedOut).timed_out());
        assert!(!delivery(RDKafkaErrorCode::ProducerFenced).timed_out());
        assert!(!ProduceError::BrokerUnreachable.timed_out());
    }

    #[test]
    fn message_limit_follows_the_passthrough() {
        let mut kafka = KafkaConfig::default();
        assert_eq!(max_message_bytes_of(&kafka.producer_config()), DEFAULT_MAX_MESSAGE_BYTES);
        kafka.client.0.insert("message.max.bytes".into(), "200000".into());
        assert_eq!(max_message_bytes_of(&kafka.producer_config()), 200_000);
    }
}
