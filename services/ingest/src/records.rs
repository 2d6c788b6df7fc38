//! Request bodies to encoded records, without I/O: decompression, JSON / NDJSON parsing and
//! validation against the stream schema. A batch is all or nothing, so every problem of every
//! record is collected before anything is produced.
//!
//! Memory is bounded by construction rather than by hope: a body is parsed one reading at a time
//! and each reading is encoded before the next is read, so no JSON tree of a whole body exists; a
//! reading keeps only scalar values (a nested array or object is never a valid field value, so it
//! is skipped without being stored); a reading that would hold more than a record can carry is
//! skipped and refused; and every buffer that grows with the body is charged to a
//! [`MemoryBudget`] (the in-flight byte limit) before it grows.
//!
//! Why one file of about 800 lines of code: the body's serde visitors (body, reading, key, field
//! value) and the batch builder they feed share one memory allowance and one rejection list, and
//! the bound on memory holds only if every path that grows a buffer charges it. Split apart, a
//! visitor could grow a buffer the budget never sees; kept together, one read shows that none does.

use std::io::Read;
use std::ops::Range;

use serde::Serialize;
use serde::de::{self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use sluice_schema::{EventTimeLimits, StreamSchema};

use crate::producer::{INGEST_TIME_HEADER, SCHEMA_FINGERPRINT_HEADER};

/// Rejections listed in one answer; the rest are counted, so a huge bad batch stays a small answer.
pub(crate) const MAX_LISTED_REJECTIONS: usize = 100;

/// What librdkafka adds to a record's key and value when it checks `message.max.bytes`
/// (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`: length, attributes, timestamp and offset deltas, key and
/// value lengths and header count as varints of their widest size), plus the two headers ingest
/// sets, each name and value with a one-byte varint length (the ingest time at its widest, 20
/// characters). librdkafka refuses a larger record at enqueue time, after earlier records of the
/// same request were queued, so this is checked before anything is produced.
pub const RECORD_OVERHEAD_BYTES: usize =
    36 + (SCHEMA_FINGERPRINT_HEADER.len() + 16 + 2) + (INGEST_TIME_HEADER.len() + 20 + 2);

/// What a parsed value is charged besides its string bytes: the `Value` and its share of the map
/// that holds it and of the key (a `BTreeMap<String, Value>` entry is about this size).
const VALUE_OVERHEAD_BYTES: usize = 96;

/// Decompressed bytes one read step yields.
const DECODE_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFormat {
    /// One JSON object, or a JSON array of objects.
    Json,
    /// One JSON object per line (`application/x-ndjson`).
    Ndjson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyEncoding {
    Identity,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The memory budget (the in-flight byte limit) refused a buffer's growth.
    #[error("the in-flight byte limit does not allow this body now")]
    OverBudget,
}

/// Memory a request holds, charged against a shared limit before buffers grow.
pub(crate) trait MemoryBudget {
    /// Charges `bytes` more; false when the limit does not allow it (nothing is charged then).
    fn grow(&mut self, bytes: usize) -> bool;
    /// Gives back `bytes` that were charged.
    fn shrink(&mut self, bytes: usize);
}

/// What ingest accepts of one record, from the configuration; the same for HTTP and MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordRules {
    pub(crate) max_records: usize,
    pub(crate) earliest_event_micros: i64,
    pub(crate) max_future_skew_micros: i64,
    /// The producer's `message.max.bytes`: a record's value, key, headers and framing must fit.
    pub(crate) max_message_bytes: usize,
}

impl RecordRules {
    /// The most bytes a record's encoded value and key may have together.
    pub(crate) fn max_record_bytes(&self) -> usize {
        self.max_message_bytes.saturating_sub(RECORD_OVERHEAD_BYTES)
    }

    /// What one reading may hold while parsed. Keys and per-value overhead are not encoded, so a
    /// reading that fits a record holds well under twice its encoded size; past this it is
    /// certainly too large and is skipped instead of stored.
    fn max_reading_bytes(&self) -> usize {
        self.max_record_bytes().saturating_mul(2).saturating_add(64 * 1024)
    }

    fn event_times(&self, now_micros: i64) -> EventTimeLimits {
        EventTimeLimits {
            now_micros,
            max_future_skew_micros: self.max_future_skew_micros,
            earliest_micros: self.earliest_event_micros,
        }
    }

    fn too_large_reading_reason(&self) -> String {
        format!(
            "the reading holds more than {} bytes while parsed: far over the {} bytes a record may have \
             encoded with its key (the producer's message.max.bytes of {} less {RECORD_OVERHEAD_BYTES} \
             bytes of framing and headers)",
            self.max_reading_bytes(),
            self.max_record_bytes(),
            self.max_message_bytes
        )
    }
}

/// One refused record: its position in the request and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct RejectedRecord {
    pub(crate) index: usize,
    pub(crate) field: Option<String>,
    pub(crate) reason: String,
}

/// The refused records of a batch: the first [`MAX_LISTED_REJECTIONS`] listed, all counted.
#[derive(Debug, Default)]
pub(crate) struct Rejections {
    pub(crate) listed: Vec<RejectedRecord>,
    pub(crate) num_rejections: usize,
    pub(crate) num_rejected_records: usize,
}

