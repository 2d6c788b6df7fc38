//! Crash tests: `sluice-compactor` processes are killed with SIGKILL at random moments while two
//! of them share the partitions, made to abort inside a flush at fault points, and restarted. At
//! the end every record produced is in exactly one file of the Delta table's latest version, as
//! Sluice's engine, a replay of the log and outside Delta readers all see it; once on local disk
//! and once on an S3-compatible server.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;

use rand::Rng;
use sluice_integration_tests::{
    Broker, S3Server, assert_exactly_once, compactor_config, produce_readings, read_lake_rows,
    read_live_rows, telemetry_readings, unique_suffix, wait_for_lake_rows, workspace_binary,
};
use sluice_lake::Lake;
use tokio::process::{Child, Command};

const HOUR: i64 = 3_600_000_000;
const NUM_RECORDS: usize = 200_000;
const NUM_KILLS: usize = 6;
const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;

fn spawn_compactor(
    config_path: &std::path::Path,
    instance: usize,
    log_dir: &std::path::Path,
    abort_at_opt: Option<&str>,
) -> (Child, PathBuf) {
    let log_path = log_dir.join(format!("compactor-{instance}-{}.log", unique_suffix()));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut command = Command::new(workspace_binary("sluice-compactor"));
    command
        .arg("--config")
        .arg(config_path)
        .env("SLUICE_COMPACTOR__INSTANCE_ID", format!("crash-test-{instance}"))
        // Logs go to stdout, aborts and panics to stderr: one file, in the order written.
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true);
    if let Some(abort_at) = abort_at_opt {
        command.env("SLUICE_COMPACTOR_ABORT_AT", abort_at);
    }
    (command.spawn().unwrap(), log_path)
}

/// SIGKILLs an instance that must still be running: one that exited by itself failed, and the
/// test says so instead of restarting it quietly.
async fn kill_running((instance, log_path): &mut (Child, PathBuf)) {
    if let Some(status) = instance.try_wait().unwrap() {
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        panic!("a compactor exited by itself before its kill: {status:?}\n{log}");
    }
    instance.kill().await.unwrap();
    let status = instance.wait().await.unwrap();
    assert_eq!(status.signal(), Some(SIGKILL), "{status:?}");
}

/// A random kill mostly lands between flushes. These crashes land inside one for certain: an
/// instance started with a fault point armed aborts at its first flush once its files are
/// uploaded but not committed, and then once its commit landed but before it moved on. Both
/// instances are stopped first, so that the armed one, alone in the group, owns every partition
/// and flushes its fault part of the readings, produced after it started. On local disk
/// (`lake_dir_opt`), the aborted upload must have left new files that no version adds.
async fn abort_inside_flushes(
    instances: &mut [(Child, PathBuf); 2],
    config_path: &std::path::Path,
    log_dir: &std::path::Path,
    broker: &Broker,
    topic: &str,
    fault_parts: &[serde_json::Value],
    lake_dir_opt: Option<&std::path::Path>,
) {
    assert!(fault_parts.len() >= 2, "one part of the readings per fault point");
    for (fault_part, point) in
        fault_parts.chunks(fault_parts.len().div_ceil(2)).zip(["after-upload", "after-commit"])
    {
        for instance in instances.iter_mut() {
            kill_running(instance).await;
        }
        let uncommitted_before = match lake_dir_opt {
            Some(lake_dir) => uncommitted_files(lake_dir).await,
            None => BTreeSet::new(),
        };
        let (mut armed, log_path) = spawn_compactor(config_path, 0, log_dir, Some(&format!("{point}:1")));
        produce_readings(&broker.bootstrap_servers(), topic, fault_part).await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(90), armed.wait())
            .await
            .unwrap_or_else(|_| panic!("the instance armed at {point} flushed nothing within 90 s"))
            .unwrap();
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert_eq!(status.signal(), Some(SIGABRT), "{point}: {status:?}\n{log}");
        assert!(log.contains(&format!("fault point {point} reached")), "{point}: {log}");
        if let Some(lake_dir) = lake_dir_opt
            && point == "after-upload"
        {
            let uncommitted_after = uncommitted_files(lake_dir).await;
            assert!(
                uncommitted_after.difference(&uncommitted_before).next().is_some(),
                "the aborted upload left files outside every version: before {uncommitted_before:?}, after {uncommitted_after:?}"
            );
        }
        for (index, instance) in instances.iter_mut().enumerate() {
            *instance = spawn_compactor(config_path, index, log_dir, None);
        }
    }
}

