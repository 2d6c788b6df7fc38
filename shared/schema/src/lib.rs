//! Stream schemas. A stream is defined by one Avro schema file `schemas/<stream>.avsc`: a flat
//! record with the device key `device_id` (string), the event time `ts` (timestamp-micros or
//! timestamp-millis) and the per-device sequence number `seq` (long). This crate loads and checks
//! those files, validates JSON readings against them, writes the Avro single-object wire format
//! that names the writer schema, and maps the schemas to Arrow for the compactor.
//!
//! The file passes 500 lines only with its tests.

mod arrow;
mod decode;
mod json;
mod reading;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use apache_avro::Schema as AvroSchema;

pub use crate::arrow::to_arrow_schema;
pub use crate::decode::{Decoded, DecoderSetupError, StreamDecoder, event_times_micros};
pub use crate::json::{EventTimeLimits, FieldError, RecordMeta, describe_micros, parse_event_time};
pub use crate::reading::{JsonScalar, ReadingFields};
pub use crate::wire::{
    SINGLE_OBJECT_MARKER, WireError, single_object_header, split_single_object, write_single_object_header,
};

/// Name of the field that keys records (the Kafka message key).
pub const KEY_FIELD: &str = "device_id";
/// Name of the event-time field.
pub const EVENT_TIME_FIELD: &str = "ts";
/// Name of the per-device sequence number field.
pub const SEQUENCE_FIELD: &str = "seq";

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("failed to read schema directory {path}")]
    ReadDirectory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read schema file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid Avro schema")]
    ParseAvro {
        path: PathBuf,
        #[source]
        source: Box<apache_avro::Error>,
    },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("schema directory {path} holds no stream schema (*.avsc)")]
    NoStreams { path: PathBuf },
}

pub type Result<T, E = SchemaError> = std::result::Result<T, E>;

/// Schemas of at most this many fields find a field by name by comparing names, larger ones by
/// hashing: see [`StreamSchema::field_position`]. Stream schemas usually have about ten fields;
/// the cut-over is an estimate, not a measurement.
const LINEAR_LOOKUP_MAX_FIELDS: usize = 16;

/// The type of one field, as far as validation, encoding and Arrow need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldKind {
    Boolean,
    Int,
    Long,
    Float,
    Double,
    String,
    Enum { symbols: Vec<String> },
    TimestampMillis,
    TimestampMicros,
}

impl FieldKind {
    fn describe(&self) -> String {
        match self {
            Self::Boolean => "boolean".into(),
            Self::Int => "int".into(),
            Self::Long => "long".into(),
            Self::Float => "float".into(),
            Self::Double => "double".into(),
            Self::String => "string".into(),
            Self::Enum { symbols } => format!("one of {symbols:?}"),
            Self::TimestampMillis | Self::TimestampMicros => "timestamp".into(),
        }
    }
}

/// One field of a stream schema, in schema order.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldSpec {
    pub name: String,
    pub kind: FieldKind,
    /// Declared as `["null", T]`. The union's null branch index comes with it.
    pub nullable_opt: Option<NullableUnion>,
    /// The Avro default, used when a reading leaves the field out.
    pub default_opt: Option<serde_json::Value>,
}

/// Position of `null` in a two-branch union, which fixes the branch indexes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NullableUnion {
    NullFirst,
    NullSecond,
}

/// One stream: its schema and everything derived from it once at start.
#[derive(Debug)]
pub struct StreamSchema {
    pub stream: String,
    pub avro: AvroSchema,
    /// The schema file's text, for Avro libraries other than apache-avro.
    pub avro_json: String,
    /// CRC-64-AVRO (Rabin) fingerprint of the schema's canonical form.
    pub fingerprint: u64,
    pub fields: Vec<FieldSpec>,
    field_index: HashMap<String, usize>,
    pub(crate) event_time_index: usize,
    pub(crate) key_index: usize,
}

