//! The executor end to end on a real Tansu broker: readings in, the compactor, jobs submitted
//! through the jobs topic (once by a stock Kafka producer), each complete window run once, and results compared
//! with values computed here from the readings themselves.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeMap;
use std::time::Duration;

use arrow_array::{Array, Float64Array, Int64Array, StringArray};
use sluice_executor::events::{JobStatusEvent, JobStatusKind, RunStatus};
use sluice_executor::runs::{OutcomeStatus, load_windows};
use sluice_integration_tests::{
    Broker, ExecutorService, compacted_readings, consume_topic_within, executor_config, job_run_events,
    open_local_lake, produce_readings, read_job_result, submit_job, telemetry_readings, unique_suffix,
    wait_until, windows_succeeded,
};
use sluice_lake::Lake;

const HOUR: i64 = 3_600_000_000;

fn rfc3339(micros: i64) -> String {
    sluice_executor::job::format_micros(micros)
}

/// Event time of a reading in microseconds.
fn ts(reading: &serde_json::Value) -> i64 {
    reading["ts"].as_i64().unwrap()
}

/// A job's own `ts >= $window_start AND ts < $window_end` is implied by the window: its plan
/// neither filters nor reads `ts`, and counts the same rows. A CTE that takes the stream's name
/// and shifts `ts` keeps its filter (no shifted row falls in the window).
async fn check_window_bounds_are_dropped_only_where_implied(
    lake_dir: &std::path::Path,
    start: i64,
    rows_in_window: usize,
) {
    let (store, root) = sluice_lake::open_store(&sluice_lake::ObjectStoreConfig {
        url: lake_dir.display().to_string(),
        ..Default::default()
    })
    .unwrap();
    let registry = std::sync::Arc::new(
        sluice_schema::SchemaRegistry::load_directory(&sluice_integration_tests::repo_root().join("schemas"))
            .unwrap(),
    );
    let catalog = sluice_executor::Catalog::new(store, root, registry, Vec::new());
    let snapshot = catalog.snapshot().await.unwrap();
    let scope = sluice_executor::Scope::Window { start_micros: start, end_micros: start + HOUR };
    let ctx = catalog.session(&snapshot, scope, true).await.unwrap();
    let window = Some((start, start + HOUR));
    let count = |sql: &'static str| {
        let ctx = ctx.clone();
        async move {
            let frame = sluice_executor::plan_query(&ctx, sql, window).await.unwrap();
            let plan = frame.create_physical_plan().await.unwrap();
            let shown = datafusion::physical_plan::displayable(plan.as_ref()).indent(true).to_string();
            let batches = datafusion::physical_plan::collect(plan, ctx.task_ctx()).await.unwrap();
            let counts = batches[0].column(0).as_any().downcast_ref::<Int64Array>().unwrap();
            (counts.value(0), shown)
        }
    };
    let (rows, plan) = count(
        "SELECT count(*) AS readings, max(temperature) AS hottest FROM telemetry \
         WHERE ts >= $window_start AND ts < $window_end",
    )
    .await;
    assert_eq!(rows, rows_in_window as i64);
    assert!(!plan.contains("FilterExec") && !plan.contains("ts@"), "{plan}");
    let (shifted, plan) = count(
        "WITH telemetry AS (SELECT device_id, ts + INTERVAL '1 hour' AS ts FROM telemetry) \
         SELECT count(*) AS readings FROM telemetry WHERE ts >= $window_start AND ts < $window_end",
    )
    .await;
    assert_eq!(shifted, 0, "{plan}");
    assert!(plan.contains("FilterExec"), "{plan}");
}

/// Waits until every window in `starts` has a succeeded outcome.
async fn wait_for_windows(lake: &Lake, job: &str, starts: &[i64], timeout: Duration) {
    let done = windows_succeeded(lake, job, starts, timeout).await;
    let windows = load_windows(lake, job).await.unwrap();
    assert!(done, "{job}: windows {starts:?} all ran; recorded: {:?}", windows.keys().collect::<Vec<_>>());
}

