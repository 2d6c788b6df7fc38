//! Avro single-object values to Arrow record batches, for the compactor. Each value is decoded
//! with its writer schema and resolved to the stream's current (reader) schema by field name:
//! a field the writer did not have takes the reader's default, a field the reader dropped is
//! skipped, and int/long/float widen as Avro's resolution rules allow.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float32Builder, Float64Builder, Int32Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder, TimestampMillisecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::SchemaRef;
use serde_json::Value;

use crate::{FieldKind, FieldSpec, NullableUnion, StreamSchema, to_arrow_schema};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("value ends inside field '{field}'")]
    Truncated { field: String },
    #[error("field '{field}': {reason}")]
    Invalid { field: String, reason: String },
    #[error("{trailing} bytes after the last field")]
    TrailingBytes { trailing: usize },
    #[error("writer schema {writer:016x} cannot be read as the current schema: {reason}")]
    Incompatible { writer: u64, reason: String },
}

/// One decoded field value, borrowed from the datum where it is text.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cell<'a> {
    Null,
    Boolean(bool),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    Text(&'a str),
}

enum Column {
    Boolean(BooleanBuilder),
    Int(Int32Builder),
    Long(Int64Builder),
    Float(Float32Builder),
    Double(Float64Builder),
    Text(StringBuilder),
    TimestampMillis(TimestampMillisecondBuilder),
    TimestampMicros(TimestampMicrosecondBuilder),
}

impl Column {
    /// A builder with room for `rows` rows, so a buffer that fills to its usual size never
    /// grows by doubling (each doubling touches fresh pages the kernel must zero).
    fn with_capacity(kind: &FieldKind, rows: usize) -> Self {
        match kind {
            FieldKind::Boolean => Self::Boolean(BooleanBuilder::with_capacity(rows)),
            FieldKind::Int => Self::Int(Int32Builder::with_capacity(rows)),
            FieldKind::Long => Self::Long(Int64Builder::with_capacity(rows)),
            FieldKind::Float => Self::Float(Float32Builder::with_capacity(rows)),
            FieldKind::Double => Self::Double(Float64Builder::with_capacity(rows)),
            FieldKind::String | FieldKind::Enum { .. } => {
                Self::Text(StringBuilder::with_capacity(rows, rows * 16))
            }
            FieldKind::TimestampMillis => {
                Self::TimestampMillis(TimestampMillisecondBuilder::with_capacity(rows).with_timezone("UTC"))
            }
            FieldKind::TimestampMicros => {
                Self::TimestampMicros(TimestampMicrosecondBuilder::with_capacity(rows).with_timezone("UTC"))
            }
        }
    }

    /// Appends a cell already converted to this column's type (see [`convert`]).
    fn append(&mut self, cell: Cell<'_>) {
        match (self, cell) {
            (Self::Boolean(builder), Cell::Boolean(value)) => builder.append_value(value),
            (Self::Int(builder), Cell::Int(value)) => builder.append_value(value),
            (Self::Long(builder), Cell::Long(value)) => builder.append_value(value),
            (Self::Float(builder), Cell::Float(value)) => builder.append_value(value),
            (Self::Double(builder), Cell::Double(value)) => builder.append_value(value),
            (Self::Text(builder), Cell::Text(value)) => builder.append_value(value),
            (Self::TimestampMillis(builder), Cell::Long(value)) => builder.append_value(value),
            (Self::TimestampMicros(builder), Cell::Long(value)) => builder.append_value(value),
            (column, _) => column.append_null(),
        }
    }

