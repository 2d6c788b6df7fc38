//! Delta readers outside Sluice (Python deltalake, Polars, DuckDB; integration-tests/readers),
//! run as child processes: one read of a table, or a reader reading it over and over.

use std::path::Path;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::{LakeRow, assert_exactly_once, repo_root};

/// The Delta readers outside Sluice that CI installs (deploy/local/delta-readers.sh).
pub const OUTSIDE_READERS: [&str; 3] = ["deltalake", "polars", "duckdb"];

/// The PYTHONPATH of the outside Delta readers (`deploy/local/delta-readers.sh path`, which
/// installs them the first time), looked up once per test binary. Blocks while installing.
pub fn delta_readers_python_path() -> anyhow::Result<String> {
    static PYTHONPATH: OnceLock<Result<String, String>> = OnceLock::new();
    PYTHONPATH
        .get_or_init(|| {
            let output = std::process::Command::new(repo_root().join("deploy/local/delta-readers.sh"))
                .arg("path")
                .output()
                .map_err(|error| error.to_string())?;
            if !output.status.success() {
                return Err(String::from_utf8_lossy(&output.stderr).into_owned());
            }
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
        })
        .clone()
        .map_err(|message| anyhow::anyhow!("installing the outside Delta readers failed: {message}"))
}

/// Rows of a Delta table as an outside reader returns them (integration-tests/readers), one
/// JSON object per row with `columns`. `table` is a local path or an `s3://` URL with
/// `storage_options`; `filter_opt` is a SQL predicate on partition columns.
pub fn outside_reader_rows(
    reader: &str,
    table: &str,
    columns: &[&str],
    filter_opt: Option<&str>,
    storage_options: &[(String, String)],
) -> anyhow::Result<Vec<serde_json::Value>> {
    let python_path = delta_readers_python_path()?;
    let mut command = std::process::Command::new("python3");
    command
        .arg(repo_root().join("integration-tests/readers/read_delta.py"))
        .args(["--reader", reader, "--table", table, "--columns", &columns.join(",")])
        .env("PYTHONPATH", python_path);
    if let Some(filter) = filter_opt {
        command.args(["--filter", filter]);
    }
    for (key, value) in storage_options {
        command.args(["--storage-option", &format!("{key}={value}")]);
    }
    let output = command.output().context("failed to run read_delta.py")?;
    if !output.status.success() {
        bail!("{reader} failed to read {table}: {}", String::from_utf8_lossy(&output.stderr));
    }
    String::from_utf8(output.stdout)?
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).context("a row is not JSON"))
        .collect()
}

/// Asserts that every outside reader finds exactly `readings` in the local stream table at
/// `table_dir`.
pub fn assert_outside_readers_see(table_dir: &Path, readings: &[serde_json::Value]) {
    for reader in OUTSIDE_READERS {
        let rows =
            outside_reader_rows(reader, &table_dir.to_string_lossy(), &["device_id", "seq", "ts"], None, &[])
                .unwrap_or_else(|error| panic!("{error:#}"));
        let rows = lake_rows_of(&rows);
        assert_eq!(rows.len(), readings.len(), "{reader} read {} rows", rows.len());
        assert_exactly_once(&rows, readings);
    }
}

/// The rows an outside reader printed (with `device_id`, `seq` and `ts` among its columns).
pub fn lake_rows_of(rows: &[serde_json::Value]) -> Vec<LakeRow> {
    rows.iter()
        .map(|row| LakeRow {
            device_id: row["device_id"].as_str().unwrap_or_default().to_string(),
            seq: row["seq"].as_i64().unwrap_or(i64::MIN),
            ts_micros: row["ts"].as_i64().unwrap_or(i64::MIN),
        })
        .collect()
}

/// One read by [`ReadLoop`]: what Python `deltalake` found in the table version it loaded. A
/// failed read has `error_opt` set (the exception's type and message), `version_opt` when the
/// load got that far, and zero counts and an empty digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopRead {
    pub version_opt: Option<i64>,
    pub num_rows: u64,
    pub num_distinct_keys: u64,
    /// [`loop_keys_sha256`] of the rows read.
    pub keys_sha256: String,
    /// Data files of the version read.
    pub num_files: u64,
    /// Wall clock, microseconds since the epoch (comparable with [`now_micros`]).
    pub started_micros: i64,
    pub finished_micros: i64,
    pub error_opt: Option<String>,
}

