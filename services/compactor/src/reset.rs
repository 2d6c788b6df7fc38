//! `sluice-compactor reset-position`: an operator moves a partition's committed position, after
//! the broker lost the partition's records (docs/operations.md, "Broker lost a partition's
//! records"). The new position is a Delta commit that moves only the partition's `txn`, made on
//! the position it read like every flush, so a compactor that commits at the same moment wins or
//! loses cleanly and nothing is written twice; a running compactor picks it up within a second.

use sluice_lake::{CommitRecord, Lake, LakeError, TableCommit};

use crate::consumer::now_micros;

/// Written as `writer_id` of reset records.
const RESET_WRITER_ID: &str = "sluice-compactor reset-position";

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("failed to read or commit to the table of stream '{stream}'")]
    Lake {
        stream: String,
        #[source]
        source: LakeError,
    },
    #[error(
        "stream '{stream}' has no committed flushes in this lake: check --stream and the configured \
         object_store.url, or name the partitions with --partition"
    )]
    NoCommitRecords { stream: String },
    #[error("--to-offset {offset} is negative; offsets start at 0")]
    NegativeOffset { offset: i64 },
}

/// What the command did for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetOutcome {
    /// The reset was committed; its `reset_opt` holds the previous position.
    Recorded(Box<CommitRecord>),
    /// The partition has no committed position: the compactor reads it from the beginning already.
    NoCommits { partition: i32 },
    /// Another writer moved the position first (a compactor committed meanwhile): look at the
    /// partition again and rerun the command if still needed.
    Conflict { partition: i32, position: i64 },
}

/// Records `to_offset` as the committed position of each of `partitions` of `stream` (every
/// partition with a flush in the table's log when empty).
pub async fn reset_position(
    lake: &Lake,
    stream: &str,
    partitions: &[i32],
    to_offset: i64,
    reason: &str,
) -> Result<Vec<ResetOutcome>, ResetError> {
    if to_offset < 0 {
        return Err(ResetError::NegativeOffset { offset: to_offset });
    }
    let lake_error = |source| ResetError::Lake { stream: stream.to_string(), source };
    // The log's flushes name the partitions and their topic: read once.
    let commits = lake.commits(stream).await.map_err(lake_error)?;
    let partitions = if partitions.is_empty() {
        let mut committed: Vec<i32> = commits.iter().map(|record| record.kafka_partition).collect();
        committed.dedup();
        if committed.is_empty() {
            return Err(ResetError::NoCommitRecords { stream: stream.to_string() });
        }
        committed
    } else {
        partitions.to_vec()
    };
    let mut outcomes = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let Some(latest) = lake.latest_commit(stream, partition).await.map_err(lake_error)? else {
            outcomes.push(ResetOutcome::NoCommits { partition });
            continue;
        };
        let topic = commits
            .iter()
            .find(|record| record.kafka_partition == partition)
            .map(|record| record.topic.clone())
            .unwrap_or_default();
        let record = CommitRecord::position_reset(
            stream,
            &topic,
            partition,
            &latest,
            to_offset,
            reason,
            RESET_WRITER_ID,
            now_micros(),
        );
        outcomes.push(match lake.create_commit(&record, &[]).await.map_err(lake_error)? {
            TableCommit::Committed { .. } => ResetOutcome::Recorded(Box::new(record)),
            TableCommit::Conflict => ResetOutcome::Conflict { partition, position: latest.end_offset },
        });
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use std::sync::Arc;

    use arrow_schema::{DataType, Field, Schema};
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use sluice_lake::{CommittedPosition, TableSettings};

    use super::*;

    async fn commit(lake: &Lake, partition: i32, previous: Option<i64>, end_offset: i64) {
        let record = CommitRecord {
            stream: "telemetry".into(),
            topic: "sluice.telemetry".into(),
            kafka_partition: partition,
            previous_end_offset_opt: previous,
            start_offset: previous.unwrap_or(0),
            end_offset,
            files: Vec::new(),
            num_dead_lettered: 0,
            num_duplicates_dropped: 0,
            edge_positions_at_opt: None,
            num_edge_repeats_dropped: 0,
            max_event_time_micros_opt: Some(99),
            writer_id: "compactor".into(),
            created_at_micros: 0,
            reset_opt: None,
            table_version_opt: None,
        };
        assert!(matches!(lake.create_commit(&record, &[]).await.unwrap(), TableCommit::Committed { .. }));
    }

    fn position(lake_position: Option<CommittedPosition>) -> (i64, Option<i64>) {
        let position = lake_position.unwrap();
        (position.end_offset, position.max_event_time_micros_opt)
    }

    #[tokio::test]
    async fn every_committed_partition_moves_once_and_keeps_its_event_time() {
        let lake = Lake::new(Arc::new(InMemory::new()), Path::from("lake"));
        let columns = Schema::new(vec![Field::new("device_id", DataType::Utf8, false)]);
        lake.ensure_table("telemetry", &columns, &["dt"], TableSettings::default()).await.unwrap();
        assert!(matches!(
            reset_position(&lake, "telemetry", &[], 0, "why").await,
            Err(ResetError::NoCommitRecords { .. })
        ));
        assert!(matches!(
            reset_position(&lake, "telemetry", &[], -1, "why").await,
            Err(ResetError::NegativeOffset { offset: -1 })
        ));
        commit(&lake, 0, None, 500).await;
        commit(&lake, 2, None, 7).await;
        let outcomes = reset_position(&lake, "telemetry", &[], 0, "broker replaced").await.unwrap();
        let recorded: Vec<(i32, i64, i64, String)> = outcomes
            .iter()
            .map(|outcome| match outcome {
                ResetOutcome::Recorded(record) => (
                    record.kafka_partition,
                    record.end_offset,
                    record.reset_opt.as_ref().unwrap().previous_end_offset,
                    record.topic.clone(),
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            recorded,
            [(0, 0, 500, "sluice.telemetry".to_string()), (2, 0, 7, "sluice.telemetry".to_string())]
        );
        assert_eq!(position(lake.latest_commit("telemetry", 0).await.unwrap()), (0, Some(99)));
        // A named partition without a position, and one that moved on since the last reset.
        commit(&lake, 0, Some(0), 3).await;
        let outcomes = reset_position(&lake, "telemetry", &[1, 0], 0, "again").await.unwrap();
        assert_eq!(outcomes[0], ResetOutcome::NoCommits { partition: 1 });
        assert!(
            matches!(&outcomes[1], ResetOutcome::Recorded(record) if record.reset_opt.as_ref().unwrap().previous_end_offset == 3)
        );
        assert_eq!(position(lake.latest_commit("telemetry", 0).await.unwrap()), (0, Some(99)));
    }
}
