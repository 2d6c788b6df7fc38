//! Column encryption end to end (issue #18): the compactor writes a stream's `site` column with
//! Parquet modular encryption (fresh data keys per file, wrapped by a master key from the key
//! file), flushes and merges alike. Without keys the column cannot be read, and no statistics of
//! it are in the footers or the Delta log, while every other column still reads; with the keys
//! it reads back exactly. The executor decrypts for the jobs allowed to and refuses the others'
//! queries of the column at submission, naming it.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{Array, RecordBatch};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use sluice_integration_tests::{
    Broker, CompactorService, OUTSIDE_READERS, assert_exactly_once, compactor_config, delta_live_files,
    delta_readers_python_path, executor_config, lake_rows_of, outside_reader_rows, produce_readings,
    read_lake_rows, telemetry_readings, unique_suffix, wait_until,
};
use sluice_lake::Lake;
use sluice_lake::encryption::{EncryptedColumnConfig, EncryptionConfig, LakeEncryption, MasterKey};
use sluice_query::Reader;

const HOUR: i64 = 3_600_000_000;

fn site_of(device: &str) -> String {
    format!("field-north-{device}")
}

fn encryption(key_file_opt: Option<std::path::PathBuf>) -> EncryptionConfig {
    EncryptionConfig {
        key_file: key_file_opt,
        footer_key: "footer-2026".into(),
        columns: vec![EncryptedColumnConfig {
            stream: "telemetry".into(),
            column: "site".into(),
            key: "site-2026".into(),
        }],
        decrypting_jobs: vec!["fleet-geo-*".into()],
    }
}

fn lake(directory: &std::path::Path) -> Lake {
    let config =
        sluice_lake::ObjectStoreConfig { url: directory.display().to_string(), ..Default::default() };
    let (store, root) = sluice_lake::open_store(&config).unwrap();
    Lake::new(store, root)
}