impl StreamSchema {
    /// Parses and checks one stream schema.
    pub fn from_avro_json(stream: &str, schema_json: &str, origin: &Path) -> Result<Self> {
        let unsupported = |reason: String| SchemaError::Unsupported { path: origin.to_path_buf(), reason };
        let avro = AvroSchema::parse_str(schema_json).map_err(|source| SchemaError::ParseAvro {
            path: origin.to_path_buf(),
            source: Box::new(source),
        })?;
        let AvroSchema::Record(record) = &avro else {
            return Err(unsupported("a stream schema must be an Avro record".into()));
        };
        let mut fields = Vec::with_capacity(record.fields.len());
        for field in &record.fields {
            let (kind, nullable_opt) = field_kind(&field.schema)
                .map_err(|reason| unsupported(format!("field '{}': {reason}", field.name)))?;
            fields.push(FieldSpec {
                name: field.name.clone(),
                kind,
                nullable_opt,
                default_opt: field.default.clone(),
            });
        }
        let field_index: HashMap<String, usize> =
            fields.iter().enumerate().map(|(index, field)| (field.name.clone(), index)).collect();
        let required = |name: &str, accepted: &[FieldKind], description: &str| -> Result<usize> {
            let index = *field_index.get(name).ok_or_else(|| {
                unsupported(format!("a stream schema needs the field '{name}' ({description})"))
            })?;
            let field = &fields[index];
            if field.nullable_opt.is_some() || !accepted.contains(&field.kind) {
                return Err(unsupported(format!(
                    "field '{name}' must be a non-null {description}, found {}{}",
                    field.kind.describe(),
                    if field.nullable_opt.is_some() { " (nullable)" } else { "" }
                )));
            }
            Ok(index)
        };
        let key_index = required(KEY_FIELD, &[FieldKind::String], "string: the device key")?;
        let event_time_index = required(
            EVENT_TIME_FIELD,
            &[FieldKind::TimestampMicros, FieldKind::TimestampMillis],
            "timestamp-micros or timestamp-millis long: the event time",
        )?;
        required(SEQUENCE_FIELD, &[FieldKind::Long], "long: the per-device sequence number")?;
        let fingerprint = fingerprint_of(&avro);
        Ok(Self {
            stream: stream.to_string(),
            avro,
            avro_json: schema_json.to_string(),
            fingerprint,
            fields,
            field_index,
            event_time_index,
            key_index,
        })
    }

    pub fn field(&self, name: &str) -> Option<&FieldSpec> {
        self.field_position(name).map(|index| &self.fields[index])
    }

    /// The position of the field `name` in [`StreamSchema::fields`] (and in a [`ReadingFields`]
    /// table). Ingest asks once per field of every reading. Up to 16 fields
    /// (`LINEAR_LOOKUP_MAX_FIELDS`) the names are compared in order: mostly one length compare
    /// each, cheaper than hashing the name with `HashMap`'s SipHash. Past that, where the walk
    /// would cost more than the hash, the index is used.
    pub fn field_position(&self, name: &str) -> Option<usize> {
        if self.fields.len() <= LINEAR_LOOKUP_MAX_FIELDS {
            self.fields.iter().position(|field| field.name == name)
        } else {
            self.field_index.get(name).copied()
        }
    }

    /// The position of the key field, [`KEY_FIELD`] (every stream schema has it).
    pub fn key_position(&self) -> usize {
        self.key_index
    }

    /// Fingerprint as 16 lowercase hex digits, the form used in Kafka headers and docs.
    pub fn fingerprint_hex(&self) -> String {
        format!("{:016x}", self.fingerprint)
    }
}

fn field_kind(schema: &AvroSchema) -> std::result::Result<(FieldKind, Option<NullableUnion>), String> {
    if let AvroSchema::Union(union) = schema {
        let variants = union.variants();
        let nullable = match variants {
            [AvroSchema::Null, inner] => Some((NullableUnion::NullFirst, inner)),
            [inner, AvroSchema::Null] => Some((NullableUnion::NullSecond, inner)),
            _ => None,
        };
        let Some((position, inner)) = nullable else {
            return Err("unions are supported only as [\"null\", T] for optional fields".into());
        };
        return Ok((plain_kind(inner)?, Some(position)));
    }
    Ok((plain_kind(schema)?, None))
}

