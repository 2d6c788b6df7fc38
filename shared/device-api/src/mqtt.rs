//! MQTT bridge: subscribes with QoS 1 to `<prefix>/<stream>/<device_id>` and acknowledges each
//! message to the MQTT broker only after the sink stored it (the reading, or its dead letter):
//! Kafka acknowledged it at ingest, the spool synced it at the edge gateway.
//! The session is persistent (clean session off), so readings that arrive while ingest is down,
//! or that were not acknowledged when it stopped, are delivered again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use sluice_schema::SchemaRegistry;
use sluice_shutdown::CancellationToken;
use tokio::sync::mpsc;

use crate::config::MqttConfig;
use crate::metrics::{DeviceApiMetrics, RejectReason};
use crate::records::{self, BodyFormat, DeviceBatchError, RejectedRecord};
use crate::sink::{DeadLetter, DeadLetterWritten, RecordSink, SinkError};
use sluice_clock::now_micros;

const TRANSPORT: &str = "mqtt";
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The largest packet MQTT allows (its remaining length is at most 268,435,455 bytes). The client
/// reads whatever the broker delivers: a packet over the client's limit cannot be skipped (the
/// client drops the connection, and the broker delivers the same message again on reconnect,
/// for ever), so the payload limit is applied after reading, by dead-lettering.
const MQTT_MAX_PACKET_BYTES: usize = 268_435_455;

#[derive(Debug, thiserror::Error)]
pub(crate) enum MqttError {
    #[error(
        "the MQTT broker at {host}:{port} refused the connection ({code:?}); check mqtt.username, mqtt.password and mqtt.client_id"
    )]
    ConnectionRefused { host: String, port: u16, code: ConnectReturnCode },
    #[error(
        "the MQTT broker refused a subscription (one of {filters:?}); check its access rules for mqtt.username"
    )]
    SubscriptionRefused { filters: Vec<String> },
    #[error("the MQTT bridge's worker stopped while the bridge was running")]
    WorkerStopped,
}

#[derive(Debug)]
pub(crate) struct MqttBridge<S> {
    pub(crate) config: MqttConfig,
    pub(crate) record_rules: records::RecordRules,
    pub(crate) schemas: SchemaRegistry,
    pub(crate) sink: S,
    pub(crate) metrics: Arc<DeviceApiMetrics>,
    /// TLS to the MQTT broker (`mqtt.tls`), loaded at start so that a bad file stops ingest there.
    pub(crate) tls_opt: Option<Arc<rustls::ClientConfig>>,
}

/// A message as received; the payload of an oversized one is already cut to what a dead letter
/// can carry.
#[derive(Debug)]
struct Incoming {
    publish: Publish,
    original_size: usize,
}

/// What became of one MQTT message.
enum Outcome {
    /// Stored.
    Accepted { stream: String, num_records: usize },
    /// Stored as a dead letter.
    DeadLettered { stream: String, reason: RejectReason, num_records: usize },
    /// Refused, and the sink refused even its dead letter: acknowledged, counted and logged.
    Dropped { stream: String, reason: RejectReason, num_records: usize },
    /// Not on a stream topic of ours; logged and counted.
    Ignored,
}