impl Rejections {
    fn add_record(&mut self, rejections: impl IntoIterator<Item = RejectedRecord>) {
        let mut any = false;
        for rejection in rejections {
            any = true;
            self.num_rejections += 1;
            if self.listed.len() < MAX_LISTED_REJECTIONS {
                self.listed.push(rejection);
            }
        }
        self.num_rejected_records += usize::from(any);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.num_rejections == 0
    }

    pub(crate) fn truncated(&self) -> bool {
        self.num_rejections > self.listed.len()
    }
}

/// Why a body was not turned into a batch.
#[derive(Debug)]
pub(crate) enum BatchError {
    /// The body as a whole: malformed, too large, or over the memory budget.
    Body(BodyError),
    /// At least one record is invalid; `num_records` is how many the body holds.
    Rejected { rejections: Rejections, num_records: usize },
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

    /// Bytes this batch has allocated.
    fn allocated_bytes(&self, key_bytes: usize) -> usize {
        self.payload.capacity() + self.records.capacity() * std::mem::size_of::<EncodedRecord>() + key_bytes
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

/// Picks the decoder from `Content-Encoding`, before the body is read.
pub(crate) fn body_encoding(encoding_opt: Option<&str>) -> Result<BodyEncoding, BodyError> {
    let encoding = encoding_opt.map(|value| value.trim().to_ascii_lowercase()).unwrap_or_default();
    match encoding.as_str() {
        "" | "identity" => Ok(BodyEncoding::Identity),
        "gzip" | "x-gzip" => Ok(BodyEncoding::Gzip),
        "zstd" => Ok(BodyEncoding::Zstd),
        other => Err(BodyError::UnsupportedMediaType(format!(
            "content encoding '{other}' is not accepted; use gzip, zstd or none"
        ))),
    }
}

/// Undoes the content encoding, refusing output larger than `max_bytes` (a small gzip body can
/// expand a thousandfold). Every gzip member and zstd frame is read, and bytes after the last
/// one that do not form another are refused: concatenated members (`cat a.gz b.gz`) are one
/// body, and trailing garbage means the body is not what the client meant. The output buffer is
/// charged to `budget` before it is allocated (an identity body is returned as it is; a
/// compressed one stays charged to the caller, which can let it go once this returns).
pub(crate) fn decompress(
    body: Vec<u8>,
    encoding: BodyEncoding,
    max_bytes: usize,
    budget: &mut dyn MemoryBudget,
) -> Result<Vec<u8>, BodyError> {
    let name = match encoding {
        BodyEncoding::Identity => return Ok(body),
        BodyEncoding::Gzip => "gzip",
        BodyEncoding::Zstd => "zstd",
    };
    let malformed =
        |error: std::io::Error| BodyError::Malformed(format!("body is not valid {name}: {error}"));
    let decoder = || -> Result<Box<dyn Read + '_>, BodyError> {
        Ok(match encoding {
            BodyEncoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&body[..])),
            _ => Box::new(zstd::stream::read::Decoder::new(&body[..]).map_err(malformed)?),
        })
    };
    // Decoded twice: once to learn the size (and that it is within the limit and valid) without
    // keeping anything, then into one buffer of exactly that size. A bomb costs time, never
    // memory, and the charge is what is allocated: a growing buffer would leave its smaller
    // copies with the allocator.
    let decoded_len = decoded_len_within(decoder()?, max_bytes).map_err(|error| match error {
        DecodeError::TooLarge => {
            BodyError::TooLarge(format!("decompressed body exceeds {max_bytes} bytes (http.max_body_bytes)"))
        }
        DecodeError::Io(error) => malformed(error),
    })?;
    if !budget.grow(decoded_len) {
        return Err(BodyError::OverBudget);
    }
    let mut decoded = Vec::with_capacity(decoded_len);
    let limit = u64::try_from(decoded_len).unwrap_or(u64::MAX);
    let decoded_again =
        decoder().and_then(|reader| reader.take(limit).read_to_end(&mut decoded).map_err(malformed));
    match decoded_again {
        Ok(num_read) if num_read == decoded_len => Ok(decoded),
        Ok(_) => {
            budget.shrink(decoded_len);
            Err(BodyError::Malformed(format!("body is not valid {name}: it decoded differently twice")))
        }
        Err(error) => {
            budget.shrink(decoded_len);
            Err(error)
        }
    }
}

enum DecodeError {
    TooLarge,
    Io(std::io::Error),
}

