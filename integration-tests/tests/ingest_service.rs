//! Ingest as a service: TLS on the listener, device certificates (mutual TLS), graceful shutdown
//! that finishes requests in flight, and the binary's configuration handling.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use sha2::{Digest, Sha256};
use sluice_config::Secret;
use sluice_ingest::config::{ClientCertificates, TokenConfig};
use sluice_integration_tests::{
    Broker, IngestService, PemPair, TestCa, consume_topic, ingest_config, now_micros, wait_until,
};
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

/// A client of the listener at `port` that trusts `ca` and presents `identity_opt`.
fn tls_client(ca: &TestCa, identity_opt: Option<&PemPair>, port: u16) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], port).into());
    if let Some(identity) = identity_opt {
        builder = builder.identity(reqwest::Identity::from_pem(&identity.identity_pem()).unwrap());
    }
    builder.build().unwrap()
}

async fn post_reading(
    client: &reqwest::Client,
    port: u16,
    readings: serde_json::Value,
    token_opt: Option<&str>,
) -> reqwest::Result<(StatusCode, serde_json::Value)> {
    let mut request =
        client.post(format!("https://localhost:{port}/v1/streams/telemetry/records")).json(&readings);
    if let Some(token) = token_opt {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status();
    Ok((status, response.json().await.unwrap_or(serde_json::Value::Null)))
}

const GATEWAY_TOKEN: &str = "gateway-token";

/// Ingest on its own broker with device certificates in `mode` and bearer tokens on (one token,
/// [`GATEWAY_TOKEN`]). The device CA has issued `device_a` (CN tractor-7, serial 101) and
/// `revoked` (CN stolen-3, serial 102, on the CA's revocation list).
struct DeviceCertificates {
    broker: Broker,
    directory: tempfile::TempDir,
    server_ca: TestCa,
    device_ca: TestCa,
    device_a: PemPair,
    revoked: PemPair,
    ingest: IngestService,
    port: u16,
}

impl DeviceCertificates {
    async fn start(mode: ClientCertificates) -> Self {
        let broker = Broker::start().await.unwrap();
        let directory = tempfile::TempDir::new().unwrap();
        let server_ca = TestCa::new(directory.path(), "server").unwrap();
        let server = server_ca.server("ingest").unwrap();
        let device_ca = TestCa::new(directory.path(), "devices").unwrap();
        let device_a = device_ca.client("device-a", Some("tractor-7"), 101).unwrap();
        let revoked = device_ca.client("device-r", Some("stolen-3"), 102).unwrap();
        let mut config = ingest_config(&broker);
        config.http.tls_cert_path = Some(server.cert_path.clone());
        config.http.tls_key_path = Some(server.key_path.clone());
        config.http.tls_client_ca_path = Some(device_ca.cert_path.clone());
        config.http.tls_client_crl_path = Some(device_ca.revocation_list("devices", &[102]).unwrap());
        config.http.tls_client_certificates = mode;
        config.http.tls_gateway_names = vec!["site-7".to_string()];
        config.auth.enabled = true;
        config.auth.tokens = vec![TokenConfig {
            name: "gateway".to_string(),
            token_sha256: Secret::new(hex::encode(Sha256::digest(GATEWAY_TOKEN.as_bytes()))),
            streams: vec!["*".to_string()],
        }];
        let ingest = IngestService::start(config).await.unwrap();
        let port: u16 = ingest.base_url.rsplit(':').next().unwrap().parse().unwrap();
        Self { broker, directory, server_ca, device_ca, device_a, revoked, ingest, port }
    }

    /// A client that trusts the listener and presents `identity_opt`.
    fn client(&self, identity_opt: Option<&PemPair>) -> reqwest::Client {
        tls_client(&self.server_ca, identity_opt, self.port)
    }

    async fn post(
        &self,
        client: &reqwest::Client,
        readings: serde_json::Value,
        token_opt: Option<&str>,
    ) -> reqwest::Result<(StatusCode, serde_json::Value)> {
        post_reading(client, self.port, readings, token_opt).await
    }

    /// The keys of the `expected` records that reached Kafka (and of any that came after them
    /// within a second), sorted; then ingest stops.
    async fn stop_with_keys_in_kafka(self, expected: usize) -> Vec<Option<String>> {
        let records = consume_topic(
            &self.broker.bootstrap_servers(),
            &self.ingest.stream_topic("telemetry"),
            expected,
            Duration::from_millis(1_000),
        )
        .await
        .unwrap();
        let mut keys: Vec<_> = records.iter().map(|record| record.key.clone()).collect();
        keys.sort();
        self.ingest.stop().await.unwrap();
        keys
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_certificate_lets_its_connection_write_only_its_own_device() {
    let site = DeviceCertificates::start(ClientCertificates::Required).await;
    let unnamed = site.device_ca.client("device-u", None, 103).unwrap();
    let rogue_ca = TestCa::new(site.directory.path(), "rogue").unwrap();
    let rogue = rogue_ca.client("rogue-a", Some("tractor-7"), 101).unwrap();
    let now = now_micros();

    // Its own device, no token needed; readings naming it in any number are one write.
    let device_client = site.client(Some(&site.device_a));
    let own = json!([{"device_id": "tractor-7", "ts": now, "seq": 1}, {"device_id": "tractor-7", "ts": now, "seq": 2}]);
    let (status, body) = site.post(&device_client, own, None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");

    // A batch naming another device anywhere is refused as a whole, listing what named it.
    let mixed = json!([
        {"device_id": "tractor-7", "ts": now, "seq": 3},
        {"device_id": "tractor-8", "ts": now, "seq": 1},
        {"device_id": "tractor-77", "ts": now, "seq": 1}
    ]);
    let (status, body) = site.post(&device_client, mixed, Some(GATEWAY_TOKEN)).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["num_rejected_records"], 2, "{body}");
    assert_eq!(body["rejected"][0]["index"], 1, "{body}");
    assert_eq!(body["rejected"][1]["index"], 2, "{body}");
    assert!(body["rejected"][0]["reason"].as_str().unwrap().contains("tractor-8"), "{body}");

    // A certificate from the device CA that names no device may write nothing.
    let unnamed_client = site.client(Some(&unnamed));
    let reading = json!({"device_id": "tractor-7", "ts": now, "seq": 4});
    let (status, body) = site.post(&unnamed_client, reading.clone(), None).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"].as_str().unwrap().contains("common name"), "{body}");

    // A gateway's certificate forwards gateway batches only; it writes no reading of its own.
    let gateway = site.device_ca.gateway("gateway", "site-7", 104).unwrap();
    let (status, body) = site.post(&site.client(Some(&gateway)), reading.clone(), None).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"].as_str().unwrap().contains("gateway certificate"), "{body}");

    // No certificate: 401 even with a valid token, while probes still get answers.
    let anonymous = site.client(None);
    let (status, body) = site.post(&anonymous, reading.clone(), Some(GATEWAY_TOKEN)).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["error"].as_str().unwrap().contains("device certificate"), "{body}");
    let probe = anonymous.get(format!("https://localhost:{}/healthz", site.port)).send().await.unwrap();
    assert_eq!(probe.status(), StatusCode::OK);

    // A revoked certificate, or one from another CA with the same name: the handshake fails, so
    // no request is ever read.
    for (what, client) in [
        ("a revoked certificate", site.client(Some(&site.revoked))),
        ("another CA's certificate", site.client(Some(&rogue))),
    ] {
        let result = site.post(&client, reading.clone(), Some(GATEWAY_TOKEN)).await;
        assert!(result.is_err(), "{what} was answered: {result:?}");
    }

    // Only the first two readings reached Kafka.
    let keys = site.stop_with_keys_in_kafka(2).await;
    assert_eq!(keys, vec![Some("tractor-7".to_string()), Some("tractor-7".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_device_certificates_let_token_holders_in_and_still_bind_certified_devices() {
    let site = DeviceCertificates::start(ClientCertificates::Optional).await;
    let now = now_micros();
    let anonymous = site.client(None);
    let other_device = json!({"device_id": "tractor-8", "ts": now, "seq": 1});

    let (status, _) = site.post(&anonymous, other_device.clone(), None).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = site.post(&anonymous, other_device.clone(), Some("not-the-token")).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = site.post(&anonymous, other_device.clone(), Some(GATEWAY_TOKEN)).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");

    // A presented certificate binds its connection even where a token would let it write more.
    let device_client = site.client(Some(&site.device_a));
    let (status, body) = site.post(&device_client, other_device, Some(GATEWAY_TOKEN)).await.unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let own = json!({"device_id": "tractor-7", "ts": now, "seq": 1});
    let (status, body) = site.post(&device_client, own.clone(), None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    // Optional does not mean unchecked: a revoked certificate still fails the handshake.
    let revoked_client = site.client(Some(&site.revoked));
    assert!(site.post(&revoked_client, own, Some(GATEWAY_TOKEN)).await.is_err());

    let keys = site.stop_with_keys_in_kafka(2).await;
    assert_eq!(keys, vec![Some("tractor-7".to_string()), Some("tractor-8".to_string())]);
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
