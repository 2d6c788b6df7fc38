//! Job definitions as the jobs topic delivers them; the newest value of a key is the job. A
//! definition is validated (behind a marker on disk, so that one that kills the process is
//! refused after the restart instead of validated again), then accepted with the window records
//! the lake has for it, or rejected with the reason; a tombstone deletes the job. Each answer
//! is a status event. What the scheduler keeps per accepted job is a [`ScheduledJob`], with
//! the backfill requests it refuses.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Headers;
use sluice_clock::{Clock, format_micros};
use sluice_errors::Chain;
use sluice_jobs::events::JobStatusKind;
use sluice_query::{ValidatedJob, ValidationError};

use sluice_jobs::signing::{
    Refusal, RequestSignature, SignedAction, backfill_place, sha256_hex, topic_place,
};

use crate::catch_up;
use crate::context::ExecutorContext;
use crate::job_auth::{Decision, JobRequest};
use crate::runs::{BackfillRequest, WindowState, load_windows};
use crate::validate_job;

/// A job this replica schedules.
#[derive(Debug)]
pub(crate) struct ScheduledJob {
    pub(crate) job: Arc<ValidatedJob>,
    /// Where the definition sits in the jobs topic.
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) first_window_micros: i64,
    pub(crate) windows: BTreeMap<i64, WindowState>,
    /// Backfill requests with the paths of their records.
    pub(crate) backfills: Vec<(String, BackfillRequest)>,
    /// Windows running on this replica.
    pub(crate) running: BTreeSet<i64>,
    /// Windows waiting out a retry backoff, until this clock time.
    pub(crate) retry_at_micros: HashMap<i64, i64>,
    /// When this replica last started one of the job's windows: slots go to the job that waited
    /// longest among those with as few runs going.
    pub(crate) last_started_opt: Option<Instant>,
    /// Backfill requests refused, and said so on the status topic, by this process; each by
    /// [`backfill_id`], so that a record rewritten after its decision is judged again.
    pub(crate) refused_backfills: BTreeSet<String>,
    /// Backfill requests whose signature was accepted (and audited), by [`backfill_id`].
    pub(crate) authorized_backfills: BTreeSet<String>,
}

/// A backfill request as this process remembers its decision: the record's path and a digest
/// of what it holds now.
fn backfill_id(path: &str, request: &BackfillRequest) -> String {
    let signature = request.signature_opt.as_ref().map_or("", |signature| signature.signature.as_str());
    let mut content = request.signed_body();
    content.extend_from_slice(signature.as_bytes());
    content.extend_from_slice(request.job.as_bytes());
    format!("{path}#{}", sha256_hex(&content))
}

impl ScheduledJob {
    /// The job's backfill requests that were authorized and not refused.
    pub(crate) fn backfills_to_run(&self) -> Vec<&BackfillRequest> {
        self.backfills
            .iter()
            .filter(|(path, request)| {
                let id = backfill_id(path, request);
                self.authorized_backfills.contains(&id) && !self.refused_backfills.contains(&id)
            })
            .map(|(_, request)| request)
            .collect()
    }

    /// Backfill requests that no trusted key signed for this job, or with more windows than a
    /// backlog may hold, are left alone, and the refusal is published once per process. One
    /// whose decision cannot be recorded yet waits for the next tick.
    pub(crate) async fn judge_backfills(&mut self, context: &ExecutorContext, name: &str) {
        let window_micros = self.job.definition.window_micros;
        let max_backlog_windows = context.config.executor.max_backlog_windows;
        for (path, request) in &self.backfills {
            let id = backfill_id(path, request);
            if self.refused_backfills.contains(&id) {
                continue;
            }
            let refusal_opt = if self.authorized_backfills.contains(&id) {
                None
            } else {
                let body = request.signed_body();
                let decided = context
                    .auth
                    .decide(
                        context,
                        JobRequest {
                            action: SignedAction::Backfill,
                            job: name,
                            place: backfill_place(&context.config.kafka.topic_names().jobs(), path),
                            body: &body,
                            source: path.clone(),
                            signature: Ok(request.signature_opt.clone()),
                        },
                    )
                    .await;
                match decided {
                    Ok(Decision::Accepted) => {
                        self.authorized_backfills.insert(id.clone());
                        None
                    }
                    Ok(Decision::Refused(reason)) => Some(format!("not authorized: {reason}")),
                    Err(error) => {
                        tracing::error!(job = %name, error = %Chain(&error), "failed to record a backfill request in the audit table; it waits");
                        continue;
                    }
                }
            };
            let Some(reason) = refusal_opt
                .or_else(|| catch_up::backfill_refusal(request, window_micros, max_backlog_windows))
            else {
                continue;
            };
            tracing::warn!(job = %name, %reason, "backfill refused");
            self.refused_backfills.insert(id);
            let event = context.events.status(
                name,
                JobStatusKind::BackfillRefused,
                reason,
                self.partition,
                self.offset,
            );
            context.events.publish_status(event).await;
        }
    }
}

