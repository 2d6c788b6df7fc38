//! The broker stalls (SIGSTOP, its state kept) while the executor publishes run events, and
//! comes back (SIGCONT). Events that timed out in flight leave the idempotent producer fenced
//! (`ProducerFenced` on every later send, without librdkafka calling it fatal): the executor
//! kept running windows and told nobody. It must publish run and status events again within
//! seconds, without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::{Duration, Instant};

use sluice_executor::events::JobStatusKind;
use sluice_executor::job::format_micros;
use sluice_integration_tests::{
    Broker, ExecutorService, executor_config, job_run_events, job_status_event_within, now_micros,
    submit_job, unique_suffix,
};

/// The pid of the Tansu process listening on `port`, found in /proc (the fixture keeps its
/// child private).
fn broker_pid(port: u16) -> i32 {
    let listener = format!("tcp://127.0.0.1:{port}");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            cmdline.split(|byte| *byte == 0).map(|arg| String::from_utf8_lossy(arg).into_owned()).collect();
        if args.iter().any(|arg| arg == "broker") && args.contains(&listener) {
            return pid;
        }
    }
    panic!("no broker process listens on {listener}");
}

fn signal(pid: i32, name: &str) {
    let status =
        std::process::Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_again_after_the_broker_stalls_and_comes_back() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let mut config = executor_config(&broker, &prefix, lake_dir.path());
    // Events time out during the stall, as with any delivery timeout shorter than a broker
    // outage: the idempotent producer then has to bump its epoch, which is what fails for good.
    config.kafka.client.0.insert("message.timeout.ms".into(), "5000".into());
    let executor = ExecutorService::start(config);
    // One-second windows over no stream: a run, and a run event, every second.
    let ticker = format!(
        "-- name: ticker\n-- window: 1s\n-- start: {}\nSELECT 1 AS one\n",
        format_micros(now_micros().div_euclid(1_000_000) * 1_000_000)
    );
    submit_job(&broker.bootstrap_servers(), &prefix, "ticker", Some(&ticker)).await.unwrap();
    assert!(!job_run_events(&broker, &prefix, 3).await.is_empty());

    let pid = broker_pid(broker.port);
    signal(pid, "STOP");
    tokio::time::sleep(Duration::from_secs(20)).await;
    signal(pid, "CONT");
    let resumed_at = now_micros();

    // Run events of windows that ran after the broker came back arrive.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut fresh = 0;
    while Instant::now() < deadline && fresh < 3 {
        fresh = job_run_events(&broker, &prefix, 1)
            .await
            .iter()
            .filter(|event| event.job == "ticker" && event.started_at_micros > resumed_at + 5_000_000)
            .count();
    }
    assert!(fresh >= 3, "run events resumed after the stall");

    // And a new definition gets its verdict.
    submit_job(&broker.bootstrap_servers(), &prefix, "after_stall", Some("-- window: 1h\nSELECT 1 AS one"))
        .await
        .unwrap();
    assert!(
        job_status_event_within(
            &broker,
            &prefix,
            "after_stall",
            JobStatusKind::Accepted,
            Duration::from_secs(60)
        )
        .await
        .is_some(),
        "a definition submitted after the stall was answered"
    );
    executor.stop().await.unwrap();
}
