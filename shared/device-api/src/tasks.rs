//! Background tasks that must not vanish: each runs as its own tokio task so that a panic is
//! caught as a `JoinError` instead of silently ending the work (an MQTT bridge whose worker died
//! kept the service up while nothing more was stored). A task that panics, or returns an error
//! while the service is not shutting down, makes the service fail visibly: `/readyz` answers 503
//! with the cause, `sluice_<service>_task_failures` counts it, an error is logged, and the shutdown
//! token (the root token in `main`) is cancelled so that the process winds down and exits
//! non-zero.

use std::future::Future;
use std::sync::{Arc, Mutex};

use sluice_shutdown::{CancellationToken, TaskTracker};

use crate::metrics::DeviceApiMetrics;

/// The first background task that failed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    pub task: &'static str,
    pub cause: String,
}

#[derive(Debug, Clone)]
pub struct Supervisor {
    tracker: TaskTracker,
    shutdown: CancellationToken,
    metrics: Arc<DeviceApiMetrics>,
    failure: Arc<Mutex<Option<TaskFailure>>>,
}

impl Supervisor {
    pub fn new(tracker: TaskTracker, shutdown: CancellationToken, metrics: Arc<DeviceApiMetrics>) -> Self {
        Self { tracker, shutdown, metrics, failure: Arc::default() }
    }

    /// Runs `task` in the background; its panic or error fails the service.
    pub fn spawn<F, E>(&self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + Send + 'static,
    {
        let inner = tokio::spawn(task);
        let this = self.clone();
        self.tracker.spawn(async move {
            match inner.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => this.fail(name, sluice_errors::chain_text(&error)),
                Err(join_error) => {
                    let cause = if join_error.is_panic() {
                        format!(
                            "panicked: {}",
                            sluice_errors::panic_message(join_error.into_panic().as_ref())
                        )
                    } else {
                        "was cancelled".to_string()
                    };
                    this.fail(name, cause);
                }
            }
        });
    }

    fn fail(&self, task: &'static str, cause: String) {
        tracing::error!(task, %cause, "background task failed; stopping the service");
        self.metrics.record_task_failure(task);
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert(TaskFailure { task, cause });
        }
        self.shutdown.cancel();
    }

    /// The first failure, if any task failed.
    pub fn failure(&self) -> Option<TaskFailure> {
        self.failure.lock().ok().and_then(|failure| failure.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("the broker refused the connection")]
    struct Refused;

    fn supervisor() -> (Supervisor, TaskTracker, CancellationToken) {
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let supervisor =
            Supervisor::new(tracker.clone(), shutdown.clone(), Arc::new(DeviceApiMetrics::new("ingest")));
        (supervisor, tracker, shutdown)
    }

    #[tokio::test]
    async fn panicking_task_cancels_shutdown_and_records_its_message() {
        let (supervisor, tracker, shutdown) = supervisor();
        supervisor.spawn("mqtt_bridge", async {
            let values: Vec<i64> = vec![i64::MIN];
            if values[0] < 0 {
                panic!("attempt to negate with overflow");
            }
            Ok::<(), Refused>(())
        });
        tracker.close();
        tracker.wait().await;
        assert!(shutdown.is_cancelled());
        assert_eq!(
            supervisor.failure(),
            Some(TaskFailure {
                task: "mqtt_bridge",
                cause: "panicked: attempt to negate with overflow".into()
            })
        );
    }

    #[tokio::test]
    async fn failed_task_cancels_shutdown_with_its_error_chain() {
        let (supervisor, tracker, shutdown) = supervisor();
        supervisor.spawn("mqtt_bridge", async { Err(Refused) });
        tracker.close();
        tracker.wait().await;
        assert!(shutdown.is_cancelled());
        assert_eq!(
            supervisor.failure().map(|failure| failure.cause),
            Some("the broker refused the connection".into())
        );
    }

    #[tokio::test]
    async fn task_that_ends_well_leaves_the_service_running() {
        let (supervisor, tracker, shutdown) = supervisor();
        supervisor.spawn("health_probe", async { Ok::<(), Refused>(()) });
        tracker.close();
        tracker.wait().await;
        assert!(!shutdown.is_cancelled());
        assert_eq!(supervisor.failure(), None);
    }
}
