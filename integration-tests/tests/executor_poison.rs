//! A definition the executor dies on while validating it stays in `sluice.jobs`, so every
//! restart used to validate it again and die again. `sluice-executor` processes are killed with
//! SIGKILL while a definition is being validated (its reference table is a FIFO nobody writes,
//! so reading it never returns), twice; after the next restart that definition is rejected with
//! the reason on `sluice.job-status` instead of validated again, and good jobs run.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use arrow_array::{Array, Int64Array};
use sluice_executor::catalog::{ReferenceFormat, ReferenceTable};
use sluice_executor::events::JobStatusKind;
use sluice_executor::job::format_micros;
use sluice_integration_tests::{
    Broker, executor_config, job_status_event, now_micros, open_local_lake, read_job_result, submit_job,
    unique_suffix, wait_until, windows_succeeded, workspace_binary,
};
use tokio::process::{Child, Command};

const DAY: i64 = 86_400_000_000;

fn spawn_executor(config_path: &Path, log_path: &Path) -> Child {
    Command::new(workspace_binary("sluice-executor"))
        .arg("--config")
        .arg(config_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log_path).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_the_executor_died_validating_is_rejected_after_the_restart() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let work_dir = tempfile::TempDir::new().unwrap();
    let lake_dir = work_dir.path().join("lake");
    let reference = lake_dir.join("reference/devices.csv");
    std::fs::create_dir_all(reference.parent().unwrap()).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&reference).status().unwrap();
    assert!(made.success());

    let mut config = executor_config(&broker, &prefix, &lake_dir);
    config.executor.instance_id = "poison-test".into();
    config.executor.state_dir = work_dir.path().join("state").display().to_string();
    config.tables.reference.push(ReferenceTable {
        name: "devices".into(),
        path: "reference/devices.csv".into(),
        format: ReferenceFormat::Csv,
    });
    let config_path = work_dir.path().join("executor.toml");
    std::fs::write(&config_path, sluice_config::to_masked_toml(&config).unwrap()).unwrap();

    let yesterday = now_micros().div_euclid(DAY) * DAY - DAY;
    let job = |name: &str, sql: &str| {
        format!("-- name: {name}\n-- window: 1d\n-- start: {}\n{sql}\n", format_micros(yesterday))
    };
    let stuck_text = job("stuck", "SELECT count(*) AS devices FROM devices");
    submit_job(&broker.bootstrap_servers(), &prefix, "stuck", Some(&stuck_text)).await.unwrap();
    let marker = work_dir.path().join("state/poison-test/validating/stuck.sql");
    // Two processes die validating it: the first death is forgiven (it may have been a kill
    // for another reason), the second is not.
    for (number, deaths) in [(1, "deaths: 1\n"), (2, "deaths: 2\n")] {
        let mut executor =
            spawn_executor(&config_path, &work_dir.path().join(format!("executor-{number}.log")));
        let validating = wait_until(Duration::from_secs(60), || {
            let marker = marker.clone();
            async move { std::fs::read_to_string(&marker).is_ok_and(|content| content.starts_with(deaths)) }
        })
        .await;
        assert!(validating, "executor {number} started validating the definition");
        executor.kill().await.unwrap();
    }

    // The reference table is readable now: what killed the first process is gone, yet the
    // definition it died on is not validated again.
    std::fs::remove_file(&reference).unwrap();
    std::fs::write(&reference, "device_id\nd-1\nd-2\n").unwrap();
    let mut executor = spawn_executor(&config_path, &work_dir.path().join("executor-3.log"));
    let rejected = job_status_event(&broker, &prefix, "stuck", JobStatusKind::Rejected).await;
    assert!(
        rejected
            .reason
            .contains("stopped (crashed or was killed) while validating this exact definition, 2 times"),
        "{}",
        rejected.reason
    );
    assert!(rejected.reason.contains("stuck.sql"), "{}", rejected.reason);

    // Other jobs run, and a changed definition of the same job is validated and runs.
    let lake = open_local_lake(&lake_dir);
    submit_job(&broker.bootstrap_servers(), &prefix, "good", Some(&job("good", "SELECT 7 AS seven")))
        .await
        .unwrap();
    assert!(windows_succeeded(&lake, "good", &[yesterday], Duration::from_secs(60)).await);
    let changed = job("stuck", "-- fixed\nSELECT count(*) AS devices FROM devices");
    submit_job(&broker.bootstrap_servers(), &prefix, "stuck", Some(&changed)).await.unwrap();
    assert!(windows_succeeded(&lake, "stuck", &[yesterday], Duration::from_secs(60)).await);
    let batches = read_job_result(&lake_dir, "stuck", yesterday);
    let counts = batches[0].column(0).as_any().downcast_ref::<Int64Array>().unwrap();
    assert_eq!((counts.len(), counts.value(0)), (1, 2));
    assert!(!marker.exists(), "the marker of a definition that validated is removed");
    assert!(executor.try_wait().unwrap().is_none(), "the executor stayed up");
    executor.kill().await.unwrap();
}
