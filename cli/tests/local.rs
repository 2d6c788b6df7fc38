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
        let schemas = sluice_schema::SchemasConfig { directory: examples.join("../../schemas") };
        let object_store =
            sluice_lake::ObjectStoreConfig { url: lake.path().display().to_string(), ..Default::default() };
        let catalog = sluice_query::open_catalog(
            &schemas,
            &object_store,
            &Default::default(),
            &Default::default(),
            &Default::default(),
            sluice_query::limits::DEFAULT_MAX_TIMEOUT_MS,
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let validated = runtime.block_on(sluice_query::validate_job(&catalog, &text, None, false));
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

#[test]
fn a_closed_stdout_ends_every_format_quietly() {
    let lake = tempfile::TempDir::new().unwrap();
    for format in ["table", "csv", "json"] {
        // Far more than a pipe holds, so the writes meet the closed pipe whenever they happen.
        let mut child = sluice(lake.path())
            .args([
                "query",
                "--format",
                format,
                "SELECT n, repeat('x', 64) AS s FROM unnest(range(0, 20000)) AS t(n)",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{format}: {stderr}");
        assert!(stderr.is_empty(), "{format}: {stderr}");
    }
}

#[test]
fn device_strings_cannot_drive_the_terminal_and_csv_stays_data() {
    let lake = tempfile::TempDir::new().unwrap();
    let sql = "SELECT chr(27) || ']0;owned' || chr(7) || chr(155) || '2J' AS device_id, 'a,\"b\"' || chr(10) || 'c' AS note";
    let output = sluice(lake.path()).args(["query", sql]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(!table.chars().any(|character| character.is_control() && character != '\n'), "{table:?}");
    assert!(table.contains(r"\u{1b}]0;owned\u{7}\u{9b}2J"), "{table}");
    assert!(table.contains(r#"a,"b"\nc"#), "{table}");

    let output = sluice(lake.path()).args(["query", "--format", "csv", sql]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let csv = String::from_utf8(output.stdout).unwrap();
    assert_eq!(csv, "device_id,note\n\u{1b}]0;owned\u{7}\u{9b}2J,\"a,\"\"b\"\"\nc\"\n");
}
