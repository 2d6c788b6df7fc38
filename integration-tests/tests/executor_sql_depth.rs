//! Queries nested or chained deep enough to overflow the stack used to abort the executor (and,
//! as the definition stays in `sluice.jobs`, every restart) and the CLI. They are refused with a
//! reason now, wherever SQL is parsed, and a query right at the limit plans and runs.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::Duration;

use arrow_array::{Array, Int64Array};
use sluice_executor::events::{JobStatusEvent, JobStatusKind};
use sluice_executor::sql_depth::{MAX_QUERY_NESTING, MAX_SUBQUERY_NESTING, nesting_bound};
use sluice_integration_tests::{
    Broker, ExecutorService, consume_topic_within, executor_config, open_local_lake, read_job_result,
    repo_root, submit_job, unique_suffix, windows_succeeded, workspace_binary,
};

const HOUR: i64 = 3_600_000_000;

/// `SELECT 0 + 1 + 1 ...` with `num_terms` terms: the sum is `num_terms - 1`.
fn sum_chain(num_terms: usize) -> String {
    let mut sql = String::with_capacity(num_terms * 4 + 16);
    sql.push_str("SELECT 0");
    for _ in 1..num_terms {
        sql.push_str(" + 1");
    }
    sql
}

/// The longest sum chain the limit accepts.
fn sum_chain_at_limit() -> (String, usize) {
    // Each term adds two tokens (`+` and `1`) to the one item.
    let mut num_terms = MAX_QUERY_NESTING / 2;
    while nesting_bound(&sum_chain(num_terms + 1)).unwrap() <= MAX_QUERY_NESTING {
        num_terms += 1;
    }
    while nesting_bound(&sum_chain(num_terms)).unwrap() > MAX_QUERY_NESTING {
        num_terms -= 1;
    }
    (sum_chain(num_terms), num_terms)
}

async fn statuses(broker: &Broker, prefix: &str, at_least: usize) -> Vec<JobStatusEvent> {
    consume_topic_within(
        &broker.bootstrap_servers(),
        &format!("{prefix}.job-status"),
        at_least,
        Duration::from_millis(300),
        Duration::from_secs(90),
    )
    .await
    .unwrap()
    .iter()
    .map(|record| serde_json::from_slice(&record.payload).unwrap())
    .collect()
}

