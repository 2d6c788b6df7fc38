//! The `sluice-edge` binary's configuration and start-up, run as a site's operator would run it.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::process::Command;

fn edge() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-edge"));
    command.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    command
}

#[test]
fn print_config_shows_the_shipped_file_with_the_token_masked() {
    let output = edge()
        .args(["--config", "deploy/config/edge.toml", "--print-config"])
        .env("SLUICE_FORWARD__URL", "https://ingest.example.com")
        .env("SLUICE_FORWARD__TOKEN", "gateway-secret")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(printed.contains("url = \"https://ingest.example.com\""), "{printed}");
    assert!(!printed.contains("gateway-secret"), "{printed}");
    assert!(printed.contains("listen_address = \"127.0.0.1:8090\""), "{printed}");
}

#[test]
fn settings_that_cannot_work_are_refused_with_their_keys() {
    let directory = tempfile::TempDir::new().unwrap();
    let path = directory.path().join("edge.toml");
    std::fs::write(&path, "[spool]\nmax_bytes = 1024\n[forward]\nurl = \"ingest:8080\"\n").unwrap();
    let output = edge().arg("--config").arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("spool.max_bytes") && stderr.contains("forward.url"), "{stderr}");
}

#[test]
fn a_spool_in_use_by_another_gateway_stops_the_second_with_the_reason() {
    let directory = tempfile::TempDir::new().unwrap();
    let spool = directory.path().join("spool");
    let start = |port: u16| {
        edge()
            .args(["--config", "deploy/config/edge.toml"])
            .env("SLUICE_SPOOL__DIRECTORY", &spool)
            .env("SLUICE_HTTP__LISTEN_ADDRESS", format!("127.0.0.1:{port}"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = start(0);
    // The first holds the spool once its lock file exists and the log says the spool is open.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !spool.join("incarnation").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let second = start(0).wait_with_output().unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(!second.status.success());
    let logged =
        String::from_utf8_lossy(&second.stdout).to_string() + &String::from_utf8_lossy(&second.stderr);
    assert!(logged.contains("in use by another process"), "{logged}");
}
