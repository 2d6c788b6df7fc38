//! How long a reader takes to load a stream table's latest version as the table ages: the
//! executor does it once per window run, the compactor once per commit. With checkpoints (every
//! `table.checkpoint_interval` commits, 10 as shipped) a load reads one checkpoint and at most
//! that many JSON commits, so it should stay flat from 100 to 10,000 commits.
//!
//! `cargo bench -p sluice-integration-tests --bench delta_snapshot -- [--commits 100,1000,10000]
//! [--loads 20]`. Each table is built in the same run on the local disk, one flush-like commit
//! (one file added, the partition's txn moved) at a time, through the same code the compactor
//! uses. The baseline is the same table without its checkpoints: a copy of the same JSON commits
//! with the checkpoint files left out, so a reader replays the whole log, as it would if the
//! compactor never wrote one. Each size's ratio is the two medians of that run; the last column
//! compares each load with the first size's, since a checkpoint still grows with the live files.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark code")]

use std::time::{Duration, Instant};

use arrow_schema::{DataType, Field, Schema, TimeUnit};
use sluice_integration_tests::bench_text_arg;
use sluice_lake::{CommitRecord, CommittedFile, Lake, NewFile, TableSettings};

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
            edge_positions_at_opt: None,
            num_edge_repeats_dropped: 0,
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

/// A copy of the table at `from` without its checkpoints (`_last_checkpoint` and
/// `*.checkpoint.parquet`): the same JSON commits and data file names.
fn copy_without_checkpoints(from: &std::path::Path, to: &std::path::Path) {
    let log = from.join("_delta_log");
    std::fs::create_dir_all(to.join("_delta_log")).unwrap();
    for entry in std::fs::read_dir(&log).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json") {
            std::fs::copy(entry.path(), to.join("_delta_log").join(&name)).unwrap();
        }
    }
}

/// What one load costs: the latest version with its files (what a window run does), and one
/// partition's position (what a flush does before it commits).
async fn load_once(lake: &Lake) -> (Duration, Duration, usize) {
    let started = Instant::now();
    let (_, files) = lake.table_files("telemetry").await.unwrap().unwrap();
    let load = started.elapsed();
    let started = Instant::now();
    lake.latest_commit("telemetry", 0).await.unwrap().unwrap();
    (load, started.elapsed(), files.len())
}

/// Medians of `loads` loads of each table, alternating which goes first, so that a noisy moment
/// on the machine falls on both: ((load, position, files) of `lake`, the same of `baseline`).
async fn measure(
    lake: &Lake,
    baseline: &Lake,
    loads: usize,
) -> ((Duration, Duration, usize), (Duration, Duration, usize)) {
    let mut times: [(Vec<Duration>, Vec<Duration>, usize); 2] = Default::default();
    for round in 0..loads {
        for side in [round % 2, 1 - round % 2] {
            let (load, position, num_files) = load_once(if side == 0 { lake } else { baseline }).await;
            times[side].0.push(load);
            times[side].1.push(position);
            times[side].2 = num_files;
        }
    }
    let [ours, theirs] = times;
    ((median(ours.0), median(ours.1), ours.2), (median(theirs.0), median(theirs.1), theirs.2))
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sizes: Vec<usize> = bench_text_arg("--commits")
        .unwrap_or_else(|| "100,1000,10000".into())
        .split(',')
        .map(|size| size.parse().unwrap())
        .collect();
    let loads: usize = bench_text_arg("--loads").map_or(20, |loads| loads.parse().unwrap());
    println!(
        "commits  build (s)  files  load (ms)  position (ms)  no-checkpoint load (ms)  no-checkpoint position (ms)  load ratio  load / first"
    );
    let mut first_opt: Option<Duration> = None;
    for commits in sizes {
        let directory = tempfile::TempDir::new().unwrap();
        let open = |path: &std::path::Path| {
            let config =
                sluice_lake::ObjectStoreConfig { url: path.display().to_string(), ..Default::default() };
            sluice_lake::open_lake(&config).unwrap()
        };
        let lake = open(&directory.path().join("with"));
        let started = Instant::now();
        build(&lake, commits).await;
        let build_time = started.elapsed();
        copy_without_checkpoints(
            &directory.path().join("with/telemetry"),
            &directory.path().join("without/telemetry"),
        );
        let baseline = open(&directory.path().join("without"));
        let ((load, position, num_files), (baseline_load, baseline_position, baseline_files)) =
            measure(&lake, &baseline, loads).await;
        assert_eq!(num_files, baseline_files, "both tables hold the same files");
        let first = *first_opt.get_or_insert(load);
        println!(
            "{commits:>7}  {:>9.1}  {num_files:>5}  {:>9.2}  {:>13.2}  {:>23.2}  {:>27.2}  {:>10.2}  {:>12.2}",
            build_time.as_secs_f64(),
            load.as_secs_f64() * 1e3,
            position.as_secs_f64() * 1e3,
            baseline_load.as_secs_f64() * 1e3,
            baseline_position.as_secs_f64() * 1e3,
            baseline_load.as_secs_f64() / load.as_secs_f64(),
            load.as_secs_f64() / first.as_secs_f64()
        );
    }
}