impl<S: RecordSink + std::fmt::Debug> MqttBridge<S> {
    pub(crate) async fn run(self, shutdown: CancellationToken) -> Result<(), MqttError> {
        let bridge = Arc::new(self);
        let config = &bridge.config;
        let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
        options
            .set_keep_alive(Duration::from_secs(config.keep_alive_secs))
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MQTT_MAX_PACKET_BYTES, 64 * 1024);
        if !config.username.is_empty() {
            options.set_credentials(&config.username, config.password.expose());
        }
        if let Some(tls) = &bridge.tls_opt {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::clone(tls))));
        }
        // Acks go through the client's request channel; it holds one per message in flight.
        let (client, mut event_loop) = AsyncClient::new(options, config.max_in_flight_messages + 16);
        let (work_tx, work_rx) = mpsc::channel::<Incoming>(config.max_in_flight_messages);
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
        tracing::info!(host = %config.host, port = config.port, tls = config.tls, ?filters, "MQTT bridge starting");

        let mut work_tx_opt = Some(work_tx);
        loop {
            tokio::select! {
                _ = shutdown.cancelled(), if work_tx_opt.is_some() => {
                    // Stop taking readings; keep polling so that acks of in-flight ones go out.
                    work_tx_opt = None;
                }
                worker_result = &mut worker => match worker_result {
                    Ok(()) if work_tx_opt.is_none() => break,
                    Ok(()) => return Err(MqttError::WorkerStopped),
                    // The worker's panic is the bridge's: the supervisor reports it.
                    Err(join_error) if join_error.is_panic() => std::panic::resume_unwind(join_error.into_panic()),
                    Err(_) => return Err(MqttError::WorkerStopped),
                },
                event = event_loop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(connack))) => {
                        tracing::info!(session_present = connack.session_present, "connected to MQTT broker");
                        if !connack.session_present {
                            for filter in &filters {
                                if let Err(error) = client.try_subscribe(filter, QoS::AtLeastOnce) {
                                    tracing::error!(%filter, error = %sluice_errors::Chain(&error), "failed to subscribe");
                                }
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(suback))) => {
                        if suback.return_codes.contains(&SubscribeReasonCode::Failure) {
                            return Err(MqttError::SubscriptionRefused { filters });
                        }
                        // Readings published before this point had no subscriber: say when it is.
                        tracing::info!(return_codes = ?suback.return_codes, "subscribed to MQTT topics");
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if let Some(work_tx) = &work_tx_opt {
                            let incoming = bridge.receive(publish);
                            // Not acknowledged if dropped: the broker delivers it again.
                            let _ = work_tx.send(incoming).await;
                        }
                    }
                    Ok(_) => {}
                    Err(ConnectionError::ConnectionRefused(code)) if refusal_is_final(code) => {
                        return Err(MqttError::ConnectionRefused {
                            host: config.host.clone(),
                            port: config.port,
                            code,
                        });
                    }
                    Err(error) => {
                        tracing::warn!(error = %sluice_errors::Chain(&error), "MQTT connection failed; reconnecting");
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
        Ok(())
    }

    /// Cuts an oversized payload to what its dead letter will carry before it waits for its
    /// turn, so that in-flight messages hold at most that much each.
    fn receive(&self, mut publish: Publish) -> Incoming {
        let original_size = publish.payload.len();
        if original_size > self.config.max_payload_bytes {
            let kept = original_size.min(self.sink.dead_letter_payload_limit());
            publish.payload = Bytes::copy_from_slice(&publish.payload[..kept]);
        }
        Incoming { publish, original_size }
    }

    async fn process_messages(
        self: Arc<Self>,
        mut work_rx: mpsc::Receiver<Incoming>,
        client: AsyncClient,
        shutdown: CancellationToken,
    ) {
        let mut pending = FuturesOrdered::new();
        let mut open = true;
        while open || !pending.is_empty() {
            tokio::select! {
                received = work_rx.recv(), if open => match received {
                    Some(incoming) => pending.push_back(Arc::clone(&self).handle_with_retries(incoming, shutdown.clone())),
                    None => open = false,
                },
                Some(done) = pending.next(), if !pending.is_empty() => {
                    // In receive order, as MQTT expects acknowledgements.
                    if let Some(publish) = done
                        && let Err(error) = client.ack(&publish).await
                    {
                        tracing::warn!(error = %sluice_errors::Chain(&error), "failed to acknowledge MQTT message; the broker will deliver it again");
                    }
                }
            }
        }
    }

    /// Processes one message until the sink stored it (the readings, or their dead letter);
    /// returns it for acknowledgement, or `None` when shutdown interrupted the retries (the
    /// broker will deliver it again). Only errors that another attempt may cure are retried: a
    /// message the sink refuses as such is dead-lettered or, failing that, dropped and counted.
    async fn handle_with_retries(
        self: Arc<Self>,
        incoming: Incoming,
        shutdown: CancellationToken,
    ) -> Option<Publish> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let handled = std::panic::AssertUnwindSafe(self.handle(&incoming)).catch_unwind().await;
            let result = match handled {
                Ok(result) => result,
                Err(panic) => {
                    let message = sluice_errors::panic_message(panic.as_ref());
                    tracing::error!(topic = %incoming.publish.topic, panic = %message, "the service panicked on an MQTT message; dead-lettering it");
                    self.metrics.record_task_failure("mqtt_message");
                    self.handle_panicked(&incoming, &message).await
                }
            };
            match result {
                Ok(outcome) => {
                    self.record(outcome, started);
                    return Some(incoming.publish);
                }
                Err(error) => {
                    tracing::warn!(topic = %incoming.publish.topic, error = %error, "failed to store MQTT reading; not acknowledged, retrying");
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
            Outcome::Dropped { stream, reason, num_records } => {
                self.metrics.record_rejected(&stream, TRANSPORT, reason, num_records);
                self.metrics.record_mqtt_dropped(&stream, reason);
            }
            Outcome::Ignored => {
                self.metrics.record_rejected("unknown", TRANSPORT, RejectReason::UnknownStream, 1)
            }
        }
        self.metrics.record_request(TRANSPORT, 0, started.elapsed());
    }

    async fn handle(&self, incoming: &Incoming) -> Result<Outcome, SinkError> {
        let publish = &incoming.publish;
        let Some((stream, device_id)) = self.parse_topic(&publish.topic) else {
            tracing::warn!(topic = %publish.topic, "MQTT message outside <prefix>/<stream>/<device_id>; acknowledged and not stored");
            return Ok(Outcome::Ignored);
        };
        let Some(schema) = self.schemas.stream(stream) else {
            tracing::warn!(topic = %publish.topic, "MQTT message for an unknown stream; acknowledged and not stored");
            return Ok(Outcome::Ignored);
        };
        let dead_letter = |reason: RejectReason, detail: String, num_records: usize| {
            self.dead_letter(incoming, stream, device_id, reason, detail, num_records)
        };
        let max_payload_bytes = self.config.max_payload_bytes;
        if incoming.original_size > max_payload_bytes {
            let detail = format!(
                "payload of {} bytes exceeds the limit of {max_payload_bytes} bytes (mqtt.max_payload_bytes); nothing of it was stored",
                incoming.original_size
            );
            return dead_letter(RejectReason::TooLarge, detail, 1).await;
        }
        // A reading without a device_id takes the topic's; one naming another device is refused.
        let encoded = records::encode_device_readings(
            schema,
            &publish.payload,
            device_id,
            BodyFormat::Json,
            now_micros(),
            &self.record_rules,
        );
        let batch = match encoded {
            Ok(batch) => batch,
            Err(DeviceBatchError::Body(error)) => {
                return dead_letter(RejectReason::Malformed, error.to_string(), 1).await;
            }
            Err(DeviceBatchError::Rejected { rejected, num_records }) => {
                return dead_letter(RejectReason::Invalid, rejection_text(&rejected), num_records).await;
            }
        };
        let num_records = batch.records.len();
        match self.sink.store(stream, schema, &batch).await {
            Ok(()) => Ok(Outcome::Accepted { stream: stream.to_string(), num_records }),
            Err(SinkError::Refused { message }) => {
                dead_letter(RejectReason::TooLarge, message, num_records).await
            }
            Err(error) => Err(error),
        }
    }

    /// Stores `incoming` as a dead letter of its stream. A dead letter the sink refuses as such
    /// (too large even cut) is dropped: acknowledged, logged and counted.
    async fn dead_letter(
        &self,
        incoming: &Incoming,
        stream: &str,
        device_id: &str,
        reason: RejectReason,
        detail: String,
        num_records: usize,
    ) -> Result<Outcome, SinkError> {
        let publish = &incoming.publish;
        let source = format!("mqtt:{}", publish.topic);
        let letter = DeadLetter {
            key: device_id,
            payload: &publish.payload,
            original_size_opt: Some(incoming.original_size),
            reason: &detail,
            source: &source,
        };
        match self.sink.store_dead_letter(stream, letter).await {
            Ok(DeadLetterWritten::Whole) => {}
            Ok(DeadLetterWritten::Truncated) => tracing::warn!(
                topic = %publish.topic,
                original_size = incoming.original_size,
                limit = self.sink.dead_letter_payload_limit(),
                "MQTT payload dead-lettered with its first bytes only: it exceeds the dead-letter limit"
            ),
            Err(error @ SinkError::Refused { .. }) => {
                tracing::error!(
                    topic = %publish.topic,
                    original_size = incoming.original_size,
                    reason = %detail,
                    error = %error,
                    "the sink refused even the dead letter of an MQTT message; acknowledged and dropped"
                );
                return Ok(Outcome::Dropped { stream: stream.to_string(), reason, num_records });
            }
            Err(error) => return Err(error),
        }
        Ok(Outcome::DeadLettered { stream: stream.to_string(), reason, num_records })
    }

    /// Handles a message whose handling panicked (a bug in ingest): dead-lettered with the panic
    /// as reason rather than retried, because the broker would deliver it again after any crash
    /// and it would stop every restart the same way.
    async fn handle_panicked(&self, incoming: &Incoming, panic_message: &str) -> Result<Outcome, SinkError> {
        let Some((stream, device_id)) = self.parse_topic(&incoming.publish.topic) else {
            return Ok(Outcome::Ignored);
        };
        if self.schemas.stream(stream).is_none() {
            return Ok(Outcome::Ignored);
        }
        let detail =
            format!("the service failed on this message (panicked: {panic_message}); please report it");
        self.dead_letter(incoming, stream, device_id, RejectReason::Invalid, detail, 1).await
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

/// Refusals that another attempt with the same settings cannot cure.
fn refusal_is_final(code: ConnectReturnCode) -> bool {
    matches!(
        code,
        ConnectReturnCode::RefusedProtocolVersion
            | ConnectReturnCode::BadClientId
            | ConnectReturnCode::BadUserNamePassword
            | ConnectReturnCode::NotAuthorized
    )
}

async fn drain_until_disconnected(event_loop: &mut EventLoop) {
    while let Ok(event) = event_loop.poll().await {
        if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            return;
        }
    }
}
