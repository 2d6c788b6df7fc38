//! A job with `-- window: 1s` and `-- start: 1970-01-01` made the scheduler queue one entry per
//! window since 1970 in one tick (3 GB in 9 s, again after every restart). Backlogs past
//! `executor.max_backlog_windows` are refused with what would be accepted, backfills the same,
//! and what is accepted is caught up in pages, oldest first.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::{Duration, Instant};

use sluice_executor::events::JobStatusKind;
use sluice_executor::job::format_micros;
use sluice_executor::runs::{BackfillRequest, OutcomeStatus, load_windows, request_backfill};
use sluice_integration_tests::{
    Broker, ExecutorService, executor_config, job_status_event, now_micros, open_local_lake, submit_job,
    unique_suffix, windows_succeeded,
};

const SECOND: i64 = 1_000_000;
const DAY: i64 = 86_400 * SECOND;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_backlogs_are_refused_and_an_accepted_catch_up_runs_every_window_in_order() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let lake = open_local_lake(lake_dir.path());
    let mut config = executor_config(&broker, &prefix, lake_dir.path());
    config.executor.max_backlog_windows = 30;
    config.executor.max_windows_per_job_per_tick = 4;
    config.executor.max_concurrent_runs = 1;
    let executor = ExecutorService::start(config);
    let bootstrap = broker.bootstrap_servers();
    let today = now_micros().div_euclid(DAY) * DAY;
    let job = |name: &str, window: &str, start: i64| {
        format!("-- name: {name}\n-- window: {window}\n-- start: {}\nSELECT 1 AS one\n", format_micros(start))
    };

    submit_job(&bootstrap, &prefix, "since_1970", Some(&job("since_1970", "1s", 0))).await.unwrap();
    let refused = job_status_event(&broker, &prefix, "since_1970", JobStatusKind::Rejected).await;
    assert!(
        refused.reason.contains("start 1970-01-01T00:00:00Z with window 1s leaves"),
        "{}",
        refused.reason
    );
    assert!(
        refused.reason.contains("at most 30 are accepted (executor.max_backlog_windows)"),
        "{}",
        refused.reason
    );
    assert!(refused.reason.contains("start at "), "{}", refused.reason);

    // 31 windows before now (today's included) is one over; 30 is right at the limit.
    let one_over = today - 30 * DAY;
    submit_job(&bootstrap, &prefix, "one_over", Some(&job("one_over", "1d", one_over))).await.unwrap();
    let refused = job_status_event(&broker, &prefix, "one_over", JobStatusKind::Rejected).await;
    assert!(refused.reason.contains("leaves 31 windows"), "{}", refused.reason);
    let first = today - 29 * DAY;
    submit_job(&bootstrap, &prefix, "catch_up", Some(&job("catch_up", "1d", first))).await.unwrap();
    job_status_event(&broker, &prefix, "catch_up", JobStatusKind::Accepted).await;

    // Every complete window runs, in pages of 4, oldest first.
    let starts: Vec<i64> = (0..29).map(|index| first + index * DAY).collect();
    assert!(windows_succeeded(&lake, "catch_up", &starts, Duration::from_secs(120)).await);
    let windows = load_windows(&lake, "catch_up").await.unwrap();
    let started: Vec<i64> =
        starts.iter().map(|start| windows[start].outcome_opt.as_ref().unwrap().started_at_micros).collect();
    assert!(started.windows(2).all(|pair| pair[0] <= pair[1]), "windows ran out of order: {started:?}");
    assert!(!windows.contains_key(&today), "today's window is not complete");

    // A backfill over more windows than a backlog may hold is refused; a small one runs, and the
    // years between it and the job's start are never visited.
    let requested_at_micros = now_micros();
    let huge = BackfillRequest {
        job: "catch_up".into(),
        from_micros: 0,
        to_micros: today,
        requested_at_micros,
        signature_opt: None,
    };
    request_backfill(&lake, &huge).await.unwrap();
    let refused = job_status_event(&broker, &prefix, "catch_up", JobStatusKind::BackfillRefused).await;
    assert!(
        refused.reason.contains("covers 20") && refused.reason.contains("at most 30"),
        "{}",
        refused.reason
    );
    let from_micros = sluice_executor::job::parse_timestamp_micros("2020-01-01").unwrap();
    let small = BackfillRequest {
        job: "catch_up".into(),
        from_micros,
        to_micros: from_micros + 2 * DAY,
        requested_at_micros,
        signature_opt: None,
    };
    request_backfill(&lake, &small).await.unwrap();
    assert!(
        windows_succeeded(&lake, "catch_up", &[from_micros, from_micros + DAY], Duration::from_secs(60))
            .await
    );
    let windows = load_windows(&lake, "catch_up").await.unwrap();
    assert_eq!(windows.range(..first).count(), 2, "only the small backfill's windows ran before the start");
    assert!(windows.values().all(|state| {
        state.outcome_opt.as_ref().is_some_and(|outcome| outcome.status == OutcomeStatus::Succeeded)
    }));
    executor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_since_1970_let_through_is_run_in_pages_from_its_first_window() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let lake = open_local_lake(lake_dir.path());
    // An operator who lifted the limit: the scheduler still queues a page per tick, not 1.8
    // billion windows (which took 3 GB within 9 s and never got to run one).
    let mut config = executor_config(&broker, &prefix, lake_dir.path());
    config.executor.max_backlog_windows = u64::MAX;
    let executor = ExecutorService::start(config);
    let text = "-- name: since_1970\n-- window: 1s\n-- start: 1970-01-01\nSELECT 1 AS one\n";
    submit_job(&broker.bootstrap_servers(), &prefix, "since_1970", Some(text)).await.unwrap();
    let starts: Vec<i64> = (0..10).map(|index| index * SECOND).collect();
    assert!(windows_succeeded(&lake, "since_1970", &starts, Duration::from_secs(60)).await);

    // The loop is not stuck in the backlog: another definition gets its verdict at once, and the
    // catch-up goes on page after page. (Which job's windows take the run slots is the slots'
    // fair share, not paging: oldest first would leave `other` waiting behind 1970.)
    let today = now_micros().div_euclid(DAY) * DAY;
    let other =
        format!("-- name: other\n-- window: 1d\n-- start: {}\nSELECT 2 AS two\n", format_micros(today - DAY));
    let submitted_at = Instant::now();
    submit_job(&broker.bootstrap_servers(), &prefix, "other", Some(&other)).await.unwrap();
    job_status_event(&broker, &prefix, "other", JobStatusKind::Accepted).await;
    assert!(submitted_at.elapsed() < Duration::from_secs(15), "took {:?}", submitted_at.elapsed());
    let later: Vec<i64> = (10..40).map(|index| index * SECOND).collect();
    assert!(windows_succeeded(&lake, "since_1970", &later, Duration::from_secs(60)).await);
    executor.stop().await.unwrap();
}
