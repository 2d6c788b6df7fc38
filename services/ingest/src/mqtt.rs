//! MQTT bridge: subscribes with QoS 1 to `<prefix>/<stream>/<device_id>` and acknowledges each
//! message to the MQTT broker only after Kafka acknowledged it (the reading, or its dead letter).
//! The session is persistent (clean session off), so readings that arrive while ingest is down,
//! or that were not acknowledged when it stopped, are delivered again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use serde_json::Value;
use sluice_kafka::TopicNames;
use sluice_schema::{KEY_FIELD, SchemaRegistry};
use sluice_shutdown::CancellationToken;
use tokio::sync::mpsc;

use crate::config::MqttConfig;
use crate::http::error_chain;
use crate::metrics::{IngestMetrics, RejectReason};
use crate::producer::{OutgoingRecord, ProduceError, RecordProducer, now_micros};
use crate::records::{self, BodyFormat, RejectedRecord};

const TRANSPORT: &str = "mqtt";
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct MqttBridge {
    pub(crate) config: MqttConfig,
    pub(crate) max_payload_bytes: usize,
    pub(crate) record_rules: records::RecordRules,
    pub(crate) schemas: SchemaRegistry,
    pub(crate) topics: TopicNames,
    pub(crate) producer: RecordProducer,
    pub(crate) metrics: Arc<IngestMetrics>,
}

/// What became of one MQTT message.
enum Outcome {
    /// Produced to the stream topic.
    Accepted { stream: String, num_records: usize },
    /// Produced to the stream's dead-letter topic.
    DeadLettered { stream: String, reason: RejectReason, num_records: usize },
    /// Not on a stream topic of ours; logged and counted.
    Ignored,
}

impl MqttBridge {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let bridge = Arc::new(self);
        let config = &bridge.config;
        let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
        options
            .set_keep_alive(Duration::from_secs(config.keep_alive_secs))
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(bridge.max_payload_bytes + 1024, 64 * 1024);
        if !config.username.is_empty() {
            options.set_credentials(&config.username, config.password.expose());
        }
        // Acks go through the client's request channel; it holds one per message in flight.
        let (client, mut event_loop) = AsyncClient::new(options, config.max_in_flight_messages + 16);
        let (work_tx, work_rx) = mpsc::channel::<Publish>(config.max_in_flight_messages);
        let mut worker =
            tokio::spawn(Arc::clone(&bridge).process_messages(work_rx, client.clone(), shutdown.clone()));
        let share_prefix = if config.shared_subscription_group.is_empty() {
            String::new()
        } else {
            format!("$share/{}/", config.shared_subscription_group)
        };
        let filters: Vec<String> = bridge
            .schemas
            .stream_names()
            .map(|stream| format!("{share_prefix}{}/{stream}/+", config.topic_prefix))
            .collect();
        tracing::info!(host = %config.host, port = config.port, ?filters, "MQTT bridge starting");