    fn append_null(&mut self) {
        match self {
            Self::Boolean(builder) => builder.append_null(),
            Self::Int(builder) => builder.append_null(),
            Self::Long(builder) => builder.append_null(),
            Self::Float(builder) => builder.append_null(),
            Self::Double(builder) => builder.append_null(),
            Self::Text(builder) => builder.append_null(),
            Self::TimestampMillis(builder) => builder.append_null(),
            Self::TimestampMicros(builder) => builder.append_null(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Self::Boolean(builder) => Arc::new(builder.finish()),
            Self::Int(builder) => Arc::new(builder.finish()),
            Self::Long(builder) => Arc::new(builder.finish()),
            Self::Float(builder) => Arc::new(builder.finish()),
            Self::Double(builder) => Arc::new(builder.finish()),
            Self::Text(builder) => Arc::new(builder.finish()),
            Self::TimestampMillis(builder) => Arc::new(builder.finish()),
            Self::TimestampMicros(builder) => Arc::new(builder.finish()),
        }
    }
}

/// How one writer schema's fields land in the reader's columns.
#[derive(Debug)]
struct Resolution {
    /// Per writer field: the reader column it fills, if the reader kept it.
    target_by_writer_field: Vec<Option<usize>>,
    /// Reader columns the writer lacks, with the default each gets.
    defaults: Vec<(usize, DefaultValue)>,
}

#[derive(Debug)]
enum DefaultValue {
    Plain(Cell<'static>),
    Text(String),
}

/// Accumulates decoded rows of one stream as Arrow columns in the reader schema.
pub struct ArrowBatchBuilder {
    reader: Arc<StreamSchema>,
    arrow_schema: SchemaRef,
    columns: Vec<Column>,
    resolutions: HashMap<u64, Resolution>,
    num_rows: usize,
    num_value_bytes: usize,
}

impl std::fmt::Debug for ArrowBatchBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArrowBatchBuilder")
            .field("stream", &self.reader.stream)
            .field("num_rows", &self.num_rows)
            .finish()
    }
}

impl ArrowBatchBuilder {
    pub fn new(reader: Arc<StreamSchema>) -> Self {
        let arrow_schema = to_arrow_schema(&reader);
        let columns = reader.fields.iter().map(|field| Column::with_capacity(&field.kind, 0)).collect();
        Self { reader, arrow_schema, columns, resolutions: HashMap::new(), num_rows: 0, num_value_bytes: 0 }
    }

    pub fn arrow_schema(&self) -> &SchemaRef {
        &self.arrow_schema
    }

    pub fn num_rows(&self) -> usize {
        self.num_rows
    }

    /// Bytes of Avro values appended since the last [`Self::finish`]: a cheap proxy for memory.
    pub fn num_value_bytes(&self) -> usize {
        self.num_value_bytes
    }

    /// Decodes one Avro datum (without the single-object header) written with `writer` and
    /// appends it as a row; returns its event time. On error nothing is appended.
    pub fn append(&mut self, writer: &StreamSchema, datum: &[u8]) -> Result<i64, DecodeError> {
        if !self.resolutions.contains_key(&writer.fingerprint) {
            let resolution = resolve(writer, &self.reader)?;
            self.resolutions.insert(writer.fingerprint, resolution);
        }
        let resolution = &self.resolutions[&writer.fingerprint];
        let mut cells = vec![Cell::Null; self.reader.fields.len()];
        let mut cursor = datum;
        for (field, target_opt) in writer.fields.iter().zip(&resolution.target_by_writer_field) {
            let cell = read_field(field, &mut cursor)?;
            if let Some(target) = *target_opt {
                cells[target] = convert(cell, &self.reader.fields[target])?;
            }
        }
        if !cursor.is_empty() {
            return Err(DecodeError::TrailingBytes { trailing: cursor.len() });
        }
        for (target, default) in &resolution.defaults {
            cells[*target] = match default {
                DefaultValue::Plain(cell) => *cell,
                DefaultValue::Text(text) => Cell::Text(text),
            };
        }
        let event_time_micros = match (
            cells[self.reader.event_time_index],
            &self.reader.fields[self.reader.event_time_index].kind,
        ) {
            (Cell::Long(millis), FieldKind::TimestampMillis) => millis.saturating_mul(1_000),
            (Cell::Long(micros), _) => micros,
            _ => {
                return Err(DecodeError::Invalid {
                    field: self.reader.fields[self.reader.event_time_index].name.clone(),
                    reason: "event time missing".into(),
                });
            }
        };
        for (index, cell) in cells.iter().enumerate() {
            if *cell == Cell::Null && self.reader.fields[index].nullable_opt.is_none() {
                return Err(DecodeError::Invalid {
                    field: self.reader.fields[index].name.clone(),
                    reason: "null in a required field".into(),
                });
            }
        }
        for (column, cell) in self.columns.iter_mut().zip(cells.iter()) {
            match cell {
                Cell::Null => column.append_null(),
                cell => column.append(*cell),
            }
        }
        self.num_rows += 1;
        self.num_value_bytes += datum.len();
        Ok(event_time_micros)
    }

