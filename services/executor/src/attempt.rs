//! One attempt at one window, from start to report. A window whose attempts ran out is marked
//! failed; otherwise the attempt is claimed in the lake (so that no other replica runs it
//! meanwhile), run within its timeout (runs.rs: plan, execute, write and commit the result),
//! its outcome recorded, its run event (and a `window_failed` status) published and counted,
//! and what follows decided from the error's class: nothing, another attempt after a backoff,
//! or stopping the process. The scheduler starts attempts and applies their reports; which
//! attempt a window needs next is window_step.rs's decision.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_clock::{format_micros, millis_to_micros};
use sluice_errors::{Chain, ErrorClass};
use sluice_jobs::events::{JobRunEvent, JobStatusKind, RunStatus};
use sluice_jobs::job::JobDefinition;
use sluice_query::ValidatedJob;

use crate::config::ExecutorSection;
use crate::context::ExecutorContext;
use crate::runs::{
    AttemptRecord, OutcomeRecord, OutcomeStatus, RunError, RunResult, RunStats, WindowRun, WindowState,
    claim, load_windows, record_outcome,
};

/// An attempt the scheduler starts.
#[derive(Debug, Clone)]
pub(crate) struct AttemptRequest {
    pub(crate) job: Arc<ValidatedJob>,
    /// Where the job's definition sits in the jobs topic: a report about a definition replaced
    /// since is told apart.
    pub(crate) definition_offset: i64,
    pub(crate) window_start_micros: i64,
    pub(crate) revision: u32,
    pub(crate) attempt: u32,
}

impl AttemptRequest {
    /// The span the whole attempt runs in; DataFusion's phases are its children.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "job_run",
            job = %self.job.definition.name,
            window_start = %format_micros(self.window_start_micros),
            revision = self.revision,
            attempt = self.attempt,
        )
    }
}

/// What a finished attempt tells the scheduler.
#[derive(Debug)]
pub(crate) struct AttemptReport {
    pub(crate) job: String,
    pub(crate) definition_offset: i64,
    pub(crate) window_start_micros: i64,
    /// The window's records as the attempt left them, when known: the next step is decided
    /// from them without reading the lake again.
    pub(crate) state_opt: Option<WindowState>,
    /// Clock time before which the window is not started again here.
    pub(crate) retry_at_micros_opt: Option<i64>,
    /// The run found this process unable to go on.
    pub(crate) fatal_opt: Option<RunError>,
}

/// What an attempt's end means for its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttemptEnd {
    Succeeded,
    /// Another attempt follows after `backoff`.
    Retry {
        backoff: Duration,
    },
    /// The window is failed: its input is poison, or its last attempt failed.
    Failed,
    /// The process cannot go on: the window is left unfailed to its next attempt, by this
    /// replica's next process or by another replica.
    Abandoned,
}

impl AttemptEnd {
    /// Only a retryable error gets another attempt, and only while attempts remain.
    pub(crate) fn decide(
        result: Result<(), ErrorClass>,
        attempt: u32,
        max_attempts: u32,
        retry_backoff_ms: u64,
    ) -> Self {
        match result {
            Ok(()) => Self::Succeeded,
            Err(ErrorClass::Retryable) if attempt < max_attempts => {
                Self::Retry { backoff: backoff(retry_backoff_ms, attempt) }
            }
            Err(ErrorClass::Retryable | ErrorClass::Poison) => Self::Failed,
            Err(ErrorClass::Fatal) => Self::Abandoned,
        }
    }

    /// What the run event and `sluice_executor_runs` say: another attempt follows an abandoned
    /// one too.
    pub(crate) fn run_status(self) -> RunStatus {
        match self {
            Self::Succeeded => RunStatus::Succeeded,
            Self::Failed => RunStatus::Failed,
            Self::Retry { .. } | Self::Abandoned => RunStatus::Retrying,
        }
    }
}

/// `retry_backoff_ms` before the second attempt, doubled for each further one (at most 1024
/// times it).
pub(crate) fn backoff(retry_backoff_ms: u64, attempt: u32) -> Duration {
    Duration::from_millis(retry_backoff_ms.saturating_mul(1 << attempt.saturating_sub(1).min(10)))
}

/// How many attempts a job's windows get on this executor, and how long each may hold its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AttemptBounds {
    pub(crate) max_attempts: u32,
    pub(crate) timeout_micros: i64,
    pub(crate) lease_grace_micros: i64,
}

impl AttemptBounds {
    pub(crate) fn of(definition: &JobDefinition, section: &ExecutorSection) -> Self {
        // A job accepted before `max_timeout_ms` was lowered still gets no more than it says now.
        let timeout_micros = definition
            .timeout_micros_opt
            .unwrap_or(millis_to_micros(section.default_timeout_ms))
            .min(millis_to_micros(section.max_timeout_ms));
        Self {
            max_attempts: definition.max_attempts_opt.unwrap_or(section.default_max_attempts).max(1),
            timeout_micros,
            lease_grace_micros: millis_to_micros(section.lease_grace_ms),
        }
    }

