//! `sluice`: the command line for people operating a Sluice pipeline.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use apache_avro::types::Value as AvroValue;
use clap::{Parser, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Map, Value};
use sluice_schema::{SchemaRegistry, split_single_object};

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "Operate a Sluice pipeline")]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long, global = true, default_value = "127.0.0.1:9092")]
    bootstrap_servers: String,
    /// Topic prefix of the deployment (`<prefix>.<stream>`).
    #[arg(long, global = true, default_value = "sluice")]
    topic_prefix: String,
    /// Directory of stream schemas, to decode records.
    #[arg(long, global = true, default_value = "schemas")]
    schemas: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a stream's records from the beginning of its topic, one JSON object per line.
    #[command(
        after_help = "Examples:\n  sluice tail telemetry --limit 20\n  sluice tail telemetry --dead-letters"
    )]
    Tail {
        /// Stream name (schemas/<stream>.avsc).
        stream: String,
        /// Stop after this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Stop when no record arrived for this long.
        #[arg(long, default_value_t = 2_000)]
        idle_timeout_ms: u64,
        /// Read the stream's dead-letter topic instead, with the reason of each.
        #[arg(long)]
        dead_letters: bool,
    },
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Tail { stream, limit, idle_timeout_ms, dead_letters } => {
            let registry = SchemaRegistry::load_directory(&args.schemas)
                .with_context(|| format!("failed to load schemas from {}", args.schemas.display()))?;
            if registry.stream(&stream).is_none() {
                bail!("stream '{stream}' has no schema in {}", args.schemas.display());
            }
            let topic = if dead_letters {
                format!("{}.{stream}.dlq", args.topic_prefix)
            } else {
                format!("{}.{stream}", args.topic_prefix)
            };
            tail(
                &args.bootstrap_servers,
                &topic,
                &registry,
                limit,
                Duration::from_millis(idle_timeout_ms),
                dead_letters,
            )
        }
    }
}

fn tail(
    bootstrap_servers: &str,
    topic: &str,
    registry: &SchemaRegistry,
    limit: usize,
    idle_timeout: Duration,
    dead_letters: bool,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", "sluice-cli-tail")
        .set("enable.auto.commit", "false")
        .create()
        .context("failed to create the Kafka consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("failed to reach Kafka at {bootstrap_servers}"))?;
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|entry| entry.partitions()) {
        assignment.add_partition_offset(topic, partition.id(), Offset::Beginning)?;
    }
    if assignment.count() == 0 {
        bail!("topic {topic} does not exist");
    }
    consumer.assign(&assignment)?;
    let mut num_printed = 0;
    let mut last_record = Instant::now();
    while num_printed < limit && last_record.elapsed() < idle_timeout {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = message.context("failed to read from Kafka")?;
        last_record = Instant::now();
        let payload = message.payload().unwrap_or_default();
        let mut line = Map::new();
        line.insert("partition".into(), message.partition().into());
        line.insert("offset".into(), message.offset().into());
        if dead_letters {
            use rdkafka::message::Headers;
            for header in message.headers().into_iter().flat_map(|headers| headers.iter()) {
                let value =
                    header.value.map(|bytes| String::from_utf8_lossy(bytes).into_owned()).unwrap_or_default();
                line.insert(header.key.to_string(), value.into());
            }
            line.insert("payload".into(), String::from_utf8_lossy(payload).into_owned().into());
        } else {
            line.insert(
                "record".into(),
                decode(registry, payload).unwrap_or_else(|error| format!("undecodable: {error:#}").into()),
            );
        }
        println!("{}", Value::Object(line));
        num_printed += 1;
    }
    eprintln!("{num_printed} record(s) from {topic}");
    Ok(())
}

fn decode(registry: &SchemaRegistry, payload: &[u8]) -> anyhow::Result<Value> {
    let (fingerprint, _) = split_single_object(payload)?;
    let schema = registry
        .by_fingerprint(fingerprint)
        .with_context(|| format!("no schema with fingerprint {fingerprint:016x}"))?;
    let reader = apache_avro::GenericSingleObjectReader::builder()
        .schema(schema.avro.clone())
        .header(sluice_schema::single_object_header(schema.fingerprint))
        .build()?;
    Ok(to_json(reader.read_value(&mut &payload[..])?))
}

fn to_json(value: AvroValue) -> Value {
    match value {
        AvroValue::Null => Value::Null,
        AvroValue::Boolean(flag) => flag.into(),
        AvroValue::Int(number) => number.into(),
        AvroValue::Long(number) => number.into(),
        AvroValue::Float(number) => f64::from(number).into(),
        AvroValue::Double(number) => number.into(),
        AvroValue::String(text) | AvroValue::Enum(_, text) => text.into(),
        AvroValue::TimestampMicros(micros) => format_micros(micros).into(),
        AvroValue::TimestampMillis(millis) => format_micros(millis.saturating_mul(1_000)).into(),
        AvroValue::Union(_, inner) => to_json(*inner),
        AvroValue::Record(fields) => {
            Value::Object(fields.into_iter().map(|(name, value)| (name, to_json(value))).collect())
        }
        other => format!("{other:?}").into(),
    }
}

/// RFC 3339 in UTC; the value itself when it is outside what a date can show.
fn format_micros(micros: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000)
        .ok()
        .and_then(|instant| instant.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| micros.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_as_rfc3339_utc() {
        assert_eq!(format_micros(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_micros(1_795_680_000_123_456), "2026-11-26T08:00:00.123456Z");
        assert_eq!(format_micros(951_782_400_000_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_micros(-1), "1969-12-31T23:59:59.999999Z");
    }
}
