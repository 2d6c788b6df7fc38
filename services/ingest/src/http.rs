//! The HTTP API: `POST /v1/streams/{stream}/records`, `/healthz` and `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde_json::json;
use sluice_errors::chain_text;
use sluice_kafka::TopicNames;
use sluice_schema::{KEY_FIELD, SchemaRegistry};
use tokio::sync::Semaphore;
use tracing::instrument;

use crate::auth::{AuthDecision, Authorizer, may_write};
use crate::config::HttpConfig;
use crate::metrics::{IngestMetrics, RejectReason};
use crate::producer::{OutgoingRecord, ProduceError, RecordProducer, now_micros};
use crate::records::{
    self, BatchError, BodyEncoding, BodyError, MemoryBudget, RecordRules, RejectedRecord, Rejections,
};
use crate::tls::CertifiedClient;

const TRANSPORT: &str = "http";
/// Seconds a client should wait before retrying after a 503.
const RETRY_AFTER_SECS: &str = "1";

pub(crate) struct HttpState {
    pub(crate) http: HttpConfig,
    pub(crate) record_rules: RecordRules,
    pub(crate) schemas: SchemaRegistry,
    pub(crate) topics: TopicNames,
    pub(crate) authorizer: Authorizer,
    /// `http.tls_client_certificates = "required"` with a device CA: no token stands in for one.
    pub(crate) device_certificates_required: bool,
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
            BodyError::OverBudget => Self::unavailable(
                "ingest is at its in-flight byte limit (http.max_in_flight_bytes); nothing was written, retry shortly",
            ),
        }
    }

    /// A refusal of some of a batch's records, each listed (up to the limit) with its reason.
    fn listing(status: StatusCode, reason: RejectReason, message: String, rejections: Rejections) -> Self {
        let body = json!({
            "error": message,
            "num_rejected_records": rejections.num_rejected_records,
            "rejections_truncated": rejections.truncated(),
            "rejected": rejections.listed,
        });
        Self { status, reason, body }
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
            // The body was not read to its end: the connection cannot carry another request.
            StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE => {
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
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
    client_opt: Option<Extension<CertifiedClient>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let known_stream = state.schemas.stream(&stream).is_some();
    // Unknown names come from the URL: keep them out of metric labels.
    let stream_label = if known_stream { stream.as_str() } else { "unknown" };
    let client_opt = client_opt.map(|Extension(client)| client);
    let (status, response) = match accept_records(&state, &stream, client_opt.as_ref(), &headers, body).await
    {
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

/// The in-flight bytes a request holds: charged as its buffers grow, given back when they are let
/// go, and all of it when the request ends however it ends. The gauge follows.
struct InFlight<'a> {
    state: &'a HttpState,
    held_bytes: usize,
    /// The last charge that did not fit.
    refused_bytes: usize,
}

impl<'a> InFlight<'a> {
    fn new(state: &'a HttpState) -> Self {
        Self { state, held_bytes: 0, refused_bytes: 0 }
    }

    /// The refusal for a charge that did not fit: 413 when this request alone needs more than
    /// the whole limit (a retry could never pass), 503 when others hold the rest.
    fn refusal(&self) -> Refusal {
        let limit = self.state.http.max_in_flight_bytes;
        let needed = self.held_bytes.saturating_add(self.refused_bytes);
        if needed > limit {
            return Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                RejectReason::TooLarge,
                format!(
                    "the request needs {needed} bytes while handled, more than the in-flight limit of {limit} \
                     bytes (http.max_in_flight_bytes); send smaller requests"
                ),
            );
        }
        Refusal::from_body_error(BodyError::OverBudget)
    }
}

impl MemoryBudget for InFlight<'_> {
    fn grow(&mut self, bytes: usize) -> bool {
        if bytes == 0 {
            return true;
        }
        self.refused_bytes = bytes;
        let Ok(permits) = u32::try_from(bytes) else { return false };
        let Ok(permit) = self.state.in_flight_bytes.try_acquire_many(permits) else { return false };
        permit.forget();
        self.refused_bytes = 0;
        self.held_bytes += bytes;
        self.state.metrics.add_in_flight_bytes(i64::from(permits));
        true
    }

    fn shrink(&mut self, bytes: usize) {
        let bytes = bytes.min(self.held_bytes);
        self.held_bytes -= bytes;
        self.state.in_flight_bytes.add_permits(bytes);
        self.state.metrics.add_in_flight_bytes(-i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.shrink(self.held_bytes);
    }
}

/// Reads the body within `http.max_body_bytes` and `http.request_body_timeout_ms`, charging its
/// buffer to `in_flight` before it grows (a declared length is charged, and refused, up front).
async fn read_body(
    state: &HttpState,
    headers: &HeaderMap,
    body: Body,
    in_flight: &mut InFlight<'_>,
) -> Result<Vec<u8>, Refusal> {
    let max_body_bytes = state.http.max_body_bytes;
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            RejectReason::TooLarge,
            format!("body exceeds {max_body_bytes} bytes (http.max_body_bytes)"),
        )
    };
    let declared_opt =
        header_str(headers, header::CONTENT_LENGTH).and_then(|value| value.parse::<usize>().ok());
    let mut raw = Vec::new();
    if let Some(declared) = declared_opt {
        if declared > max_body_bytes {
            return Err(too_large());
        }
        if !in_flight.grow(declared) {
            return Err(in_flight.refusal());
        }
        raw.reserve_exact(declared);
    }
    let mut charged = declared_opt.unwrap_or(0);
    let timeout = Duration::from_millis(state.http.request_body_timeout_ms);
    let reading = async {
        let mut frames = body.into_data_stream();
        while let Some(frame) = frames.next().await {
            let chunk = frame.map_err(|error| {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    RejectReason::Malformed,
                    format!("failed to read the body: {}", chain_text(&error)),
                )
            })?;
            let needed = raw.len() + chunk.len();
            if needed > max_body_bytes {
                return Err(too_large());
            }
            if needed > charged {
                // Doubling keeps copies linear; the cap keeps the buffer within the body limit.
                let new_capacity = (charged * 2).max(needed).max(64 * 1024).min(max_body_bytes);
                if !in_flight.grow(new_capacity - charged) {
                    return Err(in_flight.refusal());
                }
                charged = new_capacity;
                raw.reserve_exact(new_capacity - raw.len());
            }
            raw.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, reading).await {
        Ok(Ok(())) => Ok(raw),
        Ok(Err(refusal)) => Err(refusal),
        Err(_) => Err(Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            RejectReason::Timeout,
            format!(
                "the body did not arrive within {} ms (http.request_body_timeout_ms); {} bytes were received, \
                 nothing was written",
                timeout.as_millis(),
                raw.len()
            ),
        )),
    }
}

