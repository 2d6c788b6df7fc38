//! Getting readings to ingest: HTTP batches posted concurrently, with the records ingest refuses
//! booked and its back-pressure retried, and MQTT publishes with QoS 1.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::SimulateArgs;
use super::fleet::{Outgoing, Transport};
use super::report::Report;

/// Sends messages: HTTP in batches, up to `--concurrency` requests at once (invalid readings
/// alone, so that a refused one holds up no valid neighbour), MQTT one publish per reading with
/// QoS 1.
pub(super) struct Sender {
    target: HttpTarget,
    batch: usize,
    concurrency: usize,
    in_flight: tokio::task::JoinSet<anyhow::Result<PostOutcome>>,
    mqtt_opt: Option<MqttSender>,
    mqtt_topic_prefix: String,
    stream: String,
    log_opt: Option<std::io::BufWriter<std::fs::File>>,
    report: Report,
}

impl Sender {
    pub(super) async fn connect(args: &SimulateArgs) -> anyhow::Result<Self> {
        let mqtt_opt = match &args.mqtt {
            None => None,
            Some(address) => Some(MqttSender::connect(address, args.seed).await?),
        };
        let log_opt = match &args.log {
            None => None,
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("failed to create {}", path.display()))?,
            )),
        };
        Ok(Self {
            target: HttpTarget {
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .context("failed to build the HTTP client")?,
                records_url: format!(
                    "{}/v1/streams/{}/records",
                    args.ingest_url.trim_end_matches('/'),
                    args.stream
                ),
                token_opt: args.token.clone(),
            },
            batch: args.batch.max(1),
            concurrency: args.concurrency.max(1),
            in_flight: tokio::task::JoinSet::new(),
            mqtt_opt,
            mqtt_topic_prefix: args.mqtt_topic_prefix.clone(),
            stream: args.stream.clone(),
            log_opt,
            report: Report::default(),
        })
    }

    /// Sends up to `limit` messages; returns how many.
    pub(super) async fn send(&mut self, mut messages: Vec<Outgoing>, limit: u64) -> anyhow::Result<u64> {
        messages.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let num_messages = messages.len() as u64;
        for message in &messages {
            self.report.count_outgoing(message);
        }
        let (mqtt, http): (Vec<Outgoing>, Vec<Outgoing>) =
            messages.into_iter().partition(|message| message.transport == Transport::Mqtt);
        for message in &mqtt {
            let topic = format!("{}/{}/{}", self.mqtt_topic_prefix, self.stream, message.device_id);
            let mqtt_sender = self.mqtt_opt.as_mut().context("an MQTT device without --mqtt")?;
            mqtt_sender.publish(&topic, message.body.to_string()).await?;
            self.report.mqtt_published += 1;
            self.log(message, "published")?;
        }
        let (invalid, valid): (Vec<Outgoing>, Vec<Outgoing>) =
            http.into_iter().partition(Outgoing::is_invalid);
        let batches = valid
            .chunks(self.batch)
            .map(<[Outgoing]>::to_vec)
            .chain(invalid.into_iter().map(|message| vec![message]));
        for batch in batches {
            while self.in_flight.len() >= self.concurrency {
                self.settle_one().await?;
            }
            self.in_flight.spawn(post(self.target.clone(), batch));
        }
        Ok(num_messages)
    }

    /// Waits for one in-flight HTTP batch and books what ingest answered.
    async fn settle_one(&mut self) -> anyhow::Result<()> {
        let Some(joined) = self.in_flight.join_next().await else { return Ok(()) };
        let outcome = joined.context("an HTTP sender task failed")??;
        self.report.http_requests += outcome.requests;
        self.report.http_retries += outcome.retries;
        for (message, answer) in outcome.answers {
            self.report.http_sent += 1;
            let text = match answer {
                Answer::Accepted => {
                    self.report.http_accepted += 1;
                    "accepted".to_string()
                }
                Answer::Rejected(reason) => {
                    self.report.http_rejected += 1;
                    *self.report.rejected_by_reason.entry(reason.clone()).or_default() += 1;
                    format!("rejected: {reason}")
                }
            };
            self.log(&message, &text)?;
        }
        Ok(())
    }

    fn log(&mut self, message: &Outgoing, outcome: &str) -> anyhow::Result<()> {
        if let Some(log) = &mut self.log_opt {
            let transport = match message.transport {
                Transport::Http => "http",
                Transport::Mqtt => "mqtt",
            };
            let line = json!({
                "transport": transport,
                "faults": message.faults,
                "outcome": outcome,
                "reading": message.body,
            });
            writeln!(log, "{line}").context("failed to write the log")?;
        }
        Ok(())
    }

    pub(super) async fn finish(mut self) -> anyhow::Result<Report> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        if let Some(mqtt) = self.mqtt_opt.take() {
            mqtt.wait_for_acks().await?;
        }
        if let Some(log) = &mut self.log_opt {
            log.flush().context("failed to write the log")?;
        }
        Ok(self.report)
    }
}

/// Where and how to post: cloned into each sender task.
#[derive(Clone)]
struct HttpTarget {
    client: reqwest::Client,
    records_url: String,
    token_opt: Option<String>,
}

enum Answer {
    Accepted,
    Rejected(String),
}

struct PostOutcome {
    answers: Vec<(Outgoing, Answer)>,
    requests: u64,
    retries: u64,
}

