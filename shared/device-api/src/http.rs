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
use sluice_schema::{KEY_FIELD, SchemaRegistry};
use tokio::sync::Semaphore;
use tracing::instrument;

use crate::auth::{AuthDecision, Authorizer, may_write};
use crate::config::HttpConfig;
use crate::forwarded::{self, ForwardedValidator};
use crate::metrics::{DeviceApiMetrics, RejectReason};
use crate::records::{
    self, BatchError, BodyEncoding, BodyError, MemoryBudget, RecordRules, RejectedRecord, Rejections,
};
use crate::sink::{RecordSink, SinkError};
use crate::tls::CertifiedClient;
use sluice_clock::now_micros;

const TRANSPORT: &str = "http";
/// Seconds a client should wait before retrying after a 503.
const RETRY_AFTER_SECS: &str = "1";

pub(crate) struct HttpState<S> {
    pub(crate) http: HttpConfig,
    pub(crate) record_rules: RecordRules,
    pub(crate) schemas: SchemaRegistry,
    pub(crate) authorizer: Authorizer,
    /// `http.tls_client_certificates = "required"` with a device CA: no token stands in for one.
    pub(crate) device_certificates_required: bool,
    pub(crate) sink: S,
    pub(crate) metrics: Arc<DeviceApiMetrics>,
    pub(crate) supervisor: crate::tasks::Supervisor,
    pub(crate) forwarded: ForwardedValidator,
    pub(crate) in_flight_bytes: Semaphore,
    pub(crate) shutting_down: AtomicBool,
}

impl<S> std::fmt::Debug for HttpState<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState").field("http", &self.http).finish_non_exhaustive()
    }
}

pub(crate) fn router<S: RecordSink>(state: Arc<HttpState<S>>) -> Router {
    Router::new()
        .route("/v1/streams/{stream}/records", post(ingest_records::<S>))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readiness::<S>))
        .with_state(state)
}

