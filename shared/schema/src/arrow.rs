//! Avro stream schema to Arrow schema, the columns the compactor writes to Parquet.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, TimeUnit};

use crate::{FieldKind, StreamSchema};

/// Timestamps are UTC instants (Avro `timestamp-*` are), so they carry the UTC zone in Arrow and
/// Parquet (`isAdjustedToUTC`), which external engines read as instants too.
const UTC: &str = "UTC";

pub fn to_arrow_schema(schema: &StreamSchema) -> Arc<Schema> {
    let fields: Vec<Field> = schema
        .fields
        .iter()
        .map(|field| {
            let data_type = match &field.kind {
                FieldKind::Boolean => DataType::Boolean,
                FieldKind::Int => DataType::Int32,
                FieldKind::Long => DataType::Int64,
                FieldKind::Float => DataType::Float32,
                FieldKind::Double => DataType::Float64,
                FieldKind::String | FieldKind::Enum { .. } => DataType::Utf8,
                FieldKind::TimestampMillis => DataType::Timestamp(TimeUnit::Millisecond, Some(UTC.into())),
                FieldKind::TimestampMicros => DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
            };
            Field::new(&field.name, data_type, field.nullable_opt.is_some())
        })
        .collect();
    Arc::new(Schema::new(fields))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::test_schemas::TELEMETRY;

    #[test]
    fn telemetry_maps_to_expected_columns() {
        let schema = StreamSchema::from_avro_json("telemetry", TELEMETRY, Path::new("t.avsc")).unwrap();
        let arrow = to_arrow_schema(&schema);
        let ts = arrow.field_with_name("ts").unwrap();
        assert_eq!(ts.data_type(), &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())));
        assert!(!ts.is_nullable());
        let temperature = arrow.field_with_name("temperature").unwrap();
        assert_eq!(temperature.data_type(), &DataType::Float64);
        assert!(temperature.is_nullable());
        assert_eq!(arrow.field_with_name("status").unwrap().data_type(), &DataType::Utf8);
        assert_eq!(arrow.fields().len(), schema.fields.len());
    }
}
