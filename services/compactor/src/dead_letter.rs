//! A record the compactor cannot write (it does not decode, or its event time fits no lake
//! partition) goes to its stream's dead-letter topic, unchanged, with why and where from in
//! headers. The loop waits for Kafka's acknowledgement before the record counts as consumed,
//! so a dead letter is never lost between the topics.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use sluice_kafka::{BatchProducer, BatchRecord};

use crate::consumer::{CompactorLoop, STORE_RETRY_BACKOFF, StreamInfo, now_micros};

pub use sluice_schema::wire::{DEAD_LETTER_REASON_HEADER, DEAD_LETTER_SOURCE_HEADER};

/// Where a dead letter came from, as its source header says it.
pub(crate) fn dead_letter_source(topic: &str, partition: i32, offset: i64) -> String {
    format!("kafka:{topic}/{partition}@{offset}")
}

fn dead_letter_headers(reason: &str, source: &str) -> OwnedHeaders {
    OwnedHeaders::new_with_capacity(2)
        .insert(Header { key: DEAD_LETTER_REASON_HEADER, value: Some(reason) })
        .insert(Header { key: DEAD_LETTER_SOURCE_HEADER, value: Some(source) })
}

impl CompactorLoop {
    /// Writes a record that cannot be decoded to the dead-letter topic and waits for Kafka's
    /// acknowledgement, retrying until it succeeds; false if shutdown came first.
    pub(crate) fn dead_letter(
        &self,
        stream: &StreamInfo,
        key: &[u8],
        payload: &[u8],
        reason: &str,
        source: &str,
    ) -> bool {
        tracing::warn!(stream = %stream.stream, %source, %reason, "record cannot be compacted; dead-lettering it");
        loop {
            let headers = dead_letter_headers(reason, source);
            let record = BatchRecord {
                key,
                value: payload,
                timestamp_millis: now_micros() / 1_000,
                headers_opt: Some(headers),
            };
            let delivered =
                match self.dead_letters.send_batch(&stream.dead_letter_topic, std::iter::once(record)) {
                    Ok(batch) => self
                        .handle
                        .block_on(BatchProducer::wait(&batch, Duration::from_secs(30)))
                        .is_some_and(|outcome| outcome.num_failed == 0),
                    Err(_) => false,
                };
            if delivered {
                self.metrics.record_dead_letter(&stream.stream);
                return true;
            }
            if self.shutdown.is_cancelled() {
                return false;
            }
            tracing::warn!(topic = %stream.dead_letter_topic, "failed to write a dead letter; retrying");
            std::thread::sleep(STORE_RETRY_BACKOFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::message::Headers;

    use super::*;

    #[test]
    fn the_source_names_topic_partition_and_offset() {
        let cases = [
            ("sluice.readings", 0, 0, "kafka:sluice.readings/0@0"),
            ("t", 17, 9_007_199_254_740_993, "kafka:t/17@9007199254740993"),
        ];
        for (topic, partition, offset, source) in cases {
            assert_eq!(dead_letter_source(topic, partition, offset), source);
        }
    }

    #[test]
    fn the_headers_carry_the_reason_and_the_source() {
        let headers = dead_letter_headers("event time out of range", "kafka:t/1@5");
        assert_eq!(headers.count(), 2);
        let pairs: Vec<(&str, Option<&[u8]>)> =
            headers.iter().map(|header| (header.key, header.value)).collect();
        assert_eq!(
            pairs,
            vec![
                (DEAD_LETTER_REASON_HEADER, Some(&b"event time out of range"[..])),
                (DEAD_LETTER_SOURCE_HEADER, Some(&b"kafka:t/1@5"[..])),
            ]
        );
    }
}
