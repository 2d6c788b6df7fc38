//! The executor against DuckDB on the same Delta tables, with the shipped jobs, in the same run.
//!
//! What runs: the example jobs as shipped (`examples/jobs/*.sql`) and the benchmark's own queries
//! (integration-tests/benches/queries/*.sql: a join with the reference table, a day-long window
//! sort, a join back to an aggregate, a tiny group by), all parsed with the executor's own
//! `JobDefinition::parse`, each over one window of its `-- window:` length: the window that
//! contains 2026-11-25T12:34:56Z, aligned as the executor aligns windows (12:34-12:35 for `1m`,
//! 12:00-13:00 for `1h`, the whole day for `1d`).
//!
//! The data: a week of telemetry (default 20,160,000 rows: 10,000 devices, 12 readings per hour
//! each), written once through Sluice's own commit path (`Lake::ensure_table`,
//! `Lake::create_commits`: Delta `add` actions with Sluice's statistics and event-time tags,
//! `txn` positions, a checkpoint every 10 commits) with the compactor's Parquet writer settings,
//! as two tables:
//! - `merged`: one file per hour partition, what a job sees on data older than the compactor's
//!   merge age (`merge.min_partition_age_ms`, 1 h);
//! - `unmerged`: the same week, but the query day as the compactor flushes it: each of 4 Kafka
//!   partitions flushed once a minute (`flush.max_age_ms`, 60 s), each flush one file per hour
//!   partition it touches, the flushes due together committed together (about 240 small files
//!   per hour). An hour window at :05 past the hour sees its hour like this; for the day window it
//!   is the worst case (merges behind all day: at 00:30 only the last hour or two would be).
//!
//! plus a device registry (CSV) registered as the reference table `devices`, as the commented
//! example in deploy/config/executor.toml declares it. One benchmark query joins it; for the
//! others it is there because a deployment that has one pays for it in every session (Sluice
//! infers its schema from the file when it builds the session), and DuckDB gets the same file as
//! a view.
//!
//! Sluice runs a query the way a window run does, with the executor's default configuration
//! (`sluice_executor::open_catalog` on `ExecutorConfig::default()` with the lake and the
//! registry: the memory limit, target partitions, run limits, footer and statistics caches as
//! shipped) on a `RunRuntime` with as many threads as the executor gives it: snapshot of the
//! table, window session, `plan_query` (which binds `$window_start`/`$window_end`), physical
//! plan, `yield_between_batches`, then the result collected as Arrow record batches (not
//! written). DuckDB runs the same query in one persistent Python process
//! (integration-tests/readers/duckdb_bench.py), result fetched as one Arrow table: by default
//! DuckDB 1.5.5 from deploy/local/delta-readers.sh (the newest DuckDB with a delta extension
//! that installs here: the extension must match DuckDB's version exactly, and 1.5.6 and 2.0.x
//! have none) over `delta_scan` of the same table; with `--duckdb-reader files`, over
//! `read_parquet` of exactly the files Sluice reads, which any DuckDB can run
//! (`--duckdb-pythonpath DIR` puts another DuckDB, e.g. 2.0.1, before that install).
//!
//! Fairness rules (docs/benchmarks.md):
//! - Same rows, same predicates. DuckDB's `telemetry` is a view of the window built from the
//!   executor's own `WindowRead` over the same table version's file list: the same partitions,
//!   and the row filter on `ts` exactly where the executor keeps one (never for a window on
//!   partition boundaries; `window_predicates` says how `delta_scan` is held to that). The
//!   job's own `ts >= $window_start AND ts < $window_end`, which the executor's planner drops
//!   because the window view implies them (window_bounds.rs), are dropped for DuckDB too; the
//!   placeholders left are bound as `TIMESTAMPTZ` literals, the type the executor binds.
//! - Results in the same form and the same answer: Arrow on both sides, materialised whole.
//!   Both engines must return the same number of rows and columns on every run, and the same
//!   values (rows sorted, floating-point within 1e-9; approximate percentiles are estimated
//!   differently by each engine and only reported) on the cold run and on the last warm run of
//!   each, so a wrong query cannot be fast.
//! - Same caches: DuckDB with `parquet_metadata_cache` on (its equivalent of the footer cache the
//!   executor ships with; `enable_object_cache` is a no-op in 1.5.5 and gone in 2.0), otherwise
//!   its defaults. The cold run of each query and layout is made with fresh caches on both sides
//!   (a new Catalog, a new DuckDB database) and reported apart from the warm median; the
//!   table's files are read once beforehand so that both find them in the OS page cache (cold
//!   caches, not a cold disk).
//! - Same clock: both start at query submission, before the table's log is read (Sluice at the
//!   snapshot, DuckDB when `execute` gets the SQL text: `delta_scan` reads the log while
//!   binding), and stop when the whole result is in memory as Arrow.
//! - Same machine at the same moment: runs alternate between the engines, the order swapped
//!   every round; each engine uses every core (DuckDB's `threads`, the executor's default target
//!   partitions and run threads).
//!
//! `cargo bench -p sluice-integration-tests --bench query_vs_duckdb -- [--rows N] [--devices N]
//! [--only QUERY]... [--layout merged|unmerged] [--explain] [--duckdb-reader delta_scan|files]
//! [--duckdb-pythonpath DIR]`
//!
//! Output: a table for people, and per query and layout one line
//! `RESULT query=.. kind=job|bench window=.. layout=.. sluice_cold_ms=.. duckdb_cold_ms=..
//! sluice_median_ms=.. duckdb_median_ms=.. ratio=.. cold_ratio=.. runs=.. rows=.. ...
//! check=equal|different approx_max_rel_diff=..` (`ratio` is Sluice's median over DuckDB's:
//! below 1 when Sluice is faster), and `SETUP ...` lines with both engines' settings. Results
//! that differ are listed at the end and fail the benchmark.
//!
//! The data set is written once under the temporary directory and reused by later runs with the
//! same `--rows`/`--devices`; writing it takes a few minutes (estimated: about 1,800 commits of
//! tens of milliseconds each, plus encoding 23 million rows; it prints the time it took).
//! `--explain` prints each query's SQL as DuckDB ran it, Sluice's phase medians and its plan with
//! the metrics of its last run.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray as _;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{
    Array as _, ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow_schema::{DataType, SchemaRef, TimeUnit};
use datafusion::arrow::compute::cast;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::display::DisplayableExecutionPlan;
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::{Query as SqlQuery, SelectItem, SetExpr, Statement as SqlStatement};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::properties::WriterProperties;
use sluice_compactor::config::ParquetConfig;
use sluice_executor::catalog::{ReferenceFormat, ReferenceTable};
use sluice_executor::job::{WINDOW_END_PLACEHOLDER, WINDOW_START_PLACEHOLDER, format_micros};
use sluice_executor::runs::{RunRuntime, scan_stats, yield_between_batches};
use sluice_executor::tables::TablesConfig;
use sluice_executor::window_read::WindowRead;
use sluice_executor::{Catalog, ExecutorConfig, JobDefinition, Scope, open_catalog, plan_query};
use sluice_integration_tests::{bench_arg, now_micros, repo_root, unique_suffix};
use sluice_lake::{
    CommitRecord, CommittedFile, Lake, NewFile, ObjectStoreConfig, PartitionGranularity, PartitionKey,
    TableSettings,
};
use sluice_schema::{EVENT_TIME_FIELD, KEY_FIELD, SchemasConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const STREAM: &str = "telemetry";
const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
const HOURS_IN_WEEK: usize = 7 * 24;
/// 2026-11-22T00:00:00Z: a fixed week, so that the data set is the same everywhere and can be
/// reused between runs.
const WEEK_START: i64 = 1_795_305_600_000_000;
/// 2026-11-25 (UTC), the day every job's window lies in; the `unmerged` layout leaves its hours
/// as the compactor flushed them.
const QUERY_DAY: i64 = WEEK_START + 3 * DAY;
/// Each job runs over the window of its length that contains this instant.
const WINDOW_INSTANT: i64 = QUERY_DAY + 12 * HOUR + 34 * 60_000_000 + 56_000_000;
/// Partitions of the stream topic as the shipped topic settings create it
/// (`kafka.topics.partitions`); a device's readings all go to one of them, by key.
const NUM_KAFKA_PARTITIONS: usize = 4;
/// The compactor flushes a Kafka partition's buffer once its oldest record is this old
/// (`flush.max_age_ms`, 60 s as shipped): with live data, one flush a minute per partition.
const FLUSH_AGE_MICROS: i64 = 60_000_000;
/// The partitions' flushes do not fall due at the same instants: each is this much after the
/// previous partition's, so flushes straddle minutes and hours as they do in a running compactor.
const FLUSH_OFFSET_MICROS: i64 = 15_000_000;
/// The benchmark's own queries, in the job format, run beside the example jobs.
const BENCHMARK_QUERIES_DIR: &str = "integration-tests/benches/queries";
/// Where the device registry is, under each layout's lake root, as the executor's config names it.
const REGISTRY_PATH: &str = "reference/devices.csv";
/// The telemetry columns this generator fills, in the stream schema's order.
const TELEMETRY_COLUMNS: [&str; 9] =
    ["device_id", "ts", "seq", "site", "temperature", "humidity", "battery", "rssi", "status"];
/// Warm runs per query, layout and engine after the cold one: at least `MIN_RUNS`, more for short
/// jobs until `MIN_MEASURING` has passed or `MAX_RUNS` are done. The medians count.
const MIN_RUNS: usize = 5;
const MAX_RUNS: usize = 25;
const MIN_MEASURING: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Merged,
    Unmerged,
}

