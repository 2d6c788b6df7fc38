//! What the in-flight byte limit means for the real process: the `sluice-ingest` binary runs
//! on its own against a real Tansu broker, receives gzip bombs of tiny JSON values at once, and
//! its peak resident memory (VmHWM) may grow by about what `http.max_in_flight_bytes` allows,
//! not by the tens of times the body that a JSON tree of the body would take.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::io::Write;

use reqwest::StatusCode;
use sluice_integration_tests::{
    Broker, Readiness, ServiceBinary, repo_root, unique_suffix, workspace_binary,
};

fn peak_resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bombs_of_tiny_values_stay_within_the_in_flight_limit() {
    const MIB: usize = 1024 * 1024;
    let in_flight_limit = 64 * MIB;
    let broker = Broker::start().await.unwrap();
    let directory = tempfile::TempDir::new().unwrap();
    let config_path = directory.path().join("ingest.toml");
    let topic_prefix = format!("test-{}", unique_suffix());
    let binary = workspace_binary("sluice-ingest");
    let ingest = ServiceBinary::start_with_config(
        "sluice-ingest",
        Readiness::HttpOk("/readyz"),
        &binary,
        &config_path,
        |port| {
            format!(
                "[http]\nlisten_address = \"127.0.0.1:{port}\"\nmax_in_flight_bytes = {in_flight_limit}\n\
                 [auth]\nenabled = false\n[schemas]\ndirectory = \"{}\"\n\
                 [kafka]\nbootstrap_servers = \"{}\"\ntopic_prefix = \"{topic_prefix}\"\n\
                 [telemetry]\nlog_level = \"warn\"\n",
                repo_root().join("schemas").display(),
                broker.bootstrap_servers(),
            )
        },
    )
    .await
    .unwrap();
    let pid = ingest.pid().unwrap();
    let client = reqwest::Client::new();
    let base_url = ingest.base_url();

    // 16 MiB of `[0,0,...]`, under the body limit once decoded: about 16 KiB on the wire.
    let zeros = format!("[0{}]", ",0".repeat((16 * MIB - 3) / 2));
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(zeros.as_bytes()).unwrap();
    let bomb = encoder.finish().unwrap();
    drop(zeros);
    let url = format!("{base_url}/v1/streams/telemetry/records");
    let baseline = peak_resident_bytes(pid);
    let num_requests = 8;
    let answers = futures::future::join_all((0..num_requests).map(|_| {
        client
            .post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(bomb.clone())
            .send()
    }))
    .await;
    let mut statuses: Vec<u16> =
        answers.into_iter().map(|answer| answer.unwrap().status().as_u16()).collect();
    statuses.sort_unstable();
    let growth = peak_resident_bytes(pid).saturating_sub(baseline);
    eprintln!(
        "{num_requests} bombs of {} bytes: answers {statuses:?}, peak resident memory grew by {} MiB",
        bomb.len(),
        growth / MIB as u64
    );
    assert!(statuses.iter().all(|status| *status == 413 || *status == 503), "{statuses:?}");
    assert!(statuses.contains(&413), "at least one was parsed to its refusal: {statuses:?}");
    // The limit plus what is not charged: one reading at a time per request, connection buffers,
    // the allocator's per-thread caches of freed blocks (measured: 78 to 97 MiB in all). A JSON
    // tree per body was hundreds of MiB each (823 MiB for these eight before the parser was bounded).
    assert!(
        growth < (in_flight_limit + 64 * MIB) as u64,
        "peak resident memory grew by {} MiB",
        growth / MIB as u64
    );

    // Still serving.
    let response = client
        .post(&url)
        .json(&serde_json::json!({"device_id": "after", "ts": sluice_integration_tests::now_micros(), "seq": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}
