//! The `sluice-ingest` binary's configuration handling, run as a user would run it.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::process::Command;

fn ingest() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-ingest"));
    command.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    command
}

#[test]
fn print_config_shows_effective_values_with_secrets_masked() {
    let output = ingest()
        .args(["--config", "deploy/config/ingest.toml", "--print-config"])
        .env("SLUICE_KAFKA__BOOTSTRAP_SERVERS", "kafka-0:9092")
        .env("SLUICE_MQTT__PASSWORD", "hunter2")
        .env("SLUICE_KAFKA__CLIENT__SASL_PASSWORD", "s3cret")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("bootstrap_servers = \"kafka-0:9092\""), "{printed}");
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(!printed.contains("s3cret"), "{printed}");
    assert!(printed.contains("\"sasl.password\" = \"<redacted>\""), "{printed}");
    let reparsed: toml::Value = toml::from_str(&printed).unwrap();
    assert_eq!(reparsed["http"]["listen_address"].as_str(), Some("127.0.0.1:8080"));
}

#[test]
fn every_config_error_is_reported_with_its_key() {
    let directory = tempfile::TempDir::new().unwrap();
    let path = directory.path().join("bad.toml");
    std::fs::write(&path, "[http]\nmax_body_bytes = 0\nlisten_adress = \"0.0.0.0:80\"\n").unwrap();
    let output = ingest().arg("--config").arg(&path).arg("--print-config").output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("listen_adress"), "{stderr}");

    std::fs::write(&path, "[http]\nmax_body_bytes = 0\n[shutdown]\ngrace_period_ms = 1\n").unwrap();
    let output = ingest().arg("--config").arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("http.max_body_bytes"), "{stderr}");
    assert!(stderr.contains("shutdown.grace_period_ms"), "{stderr}");
}

#[test]
fn missing_config_file_is_an_error() {
    let output = ingest().args(["--config", "does/not/exist.toml"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8(output.stderr).unwrap().contains("does not exist"));
}

#[test]
fn logs_to_a_file_or_pipe_carry_no_colour_codes() {
    // A schema directory that does not exist fails start-up at once, after telemetry is up, so
    // the failure is logged through the same subscriber as every other line.
    let output = ingest()
        .args(["--config", "deploy/config/ingest.toml"])
        .env("SLUICE_SCHEMAS__DIRECTORY", "does/not/exist")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let logged = String::from_utf8(output.stdout).unwrap();
    assert!(logged.contains("ingest failed"), "{logged}");
    assert!(!logged.contains('\u{1b}'), "{logged:?}");
}
