//! The janitor: VACUUM of each stream's table, run by one replica at a time. The replica that the
//! consumer group gave a stream's Kafka partition 0 keeps that stream's table, so the group's own
//! membership decides who cleans, without a lease of our own; when partition 0 moves, so does the
//! janitor. Two janitors on one table during a rebalance would do the same deletions twice,
//! which is safe: each deletes only files that no retained table version needs.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_lake::Lake;
use sluice_shutdown::CancellationToken;

use crate::config::JanitorConfig;

/// The Kafka partition whose owner keeps a stream's table.
pub(crate) const JANITOR_PARTITION: i32 = 0;

/// The streams whose janitor runs in this instance, kept by the rebalance callback.
#[derive(Debug, Clone, Default)]
pub(crate) struct JanitorStreams(Arc<Mutex<BTreeSet<String>>>);

impl JanitorStreams {
    /// Called with each (stream, partition) the group assigned here.
    pub(crate) fn assigned(&self, stream: &str, partition: i32) {
        if partition == JANITOR_PARTITION {
            self.update(|streams| {
                streams.insert(stream.to_string());
            });
        }
    }

    /// Called with each (stream, partition) the group took away, before another member gets it.
    pub(crate) fn revoked(&self, stream: &str, partition: i32) {
        if partition == JANITOR_PARTITION {
            self.update(|streams| {
                streams.remove(stream);
            });
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<String> {
        // A poisoned lock means a panic in the rebalance callback: clean nothing rather than
        // clean on a guess.
        self.0.lock().map(|streams| streams.iter().cloned().collect()).unwrap_or_default()
    }

    fn update(&self, change: impl FnOnce(&mut BTreeSet<String>)) {
        if let Ok(mut streams) = self.0.lock() {
            change(&mut streams);
        }
    }
}

/// Deletes, every `interval`, the data files no version of the tables this instance keeps needs:
/// those of flushes and merges that never committed, and those merges removed longer than the
/// retention ago.
pub(crate) async fn run_janitor(
    lake: Lake,
    kept: JanitorStreams,
    config: JanitorConfig,
    shutdown: CancellationToken,
) -> crate::Result<()> {
    let min_age = Duration::from_millis(config.min_age_ms);
    let removed_retention = Duration::from_millis(config.removed_retention_ms);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(config.interval_ms)) => {}
        }
        for stream in kept.snapshot() {
            match lake.vacuum(&stream, min_age, removed_retention).await {
                Ok(0) => tracing::debug!(stream, "janitor pass: nothing to delete"),
                Ok(num_deleted) => {
                    tracing::info!(stream, num_deleted, "deleted data files no table version needs")
                }
                Err(error) => {
                    tracing::warn!(stream, error = %sluice_errors::Chain(&error), "janitor failed; trying again later")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_partition_zero_keeps_the_table_until_it_is_revoked() {
        let kept = JanitorStreams::default();
        kept.assigned("telemetry", 1);
        kept.assigned("alerts", 2);
        assert!(kept.snapshot().is_empty(), "other partitions do not make a janitor");
        kept.assigned("telemetry", 0);
        kept.assigned("alerts", 0);
        assert_eq!(kept.snapshot(), ["alerts", "telemetry"]);
        kept.revoked("telemetry", 1);
        assert_eq!(kept.snapshot(), ["alerts", "telemetry"], "only partition 0 counts");
        kept.revoked("telemetry", 0);
        assert_eq!(kept.snapshot(), ["alerts"]);
        let clone = kept.clone();
        clone.revoked("alerts", 0);
        assert!(kept.snapshot().is_empty(), "clones share one set");
    }
}
