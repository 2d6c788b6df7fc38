//! The device API's metrics, named for the service that serves it (`sluice_ingest_*`,
//! `sluice_edge_*`). Labels are a small fixed set (stream, reason, transport); never a device
//! id. Recorded once per request or batch, not per record.

use std::time::Duration;

use opentelemetry::KeyValue;
use sluice_telemetry::{Counter, Histogram, UpDownCounter};

#[derive(Debug)]
pub struct DeviceApiMetrics {
    records_accepted: Counter<u64>,
    records_rejected: Counter<u64>,
    request_duration: Histogram<f64>,
    in_flight_bytes: UpDownCounter<i64>,
    http_connections: UpDownCounter<i64>,
    http_connections_closed: Counter<u64>,
    mqtt_messages_dropped: Counter<u64>,
    task_failures: Counter<u64>,
}

/// Why records were refused, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RejectReason {
    Invalid,
    Malformed,
    TooLarge,
    UnsupportedMediaType,
    Unauthenticated,
    Forbidden,
    UnknownStream,
    Unavailable,
    Timeout,
    /// The sink had no room (the edge gateway's spool is full).
    InsufficientStorage,
}

impl RejectReason {
    pub(crate) fn as_label(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Malformed => "malformed",
            Self::TooLarge => "too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::UnknownStream => "unknown_stream",
            Self::Unavailable => "unavailable",
            Self::Timeout => "timeout",
            Self::InsufficientStorage => "insufficient_storage",
        }
    }
}

impl DeviceApiMetrics {
    /// The metrics of service `service` (`ingest`, `edge`): every name starts `sluice_<service>_`.
    pub fn new(service: &'static str) -> Self {
        let meter = sluice_telemetry::meter("sluice-device-api");
        let name = |suffix: &str| format!("sluice_{service}_{suffix}");
        Self {
            records_accepted: meter
                .u64_counter(name("records_accepted"))
                .with_unit("{record}")
                .with_description(
                    "Records the service stored (Kafka acknowledged them; the edge synced them to its spool)",
                )
                .build(),
            records_rejected: meter
                .u64_counter(name("records_rejected"))
                .with_unit("{record}")
                .with_description("Records refused, by reason (invalid ones become dead letters on MQTT)")
                .build(),
            request_duration: meter
                .f64_histogram(name("request_duration_seconds"))
                .with_unit("s")
                .with_boundaries(sluice_telemetry::LATENCY_BUCKETS_SECONDS.to_vec())
                .with_description("Time to answer a request or MQTT message")
                .build(),
            in_flight_bytes: meter
                .i64_up_down_counter(name("in_flight_bytes"))
                .with_unit("By")
                .with_description("Request bytes being validated or stored")
                .build(),
            http_connections: meter
                .i64_up_down_counter(name("http_connections"))
                .with_unit("{connection}")
                .with_description("Open HTTP connections (at most http.max_connections)")
                .build(),
            http_connections_closed: meter
                .u64_counter(name("http_connections_closed"))
                .with_unit("{connection}")
                .with_description("HTTP connections the service closed or refused, by reason")
                .build(),
            mqtt_messages_dropped: meter
                .u64_counter(name("mqtt_messages_dropped"))
                .with_unit("{message}")
                .with_description(
                    "MQTT messages acknowledged without being stored, not even as a dead letter, by reason",
                )
                .build(),
            task_failures: meter
                .u64_counter(name("task_failures"))
                .with_unit("{task}")
                .with_description("Background tasks that failed or panicked (the service then stops)")
                .build(),
        }
    }

    pub(crate) fn record_accepted(&self, stream: &str, transport: &'static str, num_records: usize) {
        self.records_accepted.add(
            num_records as u64,
            &[KeyValue::new("stream", stream.to_string()), KeyValue::new("transport", transport)],
        );
    }

    pub(crate) fn record_rejected(
        &self,
        stream: &str,
        transport: &'static str,
        reason: RejectReason,
        num_records: usize,
    ) {
        self.records_rejected.add(
            num_records as u64,
            &[
                KeyValue::new("stream", stream.to_string()),
                KeyValue::new("transport", transport),
                KeyValue::new("reason", reason.as_label()),
            ],
        );
    }

    pub(crate) fn record_request(&self, transport: &'static str, status: u16, elapsed: Duration) {
        self.request_duration.record(
            elapsed.as_secs_f64(),
            &[KeyValue::new("transport", transport), KeyValue::new("status", i64::from(status))],
        );
    }

    pub(crate) fn record_mqtt_dropped(&self, stream: &str, reason: RejectReason) {
        self.mqtt_messages_dropped.add(
            1,
            &[KeyValue::new("stream", stream.to_string()), KeyValue::new("reason", reason.as_label())],
        );
    }

    pub fn record_task_failure(&self, task: &'static str) {
        self.task_failures.add(1, &[KeyValue::new("task", task)]);
    }

    pub(crate) fn add_in_flight_bytes(&self, bytes: i64) {
        self.in_flight_bytes.add(bytes, &[]);
    }

    pub(crate) fn add_http_connections(&self, num_connections: i64) {
        self.http_connections.add(num_connections, &[]);
    }

    pub(crate) fn record_connection_closed(&self, reason: ConnectionCloseReason) {
        self.http_connections_closed.add(1, &[KeyValue::new("reason", reason.as_label())]);
    }
}

/// Why ingest closed or refused an HTTP connection, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectionCloseReason {
    /// Refused at once: `http.max_connections` were open.
    ConnectionLimit,
    /// No complete request (TLS handshake and headers) within `http.header_read_timeout_ms`.
    HeaderTimeout,
    /// No next request within `http.idle_timeout_ms`.
    IdleTimeout,
    /// The TLS handshake failed.
    TlsHandshake,
}

impl ConnectionCloseReason {
    pub(crate) fn as_label(self) -> &'static str {
        match self {
            Self::ConnectionLimit => "connection_limit",
            Self::HeaderTimeout => "header_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::TlsHandshake => "tls_handshake",
        }
    }
}
