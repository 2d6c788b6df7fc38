//! How long a reader takes to load a stream table's latest version as the table ages: the
//! executor does it once per window run, the compactor once per commit. With checkpoints (every
//! `table.checkpoint_interval` commits, 10 as shipped) a load reads one checkpoint and at most
//! that many JSON commits, so it should stay flat from 100 to 10,000 commits.
//!
//! `cargo bench -p sluice-integration-tests --bench delta_snapshot -- [--commits 100,1000,10000]
//! [--loads 20]`. Each table is built in the same run on the local disk, one flush-like commit
//! (one file added, the partition's txn moved) at a time, through the same code the compactor
//! uses; the ratio column is each median against the 100-commit table's, measured in this run.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark code")]

use std::time::{Duration, Instant};

use arrow_schema::{DataType, Field, Schema, TimeUnit};
use sluice_lake::{CommitRecord, CommittedFile, Lake, NewFile, TableSettings};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|arg| arg == name).and_then(|index| args.get(index + 1)).cloned()
}

async fn build(lake: &Lake, commits: usize) {
    let columns = Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
        Field::new("seq", DataType::Int64, false),
        Field::new("temperature", DataType::Float64, true),
    ]);
    lake.ensure_table("telemetry", &columns, &["dt", "hour"], TableSettings::default()).await.unwrap();
    let hour = 3_600_000_000_i64;
    for commit in 0..commits {
        // Four Kafka partitions take turns, as a compactor's flushes would.
        let partition = (commit % 4) as i32;
        let round = (commit / 4) as i64;
        let start = round * 1_000;
        let event_time = 1_795_680_000_000_000 + round * 1_000_000;
        let partition_key =
            sluice_lake::PartitionKey::for_event_time(event_time, sluice_lake::PartitionGranularity::Hour);
        let file = CommittedFile {
            path: format!("telemetry/{partition_key}/p{partition:03}-o{start:020}.parquet"),
            partition: partition_key.to_string(),
            num_rows: 1_000,
            size_bytes: 65_536,
            min_event_time_micros: event_time,
            max_event_time_micros: event_time + hour / 60,
        };
        let record = CommitRecord {
            stream: "telemetry".into(),
            topic: "bench.telemetry".into(),
            kafka_partition: partition,
            previous_end_offset_opt: (round > 0).then_some(start),
            start_offset: start,
            end_offset: start + 1_000,
            files: vec![file.clone()],
            num_dead_lettered: 0,
            num_duplicates_dropped: 0,
            max_event_time_micros_opt: Some(event_time + hour / 60),
            writer_id: "delta-snapshot-bench".into(),
            created_at_micros: 0,
            reset_opt: None,
            table_version_opt: None,
        };
        let stats = format!(
            "{{\"numRecords\":1000,\"minValues\":{{\"seq\":{start}}},\"maxValues\":{{\"seq\":{}}},\"nullCount\":{{\"seq\":0}}}}",
            start + 999
        );
        let outcome = lake.create_commit(&record, &[NewFile { file, stats_json: stats }]).await.unwrap();
        assert!(matches!(outcome, sluice_lake::TableCommit::Committed { .. }), "{outcome:?}");
    }
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sizes: Vec<usize> = arg("--commits")
        .unwrap_or_else(|| "100,1000,10000".into())
        .split(',')
        .map(|size| size.parse().unwrap())
        .collect();
    let loads: usize = arg("--loads").map_or(20, |loads| loads.parse().unwrap());
    println!("commits  build (s)  files  load median (ms)  position median (ms)  load / first");
    let mut first_opt: Option<Duration> = None;
    for commits in sizes {
        let directory = tempfile::TempDir::new().unwrap();
        let config = sluice_lake::ObjectStoreConfig {
            url: directory.path().display().to_string(),
            ..Default::default()
        };
        let lake = sluice_lake::open_lake(&config).unwrap();
        let started = Instant::now();
        build(&lake, commits).await;
        let build_time = started.elapsed();
        let mut load_times = Vec::with_capacity(loads);
        let mut position_times = Vec::with_capacity(loads);
        let mut num_files = 0;
        for _ in 0..loads {
            // What a window run does: the latest version and its files.
            let started = Instant::now();
            let (_, files) = lake.table_files("telemetry").await.unwrap().unwrap();
            load_times.push(started.elapsed());
            num_files = files.len();
            // What a flush does before it commits: a partition's position.
            let started = Instant::now();
            lake.latest_commit("telemetry", 0).await.unwrap().unwrap();
            position_times.push(started.elapsed());
        }
        let load = median(load_times);
        let first = *first_opt.get_or_insert(load);
        println!(
            "{commits:>7}  {:>9.1}  {num_files:>5}  {:>16.2}  {:>20.2}  {:>12.2}",
            build_time.as_secs_f64(),
            load.as_secs_f64() * 1e3,
            median(position_times).as_secs_f64() * 1e3,
            load.as_secs_f64() / first.as_secs_f64()
        );
    }
}
