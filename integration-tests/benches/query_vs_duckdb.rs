//! The executor's queries against DuckDB on the same Parquet files, in the same run.
//!
//! A week of telemetry (default 50 million rows, 10,000 devices) is written once in the lake's
//! Hive layout (one zstd file per hour, sorted by device and time, with commit records), plus a
//! device registry as CSV. Four typical jobs run over their windows:
//!
//! - `hourly_per_device`: hourly aggregate per device;
//! - `daily_site_percentiles`: a day's percentiles per site and region, joined with the registry;
//! - `daily_anomalies`: top 20 readings by z-score over a day (window functions);
//! - `daily_anomalies_join`: the same top 20 with the statistics as an aggregate joined back;
//! - `one_hour_of_week`: one hour out of the whole week, by status.
//!
//! Sluice runs each as the executor does (commit-record snapshot, window-scoped session, plan,
//! collect); DuckDB (PyPI, deploy/local/duckdb.sh) runs the same query over
//! `read_parquet(..., hive_partitioning = true)` with the window's `dt`/`hour` filter. Both use
//! every core; each query runs 3 times per engine and the median counts.
//!
//! `cargo bench -p sluice-integration-tests --bench query_vs_duckdb -- [--rows N] [--devices N]
//! [--only QUERY] [--set datafusion.KEY=VALUE] [--explain]`

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{
    ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use sluice_executor::{Catalog, Scope, plan_query};
use sluice_integration_tests::{bench_arg, repo_root};
use sluice_lake::{CommitRecord, CommittedFile, Lake, PartitionGranularity, PartitionKey};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
/// 2026-11-16T00:00:00Z: a fixed week, so the data set is reused between runs.
const WEEK_START: i64 = 1_795_305_600_000_000;
const RUNS: usize = 3;

struct Query {
    name: &'static str,
    window_start: i64,
    window_end: i64,
    sluice_sql: &'static str,
    /// DuckDB's dialect differs for approximate percentiles; otherwise the same text.
    duckdb_sql: &'static str,
}

fn queries() -> Vec<Query> {
    let hour = WEEK_START + 3 * DAY + 12 * HOUR;
    let day = WEEK_START + 3 * DAY;
    vec![
        Query {
            name: "hourly_per_device",
            window_start: hour,
            window_end: hour + HOUR,
            sluice_sql: "SELECT device_id, count(*) AS readings, avg(temperature) AS avg_temperature, \
                max(temperature) AS max_temperature, min(battery) AS min_battery FROM telemetry \
                WHERE ts >= $window_start AND ts < $window_end GROUP BY device_id",
            duckdb_sql: "SELECT device_id, count(*) AS readings, avg(temperature) AS avg_temperature, \
                max(temperature) AS max_temperature, min(battery) AS min_battery FROM telemetry \
                WHERE ts >= $window_start AND ts < $window_end GROUP BY device_id",
        },
        Query {
            name: "daily_site_percentiles",
            window_start: day,
            window_end: day + DAY,
            sluice_sql: "SELECT d.region, t.site, count(*) AS readings, median(t.temperature) AS p50, \
                approx_percentile_cont(0.95) WITHIN GROUP (ORDER BY t.temperature) AS p95 \
                FROM telemetry t JOIN devices d ON t.device_id = d.device_id GROUP BY d.region, t.site",
            duckdb_sql: "SELECT d.region, t.site, count(*) AS readings, median(t.temperature) AS p50, \
                approx_quantile(t.temperature, 0.95) AS p95 \
                FROM telemetry t JOIN devices d ON t.device_id = d.device_id GROUP BY d.region, t.site",
        },
        Query {
            name: "daily_anomalies",
            window_start: day,
            window_end: day + DAY,
            sluice_sql: "WITH scored AS (SELECT device_id, ts, temperature, \
                (temperature - avg(temperature) OVER (PARTITION BY device_id)) \
                / nullif(stddev_pop(temperature) OVER (PARTITION BY device_id), 0) AS z FROM telemetry) \
                SELECT device_id, ts, temperature, z FROM scored ORDER BY abs(z) DESC LIMIT 20",
            duckdb_sql: "WITH scored AS (SELECT device_id, ts, temperature, \
                (temperature - avg(temperature) OVER (PARTITION BY device_id)) \
                / nullif(stddev_pop(temperature) OVER (PARTITION BY device_id), 0) AS z FROM telemetry) \
                SELECT device_id, ts, temperature, z FROM scored ORDER BY abs(z) DESC LIMIT 20",
        },
        // The same top 20 with the per-device statistics as an aggregate joined back to the rows:
        // what examples/jobs/temperature_anomalies.sql does, since DataFusion sorts the day's rows
        // by device for the window functions above.
        Query {
            name: "daily_anomalies_join",
            window_start: day,
            window_end: day + DAY,
            sluice_sql: ANOMALIES_BY_JOIN,
            duckdb_sql: ANOMALIES_BY_JOIN,
        },
        Query {
            name: "one_hour_of_week",
            window_start: WEEK_START + 5 * DAY + 7 * HOUR,
            window_end: WEEK_START + 5 * DAY + 8 * HOUR,
            sluice_sql: "SELECT status, count(*) AS readings, avg(humidity) AS avg_humidity FROM telemetry \
                GROUP BY status ORDER BY status",
            duckdb_sql: "SELECT status, count(*) AS readings, avg(humidity) AS avg_humidity FROM telemetry \
                GROUP BY status ORDER BY status",
        },
    ]
}

const ANOMALIES_BY_JOIN: &str = "WITH stats AS (SELECT device_id, avg(temperature) AS mean, \
    nullif(stddev_pop(temperature), 0) AS sd FROM telemetry GROUP BY device_id), \
    scored AS (SELECT t.device_id, t.ts, t.temperature, (t.temperature - s.mean) / s.sd AS z \
    FROM telemetry t JOIN stats s ON t.device_id = s.device_id) \
    SELECT device_id, ts, temperature, z FROM scored ORDER BY abs(z) DESC LIMIT 20";

/// A cheap deterministic noise source, so the data set is the same on every machine.
fn noise(seed: u64) -> f64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    (x % 10_000) as f64 / 10_000.0 - 0.5
}

