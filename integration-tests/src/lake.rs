//! The lake from the test's side: its rows read back by the log replayed here, through the
//! object store and by the executor's DataFusion, and the assertions on them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{assert_outside_readers_see, repo_root, wait_until};

/// The lake in a local directory, as the services open it.
pub fn open_local_lake(directory: &Path) -> sluice_lake::Lake {
    let config =
        sluice_lake::ObjectStoreConfig { url: directory.display().to_string(), ..Default::default() };
    let (store, root) = sluice_lake::open_store(&config).expect("local lake directory");
    sluice_lake::Lake::new(store, root)
}

/// One row read back from the lake.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LakeRow {
    pub device_id: String,
    pub seq: i64,
    pub ts_micros: i64,
}

/// Every row of the stream table at `<lake_dir>/<stream>/` as its Delta log's latest version
/// has it, with a check that each file sits in the Hive partition of its rows' event times.
///
/// The log is replayed here from its JSON commits (adds less removes), independently of
/// delta-rs, the way any Delta reader must: files outside the log do not count.
pub fn read_lake_rows(lake_dir: &Path, stream: &str) -> anyhow::Result<Vec<LakeRow>> {
    let table_dir = lake_dir.join(stream);
    let mut rows = Vec::new();
    for relative in delta_live_files(&table_dir)? {
        for row in parquet_rows(bytes::Bytes::from(std::fs::read(table_dir.join(&relative))?))? {
            let partition = sluice_lake::PartitionKey::for_event_time(
                row.ts_micros,
                sluice_lake::PartitionGranularity::Hour,
            );
            if !relative.starts_with(&partition.to_string()) {
                bail!("row with ts {} ({partition}) is in {relative}", row.ts_micros);
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The data files (relative to the table) of a local Delta table's latest version, from its
/// JSON commits. Empty when the table has no log yet.
pub fn delta_live_files(table_dir: &Path) -> anyhow::Result<Vec<String>> {
    let log_dir = table_dir.join("_delta_log");
    let Ok(entries) = std::fs::read_dir(&log_dir) else { return Ok(Vec::new()) };
    let mut commits: Vec<(u64, PathBuf)> = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some(version) = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".json"))
            .and_then(|version| version.parse::<u64>().ok())
        else {
            continue;
        };
        commits.push((version, path));
    }
    commits.sort();
    for (index, (version, _)) in commits.iter().enumerate() {
        if *version != index as u64 {
            bail!(
                "the log of {} has no commit {index} (log cleanup is not expected in tests)",
                table_dir.display()
            );
        }
    }
    let mut live = std::collections::BTreeSet::new();
    for (_, path) in commits {
        for line in std::fs::read_to_string(&path)?.lines().filter(|line| !line.trim().is_empty()) {
            let action: serde_json::Value = serde_json::from_str(line)?;
            if let Some(path) = action["add"]["path"].as_str() {
                live.insert(path.to_string());
            } else if let Some(path) = action["remove"]["path"].as_str() {
                live.remove(path);
            }
        }
    }
    Ok(live.into_iter().collect())
}

/// What one version of a local Delta table's log made readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogVersion {
    pub version: u64,
    /// The log entry's modification time, microseconds since the epoch. The store writes an entry
    /// to a staging file and hard-links it into place complete, so this is when a reader could
    /// first find it (to the kernel's coarse file clock, a few milliseconds).
    pub written_at_micros: i64,
    /// When [`DeltaLogReader::read_next`] found the entry: an upper bound of the same moment.
    pub found_at_micros: i64,
    /// The rows of the files its `add` actions with `dataChange: true` name. A merge's output
    /// (`dataChange: false`) holds rows an earlier version made readable, and is left out.
    pub added_rows: Vec<LakeRow>,
}

/// Reads a local Delta table's log version by version, from version 0, as it grows.
#[derive(Debug)]
pub struct DeltaLogReader {
    table_dir: PathBuf,
    next_version: u64,
}

impl DeltaLogReader {
    pub fn new(table_dir: &Path) -> Self {
        Self { table_dir: table_dir.to_path_buf(), next_version: 0 }
    }

    /// The version [`DeltaLogReader::read_next`] looks for: how many were read.
    pub fn next_version(&self) -> u64 {
        self.next_version
    }

    /// The next version, or `None` while its log entry does not exist. Versions are numbered
    /// without gaps, so the next one's file is all there is to look for.
    pub fn read_next(&mut self) -> anyhow::Result<Option<LogVersion>> {
        let version = self.next_version;
        let entry = self.table_dir.join("_delta_log").join(format!("{version:020}.json"));
        let modified = match std::fs::metadata(&entry) {
            Ok(metadata) => metadata.modified()?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(anyhow::Error::new(error).context(format!("failed to stat {}", entry.display())));
            }
        };
        let found_at_micros = crate::now_micros();
        let written_at_micros = modified
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |since| i64::try_from(since.as_micros()).unwrap_or(i64::MAX));
        let mut added_rows = Vec::new();
        let text =
            std::fs::read_to_string(&entry).with_context(|| format!("failed to read {}", entry.display()))?;
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let action: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("a line of {} is not JSON", entry.display()))?;
            let add = &action["add"];
            if add["dataChange"].as_bool() != Some(true) {
                continue;
            }
            let relative = add["path"].as_str().context("an add action without a path")?;
            let file = self.table_dir.join(relative);
            let contents =
                std::fs::read(&file).with_context(|| format!("failed to read {}", file.display()))?;
            added_rows.extend(parquet_rows(bytes::Bytes::from(contents))?);
        }
        self.next_version = version + 1;
        Ok(Some(LogVersion { version, written_at_micros, found_at_micros, added_rows }))
    }
}