impl Layout {
    const ALL: [Self; 2] = [Self::Merged, Self::Unmerged];

    fn name(self) -> &'static str {
        match self {
            Self::Merged => "merged",
            Self::Unmerged => "unmerged",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start_micros: i64,
    end_micros: i64,
}

// ---------------------------------------------------------------------------------------------
// The data set

/// A cheap deterministic hash (splitmix64's finaliser), so that the data set is the same on every
/// machine.
fn mix(seed: u64) -> u64 {
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A value in [-0.5, 0.5) from a hash.
fn unit(hash: u64) -> f64 {
    (hash % 10_000) as f64 / 10_000.0 - 0.5
}

/// The smallest integer at or above `numerator / denominator`, for a positive denominator.
fn ceil_div(numerator: i64, denominator: i64) -> i64 {
    -((-numerator).div_euclid(denominator))
}

/// The simulated fleet: device `d` reads every `interval_micros`, at a phase of its own, all week.
#[derive(Debug, Clone, Copy)]
struct Fleet {
    devices: usize,
    readings_per_hour: usize,
    interval_micros: i64,
}

/// The rows of one data file, sorted by (device_id, ts) as the compactor writes every file (and
/// as the executor declares its files to be sorted).
struct FileRows {
    batch: RecordBatch,
    min_event_time_micros: i64,
    max_event_time_micros: i64,
}

impl Fleet {
    fn new(rows: usize, devices: usize) -> Self {
        // Five-digit device ids, so that their text order is their numeric order and the files,
        // written in device order, are sorted by device_id.
        assert!((1..=100_000).contains(&devices), "--devices must be 1 to 100000");
        let readings_per_hour = rows.div_ceil(HOURS_IN_WEEK * devices).max(1);
        Self { devices, readings_per_hour, interval_micros: HOUR / readings_per_hour as i64 }
    }

    fn num_rows(&self) -> usize {
        self.devices * HOURS_IN_WEEK * self.readings_per_hour
    }

    fn readings_per_device(&self) -> i64 {
        (HOURS_IN_WEEK * self.readings_per_hour) as i64
    }

    fn first_reading_micros(&self, device: usize) -> i64 {
        WEEK_START + (mix(device as u64 ^ 0xD1CE) % self.interval_micros as u64) as i64
    }

    /// Indexes of the device's readings whose event times lie in `[start, end)`.
    fn readings_in(&self, device: usize, start_micros: i64, end_micros: i64) -> Range<i64> {
        let first = self.first_reading_micros(device);
        let index_at =
            |micros: i64| ceil_div(micros - first, self.interval_micros).clamp(0, self.readings_per_device());
        index_at(start_micros)..index_at(end_micros)
    }

    /// The readings of `devices` (ascending) with event times in `[start, end)`, or none.
    ///
    /// About one reading in 10,000 is a fault with a temperature 25 degrees too high (what
    /// temperature_anomalies.sql looks for: with 12 readings per device and hour it scores a
    /// z-score of about 3.3), one in 1,009 has no temperature, and devices whose number is a
    /// multiple of 97 have no site (daily_site_percentiles.sql counts them as 'unknown').
    fn rows(
        &self,
        schema: &SchemaRef,
        devices: impl Iterator<Item = usize>,
        start_micros: i64,
        end_micros: i64,
    ) -> Option<FileRows> {
        let mut device_ids: Vec<String> = Vec::new();
        let mut times: Vec<i64> = Vec::new();
        let mut sequences: Vec<i64> = Vec::new();
        let mut sites: Vec<Option<String>> = Vec::new();
        let mut temperatures: Vec<Option<f64>> = Vec::new();
        let mut humidities: Vec<Option<f64>> = Vec::new();
        let mut batteries: Vec<Option<f64>> = Vec::new();
        let mut rssis: Vec<Option<i32>> = Vec::new();
        let mut statuses: Vec<&'static str> = Vec::new();
        for device in devices {
            let readings = self.readings_in(device, start_micros, end_micros);
            if readings.is_empty() {
                continue;
            }
            let name = format!("dev-{device:05}");
            let site = (!device.is_multiple_of(97)).then(|| format!("site-{:02}", device % 50));
            let first = self.first_reading_micros(device);
            for index in readings {
                let time = first + index * self.interval_micros;
                let hash = mix(((device as u64) << 32) | index as u64);
                let fault = hash.is_multiple_of(10_000);
                let hour_of_day = time.rem_euclid(DAY) / HOUR;
                let daily = (std::f64::consts::TAU * hour_of_day as f64 / 24.0).sin() * 6.0;
                let week_fraction = (time - WEEK_START) as f64 / (7 * DAY) as f64;
                device_ids.push(name.clone());
                times.push(time);
                sequences.push(index);
                sites.push(site.clone());
                let fault_excess = if fault { 25.0 } else { 0.0 };
                temperatures.push(
                    (!(hash >> 20).is_multiple_of(1_009))
                        .then(|| 18.0 + (device % 10) as f64 + daily + unit(mix(hash)) * 2.0 + fault_excess),
                );
                humidities.push(Some(55.0 + unit(mix(hash ^ 0x5555)) * 20.0));
                batteries.push(Some(1.0 - week_fraction * 0.3 - (device % 7) as f64 * 0.01));
                rssis.push(Some(-60 - ((hash >> 40) % 30) as i32));
                statuses.push(if fault {
                    "FAULT"
                } else if (hash >> 24).is_multiple_of(997) {
                    "WARN"
                } else {
                    "OK"
                });
            }
        }
        let min_event_time_micros = *times.iter().min()?;
        let max_event_time_micros = *times.iter().max()?;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(device_ids)),
            Arc::new(TimestampMicrosecondArray::from(times).with_timezone("UTC")),
            Arc::new(Int64Array::from(sequences)),
            Arc::new(StringArray::from(sites)),
            Arc::new(Float64Array::from(temperatures)),
            Arc::new(Float64Array::from(humidities)),
            Arc::new(Float64Array::from(batteries)),
            Arc::new(Int32Array::from(rssis)),
            Arc::new(StringArray::from(statuses)),
        ];
        let batch =
            RecordBatch::try_new(Arc::clone(schema), columns).expect("rows match the telemetry schema");
        Some(FileRows { batch, min_event_time_micros, max_event_time_micros })
    }
}

fn telemetry_schema() -> SchemaRef {
    let registry = sluice_schema::SchemaRegistry::load_directory(&repo_root().join("schemas")).unwrap();
    let schema = sluice_schema::to_arrow_schema(registry.stream(STREAM).unwrap());
    let names: Vec<&str> = schema.fields().iter().map(|field| field.name().as_str()).collect();
    assert_eq!(names, TELEMETRY_COLUMNS, "the telemetry schema changed: update the benchmark's generator");
    schema
}

fn encode(batch: &RecordBatch, properties: &WriterProperties) -> Vec<u8> {
    let mut writer = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(properties.clone())).unwrap();
    writer.write(batch).unwrap();
    writer.into_inner().unwrap()
}

/// One layout's table, written as the compactor writes: files at their final paths, then Delta
/// commits that add them and move their Kafka partition's position.
struct TableWriter {
    lake: Lake,
    /// Each Kafka partition's committed end offset and largest event time so far: a flush must
    /// start where its partition's previous one ended, or the lake refuses it as stale.
    positions: BTreeMap<i32, (i64, i64)>,
}

