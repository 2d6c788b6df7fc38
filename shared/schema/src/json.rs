//! JSON readings to Avro binary. Validation and encoding happen in one pass over the schema's
//! fields, so a valid reading costs one walk and an invalid one reports every bad field at once.
//!
//! The file passes 500 lines only with its tests.

use serde::Serialize;
use serde_json::{Map, Value};
use sluice_clock::{format_micros_shortest_fraction, parse_rfc3339_micros};

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

/// Event times a reading may carry: from `earliest_micros` to `max_future_skew_micros` past
/// `now_micros`. Bounding both ends keeps every later time computation (partition keys, windows,
/// Kafka timestamps) within the years every consumer can represent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTimeLimits {
    pub now_micros: i64,
    pub max_future_skew_micros: i64,
    /// The earliest accepted event time, epoch microseconds; `i64::MIN` for no lower bound.
    pub earliest_micros: i64,
}

impl EventTimeLimits {
    /// Why `event_time_micros` is refused, or `None` when it is within the limits.
    pub fn check(&self, event_time_micros: i64) -> Option<String> {
        if event_time_micros < self.earliest_micros {
            return Some(format!(
                "{} is before {}, the earliest event time accepted",
                describe_micros(event_time_micros),
                describe_micros(self.earliest_micros)
            ));
        }
        let future_micros = event_time_micros.saturating_sub(self.now_micros);
        if future_micros > self.max_future_skew_micros {
            return Some(format!(
                "is {:.1} s in the future; at most {:.1} s of clock skew is accepted",
                future_micros as f64 / 1e6,
                self.max_future_skew_micros as f64 / 1e6
            ));
        }
        None
    }
}

/// Epoch microseconds as RFC 3339 when the year has four digits, else as the number itself.
pub fn describe_micros(micros: i64) -> String {
    format_micros_shortest_fraction(micros).unwrap_or_else(|| format!("epoch microsecond {micros}"))
}

/// Longest piece of a given value quoted back in a reason: a reason is listed for up to 100
/// records per answer, and a megabyte string must not make the answer a hundred megabytes.
const MAX_QUOTED_CHARS: usize = 64;

/// `text` for a reason, cut at [`MAX_QUOTED_CHARS`] characters.
fn quoted(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        None => text.to_string(),
        Some((cut, _)) => format!("{}... ({} bytes)", &text[..cut], text.len()),
    }
}

/// What the producer needs besides the encoded value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    pub key: String,
    pub event_time_micros: i64,
}