    /// Until when a claim made at `started_at_micros` keeps other replicas off its window: the
    /// timeout, and a grace for committing the result and recording the outcome after it.
    pub(crate) fn lease_until(&self, started_at_micros: i64) -> i64 {
        started_at_micros.saturating_add(self.timeout_micros).saturating_add(self.lease_grace_micros)
    }

    fn timeout(&self) -> Duration {
        Duration::from_micros(u64::try_from(self.timeout_micros).unwrap_or(u64::MAX))
    }
}

/// Runs one attempt to its end. Nothing is returned as an error: what went wrong is in the
/// report, the window's records and the events.
pub(crate) async fn run_attempt(context: &ExecutorContext, request: &AttemptRequest) -> AttemptReport {
    let definition = &request.job.definition;
    let attempt = WindowAttempt {
        context,
        request,
        window_end_micros: request.window_start_micros.saturating_add(definition.window_micros),
        bounds: AttemptBounds::of(definition, &context.config.executor),
    };
    attempt.run().await
}

struct WindowAttempt<'a> {
    context: &'a ExecutorContext,
    request: &'a AttemptRequest,
    window_end_micros: i64,
    bounds: AttemptBounds,
}

impl WindowAttempt<'_> {
    fn name(&self) -> &str {
        &self.request.job.definition.name
    }

    fn report(&self) -> AttemptReport {
        AttemptReport {
            job: self.name().to_string(),
            definition_offset: self.request.definition_offset,
            window_start_micros: self.request.window_start_micros,
            state_opt: None,
            retry_at_micros_opt: None,
            fatal_opt: None,
        }
    }

    fn retry_at(&self, after: Duration) -> i64 {
        let after_micros = i64::try_from(after.as_micros()).unwrap_or(i64::MAX);
        self.context.clock.now_micros().saturating_add(after_micros)
    }

    /// The window's records as the lake has them now.
    async fn reload(&self) -> Option<WindowState> {
        let mut windows = load_windows(self.context.lake(), self.name()).await.ok()?;
        windows.remove(&self.request.window_start_micros)
    }

    async fn run(self) -> AttemptReport {
        let mut report = self.report();
        let (revision, attempt) = (self.request.revision, self.request.attempt);
        let retry_backoff_ms = self.context.config.executor.retry_backoff_ms;
        if attempt > self.bounds.max_attempts {
            self.fail_exhausted().await;
            report.state_opt = self.reload().await;
            return report;
        }

        let started_at_micros = self.context.clock.now_micros();
        let mut claim_record = AttemptRecord {
            job: self.name().to_string(),
            window_start_micros: self.request.window_start_micros,
            window_end_micros: self.window_end_micros,
            revision,
            attempt,
            owner: self.context.instance_id.clone(),
            incarnation: self.context.incarnation.clone(),
            started_at_micros,
            lease_until_micros: self.bounds.lease_until(started_at_micros),
        };
        match claim(self.context.lake(), &claim_record).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(job = %self.name(), window = %format_micros(self.request.window_start_micros), "another replica claimed this attempt");
                report.state_opt = self.reload().await;
                return report;
            }
            Err(error) => {
                tracing::warn!(job = %self.name(), error = %Chain(&error), "failed to claim a window; will try again");
                report.retry_at_micros_opt = Some(self.retry_at(Duration::from_millis(retry_backoff_ms)));
                return report;
            }
        }

        let result = self.execute().await;
        let finished_at_micros = self.context.clock.now_micros();
        let duration_ms = (finished_at_micros - started_at_micros) / 1000;
        let class_result = result.as_ref().map(|_| ()).map_err(RunError::class);
        let end = AttemptEnd::decide(class_result, attempt, self.bounds.max_attempts, retry_backoff_ms);
        let status = end.run_status();
        let stats = result.as_ref().map(|done| done.stats).unwrap_or_default();
        let error_opt = result.as_ref().err().map(ToString::to_string);
        match &result {
            Ok(_) => tracing::info!(rows_written = stats.rows_written, duration_ms, "window done"),
            Err(error) => {
                tracing::warn!(error = %Chain(error), class = %error.class(), ?status, "window attempt failed")
            }
        }

        match end {
            AttemptEnd::Succeeded | AttemptEnd::Failed => {
                let outcome = OutcomeRecord {
                    job: self.name().to_string(),
                    window_start_micros: self.request.window_start_micros,
                    window_end_micros: self.window_end_micros,
                    revision,
                    attempt,
                    status: if end == AttemptEnd::Succeeded {
                        OutcomeStatus::Succeeded
                    } else {
                        OutcomeStatus::Failed
                    },
                    started_at_micros,
                    finished_at_micros,
                    stats,
                    input_rows: result.as_ref().map_or(0, |done| done.input_rows),
                    result_path_opt: result.as_ref().ok().map(|done| done.result_path.clone()),
                    error_opt: error_opt.clone(),
                    input_versions: result
                        .as_ref()
                        .map(|done| done.input_versions.clone())
                        .unwrap_or_default(),
                    result_version_opt: result.as_ref().ok().map(|done| done.result_version),
                };
                match record_outcome(self.context.lake(), &outcome).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // A stale attempt (its lease ran out while it worked): the other one counts.
                        tracing::warn!("another attempt recorded this window first; this run is not counted");
                        report.state_opt = self.reload().await;
                        return report;
                    }
                    Err(error) => {
                        tracing::warn!(error = %Chain(&error), "failed to record the outcome; the window will run again");
                        claim_record.lease_until_micros = 0;
                        report.retry_at_micros_opt =
                            Some(self.retry_at(Duration::from_millis(retry_backoff_ms)));
                        report.state_opt = Some(WindowState {
                            revision,
                            latest_attempt_opt: Some(claim_record),
                            outcome_opt: None,
                        });
                        return report;
                    }
                }
                report.state_opt = Some(WindowState {
                    revision,
                    latest_attempt_opt: Some(claim_record),
                    outcome_opt: Some(outcome),
                });
                if end == AttemptEnd::Failed {
                    self.publish_window_failed(error_opt.clone().unwrap_or_default()).await;
                }
            }
            AttemptEnd::Retry { .. } | AttemptEnd::Abandoned => {
                if let AttemptEnd::Retry { backoff } = end {
                    report.retry_at_micros_opt = Some(self.retry_at(backoff));
                } else {
                    report.fatal_opt = result.as_ref().err().cloned();
                }
                // The attempt is over: the next one need not wait for this claim's lease.
                claim_record.lease_until_micros = 0;
                report.state_opt =
                    Some(WindowState { revision, latest_attempt_opt: Some(claim_record), outcome_opt: None });
            }
        }

        let elapsed = Duration::from_millis(u64::try_from(duration_ms).unwrap_or(0));
        self.context.metrics.record_attempt(self.name(), status, elapsed, &stats);
        let event =
            self.run_event(&result, status, (started_at_micros, finished_at_micros), &stats, error_opt);
        self.context.events.publish_run(&event).await;
        report
    }

    async fn execute(&self) -> Result<RunResult, RunError> {
        let job = &self.request.job;
        let run = WindowRun {
            catalog: self.context.catalog.clone(),
            job: job.definition.clone(),
            streams: job.streams.clone(),
            window_start_micros: self.request.window_start_micros,
            window_end_micros: self.window_end_micros,
            revision: self.request.revision,
            attempt: self.request.attempt,
        };
        run.execute_within(self.context.run_runtime.handle(), self.bounds.timeout()).await
    }

    /// Every attempt failed before (or died): the window is failed for good.
    async fn fail_exhausted(&self) {
        let num_attempts = self.request.attempt - 1;
        let now_micros = self.context.clock.now_micros();
        let outcome = OutcomeRecord {
            job: self.name().to_string(),
            window_start_micros: self.request.window_start_micros,
            window_end_micros: self.window_end_micros,
            revision: self.request.revision,
            attempt: num_attempts,
            status: OutcomeStatus::Failed,
            started_at_micros: now_micros,
            finished_at_micros: now_micros,
            stats: RunStats::default(),
            input_rows: 0,
            result_path_opt: None,
            error_opt: Some(format!("{num_attempts} attempts failed or did not finish")),
            input_versions: BTreeMap::new(),
            result_version_opt: None,
        };
        if let Err(error) = record_outcome(self.context.lake(), &outcome).await {
            tracing::warn!(job = %self.name(), error = %Chain(&error), "failed to record a failed window");
        }
    }

    async fn publish_window_failed(&self, reason: String) {
        let mut event = self.context.events.status(
            self.name(),
            JobStatusKind::WindowFailed,
            reason,
            0,
            self.request.definition_offset,
        );
        event.window_start_opt = Some(format_micros(self.request.window_start_micros));
        self.context.events.publish_status(event).await;
    }

    fn run_event(
        &self,
        result: &Result<RunResult, RunError>,
        status: RunStatus,
        (started_at_micros, finished_at_micros): (i64, i64),
        stats: &RunStats,
        error_opt: Option<String>,
    ) -> JobRunEvent {
        let done_opt = result.as_ref().ok();
        JobRunEvent {
            job: self.name().to_string(),
            window_start_micros: self.request.window_start_micros,
            window_end_micros: self.window_end_micros,
            revision: i32::try_from(self.request.revision).unwrap_or(i32::MAX),
            attempt: i32::try_from(self.request.attempt).unwrap_or(i32::MAX),
            status,
            started_at_micros,
            finished_at_micros,
            duration_ms: (finished_at_micros - started_at_micros) / 1000,
            rows_read: stats.rows_read as i64,
            bytes_read: stats.bytes_read as i64,
            files_read: stats.files_read as i64,
            rows_written: stats.rows_written as i64,
            bytes_written: stats.bytes_written as i64,
            result_path_opt: done_opt.map(|done| done.result_path.clone()),
            error_opt,
            executor: self.context.instance_id.clone(),
            input_versions_opt: done_opt.and_then(|done| serde_json::to_string(&done.input_versions).ok()),
            result_version_opt: done_opt.map(|done| done.result_version),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use sluice_clock::{Clock, FixedClock};

    use super::*;

    const START: i64 = 1_796_083_200_000_000;

    #[test]
    fn only_retryable_errors_are_retried_and_only_while_attempts_remain() {
        use ErrorClass::{Fatal, Poison, Retryable};

        let cases = [
            (Ok(()), 1, 3, AttemptEnd::Succeeded, "success"),
            (
                Err(Retryable),
                1,
                3,
                AttemptEnd::Retry { backoff: Duration::from_millis(200) },
                "first of three",
            ),
            (
                Err(Retryable),
                2,
                3,
                AttemptEnd::Retry { backoff: Duration::from_millis(400) },
                "second of three",
            ),
            (Err(Retryable), 3, 3, AttemptEnd::Failed, "the last attempt"),
            (Err(Retryable), 1, 1, AttemptEnd::Failed, "retries: 0"),
            (Err(Poison), 1, 3, AttemptEnd::Failed, "poison fails the window at once"),
            (Err(Fatal), 1, 3, AttemptEnd::Abandoned, "fatal leaves the window to the next process"),
            (Err(Fatal), 3, 3, AttemptEnd::Abandoned, "even on the last attempt"),
        ];
        for (result, attempt, max_attempts, expected, case) in cases {
            assert_eq!(AttemptEnd::decide(result, attempt, max_attempts, 200), expected, "{case}");
        }
        let statuses = [
            (AttemptEnd::Succeeded, RunStatus::Succeeded),
            (AttemptEnd::Failed, RunStatus::Failed),
            (AttemptEnd::Retry { backoff: Duration::ZERO }, RunStatus::Retrying),
            (AttemptEnd::Abandoned, RunStatus::Retrying),
        ];
        for (end, status) in statuses {
            assert_eq!(end.run_status(), status, "{end:?}");
        }
    }

    #[test]
    fn backoff_doubles_per_attempt_up_to_a_bound_and_never_overflows() {
        assert_eq!(backoff(10_000, 1), Duration::from_secs(10));
        assert_eq!(backoff(10_000, 2), Duration::from_secs(20));
        assert_eq!(backoff(10_000, 4), Duration::from_secs(80));
        assert_eq!(backoff(1, 11), Duration::from_millis(1024));
        assert_eq!(backoff(1, 40), Duration::from_millis(1024), "doubling stops at 2^10");
        assert_eq!(backoff(1, 0), Duration::from_millis(1), "attempt 0 counts as the first");
        assert_eq!(backoff(u64::MAX, 3), Duration::from_millis(u64::MAX));
    }

    #[test]
    fn a_claim_lasts_the_timeout_and_the_grace_from_the_clock_and_the_job_gets_no_more_than_the_maximum() {
        let section = ExecutorSection {
            default_timeout_ms: 600_000,
            max_timeout_ms: 3_000,
            lease_grace_ms: 2_000,
            default_max_attempts: 3,
            ..ExecutorSection::default()
        };
        let definition = |headers: &str| {
            JobDefinition::parse(&format!("-- name: job\n-- window: 1h\n{headers}SELECT 1"), None).unwrap()
        };
        let clock = FixedClock::at(START);

        let default_job = definition("");
        let bounds = AttemptBounds::of(&default_job, &section);
        assert_eq!(bounds.max_attempts, 3);
        assert_eq!(bounds.timeout_micros, 3_000_000, "the default is capped by the maximum");
        assert_eq!(bounds.lease_until(clock.now_micros()), START + 5_000_000);

        let own = definition("-- timeout: 1s\n-- retries: 0\n");
        let bounds = AttemptBounds::of(&own, &section);
        assert_eq!((bounds.max_attempts, bounds.timeout_micros), (1, 1_000_000));
        clock.advance(Duration::from_secs(60));
        assert_eq!(bounds.lease_until(clock.now_micros()), START + 60_000_000 + 3_000_000);
        assert_eq!(bounds.lease_until(i64::MAX - 1), i64::MAX, "saturates");
    }
}
