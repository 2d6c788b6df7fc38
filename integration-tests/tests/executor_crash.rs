//! Two `sluice-executor` processes share the jobs; one or the other is killed with SIGKILL at
//! random moments while it runs a window, and restarted. At the end every window ran to exactly
//! one recorded outcome, some window was taken over by a later attempt after a kill cut its run
//! short, every window's success was reported once, and its result holds what the readings say.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use arrow_array::{Int64Array, StringArray};
use rand::Rng;
use sluice_executor::events::RunStatus;
use sluice_executor::runs::{AttemptRecord, OutcomeStatus, WindowState, load_windows};
use sluice_integration_tests::{
    Broker, compacted_readings, executor_config, job_run_events, now_micros, open_local_lake, submit_job,
    telemetry_readings, unique_suffix, wait_until, workspace_binary,
};
use sluice_lake::Lake;
use sluice_lake::layout::attempt_path;
use tokio::process::{Child, Command};

const HOUR: i64 = 3_600_000_000;
const WINDOW: i64 = HOUR / 6;
const NUM_KILLS: usize = 5;
const JOBS: [&str; 2] = ["device_counts_a", "device_counts_b"];
/// How long after recording its outcome a process may have been killed for its run event to be
/// missing: the event is published right after the outcome is recorded.
const EVENT_LOSS_SPAN_MICROS: i64 = 5_000_000;

fn instance_id(instance: usize) -> String {
    format!("crash-test-{instance}")
}

/// One SIGKILL: the replica's `executor.instance_id`, and a moment (µs since the epoch) when its
/// process was already dead.
#[derive(Debug)]
struct Kill {
    instance_id: String,
    dead_at_micros: i64,
}

/// The latest claim of every window that has no outcome yet: an attempt being run, or one that a
/// killed process left.
async fn unfinished_claims(lake: &Lake) -> Vec<AttemptRecord> {
    let mut claims = Vec::new();
    for job in JOBS {
        let states = load_windows(lake, job).await.unwrap();
        claims.extend(
            states
                .into_values()
                .filter(|state| state.outcome_opt.is_none())
                .filter_map(|state| state.latest_attempt_opt),
        );
    }
    claims
}