fn plain_kind(schema: &AvroSchema) -> std::result::Result<FieldKind, String> {
    Ok(match schema {
        AvroSchema::Boolean => FieldKind::Boolean,
        AvroSchema::Int => FieldKind::Int,
        AvroSchema::Long => FieldKind::Long,
        AvroSchema::Float => FieldKind::Float,
        AvroSchema::Double => FieldKind::Double,
        AvroSchema::String => FieldKind::String,
        AvroSchema::Enum(enum_schema) => FieldKind::Enum { symbols: enum_schema.symbols.clone() },
        AvroSchema::TimestampMillis => FieldKind::TimestampMillis,
        AvroSchema::TimestampMicros => FieldKind::TimestampMicros,
        other => {
            return Err(format!(
                "type {other:?} is not supported; stream schemas are flat records of boolean, int, long, float, \
                 double, string, enum and timestamp-millis/micros fields, optionally [\"null\", T]"
            ));
        }
    })
}

/// The schema's CRC-64-AVRO fingerprint, over its Parsing Canonical Form as the Avro
/// specification defines it. apache-avro 0.22 keeps `{"type":"long"}` where a logical type was
/// stripped, while the specification (and Java, arrow-avro) reduce it to `"long"`; its own
/// fingerprints would not match other libraries' for schemas with timestamps.
pub fn fingerprint_of(schema: &AvroSchema) -> u64 {
    let mut canonical = schema.canonical_form();
    for primitive in ["null", "boolean", "int", "long", "float", "double", "bytes", "string"] {
        canonical = canonical.replace(&format!("{{\"type\":\"{primitive}\"}}"), &format!("\"{primitive}\""));
    }
    crc64_avro(canonical.as_bytes())
}

/// CRC-64-AVRO ("Rabin") of `bytes`, as in the Avro specification's schema-fingerprint section.
fn crc64_avro(bytes: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    let table: [u64; 256] = std::array::from_fn(|index| {
        (0..8).fold(index as u64, |fingerprint, _| {
            (fingerprint >> 1) ^ (EMPTY & (fingerprint & 1).wrapping_neg())
        })
    });
    bytes.iter().fold(EMPTY, |fingerprint, &byte| {
        (fingerprint >> 8) ^ table[((fingerprint ^ u64::from(byte)) & 0xff) as usize]
    })
}

/// The `[schemas]` section of the services' configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemasConfig {
    /// Directory of stream schemas: `<stream>.avsc`, earlier versions in `history/<stream>/`.
    pub directory: PathBuf,
}

impl Default for SchemasConfig {
    fn default() -> Self {
        Self { directory: PathBuf::from("schemas") }
    }
}

/// Every stream schema found in a directory, by stream name and by writer fingerprint.
#[derive(Debug, Clone, Default)]
pub struct SchemaRegistry {
    streams: BTreeMap<String, Arc<StreamSchema>>,
    by_fingerprint: HashMap<u64, Arc<StreamSchema>>,
}

impl SchemaRegistry {
    /// Loads every `*.avsc` file of `directory`; the file stem is the stream name.
    pub fn load_directory(directory: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(directory)
            .map_err(|source| SchemaError::ReadDirectory { path: directory.to_path_buf(), source })?;
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry
                .map_err(|source| SchemaError::ReadDirectory { path: directory.to_path_buf(), source })?;
            let path = entry.path();
            if path.extension().is_some_and(|extension| extension == "avsc") && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        let mut registry = Self::default();
        for path in paths {
            let schema_json = std::fs::read_to_string(&path)
                .map_err(|source| SchemaError::ReadFile { path: path.clone(), source })?;
            let stream = path.file_stem().and_then(|stem| stem.to_str()).unwrap_or_default().to_string();
            if !is_valid_stream_name(&stream) {
                return Err(SchemaError::Unsupported {
                    path,
                    reason: format!(
                        "stream names (the file stem) use lowercase letters, digits, '_' and '-', 1-100 characters, \
                         do not start with '_' and are not '{RESULTS_DIR}' (the jobs' results live there)"
                    ),
                });
            }
            registry.insert(StreamSchema::from_avro_json(&stream, &schema_json, &path)?);
        }
        if registry.streams.is_empty() {
            return Err(SchemaError::NoStreams { path: directory.to_path_buf() });
        }
        registry.load_history(&directory.join("history"))?;
        Ok(registry)
    }

