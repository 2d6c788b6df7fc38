//! Request bodies to encoded records, without I/O: decompression, JSON / NDJSON parsing and
//! validation against the stream schema. A batch is all or nothing, so every problem of every
//! record is collected before anything is produced.

use std::io::Read;
use std::ops::Range;

use serde::Serialize;
use serde_json::Value;
use sluice_schema::StreamSchema;

/// Rejections listed in one answer; the rest are counted, so a huge bad batch stays a small answer.
pub(crate) const MAX_LISTED_REJECTIONS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFormat {
    /// One JSON object, or a JSON array of objects.
    Json,
    /// One JSON object per line (`application/x-ndjson`).
    Ndjson,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
}

/// One refused record: its position in the request and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct RejectedRecord {
    pub(crate) index: usize,
    pub(crate) field: Option<String>,
    pub(crate) reason: String,
}

/// The records of one request, encoded back to back in one buffer.
#[derive(Debug, Default)]
pub(crate) struct EncodedBatch {
    pub(crate) payload: Vec<u8>,
    pub(crate) records: Vec<EncodedRecord>,
}

#[derive(Debug)]
pub(crate) struct EncodedRecord {
    pub(crate) key: String,
    pub(crate) event_time_micros: i64,
    pub(crate) value_range: Range<usize>,
}

impl EncodedBatch {
    pub(crate) fn value(&self, record: &EncodedRecord) -> &[u8] {
        &self.payload[record.value_range.clone()]
    }
}

