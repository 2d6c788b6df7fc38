//! The column types a job's results are stored with. A results table is a Delta table, and
//! Delta has fewer types than Arrow: one timestamp (microseconds, UTC instants), signed
//! integers only, no time of day, durations or intervals. A plan's output is cast to the Delta
//! type of each column before it is written, so that the file holds what the table's schema
//! says and every Delta reader reads the same values; a column no cast can store is refused
//! when the job is submitted, not at every window's commit.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::HashSet;

/// The schema a result with `schema` is stored with, or why it cannot be stored.
pub fn storable_schema(schema: &Schema) -> Result<SchemaRef, String> {
    let mut names = HashSet::new();
    let mut fields = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        // Delta column names compare case-insensitively.
        if !names.insert(field.name().to_lowercase()) {
            return Err(format!(
                "the result has two columns named '{}' (Delta column names ignore case): name one differently (AS ...)",
                field.name()
            ));
        }
        let data_type = storable_type(field.data_type())
            .map_err(|reason| format!("result column '{}' {reason}", field.name()))?;
        fields.push(Field::new(field.name(), data_type, field.is_nullable()));
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// The Delta-storable type of `data_type`: the same where Delta has it, the nearest lossless
/// one otherwise (a `UInt64` past `i64::MAX` fails the window with a message instead).
fn storable_type(data_type: &DataType) -> Result<DataType, String> {
    let refuse = |what: &str| {
        Err(format!(
            "is {what} ({data_type}), which Delta tables cannot store: CAST it to a string or a number"
        ))
    };
    Ok(match data_type {
        DataType::Boolean
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::Float32
        | DataType::Float64
        | DataType::Utf8
        | DataType::LargeUtf8
        | DataType::Utf8View
        | DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::Date32 => data_type.clone(),
        DataType::UInt8 => DataType::Int16,
        DataType::UInt16 => DataType::Int32,
        DataType::UInt32 | DataType::UInt64 => DataType::Int64,
        DataType::Float16 => DataType::Float32,
        DataType::Date64 => DataType::Date32,
        DataType::FixedSizeBinary(_) => DataType::Binary,
        // Every time in Sluice is a UTC instant; a time without a zone (`to_timestamp`) is read
        // as one too, rather than needing the timestampNtz table feature older readers lack.
        DataType::Timestamp(..) => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        DataType::Decimal32(precision, scale)
        | DataType::Decimal64(precision, scale)
        | DataType::Decimal128(precision, scale) => DataType::Decimal128(*precision, *scale),
        DataType::Decimal256(precision, scale) if *precision <= 38 => {
            DataType::Decimal128(*precision, *scale)
        }
        DataType::Decimal256(..) => {
            return Err(format!(
                "is {data_type}, more digits than a Delta decimal holds (38): CAST it to DECIMAL(38, s) or DOUBLE"
            ));
        }
        DataType::Dictionary(_, values) => storable_type(values)?,
        DataType::List(item) | DataType::LargeList(item) | DataType::FixedSizeList(item, _) => {
            DataType::List(Arc::new(storable_field(item)?))
        }
        DataType::Struct(fields) => {
            if fields.is_empty() {
                return refuse("an empty struct");
            }
            DataType::Struct(fields.iter().map(|field| storable_field(field)).collect::<Result<Fields, _>>()?)
        }
        DataType::Map(entries, sorted) => DataType::Map(Arc::new(storable_field(entries)?), *sorted),
        DataType::Null => {
            return Err("is NULL in every row and so has no type: CAST it, e.g. CAST(NULL AS DOUBLE)".into());
        }
        DataType::Time32(_) | DataType::Time64(_) => return refuse("a time of day"),
        DataType::Duration(_) => return refuse("a duration"),
        DataType::Interval(_) => return refuse("an interval"),
        _ => return refuse("a type"),
    })
}

fn storable_field(field: &Field) -> Result<Field, String> {
    Ok(Field::new(field.name(), storable_type(field.data_type())?, field.is_nullable()))
}

/// `batch` with each column cast to `schema`'s type. A value the cast cannot keep (an unsigned
/// number past `i64::MAX`, a timestamp past the microsecond range) is an error, never a NULL.
pub fn to_storable(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, String> {
    if batch
        .schema()
        .fields()
        .iter()
        .zip(schema.fields())
        .all(|(from, to)| from.data_type() == to.data_type())
    {
        return RecordBatch::try_new(Arc::clone(schema), batch.columns().to_vec())
            .map_err(|error| error.to_string());
    }
    let options = CastOptions { safe: false, ..CastOptions::default() };
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| {
            cast_with_options(column, field.data_type(), &options)
                .map_err(|error| format!("result column '{}': {error}", field.name()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{
        Array, ArrayRef, Int64Array, NullArray, Time64MicrosecondArray, TimestampMicrosecondArray,
        TimestampNanosecondArray, UInt8Array, UInt64Array,
    };

    use super::*;

    fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
        RecordBatch::try_from_iter(columns).unwrap()
    }

    #[test]
    fn timestamps_of_any_unit_and_zone_become_utc_microseconds() {
        let nanos = TimestampNanosecondArray::from(vec![1_795_680_000_123_456_789]).with_timezone("+00:00");
        let naive = TimestampNanosecondArray::from(vec![1_795_680_000_000_000_000]);
        let input = batch(vec![("now", Arc::new(nanos) as ArrayRef), ("naive", Arc::new(naive))]);
        let schema = storable_schema(&input.schema()).unwrap();
        let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        assert_eq!(schema.field(0).data_type(), &utc);
        assert_eq!(schema.field(1).data_type(), &utc);
        let stored = to_storable(input, &schema).unwrap();
        let now = stored.column(0).as_any().downcast_ref::<TimestampMicrosecondArray>().unwrap();
        assert_eq!(now.value(0), 1_795_680_000_123_456, "the same instant, truncated to microseconds");
        let naive = stored.column(1).as_any().downcast_ref::<TimestampMicrosecondArray>().unwrap();
        assert_eq!(naive.value(0), 1_795_680_000_000_000);
    }

    #[test]
    fn unsigned_numbers_widen_and_one_past_the_signed_range_fails() {
        let input = batch(vec![
            ("small", Arc::new(UInt8Array::from(vec![255])) as ArrayRef),
            ("big", Arc::new(UInt64Array::from(vec![i64::MAX as u64]))),
        ]);
        let schema = storable_schema(&input.schema()).unwrap();
        assert_eq!(schema.field(0).data_type(), &DataType::Int16);
        assert_eq!(schema.field(1).data_type(), &DataType::Int64);
        let stored = to_storable(input, &schema).unwrap();
        assert_eq!(stored.column(1).as_any().downcast_ref::<Int64Array>().unwrap().value(0), i64::MAX);

        let too_big = batch(vec![
            ("small", Arc::new(UInt8Array::from(vec![0])) as ArrayRef),
            ("big", Arc::new(UInt64Array::from(vec![i64::MAX as u64 + 1]))),
        ]);
        let error = to_storable(too_big, &schema).unwrap_err();
        assert!(error.contains("'big'"), "{error}");
    }

    #[test]
    fn columns_delta_cannot_store_are_refused_with_the_column_and_a_way_out() {
        let cases: Vec<(ArrayRef, &str)> = vec![
            (Arc::new(NullArray::new(1)), "CAST(NULL AS DOUBLE)"),
            (Arc::new(Time64MicrosecondArray::from(vec![0])), "time of day"),
        ];
        for (column, expected) in cases {
            let input = batch(vec![("x", column)]);
            let error = storable_schema(&input.schema()).unwrap_err();
            assert!(error.contains("'x'") && error.contains(expected), "{error}");
        }
        let duplicate = Schema::new(vec![
            Field::new("Readings", DataType::Int64, false),
            Field::new("readings", DataType::Int64, false),
        ]);
        assert!(storable_schema(&duplicate).unwrap_err().contains("ignore case"));
    }

    #[test]
    fn a_batch_already_storable_keeps_its_arrays() {
        let input = batch(vec![("n", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef)]);
        let schema = storable_schema(&input.schema()).unwrap();
        let stored = to_storable(input.clone(), &schema).unwrap();
        assert_eq!(stored.column(0).to_data(), input.column(0).to_data());
    }
}