/// A definition as read from the jobs topic.
#[derive(Debug)]
pub(crate) struct Definition {
    pub(crate) key_opt: Option<String>,
    /// The SQL file's bytes, as signed; none: a tombstone.
    pub(crate) payload_opt: Option<Vec<u8>>,
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// The record's timestamp: a job without `start` begins with the window holding it.
    pub(crate) submitted_at_micros: i64,
    /// The submitter's signature from the record's headers.
    pub(crate) signature: Result<Option<RequestSignature>, Refusal>,
}

impl Definition {
    /// A record of the jobs topic; one without a timestamp counts as submitted now.
    pub(crate) fn read(message: &impl Message, clock: &dyn Clock) -> Self {
        let signature = signature_in(message.headers());
        Self {
            key_opt: message.key().map(|key| String::from_utf8_lossy(key).into_owned()),
            payload_opt: message.payload().map(<[u8]>::to_vec),
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            submitted_at_micros: message
                .timestamp()
                .to_millis()
                .map_or_else(|| clock.now_micros(), |millis| millis.saturating_mul(1000)),
            signature,
        }
    }
}

/// The signature in a record's headers. rust-rdkafka panics on a header name that is not UTF-8
/// (`CStr::to_str().unwrap()`): one such record, read again after every restart, must not stop
/// the executor each time.
fn signature_in<H: Headers>(headers_opt: Option<&H>) -> Result<Option<RequestSignature>, Refusal> {
    std::panic::catch_unwind(AssertUnwindSafe(|| match headers_opt {
        Some(headers) => {
            RequestSignature::from_headers(headers.iter().map(|header| (header.key, header.value)))
        }
        None => Ok(None),
    }))
    .unwrap_or_else(|_| Err(Refusal::Malformed("a header name is not UTF-8".to_string())))
}

/// Whether the request may act, recorded in the audit table; `false` when it may not (the
/// refusal is published) or its decision cannot be recorded (it is read again when the
/// partition is reassigned or the request sent again).
async fn authorized(context: &ExecutorContext, request: JobRequest<'_>, partition: i32, offset: i64) -> bool {
    let (action, job) = (request.action, request.job.to_string());
    match context.auth.decide(context, request).await {
        Ok(Decision::Accepted) => true,
        Ok(Decision::Refused(reason)) => {
            // The job as it was goes on: an unauthorized request changes nothing.
            let event = context.events.status(
                &job,
                JobStatusKind::Refused,
                format!("{action} not authorized: {reason}"),
                partition,
                offset,
            );
            context.events.publish_status(event).await;
            false
        }
        Err(error) => {
            tracing::error!(%job, %action, error = %Chain(&error), "failed to record a job request in the audit table; it is not acted on");
            false
        }
    }
}

