//! Kafka group rebalances. rdkafka calls the context inside `poll` on the loop's blocking thread:
//! on assignment it reads each partition's committed position from its table and starts the
//! partition there before the assignment takes effect; on revocation it hands the janitor's
//! partition 0 back first and waits for the flushes in flight, so that the partitions' next
//! owners read positions that include them. The loop then applies the events this sends: a
//! partition's state is created on assignment and its uncommitted buffer dropped on revocation,
//! before the loop can flush it. The context also forwards librdkafka's statistics (lag, broker
//! ends).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use sluice_lake::{CommittedPosition, Lake};
use tokio::runtime::Handle;

use crate::buffer::PartitionState;
use crate::consumer::{CompactorLoop, LoopError, STORE_RETRY_BACKOFF};
use crate::flush_pool::{FlushPool, FlushesInFlight};
use crate::janitor::JanitorStreams;
use crate::metrics::CompactorMetrics;

const ASSIGN_LOAD_ATTEMPTS: u32 = 5;
/// Longest a revoke waits for the flushes in flight. A flush normally answers within seconds.
/// Correctness does not depend on the wait: a flush that commits after the next owner read its
/// position makes one of the two commits stale.
const MAX_REVOKE_FLUSH_WAIT: Duration = Duration::from_secs(120);
/// librdkafka's `max.poll.interval.ms` when the configuration does not set it.
const DEFAULT_MAX_POLL_INTERVAL_MS: u64 = 300_000;

/// How long a revoke may wait for flushes: the rebalance callback runs inside `poll` and counts
/// toward `max.poll.interval.ms`, past which the group drops this member in the middle of the
/// revoke; half of it leaves room for the rest of the callback.
pub(crate) fn revoke_flush_wait(max_poll_interval_ms_opt: Option<&str>) -> Duration {
    let max_poll_interval_ms = max_poll_interval_ms_opt
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_MAX_POLL_INTERVAL_MS);
    MAX_REVOKE_FLUSH_WAIT.min(Duration::from_millis(max_poll_interval_ms / 2))
}

#[derive(Debug)]
pub(crate) enum RebalanceEvent {
    Assigned(Vec<(String, i32, Option<CommittedPosition>)>),
    Revoked(Vec<(String, i32)>),
    Failed(LoopError),
    /// From librdkafka's statistics: per partition, the high watermark of the last fetch
    /// response and the fetch position at the same moment.
    BrokerEnds(Vec<BrokerEnd>),
}

#[derive(Debug)]
pub(crate) struct BrokerEnd {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) high_watermark: i64,
    pub(crate) fetch_position: i64,
    pub(crate) fetching: bool,
}

pub(crate) struct RebalanceContext {
    lake: Lake,
    handle: Handle,
    streams_by_topic: HashMap<String, String>,
    events_tx: Sender<RebalanceEvent>,
    metrics: Arc<CompactorMetrics>,
    janitor_streams: JanitorStreams,
    flushes_in_flight: FlushesInFlight,
    revoke_flush_wait: Duration,
}

impl ClientContext for RebalanceContext {
    /// librdkafka's periodic statistics carry each assigned partition's lag.
    /// ... and the high watermark of the last fetch response, which says whether the lake's
    /// committed position is beyond the broker's end (ListOffsets is not used for that: Tansu's
    /// memory storage answers it wrongly, while its fetch responses carry the right value).
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut broker_ends = Vec::new();
        for (topic, topic_statistics) in &statistics.topics {
            for (partition, partition_statistics) in &topic_statistics.partitions {
                // -1 marks partitions not assigned here, and the internal UA partition.
                if *partition >= 0 && partition_statistics.consumer_lag >= 0 {
                    self.metrics.record_consumer_lag(topic, *partition, partition_statistics.consumer_lag);
                }
                // Negative values mean "no fetch response yet".
                if *partition >= 0
                    && partition_statistics.hi_offset >= 0
                    && partition_statistics.next_offset >= 0
                {
                    broker_ends.push(BrokerEnd {
                        topic: topic.clone(),
                        partition: *partition,
                        high_watermark: partition_statistics.hi_offset,
                        fetch_position: partition_statistics.next_offset,
                        fetching: partition_statistics.fetch_state == "active",
                    });
                }
            }
        }
        if !broker_ends.is_empty() {
            let _ = self.events_tx.send(RebalanceEvent::BrokerEnds(broker_ends));
        }
    }
}

