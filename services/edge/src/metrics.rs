//! The gateway's own metrics; the device API's (`sluice_edge_records_accepted`,
//! `sluice_edge_records_rejected{reason="insufficient_storage"}`, requests, connections) come
//! from `sluice_device_api::DeviceApiMetrics`.

use opentelemetry::KeyValue;
use sluice_telemetry::{Counter, Gauge};

use crate::forward::FailureReason;
use crate::spool::Spool;

#[derive(Debug)]
pub(crate) struct EdgeMetrics {
    spool_bytes: Gauge<u64>,
    spool_max_bytes: Gauge<u64>,
    spool_batches: Gauge<u64>,
    dropped_batches: Counter<u64>,
    oldest_age: Gauge<f64>,
    forwarded_readings: Counter<u64>,
    forward_failures: Counter<u64>,
}

impl EdgeMetrics {
    pub(crate) fn new(max_bytes: u64) -> Self {
        let meter = sluice_telemetry::meter("sluice-edge");
        let metrics = Self {
            spool_bytes: meter
                .u64_gauge("sluice_edge_spool_bytes")
                .with_unit("By")
                .with_description(
                    "Bytes of spool files: readings not yet forwarded, and the rest of their files",
                )
                .build(),
            spool_max_bytes: meter
                .u64_gauge("sluice_edge_spool_max_bytes")
                .with_unit("By")
                .with_description("spool.max_bytes, for alerts on how full the spool is")
                .build(),
            spool_batches: meter
                .u64_gauge("sluice_edge_spool_batches")
                .with_unit("{batch}")
                .with_description("Accepted requests (batches of readings) in the spool, not yet forwarded")
                .build(),
            dropped_batches: meter
                .u64_counter("sluice_edge_spool_dropped_batches")
                .with_unit("{batch}")
                .with_description(
                    "Batches deleted unforwarded to make room (spool.full_policy = \"drop_oldest\")",
                )
                .build(),
            oldest_age: meter
                .f64_gauge("sluice_edge_spool_oldest_age_seconds")
                .with_unit("s")
                .with_description(
                    "How long the oldest unforwarded batch has waited in the spool; 0 when empty",
                )
                .build(),
            forwarded_readings: meter
                .u64_counter("sluice_edge_forwarded_readings")
                .with_unit("{reading}")
                .with_description("Readings central ingest accepted (answered 200) from this gateway")
                .build(),
            forward_failures: meter
                .u64_counter("sluice_edge_forward_failures")
                .with_unit("{request}")
                .with_description("Forwarding requests that did not go through, by reason")
                .build(),
        };
        metrics.spool_max_bytes.record(max_bytes, &[]);
        // Counters exported from the start, at 0: `increase()` over a series that appears with
        // its first event misses that event, and an alert would miss the first drop.
        metrics.dropped_batches.add(0, &[]);
        metrics.forwarded_readings.add(0, &[]);
        for reason in FailureReason::ALL {
            metrics.forward_failures.add(0, &[KeyValue::new("reason", reason.as_label())]);
        }
        metrics
    }

    pub(crate) fn record_usage(&self, spool: &Spool) {
        let (bytes, batches) = spool.usage();
        self.spool_bytes.record(bytes, &[]);
        self.spool_batches.record(batches, &[]);
    }

    /// The head of the spool was received at `received_at_micros` (now, when it is empty).
    pub(crate) fn record_oldest_received(&self, received_at_micros: i64) {
        let age_micros = sluice_clock::now_micros().saturating_sub(received_at_micros).max(0);
        self.oldest_age.record(age_micros as f64 / 1e6, &[]);
    }

    pub(crate) fn record_forwarded(&self, num_readings: usize) {
        self.forwarded_readings.add(num_readings as u64, &[]);
    }

    pub(crate) fn record_forward_failure(&self, reason: FailureReason) {
        self.forward_failures.add(1, &[KeyValue::new("reason", reason.as_label())]);
    }

    pub(crate) fn record_dropped_batches(&self, num_batches: u64) {
        self.dropped_batches.add(num_batches, &[]);
    }
}
