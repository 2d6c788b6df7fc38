//! What the executor tells the world: job status (JSON on `<prefix>.job-status`) and one run
//! event per attempt (Avro on `<prefix>.job-runs`, schemas/events/job-run.avsc).

use std::sync::LazyLock;

use apache_avro::Schema as AvroSchema;
use apache_avro::types::Value as AvroValue;
use serde::{Deserialize, Serialize};
use sluice_schema::{fingerprint_of, split_single_object, write_single_object_header};

/// Writer schema of run events; the same file readers are pointed to.
pub const JOB_RUN_SCHEMA_JSON: &str = include_str!("../../../schemas/events/job-run.avsc");

#[allow(clippy::expect_used, reason = "a schema compiled into the binary and checked by a test")]
static JOB_RUN_SCHEMA: LazyLock<(AvroSchema, u64)> = LazyLock::new(|| {
    let schema = AvroSchema::parse_str(JOB_RUN_SCHEMA_JSON).expect("job-run.avsc parses");
    let fingerprint = fingerprint_of(&schema);
    (schema, fingerprint)
});

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatusKind {
    Accepted,
    Rejected,
    Deleted,
    /// A window failed every attempt; it is not retried unless backfilled.
    WindowFailed,
    /// A backfill request was refused (the reason says why); the job itself runs on.
    BackfillRefused,
    /// A definition or deletion no trusted key authorized (the reason says why); nothing
    /// changed, and the job as it was, if any, runs on.
    Refused,
}

/// A status event, keyed by job name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatusEvent {
    pub job: String,
    pub status: JobStatusKind,
    /// Why a job was rejected or a window failed; empty otherwise.
    pub reason: String,
    /// Where the definition this is about sits in the jobs topic.
    pub definition_partition: i32,
    pub definition_offset: i64,
    /// For `window_failed`.
    pub window_start_opt: Option<String>,
    pub at: String,
    pub executor: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunStatus {
    Succeeded,
    /// The last attempt failed: the window is marked failed.
    Failed,
    /// This attempt failed; another follows after a backoff.
    Retrying,
}

impl RunStatus {
    fn symbol(self) -> &'static str {
        match self {
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Retrying => "RETRYING",
        }
    }

    fn from_symbol(symbol: &str) -> Option<Self> {
        match symbol {
            "SUCCEEDED" => Some(Self::Succeeded),
            "FAILED" => Some(Self::Failed),
            "RETRYING" => Some(Self::Retrying),
            _ => None,
        }
    }
}