/// Reads `reader` to its end, keeping nothing, and returns how many bytes it gave.
fn decoded_len_within(mut reader: impl Read, max_bytes: usize) -> Result<usize, DecodeError> {
    let mut chunk = vec![0; DECODE_CHUNK_BYTES];
    let mut total: usize = 0;
    loop {
        match reader.read(&mut chunk) {
            Ok(0) => return Ok(total),
            Ok(num_read) => {
                total = total.saturating_add(num_read);
                if total > max_bytes {
                    return Err(DecodeError::TooLarge);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(DecodeError::Io(error)),
        }
    }
}

/// Parses a body and encodes every reading, one at a time. Malformed JSON in a JSON body refuses
/// the whole body; in NDJSON it refuses that line's record. The batch's buffers are charged to
/// `budget` as they grow (and stay charged while the caller holds the batch).
pub(crate) fn encode_body(
    schema: &StreamSchema,
    body: &[u8],
    format: BodyFormat,
    rules: &RecordRules,
    now_micros: i64,
    budget: &mut dyn MemoryBudget,
) -> Result<EncodedBatch, BatchError> {
    let mut builder = BatchBuilder::new(schema, rules, now_micros, body.len());
    if !budget.grow(builder.allocated_bytes()) {
        return Err(BatchError::Body(BodyError::OverBudget));
    }
    let mut charged = builder.allocated_bytes();
    let parsed = for_each_reading(body, format, rules, |index, reading| {
        builder.add(index, reading.as_ref().map_err(String::as_str));
        let allocated = builder.allocated_bytes();
        if allocated > charged {
            if !budget.grow(allocated - charged) {
                return Err(BodyError::OverBudget);
            }
            charged = allocated;
        }
        Ok(())
    });
    let result = match parsed {
        Ok(num_records) => builder.finish(num_records),
        Err(error) => Err(BatchError::Body(error)),
    };
    if result.is_err() {
        budget.shrink(charged);
    }
    result
}

/// Splits a body into readings, for callers that adjust readings before encoding them (MQTT
/// fills `device_id` from the topic). Each reading is bounded as in [`encode_body`].
pub(crate) fn parse_readings(
    body: &[u8],
    format: BodyFormat,
    rules: &RecordRules,
) -> Result<Vec<Result<Value, String>>, BodyError> {
    let mut readings = Vec::new();
    for_each_reading(body, format, rules, |_, reading| {
        readings.push(reading);
        Ok(())
    })?;
    Ok(readings)
}

/// Validates and encodes every reading; any bad one refuses the batch with its rejections (the
/// first [`MAX_LISTED_REJECTIONS`]).
pub(crate) fn encode_batch(
    schema: &StreamSchema,
    readings: &[Result<Value, String>],
    now_micros: i64,
    rules: &RecordRules,
) -> Result<EncodedBatch, Vec<RejectedRecord>> {
    let mut builder = BatchBuilder::new(schema, rules, now_micros, readings.len() * 96);
    for (index, reading) in readings.iter().enumerate() {
        builder.add(index, reading.as_ref().map_err(String::as_str));
    }
    builder.finish(readings.len()).map_err(|error| match error {
        BatchError::Rejected { rejections, .. } => rejections.listed,
        BatchError::Body(error) => vec![RejectedRecord { index: 0, field: None, reason: error.to_string() }],
    })
}

/// Encodes readings as they are parsed, collecting rejections; after the first rejection the
/// batch will be refused, so values are still validated but no longer kept.
struct BatchBuilder<'a> {
    schema: &'a StreamSchema,
    rules: &'a RecordRules,
    event_times: EventTimeLimits,
    batch: EncodedBatch,
    key_bytes: usize,
    rejections: Rejections,
}

impl<'a> BatchBuilder<'a> {
    fn new(schema: &'a StreamSchema, rules: &'a RecordRules, now_micros: i64, size_hint: usize) -> Self {
        Self {
            schema,
            rules,
            event_times: rules.event_times(now_micros),
            // Encoded records are smaller than their JSON: one allocation of the body's size
            // usually holds them all, so the buffer rarely doubles past what is charged.
            batch: EncodedBatch { payload: Vec::with_capacity(size_hint), records: Vec::new() },
            key_bytes: 0,
            rejections: Rejections::default(),
        }
    }

    fn allocated_bytes(&self) -> usize {
        self.batch.allocated_bytes(self.key_bytes)
    }

    fn add(&mut self, index: usize, reading: Result<&Value, &str>) {
        let reading = match reading {
            Ok(reading) => reading,
            Err(reason) => {
                return self.reject([RejectedRecord { index, field: None, reason: reason.to_string() }]);
            }
        };
        let start = self.batch.payload.len();
        let meta = match self.schema.encode_json_within(reading, &self.event_times, &mut self.batch.payload) {
            Ok(meta) => meta,
            Err(errors) => {
                return self.reject(errors.into_iter().map(|error| RejectedRecord {
                    index,
                    field: error.field,
                    reason: error.reason,
                }));
            }
        };
        let record_bytes = (self.batch.payload.len() - start).saturating_add(meta.key.len());
        if record_bytes > self.rules.max_record_bytes() {
            self.batch.payload.truncate(start);
            let reason = format!(
                "the record is {record_bytes} bytes encoded with its key; at most {} fit the producer's \
                 message.max.bytes of {} with {RECORD_OVERHEAD_BYTES} bytes of framing and headers",
                self.rules.max_record_bytes(),
                self.rules.max_message_bytes
            );
            return self.reject([RejectedRecord { index, field: None, reason }]);
        }
        if !self.rejections.is_empty() {
            // Validated only: the batch is refused anyway.
            self.batch.payload.truncate(start);
            return;
        }
        self.key_bytes += meta.key.capacity();
        self.batch.records.push(EncodedRecord {
            key: meta.key,
            event_time_micros: meta.event_time_micros,
            value_range: start..self.batch.payload.len(),
        });
    }

    /// Records a refused reading. The batch will be refused, so what was kept is let go (the
    /// payload's capacity stays, as scratch space for validating the rest).
    fn reject(&mut self, rejections: impl IntoIterator<Item = RejectedRecord>) {
        self.rejections.add_record(rejections);
        self.batch.payload.clear();
        self.batch.records = Vec::new();
        self.key_bytes = 0;
    }

    fn finish(self, num_records: usize) -> Result<EncodedBatch, BatchError> {
        if self.rejections.is_empty() {
            Ok(self.batch)
        } else {
            Err(BatchError::Rejected { rejections: self.rejections, num_records })
        }
    }
}

/// Parses readings one at a time and hands each to `sink` with its index; returns how many there
/// were. A reading is `Err` with a reason when it could not be parsed (NDJSON) or holds more
/// than a record can carry.
fn for_each_reading(
    body: &[u8],
    format: BodyFormat,
    rules: &RecordRules,
    mut sink: impl FnMut(usize, Result<Value, String>) -> Result<(), BodyError>,
) -> Result<usize, BodyError> {
    let max_records = rules.max_records;
    let too_many = || {
        BodyError::TooLarge(format!(
            "the body holds more than {max_records} records, the limit of {max_records} per request \
             (http.max_records_per_request); split it"
        ))
    };
    let mut deliver = |index: usize, parsed: Result<(Value, bool), String>| {
        if index >= max_records {
            return Err(too_many());
        }
        let reading = match parsed {
            Ok((_, true)) => Err(rules.too_large_reading_reason()),
            Ok((value, false)) => Ok(value),
            Err(reason) => Err(reason),
        };
        sink(index, reading)
    };
    match format {
        BodyFormat::Json => {
            let mut stopped_opt = None;
            let mut num_records = 0;
            let mut deserializer = serde_json::Deserializer::from_slice(body);
            let seed = BodySeed {
                max_reading_bytes: rules.max_reading_bytes(),
                sink: &mut deliver,
                num_records: &mut num_records,
                stopped_opt: &mut stopped_opt,
            };
            let parsed = seed.deserialize(&mut deserializer).and_then(|()| deserializer.end());
            if let Some(stopped) = stopped_opt {
                return Err(stopped);
            }
            parsed.map_err(|error| BodyError::Malformed(format!("body is not valid JSON: {error}")))?;
            if num_records == 0 {
                return Err(BodyError::Malformed("the array holds no records".into()));
            }
            Ok(num_records)
        }
        BodyFormat::Ndjson => {
            let lines = body
                .split(|&byte| byte == b'\n')
                .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
                .filter(|line| !line.iter().all(u8::is_ascii_whitespace));
            let mut num_records = 0;
            for line in lines {
                let mut allowance = Allowance::new(rules.max_reading_bytes());
                let mut deserializer = serde_json::Deserializer::from_slice(line);
                let parsed = (&mut deserializer)
                    .deserialize_any(ReadingVisitor { allowance: &mut allowance })
                    .and_then(|value| deserializer.end().map(|()| value))
                    .map(|value| (value, allowance.exceeded))
                    .map_err(|error| format!("line is not valid JSON: {error}"));
                deliver(num_records, parsed)?;
                num_records += 1;
            }
            if num_records == 0 {
                return Err(BodyError::Malformed("the body holds no records".into()));
            }
            Ok(num_records)
        }
    }
}

/// Bytes one reading may still allocate; once exceeded, the rest of the reading is skipped.
struct Allowance {
    remaining: usize,
    exceeded: bool,
}

impl Allowance {
    fn new(limit: usize) -> Self {
        Self { remaining: limit, exceeded: false }
    }

    fn take(&mut self, bytes: usize) -> bool {
        if self.exceeded || bytes > self.remaining {
            self.exceeded = true;
            return false;
        }
        self.remaining -= bytes;
        true
    }
}

/// The top of a JSON body: one reading (an object, or any other value, which is then refused as
/// a reading), or an array of readings.
struct BodySeed<'a, D> {
    max_reading_bytes: usize,
    sink: &'a mut D,
    num_records: &'a mut usize,
    stopped_opt: &'a mut Option<BodyError>,
}