/// (device_id, seq) to site, from batches holding all three.
fn sites_of(batches: &[RecordBatch]) -> BTreeMap<(String, i64), String> {
    let mut sites = BTreeMap::new();
    for batch in batches {
        let devices = batch.column_by_name("device_id").unwrap().as_string::<i32>();
        let seqs = batch.column_by_name("seq").unwrap().as_primitive::<Int64Type>();
        let site_column = batch.column_by_name("site").unwrap();
        let site_values = site_column
            .as_string_view_opt()
            .map(|view| (0..view.len()).map(|row| view.value(row).to_string()).collect::<Vec<_>>());
        let site_values = site_values.unwrap_or_else(|| {
            let strings = site_column.as_string::<i32>();
            (0..strings.len()).map(|row| strings.value(row).to_string()).collect()
        });
        for (row, site) in site_values.into_iter().enumerate() {
            sites.insert((devices.value(row).to_string(), seqs.value(row)), site);
        }
    }
    sites
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_columns_are_unreadable_without_keys_and_decrypted_only_for_allowed_jobs() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let keys_dir = tempfile::TempDir::new().unwrap();
    let key_file = keys_dir.path().join("column-keys.toml");
    std::fs::write(
        &key_file,
        format!(
            "footer-2026 = \"{}\"\nsite-2026 = \"{}\"\n",
            MasterKey::generate_base64().unwrap(),
            MasterKey::generate_base64().unwrap()
        ),
    )
    .unwrap();
    let mut readings = telemetry_readings(3_000, 6, 2 * HOUR);
    for reading in &mut readings {
        let device = reading["device_id"].as_str().unwrap().to_string();
        reading["site"] = serde_json::json!(site_of(&device));
    }
    let expected_sites: BTreeMap<(String, i64), String> = readings
        .iter()
        .map(|reading| {
            let device = reading["device_id"].as_str().unwrap().to_string();
            ((device.clone(), reading["seq"].as_i64().unwrap()), site_of(&device))
        })
        .collect();

    let mut config = compactor_config(&broker, &prefix, lake_dir.path());
    config.encryption = encryption(Some(key_file.clone()));
    // Uncompressed, so that a plaintext value would show in the bytes.
    config.parquet.compression = sluice_compactor::config::ParquetCompression::None;
    config.flush.max_age_ms = 150;
    config.merge.interval_ms = 400;
    config.merge.min_partition_age_ms = 0;
    config.merge.small_file_bytes = 1024 * 1024;
    let compactor = CompactorService::start(config).await.unwrap();
    for burst in readings.chunks(1_000) {
        produce_readings(&broker.bootstrap_servers(), &format!("{prefix}.telemetry"), burst).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // Every reading in, and the flushes' files merged down to one per partition.
    let lake = lake(lake_dir.path());
    let merged = wait_until(Duration::from_secs(60), || {
        let (lake, lake_dir) = (lake.clone(), lake_dir.path().to_path_buf());
        let num_readings = readings.len();
        async move {
            let Ok(live) = lake.live_files("telemetry").await else { return false };
            let partitions: BTreeSet<&str> = live.iter().map(|file| file.partition.as_str()).collect();
            let rows = read_lake_rows(&lake_dir, "telemetry").map(|rows| rows.len()).unwrap_or(0);
            rows == num_readings && live.len() == partitions.len()
        }
    })
    .await;
    compactor.stop().await.unwrap();
    assert!(merged, "not merged down to one file per partition");
    // The plaintext columns read without any key.
    assert_exactly_once(&read_lake_rows(lake_dir.path(), "telemetry").unwrap(), &readings);

    let schemas =
        sluice_schema::SchemaRegistry::load_directory(&sluice_integration_tests::repo_root().join("schemas"))
            .unwrap();
    let with_keys =
        LakeEncryption::from_config(&encryption(Some(key_file.clone())), &schemas).unwrap().unwrap();
    let table_dir = lake_dir.path().join("telemetry");
    let live = delta_live_files(&table_dir).unwrap();
    assert!(live.iter().any(|file| file.contains("merged-")), "a merge wrote some of {live:?}");
    let mut decrypted = BTreeMap::new();
    for relative in &live {
        let bytes = bytes::Bytes::from(std::fs::read(table_dir.join(relative)).unwrap());
        // Device ids are stored in the clear, sites not.
        assert!(contains(&bytes, b"dev-0001"), "{relative}: the check can see plaintext");
        assert!(!contains(&bytes, b"field-north"), "{relative}: a site in plaintext");
        let keyless = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).unwrap();
        let site_index = keyless.schema().index_of("site").unwrap();
        for row_group in keyless.metadata().row_groups() {
            assert!(row_group.column(site_index).statistics().is_none(), "{relative}: site statistics");
            assert!(row_group.column(0).statistics().is_some(), "{relative}: device_id has statistics");
        }
        let whole = keyless.build().unwrap().collect::<Result<Vec<_>, _>>();
        assert!(whole.is_err(), "{relative}: read all columns without a key");
        let keyless = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).unwrap();
        let projection =
            ProjectionMask::columns(keyless.parquet_schema(), ["device_id", "seq", "temperature"]);
        let plaintext: usize =
            keyless.with_projection(projection).build().unwrap().map(|batch| batch.unwrap().num_rows()).sum();
        assert!(plaintext > 0);

        let options =
            ArrowReaderOptions::new().with_file_decryption_properties(with_keys.decryption().unwrap());
        let keyed = ParquetRecordBatchReaderBuilder::try_new_with_options(bytes, options).unwrap();
        let batches: Vec<RecordBatch> = keyed.build().unwrap().map(Result::unwrap).collect();
        decrypted.extend(sites_of(&batches));
    }
    assert_eq!(decrypted, expected_sites);

    // Outside engines: every Delta reader reads the other columns of the encrypted files, and
    // fails on the encrypted one rather than return its ciphertext.
    // Outside engines, without keys: delta-rs and DuckDB read the other columns and fail on the
    // encrypted one rather than return its ciphertext; Polars' own Parquet reader refuses the
    // files whole (docs/querying.md says which is which).
    let table = table_dir.to_string_lossy();
    for reader in OUTSIDE_READERS {
        let plaintext = outside_reader_rows(reader, &table, &["device_id", "seq", "ts"], None, &[]);
        let encrypted = outside_reader_rows(reader, &table, &["device_id", "site"], None, &[]);
        assert!(encrypted.is_err(), "{reader} read the encrypted column without keys: {encrypted:?}");
        if reader == "polars" {
            let error = format!("{:#}", plaintext.unwrap_err());
            assert!(error.contains("encrypted"), "{error}");
        } else {
            assert_exactly_once(&lake_rows_of(&plaintext.unwrap()), &readings);
        }
    }
    // PyArrow reads it through Parquet's key tools, with a KMS client that opens the data keys as
    // docs/querying.md describes.
    let key_text = std::fs::read_to_string(&key_file).unwrap();
    for relative in &live {
        let output = std::process::Command::new("python3")
            .args(["-c", PYARROW_READER])
            .arg(table_dir.join(relative))
            .arg(&key_text)
            .env("PYTHONPATH", delta_readers_python_path().unwrap())
            .output()
            .unwrap();
        assert!(output.status.success(), "pyarrow: {}", String::from_utf8_lossy(&output.stderr));
        for line in String::from_utf8(output.stdout).unwrap().lines() {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let device = row["device_id"].as_str().unwrap();
            assert_eq!(row["site"], serde_json::json!(site_of(device)), "pyarrow: {row}");
            assert!(expected_sites.contains_key(&(device.to_string(), row["seq"].as_i64().unwrap())));
        }
    }

    // The Delta log's statistics say nothing of the column either.
    let mut num_adds = 0;
    for entry in std::fs::read_dir(table_dir.join("_delta_log")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|extension| extension != "json") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let action: serde_json::Value = serde_json::from_str(line).unwrap();
            let Some(stats) = action["add"]["stats"].as_str() else { continue };
            let stats: serde_json::Value = serde_json::from_str(stats).unwrap();
            num_adds += 1;
            for section in ["minValues", "maxValues", "nullCount"] {
                assert!(stats[section].get("site").is_none(), "{}: {section} of site", path.display());
                assert!(stats[section].get("device_id").is_some(), "{}: {section}", path.display());
            }
        }
    }
    assert!(num_adds > 0);

    // The executor: a job allowed to decrypt reads the sites; another is refused at submission
    // when it reads them, and runs when it does not; a job on Ballista never decrypts.
    let mut executor = executor_config(&broker, &prefix, lake_dir.path());
    executor.encryption = encryption(Some(key_file.clone()));
    let catalog = sluice_executor::open_catalog(&executor).unwrap();
    let job = |name: &str, select: &str| format!("-- name: {name}\n-- window: 1h\n{select}");
    let reads_sites = "SELECT device_id, seq, site FROM telemetry";
    let refused = sluice_executor::validate_job(&catalog, &job("hourly-report", reads_sites), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("telemetry.site") && refused.contains("decrypting_jobs"), "{refused}");
    let filtered = "SELECT count(*) AS n FROM telemetry WHERE site = 'field-north-dev-0001'";
    let refused = sluice_executor::validate_job(&catalog, &job("hourly-report", filtered), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("telemetry.site"), "{refused}");
    let plaintext =
        "SELECT device_id, count(*) AS n, max(temperature) AS t FROM telemetry GROUP BY device_id";
    sluice_executor::validate_job(&catalog, &job("hourly-report", plaintext), None).await.unwrap();
    sluice_executor::validate_job(&catalog, &job("fleet-geo-daily", reads_sites), None).await.unwrap();
    let ballista = format!("-- name: fleet-geo-big\n-- window: 1h\n-- engine: ballista\n{reads_sites}");
    let refused = sluice_query::validate_job(&catalog, &ballista, None, true).await.unwrap_err().to_string();
    assert!(refused.contains("ballista"), "{refused}");

    let snapshot = catalog.snapshot().await.unwrap();
    let allowed = catalog
        .session_for(&snapshot, sluice_executor::Scope::All, false, Reader::Job("fleet-geo-daily"))
        .await
        .unwrap();
    let batches =
        sluice_executor::plan_query(&allowed, reads_sites, None).await.unwrap().collect().await.unwrap();
    assert_eq!(sites_of(&batches), expected_sites);
    // A job that may not decrypt still reads the encrypted files' other columns through
    // DataFusion (page indexes, statistics and all).
    let other = catalog
        .session_for(&snapshot, sluice_executor::Scope::All, false, Reader::Job("hourly-report"))
        .await
        .unwrap();
    let counted =
        sluice_executor::plan_query(&other, "SELECT count(*) AS n, max(seq) AS s FROM telemetry", None)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
    assert_eq!(counted[0].column(0).as_primitive::<Int64Type>().value(0), readings.len() as i64);

    // Knowing the columns without holding keys: every reader is refused them, and told why.
    executor.encryption = encryption(None);
    let keyless_catalog = sluice_executor::open_catalog(&executor).unwrap();
    let session = keyless_catalog.session(&snapshot, sluice_executor::Scope::All, false).await.unwrap();
    let refused = sluice_executor::plan_query(&session, reads_sites, None).await.unwrap_err().to_string();
    assert!(refused.contains("holds no keys"), "{refused}");
}

/// Reads one file's device_id, seq and site with PyArrow's Parquet key tools: argv[1] the file,
/// argv[2] the key file's text. One JSON object per row.
const PYARROW_READER: &str = r#"
import base64, json, sys, tomllib
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

master_keys = {name: base64.b64decode(value) for name, value in tomllib.loads(sys.argv[2]).items()}

class SluiceKeys(pe.KmsClient):
    def __init__(self, config):
        pe.KmsClient.__init__(self)
    def wrap_key(self, key_bytes, master_key_identifier):
        raise NotImplementedError("reading only")
    def unwrap_key(self, wrapped_key, master_key_identifier):
        wrapped = base64.b64decode(wrapped_key)
        aad = master_key_identifier.encode()
        return AESGCM(master_keys[master_key_identifier]).decrypt(wrapped[:12], wrapped[12:], aad)

factory = pe.CryptoFactory(lambda config: SluiceKeys(config))
decryption = factory.file_decryption_properties(pe.KmsConnectionConfig(), pe.DecryptionConfiguration())
table = pq.read_table(sys.argv[1], columns=["device_id", "seq", "site"], decryption_properties=decryption)
for row in table.to_pylist():
    print(json.dumps(row))
"#;

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}
