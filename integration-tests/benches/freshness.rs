//! Freshness (issue #17): the time from ingest's 200 for a reading to the moment the reading can be
//! read through the stream's Delta table, as a distribution over minutes of steady load, once per
//! `flush.max_age_ms` (docs/benchmarks.md, "Freshness: from a 200 to readable through Delta").
//!
//! - Each phase (one flush age) is a deployment of its own on 127.0.0.1: a Tansu broker,
//!   `sluice-ingest` and `sluice-compactor` (the release binaries, each its own process) and a
//!   local-disk lake, all new, so that no phase starts with another's topic, consumer group or
//!   table log. Ingest runs as the chart's default values render it (bearer tokens on, JSON logs,
//!   no OTLP export); the compactor with every shipped default except `flush.max_age_ms`.
//! - Load: `--rate` readings/s from `--devices` devices, sent by `--clients` tasks as NDJSON
//!   batches on a fixed schedule (one batch per task every 100 ms, the tasks staggered), each
//!   reading stamped with the time it is sent (so it lands in the current hour) and a per-device
//!   `seq`. A reading's t_ack is the wall-clock time its request's 200 arrived; any other answer
//!   ends the run. A tick missed while a request was slow is skipped, not made up: the achieved
//!   rate then falls below the offered one.
//! - Visibility: a thread probes `<lake>/telemetry/_delta_log/` for the next `<version>.json`
//!   every 50 ms and reads the `device_id` and `seq` of the Parquet files that the version's `add`
//!   actions with `dataChange: true` name (`DeltaLogReader`). A reading is readable from that log
//!   entry's modification time, which the probe's own time bounds from above (the largest gap is
//!   printed). A merge's output (`dataChange: false`) holds readings already readable.
//! - Freshness = t_visible - t_ack of the readings sent after `--warmup-secs`, for `--minutes`.
//!   After the load the run waits (up to 2 x the flush age + 60 s) until every acknowledged
//!   reading is readable, and fails unless each is in exactly one data-adding file and the table
//!   holds nothing else: an end-to-end exactly-once check of the same run.
//!
//! Longer than 500 lines because it is one measurement whose method should read in one place: the
//! deployment, the scheduled load, the visibility tracking, the check and the report. What other
//! benchmarks and tests can use is in integration-tests/src (`DeltaLogReader`, `ingest_toml`,
//! `compactor_toml`, `release_binary`).
//!
//! ```sh
//! cargo build --profile bench --workspace --bin sluice-ingest --bin sluice-compactor
//! cargo bench -p sluice-integration-tests --bench freshness -- --minutes 10 \
//!     [--flush-ages 60000,5000] [--warmup-secs 30] [--rate 2000] [--devices 500] [--clients 4]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sluice_compactor::CompactorConfig;
use sluice_compactor::config::FlushConfig;
use sluice_integration_tests::{
    Broker, CompactorToml, DeltaLogReader, IngestToml, LogVersion, Readiness, ServiceBinary, bench_arg,
    bench_text_arg, compactor_toml, ingest_toml, now_micros, release_binary, unique_suffix, wait_until,
};
use tokio::time::{Instant, MissedTickBehavior};

const STREAM: &str = "telemetry";
const DEVICE_PREFIX: &str = "device-";
/// Each client sends one batch per tick.
const TICKS_PER_SECOND: u64 = 10;
const BATCH_INTERVAL: Duration = Duration::from_millis(1_000 / TICKS_PER_SECOND);
/// How often the log is probed for its next version: the resolution of the upper bound.
const LOG_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Tansu holds a group's first join for about half of `session.timeout.ms` (librdkafka's 45 s).
const COMPACTOR_READY_TIMEOUT: Duration = Duration::from_secs(180);
const PROGRESS_INTERVAL: Duration = Duration::from_secs(60);
/// The percentiles reported, in thousandths: p50, p90, p99, p99.9 and the maximum.
const PER_MILLE: [usize; 5] = [500, 900, 990, 999, 1_000];

/// The run's command line.
#[derive(Debug)]
struct Settings {
    flush_ages_ms: Vec<u64>,
    minutes: u64,
    warmup_secs: u64,
    readings_per_s: u64,
    num_devices: usize,
    num_clients: usize,
}