        let mut work_tx_opt = Some(work_tx);
        loop {
            tokio::select! {
                _ = shutdown.cancelled(), if work_tx_opt.is_some() => {
                    // Stop taking readings; keep polling so that acks of in-flight ones go out.
                    work_tx_opt = None;
                }
                _ = &mut worker, if work_tx_opt.is_none() => break,
                event = event_loop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                        tracing::info!(session_present = connack.session_present, "connected to MQTT broker");
                        if !connack.session_present {
                            for filter in &filters {
                                if let Err(error) = client.try_subscribe(filter, QoS::AtLeastOnce) {
                                    tracing::error!(%filter, %error, "failed to subscribe");
                                }
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(suback))) => {
                        // Readings published before this point had no subscriber: say when it is.
                        tracing::info!(return_codes = ?suback.return_codes, "subscribed to MQTT topics");
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if let Some(work_tx) = &work_tx_opt {
                            // Not acknowledged if dropped: the broker delivers it again.
                            let _ = work_tx.send(publish).await;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "MQTT connection failed; reconnecting");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = shutdown.cancelled(), if work_tx_opt.is_some() => work_tx_opt = None,
                        }
                        if work_tx_opt.is_none() && worker.is_finished() {
                            break;
                        }
                    }
                }
            }
        }
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), drain_until_disconnected(&mut event_loop)).await;
        tracing::info!("MQTT bridge stopped");
    }

    async fn process_messages(
        self: Arc<Self>,
        mut work_rx: mpsc::Receiver<Publish>,
        client: AsyncClient,
        shutdown: CancellationToken,
    ) {
        let mut pending = FuturesOrdered::new();
        let mut open = true;
        while open || !pending.is_empty() {
            tokio::select! {
                received = work_rx.recv(), if open => match received {
                    Some(publish) => pending.push_back(Arc::clone(&self).handle_with_retries(publish, shutdown.clone())),
                    None => open = false,
                },
                Some(done) = pending.next(), if !pending.is_empty() => {
                    // In receive order, as MQTT expects acknowledgements.
                    if let Some(publish) = done
                        && let Err(error) = client.ack(&publish).await
                    {
                        tracing::warn!(%error, "failed to acknowledge MQTT message; the broker will deliver it again");
                    }
                }
            }
        }
    }

    /// Processes one message until Kafka acknowledged it; returns it for acknowledgement, or
    /// `None` when shutdown interrupted the retries (the broker will deliver it again).
    async fn handle_with_retries(
        self: Arc<Self>,
        publish: Publish,
        shutdown: CancellationToken,
    ) -> Option<Publish> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            match self.handle(&publish).await {
                Ok(outcome) => {
                    self.record(outcome, started);
                    return Some(publish);
                }
                Err(error) => {
                    tracing::warn!(topic = %publish.topic, error = %error_chain(&error), "failed to produce MQTT reading; retrying");
                    if shutdown.is_cancelled() {
                        return None;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return None,
                    }
                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                }
            }
        }
    }

    fn record(&self, outcome: Outcome, started: Instant) {
        match outcome {
            Outcome::Accepted { stream, num_records } => {
                self.metrics.record_accepted(&stream, TRANSPORT, num_records)
            }
            Outcome::DeadLettered { stream, reason, num_records } => {
                self.metrics.record_rejected(&stream, TRANSPORT, reason, num_records)
            }
            Outcome::Ignored => {
                self.metrics.record_rejected("unknown", TRANSPORT, RejectReason::UnknownStream, 1)
            }
        }
        self.metrics.record_request(TRANSPORT, 0, started.elapsed());
    }

    async fn handle(&self, publish: &Publish) -> Result<Outcome, ProduceError> {
        let Some((stream, device_id)) = self.parse_topic(&publish.topic) else {
            tracing::warn!(topic = %publish.topic, "MQTT message outside <prefix>/<stream>/<device_id>; acknowledged and not stored");
            return Ok(Outcome::Ignored);
        };
        let Some(schema) = self.schemas.stream(stream) else {
            tracing::warn!(topic = %publish.topic, "MQTT message for an unknown stream; acknowledged and not stored");
            return Ok(Outcome::Ignored);
        };
        let dead_letter = |reason: RejectReason, detail: String, num_records: usize| async move {
            let topic = self.topics.dead_letter(stream);
            self.producer
                .produce_dead_letter(
                    &topic,
                    device_id,
                    &publish.payload,
                    &detail,
                    &format!("mqtt:{}", publish.topic),
                )
                .await?;
            Ok(Outcome::DeadLettered { stream: stream.to_string(), reason, num_records })
        };
        let mut readings =
            match records::parse_readings(&publish.payload, BodyFormat::Json, &self.record_rules) {
                Ok(readings) => readings,
                Err(error) => return dead_letter(RejectReason::Malformed, error.to_string(), 1).await,
            };
        let mut rejected = Vec::new();
        for (index, reading) in readings.iter_mut().enumerate() {
            if let Ok(Value::Object(object)) = reading {
                match object.get(KEY_FIELD) {
                    None => {
                        object.insert(KEY_FIELD.to_string(), Value::String(device_id.to_string()));
                    }
                    Some(Value::String(given)) if given == device_id => {}
                    Some(given) => rejected.push(RejectedRecord {
                        index,
                        field: Some(KEY_FIELD.to_string()),
                        reason: format!("{given} does not match the device '{device_id}' of the MQTT topic"),
                    }),
                }
            }
        }
        let num_records = readings.len();
        let batch = match records::encode_batch(schema, &readings, now_micros(), &self.record_rules) {
            Ok(batch) if rejected.is_empty() => batch,
            Ok(_) => return dead_letter(RejectReason::Invalid, rejection_text(&rejected), num_records).await,
            Err(more) => {
                rejected.extend(more);
                rejected.sort_by_key(|rejection| rejection.index);
                return dead_letter(RejectReason::Invalid, rejection_text(&rejected), num_records).await;
            }
        };
        let outgoing = batch.records.iter().map(|record| OutgoingRecord {
            key: &record.key,
            event_time_micros: record.event_time_micros,
            value: batch.value(record),
        });
        self.producer.produce_batch(&self.topics.stream(stream), &schema.fingerprint_hex(), outgoing).await?;
        Ok(Outcome::Accepted { stream: stream.to_string(), num_records })
    }

    fn parse_topic<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = topic.strip_prefix(&self.config.topic_prefix)?.strip_prefix('/')?;
        let (stream, device_id) = rest.split_once('/')?;
        (!stream.is_empty() && !device_id.is_empty() && !device_id.contains('/'))
            .then_some((stream, device_id))
    }
}

/// The rejections as JSON, the same shape as the HTTP 400 answer's `rejected` list.
fn rejection_text(rejected: &[RejectedRecord]) -> String {
    serde_json::to_string(rejected).unwrap_or_else(|_| "invalid reading".to_string())
}

async fn drain_until_disconnected(event_loop: &mut EventLoop) {
    while let Ok(event) = event_loop.poll().await {
        if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            return;
        }
    }
}
