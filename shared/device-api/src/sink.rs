//! Where accepted readings go. Ingest's sink produces them to Kafka; the edge gateway's appends
//! them to its disk spool. The device API answers a device with success only when `store`
//! returned Ok, so a sink must return Ok only once the readings are durable where it keeps them.

use std::future::Future;

use sluice_schema::StreamSchema;

use crate::records::EncodedBatch;

/// A message refused by validation (MQTT only; HTTP answers the device instead), for the
/// stream's dead letters.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    pub key: &'a str,
    pub payload: &'a [u8],
    /// Size of the payload as it arrived, when `payload` is already a cut prefix of it.
    pub original_size_opt: Option<usize>,
    pub reason: &'a str,
    pub source: &'a str,
}

/// How a dead letter was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterWritten {
    Whole,
    /// The payload was cut to the dead-letter limit; the original size is kept beside it.
    Truncated,
}

/// Why a sink did not store readings. The message is the device's answer: it says what was
/// written and what the device should do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Not stored now; another attempt later may succeed (HTTP 503, MQTT not acknowledged).
    #[error("{message}")]
    Unavailable { message: String },
    /// No room to keep the readings; nothing was written (HTTP 507, MQTT not acknowledged).
    #[error("{message}")]
    InsufficientStorage { message: String },
    /// The readings as such can never be stored (too large for the sink): another attempt fails
    /// the same way (HTTP 503 with the reason; MQTT dead-letters them).
    #[error("{message}")]
    Refused { message: String },
}

pub trait RecordSink: Send + Sync + 'static {
    /// Why `store` would fail now, for `/readyz` and for refusing a request before reading its
    /// body; None when it may succeed.
    fn unavailable_reason(&self) -> Option<String>;

    /// The largest record the sink takes, key and headers included; validation refuses larger
    /// readings before anything is stored.
    fn max_message_bytes(&self) -> usize;

    /// The most payload bytes a dead letter keeps; longer payloads are cut to this.
    fn dead_letter_payload_limit(&self) -> usize;

    /// Stores every record of `batch` durably; Ok only then.
    fn store(
        &self,
        stream: &str,
        schema: &StreamSchema,
        batch: &EncodedBatch,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Stores a message that validation refused, with why.
    fn store_dead_letter(
        &self,
        stream: &str,
        letter: DeadLetter<'_>,
    ) -> impl Future<Output = Result<DeadLetterWritten, SinkError>> + Send;
}
