//! Ingest's record sink: readings are stored once the Kafka broker acknowledged every record
//! (`acks=all`, idempotent producer), dead letters go to the stream's dead-letter topic.

use sluice_device_api::{DeadLetter, DeadLetterWritten, EncodedBatch, RecordSink, SinkError};
use sluice_errors::chain_text;
use sluice_kafka::TopicNames;
use sluice_schema::StreamSchema;

use crate::producer::{ForwardedAt, OutgoingRecord, ProduceError, RecordProducer};

#[derive(Debug, Clone)]
pub(crate) struct KafkaSink {
    pub(crate) producer: RecordProducer,
    pub(crate) topics: TopicNames,
}

impl RecordSink for KafkaSink {
    fn unavailable_reason(&self) -> Option<String> {
        (!self.producer.is_broker_reachable()).then(|| "Kafka broker unreachable".to_string())
    }

    fn max_message_bytes(&self) -> usize {
        self.producer.max_message_bytes()
    }

    fn dead_letter_payload_limit(&self) -> usize {
        self.producer.dead_letter_payload_limit()
    }

    async fn store(
        &self,
        stream: &str,
        schema: &StreamSchema,
        batch: &EncodedBatch,
    ) -> Result<(), SinkError> {
        let topic = self.topics.stream(stream);
        let edge_opt = batch.edge_opt.as_ref();
        let outgoing = batch.records.iter().enumerate().map(|(index, record)| OutgoingRecord {
            key: &record.key,
            event_time_micros: record.event_time_micros,
            value: batch.value(record),
            edge_opt: edge_opt.and_then(|edge| {
                let floor = *edge.positions.first()?;
                let position = *edge.positions.get(index)?;
                Some(ForwardedAt { edge_id: edge.edge_id.as_str(), position, floor })
            }),
        });
        let produced = self.producer.produce_batch(&topic, &schema.fingerprint_hex(), outgoing).await;
        produced.map_err(|error| {
            tracing::warn!(%topic, error = %chain_text(&error), "produce failed");
            sink_error(error)
        })
    }

    async fn store_dead_letter(
        &self,
        stream: &str,
        letter: DeadLetter<'_>,
    ) -> Result<DeadLetterWritten, SinkError> {
        self.producer.produce_dead_letter(&self.topics.dead_letter(stream), letter).await.map_err(sink_error)
    }
}

/// The device's answer to a failed produce: whether anything may have been written, and what to do.
fn sink_error(error: ProduceError) -> SinkError {
    if error.is_permanent() {
        let message = format!(
            "Kafka refused the readings: {}; records before the refused one may have been written",
            chain_text(&error)
        );
        return SinkError::Refused { message };
    }
    let message = match error {
        ProduceError::QueueFull => "the producer queue is full; part of the request may have been written: retry the whole request shortly (duplicates are dropped by device_id and seq)".to_string(),
        ProduceError::BrokerUnreachable => {
            "the Kafka broker is unreachable; nothing was written, retry later".to_string()
        }
        other => format!(
            "{}; some records may have been written: retry the whole request (duplicates are dropped by device_id and seq)",
            chain_text(&other)
        ),
    };
    SinkError::Unavailable { message }
}