/// The (device_id, seq, ts) of every row of one Parquet file of a stream table, reading only
/// those three columns.
pub fn parquet_rows(bytes: bytes::Bytes) -> anyhow::Result<Vec<LakeRow>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int64Type, TimestampMicrosecondType};
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes)?;
    let projection = ProjectionMask::columns(builder.parquet_schema(), ["device_id", "seq", "ts"]);
    let mut rows = Vec::new();
    for batch in builder.with_projection(projection).build()? {
        let batch = batch?;
        let devices = batch.column_by_name("device_id").context("device_id")?.as_string::<i32>().clone();
        let seqs = batch.column_by_name("seq").context("seq")?.as_primitive::<Int64Type>().clone();
        let times =
            batch.column_by_name("ts").context("ts")?.as_primitive::<TimestampMicrosecondType>().clone();
        rows.extend((0..batch.num_rows()).map(|row| LakeRow {
            device_id: devices.value(row).to_string(),
            seq: seqs.value(row),
            ts_micros: times.value(row),
        }));
    }
    Ok(rows)
}

/// Every row of the files that the flushes in the Delta log list (`Lake::commits`, from each
/// commit's `sluice.flushes`), fetched through the object store by path. Merges are not applied:
/// the files are read as flushed, merge outputs left out, so every file a flush committed must
/// still be at its final path (a merged-away file the janitor deleted fails the read).
pub async fn read_committed_rows(lake: &sluice_lake::Lake, stream: &str) -> anyhow::Result<Vec<LakeRow>> {
    let files: Vec<sluice_lake::CommittedFile> =
        lake.commits(stream).await?.into_iter().flat_map(|commit| commit.files).collect();
    read_rows_of(lake, &files).await
}

/// Every row of the live files (commits, less merged-away files, plus merge outputs).
pub async fn read_live_rows(lake: &sluice_lake::Lake, stream: &str) -> anyhow::Result<Vec<LakeRow>> {
    read_rows_of(lake, &lake.live_files(stream).await?).await
}

pub async fn read_rows_of(
    lake: &sluice_lake::Lake,
    files: &[sluice_lake::CommittedFile],
) -> anyhow::Result<Vec<LakeRow>> {
    let mut rows = Vec::new();
    for file in files {
        rows.extend(parquet_rows(lake.get(&file.path).await?)?);
    }
    Ok(rows)
}

/// Waits until the compactor has published the watermark of everything committed to
/// `stream` (over its `partitions`), and returns it: the point up to which windows are complete.
pub async fn settled_watermark(
    lake: &sluice_lake::Lake,
    stream: &str,
    partitions: i32,
    lateness_micros: i64,
) -> i64 {
    let expected = lake
        .watermark(stream, partitions, lateness_micros)
        .await
        .expect("commit records readable")
        .expect("all partitions committed");
    let reached = wait_until(Duration::from_secs(60), || {
        let lake = lake.clone();
        async move {
            lake.published_watermark(stream)
                .await
                .ok()
                .flatten()
                .is_some_and(|published| published.watermark_micros == expected)
        }
    })
    .await;
    assert!(reached, "the watermark {expected} of {stream} is published");
    expected
}

