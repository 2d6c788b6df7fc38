//! The MQTT bridge against real Mosquitto and a real Tansu broker: readings land keyed by the
//! topic's device, bad ones go to the dead-letter topic with their reason, and a reading is
//! acknowledged to MQTT only once Kafka has it, so a Kafka outage loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::Duration;

use serde_json::json;
use sluice_ingest::IngestConfig;
use sluice_integration_tests::{
    Broker, IngestService, Mosquitto, MqttDevice as Device, consume_topic, decode_value, ingest_config,
    now_micros, telemetry_schema_json, unique_suffix, wait_for_mqtt_bridge,
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
    loop {
        let records =
            consume_topic(&broker.bootstrap_servers(), topic, expected, Duration::ZERO).await.unwrap();
        let num_probes = records.len() - probe_free(records.clone()).len();
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

    let stream_records = consume_readings(&broker, &ingest.stream_topic("telemetry"), 4).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_in_a_shared_subscription_group_split_readings_without_duplicates() {
    let broker = Broker::start().await.unwrap();
    let mosquitto = Mosquitto::start().await.unwrap();
    let mut first_config = mqtt_ingest_config(&broker, &mosquitto);
    first_config.mqtt.shared_subscription_group = "ingest".to_string();
    let mut second_config = first_config.clone();
    second_config.mqtt.client_id = format!("ingest-{}", unique_suffix());
    let first = IngestService::start(first_config).await.unwrap();
    let second = IngestService::start(second_config).await.unwrap();
    wait_for_mqtt_bridge(&mosquitto, &broker, &first.stream_topic("telemetry")).await.unwrap();
    // The first replica's subscription is proven; the second subscribes at the same moment of
    // its start, and if it is late the first takes every reading. Without the shared group each
    // reading below would land twice.

    let mut device = Device::connect(mosquitto.port).await;
    let ts = now_micros();
    for seq in 0..40 {
        device.publish("sluice/telemetry/sprinkler-2", json!({"ts": ts + seq, "seq": seq})).await.unwrap();
    }
    let records = consume_readings(&broker, &first.stream_topic("telemetry"), 40).await;
    let schema_json = telemetry_schema_json();
    let mut seqs: Vec<i64> = records
        .iter()
        .map(|record| decode_value(&schema_json, &record.payload).unwrap()["seq"].as_i64().unwrap())
        .collect();
    seqs.sort();
    assert_eq!(seqs, (0..40).collect::<Vec<i64>>(), "every reading once, none twice");
    first.stop().await.unwrap();
    second.stop().await.unwrap();
}
