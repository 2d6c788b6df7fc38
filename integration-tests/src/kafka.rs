//! Kafka from the test's side: producing readings and raw records, reading topics back, and
//! decoding what Sluice wrote to them.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::{repo_root, unique_suffix};

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct ConsumedRecord {
    pub partition: i32,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub timestamp_millis: Option<i64>,
    pub headers: Vec<(String, String)>,
}

impl ConsumedRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

/// Reads every partition of `topic` from the beginning until `expected` records arrived, then
/// keeps reading for `settle` to catch any record beyond them (so "exactly N" can be asserted).
pub async fn consume_topic(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    settle: Duration,
) -> anyhow::Result<Vec<ConsumedRecord>> {
    consume_topic_within(bootstrap, topic, expected, settle, Duration::from_secs(30)).await
}

/// [`consume_topic`] that gives up after `max_wait` with whatever arrived.
pub async fn consume_topic_within(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    settle: Duration,
    max_wait: Duration,
) -> anyhow::Result<Vec<ConsumedRecord>> {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || consume_blocking(&bootstrap, &topic, expected, settle, max_wait))
        .await?
}

fn consume_blocking(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    settle: Duration,
    max_wait: Duration,
) -> anyhow::Result<Vec<ConsumedRecord>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-reader-{}", unique_suffix()))
        .set("enable.auto.commit", "false")
        .create()
        .context("failed to create the test consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .context("failed to fetch topic metadata")?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|entry| entry.partitions().iter().map(|partition| partition.id()))
        .collect();
    if partitions.is_empty() {
        bail!("topic {topic} has no partitions");
    }
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut records = Vec::new();
    let overall_deadline = Instant::now() + max_wait;
    let mut settle_deadline_opt: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if records.len() >= expected && settle_deadline_opt.is_none() {
            settle_deadline_opt = Some(now + settle);
        }
        if settle_deadline_opt.is_some_and(|deadline| now >= deadline) || now >= overall_deadline {
            break;
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = message.context("failed to consume")?;
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| {
                        (
                            header.key.to_string(),
                            header
                                .value
                                .map(|value| String::from_utf8_lossy(value).into_owned())
                                .unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        records.push(ConsumedRecord {
            partition: message.partition(),
            key: message.key().map(|key| String::from_utf8_lossy(key).into_owned()),
            payload: message.payload().unwrap_or_default().to_vec(),
            timestamp_millis: message.timestamp().to_millis(),
            headers,
        });
    }
    Ok(records)
}

/// Decodes a Sluice Kafka value (Avro single-object) with apache-avro, as any Avro reader would.
pub fn decode_value(
    schema_json: &str,
    payload: &[u8],
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let schema = apache_avro::Schema::parse_str(schema_json)?;
    let header = sluice_schema::single_object_header(sluice_schema::fingerprint_of(&schema));
    let reader = apache_avro::GenericSingleObjectReader::builder().schema(schema).header(header).build()?;
    let value = reader.read_value(&mut &payload[..])?;
    let apache_avro::types::Value::Record(fields) = value else { bail!("not a record") };
    Ok(fields.into_iter().map(|(name, value)| (name, avro_to_json(value))).collect())
}

fn avro_to_json(value: apache_avro::types::Value) -> serde_json::Value {
    use apache_avro::types::Value as Avro;
    use serde_json::Value as Json;
    match value {
        Avro::Null => Json::Null,
        Avro::Boolean(flag) => Json::Bool(flag),
        Avro::Int(number) => Json::from(number),
        Avro::Long(number) | Avro::TimestampMicros(number) | Avro::TimestampMillis(number) => {
            Json::from(number)
        }
        Avro::Float(number) => Json::from(f64::from(number)),
        Avro::Double(number) => Json::from(number),
        Avro::String(text) | Avro::Enum(_, text) => Json::String(text),
        Avro::Union(_, inner) => avro_to_json(*inner),
        other => Json::String(format!("{other:?}")),
    }
}

/// The telemetry stream's schema as shipped.
pub fn telemetry_schema_json() -> String {
    std::fs::read_to_string(repo_root().join("schemas/telemetry.avsc")).unwrap_or_default()
}

/// Encodes readings with the stream's schema and produces them, waiting for Kafka's acks.
pub async fn produce_readings(
    bootstrap: &str,
    topic: &str,
    readings: &[serde_json::Value],
) -> anyhow::Result<()> {
    produce_readings_with_headers(bootstrap, topic, readings, |_| Vec::new()).await
}

/// [`produce_readings`] with the headers `headers_of(index)` gives each reading, as a service
/// that marks its records would produce them.
pub async fn produce_readings_with_headers(
    bootstrap: &str,
    topic: &str,
    readings: &[serde_json::Value],
    headers_of: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> anyhow::Result<()> {
    let schema_path = repo_root().join("schemas/telemetry.avsc");
    let schema = sluice_schema::StreamSchema::from_avro_json(
        "telemetry",
        &std::fs::read_to_string(&schema_path)?,
        &schema_path,
    )?;
    let producer = sluice_kafka::BatchProducer::new(
        &sluice_kafka::KafkaConfig { bootstrap_servers: bootstrap.to_string(), ..Default::default() }
            .producer_config(),
    )?;
    for (chunk_index, chunk) in readings.chunks(5_000).enumerate() {
        let encoded: Vec<(String, i64, Vec<u8>)> = chunk
            .iter()
            .map(|reading| {
                let mut value = Vec::new();
                let meta = schema
                    .encode_json(reading, i64::MAX / 2, i64::MAX / 4, &mut value)
                    .map_err(|errors| anyhow::anyhow!("{errors:?}"))?;
                Ok((meta.key, meta.event_time_micros, value))
            })
            .collect::<anyhow::Result<_>>()?;
        let records = encoded.iter().enumerate().map(|(index, (key, ts, value))| {
            let headers = headers_of(chunk_index * 5_000 + index);
            sluice_kafka::BatchRecord {
                key: key.as_bytes(),
                value: value.as_slice(),
                timestamp_millis: *ts / 1_000,
                headers_opt: (!headers.is_empty()).then(|| {
                    headers.iter().fold(OwnedHeaders::new(), |all, (name, value)| {
                        all.insert(Header { key: name, value: Some(value.as_str()) })
                    })
                }),
            }
        });
        send_and_wait(&producer, topic, records).await?;
    }
    Ok(())
}

/// Produces raw key/value records and waits for Kafka's acknowledgement of all of them.
pub async fn produce_raw<'a>(
    producer: &sluice_kafka::BatchProducer,
    topic: &str,
    records: impl ExactSizeIterator<Item = (&'a [u8], i64, &'a [u8])>,
) -> anyhow::Result<()> {
    let records = records.map(|(key, timestamp_millis, value)| sluice_kafka::BatchRecord {
        key,
        value,
        timestamp_millis,
        headers_opt: None,
    });
    send_and_wait(producer, topic, records).await
}

/// Produces `records` and waits for Kafka's acknowledgement of every one.
async fn send_and_wait<'a>(
    producer: &sluice_kafka::BatchProducer,
    topic: &str,
    records: impl ExactSizeIterator<Item = sluice_kafka::BatchRecord<'a>>,
) -> anyhow::Result<()> {
    let batch = producer.send_batch(topic, records)?;
    let outcome = sluice_kafka::BatchProducer::wait(&batch, Duration::from_secs(30))
        .await
        .context("no acknowledgement")?;
    if outcome.num_failed > 0 {
        bail!("{} records failed: {:?}", outcome.num_failed, outcome.first_error_opt);
    }
    Ok(())
}