/// Instance 1 alone consumes `solo_part`: instance 0 is killed first, so every one of these
/// readings is committed by instance 1 (a killed process commits nothing more). Without this, which
/// instance commits what depends on who joins the group first, and "both processes committed"
/// would depend on timing. Instance 0 is started again once everything produced so far is
/// committed.
#[allow(clippy::too_many_arguments, reason = "the test's processes, broker and lake, each used")]
async fn let_instance_one_commit_alone(
    instances: &mut [(Child, PathBuf); 2],
    config_path: &std::path::Path,
    log_dir: &std::path::Path,
    broker: &Broker,
    topic: &str,
    lake: &Lake,
    solo_part: &[serde_json::Value],
    produced_before: usize,
) {
    kill_running(&mut instances[0]).await;
    produce_readings(&broker.bootstrap_servers(), topic, solo_part).await.unwrap();
    let expected = (produced_before + solo_part.len()) as u64;
    let committed = sluice_integration_tests::wait_until(Duration::from_secs(120), || async move {
        let committed: u64 = lake
            .commits("telemetry")
            .await
            .map(|commits| commits.iter().map(|commit| commit.num_rows()).sum())
            .unwrap_or(0);
        committed >= expected
    })
    .await;
    let log = std::fs::read_to_string(&instances[1].1).unwrap_or_default();
    assert!(
        committed,
        "instance 1, alone, committed the {expected} readings produced so far within 120 s\n{log}"
    );
    instances[0] = spawn_compactor(config_path, 0, log_dir, None);
}

/// Parquet files under the local table that no version of its log adds.
async fn uncommitted_files(lake_dir: &std::path::Path) -> BTreeSet<String> {
    let lake = sluice_integration_tests::open_local_lake(lake_dir);
    let added: BTreeSet<String> = match lake.history("telemetry").await {
        Ok(history) => history.into_iter().flat_map(|commit| commit.added).collect(),
        Err(_) => BTreeSet::new(),
    };
    sluice_integration_tests::parquet_files_under(&lake_dir.join("telemetry"))
        .into_iter()
        .filter(|path| !added.contains(path))
        .collect()
}

/// SIGTERM to both: each commits what it buffered and exits 0. An instance started a moment ago
/// may not have its signal handlers yet, and would die of the signal's default action: each is
/// first seen consuming (its handlers are installed before it starts to).
async fn stop_gracefully(instances: &mut [(Child, PathBuf); 2]) {
    for (_, log_path) in instances.iter() {
        let consuming = sluice_integration_tests::wait_until(Duration::from_secs(60), || async {
            std::fs::read_to_string(log_path).is_ok_and(|log| log.contains("compactor consuming"))
        })
        .await;
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        assert!(consuming, "the instance consumes within 60 s of its start\n{log}");
    }
    for (instance, _) in instances.iter() {
        let pid = instance.id().expect("the instance is running").to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }
    for (instance, log_path) in instances.iter_mut() {
        let status = tokio::time::timeout(Duration::from_secs(30), instance.wait())
            .await
            .expect("a compactor stops within 30 s of SIGTERM")
            .unwrap();
        let log = std::fs::read_to_string(log_path).unwrap_or_default();
        assert!(status.success(), "a graceful stop exits 0: {status:?}\n{log}");
    }
}

