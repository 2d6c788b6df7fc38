//! The executor service: reads job definitions from the jobs topic (its consumer group splits
//! them between replicas by partition), validates them, and runs each complete window once.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sluice_errors::Chain;
use sluice_lake::Lake;
use sluice_query::{Catalog, ValidatedJob};
use sluice_shutdown::CancellationToken;
use sluice_telemetry::{Counter, Gauge, Histogram};
use tokio::sync::{Semaphore, mpsc};

use crate::catch_up;
use crate::config::ExecutorConfig;
use crate::events::{JobRunEvent, JobStatusEvent, JobStatusKind, RunStatus};
use crate::job::format_micros;
use crate::runs::{
    AttemptRecord, BackfillRequest, OutcomeRecord, OutcomeStatus, RunRuntime, WindowRun, WindowState, claim,
    load_backfills, load_windows, record_outcome,
};
use crate::validate_job;
use crate::validation_markers::ValidationMarkers;
use crate::window_step::{self, Replica, Restatement};

const EVENT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

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
}

/// `executor.state_dir`, or a directory of the group under the temporary directory; a
/// configured instance id gets its own, so replicas on one machine never read each other's.
pub fn state_dir(config: &ExecutorConfig) -> std::path::PathBuf {
    let section = &config.executor;
    let base = if section.state_dir.is_empty() {
        std::env::temp_dir().join("sluice-executor").join(&section.group_id)
    } else {
        std::path::PathBuf::from(&section.state_dir)
    };
    if section.instance_id.is_empty() { base } else { base.join(&section.instance_id) }
}

/// A job this replica schedules.
#[derive(Debug)]
struct ScheduledJob {
    job: Arc<ValidatedJob>,
    partition: i32,
    offset: i64,
    first_window_micros: i64,
    windows: BTreeMap<i64, WindowState>,
    backfills: Vec<BackfillRequest>,
    /// Windows running on this replica, and windows waiting out a retry backoff.
    running: BTreeSet<i64>,
    retry_at: HashMap<i64, Instant>,
    /// When this replica last started one of the job's windows: slots go to the job that waited
    /// longest among those with as few runs going.
    last_started_opt: Option<Instant>,
    /// Backfill requests refused (and said so on the status topic) by this process.
    refused_backfills: BTreeSet<(i64, i64, i64)>,
}

fn backfill_id(request: &BackfillRequest) -> (i64, i64, i64) {
    (request.from_micros, request.to_micros, request.requested_at_micros)
}

/// Backfill requests with more windows than a backlog may hold are left alone, and the refusal
/// is published once per process.
async fn refuse_oversized_backfills(shared: &Shared, name: &str, scheduled: &mut ScheduledJob) {
    let window_micros = scheduled.job.definition.window_micros;
    let max_backlog_windows = shared.config.executor.max_backlog_windows;
    for request in &scheduled.backfills {
        let id = backfill_id(request);
        if scheduled.refused_backfills.contains(&id) {
            continue;
        }
        if let Some(reason) = catch_up::backfill_refusal(request, window_micros, max_backlog_windows) {
            tracing::warn!(job = %name, %reason, "backfill refused");
            scheduled.refused_backfills.insert(id);
            shared
                .publish_status(shared.status(
                    name,
                    JobStatusKind::BackfillRefused,
                    reason,
                    scheduled.partition,
                    scheduled.offset,
                ))
                .await;
        }
    }
}

/// What a finished run task reports back to the loop.
#[derive(Debug)]
struct RunReport {
    job: String,
    offset: i64,
    window_start_micros: i64,
    state_opt: Option<WindowState>,
    retry_after_opt: Option<Duration>,
}

#[derive(Debug)]
struct ExecutorMetrics {
    runs: Counter<u64>,
    run_duration: Histogram<f64>,
    rows_read: Counter<u64>,
    rows_written: Counter<u64>,
    freshness: Gauge<i64>,
    jobs: Gauge<u64>,
    due_windows: Gauge<u64>,
    producer_replacements: Counter<u64>,
}

impl ExecutorMetrics {
    fn new() -> Self {
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
        }
    }
}