fn job_text(name: &str, start_micros: i64, sql: &str) -> String {
    format!(
        "-- name: {name}\n-- window: 1h\n-- start: {}\n{sql}\n",
        sluice_executor::job::format_micros(start_micros)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_queries_are_refused_with_a_reason_and_the_executor_runs_good_jobs_after_them() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let lake = open_local_lake(lake_dir.path());
    let executor = ExecutorService::start(executor_config(&broker, &prefix, lake_dir.path()));
    // Two complete hours before the current one; the jobs read no stream, so they are due at once.
    let first_window = (sluice_integration_tests::now_micros().div_euclid(HOUR) - 2) * HOUR;

    let (at_limit, num_terms_at_limit) = sum_chain_at_limit();
    let nested = |depth: usize, open: &str, close: &str| {
        format!("SELECT {}1{}", open.repeat(depth), close.repeat(depth))
    };
    let refused: Vec<(&str, String)> = vec![
        // The case: 100,000 terms, about 400 KB.
        ("sum_100k", sum_chain(100_000)),
        ("one_over_the_limit", sum_chain(num_terms_at_limit + 1)),
        ("or_chain", {
            let mut sql = String::from("SELECT 1 WHERE 1 = 0");
            for index in 0..20_000 {
                sql.push_str(&format!(" OR {index} = 1"));
            }
            sql
        }),
        ("union_chain", vec!["SELECT 1"; 20_000].join(" UNION ALL ")),
        ("parentheses", nested(20_000, "(", ")")),
        ("case_in_case", nested(5_000, "CASE WHEN true THEN ", " END")),
        ("subqueries", nested(5_000, "(SELECT ", ")")),
        // One over the subquery limit (the outer query is a level too): planning time doubles
        // with each level.
        ("subqueries_one_over", nested(MAX_SUBQUERY_NESTING, "(SELECT ", ")")),
        // Under the token limit, over the parser's recursion limit: refused by the parser.
        ("parentheses_60", nested(60, "(", ")")),
        ("cte_chain", {
            let ctes: Vec<String> = (1..3_000)
                .map(|index| format!("c{index} AS (SELECT x + 1 AS x FROM c{})", index - 1))
                .collect();
            format!("WITH c0 AS (SELECT 1 AS x), {} SELECT x FROM c2999", ctes.join(", "))
        }),
    ];
    for (name, sql) in &refused {
        submit_job(&broker.bootstrap_servers(), &prefix, name, Some(&job_text(name, first_window, sql)))
            .await
            .unwrap();
    }
    submit_job(
        &broker.bootstrap_servers(),
        &prefix,
        "at_the_limit",
        Some(&job_text("at_the_limit", first_window, &at_limit)),
    )
    .await
    .unwrap();
    let subqueries_at_limit = nested(MAX_SUBQUERY_NESTING - 1, "(SELECT ", ")");
    submit_job(
        &broker.bootstrap_servers(),
        &prefix,
        "subqueries_at_limit",
        Some(&job_text("subqueries_at_limit", first_window, &subqueries_at_limit)),
    )
    .await
    .unwrap();

    let events = statuses(&broker, &prefix, refused.len() + 2).await;
    for (name, _) in &refused {
        let event =
            events.iter().find(|event| event.job == *name).unwrap_or_else(|| panic!("{name}: {events:?}"));
        assert_eq!(event.status, JobStatusKind::Rejected, "{name}: {event:?}");
        assert!(
            event.reason.contains("nests too deeply")
                || event.reason.contains("parser's recursion limit is 50"),
            "{name}: {}",
            event.reason
        );
        assert!(event.reason.len() < 1_000, "{name}: the reason is a sentence, not the query");
    }
    let sum_reason = &events.iter().find(|event| event.job == "sum_100k").unwrap().reason;
    assert!(sum_reason.contains(&format!("at most {MAX_QUERY_NESTING}")), "{sum_reason}");
    let subquery_reason = &events.iter().find(|event| event.job == "subqueries_one_over").unwrap().reason;
    assert!(
        subquery_reason.contains(&format!("subqueries {} levels deep", MAX_SUBQUERY_NESTING + 1)),
        "{subquery_reason}"
    );
    for name in ["at_the_limit", "subqueries_at_limit"] {
        let accepted = events.iter().find(|event| event.job == name).unwrap();
        assert_eq!(accepted.status, JobStatusKind::Accepted, "{accepted:?}");
    }

    // Right at the limit: planned, run and written, on the executor's own threads.
    let starts = [first_window, first_window + HOUR];
    assert!(windows_succeeded(&lake, "at_the_limit", &starts, Duration::from_secs(120)).await);
    let batches = read_job_result(lake_dir.path(), "at_the_limit", first_window);
    let sums = batches[0].column(0).as_any().downcast_ref::<Int64Array>().unwrap();
    assert_eq!((sums.len(), sums.value(0)), (1, num_terms_at_limit as i64 - 1));
    assert!(windows_succeeded(&lake, "subqueries_at_limit", &starts, Duration::from_secs(60)).await);

    // The executor is still up and takes a good job after all of them.
    submit_job(
        &broker.bootstrap_servers(),
        &prefix,
        "good_after",
        Some(&job_text("good_after", first_window, "SELECT 42 AS answer")),
    )
    .await
    .unwrap();
    assert!(windows_succeeded(&lake, "good_after", &starts, Duration::from_secs(60)).await);
    executor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_deep_queries_with_a_message_instead_of_aborting() {
    let lake_dir = tempfile::TempDir::new().unwrap();
    let sluice = |args: &[&str]| {
        let mut command = std::process::Command::new(workspace_binary("sluice"));
        command.current_dir(repo_root());
        // No broker is needed to refuse a query; an unreachable one proves nothing is produced.
        command.args(["--bootstrap-servers", "127.0.0.1:9", "--topic-prefix", "unused"]);
        command.arg("--lake").arg(lake_dir.path());
        command.args(args);
        command.output().unwrap()
    };
    let (at_limit, num_terms_at_limit) = sum_chain_at_limit();
    let answered = sluice(&["query", "--format", "csv", &at_limit]);
    assert!(answered.status.success(), "{}", String::from_utf8_lossy(&answered.stderr));
    assert!(
        String::from_utf8_lossy(&answered.stdout).contains(&format!("\n{}\n", num_terms_at_limit - 1)),
        "{}",
        String::from_utf8_lossy(&answered.stdout)
    );

    // 30,000 terms: 120 KB, under the 128 KiB a single argument may hold; aborted before.
    let refused = sluice(&["query", &sum_chain(30_000)]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("nests too deeply") && stderr.len() < 1_000, "{stderr}");

    let job_file = lake_dir.path().join("deep.sql");
    std::fs::write(
        &job_file,
        job_text("deep", sluice_integration_tests::now_micros().div_euclid(HOUR) * HOUR, &sum_chain(100_000)),
    )
    .unwrap();
    let submitted = sluice(&["jobs", "submit", job_file.to_str().unwrap()]);
    assert_eq!(submitted.status.code(), Some(3), "{submitted:?}");
    let stderr = String::from_utf8_lossy(&submitted.stderr);
    assert!(stderr.contains("nests too deeply") && stderr.len() < 1_000, "{stderr}");
}
