//! Crash test: `sluice-compactor` processes are killed with SIGKILL at random moments while two
//! of them share the partitions, and restarted. At the end every record produced is in exactly
//! one committed Parquet file.

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
    // Flush often so that kills land during uploads, commits and publishes.
    config.flush.max_age_ms = 150;
    let config_path = work_dir.path().join("compactor.toml");
    std::fs::write(&config_path, sluice_config::to_masked_toml(&config).unwrap()).unwrap();

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
        let _ = tokio::time::timeout(Duration::from_secs(30), instance.wait()).await;
    }
    assert_exactly_once(&read_lake_rows(&lake_dir, "telemetry").unwrap(), &readings);

    // An independent engine over the Hive layout agrees: DataFusion, partition columns dt/hour.
    let context = datafusion::prelude::SessionContext::new();
    let options = datafusion::prelude::ParquetReadOptions::default().table_partition_cols(vec![
        ("dt".to_string(), datafusion::arrow::datatypes::DataType::Utf8),
        ("hour".to_string(), datafusion::arrow::datatypes::DataType::Utf8),
    ]);
    let table_path = format!("{}/", lake_dir.join("telemetry").display());
    context.register_parquet("telemetry", &table_path, options).await.unwrap();
    let counts = context
        .sql("SELECT count(*) AS num_rows, count(DISTINCT concat(device_id, '/', CAST(seq AS VARCHAR))) AS num_keys, count(DISTINCT dt || hour) AS num_partitions FROM telemetry")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let column = |name: &str| {
        use datafusion::arrow::array::AsArray;
        counts[0]
            .column_by_name(name)
            .unwrap()
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .value(0)
    };
    assert_eq!(column("num_rows"), NUM_RECORDS as i64, "DataFusion count equals what was produced");
    assert_eq!(column("num_keys"), NUM_RECORDS as i64, "every (device_id, seq) exactly once");
    assert!(column("num_partitions") >= 6, "six hours of event time in hourly partitions");
}
