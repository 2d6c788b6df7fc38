//! The audit trail of job requests: every definition, deletion and backfill request an executor
//! saw, accepted or refused, as rows of a Delta table in the lake (`_sluice/audit/jobs`), so that
//! any engine that reads the lake can read it. Entries are only ever appended: each is a file of
//! its own in a commit of its own, and nothing in Sluice removes one.

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::{Deserialize, Serialize};
use sluice_lake::layout::{JOBS_AUDIT_TABLE, audit_file};
use sluice_lake::{CommittedFile, Lake, LakeError};

use crate::signing::SignedAction;

/// What the executor decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Accepted,
    Refused,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Refused => "refused",
        }
    }
}

/// One row of the audit table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// When the executor decided, µs since the epoch (UTC).
    pub at_micros: i64,
    /// The executor replica that decided (`executor.instance_id`).
    pub executor: String,
    /// Where the request is: `<topic>/<partition>@<offset>` for the jobs topic, the record's path
    /// for a backfill request. A request read again (a restart, a rebalance) keeps its verdict.
    pub source: String,
    pub action: SignedAction,
    pub job: String,
    /// The key that signed it, when the signature verified.
    pub key_name_opt: Option<String>,
    /// SHA-256 (hex) of the SQL file of a definition.
    pub sql_sha256_opt: Option<String>,
    /// SHA-256 (hex) of what the request asks (`signing::request_sha256`): a decision holds only
    /// for the request it was made on, not for another put at the same place.
    pub request_sha256: String,
    /// SHA-256 (hex) of the signature: the same signature on another request is a replay.
    pub signature_sha256_opt: Option<String>,
    /// When the request says it was signed, µs since the epoch.
    pub signed_at_micros_opt: Option<i64>,
    pub verdict: Verdict,
    /// Why it was refused, or what was noted about an accepted one; empty when nothing.
    pub reason: String,
}

fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The table's columns, in order.
pub fn audit_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("at", timestamp_type(), false),
        Field::new("executor", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("action", DataType::Utf8, false),
        Field::new("job", DataType::Utf8, false),
        Field::new("key_name", DataType::Utf8, true),
        Field::new("sql_sha256", DataType::Utf8, true),
        Field::new("request_sha256", DataType::Utf8, false),
        Field::new("signature_sha256", DataType::Utf8, true),
        Field::new("signed_at", timestamp_type(), true),
        Field::new("verdict", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
    ]))
}

fn to_batch(entries: &[AuditEntry]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let strings = |pick: fn(&AuditEntry) -> Option<&str>| -> ArrayRef {
        Arc::new(entries.iter().map(pick).collect::<StringArray>())
    };
    let times = |pick: fn(&AuditEntry) -> Option<i64>| -> ArrayRef {
        Arc::new(entries.iter().map(pick).collect::<TimestampMicrosecondArray>().with_timezone("UTC"))
    };
    RecordBatch::try_new(
        audit_schema(),
        vec![
            times(|entry| Some(entry.at_micros)),
            strings(|entry| Some(&entry.executor)),
            strings(|entry| Some(&entry.source)),
            strings(|entry| Some(entry.action.as_str())),
            strings(|entry| Some(&entry.job)),
            strings(|entry| entry.key_name_opt.as_deref()),
            strings(|entry| entry.sql_sha256_opt.as_deref()),
            strings(|entry| Some(&entry.request_sha256)),
            strings(|entry| entry.signature_sha256_opt.as_deref()),
            times(|entry| entry.signed_at_micros_opt),
            strings(|entry| Some(entry.verdict.as_str())),
            strings(|entry| Some(&entry.reason)),
        ],
    )
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Lake(#[from] LakeError),
    #[error("audit file {path} cannot be written or read")]
    Parquet {
        path: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("audit file {path} has no valid column {column}")]
    Column { path: String, column: &'static str },
}

/// Appends entries in one file and one commit; `unique` keeps concurrent writers' files apart.
pub async fn append_audit(lake: &Lake, entries: &[AuditEntry], unique: &str) -> Result<(), AuditError> {
    let Some(first) = entries.first() else { return Ok(()) };
    let path = audit_file(first.at_micros, unique);
    let parquet_error = |source| AuditError::Parquet { path: path.clone(), source };
    let batch = to_batch(entries).map_err(|source| parquet_error(source.into()))?;
    let mut bytes = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut bytes, audit_schema(), None).map_err(parquet_error)?;
    writer.write(&batch).map_err(parquet_error)?;
    writer.close().map_err(parquet_error)?;
    let size_bytes = bytes.len() as u64;
    lake.put(&path, bytes).await?;
    let (min, max) = entries
        .iter()
        .fold((i64::MAX, i64::MIN), |(min, max), entry| (min.min(entry.at_micros), max.max(entry.at_micros)));
    let file = CommittedFile {
        path: path.clone(),
        partition: String::new(),
        num_rows: entries.len() as u64,
        size_bytes,
        min_event_time_micros: min,
        max_event_time_micros: max,
    };
    let stats = sluice_lake::delta_stats(std::slice::from_ref(&batch));
    lake.append_file(JOBS_AUDIT_TABLE, &file, &stats, &audit_schema()).await?;
    Ok(())
}

/// The audit table's files in its latest version (paths relative to the lake root).
pub async fn audit_files(lake: &Lake) -> Result<Vec<String>, AuditError> {
    Ok(lake
        .table_files(JOBS_AUDIT_TABLE)
        .await?
        .map(|(_, files)| files.into_iter().map(|file| file.path).collect())
        .unwrap_or_default())
}

/// The entries of one audit file.
pub async fn read_audit_file(lake: &Lake, path: &str) -> Result<Vec<AuditEntry>, AuditError> {
    let bytes = lake.get(path).await?;
    let parquet_error = |source| AuditError::Parquet { path: path.to_string(), source };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(parquet_error)?
        .build()
        .map_err(parquet_error)?;
    let mut entries = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|source| parquet_error(source.into()))?;
        entries.extend(from_batch(&batch, path)?);
    }
    Ok(entries)
}

