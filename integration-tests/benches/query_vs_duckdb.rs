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
//! every core. The two engines' runs alternate, so that this machine's noise falls on both; each
//! query runs once unmeasured per engine, then 5 to 25 times, and the medians count.
//! The files are written with the compactor's writer settings; `--row-group-rows N` overrides
//! its row group size.
//!
//! `cargo bench -p sluice-integration-tests --bench query_vs_duckdb -- [--rows N] [--devices N]
//! [--row-group-rows N] [--only QUERY] [--set datafusion.KEY=VALUE] [--explain]`

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{
    ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use parquet::arrow::ArrowWriter;
use sluice_compactor::config::ParquetConfig;
use sluice_executor::{Catalog, Scope, plan_query};
use sluice_integration_tests::{bench_arg, repo_root};
use sluice_lake::{CommitRecord, CommittedFile, Lake, NewFile, PartitionGranularity, PartitionKey};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HOUR: i64 = 3_600_000_000;
const DAY: i64 = 24 * HOUR;
/// 2026-11-16T00:00:00Z: a fixed week, so the data set is reused between runs.
const WEEK_START: i64 = 1_795_305_600_000_000;
/// Runs per query and engine, after one unmeasured run each (the first run of a query reads its
/// files into the page cache): at least `MIN_RUNS`, more for short queries until `MIN_MEASURING`
/// has passed or `MAX_RUNS` are done. The median counts.
const MIN_RUNS: usize = 5;
const MAX_RUNS: usize = 25;
const MIN_MEASURING: std::time::Duration = std::time::Duration::from_secs(3);

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
        // The same top 20 with the per-device statistics as an aggregate joined back to the rows,
        // the other common way to write it (examples/jobs/temperature_anomalies.sql uses the
        // window functions above): no sort of the day's rows, but a join.
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
async fn prepare(dir: &Path, rows: usize, devices: usize, row_group_rows: usize) -> Lake {
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
    let schema = telemetry_arrow_schema();
    lake.ensure_table("telemetry", &schema, &["dt", "hour"], sluice_lake::TableSettings::default())
        .await
        .unwrap();
    let properties = sluice_compactor::writer_properties(
        &ParquetConfig { row_group_rows, ..ParquetConfig::default() },
        schema.index_of(sluice_schema::KEY_FIELD).unwrap(),
        schema.index_of(sluice_schema::EVENT_TIME_FIELD).unwrap(),
    )
    .unwrap();
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
        let file = CommittedFile {
            path: relative,
            partition,
            num_rows,
            size_bytes: size,
            min_event_time_micros: hour_start,
            max_event_time_micros: hour_start + HOUR - 1,
        };
        let record = CommitRecord {
            stream: "telemetry".into(),
            topic: "bench.telemetry".into(),
            kafka_partition: 0,
            previous_end_offset_opt: (hour > 0).then_some((hour as u64 * num_rows) as i64),
            start_offset: (hour as u64 * num_rows) as i64,
            end_offset: ((hour as u64 + 1) * num_rows) as i64,
            files: vec![file.clone()],
            num_dead_lettered: 0,
            num_duplicates_dropped: 0,
            max_event_time_micros_opt: Some(hour_start + HOUR - 1),
            writer_id: "query-benchmark".into(),
            created_at_micros: sluice_integration_tests::now_micros(),
            reset_opt: None,
            table_version_opt: None,
        };
        let new_file = NewFile { file, stats_json: sluice_lake::delta_stats(std::slice::from_ref(&batch)) };
        lake.create_commit(&record, &[new_file]).await.unwrap();
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

/// DuckDB in one Python process that runs one query per request, so that its runs and Sluice's
/// alternate: a noisy moment on this machine then slows both engines, not one.
struct DuckDb {
    child: std::process::Child,
    requests: std::process::ChildStdin,
    answers: std::io::BufReader<std::process::ChildStdout>,
}

const DUCKDB_SERVER: &str = r#"
import json, sys, time, duckdb
directory = sys.argv[1]
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
con.execute(f"CREATE VIEW devices AS SELECT * FROM read_csv('{directory}/reference/devices.csv', header = true)")
for line in sys.stdin:
    request = json.loads(line)
    if "filter" in request:
        # The job's table is the window: the same partition and row filter the executor applies.
        con.execute(f"CREATE OR REPLACE VIEW telemetry AS SELECT * FROM read_parquet('{directory}/telemetry/*/*/*.parquet', hive_partitioning = true) WHERE {request['filter']}")
        print("{}", flush=True)
    else:
        started = time.perf_counter()
        rows = len(con.execute(request["sql"]).fetchall())
        print(json.dumps({"seconds": time.perf_counter() - started, "rows": rows}), flush=True)
"#;

impl DuckDb {
    fn start(dir: &Path) -> Self {
        let pythonpath = std::process::Command::new(repo_root().join("deploy/local/duckdb.sh"))
            .arg("path")
            .output()
            .unwrap();
        assert!(pythonpath.status.success(), "duckdb.sh: {}", String::from_utf8_lossy(&pythonpath.stderr));
        let pythonpath = String::from_utf8(pythonpath.stdout).unwrap().trim().to_string();
        let mut child = std::process::Command::new("python3")
            .args(["-c", DUCKDB_SERVER])
            .arg(dir)
            .env("PYTHONPATH", pythonpath)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let requests = child.stdin.take().unwrap();
        let answers = std::io::BufReader::new(child.stdout.take().unwrap());
        Self { child, requests, answers }
    }

    fn request(&mut self, request: serde_json::Value) -> serde_json::Value {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.requests, "{request}").unwrap();
        self.requests.flush().unwrap();
        let mut answer = String::new();
        self.answers.read_line(&mut answer).unwrap();
        assert!(!answer.is_empty(), "the DuckDB process ended: {:?}", self.child.try_wait());
        serde_json::from_str(&answer).unwrap()
    }

    /// Makes `telemetry` the query's window, as the executor's session does.
    fn use_window(&mut self, query: &Query) {
        let hours: Vec<String> = (0..(query.window_end - query.window_start) / HOUR)
            .map(|index| {
                let key = PartitionKey::for_event_time(
                    query.window_start + index * HOUR,
                    PartitionGranularity::Hour,
                );
                let hour = key.hour_opt.unwrap_or(0);
                format!("(dt = '{}' AND hour = {hour})", key.date_string())
            })
            .collect();
        self.request(serde_json::json!({
            "filter": format!(
                "({}) AND ts >= TIMESTAMPTZ '{}' AND ts < TIMESTAMPTZ '{}'",
                hours.join(" OR "),
                sluice_executor::job::format_micros(query.window_start),
                sluice_executor::job::format_micros(query.window_end)
            ),
        }));
    }

    /// Seconds and result rows of one run.
    fn run(&mut self, query: &Query) -> (f64, usize) {
        let sql = query
            .duckdb_sql
            .replace(
                "$window_start",
                &format!("TIMESTAMPTZ '{}'", sluice_executor::job::format_micros(query.window_start)),
            )
            .replace(
                "$window_end",
                &format!("TIMESTAMPTZ '{}'", sluice_executor::job::format_micros(query.window_end)),
            );
        let answer = self.request(serde_json::json!({ "sql": sql }));
        (answer["seconds"].as_f64().unwrap(), answer["rows"].as_u64().unwrap() as usize)
    }
}

impl Drop for DuckDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How Sluice's runs are set up, as the executor does it.
struct Sluice {
    runtime: tokio::runtime::Runtime,
    catalog: Catalog,
    /// DataFusion options from `--set KEY=VALUE`.
    settings: Vec<(String, String)>,
    /// `--explain`: phase times, and each run's physical plan with its metrics.
    explain: bool,
}

impl Sluice {
    /// Seconds, result rows and files read of one run: snapshot, window session, plan, collect.
    fn run(&self, query: &Query) -> (f64, usize, u64) {
        let started = Instant::now();
        let (batches, stats) = self.runtime.block_on(async {
            let snapshot = self.catalog.snapshot().await.unwrap();
            let snapshot_done = started.elapsed();
            let scope = Scope::Window { start_micros: query.window_start, end_micros: query.window_end };
            let ctx = self.catalog.session(&snapshot, scope, true).await.unwrap();
            let session_done = started.elapsed();
            for (key, value) in &self.settings {
                ctx.state_ref().write().config_mut().options_mut().set(key, value).unwrap();
            }
            let frame = plan_query(&ctx, query.sluice_sql, Some((query.window_start, query.window_end)))
                .await
                .unwrap();
            let logical_done = started.elapsed();
            let task_ctx = Arc::new(frame.task_ctx());
            let plan = frame.create_physical_plan().await.unwrap();
            let planned = started.elapsed();
            let batches = datafusion::physical_plan::collect(Arc::clone(&plan), task_ctx).await.unwrap();
            if self.explain {
                let shown =
                    datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(plan.as_ref())
                        .indent(true);
                eprintln!(
                    "{}: snapshot {snapshot_done:?}, session {session_done:?}, logical plan {logical_done:?}, \
                     physical plan {planned:?}, done {:?}\n{shown}",
                    query.name,
                    started.elapsed()
                );
            }
            (batches, sluice_executor::runs::scan_stats(&plan))
        });
        let seconds = started.elapsed().as_secs_f64();
        (seconds, batches.iter().map(RecordBatch::num_rows).sum(), stats.files_read)
    }
}

fn main() {
    let rows = bench_arg("--rows", 50_000_000);
    let devices = bench_arg("--devices", 10_000);
    let row_group_rows = bench_arg("--row-group-rows", ParquetConfig::default().row_group_rows);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("sluice-query-bench-{rows}-{devices}-{row_group_rows}-v3"));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(prepare(&dir, rows, devices, row_group_rows));

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
    let settings: Vec<(String, String)> = flag_values("--set")
        .iter()
        .map(|setting| {
            let (key, value) = setting.split_once('=').expect("--set KEY=VALUE");
            (key.to_string(), value.to_string())
        })
        .collect();
    let explain = args.iter().any(|arg| arg == "--explain");
    let sluice = Sluice { runtime, catalog, settings, explain };
    let queries: Vec<Query> = queries()
        .into_iter()
        .filter(|query| only.is_empty() || only.iter().any(|name| name == query.name))
        .collect();
    let mut duckdb = DuckDb::start(&dir);

    println!("query                     sluice (s)  duckdb (s)  sluice/duckdb  runs  rows  files read");
    for query in &queries {
        duckdb.use_window(query);
        duckdb.run(query);
        sluice.run(query);
        let (mut sluice_times, mut duckdb_times) = (Vec::new(), Vec::new());
        let (mut sluice_rows, mut duckdb_rows, mut files) = (0, 0, 0);
        let measuring = Instant::now();
        while sluice_times.len() < MIN_RUNS
            || (sluice_times.len() < MAX_RUNS && measuring.elapsed() < MIN_MEASURING)
        {
            let (seconds, rows) = duckdb.run(query);
            duckdb_times.push(seconds);
            duckdb_rows = rows;
            let (seconds, rows, files_read) = sluice.run(query);
            sluice_times.push(seconds);
            (sluice_rows, files) = (rows, files_read);
        }
        assert_eq!(sluice_rows, duckdb_rows, "{}: both engines return the same number of rows", query.name);
        let runs = sluice_times.len();
        let (sluice_seconds, duckdb_seconds) = (median(sluice_times), median(duckdb_times));
        println!(
            "{:<25} {:>10.3}  {:>10.3}  {:>13.2}  {runs:>4}  {sluice_rows:>4}  {files}",
            query.name,
            sluice_seconds,
            duckdb_seconds,
            sluice_seconds / duckdb_seconds,
        );
    }
}
