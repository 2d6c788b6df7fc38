//! `sluice-compactor reset-position`: an operator moves a partition's committed position, after
//! the broker lost the partition's records (docs/operations.md, "Broker lost a partition's
//! records"). The new position is the next commit record of the partition, created once like
//! every other, so a compactor that commits at the same moment wins or loses cleanly and
//! nothing is written twice; a running compactor picks the record up within a second.

use sluice_lake::{CommitOutcome, CommitRecord, Lake, LakeError};

use crate::consumer::now_micros;

/// Written as `writer_id` of reset records.
const RESET_WRITER_ID: &str = "sluice-compactor reset-position";

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("failed to read or create commit records of stream '{stream}'")]
    Lake {
        stream: String,
        #[source]
        source: LakeError,
    },
    #[error(
        "stream '{stream}' has no commit records in this lake: check --stream and the configured \
         object_store.url"
    )]
    NoCommitRecords { stream: String },
    #[error("--to-offset {offset} is negative; offsets start at 0")]
    NegativeOffset { offset: i64 },
}

/// What the command did for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetOutcome {
    /// The reset record was created; its `reset_opt` holds the previous position.
    Recorded(Box<CommitRecord>),
    /// The partition has no commit record: the compactor reads it from the beginning already.
    NoCommits { partition: i32 },
    /// Another writer created the same record first (a compactor committed meanwhile): look at
    /// the partition again and rerun the command if still needed.
    Conflict { partition: i32, sequence: u64 },
}

/// Records `to_offset` as the committed position of each of `partitions` of `stream` (every
/// partition with commit records when empty).
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
    let partitions = if partitions.is_empty() {
        let committed = lake.committed_partitions(stream).await.map_err(lake_error)?;
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
        let record = latest.position_reset(to_offset, reason, RESET_WRITER_ID, now_micros());
        outcomes.push(match lake.create_commit(&record).await.map_err(lake_error)? {
            CommitOutcome::Created => ResetOutcome::Recorded(Box::new(record)),
            CommitOutcome::Conflict => ResetOutcome::Conflict { partition, sequence: record.sequence },
        });
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use std::sync::Arc;

    use object_store::memory::InMemory;
    use object_store::path::Path;

    use super::*;

    fn committed(partition: i32, sequence: u64, end_offset: i64) -> CommitRecord {
        CommitRecord {
            stream: "telemetry".into(),
            topic: "sluice.telemetry".into(),
            kafka_partition: partition,
            sequence,
            start_offset: 0,
            end_offset,
            files: Vec::new(),
            num_dead_lettered: 0,
            num_duplicates_dropped: 0,
            max_event_time_micros_opt: Some(99),
            writer_id: "compactor".into(),
            created_at_micros: 0,
            reset_opt: None,
        }
    }

    #[tokio::test]
    async fn every_committed_partition_gets_the_next_record_once() {
        let lake = Lake::new(Arc::new(InMemory::new()), Path::from("lake"));
        assert!(matches!(
            reset_position(&lake, "telemetry", &[], 0, "why").await,
            Err(ResetError::NoCommitRecords { .. })
        ));
        assert!(matches!(
            reset_position(&lake, "telemetry", &[], -1, "why").await,
            Err(ResetError::NegativeOffset { offset: -1 })
        ));
        lake.create_commit(&committed(0, 4, 500)).await.unwrap();
        lake.create_commit(&committed(2, 0, 7)).await.unwrap();
        let outcomes = reset_position(&lake, "telemetry", &[], 0, "broker replaced").await.unwrap();
        let recorded: Vec<(i32, u64, i64, i64)> = outcomes
            .iter()
            .map(|outcome| match outcome {
                ResetOutcome::Recorded(record) => (
                    record.kafka_partition,
                    record.sequence,
                    record.end_offset,
                    record.reset_opt.as_ref().unwrap().previous_end_offset,
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(recorded, [(0, 5, 0, 500), (2, 1, 0, 7)]);
        assert_eq!(lake.latest_commit("telemetry", 0).await.unwrap().unwrap().end_offset, 0);
        // A named partition without records, and one that moved on since the last reset.
        let mut racing = committed(0, 6, 3);
        racing.start_offset = 0;
        lake.create_commit(&racing).await.unwrap();
        let outcomes = reset_position(&lake, "telemetry", &[1, 0], 0, "again").await.unwrap();
        assert_eq!(outcomes[0], ResetOutcome::NoCommits { partition: 1 });
        assert!(matches!(&outcomes[1], ResetOutcome::Recorded(record) if record.sequence == 7));
    }
}
