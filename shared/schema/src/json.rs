//! JSON readings to Avro binary. Validation and encoding happen in one pass over the schema's
//! fields, so a valid reading costs one walk and an invalid one reports every bad field at once.
//!
//! There is one encoder, over a [`ReadingFields`] table: ingest's parser fills the table straight
//! from the request body, and a `serde_json::Value` reading (tools, tests, benchmarks) is filed
//! into one first. A second encoder over `Value` would drift from the first in its refusals, and
//! the refusals are part of the HTTP answer.
//!
//! The file passes 500 lines only with its tests: they run one corpus of readings through both
//! ways in, which must agree byte for byte and refusal for refusal.

use std::borrow::Cow;

use serde::Serialize;
use serde_json::Value;
use sluice_clock::{format_micros_shortest_fraction, parse_rfc3339_micros};

use crate::reading::{JsonScalar, ReadingFields};
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

    /// The refusal of a reading that is `found` instead of a JSON object.
    pub fn not_an_object(found: &JsonScalar<'_>) -> Self {
        Self { field: None, reason: format!("a reading must be a JSON object, found {}", found.json_type()) }
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
    event_time(&JsonScalar::from_value(value))
}

fn event_time(value: &JsonScalar<'_>) -> Result<i64, String> {
    match value {
        // Every time RFC 3339 can write fits an i64 of microseconds; the limits decide the rest.
        JsonScalar::Str(text) => parse_rfc3339_micros(text)
            .map_err(|error| format!("'{}' is not an RFC 3339 timestamp ({error})", quoted(text))),
        number if number.is_number() => {
            let Some(integer) = number.as_i64() else {
                // Printed as serde_json prints the number (`1.5`, `1e+300`), as it always was.
                return Err(format!(
                    "{} is not an integer epoch timestamp; use milliseconds, microseconds or RFC 3339",
                    number.to_value()
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
            other.json_type()
        )),
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
    /// is returned. The reading is filed into a [`ReadingFields`] table (borrowing its strings)
    /// and encoded by [`StreamSchema::encode_fields_within`].
    pub fn encode_json_within(
        &self,
        reading: &Value,
        event_times: &EventTimeLimits,
        out: &mut Vec<u8>,
    ) -> Result<RecordMeta, Vec<FieldError>> {
        let Value::Object(object) = reading else {
            return Err(vec![FieldError::not_an_object(&JsonScalar::from_value(reading))]);
        };
        let mut fields = ReadingFields::for_schema(self);
        for (name, value) in object {
            fields.insert(self, Cow::Borrowed(name.as_str()), JsonScalar::from_value(value));
        }
        self.encode_fields_within(&fields, event_times, out)
    }

    /// Validates one reading given as a field table filled for this schema, its event time
    /// within `event_times`, and appends its single-object encoding to `out`. On error `out` is
    /// left as it was and every problem found is returned: unknown fields first (sorted), then
    /// the schema's fields in schema order.
    pub fn encode_fields_within(
        &self,
        fields: &ReadingFields<'_>,
        event_times: &EventTimeLimits,
        out: &mut Vec<u8>,
    ) -> Result<RecordMeta, Vec<FieldError>> {
        let start = out.len();
        match self.encode_fields(fields, event_times, out) {
            Ok(meta) => Ok(meta),
            Err(errors) => {
                out.truncate(start);
                Err(errors)
            }
        }
    }

    fn encode_fields(
        &self,
        fields: &ReadingFields<'_>,
        event_times: &EventTimeLimits,
        out: &mut Vec<u8>,
    ) -> Result<RecordMeta, Vec<FieldError>> {
        let mut errors = Vec::new();
        write_single_object_header(self.fingerprint, out);
        let mut key = String::new();
        let mut event_time_micros = 0;
        for (index, field) in self.fields.iter().enumerate() {
            // A missing field takes the schema's default, read in place: no copy per reading.
            let default_value;
            let value = match fields.get(index) {
                Some(given) => given,
                None => {
                    default_value =
                        field.default_opt.as_ref().map_or(JsonScalar::Null, JsonScalar::from_value);
                    &default_value
                }
            };
            if index == self.event_time_index {
                match event_time(value) {
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
        if fields.has_unknown() {
            let unknown: Vec<FieldError> = fields
                .unknown_names_sorted()
                .into_iter()
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

fn encode_field(field: &FieldSpec, value: &JsonScalar<'_>, out: &mut Vec<u8>) -> Result<(), String> {
    match (field.nullable_opt, value) {
        (Some(position), JsonScalar::Null) => {
            write_long(if position == NullableUnion::NullFirst { 0 } else { 1 }, out);
            Ok(())
        }
        (None, JsonScalar::Null) => {
            Err(format!("required field is missing or null; expected {}", field.kind.describe()))
        }
        (Some(position), value) => {
            write_long(if position == NullableUnion::NullFirst { 1 } else { 0 }, out);
            encode_value(&field.kind, value, out)
        }
        (None, value) => encode_value(&field.kind, value, out),
    }
}

fn encode_value(kind: &FieldKind, value: &JsonScalar<'_>, out: &mut Vec<u8>) -> Result<(), String> {
    let mismatch = || format!("expected {}, found {}", kind.describe(), value.json_type());
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
                // Rust's `{}` of the f64 (`1e39` prints all 40 digits), as it always was.
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
        FieldKind::TimestampMicros => write_long(event_time(value)?, out),
        FieldKind::TimestampMillis => write_long(event_time(value)?.div_euclid(1_000), out),
    }
    Ok(())
}

fn integer(value: &JsonScalar<'_>, mismatch: impl Fn() -> String) -> Result<i64, String> {
    if !value.is_number() {
        return Err(mismatch());
    }
    // Printed as serde_json prints the number: `1.0`, `-0.0`, `18446744073709551615`.
    value.as_i64().ok_or_else(|| format!("{} is not a 64-bit integer", value.to_value()))
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
    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
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

    /// What a parser hands on for one reading: the fields are in the table, or it is another value.
    enum Parsed<'a> {
        Object,
        Other(JsonScalar<'a>),
    }

    /// Fills a field table straight from JSON text, as ingest's visitors do: names and strings
    /// borrowed from the text, copied only where serde_json had to unescape them, nested values
    /// skipped.
    struct TableSeed<'t, 'a> {
        schema: &'t StreamSchema,
        fields: &'t mut ReadingFields<'a>,
    }

    impl<'de> DeserializeSeed<'de> for TableSeed<'_, 'de> {
        type Value = Parsed<'de>;

        fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Parsed<'de>, D::Error> {
            deserializer.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for TableSeed<'_, 'de> {
        type Value = Parsed<'de>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("a reading")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed<'de>, A::Error> {
            self.fields.clear();
            while let Some(name) = map.next_key_seed(ScalarSeed)? {
                let value = map.next_value_seed(ScalarSeed)?;
                let JsonScalar::Str(name) = name else {
                    return Err(de::Error::custom("a field name that is not a string"));
                };
                self.fields.insert(self.schema, name, value);
            }
            Ok(Parsed::Object)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Parsed<'de>, A::Error> {
            ScalarSeed.visit_seq(seq).map(Parsed::Other)
        }

        fn visit_bool<E: de::Error>(self, value: bool) -> Result<Parsed<'de>, E> {
            Ok(Parsed::Other(JsonScalar::Bool(value)))
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<Parsed<'de>, E> {
            Ok(Parsed::Other(JsonScalar::Int(value)))
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<Parsed<'de>, E> {
            Ok(Parsed::Other(JsonScalar::from_u64(value)))
        }

        fn visit_f64<E: de::Error>(self, value: f64) -> Result<Parsed<'de>, E> {
            Ok(Parsed::Other(JsonScalar::from_f64(value)))
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<Parsed<'de>, E> {
            ScalarSeed.visit_str(value).map(Parsed::Other)
        }

        fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Parsed<'de>, E> {
            ScalarSeed.visit_borrowed_str(value).map(Parsed::Other)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Parsed<'de>, E> {
            Ok(Parsed::Other(JsonScalar::Null))
        }
    }

    /// One name or value: borrowed when serde_json can lend it, nested values skipped.
    struct ScalarSeed;

    impl<'de> DeserializeSeed<'de> for ScalarSeed {
        type Value = JsonScalar<'de>;

        fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<JsonScalar<'de>, D::Error> {
            deserializer.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for ScalarSeed {
        type Value = JsonScalar<'de>;

        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("a JSON value")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonScalar<'de>, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(JsonScalar::Object)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<JsonScalar<'de>, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(JsonScalar::Array)
        }

        fn visit_bool<E: de::Error>(self, value: bool) -> Result<JsonScalar<'de>, E> {
            Ok(JsonScalar::Bool(value))
        }

        fn visit_i64<E: de::Error>(self, value: i64) -> Result<JsonScalar<'de>, E> {
            Ok(JsonScalar::Int(value))
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<JsonScalar<'de>, E> {
            Ok(JsonScalar::from_u64(value))
        }

        fn visit_f64<E: de::Error>(self, value: f64) -> Result<JsonScalar<'de>, E> {
            Ok(JsonScalar::from_f64(value))
        }

        fn visit_str<E: de::Error>(self, value: &str) -> Result<JsonScalar<'de>, E> {
            Ok(JsonScalar::Str(Cow::Owned(value.to_string())))
        }

        fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<JsonScalar<'de>, E> {
            Ok(JsonScalar::Str(Cow::Borrowed(value)))
        }

        fn visit_unit<E: de::Error>(self) -> Result<JsonScalar<'de>, E> {
            Ok(JsonScalar::Null)
        }
    }

    /// A reading's answer, and what `out` (one byte before the call) holds after it.
    type Answer = (Result<RecordMeta, Vec<FieldError>>, Vec<u8>);

    fn by_value(schema: &StreamSchema, text: &str, limits: &EventTimeLimits) -> Answer {
        let reading: Value = serde_json::from_str(text).unwrap();
        let mut out = vec![0xa5];
        let answer = schema.encode_json_within(&reading, limits, &mut out);
        (answer, out)
    }

    fn by_fields(schema: &StreamSchema, text: &str, limits: &EventTimeLimits) -> Answer {
        let mut fields = ReadingFields::for_schema(schema);
        // Left by an earlier reading: a reused table must not carry them into this one.
        fields.set(schema.key_index, JsonScalar::Str(Cow::Borrowed("stale")));
        fields.add_unknown(Cow::Borrowed("stale_field"));
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let parsed = TableSeed { schema, fields: &mut fields }.deserialize(&mut deserializer).unwrap();
        deserializer.end().unwrap();
        let mut out = vec![0xa5];
        let answer = match parsed {
            Parsed::Object => schema.encode_fields_within(&fields, limits, &mut out),
            Parsed::Other(found) => Err(vec![FieldError::not_an_object(&found)]),
        };
        (answer, out)
    }

    /// `base` with the field `name` set to `value_json`, or left out when `None`.
    fn reading_with(base: &[(&str, &str)], name: &str, value_json_opt: Option<&str>) -> String {
        let mut members: Vec<String> = base
            .iter()
            .filter(|(base_name, _)| *base_name != name)
            .map(|(base_name, base_value)| format!("\"{base_name}\":{base_value}"))
            .collect();
        if let Some(value_json) = value_json_opt {
            members.push(format!("\"{name}\":{value_json}"));
        }
        format!("{{{}}}", members.join(","))
    }

    /// Readings of every shape and every value at and past each type's limit, as JSON text.
    fn corpus(schema: &StreamSchema, base: &[(&str, &str)], variations: &[(&str, &[&str])]) -> Vec<String> {
        let mut readings: Vec<String> = [
            r#"{"device_id":"dev-1","ts":"2026-11-26T08:00:00.123456Z","seq":7,"temperature":21.5,"rssi":-70,"status":"WARN","count":3}"#,
            // Escapes in names and values, escaped and raw unicode, a surrogate pair.
            r#"{"device\u005fid":"d\u00e9v\n1","ts":1795680000123456,"s\u0065q":1,"site":"caf\u00e9 \"n\" \ud83d\ude9c","count":1}"#,
            r#"{"device_id":"日本","ts":1795680000123456,"seq":1,"site":"🚜","label":"🚜","count":1}"#,
            // Duplicates: the last value wins and the name counts once.
            r#"{"device_id":"a","ts":1795680000123456,"seq":1,"seq":2,"device_id":"b","temperature":null,"temperature":3,"count":1,"count":2}"#,
            r#"{"zeta":1,"alpha":2,"zeta":3,"device_id":"a","ts":1795680000123456,"seq":1,"Beta":4,"":5,"z\u0065ta":6,"\u00e9":7,"count":1}"#,
            "{}",
            r#"{"":null}"#,
            // Not objects.
            "5",
            "-1.5",
            "-0",
            "18446744073709551615",
            r#""text""#,
            r#""esc\u00e9""#,
            "true",
            "null",
            "[1,2]",
            "[]",
            // Nested values, for fields and as the key, event time and sequence.
            r#"{"device_id":"d","ts":1795680000123456,"seq":1,"temperature":[1,[2]],"site":{"a":{}},"count":{}}"#,
            r#"{"device_id":[],"ts":{},"seq":{"a":1},"status":[],"mode":[]}"#,
            // Null for every kind of field.
            r#"{"device_id":null,"ts":null,"seq":null,"site":null,"temperature":null,"status":null,"count":null,"ratio":null,"level":null,"label":null,"mode":null,"seen":null,"note":null,"flag":null}"#,
        ]
        .map(str::to_string)
        .to_vec();
        for field in &schema.fields {
            readings.push(reading_with(base, &field.name, None));
        }
        for (name, values) in variations {
            for value in *values {
                readings.push(reading_with(base, name, Some(*value)));
            }
        }
        readings
    }

    const LONG_TEXT: &str = "\"0123456789012345678901234567890123456789012345678901234567890123456789\"";

    const TELEMETRY_VARIATIONS: &[(&str, &[&str])] = &[
        (
            "seq",
            &[
                "1.0",
                "-0.0",
                "-0",
                "1e308",
                "-1e308",
                "1e2",
                "0.5",
                "9223372036854775807",
                "-9223372036854775808",
                "9223372036854775808",
                "-9223372036854775809",
                "18446744073709551615",
                "18446744073709551616",
                "\"7\"",
                "true",
                "null",
                "[]",
                "{}",
            ],
        ),
        ("rssi", &["2147483647", "2147483648", "-2147483648", "-2147483649", "1.0", "-0", "null", "\"1\""]),
        (
            "temperature",
            &[
                "1e308",
                "-1e308",
                "-0.0",
                "-0",
                "5e-324",
                "18446744073709551615",
                "-9223372036854775808",
                "1",
                "\"21.5\"",
                "true",
                "[1]",
                "{\"a\":1}",
            ],
        ),
        (
            "ts",
            &[
                "99999999999999",
                "100000000000000",
                "100000000000001",
                "-99999999999999",
                "-100000000000000",
                "-100000000000001",
                "946684800000",
                "946684799999",
                "9223372036854775807",
                "-9223372036854775808",
                "9223372036854775",
                "-9223372036854775",
                "18446744073709551615",
                "1.5",
                "1e300",
                "1.0",
                "\"noon\"",
                "\"\"",
                "\"2026-13-01T00:00:00Z\"",
                "\"2026-11-26T08:00:00\"",
                "\"2026-11-26 08:00:00Z\"",
                "\"2026-11-26T08:00:00.123456+01:00\"",
                "\"2026-11-26T08:00:00.123456Z\"",
                "\"2026-11-26T08:00:00.1234567Z\"",
                "\"1999-12-31T23:59:59.999999Z\"",
                "\"+10000-01-01T00:00:00Z\"",
                LONG_TEXT,
                "true",
                "null",
                "[]",
                "{}",
            ],
        ),
        (
            "status",
            &["\"OK\"", "\"FAULT\"", "\"BROKEN\"", "\"\"", "\"ok\"", "\"OK\\u0000\"", LONG_TEXT, "1", "null"],
        ),
        ("device_id", &["\"\"", "\"d\\u00e9v\"", "\"\\\"\"", "5", "true", "null", LONG_TEXT]),
        ("site", &["\"\"", "\"\\\"quoted\\\"\\\\\"", "5", "{}"]),
        ("", &["1", "\"\""]),
        ("colour", &["\"red\"", "[]"]),
    ];

    const WIDE: &str = r#"{"type":"record","name":"Wide","fields":[
        {"name":"device_id","type":"string"},
        {"name":"ts","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"seq","type":"long"},
        {"name":"flag","type":"boolean","default":false},
        {"name":"count","type":"int"},
        {"name":"ratio","type":["float","null"],"default":1.5},
        {"name":"level","type":"double","default":0.25},
        {"name":"label","type":["null","string"],"default":null},
        {"name":"mode","type":{"type":"enum","name":"Mode","symbols":["A","B"]},"default":"A"},
        {"name":"seen","type":["null",{"type":"long","logicalType":"timestamp-micros"}],"default":null},
        {"name":"note","type":"string","default":"none"}]}"#;

    const WIDE_VARIATIONS: &[(&str, &[&str])] = &[
        ("count", &["2147483647", "2147483648", "-2147483648", "-2147483649", "1.0", "1e2", "null", "\"1\""]),
        (
            "ratio",
            &[
                "3.4028234663852886e38",
                "3.4028235e38",
                "-3.4028234663852886e38",
                "3.5e38",
                "1e39",
                "-1e39",
                "1e308",
                "1e-50",
                "-0.0",
                "16777217",
                "18446744073709551615",
                "null",
                "\"1.5\"",
            ],
        ),
        ("level", &["1e308", "0", "null", "false"]),
        ("flag", &["true", "false", "1", "\"true\"", "null"]),
        ("label", &["null", "\"x\"", "\"\"", "1", "[]"]),
        ("mode", &["\"A\"", "\"B\"", "\"C\"", "\"a\"", "null", "0"]),
        (
            "seen",
            &[
                "\"2026-11-26T08:00:00Z\"",
                "1795680000123456",
                "1795680000123",
                "99999999999999",
                "100000000000000",
                "1",
                "-1",
                "\"bad\"",
                "1.5",
                "null",
                "true",
            ],
        ),
        ("note", &["\"\"", "\"x\"", "5", "null"]),
        (
            "ts",
            &[
                "\"2026-11-26T08:00:00.123456Z\"",
                "\"1969-12-31T23:59:59.9995Z\"",
                "-1",
                "1795680000123",
                "1795680000123456",
                "99999999999999",
                "100000000000000",
                "\"x\"",
            ],
        ),
    ];

    fn wide_schema() -> StreamSchema {
        StreamSchema::from_avro_json("wide", WIDE, Path::new("wide.avsc")).unwrap()
    }

    /// The Value adapter and the field table filled by a serde visitor give the same bytes and
    /// the same refusals for every reading, and a refusal leaves `out` as it was.
    #[test]
    fn both_ways_in_agree_on_every_reading_of_the_corpus() {
        let telemetry = schema();
        let telemetry_base = [("device_id", "\"d\""), ("ts", "1795680000123456"), ("seq", "1")];
        let wide = wide_schema();
        let wide_base = [("device_id", "\"d\""), ("ts", "1795680000123"), ("seq", "1"), ("count", "1")];
        let cases = [
            (&telemetry, corpus(&telemetry, &telemetry_base, TELEMETRY_VARIATIONS)),
            (&wide, corpus(&wide, &wide_base, WIDE_VARIATIONS)),
        ];
        let unbounded =
            EventTimeLimits { now_micros: NOW, max_future_skew_micros: SKEW, earliest_micros: i64::MIN };
        let bounded = EventTimeLimits { earliest_micros: 946_684_800_000_000, ..unbounded };
        let mut num_accepted = 0;
        let mut num_refused = 0;
        for (schema, readings) in &cases {
            for reading in readings {
                for limits in [&unbounded, &bounded] {
                    let expected = by_value(schema, reading, limits);
                    assert_eq!(by_fields(schema, reading, limits), expected, "{}: {reading}", schema.stream);
                    match &expected {
                        (Ok(_), out) => {
                            assert_eq!(out[0], 0xa5, "appended after what was there");
                            num_accepted += 1;
                        }
                        (Err(errors), out) => {
                            assert!(!errors.is_empty());
                            assert_eq!(out, &vec![0xa5], "{reading}: output untouched");
                            num_refused += 1;
                        }
                    }
                }
            }
        }
        // The corpus reaches both outcomes, not just one.
        assert!(num_accepted > 40 && num_refused > 100, "{num_accepted} accepted, {num_refused} refused");
    }

    /// The refusals quote numbers as they always did: serde_json's notation where a `Number` was
    /// printed, Rust's where an `f64` was, and unknown fields once each in byte order.
    #[test]
    fn refusals_read_as_before() {
        let telemetry = schema();
        let wide = wide_schema();
        let limits =
            EventTimeLimits { now_micros: NOW, max_future_skew_micros: SKEW, earliest_micros: i64::MIN };
        let reasons = |schema: &StreamSchema, reading: &str| -> Vec<(Option<String>, String)> {
            let (answer, _) = by_fields(schema, reading, &limits);
            assert_eq!(by_value(schema, reading, &limits).0, answer, "{reading}");
            answer.unwrap_err().into_iter().map(|error| (error.field, error.reason)).collect()
        };
        let only = |schema: &StreamSchema, reading: &str| -> String {
            let mut found = reasons(schema, reading);
            assert_eq!(found.len(), 1, "{reading}: {found:?}");
            found.remove(0).1
        };
        let telemetry_with = |name: &str, value: &str| {
            reading_with(
                &[("device_id", "\"d\""), ("ts", "1795680000123456"), ("seq", "1")],
                name,
                Some(value),
            )
        };
        let wide_with = |name: &str, value: &str| {
            reading_with(
                &[("device_id", "\"d\""), ("ts", "1795680000123"), ("seq", "1"), ("count", "1")],
                name,
                Some(value),
            )
        };
        assert_eq!(only(&telemetry, &telemetry_with("seq", "1.0")), "1.0 is not a 64-bit integer");
        assert_eq!(only(&telemetry, &telemetry_with("seq", "-0.0")), "-0.0 is not a 64-bit integer");
        assert_eq!(only(&telemetry, &telemetry_with("seq", "-0")), "-0.0 is not a 64-bit integer");
        assert_eq!(
            only(&telemetry, &telemetry_with("seq", "9223372036854775808")),
            "9223372036854775808 is not a 64-bit integer"
        );
        assert_eq!(
            only(&telemetry, &telemetry_with("seq", "18446744073709551615")),
            "18446744073709551615 is not a 64-bit integer"
        );
        assert_eq!(only(&telemetry, &telemetry_with("seq", "\"7\"")), "expected long, found a string");
        assert_eq!(
            only(&telemetry, &telemetry_with("rssi", "2147483648")),
            "2147483648 does not fit a 32-bit int"
        );
        assert_eq!(
            only(&telemetry, &telemetry_with("rssi", "-2147483649")),
            "-2147483649 does not fit a 32-bit int"
        );
        assert_eq!(
            only(&telemetry, &telemetry_with("temperature", "[1]")),
            "expected double, found an array"
        );
        assert_eq!(
            only(&telemetry, &telemetry_with("ts", "1.5")),
            "1.5 is not an integer epoch timestamp; use milliseconds, microseconds or RFC 3339"
        );
        assert_eq!(
            only(&telemetry, &telemetry_with("ts", "{}")),
            "expected an RFC 3339 string or epoch milliseconds/microseconds, found an object"
        );
        assert_eq!(
            only(&telemetry, &telemetry_with("status", "\"BROKEN\"")),
            r#"'BROKEN' is not one of ["OK", "WARN", "FAULT"]"#
        );
        assert_eq!(only(&telemetry, &telemetry_with("device_id", "\"\"")), "must not be empty");
        assert_eq!(
            only(&wide, &wide_with("ratio", "1e39")),
            "1000000000000000000000000000000000000000 does not fit a 32-bit float"
        );
        assert_eq!(
            only(&wide, &wide_with("level", "null")),
            "required field is missing or null; expected double"
        );
        assert_eq!(only(&telemetry, "[1,2]"), "a reading must be a JSON object, found an array");
        assert_eq!(only(&telemetry, r#""esc\u00e9""#), "a reading must be a JSON object, found a string");
        assert_eq!(
            only(&telemetry, "18446744073709551615"),
            "a reading must be a JSON object, found a number"
        );
        let unknown = reasons(
            &telemetry,
            r#"{"zeta":1,"alpha":2,"zeta":3,"device_id":"a","ts":1795680000123456,"seq":1,"Beta":4,"":5,"z\u0065ta":6,"\u00e9":7}"#,
        );
        let fields: Vec<&str> = unknown.iter().filter_map(|(field, _)| field.as_deref()).collect();
        assert_eq!(fields, ["", "Beta", "alpha", "zeta", "é"]);
        assert!(
            unknown
                .iter()
                .all(|(_, reason)| reason == "unknown field; the 'telemetry' schema has no such field")
        );
        // Unknown fields come first, then the schema's fields in schema order.
        let mixed = reasons(&telemetry, r#"{"seq":"x","zz":1,"device_id":5,"aa":2}"#);
        let fields: Vec<&str> = mixed.iter().filter_map(|(field, _)| field.as_deref()).collect();
        assert_eq!(fields, ["aa", "zz", "device_id", "ts", "seq"]);
    }

    /// Missing fields take the schema's defaults; a required field without one is refused.
    #[test]
    fn defaults_fill_missing_fields() {
        let wide = wide_schema();
        let limits =
            EventTimeLimits { now_micros: NOW, max_future_skew_micros: SKEW, earliest_micros: i64::MIN };
        let (answer, out) =
            by_fields(&wide, r#"{"device_id":"d","ts":1795680000123,"seq":1,"count":2}"#, &limits);
        assert_eq!(answer.unwrap().event_time_micros, 1_795_680_000_123_000);
        let fields = decode(&wide, &out[1..]);
        let field = |name: &str| fields.iter().find(|(field, _)| field == name).unwrap().1.clone();
        assert_eq!(field("flag"), AvroValue::Boolean(false));
        assert_eq!(field("count"), AvroValue::Int(2));
        assert_eq!(field("ratio"), AvroValue::Union(0, Box::new(AvroValue::Float(1.5))));
        assert_eq!(field("level"), AvroValue::Double(0.25));
        assert_eq!(field("label"), AvroValue::Union(0, Box::new(AvroValue::Null)));
        assert_eq!(field("mode"), AvroValue::Enum(0, "A".into()));
        assert_eq!(field("seen"), AvroValue::Union(0, Box::new(AvroValue::Null)));
        assert_eq!(field("note"), AvroValue::String("none".into()));
        let (answer, _) = by_fields(&wide, r#"{"device_id":"d","ts":1795680000123,"seq":1}"#, &limits);
        let errors = answer.unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field.as_deref(), Some("count"));
    }

    /// The table lends what serde_json lends: only a name or string that had escapes is a copy.
    #[test]
    fn table_borrows_unless_unescaping_was_needed() {
        let schema = schema();
        let text = r#"{"device_id":"plain","site":"caf\u00e9","s\u0065q":1,"unknown":"x"}"#;
        let mut fields = ReadingFields::for_schema(&schema);
        let mut deserializer = serde_json::Deserializer::from_str(text);
        TableSeed { schema: &schema, fields: &mut fields }.deserialize(&mut deserializer).unwrap();
        let position = |name: &str| schema.field_position(name).unwrap();
        assert!(matches!(fields.get(position("device_id")), Some(JsonScalar::Str(Cow::Borrowed("plain")))));
        assert!(
            matches!(fields.get(position("site")), Some(JsonScalar::Str(Cow::Owned(copied))) if copied == "café")
        );
        assert_eq!(fields.get(position("seq")), Some(&JsonScalar::Int(1)));
        assert_eq!(fields.get(position("ts")), None);
        assert_eq!(fields.unknown_names_sorted(), ["unknown"]);
        fields.clear();
        assert_eq!(fields, ReadingFields::for_schema(&schema));
    }

    /// Past 16 fields a name is found by hashing instead of comparing names in order; both find
    /// the same field.
    #[test]
    fn field_positions_agree_for_small_and_large_schemas() {
        let extra: String = (0..20)
            .map(|index| format!(r#",{{"name":"f{index}","type":["null","long"],"default":null}}"#))
            .collect();
        let large_json = format!(
            r#"{{"type":"record","name":"Large","fields":[{{"name":"device_id","type":"string"}},
            {{"name":"ts","type":{{"type":"long","logicalType":"timestamp-micros"}}}},{{"name":"seq","type":"long"}}{extra}]}}"#
        );
        let large = StreamSchema::from_avro_json("large", &large_json, Path::new("large.avsc")).unwrap();
        let telemetry = schema();
        for schema in [&telemetry, &large] {
            for (index, field) in schema.fields.iter().enumerate() {
                assert_eq!(schema.field_position(&field.name), Some(index), "{}", field.name);
                assert_eq!(schema.field(&field.name), Some(field));
            }
            assert_eq!(schema.field_position("nope"), None);
            assert_eq!(schema.field_position(""), None);
            assert_eq!(schema.field_position("device_i"), None);
        }
        let limits =
            EventTimeLimits { now_micros: NOW, max_future_skew_micros: SKEW, earliest_micros: i64::MIN };
        let reading = r#"{"f19":5,"device_id":"d","f0":null,"ts":1795680000123456,"seq":1,"f20":1}"#;
        let expected = by_value(&large, reading, &limits);
        assert_eq!(by_fields(&large, reading, &limits), expected);
        assert_eq!(expected.0.unwrap_err()[0].field.as_deref(), Some("f20"));
    }
}
