//! Forwarding: sends what the spool holds to central ingest, oldest first, and moves the spool's
//! cursor past a batch only once central answered 200 (Kafka acknowledged every record there).
//!
//! A request carries whole spooled batches of one stream, as they are (`forwarded.rs` in the
//! device API), zstd-compressed, at most `forward.max_batch_readings` readings and
//! `forward.max_batch_bytes` bytes. While central cannot be reached, or answers 429 or 5xx, the
//! same batch is sent again after a backoff with full jitter (at least what `Retry-After` asks),
//! so a site's gateways do not all come back at once. Readings are sent no faster than
//! `forward.max_readings_per_second`, so a site recovering from a long outage drains its backlog
//! without flooding the cluster.
//!
//! Answers that another attempt cannot change are not retried for ever: readings central
//! refuses as invalid (400, listed) go to the local dead-letter log and the rest are sent again;
//! a single batch too large for central (413) goes there whole. Answers that mean the gateway or
//! central is misconfigured (401, 403, 404, 415, a 400 that lists no reading) are logged and
//! retried at the longest backoff: nothing is dropped for a wrong token or a missing header.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use sluice_device_api::DeadLetter;
use sluice_device_api::forwarded::{
    EDGE_BATCHES_CONTENT_TYPE, EDGE_ID_HEADER, SpooledBatch, SpooledRecord, decode_spooled,
    encode_spooled_records, forward_body,
};
use sluice_errors::chain_text;
use sluice_shutdown::CancellationToken;

use crate::config::ForwardConfig;
use crate::dead_letters::DeadLetterLog;
use crate::metrics::EdgeMetrics;
use crate::spool::{Frame, Spool, SpoolError};

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("failed to read the spool for forwarding")]
    Spool(#[from] SpoolError),
    #[error("failed to write the local dead-letter log: {0}")]
    DeadLetters(String),
    #[error("a blocking spool task failed: {0}")]
    Task(String),
}

/// Why a send did not go through, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureReason {
    /// No answer: refused, reset, timed out.
    Network,
    /// 429 or 5xx.
    Unavailable,
    /// 401, 403, 404 or 415: the gateway's settings do not match central's.
    Config,
    /// 400: central refused readings as invalid (they went to the dead-letter log).
    Rejected,
    /// 413: the batch was too large for central.
    TooLarge,
}

impl FailureReason {
    pub(crate) const ALL: [Self; 5] =
        [Self::Network, Self::Unavailable, Self::Config, Self::Rejected, Self::TooLarge];

    pub(crate) fn as_label(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::Unavailable => "unavailable",
            Self::Config => "config",
            Self::Rejected => "rejected",
            Self::TooLarge => "too_large",
        }
    }
}

/// What central answered a refused request with (the device API's refusal body).
#[derive(Debug, Default, Deserialize)]
struct Refusal {
    #[serde(default)]
    error: String,
    #[serde(default)]
    rejected: Vec<RejectedReading>,
}

#[derive(Debug, Deserialize)]
struct RejectedReading {
    index: usize,
    reason: String,
}

/// What became of one request.
enum Sent {
    Accepted,
    /// Listed readings refused as invalid; the others may be sent again.
    Rejected(Refusal),
    /// The body as a whole was refused and cannot be taken: 400 without a list.
    Unacceptable(Refusal),
    TooLarge,
    Failed {
        reason: FailureReason,
        message: String,
        retry_after_opt: Option<Duration>,
    },
}

#[derive(Debug)]
pub(crate) struct Forwarder {
    pub(crate) spool: Spool,
    pub(crate) client: reqwest::Client,
    /// `<forward.url>/v1/streams/`.
    pub(crate) streams_url: String,
    pub(crate) authorization_opt: Option<HeaderValue>,
    /// `<forward.edge_id>.<spool incarnation>`: central keeps this gateway's positions under it.
    pub(crate) edge_id: HeaderValue,
    pub(crate) settings: ForwardConfig,
    pub(crate) dead_letters: Arc<DeadLetterLog>,
    pub(crate) metrics: Arc<EdgeMetrics>,
}

