//! What `/readyz` means for the compactor, and what happens when one of its tasks fails.
//!
//! Ready means: the consumer loop runs, the instance owns its share of the partitions (it
//! received an assignment from the group, empty when the group has more members than
//! partitions), every assigned partition can make progress (none has a committed position
//! beyond the broker's end, see docs/operations.md), and no task of the service has failed.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use sluice_health::Readiness;
use sluice_shutdown::CancellationToken;
use tokio::task::JoinHandle;

use crate::metrics::CompactorMetrics;
use crate::{CompactorError, Result};

#[derive(Debug, Default)]
struct HealthState {
    consuming: bool,
    assigned: bool,
    beyond_end: BTreeSet<(String, i32)>,
    failed: bool,
}

impl HealthState {
    fn is_ready(&self) -> bool {
        self.consuming && self.assigned && self.beyond_end.is_empty() && !self.failed
    }
}

/// The inputs of readiness, shared by the consumer loop and the task supervisors; every change
/// recomputes `/readyz` under one lock so that no stale answer wins a race.
#[derive(Debug, Clone)]
pub(crate) struct CompactorHealth {
    readiness: Readiness,
    state: Arc<Mutex<HealthState>>,
}

impl CompactorHealth {
    pub(crate) fn new(readiness: Readiness) -> Self {
        readiness.set(false);
        Self { readiness, state: Arc::default() }
    }

    fn update(&self, change: impl FnOnce(&mut HealthState)) {
        // A poisoned lock means a panic elsewhere: report not ready rather than panic again.
        match self.state.lock() {
            Ok(mut state) => {
                change(&mut state);
                self.readiness.set(state.is_ready());
            }
            Err(_) => self.readiness.set(false),
        }
    }

    pub(crate) fn set_consuming(&self, consuming: bool) {
        self.update(|state| state.consuming = consuming);
    }

    /// The group gave this instance its partitions (`true`), or took them away for a rebalance.
    pub(crate) fn set_assigned(&self, assigned: bool) {
        self.update(|state| {
            state.assigned = assigned;
            if !assigned {
                state.beyond_end.clear();
            }
        });
    }

    pub(crate) fn set_beyond_end(&self, topic: &str, partition: i32, beyond_end: bool) {
        self.update(|state| {
            if beyond_end {
                state.beyond_end.insert((topic.to_string(), partition));
            } else {
                state.beyond_end.remove(&(topic.to_string(), partition));
            }
        });
    }

    pub(crate) fn set_failed(&self) {
        self.update(|state| state.failed = true);
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.readiness.is_ready()
    }

    pub(crate) fn partitions_beyond_end(&self) -> Vec<(String, i32)> {
        self.state.lock().map(|state| state.beyond_end.iter().cloned().collect()).unwrap_or_default()
    }
}

/// Runs a task of the service and watches it: when it returns an error or panics, the service
/// stops visibly instead of running on without it (STYLE.md section 5): an error log with the
/// whole cause chain, `sluice_compactor_task_failures` counted, `/readyz` 503, and the root token
/// cancelled, so that the other tasks wind down and `run` returns the error (the binary exits
/// non-zero).
pub(crate) fn supervise(
    task: &'static str,
    handle: JoinHandle<Result<()>>,
    health: CompactorHealth,
    metrics: Arc<CompactorMetrics>,
    shutdown: CancellationToken,
) -> JoinHandle<Result<()>> {
    tokio::spawn(async move {
        let outcome = match handle.await {
            Ok(outcome) => outcome,
            Err(join_error) => Err(CompactorError::TaskPanicked { task, message: panic_message(join_error) }),
        };
        if let Err(error) = &outcome {
            health.set_failed();
            metrics.record_task_failure(task);
            tracing::error!(task, error = %sluice_errors::chain_text(error), "a compactor task failed; stopping the compactor");
            shutdown.cancel();
        }
        outcome
    })
}

/// [`supervise`] for a future spawned on the runtime.
pub(crate) fn spawn_supervised<F>(
    task: &'static str,
    future: F,
    health: CompactorHealth,
    metrics: Arc<CompactorMetrics>,
    shutdown: CancellationToken,
) -> JoinHandle<Result<()>>
where
    F: Future<Output = Result<()>> + Send + 'static,
{
    supervise(task, tokio::spawn(future), health, metrics, shutdown)
}

fn panic_message(join_error: tokio::task::JoinError) -> String {
    if join_error.is_cancelled() {
        return "the task was cancelled".to_string();
    }
    sluice_errors::panic_message(join_error.into_panic().as_ref())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use super::*;

    fn parts() -> (CompactorHealth, Arc<CompactorMetrics>, CancellationToken) {
        let health = CompactorHealth::new(Readiness::default());
        health.set_consuming(true);
        health.set_assigned(true);
        (health, Arc::new(CompactorMetrics::new()), CancellationToken::new())
    }

    #[tokio::test]
    async fn a_panicking_task_stops_the_service_and_reports_not_ready() {
        let (health, metrics, shutdown) = parts();
        assert!(health.is_ready());
        let watched = spawn_supervised(
            "merge",
            async {
                let values: Vec<i64> = vec![i64::MIN];
                // What an unchecked multiplication in a task does in a debug build.
                let _ = values[0].checked_mul(2).expect("overflow in the merge task");
                Ok(())
            },
            health.clone(),
            metrics,
            shutdown.clone(),
        );
        let error = watched.await.unwrap().unwrap_err();
        assert!(matches!(error, CompactorError::TaskPanicked { task: "merge", .. }), "{error}");
        assert!(
            sluice_errors::chain_text(&error).contains("overflow in the merge task"),
            "{}",
            sluice_errors::chain_text(&error)
        );
        assert!(shutdown.is_cancelled(), "the root token is cancelled");
        assert!(!health.is_ready());
        // Failure is final: nothing the loop reports makes the service ready again.
        health.set_assigned(true);
        assert!(!health.is_ready());
    }

    #[tokio::test]
    async fn a_failing_task_stops_the_service_and_one_that_ends_well_does_not() {
        let (health, metrics, shutdown) = parts();
        let finished = spawn_supervised(
            "janitor",
            async { Ok(()) },
            health.clone(),
            Arc::clone(&metrics),
            shutdown.clone(),
        );
        finished.await.unwrap().unwrap();
        assert!(!shutdown.is_cancelled() && health.is_ready());
        let failed = spawn_supervised(
            "janitor",
            async { Err(CompactorError::Health(std::io::Error::other("disk gone"))) },
            health.clone(),
            metrics,
            shutdown.clone(),
        );
        assert!(sluice_errors::chain_text(&failed.await.unwrap().unwrap_err()).contains("disk gone"));
        assert!(shutdown.is_cancelled() && !health.is_ready());
    }

    #[test]
    fn ready_only_with_an_assignment_and_no_partition_beyond_the_end() {
        let health = CompactorHealth::new(Readiness::default());
        health.set_consuming(true);
        assert!(!health.is_ready(), "no assignment yet: it does not know what it owns");
        health.set_assigned(true);
        assert!(health.is_ready());
        health.set_beyond_end("t", 2, true);
        assert!(!health.is_ready());
        health.set_beyond_end("t", 2, false);
        assert!(health.is_ready());
        health.set_beyond_end("t", 1, true);
        health.set_assigned(false);
        assert!(!health.is_ready(), "partitions revoked");
        health.set_assigned(true);
        assert!(health.is_ready(), "revocation forgets what was beyond the end");
        health.set_consuming(false);
        assert!(!health.is_ready());
    }
}