/// Parses an event time: an RFC 3339 string, or an integer of epoch milliseconds or microseconds.
/// Any input gives a time or a reason, never a panic; the range is checked by [`EventTimeLimits`].
pub fn parse_event_time(value: &Value) -> Result<i64, String> {
    match value {
        // Every time RFC 3339 can write fits an i64 of microseconds; the limits decide the rest.
        Value::String(text) => parse_rfc3339_micros(text)
            .map_err(|error| format!("'{}' is not an RFC 3339 timestamp ({error})", quoted(text))),
        Value::Number(number) => {
            let Some(integer) = number.as_i64() else {
                return Err(format!(
                    "{number} is not an integer epoch timestamp; use milliseconds, microseconds or RFC 3339"
                ));
            };
            // `abs` of i64::MIN overflows; the unsigned magnitude cannot.
            if integer.unsigned_abs() < EPOCH_MICROS_THRESHOLD.unsigned_abs() {
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
    /// [`StreamSchema::encode_json_within`] with no lower bound on the event time: for tools and
    /// tests that write records as they are; ingest bounds both ends.
    pub fn encode_json(
        &self,
        reading: &Value,
        now_micros: i64,
        max_future_skew_micros: i64,
        out: &mut Vec<u8>,
    ) -> Result<RecordMeta, Vec<FieldError>> {
        let event_times = EventTimeLimits { now_micros, max_future_skew_micros, earliest_micros: i64::MIN };
        self.encode_json_within(reading, &event_times, out)
    }

    /// Validates one JSON reading, its event time within `event_times`, and appends its
    /// single-object encoding to `out`. On error `out` is left as it was and every problem found
    /// is returned.
    pub fn encode_json_within(
        &self,
        reading: &Value,
        event_times: &EventTimeLimits,
        out: &mut Vec<u8>,
    ) -> Result<RecordMeta, Vec<FieldError>> {
        let Value::Object(object) = reading else {
            return Err(vec![FieldError {
                field: None,
                reason: format!("a reading must be a JSON object, found {}", json_type(reading)),
            }]);
        };
        let start = out.len();
        match self.encode_object(object, event_times, out) {
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
        event_times: &EventTimeLimits,
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
                        if let Some(reason) = event_times.check(micros) {
                            errors.push(FieldError::field(&field.name, reason));
                        }
                    }
                    Err(reason) => errors.push(FieldError::field(&field.name, reason)),
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
                .ok_or_else(|| format!("'{}' is not {}", quoted(text), kind.describe()))?;
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

    /// Every extreme an event time can be written as gives a time or a reason, never a panic,
    /// and only times within the limits are accepted.
    #[test]
    fn extreme_event_times_are_refused_with_reasons() {
        let schema = schema();
        let earliest = 946_684_800_000_000; // 2000-01-01T00:00:00Z
        let limits =
            EventTimeLimits { now_micros: NOW, max_future_skew_micros: SKEW, earliest_micros: earliest };
        let refused = [
            json!(i64::MIN),
            json!(i64::MIN + 1),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(-1),
            json!(0),
            json!(-EPOCH_MICROS_THRESHOLD),
            json!(EPOCH_MICROS_THRESHOLD - 1),
            json!(earliest - 1),
            json!(1e300),
            json!(-1e300),
            json!(f64::MIN_POSITIVE),
            json!("0000-01-01T00:00:00Z"),
            json!("9999-12-31T23:59:59.999999Z"),
            json!("+10000-01-01T00:00:00Z"),
            json!("-0001-01-01T00:00:00Z"),
            json!("1999-12-31T23:59:59.999999Z"),
            json!("2000-01-01T00:00:00+00:01"),
            json!(true),
            json!(null),
        ];
        for ts in refused {
            let reading = json!({"device_id": "d", "ts": ts, "seq": 1});
            let mut out = vec![7];
            let errors = schema.encode_json_within(&reading, &limits, &mut out).unwrap_err();
            assert_eq!(errors.len(), 1, "{ts}: {errors:?}");
            assert_eq!(errors[0].field.as_deref(), Some("ts"), "{ts}");
            assert_eq!(out, vec![7], "{ts}: output untouched");
        }
        let reason = |ts: Value| {
            schema
                .encode_json_within(&json!({"device_id": "d", "ts": ts, "seq": 1}), &limits, &mut Vec::new())
                .unwrap_err()[0]
                .reason
                .clone()
        };
        assert_eq!(
            reason(json!(-1)),
            "1969-12-31T23:59:59.999Z is before 2000-01-01T00:00:00Z, the earliest event time accepted"
        );
        assert!(reason(json!(i64::MIN)).starts_with("epoch microsecond -9223372036854775808 is before"));
        assert!(reason(json!(i64::MAX)).contains("in the future"), "{}", reason(json!(i64::MAX)));
        assert!(reason(json!("+10000-01-01T00:00:00Z")).contains("not an RFC 3339 timestamp"));
        let accepted =
            [json!(earliest), json!("2000-01-01T00:00:00Z"), json!(earliest / 1_000), json!(NOW + SKEW)];
        for ts in accepted {
            let reading = json!({"device_id": "d", "ts": ts, "seq": 1});
            assert!(schema.encode_json_within(&reading, &limits, &mut Vec::new()).is_ok(), "{ts}");
        }
    }

    #[test]
    fn parse_event_time_never_panics_on_extremes() {
        for integer in [i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX] {
            let _ = parse_event_time(&json!(integer));
        }
        assert_eq!(parse_event_time(&json!(i64::MIN)), Ok(i64::MIN));
        assert_eq!(parse_event_time(&json!(-1)), Ok(-1_000));
        assert!(parse_event_time(&json!(u64::MAX)).is_err());
        assert_eq!(describe_micros(i64::MAX), "epoch microsecond 9223372036854775807");
    }

    #[test]
    fn long_values_are_quoted_short_in_reasons() {
        let long = "x".repeat(1_000_000);
        let reason = parse_event_time(&json!(long)).unwrap_err();
        assert!(reason.len() < 300, "{} bytes", reason.len());
        assert!(reason.contains("(1000000 bytes)"), "{reason}");
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
