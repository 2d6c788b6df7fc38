//! Ingest as a service: TLS on the listener, graceful shutdown that finishes requests in flight,
//! and the binary's configuration handling.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use sluice_integration_tests::{Broker, IngestService, consume_topic, ingest_config, now_micros, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

const NUM_HELD_REQUESTS: usize = 4;
const RECORDS_PER_HELD_REQUEST: usize = 1_000;

/// Reads one response head (an interim `100 Continue` or the final answer's), up to its blank line.
async fn read_head(connection: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let num_read = connection.read(&mut byte).await.unwrap();
        assert!(num_read > 0, "closed before the head ended: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_and_then_refuses_connections() {
    let broker = Broker::start().await.unwrap();
    let ingest = IngestService::start(ingest_config(&broker)).await.unwrap();
    let address: SocketAddr = ingest.base_url.trim_start_matches("http://").parse().unwrap();
    let topic = ingest.stream_topic("telemetry");
    let now = now_micros();

    // Each request announces its body with `expect: 100-continue`, which ingest (hyper) answers
    // only once the handler reads the body: a request that got `100 Continue` is being handled.
    // Its body is held back until shutdown has begun, so shutdown meets it in flight.
    let mut held_requests: Vec<(TcpStream, String)> = Vec::new();
    for batch in 0..NUM_HELD_REQUESTS {
        let body: String = (0..RECORDS_PER_HELD_REQUEST)
            .map(|index| {
                format!(
                    "{}\n",
                    json!({"device_id": format!("d{batch}-{}", index % 50), "ts": now, "seq": index})
                )
            })
            .collect();
        let mut connection = TcpStream::connect(address).await.unwrap();
        let head = format!(
            "POST /v1/streams/telemetry/records HTTP/1.1\r\nhost: ingest\r\n\
             content-type: application/x-ndjson\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
            body.len()
        );
        connection.write_all(head.as_bytes()).await.unwrap();
        let interim = tokio::time::timeout(Duration::from_secs(10), read_head(&mut connection))
            .await
            .expect("ingest starts reading the body within 10 s");
        assert!(interim.starts_with("HTTP/1.1 100 Continue\r\n"), "{interim}");
        held_requests.push((connection, body));
    }

    let (stopped, answers) =
        tokio::join!(ingest.stop(), async move {
            // Shutdown has begun once the listener is gone: new connections are refused.
            let listener_closed = wait_until(Duration::from_secs(10), move || async move {
                TcpStream::connect(address).await.is_err()
            })
            .await;
            assert!(listener_closed, "the listener closes when shutdown begins");
            let mut answers = Vec::new();
            for (mut connection, body) in held_requests {
                connection.write_all(body.as_bytes()).await.unwrap();
                // Read to the end: ingest closes the connection after its answer while shutting down,
                // and a connection reset (a request cut off) fails the read.
                let mut answer = Vec::new();
                tokio::time::timeout(Duration::from_secs(15), connection.read_to_end(&mut answer))
                    .await
                    .expect("answered within 15 s")
                    .expect("the connection ends after the answer, without a reset");
                answers.push(String::from_utf8(answer).unwrap());
            }
            answers
        });
    stopped.unwrap();

    assert_eq!(answers.len(), NUM_HELD_REQUESTS);
    for answer in &answers {
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "a request in flight at shutdown is served: {answer}"
        );
        assert!(answer.ends_with(&format!("{{\"accepted\":{RECORDS_PER_HELD_REQUEST}}}")), "{answer}");
    }
    assert!(TcpStream::connect(address).await.is_err(), "the listener stays closed");
    let num_accepted = NUM_HELD_REQUESTS * RECORDS_PER_HELD_REQUEST;
    let records =
        consume_topic(&broker.bootstrap_servers(), &topic, num_accepted, Duration::from_millis(1000))
            .await
            .unwrap();
    assert_eq!(records.len(), num_accepted, "every acknowledged record is in Kafka, nothing else");
}
