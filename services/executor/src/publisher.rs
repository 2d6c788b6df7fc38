//! The executor's events: job statuses on `<prefix>.job-status` (JSON) and run events on
//! `<prefix>.job-runs` (Avro), keyed by job. Events are advisory (the lake's records are the
//! truth), so a send that fails is logged and dropped, never retried for long; but a producer
//! that will fail every later send is replaced, or the executor would run on and say nothing.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sluice_clock::{Clock, format_micros};
use sluice_errors::Chain;
use sluice_jobs::events::{JobRunEvent, JobStatusEvent, JobStatusKind};
use sluice_kafka::KafkaConfig;

use crate::metrics::ExecutorMetrics;

const EVENT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct EventPublisher {
    kafka: KafkaConfig,
    /// Replaced when librdkafka reports a fatal error (an idempotent producer fenced after a
    /// broker stall fails every later send).
    producer: RwLock<FutureProducer>,
    status_topic: String,
    runs_topic: String,
    /// Named in every status event.
    instance_id: String,
    metrics: Arc<ExecutorMetrics>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for EventPublisher {
    /// rdkafka's producer has no `Debug`; the topics say which publisher this is.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventPublisher")
            .field("status_topic", &self.status_topic)
            .field("runs_topic", &self.runs_topic)
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
}

impl EventPublisher {
    pub(crate) fn new(
        kafka: &KafkaConfig,
        instance_id: &str,
        metrics: Arc<ExecutorMetrics>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let producer: FutureProducer = kafka.producer_config().create()?;
        let topics = kafka.topic_names();
        Ok(Self {
            kafka: kafka.clone(),
            producer: RwLock::new(producer),
            status_topic: topics.job_status(),
            runs_topic: topics.job_runs(),
            instance_id: instance_id.to_string(),
            metrics,
            clock,
        })
    }

    /// A status event about the definition at (`partition`, `offset`) of the jobs topic, now.
    pub(crate) fn status(
        &self,
        job: &str,
        status: JobStatusKind,
        reason: String,
        partition: i32,
        offset: i64,
    ) -> JobStatusEvent {
        JobStatusEvent {
            job: job.to_string(),
            status,
            reason,
            definition_partition: partition,
            definition_offset: offset,
            window_start_opt: None,
            at: format_micros(self.clock.now_micros()),
            executor: self.instance_id.clone(),
        }
    }

    pub(crate) async fn publish_status(&self, event: JobStatusEvent) {
        match serde_json::to_vec(&event) {
            Ok(payload) => self.publish(&self.status_topic, &event.job, &payload).await,
            Err(error) => tracing::warn!(error = %Chain(&error), "failed to encode a status event"),
        }
    }

    pub(crate) async fn publish_run(&self, event: &JobRunEvent) {
        match event.encode() {
            Ok(payload) => self.publish(&self.runs_topic, &event.job, &payload).await,
            Err(error) => tracing::warn!(error = %Chain(&error), "failed to encode a run event"),
        }
    }

    /// Waits up to `timeout` for events still in the producer's queue. Blocks the thread.
    pub(crate) fn flush(&self, timeout: Duration) {
        let _ = self.producer().flush(timeout);
    }

    fn producer(&self) -> FutureProducer {
        match self.producer.read() {
            Ok(producer) => producer.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    async fn publish(&self, topic: &str, key: &str, payload: &[u8]) {
        // One more try after a replacement: the event that met the fatal error is not lost.
        for try_number in 1..=2 {
            let producer = self.producer();
            let record = FutureRecord::to(topic).key(key).payload(payload);
            let Err((error, _)) = producer.send(record, EVENT_DELIVERY_TIMEOUT).await else { return };
            match broken_for_good(&producer, &error) {
                Some((code, reason)) if try_number == 1 => self.replace_producer(&producer, code, &reason),
                _ => {
                    tracing::warn!(%topic, %key, error = %Chain(&error), "failed to publish an executor event");
                    return;
                }
            }
        }
    }

    /// Swaps in a new producer for `failed`, unless a concurrent sender already did.
    fn replace_producer(
        &self,
        failed: &FutureProducer,
        code: rdkafka::types::RDKafkaErrorCode,
        reason: &str,
    ) {
        let mut current = match self.producer.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.client().native_ptr() != failed.client().native_ptr() {
            return;
        }
        match self.kafka.producer_config().create::<FutureProducer>() {
            Ok(producer) => {
                tracing::error!(?code, %reason, "the event producer failed for good; replaced it with a new one");
                *current = producer;
                self.metrics.record_producer_replaced();
            }
            Err(error) => {
                tracing::error!(?code, %reason, error = %Chain(&error), "the event producer failed for good and no new one could be created");
            }
        }
    }
}

/// Whether the producer will fail every later send: a fatal error, or a refusal of its producer
/// state (`sluice_kafka::is_producer_state_lost`; seen on Tansu after a 20 s stall made events
/// time out in flight: every later event got `ProducerFenced`).
fn broken_for_good(
    producer: &FutureProducer,
    error: &rdkafka::error::KafkaError,
) -> Option<(rdkafka::types::RDKafkaErrorCode, String)> {
    if let Some(fatal) = producer.client().fatal_error() {
        return Some(fatal);
    }
    let code = error.rdkafka_error_code()?;
    sluice_kafka::is_producer_state_lost(code).then(|| (code, error.to_string()))
}
