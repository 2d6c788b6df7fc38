//! The `sluice-compactor` binary's configuration handling, run as a user would run it.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::process::Command;

fn compactor() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-compactor"));
    command.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    command
}

#[test]
fn print_config_shows_effective_values_with_secrets_masked() {
    let output = compactor()
        .args(["--config", "deploy/config/compactor.toml", "--print-config"])
        .env("SLUICE_OBJECT_STORE__URL", "s3://lake/prod")
        .env("SLUICE_OBJECT_STORE__OPTIONS__AWS_SECRET_ACCESS_KEY", "hunter2")
        .env("SLUICE_FLUSH__MAX_AGE_MS", "5000")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("url = \"s3://lake/prod\""), "{printed}");
    assert!(printed.contains("max_age_ms = 5000"), "{printed}");
    assert!(!printed.contains("hunter2"), "{printed}");
}

#[test]
fn config_errors_name_their_keys() {
    let output = compactor()
        .args(["--config", "deploy/config/compactor.toml"])
        .env("SLUICE_FLUSH__MAX_BUFFERED_BYTES", "10")
        .env("SLUICE_PARQUET__COMPRESSION", "gzip9")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("parquet.compression"), "{stderr}");
}
