//! Ingest as a service: TLS on the listener, graceful shutdown that finishes requests in flight,
//! and the binary's configuration handling.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use sluice_integration_tests::{Broker, IngestService, consume_topic, ingest_config, now_micros};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_serves_with_the_configured_certificate() {
    let broker = Broker::start().await.unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let directory = tempfile::TempDir::new().unwrap();
    let cert_path = directory.path().join("tls.crt");
    let key_path = directory.path().join("tls.key");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let mut config = ingest_config(&broker);
    config.http.tls_cert_path = Some(cert_path);
    config.http.tls_key_path = Some(key_path);
    let ingest = IngestService::start(config).await.unwrap();
    let port = ingest.base_url.rsplit(':').next().unwrap().to_string();

    let trusted = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], port.parse().unwrap()).into())
        .build()
        .unwrap();
    let url = format!("https://localhost:{port}/v1/streams/telemetry/records");
    let response = trusted
        .post(&url)
        .json(&json!({"device_id": "tls-1", "ts": now_micros(), "seq": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // Plain HTTP on the TLS port gets no answer, and an untrusting client refuses the certificate.
    let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/healthz")).send().await;
    assert!(plain.is_err() || plain.unwrap().status() != StatusCode::OK);
    let untrusting = reqwest::Client::builder().tls_built_in_root_certs(false).build().unwrap();
    assert!(untrusting.get(format!("https://127.0.0.1:{port}/healthz")).send().await.is_err());

    let records = consume_topic(
        &broker.bootstrap_servers(),
        &ingest.stream_topic("telemetry"),
        1,
        Duration::from_millis(500),
    )
    .await
    .unwrap();
    assert_eq!(records.len(), 1);
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_and_then_refuses_connections() {
    let broker = Broker::start().await.unwrap();
    let ingest = IngestService::start(ingest_config(&broker)).await.unwrap();
    let url = ingest.records_url("telemetry");
    let topic = ingest.stream_topic("telemetry");
    let client = reqwest::Client::new();
    let now = now_micros();
    // Large enough that shutdown starts while these requests are being handled.
    let bodies: Vec<String> = (0..4)
        .map(|batch| {
            (0..5_000)
                .map(|index| {
                    format!(
                        "{}\n",
                        json!({"device_id": format!("d{batch}-{}", index % 50), "ts": now, "seq": index})
                    )
                })
                .collect()
        })
        .collect();
    let requests: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let request = client.post(&url).header("content-type", "application/x-ndjson").body(body).send();
            tokio::spawn(request)
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let base_url = ingest.base_url.clone();
    ingest.stop().await.unwrap();

    let mut num_accepted = 0;
    for request in requests {
        // A request either completed (200) or never got in (connection refused): none is cut off.
        match request.await.unwrap() {
            Ok(response) => {
                assert_eq!(response.status(), StatusCode::OK);
                num_accepted += 5_000;
            }
            Err(error) => assert!(error.is_connect() || error.is_request(), "{error}"),
        }
    }
    assert!(client.get(format!("{base_url}/healthz")).send().await.is_err(), "listener closed");
    let records =
        consume_topic(&broker.bootstrap_servers(), &topic, num_accepted, Duration::from_millis(1000))
            .await
            .unwrap();
    assert_eq!(records.len(), num_accepted, "every acknowledged record is in Kafka, nothing else");
}
