//! Delta file statistics (`numRecords`, `minValues`, `maxValues`, `nullCount`) for the `add`
//! action of a file, computed from the rows written to it. Every Delta engine skips files with
//! them, so a bound written here must hold for every row: where one cannot be stated exactly in
//! JSON (NaN, infinities, long strings) the column's bounds are left out, which only costs
//! skipping.

use std::collections::BTreeSet;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType, TimestampMillisecondType,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use serde_json::{Map, Value, json};
use sluice_clock::format_micros_fixed_fraction;

/// Strings longer than this get no bounds: Delta writers truncate string statistics to 32
/// characters, and a truncated maximum needs care that readers do not all take.
const MAX_STRING_BOUND_CHARS: usize = 32;

/// The statistics JSON of a file holding exactly the rows of `batches` (one schema).
pub fn delta_stats(batches: &[RecordBatch]) -> String {
    delta_stats_without(batches, &BTreeSet::new())
}

/// The same, saying nothing of the columns in `withheld` (encrypted ones: their bounds and null
/// counts would tell what the file's encryption hides), as if they had no statistics.
pub fn delta_stats_without(batches: &[RecordBatch], withheld: &BTreeSet<&str>) -> String {
    let Some(first) = batches.first() else {
        return json!({ "numRecords": 0 }).to_string();
    };
    let schema = first.schema();
    let mut min_values = Map::new();
    let mut max_values = Map::new();
    let mut null_count = Map::new();
    for (index, field) in schema.fields().iter().enumerate() {
        if withheld.contains(field.name().as_str()) {
            continue;
        }
        let columns: Vec<&dyn Array> = batches.iter().map(|batch| batch.column(index).as_ref()).collect();
        let nulls: usize = columns.iter().map(|column| column.null_count()).sum();
        null_count.insert(field.name().clone(), json!(nulls));
        if let Some((min, max)) = bounds(field.data_type(), &columns) {
            min_values.insert(field.name().clone(), min);
            max_values.insert(field.name().clone(), max);
        }
    }
    let num_records: usize = batches.iter().map(RecordBatch::num_rows).sum();
    json!({
        "numRecords": num_records,
        "minValues": min_values,
        "maxValues": max_values,
        "nullCount": null_count,
    })
    .to_string()
}