fn hour_batch(hour_start: i64, devices: usize, per_device: usize, seq_base: i64) -> RecordBatch {
    let rows = devices * per_device;
    let mut device_ids = Vec::with_capacity(rows);
    let mut ts = Vec::with_capacity(rows);
    let mut seq = Vec::with_capacity(rows);
    let mut sites = Vec::with_capacity(rows);
    let mut temperature = Vec::with_capacity(rows);
    let mut humidity = Vec::with_capacity(rows);
    let mut battery = Vec::with_capacity(rows);
    let mut rssi = Vec::with_capacity(rows);
    let mut status = Vec::with_capacity(rows);
    let step = HOUR / per_device as i64;
    let hour_of_day = (hour_start.rem_euclid(DAY) / HOUR) as f64;
    let daily = (std::f64::consts::TAU * hour_of_day / 24.0).sin() * 6.0;
    let week_fraction = (hour_start - WEEK_START) as f64 / (7 * DAY) as f64;
    for device in 0..devices {
        let name = format!("dev-{device:05}");
        for reading in 0..per_device {
            let key = (hour_start / HOUR) as u64 * 1_000_003 + (device * per_device + reading) as u64;
            let spike = if key.is_multiple_of(50_000) { 25.0 } else { 0.0 };
            device_ids.push(name.clone());
            ts.push(hour_start + reading as i64 * step + (device as i64 * 7_919) % step);
            seq.push(seq_base + reading as i64);
            sites.push(format!("site-{:02}", device % 50));
            temperature.push(18.0 + (device % 10) as f64 + daily + noise(key) * 2.0 + spike);
            humidity.push(55.0 + noise(key + 1) * 20.0);
            battery.push(1.0 - week_fraction * 0.3 - (device % 7) as f64 * 0.01);
            rssi.push(-60 - (key % 30) as i32);
            status.push(if spike > 0.0 {
                "FAULT"
            } else if key.is_multiple_of(997) {
                "WARN"
            } else {
                "OK"
            });
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(device_ids)),
        Arc::new(TimestampMicrosecondArray::from(ts).with_timezone("UTC")),
        Arc::new(Int64Array::from(seq)),
        Arc::new(StringArray::from(sites)),
        Arc::new(Float64Array::from(temperature)),
        Arc::new(Float64Array::from(humidity)),
        Arc::new(Float64Array::from(battery)),
        Arc::new(Int32Array::from(rssi)),
        Arc::new(StringArray::from(status)),
    ];
    RecordBatch::try_new(telemetry_arrow_schema(), columns).unwrap()
}

fn telemetry_arrow_schema() -> arrow_schema::SchemaRef {
    let registry = sluice_schema::SchemaRegistry::load_directory(&repo_root().join("schemas")).unwrap();
    sluice_schema::to_arrow_schema(registry.stream("telemetry").unwrap())
}

