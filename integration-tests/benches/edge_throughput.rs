//! The edge gateway (issue #19; docs/benchmarks.md explains the method):
//!
//! - **Acknowledged readings per second**, the gateway's spool synced before each 200, against a
//!   plain appender that writes the same readings (the bytes the spool stores for each request)
//!   to one file on the same disk with the same sync policy: one writer, every append waiting
//!   for an `fdatasync` that covers it, appends that arrive during a sync sharing the next one.
//!   Both are driven the same way in the same round: `clients` tasks, each waiting for its
//!   answer before sending the next request. The gateway runs in this process with its shipped
//!   settings (device auth off), its uplink down (a proxy refusing connections), so what it
//!   acknowledges piles up as a backlog.
//! - **Backlog drain** once the uplink is back: readings per second from the first reading the
//!   gateway forwarded to an empty spool, through the real central `sluice-ingest` binary and a
//!   Tansu broker, against central taking the same readings directly in requests of the size
//!   the gateway sends, one at a time as the gateway sends them.
//!
//! ```sh
//! cargo build --profile bench -p sluice-ingest --bin sluice-ingest
//! cargo bench -p sluice-integration-tests --bench edge_throughput -- [--readings N] [--rounds R]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark harness")]

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use sluice_edge::forwarded::{SpooledRecord, encode_spooled_records};
use sluice_edge::spool::{Spool, SpoolConfig};
use sluice_integration_tests::{
    Broker, EdgeService, FaultMode, FaultProxy, IngestToml, Readiness, ServiceBinary, bench_arg, edge_config,
    ingest_toml, now_micros, release_binary, repo_root, telemetry_readings, unique_suffix,
};
use sluice_schema::StreamSchema;
use tokio::sync::{mpsc, oneshot};

// The allocator the sluice-edge binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const STREAM: &str = "telemetry";
const NUM_DEVICES: usize = 1_000;

/// A request shape: readings per request, how many devices send at once, and how many times
/// `--readings` a round sends (so that a round of large requests lasts long enough to time).
#[derive(Debug, Clone, Copy)]
struct Shape {
    readings_per_request: usize,
    clients: usize,
    readings_factor: usize,
}

const SHAPES: [Shape; 2] = [
    // A device per request, as sensors post one reading each.
    Shape { readings_per_request: 1, clients: 64, readings_factor: 1 },
    // A device or a site collector posting its last readings together.
    Shape { readings_per_request: 100, clients: 8, readings_factor: 10 },
];
/// How long the drain runs at the shipped rate limit before the gateway restarts without one.
const SHIPPED_DRAIN: Duration = Duration::from_secs(10);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(bench());
}

/// The same readings in both forms: JSON bodies for the gateway, and for the appender the bytes
/// the gateway's spool stores for each request.
struct Requests {
    bodies: Vec<Bytes>,
    payloads: Vec<Bytes>,
    num_readings: usize,
}

fn requests(schema: &StreamSchema, readings: &[serde_json::Value], per_request: usize) -> Requests {
    let received_at = now_micros();
    let mut bodies = Vec::new();
    let mut payloads = Vec::new();
    for chunk in readings.chunks(per_request) {
        bodies.push(Bytes::from(serde_json::to_vec(chunk).unwrap()));
        let encoded: Vec<(String, i64, Vec<u8>)> = chunk
            .iter()
            .map(|reading| {
                let mut value = Vec::new();
                let meta = schema.encode_json(reading, i64::MAX / 2, i64::MAX / 4, &mut value).unwrap();
                (meta.key, meta.event_time_micros, value)
            })
            .collect();
        let records: Vec<SpooledRecord<'_>> = encoded
            .iter()
            .map(|(key, event_time_micros, value)| SpooledRecord {
                key,
                event_time_micros: *event_time_micros,
                value,
            })
            .collect();
        payloads.push(Bytes::from(
            encode_spooled_records(STREAM, schema.fingerprint, received_at, &records).unwrap(),
        ));
    }
    Requests { bodies, payloads, num_readings: readings.len() }
}

