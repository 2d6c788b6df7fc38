//! Poison MQTT messages against real Mosquitto and a real Tansu broker: payloads larger than a
//! dead letter can hold, larger than the payload limit, larger than the old client packet limit,
//! and readings too large for a Kafka record are dead-lettered (cut, with their size) and
//! acknowledged, so that valid readings of every other device keep landing, also when the poison
//! waits in the MQTT session while ingest is down.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::Duration;

use serde_json::json;
use sluice_ingest::{
    DEAD_LETTER_ORIGINAL_SIZE_HEADER, DEAD_LETTER_REASON_HEADER, DEAD_LETTER_RESERVED_BYTES, IngestConfig,
};
use sluice_integration_tests::{
    Broker, ConsumedRecord, IngestService, Mosquitto, MqttDevice, consume_topic, consume_topic_within,
    decode_value, ingest_config, now_micros, telemetry_schema_json, unique_suffix, wait_for_mqtt_bridge,
    wait_until,
};

/// librdkafka's `message.max.bytes` default, which the test configuration keeps.
const MAX_MESSAGE_BYTES: usize = 1_000_000;
/// The most payload a dead letter carries (docs/ingest-api.md).
const DEAD_LETTER_LIMIT: usize = MAX_MESSAGE_BYTES - DEAD_LETTER_RESERVED_BYTES;
/// rumqttc's packet limit the bridge used to set (`http.max_body_bytes` + 1 KiB): a packet above
/// it made the bridge reconnect for ever.
const OLD_CLIENT_PACKET_LIMIT: usize = 16 * 1024 * 1024 + 1024;
/// More valid readings than Mosquitto keeps in flight to one client (`max_inflight_messages 20`).
const NUM_VALID: i64 = 30;

fn mqtt_ingest_config(broker: &Broker, mosquitto: &Mosquitto) -> IngestConfig {
    let mut config = ingest_config(broker);
    config.mqtt.enabled = true;
    config.mqtt.port = mosquitto.port;
    config.mqtt.client_id = format!("ingest-{}", unique_suffix());
    config
}

/// The poison: (device, payload) pairs, each a different way to be too large.
fn poison() -> Vec<(&'static str, Vec<u8>)> {
    let big_reading = json!({"ts": now_micros(), "seq": 1, "site": "s".repeat(1_500_000)});
    vec![
        ("poison-huge", vec![b'x'; 3_000_000]),
        ("poison-at-limit", vec![b'x'; DEAD_LETTER_LIMIT]),
        ("poison-over-limit", vec![b'x'; DEAD_LETTER_LIMIT + 1]),
        ("poison-over-packet", vec![b'{'; OLD_CLIENT_PACKET_LIMIT + 1]),
        ("poison-big-reading", big_reading.to_string().into_bytes()),
    ]
}

async fn publish_poison(device: &mut MqttDevice) {
    for (device_id, payload) in poison() {
        device.publish_bytes(&format!("sluice/telemetry/{device_id}"), payload).await.unwrap();
    }
}

async fn publish_valid(device: &mut MqttDevice) {
    let ts = now_micros();
    for seq in 0..NUM_VALID {
        device
            .publish(&format!("sluice/telemetry/valid-{seq}"), json!({"ts": ts + seq, "seq": seq}))
            .await
            .unwrap();
    }
}

/// The valid readings in the stream topic (probes left out), once all of them arrived.
async fn landed_valid_seqs(broker: &Broker, ingest: &IngestService) -> Vec<i64> {
    let schema_json = telemetry_schema_json();
    let topic = ingest.stream_topic("telemetry");
    let read = || async {
        let records = consume_topic_within(
            &broker.bootstrap_servers(),
            &topic,
            usize::MAX,
            Duration::ZERO,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        let mut seqs: Vec<i64> = records
            .iter()
            .filter(|record| record.key.as_deref().is_some_and(|key| key.starts_with("valid-")))
            .map(|record| decode_value(&schema_json, &record.payload).unwrap()["seq"].as_i64().unwrap())
            .collect();
        seqs.sort();
        seqs
    };
    wait_until(Duration::from_secs(60), || async { read().await.len() >= NUM_VALID as usize }).await;
    read().await
}

fn dead_letter<'a>(dead_letters: &'a [ConsumedRecord], device_id: &str) -> &'a ConsumedRecord {
    let matching: Vec<&ConsumedRecord> =
        dead_letters.iter().filter(|record| record.key.as_deref() == Some(device_id)).collect();
    assert_eq!(matching.len(), 1, "dead letters of {device_id}");
    matching[0]
}