/// Posts readings as NDJSON. A 400 names the refused records: they are booked with their
/// reason and the rest is sent again, as a gateway would. 429, 503 and connection errors are
/// retried with backoff.
async fn post(target: HttpTarget, messages: Vec<Outgoing>) -> anyhow::Result<PostOutcome> {
    let mut outcome = PostOutcome { answers: Vec::with_capacity(messages.len()), requests: 0, retries: 0 };
    let mut remaining = messages;
    let mut attempt = 0u32;
    while !remaining.is_empty() {
        let body: String = remaining.iter().map(|message| format!("{}\n", message.body)).collect();
        let mut request =
            target.client.post(&target.records_url).header("content-type", "application/x-ndjson").body(body);
        if let Some(token) = &target.token_opt {
            request = request.bearer_auth(token);
        }
        outcome.requests += 1;
        let (status_opt, text) = match request.send().await {
            Ok(response) => {
                let status = response.status();
                (Some(status), response.text().await.unwrap_or_default())
            }
            Err(error) => (None, error.to_string()),
        };
        match status_opt {
            Some(status) if status.is_success() => {
                outcome.answers.extend(remaining.drain(..).map(|message| (message, Answer::Accepted)));
            }
            Some(status) if status.as_u16() == 400 => {
                let refused = refused_records(&text, remaining.len());
                if refused.is_empty() {
                    bail!("ingest refused a request without naming a record: {text}");
                }
                let mut kept = Vec::with_capacity(remaining.len());
                for (index, message) in remaining.into_iter().enumerate() {
                    match refused.get(&index) {
                        Some(reason) => outcome.answers.push((message, Answer::Rejected(reason.clone()))),
                        None => kept.push(message),
                    }
                }
                remaining = kept;
            }
            Some(status) if !(status.as_u16() == 429 || status.is_server_error()) => {
                bail!("ingest answered {status}: {text}");
            }
            _ if attempt >= 8 => bail!("ingest did not take readings after {attempt} retries: {text}"),
            _ => {
                attempt += 1;
                outcome.retries += 1;
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
            }
        }
    }
    Ok(outcome)
}

/// Index to reason of each record a 400 answer names
/// (`{"error": "...", "rejected": [{"index", "field", "reason"}], ...}`, docs/ingest-api.md).
fn refused_records(answer: &str, num_records: usize) -> BTreeMap<usize, String> {
    let mut refused = BTreeMap::new();
    let Ok(body) = serde_json::from_str::<Value>(answer) else { return refused };
    for error in body["rejected"].as_array().into_iter().flatten() {
        let Some(index) = error["index"].as_u64().and_then(|index| usize::try_from(index).ok()) else {
            continue;
        };
        if index < num_records {
            let field = error["field"].as_str().unwrap_or("record");
            let reason = error["reason"].as_str().unwrap_or("invalid");
            refused.entry(index).or_insert_with(|| format!("{field}: {reason}"));
        }
    }
    refused
}

struct MqttSender {
    client: rumqttc::AsyncClient,
    acks: tokio::sync::mpsc::UnboundedReceiver<Result<(), String>>,
    pending: u64,
}

impl MqttSender {
    async fn connect(address: &str, seed: u64) -> anyhow::Result<Self> {
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.to_string(), port.parse::<u16>().ok()?)))
            .with_context(|| format!("--mqtt takes host:port, got '{address}'"))?;
        let mut options =
            rumqttc::MqttOptions::new(format!("sluice-simulate-{seed}-{}", std::process::id()), host, port);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut event_loop) = rumqttc::AsyncClient::new(options, 1_000);
        let (ack_tx, acks) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match event_loop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        if ack_tx.send(Ok(())).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(error) => {
                        // rumqttc reconnects on the next poll and resends unacknowledged publishes.
                        let _ = ack_tx.send(Err(error.to_string()));
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(Self { client, acks, pending: 0 })
    }

    async fn publish(&mut self, topic: &str, payload: String) -> anyhow::Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .context("failed to publish over MQTT")?;
        self.pending += 1;
        // Keep a bounded window of unacknowledged publishes.
        while self.pending > 500 {
            self.next_ack().await?;
        }
        Ok(())
    }

    async fn next_ack(&mut self) -> anyhow::Result<()> {
        let mut errors = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(30), self.acks.recv()).await {
                Ok(Some(Ok(()))) => {
                    self.pending -= 1;
                    return Ok(());
                }
                Ok(Some(Err(error))) => {
                    errors += 1;
                    if errors > 20 {
                        bail!("the MQTT broker is unreachable: {error}");
                    }
                }
                Ok(None) | Err(_) => bail!("no acknowledgement from the MQTT broker within 30 s"),
            }
        }
    }

    async fn wait_for_acks(mut self) -> anyhow::Result<()> {
        while self.pending > 0 {
            self.next_ack().await?;
        }
        let _ = self.client.disconnect().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_records_are_read_from_ingest_answers() {
        let answer = r#"{"error":"2 of 3 records are invalid; nothing was written","rejected":[{"index":1,"field":"seq","reason":"required field is missing"},{"index":9,"field":"ts","reason":"x"}]}"#;
        let refused = refused_records(answer, 3);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[&1], "seq: required field is missing");
        assert!(refused_records("not json", 3).is_empty());
    }
}
