//! `sluice jobs ...`: submit, list, show, delete, follow and backfill SQL jobs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use datafusion::arrow::array::RecordBatch;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use sluice_jobs::audit::load_audit;
use sluice_jobs::events::{JobRunEvent, JobStatusEvent, JobStatusKind};
use sluice_jobs::job::{JobDefinition, format_micros, parse_timestamp_micros};
use sluice_jobs::records::{BackfillRequest, load_windows, request_backfill_at, satisfies};
use sluice_jobs::signing::{SignedAction, SigningKey, backfill_place, topic_place};
use sluice_query::validate_job;

use crate::catalog::{open_catalog, runtime};
use crate::output::{self, OutputFormat, escape_controls, escape_controls_keep_lines};
use crate::settings::CliSettings;

/// Exit code for a job the executor or the local check refused.
const REFUSED: u8 = 3;
const READ_IDLE: Duration = Duration::from_millis(1_500);

#[derive(Debug, Subcommand)]
pub(crate) enum JobsCommand {
    /// Check a job file against the tables, then produce it to the jobs topic under its name.
    #[command(after_help = "Example:\n  sluice jobs submit examples/jobs/hourly_device_stats.sql --wait 30")]
    Submit {
        file: PathBuf,
        /// Wait this many seconds for the executor to accept or reject it (0: do not wait).
        #[arg(long, default_value_t = 0)]
        wait: u64,
        #[command(flatten)]
        signing: SigningArgs,
    },
    /// Every job in the jobs topic, with its latest status.
    List,
    /// A job's definition, status and windows.
    Show { name: String },
    /// Delete a job (a tombstone in the jobs topic); its results stay in the lake.
    Delete {
        name: String,
        #[command(flatten)]
        signing: SigningArgs,
    },
    /// A job's run history from the job-runs topic, oldest first.
    Runs {
        name: String,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Print a job's results for its newest windows.
    #[command(after_help = "Example:\n  sluice jobs results device_minute_stats --windows 3")]
    Results {
        name: String,
        /// How many of the newest windows to show.
        #[arg(long, default_value_t = 3)]
        windows: usize,
        /// Print at most this many rows of each window (all when not given).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        format: OutputFormat,
    },
    /// Run a job's windows in [FROM, TO) again (or for the first time), and follow progress.
    #[command(
        after_help = "Example:\n  sluice jobs backfill hourly_device_stats --from 2026-11-25 --to 2026-11-26T12:00:00Z"
    )]
    Backfill {
        name: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// Give up following after this many seconds (the backfill goes on).
        #[arg(long, default_value_t = 3_600)]
        timeout: u64,
        /// Request it and return at once.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        signing: SigningArgs,
    },
    /// The audit trail: every definition, deletion and backfill request an executor saw, with
    /// its verdict, oldest first.
    #[command(after_help = "Example:\n  sluice jobs audit --job hourly_device_stats")]
    Audit {
        /// Only the entries of this job.
        #[arg(long)]
        job: Option<String>,
        /// Only the newest this many entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// The private key a request is signed with (`sluice keys generate` makes one).
#[derive(Debug, clap::Args)]
pub(crate) struct SigningArgs {
    /// Sign with the Ed25519 private key in this PEM file; executors that enforce signing refuse
    /// requests without one.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// The name the executors' signing.trusted_keys give the key [default: the file's name
    /// without its extension].
    #[arg(long, value_name = "NAME", requires = "key")]
    key_name: Option<String>,
}

impl SigningArgs {
    fn load(&self) -> anyhow::Result<Option<SigningKey>> {
        let Some(path) = &self.key else { return Ok(None) };
        crate::keys::load_key(path, self.key_name.as_deref()).map(Some)
    }
}

pub(crate) fn run(config: &CliSettings, command: JobsCommand) -> anyhow::Result<ExitCode> {
    match command {
        JobsCommand::Submit { file, wait, signing } => submit(config, &file, wait, signing.load()?.as_ref()),
        JobsCommand::List => list(config),
        JobsCommand::Show { name } => show(config, &name),
        JobsCommand::Delete { name, signing } => {
            produce(config, &name, None, signing.load()?.as_ref())?;
            outln!("deleted {name} (a tombstone in {})", config.kafka.topic_names().jobs());
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Runs { name, limit } => runs(config, &name, limit),
        JobsCommand::Results { name, windows, limit, format } => {
            results(config, &name, windows, limit.unwrap_or(usize::MAX), format)
        }
        JobsCommand::Backfill { name, from, to, timeout, no_wait, signing } => backfill(
            config,
            &name,
            (&from, &to),
            Duration::from_secs(timeout),
            no_wait,
            signing.load()?.as_ref(),
        ),
        JobsCommand::Audit { job, limit } => audit(config, job.as_deref(), limit),
    }
}

fn submit(
    config: &CliSettings,
    file: &PathBuf,
    wait_secs: u64,
    key_opt: Option<&SigningKey>,
) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let catalog = open_catalog(config)?;
    let validated = runtime()?.block_on(validate_job(&catalog, &text, None, config.ballista.is_configured()));
    let job = match validated {
        Ok(job) => job,
        Err(reason) => {
            eprintln!("sluice: {} was not submitted: {reason}", file.display());
            return Ok(ExitCode::from(REFUSED));
        }
    };
    let name = job.definition.name.clone();
    let (partition, offset) = produce(config, &name, Some(text.as_bytes()), key_opt)?;
    outln!(
        "submitted {name} to {} (partition {partition}, offset {offset})",
        config.kafka.topic_names().jobs()
    );
    if wait_secs == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + Duration::from_secs(wait_secs);
    while Instant::now() < deadline {
        let statuses = read_statuses(config)?;
        if let Some(status) = statuses.get(&name).filter(|status| status.definition_offset >= offset) {
            outln!("{name}: {:?} by {}", status.status, status.executor);
            if !status.reason.is_empty() {
                outln!("  {}", escape_controls(&status.reason));
            }
            let refused = matches!(status.status, JobStatusKind::Rejected | JobStatusKind::Refused);
            return Ok(if refused { ExitCode::from(REFUSED) } else { ExitCode::SUCCESS });
        }
    }
    bail!("no executor answered within {wait_secs} s; is sluice-executor running?")
}

/// Produces a definition (or a tombstone), signed with `key_opt` when given, and waits for the
/// broker's acknowledgement.
fn produce(
    config: &CliSettings,
    name: &str,
    payload_opt: Option<&[u8]>,
    key_opt: Option<&SigningKey>,
) -> anyhow::Result<(i32, i64)> {
    sluice_jobs::job::validate_name(name).map_err(anyhow::Error::msg)?;
    let producer: BaseProducer =
        config.kafka.producer_config().create().context("failed to create the Kafka producer")?;
    let topic = config.kafka.topic_names().jobs();
    let mut record: BaseRecord<'_, str, [u8]> = BaseRecord::to(&topic).key(name);
    if let Some(payload) = payload_opt {
        record = record.payload(payload);
    }
    if let Some(key) = key_opt {
        // A signature names the partition, so the record goes to the one chosen here: the one
        // librdkafka's default partitioner gives the key, where unsigned revisions of the job are.
        let partition = job_partition(&producer, &topic, name, config)?;
        let action = if payload_opt.is_some() { SignedAction::Submit } else { SignedAction::Delete };
        let signature = key.sign(
            action,
            name,
            &topic_place(&topic, partition),
            payload_opt.unwrap_or_default(),
            sluice_clock::now_micros(),
        );
        let headers = signature.headers().iter().fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header { key, value: Some(value.as_bytes()) })
        });
        record = record.headers(headers).partition(partition);
    }
    producer.send(record).map_err(|(error, _)| error).context("failed to queue the job")?;
    producer.flush(Duration::from_secs(30)).with_context(|| {
        format!("Kafka at {} did not acknowledge the job", config.kafka.bootstrap_servers)
    })?;
    // The broker acknowledged; look the record up to report where it landed.
    let latest = read_topic(config, &topic)?
        .into_iter()
        .filter(|record| record.key == name)
        .max_by_key(|record| record.offset)
        .context("the job was acknowledged but cannot be read back")?;
    Ok((latest.partition, latest.offset))
}