fn assert_poison_dead_lettered(dead_letters: &[ConsumedRecord]) {
    let huge = dead_letter(dead_letters, "poison-huge");
    assert_eq!(huge.payload.len(), DEAD_LETTER_LIMIT);
    assert!(huge.payload.iter().all(|byte| *byte == b'x'));
    assert_eq!(huge.header(DEAD_LETTER_ORIGINAL_SIZE_HEADER), Some("3000000"));
    assert!(huge.header(DEAD_LETTER_REASON_HEADER).unwrap().contains("not valid JSON"));

    // Right at the limit: whole, so no original size.
    let at_limit = dead_letter(dead_letters, "poison-at-limit");
    assert_eq!(at_limit.payload.len(), DEAD_LETTER_LIMIT);
    assert_eq!(at_limit.header(DEAD_LETTER_ORIGINAL_SIZE_HEADER), None);

    let over_limit = dead_letter(dead_letters, "poison-over-limit");
    assert_eq!(over_limit.payload.len(), DEAD_LETTER_LIMIT);
    let over_limit_size = (DEAD_LETTER_LIMIT + 1).to_string();
    assert_eq!(over_limit.header(DEAD_LETTER_ORIGINAL_SIZE_HEADER), Some(over_limit_size.as_str()));

    let over_packet = dead_letter(dead_letters, "poison-over-packet");
    assert_eq!(over_packet.payload.len(), DEAD_LETTER_LIMIT);
    let over_packet_size = (OLD_CLIENT_PACKET_LIMIT + 1).to_string();
    assert_eq!(over_packet.header(DEAD_LETTER_ORIGINAL_SIZE_HEADER), Some(over_packet_size.as_str()));
    let reason = over_packet.header(DEAD_LETTER_REASON_HEADER).unwrap();
    assert!(reason.contains("mqtt.max_payload_bytes"), "{reason}");

    // Valid JSON whose record is too large for Kafka: dead-lettered whole with the reason.
    let big_reading = dead_letter(dead_letters, "poison-big-reading");
    assert!(big_reading.payload.len() > 1_500_000 - DEAD_LETTER_LIMIT);
    let reason = big_reading.header(DEAD_LETTER_REASON_HEADER).unwrap();
    assert!(reason.contains("1500066 bytes encoded") && reason.contains("message.max.bytes"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_are_dead_lettered_cut_and_valid_readings_keep_landing() {
    let broker = Broker::start().await.unwrap();
    let mosquitto = Mosquitto::start().await.unwrap();
    let ingest = IngestService::start(mqtt_ingest_config(&broker, &mosquitto)).await.unwrap();
    wait_for_mqtt_bridge(&mosquitto, &broker, &ingest.stream_topic("telemetry")).await.unwrap();
    let mut device = MqttDevice::connect_with_max_packet(mosquitto.port, 32 * 1024 * 1024).await;

    publish_poison(&mut device).await;
    publish_valid(&mut device).await;

    assert_eq!(landed_valid_seqs(&broker, &ingest).await, (0..NUM_VALID).collect::<Vec<_>>());
    let dead_letters = consume_topic(
        &broker.bootstrap_servers(),
        &ingest.dead_letter_topic("telemetry"),
        5,
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    assert_eq!(dead_letters.len(), 5);
    assert_poison_dead_lettered(&dead_letters);
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_waiting_in_the_session_does_not_block_the_bridge_after_a_restart() {
    let broker = Broker::start().await.unwrap();
    let mosquitto = Mosquitto::start().await.unwrap();
    let config = mqtt_ingest_config(&broker, &mosquitto);
    let ingest = IngestService::start(config.clone()).await.unwrap();
    wait_for_mqtt_bridge(&mosquitto, &broker, &ingest.stream_topic("telemetry")).await.unwrap();
    ingest.stop().await.unwrap();

    // Queued by Mosquitto for ingest's persistent session, poison first.
    let mut device = MqttDevice::connect_with_max_packet(mosquitto.port, 32 * 1024 * 1024).await;
    publish_poison(&mut device).await;
    publish_valid(&mut device).await;

    let ingest = IngestService::start(config.clone()).await.unwrap();
    assert_eq!(landed_valid_seqs(&broker, &ingest).await, (0..NUM_VALID).collect::<Vec<_>>());
    let dead_letters = consume_topic(
        &broker.bootstrap_servers(),
        &ingest.dead_letter_topic("telemetry"),
        5,
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    assert_eq!(dead_letters.len(), 5);
    assert_poison_dead_lettered(&dead_letters);

    // Once more after a second restart: the poison was acknowledged and does not come back.
    ingest.stop().await.unwrap();
    let ingest = IngestService::start(config).await.unwrap();
    device.publish("sluice/telemetry/valid-after", json!({"ts": now_micros(), "seq": 99})).await.unwrap();
    let after = wait_for_key(&broker, &ingest.stream_topic("telemetry"), "valid-after").await;
    assert!(after, "a reading sent after the second restart did not land");
    let dead_letters = consume_topic_within(
        &broker.bootstrap_servers(),
        &ingest.dead_letter_topic("telemetry"),
        6,
        Duration::ZERO,
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    assert_eq!(dead_letters.len(), 5, "the poison was dead-lettered again after a restart");
    ingest.stop().await.unwrap();
}

/// Whether a record keyed `key` lands in `topic` within 30 s.
async fn wait_for_key(broker: &Broker, topic: &str, key: &str) -> bool {
    wait_until(Duration::from_secs(30), || async move {
        consume_topic_within(
            &broker.bootstrap_servers(),
            topic,
            usize::MAX,
            Duration::ZERO,
            Duration::from_secs(1),
        )
        .await
        .unwrap()
        .iter()
        .any(|record| record.key.as_deref() == Some(key))
    })
    .await
}

/// `ts` at the ends of i64 crashed the bridge's worker (an overflow panic in debug builds): the
/// message must be dead-lettered whatever refuses it (validation, or the bridge's guard around a
/// message whose handling panicked), and the bridge must go on without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_event_times_are_dead_lettered_and_the_bridge_keeps_going() {
    let broker = Broker::start().await.unwrap();
    let mosquitto = Mosquitto::start().await.unwrap();
    let ingest = IngestService::start(mqtt_ingest_config(&broker, &mosquitto)).await.unwrap();
    wait_for_mqtt_bridge(&mosquitto, &broker, &ingest.stream_topic("telemetry")).await.unwrap();
    let mut device = MqttDevice::connect(mosquitto.port).await;
    device.publish("sluice/telemetry/ts-min", json!({"ts": i64::MIN, "seq": 1})).await.unwrap();
    device.publish("sluice/telemetry/ts-max", json!({"ts": i64::MAX, "seq": 1})).await.unwrap();
    publish_valid(&mut device).await;

    assert_eq!(landed_valid_seqs(&broker, &ingest).await, (0..NUM_VALID).collect::<Vec<_>>());
    let dead_letters = consume_topic_within(
        &broker.bootstrap_servers(),
        &ingest.dead_letter_topic("telemetry"),
        2,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let mut keys: Vec<&str> = dead_letters.iter().filter_map(|record| record.key.as_deref()).collect();
    keys.sort();
    assert_eq!(keys, ["ts-max", "ts-min"]);
    let ready = reqwest::get(format!("{}/readyz", ingest.base_url)).await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK, "ingest stopped over one message");
    ingest.stop().await.unwrap();
}