/// Every entry, oldest first.
pub async fn load_audit(lake: &Lake) -> Result<Vec<AuditEntry>, AuditError> {
    let mut entries = Vec::new();
    for path in audit_files(lake).await? {
        entries.extend(read_audit_file(lake, &path).await?);
    }
    entries.sort_by(|a, b| (a.at_micros, &a.source).cmp(&(b.at_micros, &b.source)));
    Ok(entries)
}

fn from_batch(batch: &RecordBatch, path: &str) -> Result<Vec<AuditEntry>, AuditError> {
    let missing = |column: &'static str| AuditError::Column { path: path.to_string(), column };
    let strings = |column: &'static str| {
        batch
            .column_by_name(column)
            .and_then(|array| array.as_any().downcast_ref::<StringArray>())
            .ok_or_else(|| missing(column))
    };
    let times = |column: &'static str| {
        batch
            .column_by_name(column)
            .and_then(|array| array.as_any().downcast_ref::<TimestampMicrosecondArray>())
            .ok_or_else(|| missing(column))
    };
    let (at, executor, source, action, job) =
        (times("at")?, strings("executor")?, strings("source")?, strings("action")?, strings("job")?);
    let (key_name, sql_sha256, request_sha256, signature_sha256, signed_at, verdict, reason) = (
        strings("key_name")?,
        strings("sql_sha256")?,
        // Absent from files written before the column existed: such a row matches no request.
        strings("request_sha256").ok(),
        strings("signature_sha256")?,
        times("signed_at")?,
        strings("verdict")?,
        strings("reason")?,
    );
    let optional =
        |array: &StringArray, row: usize| array.is_valid(row).then(|| array.value(row).to_string());
    (0..batch.num_rows())
        .map(|row| {
            // Parsed by the same names they are written with.
            let action = SignedAction::ALL
                .into_iter()
                .find(|known| known.as_str() == action.value(row))
                .ok_or_else(|| missing("action"))?;
            let verdict = [Verdict::Accepted, Verdict::Refused]
                .into_iter()
                .find(|known| known.as_str() == verdict.value(row))
                .ok_or_else(|| missing("verdict"))?;
            Ok(AuditEntry {
                at_micros: at.value(row),
                executor: executor.value(row).to_string(),
                source: source.value(row).to_string(),
                action,
                job: job.value(row).to_string(),
                key_name_opt: optional(key_name, row),
                sql_sha256_opt: optional(sql_sha256, row),
                request_sha256: request_sha256
                    .map(|column| column.value(row).to_string())
                    .unwrap_or_default(),
                signature_sha256_opt: optional(signature_sha256, row),
                signed_at_micros_opt: signed_at.is_valid(row).then(|| signed_at.value(row)),
                verdict,
                reason: reason.value(row).to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use std::sync::Arc;

    use object_store::memory::InMemory;

    use super::*;

    fn entry(at_micros: i64, source: &str, verdict: Verdict) -> AuditEntry {
        AuditEntry {
            at_micros,
            executor: "executor-1".into(),
            source: source.into(),
            action: SignedAction::Submit,
            job: "hourly".into(),
            key_name_opt: (verdict == Verdict::Accepted).then(|| "alice".to_string()),
            sql_sha256_opt: Some("ab".repeat(32)),
            request_sha256: "cd".repeat(32),
            signature_sha256_opt: None,
            signed_at_micros_opt: Some(at_micros - 5),
            verdict,
            reason: if verdict == Verdict::Refused { "not signed".into() } else { String::new() },
        }
    }

    #[tokio::test]
    async fn appended_entries_read_back_in_time_order_and_are_never_rewritten() {
        let lake = Lake::new(Arc::new(InMemory::new()), object_store::path::Path::from("lake"));
        assert!(load_audit(&lake).await.unwrap().is_empty());
        let first = entry(2_000, "sluice.jobs/0@1", Verdict::Accepted);
        let second = entry(1_000, "sluice.jobs/1@7", Verdict::Refused);
        append_audit(&lake, std::slice::from_ref(&first), "a").await.unwrap();
        let files_after_first = audit_files(&lake).await.unwrap();
        append_audit(&lake, std::slice::from_ref(&second), "b").await.unwrap();
        assert_eq!(load_audit(&lake).await.unwrap(), vec![second, first]);
        let files = audit_files(&lake).await.unwrap();
        assert_eq!(files.len(), 2);
        assert!(
            files_after_first.iter().all(|path| files.contains(path)),
            "the first file is still in the table"
        );
    }
}