    /// Earlier versions of stream schemas, `history/<stream>/<version>.avsc`: not streams of their
    /// own, but writer schemas that records already in Kafka may name.
    fn load_history(&mut self, history_directory: &Path) -> Result<()> {
        let stream_names: Vec<String> = self.streams.keys().cloned().collect();
        for stream in stream_names {
            let directory = history_directory.join(&stream);
            let Ok(entries) = std::fs::read_dir(&directory) else { continue };
            for entry in entries {
                let path = entry
                    .map_err(|source| SchemaError::ReadDirectory { path: directory.clone(), source })?
                    .path();
                if path.extension().is_none_or(|extension| extension != "avsc") {
                    continue;
                }
                let schema_json = std::fs::read_to_string(&path)
                    .map_err(|source| SchemaError::ReadFile { path: path.clone(), source })?;
                let schema = Arc::new(StreamSchema::from_avro_json(&stream, &schema_json, &path)?);
                self.by_fingerprint.entry(schema.fingerprint).or_insert(schema);
            }
        }
        Ok(())
    }

    pub fn insert(&mut self, schema: StreamSchema) {
        let schema = Arc::new(schema);
        self.by_fingerprint.insert(schema.fingerprint, Arc::clone(&schema));
        self.streams.insert(schema.stream.clone(), schema);
    }

    pub fn stream(&self, stream: &str) -> Option<&Arc<StreamSchema>> {
        self.streams.get(stream)
    }

    /// The writer schema named by a message's fingerprint.
    pub fn by_fingerprint(&self, fingerprint: u64) -> Option<&Arc<StreamSchema>> {
        self.by_fingerprint.get(&fingerprint)
    }

    /// Every schema a record of `stream` may name: the current one and its history.
    pub fn writers_of<'a>(&'a self, stream: &'a str) -> impl Iterator<Item = &'a Arc<StreamSchema>> {
        self.by_fingerprint.values().filter(move |schema| schema.stream == stream)
    }

    pub fn stream_names(&self) -> impl Iterator<Item = &str> {
        self.streams.keys().map(String::as_str)
    }
}

/// The lake's top-level folder of the jobs' results tables (`results/<job>/`).
pub const RESULTS_DIR: &str = "results";

/// Stream names end up in Kafka topic names, MQTT topics and object paths: keep them plain.
/// A stream's table sits at the lake's top level beside `results/` (the jobs' results tables)
/// and `_sluice/` (run records), so those names are taken: a stream there would mix its files
/// into theirs, and the janitor would vacuum their files as its own.
pub fn is_valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name != RESULTS_DIR
        && !name.starts_with('_')
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_' || byte == b'-')
}

#[cfg(test)]
pub(crate) mod test_schemas {
    pub(crate) const TELEMETRY: &str = include_str!("../../../schemas/telemetry.avsc");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(schema_json: &str) -> Result<StreamSchema> {
        StreamSchema::from_avro_json("telemetry", schema_json, Path::new("telemetry.avsc"))
    }

    #[test]
    fn shipped_telemetry_schema_is_a_valid_stream() {
        let schema = load(test_schemas::TELEMETRY).expect("valid");
        assert_eq!(schema.fields[schema.key_index].name, KEY_FIELD);
        assert_eq!(schema.fields[schema.event_time_index].name, EVENT_TIME_FIELD);
        assert_eq!(schema.fingerprint_hex().len(), 16);
    }

    #[test]
    fn shipped_schema_directory_loads() {
        let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        let registry = SchemaRegistry::load_directory(&directory).expect("loads");
        let telemetry = registry.stream("telemetry").expect("telemetry stream");
        assert!(registry.by_fingerprint(telemetry.fingerprint).is_some());
    }