/// Picks the body format from `Content-Type`; a missing type is taken as JSON.
pub(crate) fn body_format(content_type_opt: Option<&str>) -> Result<BodyFormat, BodyError> {
    let Some(content_type) = content_type_opt else { return Ok(BodyFormat::Json) };
    let media_type = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match media_type.as_str() {
        "application/json" | "" => Ok(BodyFormat::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(BodyFormat::Ndjson),
        other => Err(BodyError::UnsupportedMediaType(format!(
            "content type '{other}' is not accepted; send application/json (an object or an array of objects) \
             or application/x-ndjson (one object per line)"
        ))),
    }
}

/// Undoes `Content-Encoding`, refusing output larger than `max_bytes` (a small gzip body can
/// expand a thousandfold).
pub(crate) fn decompress(
    body: Vec<u8>,
    encoding_opt: Option<&str>,
    max_bytes: usize,
) -> Result<Vec<u8>, BodyError> {
    let encoding = encoding_opt.map(|value| value.trim().to_ascii_lowercase()).unwrap_or_default();
    let too_large =
        || BodyError::TooLarge(format!("decompressed body exceeds {max_bytes} bytes (http.max_body_bytes)"));
    let limit = max_bytes as u64 + 1;
    let mut decoded = Vec::new();
    match encoding.as_str() {
        "" | "identity" => return Ok(body),
        "gzip" | "x-gzip" => flate2::read::GzDecoder::new(&body[..])
            .take(limit)
            .read_to_end(&mut decoded)
            .map_err(|error| BodyError::Malformed(format!("body is not valid gzip: {error}")))?,
        "zstd" => zstd::stream::read::Decoder::new(&body[..])
            .map_err(|error| BodyError::Malformed(format!("body is not valid zstd: {error}")))?
            .take(limit)
            .read_to_end(&mut decoded)
            .map_err(|error| BodyError::Malformed(format!("body is not valid zstd: {error}")))?,
        other => {
            return Err(BodyError::UnsupportedMediaType(format!(
                "content encoding '{other}' is not accepted; use gzip, zstd or none"
            )));
        }
    };
    if decoded.len() > max_bytes {
        return Err(too_large());
    }
    Ok(decoded)
}

/// Splits a body into readings. Malformed JSON in a JSON body refuses the whole body; in NDJSON
/// it refuses that line's record.
pub(crate) fn parse_readings(
    body: &[u8],
    format: BodyFormat,
    max_records: usize,
) -> Result<Vec<Result<Value, String>>, BodyError> {
    let too_many = |count: usize| {
        BodyError::TooLarge(format!("{count} records exceed the limit of {max_records} per request"))
    };
    match format {
        BodyFormat::Json => {
            let value: Value = serde_json::from_slice(body)
                .map_err(|error| BodyError::Malformed(format!("body is not valid JSON: {error}")))?;
            match value {
                Value::Array(items) if items.len() > max_records => Err(too_many(items.len())),
                Value::Array(items) if items.is_empty() => {
                    Err(BodyError::Malformed("the array holds no records".into()))
                }
                Value::Array(items) => Ok(items.into_iter().map(Ok).collect()),
                other => Ok(vec![Ok(other)]),
            }
        }
        BodyFormat::Ndjson => {
            let lines = || {
                body.split(|&byte| byte == b'\n')
                    .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
                    .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            };
            let mut readings = Vec::new();
            for line in lines() {
                if readings.len() == max_records {
                    return Err(too_many(lines().count()));
                }
                readings.push(
                    serde_json::from_slice(line).map_err(|error| format!("line is not valid JSON: {error}")),
                );
            }
            if readings.is_empty() {
                return Err(BodyError::Malformed("the body holds no records".into()));
            }
            Ok(readings)
        }
    }
}

/// Validates and encodes every reading; any bad one refuses the batch with all rejections.
pub(crate) fn encode_batch(
    schema: &StreamSchema,
    readings: &[Result<Value, String>],
    now_micros: i64,
    max_future_skew_micros: i64,
) -> Result<EncodedBatch, Vec<RejectedRecord>> {
    let mut batch = EncodedBatch {
        payload: Vec::with_capacity(readings.len() * 96),
        records: Vec::with_capacity(readings.len()),
    };
    let mut rejected = Vec::new();
    for (index, reading) in readings.iter().enumerate() {
        let reading = match reading {
            Ok(reading) => reading,
            Err(reason) => {
                rejected.push(RejectedRecord { index, field: None, reason: reason.clone() });
                continue;
            }
        };
        let start = batch.payload.len();
        match schema.encode_json(reading, now_micros, max_future_skew_micros, &mut batch.payload) {
            Ok(meta) => batch.records.push(EncodedRecord {
                key: meta.key,
                event_time_micros: meta.event_time_micros,
                value_range: start..batch.payload.len(),
            }),
            Err(errors) => rejected.extend(errors.into_iter().map(|error| RejectedRecord {
                index,
                field: error.field,
                reason: error.reason,
            })),
        }
    }
    if rejected.is_empty() { Ok(batch) } else { Err(rejected) }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;

    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_796_000_000_000_000;

    fn schema() -> StreamSchema {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/telemetry.avsc");
        StreamSchema::from_avro_json("telemetry", &std::fs::read_to_string(&path).unwrap(), &path).unwrap()
    }

    #[test]
    fn content_types_pick_formats() {
        assert_eq!(body_format(None), Ok(BodyFormat::Json));
        assert_eq!(body_format(Some("application/json; charset=utf-8")), Ok(BodyFormat::Json));
        assert_eq!(body_format(Some("application/x-ndjson")), Ok(BodyFormat::Ndjson));
        assert!(matches!(body_format(Some("text/csv")), Err(BodyError::UnsupportedMediaType(_))));
    }

    #[test]
    fn gzip_and_zstd_bodies_decode_within_limit() {
        let body = br#"{"device_id":"d"}"#.to_vec();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gzip.write_all(&body).unwrap();
        let gzipped = gzip.finish().unwrap();
        assert_eq!(decompress(gzipped, Some("gzip"), 1024).unwrap(), body);
        let zstded = zstd::encode_all(&body[..], 3).unwrap();
        assert_eq!(decompress(zstded, Some("zstd"), 1024).unwrap(), body);
        assert!(matches!(
            decompress(body.clone(), Some("br"), 1024),
            Err(BodyError::UnsupportedMediaType(_))
        ));
        assert!(matches!(decompress(b"not gzip".to_vec(), Some("gzip"), 1024), Err(BodyError::Malformed(_))));
    }

    #[test]
    fn decompression_bomb_is_too_large() {
        let zeros = vec![b' '; 1_000_000];
        let compressed = zstd::encode_all(&zeros[..], 3).unwrap();
        assert!(compressed.len() < 1_000);
        assert!(matches!(decompress(compressed, Some("zstd"), 10_000), Err(BodyError::TooLarge(_))));
    }

    #[test]
    fn json_object_array_and_ndjson_parse() {
        assert_eq!(parse_readings(br#"{"a":1}"#, BodyFormat::Json, 10).unwrap().len(), 1);
        assert_eq!(parse_readings(br#"[{"a":1},{"a":2}]"#, BodyFormat::Json, 10).unwrap().len(), 2);
        let ndjson = parse_readings(b"{\"a\":1}\r\n\n{oops}\n{\"a\":3}\n", BodyFormat::Ndjson, 10).unwrap();
        assert_eq!(ndjson.len(), 3);
        assert!(ndjson[1].is_err());
        assert!(matches!(parse_readings(b"{", BodyFormat::Json, 10), Err(BodyError::Malformed(_))));
        assert!(matches!(parse_readings(b"[]", BodyFormat::Json, 10), Err(BodyError::Malformed(_))));
    }

    #[test]
    fn record_limit_is_enforced_for_both_formats() {
        assert!(matches!(parse_readings(b"[{},{},{}]", BodyFormat::Json, 2), Err(BodyError::TooLarge(_))));
        assert!(matches!(
            parse_readings(b"{}\n{}\n{}\n", BodyFormat::Ndjson, 2),
            Err(BodyError::TooLarge(_))
        ));
        assert!(parse_readings(b"{}\n{}\n", BodyFormat::Ndjson, 2).is_ok());
    }

    #[test]
    fn batch_is_refused_whole_with_every_rejection_indexed() {
        let schema = schema();
        let readings = vec![
            Ok(json!({"device_id": "a", "ts": NOW, "seq": 1})),
            Err("line is not valid JSON".to_string()),
            Ok(json!({"device_id": "b", "ts": NOW, "seq": "two"})),
        ];
        let rejected = encode_batch(&schema, &readings, NOW, 0).unwrap_err();
        assert_eq!(rejected.len(), 2);
        assert_eq!((rejected[0].index, rejected[0].field.as_deref()), (1, None));
        assert_eq!((rejected[1].index, rejected[1].field.as_deref()), (2, Some("seq")));
    }

    #[test]
    fn valid_batch_keeps_each_value_range() {
        let schema = schema();
        let readings = vec![
            Ok(json!({"device_id": "a", "ts": NOW, "seq": 1})),
            Ok(json!({"device_id": "bb", "ts": NOW, "seq": 2})),
        ];
        let batch = encode_batch(&schema, &readings, NOW, 0).unwrap();
        assert_eq!(batch.records.len(), 2);
        assert_eq!(batch.records[1].key, "bb");
        let second = batch.value(&batch.records[1]);
        assert_eq!(sluice_schema::split_single_object(second).unwrap().0, schema.fingerprint);
        assert_eq!(batch.records[0].value_range.end, batch.records[1].value_range.start);
    }
}