/// The whole request: Ok with the number of records acknowledged by Kafka, or the refusal with
/// the number of records it covers.
async fn accept_records(
    state: &HttpState,
    stream: &str,
    client_opt: Option<&CertifiedClient>,
    headers: &HeaderMap,
    body: Body,
) -> Result<usize, (Refusal, usize)> {
    let refuse = |refusal: Refusal| (refusal, 0);
    let authorization_opt = header_str(headers, header::AUTHORIZATION);
    // A device certificate authenticates its connection for every stream, in place of a token;
    // what it limits is the device the readings may name.
    let (decision, device_opt) = match client_opt {
        None if state.device_certificates_required => {
            return Err(refuse(Refusal::new(
                StatusCode::UNAUTHORIZED,
                RejectReason::Unauthenticated,
                "writing needs a device certificate (http.tls_client_certificates = \"required\"); \
                 the connection presented none",
            )));
        }
        None => (state.authorizer.authorize(authorization_opt, stream), None),
        Some(CertifiedClient::Device(device_id)) => {
            if !may_write(&state.http.tls_client_streams, stream) {
                return Err(refuse(Refusal::new(
                    StatusCode::FORBIDDEN,
                    RejectReason::Forbidden,
                    format!(
                        "device certificates may not write stream '{}' (http.tls_client_streams)",
                        cut(stream)
                    ),
                )));
            }
            (AuthDecision::Allowed, Some(&**device_id))
        }
        Some(CertifiedClient::Unnamed(why)) => {
            return Err(refuse(Refusal::new(
                StatusCode::FORBIDDEN,
                RejectReason::Forbidden,
                format!("the client certificate names no device: {why}"),
            )));
        }
    };
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
            format!("stream '{}' does not exist; known streams: {}", cut(stream), known.join(", ")),
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
    let encoding = records::body_encoding(header_str(headers, header::CONTENT_ENCODING))
        .map_err(|error| refuse(Refusal::from_body_error(error)))?;
    if !state.producer.is_broker_reachable() {
        return Err(refuse(Refusal::unavailable(
            "the Kafka broker is unreachable; nothing was written, retry later",
        )));
    }
    let mut in_flight = InFlight::new(state);
    let raw = read_body(state, headers, body, &mut in_flight).await.map_err(refuse)?;
    let raw_charge = in_flight.held_bytes;
    let decoded = records::decompress(raw, encoding, state.http.max_body_bytes, &mut in_flight)
        .map_err(|error| refuse(body_refusal(&in_flight, error)))?;
    if encoding != BodyEncoding::Identity {
        // The compressed body is gone: only the decoded one is held now.
        in_flight.shrink(raw_charge);
    }
    let decoded_charge = in_flight.held_bytes;
    let encoded =
        records::encode_body(schema, &decoded, format, &state.record_rules, now_micros(), &mut in_flight);
    drop(decoded);
    in_flight.shrink(decoded_charge);
    let batch = match encoded {
        Ok(batch) => batch,
        Err(BatchError::Body(error)) => return Err(refuse(body_refusal(&in_flight, error))),
        Err(BatchError::Rejected { rejections, num_records }) => {
            let message = format!(
                "{} of {num_records} records are invalid; nothing was written",
                rejections.num_rejected_records
            );
            let refusal =
                Refusal::listing(StatusCode::BAD_REQUEST, RejectReason::Invalid, message, rejections);
            return Err((refusal, num_records));
        }
    };
    let num_records = batch.records.len();
    if let Some(device_id) = device_opt {
        let refusal_opt = other_devices_refusal(&batch, device_id);
        if let Some(refusal) = refusal_opt {
            return Err((refusal, num_records));
        }
    }
    let topic = state.topics.stream(stream);
    let outgoing = batch.records.iter().map(|record| OutgoingRecord {
        key: &record.key,
        event_time_micros: record.event_time_micros,
        value: batch.value(record),
    });
    match state.producer.produce_batch(&topic, &schema.fingerprint_hex(), outgoing).await {
        Ok(()) => Ok(num_records),
        Err(error) => {
            tracing::warn!(%topic, error = %chain_text(&error), "produce failed");
            let message = match error {
                ProduceError::QueueFull => "the producer queue is full; part of the request may have been written: retry the whole request shortly (duplicates are dropped by device_id and seq)".to_string(),
                ProduceError::BrokerUnreachable => {
                    "the Kafka broker is unreachable; nothing was written, retry later".to_string()
                }
                other => format!(
                    "{}; some records may have been written: retry the whole request (duplicates are dropped by device_id and seq)",
                    chain_text(&other)
                ),
            };
            Err((Refusal::unavailable(message), num_records))
        }
    }
}

