//! The gateway's record sink: an accepted request's readings become one spool frame, and the
//! device is answered only once that frame is synced to disk.

use std::sync::Arc;

use sluice_device_api::{DeadLetter, DeadLetterWritten, EncodedBatch, RecordSink, SinkError};
use sluice_errors::chain_text;
use sluice_schema::StreamSchema;

use crate::dead_letters::DeadLetterLog;
use crate::metrics::EdgeMetrics;
use crate::spool::{Spool, SpoolError};

#[derive(Debug, Clone)]
pub(crate) struct SpoolSink {
    pub(crate) spool: Spool,
    pub(crate) dead_letters: Arc<DeadLetterLog>,
    pub(crate) metrics: Arc<EdgeMetrics>,
    pub(crate) max_message_bytes: usize,
}

impl RecordSink for SpoolSink {
    fn unavailable_reason(&self) -> Option<String> {
        self.spool.broken_reason().map(|why| format!("the spool stopped taking readings: {why}"))
    }

    fn max_message_bytes(&self) -> usize {
        // Central adds the edge headers to each record it produces for the gateway.
        self.max_message_bytes.saturating_sub(sluice_device_api::forwarded::EDGE_HEADERS_OVERHEAD_BYTES)
    }

    fn dead_letter_payload_limit(&self) -> usize {
        self.dead_letters.payload_limit()
    }

    async fn store(
        &self,
        stream: &str,
        schema: &StreamSchema,
        batch: &EncodedBatch,
    ) -> Result<(), SinkError> {
        let received_at = sluice_clock::now_micros();
        let payload =
            sluice_device_api::forwarded::encode_spooled(stream, schema.fingerprint, received_at, batch)
                .map_err(|error| SinkError::Refused { message: error.to_string() })?;
        match self.spool.append(payload).await {
            Ok(appended) => {
                if appended.num_dropped_frames > 0 {
                    tracing::warn!(
                        num_dropped_batches = appended.num_dropped_frames,
                        "the spool was full: dropped its oldest batches to make room (spool.full_policy = \"drop_oldest\")"
                    );
                    self.metrics.record_dropped_batches(appended.num_dropped_frames);
                }
                self.metrics.record_usage(&self.spool);
                Ok(())
            }
            Err(error) => Err(self.refusal(error)),
        }
    }

    async fn store_dead_letter(
        &self,
        stream: &str,
        letter: DeadLetter<'_>,
    ) -> Result<DeadLetterWritten, SinkError> {
        let (line, written) = self.dead_letters.line(stream, sluice_clock::now_micros(), &letter);
        // The log syncs each letter: blocking, so not on the runtime's threads.
        let log = Arc::clone(&self.dead_letters);
        tokio::task::spawn_blocking(move || log.append(&line)).await.map_err(|error| {
            SinkError::Unavailable { message: format!("the dead-letter write failed: {error}") }
        })??;
        Ok(written)
    }
}

impl SpoolSink {
    fn refusal(&self, error: SpoolError) -> SinkError {
        match error {
            SpoolError::TooLarge { .. } => SinkError::Refused { message: chain_text(&error) },
            SpoolError::Full { .. } => {
                let (_, num_waiting) = self.spool.usage();
                SinkError::InsufficientStorage {
                    message: format!(
                        "{}; {num_waiting} batches are waiting for the uplink. Keep the readings and send them \
                         again later",
                        chain_text(&error)
                    ),
                }
            }
            other => {
                tracing::error!(error = %chain_text(&other), "the spool failed to take readings");
                SinkError::Unavailable {
                    message: format!(
                        "the spool failed to take the readings: {}; nothing was acknowledged",
                        chain_text(&other)
                    ),
                }
            }
        }
    }
}
