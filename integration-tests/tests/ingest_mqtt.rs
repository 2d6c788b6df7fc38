//! The MQTT bridge against real Mosquitto and a real Tansu broker: readings land keyed by the
//! topic's device, bad ones go to the dead-letter topic with their reason, and a reading is
//! acknowledged to MQTT only once Kafka has it, so a Kafka outage loses nothing. The bridge also
//! reads over TLS with a client certificate from a Mosquitto listener that requires one.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::Duration;

use serde_json::json;
use sluice_ingest::IngestConfig;
use sluice_integration_tests::{
    Broker, IngestService, Mosquitto, MqttDevice as Device, TestCa, consume_topic, consume_topic_within,
    decode_value, ingest_config, now_micros, telemetry_schema_json, unique_suffix, wait_for_mqtt_bridge,
};

const SETTLE: Duration = Duration::from_millis(1500);

fn mqtt_ingest_config(broker: &Broker, mosquitto: &Mosquitto) -> IngestConfig {
    let mut config = ingest_config(broker);
    config.mqtt.enabled = true;
    config.mqtt.port = mosquitto.port;
    config.mqtt.client_id = format!("ingest-{}", unique_suffix());
    config
}

fn probe_free(
    records: Vec<sluice_integration_tests::ConsumedRecord>,
) -> Vec<sluice_integration_tests::ConsumedRecord> {
    records.into_iter().filter(|record| record.key.as_deref() != Some("probe")).collect()
}