/// Writes the week once; later runs reuse it.
async fn prepare(dir: &Path, rows: usize, devices: usize) -> Lake {
    let (store, root) = sluice_lake::open_store(&sluice_lake::ObjectStoreConfig {
        url: dir.display().to_string(),
        ..Default::default()
    })
    .unwrap();
    let lake = Lake::new(store, root);
    let done = dir.join(".complete");
    if done.exists() {
        return lake;
    }
    let started = Instant::now();
    let hours = 7 * 24;
    let per_device = rows.div_ceil(hours * devices);
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).unwrap()))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(1 << 20))
        .build();
    for hour in 0..hours {
        let hour_start = WEEK_START + hour as i64 * HOUR;
        let batch = hour_batch(hour_start, devices, per_device, (hour * per_device) as i64);
        let partition = PartitionKey::for_event_time(hour_start, PartitionGranularity::Hour).to_string();
        let relative = Lake::data_file("telemetry", &partition, &format!("bench-{hour:03}.parquet"));
        let mut writer = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(properties.clone())).unwrap();
        writer.write(&batch).unwrap();
        let bytes = writer.into_inner().unwrap();
        let size = bytes.len() as u64;
        lake.put(&relative, bytes).await.unwrap();
        let num_rows = batch.num_rows() as u64;
        let record = CommitRecord {
            stream: "telemetry".into(),
            topic: "bench.telemetry".into(),
            kafka_partition: 0,
            sequence: hour as u64,
            start_offset: (hour as u64 * num_rows) as i64,
            end_offset: ((hour as u64 + 1) * num_rows) as i64,
            files: vec![CommittedFile {
                path: relative,
                staging_path: String::new(),
                partition,
                num_rows,
                size_bytes: size,
                min_event_time_micros: hour_start,
                max_event_time_micros: hour_start + HOUR - 1,
            }],
            num_dead_lettered: 0,
            num_duplicates_dropped: 0,
            max_event_time_micros_opt: Some(hour_start + HOUR - 1),
            writer_id: "query-benchmark".into(),
            created_at_micros: sluice_integration_tests::now_micros(),
        };
        lake.create_commit(&record).await.unwrap();
    }
    let mut registry = String::from("device_id,region,model\n");
    for device in 0..devices {
        registry.push_str(&format!("dev-{device:05},region-{},model-{}\n", device % 5, device % 3));
    }
    std::fs::create_dir_all(dir.join("reference")).unwrap();
    std::fs::write(dir.join("reference/devices.csv"), registry).unwrap();
    std::fs::write(&done, b"").unwrap();
    eprintln!(
        "wrote {} rows in {hours} hourly files in {:.0} s",
        hours * devices * per_device,
        started.elapsed().as_secs_f64()
    );
    lake
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs every query on DuckDB in one Python process; returns median seconds and row counts.
fn duckdb_times(dir: &Path, queries: &[Query]) -> Vec<(f64, usize)> {
    let pythonpath =
        std::process::Command::new(repo_root().join("deploy/local/duckdb.sh")).arg("path").output().unwrap();
    assert!(pythonpath.status.success(), "duckdb.sh: {}", String::from_utf8_lossy(&pythonpath.stderr));
    let pythonpath = String::from_utf8(pythonpath.stdout).unwrap().trim().to_string();
    let jobs: Vec<serde_json::Value> = queries
        .iter()
        .map(|query| {
            let hours: Vec<String> = (0..(query.window_end - query.window_start) / HOUR)
                .map(|index| {
                    let key = PartitionKey::for_event_time(query.window_start + index * HOUR, PartitionGranularity::Hour);
                    let hour = key.hour_opt.unwrap_or(0);
                    format!("(dt = '{}' AND hour = {hour})", key.date_string())
                })
                .collect();
            serde_json::json!({
                "sql": query.duckdb_sql
                    .replace("$window_start", &format!("TIMESTAMPTZ '{}'", sluice_executor::job::format_micros(query.window_start)))
                    .replace("$window_end", &format!("TIMESTAMPTZ '{}'", sluice_executor::job::format_micros(query.window_end))),
                "filter": format!(
                    "({}) AND ts >= TIMESTAMPTZ '{}' AND ts < TIMESTAMPTZ '{}'",
                    hours.join(" OR "),
                    sluice_executor::job::format_micros(query.window_start),
                    sluice_executor::job::format_micros(query.window_end)
                ),
            })
        })
        .collect();
    let script = r#"
import json, sys, time, duckdb
directory, runs, jobs = sys.argv[1], int(sys.argv[2]), json.loads(sys.stdin.read())
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
con.execute(f"CREATE VIEW devices AS SELECT * FROM read_csv('{directory}/reference/devices.csv', header = true)")
out = []
for job in jobs:
    # The job's table is the window: the same partition and row filter the executor applies.
    con.execute(f"CREATE OR REPLACE VIEW telemetry AS SELECT * FROM read_parquet('{directory}/telemetry/*/*/*.parquet', hive_partitioning = true) WHERE {job['filter']}")
    times, rows = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        rows = len(con.execute(job["sql"]).fetchall())
        times.append(time.perf_counter() - started)
    out.append({"times": times, "rows": rows})
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(dir)
        .arg(RUNS.to_string())
        .env("PYTHONPATH", pythonpath)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(serde_json::to_string(&jobs).unwrap().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "duckdb run failed");
    let results: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    results
        .iter()
        .map(|result| {
            let times =
                result["times"].as_array().unwrap().iter().map(|time| time.as_f64().unwrap()).collect();
            (median(times), result["rows"].as_u64().unwrap() as usize)
        })
        .collect()
}

