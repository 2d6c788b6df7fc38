//! The HTTP API: `POST /v1/streams/{stream}/records`, `/healthz` and `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use sluice_kafka::TopicNames;
use sluice_schema::SchemaRegistry;
use tokio::sync::Semaphore;
use tracing::instrument;

use crate::auth::{AuthDecision, Authorizer};
use crate::config::HttpConfig;
use crate::metrics::{IngestMetrics, RejectReason};
use crate::producer::{OutgoingRecord, ProduceError, RecordProducer, now_micros};
use crate::records::{self, BodyError, MAX_LISTED_REJECTIONS};

const TRANSPORT: &str = "http";
/// Seconds a client should wait before retrying after a 503.
const RETRY_AFTER_SECS: &str = "1";

pub(crate) struct HttpState {
    pub(crate) http: HttpConfig,
    pub(crate) max_future_skew_micros: i64,
    pub(crate) schemas: SchemaRegistry,
    pub(crate) topics: TopicNames,
    pub(crate) authorizer: Authorizer,
    pub(crate) producer: RecordProducer,
    pub(crate) metrics: Arc<IngestMetrics>,
    pub(crate) supervisor: crate::tasks::Supervisor,
    pub(crate) in_flight_bytes: Semaphore,
    pub(crate) shutting_down: AtomicBool,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState").field("http", &self.http).finish_non_exhaustive()
    }
}

pub(crate) fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v1/streams/{stream}/records", post(ingest_records))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readiness))
        .with_state(state)
}

async fn readiness(State(state): State<Arc<HttpState>>) -> Response {
    if let Some(failure) = state.supervisor.failure() {
        let message = format!("background task {} failed: {}", failure.task, failure.cause);
        return error_response(StatusCode::SERVICE_UNAVAILABLE, &message);
    }
    if state.shutting_down.load(Ordering::Relaxed) {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    if !state.producer.is_broker_reachable() {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "Kafka broker unreachable");
    }
    (StatusCode::OK, "ready").into_response()
}

/// A refusal: status, message, and the label it is counted under.
struct Refusal {
    status: StatusCode,
    reason: RejectReason,
    body: serde_json::Value,
}

impl Refusal {
    fn new(status: StatusCode, reason: RejectReason, message: impl Into<String>) -> Self {
        Self { status, reason, body: json!({ "error": message.into() }) }
    }

    fn from_body_error(error: BodyError) -> Self {
        match error {
            BodyError::Malformed(message) => {
                Self::new(StatusCode::BAD_REQUEST, RejectReason::Malformed, message)
            }
            BodyError::TooLarge(message) => {
                Self::new(StatusCode::PAYLOAD_TOO_LARGE, RejectReason::TooLarge, message)
            }
            BodyError::UnsupportedMediaType(message) => {
                Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, RejectReason::UnsupportedMediaType, message)
            }
        }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, RejectReason::Unavailable, message)
    }

    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        match self.status {
            StatusCode::SERVICE_UNAVAILABLE => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
            }
            StatusCode::UNAUTHORIZED => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

#[instrument(skip_all, fields(stream = %stream))]
async fn ingest_records(
    State(state): State<Arc<HttpState>>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let known_stream = state.schemas.stream(&stream).is_some();
    // Unknown names come from the URL: keep them out of metric labels.
    let stream_label = if known_stream { stream.as_str() } else { "unknown" };
    let (status, response) = match accept_records(&state, &stream, &headers, body).await {
        Ok(num_records) => {
            state.metrics.record_accepted(stream_label, TRANSPORT, num_records);
            (StatusCode::OK, (StatusCode::OK, axum::Json(json!({ "accepted": num_records }))).into_response())
        }
        Err((refusal, num_records)) => {
            state.metrics.record_rejected(stream_label, TRANSPORT, refusal.reason, num_records.max(1));
            tracing::debug!(
                status = refusal.status.as_u16(),
                reason = refusal.reason.as_label(),
                "request refused"
            );
            (refusal.status, refusal.into_response())
        }
    };
    state.metrics.record_request(TRANSPORT, status.as_u16(), started.elapsed());
    response
}

/// Holds in-flight byte permits and keeps the gauge right however the request ends.
struct InFlight<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
    metrics: &'a IngestMetrics,
    bytes: i64,
}

impl<'a> InFlight<'a> {
    fn try_acquire(state: &'a HttpState, bytes: usize) -> Result<Self, Refusal> {
        let permits = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
        let permit = state.in_flight_bytes.try_acquire_many(permits).map_err(|_| {
            Refusal::unavailable(
                "ingest is at its in-flight byte limit (http.max_in_flight_bytes); retry shortly",
            )
        })?;
        let bytes = i64::from(permits);
        state.metrics.add_in_flight_bytes(bytes);
        Ok(Self { _permit: permit, metrics: &state.metrics, bytes })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.add_in_flight_bytes(-self.bytes);
    }
}