impl Settings {
    fn from_args() -> Self {
        let flush_ages_ms: Vec<u64> = bench_text_arg("--flush-ages").map_or_else(
            || vec![FlushConfig::default().max_age_ms, 5_000],
            |ages| {
                ages.split(',')
                    .map(|age| {
                        age.trim().parse::<u64>().expect("--flush-ages: milliseconds, comma-separated")
                    })
                    .collect()
            },
        );
        let settings = Self {
            flush_ages_ms,
            minutes: bench_arg("--minutes", 10) as u64,
            warmup_secs: bench_arg("--warmup-secs", 30) as u64,
            readings_per_s: bench_arg("--rate", 2_000) as u64,
            num_devices: bench_arg("--devices", 500),
            num_clients: bench_arg("--clients", 4),
        };
        assert!(settings.minutes > 0 && settings.readings_per_s > 0, "--minutes and --rate must be positive");
        assert!(
            settings.num_clients > 0 && settings.num_devices >= settings.num_clients,
            "--clients must be at least 1 and --devices at least --clients"
        );
        settings
    }
}

/// The binaries each phase runs.
#[derive(Debug)]
struct Binaries {
    ingest: PathBuf,
    compactor: PathBuf,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let settings = Settings::from_args();
    let binary = |name: &str| {
        release_binary(name).unwrap_or_else(|| {
            panic!(
                "target/release/{name} is missing: build it first, cargo build --profile bench \
                 --workspace --bin sluice-ingest --bin sluice-compactor"
            )
        })
    };
    let binaries = Binaries { ingest: binary("sluice-ingest"), compactor: binary("sluice-compactor") };
    println!(
        "freshness: {settings:?}; batches every {BATCH_INTERVAL:?} per client; {} and {} as their own \
         processes, a Tansu memory broker and a local-disk lake, new for each flush age",
        binaries.ingest.display(),
        binaries.compactor.display(),
    );
    let mut rows = Vec::new();
    for &flush_age_ms in &settings.flush_ages_ms {
        let phase = run_phase(&settings, &binaries, flush_age_ms).await;
        phase.print_result(&settings);
        rows.push(phase.table_row(&settings));
    }
    println!();
    println!(
        "| flush.max_age_ms | minutes | offered rec/s | achieved rec/s | readings | p50 s | p90 s | p99 s | p99.9 s | max s | Delta commits |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in &rows {
        println!("{row}");
    }
}

/// One phase's services, killed on drop (fields drop in order: the services before the broker
/// and the directory of their configurations and lake).
#[derive(Debug)]
struct Deployment {
    ingest: ServiceBinary,
    compactor: ServiceBinary,
    _broker: Broker,
    _work_dir: tempfile::TempDir,
    lake_dir: PathBuf,
    token: String,
    /// The configuration the compactor runs with, loaded as it loads it (environment included).
    config: CompactorConfig,
    ready_after: Duration,
}

impl Deployment {
    /// Starts the broker, ingest, and the compactor at `flush_age_ms`, and waits until the
    /// compactor owns its partitions.
    async fn start(binaries: &Binaries, flush_age_ms: u64) -> Self {
        let broker = Broker::start().await.unwrap();
        let work_dir = tempfile::TempDir::new().unwrap();
        let lake_dir = work_dir.path().join("lake");
        let topic_prefix = format!("fresh-{}", unique_suffix());
        let token = format!("bench-{}{}", unique_suffix(), unique_suffix());
        let token_sha256 = hex::encode(Sha256::digest(token.as_bytes()));
        let ingest_config_path = work_dir.path().join("ingest.toml");
        let ingest = ServiceBinary::start_with_config(
            "sluice-ingest",
            Readiness::HttpOk("/readyz"),
            &binaries.ingest,
            &ingest_config_path,
            |port| {
                ingest_toml(&IngestToml {
                    port,
                    token_sha256: &token_sha256,
                    stream: STREAM,
                    bootstrap_servers: &broker.bootstrap_servers(),
                    topic_prefix: &topic_prefix,
                    otlp_endpoint: "",
                    partitions_opt: None,
                })
            },
        )
        .await
        .unwrap();
        // /healthz answers once the compactor serves; /readyz once the group assigned it its
        // partitions, which may take longer than ServiceBinary waits for a start.
        let compactor_config_path = work_dir.path().join("compactor.toml");
        let compactor = ServiceBinary::start_with_config(
            "sluice-compactor",
            Readiness::HttpOk("/healthz"),
            &binaries.compactor,
            &compactor_config_path,
            |port| {
                compactor_toml(&CompactorToml {
                    port,
                    bootstrap_servers: &broker.bootstrap_servers(),
                    topic_prefix: &topic_prefix,
                    lake_dir: &lake_dir,
                    flush_max_age_ms_opt: Some(flush_age_ms),
                })
            },
        )
        .await
        .unwrap();
        let config: CompactorConfig = sluice_config::load(Some(compactor_config_path.as_path())).unwrap();
        assert_eq!(config.flush, FlushConfig { max_age_ms: flush_age_ms, ..FlushConfig::default() });
        let ready_after = wait_for_readyz(&compactor).await;
        Self { ingest, compactor, _broker: broker, _work_dir: work_dir, lake_dir, token, config, ready_after }
    }
}