fn main() {
    let rows = bench_arg("--rows", 50_000_000);
    let devices = bench_arg("--devices", 10_000);
    let dir: PathBuf = std::env::temp_dir().join(format!("sluice-query-bench-{rows}-{devices}-v2"));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(prepare(&dir, rows, devices));

    let (store, root) = sluice_lake::open_store(&sluice_lake::ObjectStoreConfig {
        url: dir.display().to_string(),
        ..Default::default()
    })
    .unwrap();
    let registry =
        Arc::new(sluice_schema::SchemaRegistry::load_directory(&repo_root().join("schemas")).unwrap());
    let catalog = Catalog::new(
        store,
        root,
        registry,
        vec![sluice_executor::catalog::ReferenceTable {
            name: "devices".into(),
            path: "reference/devices.csv".into(),
            format: sluice_executor::catalog::ReferenceFormat::Csv,
        }],
    );
    // `--only NAME` runs one query; `--set KEY=VALUE` (repeatable) sets a DataFusion option in
    // Sluice's sessions, to measure a setting against DuckDB before making it the default.
    let args: Vec<String> = std::env::args().collect();
    let flag_values = |flag: &str| -> Vec<String> {
        args.windows(2).filter(|pair| pair[0] == flag).map(|pair| pair[1].clone()).collect()
    };
    let only = flag_values("--only");
    // `--explain` prints each run's physical plan with its metrics.
    let explain = args.iter().any(|arg| arg == "--explain");
    let settings: Vec<(String, String)> = flag_values("--set")
        .iter()
        .map(|setting| {
            let (key, value) = setting.split_once('=').expect("--set KEY=VALUE");
            (key.to_string(), value.to_string())
        })
        .collect();
    let queries: Vec<Query> = queries()
        .into_iter()
        .filter(|query| only.is_empty() || only.iter().any(|name| name == query.name))
        .collect();
    let duckdb = duckdb_times(&dir, &queries);

    println!("query                     sluice (s)  duckdb (s)  sluice/duckdb  rows  files read");
    for (query, (duckdb_seconds, duckdb_rows)) in queries.iter().zip(duckdb) {
        let mut times = Vec::new();
        let mut rows_out = 0;
        let mut files = 0;
        for _ in 0..RUNS {
            let started = Instant::now();
            let (batches, stats) = runtime.block_on(async {
                let snapshot = catalog.snapshot().await.unwrap();
                let snapshot_done = started.elapsed();
                let scope = Scope::Window { start_micros: query.window_start, end_micros: query.window_end };
                let ctx = catalog.session(&snapshot, scope, true).await.unwrap();
                let session_done = started.elapsed();
                for (key, value) in &settings {
                    ctx.state_ref().write().config_mut().options_mut().set(key, value).unwrap();
                }
                let frame = plan_query(&ctx, query.sluice_sql, Some((query.window_start, query.window_end)))
                    .await
                    .unwrap();
                let task_ctx = Arc::new(frame.task_ctx());
                let plan = frame.create_physical_plan().await.unwrap();
                let planned = started.elapsed();
                let batches = datafusion::physical_plan::collect(Arc::clone(&plan), task_ctx).await.unwrap();
                if explain {
                    eprintln!(
                        "{}: snapshot {snapshot_done:?}, session {session_done:?}, planned {planned:?}, done {:?}",
                        query.name,
                        started.elapsed()
                    );
                }
                if explain {
                    let shown = datafusion::physical_plan::displayable(plan.as_ref()).indent(true);
                    eprintln!("{}:\n{shown}", query.name);
                }
                (batches, sluice_executor::runs::scan_stats(&plan))
            });
            times.push(started.elapsed().as_secs_f64());
            rows_out = batches.iter().map(RecordBatch::num_rows).sum::<usize>();
            files = stats.files_read;
        }
        assert_eq!(rows_out, duckdb_rows, "{}: both engines return the same number of rows", query.name);
        let sluice_seconds = median(times);
        println!(
            "{:<25} {:>10.3}  {:>10.3}  {:>13.2}  {:>4}  {files}",
            query.name,
            sluice_seconds,
            duckdb_seconds,
            sluice_seconds / duckdb_seconds,
            rows_out
        );
    }
}
