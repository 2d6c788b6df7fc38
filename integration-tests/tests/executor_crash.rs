//! Two `sluice-executor` processes share the jobs; one or the other is killed with SIGKILL at
//! random moments while windows run, and restarted. At the end every window ran to exactly one
//! recorded outcome, and its result holds what the readings say.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use arrow_array::{Int64Array, StringArray};
use rand::Rng;
use sluice_executor::events::RunStatus;
use sluice_executor::runs::{OutcomeStatus, load_windows};
use sluice_integration_tests::{
    Broker, compacted_readings, executor_config, job_run_events, open_local_lake, submit_job,
    telemetry_readings, unique_suffix, wait_until, workspace_binary,
};
use tokio::process::{Child, Command};

const HOUR: i64 = 3_600_000_000;
const WINDOW: i64 = HOUR / 6;
const NUM_KILLS: usize = 5;
const JOBS: [&str; 2] = ["device_counts_a", "device_counts_b"];

fn spawn_executor(config_path: &Path, instance: usize, log_dir: &Path) -> Child {
    let log =
        std::fs::File::create(log_dir.join(format!("executor-{instance}-{}.log", unique_suffix()))).unwrap();
    Command::new(workspace_binary("sluice-executor"))
        .arg("--config")
        .arg(config_path)
        .env("SLUICE_EXECUTOR__INSTANCE_ID", format!("crash-test-{instance}"))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_executors_leave_every_window_run_exactly_once() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let work_dir = tempfile::TempDir::new().unwrap();
    let lake_dir = work_dir.path().join("lake");
    let readings = telemetry_readings(9_000, 30, 3 * HOUR);
    let (compactor, watermark) = compacted_readings(&broker, &prefix, &lake_dir, &readings).await;
    let lake = open_local_lake(&lake_dir);

    let mut config = executor_config(&broker, &prefix, &lake_dir);
    config.executor.max_concurrent_runs = 1;
    config.executor.default_timeout_ms = 20_000;
    config.executor.lease_grace_ms = 2_000;
    let config_path = work_dir.path().join("executor.toml");
    std::fs::write(&config_path, sluice_config::to_masked_toml(&config).unwrap()).unwrap();

    let first =
        readings.iter().map(|reading| reading["ts"].as_i64().unwrap()).min().unwrap().div_euclid(HOUR) * HOUR;
    // The cross join makes each run take a while, so that kills land in the middle of runs.
    for job in JOBS {
        let text = format!(
            "-- name: {job}\n-- window: 10m\n-- start: {}\n\
             SELECT device_id, count(*) / 2000 AS readings\n\
             FROM telemetry CROSS JOIN generate_series(1, 2000)\n\
             GROUP BY device_id ORDER BY device_id\n",
            sluice_executor::job::format_micros(first)
        );
        submit_job(&broker.bootstrap_servers(), &prefix, job, Some(&text)).await.unwrap();
    }

    let mut instances =
        [spawn_executor(&config_path, 0, work_dir.path()), spawn_executor(&config_path, 1, work_dir.path())];
    // Kills land while windows run: after the first one finished, at random moments.
    let started = wait_until(Duration::from_secs(60), || {
        let lake = lake.clone();
        async move {
            let states = load_windows(&lake, JOBS[0]).await.unwrap();
            states.values().any(|state| state.outcome_opt.is_some())
        }
    })
    .await;
    assert!(started, "the executors started running windows");
    let mut rng = rand::rng();
    for _ in 0..NUM_KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..900))).await;
        let victim = rng.random_range(0..instances.len());
        instances[victim].kill().await.unwrap();
        instances[victim] = spawn_executor(&config_path, victim, work_dir.path());
    }

    let windows: Vec<i64> =
        (0..).map(|index| first + index * WINDOW).take_while(|start| start + WINDOW <= watermark).collect();
    assert!(windows.len() >= 12);
    for job in JOBS {
        let done = wait_until(Duration::from_secs(150), || {
            let lake = lake.clone();
            let windows = windows.clone();
            async move {
                let states = load_windows(&lake, job).await.unwrap();
                windows.iter().all(|start| states.get(start).is_some_and(|state| state.outcome_opt.is_some()))
            }
        })
        .await;
        let states = load_windows(&lake, job).await.unwrap();
        assert!(
            done,
            "{job}: {} of {} windows ran",
            states.values().filter(|s| s.outcome_opt.is_some()).count(),
            windows.len()
        );
        let retaken = states
            .values()
            .filter(|state| state.latest_attempt_opt.as_ref().is_some_and(|a| a.attempt > 1))
            .count();
        eprintln!("{job}: {retaken} window(s) finished by a later attempt after a kill");
        for start in &windows {
            let state = &states[start];
            let outcome = state.outcome_opt.as_ref().unwrap();
            assert_eq!(outcome.status, OutcomeStatus::Succeeded, "{job} {start}: {outcome:?}");
            assert_eq!(state.revision, 0, "{job} {start}: ran once, not restated");

            let mut expected: BTreeMap<String, i64> = BTreeMap::new();
            for reading in readings
                .iter()
                .filter(|reading| (*start..start + WINDOW).contains(&reading["ts"].as_i64().unwrap()))
            {
                *expected.entry(reading["device_id"].as_str().unwrap().to_string()).or_default() += 1;
            }
            let mut actual: BTreeMap<String, i64> = BTreeMap::new();
            for batch in sluice_integration_tests::read_job_result(&lake_dir, job, *start) {
                let devices = batch.column(0).as_any().downcast_ref::<StringArray>().unwrap();
                let counts = batch.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
                for row in 0..batch.num_rows() {
                    assert!(
                        actual.insert(devices.value(row).to_string(), counts.value(row)).is_none(),
                        "one row per device"
                    );
                }
            }
            assert_eq!(actual, expected, "{job} {start}");
        }
    }

    // No window reported success twice.
    let events = job_run_events(&broker, &prefix, windows.len() * JOBS.len()).await;
    let mut successes: BTreeMap<(String, i64), usize> = BTreeMap::new();
    for event in events.iter().filter(|event| event.status == RunStatus::Succeeded) {
        *successes.entry((event.job.clone(), event.window_start_micros)).or_default() += 1;
    }
    assert!(successes.values().all(|count| *count == 1), "{successes:?}");
    for instance in &mut instances {
        instance.kill().await.unwrap();
    }
    compactor.stop().await.unwrap();
}
