//! `sluice simulate` against a real ingest (HTTP and MQTT bridge), Tansu and Mosquitto: what it
//! reports and logs is exactly what landed in Kafka, faults included.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use sluice_integration_tests::{
    Broker, IngestService, Mosquitto, consume_topic, decode_value, ingest_config, repo_root, unique_suffix,
    wait_for_mqtt_bridge, workspace_binary,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_simulator_reports_is_what_lands_in_kafka() {
    let broker = Broker::start().await.unwrap();
    let mosquitto = Mosquitto::start().await.unwrap();
    let mut config = ingest_config(&broker);
    config.mqtt.enabled = true;
    config.mqtt.port = mosquitto.port;
    config.mqtt.client_id = format!("ingest-{}", unique_suffix());
    let ingest = IngestService::start(config).await.unwrap();
    wait_for_mqtt_bridge(&mosquitto, &broker, &ingest.stream_topic("telemetry")).await.unwrap();

    let log_dir = tempfile::TempDir::new().unwrap();
    let log_path = log_dir.path().join("sent.ndjson");
    let output = tokio::process::Command::new(workspace_binary("sluice"))
        .args(["simulate", "--ingest-url", &ingest.base_url])
        .args(["--mqtt", &format!("127.0.0.1:{}", mosquitto.port), "--mqtt-share", "0.3"])
        .args(["--devices", "20", "--sites", "3", "--rate", "0.1", "--history", "10m"])
        .args(["--invalid", "0.05", "--late", "0.05", "--out-of-order", "0.1", "--duplicates", "0.05"])
        .args([
            "--clock-skew",
            "20s",
            "--batch",
            "50",
            "--concurrency",
            "4",
            "--seed",
            "3",
            "--report",
            "json",
        ])
        .arg("--log")
        .arg(&log_path)
        .current_dir(repo_root())
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "simulate failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let sent: Vec<Value> = std::fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();

    // 20 devices, one reading a device every 10 s for 10 minutes (and for the moments sending
    // took), every sequence number once, plus the duplicates.
    let num_duplicates = report["faults"]["duplicate"].as_u64().unwrap();
    assert_eq!(sent.len() as u64, report["sent"].as_u64().unwrap());
    let mut seqs_by_device: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for entry in
        sent.iter().filter(|entry| !entry["faults"].as_array().unwrap().iter().any(|f| f == "duplicate"))
    {
        let reading = &entry["reading"];
        // Invalid readings may lack a seq: their place is the one missing below.
        let seq = reading["seq"].as_i64().unwrap_or(-1);
        seqs_by_device.entry(reading["device_id"].as_str().unwrap().to_string()).or_default().push(seq);
    }
    assert_eq!(seqs_by_device.len(), 20);
    for (device, seqs) in &mut seqs_by_device {
        seqs.sort();
        let num_missing = seqs.iter().filter(|&&seq| seq == -1).count();
        let numbered: Vec<i64> = seqs.iter().copied().filter(|&seq| seq >= 0).collect();
        let max = *numbered.last().unwrap();
        assert!(max >= 60, "{device}: {max} readings");
        assert_eq!(numbered.len() + num_missing, max as usize, "{device}: no reading skipped");
    }
    let num_readings: usize = seqs_by_device.values().map(Vec::len).sum();
    assert_eq!(sent.len() as u64, num_readings as u64 + num_duplicates);
    assert_eq!(report["mqtt_devices"], 6);
    let has_fault =
        |entry: &Value, fault: &str| entry["faults"].as_array().unwrap().iter().any(|f| f == fault);
    for fault in ["invalid", "late", "out_of_order", "duplicate", "clock_skew"] {
        assert!(sent.iter().any(|entry| has_fault(entry, fault)), "some reading has the fault {fault}");
    }

    // HTTP: every invalid reading refused with its reason, every other one accepted.
    let http: Vec<&Value> = sent.iter().filter(|entry| entry["transport"] == "http").collect();
    for entry in &http {
        let outcome = entry["outcome"].as_str().unwrap();
        if has_fault(entry, "invalid") {
            assert!(outcome.starts_with("rejected: "), "{entry}");
        } else {
            assert_eq!(outcome, "accepted", "{entry}");
        }
    }
    let rejected = http.iter().filter(|entry| has_fault(entry, "invalid")).count() as u64;
    assert!(rejected > 0);
    assert_eq!(report["http"]["rejected"].as_u64().unwrap(), rejected);
    assert_eq!(report["http"]["accepted"].as_u64().unwrap(), http.len() as u64 - rejected);
    let reasons: u64 =
        report["rejected_by_reason"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(reasons, rejected);
    assert!(report["readings_per_second"].as_f64().unwrap() > 0.0);
    assert!(report["http"]["requests"].as_u64().unwrap() >= (http.len() as u64 - rejected) / 50);

    // Kafka holds every valid reading sent (duplicates twice: ingest does not dedupe; the
    // compactor does), and the dead-letter topic every invalid one sent over MQTT.
    let valid: Vec<&Value> = sent.iter().filter(|entry| !has_fault(entry, "invalid")).collect();
    let records = consume_topic(
        &broker.bootstrap_servers(),
        &ingest.stream_topic("telemetry"),
        valid.len(),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    let schema_json = std::fs::read_to_string(repo_root().join("schemas/telemetry.avsc")).unwrap();
    let mut landed: BTreeMap<(String, i64), usize> = BTreeMap::new();
    for record in records.iter().filter(|record| record.key.as_deref() != Some("probe")) {
        let value = decode_value(&schema_json, &record.payload).unwrap();
        *landed
            .entry((value["device_id"].as_str().unwrap().to_string(), value["seq"].as_i64().unwrap()))
            .or_default() += 1;
    }
    let mut expected: BTreeMap<(String, i64), usize> = BTreeMap::new();
    for entry in &valid {
        let reading = &entry["reading"];
        *expected
            .entry((reading["device_id"].as_str().unwrap().to_string(), reading["seq"].as_i64().unwrap()))
            .or_default() += 1;
    }
    assert_eq!(landed, expected, "Kafka holds exactly the valid readings sent");
    let mqtt_invalid =
        sent.iter().filter(|entry| entry["transport"] == "mqtt" && has_fault(entry, "invalid")).count();
    if mqtt_invalid > 0 {
        let dead_letters = consume_topic(
            &broker.bootstrap_servers(),
            &ingest.dead_letter_topic("telemetry"),
            mqtt_invalid,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(dead_letters.len(), mqtt_invalid);
    }
    ingest.stop().await.unwrap();
}

#[tokio::test]
async fn bad_arguments_are_refused_with_a_reason() {
    let output = tokio::process::Command::new(workspace_binary("sluice"))
        .args(["simulate", "--invalid", "1.5", "--history", "1m"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--invalid is a share of readings between 0 and 1"), "{stderr}");
    let output =
        tokio::process::Command::new(workspace_binary("sluice")).args(["simulate"]).output().await.unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("nothing to send"));
}
