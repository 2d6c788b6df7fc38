//! Kafka over TLS and mutual TLS through the `kafka.client` passthrough (issue #18): ingest
//! produces and the compactor's consumer group reads through a TLS proxy that requires client
//! certificates, with the Tansu broker advertising only the proxy, so that every request after
//! bootstrap is on TLS too; the readings land in the lake once each. A client without a
//! certificate gets nothing through. SASL is not tested here: the broker accepts no SASL login
//! (docs/operations.md, "Kafka over TLS and SASL").

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_integration_tests::{
    Broker, CompactorService, IngestService, TestCa, TlsProxy, assert_exactly_once, compactor_config,
    ingest_config, telemetry_readings, wait_for_lake_rows,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_and_the_compactor_reach_kafka_over_mutual_tls_and_the_readings_land_once() {
    let directory = tempfile::TempDir::new().unwrap();
    let ca = TestCa::new(directory.path(), "kafka").unwrap();
    let server = ca.server("kafka-proxy").unwrap();
    let client = ca.client("sluice-services", Some("sluice-services"), 11).unwrap();
    let listener = TlsProxy::bind().await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let broker = Broker::start_advertising(proxy_port).await.unwrap();
    let _proxy =
        TlsProxy::serve(listener, ([127, 0, 0, 1], broker.port).into(), &server, Some(&ca.cert_path))
            .unwrap();
    let tls_properties = [
        ("security.protocol", "SSL".to_string()),
        ("ssl.ca.location", ca.cert_path.display().to_string()),
        ("ssl.certificate.location", client.cert_path.display().to_string()),
        ("ssl.key.location", client.key_path.display().to_string()),
    ];
    let bootstrap = format!("127.0.0.1:{proxy_port}");

    let mut ingest_settings = ingest_config(&broker);
    ingest_settings.kafka.bootstrap_servers = bootstrap.clone();
    for (key, value) in &tls_properties {
        ingest_settings.kafka.client.0.insert(key.to_string(), value.clone());
    }
    let topic_prefix = ingest_settings.kafka.topic_prefix.clone();
    let ingest = IngestService::start(ingest_settings).await.unwrap();
    let readings = telemetry_readings(200, 5, 600_000_000);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/streams/telemetry/records", ingest.base_url))
        .json(&readings)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK, "{}", response.text().await.unwrap());

    let lake = tempfile::TempDir::new().unwrap();
    let mut compactor_settings = compactor_config(&broker, &topic_prefix, lake.path());
    compactor_settings.kafka.bootstrap_servers = bootstrap.clone();
    for (key, value) in &tls_properties {
        compactor_settings.kafka.client.0.insert(key.to_string(), value.clone());
    }
    let compactor = CompactorService::start(compactor_settings).await.unwrap();
    let rows = wait_for_lake_rows(lake.path(), "telemetry", readings.len(), Duration::from_secs(60)).await;
    assert_exactly_once(&rows, &readings);

    // The same CA but no client certificate: the proxy refuses the handshake, so nothing is
    // delivered and the producer says why.
    let anonymous: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("security.protocol", "SSL")
        .set("ssl.ca.location", ca.cert_path.display().to_string())
        .set("message.timeout.ms", "3000")
        .create()
        .unwrap();
    let delivery = anonymous
        .send(
            FutureRecord::to(&format!("{topic_prefix}.telemetry")).key("intruder").payload("x"),
            Duration::from_secs(5),
        )
        .await;
    assert!(delivery.is_err(), "delivered without a client certificate: {delivery:?}");

    compactor.stop().await.unwrap();
    ingest.stop().await.unwrap();
}