impl LoopRead {
    fn from_json(line: &serde_json::Value) -> anyhow::Result<Self> {
        let integer = |name: &str| line[name].as_i64().with_context(|| format!("no integer {name}"));
        let count = |name: &str| line[name].as_u64().with_context(|| format!("no count {name}"));
        let started_micros = integer("started_micros")?;
        let finished_micros = integer("finished_micros")?;
        if let Some(error) = line.get("error") {
            return Ok(Self {
                version_opt: line["version"].as_i64(),
                num_rows: 0,
                num_distinct_keys: 0,
                keys_sha256: String::new(),
                num_files: 0,
                started_micros,
                finished_micros,
                error_opt: Some(error.as_str().map_or_else(|| error.to_string(), str::to_string)),
            });
        }
        Ok(Self {
            version_opt: Some(integer("version")?),
            num_rows: count("num_rows")?,
            num_distinct_keys: count("num_distinct_keys")?,
            keys_sha256: line["keys_sha256"].as_str().context("no keys_sha256")?.to_string(),
            num_files: count("num_files")?,
            started_micros,
            finished_micros,
            error_opt: None,
        })
    }
}

/// The reads in read_loop.py's output: one JSON object per line. A last line without its
/// newline is still being written and is left for the next look.
pub fn parse_loop_reads(text: &str) -> anyhow::Result<Vec<LoopRead>> {
    text.split_inclusive('\n')
        .filter(|line| line.ends_with('\n') && !line.trim().is_empty())
        .map(|line| {
            let value: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("a read is not JSON: {line}"))?;
            LoopRead::from_json(&value).with_context(|| format!("unexpected read: {line}"))
        })
        .collect()
}