async fn bench() {
    let num_readings = bench_arg("--readings", 60_000);
    let rounds = bench_arg("--rounds", 3);
    let Some(ingest_binary) = release_binary("sluice-ingest") else {
        panic!(
            "target/release/sluice-ingest is missing: build it first, \
             cargo build --profile bench -p sluice-ingest --bin sluice-ingest"
        );
    };
    let schema_path = repo_root().join("schemas/telemetry.avsc");
    let schema =
        StreamSchema::from_avro_json(STREAM, &std::fs::read_to_string(&schema_path).unwrap(), &schema_path)
            .unwrap();

    // Central: the real ingest binary with a token for the gateway, on a Tansu broker.
    let broker = Broker::start().await.unwrap();
    let token = format!("bench-{}{}", unique_suffix(), unique_suffix());
    let token_sha256 = hex::encode(Sha256::digest(token.as_bytes()));
    let config_dir = tempfile::TempDir::new().unwrap();
    let topic_prefix = format!("bench-{}", unique_suffix());
    let ingest = ServiceBinary::start_with_config(
        "sluice-ingest",
        Readiness::HttpOk("/readyz"),
        &ingest_binary,
        &config_dir.path().join("ingest.toml"),
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
    let central = ingest.base_url();
    let uplink = FaultProxy::start(central.trim_start_matches("http://").parse().unwrap()).await.unwrap();
    uplink.set_mode(FaultMode::Refuse);

    // The spool and the appender's file share one directory, so one disk.
    let disk = tempfile::TempDir::new().unwrap();
    let mut config = edge_config(&disk.path().join("spool"));
    config.forward.url = format!("http://{}", uplink.address);
    config.forward.token = sluice_config::Secret::new(token.clone());
    config.forward.edge_id = "bench-site".to_string();
    let edge = EdgeService::start(config.clone()).await.unwrap();
    let client = reqwest::Client::new();

    println!(
        "edge throughput: {num_readings} telemetry readings per round from {NUM_DEVICES} devices, {rounds} rounds; \
         spool and appender in {} ({}); the gateway in this process with its shipped settings, its uplink down",
        disk.path().display(),
        filesystem_of(disk.path()),
    );
    let mut backlog = 0;
    let mut spool_bytes_per_reading = Vec::new();
    println!("| shape | round | gateway readings/s | appender readings/s | ratio |");
    println!("| --- | --- | --- | --- | --- |");
    for shape in SHAPES {
        let readings = telemetry_readings(num_readings * shape.readings_factor, NUM_DEVICES, 3_600_000_000);
        let requests = requests(&schema, &readings, shape.readings_per_request);
        let label = format!("{} per request, {} clients", shape.readings_per_request, shape.clients);
        let mut ratios = Vec::new();
        for round in 1..=rounds {
            let appender_path = disk.path().join(format!("appender-{}-{round}", shape.readings_per_request));
            let before = spool_bytes(&edge);
            // Alternate the order so that neither side always runs on a warmer disk.
            let (gateway, appender) = if round % 2 == 1 {
                let gateway = gateway_round(&client, &edge, &requests, shape.clients).await;
                (gateway, appender_round(&appender_path, &requests, shape.clients).await)
            } else {
                let appender = appender_round(&appender_path, &requests, shape.clients).await;
                (gateway_round(&client, &edge, &requests, shape.clients).await, appender)
            };
            std::fs::remove_file(&appender_path).unwrap();
            backlog += requests.num_readings;
            spool_bytes_per_reading.push((
                shape.readings_per_request,
                (spool_bytes(&edge) - before) as f64 / requests.num_readings as f64,
            ));
            let gateway_rate = requests.num_readings as f64 / gateway.as_secs_f64();
            let appender_rate = requests.num_readings as f64 / appender.as_secs_f64();
            ratios.push(gateway_rate / appender_rate);
            println!(
                "| {label} | {round} | {gateway_rate:.0} | {appender_rate:.0} | {:.2} |",
                gateway_rate / appender_rate
            );
        }
        ratios.sort_by(f64::total_cmp);
        println!("| {label} | median | | | {:.2} |", ratios[ratios.len() / 2]);
    }
    for (per_request, bytes) in &spool_bytes_per_reading {
        println!("spool bytes per reading, {per_request} per request: {bytes:.1}");
    }
    assert_eq!(
        unforwarded_readings(edge.running().unwrap().spool()),
        backlog as u64,
        "every acknowledged reading is in the backlog"
    );

    // The uplink comes back. At the shipped rate limit, the clock starts at the first reading
    // forwarded, not at the switch: the gateway may be waiting out a backoff of up to
    // forward.backoff_max_ms.
    uplink.set_mode(FaultMode::Pass);
    let switched = Instant::now();
    let backlog_frames = unforwarded_frames(&edge);
    let first_forwarded = loop {
        if unforwarded_frames(&edge) < backlog_frames {
            break Instant::now();
        }
        assert!(switched.elapsed() < Duration::from_secs(120), "nothing forwarded in 2 minutes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Counted from the whole backlog, with the clock stopped when the count is taken: reading
    // the spool back takes a while, and the drain goes on meanwhile.
    tokio::time::sleep(SHIPPED_DRAIN).await;
    let sampled = Instant::now();
    let left = unforwarded_readings(edge.running().unwrap().spool());
    let shipped_rate = (backlog as u64 - left) as f64 / sampled.duration_since(first_forwarded).as_secs_f64();
    println!(
        "backlog: {backlog} readings; first forwarded {:.1} s after the uplink came back (backoff); at the shipped \
         forward.max_readings_per_second = {}: {shipped_rate:.0} readings/s over {} s",
        first_forwarded.duration_since(switched).as_secs_f64(),
        config.forward.max_readings_per_second,
        SHIPPED_DRAIN.as_secs(),
    );

    // The rest without a rate limit: what the gateway and central can do together.
    // What is left is counted with the gateway stopped, so that none of it leaves before the count.
    edge.stop().await.unwrap();
    let (rest, rest_frames) = {
        let spool = Spool::open(SpoolConfig {
            directory: config.spool.directory.clone(),
            max_bytes: config.spool.max_bytes,
            segment_bytes: config.spool.segment_bytes,
            full_policy: config.spool.full_policy,
        })
        .unwrap();
        (unforwarded_readings(&spool), spool.usage().1)
    };
    config.forward.max_readings_per_second = 1_000_000_000;
    let edge = EdgeService::start(config.clone()).await.unwrap();
    let started = Instant::now();
    let mut first_forwarded_opt = None;
    loop {
        // The spool's count of frames left, not its frames read back, which would load the disk
        // the drain reads from.
        let left = unforwarded_frames(&edge);
        if left < rest_frames && first_forwarded_opt.is_none() {
            first_forwarded_opt = Some(Instant::now());
        }
        if left == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "the backlog did not drain in 10 minutes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = Instant::now();
    let drain_rate =
        rest as f64 / drained.duration_since(first_forwarded_opt.unwrap_or(started)).as_secs_f64();

    // Central taking the same number of readings directly, in requests of the gateway's size, one
    // at a time as the gateway sends them.
    let per_request = config.forward.max_batch_readings;
    let readings = telemetry_readings(rest as usize, NUM_DEVICES, 3_600_000_000);
    let direct_requests = requests(&schema, &readings, per_request);
    let url = format!("{central}/v1/streams/{STREAM}/records");
    let started = Instant::now();
    for body in &direct_requests.bodies {
        let response = client
            .post(&url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            reqwest::StatusCode::OK,
            "{}",
            response.text().await.unwrap_or_default()
        );
    }
    let direct_rate = rest as f64 / started.elapsed().as_secs_f64();
    println!(
        "the rest, {rest} readings, without a rate limit: drained at {drain_rate:.0} readings/s (requests of up to \
         {per_request}); central directly, JSON requests of {per_request} one at a time: {direct_rate:.0} readings/s; \
         ratio {:.2}",
        drain_rate / direct_rate,
    );
    edge.stop().await.unwrap();
    drop(ingest);
}

/// The spool's frame bytes now.
fn spool_bytes(edge: &EdgeService) -> u64 {
    edge.running().unwrap().spool().usage().0
}

fn unforwarded_frames(edge: &EdgeService) -> u64 {
    edge.running().unwrap().spool().usage().1
}

/// Readings acknowledged and not yet forwarded, read back from the spool (it counts frames).
fn unforwarded_readings(spool: &Spool) -> u64 {
    let frames = spool.unforwarded(usize::MAX, usize::MAX).unwrap();
    frames
        .iter()
        .map(|frame| {
            sluice_edge::forwarded::decode_spooled(&frame.payload)
                .map_or(0, |batch| batch.records.len() as u64)
        })
        .sum()
}

async fn gateway_round(
    client: &reqwest::Client,
    edge: &EdgeService,
    requests: &Requests,
    clients: usize,
) -> Duration {
    let url = edge.records_url(STREAM);
    let next = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(requests.bodies.clone());
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, next, bodies) =
                (client.clone(), url.clone(), Arc::clone(&next), Arc::clone(&bodies));
            tokio::spawn(async move {
                while let Some(body) = bodies.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), reqwest::StatusCode::OK);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

type Append = (Bytes, oneshot::Sender<()>);

/// Appends each request's bytes, length first, to one file from one writer thread: it writes
/// every append queued, syncs once, then answers them all, as the spool's writer does.
async fn appender_round(path: &Path, requests: &Requests, clients: usize) -> Duration {
    let (appends, mut queue) = mpsc::channel::<Append>(4_096);
    let mut file = File::create(path).unwrap();
    let writer = std::thread::spawn(move || {
        let mut group = Vec::new();
        while let Some(first) = queue.blocking_recv() {
            group.push(first);
            while let Ok(more) = queue.try_recv() {
                group.push(more);
            }
            let mut bytes = Vec::new();
            for (payload, _) in &group {
                bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                bytes.extend_from_slice(payload);
            }
            file.write_all(&bytes).unwrap();
            file.sync_data().unwrap();
            for (_, answer) in group.drain(..) {
                let _ = answer.send(());
            }
        }
    });
    let next = Arc::new(AtomicUsize::new(0));
    let payloads = Arc::new(requests.payloads.clone());
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (appends, next, payloads) = (appends.clone(), Arc::clone(&next), Arc::clone(&payloads));
            tokio::spawn(async move {
                while let Some(payload) = payloads.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let (answer, answered) = oneshot::channel();
                    appends.send((payload.clone(), answer)).await.unwrap();
                    answered.await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    drop(appends);
    writer.join().unwrap();
    elapsed
}

/// The filesystem and device under `path`, for the record.
fn filesystem_of(path: &Path) -> String {
    std::process::Command::new("df")
        .args(["--output=source,fstype", &path.display().to_string()])
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| {
            text.lines().nth(1).map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "unknown".to_string())
}
