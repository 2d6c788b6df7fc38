//! The edge gateway forwarding to a real central ingest and Tansu broker, through an uplink (a
//! TCP proxy) that refuses, hangs and resets connections while devices keep sending: every
//! reading the gateway acknowledged reaches Kafka, once, after the uplink is back; readings
//! central refuses go to the gateway's dead-letter log and the rest of their batch goes on;
//! the gateway authenticates to central with its bearer token or a gateway certificate (a
//! device's certificate cannot forward); batches central took but whose
//! answer was lost, sent again and again, land in the lake once, across a compactor restart.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sluice_integration_tests::{
    Broker, CompactorService, EdgeService, FaultMode, FaultProxy, IngestService, TestCa, assert_exactly_once,
    compactor_config, consume_topic, decode_value, edge_config, ingest_config, now_micros, open_local_lake,
    read_lake_rows, telemetry_schema_json, wait_for_lake_rows, wait_until,
};

const SETTLE: Duration = Duration::from_millis(1500);

fn readings(device: &str, seqs: std::ops::Range<i64>, ts: i64) -> Value {
    Value::Array(seqs.map(|seq| json!({"device_id": device, "ts": ts, "seq": seq})).collect())
}

/// (device_id, seq) of every record in the stream topic, sorted.
async fn in_kafka(broker: &Broker, ingest: &IngestService, expected: usize) -> Vec<(String, i64)> {
    let records =
        consume_topic(&broker.bootstrap_servers(), &ingest.stream_topic("telemetry"), expected, SETTLE)
            .await
            .unwrap();
    let schema_json = telemetry_schema_json();
    let mut keys: Vec<(String, i64)> = records
        .iter()
        .map(|record| {
            let value = decode_value(&schema_json, &record.payload).unwrap();
            assert_eq!(record.key.as_deref(), value["device_id"].as_str(), "keyed by device");
            (value["device_id"].as_str().unwrap().to_string(), value["seq"].as_i64().unwrap())
        })
        .collect();
    keys.sort();
    keys
}

fn central_address(ingest: &IngestService) -> SocketAddr {
    ingest.base_url.trim_start_matches("http://").parse().unwrap()
}

/// A gateway forwarding to `url` that retries quickly, so a test sees many attempts.
fn forwarding_edge_config(directory: &std::path::Path, url: String) -> sluice_edge::EdgeConfig {
    let mut config = edge_config(directory);
    config.forward.url = url;
    config.forward.backoff_initial_ms = 50;
    config.forward.backoff_max_ms = 400;
    config.forward.linger_ms = 20;
    config.forward.request_timeout_ms = 1_500;
    config
}

