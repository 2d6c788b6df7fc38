//! The executor's jobs from the test's side: submitting them, the compacted readings they run
//! on, and what their runs leave behind (window outcomes, run and status events, results).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::{
    Broker, CompactorService, compactor_config, consume_topic_within, delta_live_files, open_local_lake,
    produce_readings, settled_watermark, wait_for_lake_rows, wait_until,
};

/// Produces a job file (or, with `None`, a tombstone) to the jobs topic under `name`.
pub async fn submit_job(
    bootstrap: &str,
    topic_prefix: &str,
    name: &str,
    text_opt: Option<&str>,
) -> anyhow::Result<()> {
    let producer: rdkafka::producer::FutureProducer =
        sluice_kafka::KafkaConfig { bootstrap_servers: bootstrap.to_string(), ..Default::default() }
            .producer_config()
            .create()?;
    let topic = format!("{topic_prefix}.jobs");
    let mut record: rdkafka::producer::FutureRecord<'_, str, str> =
        rdkafka::producer::FutureRecord::to(&topic).key(name);
    if let Some(text) = text_opt {
        record = record.payload(text);
    }
    producer.send(record, Duration::from_secs(30)).await.map_err(|(error, _)| error)?;
    Ok(())
}

/// A compactor (watermark every 200 ms, 1 s of allowed lateness) that has committed `readings`,
/// produced here to `<prefix>.telemetry`, to the lake in `lake_dir` and published their
/// watermark; returns it with the watermark.
pub async fn compacted_readings(
    broker: &Broker,
    prefix: &str,
    lake_dir: &Path,
    readings: &[serde_json::Value],
) -> (CompactorService, i64) {
    let mut config = compactor_config(broker, prefix, lake_dir);
    config.watermark.interval_ms = 200;
    config.watermark.allowed_lateness_ms = 1_000;
    let compactor = CompactorService::start(config).await.expect("compactor starts");
    produce_readings(&broker.bootstrap_servers(), &format!("{prefix}.telemetry"), readings)
        .await
        .expect("readings produced");
    wait_for_lake_rows(lake_dir, "telemetry", readings.len(), Duration::from_secs(60)).await;
    let watermark = settled_watermark(&open_local_lake(lake_dir), "telemetry", 4, 1_000_000).await;
    (compactor, watermark)
}

/// Waits until every window of `job` starting at one of `starts` has an outcome, and returns
/// whether they all had one in time. An outcome other than success fails the test at once.
pub async fn windows_succeeded(
    lake: &sluice_lake::Lake,
    job: &str,
    starts: &[i64],
    timeout: Duration,
) -> bool {
    use sluice_executor::runs::{OutcomeStatus, load_windows};
    wait_until(timeout, || {
        let lake = lake.clone();
        async move {
            let windows = load_windows(&lake, job).await.expect("window records readable");
            starts.iter().all(|start| {
                windows.get(start).and_then(|state| state.outcome_opt.as_ref()).is_some_and(|outcome| {
                    assert_eq!(
                        outcome.status,
                        OutcomeStatus::Succeeded,
                        "{job} {}: {outcome:?}",
                        sluice_executor::job::format_micros(*start)
                    );
                    true
                })
            })
        }
    })
    .await
}

/// At least `at_least` run events from `<prefix>.job-runs`, decoded.
pub async fn job_run_events(
    broker: &Broker,
    prefix: &str,
    at_least: usize,
) -> Vec<sluice_executor::events::JobRunEvent> {
    consume_topic_within(
        &broker.bootstrap_servers(),
        &format!("{prefix}.job-runs"),
        at_least,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )
    .await
    .expect("job-runs topic readable")
    .iter()
    .map(|record| sluice_executor::events::JobRunEvent::decode(&record.payload).expect("run event decodes"))
    .collect()
}

/// The newest event of `kind` for `job` on the deployment's job-status topic, waiting up to a
/// minute for one (panics past it: test helper).
pub async fn job_status_event(
    broker: &Broker,
    prefix: &str,
    job: &str,
    kind: sluice_executor::events::JobStatusKind,
) -> sluice_executor::events::JobStatusEvent {
    job_status_event_within(broker, prefix, job, kind, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("no {kind:?} status for {job}"))
}

/// The newest event of `kind` for `job` on the deployment's job-status topic, or none if none
/// came within `within`.
pub async fn job_status_event_within(
    broker: &Broker,
    prefix: &str,
    job: &str,
    kind: sluice_executor::events::JobStatusKind,
    within: Duration,
) -> Option<sluice_executor::events::JobStatusEvent> {
    let topic = format!("{prefix}.job-status");
    let deadline = Instant::now() + within;
    loop {
        let records = consume_topic_within(
            &broker.bootstrap_servers(),
            &topic,
            1,
            Duration::from_millis(200),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_default();
        let found_opt = records
            .iter()
            .map(|record| {
                serde_json::from_slice::<sluice_executor::events::JobStatusEvent>(&record.payload)
                    .expect("status events are JSON")
            })
            .rfind(|event| event.job == job && event.status == kind);
        if found_opt.is_some() || Instant::now() >= deadline {
            return found_opt;
        }
    }
}

/// The result a job wrote for the window starting at `window_start_micros`.
pub fn read_job_result(
    lake_dir: &Path,
    job: &str,
    window_start_micros: i64,
) -> Vec<arrow_array::RecordBatch> {
    let table_dir = lake_dir.join(sluice_lake::layout::results_table(job));
    let partition = format!("{}/", sluice_lake::layout::result_partition(window_start_micros));
    let files: Vec<String> = delta_live_files(&table_dir)
        .unwrap_or_else(|error| panic!("{}: {error:#}", table_dir.display()))
        .into_iter()
        .filter(|path| path.starts_with(&partition))
        .collect();
    assert_eq!(files.len(), 1, "one result file per window in the table's latest version: {files:?}");
    let path = table_dir.join(&files[0]);
    let file = std::fs::File::open(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|builder| builder.build()?.collect::<Result<Vec<_>, _>>().map_err(Into::into))
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}