    #[test]
    fn history_versions_resolve_by_fingerprint_but_are_not_streams() {
        let directory = tempfile::TempDir::new().unwrap();
        std::fs::write(directory.path().join("telemetry.avsc"), test_schemas::TELEMETRY).unwrap();
        std::fs::create_dir_all(directory.path().join("history/telemetry")).unwrap();
        let v1 = r#"{"type":"record","name":"T","fields":[{"name":"device_id","type":"string"},
            {"name":"ts","type":{"type":"long","logicalType":"timestamp-micros"}},{"name":"seq","type":"long"}]}"#;
        std::fs::write(directory.path().join("history/telemetry/v1.avsc"), v1).unwrap();
        let registry = SchemaRegistry::load_directory(directory.path()).unwrap();
        assert_eq!(registry.stream_names().collect::<Vec<_>>(), ["telemetry"]);
        let old = StreamSchema::from_avro_json("telemetry", v1, Path::new("v1")).unwrap();
        let found = registry.by_fingerprint(old.fingerprint).expect("old writer schema known");
        assert_eq!(found.stream, "telemetry");
        assert_eq!(found.fields.len(), 3);
    }

    #[test]
    fn fingerprint_matches_apache_avro_where_it_follows_the_specification() {
        // No logical types: apache-avro's canonical form is the specification's.
        let plain = AvroSchema::parse_str(
            r#"{"type":"record","name":"r","namespace":"x","doc":"dropped","fields":[{"name":"a","type":"long"},{"name":"b","type":["null","string"]}]}"#,
        )
        .unwrap();
        let expected =
            u64::from_le_bytes(plain.fingerprint::<apache_avro::rabin::Rabin>().bytes.try_into().unwrap());
        assert_eq!(fingerprint_of(&plain), expected);
    }

    #[test]
    fn fingerprint_matches_arrow_avro_for_logical_types() {
        let telemetry = AvroSchema::parse_str(test_schemas::TELEMETRY).unwrap();
        let mut store = arrow_avro::schema::SchemaStore::new();
        let registered =
            store.register(arrow_avro::schema::AvroSchema::new(test_schemas::TELEMETRY.to_string())).unwrap();
        assert_eq!(registered, arrow_avro::schema::Fingerprint::Rabin(fingerprint_of(&telemetry)));
    }

    #[test]
    fn schema_without_event_time_is_rejected() {
        let error = load(
            r#"{"type":"record","name":"r","fields":[{"name":"device_id","type":"string"},{"name":"seq","type":"long"}]}"#,
        )
        .expect_err("no ts");
        assert!(error.to_string().contains("'ts'"), "{error}");
    }

    #[test]
    fn nullable_event_time_is_rejected() {
        let error = load(
            r#"{"type":"record","name":"r","fields":[{"name":"device_id","type":"string"},{"name":"seq","type":"long"},
            {"name":"ts","type":["null",{"type":"long","logicalType":"timestamp-micros"}]}]}"#,
        )
        .expect_err("nullable ts");
        assert!(error.to_string().contains("non-null"), "{error}");
    }

    #[test]
    fn nested_records_are_rejected_with_the_field_name() {
        let error = load(
            r#"{"type":"record","name":"r","fields":[{"name":"device_id","type":"string"},{"name":"seq","type":"long"},
            {"name":"ts","type":{"type":"long","logicalType":"timestamp-micros"}},
            {"name":"location","type":{"type":"record","name":"loc","fields":[{"name":"lat","type":"double"}]}}]}"#,
        )
        .expect_err("nested");
        assert!(error.to_string().contains("'location'"), "{error}");
    }

    #[test]
    fn stream_names_are_restricted() {
        assert!(is_valid_stream_name("telemetry"));
        assert!(is_valid_stream_name("farm_sensors-2"));
        assert!(!is_valid_stream_name("Telemetry"));
        assert!(!is_valid_stream_name("a/b"));
        assert!(!is_valid_stream_name(""));
    }
}