/// Waits until the compactor's `/readyz` answers 200: the group assigned it its partitions.
async fn wait_for_readyz(compactor: &ServiceBinary) -> Duration {
    let started = Instant::now();
    let http = reqwest::Client::new();
    let url = format!("{}/readyz", compactor.base_url());
    let ready = wait_until(COMPACTOR_READY_TIMEOUT, || {
        let request = http.get(&url).send();
        async move { request.await.is_ok_and(|response| response.status().is_success()) }
    })
    .await;
    assert!(
        ready,
        "the compactor was not ready within {COMPACTOR_READY_TIMEOUT:?}; {}",
        compactor.log_tail()
    );
    started.elapsed()
}

/// What one phase measured.
#[derive(Debug)]
struct Phase {
    flush_age_ms: u64,
    num_counted: usize,
    /// Seconds at each of [`PER_MILLE`].
    percentiles_s: [f64; 5],
    /// The least, as a check: a reading cannot be readable before it was acknowledged.
    min_s: f64,
    /// Table versions holding counted readings; every version in the log at the end.
    num_commits: usize,
    num_versions: u64,
    max_poll_lag_micros: i64,
    ready_after: Duration,
    drained_after: Duration,
}

impl Phase {
    fn achieved_per_s(&self, settings: &Settings) -> f64 {
        self.num_counted as f64 / (settings.minutes * 60) as f64
    }

    fn print_result(&self, settings: &Settings) {
        let [p50, p90, p99, p999, max] = self.percentiles_s;
        println!(
            "RESULT flush_age_ms={} minutes={} offered_per_s={} achieved_per_s={:.1} readings={} \
             p50_s={p50:.3} p90_s={p90:.3} p99_s={p99:.3} p999_s={p999:.3} max_s={max:.3} min_s={:.3} \
             commits={} versions={} poll_lag_max_ms={:.1} ready_s={:.1} drained_s={:.1}",
            self.flush_age_ms,
            settings.minutes,
            settings.readings_per_s,
            self.achieved_per_s(settings),
            self.num_counted,
            self.min_s,
            self.num_commits,
            self.num_versions,
            self.max_poll_lag_micros as f64 / 1e3,
            self.ready_after.as_secs_f64(),
            self.drained_after.as_secs_f64(),
        );
    }

    fn table_row(&self, settings: &Settings) -> String {
        let [p50, p90, p99, p999, max] = self.percentiles_s;
        format!(
            "| {} | {} | {} | {:.0} | {} | {p50:.2} | {p90:.2} | {p99:.2} | {p999:.2} | {max:.2} | {} |",
            self.flush_age_ms,
            settings.minutes,
            settings.readings_per_s,
            self.achieved_per_s(settings),
            self.num_counted,
            self.num_commits,
        )
    }
}

/// The nearest-rank percentile of sorted values: the least value that at least `per_mille`
/// thousandths of them do not exceed (`per_mille` 0: the least value).
fn nearest_rank(sorted: &[i64], per_mille: usize) -> i64 {
    sorted[(sorted.len() * per_mille).div_ceil(1_000).max(1) - 1]
}

