//! A producer that tracks delivery per batch instead of per record: one shared counter per batch
//! rather than a future and a channel per record. The caller learns when the broker acknowledged
//! (or refused) every record of the batch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use tokio::sync::Notify;

/// Delivery state of one batch, shared by its records' delivery reports.
#[derive(Debug, Default)]
pub struct BatchDelivery {
    num_pending: AtomicUsize,
    num_failed: AtomicUsize,
    first_error: Mutex<Option<KafkaError>>,
    done: Notify,
}

/// How a batch ended once every record was reported.
#[derive(Debug)]
pub struct BatchOutcome {
    pub num_failed: usize,
    pub first_error_opt: Option<KafkaError>,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BatchDeliveryContext;

impl ClientContext for BatchDeliveryContext {}

impl ProducerContext for BatchDeliveryContext {
    type DeliveryOpaque = Arc<BatchDelivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: Self::DeliveryOpaque) {
        if let Err((error, _)) = result {
            batch.num_failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut first_error) = batch.first_error.lock() {
                first_error.get_or_insert_with(|| error.clone());
            }
        }
        if batch.num_pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            // notify_one keeps a permit when nobody waits yet, so the waiter cannot miss it.
            batch.done.notify_one();
        }
    }
}

/// One record of a batch.
#[derive(Debug, Clone)]
pub struct BatchRecord<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub timestamp_millis: i64,
    pub headers_opt: Option<OwnedHeaders>,
}

/// Why a batch could not be handed to the producer.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("the producer queue is full after {num_enqueued} of {num_records} records")]
    QueueFull { num_enqueued: usize, num_records: usize },
    #[error("failed to enqueue record {index} of {num_records}")]
    Enqueue {
        index: usize,
        num_records: usize,
        #[source]
        source: KafkaError,
    },
}

/// A threaded librdkafka producer with per-batch delivery tracking.
#[derive(Clone)]
pub struct BatchProducer {
    producer: Arc<ThreadedProducer<BatchDeliveryContext>>,
}

impl std::fmt::Debug for BatchProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchProducer").finish_non_exhaustive()
    }
}

impl BatchProducer {
    pub fn new(client_config: &ClientConfig) -> KafkaResult<Self> {
        let producer = client_config.create_with_context(BatchDeliveryContext)?;
        Ok(Self { producer: Arc::new(producer) })
    }

    /// Enqueues every record; on success returns the batch to wait on with [`Self::wait`]. On
    /// error, records enqueued before it are still delivered (Kafka has no way to take them back).
    pub fn send_batch<'a>(
        &self,
        topic: &str,
        records: impl ExactSizeIterator<Item = BatchRecord<'a>>,
    ) -> Result<Arc<BatchDelivery>, EnqueueError> {
        let num_records = records.len();
        let batch = Arc::new(BatchDelivery::default());
        // Counted up front so that an early report cannot bring the count to zero mid-batch.
        batch.num_pending.store(num_records, Ordering::Release);
        if num_records == 0 {
            batch.done.notify_one();
        }
        for (index, record) in records.enumerate() {
            let mut base_record = BaseRecord::with_opaque_to(topic, Arc::clone(&batch))
                .key(record.key)
                .payload(record.value)
                .timestamp(record.timestamp_millis);
            if let Some(headers) = record.headers_opt {
                base_record = base_record.headers(headers);
            }
            if let Err((error, _)) = self.producer.send(base_record) {
                return Err(match error {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                        EnqueueError::QueueFull { num_enqueued: index, num_records }
                    }
                    source => EnqueueError::Enqueue { index, num_records, source },
                });
            }
        }
        Ok(batch)
    }

    /// Waits until every record of `batch` was acknowledged or failed, or `timeout` passed
    /// (`None` then: the outcome is unknown).
    pub async fn wait(batch: &BatchDelivery, timeout: Duration) -> Option<BatchOutcome> {
        if batch.num_pending.load(Ordering::Acquire) > 0 {
            tokio::time::timeout(timeout, batch.done.notified()).await.ok()?;
        }
        let first_error_opt = batch.first_error.lock().ok().and_then(|mut first_error| first_error.take());
        Some(BatchOutcome { num_failed: batch.num_failed.load(Ordering::Acquire), first_error_opt })
    }

    /// The fatal error this producer hit, if any. An idempotent producer that lost track of its
    /// sequence numbers (a broker that stalled past the delivery timeout, or came back empty)
    /// refuses every record from then on: the caller must replace it with a new one.
    pub fn fatal_error(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.producer.client().fatal_error()
    }

    /// The names of the topics the broker knows, or the metadata request's error.
    pub fn fetch_topic_names(&self, timeout: Duration) -> KafkaResult<Vec<String>> {
        let metadata = self.producer.client().fetch_metadata(None, timeout)?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|topic| topic.error().is_none())
            .map(|topic| topic.name().to_string())
            .collect())
    }

    pub fn fetch_metadata_ok(&self, timeout: Duration) -> bool {
        self.producer.client().fetch_metadata(None, timeout).is_ok()
    }

    pub fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        self.producer.flush(timeout)
    }
}
