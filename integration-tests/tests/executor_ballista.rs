//! Jobs with `-- engine: ballista` on a real Ballista cluster: a `sluice-executor
//! ballista-scheduler` process and two `ballista-worker` processes on 127.0.0.1, fed by the
//! executor service over the lake the compactor wrote from a real broker. The distributed
//! results must equal values computed here from the readings, and the local engine's results
//! for the same SQL; the workers' shuffle directories show that they, not the executor, ran it.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use arrow_array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
use sluice_executor::events::RunStatus;
use sluice_integration_tests::{
    Broker, ExecutorService, Readiness, ServiceBinary, compacted_readings, executor_config, free_port,
    job_run_events, open_local_lake, read_job_result, repo_root, submit_job, telemetry_readings,
    unique_suffix, windows_succeeded, workspace_binary,
};
use tokio::process::Command;

const HOUR: i64 = 3_600_000_000;

/// A Ballista process from the executor binary, configured through `SLUICE_*` variables, on a
/// port of its own (`env(port)` names it); started again elsewhere when the port was taken.
async fn start_ballista(
    role: &'static str,
    env: impl Fn(u16) -> Vec<(&'static str, String)>,
) -> ServiceBinary {
    ServiceBinary::start(role, Readiness::Listening, |port| {
        let mut command = Command::new(workspace_binary("sluice-executor"));
        command.arg(role).envs(env(port));
        Ok(command)
    })
    .await
    .unwrap()
}

/// Per device: readings, mean temperature, highest sequence number.
fn per_device(batches: &[RecordBatch]) -> BTreeMap<String, (i64, f64, i64)> {
    let mut rows = BTreeMap::new();
    for batch in batches {
        let devices = batch.column(0).as_any().downcast_ref::<StringArray>().unwrap();
        let counts = batch.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
        let averages = batch.column(2).as_any().downcast_ref::<Float64Array>().unwrap();
        let last = batch.column(3).as_any().downcast_ref::<Int64Array>().unwrap();
        for row in 0..batch.num_rows() {
            assert!(!averages.is_null(row));
            rows.insert(
                devices.value(row).to_string(),
                (counts.value(row), averages.value(row), last.value(row)),
            );
        }
    }
    rows
}

fn files_under(directory: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(directory) else { return 0 };
    entries
        .flatten()
        .map(|entry| {
            let path = entry.path();
            if path.is_dir() { files_under(&path) } else { 1 }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ballista_runs_a_window_on_its_workers_with_the_results_of_the_local_engine() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let work_dir = tempfile::TempDir::new().unwrap();
    let lake_dir = work_dir.path().join("lake");
    let lake = open_local_lake(&lake_dir);
    let readings = telemetry_readings(6_000, 20, 3 * HOUR);
    let (compactor, watermark) = compacted_readings(&broker, &prefix, &lake_dir, &readings).await;

    let scheduler = start_ballista("ballista-scheduler", |port| {
        vec![
            ("SLUICE_BALLISTA__SCHEDULER_BIND", format!("127.0.0.1:{port}")),
            ("SLUICE_OBJECT_STORE__URL", lake_dir.display().to_string()),
        ]
    })
    .await;
    let scheduler_url = scheduler.base_url();
    let worker_dirs: Vec<_> = (0..2).map(|index| work_dir.path().join(format!("worker-{index}"))).collect();
    let mut workers = Vec::new();
    for dir in &worker_dirs {
        std::fs::create_dir_all(dir).unwrap();
        let worker = start_ballista("ballista-worker", |port| {
            vec![
                ("SLUICE_BALLISTA__SCHEDULER_URL", scheduler_url.clone()),
                ("SLUICE_BALLISTA__WORKER_PORT", port.to_string()),
                // Taken too, the worker exits before its port answers, and both are chosen again.
                ("SLUICE_BALLISTA__WORKER_GRPC_PORT", free_port().to_string()),
                ("SLUICE_BALLISTA__WORKER_TASK_SLOTS", "2".to_string()),
                ("SLUICE_BALLISTA__WORKER_WORK_DIR", dir.display().to_string()),
                ("SLUICE_OBJECT_STORE__URL", lake_dir.display().to_string()),
                ("SLUICE_SCHEMAS__DIRECTORY", repo_root().join("schemas").display().to_string()),
            ]
        })
        .await;
        workers.push(worker);
    }

    let mut config = executor_config(&broker, &prefix, &lake_dir);
    config.ballista.scheduler_url = scheduler_url.clone();
    config.executor.default_timeout_ms = 60_000;
    let executor = ExecutorService::start(config);

    let first_hour = lake
        .live_files("telemetry")
        .await
        .unwrap()
        .iter()
        .map(|file| file.min_event_time_micros)
        .min()
        .unwrap()
        .div_euclid(HOUR)
        * HOUR;
    // Grouping by device needs a shuffle: the plan has more than one stage.
    let sql = "SELECT device_id, count(*) AS readings, avg(temperature) AS avg_temperature, max(seq) AS last_seq\n\
               FROM telemetry WHERE ts >= $window_start AND ts < $window_end\n\
               GROUP BY device_id ORDER BY device_id\n";
    for (name, engine) in [("devices_ballista", "ballista"), ("devices_local", "local")] {
        let job = format!(
            "-- name: {name}\n-- window: 1h\n-- engine: {engine}\n-- start: {}\n{sql}",
            sluice_executor::job::format_micros(first_hour)
        );
        submit_job(&broker.bootstrap_servers(), &prefix, name, Some(&job)).await.unwrap();
    }

    let windows: Vec<i64> =
        (0..).map(|index| first_hour + index * HOUR).take_while(|start| start + HOUR <= watermark).collect();
    assert!(windows.len() >= 2, "the readings span complete hours");
    let mut all_ran = true;
    for job in ["devices_ballista", "devices_local"] {
        all_ran &= windows_succeeded(&lake, job, &windows, Duration::from_secs(180)).await;
    }
    assert!(
        all_ran,
        "every window of both jobs succeeded; Ballista's logs:\n{}",
        std::iter::once(&scheduler)
            .chain(&workers)
            .map(ServiceBinary::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    );

    for start in &windows {
        let mut expected: BTreeMap<String, (i64, f64, i64)> = BTreeMap::new();
        for reading in readings
            .iter()
            .filter(|reading| (*start..start + HOUR).contains(&reading["ts"].as_i64().unwrap()))
        {
            let entry = expected.entry(reading["device_id"].as_str().unwrap().to_string()).or_default();
            entry.0 += 1;
            entry.1 += reading["temperature"].as_f64().unwrap();
            entry.2 = entry.2.max(reading["seq"].as_i64().unwrap());
        }
        let distributed = per_device(&read_job_result(&lake_dir, "devices_ballista", *start));
        let local = per_device(&read_job_result(&lake_dir, "devices_local", *start));
        assert_eq!(distributed.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
        for (device, (count, sum, last)) in &expected {
            let (actual_count, actual_average, actual_last) = distributed[device];
            assert_eq!((actual_count, actual_last), (*count, *last), "{device}");
            assert!((actual_average - sum / *count as f64).abs() < 1e-9, "{device}");
            let (local_count, local_average, local_last) = local[device];
            assert_eq!((local_count, local_last), (actual_count, actual_last), "{device}");
            assert!((local_average - actual_average).abs() < 1e-9, "{device}");
        }
    }

    // The workers wrote the stages' output: the executor service did not run the plan itself.
    let shuffle_files: usize = worker_dirs.iter().map(|dir| files_under(dir)).sum();
    assert!(shuffle_files > 0, "the Ballista workers ran the windows' stages");

    // Run history: what the plan was given to read, by the committed records.
    let events = job_run_events(&broker, &prefix, 2 * windows.len()).await;
    let live = lake.live_files("telemetry").await.unwrap();
    for start in &windows {
        let partition =
            sluice_lake::PartitionKey::for_event_time(*start, sluice_lake::PartitionGranularity::Hour);
        let in_hour: Vec<_> = live.iter().filter(|file| file.partition == partition.to_string()).collect();
        let event = events
            .iter()
            .find(|event| {
                event.job == "devices_ballista"
                    && event.window_start_micros == *start
                    && event.status == RunStatus::Succeeded
            })
            .expect("a succeeded run event");
        assert_eq!(event.files_read, in_hour.len() as i64, "pruned to {partition}");
        assert_eq!(event.rows_read, in_hour.iter().map(|file| file.num_rows as i64).sum::<i64>());
        assert_eq!(event.bytes_read, in_hour.iter().map(|file| file.size_bytes as i64).sum::<i64>());
    }
    executor.stop().await.unwrap();
    compactor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ballista_job_is_refused_where_no_cluster_is_configured() {
    let lake_dir = tempfile::TempDir::new().unwrap();
    let mut config = sluice_executor::ExecutorConfig::default();
    config.schemas.directory = repo_root().join("schemas");
    config.object_store.url = lake_dir.path().display().to_string();
    let catalog = sluice_executor::open_catalog(&config).unwrap();
    let job = "-- name: big\n-- window: 1d\n-- engine: ballista\nSELECT count(*) FROM telemetry";
    let refusal = sluice_executor::validate_job(&catalog, job, None).await.unwrap_err().to_string();
    assert!(refusal.contains("ballista.scheduler_url is not set"), "{refusal}");
    let local = job.replace("ballista", "local");
    assert!(sluice_executor::validate_job(&catalog, &local, None).await.is_ok());
}