/// The partition of the jobs topic a job's records go to: CRC-32 of the name modulo the
/// partitions, as librdkafka's default partitioner (`consistent_random`) puts a keyed record.
fn job_partition(
    producer: &BaseProducer,
    topic: &str,
    name: &str,
    config: &CliSettings,
) -> anyhow::Result<i32> {
    let metadata = producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("failed to reach Kafka at {}", config.kafka.bootstrap_servers))?;
    let partitions = metadata.topics().iter().map(|entry| entry.partitions().len()).sum::<usize>();
    if partitions == 0 {
        bail!("topic {topic} has no partitions; is sluice-executor running (it creates the topic)?");
    }
    let partitions = u32::try_from(partitions).context("too many partitions")?;
    Ok(i32::try_from(crc32fast::hash(name.as_bytes()) % partitions).unwrap_or(0))
}

struct TopicRecord {
    key: String,
    payload_opt: Option<Vec<u8>>,
    partition: i32,
    offset: i64,
}

/// Every record of a topic, from the beginning until it has been quiet for a moment.
fn read_topic(config: &CliSettings, topic: &str) -> anyhow::Result<Vec<TopicRecord>> {
    let mut client_config = config.kafka.consumer_config("sluice-cli");
    client_config.set("enable.partition.eof", "false");
    let consumer: BaseConsumer = client_config.create().context("failed to create the Kafka consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("failed to reach Kafka at {}", config.kafka.bootstrap_servers))?;
    let mut assignment = TopicPartitionList::new();
    for partition in metadata.topics().iter().flat_map(|entry| entry.partitions()) {
        assignment.add_partition_offset(topic, partition.id(), Offset::Beginning)?;
    }
    if assignment.count() == 0 {
        return Ok(Vec::new());
    }
    consumer.assign(&assignment)?;
    let mut records = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < READ_IDLE {
        let Some(message) = consumer.poll(Duration::from_millis(100)) else { continue };
        let message = message.with_context(|| format!("failed to read {topic}"))?;
        last = Instant::now();
        records.push(TopicRecord {
            key: message.key().map(|key| String::from_utf8_lossy(key).into_owned()).unwrap_or_default(),
            payload_opt: message.payload().map(<[u8]>::to_vec),
            partition: message.partition(),
            offset: message.offset(),
        });
    }
    Ok(records)
}

/// The latest definition of each job (tombstones remove it).
fn read_definitions(config: &CliSettings) -> anyhow::Result<BTreeMap<String, String>> {
    let mut records = read_topic(config, &config.kafka.topic_names().jobs())?;
    records.sort_by_key(|record| (record.partition, record.offset));
    let mut definitions = BTreeMap::new();
    for record in records {
        match record.payload_opt {
            Some(payload) => {
                definitions.insert(record.key, String::from_utf8_lossy(&payload).into_owned());
            }
            None => {
                definitions.remove(&record.key);
            }
        }
    }
    Ok(definitions)
}

fn read_statuses(config: &CliSettings) -> anyhow::Result<BTreeMap<String, JobStatusEvent>> {
    let mut statuses = BTreeMap::new();
    for record in read_topic(config, &config.kafka.topic_names().job_status())? {
        let Some(payload) = record.payload_opt else { continue };
        if let Ok(event) = serde_json::from_slice::<JobStatusEvent>(&payload) {
            statuses.insert(event.job.clone(), event);
        }
    }
    Ok(statuses)
}

fn list(config: &CliSettings) -> anyhow::Result<ExitCode> {
    let definitions = read_definitions(config)?;
    let statuses = read_statuses(config)?;
    if definitions.is_empty() {
        outln!("no jobs in {}", config.kafka.topic_names().jobs());
        return Ok(ExitCode::SUCCESS);
    }
    outln!("{:<32} {:<10} {:<10} {:<16} STATUS", "NAME", "WINDOW", "LATENESS", "SCHEDULE");
    for (name, text) in &definitions {
        let status = statuses.get(name).map_or_else(
            || "unknown".to_string(),
            |event| {
                let kind = serde_json::to_value(event.status)
                    .ok()
                    .and_then(|value| value.as_str().map(str::to_string));
                kind.unwrap_or_default()
            },
        );
        let shown_name = escape_controls(name);
        match JobDefinition::parse(text, Some(name)) {
            Ok(job) => outln!(
                "{shown_name:<32} {:<10} {:<10} {:<16} {status}",
                human(job.window_micros),
                human(job.lateness_micros),
                job.schedule_opt.as_ref().map_or("when complete", |schedule| schedule.expression.as_str()),
            ),
            Err(error) => outln!(
                "{shown_name:<32} {:<10} {:<10} {:<16} invalid: {}",
                "-",
                "-",
                "-",
                escape_controls(&error.to_string())
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human(micros: i64) -> String {
    let seconds = micros / 1_000_000;
    match seconds {
        s if s % 86_400 == 0 && s > 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 && s > 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn show(config: &CliSettings, name: &str) -> anyhow::Result<ExitCode> {
    let definitions = read_definitions(config)?;
    let Some(text) = definitions.get(name) else { bail!("no job named '{name}' in the jobs topic") };
    outln!("{}", escape_controls_keep_lines(text.trim_end()));
    outln!();
    if let Some(status) = read_statuses(config)?.get(name) {
        outln!("status: {:?} at {} by {}", status.status, status.at, status.executor);
        if !status.reason.is_empty() {
            outln!("  {}", escape_controls(&status.reason));
        }
    }
    let catalog = open_catalog(config)?;
    let windows = runtime()?.block_on(load_windows(catalog.lake(), name))?;
    let succeeded = windows
        .values()
        .filter(|state| {
            state
                .outcome_opt
                .as_ref()
                .is_some_and(|outcome| outcome.status == sluice_jobs::records::OutcomeStatus::Succeeded)
        })
        .count();
    let failed = windows
        .values()
        .filter(|state| state.outcome_opt.as_ref().is_some_and(|outcome| outcome.error_opt.is_some()))
        .count();
    outln!("windows: {} recorded, {succeeded} succeeded, {failed} failed", windows.len());
    if let Some((start, state)) = windows.iter().next_back() {
        outln!("newest window: {} (revision {})", format_micros(*start), state.revision);
        if let Some(path) = state.outcome_opt.as_ref().and_then(|outcome| outcome.result_path_opt.as_ref()) {
            outln!("newest result: {path} under {}", config.object_store.url);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn runs(config: &CliSettings, name: &str, limit: usize) -> anyhow::Result<ExitCode> {
    let mut events: Vec<JobRunEvent> = read_topic(config, &config.kafka.topic_names().job_runs())?
        .into_iter()
        .filter(|record| record.key == name)
        .filter_map(|record| record.payload_opt.and_then(|payload| JobRunEvent::decode(&payload).ok()))
        .collect();
    if events.is_empty() {
        outln!("no runs of {name} yet");
        return Ok(ExitCode::SUCCESS);
    }
    events.sort_by_key(|event| (event.finished_at_micros, event.window_start_micros));
    let skip = events.len().saturating_sub(limit);
    outln!(
        "{:<22} {:>3} {:>3} {:<10} {:>9} {:>10} {:>8} {:>6}  ERROR",
        "WINDOW START",
        "REV",
        "TRY",
        "STATUS",
        "ROWS IN",
        "BYTES IN",
        "ROWS OUT",
        "MS"
    );
    for event in events.iter().skip(skip) {
        outln!(
            "{:<22} {:>3} {:>3} {:<10} {:>9} {:>10} {:>8} {:>6}  {}",
            format_micros(event.window_start_micros),
            event.revision,
            event.attempt,
            format!("{:?}", event.status).to_lowercase(),
            event.rows_read,
            event.bytes_read,
            event.rows_written,
            event.duration_ms,
            escape_controls(event.error_opt.as_deref().unwrap_or("")),
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn results(
    config: &CliSettings,
    name: &str,
    windows: usize,
    limit: usize,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let catalog = open_catalog(config)?;
    let runtime = runtime()?;
    let lake = catalog.lake();
    let table = sluice_lake::layout::results_table(name);
    let Some((version, files)) = runtime.block_on(lake.table_files(&table))? else {
        outln!("no results of {name} yet under {}", config.object_store.url);
        return Ok(ExitCode::SUCCESS);
    };
    if format == OutputFormat::Table {
        outln!("{table}: Delta table version {version}, {} windows", files.len());
    }
    // One file per window in the table's current version; paths sort by window start.
    let paths: Vec<&str> = files.iter().map(|file| file.path.as_str()).collect();
    for path in &paths[paths.len().saturating_sub(windows)..] {
        let path = *path;
        let bytes = runtime.block_on(lake.get(path))?;
        let batches: Vec<RecordBatch> =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?
                .build()?
                .collect::<Result<_, _>>()?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let shown = output::first_rows(&batches, limit);
        if format == OutputFormat::Table {
            let window = sluice_lake::layout::window_of_result_path(path).unwrap_or(path);
            let num_shown: usize = shown.iter().map(RecordBatch::num_rows).sum();
            let counted = if num_shown < rows {
                format!("first {num_shown} of {rows} rows")
            } else {
                format!("{rows} rows")
            };
            outln!("{name}, window starting {window} ({counted}, {path})");
        }
        output::print_batches(&shown, format)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn backfill(
    config: &CliSettings,
    name: &str,
    (from, to): (&str, &str),
    timeout: Duration,
    no_wait: bool,
    key_opt: Option<&SigningKey>,
) -> anyhow::Result<ExitCode> {
    let from_micros = parse_timestamp_micros(from).map_err(anyhow::Error::msg)?;
    let to_micros = parse_timestamp_micros(to).map_err(anyhow::Error::msg)?;
    if to_micros <= from_micros {
        bail!("--to must be after --from");
    }
    let definitions = read_definitions(config)?;
    let Some(text) = definitions.get(name) else { bail!("no job named '{name}' in the jobs topic") };
    let job = JobDefinition::parse(text, Some(name))
        .map_err(|error| anyhow::anyhow!("the job is invalid: {error}"))?;
    let first = job.window_containing(from_micros);
    let request_check = BackfillRequest {
        job: name.to_string(),
        from_micros,
        to_micros,
        requested_at_micros: 0,
        signature_opt: None,
    };
    // The executor refuses such a request too; refusing here spares listing its windows.
    if let Some(reason) = sluice_jobs::catch_up::backfill_refusal(
        &request_check,
        job.window_micros,
        config.executor.max_backlog_windows,
    ) {
        bail!("{reason}");
    }
    let windows: Vec<i64> =
        (0..).map(|index| first + index * job.window_micros).take_while(|start| *start < to_micros).collect();
    let catalog = open_catalog(config)?;
    let runtime = runtime()?;
    let mut request = BackfillRequest {
        job: name.to_string(),
        from_micros,
        to_micros,
        requested_at_micros: sluice_clock::now_micros(),
        signature_opt: None,
    };
    // The record's path is part of what is signed: a copy elsewhere does not verify.
    let path = sluice_lake::layout::backfill_request_path(name, request.requested_at_micros);
    request.signature_opt = key_opt.map(|key| {
        key.sign(
            SignedAction::Backfill,
            name,
            &backfill_place(&config.kafka.topic_names().jobs(), &path),
            &request.signed_body(),
            request.requested_at_micros,
        )
    });
    runtime.block_on(request_backfill_at(catalog.lake(), &path, &request))?;
    outln!("backfill of {name}: {} window(s) from {} requested", windows.len(), format_micros(first));
    if no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let bar = indicatif::ProgressBar::new(windows.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} windows {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let deadline = Instant::now() + timeout;
    loop {
        let states = runtime.block_on(load_windows(catalog.lake(), name))?;
        let done = windows
            .iter()
            .filter(|start| {
                states.get(start).is_some_and(|state| satisfies(state, request.requested_at_micros))
            })
            .count();
        bar.set_position(done as u64);
        if done == windows.len() {
            bar.finish_with_message("done");
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() >= deadline {
            bar.abandon_with_message("still running; follow it with `sluice jobs runs`");
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn audit(config: &CliSettings, job_opt: Option<&str>, limit: usize) -> anyhow::Result<ExitCode> {
    let catalog = open_catalog(config)?;
    let entries = runtime()?.block_on(load_audit(catalog.lake()))?;
    let entries: Vec<_> =
        entries.into_iter().filter(|entry| job_opt.is_none_or(|job| entry.job == job)).collect();
    if entries.is_empty() {
        outln!(
            "no audit entries{} under {}",
            job_opt.map(|job| format!(" of {job}")).unwrap_or_default(),
            config.object_store.url
        );
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<27} {:<8} {:<8} {:<28} {:<16} {:<24} {:<12} REASON",
        "AT",
        "VERDICT",
        "ACTION",
        "JOB",
        "KEY",
        "SOURCE",
        "SQL SHA-256"
    );
    for entry in &entries[entries.len().saturating_sub(limit)..] {
        outln!(
            "{:<27} {:<8} {:<8} {:<28} {:<16} {:<24} {:<12} {}",
            format_micros(entry.at_micros),
            entry.verdict.as_str(),
            entry.action.as_str(),
            escape_controls(&entry.job),
            escape_controls(entry.key_name_opt.as_deref().unwrap_or("-")),
            escape_controls(&entry.source),
            entry.sql_sha256_opt.as_deref().map_or("-", |sha| &sha[..sha.len().min(12)]),
            escape_controls(&entry.reason),
        );
    }
    Ok(ExitCode::SUCCESS)
}