impl ConsumerContext for RebalanceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        error: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let elements: Vec<(String, i32)> = partitions
            .elements()
            .iter()
            .map(|element| (element.topic().to_string(), element.partition()))
            .collect();
        match error {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut assigned = Vec::with_capacity(elements.len());
                for (topic, partition) in elements {
                    let stream = self.streams_by_topic.get(&topic).cloned().unwrap_or_default();
                    let latest = match self.load_latest_commit(&stream, partition) {
                        Ok(latest) => latest,
                        Err(error) => {
                            let _ = self.events_tx.send(RebalanceEvent::Failed(error));
                            let _ = consumer.assign(&TopicPartitionList::new());
                            return;
                        }
                    };
                    let offset =
                        latest.as_ref().map_or(Offset::Beginning, |record| Offset::Offset(record.end_offset));
                    if let Err(error) = partitions.set_partition_offset(&topic, partition, offset) {
                        tracing::error!(%topic, partition, error = %sluice_errors::Chain(&error), "failed to set the start offset");
                    }
                    assigned.push((topic, partition, latest));
                }
                if let Err(error) = consumer.assign(partitions) {
                    let _ = self.events_tx.send(RebalanceEvent::Failed(LoopError::Assign(error)));
                    return;
                }
                for (topic, partition, _) in &assigned {
                    if let Some(stream) = self.streams_by_topic.get(topic) {
                        self.janitor_streams.assigned(stream, *partition);
                    }
                }
                let _ = self.events_tx.send(RebalanceEvent::Assigned(assigned));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Before the partitions go, so that the next owner of partition 0 is the only
                // janitor once it gets it.
                for (topic, partition) in &elements {
                    if let Some(stream) = self.streams_by_topic.get(topic) {
                        self.janitor_streams.revoked(stream, *partition);
                    }
                }
                // The group hands the partitions on only after `unassign`: their next owners then
                // read positions that include every flush this instance handed off. Without the
                // wait, a flush landing after such a read would make the new owner's first commit
                // stale (or its own), and a range would be read twice.
                if !self.flushes_in_flight.wait_until_none(self.revoke_flush_wait) {
                    tracing::warn!(
                        wait_ms = self.revoke_flush_wait.as_millis() as u64,
                        "flushes still in flight at a revoke; the partitions' next owners may read positions from before them"
                    );
                }
                let _ = self.events_tx.send(RebalanceEvent::Revoked(elements));
                if let Err(error) = consumer.unassign() {
                    tracing::warn!(error = %sluice_errors::Chain(&error), "failed to unassign revoked partitions");
                }
            }
            other => tracing::error!(error = ?other, "rebalance failed"),
        }
    }
}

impl RebalanceContext {
    pub(crate) fn new(
        lake: Lake,
        handle: Handle,
        streams_by_topic: HashMap<String, String>,
        metrics: Arc<CompactorMetrics>,
        janitor_streams: JanitorStreams,
        flushes_in_flight: FlushesInFlight,
        revoke_flush_wait: Duration,
    ) -> (Self, Receiver<RebalanceEvent>) {
        let (events_tx, events_rx) = std::sync::mpsc::channel();
        let context = Self {
            lake,
            handle,
            streams_by_topic,
            events_tx,
            metrics,
            janitor_streams,
            flushes_in_flight,
            revoke_flush_wait,
        };
        (context, events_rx)
    }