/// Both processes committed (instance 1 alone took one part of the readings, instance 0 the fault
/// parts), every partition of the topic committed, and each partition's
/// flushes form one chain across processes: every commit started from the position the one
/// before it left, and the table's position is the chain's end.
async fn assert_positions_chain(lake: &Lake, num_partitions: i32) {
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
    assert_eq!(partitions.len(), num_partitions as usize, "every partition of the topic committed");
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
    // The same chain in the `txn` actions, which are what a restart seeks to: each log version
    // that commits a flush of a partition moves its `txn` to that flush's end, and never back.
    let history = lake.history("telemetry").await.unwrap();
    for partition in &partitions {
        let app_id = sluice_lake::position_app_id("telemetry", *partition);
        let mut txn_versions = Vec::new();
        for commit in &history {
            let flush_end_opt = commit
                .flushes
                .iter()
                .find(|record| record.kafka_partition == *partition)
                .map(|record| record.end_offset);
            assert_eq!(
                commit.transactions.get(&app_id).copied(),
                flush_end_opt,
                "log version {}: the txn of partition {partition} is its flush's end",
                commit.version
            );
            txn_versions.extend(flush_end_opt);
        }
        assert!(
            txn_versions.windows(2).all(|pair| pair[0] < pair[1]),
            "partition {partition}: {txn_versions:?}"
        );
        let chain_ends: Vec<i64> = commits
            .iter()
            .filter(|record| record.kafka_partition == *partition)
            .map(|record| record.end_offset)
            .collect();
        assert_eq!(txn_versions, chain_ends, "partition {partition}");
    }
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
    // Many devices, six hours of event time, some readings late and out of order. Four parts:
    // one before the instances start, one while they are killed at random, and one for each
    // fault point.
    let readings = telemetry_readings(NUM_RECORDS, 500, 6 * HOUR);
    let (random_part, rest) = readings.split_at(NUM_RECORDS * 7 / 10);
    let (solo_part, fault_parts) = rest.split_at(NUM_RECORDS / 10);
    let (before_start, during_kills) = random_part.split_at(random_part.len() / 2);
    produce_readings(&broker.bootstrap_servers(), &topic, before_start).await.unwrap();

    let mut instances = [
        spawn_compactor(&config_path, 0, work_dir.path(), None),
        spawn_compactor(&config_path, 1, work_dir.path(), None),
    ];
    let mut rng = rand::rng();
    for kill in 0..NUM_KILLS {
        if kill == NUM_KILLS / 2 {
            // The second part arrives while instances come and go.
            produce_readings(&broker.bootstrap_servers(), &topic, during_kills).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..4_000))).await;
        let victim = rng.random_range(0..instances.len());
        kill_running(&mut instances[victim]).await;
        instances[victim] = spawn_compactor(&config_path, victim, work_dir.path(), None);
    }
    let lake = sluice_integration_tests::open_local_lake(&lake_dir);
    let_instance_one_commit_alone(
        &mut instances,
        &config_path,
        work_dir.path(),
        &broker,
        &topic,
        &lake,
        solo_part,
        random_part.len(),
    )
    .await;

    abort_inside_flushes(
        &mut instances,
        &config_path,
        work_dir.path(),
        &broker,
        &topic,
        fault_parts,
        Some(&lake_dir),
    )
    .await;

    let rows = wait_for_lake_rows(&lake_dir, "telemetry", NUM_RECORDS, Duration::from_secs(180)).await;
    assert!(rows.len() >= NUM_RECORDS, "only {} of {NUM_RECORDS} rows arrived", rows.len());
    stop_gracefully(&mut instances).await;
    assert_exactly_once(&read_lake_rows(&lake_dir, "telemetry").unwrap(), &readings);

    assert_positions_chain(&lake, config.kafka.topics.partitions).await;

    // Every live file is on disk, and the log's paths name files as the disk does (which the
    // uncommitted-file check during the aborts relies on).
    let added: BTreeSet<String> =
        lake.history("telemetry").await.unwrap().into_iter().flat_map(|commit| commit.added).collect();
    let on_disk = sluice_integration_tests::parquet_files_under(&lake_dir.join("telemetry"));
    let live = sluice_integration_tests::delta_live_files(&lake_dir.join("telemetry")).unwrap();
    assert!(!live.is_empty() && live.iter().all(|path| on_disk.contains(path) && added.contains(path)));

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

