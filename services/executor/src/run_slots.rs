//! The run slots (`executor.max_concurrent_runs`) and the attempt tasks in them. Each attempt
//! runs as a task of one `JoinSet`, in a span naming its job and window, so that shutdown can
//! wait for them (and stop what outlives the grace period) and a task that panics is noticed
//! instead of leaving its window marked running for good.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};
use tracing::Instrument as _;

use crate::attempt::{AttemptReport, AttemptRequest, run_attempt};
use crate::context::ExecutorContext;

/// The attempts running on this replica, one run slot each (`executor.max_concurrent_runs`):
/// tracked, so that shutdown waits for them and a task that panics is noticed.
#[derive(Debug)]
pub(crate) struct RunSlots {
    slots: Arc<Semaphore>,
    tasks: JoinSet<AttemptReport>,
    /// The job and window start of each task, for a task that ends without a report.
    windows: HashMap<tokio::task::Id, (String, i64)>,
}

/// An attempt whose task panicked or was cancelled: it left no report.
#[derive(Debug)]
pub(crate) struct LostAttempt {
    pub(crate) job: String,
    pub(crate) window_start_micros: i64,
    pub(crate) error: JoinError,
}

impl RunSlots {
    pub(crate) fn new(max_concurrent_runs: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_concurrent_runs)),
            tasks: JoinSet::new(),
            windows: HashMap::new(),
        }
    }

    pub(crate) fn has_free_slot(&self) -> bool {
        self.slots.available_permits() > 0
    }

    /// Starts the attempt in a free slot, in a span naming its job and window; false when
    /// every slot is taken.
    pub(crate) fn start(&mut self, context: &Arc<ExecutorContext>, request: AttemptRequest) -> bool {
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else { return false };
        let window = (request.job.definition.name.clone(), request.window_start_micros);
        let span = request.span();
        let context = Arc::clone(context);
        let task = self.tasks.spawn(
            async move {
                let report = run_attempt(&context, &request).await;
                drop(slot);
                report
            }
            .instrument(span),
        );
        self.windows.insert(task.id(), window);
        true
    }

    /// The next attempt to end, once one does; `None` at once while none runs (which turns a
    /// `select!` branch on it off).
    pub(crate) async fn next_done(&mut self) -> Option<Result<AttemptReport, LostAttempt>> {
        let joined = self.tasks.join_next_with_id().await?;
        Some(match joined {
            Ok((id, report)) => {
                self.windows.remove(&id);
                Ok(report)
            }
            Err(error) => {
                let (job, window_start_micros) = self.windows.remove(&error.id()).unwrap_or_default();
                Err(LostAttempt { job, window_start_micros, error })
            }
        })
    }

    /// Waits up to `grace` for the running attempts, then stops those still going: their
    /// claims keep other replicas off until their leases end, as after a crash.
    pub(crate) async fn wind_down(&mut self, grace: Duration) {
        let all_done = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, all_done).await.is_err() {
            tracing::warn!(
                running = self.tasks.len(),
                "runs still going at the end of the grace period; their leases will expire"
            );
            self.tasks.shutdown().await;
        }
    }
}