/// The refusal of a batch from a certified device that names another device, listing (up to the
/// usual limit) every reading that does. All or nothing, as for invalid readings.
fn other_devices_refusal(batch: &records::EncodedBatch, device_id: &str) -> Option<Refusal> {
    let mut rejections = Rejections::default();
    for (index, record) in batch.records.iter().enumerate().filter(|(_, record)| record.key != device_id) {
        rejections.add_record([RejectedRecord {
            index,
            field: Some(KEY_FIELD.to_string()),
            reason: format!(
                "'{}' is not the device '{}' named by the client certificate",
                cut(&record.key),
                cut(device_id)
            ),
        }]);
    }
    if rejections.is_empty() {
        return None;
    }
    let message = format!(
        "{} of {} records name another device than the client certificate's; nothing was written",
        rejections.num_rejected_records,
        batch.records.len()
    );
    Some(Refusal::listing(StatusCode::FORBIDDEN, RejectReason::Forbidden, message, rejections))
}

/// A body error as an answer; over the in-flight budget it depends on what the request holds.
fn body_refusal(in_flight: &InFlight<'_>, error: BodyError) -> Refusal {
    match error {
        BodyError::OverBudget => in_flight.refusal(),
        other => Refusal::from_body_error(other),
    }
}

/// A name from the request, cut for an answer: a URL can be hundreds of kilobytes long.
fn cut(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    match text.char_indices().nth(MAX_CHARS) {
        None => text.to_string(),
        Some((end, _)) => format!("{}...", &text[..end]),
    }
}
