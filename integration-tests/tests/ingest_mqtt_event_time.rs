//! Event times at the extremes over MQTT, against real Mosquitto and a real Tansu broker: the
//! bridge shares HTTP's validation, so each extreme is dead-lettered with its reason, and the
//! bridge keeps taking valid readings after them (an i64::MIN `ts` used to kill its worker).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::Duration;

use serde_json::{Value, json};
use sluice_integration_tests::{
    Broker, IngestService, Mosquitto, MqttDevice, consume_topic, consume_topic_within, ingest_config,
    now_micros, unique_suffix, wait_for_mqtt_bridge, wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_event_times_are_dead_lettered_and_the_bridge_goes_on() {
    let broker = Broker::start().await.unwrap();
    let mosquitto = Mosquitto::start().await.unwrap();
    let mut config = ingest_config(&broker);
    config.mqtt.enabled = true;
    config.mqtt.port = mosquitto.port;
    config.mqtt.client_id = format!("ingest-{}", unique_suffix());
    let ingest = IngestService::start(config).await.unwrap();
    let mut device = MqttDevice::connect(mosquitto.port).await;
    wait_for_mqtt_bridge(&mosquitto, &broker, &ingest.stream_topic("telemetry")).await.unwrap();

    let extremes: Vec<(Value, &str)> = vec![
        (json!(i64::MIN), "earliest"),
        (json!(i64::MAX), "in the future"),
        (json!(-1), "earliest"),
        (json!("0000-01-01T00:00:00Z"), "earliest"),
        (json!(1e300), "not an integer"),
    ];
    for (seq, (ts, _)) in extremes.iter().enumerate() {
        device.publish("sluice/telemetry/extreme", json!({"ts": ts, "seq": seq})).await.unwrap();
    }
    device
        .publish("sluice/telemetry/valid", json!({"ts": now_micros() - 1_000_000, "seq": 1}))
        .await
        .unwrap();

    let dead_letters = consume_topic(
        &broker.bootstrap_servers(),
        &ingest.dead_letter_topic("telemetry"),
        extremes.len(),
        Duration::from_millis(1500),
    )
    .await
    .unwrap();
    assert_eq!(dead_letters.len(), extremes.len());
    for dead_letter in &dead_letters {
        // Produced concurrently: matched to its reading by the payload's seq.
        let payload: Value = serde_json::from_slice(&dead_letter.payload).unwrap();
        let (ts, expected) = &extremes[usize::try_from(payload["seq"].as_u64().unwrap()).unwrap()];
        let reason = dead_letter.header(sluice_ingest::DEAD_LETTER_REASON_HEADER).unwrap();
        assert!(reason.contains("\"field\":\"ts\"") && reason.contains(expected), "{ts}: {reason}");
    }
    // The valid reading after them lands: the bridge is alive.
    let bootstrap = broker.bootstrap_servers();
    let topic = ingest.stream_topic("telemetry");
    let landed = wait_until(Duration::from_secs(30), || {
        let (bootstrap, topic) = (bootstrap.clone(), topic.clone());
        async move {
            consume_topic_within(&bootstrap, &topic, usize::MAX, Duration::ZERO, Duration::from_secs(2))
                .await
                .unwrap()
                .iter()
                .any(|record| record.key.as_deref() == Some("valid"))
        }
    })
    .await;
    assert!(landed, "the valid reading after the extremes landed");
    ingest.stop().await.unwrap();
}
