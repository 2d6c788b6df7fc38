//! `sluice` commands that need no broker: job checks before submitting, and queries over a lake
//! directory, run as a user would run them.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::process::Command;

fn sluice(lake: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice"));
    command.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    command.arg("--lake").arg(lake);
    // Nothing listens here: a command that reached for Kafka would fail, not hang.
    command.args(["--bootstrap-servers", "127.0.0.1:9"]);
    command
}

#[test]
fn submit_refuses_an_invalid_job_before_reaching_kafka() {
    let lake = tempfile::TempDir::new().unwrap();
    let job = lake.path().join("bad.sql");
    std::fs::write(&job, "-- name: bad\n-- window: 1h\nSELECT no_such_column FROM telemetry\n").unwrap();
    let output = sluice(lake.path()).args(["jobs", "submit"]).arg(&job).output().unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", String::from_utf8_lossy(&output.stderr));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("no_such_column"), "{stderr}");
}

#[test]
fn every_example_job_passes_the_local_check() {
    let lake = tempfile::TempDir::new().unwrap();
    let examples = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/jobs"));
    let mut checked = 0;
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|extension| extension != "sql") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let catalog = sluice_executor::open_catalog(&{
            let mut config = sluice_executor::ExecutorConfig::default();
            config.schemas.directory = examples.join("../../schemas");
            config.object_store.url = lake.path().display().to_string();
            config
        })
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let validated = runtime.block_on(sluice_executor::validate_job(&catalog, &text, None));
        assert!(validated.is_ok(), "{}: {:?}", path.display(), validated.err());
        checked += 1;
    }
    assert!(checked >= 2, "examples/jobs holds the documented examples");
}

#[test]
fn query_over_an_empty_lake_answers_and_refuses_writes() {
    let lake = tempfile::TempDir::new().unwrap();
    let output = sluice(lake.path())
        .args(["query", "--format", "csv", "SELECT count(*) AS n FROM telemetry"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8(output.stdout).unwrap().trim(), "n\n0");

    let output = sluice(lake.path()).args(["query", "DROP TABLE telemetry"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8(output.stderr).unwrap().contains("not DROP TABLE"));
}