async fn readiness<S: RecordSink>(State(state): State<Arc<HttpState<S>>>) -> Response {
    if let Some(failure) = state.supervisor.failure() {
        let message = format!("background task {} failed: {}", failure.task, failure.cause);
        return error_response(StatusCode::SERVICE_UNAVAILABLE, &message);
    }
    if state.shutting_down.load(Ordering::Relaxed) {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    if let Some(reason) = state.sink.unavailable_reason() {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, &reason);
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
                "the server is at its in-flight byte limit (http.max_in_flight_bytes); nothing was written, retry shortly",
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
async fn ingest_records<S: RecordSink>(
    State(state): State<Arc<HttpState<S>>>,
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
struct InFlight<'a, S> {
    state: &'a HttpState<S>,
    held_bytes: usize,
    /// The last charge that did not fit.
    refused_bytes: usize,
}

impl<'a, S> InFlight<'a, S> {
    fn new(state: &'a HttpState<S>) -> Self {
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

impl<S> MemoryBudget for InFlight<'_, S> {
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

impl<S> Drop for InFlight<'_, S> {
    fn drop(&mut self) {
        self.shrink(self.held_bytes);
    }
}

/// Reads the body within `http.max_body_bytes` and `http.request_body_timeout_ms`, charging its
/// buffer to `in_flight` before it grows (a declared length is charged, and refused, up front).
async fn read_body<S>(
    state: &HttpState<S>,
    headers: &HeaderMap,
    body: Body,
    in_flight: &mut InFlight<'_, S>,
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

/// The whole request: Ok with the number of records the sink stored, or the refusal with
/// the number of records it covers.
async fn accept_records<S: RecordSink>(
    state: &HttpState<S>,
    stream: &str,
    client_opt: Option<&CertifiedClient>,
    headers: &HeaderMap,
    body: Body,
) -> Result<usize, (Refusal, usize)> {
    let refuse = |refusal: Refusal| (refusal, 0);
    let authorization_opt = header_str(headers, header::AUTHORIZATION);
    // A device certificate authenticates its connection for every stream, in place of a token;
    // what it limits is the device the readings may name.
    let mut gateway_opt = None;
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
        Some(CertifiedClient::Gateway(gateway))
            if state.http.tls_gateway_names.iter().any(|name| **name == **gateway) =>
        {
            if !may_write(&state.http.tls_client_streams, stream) {
                return Err(refuse(Refusal::new(
                    StatusCode::FORBIDDEN,
                    RejectReason::Forbidden,
                    format!(
                        "client certificates may not write stream '{}' (http.tls_client_streams)",
                        cut(stream)
                    ),
                )));
            }
            gateway_opt = Some(&**gateway);
            (AuthDecision::Allowed { token_name_opt: None }, None)
        }
        // The gateway unit on a name not listed gives nothing: such a certificate is a device's.
        Some(CertifiedClient::Device(device_id) | CertifiedClient::Gateway(device_id)) => {
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
            (AuthDecision::Allowed { token_name_opt: None }, Some(&**device_id))
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
    let content_type_opt = header_str(headers, header::CONTENT_TYPE);
    let format_opt = if forwarded::is_edge_batches(content_type_opt) {
        None
    } else {
        Some(
            records::body_format(content_type_opt)
                .map_err(|error| refuse(Refusal::from_body_error(error)))?,
        )
    };
    // A gateway's positions are kept per edge id: under the token's name, so that one token
    // holder cannot pass for another's gateway and have its readings taken for repeats.
    let edge_id_opt = match format_opt {
        Some(_) if gateway_opt.is_some() => {
            return Err(refuse(Refusal::new(
                StatusCode::FORBIDDEN,
                RejectReason::Forbidden,
                format!(
                    "a gateway certificate only forwards gateway batches ({}); devices send their readings                      with their own certificate",
                    forwarded::EDGE_BATCHES_CONTENT_TYPE
                ),
            )));
        }
        Some(_) => None,
        // A device certificate speaks for one device; a gateway forwards for many, with a token.
        None if device_opt.is_some() => {
            return Err(refuse(Refusal::new(
                StatusCode::FORBIDDEN,
                RejectReason::Forbidden,
                "a device certificate cannot forward a gateway's batches; gateways authenticate with a token or a gateway certificate",
            )));
        }
        None => {
            // Under the certificate's name, marked so that it cannot be a token's name.
            let certified_opt = gateway_opt.map(|gateway| format!("certificate:{gateway}"));
            let owner_opt = match &decision {
                AuthDecision::Allowed { token_name_opt } => token_name_opt.as_deref(),
                _ => None,
            };
            Some(edge_id(headers, certified_opt.as_deref().or(owner_opt)).map_err(refuse)?)
        }
    };
    let encoding = records::body_encoding(header_str(headers, header::CONTENT_ENCODING))
        .map_err(|error| refuse(Refusal::from_body_error(error)))?;
    if let Some(reason) = state.sink.unavailable_reason() {
        return Err(refuse(Refusal::unavailable(format!("{reason}: nothing was written, retry later"))));
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
    let encoded = match format_opt {
        Some(format) => {
            records::encode_body(schema, &decoded, format, &state.record_rules, now_micros(), &mut in_flight)
        }
        None => state.forwarded.check(
            stream,
            edge_id_opt.as_deref().unwrap_or_default(),
            &decoded,
            &state.record_rules,
            now_micros(),
            &mut in_flight,
        ),
    };
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
    match state.sink.store(stream, schema, &batch).await {
        Ok(()) => Ok(num_records),
        Err(SinkError::InsufficientStorage { message }) => Err((
            Refusal::new(StatusCode::INSUFFICIENT_STORAGE, RejectReason::InsufficientStorage, message),
            num_records,
        )),
        // The sink logged why.
        Err(error @ (SinkError::Unavailable { .. } | SinkError::Refused { .. })) => {
            Err((Refusal::unavailable(error.to_string()), num_records))
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

/// The edge id of a forwarding request: its `Sluice-Edge-Id`, under the name of whoever
/// authenticated it (a token's name, or a gateway certificate's) when anyone did.
fn edge_id(headers: &HeaderMap, owner_opt: Option<&str>) -> Result<String, Refusal> {
    let bad = |message: String| Refusal::new(StatusCode::BAD_REQUEST, RejectReason::Malformed, message);
    let presented = header_str(headers, header::HeaderName::from_static(forwarded::EDGE_ID_HEADER))
        .ok_or_else(|| {
            bad(format!("forwarded batches need a '{}' header naming the gateway", forwarded::EDGE_ID_HEADER))
        })?;
    if let Some(problem) = forwarded::edge_id_problem(presented) {
        return Err(bad(format!("the '{}' header is not usable: {problem}", forwarded::EDGE_ID_HEADER)));
    }
    let edge_id = match owner_opt {
        Some(owner) => format!("{owner}/{presented}"),
        None => presented.to_string(),
    };
    if edge_id.len() > forwarded::MAX_EDGE_ID_BYTES {
        return Err(bad(format!(
            "the gateway's authenticated name and the '{}' header together exceed {} bytes",
            forwarded::EDGE_ID_HEADER,
            forwarded::MAX_EDGE_ID_BYTES
        )));
    }
    Ok(edge_id)
}

/// A body error as an answer; over the in-flight budget it depends on what the request holds.
fn body_refusal<S>(in_flight: &InFlight<'_, S>, error: BodyError) -> Refusal {
    match error {
        BodyError::OverBudget => in_flight.refusal(),
        other => Refusal::from_body_error(other),
    }
}

/// A name from the request, cut for an answer: a URL can be hundreds of kilobytes long.
pub(crate) fn cut(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    match text.char_indices().nth(MAX_CHARS) {
        None => text.to_string(),
        Some((end, _)) => format!("{}...", &text[..end]),
    }
}