    /// The rows appended so far as one batch; the builder starts empty again, sized for as many
    /// rows as this batch had.
    pub fn finish(&mut self) -> RecordBatch {
        let arrays: Vec<ArrayRef> = self.columns.iter_mut().map(Column::finish).collect();
        let rows = self.num_rows;
        self.columns =
            self.reader.fields.iter().map(|field| Column::with_capacity(&field.kind, rows)).collect();
        self.num_rows = 0;
        self.num_value_bytes = 0;
        // Columns are built from the same schema they are checked against.
        RecordBatch::try_new(Arc::clone(&self.arrow_schema), arrays)
            .unwrap_or_else(|_| RecordBatch::new_empty(Arc::clone(&self.arrow_schema)))
    }
}

fn resolve(writer: &StreamSchema, reader: &StreamSchema) -> Result<Resolution, DecodeError> {
    let incompatible = |reason: String| DecodeError::Incompatible { writer: writer.fingerprint, reason };
    let mut target_by_writer_field = Vec::with_capacity(writer.fields.len());
    for field in &writer.fields {
        let target_opt = reader.fields.iter().position(|candidate| candidate.name == field.name);
        if let Some(target) = target_opt {
            let reader_kind = &reader.fields[target].kind;
            let compatible = match (&field.kind, reader_kind) {
                (writer_kind, reader_kind) if writer_kind == reader_kind => true,
                (FieldKind::Int, FieldKind::Long | FieldKind::Float | FieldKind::Double)
                | (FieldKind::Long, FieldKind::Float | FieldKind::Double)
                | (FieldKind::Float, FieldKind::Double)
                | (FieldKind::Enum { .. } | FieldKind::String, FieldKind::String)
                | (
                    FieldKind::TimestampMillis | FieldKind::TimestampMicros,
                    FieldKind::TimestampMillis | FieldKind::TimestampMicros,
                ) => true,
                (FieldKind::Enum { .. }, FieldKind::Enum { .. }) => true,
                _ => false,
            };
            if !compatible {
                return Err(incompatible(format!("field '{}' changed type incompatibly", field.name)));
            }
        }
        target_by_writer_field.push(target_opt);
    }
    let mut defaults = Vec::new();
    for (index, field) in reader.fields.iter().enumerate() {
        if writer.field(&field.name).is_some() {
            continue;
        }
        let default = match &field.default_opt {
            None | Some(Value::Null) if field.nullable_opt.is_some() => DefaultValue::Plain(Cell::Null),
            None => return Err(incompatible(format!("new field '{}' has no default", field.name))),
            Some(default) => default_value(field, default)
                .ok_or_else(|| incompatible(format!("default of '{}' does not fit its type", field.name)))?,
        };
        defaults.push((index, default));
    }
    Ok(Resolution { target_by_writer_field, defaults })
}

fn default_value(field: &FieldSpec, default: &Value) -> Option<DefaultValue> {
    Some(DefaultValue::Plain(match (&field.kind, default) {
        (_, Value::Null) => Cell::Null,
        (FieldKind::Boolean, Value::Bool(flag)) => Cell::Boolean(*flag),
        (FieldKind::Int, Value::Number(number)) => Cell::Int(i32::try_from(number.as_i64()?).ok()?),
        (
            FieldKind::Long | FieldKind::TimestampMicros | FieldKind::TimestampMillis,
            Value::Number(number),
        ) => Cell::Long(number.as_i64()?),
        (FieldKind::Float, Value::Number(number)) => Cell::Float(number.as_f64()? as f32),
        (FieldKind::Double, Value::Number(number)) => Cell::Double(number.as_f64()?),
        (FieldKind::String | FieldKind::Enum { .. }, Value::String(text)) => {
            return Some(DefaultValue::Text(text.clone()));
        }
        _ => return None,
    }))
}

/// Widens a writer cell to the reader field's type.
fn convert<'a>(cell: Cell<'a>, reader_field: &FieldSpec) -> Result<Cell<'a>, DecodeError> {
    Ok(match (cell, &reader_field.kind) {
        (Cell::Int(value), FieldKind::Long) => Cell::Long(i64::from(value)),
        (Cell::Int(value), FieldKind::Float) => Cell::Float(value as f32),
        (Cell::Int(value), FieldKind::Double) => Cell::Double(f64::from(value)),
        (Cell::Long(value), FieldKind::Float) => Cell::Float(value as f32),
        (Cell::Long(value), FieldKind::Double) => Cell::Double(value as f64),
        (Cell::Float(value), FieldKind::Double) => Cell::Double(f64::from(value)),
        (Cell::Text(text), FieldKind::Enum { symbols }) if !symbols.iter().any(|symbol| symbol == text) => {
            return Err(DecodeError::Invalid {
                field: reader_field.name.clone(),
                reason: format!("'{text}' is not a symbol of the current schema"),
            });
        }
        (cell, _) => cell,
    })
}

