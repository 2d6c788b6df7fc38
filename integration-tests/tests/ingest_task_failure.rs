//! A background task of ingest that fails must fail the service visibly instead of vanishing
//! while the process stays up: here the MQTT bridge, refused by a real Mosquitto that allows no
//! anonymous clients (a state no reconnect cures). In-process the shutdown token is cancelled and
//! `wait` reports the task; the binary exits non-zero and says why in its log.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::Duration;

use sluice_ingest::IngestError;
use sluice_integration_tests::{
    Broker, Mosquitto, ingest_config, repo_root, unique_suffix, workspace_binary,
};
use sluice_shutdown::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_mqtt_bridge_cancels_the_service_and_wait_names_the_task() {
    let broker = Broker::start().await.unwrap();
    let mosquitto = Mosquitto::start_with("allow_anonymous false").await.unwrap();
    let mut config = ingest_config(&broker);
    config.mqtt.enabled = true;
    config.mqtt.port = mosquitto.port;
    config.mqtt.client_id = format!("ingest-{}", unique_suffix());
    let shutdown = CancellationToken::new();
    let running = sluice_ingest::start(config, shutdown.clone()).await.unwrap();

    let stopped = tokio::time::timeout(Duration::from_secs(15), shutdown.cancelled()).await;
    assert!(stopped.is_ok(), "ingest kept running with a bridge the MQTT broker refuses");
    let outcome = tokio::time::timeout(Duration::from_secs(15), running.wait()).await.unwrap();
    match outcome {
        Err(IngestError::TaskFailed { task, cause }) => {
            assert_eq!(task, "mqtt_bridge");
            assert!(cause.contains("refused the connection"), "{cause}");
            assert!(cause.contains("mqtt.username"), "{cause}");
        }
        other => panic!("expected the bridge's failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_mqtt_bridge_makes_the_binary_exit_non_zero_with_the_cause_in_its_log() {
    let broker = Broker::start().await.unwrap();
    let mosquitto = Mosquitto::start_with("allow_anonymous false").await.unwrap();
    let directory = tempfile::TempDir::new().unwrap();
    let config_path = directory.path().join("ingest.toml");
    std::fs::write(
        &config_path,
        format!(
            "[http]\nlisten_address = \"127.0.0.1:0\"\n\
             [auth]\nenabled = false\n\
             [schemas]\ndirectory = \"{schemas}\"\n\
             [kafka]\nbootstrap_servers = \"{bootstrap}\"\ntopic_prefix = \"test-{suffix}\"\n\
             [mqtt]\nenabled = true\nport = {mqtt_port}\nclient_id = \"ingest-{suffix}\"\n",
            schemas = repo_root().join("schemas").display(),
            bootstrap = broker.bootstrap_servers(),
            suffix = unique_suffix(),
            mqtt_port = mosquitto.port,
        ),
    )
    .unwrap();
    let log_path = directory.path().join("ingest.log");
    let mut child = tokio::process::Command::new(workspace_binary("sluice-ingest"))
        .arg("--config")
        .arg(&config_path)
        .stdout(std::fs::File::create(&log_path).unwrap())
        .stderr(std::fs::File::create(directory.path().join("ingest.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("sluice-ingest kept running with a bridge the MQTT broker refuses")
        .unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap()
        + &std::fs::read_to_string(directory.path().join("ingest.err")).unwrap();
    assert!(!status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("background task failed"), "{log}");
    assert!(log.contains("mqtt_bridge") && log.contains("refused the connection"), "{log}");
}
