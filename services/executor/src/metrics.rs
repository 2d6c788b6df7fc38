//! Every metric the executor emits. Labels are a small fixed set (`job_name`, `status`); recorded
//! once per attempt or per tick, never per row. The names are what deploy/otel's dashboards and
//! alerts query (integration-tests/tests/observability.rs checks each is emitted).

use std::time::Duration;

use opentelemetry::KeyValue;
use sluice_jobs::audit::Verdict;
use sluice_jobs::events::RunStatus;
use sluice_jobs::records::RunStats;
use sluice_jobs::signing::{Refusal, SignedAction};
use sluice_telemetry::{Counter, Gauge, Histogram};

#[derive(Debug)]
pub(crate) struct ExecutorMetrics {
    runs: Counter<u64>,
    run_duration: Histogram<f64>,
    rows_read: Counter<u64>,
    rows_written: Counter<u64>,
    freshness: Gauge<i64>,
    jobs: Gauge<u64>,
    due_windows: Gauge<u64>,
    producer_replacements: Counter<u64>,
    unauthorized_requests: Counter<u64>,
}

/// The `status` label of `sluice_executor_runs`: what the alert rules match on.
fn run_status_label(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
        RunStatus::Retrying => "retrying",
    }
}

impl ExecutorMetrics {
    pub(crate) fn new() -> Self {
        let meter = sluice_telemetry::meter("sluice-executor");
        Self {
            runs: meter
                .u64_counter("sluice_executor_runs")
                .with_unit("{run}")
                .with_description("Run attempts by job and status (succeeded, failed, retrying)")
                .build(),
            run_duration: meter
                .f64_histogram("sluice_executor_run_duration_seconds")
                .with_unit("s")
                .with_boundaries(sluice_telemetry::DURATION_BUCKETS_SECONDS.to_vec())
                .build(),
            rows_read: meter.u64_counter("sluice_executor_rows_read").with_unit("{row}").build(),
            rows_written: meter.u64_counter("sluice_executor_rows_written").with_unit("{row}").build(),
            freshness: meter
                .i64_gauge("sluice_executor_freshness_seconds")
                .with_unit("s")
                .with_description("Now minus the end of the newest window the job completed")
                .build(),
            jobs: meter.u64_gauge("sluice_executor_jobs").with_unit("{job}").build(),
            due_windows: meter
                .u64_gauge("sluice_executor_due_windows")
                .with_unit("{window}")
                .with_description("Windows the last tick found due, across jobs (each job at most max_windows_per_job_per_tick)")
                .build(),
            producer_replacements: meter
                .u64_counter("sluice_executor_producer_replacements")
                .with_unit("{producer}")
                .with_description("Event producers replaced after a fatal Kafka error")
                .build(),
            unauthorized_requests: meter
                .u64_counter("sluice_executor_unauthorized_requests")
                .with_unit("{request}")
                .with_description("Job requests no trusted key authorized, by action, reason and verdict (refused; accepted only with signing.enforce off)")
                .build(),
        }
    }

    /// Exports a newly accepted job's run counters at zero: alert rules on `increase()` then see
    /// its first failure instead of a series that appears already at one.
    pub(crate) fn start_job_counters(&self, job: &str) {
        for status in [RunStatus::Succeeded, RunStatus::Failed, RunStatus::Retrying] {
            self.runs.add(0, &[job_label(job), KeyValue::new("status", run_status_label(status))]);
        }
    }

    /// One attempt that ran: counted by its status, its time and rows by job.
    pub(crate) fn record_attempt(&self, job: &str, status: RunStatus, elapsed: Duration, stats: &RunStats) {
        let job_only = [job_label(job)];
        self.runs.add(1, &[job_label(job), KeyValue::new("status", run_status_label(status))]);
        self.run_duration.record(elapsed.as_secs_f64(), &job_only);
        self.rows_read.add(stats.rows_read, &job_only);
        self.rows_written.add(stats.rows_written, &job_only);
    }

    /// `behind_seconds` is negative when the clock is behind the data's event times.
    pub(crate) fn record_freshness(&self, job: &str, behind_seconds: i64) {
        self.freshness.record(behind_seconds, &[job_label(job)]);
    }

    pub(crate) fn set_jobs(&self, num_jobs: usize) {
        self.jobs.record(num_jobs as u64, &[]);
    }

    pub(crate) fn set_due_windows(&self, num_windows: usize) {
        self.due_windows.record(num_windows as u64, &[]);
    }

    /// A request whose signature did not pass; `reason` is `Refusal::kind`.
    pub(crate) fn record_refused_request(
        &self,
        action: SignedAction,
        reason: &'static str,
        verdict: Verdict,
    ) {
        self.unauthorized_requests.add(
            1,
            &[
                KeyValue::new("action", action.as_str()),
                KeyValue::new("reason", reason),
                KeyValue::new("verdict", verdict.as_str()),
            ],
        );
    }

    /// Exports the refusal counter at zero for every action and reason with the verdict this
    /// replica gives, so that an alert on `increase()` sees the first refusal of each.
    pub(crate) fn start_refusal_counter(&self, enforced: bool) {
        let verdict = if enforced { Verdict::Refused } else { Verdict::Accepted };
        for action in SignedAction::ALL {
            for reason in Refusal::KINDS {
                self.unauthorized_requests.add(
                    0,
                    &[
                        KeyValue::new("action", action.as_str()),
                        KeyValue::new("reason", reason),
                        KeyValue::new("verdict", verdict.as_str()),
                    ],
                );
            }
        }
    }

    pub(crate) fn record_producer_replaced(&self) {
        self.producer_replacements.add(1, &[]);
    }
}

fn job_label(job: &str) -> KeyValue {
    KeyValue::new("job_name", job.to_string())
}