/// Unfinished claims of live processes (none of `dead_incarnations`), as soon as there are some
/// within `timeout`; empty if none appeared.
async fn claims_being_run(
    lake: &Lake,
    dead_incarnations: &BTreeSet<String>,
    timeout: Duration,
) -> Vec<AttemptRecord> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let live: Vec<AttemptRecord> = unfinished_claims(lake)
            .await
            .into_iter()
            .filter(|claim| !dead_incarnations.contains(&claim.incarnation))
            .collect();
        if !live.is_empty() || tokio::time::Instant::now() >= deadline {
            return live;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn_executor(config_path: &Path, instance: usize, log_dir: &Path) -> Child {
    let log =
        std::fs::File::create(log_dir.join(format!("executor-{instance}-{}.log", unique_suffix()))).unwrap();
    Command::new(workspace_binary("sluice-executor"))
        .arg("--config")
        .arg(config_path)
        .env("SLUICE_EXECUTOR__INSTANCE_ID", instance_id(instance))
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
    let mut kills: Vec<Kill> = Vec::new();
    // (job, window start, attempt) of claims whose process was killed before they had an outcome.
    let mut killed_claims: BTreeSet<(String, i64, u32)> = BTreeSet::new();
    let mut dead_incarnations: BTreeSet<String> = BTreeSet::new();
    for _ in 0..NUM_KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..900))).await;
        // The victim is the owner of a run in progress when there is one: a kill between runs
        // (or of a replica still starting) tests only a restart, not the takeover of a claim.
        // A window whose run was killed already is left alone: a killed run counts as an attempt
        // (so that a window that kills its executor every time cannot loop forever), and three
        // kills of one window would rightly mark it failed.
        let was_killed = |claim: &AttemptRecord| {
            killed_claims
                .iter()
                .any(|(job, start, _)| *job == claim.job && *start == claim.window_start_micros)
        };
        let live = claims_being_run(&lake, &dead_incarnations, Duration::from_secs(10)).await;
        let fresh: Vec<&AttemptRecord> = live.iter().filter(|claim| !was_killed(claim)).collect();
        let victim = if let Some(claim) = fresh.get(rng.random_range(0..fresh.len().max(1))) {
            (0..instances.len()).find(|instance| instance_id(*instance) == claim.owner).unwrap()
        } else {
            let spared: BTreeSet<&str> = live.iter().map(|claim| claim.owner.as_str()).collect();
            let candidates: Vec<usize> = (0..instances.len())
                .filter(|instance| !spared.contains(instance_id(*instance).as_str()))
                .collect();
            let Some(victim) = candidates.get(rng.random_range(0..candidates.len().max(1))) else { continue };
            *victim
        };
        instances[victim].kill().await.unwrap();
        // The replica has no process until it is started again below: every unfinished claim
        // it owns now is one a killed process left.
        for claim in unfinished_claims(&lake).await {
            if claim.owner == instance_id(victim) {
                killed_claims.insert((claim.job.clone(), claim.window_start_micros, claim.attempt));
                dead_incarnations.insert(claim.incarnation);
            }
        }
        kills.push(Kill { instance_id: instance_id(victim), dead_at_micros: now_micros() });
        instances[victim] = spawn_executor(&config_path, victim, work_dir.path());
    }

    let windows: Vec<i64> =
        (0..).map(|index| first + index * WINDOW).take_while(|start| start + WINDOW <= watermark).collect();
    assert!(windows.len() >= 12);
    let mut states_of_job: BTreeMap<&str, BTreeMap<i64, WindowState>> = BTreeMap::new();
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
        states_of_job.insert(job, states);
    }
    let outcome_of = |job: &str, start: i64| {
        states_of_job[job]
            .get(&start)
            .and_then(|state| state.outcome_opt.clone())
            .unwrap_or_else(|| panic!("{job} {start}: no outcome"))
    };

    let events = job_run_events(&broker, &prefix, windows.len() * JOBS.len()).await;
    // Attempts that ended and said so; a killed process says nothing about the attempt it ran.
    let reported: BTreeSet<(String, i64, u32)> = events
        .iter()
        .map(|event| (event.job.clone(), event.window_start_micros, u32::try_from(event.attempt).unwrap()))
        .collect();
    let num_retaken = killed_claims
        .iter()
        .filter(|(job, start, attempt)| {
            outcome_of(job.as_str(), *start).attempt > *attempt
                && !reported.contains(&(job.clone(), *start, *attempt))
        })
        .count();
    assert!(
        num_retaken > 0,
        "no run cut short by a kill was taken over by a later attempt: killed claims {killed_claims:?}, \
         kills {kills:?}"
    );

    // Every due window's success was reported once, by the attempt whose outcome counts.
    let due: BTreeSet<(String, i64)> =
        JOBS.iter().flat_map(|job| windows.iter().map(move |start| (job.to_string(), *start))).collect();
    let mut successes: BTreeMap<(String, i64), Vec<u32>> = BTreeMap::new();
    for event in events.iter().filter(|event| event.status == RunStatus::Succeeded) {
        successes
            .entry((event.job.clone(), event.window_start_micros))
            .or_default()
            .push(u32::try_from(event.attempt).unwrap());
    }
    assert!(!successes.is_empty(), "no run event reported a success");
    for ((job, start), attempts) in &successes {
        assert!(due.contains(&(job.clone(), *start)), "{job} {start}: success reported for a window not due");
        assert_eq!(
            *attempts,
            [outcome_of(job.as_str(), *start).attempt],
            "{job} {start}: successes reported"
        );
    }
    // A success without its event is allowed only where a kill of the process that recorded the
    // outcome came between the outcome and the event.
    for (job, start) in due.iter().filter(|window| !successes.contains_key(*window)) {
        let outcome = outcome_of(job.as_str(), *start);
        let recorder = lake
            .read_record::<AttemptRecord>(&attempt_path(job, *start, outcome.revision, outcome.attempt))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{job} {start}: the claim of attempt {} is missing", outcome.attempt));
        let killed_after_outcome = kills.iter().any(|kill| {
            kill.instance_id == recorder.owner
                && (0..=EVENT_LOSS_SPAN_MICROS).contains(&(kill.dead_at_micros - outcome.finished_at_micros))
        });
        assert!(
            killed_after_outcome,
            "{job} {start}: succeeded (attempt {} by {}) but no success was reported; kills {kills:?}",
            outcome.attempt, recorder.owner
        );
    }
    for instance in &mut instances {
        instance.kill().await.unwrap();
    }
    compactor.stop().await.unwrap();
}