async fn status_events(broker: &Broker, prefix: &str, at_least: usize) -> Vec<JobStatusEvent> {
    consume_topic_within(
        &broker.bootstrap_servers(),
        &format!("{prefix}.job-status"),
        at_least,
        Duration::from_millis(500),
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .iter()
    .map(|record| serde_json::from_slice(&record.payload).unwrap())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_windows_run_once_and_match_values_computed_from_the_readings() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let lake = open_local_lake(lake_dir.path());
    // Three hours of readings from 20 devices, ending an hour ago, some late and out of order.
    let readings = telemetry_readings(6_000, 20, 3 * HOUR);
    let (compactor, watermark) = compacted_readings(&broker, &prefix, lake_dir.path(), &readings).await;
    let executor = ExecutorService::start(executor_config(&broker, &prefix, lake_dir.path()));

    let first_hour = readings.iter().map(ts).min().unwrap().div_euclid(HOUR) * HOUR;
    let hourly = format!(
        "-- name: hourly_device_stats\n-- window: 1h\n-- lateness: 0s\n-- start: {}\n\
         SELECT device_id, count(*) AS readings, avg(temperature) AS avg_temperature\n\
         FROM telemetry WHERE ts >= $window_start AND ts < $window_end\n\
         GROUP BY device_id ORDER BY device_id\n",
        rfc3339(first_hour)
    );
    submit_job(&broker.bootstrap_servers(), &prefix, "hourly_device_stats", Some(&hourly)).await.unwrap();

    // The second job goes in as a plain Kafka record with a stock producer (librdkafka's defaults,
    // none of Sluice's client settings): the file's bytes, keyed by the job name, as any client
    // would send it. (Not kcat: Debian's, on librdkafka 2.0, cannot read this broker's ApiVersions
    // answer; under cargo it would quietly load the newer librdkafka that the build leaves on
    // LD_LIBRARY_PATH, so a test with it proves nothing about the user's kcat.) No placeholders,
    // so the table holds the window's rows only. Its result has types Delta lacks (a timestamp in
    // nanoseconds with a '+00:00' zone, one without a zone, an unsigned number): stored as Delta's
    // own.
    let job_file = lake_dir.path().join("half_hour_totals.sql");
    std::fs::write(
        &job_file,
        format!(
            "-- name: half_hour_totals\n-- window: 30m\n-- start: {}\n\
             SELECT count(*) AS readings, count(DISTINCT device_id) AS devices, now() AS computed_at,\n\
             CAST(count(*) AS BIGINT UNSIGNED) AS readings_unsigned, CAST(min(ts) AS TIMESTAMP) AS first_reading\n\
             FROM telemetry\n",
            rfc3339(first_hour)
        ),
    )
    .unwrap();
    let stock_producer: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", broker.bootstrap_servers()).create().unwrap();
    let job_bytes = std::fs::read(&job_file).unwrap();
    let jobs_topic = format!("{prefix}.jobs");
    stock_producer
        .send(
            rdkafka::producer::FutureRecord::to(&jobs_topic).key("half_hour_totals").payload(&job_bytes),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(error, _)| error)
        .unwrap();

    // A job that fails at run time (a cast of device ids to numbers) and one that cannot finish
    // in its timeout: both are retried, then marked failed; neither holds up the others. (A plain
    // count(*) of the cross join would be answered from exact file statistics without running.)
    let failing = format!(
        "-- name: failing_cast\n-- window: 1h\n-- retries: 1\n-- start: {}\n\
         SELECT sum(CAST(device_id AS BIGINT)) FROM telemetry\n",
        rfc3339(first_hour)
    );
    submit_job(&broker.bootstrap_servers(), &prefix, "failing_cast", Some(&failing)).await.unwrap();
    let slow = format!(
        "-- name: too_slow\n-- window: 1h\n-- retries: 0\n-- timeout: 1ms\n-- start: {}\n\
         SELECT sum(a.seq + b.seq) FROM telemetry a CROSS JOIN telemetry b\n",
        rfc3339(first_hour)
    );
    submit_job(&broker.bootstrap_servers(), &prefix, "too_slow", Some(&slow)).await.unwrap();

    let hourly_windows: Vec<i64> =
        (0..).map(|index| first_hour + index * HOUR).take_while(|start| start + HOUR <= watermark).collect();
    let half_hour_windows: Vec<i64> = (0..)
        .map(|index| first_hour + index * HOUR / 2)
        .take_while(|start| start + HOUR / 2 <= watermark)
        .collect();
    assert!(hourly_windows.len() >= 2, "the readings span complete hours");
    wait_for_windows(&lake, "hourly_device_stats", &hourly_windows, Duration::from_secs(90)).await;
    wait_for_windows(&lake, "half_hour_totals", &half_hour_windows, Duration::from_secs(90)).await;

    for start in &hourly_windows {
        let mut expected: BTreeMap<String, (i64, f64)> = BTreeMap::new();
        for reading in readings.iter().filter(|reading| (*start..start + HOUR).contains(&ts(reading))) {
            let entry = expected.entry(reading["device_id"].as_str().unwrap().to_string()).or_default();
            entry.0 += 1;
            entry.1 += reading["temperature"].as_f64().unwrap();
        }
        let mut actual: BTreeMap<String, (i64, f64)> = BTreeMap::new();
        for batch in read_job_result(lake_dir.path(), "hourly_device_stats", *start) {
            let devices = batch.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            let counts = batch.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
            let averages = batch.column(2).as_any().downcast_ref::<Float64Array>().unwrap();
            for row in 0..batch.num_rows() {
                actual.insert(devices.value(row).to_string(), (counts.value(row), averages.value(row)));
            }
        }
        assert_eq!(
            actual.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{}",
            rfc3339(*start)
        );
        for (device, (count, sum)) in &expected {
            let (actual_count, actual_average) = actual[device];
            assert_eq!(actual_count, *count, "{device} at {}", rfc3339(*start));
            assert!((actual_average - sum / *count as f64).abs() < 1e-9, "{device} at {}", rfc3339(*start));
        }
    }
    for start in &half_hour_windows {
        let in_window: Vec<_> =
            readings.iter().filter(|reading| (*start..start + HOUR / 2).contains(&ts(reading))).collect();
        let batches = read_job_result(lake_dir.path(), "half_hour_totals", *start);
        let counts = batches[0].column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(counts.value(0), in_window.len() as i64, "{}", rfc3339(*start));
        assert!(!counts.is_null(0));
        let utc = arrow_schema::DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, Some("UTC".into()));
        let schema = batches[0].schema();
        assert_eq!(schema.field_with_name("computed_at").unwrap().data_type(), &utc);
        assert_eq!(schema.field_with_name("first_reading").unwrap().data_type(), &utc);
        assert_eq!(
            schema.field_with_name("readings_unsigned").unwrap().data_type(),
            &arrow_schema::DataType::Int64
        );
        let stamp = sluice_lake::layout::result_partition(*start);
        let rows = sluice_integration_tests::outside_reader_rows(
            "deltalake",
            &lake_dir.path().join("results/half_hour_totals").to_string_lossy(),
            &["readings", "readings_unsigned", "first_reading", "computed_at"],
            Some(&format!("window_start = '{}'", stamp.trim_start_matches("window_start="))),
            &[],
        )
        .unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["readings_unsigned"], rows[0]["readings"], "{rows:?}");
        // The first half hour is empty when the readings began past its middle: min() is NULL.
        match in_window.iter().map(|reading| ts(reading)).min() {
            Some(first_reading) => assert_eq!(rows[0]["first_reading"], first_reading, "{rows:?}"),
            None => assert!(rows[0]["first_reading"].is_null(), "{rows:?}"),
        }
        // A window runs once the watermark has passed its end, and the watermark trails the clock.
        let window_end = start + HOUR / 2;
        assert!(rows[0]["computed_at"].as_i64().is_some_and(|at| at >= window_end), "{rows:?}");
    }

    // One success per window, and each run read only its hour's committed files.
    let expected_runs = hourly_windows.len() + half_hour_windows.len();
    let events = job_run_events(&broker, &prefix, expected_runs).await;
    let live = lake.live_files("telemetry").await.unwrap();
    for start in &hourly_windows {
        let successes: Vec<_> = events
            .iter()
            .filter(|event| event.job == "hourly_device_stats" && event.window_start_micros == *start)
            .filter(|event| event.status == RunStatus::Succeeded)
            .collect();
        assert_eq!(successes.len(), 1, "one success for {}", rfc3339(*start));
        let partition =
            sluice_lake::PartitionKey::for_event_time(*start, sluice_lake::PartitionGranularity::Hour);
        let files_in_hour = live.iter().filter(|file| file.partition == partition.to_string()).count();
        assert_eq!(successes[0].files_read, files_in_hour as i64, "pruned to {partition}");
        assert!((successes[0].files_read as usize) < live.len());
        let devices: std::collections::BTreeSet<_> = readings
            .iter()
            .filter(|reading| (*start..start + HOUR).contains(&ts(reading)))
            .map(|reading| reading["device_id"].as_str().unwrap())
            .collect();
        assert_eq!(successes[0].rows_written, devices.len() as i64);
        // The run names the stream table version it read and the results version holding it.
        let input_versions: BTreeMap<String, i64> =
            serde_json::from_str(successes[0].input_versions_opt.as_deref().expect("input versions"))
                .unwrap();
        assert!(input_versions["telemetry"] >= 1, "{input_versions:?}");
        assert!(successes[0].result_version_opt.is_some_and(|version| version >= 1));

        // Outside engines read the window's result and the hour's rows with a partition filter.
        let stamp = sluice_lake::layout::result_partition(*start);
        let window_value = stamp.trim_start_matches("window_start=");
        let results_table = lake_dir.path().join("results/hourly_device_stats");
        let stream_table = lake_dir.path().join("telemetry");
        let (dt, hour) = partition
            .to_string()
            .split_once('/')
            .map(|(dt, hour)| (dt.to_string(), hour.to_string()))
            .unwrap();
        let hour_filter = format!(
            "dt = '{}' AND hour = '{}'",
            dt.trim_start_matches("dt="),
            hour.trim_start_matches("hour=")
        );
        for reader in sluice_integration_tests::OUTSIDE_READERS {
            let result_rows = sluice_integration_tests::outside_reader_rows(
                reader,
                &results_table.to_string_lossy(),
                &["device_id", "readings"],
                Some(&format!("window_start = '{window_value}'")),
                &[],
            )
            .unwrap();
            assert_eq!(result_rows.len(), devices.len(), "{reader} reads the result of {stamp}");
            let hour_rows = sluice_integration_tests::outside_reader_rows(
                reader,
                &stream_table.to_string_lossy(),
                &["device_id", "seq"],
                Some(&hour_filter),
                &[],
            )
            .unwrap();
            let expected_rows =
                readings.iter().filter(|reading| (*start..start + HOUR).contains(&ts(reading))).count();
            assert_eq!(hour_rows.len(), expected_rows, "{reader} with {hour_filter}");
        }
    }
    let first_window = hourly_windows[0];
    let rows_in_first =
        readings.iter().filter(|reading| (first_window..first_window + HOUR).contains(&ts(reading))).count();
    check_window_bounds_are_dropped_only_where_implied(lake_dir.path(), first_window, rows_in_first).await;
    let statuses = status_events(&broker, &prefix, 2).await;
    for job in ["hourly_device_stats", "half_hour_totals"] {
        assert!(
            statuses.iter().any(|event| event.job == job && event.status == JobStatusKind::Accepted),
            "{job} accepted: {statuses:?}"
        );
    }

    let failed_window = hourly_windows[0];
    let marked_failed = wait_until(Duration::from_secs(60), || {
        let lake = lake.clone();
        async move {
            let failing = load_windows(&lake, "failing_cast").await.unwrap();
            let slow = load_windows(&lake, "too_slow").await.unwrap();
            [failing, slow].iter().all(|windows| {
                windows
                    .get(&failed_window)
                    .and_then(|state| state.outcome_opt.as_ref())
                    .is_some_and(|outcome| outcome.status == OutcomeStatus::Failed)
            })
        }
    })
    .await;
    assert!(marked_failed, "both failing jobs' first window is marked failed");
    let failing = load_windows(&lake, "failing_cast").await.unwrap();
    let outcome = failing[&failed_window].outcome_opt.clone().unwrap();
    assert_eq!(outcome.attempt, 2, "one retry");
    assert!(outcome.error_opt.as_deref().unwrap_or_default().contains("Cast error"), "{outcome:?}");
    let slow = load_windows(&lake, "too_slow").await.unwrap();
    let outcome = slow[&failed_window].outcome_opt.clone().unwrap();
    assert!(outcome.error_opt.as_deref().unwrap_or_default().contains("timeout"), "{outcome:?}");
    let events = job_run_events(&broker, &prefix, expected_runs + 3).await;
    let failing_statuses: Vec<RunStatus> = events
        .iter()
        .filter(|event| event.job == "failing_cast" && event.window_start_micros == failed_window)
        .map(|event| event.status)
        .collect();
    assert_eq!(failing_statuses, vec![RunStatus::Retrying, RunStatus::Failed]);
    let statuses = status_events(&broker, &prefix, 5).await;
    assert!(
        statuses
            .iter()
            .any(|event| event.job == "failing_cast" && event.status == JobStatusKind::WindowFailed)
    );

    // A window that is not complete has not run.
    let windows = load_windows(&lake, "hourly_device_stats").await.unwrap();
    assert!(windows.keys().all(|start| start + HOUR <= watermark), "only complete windows ran");
    executor.stop().await.unwrap();
    compactor.stop().await.unwrap();
}