/// The topic's records other than probes, once at least `expected` of them arrived and no more
/// came for [`SETTLE`]. Probes count towards a plain [`consume_topic`]'s `expected`, so waiting
/// for them alone could stop before the last readings land.
async fn consume_readings(
    broker: &Broker,
    topic: &str,
    expected: usize,
) -> Vec<sluice_integration_tests::ConsumedRecord> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // How many records to read: the probes read so far do not use up the readings' share, or
    // a read that meets the probes' partition first would stop short of the readings forever.
    let mut wanted = expected;
    loop {
        let records =
            consume_topic(&broker.bootstrap_servers(), topic, wanted, Duration::ZERO).await.unwrap();
        let num_probes = records.len() - probe_free(records.clone()).len();
        wanted = expected + num_probes;
        if records.len() - num_probes >= expected || tokio::time::Instant::now() >= deadline {
            // Read again with the probes counted, then wait for anything (a duplicate) after them.
            let settled =
                consume_topic(&broker.bootstrap_servers(), topic, records.len(), SETTLE).await.unwrap();
            return probe_free(settled);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_land_keyed_by_topic_device_and_bad_ones_are_dead_lettered() {
    let broker = Broker::start().await.unwrap();
    let mosquitto = Mosquitto::start().await.unwrap();
    let ingest = IngestService::start(mqtt_ingest_config(&broker, &mosquitto)).await.unwrap();
    let mut device = Device::connect(mosquitto.port).await;
    wait_for_mqtt_bridge(&mosquitto, &broker, &ingest.stream_topic("telemetry")).await.unwrap();
    let ts = now_micros() - 1_000_000;

    // Valid, device taken from the topic.
    device.publish("sluice/telemetry/tractor-9", json!({"ts": ts, "seq": 1, "battery": 0.5})).await.unwrap();
    // Valid, an array of two readings naming the same device.
    device
        .publish(
            "sluice/telemetry/tractor-9",
            json!([{"device_id": "tractor-9", "ts": ts + 1, "seq": 2}, {"ts": ts + 2, "seq": 3}]),
        )
        .await
        .unwrap();
    // Invalid: wrong type.
    device.publish("sluice/telemetry/tractor-9", json!({"ts": ts, "seq": "four"})).await.unwrap();
    // Invalid: the payload names another device than the topic.
    device
        .publish("sluice/telemetry/tractor-9", json!({"device_id": "harvester-1", "ts": ts, "seq": 5}))
        .await
        .unwrap();
    // Malformed JSON.
    device.publish_bytes("sluice/telemetry/tractor-9", b"{not json".to_vec()).await.unwrap();

    let stream_records = consume_readings(&broker, &ingest.stream_topic("telemetry"), 3).await;
    let schema_json = telemetry_schema_json();
    let mut seqs: Vec<i64> = stream_records
        .iter()
        .map(|record| {
            assert_eq!(record.key.as_deref(), Some("tractor-9"));
            let value = decode_value(&schema_json, &record.payload).unwrap();
            assert_eq!(value["device_id"], json!("tractor-9"));
            value["seq"].as_i64().unwrap()
        })
        .collect();
    seqs.sort();
    assert_eq!(seqs, [1, 2, 3]);

    let dead_letters =
        consume_topic(&broker.bootstrap_servers(), &ingest.dead_letter_topic("telemetry"), 3, SETTLE)
            .await
            .unwrap();
    assert_eq!(dead_letters.len(), 3);
    let reasons: Vec<&str> = dead_letters
        .iter()
        .map(|record| record.header(sluice_ingest::DEAD_LETTER_REASON_HEADER).unwrap())
        .collect();
    assert!(reasons.iter().any(|reason| reason.contains("\"field\":\"seq\"")), "{reasons:?}");
    assert!(
        reasons.iter().any(|reason| reason.contains("does not match the device 'tractor-9'")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|reason| reason.contains("not valid JSON")), "{reasons:?}");
    for record in &dead_letters {
        assert_eq!(
            record.header(sluice_ingest::DEAD_LETTER_SOURCE_HEADER),
            Some("mqtt:sluice/telemetry/tractor-9")
        );
    }
    // The original bytes are kept for replay.
    assert!(dead_letters.iter().any(|record| record.payload == b"{not json"));
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_reads_over_tls_with_the_client_certificate_the_broker_requires() {
    let broker = Broker::start().await.unwrap();
    let directory = tempfile::TempDir::new().unwrap();
    let ca = TestCa::new(directory.path(), "mqtt").unwrap();
    let server = ca.server("mosquitto").unwrap();
    let bridge = ca.client("bridge", Some("sluice-ingest"), 7).unwrap();
    // Mosquitto reads these as the user it runs as.
    for path in [&ca.cert_path, &server.cert_path, &server.key_path] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(directory.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let tls_lines = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true",
        ca.cert_path.display(),
        server.cert_path.display(),
        server.key_path.display()
    );
    let mosquitto = Mosquitto::start_with_tls_listener(&tls_lines).await.unwrap();

    // A CA file that is not there stops ingest at start, naming it.
    let mut config = mqtt_ingest_config(&broker, &mosquitto);
    config.mqtt.port = mosquitto.tls_port.unwrap();
    config.mqtt.tls = true;
    config.mqtt.tls_ca_path = Some(directory.path().join("missing-ca.crt"));
    let error = IngestService::start(config.clone()).await.unwrap_err();
    assert!(format!("{error:#}").contains("missing-ca.crt"), "{error:#}");

    config.mqtt.tls_ca_path = Some(ca.cert_path.clone());
    config.mqtt.tls_cert_path = Some(bridge.cert_path.clone());
    config.mqtt.tls_key_path = Some(bridge.key_path.clone());
    let ingest = IngestService::start(config).await.unwrap();
    // Probes are published on the plain listener: they land only once the bridge has subscribed
    // over the TLS one.
    wait_for_mqtt_bridge(&mosquitto, &broker, &ingest.stream_topic("telemetry")).await.unwrap();
    let mut device = Device::connect(mosquitto.port).await;
    let ts = now_micros() - 1_000_000;
    device.publish("sluice/telemetry/sprayer-2", json!({"ts": ts, "seq": 1})).await.unwrap();
    let records = consume_readings(&broker, &ingest.stream_topic("telemetry"), 1).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].key.as_deref(), Some("sprayer-2"));
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_sent_during_kafka_outage_is_delivered_after_restart() {
    let mut broker = Broker::start().await.unwrap();
    let broker_port = broker.port;
    let mosquitto = Mosquitto::start().await.unwrap();
    let config = mqtt_ingest_config(&broker, &mosquitto);
    let ingest = IngestService::start(config.clone()).await.unwrap();
    let mut device = Device::connect(mosquitto.port).await;
    wait_for_mqtt_bridge(&mosquitto, &broker, &ingest.stream_topic("telemetry")).await.unwrap();

    broker.kill().await;
    device.publish("sluice/telemetry/pump-3", json!({"ts": now_micros(), "seq": 77})).await.unwrap();
    // Give the bridge time to receive it and fail to produce it; then stop ingest with the
    // reading unacknowledged to MQTT.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ingest.stop().await.unwrap();

    // Kafka comes back (empty: memory storage), ingest restarts with the same MQTT session.
    let broker = Broker::start_on(broker_port).await.unwrap();
    let ingest = IngestService::start(config).await.unwrap();
    let records = consume_readings(&broker, &ingest.stream_topic("telemetry"), 1).await;
    assert_eq!(records.len(), 1, "the reading sent during the outage arrived exactly once");
    assert_eq!(records[0].key.as_deref(), Some("pump-3"));
    let value = decode_value(&telemetry_schema_json(), &records[0].payload).unwrap();
    assert_eq!(value["seq"], json!(77));
    ingest.stop().await.unwrap();
}

/// The readings (probes left out) in each of `topics`, once at least `expected` arrived across
/// them and no more came for [`SETTLE`].
async fn consume_readings_of_each(
    broker: &Broker,
    topics: &[String],
    expected: usize,
) -> Vec<Vec<sluice_integration_tests::ConsumedRecord>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Everything each topic holds now, probes included: no count to wait for.
        let mut num_records_of_each = Vec::new();
        let mut num_readings = 0;
        for topic in topics {
            let records = consume_topic_within(
                &broker.bootstrap_servers(),
                topic,
                usize::MAX,
                Duration::ZERO,
                Duration::from_secs(2),
            )
            .await
            .unwrap();
            num_records_of_each.push(records.len());
            num_readings += probe_free(records).len();
        }
        if num_readings >= expected || tokio::time::Instant::now() >= deadline {
            // Read again with the probes counted, then wait for anything (a duplicate) after them.
            let mut readings_of_each = Vec::new();
            for (topic, num_records) in topics.iter().zip(num_records_of_each) {
                let settled =
                    consume_topic(&broker.bootstrap_servers(), topic, num_records, SETTLE).await.unwrap();
                readings_of_each.push(probe_free(settled));
            }
            return readings_of_each;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_in_a_shared_subscription_group_split_readings_without_duplicates() {
    let broker = Broker::start().await.unwrap();
    let mosquitto = Mosquitto::start().await.unwrap();
    let mut first_config = mqtt_ingest_config(&broker, &mosquitto);
    first_config.mqtt.shared_subscription_group = "ingest".to_string();
    let mut second_config = first_config.clone();
    second_config.mqtt.client_id = format!("ingest-{}", unique_suffix());
    // Each replica produces to topics of its own, so that where a reading landed says which
    // replica took it; the MQTT side, where the split happens, is the same for both.
    second_config.kafka.topic_prefix = format!("test-{}", unique_suffix());
    let first = IngestService::start(first_config).await.unwrap();
    let second = IngestService::start(second_config).await.unwrap();
    let topics = [first.stream_topic("telemetry"), second.stream_topic("telemetry")];
    // A probe lands in a replica's topic only once that replica has subscribed, and Mosquitto
    // hands the group's messages round: both replicas are in the group before the readings go.
    for topic in &topics {
        wait_for_mqtt_bridge(&mosquitto, &broker, topic).await.unwrap();
    }

    let mut device = Device::connect(mosquitto.port).await;
    let ts = now_micros();
    for seq in 0..40 {
        device.publish("sluice/telemetry/sprinkler-2", json!({"ts": ts + seq, "seq": seq})).await.unwrap();
    }
    let readings_of_each = consume_readings_of_each(&broker, &topics, 40).await;
    let schema_json = telemetry_schema_json();
    let seqs_of_each: Vec<Vec<i64>> = readings_of_each
        .iter()
        .map(|records| {
            records
                .iter()
                .map(|record| decode_value(&schema_json, &record.payload).unwrap()["seq"].as_i64().unwrap())
                .collect()
        })
        .collect();
    assert!(
        seqs_of_each.iter().all(|seqs| !seqs.is_empty()),
        "each replica took some of the readings: {seqs_of_each:?}"
    );
    let mut seqs: Vec<i64> = seqs_of_each.concat();
    seqs.sort();
    assert_eq!(seqs, (0..40).collect::<Vec<i64>>(), "every reading once across the replicas, none twice");
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}