/// One attempt of a job over one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRunEvent {
    pub job: String,
    pub window_start_micros: i64,
    pub window_end_micros: i64,
    pub revision: i32,
    pub attempt: i32,
    pub status: RunStatus,
    pub started_at_micros: i64,
    pub finished_at_micros: i64,
    pub duration_ms: i64,
    pub rows_read: i64,
    pub bytes_read: i64,
    pub files_read: i64,
    pub rows_written: i64,
    pub bytes_written: i64,
    pub result_path_opt: Option<String>,
    pub error_opt: Option<String>,
    pub executor: String,
    /// JSON object of the Delta table version each stream table was read at.
    pub input_versions_opt: Option<String>,
    /// The results table version that holds the result.
    pub result_version_opt: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("not a Sluice single-object Avro value")]
    Wire(#[from] sluice_schema::WireError),
    #[error("written with schema {0:016x}, not the job-run schema")]
    UnknownSchema(u64),
    #[error("invalid job-run value")]
    Avro(#[from] Box<apache_avro::Error>),
    #[error("job-run value lacks field '{0}' or has the wrong type")]
    Field(&'static str),
}

impl JobRunEvent {
    /// Single-object Avro encoding, like every other Sluice value.
    pub fn encode(&self) -> Result<Vec<u8>, EventError> {
        let (schema, fingerprint) = &*JOB_RUN_SCHEMA;
        let optional = |value: &Option<String>| match value {
            Some(text) => AvroValue::Union(1, Box::new(AvroValue::String(text.clone()))),
            None => AvroValue::Union(0, Box::new(AvroValue::Null)),
        };
        let record = AvroValue::Record(vec![
            ("job".into(), AvroValue::String(self.job.clone())),
            ("window_start".into(), AvroValue::TimestampMicros(self.window_start_micros)),
            ("window_end".into(), AvroValue::TimestampMicros(self.window_end_micros)),
            ("revision".into(), AvroValue::Int(self.revision)),
            ("attempt".into(), AvroValue::Int(self.attempt)),
            ("status".into(), AvroValue::Enum(self.status as u32, self.status.symbol().to_string())),
            ("started_at".into(), AvroValue::TimestampMicros(self.started_at_micros)),
            ("finished_at".into(), AvroValue::TimestampMicros(self.finished_at_micros)),
            ("duration_ms".into(), AvroValue::Long(self.duration_ms)),
            ("rows_read".into(), AvroValue::Long(self.rows_read)),
            ("bytes_read".into(), AvroValue::Long(self.bytes_read)),
            ("files_read".into(), AvroValue::Long(self.files_read)),
            ("rows_written".into(), AvroValue::Long(self.rows_written)),
            ("bytes_written".into(), AvroValue::Long(self.bytes_written)),
            ("result_path".into(), optional(&self.result_path_opt)),
            ("error".into(), optional(&self.error_opt)),
            ("executor".into(), AvroValue::String(self.executor.clone())),
            ("input_versions".into(), optional(&self.input_versions_opt)),
            (
                "result_version".into(),
                match self.result_version_opt {
                    Some(version) => AvroValue::Union(1, Box::new(AvroValue::Long(version))),
                    None => AvroValue::Union(0, Box::new(AvroValue::Null)),
                },
            ),
        ]);
        let writer =
            apache_avro::writer::datum::GenericDatumWriter::builder(schema).build().map_err(Box::new)?;
        let datum = writer.write_value_to_vec(record).map_err(Box::new)?;
        let mut out = Vec::with_capacity(datum.len() + 10);
        write_single_object_header(*fingerprint, &mut out);
        out.extend_from_slice(&datum);
        Ok(out)
    }

    pub fn decode(value: &[u8]) -> Result<Self, EventError> {
        let (schema, expected) = &*JOB_RUN_SCHEMA;
        let (fingerprint, mut datum) = split_single_object(value)?;
        if fingerprint != *expected {
            return Err(EventError::UnknownSchema(fingerprint));
        }
        let reader =
            apache_avro::reader::datum::GenericDatumReader::builder(schema).build().map_err(Box::new)?;
        let AvroValue::Record(fields) = reader.read_value(&mut datum).map_err(Box::new)? else {
            return Err(EventError::Field("record"));
        };
        let get = |name: &'static str| {
            fields
                .iter()
                .find(|(field, _)| field == name)
                .map(|(_, value)| value)
                .ok_or(EventError::Field(name))
        };
        let long = |name: &'static str| match get(name)? {
            AvroValue::Long(value) | AvroValue::TimestampMicros(value) => Ok(*value),
            _ => Err(EventError::Field(name)),
        };
        let int = |name: &'static str| match get(name)? {
            AvroValue::Int(value) => Ok(*value),
            _ => Err(EventError::Field(name)),
        };
        let string = |name: &'static str| match get(name)? {
            AvroValue::String(value) => Ok(value.clone()),
            _ => Err(EventError::Field(name)),
        };
        let optional = |name: &'static str| match get(name)? {
            AvroValue::Union(_, inner) => match inner.as_ref() {
                AvroValue::String(value) => Ok(Some(value.clone())),
                _ => Ok(None),
            },
            _ => Err(EventError::Field(name)),
        };
        let status = match get("status")? {
            AvroValue::Enum(_, symbol) => {
                RunStatus::from_symbol(symbol).ok_or(EventError::Field("status"))?
            }
            _ => return Err(EventError::Field("status")),
        };
        Ok(Self {
            job: string("job")?,
            window_start_micros: long("window_start")?,
            window_end_micros: long("window_end")?,
            revision: int("revision")?,
            attempt: int("attempt")?,
            status,
            started_at_micros: long("started_at")?,
            finished_at_micros: long("finished_at")?,
            duration_ms: long("duration_ms")?,
            rows_read: long("rows_read")?,
            bytes_read: long("bytes_read")?,
            files_read: long("files_read")?,
            rows_written: long("rows_written")?,
            bytes_written: long("bytes_written")?,
            result_path_opt: optional("result_path")?,
            error_opt: optional("error")?,
            executor: string("executor")?,
            input_versions_opt: optional("input_versions")?,
            result_version_opt: match get("result_version")? {
                AvroValue::Union(_, inner) => match inner.as_ref() {
                    AvroValue::Long(version) => Some(*version),
                    _ => None,
                },
                _ => return Err(EventError::Field("result_version")),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use super::*;

    #[test]
    fn run_events_round_trip_through_avro() {
        let event = JobRunEvent {
            job: "hourly".into(),
            window_start_micros: 1_795_680_000_000_000,
            window_end_micros: 1_795_683_600_000_000,
            revision: 1,
            attempt: 2,
            status: RunStatus::Retrying,
            started_at_micros: 1,
            finished_at_micros: 2,
            duration_ms: 3,
            rows_read: 4,
            bytes_read: 5,
            files_read: 6,
            rows_written: 7,
            bytes_written: 8,
            result_path_opt: None,
            error_opt: Some("Schema error: No field named x".into()),
            executor: "executor-0".into(),
            input_versions_opt: Some("{\"telemetry\":12}".into()),
            result_version_opt: Some(3),
        };
        let bytes = event.encode().unwrap();
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        assert_eq!(JobRunEvent::decode(&bytes).unwrap(), event);
        assert!(matches!(JobRunEvent::decode(&bytes[1..]), Err(EventError::Wire(_))));
    }
}