impl TableWriter {
    async fn create(lake_directory: &Path, schema: &SchemaRef) -> Self {
        let lake = sluice_lake::open_lake(&ObjectStoreConfig {
            url: lake_directory.display().to_string(),
            ..ObjectStoreConfig::default()
        })
        .unwrap();
        // The compactor's partition columns and table settings (checkpoint every 10 commits).
        lake.ensure_table(STREAM, schema, &["dt", "hour"], TableSettings::default()).await.unwrap();
        Self { lake, positions: BTreeMap::new() }
    }

    fn next_offset(&self, kafka_partition: i32) -> i64 {
        self.positions.get(&kafka_partition).map_or(0, |(end_offset, _)| *end_offset)
    }

    /// Writes one file of one hour partition at its final path, with its Delta statistics.
    async fn put_file(&self, file_name: &str, rows: &FileRows, bytes: Vec<u8>) -> NewFile {
        let partition_key =
            PartitionKey::for_event_time(rows.min_event_time_micros, PartitionGranularity::Hour);
        debug_assert_eq!(
            partition_key,
            PartitionKey::for_event_time(rows.max_event_time_micros, PartitionGranularity::Hour)
        );
        let partition = partition_key.to_string();
        let path = sluice_lake::layout::data_file(STREAM, &partition, file_name);
        let size_bytes = bytes.len() as u64;
        self.lake.put(&path, bytes).await.unwrap();
        NewFile {
            file: CommittedFile {
                path,
                partition,
                num_rows: rows.batch.num_rows() as u64,
                size_bytes,
                min_event_time_micros: rows.min_event_time_micros,
                max_event_time_micros: rows.max_event_time_micros,
            },
            stats_json: sluice_lake::delta_stats(std::slice::from_ref(&rows.batch)),
        }
    }

    /// The flush record of `kafka_partition` for `new_files`, starting where its last one ended.
    fn flush(&mut self, kafka_partition: i32, new_files: Vec<NewFile>) -> (CommitRecord, Vec<NewFile>) {
        let num_rows: u64 = new_files.iter().map(|new_file| new_file.file.num_rows).sum();
        let previous_opt = self.positions.get(&kafka_partition).copied();
        let start_offset = self.next_offset(kafka_partition);
        let end_offset = start_offset + num_rows as i64;
        let max_event_time_micros = new_files
            .iter()
            .map(|new_file| new_file.file.max_event_time_micros)
            .chain(previous_opt.map(|(_, max_event_time)| max_event_time))
            .max()
            .unwrap_or(WEEK_START);
        self.positions.insert(kafka_partition, (end_offset, max_event_time_micros));
        let record = CommitRecord {
            stream: STREAM.into(),
            topic: format!("bench.{STREAM}"),
            kafka_partition,
            previous_end_offset_opt: previous_opt.map(|(end_offset, _)| end_offset),
            start_offset,
            end_offset,
            files: new_files.iter().map(|new_file| new_file.file.clone()).collect(),
            num_dead_lettered: 0,
            num_duplicates_dropped: 0,
            edge_positions_at_opt: None,
            num_edge_repeats_dropped: 0,
            max_event_time_micros_opt: Some(max_event_time_micros),
            writer_id: "query-benchmark".into(),
            created_at_micros: now_micros(),
            reset_opt: None,
            table_version_opt: None,
        };
        (record, new_files)
    }

    /// Commits flushes in one Delta transaction, as the compactor commits the flushes that fall
    /// due together.
    async fn commit(&self, flushes: Vec<(CommitRecord, Vec<NewFile>)>) {
        let committed = self.lake.create_commits(STREAM, &flushes).await.unwrap();
        assert!(
            committed.version_opt.is_some() && committed.stale_partitions.is_empty(),
            "the lake refused the benchmark's commit: {committed:?}"
        );
    }
}

/// The query day as the compactor leaves it before merging: each Kafka partition's buffer
/// flushed once a minute (the partitions a quarter minute apart), each flush one file per hour
/// partition it holds rows of, and each round of flushes (one per partition) in one commit.
async fn write_flushed_day(
    table: &mut TableWriter,
    fleet: &Fleet,
    schema: &SchemaRef,
    properties: &WriterProperties,
    run_id: &str,
) {
    let day_end = QUERY_DAY + DAY;
    let flush_bounds: Vec<Vec<i64>> = (0..NUM_KAFKA_PARTITIONS)
        .map(|kafka_partition| {
            let mut bounds = vec![QUERY_DAY];
            let mut at = QUERY_DAY + kafka_partition as i64 * FLUSH_OFFSET_MICROS;
            if at == QUERY_DAY {
                at += FLUSH_AGE_MICROS;
            }
            while at < day_end {
                bounds.push(at);
                at += FLUSH_AGE_MICROS;
            }
            bounds.push(day_end);
            bounds
        })
        .collect();
    let num_rounds = flush_bounds.iter().map(|bounds| bounds.len() - 1).max().unwrap_or(0);
    for round in 0..num_rounds {
        let mut flushes = Vec::with_capacity(NUM_KAFKA_PARTITIONS);
        for (index, bounds) in flush_bounds.iter().enumerate() {
            let Some(&[flush_start, flush_end]) = bounds.get(round..round + 2) else { continue };
            let kafka_partition = index as i32;
            // Named like the compactor's files: partition, first offset, a unique part.
            let file_name =
                format!("p{index:03}-o{:020}-{run_id}.parquet", table.next_offset(kafka_partition));
            let mut new_files = Vec::new();
            let mut piece_start = flush_start;
            while piece_start < flush_end {
                let piece_end = flush_end
                    .min(PartitionKey::for_event_time(piece_start, PartitionGranularity::Hour).end_micros());
                // Kafka spreads devices over partitions by a hash of the key; every fourth device
                // splits them as evenly.
                let devices = (index..fleet.devices).step_by(NUM_KAFKA_PARTITIONS);
                if let Some(rows) = fleet.rows(schema, devices, piece_start, piece_end) {
                    let bytes = encode(&rows.batch, properties);
                    new_files.push(table.put_file(&file_name, &rows, bytes).await);
                }
                piece_start = piece_end;
            }
            if !new_files.is_empty() {
                flushes.push(table.flush(kafka_partition, new_files));
            }
        }
        if !flushes.is_empty() {
            table.commit(flushes).await;
        }
    }
}

fn write_registry(lake_directory: &Path, devices: usize) {
    let mut csv = String::from("device_id,region,model\n");
    for device in 0..devices {
        csv.push_str(&format!("dev-{device:05},region-{},model-{}\n", device % 5, device % 3));
    }
    let path = lake_directory.join(REGISTRY_PATH);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, csv).unwrap();
}

/// Writes both layouts once; later runs with the same fleet reuse them.
///
/// Hours outside the query day are the same file in both tables (encoded once), committed as one
/// flush each: a merged table's log would also hold the flushes and merges that made them, which
/// a reader of the latest version skips by its checkpoint, as both engines do here.
async fn prepare(directory: &Path, fleet: &Fleet, schema: &SchemaRef) {
    let complete = directory.join(".complete");
    if complete.exists() {
        return;
    }
    if directory.exists() {
        // Left by a run that stopped while writing.
        std::fs::remove_dir_all(directory).unwrap();
    }
    let started = Instant::now();
    let properties = sluice_compactor::writer_properties(
        &ParquetConfig::default(),
        schema.index_of(KEY_FIELD).unwrap(),
        schema.index_of(EVENT_TIME_FIELD).unwrap(),
    )
    .unwrap();
    let run_id = unique_suffix();
    let mut merged = TableWriter::create(&directory.join(Layout::Merged.name()), schema).await;
    let mut unmerged = TableWriter::create(&directory.join(Layout::Unmerged.name()), schema).await;
    for hour in 0..HOURS_IN_WEEK {
        let hour_start = WEEK_START + hour as i64 * HOUR;
        let Some(rows) = fleet.rows(schema, 0..fleet.devices, hour_start, hour_start + HOUR) else {
            continue;
        };
        let bytes = encode(&rows.batch, &properties);
        let file_name = format!("merged-{run_id}-{hour:03}.parquet");
        if !(QUERY_DAY..QUERY_DAY + DAY).contains(&hour_start) {
            let new_file = unmerged.put_file(&file_name, &rows, bytes.clone()).await;
            let flush = unmerged.flush(0, vec![new_file]);
            unmerged.commit(vec![flush]).await;
        } else if hour_start == QUERY_DAY {
            write_flushed_day(&mut unmerged, fleet, schema, &properties, &run_id).await;
        }
        let new_file = merged.put_file(&file_name, &rows, bytes).await;
        let flush = merged.flush(0, vec![new_file]);
        merged.commit(vec![flush]).await;
    }
    for layout in Layout::ALL {
        write_registry(&directory.join(layout.name()), fleet.devices);
    }
    std::fs::write(&complete, b"").unwrap();
    eprintln!("wrote {} rows in both layouts in {:.0} s", fleet.num_rows(), started.elapsed().as_secs_f64());
}

