//! What one job may take from an executor, on a real broker: memory the pool does not see
//! (values built by functions, results), run slots (the longest timeout, a fair share between
//! jobs), and CPU after its deadline. The jobs here read no stream, so their windows are
//! complete by the clock alone, and the executor runs in this process so that its memory and
//! CPU time are this process's.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::{Duration, Instant};

use sluice_executor::events::{JobStatusEvent, JobStatusKind};
use sluice_executor::runs::{OutcomeRecord, OutcomeStatus, load_windows};
use sluice_integration_tests::{
    Broker, ExecutorService, consume_topic_within, executor_config, job_run_events, now_micros,
    open_local_lake, read_job_result, submit_job, unique_suffix, wait_until,
};
use sluice_lake::Lake;

const HOUR: i64 = 3_600_000_000;

/// The start of the hour `hours_ago` hours before the current one.
fn hour_start(hours_ago: i64) -> i64 {
    (now_micros().div_euclid(HOUR) - hours_ago) * HOUR
}

fn job(name: &str, headers: &str, first_window: i64, sql: &str) -> String {
    format!(
        "-- name: {name}\n-- window: 1h\n{headers}-- start: {}\n{sql}\n",
        sluice_executor::job::format_micros(first_window)
    )
}

/// The outcome of the window starting at `start`, once there is one.
async fn outcome(lake: &Lake, job: &str, start: i64, timeout: Duration) -> OutcomeRecord {
    let deadline = Instant::now() + timeout;
    loop {
        let state_opt = load_windows(lake, job).await.unwrap().remove(&start);
        if let Some(outcome) = state_opt.and_then(|state| state.outcome_opt) {
            return outcome;
        }
        assert!(Instant::now() < deadline, "{job}: the window at {start} has an outcome within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// A line of /proc/self/status in kB, as bytes.
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|line| line.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// CPU time this process has used (all threads, user and system).
fn process_cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_and_results_past_their_limits_fail_with_reasons_and_memory_stays_bounded() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let lake = open_local_lake(lake_dir.path());
    let mut config = executor_config(&broker, &prefix, lake_dir.path());
    config.query.memory_limit_bytes = 64 * 1024 * 1024;
    config.query.max_result_rows = 1_000_000;
    config.query.max_result_bytes = 16 * 1024 * 1024;
    config.query.max_value_bytes = 1024 * 1024;
    let executor = ExecutorService::start(config);
    // The peak from here on: what the runs below add.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = proc_status_bytes("VmRSS:");

    let start = hour_start(1);
    let cases = [
        // The two cases of the report: a 400 MB value, and a 9-million-row result.
        ("huge_value", "SELECT length(repeat('x', 400000000)) AS n", "query.max_value_bytes"),
        (
            "cross_join",
            "SELECT a.value AS a, b.value AS b FROM generate_series(1, 3000) a \
             CROSS JOIN generate_series(1, 3000) b",
            "query.max_result_rows",
        ),
        // One row over the row limit, and a result of few rows but too many bytes
        // (hashes do not compress).
        ("one_row_over", "SELECT value FROM generate_series(1, 1000001)", "query.max_result_rows"),
        (
            "too_many_bytes",
            "SELECT sha256(CAST(value AS VARCHAR)) AS hash FROM generate_series(1, 700000)",
            "query.max_result_bytes",
        ),
    ];
    for (name, sql, _) in &cases {
        submit_job(&broker.bootstrap_servers(), &prefix, name, Some(&job(name, "", start, sql)))
            .await
            .unwrap();
    }
    // Neighbours that succeed: a result of exactly the row limit, a value of exactly the
    // value limit.
    let at_limit = [
        ("rows_at_limit", "SELECT value FROM generate_series(1, 1000000)"),
        ("value_at_limit", "SELECT length(repeat('x', 1048576)) AS n"),
    ];
    for (name, sql) in &at_limit {
        submit_job(&broker.bootstrap_servers(), &prefix, name, Some(&job(name, "", start, sql)))
            .await
            .unwrap();
    }

    for (name, _, reason) in &cases {
        let outcome = outcome(&lake, name, start, Duration::from_secs(120)).await;
        assert_eq!(outcome.status, OutcomeStatus::Failed, "{name}: {outcome:?}");
        let error = outcome.error_opt.clone().unwrap_or_default();
        assert!(error.contains(reason), "{name}: {error}");
        // A limit gives the same answer every time: no retries spent on it.
        assert_eq!(outcome.attempt, 1, "{name}: {outcome:?}");
        assert!(!lake_dir.path().join(sluice_lake::layout::result_path(name, start)).exists(), "{name}");
    }
    for (name, _) in &at_limit {
        let outcome = outcome(&lake, name, start, Duration::from_secs(120)).await;
        assert_eq!(outcome.status, OutcomeStatus::Succeeded, "{name}: {outcome:?}");
    }
    let rows: usize =
        read_job_result(lake_dir.path(), "rows_at_limit", start).iter().map(|batch| batch.num_rows()).sum();
    assert_eq!(rows, 1_000_000);
    let value = read_job_result(lake_dir.path(), "value_at_limit", start);
    let value = datafusion::arrow::compute::cast(value[0].column(0), &arrow_schema::DataType::Int64).unwrap();
    assert_eq!(value.as_any().downcast_ref::<arrow_array::Int64Array>().unwrap().value(0), 1_048_576);

    // The failures are on the status topic with their reasons, and the executor keeps serving.
    let statuses = status_events(&broker, &prefix, cases.len() + at_limit.len() * 2).await;
    for (name, _, reason) in &cases {
        assert!(
            statuses.iter().any(|event| event.job == *name
                && event.status == JobStatusKind::WindowFailed
                && event.reason.contains(reason)),
            "{name}: {statuses:?}"
        );
    }
    let peak_growth = proc_status_bytes("VmHWM:").saturating_sub(rss_before);
    println!("peak RSS growth over the runs: {} MiB", peak_growth / (1024 * 1024));
    // Without the bounds the 400 MB value and the collected cross join alone add well over this.
    assert!(peak_growth < 300 * 1024 * 1024, "peak RSS grew by {peak_growth} bytes");
    let later = hour_start(2);
    submit_job(
        &broker.bootstrap_servers(),
        &prefix,
        "after",
        Some(&job("after", "", later, "SELECT 1 AS one")),
    )
    .await
    .unwrap();
    assert_eq!(
        outcome(&lake, "after", later, Duration::from_secs(60)).await.status,
        OutcomeStatus::Succeeded
    );
    executor.stop().await.unwrap();
}

/// A query that runs for hours: one partition of a trillion rows summed.
const ENDLESS: &str = "SELECT sum(value % 7) AS s FROM generate_series(1, 1000000000000)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_have_a_ceiling_and_a_trivial_job_runs_on_time_beside_two_runaway_ones() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let lake = open_local_lake(lake_dir.path());
    let mut config = executor_config(&broker, &prefix, lake_dir.path());
    config.executor.max_concurrent_runs = 2;
    config.executor.default_timeout_ms = 2_000;
    config.executor.max_timeout_ms = 3_000;
    config.query.target_partitions = 1;
    let executor = ExecutorService::start(config);

    // Ten years, and one millisecond over the ceiling: refused with the ceiling; the ceiling
    // itself is accepted.
    let ten_years = job("ten_years", "-- timeout: 3650d\n", hour_start(1), ENDLESS);
    submit_job(&broker.bootstrap_servers(), &prefix, "ten_years", Some(&ten_years)).await.unwrap();
    let just_over = job("just_over", "-- timeout: 3001ms\n", hour_start(1), ENDLESS);
    submit_job(&broker.bootstrap_servers(), &prefix, "just_over", Some(&just_over)).await.unwrap();
    // Two runaway jobs with a day of windows each, every one running to the longest timeout.
    for name in ["runaway_a", "runaway_b"] {
        let text = job(name, "-- timeout: 3s\n-- retries: 0\n", hour_start(24), ENDLESS);
        submit_job(&broker.bootstrap_servers(), &prefix, name, Some(&text)).await.unwrap();
    }
    let statuses = status_events(&broker, &prefix, 4).await;
    for name in ["ten_years", "just_over"] {
        let event = statuses.iter().find(|event| event.job == name).unwrap();
        assert_eq!(event.status, JobStatusKind::Rejected, "{event:?}");
        assert!(
            event.reason.contains("at most 3s") && event.reason.contains("executor.max_timeout_ms"),
            "{event:?}"
        );
    }
    // Both slots taken by the runaway jobs before the trivial job arrives.
    let both_running = wait_until(Duration::from_secs(30), || {
        let lake = lake.clone();
        async move {
            let a = load_windows(&lake, "runaway_a").await.unwrap();
            let b = load_windows(&lake, "runaway_b").await.unwrap();
            !a.is_empty() && !b.is_empty()
        }
    })
    .await;
    assert!(both_running, "the runaway jobs started");

    let trivial_start = hour_start(2);
    let submitted = Instant::now();
    let trivial = job("trivial", "", trivial_start, "SELECT 1 AS one");
    submit_job(&broker.bootstrap_servers(), &prefix, "trivial", Some(&trivial)).await.unwrap();
    for start in [trivial_start, trivial_start + HOUR] {
        let outcome = outcome(&lake, "trivial", start, Duration::from_secs(60)).await;
        assert_eq!(outcome.status, OutcomeStatus::Succeeded, "{outcome:?}");
    }
    let waited = submitted.elapsed();
    println!("the trivial job's two windows were done {waited:?} after it was submitted");
    // Oldest-first would have run the runaway jobs' 48 older windows (3 s each, 2 at a time)
    // first: over a minute. A fair share gives the trivial job a slot as one frees.
    assert!(waited < Duration::from_secs(15), "the trivial job waited {waited:?}");

    // Each runaway window failed at its timeout, not later.
    let runaway = outcome(&lake, "runaway_a", hour_start(24), Duration::from_secs(30)).await;
    assert_eq!(runaway.status, OutcomeStatus::Failed);
    assert!(runaway.error_opt.as_deref().unwrap_or_default().contains("timeout"), "{runaway:?}");
    let took = Duration::from_micros((runaway.finished_at_micros - runaway.started_at_micros) as u64);
    assert!(took < Duration::from_millis(4_000), "a 3 s timeout recorded after {took:?}");
    executor.stop().await.unwrap();
}

/// Runs `sql` with a 2 s timeout and returns how long after the deadline the timeout was
/// recorded and the CPU went idle, and what CPU the process used in the 2 s after that.
async fn time_out(
    broker: &Broker,
    prefix: &str,
    lake: &Lake,
    name: &str,
    sql: &str,
) -> (Duration, Duration, Duration) {
    let start = hour_start(1);
    let text = job(name, "-- timeout: 2s\n-- retries: 0\n", start, sql);
    submit_job(&broker.bootstrap_servers(), prefix, name, Some(&text)).await.unwrap();
    let failed = outcome(lake, name, start, Duration::from_secs(60)).await;
    assert_eq!(failed.status, OutcomeStatus::Failed);
    assert!(failed.error_opt.as_deref().unwrap_or_default().contains("timeout"), "{failed:?}");
    let deadline_micros = failed.started_at_micros + 2_000_000;
    let recorded_late = Duration::from_micros((failed.finished_at_micros - deadline_micros).max(0) as u64);

    // From the outcome on, sample this process's CPU time until it stops growing.
    let mut previous = process_cpu_time();
    let mut idle_at_opt = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = process_cpu_time();
        // Under 10% of one core: the broker client and the executor's ticks.
        if now.saturating_sub(previous) < Duration::from_millis(25) {
            idle_at_opt = Some(now_micros());
            break;
        }
        previous = now;
    }
    let to_idle = idle_at_opt
        .map_or(Duration::MAX, |idle_at| Duration::from_micros((idle_at - deadline_micros).max(0) as u64));
    // And it stays idle: nothing left running in the background.
    let before = process_cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used_after = process_cpu_time().saturating_sub(before);
    println!(
        "{name}: timeout recorded {recorded_late:?} after the deadline, CPU idle {to_idle:?} after it, {used_after:?} of CPU in the next 2 s"
    );
    (recorded_late, to_idle, used_after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_run_stops_using_the_cpu_promptly() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let lake = open_local_lake(lake_dir.path());
    let mut config = executor_config(&broker, &prefix, lake_dir.path());
    config.query.target_partitions = 2;
    let executor = ExecutorService::start(config);

    let cases = [
        // Two partitions of endless work: a repartitioned aggregation spawns tasks of its own.
        (
            "endless_aggregation",
            "SELECT value % 1000 AS k, count(*) AS n FROM generate_series(1, 1000000000000) GROUP BY 1",
        ),
        // Ten billion rows made from two small inputs: no scan or exchange in the loop, so
        // DataFusion's own yield points never come.
        (
            "endless_cross_join",
            "SELECT sum(a * b % 7) AS s FROM (SELECT unnest(range(1, 100000)) AS a) x \
             CROSS JOIN (SELECT unnest(range(1, 100000)) AS b) y",
        ),
    ];
    for (name, sql) in cases {
        let (recorded_late, to_idle, used_after) = time_out(&broker, &prefix, &lake, name, sql).await;
        assert!(recorded_late < Duration::from_secs(1), "{name}: recorded {recorded_late:?} late");
        assert!(to_idle < Duration::from_secs(2), "{name}: CPU still busy {to_idle:?} after the deadline");
        assert!(
            used_after < Duration::from_millis(300),
            "{name}: {used_after:?} of CPU in 2 s after the run failed"
        );
    }
    let events = job_run_events(&broker, &prefix, 2).await;
    assert!(events.iter().all(|event| event.duration_ms < 3_000), "{events:?}");
    executor.stop().await.unwrap();
}