/// Waits until the lake holds at least `expected` rows; returns what it holds then.
pub async fn wait_for_lake_rows(
    lake_dir: &Path,
    stream: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<LakeRow> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = read_lake_rows(lake_dir, stream).unwrap_or_default();
        if rows.len() >= expected || Instant::now() >= deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits, while a compactor merges and vacuums `stream`, until all `num_rows` are committed,
/// every Hive partition is down to one live file (so no merge is left to make), and every file a
/// merge removed is gone from the store (object_store's NotFound, not any error). Returns false
/// on timeout.
pub async fn wait_until_merged_and_vacuumed(
    lake: &sluice_lake::Lake,
    stream: &str,
    num_rows: u64,
    timeout: Duration,
) -> bool {
    use object_store::ObjectStoreExt as _;
    wait_until(timeout, || {
        let lake = lake.clone();
        async move {
            let Ok(commits) = lake.commits(stream).await else { return false };
            if commits.iter().map(|commit| commit.num_rows()).sum::<u64>() < num_rows {
                return false;
            }
            let Ok(live) = lake.live_files(stream).await else { return false };
            let partitions: std::collections::BTreeSet<&str> =
                live.iter().map(|file| file.partition.as_str()).collect();
            if partitions.len() != live.len() {
                return false;
            }
            let Ok(history) = lake.history(stream).await else { return false };
            for path in history.into_iter().flat_map(|commit| commit.removed) {
                let location = lake.absolute(&format!("{stream}/{path}"));
                if !matches!(lake.store().head(&location).await, Err(object_store::Error::NotFound { .. })) {
                    return false;
                }
            }
            true
        }
    })
    .await
}

/// Asserts that `rows` are exactly the (device_id, seq) pairs of `readings`, each once, and
/// that each row's event time is the one produced (where the readings give it in microseconds).
pub fn assert_exactly_once(rows: &[LakeRow], readings: &[serde_json::Value]) {
    let compare_times = readings.iter().all(|reading| reading["ts"].is_i64());
    let key = |device_id: &str, seq: i64, ts_micros: i64| {
        (device_id.to_string(), seq, if compare_times { ts_micros } else { 0 })
    };
    let mut expected: Vec<(String, i64, i64)> = readings
        .iter()
        .map(|reading| {
            key(
                reading["device_id"].as_str().unwrap_or_default(),
                reading["seq"].as_i64().unwrap_or_default(),
                reading["ts"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    expected.sort();
    let mut actual: Vec<(String, i64, i64)> =
        rows.iter().map(|row| key(&row.device_id, row.seq, row.ts_micros)).collect();
    actual.sort();
    let num_duplicates =
        actual.windows(2).filter(|pair| pair[0].0 == pair[1].0 && pair[0].1 == pair[1].1).count();
    assert_eq!(num_duplicates, 0, "{num_duplicates} rows appear more than once");
    assert_eq!(actual.len(), expected.len(), "row count differs from what was produced");
    if let Some((row, reading)) = actual.iter().zip(&expected).find(|(row, reading)| row != reading) {
        panic!("rows differ from what was produced: first difference {row:?} where {reading:?} was produced");
    }
}

/// Paths (relative to `directory`, sorted) of the Parquet files under it, outside `_delta_log`.
pub fn parquet_files_under(directory: &Path) -> Vec<String> {
    fn walk(root: &Path, directory: &Path, files: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(directory) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, files);
            } else if path.extension().is_some_and(|extension| extension == "parquet")
                && let Ok(relative) = path.strip_prefix(root)
                && !relative.starts_with("_delta_log")
            {
                files.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    let mut files = Vec::new();
    walk(directory, directory, &mut files);
    files.sort();
    files
}

/// The rows of a stream table in a local lake as the executor's DataFusion reads them: the
/// latest Delta version of the table, through the executor's own catalog.
pub async fn datafusion_rows(lake_dir: &Path, stream: &str) -> anyhow::Result<Vec<LakeRow>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int64Type, TimestampMicrosecondType};
    let (store, root) = sluice_lake::open_store(&sluice_lake::ObjectStoreConfig {
        url: lake_dir.display().to_string(),
        ..Default::default()
    })?;
    let registry =
        std::sync::Arc::new(sluice_schema::SchemaRegistry::load_directory(&repo_root().join("schemas"))?);
    let catalog = sluice_executor::Catalog::new(store, root, registry, Vec::new());
    let snapshot = catalog.snapshot().await?;
    let ctx = catalog.session(&snapshot, sluice_executor::Scope::All, false).await?;
    let sql = format!("SELECT device_id, seq, ts FROM \"{stream}\"");
    let frame =
        sluice_executor::plan_query(&ctx, &sql, None).await.map_err(|error| anyhow::anyhow!("{error}"))?;
    let mut rows = Vec::new();
    for batch in frame.collect().await? {
        // Strings come out as views or plain arrays depending on the scan's settings.
        let devices: Vec<String> = match batch.column(0).as_string_view_opt() {
            Some(views) => views.iter().map(|value| value.unwrap_or_default().to_string()).collect(),
            None => batch
                .column(0)
                .as_string::<i32>()
                .iter()
                .map(|value| value.unwrap_or_default().to_string())
                .collect(),
        };
        let seqs = batch.column(1).as_primitive::<Int64Type>();
        let times = batch.column(2).as_primitive::<TimestampMicrosecondType>();
        rows.extend((0..batch.num_rows()).map(|row| LakeRow {
            device_id: devices[row].clone(),
            seq: seqs.value(row),
            ts_micros: times.value(row),
        }));
    }
    Ok(rows)
}

/// Asserts that the stream table in a local lake holds exactly `readings`, each once with its
/// values, as read by three independent paths: the log replayed here, every outside reader
/// (Python deltalake, Polars, DuckDB), and the executor's DataFusion.
pub async fn assert_every_reader_sees(lake_dir: &Path, stream: &str, readings: &[serde_json::Value]) {
    assert_exactly_once(
        &read_lake_rows(lake_dir, stream).unwrap_or_else(|error| panic!("the log: {error:#}")),
        readings,
    );
    assert_outside_readers_see(&lake_dir.join(stream), readings);
    let rows =
        datafusion_rows(lake_dir, stream).await.unwrap_or_else(|error| panic!("DataFusion: {error:#}"));
    assert_exactly_once(&rows, readings);
}