/// Reads every file under `directory` once, so that neither engine's cold run is the one that
/// brings the table into the OS page cache. Returns the bytes read.
fn read_all_files(directory: &Path) -> u64 {
    let mut num_bytes = 0;
    let mut pending = vec![directory.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                num_bytes += std::fs::read(&path).map_or(0, |contents| contents.len() as u64);
            }
        }
    }
    num_bytes
}

// ---------------------------------------------------------------------------------------------
// The queries, and what DuckDB runs for them

/// Whether a query is a shipped example job or one the benchmark adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueryKind {
    /// `examples/jobs/*.sql`, as shipped.
    ExampleJob,
    /// `integration-tests/benches/queries/*.sql`: shapes no example job has (a join with the
    /// reference table, a day-long window sort, a join back to an aggregate, a tiny group by),
    /// kept from the benchmark's earlier queries.
    BenchmarkQuery,
}

impl QueryKind {
    fn name(self) -> &'static str {
        match self {
            Self::ExampleJob => "job",
            Self::BenchmarkQuery => "bench",
        }
    }
}

/// One query of the benchmark, in the job format (its window from its `-- window:` header).
struct Query {
    kind: QueryKind,
    job: JobDefinition,
    /// Result columns computed by an approximate aggregate (`approx_percentile_cont`): each
    /// engine estimates them its own way, so they are reported, not required to agree.
    approximate_columns: BTreeSet<String>,
}

/// The `*.sql` files of a directory, parsed as the executor parses a submitted job.
fn parse_jobs(directory: &Path) -> Vec<JobDefinition> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "sql"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            JobDefinition::parse(&text, None).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        })
        .collect()
}

