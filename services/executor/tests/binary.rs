//! The `sluice-executor` binary's configuration handling, run as a user would run it.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::process::Command;

fn executor() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-executor"));
    command.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    command
}

#[test]
fn print_config_shows_effective_values_with_secrets_masked() {
    let output = executor()
        .args(["--config", "deploy/config/executor.toml", "--print-config"])
        .env("SLUICE_OBJECT_STORE__OPTIONS__AWS_SECRET_ACCESS_KEY", "hunter2")
        .env("SLUICE_EXECUTOR__MAX_CONCURRENT_RUNS", "7")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("max_concurrent_runs = 7"), "{printed}");
    assert!(!printed.contains("hunter2"), "{printed}");
}

#[test]
fn config_errors_name_their_keys() {
    let output = executor()
        .args(["--config", "deploy/config/executor.toml"])
        .env("SLUICE_EXECUTOR__TICK_INTERVAL_MS", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("executor.tick_interval_ms"), "{stderr}");
}
