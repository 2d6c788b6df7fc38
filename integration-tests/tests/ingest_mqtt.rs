//! The MQTT bridge against real Mosquitto and a real Tansu broker: readings land keyed by the
//! topic's device, bad ones go to the dead-letter topic with their reason, and a reading is
//! acknowledged to MQTT only once Kafka has it, so a Kafka outage loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};
use sluice_ingest::IngestConfig;
use sluice_integration_tests::{
    Broker, IngestService, Mosquitto, consume_topic, decode_value, ingest_config, now_micros,
    telemetry_schema_json, unique_suffix,
};
use tokio::sync::mpsc;

const SETTLE: Duration = Duration::from_millis(1500);

fn mqtt_ingest_config(broker: &Broker, mosquitto: &Mosquitto) -> IngestConfig {
    let mut config = ingest_config(broker);
    config.mqtt.enabled = true;
    config.mqtt.port = mosquitto.port;
    config.mqtt.client_id = format!("ingest-{}", unique_suffix());
    config
}

/// A device-side MQTT client whose publishes resolve once the MQTT broker acknowledged them.
struct Device {
    client: AsyncClient,
    puback_rx: mpsc::UnboundedReceiver<()>,
}

impl Device {
    async fn connect(port: u16) -> Self {
        let options = MqttOptions::new(format!("device-{}", unique_suffix()), "127.0.0.1", port);
        let (client, mut event_loop) = AsyncClient::new(options, 16);
        let (puback_tx, puback_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match event_loop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        let _ = puback_tx.send(());
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self { client, puback_rx }
    }

    async fn publish(&mut self, topic: &str, payload: Value) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_string()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.puback_rx.recv())
            .await
            .expect("PUBACK from mosquitto")
            .unwrap();
    }
}

/// Waits until the bridge's subscription is in place: a device publishes probes (readings of
/// device "probe") until one of them lands in Kafka.
async fn wait_for_bridge(mosquitto: &Mosquitto, broker: &Broker, ingest: &IngestService) {
    let mut prober = Device::connect(mosquitto.port).await;
    let probing = tokio::spawn(async move {
        for attempt in 0..200 {
            prober.publish("sluice/telemetry/probe", json!({"ts": now_micros(), "seq": attempt})).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let records =
        consume_topic(&broker.bootstrap_servers(), &ingest.stream_topic("telemetry"), 1, Duration::ZERO)
            .await
            .unwrap();
    probing.abort();
    assert!(!records.is_empty(), "the MQTT bridge never subscribed");
}

fn probe_free(
    records: Vec<sluice_integration_tests::ConsumedRecord>,
) -> Vec<sluice_integration_tests::ConsumedRecord> {
    records.into_iter().filter(|record| record.key.as_deref() != Some("probe")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_land_keyed_by_topic_device_and_bad_ones_are_dead_lettered() {
    let broker = Broker::start().await.unwrap();
    let mosquitto = Mosquitto::start().await.unwrap();
    let ingest = IngestService::start(mqtt_ingest_config(&broker, &mosquitto)).await.unwrap();
    let mut device = Device::connect(mosquitto.port).await;
    wait_for_bridge(&mosquitto, &broker, &ingest).await;
    let ts = now_micros() - 1_000_000;

    // Valid, device taken from the topic.
    device.publish("sluice/telemetry/tractor-9", json!({"ts": ts, "seq": 1, "battery": 0.5})).await;
    // Valid, an array of two readings naming the same device.
    device
        .publish(
            "sluice/telemetry/tractor-9",
            json!([{"device_id": "tractor-9", "ts": ts + 1, "seq": 2}, {"ts": ts + 2, "seq": 3}]),
        )
        .await;
    // Invalid: wrong type.
    device.publish("sluice/telemetry/tractor-9", json!({"ts": ts, "seq": "four"})).await;
    // Invalid: the payload names another device than the topic.
    device
        .publish("sluice/telemetry/tractor-9", json!({"device_id": "harvester-1", "ts": ts, "seq": 5}))
        .await;
    // Malformed JSON.
    device.client.publish("sluice/telemetry/tractor-9", QoS::AtLeastOnce, false, "{not json").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), device.puback_rx.recv()).await.unwrap();

    let stream_records = probe_free(
        consume_topic(&broker.bootstrap_servers(), &ingest.stream_topic("telemetry"), 4, SETTLE)
            .await
            .unwrap(),
    );
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
    wait_for_bridge(&mosquitto, &broker, &ingest).await;

    broker.kill().await;
    device.publish("sluice/telemetry/pump-3", json!({"ts": now_micros(), "seq": 77})).await;
    // Give the bridge time to receive it and fail to produce it; then stop ingest with the
    // reading unacknowledged to MQTT.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ingest.stop().await.unwrap();

    // Kafka comes back (empty: memory storage), ingest restarts with the same MQTT session.
    let broker = Broker::start_on(broker_port).await.unwrap();
    let ingest = IngestService::start(config).await.unwrap();
    let records = probe_free(
        consume_topic(&broker.bootstrap_servers(), &ingest.stream_topic("telemetry"), 1, SETTLE)
            .await
            .unwrap(),
    );
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
    wait_for_bridge(&mosquitto, &broker, &first).await;
    // The first replica's subscription is proven; the second subscribes at the same moment of
    // its start. Without the shared group each reading below would land twice.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut device = Device::connect(mosquitto.port).await;
    let ts = now_micros();
    for seq in 0..40 {
        device.publish("sluice/telemetry/sprinkler-2", json!({"ts": ts + seq, "seq": seq})).await;
    }
    let records = probe_free(
        consume_topic(&broker.bootstrap_servers(), &first.stream_topic("telemetry"), 40, SETTLE)
            .await
            .unwrap(),
    );
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