/// One phase: a new deployment, the warm-up and counted minutes of load, the wait until every
/// acknowledged reading is readable, and the exactly-once check.
async fn run_phase(settings: &Settings, binaries: &Binaries, flush_age_ms: u64) -> Phase {
    let deployment = Deployment::start(binaries, flush_age_ms).await;
    let config = &deployment.config;
    println!(
        "phase flush.max_age_ms={flush_age_ms}: compactor ready after {:.1} s; {} partitions; {:?}; \
         merge enabled {}",
        deployment.ready_after.as_secs_f64(),
        config.kafka.topics.partitions,
        config.flush,
        config.merge.enabled,
    );
    let num_visible = Arc::new(AtomicU64::new(0));
    let stop_following = Arc::new(AtomicBool::new(false));
    let following = {
        let table_dir = deployment.lake_dir.join(STREAM);
        let visibility = Visibility::new(&table_dir, settings.num_devices, Arc::clone(&num_visible));
        let stop = Arc::clone(&stop_following);
        std::thread::spawn(move || visibility.follow_until(&stop))
    };
    let acks = run_load(settings, &deployment, &following, &num_visible).await;

    // The last buffers wait for their age, then a commit.
    let drain_timeout = Duration::from_millis(2 * flush_age_ms) + Duration::from_secs(60);
    let load_ended = Instant::now();
    while num_visible.load(Ordering::Relaxed) < acks.len() as u64 && load_ended.elapsed() < drain_timeout {
        assert!(!following.is_finished(), "the Delta log follower stopped; its error is above");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_after = load_ended.elapsed();
    stop_following.store(true, Ordering::Relaxed);
    let visibility =
        tokio::task::block_in_place(move || following.join()).expect("the Delta log follower panicked");

    let mut freshness_micros = Vec::new();
    let mut commits = BTreeSet::new();
    let mut num_missing = 0_usize;
    for ack in &acks {
        match visibility.visible_of(ack.device, ack.seq) {
            Some(visible) if ack.counted => {
                freshness_micros.push(visible.at_micros - ack.ack_micros);
                commits.insert(visible.version);
            }
            Some(_) => {}
            None => num_missing += 1,
        }
    }
    let num_unacknowledged = visibility.num_distinct.saturating_sub(acks.len() - num_missing);
    assert!(
        num_missing == 0
            && num_unacknowledged == 0
            && visibility.num_duplicates == 0
            && visibility.num_foreign_rows == 0,
        "not exactly once {:.0} s after the load: of {} acknowledged readings {num_missing} are not \
         readable; {} rows repeat a reading; {num_unacknowledged} readable readings were never \
         acknowledged; {} rows of unknown devices; {}",
        drained_after.as_secs_f64(),
        acks.len(),
        visibility.num_duplicates,
        visibility.num_foreign_rows,
        deployment.compactor.log_tail()
    );
    assert!(!freshness_micros.is_empty(), "no reading was sent after the warm-up");
    freshness_micros.sort_unstable();
    Phase {
        flush_age_ms,
        num_counted: freshness_micros.len(),
        percentiles_s: PER_MILLE.map(|per_mille| nearest_rank(&freshness_micros, per_mille) as f64 / 1e6),
        min_s: nearest_rank(&freshness_micros, 0) as f64 / 1e6,
        num_commits: commits.len(),
        num_versions: visibility.log.next_version(),
        max_poll_lag_micros: visibility.max_poll_lag_micros,
        ready_after: deployment.ready_after,
        drained_after,
    }
}

/// Runs the clients through the warm-up and the counted minutes, printing progress; returns every
/// reading ingest acknowledged. Stops at once when a client or the log follower fails.
async fn run_load(
    settings: &Settings,
    deployment: &Deployment,
    following: &std::thread::JoinHandle<Visibility>,
    num_visible: &AtomicU64,
) -> Vec<Ack> {
    let num_acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let counted_from = started + Duration::from_secs(settings.warmup_secs);
    let stop_at = counted_from + Duration::from_secs(settings.minutes * 60);
    let http = reqwest::Client::new();
    let url = format!("{}/v1/streams/{STREAM}/records", deployment.ingest.base_url());
    let num_clients = settings.num_clients as u64;
    let mut clients: Vec<tokio::task::JoinHandle<Vec<Ack>>> = (0..settings.num_clients)
        .map(|client| {
            tokio::spawn(run_client(ClientLoad {
                http: http.clone(),
                url: url.clone(),
                token: deployment.token.clone(),
                devices: (client..settings.num_devices)
                    .step_by(settings.num_clients)
                    .map(|device| device as u32)
                    .collect(),
                readings_per_s: settings.readings_per_s / num_clients
                    + u64::from((client as u64) < settings.readings_per_s % num_clients),
                // Staggered, so that the clients' batches spread over each interval.
                first_tick: started + BATCH_INTERVAL * client as u32 / settings.num_clients as u32,
                counted_from,
                stop_at,
                num_acked: Arc::clone(&num_acked),
            }))
        })
        .collect();
    let mut next_progress = started + PROGRESS_INTERVAL;
    while !clients.iter().all(|client| client.is_finished()) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A client ends before the load does only when a request failed.
        if Instant::now() < stop_at
            && let Some(failed) = clients.iter().position(|client| client.is_finished())
        {
            let outcome = clients.swap_remove(failed).await;
            panic!("a client stopped before the end of the load: {:?}", outcome.err());
        }
        assert!(!following.is_finished(), "the Delta log follower stopped; its error is above");
        if Instant::now() >= next_progress {
            println!(
                "  {:>5.0} s: {} readings acknowledged, {} readable",
                started.elapsed().as_secs_f64(),
                num_acked.load(Ordering::Relaxed),
                num_visible.load(Ordering::Relaxed)
            );
            next_progress += PROGRESS_INTERVAL;
        }
    }
    let mut acks = Vec::new();
    for client in clients {
        acks.extend(client.await.unwrap());
    }
    acks
}

