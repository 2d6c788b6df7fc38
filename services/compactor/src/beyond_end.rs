//! Partitions whose committed position is beyond the broker's end: the broker lost their records
//! (replaced by an empty one, restored from nothing, topic recreated). Reading on from what the
//! broker holds would skip the readings its new log gets, so such a partition is paused and
//! reported until the broker holds the position after all, or an operator records a new one
//! with `sluice-compactor reset-position` (docs/operations.md, "Broker lost a partition's
//! records").

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use crate::buffer::PartitionState;
use crate::consumer::CompactorLoop;
use crate::flush_pool::FlushPool;
use crate::rebalance::BrokerEnd;

impl CompactorLoop {
    /// Stops reading a partition whose committed position is beyond the broker's end, and says
    /// so loudly: error log, `sluice_compactor_position_beyond_end_records`, `/readyz` 503.
    pub(crate) fn stop_beyond_end(
        &self,
        topic: &str,
        partition: i32,
        state: &mut PartitionState,
        broker_end: i64,
        pool: &mut FlushPool,
    ) {
        if state.buffer.has_uncommitted() {
            // Rows read before the broker lost its records exist nowhere else now. With a flush
            // of the partition still in flight they go once that one committed, when they are
            // due; if it fails, nothing may be committed past its range and they are lost with it.
            self.flush_partition(&(topic.to_string(), partition), state, pool);
        }
        state.beyond_end_opt = Some(broker_end);
        let mut paused = TopicPartitionList::new();
        paused.add_partition(topic, partition);
        if let Err(error) = self.consumer.pause(&paused) {
            tracing::warn!(topic, partition, error = %sluice_errors::Chain(&error), "failed to pause the partition");
        }
        let records_beyond = state.buffer.next_offset().saturating_sub(broker_end);
        self.metrics.record_position_beyond_end(&state.stream.stream, partition, records_beyond);
        self.health.set_beyond_end(topic, partition, true);
        tracing::error!(
            stream = %state.stream.stream,
            topic,
            partition,
            committed_position = state.buffer.next_offset(),
            broker_end,
            "the lake's committed position is beyond the end of the partition on the broker: the broker lost \
             the partition's records (replaced by an empty broker, restored from nothing, or the topic was \
             recreated). The partition is paused so that no new reading is skipped. To read what the broker \
             holds now, record a new position: sluice-compactor reset-position --stream <stream> \
             --partition <partition> --to-offset 0 (docs/operations.md, \"Broker lost a partition's records\")"
        );
    }

    /// Reads a paused partition again from the state's position.
    pub(crate) fn resume_partition(&self, key: &(String, i32), state: &mut PartitionState) {
        state.beyond_end_opt = None;
        state.seen_beyond_end = false;
        let mut resumed = TopicPartitionList::new();
        resumed.add_partition(&key.0, key.1);
        if let Err(error) = self.consumer.resume(&resumed) {
            tracing::warn!(topic = %key.0, partition = key.1, error = %sluice_errors::Chain(&error), "failed to resume the partition");
        }
        self.metrics.record_position_beyond_end(&state.stream.stream, key.1, 0);
        self.health.set_beyond_end(&key.0, key.1, false);
    }

    /// Compares each partition's position with the broker's end from librdkafka's statistics.
    pub(crate) fn apply_broker_ends(
        &self,
        partitions: &mut HashMap<(String, i32), PartitionState>,
        broker_ends: Vec<BrokerEnd>,
        pool: &mut FlushPool,
    ) {
        for end in broker_ends {
            let key = (end.topic, end.partition);
            let Some(state) = partitions.get_mut(&key) else { continue };
            match state.beyond_end_opt {
                // A fetch position above the high watermark happens only when the log ends below
                // where the consumer was told to read (Tansu's memory broker answers such fetches
                // with nothing instead of an error). librdkafka keeps a partition's high
                // watermark across assignments, so right after one it can be an old value: only
                // a second report in a row counts.
                None => {
                    let beyond = end.fetching
                        && end.fetch_position > end.high_watermark
                        && end.high_watermark < state.buffer.next_offset();
                    if beyond && state.seen_beyond_end {
                        self.stop_beyond_end(&key.0, key.1, state, end.high_watermark, pool);
                    }
                    state.seen_beyond_end = beyond;
                }
                Some(_) if end.high_watermark >= state.buffer.next_offset() => {
                    tracing::info!(topic = %key.0, partition = key.1, position = state.buffer.next_offset(), broker_end = end.high_watermark, "the broker holds the committed position after all; reading on");
                    if let Err(error) = self.consumer.seek(
                        &key.0,
                        key.1,
                        Offset::Offset(state.buffer.next_offset()),
                        Duration::from_secs(10),
                    ) {
                        tracing::warn!(topic = %key.0, partition = key.1, error = %sluice_errors::Chain(&error), "failed to seek");
                        continue;
                    }
                    self.resume_partition(&key, state);
                }
                _ => {}
            }
        }
    }

    /// A partition waiting beyond the broker's end goes on once its committed position changed:
    /// `sluice-compactor reset-position` recorded a new one. One with a flush in flight waits for
    /// its answer, which moves the position itself.
    pub(crate) fn check_for_new_positions(&self, partitions: &mut HashMap<(String, i32), PartitionState>) {
        for (key, state) in partitions
            .iter_mut()
            .filter(|(_, state)| state.beyond_end_opt.is_some() && !state.buffer.has_flush_in_flight())
        {
            let latest = match self.handle.block_on(self.lake.latest_commit(&state.stream.stream, key.1)) {
                Ok(latest) => latest,
                Err(error) => {
                    tracing::warn!(partition = key.1, error = %sluice_errors::Chain(&error), "failed to read the committed position");
                    continue;
                }
            };
            if latest.as_ref().map(|position| position.end_offset) == state.buffer.committed_opt() {
                continue;
            }
            tracing::info!(
                topic = %key.0,
                partition = key.1,
                position = latest.as_ref().map_or(0, |position| position.end_offset),
                "a new committed position was recorded; reading from it"
            );
            if state.buffer.has_uncommitted() {
                tracing::info!(topic = %key.0, partition = key.1, dropped_records = state.buffer.num_buffered_rows(), "uncommitted rows dropped; they are read again if the new position is below them");
            }
            self.rewind(key, state);
        }
    }
}