async fn unforwarded(edge: &EdgeService) -> u64 {
    edge.running().unwrap().spool().usage().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_acknowledged_while_the_uplink_is_down_reach_kafka_once() {
    let broker = Broker::start().await.unwrap();
    let ingest = IngestService::start(ingest_config(&broker)).await.unwrap();
    let proxy = FaultProxy::start(central_address(&ingest)).await.unwrap();
    proxy.set_mode(FaultMode::Refuse);
    let directory = tempfile::tempdir().unwrap();
    let edge =
        EdgeService::start(forwarding_edge_config(directory.path(), format!("http://{}", proxy.address)))
            .await
            .unwrap();
    let client = reqwest::Client::new();
    let mut sent = Vec::new();
    let mut next_seq = 0;
    for mode in [FaultMode::Refuse, FaultMode::Hang, FaultMode::Reset, FaultMode::Pass] {
        proxy.set_mode(mode);
        for _ in 0..5 {
            let body = readings("pump-1", next_seq..next_seq + 20, now_micros() - 1_000_000);
            let response = client.post(edge.records_url("telemetry")).json(&body).send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::OK,
                "the gateway takes readings whatever the uplink does"
            );
            sent.extend((next_seq..next_seq + 20).map(|seq| ("pump-1".to_string(), seq)));
            next_seq += 20;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if mode != FaultMode::Pass {
            // Several attempts fail in this mode; nothing leaves the spool.
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(
                unforwarded(&edge).await,
                (next_seq / 20) as u64,
                "{mode:?}: every batch still spooled"
            );
        }
    }
    let drained = wait_until(Duration::from_secs(30), || async { unforwarded(&edge).await == 0 }).await;
    assert!(drained, "the spool drained once the uplink passed: {} batches left", unforwarded(&edge).await);
    assert_eq!(in_kafka(&broker, &ingest, sent.len()).await, sent, "every acknowledged reading, once");
    edge.stop().await.unwrap();
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_central_refuses_are_dead_lettered_and_the_rest_of_their_batch_lands() {
    let broker = Broker::start().await.unwrap();
    let token = "gateway-secret-token";
    let mut central_config = ingest_config(&broker);
    central_config.auth.enabled = true;
    central_config.auth.tokens.push(sluice_ingest::config::TokenConfig {
        name: "site-7".into(),
        token_sha256: sluice_config::Secret::new(hex::encode(Sha256::digest(token))),
        streams: vec!["telemetry".into()],
    });
    // Central takes nothing older than an hour; the gateway (its default) takes 2000 onwards.
    central_config.validation.earliest_event_time = sluice_clock::format_micros(now_micros() - 3_600_000_000);
    let ingest = IngestService::start(central_config).await.unwrap();
    let directory = tempfile::tempdir().unwrap();
    let mut config = edge_config(directory.path());
    config.forward.url = ingest.base_url.clone();
    config.forward.token = sluice_config::Secret::new("wrong-token");
    config.forward.backoff_max_ms = 300;
    let edge = EdgeService::start(config.clone()).await.unwrap();
    let client = reqwest::Client::new();
    let fresh = now_micros() - 1_000_000;
    let stale = now_micros() - 2 * 3_600_000_000;
    let mut body = Value::Array(Vec::new());
    for seq in 0..10 {
        let ts = if seq % 3 == 0 { stale } else { fresh };
        body.as_array_mut().unwrap().push(json!({"device_id": "pump-2", "ts": ts, "seq": seq}));
    }
    let response = client.post(edge.records_url("telemetry")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // A token central does not know: refused, retried, never dropped.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(unforwarded(&edge).await, 1, "kept while central refuses the gateway");
    edge.stop().await.unwrap();

    config.forward.token = sluice_config::Secret::new(token);
    let edge = EdgeService::start(config).await.unwrap();
    let drained = wait_until(Duration::from_secs(20), || async { unforwarded(&edge).await == 0 }).await;
    assert!(drained, "forwarded once the token is right");
    let expected: Vec<(String, i64)> =
        (0..10).filter(|seq| seq % 3 != 0).map(|seq| ("pump-2".to_string(), seq)).collect();
    assert_eq!(in_kafka(&broker, &ingest, expected.len()).await, expected);
    let log = std::fs::read_to_string(directory.path().join(sluice_edge::DEAD_LETTER_FILE)).unwrap();
    let letters: Vec<Value> = log.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let schema_json = telemetry_schema_json();
    let mut lettered: Vec<i64> = letters
        .iter()
        .map(|letter| {
            assert!(letter["reason"].as_str().unwrap().contains("earliest event time"), "{letter}");
            let payload = hex::decode(letter["payload_hex"].as_str().unwrap()).unwrap();
            decode_value(&schema_json, &payload).unwrap()["seq"].as_i64().unwrap()
        })
        .collect();
    lettered.sort();
    assert_eq!(lettered, [0, 3, 6, 9], "exactly the stale readings, each once");
    edge.stop().await.unwrap();
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_certificate_authenticates_forwarding_where_central_requires_certificates() {
    let broker = Broker::start().await.unwrap();
    let pki = tempfile::tempdir().unwrap();
    let server_ca = TestCa::new(pki.path(), "server").unwrap();
    let server = server_ca.server("ingest").unwrap();
    let device_ca = TestCa::new(pki.path(), "devices").unwrap();
    let gateway = device_ca.gateway("gateway", "site-7", 201).unwrap();
    let device = device_ca.client("device", Some("pump-3"), 202).unwrap();
    let mut central_config = ingest_config(&broker);
    central_config.http.tls_cert_path = Some(server.cert_path.clone());
    central_config.http.tls_key_path = Some(server.key_path.clone());
    central_config.http.tls_client_ca_path = Some(device_ca.cert_path.clone());
    central_config.http.tls_client_certificates = sluice_ingest::config::ClientCertificates::Required;
    central_config.http.tls_gateway_names = vec!["site-7".into()];
    let ingest = IngestService::start(central_config).await.unwrap();
    let port = ingest.base_url.rsplit(':').next().unwrap();
    let directory = tempfile::tempdir().unwrap();
    let mut config = forwarding_edge_config(directory.path(), format!("https://127.0.0.1:{port}"));
    config.forward.ca_cert_path = Some(server_ca.cert_path.clone());
    config.forward.tls_cert_path = Some(gateway.cert_path.clone());
    config.forward.tls_key_path = Some(gateway.key_path.clone());
    let edge = EdgeService::start(config.clone()).await.unwrap();
    let client = reqwest::Client::new();
    // The gateway forwards for any device of its site, with no token.
    for device_id in ["pump-3", "pump-4"] {
        let body = readings(device_id, 0..10, now_micros() - 1_000_000);
        let response = client.post(edge.records_url("telemetry")).json(&body).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let drained = wait_until(Duration::from_secs(20), || async { unforwarded(&edge).await == 0 }).await;
    assert!(drained, "forwarded under the gateway certificate");
    let expected: Vec<(String, i64)> = ["pump-3", "pump-4"]
        .iter()
        .flat_map(|device_id| (0..10).map(move |seq| (device_id.to_string(), seq)))
        .collect();
    assert_eq!(in_kafka(&broker, &ingest, expected.len()).await, expected);
    edge.stop().await.unwrap();

    // A device's certificate from the same CA cannot forward, nor can a certificate with the
    // gateway unit whose name central does not list: refused, kept, retried.
    let unlisted = device_ca.gateway("unlisted", "site-9", 203).unwrap();
    for (certificate, what) in [(&device, "a device's certificate"), (&unlisted, "an unlisted gateway name")]
    {
        let directory = tempfile::tempdir().unwrap();
        let mut config = forwarding_edge_config(directory.path(), format!("https://127.0.0.1:{port}"));
        config.forward.ca_cert_path = Some(server_ca.cert_path.clone());
        config.forward.tls_cert_path = Some(certificate.cert_path.clone());
        config.forward.tls_key_path = Some(certificate.key_path.clone());
        let edge = EdgeService::start(config).await.unwrap();
        let body = readings("pump-3", 10..20, now_micros() - 1_000_000);
        let response = client.post(edge.records_url("telemetry")).json(&body).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(unforwarded(&edge).await, 1, "kept while central refuses {what}");
        edge.stop().await.unwrap();
    }
    assert_eq!(in_kafka(&broker, &ingest, expected.len()).await, expected, "nothing more reached Kafka");
    ingest.stop().await.unwrap();
}

/// Copies of `expected` readings' records in the stream topic: every attempt central took.
async fn copies_in_kafka(broker: &Broker, ingest: &IngestService, at_least: usize) -> usize {
    let topic = ingest.stream_topic("telemetry");
    consume_topic(&broker.bootstrap_servers(), &topic, at_least, SETTLE).await.unwrap().len()
}

/// Readings left out as an edge gateway's repeats, by every flush in the table's log.
async fn edge_repeats_dropped(lake_dir: &std::path::Path) -> u64 {
    let history = open_local_lake(lake_dir).history("telemetry").await.unwrap_or_default();
    history.iter().flat_map(|commit| &commit.flushes).map(|flush| flush.num_edge_repeats_dropped).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_whose_answer_was_lost_land_once_across_a_compactor_restart() {
    let broker = Broker::start().await.unwrap();
    let central_config = ingest_config(&broker);
    let prefix = central_config.kafka.topic_prefix.clone();
    let ingest = IngestService::start(central_config).await.unwrap();
    let lake_dir = tempfile::tempdir().unwrap();
    let compactor_settings = compactor_config(&broker, &prefix, lake_dir.path());
    let compactor = CompactorService::start(compactor_settings.clone()).await.unwrap();
    let proxy = FaultProxy::start(central_address(&ingest)).await.unwrap();
    // Central takes every attempt and the gateway never hears so.
    proxy.set_mode(FaultMode::DropAnswers);
    let directory = tempfile::tempdir().unwrap();
    let mut config = forwarding_edge_config(directory.path(), format!("http://{}", proxy.address));
    config.forward.backoff_initial_ms = 200;
    let edge = EdgeService::start(config).await.unwrap();
    let client = reqwest::Client::new();
    let ts = now_micros() - 1_000_000;
    let mut sent: Vec<Value> = Vec::new();
    for request in 0..3 {
        let body: Vec<Value> = (0..50)
            .map(|index| json!({"device_id": format!("pump-{}", index % 2), "ts": ts, "seq": request * 50 + index}))
            .collect();
        let response = client.post(edge.records_url("telemetry")).json(&body).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        sent.extend(body);
    }
    assert!(copies_in_kafka(&broker, &ingest, 2 * sent.len()).await >= 2 * sent.len(), "batches sent again");
    // The compactor commits the first copies and the gateway's positions with them; the one
    // started next knows the positions only from the table.
    wait_for_lake_rows(lake_dir.path(), "telemetry", sent.len(), Duration::from_secs(30)).await;
    compactor.stop().await.unwrap();
    let compactor = CompactorService::start(compactor_settings).await.unwrap();
    proxy.set_mode(FaultMode::Pass);
    let drained = wait_until(Duration::from_secs(30), || async { unforwarded(&edge).await == 0 }).await;
    assert!(drained, "the spool drained once answers came back");
    let copies = copies_in_kafka(&broker, &ingest, 3 * sent.len()).await;
    let all_seen = wait_until(Duration::from_secs(60), || async {
        edge_repeats_dropped(lake_dir.path()).await == (copies - sent.len()) as u64
    })
    .await;
    let history = open_local_lake(lake_dir.path()).history("telemetry").await.unwrap();
    let flushes: Vec<_> = history.iter().flat_map(|commit| &commit.flushes).collect();
    assert!(
        all_seen,
        "{copies} copies of {} readings in Kafka, {} left out as repeats; flushes (partition, range, rows, \
         repeats, same-flush duplicates): {:?}",
        sent.len(),
        edge_repeats_dropped(lake_dir.path()).await,
        flushes
            .iter()
            .map(|flush| (
                flush.kafka_partition,
                flush.start_offset..flush.end_offset,
                flush.num_rows(),
                flush.num_edge_repeats_dropped,
                flush.num_duplicates_dropped
            ))
            .collect::<Vec<_>>()
    );
    let rows = read_lake_rows(lake_dir.path(), "telemetry").unwrap();
    assert_exactly_once(&rows, &sent);
    edge.stop().await.unwrap();
    compactor.stop().await.unwrap();
    ingest.stop().await.unwrap();
}