fn bounds(data_type: &DataType, columns: &[&dyn Array]) -> Option<(Value, Value)> {
    match data_type {
        DataType::Int32 => integer_bounds(
            columns.iter().flat_map(|c| c.as_primitive::<Int32Type>().iter().flatten().map(i64::from)),
        ),
        DataType::Int64 => {
            integer_bounds(columns.iter().flat_map(|c| c.as_primitive::<Int64Type>().iter().flatten()))
        }
        DataType::Float32 => float_bounds(
            columns.iter().flat_map(|c| c.as_primitive::<Float32Type>().iter().flatten().map(f64::from)),
        ),
        DataType::Float64 => {
            float_bounds(columns.iter().flat_map(|c| c.as_primitive::<Float64Type>().iter().flatten()))
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => timestamp_bounds(
            columns.iter().flat_map(|c| c.as_primitive::<TimestampMicrosecondType>().iter().flatten()),
        ),
        DataType::Timestamp(TimeUnit::Millisecond, _) => timestamp_bounds(
            columns
                .iter()
                .flat_map(|c| c.as_primitive::<TimestampMillisecondType>().iter().flatten())
                .map(|millis| millis.saturating_mul(1_000)),
        ),
        DataType::Utf8 => string_bounds(columns.iter().flat_map(|c| c.as_string::<i32>().iter().flatten())),
        _ => None,
    }
}

fn integer_bounds(values: impl Iterator<Item = i64>) -> Option<(Value, Value)> {
    let (min, max) = values.fold(None, |bounds: Option<(i64, i64)>, value| {
        Some(bounds.map_or((value, value), |(min, max)| (min.min(value), max.max(value))))
    })?;
    Some((json!(min), json!(max)))
}

fn float_bounds(mut values: impl Iterator<Item = f64>) -> Option<(Value, Value)> {
    let mut bounds: Option<(f64, f64)> = None;
    for value in values.by_ref() {
        if !value.is_finite() {
            return None;
        }
        bounds = Some(bounds.map_or((value, value), |(min, max)| (min.min(value), max.max(value))));
    }
    let (min, max) = bounds?;
    Some((json!(min), json!(max)))
}

fn timestamp_bounds(values: impl Iterator<Item = i64>) -> Option<(Value, Value)> {
    let (min, max) = values.fold(None, |bounds: Option<(i64, i64)>, value| {
        Some(bounds.map_or((value, value), |(min, max)| (min.min(value), max.max(value))))
    })?;
    // RFC 3339 in UTC with microseconds: what Delta readers parse, without losing precision.
    Some((json!(format_micros_fixed_fraction(min)?), json!(format_micros_fixed_fraction(max)?)))
}

fn string_bounds<'a>(values: impl Iterator<Item = &'a str>) -> Option<(Value, Value)> {
    let mut bounds: Option<(&str, &str)> = None;
    for value in values {
        if value.chars().count() > MAX_STRING_BOUND_CHARS {
            return None;
        }
        bounds = Some(bounds.map_or((value, value), |(min, max)| (min.min(value), max.max(value))));
    }
    let (min, max) = bounds?;
    Some((json!(min), json!(max)))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow_schema::{Field, Schema};

    use super::*;

    fn batch(values: Vec<Option<f64>>, names: Vec<&str>) -> RecordBatch {
        let rows = values.len();
        let schema = Arc::new(Schema::new(vec![
            Field::new("value", DataType::Float64, true),
            Field::new("device_id", DataType::Utf8, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
            Field::new("seq", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Float64Array::from(values)),
                Arc::new(StringArray::from(names)),
                Arc::new(
                    TimestampMicrosecondArray::from(
                        (0..rows as i64).map(|row| 1_795_680_000_000_001 + row).collect::<Vec<_>>(),
                    )
                    .with_timezone("UTC"),
                ),
                Arc::new(Int64Array::from((0..rows as i64).map(|row| i64::MIN + row).collect::<Vec<_>>())),
            ],
        )
        .unwrap()
    }

    #[test]
    fn withheld_columns_have_no_bounds_and_no_null_count() {
        let withheld = BTreeSet::from(["value"]);
        let stats: Value = serde_json::from_str(&delta_stats_without(
            &[batch(vec![Some(2.5), None], vec!["b", "a"])],
            &withheld,
        ))
        .unwrap();
        assert_eq!(stats["numRecords"], 2);
        for section in ["minValues", "maxValues", "nullCount"] {
            assert!(stats[section].get("value").is_none(), "{section}: {stats}");
            assert!(stats[section].get("device_id").is_some(), "{section}: {stats}");
        }
    }

    #[test]
    fn bounds_cover_every_row_of_every_batch() {
        let stats: Value = serde_json::from_str(&delta_stats(&[
            batch(vec![Some(2.5), None], vec!["b", "a"]),
            batch(vec![Some(-1.0)], vec!["c"]),
        ]))
        .unwrap();
        assert_eq!(stats["numRecords"], 3);
        assert_eq!(stats["minValues"]["value"], -1.0);
        assert_eq!(stats["maxValues"]["value"], 2.5);
        assert_eq!(stats["nullCount"]["value"], 1);
        assert_eq!(
            (stats["minValues"]["device_id"].as_str(), stats["maxValues"]["device_id"].as_str()),
            (Some("a"), Some("c"))
        );
        assert_eq!(stats["minValues"]["ts"], "2026-11-26T08:00:00.000001Z");
        assert_eq!(stats["maxValues"]["ts"], "2026-11-26T08:00:00.000002Z");
        assert_eq!(stats["minValues"]["seq"], i64::MIN, "extreme values are exact");
    }

    #[test]
    fn values_json_cannot_state_leave_the_column_unbounded() {
        let long = "x".repeat(MAX_STRING_BOUND_CHARS + 1);
        for (value, name) in [(f64::NAN, "a"), (f64::INFINITY, "a"), (1.0, long.as_str())] {
            let stats: Value =
                serde_json::from_str(&delta_stats(&[batch(vec![Some(value)], vec![name])])).unwrap();
            let bounded =
                stats["minValues"].get("value").is_some() && stats["minValues"].get("device_id").is_some();
            assert!(!bounded, "{stats}");
            assert_eq!(stats["nullCount"]["value"], 0);
        }
    }
}