/// Readings of one hour, `per_device` for each of `devices` devices, spread evenly over
/// `[from, from + span)`.
fn readings_between(
    from: i64,
    span: i64,
    devices: usize,
    per_device: usize,
    seq_base: i64,
) -> Vec<serde_json::Value> {
    let count = devices * per_device;
    (0..count)
        .map(|index| {
            serde_json::json!({
                "device_id": format!("dev-{:04}", index % devices),
                "ts": from + (index as i64 * span) / count as i64,
                "seq": seq_base + (index / devices) as i64,
                "temperature": (index % 40) as f64,
            })
        })
        .collect()
}

/// A half-hour window over an hourly stream reads only the hour's files whose recorded event
/// times reach into it: the flushes of the other half are skipped whole (their footers never
/// fetched), and where the files read lie inside the window no row is filtered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_skip_the_files_whose_event_times_lie_outside_them() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let lake = open_local_lake(lake_dir.path());
    let mut config = sluice_integration_tests::compactor_config(&broker, &prefix, lake_dir.path());
    config.watermark.interval_ms = 200;
    config.watermark.allowed_lateness_ms = 1_000;
    config.flush.max_age_ms = 300;
    // Unmerged: each half hour's flushes stay their own files.
    config.merge.enabled = false;
    let compactor = sluice_integration_tests::CompactorService::start(config).await.unwrap();
    let hour = (sluice_integration_tests::now_micros() - 3 * HOUR).div_euclid(HOUR) * HOUR;
    let first_half = readings_between(hour, HOUR / 2, 20, 10, 0);
    let second_half = readings_between(hour + HOUR / 2, HOUR / 2, 20, 10, 10);
    // The next hour's readings move every Kafka partition's watermark past the hour.
    let next_hour = readings_between(hour + HOUR, HOUR / 6, 20, 2, 20);
    let topic = format!("{prefix}.telemetry");
    let mut produced = 0;
    for burst in [&first_half, &second_half, &next_hour] {
        produce_readings(&broker.bootstrap_servers(), &topic, burst).await.unwrap();
        produced += burst.len();
        sluice_integration_tests::wait_for_lake_rows(
            lake_dir.path(),
            "telemetry",
            produced,
            Duration::from_secs(60),
        )
        .await;
    }
    let watermark = sluice_integration_tests::settled_watermark(&lake, "telemetry", 4, 1_000_000).await;
    assert!(watermark >= hour + HOUR, "the hour is complete");

    // The hour's files: each holds rows of one half only.
    let partition = sluice_lake::PartitionKey::for_event_time(hour, sluice_lake::PartitionGranularity::Hour);
    let in_hour: Vec<_> = lake
        .live_files("telemetry")
        .await
        .unwrap()
        .into_iter()
        .filter(|file| file.partition == partition.to_string())
        .collect();
    let in_first_half = in_hour.iter().filter(|file| file.max_event_time_micros < hour + HOUR / 2).count();
    let in_second_half = in_hour.iter().filter(|file| file.min_event_time_micros >= hour + HOUR / 2).count();
    assert!(in_first_half >= 1 && in_second_half >= 1, "{in_hour:?}");
    assert_eq!(in_first_half + in_second_half, in_hour.len(), "{in_hour:?}");

    // The run of each half reads that half's files and counts its rows. (A distinct count: a
    // plain count would be answered from the files' statistics without scanning any.)
    let executor = ExecutorService::start(executor_config(&broker, &prefix, lake_dir.path()));
    let job = format!(
        "-- name: half_hours\n-- window: 30m\n-- lateness: 0s\n-- start: {}\n\
         SELECT count(*) AS readings, count(DISTINCT device_id) AS devices FROM telemetry\n",
        rfc3339(hour)
    );
    submit_job(&broker.bootstrap_servers(), &prefix, "half_hours", Some(&job)).await.unwrap();
    let halves = [hour, hour + HOUR / 2];
    assert!(windows_succeeded(&lake, "half_hours", &halves, Duration::from_secs(90)).await);
    let events = job_run_events(&broker, &prefix, 2).await;
    for (start, files, rows) in
        [(halves[0], in_first_half, first_half.len()), (halves[1], in_second_half, second_half.len())]
    {
        let success = events
            .iter()
            .find(|event| event.window_start_micros == start && event.status == RunStatus::Succeeded)
            .unwrap_or_else(|| panic!("a success for {}: {events:?}", rfc3339(start)));
        assert_eq!(success.files_read, files as i64, "{} of {} files", rfc3339(start), in_hour.len());
        let batches = read_job_result(lake_dir.path(), "half_hours", start);
        let counts = batches[0].column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(counts.value(0), rows as i64, "{}", rfc3339(start));
    }
    executor.stop().await.unwrap();
    compactor.stop().await.unwrap();

    // The plan of the first half scans its files alone, with no filter on the rows.
    let (store, root) = sluice_lake::open_store(&sluice_lake::ObjectStoreConfig {
        url: lake_dir.path().display().to_string(),
        ..Default::default()
    })
    .unwrap();
    let registry = std::sync::Arc::new(
        sluice_schema::SchemaRegistry::load_directory(&sluice_integration_tests::repo_root().join("schemas"))
            .unwrap(),
    );
    let catalog = sluice_executor::Catalog::new(store, root, registry, Vec::new());
    let snapshot = catalog.snapshot().await.unwrap();
    let window = (hour, hour + HOUR / 2);
    let scope = sluice_executor::Scope::Window { start_micros: window.0, end_micros: window.1 };
    let ctx = catalog.session(&snapshot, scope, true).await.unwrap();
    let frame =
        sluice_executor::plan_query(&ctx, "SELECT device_id, temperature FROM telemetry", Some(window))
            .await
            .unwrap();
    let plan = frame.create_physical_plan().await.unwrap();
    let shown = datafusion::physical_plan::displayable(plan.as_ref()).indent(true).to_string();
    assert!(!shown.contains("FilterExec") && !shown.contains("ts@"), "{shown}");
    let batches = datafusion::physical_plan::collect(plan, ctx.task_ctx()).await.unwrap();
    assert_eq!(batches.iter().map(|batch| batch.num_rows()).sum::<usize>(), first_half.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_are_rejected_with_their_reasons_and_good_ones_still_run() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let executor = ExecutorService::start(executor_config(&broker, &prefix, lake_dir.path()));
    let cases = [
        ("syntax_error", "-- window: 1h\nSELEC device_id FROM telemetry", "SELEC"),
        ("unknown_table", "-- window: 1h\nSELECT * FROM devices_registry", "devices_registry"),
        ("unknown_column", "-- window: 1h\nSELECT humidityy FROM telemetry", "humidityy"),
        ("drops_a_table", "-- window: 1h\nDROP TABLE telemetry", "not DROP TABLE"),
        (
            "external_table",
            "-- window: 1h\nCREATE EXTERNAL TABLE p STORED AS CSV LOCATION '/etc/passwd'",
            "not CREATE EXTERNAL TABLE",
        ),
        ("reads_a_path", "-- window: 1h\nSELECT * FROM '/etc/passwd'", "/etc/passwd"),
        ("copies_out", "-- window: 1h\nCOPY (SELECT 1) TO '/tmp/out.csv'", "not COPY"),
        ("no_window", "SELECT count(*) FROM telemetry", "no '-- window:'"),
        ("two_queries", "-- window: 1h\nSELECT 1; SELECT 2", "exactly one query"),
        ("null_column", "-- window: 1h\nSELECT NULL AS nothing FROM telemetry", "CAST(NULL AS DOUBLE)"),
        ("time_of_day", "-- window: 1h\nSELECT CAST(ts AS TIME) AS at FROM telemetry", "time of day"),
        ("partition_column", "-- window: 1h\nSELECT $window_start AS window_start", "partition column"),
    ];
    for (name, text, _) in &cases {
        submit_job(&broker.bootstrap_servers(), &prefix, name, Some(text)).await.unwrap();
    }
    submit_job(
        &broker.bootstrap_servers(),
        &prefix,
        "good",
        Some("-- window: 1h\nSELECT count(*) FROM telemetry"),
    )
    .await
    .unwrap();

    let statuses = status_events(&broker, &prefix, cases.len() + 1).await;
    for (name, _, reason) in &cases {
        let event = statuses
            .iter()
            .find(|event| event.job == *name)
            .unwrap_or_else(|| panic!("{name}: {statuses:?}"));
        assert_eq!(event.status, JobStatusKind::Rejected, "{name}");
        assert!(event.reason.contains(reason), "{name}: {}", event.reason);
    }
    let good = statuses.iter().find(|event| event.job == "good").expect("the good job got a status");
    assert_eq!(good.status, JobStatusKind::Accepted, "{good:?}");

    // A tombstone deletes the job.
    submit_job(&broker.bootstrap_servers(), &prefix, "good", None).await.unwrap();
    let statuses = status_events(&broker, &prefix, cases.len() + 2).await;
    assert!(statuses.iter().any(|event| event.job == "good" && event.status == JobStatusKind::Deleted));

    // The same through the CLI, as an operator would.
    let sluice = |args: &[&str]| {
        let mut command = std::process::Command::new(sluice_integration_tests::workspace_binary("sluice"));
        command.current_dir(sluice_integration_tests::repo_root());
        command.args(["--bootstrap-servers", &broker.bootstrap_servers(), "--topic-prefix", &prefix]);
        command.arg("--lake").arg(lake_dir.path());
        command.args(args);
        command.output().unwrap()
    };
    let submitted = sluice(&["jobs", "submit", "examples/jobs/device_minute_stats.sql", "--wait", "60"]);
    assert!(submitted.status.success(), "{}", String::from_utf8_lossy(&submitted.stderr));
    assert!(String::from_utf8_lossy(&submitted.stdout).contains("Accepted"), "{submitted:?}");
    let listed = String::from_utf8(sluice(&["jobs", "list"]).stdout).unwrap();
    assert!(listed.contains("device_minute_stats") && listed.contains("accepted"), "{listed}");
    assert!(!listed.contains("syntax_error") || listed.contains("rejected"), "{listed}");
    let shown = String::from_utf8(sluice(&["jobs", "show", "device_minute_stats"]).stdout).unwrap();
    assert!(shown.contains("-- window: 1m") && shown.contains("status: Accepted"), "{shown}");
    assert!(sluice(&["jobs", "delete", "device_minute_stats"]).status.success());
    let listed = String::from_utf8(sluice(&["jobs", "list"]).stdout).unwrap();
    assert!(!listed.contains("device_minute_stats"), "{listed}");
    let missing = sluice(&["jobs", "show", "device_minute_stats"]);
    assert_eq!(missing.status.code(), Some(1));
    executor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_rows_restate_a_window_backfills_run_old_ones_and_reference_tables_join() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let work_dir = tempfile::TempDir::new().unwrap();
    let lake_dir = work_dir.path().join("lake");
    let lake = open_local_lake(&lake_dir);
    let readings = telemetry_readings(2_000, 20, 2 * HOUR);
    let region = |device: &str| if device.ends_with(['0', '2', '4', '6', '8']) { "north" } else { "south" };
    let mut registry = String::from("device_id,region\n");
    for device in 0..20 {
        let name = format!("dev-{device:04}");
        registry.push_str(&format!("{name},{}\n", region(&name)));
    }
    std::fs::create_dir_all(lake_dir.join("reference")).unwrap();
    std::fs::write(lake_dir.join("reference/devices.csv"), registry).unwrap();

    let (compactor, watermark) = compacted_readings(&broker, &prefix, &lake_dir, &readings).await;
    let topic = format!("{prefix}.telemetry");

    let mut config = executor_config(&broker, &prefix, &lake_dir);
    config.executor.restate_check_interval_ms = 300;
    config.tables.reference.push(sluice_executor::catalog::ReferenceTable {
        name: "devices".into(),
        path: "reference/devices.csv".into(),
        format: sluice_executor::catalog::ReferenceFormat::Csv,
    });
    let config_path = work_dir.path().join("executor.toml");
    std::fs::write(&config_path, sluice_config::to_masked_toml(&config).unwrap()).unwrap();
    let executor = ExecutorService::start(config);

    let first_hour = readings.iter().map(ts).min().unwrap().div_euclid(HOUR) * HOUR;
    let windows: Vec<i64> =
        (0..).map(|index| first_hour + index * HOUR).take_while(|start| start + HOUR <= watermark).collect();
    let restating = format!(
        "-- name: regional_counts\n-- window: 1h\n-- restate: true\n-- start: {}\n\
         SELECT d.region, count(*) AS readings FROM telemetry t JOIN devices d ON t.device_id = d.device_id\n\
         GROUP BY d.region ORDER BY d.region\n",
        rfc3339(first_hour)
    );
    submit_job(&broker.bootstrap_servers(), &prefix, "regional_counts", Some(&restating)).await.unwrap();
    // Starts at the current hour: the data's hours run only when backfilled.
    let current_hour = sluice_integration_tests::now_micros().div_euclid(HOUR) * HOUR;
    let later = format!(
        "-- name: hourly_totals\n-- window: 1h\n-- start: {}\nSELECT count(*) AS readings FROM telemetry\n",
        rfc3339(current_hour)
    );
    submit_job(&broker.bootstrap_servers(), &prefix, "hourly_totals", Some(&later)).await.unwrap();
    wait_for_windows(&lake, "regional_counts", &windows, Duration::from_secs(90)).await;

    let regional = |readings: &[serde_json::Value], start: i64| {
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        for reading in readings.iter().filter(|reading| (start..start + HOUR).contains(&ts(reading))) {
            *counts.entry(region(reading["device_id"].as_str().unwrap()).to_string()).or_default() += 1;
        }
        counts
    };
    let result_counts = |start: i64| {
        let mut counts = BTreeMap::new();
        for batch in read_job_result(&lake_dir, "regional_counts", start) {
            let regions = batch.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            let values = batch.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
            for row in 0..batch.num_rows() {
                counts.insert(regions.value(row).to_string(), values.value(row));
            }
        }
        counts
    };
    for start in &windows {
        assert_eq!(result_counts(*start), regional(&readings, *start), "{}", rfc3339(*start));
    }

    // Late readings for the first complete hour: the restating job runs it again.
    let late: Vec<serde_json::Value> = (0..50)
        .map(|index| {
            serde_json::json!({
                "device_id": "dev-0001",
                "ts": windows[0] + 60_000_000 + index,
                "seq": 1_000_000 + index,
                "temperature": 20.0,
            })
        })
        .collect();
    produce_readings(&broker.bootstrap_servers(), &topic, &late).await.unwrap();
    let restated = wait_until(Duration::from_secs(60), || {
        let lake = lake.clone();
        let first = windows[0];
        async move {
            load_windows(&lake, "regional_counts").await.unwrap().get(&first).is_some_and(|state| {
                state.revision == 1 && state.outcome_opt.as_ref().is_some_and(|outcome| outcome.revision == 1)
            })
        }
    })
    .await;
    assert!(restated, "the window with late rows ran again");
    let all: Vec<serde_json::Value> = readings.iter().chain(&late).cloned().collect();
    assert_eq!(result_counts(windows[0]), regional(&all, windows[0]));
    let states = load_windows(&lake, "regional_counts").await.unwrap();
    for start in &windows[1..] {
        assert_eq!(states[start].revision, 0, "untouched windows are not restated");
    }

    // Nothing of the data's hours ran for the later job until the backfill asks for them.
    assert!(load_windows(&lake, "hourly_totals").await.unwrap().keys().all(|start| *start >= current_hour));
    let backfill = tokio::process::Command::new(sluice_integration_tests::workspace_binary("sluice"))
        .arg("--config")
        .arg(&config_path)
        .args([
            "jobs",
            "backfill",
            "hourly_totals",
            "--from",
            &rfc3339(first_hour),
            "--to",
            &rfc3339(windows.last().unwrap() + HOUR),
        ])
        .args(["--timeout", "90"])
        .output()
        .await
        .unwrap();
    assert!(backfill.status.success(), "{}", String::from_utf8_lossy(&backfill.stderr));
    for start in &windows {
        let batches = read_job_result(&lake_dir, "hourly_totals", *start);
        let counts = batches[0].column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        let expected = all.iter().filter(|reading| (*start..start + HOUR).contains(&ts(reading))).count();
        assert_eq!(counts.value(0), expected as i64, "{}", rfc3339(*start));
    }
    executor.stop().await.unwrap();
    compactor.stop().await.unwrap();
}