impl<D> BodySeed<'_, D>
where
    D: FnMut(usize, Result<(Value, bool), String>) -> Result<(), BodyError>,
{
    /// Hands one reading on; a refusal is kept aside and parsing stops with a marker error.
    fn deliver<E: de::Error>(&mut self, value: Value, exceeded: bool) -> Result<(), E> {
        let index = *self.num_records;
        *self.num_records += 1;
        (self.sink)(index, Ok((value, exceeded))).map_err(|error| {
            *self.stopped_opt = Some(error);
            E::custom("parsing stopped")
        })
    }

    fn scalar<E: de::Error>(mut self, value: Value) -> Result<(), E> {
        self.deliver(value, false)
    }
}

impl<'de, D> DeserializeSeed<'de> for BodySeed<'_, D>
where
    D: FnMut(usize, Result<(Value, bool), String>) -> Result<(), BodyError>,
{
    type Value = ();

    fn deserialize<De: de::Deserializer<'de>>(self, deserializer: De) -> Result<(), De::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, D> Visitor<'de> for BodySeed<'_, D>
where
    D: FnMut(usize, Result<(Value, bool), String>) -> Result<(), BodyError>,
{
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON object or an array of objects")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, map: A) -> Result<(), A::Error> {
        let mut allowance = Allowance::new(self.max_reading_bytes);
        let value = ReadingVisitor { allowance: &mut allowance }.visit_map(map)?;
        self.deliver(value, allowance.exceeded)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        loop {
            let mut allowance = Allowance::new(self.max_reading_bytes);
            let Some(value) = seq.next_element_seed(ReadingSeed { allowance: &mut allowance })? else {
                return Ok(());
            };
            self.deliver(value, allowance.exceeded)?;
        }
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<(), E> {
        self.scalar(Value::Bool(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        self.scalar(Value::from(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        self.scalar(Value::from(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        self.scalar(Value::from(value))
    }

    fn visit_str<E: de::Error>(mut self, value: &str) -> Result<(), E> {
        // Checked before the copy: a body that is one huge string is not copied.
        let fits = value.len() + VALUE_OVERHEAD_BYTES <= self.max_reading_bytes;
        self.deliver(if fits { Value::String(value.to_string()) } else { Value::Null }, !fits)
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar(Value::Null)
    }
}

/// One element of the body's array: a reading.
struct ReadingSeed<'a> {
    allowance: &'a mut Allowance,
}

impl<'de> DeserializeSeed<'de> for ReadingSeed<'_> {
    type Value = Value;

    fn deserialize<De: de::Deserializer<'de>>(self, deserializer: De) -> Result<Value, De::Error> {
        deserializer.deserialize_any(ReadingVisitor { allowance: self.allowance })
    }
}

/// A reading: an object keeps its fields (scalars only), anything else is kept as a small value
/// so that the refusal can say what it was.
struct ReadingVisitor<'a> {
    allowance: &'a mut Allowance,
}

impl<'de> Visitor<'de> for ReadingVisitor<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let allowance = self.allowance;
        let mut object = Map::new();
        while let Some(key_opt) = map.next_key_seed(KeySeed { allowance: &mut *allowance })? {
            match key_opt {
                Some(key) => {
                    let value = map.next_value_seed(FieldValueSeed { allowance: &mut *allowance })?;
                    if !allowance.exceeded {
                        object.insert(key, value);
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if allowance.exceeded {
            // Refused as too large: nothing of it is needed.
            object.clear();
        }
        Ok(Value::Object(object))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        FieldValueVisitor { allowance: self.allowance }.visit_seq(seq)
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Value, E> {
        FieldValueVisitor { allowance: self.allowance }.visit_str(value)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// A field name, kept only while the reading's allowance lasts.
struct KeySeed<'a> {
    allowance: &'a mut Allowance,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<String>;

    fn deserialize<De: de::Deserializer<'de>>(self, deserializer: De) -> Result<Option<String>, De::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<String>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Option<String>, E> {
        Ok(self.allowance.take(value.len() + VALUE_OVERHEAD_BYTES).then(|| value.to_string()))
    }
}

/// A field's value: scalars are kept; an array or object is skipped without being stored and
/// kept as an empty one, which no schema type accepts and which names its type in the refusal.
struct FieldValueSeed<'a> {
    allowance: &'a mut Allowance,
}

impl<'de> DeserializeSeed<'de> for FieldValueSeed<'_> {
    type Value = Value;

    fn deserialize<De: de::Deserializer<'de>>(self, deserializer: De) -> Result<Value, De::Error> {
        deserializer.deserialize_any(FieldValueVisitor { allowance: self.allowance })
    }
}

struct FieldValueVisitor<'a> {
    allowance: &'a mut Allowance,
}

impl<'de> Visitor<'de> for FieldValueVisitor<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        // Skipping is iterative in serde_json and stores nothing, however deep the nesting.
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Value::Object(Map::new()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Value::Array(Vec::new()))
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        Ok(Value::from(value))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Value, E> {
        if self.allowance.take(value.len()) { Ok(Value::String(value.to_string())) } else { Ok(Value::Null) }
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
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

    fn rules(max_records: usize) -> RecordRules {
        RecordRules {
            max_records,
            earliest_event_micros: 946_684_800_000_000,
            max_future_skew_micros: 300_000_000,
            max_message_bytes: 1_000_000,
        }
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// A budget without a limit.
    #[derive(Debug, Default)]
    struct Unmetered;

    impl MemoryBudget for Unmetered {
        fn grow(&mut self, _bytes: usize) -> bool {
            true
        }

        fn shrink(&mut self, _bytes: usize) {}
    }

    /// A budget that records what it was charged, refusing past `limit`.
    #[derive(Debug, Default)]
    struct Recording {
        limit: usize,
        held: usize,
        peak: usize,
    }

    impl Recording {
        fn with_limit(limit: usize) -> Self {
            Self { limit, ..Self::default() }
        }
    }

    impl MemoryBudget for Recording {
        fn grow(&mut self, bytes: usize) -> bool {
            if self.held + bytes > self.limit {
                return false;
            }
            self.held += bytes;
            self.peak = self.peak.max(self.held);
            true
        }

        fn shrink(&mut self, bytes: usize) {
            self.held -= bytes;
        }
    }

    fn decode(body: Vec<u8>, encoding: BodyEncoding, max: usize) -> Result<Vec<u8>, BodyError> {
        decompress(body, encoding, max, &mut Unmetered)
    }

    fn readings(
        body: &[u8],
        format: BodyFormat,
        max_records: usize,
    ) -> Result<Vec<Result<Value, String>>, BodyError> {
        parse_readings(body, format, &rules(max_records))
    }

    #[test]
    fn content_types_and_encodings_are_picked() {
        assert_eq!(body_format(None), Ok(BodyFormat::Json));
        assert_eq!(body_format(Some("application/json; charset=utf-8")), Ok(BodyFormat::Json));
        assert_eq!(body_format(Some("application/x-ndjson")), Ok(BodyFormat::Ndjson));
        assert!(matches!(body_format(Some("text/csv")), Err(BodyError::UnsupportedMediaType(_))));
        assert_eq!(body_encoding(None), Ok(BodyEncoding::Identity));
        assert_eq!(body_encoding(Some(" GZIP ")), Ok(BodyEncoding::Gzip));
        assert_eq!(body_encoding(Some("zstd")), Ok(BodyEncoding::Zstd));
        assert!(matches!(body_encoding(Some("br")), Err(BodyError::UnsupportedMediaType(_))));
    }

    #[test]
    fn gzip_and_zstd_bodies_decode_within_limit() {
        let body = br#"{"device_id":"d"}"#.to_vec();
        assert_eq!(decode(gzip(&body), BodyEncoding::Gzip, 1024).unwrap(), body);
        let zstded = zstd::encode_all(&body[..], 3).unwrap();
        assert_eq!(decode(zstded, BodyEncoding::Zstd, 1024).unwrap(), body);
        assert!(matches!(
            decode(b"not gzip".to_vec(), BodyEncoding::Gzip, 1024),
            Err(BodyError::Malformed(_))
        ));
        // At the limit exactly, and one byte over.
        assert_eq!(decode(gzip(&body), BodyEncoding::Gzip, body.len()).unwrap(), body);
        assert!(matches!(
            decode(gzip(&body), BodyEncoding::Gzip, body.len() - 1),
            Err(BodyError::TooLarge(_))
        ));
    }

    #[test]
    fn every_gzip_member_and_zstd_frame_is_read() {
        let mut members = gzip(b"[{\"a\":1},");
        members.extend(gzip(b"{\"a\":2},"));
        members.extend(gzip(b"{\"a\":3}]"));
        assert_eq!(decode(members, BodyEncoding::Gzip, 1024).unwrap(), b"[{\"a\":1},{\"a\":2},{\"a\":3}]");
        let mut frames = zstd::encode_all(&b"{\"a\":1}\n"[..], 3).unwrap();
        frames.extend(zstd::encode_all(&b"{\"a\":2}\n"[..], 3).unwrap());
        assert_eq!(decode(frames, BodyEncoding::Zstd, 1024).unwrap(), b"{\"a\":1}\n{\"a\":2}\n");
    }

    #[test]
    fn trailing_garbage_and_truncation_are_refused() {
        let member = gzip(br#"[{"a":1},{"a":2}]"#);
        for trailer in [&b"garbage"[..], b"\0\0\0\0", b"\x1f"] {
            let mut body = member.clone();
            body.extend_from_slice(trailer);
            let error = decode(body, BodyEncoding::Gzip, 1024).unwrap_err();
            assert!(
                matches!(&error, BodyError::Malformed(message) if message.contains("not valid gzip")),
                "{error:?}"
            );
        }
        for cut in [1, 4, 8, member.len() / 2, member.len() - 12] {
            let truncated = member[..member.len() - cut].to_vec();
            assert!(
                matches!(decode(truncated, BodyEncoding::Gzip, 1024), Err(BodyError::Malformed(_))),
                "cut {cut}"
            );
        }
        let frame = zstd::encode_all(&br#"[{"a":1},{"a":2}]"#[..], 3).unwrap();
        let mut trailing = frame.clone();
        trailing.extend_from_slice(b"garbage!");
        assert!(matches!(decode(trailing, BodyEncoding::Zstd, 1024), Err(BodyError::Malformed(_))));
        for cut in [1, 4, frame.len() / 2] {
            let truncated = frame[..frame.len() - cut].to_vec();
            assert!(
                matches!(decode(truncated, BodyEncoding::Zstd, 1024), Err(BodyError::Malformed(_))),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn decompression_bomb_is_too_large_and_charged_exactly() {
        let zeros = vec![b' '; 1_000_000];
        let compressed = zstd::encode_all(&zeros[..], 3).unwrap();
        assert!(compressed.len() < 1_000);
        let mut budget = Recording::with_limit(usize::MAX);
        assert!(matches!(
            decompress(compressed.clone(), BodyEncoding::Zstd, 10_000, &mut budget),
            Err(BodyError::TooLarge(_))
        ));
        assert_eq!(budget.peak, 0, "a bomb is refused before anything is allocated");
        let decoded = decompress(compressed.clone(), BodyEncoding::Zstd, 1_000_000, &mut budget).unwrap();
        assert_eq!(decoded, zeros);
        assert_eq!((budget.held, decoded.capacity()), (1_000_000, 1_000_000), "charged what is allocated");
        budget.shrink(budget.held);
        // A budget too small for the output refuses it, however small the input.
        let mut budget = Recording::with_limit(100_000);
        assert_eq!(
            decompress(compressed, BodyEncoding::Zstd, 2_000_000, &mut budget),
            Err(BodyError::OverBudget)
        );
        assert_eq!(budget.held, 0);
    }

    #[test]
    fn json_object_array_and_ndjson_parse() {
        assert_eq!(readings(br#"{"a":1}"#, BodyFormat::Json, 10).unwrap().len(), 1);
        assert_eq!(
            readings(br#"[{"a":1},{"a":2}]"#, BodyFormat::Json, 10).unwrap(),
            [Ok(json!({"a":1})), Ok(json!({"a":2}))]
        );
        let ndjson = readings(b"{\"a\":1}\r\n\n{oops}\n{\"a\":3}\n", BodyFormat::Ndjson, 10).unwrap();
        assert_eq!(ndjson.len(), 3);
        assert!(ndjson[1].as_ref().unwrap_err().contains("line is not valid JSON"));
        assert!(matches!(readings(b"{", BodyFormat::Json, 10), Err(BodyError::Malformed(_))));
        assert!(matches!(readings(b"[]", BodyFormat::Json, 10), Err(BodyError::Malformed(_))));
        assert!(matches!(readings(b"[{}] x", BodyFormat::Json, 10), Err(BodyError::Malformed(_))));
        assert!(matches!(readings(b" \n\n", BodyFormat::Ndjson, 10), Err(BodyError::Malformed(_))));
        assert_eq!(readings(b"5", BodyFormat::Json, 10).unwrap(), [Ok(json!(5))]);
    }

    #[test]
    fn record_limit_is_enforced_for_both_formats_at_and_over_it() {
        assert!(matches!(readings(b"[{},{},{}]", BodyFormat::Json, 2), Err(BodyError::TooLarge(_))));
        assert_eq!(readings(b"[{},{}]", BodyFormat::Json, 2).unwrap().len(), 2);
        assert!(matches!(readings(b"{}\n{}\n{}\n", BodyFormat::Ndjson, 2), Err(BodyError::TooLarge(_))));
        assert!(readings(b"{}\n{}\n", BodyFormat::Ndjson, 2).is_ok());
    }

    /// A huge array of tiny values stops at the record limit: what was parsed is one value per
    /// record, not millions.
    #[test]
    fn huge_array_of_tiny_numbers_stops_at_the_record_limit() {
        let mut body = b"[0".to_vec();
        body.extend(",0".repeat(8_000_000).into_bytes());
        body.push(b']');
        let mut seen = 0;
        let error = for_each_reading(&body, BodyFormat::Json, &rules(10_000), |_, _| {
            seen += 1;
            Ok(())
        })
        .unwrap_err();
        assert_eq!(seen, 10_000);
        assert!(error.to_string().contains("more than 10000 records"), "{error}");
    }

    /// Nested arrays and objects are never valid field values: they are skipped without being
    /// stored (however deep) and named in the refusal.
    #[test]
    fn nested_values_are_skipped_and_refused() {
        let deep_array = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
        let deep_object = format!("{}1{}", "{\"a\":".repeat(200_000), "}".repeat(200_000));
        let body = format!(
            r#"[{{"device_id":"d","ts":{NOW},"seq":1,"temperature":{deep_array}}},{{"device_id":"d","ts":{NOW},"seq":2,"site":{deep_object}}}]"#
        );
        let parsed = readings(body.as_bytes(), BodyFormat::Json, 10).unwrap();
        assert_eq!(parsed[0].as_ref().unwrap()["temperature"], json!([]));
        assert_eq!(parsed[1].as_ref().unwrap()["site"], json!({}));
        let rejected = encode_batch(&schema(), &parsed, NOW, &rules(10)).unwrap_err();
        assert_eq!(rejected.len(), 2);
        assert!(rejected[0].reason.contains("found an array"), "{:?}", rejected[0]);
        assert!(rejected[1].reason.contains("found an object"), "{:?}", rejected[1]);
        // A deeply nested reading is refused as a reading, not by a stack overflow.
        let parsed = readings(deep_array.as_bytes(), BodyFormat::Json, 10).unwrap();
        assert_eq!(parsed, [Ok(json!([]))]);
        let parsed = readings(format!("{deep_array}\n{{}}\n").as_bytes(), BodyFormat::Ndjson, 10).unwrap();
        assert_eq!(parsed[0], Ok(json!([])));
    }

    /// A reading holding more than a record can carry is refused without being kept, at the limit
    /// and one over; a long string within it is accepted.
    #[test]
    fn oversized_readings_are_refused_and_records_checked_against_the_message_size() {
        let schema = schema();
        let rules = RecordRules { max_message_bytes: 10_000, ..rules(10) };
        let max_record = rules.max_record_bytes();
        assert_eq!(max_record, 10_000 - RECORD_OVERHEAD_BYTES);
        let record_bytes = |site_len: usize| {
            let mut out = Vec::new();
            let reading = json!({"device_id": "d", "ts": NOW, "seq": 1, "site": "x".repeat(site_len)});
            schema.encode_json_within(&reading, &rules.event_times(NOW), &mut out).unwrap();
            out.len() + "d".len()
        };
        let mut site_len_at_limit = max_record;
        while record_bytes(site_len_at_limit) > max_record {
            site_len_at_limit -= 1;
        }
        assert_eq!(record_bytes(site_len_at_limit), max_record);
        assert_eq!(record_bytes(site_len_at_limit + 1), max_record + 1);
        let body = |site_len: usize| {
            json!([{"device_id": "a", "ts": NOW, "seq": 1},
                   {"device_id": "d", "ts": NOW, "seq": 1, "site": "x".repeat(site_len)}])
            .to_string()
        };
        let at_limit = encode_body(
            &schema,
            body(site_len_at_limit).as_bytes(),
            BodyFormat::Json,
            &rules,
            NOW,
            &mut Unmetered,
        )
        .unwrap();
        let last = at_limit.records.last().unwrap();
        assert_eq!(at_limit.value(last).len() + last.key.len(), max_record);
        match encode_body(
            &schema,
            body(site_len_at_limit + 1).as_bytes(),
            BodyFormat::Json,
            &rules,
            NOW,
            &mut Unmetered,
        ) {
            Err(BatchError::Rejected { rejections, num_records }) => {
                assert_eq!(num_records, 2);
                assert_eq!(rejections.num_rejected_records, 1);
                assert_eq!(rejections.listed[0].index, 1);
                assert!(
                    rejections.listed[0].reason.contains(&format!("is {} bytes", max_record + 1)),
                    "{:?}",
                    rejections.listed
                );
            }
            other => panic!("{other:?}"),
        }
        // Far over: not even kept while parsed.
        let huge = body(rules.max_reading_bytes() + 1);
        let parsed = parse_readings(huge.as_bytes(), BodyFormat::Json, &rules).unwrap();
        assert!(parsed[1].as_ref().unwrap_err().contains("holds more than"), "{:?}", parsed[1]);
        assert!(parsed[0].is_ok());
    }

    #[test]
    fn batch_buffers_are_charged_and_given_back_on_refusal() {
        let schema = schema();
        let body =
            json!((0..100).map(|seq| json!({"device_id": "d", "ts": NOW, "seq": seq})).collect::<Vec<_>>())
                .to_string();
        let mut budget = Recording::with_limit(usize::MAX);
        let batch =
            encode_body(&schema, body.as_bytes(), BodyFormat::Json, &rules(1_000), NOW, &mut budget).unwrap();
        assert_eq!(batch.records.len(), 100);
        assert!(budget.held >= batch.payload.capacity(), "{} < {}", budget.held, batch.payload.capacity());
        let mut budget = Recording::with_limit(body.len() / 2);
        assert!(matches!(
            encode_body(&schema, body.as_bytes(), BodyFormat::Json, &rules(1_000), NOW, &mut budget),
            Err(BatchError::Body(BodyError::OverBudget))
        ));
        assert_eq!(budget.held, 0);
    }

    #[test]
    fn batch_is_refused_whole_with_every_rejection_indexed() {
        let schema = schema();
        let readings = vec![
            Ok(json!({"device_id": "a", "ts": NOW, "seq": 1})),
            Err("line is not valid JSON".to_string()),
            Ok(json!({"device_id": "b", "ts": NOW, "seq": "two"})),
            Ok(json!({"device_id": "c", "ts": -1, "seq": 3})),
        ];
        let rejected = encode_batch(&schema, &readings, NOW, &rules(10)).unwrap_err();
        assert_eq!(rejected.len(), 3);
        assert_eq!((rejected[0].index, rejected[0].field.as_deref()), (1, None));
        assert_eq!((rejected[1].index, rejected[1].field.as_deref()), (2, Some("seq")));
        assert_eq!((rejected[2].index, rejected[2].field.as_deref()), (3, Some("ts")));
        assert!(rejected[2].reason.contains("earliest"), "{}", rejected[2].reason);
    }

    #[test]
    fn rejections_past_the_listed_ones_are_counted() {
        let schema = schema();
        let body: String =
            (0..300).map(|seq| format!("{}\n", json!({"device_id": "d", "seq": seq}))).collect();
        match encode_body(&schema, body.as_bytes(), BodyFormat::Ndjson, &rules(1_000), NOW, &mut Unmetered) {
            Err(BatchError::Rejected { rejections, num_records }) => {
                assert_eq!(num_records, 300);
                assert_eq!(rejections.num_rejected_records, 300);
                assert_eq!(rejections.listed.len(), MAX_LISTED_REJECTIONS);
                assert!(rejections.truncated());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn valid_batch_keeps_each_value_range() {
        let schema = schema();
        let readings = vec![
            Ok(json!({"device_id": "a", "ts": NOW, "seq": 1})),
            Ok(json!({"device_id": "bb", "ts": NOW, "seq": 2})),
        ];
        let batch = encode_batch(&schema, &readings, NOW, &rules(10)).unwrap();
        assert_eq!(batch.records.len(), 2);
        assert_eq!(batch.records[1].key, "bb");
        let second = batch.value(&batch.records[1]);
        assert_eq!(sluice_schema::split_single_object(second).unwrap().0, schema.fingerprint);
        assert_eq!(batch.records[0].value_range.end, batch.records[1].value_range.start);
    }
}