/// The example jobs, then the benchmark's own queries; only those `--only` names, if any.
fn load_queries(only: &[String]) -> Vec<Query> {
    let mut queries: Vec<Query> = Vec::new();
    for (kind, directory) in
        [(QueryKind::ExampleJob, "examples/jobs"), (QueryKind::BenchmarkQuery, BENCHMARK_QUERIES_DIR)]
    {
        for job in parse_jobs(&repo_root().join(directory)) {
            assert!(
                !queries.iter().any(|query| query.job.name == job.name),
                "two queries are named {}: --only could not tell them apart",
                job.name
            );
            let approximate_columns = approximate_columns(&job.sql);
            queries.push(Query { kind, job, approximate_columns });
        }
    }
    for name in only {
        assert!(
            queries.iter().any(|query| &query.job.name == name),
            "--only {name}: no such query in examples/jobs or {BENCHMARK_QUERIES_DIR} (queries: {})",
            queries.iter().map(|query| query.job.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    queries.into_iter().filter(|query| only.is_empty() || only.contains(&query.job.name)).collect()
}

/// The aliases, lowercased as both engines name result columns, of the select items that call
/// an `approx_*` function, in the final SELECT and in the CTEs before it (a CTE's estimate that
/// the final SELECT passes on keeps its name).
fn approximate_columns(sql: &str) -> BTreeSet<String> {
    let statements =
        DFParser::parse_sql(sql).unwrap_or_else(|error| panic!("the query does not parse: {error}\n{sql}"));
    let mut names = BTreeSet::new();
    if let Some(DfStatement::Statement(statement)) = statements.front()
        && let SqlStatement::Query(query) = statement.as_ref()
    {
        collect_approximate_aliases(query, &mut names);
    }
    names
}

fn collect_approximate_aliases(query: &SqlQuery, names: &mut BTreeSet<String>) {
    for cte in query.with.iter().flat_map(|with| &with.cte_tables) {
        collect_approximate_aliases(&cte.query, names);
    }
    if let SetExpr::Select(select) = query.body.as_ref() {
        for item in &select.projection {
            if let SelectItem::ExprWithAlias { expr, alias } = item
                && expr.to_string().to_ascii_lowercase().contains("approx_")
            {
                names.insert(alias.value.to_ascii_lowercase());
            }
        }
    }
}

fn window_of(job: &JobDefinition) -> Window {
    let start_micros = job.window_containing(WINDOW_INSTANT);
    Window { start_micros, end_micros: start_micros + job.window_micros }
}

/// `1d`, `1h`, `1m`, `90s`: the window's length for the table.
fn window_label(window_micros: i64) -> String {
    let seconds = window_micros / 1_000_000;
    if seconds % 86_400 == 0 {
        format!("{}d", seconds / 86_400)
    } else if seconds % 3_600 == 0 {
        format!("{}h", seconds / 3_600)
    } else if seconds % 60 == 0 {
        format!("{}m", seconds / 60)
    } else {
        format!("{seconds}s")
    }
}

fn timestamp_literal(micros: i64) -> String {
    format!("TIMESTAMPTZ '{}'", format_micros(micros))
}

/// How DuckDB reads the table (`--duckdb-reader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DuckDbReader {
    /// `delta_scan` of the table with the delta extension (the default): DuckDB reads the
    /// table's log inside its clock on every query, as Sluice loads the table's version inside
    /// its own, and picks the files itself by partition and `ts` statistics.
    DeltaScan,
    /// `read_parquet` of exactly the files Sluice reads of the same table version, listed for
    /// it when its database is opened: works with any DuckDB (2.0 has no delta extension yet),
    /// and the row filter is then Sluice's to the letter. Reading no log in its clock, DuckDB
    /// is spared work Sluice does: this reader leans against Sluice.
    Files,
}

impl DuckDbReader {
    fn parse(text: &str) -> Self {
        match text {
            "delta_scan" => Self::DeltaScan,
            "files" => Self::Files,
            other => panic!("--duckdb-reader {other}: delta_scan or files"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::DeltaScan => "delta_scan",
            Self::Files => "files",
        }
    }
}

/// What each engine reads of the stream table for one window, and whether it filters rows on
/// `ts`.
struct WindowPredicates {
    /// The predicate of DuckDB's `telemetry` view.
    duckdb_filter: String,
    /// Whether the executor's window view keeps its row filter on `ts` (catalog.rs
    /// `window_filter`: only where a file it reads also holds rows outside the window).
    sluice_filters_rows: bool,
    /// Whether DuckDB's view has the row filter on `ts`.
    duckdb_filters_rows: bool,
    /// The files Sluice reads (by the recorded event-time ranges of the version's files), as
    /// paths on this machine: what the `files` reader gives DuckDB.
    sluice_files: Vec<String>,
}

/// The predicate of DuckDB's `telemetry` view for a window: the rows of the executor's window
/// view, from the executor's own `WindowRead` over the same table version's files.
///
/// Same partitions: the filter names the partitions the executor's names. Same row filter:
/// the executor filters rows on `ts` only where a file it reads also holds rows outside the
/// window, which never happens for a window on partition boundaries (an hour or a day of an
/// hourly stream): there both get a partition filter alone. Where the executor does filter,
/// DuckDB gets the same `ts >= start AND ts < end`. With `delta_scan`, which does not know the
/// executor's recorded ranges, DuckDB gets the row filter wherever the window's partitions hold
/// rows outside it: it needs it for the same rows, and `delta_scan` skips files by their `ts`
/// statistics on it, as the executor skips them by their recorded ranges. The two rules agree
/// on every window and layout of this benchmark; where they do not, the table says so
/// (`sluice_row_filter`, `duckdb_row_filter`).
///
/// The partitions are written in the form DuckDB's `delta_scan` prunes files with. It skips files
/// on `dt = 'D'`, on `dt = 'D' AND hour = 'H'` and on ranges of `hour`, but not on ORs or IN lists
/// of (dt, hour) pairs, which read whole days (checked with 1.5.5: a two-hour OR read 288 of 576
/// files, the range 24). The executor's form for a day, 24 ORed hours, would cost DuckDB the
/// pruning, so a day is `dt = 'D'`: the same partitions, the same rows.
fn window_predicates(
    lake_directory: &Path,
    files: &[CommittedFile],
    granularity: PartitionGranularity,
    window: Window,
    reader: DuckDbReader,
) -> WindowPredicates {
    let Window { start_micros, end_micros } = window;
    let read = WindowRead::new(granularity, start_micros, end_micros);
    let day_filters: Vec<String> = read
        .partitions()
        .iter()
        .map(|(date, hours)| match (hours.first(), hours.last()) {
            (Some(first), Some(last)) if hours.len() < 24 && first == last => {
                format!("dt = '{date}' AND hour = '{first:02}'")
            }
            (Some(first), Some(last)) if hours.len() < 24 => {
                format!("dt = '{date}' AND hour >= '{first:02}' AND hour <= '{last:02}'")
            }
            _ => format!("dt = '{date}'"),
        })
        .collect();
    let first_day_opt = read.partitions().keys().next();
    let last_day_opt = read.partitions().keys().next_back();
    let partition_filter = match (day_filters.as_slice(), first_day_opt, last_day_opt) {
        ([only], _, _) => only.clone(),
        // Several days: the range on `dt` is what DuckDB prunes by; the OR keeps the hours exact.
        (_, Some(first_day), Some(last_day)) => {
            format!("dt >= '{first_day}' AND dt <= '{last_day}' AND (({}))", day_filters.join(") OR ("))
        }
        _ => "false".to_string(),
    };
    let sluice_filters_rows = read.filters_rows(files);
    let duckdb_filters_rows = match reader {
        DuckDbReader::DeltaScan => read.partitions_hold_other_rows(files),
        DuckDbReader::Files => sluice_filters_rows,
    };
    let duckdb_filter = if duckdb_filters_rows {
        format!(
            "{partition_filter} AND ts >= {} AND ts < {}",
            timestamp_literal(start_micros),
            timestamp_literal(end_micros)
        )
    } else {
        partition_filter
    };
    let sluice_files = files
        .iter()
        .filter(|file| read.reads(file))
        .map(|file| lake_directory.join(&file.path).display().to_string())
        .collect();
    WindowPredicates { duckdb_filter, sluice_filters_rows, duckdb_filters_rows, sluice_files }
}

/// Replaces every `<left> <operator> <right>` in `sql` (any spacing; `left` and `right` whole
/// words) with `TRUE`.
fn replace_comparison(sql: &str, left: &str, operator: &str, right: &str) -> String {
    let is_word_character = |character: char| character.is_alphanumeric() || character == '_';
    let mut replaced = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(found) = rest.find(left) {
        let (before, from_left) = rest.split_at(found);
        let after_left = &from_left[left.len()..];
        let starts_word =
            !before.chars().next_back().is_some_and(|c| is_word_character(c) || c == '.' || c == '$');
        let matched_end = after_left
            .trim_start()
            .strip_prefix(operator)
            // `<` is not the start of `<=` or `<>`, nor `>` of `>=`.
            .filter(|after_operator| !after_operator.starts_with(['=', '>']))
            .and_then(|after_operator| after_operator.trim_start().strip_prefix(right))
            .filter(|after_right| !after_right.starts_with(is_word_character));
        replaced.push_str(before);
        match matched_end {
            Some(after_right) if starts_word => {
                replaced.push_str("TRUE");
                rest = after_right;
            }
            _ => {
                replaced.push_str(left);
                rest = after_left;
            }
        }
    }
    replaced.push_str(rest);
    replaced
}

/// The job's SQL as DuckDB runs it over its window view.
///
/// The job's own bounds, `ts >= $window_start` and `ts < $window_end` (or `<=`, either way round),
/// are replaced by TRUE: the executor's planner drops exactly these from a filter over a stream
/// table in a window run (window_bounds.rs), since the table holds only the window's rows. Left to DuckDB
/// alone, they would make it decode `ts` and compare every row where Sluice does not (an extra
/// ~3 ms on an 11 ms hour in a trial). TRUE is what they evaluate to on every row of the window,
/// wherever they stand. The placeholders left (`$window_start AS hour`) are bound as
/// `TIMESTAMPTZ` literals: the executor binds a UTC timestamp, and `ts` is `TIMESTAMP WITH TIME
/// ZONE` in DuckDB, so no side casts. The one function DuckDB spells differently
/// (`approx_percentile_cont ... WITHIN GROUP`) is rewritten by duckdb_bench.py.
fn duckdb_sql(job_sql: &str, window: Window) -> String {
    let start = format!("${WINDOW_START_PLACEHOLDER}");
    let end = format!("${WINDOW_END_PLACEHOLDER}");
    let mut without_bounds = job_sql.to_string();
    // The comparisons with the window's own bounds that window_bounds.rs `implies`.
    for (left, operator, right) in [
        (EVENT_TIME_FIELD, ">=", start.as_str()),
        (start.as_str(), "<=", EVENT_TIME_FIELD),
        (EVENT_TIME_FIELD, "<", end.as_str()),
        (end.as_str(), ">", EVENT_TIME_FIELD),
        (EVENT_TIME_FIELD, "<=", end.as_str()),
        (end.as_str(), ">=", EVENT_TIME_FIELD),
    ] {
        without_bounds = replace_comparison(&without_bounds, left, operator, right);
    }
    let bound = without_bounds
        .replace(&start, &timestamp_literal(window.start_micros))
        .replace(&end, &timestamp_literal(window.end_micros));
    assert!(!bound.contains('$'), "the job uses a placeholder the benchmark does not bind: {bound}");
    bound
}

// ---------------------------------------------------------------------------------------------
// The engines

/// One run as measured: seconds from query submission to the whole result in memory as Arrow.
#[derive(Debug, Clone, Copy)]
struct Measured {
    seconds: f64,
    rows: usize,
    columns: usize,
}

/// DuckDB in one Python process for the whole benchmark (integration-tests/readers/duckdb_bench.py),
/// answering one request per line, so that its runs alternate with Sluice's and its caches live
/// between runs. Its clock runs inside that process, around `execute` and the Arrow fetch.
struct DuckDb {
    child: Child,
    requests_opt: Option<ChildStdin>,
    answers: BufReader<ChildStdout>,
}

impl DuckDb {
    /// DuckDB from the outside readers' install (deploy/local/delta-readers.sh), or from
    /// `python_path_opt` put before it (another DuckDB; pyarrow still comes from that install).
    fn start(python_path_opt: Option<&str>) -> Self {
        let output =
            Command::new(repo_root().join("deploy/local/delta-readers.sh")).arg("path").output().unwrap();
        assert!(output.status.success(), "delta-readers.sh: {}", String::from_utf8_lossy(&output.stderr));
        let readers_path = String::from_utf8(output.stdout).unwrap().trim().to_string();
        let python_path = match python_path_opt {
            Some(first) => format!("{first}:{readers_path}"),
            None => readers_path,
        };
        let mut child = Command::new("python3")
            .arg(repo_root().join("integration-tests/readers/duckdb_bench.py"))
            .env("PYTHONPATH", python_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 starts");
        let requests_opt = child.stdin.take();
        let answers = BufReader::new(child.stdout.take().unwrap());
        Self { child, requests_opt, answers }
    }

    fn request(&mut self, request: &serde_json::Value) -> serde_json::Value {
        let requests = self.requests_opt.as_mut().unwrap();
        writeln!(requests, "{request}").unwrap();
        requests.flush().unwrap();
        let mut answer = String::new();
        self.answers.read_line(&mut answer).unwrap();
        assert!(!answer.is_empty(), "the DuckDB process ended: {:?}", self.child.try_wait());
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        if let Some(error) = answer.get("error") {
            panic!("DuckDB failed: {error}\nrequest: {request}");
        }
        answer
    }

    /// A fresh database (every DuckDB cache empty) whose `telemetry` view is the window: over
    /// `delta_scan` of the layout's table, or over `read_parquet` of `files`.
    fn open(
        &mut self,
        lake_directory: &Path,
        reader: DuckDbReader,
        predicates: &WindowPredicates,
    ) -> serde_json::Value {
        let mut request = serde_json::json!({
            "op": "open",
            "window_filter": predicates.duckdb_filter,
            "registry": lake_directory.join(REGISTRY_PATH),
        });
        match reader {
            DuckDbReader::DeltaScan => request["table"] = serde_json::json!(lake_directory.join(STREAM)),
            DuckDbReader::Files => request["files"] = serde_json::json!(predicates.sluice_files),
        }
        self.request(&request)
    }

    /// One run; the SQL DuckDB ran comes back with it.
    fn run(&mut self, sql: &str) -> (Measured, String) {
        let answer = self.request(&serde_json::json!({ "op": "run", "sql": sql }));
        let measured = Measured {
            seconds: answer["seconds"].as_f64().unwrap(),
            rows: answer["rows"].as_u64().unwrap() as usize,
            columns: answer["columns"].as_u64().unwrap() as usize,
        };
        (measured, answer["sql"].as_str().unwrap_or_default().to_string())
    }

    /// The last run's result, written to Parquet by DuckDB's process outside its clock and read
    /// back here.
    fn last_result(&mut self, scratch_file: &Path) -> CanonicalResult {
        self.request(&serde_json::json!({ "op": "write_result", "path": scratch_file }));
        let file = std::fs::File::open(scratch_file).unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let schema = Arc::clone(builder.schema());
        let batches: Vec<RecordBatch> = builder.build().unwrap().collect::<Result<_, _>>().unwrap();
        CanonicalResult::new(&schema, &batches)
    }
}

impl Drop for DuckDb {
    /// Closing its input ends the process, which then is waited for.
    fn drop(&mut self) {
        drop(self.requests_opt.take());
        let _ = self.child.wait();
    }
}

/// The executor's configuration as shipped, on one layout's lake, with the device registry as a
/// reference table.
fn executor_config(lake_directory: &Path) -> ExecutorConfig {
    ExecutorConfig {
        object_store: ObjectStoreConfig {
            url: lake_directory.display().to_string(),
            ..ObjectStoreConfig::default()
        },
        schemas: SchemasConfig { directory: repo_root().join("schemas") },
        tables: TablesConfig {
            reference: vec![ReferenceTable {
                name: "devices".into(),
                path: REGISTRY_PATH.into(),
                format: ReferenceFormat::Csv,
            }],
        },
        ..ExecutorConfig::default()
    }
}

/// A catalog as the executor opens it (`sluice_executor::open_catalog`, the function the
/// service calls at start); a new one has empty footer and statistics caches.
fn fresh_catalog(lake_directory: &Path) -> Catalog {
    open_catalog(&executor_config(lake_directory)).expect("the executor's catalog")
}

/// What one Sluice run measured, its plan (for `--explain`) and its result.
struct SluiceRun {
    measured: Measured,
    files_read: u64,
    /// Time at the end of: snapshot, session, logical plan, physical plan, execution.
    phases: [Duration; 5],
    plan: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

/// One run of a job over a window, as a window run does it up to its result (which is collected
/// instead of written). The clock starts at submission, before the table's version is loaded.
async fn run_window(catalog: Catalog, sql: Arc<str>, window: Window) -> SluiceRun {
    let started = Instant::now();
    let snapshot = catalog.snapshot().await.expect("the table's latest version");
    let snapshot_done = started.elapsed();
    let scope = Scope::Window { start_micros: window.start_micros, end_micros: window.end_micros };
    let ctx = catalog.session(&snapshot, scope, true).await.expect("the window's session");
    let session_done = started.elapsed();
    let frame = plan_query(&ctx, &sql, Some((window.start_micros, window.end_micros)))
        .await
        .unwrap_or_else(|error| panic!("the executor refused the job: {error}"));
    let logical_done = started.elapsed();
    let task_ctx = Arc::new(frame.task_ctx());
    let physical_plan = frame.create_physical_plan().await.expect("a physical plan");
    let plan = yield_between_batches(physical_plan).expect("the plan with yield points");
    let physical_done = started.elapsed();
    let batches =
        datafusion::physical_plan::collect(Arc::clone(&plan), task_ctx).await.expect("the job's result");
    let done = started.elapsed();
    let schema = plan.schema();
    SluiceRun {
        measured: Measured {
            seconds: done.as_secs_f64(),
            rows: batches.iter().map(RecordBatch::num_rows).sum(),
            columns: schema.fields().len(),
        },
        files_read: scan_stats(&plan).files_read,
        phases: [snapshot_done, session_done, logical_done, physical_done, done],
        plan,
        schema,
        batches,
    }
}

/// Runs on the executor's run runtime, spawned onto it as the executor spawns a window run, so
/// that the plan's top stream is polled by a runtime thread too.
fn run_sluice(runtime: &RunRuntime, catalog: &Catalog, sql: &Arc<str>, window: Window) -> SluiceRun {
    let handle = runtime.handle();
    handle
        .block_on(handle.spawn(run_window(catalog.clone(), Arc::clone(sql), window)))
        .expect("the Sluice run")
}

// ---------------------------------------------------------------------------------------------
// The results, compared value by value

/// Relative difference allowed between two engines' values of a column both compute exactly:
/// sums and averages added up in another order differ in the last bits, nothing more.
const FLOAT_TOLERANCE: f64 = 1e-9;

/// One result in a form in which both engines' answers compare: each column exact (compared as
/// text: strings as they are, integers and scale-0 decimals as digits, so that DuckDB's HUGEINT
/// sums meet DataFusion's Int64, timestamps as epoch microseconds whatever their unit or zone
/// name) or floating-point (compared within a tolerance), and the rows sorted, since a job's
/// rows come in no set order unless it sorts them.
#[derive(Debug)]
struct CanonicalResult {
    /// Lowercased: DataFusion lowercases unquoted names, DuckDB keeps them as written.
    column_names: Vec<String>,
    float_columns: Vec<bool>,
    rows: Vec<CanonicalRow>,
}

#[derive(Debug, Clone)]
struct CanonicalRow {
    exact: Vec<Option<String>>,
    floats: Vec<Option<f64>>,
}

impl CanonicalResult {
    fn new(schema: &SchemaRef, batches: &[RecordBatch]) -> Self {
        let float_columns: Vec<bool> =
            schema.fields().iter().map(|field| is_floating_point(field.data_type())).collect();
        let mut rows = Vec::new();
        for batch in batches {
            let mut exact_columns: Vec<Vec<Option<String>>> = Vec::new();
            let mut float_values: Vec<Vec<Option<f64>>> = Vec::new();
            for (column, is_float) in batch.columns().iter().zip(&float_columns) {
                if *is_float {
                    float_values.push(floating_point_values(column));
                } else {
                    exact_columns.push(exact_values(column));
                }
            }
            for row in 0..batch.num_rows() {
                rows.push(CanonicalRow {
                    exact: exact_columns.iter().map(|values| values[row].clone()).collect(),
                    floats: float_values.iter().map(|values| values[row]).collect(),
                });
            }
        }
        rows.sort_by(compare_rows);
        let column_names = schema.fields().iter().map(|field| field.name().to_ascii_lowercase()).collect();
        Self { column_names, float_columns, rows }
    }

    fn float_column_names(&self) -> Vec<&str> {
        self.column_names
            .iter()
            .zip(&self.float_columns)
            .filter(|(_, is_float)| **is_float)
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

fn is_floating_point(data_type: &DataType) -> bool {
    match data_type {
        DataType::Float16 | DataType::Float32 | DataType::Float64 => true,
        DataType::Decimal128(_, scale) | DataType::Decimal256(_, scale) => *scale > 0,
        _ => false,
    }
}

fn floating_point_values(column: &ArrayRef) -> Vec<Option<f64>> {
    let as_f64 = cast(column.as_ref(), &DataType::Float64).expect("a floating-point column casts to f64");
    as_f64.as_primitive::<Float64Type>().iter().collect()
}

fn exact_values(column: &ArrayRef) -> Vec<Option<String>> {
    let normalized: ArrayRef = match column.data_type() {
        DataType::Timestamp(unit, _) => {
            let raw = cast(column.as_ref(), &DataType::Int64).expect("timestamps cast to integers");
            let micros: Int64Array = raw.as_primitive::<Int64Type>().unary(|value: i64| match unit {
                TimeUnit::Second => value.saturating_mul(1_000_000),
                TimeUnit::Millisecond => value.saturating_mul(1_000),
                TimeUnit::Microsecond => value,
                TimeUnit::Nanosecond => value.div_euclid(1_000),
            });
            Arc::new(micros)
        }
        DataType::Decimal128(_, 0) | DataType::Decimal256(_, 0) => {
            cast(column.as_ref(), &DataType::Int64).unwrap_or_else(|_| Arc::clone(column))
        }
        _ => Arc::clone(column),
    };
    let options = FormatOptions::default();
    let formatter = ArrayFormatter::try_new(normalized.as_ref(), &options).expect("a column that formats");
    (0..normalized.len())
        .map(|row| normalized.is_valid(row).then(|| formatter.value(row).to_string()))
        .collect()
}

fn compare_rows(left: &CanonicalRow, right: &CanonicalRow) -> Ordering {
    left.exact.cmp(&right.exact).then_with(|| {
        left.floats
            .iter()
            .zip(&right.floats)
            .map(|(left_opt, right_opt)| match (left_opt, right_opt) {
                (Some(left_value), Some(right_value)) => left_value.total_cmp(right_value),
                _ => left_opt.is_some().cmp(&right_opt.is_some()),
            })
            .find(|ordering| ordering.is_ne())
            .unwrap_or(Ordering::Equal)
    })
}

/// Relative to the larger magnitude, or absolute below 1; infinite where only one side is
/// finite or a NaN.
fn relative_difference(left: f64, right: f64) -> f64 {
    if left.total_cmp(&right).is_eq() || (left.is_nan() && right.is_nan()) {
        0.0
    } else if !left.is_finite() || !right.is_finite() {
        f64::INFINITY
    } else {
        (left - right).abs() / left.abs().max(right.abs()).max(1.0)
    }
}

/// How one result compares with the expected one.
#[derive(Debug, Clone, Default)]
struct Comparison {
    /// The first difference in shape, in an exact column or in a float column beyond
    /// `FLOAT_TOLERANCE`, if any.
    difference_opt: Option<String>,
    /// The largest relative difference in an approximate aggregate's column (reported only).
    approximate_max_difference: f64,
}

impl Comparison {
    /// Both comparisons of a query and layout as one: the first difference, the largest gap.
    fn merge(self, other: Self) -> Self {
        Self {
            difference_opt: self.difference_opt.or(other.difference_opt),
            approximate_max_difference: self.approximate_max_difference.max(other.approximate_max_difference),
        }
    }
}

fn compare_results(
    expected: &CanonicalResult,
    actual: &CanonicalResult,
    approximate_columns: &BTreeSet<String>,
) -> Comparison {
    let shape_difference_opt =
        if expected.column_names != actual.column_names || expected.float_columns != actual.float_columns {
            Some(format!(
                "columns {:?} (floating-point: {:?}) against {:?} ({:?})",
                expected.column_names, expected.float_columns, actual.column_names, actual.float_columns
            ))
        } else if expected.rows.len() != actual.rows.len() {
            Some(format!("{} rows against {}", expected.rows.len(), actual.rows.len()))
        } else {
            None
        };
    if let Some(difference) = shape_difference_opt {
        return Comparison { difference_opt: Some(difference), approximate_max_difference: 0.0 };
    }
    let float_names = expected.float_column_names();
    let mut difference_opt = None;
    let mut approximate_max_difference: f64 = 0.0;
    for (index, (expected_row, actual_row)) in expected.rows.iter().zip(&actual.rows).enumerate() {
        let mut differs = expected_row.exact != actual_row.exact;
        for ((expected_opt, actual_opt), name) in
            expected_row.floats.iter().zip(&actual_row.floats).zip(&float_names)
        {
            match (expected_opt, actual_opt) {
                (Some(expected_value), Some(actual_value)) => {
                    let difference = relative_difference(*expected_value, *actual_value);
                    if approximate_columns.contains(*name) {
                        approximate_max_difference = approximate_max_difference.max(difference);
                    } else if difference > FLOAT_TOLERANCE {
                        differs = true;
                    }
                }
                (None, None) => {}
                _ => differs = true,
            }
        }
        if differs && difference_opt.is_none() {
            difference_opt = Some(format!(
                "row {index} of {} in sorted order: {expected_row:?} against {actual_row:?} (columns {:?})",
                expected.rows.len(),
                expected.column_names
            ));
        }
    }
    Comparison { difference_opt, approximate_max_difference }
}

// ---------------------------------------------------------------------------------------------

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn flag_values(args: &[String], flag: &str) -> Vec<String> {
    args.windows(2).filter(|pair| pair[0] == flag).map(|pair| pair[1].clone()).collect()
}

/// Both engines' answers to one run must agree with each other and with every other run.
fn check(query: &str, layout: Layout, engine: &str, measured: &Measured, expected: &Measured) {
    assert_eq!(
        (measured.rows, measured.columns),
        (expected.rows, expected.columns),
        "{query} on {}: {engine} returned {} rows and {} columns, expected {} and {}",
        layout.name(),
        measured.rows,
        measured.columns,
        expected.rows,
        expected.columns
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let fleet = Fleet::new(bench_arg("--rows", 20_000_000), bench_arg("--devices", 10_000));
    let queries = load_queries(&flag_values(&args, "--only"));
    let layout_names = flag_values(&args, "--layout");
    let layouts: Vec<Layout> = Layout::ALL
        .into_iter()
        .filter(|layout| layout_names.is_empty() || layout_names.iter().any(|name| name == layout.name()))
        .collect();
    assert!(!layouts.is_empty(), "--layout takes merged or unmerged");
    let explain = args.iter().any(|arg| arg == "--explain");
    let reader = flag_values(&args, "--duckdb-reader")
        .last()
        .map(String::as_str)
        .map_or(DuckDbReader::DeltaScan, DuckDbReader::parse);
    let python_path_opt = flag_values(&args, "--duckdb-pythonpath").last().cloned();

    // The executor runs windows on as many threads as its target partitions (scheduler.rs).
    let shipped = ExecutorConfig::default();
    let num_threads = match shipped.query.target_partitions {
        0 => std::thread::available_parallelism().map_or(2, usize::from),
        configured => configured,
    };
    let runtime = RunRuntime::new(num_threads).expect("the run runtime");
    let schema = telemetry_schema();
    let directory = std::env::temp_dir().join(format!(
        "sluice-query-bench-delta-v1-{}-devices-{}-per-hour",
        fleet.devices, fleet.readings_per_hour
    ));
    runtime.handle().block_on(prepare(&directory, &fleet, &schema));
    let mut duckdb = DuckDb::start(python_path_opt.as_deref());
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let duckdb_result_file = scratch.path().join("duckdb-result.parquet");

    // Process warm-up, thrown away: the first query of a process pays for one-time set-up
    // (DataFusion's; DuckDB's first Arrow export imports pyarrow, its first result file
    // pyarrow.parquet) that belongs to no query.
    if let (Some(query), Some(layout)) = (queries.first(), layouts.first()) {
        let lake_directory = directory.join(layout.name());
        let window = window_of(&query.job);
        let snapshot = runtime.handle().block_on(fresh_catalog(&lake_directory).snapshot()).unwrap();
        let predicates = window_predicates(
            &lake_directory,
            snapshot.files(STREAM),
            snapshot.granularity(STREAM),
            window,
            reader,
        );
        duckdb.open(&lake_directory, reader, &predicates);
        duckdb.run(&duckdb_sql(&query.job.sql, window));
        duckdb.last_result(&duckdb_result_file);
        run_sluice(&runtime, &fresh_catalog(&lake_directory), &Arc::from(query.job.sql.as_str()), window);
    }

    println!(
        "{} rows: {} devices x {} readings per hour x {HOURS_IN_WEEK} hours; Sluice: executor defaults \
         (target_partitions {}, memory_limit_bytes {}), {num_threads} run threads; DuckDB reads with {}",
        fleet.num_rows(),
        fleet.devices,
        fleet.readings_per_hour,
        shipped.query.target_partitions,
        shipped.query.memory_limit_bytes,
        reader.name(),
    );
    println!(
        "SETUP rows={} devices={} readings_per_hour={} sluice_target_partitions={} \
         sluice_memory_limit_bytes={} sluice_run_threads={num_threads} duckdb_reader={}",
        fleet.num_rows(),
        fleet.devices,
        fleet.readings_per_hour,
        shipped.query.target_partitions,
        shipped.query.memory_limit_bytes,
        reader.name(),
    );
    let mut settings_shown = false;
    println!(
        "{:<24} {:<5} {:<6} {:<9} {:>10} {:>10} {:>10} {:>10} {:>13} {:>5} {:>6} {:>6}  check",
        "query",
        "kind",
        "window",
        "layout",
        "sluice",
        "duckdb",
        "sluice",
        "duckdb",
        "sluice/duckdb",
        "runs",
        "rows",
        "files"
    );
    println!(
        "{:<24} {:<5} {:<6} {:<9} {:>10} {:>10} {:>10} {:>10} {:>13}",
        "", "", "", "", "cold ms", "cold ms", "median ms", "median ms", "(<1: Sluice)"
    );
    let mut differences: Vec<String> = Vec::new();
    for layout in &layouts {
        let lake_directory = directory.join(layout.name());
        read_all_files(&lake_directory);
        let snapshot = runtime.handle().block_on(fresh_catalog(&lake_directory).snapshot()).unwrap();
        let files = snapshot.files(STREAM);
        let granularity = snapshot.granularity(STREAM);
        let query_day_files = files
            .iter()
            .filter(|file| (QUERY_DAY..QUERY_DAY + DAY).contains(&file.min_event_time_micros))
            .count();
        eprintln!(
            "{}: table version {}, {} files, {query_day_files} of them on 2026-11-25",
            layout.name(),
            snapshot.versions().get(STREAM).copied().unwrap_or(-1),
            files.len()
        );
        for (index, query) in queries.iter().enumerate() {
            let job = &query.job;
            let window = window_of(job);
            let predicates = window_predicates(&lake_directory, files, granularity, window, reader);
            let sql_for_duckdb = duckdb_sql(&job.sql, window);
            let sql: Arc<str> = Arc::from(job.sql.as_str());

            // Cold: new caches on both sides, the engine that goes first alternating by query.
            let opened = duckdb.open(&lake_directory, reader, &predicates);
            if !settings_shown {
                let version = opened["version"].as_str().unwrap_or("?");
                println!(
                    "DuckDB {version} ({}): {}",
                    opened["reader"].as_str().unwrap_or("?"),
                    opened["settings"]
                );
                println!("SETUP duckdb_version={version} duckdb_settings={}", opened["settings"]);
                settings_shown = true;
            }
            let catalog = fresh_catalog(&lake_directory);
            let (sluice_cold, (duckdb_cold, duckdb_ran)) = if index.is_multiple_of(2) {
                let sluice_run = run_sluice(&runtime, &catalog, &sql, window);
                (sluice_run, duckdb.run(&sql_for_duckdb))
            } else {
                let duckdb_run = duckdb.run(&sql_for_duckdb);
                (run_sluice(&runtime, &catalog, &sql, window), duckdb_run)
            };
            let expected = sluice_cold.measured;
            check(&job.name, *layout, "DuckDB", &duckdb_cold, &expected);
            if expected.rows == 0 {
                eprintln!(
                    "warning: {} returned no rows on {}: its times measure little",
                    job.name,
                    layout.name()
                );
            }
            // Value by value: equal counts alone would let two different answers pass.
            let expected_result = CanonicalResult::new(&sluice_cold.schema, &sluice_cold.batches);
            let mut comparison = compare_results(
                &expected_result,
                &duckdb.last_result(&duckdb_result_file),
                &query.approximate_columns,
            );

            // Warm: the same catalog and database, runs alternating, the order swapped each round.
            let (mut sluice_seconds, mut duckdb_seconds) = (Vec::new(), Vec::new());
            let mut sluice_phases: Vec<[Duration; 5]> = Vec::new();
            let mut last_sluice_run = sluice_cold;
            let measuring = Instant::now();
            while sluice_seconds.len() < MIN_RUNS
                || (sluice_seconds.len() < MAX_RUNS && measuring.elapsed() < MIN_MEASURING)
            {
                let duckdb_first = sluice_seconds.len().is_multiple_of(2);
                let duckdb_first_run_opt = duckdb_first.then(|| duckdb.run(&sql_for_duckdb).0);
                let sluice_run = run_sluice(&runtime, &catalog, &sql, window);
                let duckdb_run = duckdb_first_run_opt.unwrap_or_else(|| duckdb.run(&sql_for_duckdb).0);
                check(&job.name, *layout, "Sluice", &sluice_run.measured, &expected);
                check(&job.name, *layout, "DuckDB", &duckdb_run, &expected);
                sluice_seconds.push(sluice_run.measured.seconds);
                duckdb_seconds.push(duckdb_run.seconds);
                sluice_phases.push(sluice_run.phases);
                last_sluice_run = sluice_run;
            }
            // The last warm run of each engine too, value by value: a cache that made a run wrong
            // would show here.
            comparison = comparison
                .merge(compare_results(
                    &expected_result,
                    &duckdb.last_result(&duckdb_result_file),
                    &query.approximate_columns,
                ))
                .merge(compare_results(
                    &expected_result,
                    &CanonicalResult::new(&last_sluice_run.schema, &last_sluice_run.batches),
                    &query.approximate_columns,
                ));
            let check_text = match &comparison.difference_opt {
                Some(_) => "DIFFERENT".to_string(),
                None if query.approximate_columns.is_empty() => "equal".to_string(),
                None => format!("equal, estimates within {:.1e}", comparison.approximate_max_difference),
            };
            let approximate_text = if query.approximate_columns.is_empty() {
                "-".to_string()
            } else {
                format!("{:.3e}", comparison.approximate_max_difference)
            };

            let runs = sluice_seconds.len();
            let (sluice_median, duckdb_median) = (median(sluice_seconds), median(duckdb_seconds));
            let window_text = window_label(job.window_micros);
            println!(
                "{:<24} {:<5} {:<6} {:<9} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>13.2} {runs:>5} \
                 {:>6} {:>6}  {check_text}",
                job.name,
                query.kind.name(),
                window_text,
                layout.name(),
                expected.seconds * 1e3,
                duckdb_cold.seconds * 1e3,
                sluice_median * 1e3,
                duckdb_median * 1e3,
                sluice_median / duckdb_median,
                expected.rows,
                last_sluice_run.files_read,
            );
            println!(
                "RESULT query={} kind={} window={window_text} layout={} sluice_cold_ms={:.3} \
                 duckdb_cold_ms={:.3} sluice_median_ms={:.3} duckdb_median_ms={:.3} ratio={:.4} \
                 cold_ratio={:.4} runs={runs} rows={} columns={} sluice_files_read={} files_in_window={} \
                 sluice_row_filter={} duckdb_row_filter={} duckdb_reader={} check={} \
                 approx_max_rel_diff={approximate_text}",
                job.name,
                query.kind.name(),
                layout.name(),
                expected.seconds * 1e3,
                duckdb_cold.seconds * 1e3,
                sluice_median * 1e3,
                duckdb_median * 1e3,
                sluice_median / duckdb_median,
                expected.seconds / duckdb_cold.seconds,
                expected.rows,
                expected.columns,
                last_sluice_run.files_read,
                predicates.sluice_files.len(),
                predicates.sluice_filters_rows,
                predicates.duckdb_filters_rows,
                reader.name(),
                if comparison.difference_opt.is_some() { "different" } else { "equal" },
            );
            if let Some(difference) = &comparison.difference_opt {
                eprintln!(
                    "error: {} on {}: the engines' results differ: {difference}",
                    job.name,
                    layout.name()
                );
                differences.push(format!("{} on {}: {difference}", job.name, layout.name()));
            }
            if explain {
                let phase_names = ["snapshot", "session", "logical plan", "physical plan", "done"];
                let phase_medians: Vec<String> = phase_names
                    .iter()
                    .enumerate()
                    .map(|(phase, name)| {
                        let ends: Vec<f64> =
                            sluice_phases.iter().map(|phases| phases[phase].as_secs_f64()).collect();
                        format!("{name} {:.2} ms", median(ends) * 1e3)
                    })
                    .collect();
                eprintln!(
                    "--- {} on {} [{}, {})\nDuckDB view ({}): {}\nDuckDB SQL:\n{duckdb_ran}\n\
                     Sluice phases (median time at the end of each): {}\nSluice plan of the last run:\n{}",
                    job.name,
                    layout.name(),
                    format_micros(window.start_micros),
                    format_micros(window.end_micros),
                    reader.name(),
                    predicates.duckdb_filter,
                    phase_medians.join(", "),
                    DisplayableExecutionPlan::with_metrics(last_sluice_run.plan.as_ref()).indent(true)
                );
            }
        }
    }
    // After the whole table, so that one query's wrong answer does not cost the others' numbers.
    assert!(differences.is_empty(), "the engines' results differ:\n{}", differences.join("\n"));
}
