//! The executor's loop: reads job definitions from the jobs topic (its consumer group splits
//! them between replicas by partition; definitions.rs keeps the jobs), finds each job's due
//! windows every tick, and starts their attempts (attempt.rs) in the run slots, fairly between
//! jobs. Attempts run as tracked tasks; their reports update the jobs' window state here.
//!
//! The file passes 500 lines only with its tests.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use sluice_clock::{Clock, format_micros};
use sluice_errors::Chain;
use sluice_query::{Catalog, Snapshot};
use sluice_shutdown::CancellationToken;

use crate::attempt::{AttemptReport, AttemptRequest};
use crate::catch_up;
use crate::config::ExecutorConfig;
use crate::context::ExecutorContext;
use crate::definitions::{Definition, ScheduledJob, drop_unassigned, handle_definition};
use crate::job_auth::JobAuth;
use crate::metrics::ExecutorMetrics;
use crate::publisher::EventPublisher;
use crate::run_slots::{LostAttempt, RunSlots};
use crate::runs::{BackfillRequest, OutcomeStatus, RunError, RunRuntime, load_backfills};
use crate::validation_markers::ValidationMarkers;
use crate::window_step::{self, Replica, Restatement};

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("failed to create the Kafka {role}")]
    Client {
        role: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("failed to start the threads that run windows")]
    Runtime(#[source] std::io::Error),
    #[error("the Kafka {role} failed for good: {reason}")]
    Fatal { role: &'static str, reason: String },
    #[error("failed to prepare the state directory {path} (executor.state_dir)")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a run of job '{job}' found the executor unable to go on")]
    RunFatal {
        job: String,
        #[source]
        source: RunError,
    },
}

pub use crate::validation_markers::state_dir;

/// The loop with its clients created, not yet running. (rdkafka's consumer has no `Debug`.)
pub(crate) struct Scheduler {
    context: Arc<ExecutorContext>,
    consumer: StreamConsumer,
    jobs_topic: String,
    shutdown: CancellationToken,
}

impl Scheduler {
    /// Creates the Kafka clients, the run threads and the state directory; time is read from
    /// `clock` for every decision.
    pub(crate) fn new(
        config: ExecutorConfig,
        catalog: Catalog,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Result<Self, SchedulerError> {
        let instance_id = if config.executor.instance_id.is_empty() {
            format!("executor-{}", uuid::Uuid::new_v4().simple())
        } else {
            config.executor.instance_id.clone()
        };
        let metrics = Arc::new(ExecutorMetrics::new());
        let events =
            EventPublisher::new(&config.kafka, &instance_id, Arc::clone(&metrics), Arc::clone(&clock))
                .map_err(|source| SchedulerError::Client { role: "producer", source })?;
        let mut consumer_config = config.kafka.consumer_config(&config.executor.group_id);
        // Offsets are never committed: a replica that gets a partition reads every definition in
        // it, and the latest value of each key is the job.
        config.kafka.set_defaults(&mut consumer_config, [("auto.offset.reset", "earliest")]);
        let consumer: StreamConsumer =
            consumer_config.create().map_err(|source| SchedulerError::Client { role: "consumer", source })?;
        let jobs_topic = config.kafka.topic_names().jobs();
        consumer
            .subscribe(&[&jobs_topic])
            .map_err(|source| SchedulerError::Client { role: "consumer", source })?;

        let threads = match config.query.target_partitions {
            0 => std::thread::available_parallelism().map_or(2, usize::from),
            configured => configured,
        };
        let run_runtime = RunRuntime::new(threads).map_err(SchedulerError::Runtime)?;
        let state_dir = state_dir(&config);
        let markers = ValidationMarkers::open(&state_dir)
            .map_err(|source| SchedulerError::StateDir { path: state_dir.clone(), source })?;
        let context = Arc::new(ExecutorContext {
            config,
            catalog,
            run_runtime,
            markers,
            events,
            metrics,
            clock,
            instance_id,
            incarnation: uuid::Uuid::new_v4().to_string(),
            auth: JobAuth::default(),
        });
        Ok(Self { context, consumer, jobs_topic, shutdown })
    }

    /// Runs until `shutdown` is cancelled (or a failure stops it), then lets running attempts
    /// finish within the grace period.
    pub(crate) async fn run(self) -> Result<(), SchedulerError> {
        let Self { context, consumer, jobs_topic, shutdown } = self;
        let section = &context.config.executor;
        tracing::info!(instance = %context.instance_id, topic = %jobs_topic, "executor started");
        let signing = &context.config.signing;
        context.metrics.start_refusal_counter(signing.enforce);
        if !signing.enforce {
            tracing::warn!(
                "signing.enforce is off: job requests run without a trusted signature (refusals are only audited)"
            );
        } else if signing.trusted_keys.is_empty() {
            tracing::warn!("signing.trusted_keys is empty: every job request will be refused");
        }
        let mut attempts = RunSlots::new(section.max_concurrent_runs);
        let mut jobs: BTreeMap<String, ScheduledJob> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(section.tick_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let restate_every = Duration::from_millis(section.restate_check_interval_ms);
        let mut last_restate_check = Instant::now();

        let mut stop_result = Ok(());
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                message = consumer.recv() => match message {
                    Ok(message) => {
                        let definition = Definition::read(&message, context.clock.as_ref());
                        handle_definition(&context, &mut jobs, definition).await;
                    }
                    Err(error) => {
                        // A consumer in a fatal state (fenced static membership) never reads again:
                        // stop with an error so the process exits and is restarted, not idles.
                        if let Some((code, reason)) = consumer.client().fatal_error() {
                            tracing::error!(?code, %reason, "the jobs consumer failed for good");
                            stop_result = Err(SchedulerError::Fatal { role: "consumer", reason: format!("{code:?}: {reason}") });
                            break;
                        }
                        tracing::warn!(error = %Chain(&error), "jobs topic read failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                Some(done) = attempts.next_done() => match done {
                    Ok(report) => {
                        if let Some(error) = apply_report(&mut jobs, report) {
                            stop_result = Err(error);
                            break;
                        }
                    }
                    Err(lost) => apply_lost_attempt(&context, &mut jobs, lost),
                },
                _ = tick.tick() => {
                    drop_unassigned(&consumer, &jobs_topic, &mut jobs);
                    let check_restatement = last_restate_check.elapsed() >= restate_every;
                    if check_restatement {
                        last_restate_check = Instant::now();
                    }
                    schedule(&context, &mut jobs, &mut attempts, check_restatement).await;
                }
            }
        }

        if stop_result.is_err() {
            // Whatever stopped the loop stops the rest of the service too.
            shutdown.cancel();
        }
        // Let running attempts finish; what does not finish is taken over when its lease ends.
        attempts.wind_down(Duration::from_millis(context.config.shutdown.grace_period_ms)).await;
        context.events.flush(Duration::from_secs(5));
        tracing::info!("executor stopped");
        stop_result
    }
}

/// A finished attempt's state is the window's now; a fatal failure stops the loop.
fn apply_report(jobs: &mut BTreeMap<String, ScheduledJob>, report: AttemptReport) -> Option<SchedulerError> {
    let AttemptReport {
        job,
        definition_offset,
        window_start_micros,
        state_opt,
        retry_at_micros_opt,
        fatal_opt,
    } = report;
    if let Some(scheduled) = jobs.get_mut(&job) {
        scheduled.running.remove(&window_start_micros);
        if scheduled.offset != definition_offset {
            // The job was replaced while this ran; the new definition loaded the records afresh,
            // and this report's state is just as fresh, so it still applies.
            tracing::debug!(job = %job, "run of a replaced definition finished");
        }
        if let Some(state) = state_opt {
            scheduled.windows.insert(window_start_micros, state);
        }
        if let Some(retry_at_micros) = retry_at_micros_opt {
            scheduled.retry_at_micros.insert(window_start_micros, retry_at_micros);
        }
    }
    let error = fatal_opt?;
    tracing::error!(
        job = %job,
        window = %format_micros(window_start_micros),
        error = %Chain(&error),
        "a window run found the executor unable to go on; stopping"
    );
    Some(SchedulerError::RunFatal { job, source: error })
}

/// The window is free to run again after a backoff; its claim, still leased to this process,
/// keeps it from starting before the lease ends.
fn apply_lost_attempt(
    context: &ExecutorContext,
    jobs: &mut BTreeMap<String, ScheduledJob>,
    lost: LostAttempt,
) {
    tracing::error!(
        job = %lost.job,
        window = %format_micros(lost.window_start_micros),
        error = %Chain(&lost.error),
        "a window attempt ended without a report; the window will run again"
    );
    let Some(scheduled) = jobs.get_mut(&lost.job) else { return };
    scheduled.running.remove(&lost.window_start_micros);
    let backoff_micros = sluice_clock::millis_to_micros(context.config.executor.retry_backoff_ms);
    let retry_at_micros = context.clock.now_micros().saturating_add(backoff_micros);
    scheduled.retry_at_micros.insert(lost.window_start_micros, retry_at_micros);
}

/// A window to start now.
#[derive(Debug)]
struct Due {
    job: String,
    window_start_micros: i64,
    revision: u32,
    attempt: u32,
}

async fn schedule(
    context: &Arc<ExecutorContext>,
    jobs: &mut BTreeMap<String, ScheduledJob>,
    attempts: &mut RunSlots,
    check_restatement: bool,
) {
    let now = context.clock.now_micros();
    let mut watermarks: HashMap<String, Option<i64>> = HashMap::new();
    let snapshot_opt = if check_restatement && jobs.values().any(|job| job.job.definition.restate) {
        context.catalog.snapshot().await.ok()
    } else {
        None
    };
    let mut due: Vec<Due> = Vec::new();
    for (name, scheduled) in jobs.iter_mut() {
        match load_backfills(context.lake(), name).await {
            Ok(backfills) => scheduled.backfills = backfills,
            Err(error) => {
                tracing::warn!(job = %name, error = %Chain(&error), "failed to read backfill requests")
            }
        }
        let job = Arc::clone(&scheduled.job);
        let definition = &job.definition;
        scheduled.judge_backfills(context, name).await;
        // Complete through: the lowest watermark of the streams read, or the clock for jobs
        // that read only reference tables.
        let mut complete_through = now;
        for stream in &job.streams {
            let watermark = match watermarks.get(stream) {
                Some(watermark) => *watermark,
                None => {
                    let watermark = context
                        .lake()
                        .published_watermark(stream)
                        .await
                        .ok()
                        .flatten()
                        .map(|watermark| watermark.watermark_micros);
                    watermarks.insert(stream.clone(), watermark);
                    watermark
                }
            };
            complete_through = complete_through.min(watermark.unwrap_or(i64::MIN));
        }
        let backfills = scheduled.backfills_to_run();
        let ranges =
            catch_up::ranges_to_scan(scheduled.first_window_micros, definition.window_micros, &backfills);
        let backfills: Vec<BackfillRequest> = backfills.into_iter().cloned().collect();
        let scan = catch_up::WindowScan {
            window_micros: definition.window_micros,
            lateness_micros: definition.lateness_micros,
            complete_through_micros: complete_through,
            now_micros: now,
            max_due: context.config.executor.max_windows_per_job_per_tick,
        };
        let found =
            scan.due_windows(&ranges, definition.schedule_opt.as_ref(), |window_start, window_end| {
                let window = (window_start, window_end);
                next_step(context.replica(), scheduled, &backfills, window, now, snapshot_opt.as_ref())
            });
        for (window_start_micros, (revision, attempt)) in found {
            due.push(Due { job: name.clone(), window_start_micros, revision, attempt });
        }
        let newest_complete_opt = scheduled
            .windows
            .range(scheduled.first_window_micros..)
            .rev()
            .find(|(_, state)| {
                state.outcome_opt.as_ref().is_some_and(|outcome| outcome.status == OutcomeStatus::Succeeded)
            })
            .map(|(start, _)| start.saturating_add(definition.window_micros));
        if let Some(newest) = newest_complete_opt {
            context.metrics.record_freshness(name, now.saturating_sub(newest) / 1_000_000);
        }
    }
    context.metrics.set_due_windows(due.len());
    start_fairly(context, jobs, attempts, due);
}

/// Oldest windows first within a job. Between jobs the slots are shared fairly: the next slot
/// goes to the job with the fewest runs going, and among those to the one that started a run
/// least recently. A job with a long backlog, or whose windows run to their timeout, then
/// cannot keep every slot while other jobs' windows wait: each slot it frees goes to a waiting
/// job first.
fn start_fairly(
    context: &Arc<ExecutorContext>,
    jobs: &mut BTreeMap<String, ScheduledJob>,
    attempts: &mut RunSlots,
    mut due: Vec<Due>,
) {
    due.sort_by_key(|item| item.window_start_micros);
    let mut queues: BTreeMap<String, VecDeque<Due>> = BTreeMap::new();
    for item in due {
        queues.entry(item.job.clone()).or_default().push_back(item);
    }
    while attempts.has_free_slot() {
        let next_opt = queues
            .iter()
            .filter_map(|(name, queue)| {
                let scheduled = jobs.get(name)?;
                let oldest = queue.front()?.window_start_micros;
                Some((scheduled.running.len(), scheduled.last_started_opt, oldest, name.clone()))
            })
            .min();
        let Some((_, _, _, name)) = next_opt else { break };
        let Some(item) = queues.get_mut(&name).and_then(VecDeque::pop_front) else { break };
        let Some(scheduled) = jobs.get_mut(&item.job) else { continue };
        let request = AttemptRequest {
            job: Arc::clone(&scheduled.job),
            definition_offset: scheduled.offset,
            window_start_micros: item.window_start_micros,
            revision: item.revision,
            attempt: item.attempt,
        };
        if !attempts.start(context, request) {
            break;
        }
        scheduled.running.insert(item.window_start_micros);
        scheduled.last_started_opt = Some(Instant::now());
    }
}

/// The revision and attempt to start for a window at `now_micros`, if any: nothing while it
/// runs here or waits out a retry backoff, else what its records say (window_step.rs).
fn next_step(
    replica: Replica<'_>,
    scheduled: &mut ScheduledJob,
    backfills: &[BackfillRequest],
    (window_start, window_end): (i64, i64),
    now_micros: i64,
    snapshot_opt: Option<&Snapshot>,
) -> Option<(u32, u32)> {
    if scheduled.running.contains(&window_start) {
        return None;
    }
    if let Some(retry_at_micros) = scheduled.retry_at_micros.get(&window_start) {
        if now_micros < *retry_at_micros {
            return None;
        }
        scheduled.retry_at_micros.remove(&window_start);
    }
    let streams = &scheduled.job.streams;
    let restatement_opt =
        snapshot_opt.filter(|_| scheduled.job.definition.restate).map(|snapshot| Restatement {
            streams,
            versions_now: snapshot.versions(),
            rows_now: || snapshot.rows_overlapping(streams, window_start, window_end),
        });
    window_step::next_step(
        scheduled.windows.get(&window_start),
        (window_start, window_end),
        backfills,
        restatement_opt,
        replica,
        now_micros,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use std::collections::BTreeSet;

    use sluice_clock::FixedClock;
    use sluice_jobs::job::JobDefinition;
    use sluice_query::ValidatedJob;

    use super::*;
    use crate::runs::{AttemptRecord, WindowState};

    use crate::window_step::test_window::{HOUR, ME, START, WINDOW};

    fn jobs() -> BTreeMap<String, ScheduledJob> {
        let definition = JobDefinition::parse("-- name: hourly\n-- window: 1h\nSELECT 1", None).unwrap();
        let scheduled = ScheduledJob {
            job: Arc::new(ValidatedJob { definition, streams: Vec::new() }),
            partition: 0,
            offset: 7,
            first_window_micros: START,
            windows: BTreeMap::new(),
            backfills: Vec::new(),
            running: BTreeSet::from([START]),
            retry_at_micros: HashMap::new(),
            last_started_opt: None,
            refused_backfills: BTreeSet::new(),
            authorized_backfills: BTreeSet::new(),
        };
        BTreeMap::from([("hourly".to_string(), scheduled)])
    }

    /// What attempt 1 of the window reports after a retryable failure at `now_micros`.
    fn retrying(now_micros: i64, retry_at_micros: i64, fatal_opt: Option<RunError>) -> AttemptReport {
        let claim = AttemptRecord {
            job: "hourly".into(),
            window_start_micros: START,
            window_end_micros: START + HOUR,
            revision: 0,
            attempt: 1,
            owner: ME.instance_id.into(),
            incarnation: ME.incarnation.into(),
            started_at_micros: now_micros,
            lease_until_micros: 0,
        };
        AttemptReport {
            job: "hourly".into(),
            definition_offset: 7,
            window_start_micros: START,
            state_opt: Some(WindowState { revision: 0, latest_attempt_opt: Some(claim), outcome_opt: None }),
            retry_at_micros_opt: Some(retry_at_micros),
            fatal_opt,
        }
    }

    #[test]
    fn a_retried_window_starts_its_next_attempt_once_the_clock_passes_its_backoff() {
        let clock = FixedClock::at(START + 2 * HOUR);
        let mut jobs = jobs();
        let backoff = Duration::from_secs(10);
        let retry_at = clock.now_micros() + i64::try_from(backoff.as_micros()).unwrap();
        assert!(apply_report(&mut jobs, retrying(clock.now_micros(), retry_at, None)).is_none());
        let scheduled = jobs.get_mut("hourly").unwrap();
        assert!(scheduled.running.is_empty(), "the attempt is over");

        assert_eq!(next_step(ME, scheduled, &[], WINDOW, clock.now_micros(), None), None, "backing off");
        clock.advance(backoff - Duration::from_micros(1));
        assert_eq!(
            next_step(ME, scheduled, &[], WINDOW, clock.now_micros(), None),
            None,
            "a microsecond early"
        );
        clock.advance(Duration::from_micros(1));
        assert_eq!(next_step(ME, scheduled, &[], WINDOW, clock.now_micros(), None), Some((0, 2)));
        assert!(scheduled.retry_at_micros.is_empty(), "a backoff is waited out once");

        scheduled.running.insert(START);
        assert_eq!(next_step(ME, scheduled, &[], WINDOW, clock.now_micros(), None), None, "running here");
    }

    #[test]
    fn a_fatal_report_applies_its_state_and_stops_the_loop_with_its_cause() {
        let clock = FixedClock::at(START + 2 * HOUR);
        let mut jobs = jobs();
        let fatal = RunError::Stopped("task 3 was cancelled".into());
        let error =
            apply_report(&mut jobs, retrying(clock.now_micros(), clock.now_micros(), Some(fatal))).unwrap();
        assert_eq!(
            sluice_errors::chain_text(&error),
            "a run of job 'hourly' found the executor unable to go on: the run was stopped: task 3 was cancelled"
        );
        let scheduled = &jobs["hourly"];
        assert!(scheduled.running.is_empty());
        assert_eq!(scheduled.windows[&START].latest_attempt_opt.as_ref().map(|claim| claim.attempt), Some(1));
    }

    #[test]
    fn a_report_for_a_job_no_longer_scheduled_here_changes_nothing() {
        let mut jobs = BTreeMap::new();
        assert!(apply_report(&mut jobs, retrying(START, START, None)).is_none());
        assert!(jobs.is_empty());
    }
}
