//! The `sluice-edge` binary when its spool's disk fails: gone read-only under it, or full (a
//! small tmpfs). Each runs in a user and mount namespace of its own (`unshare -rm`), since a
//! test running as root cannot make a directory unwritable with permissions. A reading is never
//! answered 200 unless it is on disk: the failing request gets a 503 that names the disk's error,
//! the gateway stops (so that its supervisor restarts it), and every reading it acknowledged
//! before is still in its spool: forwarded to a real central ingest after a restart on a good
//! disk, or read back from the full one.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command as StdCommand;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_edge::spool::{FullPolicy, Spool, SpoolConfig};
use sluice_integration_tests::{
    Broker, IngestService, Readiness, ServiceBinary, consume_topic, decode_value, edge_toml, ingest_config,
    now_micros, telemetry_schema_json, wait_until, workspace_binary,
};
use tokio::process::Command;

fn readings(first_seq: i64, count: i64, pad: usize) -> Value {
    let site = "s".repeat(pad);
    let ts = now_micros() - 1_000_000;
    Value::Array(
        (first_seq..first_seq + count)
            .map(|seq| json!({"device_id": "pump-1", "ts": ts, "seq": seq, "site": site}))
            .collect(),
    )
}

/// Starts the gateway in a user and mount namespace where `mount` (a shell command run first,
/// with `$SPOOL` set to the spool directory) has prepared its spool. A `sleep` left in the
/// namespace (its pid in `<directory>/holder.pid`) keeps the namespace and its mounts after the
/// gateway exits, for the test to look into.
async fn start_in_namespace(
    directory: &Path,
    mount: &'static str,
    spool_lines: &'static str,
) -> ServiceBinary {
    let spool = directory.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let config_path = directory.join("edge.toml");
    let binary = workspace_binary("sluice-edge");
    ServiceBinary::start("sluice-edge", Readiness::HttpOk("/readyz"), |port| {
        std::fs::write(&config_path, edge_toml(port, &spool, "", spool_lines))?;
        let mut command = Command::new("unshare");
        command
            .args(["-rm", "sh", "-c"])
            .arg(format!(
                "{mount} && {{ sleep 120 & echo $! > \"$HOLDER\"; exec \"$EDGE\" --config \"$CONFIG\"; }}"
            ))
            .env("SPOOL", &spool)
            .env("HOLDER", directory.join("holder.pid"))
            .env("EDGE", &binary)
            .env("CONFIG", &config_path);
        Ok(command)
    })
    .await
    .unwrap()
}

/// Posts `body`; the status and the `error` of the answer (empty for a 200).
async fn post(client: &reqwest::Client, base_url: &str, body: &Value) -> (StatusCode, String) {
    let response =
        client.post(format!("{base_url}/v1/streams/telemetry/records")).json(body).send().await.unwrap();
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    (status, answer["error"].as_str().unwrap_or_default().to_string())
}

/// Waits until nothing answers at `base_url` any more: the gateway stopped.
async fn stopped(client: &reqwest::Client, base_url: &str) -> bool {
    wait_until(Duration::from_secs(10), || async {
        client.get(format!("{base_url}/healthz")).send().await.is_err()
    })
    .await
}

/// (device_id, seq) of every reading in a stopped gateway's spool.
fn spooled(spool_directory: &Path) -> BTreeSet<(String, i64)> {
    let spool = Spool::open(SpoolConfig {
        directory: spool_directory.to_path_buf(),
        max_bytes: u64::MAX,
        segment_bytes: 1 << 20,
        full_policy: FullPolicy::Refuse,
    })
    .unwrap();
    let schema_json = telemetry_schema_json();
    let mut keys = BTreeSet::new();
    for frame in spool.unforwarded(usize::MAX, usize::MAX).unwrap() {
        for record in sluice_edge::forwarded::decode_spooled(&frame.payload).unwrap().records {
            let value = decode_value(&schema_json, record.value).unwrap();
            keys.insert((value["device_id"].as_str().unwrap().to_string(), value["seq"].as_i64().unwrap()));
        }
    }
    keys
}

