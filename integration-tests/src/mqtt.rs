//! MQTT devices publishing to the test's Mosquitto, and the wait for ingest's MQTT bridge.

use std::time::Duration;

use anyhow::{Context, bail};

use crate::{Broker, Mosquitto, consume_topic, now_micros, unique_suffix};

/// A device-side MQTT client whose publishes resolve once the MQTT broker acknowledged them.
#[derive(Debug)]
pub struct MqttDevice {
    client: rumqttc::AsyncClient,
    puback_rx: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl MqttDevice {
    pub async fn connect(port: u16) -> Self {
        Self::with_options(rumqttc::MqttOptions::new(
            format!("device-{}", unique_suffix()),
            "127.0.0.1",
            port,
        ))
    }

    /// A device whose client may send packets up to `max_packet_bytes` (rumqttc's default is
    /// 10 KiB), for oversized payloads.
    pub async fn connect_with_max_packet(port: u16, max_packet_bytes: usize) -> Self {
        let mut options = rumqttc::MqttOptions::new(format!("device-{}", unique_suffix()), "127.0.0.1", port);
        options.set_max_packet_size(max_packet_bytes, max_packet_bytes);
        Self::with_options(options)
    }

    fn with_options(options: rumqttc::MqttOptions) -> Self {
        let (client, mut event_loop) = rumqttc::AsyncClient::new(options, 16);
        let (puback_tx, puback_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match event_loop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        let _ = puback_tx.send(());
                    }
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self { client, puback_rx }
    }

    /// Publishes JSON with QoS 1 and waits for Mosquitto's PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: serde_json::Value) -> anyhow::Result<()> {
        self.publish_bytes(topic, payload.to_string().into_bytes()).await
    }

    /// Publishes any payload (malformed ones too) with QoS 1 and waits for Mosquitto's PUBACK.
    pub async fn publish_bytes(&mut self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .context("failed to publish")?;
        tokio::time::timeout(Duration::from_secs(10), self.puback_rx.recv())
            .await
            .context("no PUBACK from mosquitto within 10 s")?
            .context("the MQTT event loop stopped")
    }
}

/// Waits until ingest's MQTT bridge has subscribed: a device publishes probes (readings of
/// device "probe", which tests leave out) until one of them lands in `stream_topic`.
pub async fn wait_for_mqtt_bridge(
    mosquitto: &Mosquitto,
    broker: &Broker,
    stream_topic: &str,
) -> anyhow::Result<()> {
    let mut prober = MqttDevice::connect(mosquitto.port).await;
    let probing = tokio::spawn(async move {
        for attempt in 0..200 {
            let probe = serde_json::json!({"ts": now_micros(), "seq": attempt});
            if prober.publish("sluice/telemetry/probe", probe).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let records = consume_topic(&broker.bootstrap_servers(), stream_topic, 1, Duration::ZERO).await?;
    probing.abort();
    if records.is_empty() {
        bail!("the MQTT bridge never subscribed");
    }
    Ok(())
}
