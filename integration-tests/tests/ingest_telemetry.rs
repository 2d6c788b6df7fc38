//! Ingest's traces and metrics reach a real OTLP/gRPC receiver on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeSet;
use std::time::Duration;

use fake_opentelemetry_collector::FakeCollectorServer;
use reqwest::StatusCode;
use serde_json::json;
use sluice_integration_tests::{Broker, IngestService, ingest_config, now_micros};
use sluice_telemetry::{OtlpProtocol, TelemetryConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_are_exported_over_otlp() {
    let mut collector = FakeCollectorServer::start().await.unwrap();
    let telemetry_config = TelemetryConfig {
        otlp_endpoint: collector.endpoint(),
        otlp_protocol: OtlpProtocol::Grpc,
        metrics_interval_ms: 200,
        ..TelemetryConfig::default()
    };
    // Installs the process-wide providers; nextest runs each test in its own process.
    let telemetry = sluice_telemetry::init(&telemetry_config, "sluice-ingest", "test").unwrap();
    let broker = Broker::start().await.unwrap();
    let ingest = IngestService::start(ingest_config(&broker)).await.unwrap();
    let client = reqwest::Client::new();
    let response = client
        .post(ingest.records_url("telemetry"))
        .json(&json!([{"device_id": "otel", "ts": now_micros(), "seq": 1}]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response =
        client.post(ingest.records_url("telemetry")).json(&json!({"device_id": 1})).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let expected = [
        "sluice_ingest_records_accepted",
        "sluice_ingest_records_rejected",
        "sluice_ingest_request_duration_seconds",
        "sluice_ingest_produce_duration_seconds",
        "sluice_ingest_in_flight_bytes",
    ];
    // An export taken before the requests above holds only the gauge: keep reading exports
    // until one carries the counters and histograms too.
    let mut names: BTreeSet<String> = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !expected.iter().all(|name| names.contains(*name)) && std::time::Instant::now() < deadline {
        let metrics = collector.exported_metrics(1, Duration::from_secs(1)).await;
        names.extend(
            metrics.iter().flat_map(|export| export.metrics.iter().map(|metric| metric.name.clone())),
        );
    }
    for name in expected {
        assert!(names.contains(name), "{name} not exported; got {names:?}");
    }
    ingest.stop().await.unwrap();
    telemetry.shutdown();
    let spans = collector.exported_spans(2, Duration::from_secs(10)).await;
    let span_names: BTreeSet<&str> = spans.iter().map(|span| span.name.as_str()).collect();
    assert!(span_names.contains("ingest_records"), "{span_names:?}");
    assert!(span_names.contains("produce_batch"), "{span_names:?}");
}
