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

/// `println!` that returns an error instead of panicking when stdout is closed, so that a reader
/// who stops early (`| head`, `grep -q`, quitting `less`) ends the command quietly (see `main`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(crate::output::Stdout, $($arg)*)?
    }};
}

mod catalog;
mod jobs;
mod keys;
mod output;
mod query;
mod settings;
mod simulate;
mod tables;

use crate::settings::CliSettings;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Operate a Sluice pipeline: look at streams, manage SQL jobs, query the lake",
    after_help = "Settings come from --config (the executor's TOML file), then SLUICE_<SECTION>__<KEY> variables, \
then the flags below.\n\nExit codes: 0 done, 1 failed (Kafka or the store unreachable, a query error), \
2 bad usage, 3 a job was refused (the reason is printed).\n\nExamples:\n  \
sluice jobs submit examples/jobs/hourly_device_stats.sql\n  sluice jobs runs hourly_device_stats\n  \
sluice query \"SELECT device_id, count(*) FROM telemetry GROUP BY device_id\"\n  sluice tail telemetry --limit 5\n  \
sluice simulate --devices 32 --history 10m"
)]
struct Args {
    /// The executor's TOML configuration (Kafka, object store, schemas, reference tables).
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers [default: 127.0.0.1:9092].
    #[arg(long, global = true)]
    bootstrap_servers: Option<String>,
    /// Topic prefix of the deployment (`<prefix>.<stream>`) [default: sluice].
    #[arg(long, global = true)]
    topic_prefix: Option<String>,
    /// Directory of stream schemas [default: schemas].
    #[arg(long, global = true)]
    schemas: Option<PathBuf>,
    /// The lake: a directory or an s3://, gs:// or az:// URL [default: ./data].
    #[arg(long, global = true)]
    lake: Option<String>,
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
    /// Submit, list, inspect, delete and backfill SQL jobs, and read their audit trail.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// Make the keys job requests are signed with.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// List the tables SQL can read: streams (with their committed files) and reference tables.
    Tables,
    /// Run one read-only query over everything committed in the lake.
    #[command(
        after_help = "Examples:\n  sluice query \"SELECT count(*) FROM telemetry WHERE dt = '2026-11-26'\"\n  \
sluice query --format csv \"SELECT * FROM telemetry LIMIT 10\""
    )]
    Query {
        sql: String,
        #[arg(long, value_enum, default_value_t = output::OutputFormat::Table)]
        format: output::OutputFormat,
    },
    /// Play a fleet of devices: readings over HTTP (and MQTT) with realistic signals and faults.
    Simulate(Box<simulate::SimulateArgs>),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        // The reader has all it wanted; like `head`'s writer, stop without a word and without
        // failing a `set -o pipefail` script.
        Err(error) if output::is_closed_stdout(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn settings(args: &Args) -> anyhow::Result<CliSettings> {
    let mut config: CliSettings = sluice_config::load(args.config.as_deref())?;
    if let Some(servers) = &args.bootstrap_servers {
        config.kafka.bootstrap_servers.clone_from(servers);
    }
    if let Some(prefix) = &args.topic_prefix {
        config.kafka.topic_prefix.clone_from(prefix);
    }
    if let Some(schemas) = &args.schemas {
        config.schemas.directory.clone_from(schemas);
    }
    if let Some(lake) = &args.lake {
        config.object_store.url.clone_from(lake);
    }
    Ok(config)
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = settings(&args)?;
    match args.command {
        Command::Tail { stream, limit, idle_timeout_ms, dead_letters } => {
            let directory = &config.schemas.directory;
            let registry = SchemaRegistry::load_directory(directory)
                .with_context(|| format!("failed to load schemas from {}", directory.display()))?;
            if registry.stream(&stream).is_none() {
                bail!("stream '{stream}' has no schema in {}", directory.display());
            }
            let names = config.kafka.topic_names();
            let topic = if dead_letters { names.dead_letter(&stream) } else { names.stream(&stream) };
            tail(
                &config.kafka.bootstrap_servers,
                &topic,
                &registry,
                limit,
                Duration::from_millis(idle_timeout_ms),
                dead_letters,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Jobs(command) => jobs::run(&config, command),
        Command::Keys(command) => keys::run(command),
        Command::Tables => tables::run(&config),
        Command::Query { sql, format } => query::run(&config, &sql, format),
        Command::Simulate(simulate_args) => {
            simulate::run(&simulate_args)?;
            Ok(ExitCode::SUCCESS)
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
        outln!("{}", output::json_line(&Value::Object(line)));
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
        AvroValue::TimestampMicros(micros) => sluice_clock::format_micros(micros).into(),
        AvroValue::TimestampMillis(millis) => {
            sluice_clock::format_micros(millis.saturating_mul(1_000)).into()
        }
        AvroValue::Union(_, inner) => to_json(*inner),
        AvroValue::Record(fields) => {
            Value::Object(fields.into_iter().map(|(name, value)| (name, to_json(value))).collect())
        }
        other => format!("{other:?}").into(),
    }
}