/// Shared by the loop and its run tasks.
struct Shared {
    config: ExecutorConfig,
    catalog: Catalog,
    /// Where window runs execute, apart from this loop's runtime.
    run_runtime: RunRuntime,
    markers: ValidationMarkers,
    /// Status and run events. Replaced when librdkafka reports a fatal error (an idempotent
    /// producer fenced after a broker stall fails every later send): the executor would run on
    /// and say nothing more.
    producer: std::sync::RwLock<FutureProducer>,
    instance_id: String,
    incarnation: String,
    metrics: ExecutorMetrics,
}

impl Shared {
    fn lake(&self) -> &Lake {
        self.catalog.lake()
    }

    fn producer(&self) -> FutureProducer {
        match self.producer.read() {
            Ok(producer) => producer.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    async fn publish(&self, topic: &str, key: &str, payload: &[u8]) {
        // One more try after a replacement: the event that met the fatal error is not lost.
        for try_number in 1..=2 {
            let producer = self.producer();
            let record = FutureRecord::to(topic).key(key).payload(payload);
            let Err((error, _)) = producer.send(record, EVENT_DELIVERY_TIMEOUT).await else { return };
            match broken_for_good(&producer, &error) {
                Some((code, reason)) if try_number == 1 => self.replace_producer(&producer, code, &reason),
                _ => {
                    tracing::warn!(%topic, %key, error = %Chain(&error), "failed to publish an executor event");
                    return;
                }
            }
        }
    }

    /// Swaps in a new producer for `failed`, unless a concurrent sender already did.
    fn replace_producer(
        &self,
        failed: &FutureProducer,
        code: rdkafka::types::RDKafkaErrorCode,
        reason: &str,
    ) {
        let mut current = match self.producer.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.client().native_ptr() != failed.client().native_ptr() {
            return;
        }
        match self.config.kafka.producer_config().create::<FutureProducer>() {
            Ok(producer) => {
                tracing::error!(?code, %reason, "the event producer failed for good; replaced it with a new one");
                *current = producer;
                self.metrics.producer_replacements.add(1, &[]);
            }
            Err(error) => {
                tracing::error!(?code, %reason, error = %Chain(&error), "the event producer failed for good and no new one could be created");
            }
        }
    }

    async fn publish_status(&self, event: JobStatusEvent) {
        match serde_json::to_vec(&event) {
            Ok(payload) => {
                let topic = self.config.kafka.topic_names().job_status();
                self.publish(&topic, &event.job, &payload).await;
            }
            Err(error) => tracing::warn!(error = %Chain(&error), "failed to encode a status event"),
        }
    }

    fn status(
        &self,
        job: &str,
        status: JobStatusKind,
        reason: String,
        partition: i32,
        offset: i64,
    ) -> JobStatusEvent {
        JobStatusEvent {
            job: job.to_string(),
            status,
            reason,
            definition_partition: partition,
            definition_offset: offset,
            window_start_opt: None,
            at: format_micros(now_micros()),
            executor: self.instance_id.clone(),
        }
    }
}

/// Whether the producer will fail every later send: a fatal error, or a refusal of its producer
/// state (`sluice_kafka::is_producer_state_lost`; seen on Tansu after a 20 s stall made events
/// time out in flight: every later event got `ProducerFenced`).
fn broken_for_good(
    producer: &FutureProducer,
    error: &rdkafka::error::KafkaError,
) -> Option<(rdkafka::types::RDKafkaErrorCode, String)> {
    if let Some(fatal) = producer.client().fatal_error() {
        return Some(fatal);
    }
    let code = error.rdkafka_error_code()?;
    sluice_kafka::is_producer_state_lost(code).then(|| (code, error.to_string()))
}

pub use sluice_clock::now_micros;

/// Runs until `shutdown` is cancelled, then lets running attempts finish within the grace period.
pub async fn run(
    config: ExecutorConfig,
    catalog: Catalog,
    shutdown: CancellationToken,
) -> Result<(), SchedulerError> {
    let instance_id = if config.executor.instance_id.is_empty() {
        format!("executor-{}", uuid::Uuid::new_v4().simple())
    } else {
        config.executor.instance_id.clone()
    };
    let producer: FutureProducer = config
        .kafka
        .producer_config()
        .create()
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
    let shared = Arc::new(Shared {
        config,
        catalog,
        run_runtime,
        markers,
        producer: std::sync::RwLock::new(producer),
        instance_id,
        incarnation: uuid::Uuid::new_v4().to_string(),
        metrics: ExecutorMetrics::new(),
    });
    tracing::info!(instance = %shared.instance_id, topic = %jobs_topic, "executor started");
    let semaphore = Arc::new(Semaphore::new(shared.config.executor.max_concurrent_runs));
    let (report_tx, mut report_rx) = mpsc::unbounded_channel::<RunReport>();
    let mut jobs: BTreeMap<String, ScheduledJob> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(shared.config.executor.tick_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let restate_every = Duration::from_millis(shared.config.executor.restate_check_interval_ms);
    let mut last_restate_check = Instant::now();

    let mut shutdown_result = Ok(());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            message = consumer.recv() => match message {
                Ok(message) => {
                    let key = message.key().map(|key| String::from_utf8_lossy(key).into_owned());
                    let payload = message.payload().map(|payload| String::from_utf8_lossy(payload).into_owned());
                    let timestamp_micros = message.timestamp().to_millis().map_or_else(now_micros, |ms| ms * 1000);
                    handle_definition(&shared, &mut jobs, key, payload, message.partition(), message.offset(), timestamp_micros).await;
                }
                Err(error) => {
                    // A consumer in a fatal state (fenced static membership) never reads again:
                    // stop with an error so the process exits and is restarted, not idles.
                    if let Some((code, reason)) = consumer.client().fatal_error() {
                        tracing::error!(?code, %reason, "the jobs consumer failed for good");
                        shutdown_result = Err(SchedulerError::Fatal { role: "consumer", reason: format!("{code:?}: {reason}") });
                        break;
                    }
                    tracing::warn!(error = %Chain(&error), "jobs topic read failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            Some(report) = report_rx.recv() => apply_report(&mut jobs, report),
            _ = tick.tick() => {
                drop_unassigned(&consumer, &jobs_topic, &mut jobs);
                let check_restatement = last_restate_check.elapsed() >= restate_every;
                if check_restatement {
                    last_restate_check = Instant::now();
                }
                schedule(&shared, &mut jobs, &semaphore, &report_tx, check_restatement).await;
            }
        }
    }

    // Let running attempts finish; what does not finish is taken over when its lease ends.
    let grace = Duration::from_millis(shared.config.shutdown.grace_period_ms);
    let permits = u32::try_from(shared.config.executor.max_concurrent_runs).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, semaphore.acquire_many(permits)).await.is_err() {
        tracing::warn!("runs still going at the end of the grace period; their leases will expire");
    }
    let _ = shared.producer().flush(Duration::from_secs(5));
    tracing::info!("executor stopped");
    shutdown_result
}

async fn handle_definition(
    shared: &Shared,
    jobs: &mut BTreeMap<String, ScheduledJob>,
    key_opt: Option<String>,
    payload_opt: Option<String>,
    partition: i32,
    offset: i64,
    submitted_at_micros: i64,
) {
    let Some(key) = key_opt else {
        tracing::warn!(partition, offset, "job definition without a key ignored; the key is the job name");
        return;
    };
    let Some(text) = payload_opt else {
        // A deleted job's marker would refuse the same text if it came back.
        if let Err(error) = shared.markers.end(&key) {
            tracing::warn!(job = %key, error = %Chain(&error), "failed to remove a validation marker");
        }
        if jobs.remove(&key).is_some() || crate::job::validate_name(&key).is_ok() {
            tracing::info!(job = %key, "job deleted");
            shared
                .publish_status(shared.status(&key, JobStatusKind::Deleted, String::new(), partition, offset))
                .await;
        }
        return;
    };
    match validate_with_marker(shared, &key, &text).await {
        Err(reason) => {
            tracing::warn!(job = %key, %reason, "job rejected");
            // The newest definition is the job: a rejected one replaces a valid one too.
            jobs.remove(&key);
            shared
                .publish_status(shared.status(&key, JobStatusKind::Rejected, reason, partition, offset))
                .await;
        }
        Ok(job) => {
            let windows = match load_windows(shared.lake(), &key).await {
                Ok(windows) => windows,
                Err(error) => {
                    // Without its records the job cannot know what ran; it is read again
                    // when the partition is reassigned or the job resubmitted.
                    tracing::error!(job = %key, error = %Chain(&error), "failed to load run records");
                    return;
                }
            };
            let definition = &job.definition;
            let first_window_micros = definition.start_micros_opt.map_or_else(
                || definition.window_containing(submitted_at_micros),
                |start| definition.window_containing(start),
            );
            // Counted, never enumerated: windows before now that have no outcome yet.
            let now = now_micros();
            let num_settled = windows
                .range(first_window_micros..now)
                .filter(|(_, state)| state.outcome_opt.is_some())
                .count() as u64;
            let num_pending = catch_up::window_count(first_window_micros, now, definition.window_micros)
                .saturating_sub(num_settled);
            if let Some(reason) = catch_up::backlog_refusal(
                definition,
                first_window_micros,
                num_pending,
                now,
                shared.config.executor.max_backlog_windows,
            ) {
                tracing::warn!(job = %key, %reason, "job rejected");
                jobs.remove(&key);
                shared
                    .publish_status(shared.status(&key, JobStatusKind::Rejected, reason, partition, offset))
                    .await;
                shared.metrics.jobs.record(jobs.len() as u64, &[]);
                return;
            }
            tracing::info!(job = %key, streams = ?job.streams, first_window = %format_micros(first_window_micros), "job accepted");
            // Series at zero from the start: alert rules on `increase()` then see the first failure.
            for status in ["succeeded", "failed", "retrying"] {
                shared
                    .metrics
                    .runs
                    .add(0, &[KeyValue::new("job_name", key.clone()), KeyValue::new("status", status)]);
            }
            jobs.insert(
                key.clone(),
                ScheduledJob {
                    job: Arc::new(job),
                    partition,
                    offset,
                    first_window_micros,
                    windows,
                    backfills: Vec::new(),
                    running: BTreeSet::new(),
                    retry_at: HashMap::new(),
                    last_started_opt: None,
                    refused_backfills: BTreeSet::new(),
                },
            );
            shared
                .publish_status(shared.status(
                    &key,
                    JobStatusKind::Accepted,
                    String::new(),
                    partition,
                    offset,
                ))
                .await;
        }
    }
    shared.metrics.jobs.record(jobs.len() as u64, &[]);
}

/// Validates with a marker on disk meanwhile, so that a definition that kills the process
/// (or is being validated when it is killed) is refused after the restart, not validated again.
async fn validate_with_marker(shared: &Shared, key: &str, text: &str) -> Result<ValidatedJob, String> {
    if let Some(died) = shared.markers.died_validating(key, text) {
        return Err(died.reason());
    }
    if let Err(error) = shared.markers.begin(key, text) {
        tracing::warn!(job = %key, error = %Chain(&error), "failed to write a validation marker; validating without one");
    }
    let validated = validate_job(&shared.catalog, text, Some(key)).await;
    if let Err(error) = shared.markers.end(key) {
        tracing::warn!(job = %key, error = %Chain(&error), "failed to remove a validation marker");
    }
    validated
}

/// Jobs of partitions this replica no longer owns stop being scheduled here (running attempts
/// finish; their claims keep the new owner from starting them twice).
fn drop_unassigned(consumer: &StreamConsumer, topic: &str, jobs: &mut BTreeMap<String, ScheduledJob>) {
    let Ok(assignment) = consumer.assignment() else { return };
    let owned: BTreeSet<i32> = assignment
        .elements()
        .iter()
        .filter(|element| element.topic() == topic)
        .map(|element| element.partition())
        .collect();
    jobs.retain(|name, job| {
        let keep = owned.contains(&job.partition);
        if !keep {
            tracing::info!(job = %name, partition = job.partition, "job moved to another replica");
        }
        keep
    });
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
    shared: &Arc<Shared>,
    jobs: &mut BTreeMap<String, ScheduledJob>,
    semaphore: &Arc<Semaphore>,
    report_tx: &mpsc::UnboundedSender<RunReport>,
    check_restatement: bool,
) {
    let now = now_micros();
    let mut watermarks: HashMap<String, Option<i64>> = HashMap::new();
    let snapshot_opt = if check_restatement && jobs.values().any(|job| job.job.definition.restate) {
        shared.catalog.snapshot().await.ok()
    } else {
        None
    };
    let mut due: Vec<Due> = Vec::new();
    for (name, scheduled) in jobs.iter_mut() {
        match load_backfills(shared.lake(), name).await {
            Ok(backfills) => scheduled.backfills = backfills,
            Err(error) => {
                tracing::warn!(job = %name, error = %Chain(&error), "failed to read backfill requests")
            }
        }
        let job = Arc::clone(&scheduled.job);
        let definition = &job.definition;
        refuse_oversized_backfills(shared, name, scheduled).await;
        // Complete through: the lowest watermark of the streams read, or the clock for jobs
        // that read only reference tables.
        let mut complete_through = now;
        for stream in &job.streams {
            let watermark = match watermarks.get(stream) {
                Some(watermark) => *watermark,
                None => {
                    let watermark = shared
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
        let backfills: Vec<&BackfillRequest> = scheduled
            .backfills
            .iter()
            .filter(|request| !scheduled.refused_backfills.contains(&backfill_id(request)))
            .collect();
        let ranges =
            catch_up::ranges_to_scan(scheduled.first_window_micros, definition.window_micros, &backfills);
        let backfills: Vec<BackfillRequest> = backfills.into_iter().cloned().collect();
        let scan = catch_up::WindowScan {
            window_micros: definition.window_micros,
            lateness_micros: definition.lateness_micros,
            complete_through_micros: complete_through,
            now_micros: now,
            max_due: shared.config.executor.max_windows_per_job_per_tick,
        };
        let found =
            scan.due_windows(&ranges, definition.schedule_opt.as_ref(), |window_start, window_end| {
                next_step(shared, scheduled, &backfills, window_start, window_end, now, snapshot_opt.as_ref())
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
            shared
                .metrics
                .freshness
                .record(now.saturating_sub(newest) / 1_000_000, &[KeyValue::new("job_name", name.clone())]);
        }
    }
    shared.metrics.due_windows.record(due.len() as u64, &[]);
    // Oldest windows first within a job. Between jobs the slots are shared fairly: the next
    // slot goes to the job with the fewest runs going, and among those to the one that started
    // a run least recently. A job with a long backlog, or whose windows run to their timeout,
    // then cannot keep every slot while other jobs' windows wait: each slot it frees goes to a
    // waiting job first.
    due.sort_by_key(|item| item.window_start_micros);
    let mut queues: BTreeMap<String, VecDeque<Due>> = BTreeMap::new();
    for item in due {
        queues.entry(item.job.clone()).or_default().push_back(item);
    }
    loop {
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
        let Ok(permit) = Arc::clone(semaphore).try_acquire_owned() else { break };
        let Some(scheduled) = jobs.get_mut(&item.job) else { continue };
        scheduled.running.insert(item.window_start_micros);
        scheduled.last_started_opt = Some(Instant::now());
        let job = Arc::clone(&scheduled.job);
        let offset = scheduled.offset;
        let shared = Arc::clone(shared);
        let report_tx = report_tx.clone();
        tokio::spawn(async move {
            let report =
                run_attempt(&shared, &job, offset, item.window_start_micros, item.revision, item.attempt)
                    .await;
            drop(permit);
            let _ = report_tx.send(report);
        });
    }
}

/// The revision and attempt to start for a window now, if any: nothing while it runs here or
/// waits for a retry, else what its records say (window_step.rs).
fn next_step(
    shared: &Shared,
    scheduled: &mut ScheduledJob,
    backfills: &[BackfillRequest],
    window_start: i64,
    window_end: i64,
    now: i64,
    snapshot_opt: Option<&crate::catalog::Snapshot>,
) -> Option<(u32, u32)> {
    if scheduled.running.contains(&window_start) {
        return None;
    }
    if let Some(retry_at) = scheduled.retry_at.get(&window_start) {
        if Instant::now() < *retry_at {
            return None;
        }
        scheduled.retry_at.remove(&window_start);
    }
    let streams = &scheduled.job.streams;
    let restatement_opt =
        snapshot_opt.filter(|_| scheduled.job.definition.restate).map(|snapshot| Restatement {
            streams,
            versions_now: snapshot.versions(),
            rows_now: || snapshot.rows_overlapping(streams, window_start, window_end),
        });
    let replica = Replica { instance_id: &shared.instance_id, incarnation: &shared.incarnation };
    window_step::next_step(
        scheduled.windows.get(&window_start),
        (window_start, window_end),
        backfills,
        restatement_opt,
        replica,
        now,
    )
}

async fn run_attempt(
    shared: &Shared,
    job: &ValidatedJob,
    offset: i64,
    window_start_micros: i64,
    revision: u32,
    attempt: u32,
) -> RunReport {
    let definition = &job.definition;
    let window_end_micros = window_start_micros.saturating_add(definition.window_micros);
    let mut report = RunReport {
        job: definition.name.clone(),
        offset,
        window_start_micros,
        state_opt: None,
        retry_after_opt: None,
    };
    let section = &shared.config.executor;
    let max_attempts = definition.max_attempts_opt.unwrap_or(section.default_max_attempts).max(1);
    let millis_to_micros = |millis: u64| i64::try_from(millis).unwrap_or(i64::MAX).saturating_mul(1000);
    // A job accepted before `max_timeout_ms` was lowered still gets no more than it says now.
    let timeout_micros = definition
        .timeout_micros_opt
        .unwrap_or(millis_to_micros(section.default_timeout_ms))
        .min(millis_to_micros(section.max_timeout_ms));
    let started_at_micros = now_micros();
    let mut claim_record = AttemptRecord {
        job: definition.name.clone(),
        window_start_micros,
        window_end_micros,
        revision,
        attempt,
        owner: shared.instance_id.clone(),
        incarnation: shared.incarnation.clone(),
        started_at_micros,
        lease_until_micros: started_at_micros
            .saturating_add(timeout_micros)
            .saturating_add(i64::try_from(section.lease_grace_ms).unwrap_or(0) * 1000),
    };
    let lake = shared.lake();
    let reload = |lake: &Lake| {
        let lake = lake.clone();
        let name = definition.name.clone();
        async move {
            load_windows(&lake, &name).await.ok().and_then(|mut windows| windows.remove(&window_start_micros))
        }
    };

    if attempt > max_attempts {
        // Every attempt failed before (or died): the window is failed for good.
        let outcome = OutcomeRecord {
            job: definition.name.clone(),
            window_start_micros,
            window_end_micros,
            revision,
            attempt: attempt - 1,
            status: OutcomeStatus::Failed,
            started_at_micros,
            finished_at_micros: started_at_micros,
            stats: Default::default(),
            input_rows: 0,
            result_path_opt: None,
            error_opt: Some(format!("{} attempts failed or did not finish", attempt - 1)),
            input_versions: BTreeMap::new(),
            result_version_opt: None,
        };
        if let Err(error) = record_outcome(lake, &outcome).await {
            tracing::warn!(job = %definition.name, error = %Chain(&error), "failed to record a failed window");
        }
        report.state_opt = reload(lake).await;
        return report;
    }

    match claim(lake, &claim_record).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(job = %definition.name, window = %format_micros(window_start_micros), "another replica claimed this attempt");
            report.state_opt = reload(lake).await;
            return report;
        }
        Err(error) => {
            tracing::warn!(job = %definition.name, error = %Chain(&error), "failed to claim a window; will try again");
            report.retry_after_opt = Some(Duration::from_millis(section.retry_backoff_ms));
            return report;
        }
    }
    let span = tracing::info_span!("job_run", job = %definition.name, window_start = %format_micros(window_start_micros), revision, attempt);
    let run = WindowRun {
        catalog: shared.catalog.clone(),
        job: definition.clone(),
        streams: job.streams.clone(),
        window_start_micros,
        window_end_micros,
        revision,
        attempt,
    };
    let timeout = Duration::from_micros(u64::try_from(timeout_micros).unwrap_or(u64::MAX));
    let result = tracing::Instrument::instrument(
        run.execute_within(shared.run_runtime.handle(), timeout),
        span.clone(),
    )
    .await;
    let finished_at_micros = now_micros();
    let duration_ms = (finished_at_micros - started_at_micros) / 1000;
    let (status, stats, error_opt, result_path_opt) = match &result {
        Ok(done) => (RunStatus::Succeeded, done.stats, None, Some(done.result_path.clone())),
        // Query errors retry too: a file merged away under a running query is one.
        Err(error) if attempt < max_attempts && error.is_retryable() => {
            (RunStatus::Retrying, Default::default(), Some(error.to_string()), None)
        }
        Err(error) => (RunStatus::Failed, Default::default(), Some(error.to_string()), None),
    };
    match &result {
        Ok(_) => tracing::info!(parent: &span, rows_written = stats.rows_written, duration_ms, "window done"),
        Err(error) => tracing::warn!(parent: &span, error = %Chain(&error), ?status, "window attempt failed"),
    }

    if status != RunStatus::Retrying {
        let outcome = OutcomeRecord {
            job: definition.name.clone(),
            window_start_micros,
            window_end_micros,
            revision,
            attempt,
            status: if status == RunStatus::Succeeded {
                OutcomeStatus::Succeeded
            } else {
                OutcomeStatus::Failed
            },
            started_at_micros,
            finished_at_micros,
            stats,
            input_rows: result.as_ref().map_or(0, |done| done.input_rows),
            result_path_opt: result_path_opt.clone(),
            error_opt: error_opt.clone(),
            input_versions: result.as_ref().map(|done| done.input_versions.clone()).unwrap_or_default(),
            result_version_opt: result.as_ref().ok().map(|done| done.result_version),
        };
        match record_outcome(lake, &outcome).await {
            Ok(true) => {}
            Ok(false) => {
                // A stale attempt (its lease ran out while it worked): the other one counts.
                tracing::warn!(parent: &span, "another attempt recorded this window first; this run is not counted");
                report.state_opt = reload(lake).await;
                return report;
            }
            Err(error) => {
                tracing::warn!(parent: &span, error = %Chain(&error), "failed to record the outcome; the window will run again");
                claim_record.lease_until_micros = 0;
                report.retry_after_opt = Some(Duration::from_millis(section.retry_backoff_ms));
                report.state_opt =
                    Some(WindowState { revision, latest_attempt_opt: Some(claim_record), outcome_opt: None });
                return report;
            }
        }
        report.state_opt = Some(WindowState {
            revision,
            latest_attempt_opt: Some(claim_record),
            outcome_opt: Some(outcome),
        });
        if status == RunStatus::Failed {
            let mut event = shared.status(
                &definition.name,
                JobStatusKind::WindowFailed,
                error_opt.clone().unwrap_or_default(),
                0,
                offset,
            );
            event.window_start_opt = Some(format_micros(window_start_micros));
            shared.publish_status(event).await;
        }
    } else {
        let backoff = section.retry_backoff_ms.saturating_mul(1 << (attempt - 1).min(10));
        report.retry_after_opt = Some(Duration::from_millis(backoff));
        // The attempt is over: the next one need not wait for this claim's lease.
        claim_record.lease_until_micros = 0;
        report.state_opt =
            Some(WindowState { revision, latest_attempt_opt: Some(claim_record), outcome_opt: None });
    }

    let labels = [
        KeyValue::new("job_name", definition.name.clone()),
        KeyValue::new("status", format!("{status:?}").to_lowercase()),
    ];
    shared.metrics.runs.add(1, &labels);
    shared.metrics.run_duration.record(duration_ms as f64 / 1000.0, &labels[..1]);
    shared.metrics.rows_read.add(stats.rows_read, &labels[..1]);
    shared.metrics.rows_written.add(stats.rows_written, &labels[..1]);
    let event = JobRunEvent {
        job: definition.name.clone(),
        window_start_micros,
        window_end_micros,
        revision: i32::try_from(revision).unwrap_or(i32::MAX),
        attempt: i32::try_from(attempt).unwrap_or(i32::MAX),
        status,
        started_at_micros,
        finished_at_micros,
        duration_ms,
        rows_read: stats.rows_read as i64,
        bytes_read: stats.bytes_read as i64,
        files_read: stats.files_read as i64,
        rows_written: stats.rows_written as i64,
        bytes_written: stats.bytes_written as i64,
        result_path_opt,
        error_opt,
        executor: shared.instance_id.clone(),
        input_versions_opt: result
            .as_ref()
            .ok()
            .and_then(|done| serde_json::to_string(&done.input_versions).ok()),
        result_version_opt: result.as_ref().ok().map(|done| done.result_version),
    };
    match event.encode() {
        Ok(payload) => {
            shared.publish(&shared.config.kafka.topic_names().job_runs(), &definition.name, &payload).await
        }
        Err(error) => tracing::warn!(error = %Chain(&error), "failed to encode a run event"),
    }
    report
}

fn apply_report(jobs: &mut BTreeMap<String, ScheduledJob>, report: RunReport) {
    let Some(scheduled) = jobs.get_mut(&report.job) else { return };
    scheduled.running.remove(&report.window_start_micros);
    if scheduled.offset != report.offset {
        // The job was replaced while this ran; the new definition loaded the records afresh,
        // and this report's state is just as fresh, so it still applies.
        tracing::debug!(job = %report.job, "run of a replaced definition finished");
    }
    if let Some(state) = report.state_opt {
        scheduled.windows.insert(report.window_start_micros, state);
    }
    if let Some(after) = report.retry_after_opt {
        scheduled.retry_at.insert(report.window_start_micros, Instant::now() + after);
    }
}