fn keys(seqs: std::ops::Range<i64>) -> BTreeSet<(String, i64)> {
    seqs.map(|seq| ("pump-1".to_string(), seq)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_gone_read_only_refuses_with_its_error_and_keeps_what_it_acknowledged() {
    let directory = tempfile::tempdir().unwrap();
    let edge = start_in_namespace(directory.path(), "true", "segment_bytes = 1048576").await;
    let client = reqwest::Client::new();
    let base_url = edge.base_url();
    let mut acknowledged = BTreeSet::new();
    for request in 0..3 {
        assert_eq!(post(&client, &base_url, &readings(request * 100, 100, 200)).await.0, StatusCode::OK);
        acknowledged.extend(keys(request * 100..request * 100 + 100));
    }
    // The directory goes read-only under the running gateway, in the gateway's namespace: a
    // read-only mount over it (Linux refuses to remount read-only what has files open for
    // writing). The open spool file still takes appends; the next one fails.
    let pid = edge.pid().unwrap().to_string();
    let spool = directory.path().join("spool");
    let read_only = directory.path().join("read-only");
    std::fs::create_dir_all(&read_only).unwrap();
    let overlaid = StdCommand::new("nsenter")
        .args(["-t", &pid, "-U", "-m", "--preserve-credentials", "sh", "-c"])
        .arg("mount --bind \"$1\" \"$2\" && mount -o remount,ro,bind \"$2\"")
        .args(["sh", read_only.to_str().unwrap(), spool.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(overlaid.success(), "mounted read-only over the spool");
    let mut refusal_opt = None;
    for request in 3..200 {
        let (status, error) = post(&client, &base_url, &readings(request * 100, 100, 200)).await;
        match status {
            StatusCode::OK => acknowledged.extend(keys(request * 100..request * 100 + 100)),
            _ => {
                refusal_opt = Some((status, error));
                break;
            }
        }
    }
    let (status, error) = refusal_opt.expect("a new spool file could not be made");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert!(error.contains("Read-only file system") && error.contains("nothing was acknowledged"), "{error}");
    // Refused at once from now on, until the gateway is restarted: and it stops, for that.
    let (status, _) = post(&client, &base_url, &readings(1_000_000, 1, 1)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(stopped(&client, &base_url).await, "the gateway stops once its spool failed");
    edge.kill().await;
    let holder = std::fs::read_to_string(directory.path().join("holder.pid")).unwrap();
    StdCommand::new("kill").arg(holder.trim()).status().unwrap();

    // Restarted on a good disk, it forwards exactly what it acknowledged.
    let broker = Broker::start().await.unwrap();
    let ingest = IngestService::start(ingest_config(&broker)).await.unwrap();
    let config_path = directory.path().join("edge-restarted.toml");
    let forward = format!("url = \"{}\"\nlinger_ms = 20", ingest.base_url);
    let restarted = ServiceBinary::start_with_config(
        "sluice-edge",
        Readiness::HttpOk("/readyz"),
        &workspace_binary("sluice-edge"),
        &config_path,
        |port| edge_toml(port, &spool, &forward, ""),
    )
    .await
    .unwrap();
    let records = consume_topic(
        &broker.bootstrap_servers(),
        &ingest.stream_topic("telemetry"),
        acknowledged.len(),
        Duration::from_millis(1500),
    )
    .await
    .unwrap();
    let schema_json = telemetry_schema_json();
    let forwarded: Vec<(String, i64)> = records
        .iter()
        .map(|record| {
            let value = decode_value(&schema_json, &record.payload).unwrap();
            (value["device_id"].as_str().unwrap().to_string(), value["seq"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(forwarded.len(), acknowledged.len(), "each acknowledged reading once");
    assert_eq!(forwarded.into_iter().collect::<BTreeSet<_>>(), acknowledged, "and none of the refused ones");
    restarted.kill().await;
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_with_its_error_and_keeps_what_it_acknowledged() {
    let directory = tempfile::tempdir().unwrap();
    // 3 MiB of disk under a spool allowed far more: the disk fills first.
    let edge = start_in_namespace(
        directory.path(),
        "mount -t tmpfs -o size=3m tmpfs \"$SPOOL\"",
        "segment_bytes = 1048576",
    )
    .await;
    let client = reqwest::Client::new();
    let base_url = edge.base_url();
    let mut acknowledged = BTreeSet::new();
    let mut refusal_opt = None;
    for request in 0..1_000 {
        let (status, error) = post(&client, &base_url, &readings(request * 100, 100, 200)).await;
        match status {
            StatusCode::OK => acknowledged.extend(keys(request * 100..request * 100 + 100)),
            _ => {
                refusal_opt = Some((status, error));
                break;
            }
        }
    }
    let (status, error) = refusal_opt.expect("the disk filled up");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{error}");
    assert!(error.contains("No space left on device"), "{error}");
    assert!(acknowledged.len() > 1_000, "about 3 MiB were taken first: {} readings", acknowledged.len());
    assert!(stopped(&client, &base_url).await, "the gateway stops once its spool failed");
    // The full disk, as the namespace's holder still sees it: copy it out and open it.
    let holder = std::fs::read_to_string(directory.path().join("holder.pid")).unwrap();
    let inside = Path::new("/proc")
        .join(holder.trim())
        .join("root")
        .join(directory.path().join("spool").strip_prefix("/").unwrap());
    let copy = directory.path().join("copy");
    let copied = StdCommand::new("cp").arg("-a").arg(&inside).arg(&copy).status().unwrap();
    assert!(copied.success(), "copied the spool out of {}", inside.display());
    std::fs::remove_file(copy.join("lock")).ok();
    assert_eq!(spooled(&copy), acknowledged, "everything acknowledged, nothing refused, on the full disk");
    edge.kill().await;
    StdCommand::new("kill").arg(holder.trim()).status().unwrap();
}
