//! JSON readings to Avro binary. Validation and encoding happen in one pass over the schema's
//! fields, so a valid reading costs one walk and an invalid one reports every bad field at once.

use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::wire::write_single_object_header;
use crate::{FieldKind, FieldSpec, NullableUnion, StreamSchema};

/// Integers below this are epoch milliseconds, at or above it epoch microseconds. 10^14 ms is the
/// year 5138 and 10^14 us is 1973, so real readings are never ambiguous.
const EPOCH_MICROS_THRESHOLD: i64 = 100_000_000_000_000;

/// Why one field of one reading was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// The field, or `None` when the reading as a whole is wrong (for example, not an object).
    pub field: Option<String>,
    pub reason: String,
}

impl FieldError {
    fn field(name: &str, reason: impl Into<String>) -> Self {
        Self { field: Some(name.to_string()), reason: reason.into() }
    }
}

/// What the producer needs besides the encoded value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    pub key: String,
    pub event_time_micros: i64,
}

/// Parses an event time: an RFC 3339 string, or an integer of epoch milliseconds or microseconds.
pub fn parse_event_time(value: &Value) -> Result<i64, String> {
    match value {
        Value::String(text) => {
            let parsed = OffsetDateTime::parse(text, &Rfc3339)
                .map_err(|error| format!("'{text}' is not an RFC 3339 timestamp ({error})"))?;
            i64::try_from(parsed.unix_timestamp_nanos() / 1_000)
                .map_err(|_| format!("'{text}' is out of range"))
        }
        Value::Number(number) => {
            let Some(integer) = number.as_i64() else {
                return Err(format!(
                    "{number} is not an integer epoch timestamp; use milliseconds, microseconds or RFC 3339"
                ));
            };
            if integer.abs() < EPOCH_MICROS_THRESHOLD {
                integer.checked_mul(1_000).ok_or_else(|| format!("{integer} is out of range"))
            } else {
                Ok(integer)
            }
        }
        other => Err(format!(
            "expected an RFC 3339 string or epoch milliseconds/microseconds, found {}",
            json_type(other)
        )),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl StreamSchema {
    /// Validates one JSON reading and appends its single-object encoding to `out`. On error `out`
    /// is left as it was and every problem found is returned.
    pub fn encode_json(
        &self,
        reading: &Value,
        now_micros: i64,
        max_future_skew_micros: i64,
        out: &mut Vec<u8>,
    ) -> Result<RecordMeta, Vec<FieldError>> {
        let Value::Object(object) = reading else {
            return Err(vec![FieldError {
                field: None,
                reason: format!("a reading must be a JSON object, found {}", json_type(reading)),
            }]);
        };
        let start = out.len();
        match self.encode_object(object, now_micros, max_future_skew_micros, out) {
            Ok(meta) => Ok(meta),
            Err(errors) => {
                out.truncate(start);
                Err(errors)
            }
        }
    }

    fn encode_object(
        &self,
        object: &Map<String, Value>,
        now_micros: i64,
        max_future_skew_micros: i64,
        out: &mut Vec<u8>,
    ) -> Result<RecordMeta, Vec<FieldError>> {
        let mut errors = Vec::new();
        write_single_object_header(self.fingerprint, out);
        let mut key = String::new();
        let mut event_time_micros = 0;
        let mut num_known_given = 0;
        for (index, field) in self.fields.iter().enumerate() {
            let given_opt = object.get(&field.name);
            num_known_given += usize::from(given_opt.is_some());
            let value = given_opt.or(field.default_opt.as_ref()).unwrap_or(&Value::Null);
            if index == self.event_time_index {
                match parse_event_time(value) {
                    Ok(micros) => {
                        event_time_micros = micros;
                        let stored = if field.kind == FieldKind::TimestampMillis {
                            micros.div_euclid(1_000)
                        } else {
                            micros
                        };
                        write_long(stored, out);
                    }
                    Err(reason) => errors.push(FieldError::field(&field.name, reason)),
                }
                let future_micros = event_time_micros.saturating_sub(now_micros);
                if future_micros > max_future_skew_micros {
                    errors.push(FieldError::field(
                        &field.name,
                        format!(
                            "is {:.1} s in the future; at most {:.1} s of clock skew is accepted",
                            future_micros as f64 / 1e6,
                            max_future_skew_micros as f64 / 1e6
                        ),
                    ));
                }
                continue;
            }
            if let Err(reason) = encode_field(field, value, out) {
                errors.push(FieldError::field(&field.name, reason));
                continue;
            }
            if index == self.key_index {
                key = value.as_str().unwrap_or_default().to_string();
                if key.is_empty() {
                    errors.push(FieldError::field(&field.name, "must not be empty"));
                }
            }
        }
        // Counting known fields instead of looking every key up keeps the usual case cheap.
        if num_known_given < object.len() {
            let unknown: Vec<FieldError> = object
                .keys()
                .filter(|name| self.field(name).is_none())
                .map(|name| {
                    FieldError::field(
                        name,
                        format!("unknown field; the '{}' schema has no such field", self.stream),
                    )
                })
                .collect();
            errors.splice(0..0, unknown);
        }
        if errors.is_empty() { Ok(RecordMeta { key, event_time_micros }) } else { Err(errors) }
    }
}

fn encode_field(field: &FieldSpec, value: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    match (field.nullable_opt, value) {
        (Some(position), Value::Null) => {
            write_long(if position == NullableUnion::NullFirst { 0 } else { 1 }, out);
            Ok(())
        }
        (None, Value::Null) => {
            Err(format!("required field is missing or null; expected {}", field.kind.describe()))
        }
        (Some(position), value) => {
            write_long(if position == NullableUnion::NullFirst { 1 } else { 0 }, out);
            encode_value(&field.kind, value, out)
        }
        (None, value) => encode_value(&field.kind, value, out),
    }
}

fn encode_value(kind: &FieldKind, value: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    let mismatch = || format!("expected {}, found {}", kind.describe(), json_type(value));
    match kind {
        FieldKind::Boolean => out.push(u8::from(value.as_bool().ok_or_else(mismatch)?)),
        FieldKind::Int => {
            let integer = integer(value, mismatch)?;
            let narrowed =
                i32::try_from(integer).map_err(|_| format!("{integer} does not fit a 32-bit int"))?;
            write_long(i64::from(narrowed), out);
        }
        FieldKind::Long => write_long(integer(value, mismatch)?, out),
        FieldKind::Float => {
            let number = value.as_f64().ok_or_else(mismatch)?;
            let narrowed = number as f32;
            if !narrowed.is_finite() {
                return Err(format!("{number} does not fit a 32-bit float"));
            }
            out.extend_from_slice(&narrowed.to_le_bytes());
        }
        FieldKind::Double => out.extend_from_slice(&value.as_f64().ok_or_else(mismatch)?.to_le_bytes()),
        FieldKind::String => {
            let text = value.as_str().ok_or_else(mismatch)?;
            write_long(text.len() as i64, out);
            out.extend_from_slice(text.as_bytes());
        }
        FieldKind::Enum { symbols } => {
            let text = value.as_str().ok_or_else(mismatch)?;
            let index = symbols
                .iter()
                .position(|symbol| symbol == text)
                .ok_or_else(|| format!("'{text}' is not {}", kind.describe()))?;
            write_long(index as i64, out);
        }
        FieldKind::TimestampMicros => write_long(parse_event_time(value)?, out),
        FieldKind::TimestampMillis => write_long(parse_event_time(value)?.div_euclid(1_000), out),
    }
    Ok(())
}

fn integer(value: &Value, mismatch: impl Fn() -> String) -> Result<i64, String> {
    match value {
        Value::Number(number) => number.as_i64().ok_or_else(|| format!("{number} is not a 64-bit integer")),
        _ => Err(mismatch()),
    }
}

/// Avro `long`/`int`: zig-zag, then base-128 varint.
fn write_long(value: i64, out: &mut Vec<u8>) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use apache_avro::GenericSingleObjectReader;
    use apache_avro::types::Value as AvroValue;
    use serde_json::json;

    use super::*;
    use crate::test_schemas::TELEMETRY;
    use crate::wire::single_object_header as header_for;

    const NOW: i64 = 1_796_000_000_000_000;
    const SKEW: i64 = 300_000_000;

    fn schema() -> StreamSchema {
        StreamSchema::from_avro_json("telemetry", TELEMETRY, Path::new("telemetry.avsc")).unwrap()
    }

    fn decode(schema: &StreamSchema, bytes: &[u8]) -> Vec<(String, AvroValue)> {
        let reader = GenericSingleObjectReader::builder()
            .schema(schema.avro.clone())
            .header(header_for(schema.fingerprint))
            .build()
            .unwrap();
        match reader.read_value(&mut &bytes[..]).unwrap() {
            AvroValue::Record(fields) => fields,
            other => panic!("not a record: {other:?}"),
        }
    }

    #[test]
    fn valid_reading_round_trips_through_apache_avro() {
        let schema = schema();
        let mut out = Vec::new();
        let reading = json!({"device_id": "dev-1", "ts": "2026-11-26T08:00:00.123456Z", "seq": 7,
            "temperature": 21.5, "rssi": -70, "status": "WARN"});
        let meta = schema.encode_json(&reading, NOW, SKEW, &mut out).unwrap();
        assert_eq!(meta.key, "dev-1");
        assert_eq!(meta.event_time_micros, 1_795_680_000_123_456);
        let fields = decode(&schema, &out);
        let field = |name: &str| fields.iter().find(|(field, _)| field == name).unwrap().1.clone();
        assert_eq!(field("device_id"), AvroValue::String("dev-1".into()));
        assert_eq!(field("ts"), AvroValue::TimestampMicros(1_795_680_000_123_456));
        assert_eq!(field("seq"), AvroValue::Long(7));
        assert_eq!(field("temperature"), AvroValue::Union(1, Box::new(AvroValue::Double(21.5))));
        assert_eq!(field("humidity"), AvroValue::Union(0, Box::new(AvroValue::Null)));
        assert_eq!(field("rssi"), AvroValue::Union(1, Box::new(AvroValue::Int(-70))));
        assert_eq!(field("status"), AvroValue::Enum(1, "WARN".into()));
    }

    #[test]
    fn epoch_millis_and_micros_are_told_apart() {
        assert_eq!(parse_event_time(&json!(1_795_507_200_123i64)), Ok(1_795_507_200_123_000));
        assert_eq!(parse_event_time(&json!(1_795_680_000_123_456i64)), Ok(1_795_680_000_123_456));
        assert!(parse_event_time(&json!(1.5)).is_err());
        assert!(parse_event_time(&json!("yesterday")).is_err());
    }

    #[test]
    fn every_bad_field_is_reported_and_output_untouched() {
        let schema = schema();
        let mut out = vec![9];
        let reading =
            json!({"device_id": 5, "ts": "noon", "temperature": "hot", "colour": "red", "rssi": 1e12});
        let errors = schema.encode_json(&reading, NOW, SKEW, &mut out).unwrap_err();
        let fields: Vec<&str> = errors.iter().filter_map(|error| error.field.as_deref()).collect();
        assert_eq!(fields, ["colour", "device_id", "ts", "seq", "temperature", "rssi"]);
        assert!(errors[0].reason.contains("unknown field"));
        assert!(errors[3].reason.contains("missing"));
        assert_eq!(out, vec![9]);
    }

    #[test]
    fn far_future_timestamps_are_rejected() {
        let schema = schema();
        let future = NOW + 3_600_000_000;
        let errors = schema
            .encode_json(&json!({"device_id": "d", "ts": future, "seq": 1}), NOW, SKEW, &mut Vec::new())
            .unwrap_err();
        assert_eq!(errors[0].field.as_deref(), Some("ts"));
        assert!(errors[0].reason.contains("in the future"), "{}", errors[0].reason);
        let near_future = NOW + 60_000_000;
        assert!(
            schema
                .encode_json(
                    &json!({"device_id": "d", "ts": near_future, "seq": 1}),
                    NOW,
                    SKEW,
                    &mut Vec::new()
                )
                .is_ok()
        );
    }

    #[test]
    fn non_objects_and_bad_enums_are_explained() {
        let schema = schema();
        let errors = schema.encode_json(&json!([1, 2]), NOW, SKEW, &mut Vec::new()).unwrap_err();
        assert_eq!(errors[0].field, None);
        let errors = schema
            .encode_json(
                &json!({"device_id": "d", "ts": NOW, "seq": 1, "status": "BROKEN"}),
                NOW,
                SKEW,
                &mut Vec::new(),
            )
            .unwrap_err();
        assert!(errors[0].reason.contains("OK"), "{}", errors[0].reason);
    }

    #[test]
    fn varints_match_the_avro_spec() {
        let cases: [(i64, &[u8]); 6] =
            [(0, &[0]), (-1, &[1]), (1, &[2]), (-64, &[0x7f]), (64, &[0x80, 0x01]), (i64::MIN, &[0xff; 9])];
        for (value, expected) in cases {
            let mut out = Vec::new();
            write_long(value, &mut out);
            if value == i64::MIN {
                assert_eq!(out.len(), 10);
            } else {
                assert_eq!(out, expected, "{value}");
            }
        }
    }
}