fn read_field<'a>(field: &'a FieldSpec, cursor: &mut &'a [u8]) -> Result<Cell<'a>, DecodeError> {
    let truncated = || DecodeError::Truncated { field: field.name.clone() };
    if let Some(position) = field.nullable_opt {
        let branch = read_long(cursor).ok_or_else(truncated)?;
        let null_branch = if position == NullableUnion::NullFirst { 0 } else { 1 };
        if branch == null_branch {
            return Ok(Cell::Null);
        }
        if branch != 1 - null_branch {
            return Err(DecodeError::Invalid {
                field: field.name.clone(),
                reason: format!("union branch {branch} out of range"),
            });
        }
    }
    Ok(match &field.kind {
        FieldKind::Boolean => {
            let (&byte, rest) = cursor.split_first().ok_or_else(truncated)?;
            *cursor = rest;
            Cell::Boolean(byte != 0)
        }
        FieldKind::Int => {
            let value = read_long(cursor).ok_or_else(truncated)?;
            Cell::Int(i32::try_from(value).map_err(|_| DecodeError::Invalid {
                field: field.name.clone(),
                reason: "int out of range".into(),
            })?)
        }
        FieldKind::Long | FieldKind::TimestampMillis | FieldKind::TimestampMicros => {
            Cell::Long(read_long(cursor).ok_or_else(truncated)?)
        }
        FieldKind::Float => Cell::Float(f32::from_le_bytes(take::<4>(cursor).ok_or_else(truncated)?)),
        FieldKind::Double => Cell::Double(f64::from_le_bytes(take::<8>(cursor).ok_or_else(truncated)?)),
        FieldKind::String => {
            let length = usize::try_from(read_long(cursor).ok_or_else(truncated)?).map_err(|_| {
                DecodeError::Invalid { field: field.name.clone(), reason: "negative string length".into() }
            })?;
            if cursor.len() < length {
                return Err(truncated());
            }
            let (bytes, rest) = cursor.split_at(length);
            *cursor = rest;
            Cell::Text(std::str::from_utf8(bytes).map_err(|_| DecodeError::Invalid {
                field: field.name.clone(),
                reason: "string is not UTF-8".into(),
            })?)
        }
        FieldKind::Enum { symbols } => {
            let index = read_long(cursor).ok_or_else(truncated)?;
            let symbol =
                usize::try_from(index).ok().and_then(|index| symbols.get(index)).ok_or_else(|| {
                    DecodeError::Invalid {
                        field: field.name.clone(),
                        reason: format!("enum index {index} out of range"),
                    }
                })?;
            Cell::Text(symbol)
        }
    })
}

fn take<const N: usize>(cursor: &mut &[u8]) -> Option<[u8; N]> {
    if cursor.len() < N {
        return None;
    }
    let (bytes, rest) = cursor.split_at(N);
    *cursor = rest;
    bytes.try_into().ok()
}