/// One client task's share of the load.
#[derive(Debug)]
struct ClientLoad {
    http: reqwest::Client,
    url: String,
    token: String,
    /// The devices only this client sends for, in turn.
    devices: Vec<u32>,
    readings_per_s: u64,
    first_tick: Instant,
    /// Readings of batches scheduled from here on count; earlier ones are the warm-up.
    counted_from: Instant,
    stop_at: Instant,
    num_acked: Arc<AtomicU64>,
}

/// A reading ingest acknowledged, and when.
#[derive(Debug)]
struct Ack {
    device: u32,
    seq: i64,
    ack_micros: i64,
    counted: bool,
}

/// Sends a batch every tick until `stop_at`, one request at a time, and records each reading's
/// acknowledgement. Panics on any answer but a 200 that accepted the whole batch.
async fn run_client(load: ClientLoad) -> Vec<Ack> {
    let mut next_seqs = vec![0_i64; load.devices.len()];
    let mut next_slot = 0_usize;
    let mut acks = Vec::new();
    let mut ticker = tokio::time::interval_at(load.first_tick, BATCH_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut num_scheduled: u64 = 0;
    for tick in 1_u64.. {
        let scheduled_at = ticker.tick().await;
        if scheduled_at >= load.stop_at {
            break;
        }
        // The readings due by the end of this tick at the client's rate, less those sent.
        let num_readings = tick * load.readings_per_s / TICKS_PER_SECOND - num_scheduled;
        num_scheduled += num_readings;
        if num_readings == 0 {
            continue;
        }
        let ts_micros = now_micros();
        let mut body = String::new();
        let mut keys = Vec::with_capacity(num_readings as usize);
        for _ in 0..num_readings {
            let slot = next_slot % load.devices.len();
            next_slot += 1;
            let (device, seq) = (load.devices[slot], next_seqs[slot]);
            next_seqs[slot] += 1;
            body.push_str(&reading(device, seq, ts_micros).to_string());
            body.push('\n');
            keys.push((device, seq));
        }
        let response = load
            .http
            .post(&load.url)
            .header("content-type", "application/x-ndjson")
            .bearer_auth(&load.token)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|error| panic!("a request to ingest failed: {error:?}"));
        let ack_micros = now_micros();
        let status = response.status();
        let answer = response.text().await.unwrap_or_default();
        assert_eq!(status, reqwest::StatusCode::OK, "ingest refused a batch of {num_readings}: {answer}");
        let accepted_opt = serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|parsed| parsed["accepted"].as_u64());
        assert_eq!(accepted_opt, Some(num_readings), "ingest answered {answer}");
        let counted = scheduled_at >= load.counted_from;
        acks.extend(keys.into_iter().map(|(device, seq)| Ack { device, seq, ack_micros, counted }));
        load.num_acked.fetch_add(num_readings, Ordering::Relaxed);
    }
    acks
}