/// The whole request: Ok with the number of records acknowledged by Kafka, or the refusal with
/// the number of records it covers.
async fn accept_records(
    state: &HttpState,
    stream: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<usize, (Refusal, usize)> {
    let refuse = |refusal: Refusal| (refusal, 0);
    let authorization_opt = header_str(headers, header::AUTHORIZATION);
    let decision = state.authorizer.authorize(authorization_opt, stream);
    if decision == AuthDecision::Unauthenticated {
        let message = if authorization_opt.is_some() {
            "the bearer token is not valid"
        } else {
            "missing 'Authorization: Bearer <token>' header"
        };
        return Err(refuse(Refusal::new(StatusCode::UNAUTHORIZED, RejectReason::Unauthenticated, message)));
    }
    let Some(schema) = state.schemas.stream(stream) else {
        let known: Vec<&str> = state.schemas.stream_names().collect();
        return Err(refuse(Refusal::new(
            StatusCode::NOT_FOUND,
            RejectReason::UnknownStream,
            format!("stream '{stream}' does not exist; known streams: {}", known.join(", ")),
        )));
    };
    if let AuthDecision::Forbidden { token_name } = decision {
        return Err(refuse(Refusal::new(
            StatusCode::FORBIDDEN,
            RejectReason::Forbidden,
            format!("token '{token_name}' may not write stream '{stream}'"),
        )));
    }
    let format = records::body_format(header_str(headers, header::CONTENT_TYPE))
        .map_err(|error| refuse(Refusal::from_body_error(error)))?;
    if !state.producer.is_broker_reachable() {
        return Err(refuse(Refusal::unavailable(
            "the Kafka broker is unreachable; nothing was written, retry later",
        )));
    }
    let max_body_bytes = state.http.max_body_bytes;
    let raw = axum::body::to_bytes(body, max_body_bytes).await.map_err(|_| {
        refuse(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            RejectReason::TooLarge,
            format!("body exceeds {max_body_bytes} bytes (http.max_body_bytes)"),
        ))
    })?;
    let _raw_in_flight = InFlight::try_acquire(state, raw.len()).map_err(refuse)?;
    let decoded =
        records::decompress(raw.to_vec(), header_str(headers, header::CONTENT_ENCODING), max_body_bytes)
            .map_err(|error| refuse(Refusal::from_body_error(error)))?;
    let _decoded_in_flight = InFlight::try_acquire(state, decoded.len()).map_err(refuse)?;
    let readings = records::parse_readings(&decoded, format, state.http.max_records_per_request)
        .map_err(|error| refuse(Refusal::from_body_error(error)))?;
    let num_records = readings.len();
    let batch = match records::encode_batch(schema, &readings, now_micros(), state.max_future_skew_micros) {
        Ok(batch) => batch,
        Err(rejected) => {
            let num_rejected_records = {
                let mut indexes: Vec<usize> = rejected.iter().map(|rejection| rejection.index).collect();
                indexes.dedup();
                indexes.len()
            };
            let truncated = rejected.len() > MAX_LISTED_REJECTIONS;
            let listed = &rejected[..rejected.len().min(MAX_LISTED_REJECTIONS)];
            let refusal = Refusal {
                status: StatusCode::BAD_REQUEST,
                reason: RejectReason::Invalid,
                body: json!({
                    "error": format!("{num_rejected_records} of {num_records} records are invalid; nothing was written"),
                    "rejected": listed,
                    "num_rejected_records": num_rejected_records,
                    "rejections_truncated": truncated,
                }),
            };
            return Err((refusal, num_records));
        }
    };
    drop(readings);
    let topic = state.topics.stream(stream);
    let outgoing = batch.records.iter().map(|record| OutgoingRecord {
        key: &record.key,
        event_time_micros: record.event_time_micros,
        value: batch.value(record),
    });
    match state.producer.produce_batch(&topic, &schema.fingerprint_hex(), outgoing).await {
        Ok(()) => Ok(num_records),
        Err(error) => {
            tracing::warn!(%topic, error = %error_chain(&error), "produce failed");
            let message = match error {
                ProduceError::QueueFull => "the producer queue is full; part of the request may have been written: retry the whole request shortly (duplicates are dropped by device_id and seq)".to_string(),
                ProduceError::BrokerUnreachable => {
                    "the Kafka broker is unreachable; nothing was written, retry later".to_string()
                }
                other => format!(
                    "{}; some records may have been written: retry the whole request (duplicates are dropped by device_id and seq)",
                    error_chain(&other)
                ),
            };
            Err((Refusal::unavailable(message), num_records))
        }
    }
}

/// An error and its sources, `: `-separated, for logs and answers.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source_opt = error.source();
    while let Some(source) = source_opt {
        text.push_str(": ");
        text.push_str(&source.to_string());
        source_opt = source.source();
    }
    text
}