/// A batch being forwarded: its frames, and which of their readings central refused already.
struct Pending {
    frames: Vec<Frame>,
    /// Per frame, per reading: refused (dead-lettered), so left out of the next attempt.
    refused: Vec<Vec<bool>>,
}

impl Forwarder {
    /// Forwards until `shutdown`; an error is one the gateway cannot go on from (the spool
    /// failed), and stops it.
    pub(crate) async fn run(self, shutdown: CancellationToken) -> Result<(), ForwardError> {
        let mut rate = TokenBucket::new(self.settings.max_readings_per_second);
        let mut attempt: u32 = 0;
        let mut max_frames = self.settings.max_batch_readings;
        let mut pending_opt: Option<Pending> = None;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let mut pending = match pending_opt.take() {
                Some(pending) => pending,
                None => match self.next_batch(max_frames).await? {
                    Some(pending) => pending,
                    None => {
                        let linger = Duration::from_millis(self.settings.linger_ms);
                        if sleep_or_shutdown(linger, &shutdown).await {
                            return Ok(());
                        }
                        continue;
                    }
                },
            };
            let decoded: Vec<SpooledBatch<'_>> =
                pending.frames.iter().filter_map(|frame| decode_spooled(&frame.payload).ok()).collect();
            // Again at every attempt: while a batch is retried it stays the oldest, and its age
            // is what an alert on a stuck spool watches.
            if let Some(oldest) = decoded.first() {
                self.metrics.record_oldest_received(oldest.received_at_micros);
            }
            let frame_ids: Vec<u64> = pending.frames.iter().map(|frame| frame.id).collect();
            let (body, sent_readings) = request_body(&frame_ids, &decoded, &pending.refused);
            let end_id = pending.frames.last().map_or(0, |frame| frame.id + 1);
            if sent_readings.is_empty() {
                // Every reading was refused and dead-lettered: the batch is done.
                self.ack_below(end_id).await?;
                continue;
            }
            let stream = decoded.first().map(|batch| batch.stream.to_string()).unwrap_or_default();
            rate.take(sent_readings.len()).await;
            let sent = self.send(&stream, body).await;
            match sent {
                Sent::Accepted => {
                    self.ack_below(end_id).await?;
                    self.metrics.record_forwarded(sent_readings.len());
                    attempt = 0;
                    max_frames = self.settings.max_batch_readings;
                }
                Sent::Rejected(refusal) => {
                    self.metrics.record_forward_failure(FailureReason::Rejected);
                    for rejected in &refusal.rejected {
                        let Some(&(frame_index, record_index)) = sent_readings.get(rejected.index) else {
                            continue;
                        };
                        let Some(record) =
                            decoded.get(frame_index).and_then(|batch| batch.records.get(record_index))
                        else {
                            continue;
                        };
                        let reason = format!("central ingest refused the reading: {}", rejected.reason);
                        self.dead_letter(&stream, record, &reason).await?;
                        pending.refused[frame_index][record_index] = true;
                    }
                    tracing::warn!(num_refused = refusal.rejected.len(), error = %refusal.error, "central ingest refused forwarded readings as invalid; they are in the local dead-letter log, the rest are sent again");
                    if refusal.rejected.is_empty() {
                        self.dead_letter_all(&stream, &decoded, &pending.refused, &refusal.error).await?;
                        self.ack_below(end_id).await?;
                    } else {
                        pending_opt = Some(pending);
                    }
                }
                Sent::Unacceptable(refusal) => {
                    // A refusal of the request as a whole names no reading: it is central's
                    // setup (a missing header, an unknown stream, another format version), which
                    // an operator fixes. Nothing is dropped for it.
                    self.metrics.record_forward_failure(FailureReason::Config);
                    let delay = Duration::from_millis(self.settings.backoff_max_ms);
                    tracing::error!(error = %refusal.error, delay_ms = delay.as_millis() as u64, "central ingest refused the request as a whole; retrying");
                    pending_opt = Some(pending);
                    if sleep_or_shutdown(delay, &shutdown).await {
                        return Ok(());
                    }
                }
                Sent::TooLarge if pending.frames.len() > 1 => {
                    self.metrics.record_forward_failure(FailureReason::TooLarge);
                    max_frames = (pending.frames.len() / 2).max(1);
                    // The first half goes next, with what central already refused of it.
                    pending.frames.truncate(max_frames);
                    pending.refused.truncate(max_frames);
                    pending_opt = Some(pending);
                    tracing::warn!(
                        max_frames,
                        "central ingest refused a forwarded batch as too large; sending fewer at a time (lower forward.max_batch_bytes)"
                    );
                }
                Sent::TooLarge => {
                    self.metrics.record_forward_failure(FailureReason::TooLarge);
                    let reason = "central ingest refused this request as too large even alone (413): raise its http.max_body_bytes or lower the gateway's";
                    tracing::error!("{reason}; its readings are in the local dead-letter log");
                    self.dead_letter_all(&stream, &decoded, &pending.refused, reason).await?;
                    self.ack_below(end_id).await?;
                }
                Sent::Failed { reason, message, retry_after_opt } => {
                    self.metrics.record_forward_failure(reason);
                    let delay = if reason == FailureReason::Config {
                        Duration::from_millis(self.settings.backoff_max_ms)
                    } else {
                        backoff(&self.settings, attempt).max(retry_after_opt.unwrap_or_default())
                    };
                    attempt = attempt.saturating_add(1);
                    if reason == FailureReason::Config {
                        tracing::error!(%message, delay_ms = delay.as_millis() as u64, "central ingest refused the gateway; check forward.url and forward.token; retrying");
                    } else {
                        tracing::warn!(reason = reason.as_label(), %message, delay_ms = delay.as_millis() as u64, "forwarding failed; retrying");
                    }
                    pending_opt = Some(pending);
                    if sleep_or_shutdown(delay, &shutdown).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The next frames to send: oldest first, of one stream, at most `max_frames` and about
    /// `forward.max_batch_readings` readings and `forward.max_batch_bytes` bytes, at least one
    /// frame. A frame this gateway cannot read is dead-lettered whole and skipped.
    async fn next_batch(&self, max_frames: usize) -> Result<Option<Pending>, ForwardError> {
        let spool = self.spool.clone();
        let max_bytes = self.settings.max_batch_bytes;
        let frames = tokio::task::spawn_blocking(move || spool.unforwarded(max_frames, max_bytes))
            .await
            .map_err(|error| ForwardError::Task(error.to_string()))??;
        self.metrics.record_usage(&self.spool);
        let mut taken = Vec::new();
        let mut stream_opt: Option<String> = None;
        let mut num_readings = 0;
        for frame in frames {
            let batch = match decode_spooled(&frame.payload) {
                Ok(batch) => batch,
                Err(error) if taken.is_empty() => {
                    tracing::error!(frame = frame.id, error = %error, "a spooled batch cannot be read; it is in the local dead-letter log");
                    let letter = DeadLetter {
                        key: "",
                        payload: &frame.payload,
                        original_size_opt: None,
                        reason: &format!("the gateway cannot read this spooled batch: {error}"),
                        source: "edge:spool",
                    };
                    self.write_dead_letter("", &letter).await?;
                    self.ack_below(frame.id + 1).await?;
                    return Ok(None);
                }
                Err(_) => break,
            };
            if stream_opt.as_deref().is_some_and(|stream| stream != batch.stream) {
                break;
            }
            if !taken.is_empty() && num_readings + batch.records.len() > self.settings.max_batch_readings {
                break;
            }
            if taken.is_empty() {
                self.metrics.record_oldest_received(batch.received_at_micros);
            }
            stream_opt = Some(batch.stream.to_string());
            num_readings += batch.records.len();
            let num_records = batch.records.len();
            taken.push((frame, num_records));
        }
        if taken.is_empty() {
            self.metrics.record_oldest_received(sluice_clock::now_micros());
            return Ok(None);
        }
        let refused = taken.iter().map(|(_, num_records)| vec![false; *num_records]).collect();
        Ok(Some(Pending { frames: taken.into_iter().map(|(frame, _)| frame).collect(), refused }))
    }

    async fn send(&self, stream: &str, body: Vec<u8>) -> Sent {
        let compressed = match zstd::bulk::compress(&body, 3) {
            Ok(compressed) => compressed,
            Err(error) => {
                return Sent::Failed {
                    reason: FailureReason::Network,
                    message: format!("failed to compress the request: {error}"),
                    retry_after_opt: None,
                };
            }
        };
        let mut request = self
            .client
            .post(format!("{}{stream}/records", self.streams_url))
            .header(CONTENT_TYPE, EDGE_BATCHES_CONTENT_TYPE)
            .header(CONTENT_ENCODING, "zstd")
            .header(EDGE_ID_HEADER, self.edge_id.clone())
            .body(compressed);
        if let Some(authorization) = &self.authorization_opt {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                return Sent::Failed {
                    reason: FailureReason::Network,
                    message: chain_text(&error),
                    retry_after_opt: None,
                };
            }
        };
        let status = response.status();
        let retry_after_opt = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // The answer's body is small (central caps its listings); an unreadable one is empty.
        let text = match response.text().await {
            Ok(text) => text,
            Err(error) if status == StatusCode::OK => {
                // The 200 arrived but its body did not: central took the batch.
                tracing::debug!(error = %chain_text(&error), "the body of central's 200 did not arrive");
                String::new()
            }
            Err(error) => chain_text(&error),
        };
        let refusal = || {
            serde_json::from_str::<Refusal>(&text)
                .unwrap_or_else(|_| Refusal { error: text.clone(), rejected: Vec::new() })
        };
        match status {
            StatusCode::OK => Sent::Accepted,
            StatusCode::BAD_REQUEST => {
                let refusal = refusal();
                if refusal.rejected.is_empty() {
                    Sent::Unacceptable(refusal)
                } else {
                    Sent::Rejected(refusal)
                }
            }
            StatusCode::PAYLOAD_TOO_LARGE => Sent::TooLarge,
            StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::NOT_FOUND
            | StatusCode::UNSUPPORTED_MEDIA_TYPE => Sent::Failed {
                reason: FailureReason::Config,
                message: format!("{status}: {}", refusal().error),
                retry_after_opt,
            },
            _ => Sent::Failed {
                reason: FailureReason::Unavailable,
                message: format!("{status}: {}", refusal().error),
                retry_after_opt,
            },
        }
    }

    async fn ack_below(&self, end_id: u64) -> Result<(), ForwardError> {
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || spool.ack_below(end_id))
            .await
            .map_err(|error| ForwardError::Task(error.to_string()))??;
        self.metrics.record_usage(&self.spool);
        Ok(())
    }

    async fn dead_letter(
        &self,
        stream: &str,
        record: &SpooledRecord<'_>,
        reason: &str,
    ) -> Result<(), ForwardError> {
        let letter = DeadLetter {
            key: record.key,
            payload: record.value,
            original_size_opt: None,
            reason,
            source: "edge:forward",
        };
        self.write_dead_letter(stream, &letter).await
    }

    /// Every reading of a batch not dead-lettered already.
    async fn dead_letter_all(
        &self,
        stream: &str,
        batches: &[SpooledBatch<'_>],
        refused: &[Vec<bool>],
        reason: &str,
    ) -> Result<(), ForwardError> {
        for (batch, refused) in batches.iter().zip(refused) {
            for (record, _) in batch.records.iter().zip(refused).filter(|(_, refused)| !**refused) {
                self.dead_letter(stream, record, reason).await?;
            }
        }
        Ok(())
    }

    async fn write_dead_letter(&self, stream: &str, letter: &DeadLetter<'_>) -> Result<(), ForwardError> {
        let (line, _) = self.dead_letters.line(stream, sluice_clock::now_micros(), letter);
        let log = Arc::clone(&self.dead_letters);
        tokio::task::spawn_blocking(move || log.append(&line))
            .await
            .map_err(|error| ForwardError::Task(error.to_string()))?
            .map_err(|error| ForwardError::DeadLetters(error.to_string()))
    }
}

/// The request body for the readings not refused yet, and for each reading sent, which frame and
/// reading it is (central's rejections name readings by their index in the request).
fn request_body(
    frame_ids: &[u64],
    batches: &[SpooledBatch<'_>],
    refused: &[Vec<bool>],
) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut sent = Vec::new();
    // (frame id, spooled batch, each record's index in the frame when some were left out)
    let mut entries: Vec<(u64, Vec<u8>, Vec<u32>)> = Vec::with_capacity(batches.len());
    for (frame_index, ((batch, refused), frame_id)) in batches.iter().zip(refused).zip(frame_ids).enumerate()
    {
        let mut kept = Vec::with_capacity(batch.records.len());
        let mut indexes = Vec::new();
        for (record_index, (record, refused)) in batch.records.iter().zip(refused).enumerate() {
            if !*refused {
                sent.push((frame_index, record_index));
                kept.push(*record);
                indexes.push(record_index as u32);
            }
        }
        if kept.is_empty() {
            continue;
        }
        if kept.len() == batch.records.len() {
            indexes.clear();
        }
        // Lengths were read from a frame, so they fit the format again.
        if let Ok(payload) =
            encode_spooled_records(batch.stream, batch.fingerprint, batch.received_at_micros, &kept)
        {
            entries.push((*frame_id, payload, indexes));
        }
    }
    let borrowed: Vec<(u64, &[u8], &[u32])> = entries
        .iter()
        .map(|(frame_id, payload, indexes)| (*frame_id, payload.as_slice(), indexes.as_slice()))
        .collect();
    let body = forward_body(&borrowed).unwrap_or_default();
    (body, sent)
}

/// Full jitter: a random delay up to the exponential bound, so that gateways that lost the same
/// uplink do not retry in step.
fn backoff(settings: &ForwardConfig, attempt: u32) -> Duration {
    let bound_ms = settings
        .backoff_initial_ms
        .saturating_mul(1u64 << attempt.min(32))
        .min(settings.backoff_max_ms)
        .max(1);
    Duration::from_millis(random_u64() % (bound_ms + 1))
}

fn random_u64() -> u64 {
    // Randomly keyed by the standard library per hasher: enough for jitter, with no RNG crate.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    hasher.write_u128(now.as_nanos());
    hasher.finish()
}

/// Returns true when shutdown came first.
async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

/// Readings per second: a bucket of one second's worth, which a batch may overdraw; the next
/// batch then waits until the debt is paid.
struct TokenBucket {
    per_second: f64,
    tokens: f64,
    refilled_at: tokio::time::Instant,
}

impl TokenBucket {
    fn new(per_second: u64) -> Self {
        let per_second = per_second as f64;
        Self { per_second, tokens: per_second, refilled_at: tokio::time::Instant::now() }
    }

    async fn take(&mut self, num_readings: usize) {
        if self.per_second <= 0.0 {
            return;
        }
        let now = tokio::time::Instant::now();
        let refill = now.duration_since(self.refilled_at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.per_second);
        self.refilled_at = now;
        self.tokens -= num_readings as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / self.per_second)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_its_growing_bound_and_the_maximum() {
        let settings =
            ForwardConfig { backoff_initial_ms: 100, backoff_max_ms: 5_000, ..ForwardConfig::default() };
        for attempt in 0..40 {
            let bound = (100u64 << attempt.min(32)).min(5_000);
            for _ in 0..20 {
                assert!(backoff(&settings, attempt).as_millis() as u64 <= bound);
            }
        }
        let delays: std::collections::BTreeSet<u128> =
            (0..50).map(|_| backoff(&settings, 10).as_millis()).collect();
        assert!(delays.len() > 10, "jittered, not fixed: {delays:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_holds_over_a_backlog() {
        let mut bucket = TokenBucket::new(1_000);
        let started = tokio::time::Instant::now();
        for _ in 0..10 {
            bucket.take(500).await;
        }
        // 5,000 readings at 1,000 a second, the first second's worth at once: 4 s at least.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(3_900), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(4_100), "{elapsed:?}");
        let mut unlimited = TokenBucket::new(0);
        unlimited.take(usize::MAX).await;
    }
}