/// The digest read_loop.py writes as `keys_sha256`, computed from readings as
/// [`telemetry_readings`] makes them, so that one string compares a whole read with them.
///
/// Format (the same bytes as `keys_digest` in integration-tests/readers/read_loop.py): each row's
/// key is `<device_id>/<seq>` (the device id as it is, seq in decimal; a missing value is
/// `<null>`), e.g. `dev-0003/17`; the keys, duplicates kept, are sorted by bytes (UTF-8 byte
/// order is Python's code point order), each followed by `\n`; the digest is the lowercase hex
/// SHA-256 of that text.
pub fn loop_keys_sha256(readings: &[serde_json::Value]) -> String {
    use sha2::Digest;
    let mut keys: Vec<String> = readings
        .iter()
        .map(|reading| {
            let device_id = reading["device_id"].as_str().unwrap_or("<null>");
            let seq = reading["seq"].as_i64().map_or_else(|| "<null>".to_string(), |seq| seq.to_string());
            format!("{device_id}/{seq}")
        })
        .collect();
    keys.sort();
    let mut text = String::with_capacity(keys.iter().map(|key| key.len() + 1).sum());
    for key in &keys {
        text.push_str(key);
        text.push('\n');
    }
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// A Python `deltalake` reader in a child process (integration-tests/readers/read_loop.py)
/// reading the (device_id, seq) of a Delta table's latest version over and over, one
/// [`LoopRead`] per read, until [`ReadLoop::stop`]. Killed on drop; its files live in a
/// temporary directory of its own.
#[derive(Debug)]
pub struct ReadLoop {
    child: Child,
    files: tempfile::TempDir,
}

impl ReadLoop {
    /// Starts reading `table` (a local path, or an `s3://` URL with `storage_options`). The
    /// table must exist already.
    pub async fn start(table: &str, storage_options: &[(String, String)]) -> anyhow::Result<Self> {
        // The first call may install the readers (about 20 s): off the runtime's workers.
        let python_path = tokio::task::spawn_blocking(delta_readers_python_path)
            .await
            .context("the delta-readers.sh lookup panicked")??;
        let files = tempfile::TempDir::new().context("failed to create the read loop's directory")?;
        let stderr = std::fs::File::create(files.path().join("stderr"))
            .context("failed to create the read loop's stderr file")?;
        // Anything Python prints lands next to its errors.
        let stdout = stderr.try_clone().context("failed to share the read loop's stderr file")?;
        let mut command = Command::new("python3");
        command
            .arg(repo_root().join("integration-tests/readers/read_loop.py"))
            .arg("--table")
            .arg(table)
            .arg("--stop-file")
            .arg(files.path().join("stop"))
            .arg("--out")
            .arg(files.path().join("reads.jsonl"))
            .args(["--columns", "device_id,seq"])
            .env("PYTHONPATH", python_path)
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        for (key, value) in storage_options {
            command.arg("--storage-option").arg(format!("{key}={value}"));
        }
        let child = command.spawn().context("failed to start read_loop.py")?;
        Ok(Self { child, files })
    }

    /// The reads made so far.
    pub fn reads(&self) -> anyhow::Result<Vec<LoopRead>> {
        match std::fs::read_to_string(self.files.path().join("reads.jsonl")) {
            Ok(text) => parse_loop_reads(&text),
            // The loop opens its output once Python has imported deltalake.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => Err(error).context("failed to read read_loop.py's output"),
        }
    }

    /// Waits until the loop has made `num_reads` reads (failed ones count too) and returns them;
    /// an error if it exits first or takes longer than `timeout`.
    pub async fn wait_for_reads(
        &mut self,
        num_reads: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<LoopRead>> {
        let deadline = Instant::now() + timeout;
        loop {
            let reads = self.reads()?;
            if reads.len() >= num_reads {
                return Ok(reads);
            }
            if let Some(status) = self.child.try_wait().context("failed to poll read_loop.py")? {
                bail!("read_loop.py exited ({status}) after {} reads: {}", reads.len(), self.stderr());
            }
            if Instant::now() >= deadline {
                bail!("read_loop.py made {} of {num_reads} reads within {timeout:?}", reads.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates the stop file, waits (up to `timeout`) for the loop to finish its read and exit
    /// 0, and returns every read it made.
    pub async fn stop(mut self, timeout: Duration) -> anyhow::Result<Vec<LoopRead>> {
        std::fs::write(self.files.path().join("stop"), b"").context("failed to create the stop file")?;
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("read_loop.py did not stop within {timeout:?}"))?
            .context("failed to wait for read_loop.py")?;
        if !status.success() {
            bail!("read_loop.py exited with {status}: {}", self.stderr());
        }
        self.reads()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.files.path().join("stderr")).unwrap_or_default()
    }
}

#[cfg(test)]
mod read_loop_tests {
    use super::*;

    #[test]
    fn the_key_digest_matches_read_loop_py() {
        // Computed by read_loop.py's keys_digest for these three rows, in another order.
        let readings = [
            serde_json::json!({"device_id": "dev-0001", "seq": 10}),
            serde_json::json!({"device_id": "dev-0000", "seq": 2}),
            serde_json::json!({"device_id": "dev-0001", "seq": 9}),
        ];
        assert_eq!(
            loop_keys_sha256(&readings),
            "60e8da81d5bf9ee5be656cd62da8453875731bea28c2f96c972c846f4d21aa59"
        );
    }

    #[test]
    fn reads_and_failed_reads_parse_and_a_partial_line_waits() {
        let text = concat!(
            r#"{"version":3,"num_rows":2,"num_distinct_keys":2,"keys_sha256":"ab","num_files":4,"#,
            r#""started_micros":10,"finished_micros":20}"#,
            "\n",
            r#"{"error":"FileNotFoundError: gone","version":null,"started_micros":30,"finished_micros":31}"#,
            "\n",
            r#"{"version":4,"num_ro"#,
        );
        let reads = parse_loop_reads(text).unwrap();
        assert_eq!(reads.len(), 2);
        assert_eq!((reads[0].version_opt, reads[0].num_rows, reads[0].num_files), (Some(3), 2, 4));
        assert_eq!(reads[0].error_opt, None);
        assert_eq!(reads[1].version_opt, None);
        assert_eq!(reads[1].error_opt.as_deref(), Some("FileNotFoundError: gone"));
        assert!(parse_loop_reads("{\"version\":1}\n").is_err(), "a read line without its counts");
    }
}