pub(crate) async fn handle_definition(
    context: &ExecutorContext,
    jobs: &mut BTreeMap<String, ScheduledJob>,
    definition: Definition,
) {
    let Definition { key_opt, payload_opt, topic, partition, offset, submitted_at_micros, signature } =
        definition;
    let Some(key) = key_opt else {
        tracing::warn!(partition, offset, "job definition without a key ignored; the key is the job name");
        return;
    };
    let place = topic_place(&topic, partition);
    let request = JobRequest {
        action: if payload_opt.is_some() { SignedAction::Submit } else { SignedAction::Delete },
        job: &key,
        source: format!("{place}@{offset}"),
        place,
        body: payload_opt.as_deref().unwrap_or_default(),
        signature,
    };
    if !authorized(context, request, partition, offset).await {
        return;
    }
    let Some(payload) = payload_opt else {
        // A deleted job's marker would refuse the same text if it came back.
        if let Err(error) = context.markers.end(&key) {
            tracing::warn!(job = %key, error = %Chain(&error), "failed to remove a validation marker");
        }
        if jobs.remove(&key).is_some() || crate::job::validate_name(&key).is_ok() {
            tracing::info!(job = %key, "job deleted");
            let event = context.events.status(&key, JobStatusKind::Deleted, String::new(), partition, offset);
            context.events.publish_status(event).await;
        }
        return;
    };
    // The text validated and run is the text signed: a payload that is not UTF-8 would run as
    // something else after a lossy conversion.
    let validated = match String::from_utf8(payload) {
        Ok(text) => validate_with_marker(context, &key, &text).await,
        Err(_) => Err("the job file is not UTF-8 text".to_string()),
    };
    match validated {
        Err(reason) => {
            tracing::warn!(job = %key, %reason, "job rejected");
            // The newest definition is the job: a rejected one replaces a valid one too.
            jobs.remove(&key);
            let event = context.events.status(&key, JobStatusKind::Rejected, reason, partition, offset);
            context.events.publish_status(event).await;
        }
        Ok(job) => {
            let windows = match load_windows(context.lake(), &key).await {
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
            let now = context.clock.now_micros();
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
                context.config.executor.max_backlog_windows,
            ) {
                tracing::warn!(job = %key, %reason, "job rejected");
                jobs.remove(&key);
                let event = context.events.status(&key, JobStatusKind::Rejected, reason, partition, offset);
                context.events.publish_status(event).await;
                context.metrics.set_jobs(jobs.len());
                return;
            }
            tracing::info!(job = %key, streams = ?job.streams, first_window = %format_micros(first_window_micros), "job accepted");
            context.metrics.start_job_counters(&key);
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
                    retry_at_micros: HashMap::new(),
                    last_started_opt: None,
                    refused_backfills: BTreeSet::new(),
                    authorized_backfills: BTreeSet::new(),
                },
            );
            let event =
                context.events.status(&key, JobStatusKind::Accepted, String::new(), partition, offset);
            context.events.publish_status(event).await;
        }
    }
    context.metrics.set_jobs(jobs.len());
}

/// Validates with a marker on disk meanwhile, so that a definition that kills the process
/// (or is being validated when it is killed) is refused after the restart, not validated again.
async fn validate_with_marker(
    context: &ExecutorContext,
    key: &str,
    text: &str,
) -> Result<ValidatedJob, String> {
    if let Some(died) = context.markers.died_validating(key, text) {
        return Err(died.reason());
    }
    if let Err(error) = context.markers.begin(key, text) {
        tracing::warn!(job = %key, error = %Chain(&error), "failed to write a validation marker; validating without one");
    }
    let validated = validate_retrying_lake_failures(context, key, text).await;
    if let Err(error) = context.markers.end(key) {
        tracing::warn!(job = %key, error = %Chain(&error), "failed to remove a validation marker");
    }
    validated.map_err(|error| error.to_string())
}

/// Validation plans against the lake's tables: a store that fails for a moment says nothing
/// about the definition, and a refusal stands until the job is submitted again, so a lake
/// failure is tried again a few times before the refusal names it.
const VALIDATION_ATTEMPTS: u32 = 3;
const VALIDATION_RETRY_BACKOFF: Duration = Duration::from_secs(1);

async fn validate_retrying_lake_failures(
    context: &ExecutorContext,
    key: &str,
    text: &str,
) -> Result<ValidatedJob, ValidationError> {
    let mut attempt = 1;
    let mut backoff = VALIDATION_RETRY_BACKOFF;
    loop {
        match validate_job(&context.catalog, text, Some(key)).await {
            Err(error) if error.class().is_retryable() && attempt < VALIDATION_ATTEMPTS => {
                tracing::warn!(job = %key, attempt, error = %Chain(&error), "failed to read the lake to validate a job; trying again");
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
                attempt += 1;
            }
            validated => return validated,
        }
    }
}

/// Jobs of partitions this replica no longer owns stop being scheduled here (running attempts
/// finish; their claims keep the new owner from starting them twice).
pub(crate) fn drop_unassigned(
    consumer: &StreamConsumer,
    topic: &str,
    jobs: &mut BTreeMap<String, ScheduledJob>,
) {
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

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, OwnedHeaders};

    use super::*;

    /// Headers whose name cannot be read, as rust-rdkafka's borrowed headers behave on a name
    /// that is not UTF-8.
    struct UnreadableName;

    impl Headers for UnreadableName {
        fn count(&self) -> usize {
            1
        }

        fn try_get(&self, _idx: usize) -> Option<Header<'_, &[u8]>> {
            panic!("called `Result::unwrap()` on an `Err` value: Utf8Error");
        }
    }

    #[test]
    fn a_header_that_cannot_be_read_refuses_the_record_instead_of_stopping_the_executor() {
        assert!(matches!(signature_in(Some(&UnreadableName)), Err(Refusal::Malformed(_))));
        assert_eq!(signature_in(None::<&OwnedHeaders>), Ok(None));
        let other = OwnedHeaders::new().insert(Header { key: "trace", value: Some("x") });
        assert_eq!(signature_in(Some(&other)), Ok(None));
    }
}