    /// Runs inside `poll` on the loop's blocking thread, so waiting on the store is allowed here.
    fn load_latest_commit(
        &self,
        stream: &str,
        partition: i32,
    ) -> Result<Option<CommittedPosition>, LoopError> {
        let mut attempt = 0;
        loop {
            match self.handle.block_on(self.lake.latest_commit(stream, partition)) {
                Ok(latest) => return Ok(latest),
                Err(error) if attempt + 1 < ASSIGN_LOAD_ATTEMPTS => {
                    tracing::warn!(stream, partition, error = %sluice_errors::Chain(&error), "failed to read the committed position; retrying");
                    attempt += 1;
                    std::thread::sleep(STORE_RETRY_BACKOFF);
                }
                Err(error) => {
                    return Err(LoopError::ReadPosition {
                        stream: stream.to_string(),
                        partition,
                        source: Box::new(error),
                    });
                }
            }
        }
    }
}

impl CompactorLoop {
    /// Applies what the rebalance callback sent since the last poll: a partition assigned gets
    /// a fresh state at its committed position, one revoked loses what it had not committed. The
    /// answer to a revoked partition's flush, arriving later, changes no state (a partition
    /// assigned again has a new one, which did not hand that flush off).
    pub(crate) fn apply_rebalance_events(
        &self,
        partitions: &mut HashMap<(String, i32), PartitionState>,
        pool: &mut FlushPool,
    ) -> Result<(), LoopError> {
        while let Ok(event) = self.events_rx.try_recv() {
            match event {
                RebalanceEvent::Assigned(assigned) => {
                    for (topic, partition, latest) in assigned {
                        let Some(stream) = self.streams.get(&topic) else { continue };
                        if let Some(max_event_time) =
                            latest.as_ref().and_then(|position| position.max_event_time_micros_opt)
                        {
                            self.metrics.record_committed_event_time(
                                &stream.stream,
                                partition,
                                max_event_time,
                            );
                        }
                        tracing::info!(%topic, partition, start_offset = latest.as_ref().map_or(-1, |position| position.end_offset), "partition assigned");
                        let state = PartitionState::new(Arc::clone(stream), latest.as_ref())
                            .map_err(|source| LoopError::Decoder { stream: stream.stream.clone(), source })?;
                        self.metrics.record_position_beyond_end(&stream.stream, partition, 0);
                        partitions.insert((topic, partition), state);
                    }
                    // An empty assignment counts too: the group has more members than partitions,
                    // and this one knows it has nothing to do.
                    self.health.set_assigned(true);
                }
                RebalanceEvent::BrokerEnds(broker_ends) => {
                    self.apply_broker_ends(partitions, broker_ends, pool)
                }
                RebalanceEvent::Revoked(revoked) => {
                    self.health.set_assigned(false);
                    for key in revoked {
                        if let Some(state) = partitions.remove(&key) {
                            // The gauge would otherwise keep its last value in this instance.
                            self.metrics.record_position_beyond_end(&state.stream.stream, key.1, 0);
                            let dropped_records = state.buffer.num_uncommitted_records();
                            self.metrics
                                .record_revoked_uncommitted(&state.stream.stream, dropped_records as u64);
                            tracing::info!(topic = %key.0, partition = key.1, dropped_records, "partition revoked; uncommitted rows dropped");
                        }
                    }
                }
                RebalanceEvent::Failed(error) => return Err(error),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoke_waits_for_flushes_at_most_half_the_poll_interval() {
        assert_eq!(revoke_flush_wait(None), Duration::from_secs(120));
        assert_eq!(revoke_flush_wait(Some("600000")), Duration::from_secs(120));
        assert_eq!(revoke_flush_wait(Some("60000")), Duration::from_secs(30));
        assert_eq!(revoke_flush_wait(Some(" 1000 ")), Duration::from_millis(500));
        assert_eq!(revoke_flush_wait(Some("not a number")), Duration::from_secs(120));
    }
}
