//! The metrics of ingest's Kafka producer; the device API's own (`sluice_ingest_records_*`,
//! requests, connections) come from `sluice_device_api::DeviceApiMetrics`.

use std::time::Duration;

use opentelemetry::KeyValue;
use sluice_telemetry::{Counter, Histogram};

#[derive(Debug)]
pub(crate) struct ProducerMetrics {
    produce_duration: Histogram<f64>,
    producer_replacements: Counter<u64>,
}

impl ProducerMetrics {
    pub(crate) fn new() -> Self {
        let meter = sluice_telemetry::meter("sluice-ingest");
        Self {
            produce_duration: meter
                .f64_histogram("sluice_ingest_produce_duration_seconds")
                .with_unit("s")
                .with_boundaries(sluice_telemetry::LATENCY_BUCKETS_SECONDS.to_vec())
                .with_description("Time from producing a batch to the broker acknowledging all of it")
                .build(),
            producer_replacements: meter
                .u64_counter("sluice_ingest_producer_replacements")
                .with_unit("{producer}")
                .with_description("Kafka producers replaced after a fatal error, by librdkafka error code")
                .build(),
        }
    }

    pub(crate) fn record_produce(&self, topic: &str, elapsed: Duration, succeeded: bool) {
        self.produce_duration.record(
            elapsed.as_secs_f64(),
            &[
                KeyValue::new("topic", topic.to_string()),
                KeyValue::new("outcome", if succeeded { "ok" } else { "error" }),
            ],
        );
    }

    pub(crate) fn record_producer_replaced(&self, error_code: &str) {
        self.producer_replacements.add(1, &[KeyValue::new("error", error_code.to_string())]);
    }
}
