//! Crash test: `sluice-compactor` processes are killed with SIGKILL at random moments while two
//! of them share the partitions, and restarted. At the end every record produced is in exactly
//! one file of the Delta table's latest version, as Sluice's engine, a replay of the log and
//! outside Delta readers all see it.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::process::Stdio;
use std::time::Duration;

use rand::Rng;
use sluice_integration_tests::{
    Broker, assert_exactly_once, compactor_config, produce_readings, read_lake_rows, telemetry_readings,
    unique_suffix, wait_for_lake_rows, workspace_binary,
};
use tokio::process::{Child, Command};

const HOUR: i64 = 3_600_000_000;
const NUM_RECORDS: usize = 200_000;
const NUM_KILLS: usize = 6;

fn spawn_compactor(config_path: &std::path::Path, instance: usize, log_dir: &std::path::Path) -> Child {
    let log =
        std::fs::File::create(log_dir.join(format!("compactor-{instance}-{}.log", unique_suffix()))).unwrap();
    Command::new(workspace_binary("sluice-compactor"))
        .arg("--config")
        .arg(config_path)
        .env("SLUICE_COMPACTOR__INSTANCE_ID", format!("crash-test-{instance}"))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_at_random_moments_loses_and_duplicates_nothing() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let work_dir = tempfile::TempDir::new().unwrap();
    let lake_dir = work_dir.path().join("lake");
    let mut config = compactor_config(&broker, &prefix, &lake_dir);
    // Flush often so that kills land during uploads and commits.
    config.flush.max_age_ms = 150;
    let config_path = work_dir.path().join("compactor.toml");
    std::fs::write(&config_path, sluice_config::to_masked_toml(&config).unwrap()).unwrap();

    // The topic has a known number of partitions, which both processes share.
    sluice_kafka::ensure_topics(
        &config.kafka,
        &[config.kafka.stream_topic_spec("telemetry")],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    // Many devices, six hours of event time, some readings late and out of order.
    let readings = telemetry_readings(NUM_RECORDS, 500, 6 * HOUR);
    produce_readings(&broker.bootstrap_servers(), &topic, &readings[..NUM_RECORDS / 2]).await.unwrap();

    let mut instances = [
        spawn_compactor(&config_path, 0, work_dir.path()),
        spawn_compactor(&config_path, 1, work_dir.path()),
    ];
    let mut rng = rand::rng();
    for kill in 0..NUM_KILLS {
        if kill == NUM_KILLS / 2 {
            // The second half arrives while instances come and go.
            produce_readings(&broker.bootstrap_servers(), &topic, &readings[NUM_RECORDS / 2..])
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..4_000))).await;
        let victim = rng.random_range(0..instances.len());
        instances[victim].kill().await.unwrap();
        instances[victim] = spawn_compactor(&config_path, victim, work_dir.path());
    }

    let rows = wait_for_lake_rows(&lake_dir, "telemetry", NUM_RECORDS, Duration::from_secs(180)).await;
    assert!(rows.len() >= NUM_RECORDS, "only {} of {NUM_RECORDS} rows arrived", rows.len());
    // Graceful stop of both, then check what is committed.
    for instance in &mut instances {
        let pid = instance.id().unwrap().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }
    for instance in &mut instances {
        let status = tokio::time::timeout(Duration::from_secs(30), instance.wait())
            .await
            .expect("a compactor stops within 30 s of SIGTERM")
            .unwrap();
        assert!(status.success(), "a graceful stop exits 0: {status:?}");
    }
    assert_exactly_once(&read_lake_rows(&lake_dir, "telemetry").unwrap(), &readings);

    // Both processes committed, and each partition's flushes form one chain across them: every
    // commit started from the position the one before it left, whichever process made it.
    let lake = sluice_integration_tests::open_local_lake(&lake_dir);
    let commits = lake.commits("telemetry").await.unwrap();
    for instance in 0..2 {
        let writer = format!("crash-test-{instance}");
        assert!(
            commits.iter().any(|record| record.writer_id == writer && record.num_rows() > 0),
            "{writer} committed"
        );
    }
    let partitions: std::collections::BTreeSet<i32> =
        commits.iter().map(|record| record.kafka_partition).collect();
    assert_eq!(
        partitions.len(),
        config.kafka.topics.partitions as usize,
        "every partition of the topic committed"
    );
    for partition in &partitions {
        let chain: Vec<_> = commits.iter().filter(|record| record.kafka_partition == *partition).collect();
        assert_eq!(chain[0].previous_end_offset_opt, None);
        for pair in chain.windows(2) {
            assert_eq!(pair[1].previous_end_offset_opt, Some(pair[0].end_offset), "partition {partition}");
            assert_eq!(pair[1].start_offset, pair[0].end_offset, "partition {partition}");
        }
        let position = lake.latest_commit("telemetry", *partition).await.unwrap().unwrap();
        assert_eq!(position.end_offset, chain.last().unwrap().end_offset);
    }

    // Sluice's own engine (DataFusion over the table's latest version) and the outside Delta
    // readers agree.
    let output = std::process::Command::new(workspace_binary("sluice"))
        .current_dir(sluice_integration_tests::repo_root())
        .arg("--lake")
        .arg(&lake_dir)
        .args([
            "query",
            "--format",
            "csv",
            "SELECT count(*) AS num_rows, count(DISTINCT concat(device_id, '/', CAST(seq AS VARCHAR))) AS num_keys, count(DISTINCT dt || hour) AS num_partitions FROM telemetry",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let values: Vec<i64> =
        stdout.lines().nth(1).unwrap().split(',').map(|value| value.parse().unwrap()).collect();
    assert_eq!(values[0], NUM_RECORDS as i64, "DataFusion count equals what was produced");
    assert_eq!(values[1], NUM_RECORDS as i64, "every (device_id, seq) exactly once");
    assert!(values[2] >= 6, "six hours of event time in hourly partitions");
    sluice_integration_tests::assert_outside_readers_see(&lake_dir.join("telemetry"), &readings);
}