/// One reading of a fleet's telemetry.
fn reading(device: u32, seq: i64, ts_micros: i64) -> serde_json::Value {
    serde_json::json!({
        "device_id": format!("{DEVICE_PREFIX}{device:05}"),
        "ts": ts_micros,
        "seq": seq,
        "site": format!("site-{}", device % 8),
        "temperature": 15.0 + (seq % 200) as f64 / 10.0,
        "humidity": 40.0 + (seq % 300) as f64 / 10.0,
        "battery": 1.0 - (seq % 1000) as f64 / 2000.0,
        "rssi": -60 - seq % 30,
    })
}

/// When a reading became readable, and the table version that made it so.
#[derive(Debug, Clone, Copy)]
struct Visible {
    at_micros: i64,
    version: u64,
}

/// When each reading first became readable, from the stream table's log as it grows.
#[derive(Debug)]
struct Visibility {
    log: DeltaLogReader,
    /// By device index, then by seq.
    by_device: Vec<Vec<Option<Visible>>>,
    num_distinct: usize,
    /// `num_distinct`, for the run to watch.
    num_distinct_shared: Arc<AtomicU64>,
    num_duplicates: usize,
    num_foreign_rows: usize,
    /// The largest gap between a log entry's modification time and the probe that found it.
    max_poll_lag_micros: i64,
}

impl Visibility {
    fn new(table_dir: &Path, num_devices: usize, num_distinct_shared: Arc<AtomicU64>) -> Self {
        Self {
            log: DeltaLogReader::new(table_dir),
            by_device: vec![Vec::new(); num_devices],
            num_distinct: 0,
            num_distinct_shared,
            num_duplicates: 0,
            num_foreign_rows: 0,
            max_poll_lag_micros: 0,
        }
    }

    /// Reads the versions written so far, every [`LOG_POLL_INTERVAL`] until `stop`, then once more.
    fn follow_until(mut self, stop: &AtomicBool) -> Self {
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            while let Some(version) =
                self.log.read_next().unwrap_or_else(|error| panic!("failed to read the Delta log: {error:#}"))
            {
                self.record(&version);
            }
            if stopping {
                return self;
            }
            std::thread::sleep(LOG_POLL_INTERVAL);
        }
    }

    fn record(&mut self, version: &LogVersion) {
        // The table's first version is written before the probe starts; only versions that add
        // readings say how late the probe found what it times.
        if !version.added_rows.is_empty() {
            self.max_poll_lag_micros =
                self.max_poll_lag_micros.max(version.found_at_micros - version.written_at_micros);
        }
        let visible = Visible { at_micros: version.written_at_micros, version: version.version };
        for row in &version.added_rows {
            let device_opt =
                row.device_id.strip_prefix(DEVICE_PREFIX).and_then(|index| index.parse::<usize>().ok());
            let (Some(device), Ok(seq_index)) =
                (device_opt.filter(|device| *device < self.by_device.len()), usize::try_from(row.seq))
            else {
                self.num_foreign_rows += 1;
                continue;
            };
            let seqs = &mut self.by_device[device];
            if seqs.len() <= seq_index {
                seqs.resize(seq_index + 1, None);
            }
            if seqs[seq_index].is_some() {
                self.num_duplicates += 1;
            } else {
                seqs[seq_index] = Some(visible);
                self.num_distinct += 1;
            }
        }
        self.num_distinct_shared.store(self.num_distinct as u64, Ordering::Relaxed);
    }

    fn visible_of(&self, device: u32, seq: i64) -> Option<Visible> {
        let seq_index = usize::try_from(seq).ok()?;
        self.by_device.get(device as usize)?.get(seq_index).copied().flatten()
    }
}