/// The same crashes against the S3-compatible test server: uploads and Delta commits (conditional
/// puts) go over HTTP and can die half done, and the outside reader reads the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_aborts_on_s3_lose_and_duplicate_nothing() {
    const NUM_S3_RECORDS: usize = 40_000;
    let broker = Broker::start().await.unwrap();
    let s3 = S3Server::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let work_dir = tempfile::TempDir::new().unwrap();
    let mut config = compactor_config(&broker, &prefix, work_dir.path());
    config.object_store = s3.store_config("lake");
    config.flush.max_age_ms = 150;
    let config_path = work_dir.path().join("compactor.toml");
    std::fs::write(&config_path, sluice_config::to_masked_toml(&config).unwrap()).unwrap();
    sluice_kafka::ensure_topics(
        &config.kafka,
        &[config.kafka.stream_topic_spec("telemetry")],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let readings = telemetry_readings(NUM_S3_RECORDS, 200, 3 * HOUR);
    let (random_part, rest) = readings.split_at(NUM_S3_RECORDS * 5 / 8);
    let (solo_part, fault_parts) = rest.split_at(NUM_S3_RECORDS / 8);
    produce_readings(&broker.bootstrap_servers(), &topic, random_part).await.unwrap();

    let mut instances = [
        spawn_compactor(&config_path, 0, work_dir.path(), None),
        spawn_compactor(&config_path, 1, work_dir.path(), None),
    ];
    let mut rng = rand::rng();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..3_000))).await;
        let victim = rng.random_range(0..instances.len());
        kill_running(&mut instances[victim]).await;
        instances[victim] = spawn_compactor(&config_path, victim, work_dir.path(), None);
    }
    let lake = sluice_lake::open_lake(&config.object_store).unwrap();
    let_instance_one_commit_alone(
        &mut instances,
        &config_path,
        work_dir.path(),
        &broker,
        &topic,
        &lake,
        solo_part,
        random_part.len(),
    )
    .await;
    abort_inside_flushes(&mut instances, &config_path, work_dir.path(), &broker, &topic, fault_parts, None)
        .await;

    let arrived = sluice_integration_tests::wait_until(Duration::from_secs(180), || {
        let lake = lake.clone();
        async move {
            let committed: u64 = lake
                .commits("telemetry")
                .await
                .map(|commits| commits.iter().map(|commit| commit.num_rows()).sum())
                .unwrap_or(0);
            committed >= NUM_S3_RECORDS as u64
        }
    })
    .await;
    assert!(arrived, "every reading committed within 180 s");
    stop_gracefully(&mut instances).await;
    assert_exactly_once(&read_live_rows(&lake, "telemetry").await.unwrap(), &readings);
    assert_positions_chain(&lake, config.kafka.topics.partitions).await;

    let table = format!("s3://{}/lake/telemetry", s3.bucket);
    let rows = sluice_integration_tests::outside_reader_rows(
        "deltalake",
        &table,
        &["device_id", "seq"],
        None,
        &s3.python_storage_options(),
    )
    .unwrap();
    let keys: std::collections::BTreeSet<String> =
        rows.iter().map(|row| format!("{}/{}", row["device_id"], row["seq"])).collect();
    assert_eq!(
        (rows.len(), keys.len()),
        (NUM_S3_RECORDS, NUM_S3_RECORDS),
        "deltalake reads each reading once"
    );
}