fn read_long(cursor: &mut &[u8]) -> Option<i64> {
    let mut value: u64 = 0;
    for (index, &byte) in cursor.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * index);
        if byte & 0x80 == 0 {
            *cursor = &cursor[index + 1..];
            return Some(((value >> 1) as i64) ^ -((value & 1) as i64));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type, TimestampMicrosecondType};
    use serde_json::json;

    use super::*;
    use crate::split_single_object;
    use crate::test_schemas::TELEMETRY;

    const NOW: i64 = 1_796_000_000_000_000;

    fn schema(json: &str) -> Arc<StreamSchema> {
        Arc::new(StreamSchema::from_avro_json("telemetry", json, Path::new("t.avsc")).unwrap())
    }

    fn encode(schema: &StreamSchema, reading: serde_json::Value) -> Vec<u8> {
        let mut out = Vec::new();
        schema.encode_json(&reading, NOW, 0, &mut out).unwrap();
        split_single_object(&out).unwrap().1.to_vec()
    }

    #[test]
    fn rows_decode_into_typed_columns() {
        let telemetry = schema(TELEMETRY);
        let mut builder = ArrowBatchBuilder::new(Arc::clone(&telemetry));
        let first = encode(
            &telemetry,
            json!({"device_id": "a", "ts": NOW - 5, "seq": 1, "temperature": 20.5, "status": "WARN"}),
        );
        let second = encode(&telemetry, json!({"device_id": "b", "ts": NOW - 4, "seq": 2}));
        assert_eq!(builder.append(&telemetry, &first).unwrap(), NOW - 5);
        assert_eq!(builder.append(&telemetry, &second).unwrap(), NOW - 4);
        assert_eq!(builder.num_value_bytes(), first.len() + second.len());
        let batch = builder.finish();
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(builder.num_rows(), 0);
        let device = batch.column_by_name("device_id").unwrap().as_string::<i32>();
        assert_eq!((device.value(0), device.value(1)), ("a", "b"));
        let ts = batch.column_by_name("ts").unwrap().as_primitive::<TimestampMicrosecondType>();
        assert_eq!(ts.value(1), NOW - 4);
        let seq = batch.column_by_name("seq").unwrap().as_primitive::<Int64Type>();
        assert_eq!(seq.value(0), 1);
        let temperature = batch.column_by_name("temperature").unwrap().as_primitive::<Float64Type>();
        assert_eq!(temperature.value(0), 20.5);
        assert!(temperature.is_null(1));
        let status = batch.column_by_name("status").unwrap().as_string::<i32>();
        assert_eq!((status.value(0), status.value(1)), ("WARN", "OK"));
    }

    #[test]
    fn corrupt_values_are_refused_without_appending() {
        let telemetry = schema(TELEMETRY);
        let mut builder = ArrowBatchBuilder::new(Arc::clone(&telemetry));
        let good = encode(&telemetry, json!({"device_id": "a", "ts": NOW, "seq": 1}));
        assert!(matches!(
            builder.append(&telemetry, &good[..good.len() - 1]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(builder.append(&telemetry, &trailing), Err(DecodeError::TrailingBytes { trailing: 1 }));
        assert!(builder.append(&telemetry, &[0xff; 3]).is_err());
        assert_eq!(builder.num_rows(), 0);
        builder.append(&telemetry, &good).unwrap();
        assert_eq!(builder.finish().num_rows(), 1);
    }

    #[test]
    fn old_writer_values_read_with_the_new_schema() {
        let v1 = schema(
            r#"{"type":"record","name":"T","fields":[{"name":"device_id","type":"string"},
            {"name":"ts","type":{"type":"long","logicalType":"timestamp-micros"}},{"name":"seq","type":"long"},
            {"name":"count","type":"int"},{"name":"retired","type":["null","string"],"default":null}]}"#,
        );
        let v2 = schema(
            r#"{"type":"record","name":"T","fields":[{"name":"device_id","type":"string"},
            {"name":"ts","type":{"type":"long","logicalType":"timestamp-micros"}},{"name":"seq","type":"long"},
            {"name":"count","type":"long"},{"name":"firmware","type":"string","default":"unknown"},
            {"name":"pressure","type":["null","double"],"default":null}]}"#,
        );
        let mut builder = ArrowBatchBuilder::new(Arc::clone(&v2));
        builder
            .append(
                &v1,
                &encode(&v1, json!({"device_id": "old", "ts": NOW, "seq": 7, "count": 3, "retired": "x"})),
            )
            .unwrap();
        builder
            .append(
                &v2,
                &encode(
                    &v2,
                    json!({"device_id": "new", "ts": NOW, "seq": 8, "count": 4, "firmware": "2.1", "pressure": 1.5}),
                ),
            )
            .unwrap();
        let batch = builder.finish();
        let firmware = batch.column_by_name("firmware").unwrap().as_string::<i32>();
        assert_eq!((firmware.value(0), firmware.value(1)), ("unknown", "2.1"));
        let pressure = batch.column_by_name("pressure").unwrap().as_primitive::<Float64Type>();
        assert!(pressure.is_null(0));
        let count = batch.column_by_name("count").unwrap().as_primitive::<Int64Type>();
        assert_eq!((count.value(0), count.value(1)), (3, 4), "int widened to long");
        assert!(batch.column_by_name("retired").is_none());
    }

    #[test]
    fn incompatible_writer_is_reported() {
        let reader = schema(TELEMETRY);
        let writer = schema(
            r#"{"type":"record","name":"T","fields":[{"name":"device_id","type":"string"},
            {"name":"ts","type":{"type":"long","logicalType":"timestamp-micros"}},{"name":"seq","type":"long"},
            {"name":"temperature","type":"string"}]}"#,
        );
        let mut builder = ArrowBatchBuilder::new(reader);
        let value = encode(&writer, json!({"device_id": "a", "ts": NOW, "seq": 1, "temperature": "hot"}));
        assert!(matches!(builder.append(&writer, &value), Err(DecodeError::Incompatible { .. })));
    }
}
