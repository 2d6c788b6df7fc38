//! Request bodies to encoded records, without I/O: decompression, JSON / NDJSON parsing and
//! validation against the stream schema. A batch is all or nothing, so every problem of every
//! record is collected before anything is produced.
//!
//! Readings are parsed straight into the stream schema's field table ([`ReadingFields`]) and
//! encoded from it, with no `serde_json::Value` per reading: names are matched to the schema's
//! fields as they are read, names and strings are borrowed from the body (copied only where
//! serde_json had to unescape them), and one table serves a whole body. Ingest is sized by its CPU
//! per record, and parsing into `Value`s with their allocations was among its largest costs
//! (docs/benchmarks.md).
//!
//! Memory is bounded by construction rather than by hope: a body is parsed one reading at a time
//! and each reading is encoded before the next is read, so no JSON tree of a whole body exists; a
//! reading keeps only scalar values (a nested array or object is never a valid field value, so it
//! is skipped without being stored); a reading that would hold more than a record can carry is
//! skipped and refused; and every buffer that grows with the body is charged to a
//! [`MemoryBudget`] (the in-flight byte limit) before it grows.
//!
//! Why one file of about 1,000 lines of code (1,700 with its tests): the body's serde visitors
//! (body, reading, key, field value) and the batch builder they feed share one memory allowance
//! and one rejection list, and the bound on memory holds only if every path that grows a buffer
//! charges it. Split apart, a visitor could grow a buffer the budget never sees; kept together,
//! one read shows that none does.

use std::borrow::Cow;
use std::io::Read;
use std::ops::Range;

use serde::Serialize;
use serde::de::{self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use sluice_schema::{
    EventTimeLimits, FieldError, JsonScalar, KEY_FIELD, ReadingFields, RecordMeta, StreamSchema,
};

use sluice_schema::wire::{INGEST_TIME_HEADER, SCHEMA_FINGERPRINT_HEADER};

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

/// What each field of a reading is charged besides the bytes of its name and string value, so
/// that a reading of a huge number of tiny fields stays bounded (each unknown one keeps its name
/// for the refusal). A reading holds less than it is charged: known fields go to fixed slots, and
/// names and strings are mostly borrowed from the body. The charge stays what a field cost when
/// readings were maps (a `BTreeMap<String, Value>` entry), and strings are charged whether
/// borrowed or copied, so that readings are refused as too large at exactly the sizes they
/// always were.
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
    /// Adds one record's rejections (none: the record passed).
    pub(crate) fn add_record(&mut self, rejections: impl IntoIterator<Item = RejectedRecord>) {
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
pub struct EncodedBatch {
    pub payload: Vec<u8>,
    pub records: Vec<EncodedRecord>,
    /// For records an edge gateway forwarded: the gateway, and each record's position.
    pub edge_opt: Option<crate::forwarded::EdgeOrigin>,
}

#[derive(Debug)]
pub struct EncodedRecord {
    pub key: String,
    pub event_time_micros: i64,
    pub value_range: Range<usize>,
}

impl EncodedBatch {
    pub fn value(&self, record: &EncodedRecord) -> &[u8] {
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
    let parsed = {
        let mut target = SchemaTarget::new(schema, |index, reading, fields| {
            builder.add(index, reading, fields);
            let allocated = builder.allocated_bytes();
            if allocated > charged {
                if !budget.grow(allocated - charged) {
                    return Err(BodyError::OverBudget);
                }
                charged = allocated;
            }
            Ok(())
        });
        parse_each_reading(body, format, rules, &mut target)
    };
    let result = match parsed {
        Ok(num_records) => builder.finish(num_records),
        Err(error) => Err(BatchError::Body(error)),
    };
    if result.is_err() {
        budget.shrink(charged);
    }
    result
}

/// Why one device's readings (an MQTT message) were not turned into a batch.
#[derive(Debug)]
pub(crate) enum DeviceBatchError {
    /// The payload as a whole: malformed, or more readings than a request may have.
    Body(BodyError),
    /// At least one reading is invalid or names another device; `num_records` is how many the
    /// payload holds.
    Rejected { rejected: Vec<RejectedRecord>, num_records: usize },
}

/// Parses and encodes the readings of one device (an MQTT message, whose topic names the
/// device): a reading without `device_id` gets `device_id`, one naming another device is refused.
/// All or nothing, like [`encode_body`]. Nothing is charged to a budget: the MQTT bridge bounds
/// payloads and messages in flight itself.
pub(crate) fn encode_device_readings<'a>(
    schema: &StreamSchema,
    payload: &'a [u8],
    device_id: &'a str,
    format: BodyFormat,
    now_micros: i64,
    rules: &RecordRules,
) -> Result<EncodedBatch, DeviceBatchError> {
    let key_position = schema.key_position();
    let mut builder = BatchBuilder::new(schema, rules, now_micros, payload.len());
    // Every reading naming another device is listed, apart from the builder's capped list, as
    // the bridge has always listed them.
    let mut mismatched = Vec::new();
    let parsed = {
        let mut target = SchemaTarget::new(schema, |index, reading, fields| {
            if matches!(reading, Ok(Parsed::Object)) {
                match fields.get(key_position) {
                    None => fields.set(key_position, JsonScalar::Str(Cow::Borrowed(device_id))),
                    Some(JsonScalar::Str(given)) if given == device_id => {}
                    Some(given) => mismatched.push(RejectedRecord {
                        index,
                        field: Some(KEY_FIELD.to_string()),
                        reason: format!(
                            "{} does not match the device '{device_id}' of the MQTT topic",
                            given.to_value()
                        ),
                    }),
                }
            }
            builder.add(index, reading, fields);
            Ok(())
        });
        parse_each_reading(payload, format, rules, &mut target)
    };
    let num_records = parsed.map_err(DeviceBatchError::Body)?;
    match builder.finish(num_records) {
        Ok(batch) if mismatched.is_empty() => Ok(batch),
        Ok(_) => Err(DeviceBatchError::Rejected { rejected: mismatched, num_records }),
        Err(BatchError::Rejected { rejections, .. }) => {
            mismatched.extend(rejections.listed);
            // Stable: a reading's refusal for its device comes before its field errors.
            mismatched.sort_by_key(|rejection| rejection.index);
            Err(DeviceBatchError::Rejected { rejected: mismatched, num_records })
        }
        Err(BatchError::Body(error)) => Err(DeviceBatchError::Body(error)),
    }
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
            batch: EncodedBatch { payload: Vec::with_capacity(size_hint), ..EncodedBatch::default() },
            key_bytes: 0,
            rejections: Rejections::default(),
        }
    }

    fn allocated_bytes(&self) -> usize {
        self.batch.allocated_bytes(self.key_bytes)
    }

    /// Adds the `index`th reading as parsed: an object, whose fields are in `fields`; another
    /// JSON value, which is refused; or the reason it is neither.
    fn add(&mut self, index: usize, reading: Result<Parsed<'_>, String>, fields: &ReadingFields<'_>) {
        match reading {
            Ok(Parsed::Object) => {
                let start = self.batch.payload.len();
                let encoded =
                    self.schema.encode_fields_within(fields, &self.event_times, &mut self.batch.payload);
                self.keep(index, start, encoded);
            }
            Ok(Parsed::Other(found)) => self.refuse(index, vec![FieldError::not_an_object(&found)]),
            Err(reason) => self.reject([RejectedRecord { index, field: None, reason }]),
        }
    }

    /// Keeps the record just encoded at `start..`, unless it was refused or is larger than a
    /// Kafka message may be.
    fn keep(&mut self, index: usize, start: usize, encoded: Result<RecordMeta, Vec<FieldError>>) {
        let meta = match encoded {
            Ok(meta) => meta,
            Err(errors) => return self.refuse(index, errors),
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

    fn refuse(&mut self, index: usize, errors: Vec<FieldError>) {
        self.reject(errors.into_iter().map(|error| RejectedRecord {
            index,
            field: error.field,
            reason: error.reason,
        }));
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

/// What one reading of a body parsed to.
enum Parsed<'de> {
    /// A JSON object: its fields are in the target's table.
    Object,
    /// Any other JSON value, refused as a reading; the refusal names its type.
    Other(JsonScalar<'de>),
}

/// Where the body's visitors put a reading's fields as they read them, and what takes each
/// reading once it is complete.
trait ReadingTarget<'de> {
    /// The position of the field `name` in the table, or `None` for a field kept by name.
    fn position_of(&self, name: &str) -> Option<usize>;
    /// Empties the table for the next reading.
    fn clear(&mut self);
    fn set(&mut self, position: usize, value: JsonScalar<'de>);
    /// A field without a position. Its value matters only to a target that shows the whole
    /// object (the tests' `Value` view); the schema's table keeps the name alone.
    fn add_unknown(&mut self, name: Cow<'de, str>, value: JsonScalar<'de>);
    /// Takes the `index`th reading: parsed (an object's fields are in the table), or why not.
    fn reading(&mut self, index: usize, reading: Result<Parsed<'de>, String>) -> Result<(), BodyError>;
}

/// Readings of one stream: fields go to the slots of the schema's field table as they are read,
/// and `on_reading` takes each reading with the table. One table serves the whole body.
struct SchemaTarget<'s, 'de, F> {
    schema: &'s StreamSchema,
    fields: ReadingFields<'de>,
    on_reading: F,
}

impl<'s, 'de, F> SchemaTarget<'s, 'de, F>
where
    F: FnMut(usize, Result<Parsed<'de>, String>, &mut ReadingFields<'de>) -> Result<(), BodyError>,
{
    fn new(schema: &'s StreamSchema, on_reading: F) -> Self {
        Self { schema, fields: ReadingFields::for_schema(schema), on_reading }
    }
}

impl<'de, F> ReadingTarget<'de> for SchemaTarget<'_, 'de, F>
where
    F: FnMut(usize, Result<Parsed<'de>, String>, &mut ReadingFields<'de>) -> Result<(), BodyError>,
{
    fn position_of(&self, name: &str) -> Option<usize> {
        self.schema.field_position(name)
    }

    fn clear(&mut self) {
        self.fields.clear();
    }

    fn set(&mut self, position: usize, value: JsonScalar<'de>) {
        self.fields.set(position, value);
    }

    fn add_unknown(&mut self, name: Cow<'de, str>, _value: JsonScalar<'de>) {
        self.fields.add_unknown(name);
    }

    fn reading(&mut self, index: usize, reading: Result<Parsed<'de>, String>) -> Result<(), BodyError> {
        (self.on_reading)(index, reading, &mut self.fields)
    }
}

/// Parses readings one at a time into `target`, which takes each with its index; returns how
/// many there were. A reading is `Err` with a reason when it could not be parsed (NDJSON) or
/// holds more than a record can carry. Every reading borrows from `body`: a JSON body is one
/// deserializer over it, an NDJSON body one per line, and lines are slices of it.
fn parse_each_reading<'de, T: ReadingTarget<'de>>(
    body: &'de [u8],
    format: BodyFormat,
    rules: &RecordRules,
    target: &mut T,
) -> Result<usize, BodyError> {
    match format {
        BodyFormat::Json => {
            let mut stopped_opt = None;
            let mut num_records = 0;
            let mut deserializer = serde_json::Deserializer::from_slice(body);
            let seed =
                BodySeed { rules, target, num_records: &mut num_records, stopped_opt: &mut stopped_opt };
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
                    .deserialize_any(ReadingVisitor { target: &mut *target, allowance: &mut allowance })
                    .and_then(|parsed| deserializer.end().map(|()| parsed))
                    .map(|parsed| (parsed, allowance.exceeded))
                    .map_err(|error| format!("line is not valid JSON: {error}"));
                hand_on(&mut *target, rules, num_records, parsed)?;
                num_records += 1;
            }
            if num_records == 0 {
                return Err(BodyError::Malformed("the body holds no records".into()));
            }
            Ok(num_records)
        }
    }
}

/// Hands the `index`th reading to `target` (`true` with it: it grew past its allowance and is
/// refused); past the record limit, parsing stops.
fn hand_on<'de, T: ReadingTarget<'de>>(
    target: &mut T,
    rules: &RecordRules,
    index: usize,
    parsed: Result<(Parsed<'de>, bool), String>,
) -> Result<(), BodyError> {
    let max_records = rules.max_records;
    if index >= max_records {
        return Err(BodyError::TooLarge(format!(
            "the body holds more than {max_records} records, the limit of {max_records} per request \
             (http.max_records_per_request); split it"
        )));
    }
    let reading = match parsed {
        Ok((_, true)) => Err(rules.too_large_reading_reason()),
        Ok((parsed, false)) => Ok(parsed),
        Err(reason) => Err(reason),
    };
    target.reading(index, reading)
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
struct BodySeed<'a, T> {
    rules: &'a RecordRules,
    target: &'a mut T,
    num_records: &'a mut usize,
    stopped_opt: &'a mut Option<BodyError>,
}

impl<'de, T: ReadingTarget<'de>> BodySeed<'_, T> {
    /// Hands one reading on; a refusal is kept aside and parsing stops with a marker error.
    fn deliver<E: de::Error>(&mut self, parsed: Parsed<'de>, exceeded: bool) -> Result<(), E> {
        let index = *self.num_records;
        *self.num_records += 1;
        hand_on(&mut *self.target, self.rules, index, Ok((parsed, exceeded))).map_err(|error| {
            *self.stopped_opt = Some(error);
            E::custom("parsing stopped")
        })
    }

    fn scalar<E: de::Error>(mut self, value: JsonScalar<'de>) -> Result<(), E> {
        self.deliver(Parsed::Other(value), false)
    }
}

impl<T> BodySeed<'_, T> {
    /// Whether a body that is one string of `len` bytes fits a reading's allowance.
    fn string_fits(&self, len: usize) -> bool {
        len + VALUE_OVERHEAD_BYTES <= self.rules.max_reading_bytes()
    }
}

impl<'de, T: ReadingTarget<'de>> DeserializeSeed<'de> for BodySeed<'_, T> {
    type Value = ();

    fn deserialize<De: de::Deserializer<'de>>(self, deserializer: De) -> Result<(), De::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, T: ReadingTarget<'de>> Visitor<'de> for BodySeed<'_, T> {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON object or an array of objects")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, map: A) -> Result<(), A::Error> {
        let mut allowance = Allowance::new(self.rules.max_reading_bytes());
        let parsed =
            ReadingVisitor { target: &mut *self.target, allowance: &mut allowance }.visit_map(map)?;
        self.deliver(parsed, allowance.exceeded)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let max_reading_bytes = self.rules.max_reading_bytes();
        loop {
            let mut allowance = Allowance::new(max_reading_bytes);
            let seed = ReadingSeed { target: &mut *self.target, allowance: &mut allowance };
            let Some(parsed) = seq.next_element_seed(seed)? else {
                return Ok(());
            };
            self.deliver(parsed, allowance.exceeded)?;
        }
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<(), E> {
        self.scalar(JsonScalar::Bool(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        self.scalar(JsonScalar::Int(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        self.scalar(JsonScalar::from_u64(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        self.scalar(JsonScalar::from_f64(value))
    }

    fn visit_str<E: de::Error>(mut self, value: &str) -> Result<(), E> {
        // Checked before the copy: a body that is one huge string is not copied.
        let fits = self.string_fits(value.len());
        let found = if fits { JsonScalar::Str(Cow::Owned(value.to_string())) } else { JsonScalar::Null };
        self.deliver(Parsed::Other(found), !fits)
    }

    fn visit_borrowed_str<E: de::Error>(mut self, value: &'de str) -> Result<(), E> {
        let fits = self.string_fits(value.len());
        self.deliver(Parsed::Other(JsonScalar::Str(Cow::Borrowed(value))), !fits)
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar(JsonScalar::Null)
    }
}

/// One element of the body's array: a reading.
struct ReadingSeed<'a, T> {
    target: &'a mut T,
    allowance: &'a mut Allowance,
}

impl<'de, T: ReadingTarget<'de>> DeserializeSeed<'de> for ReadingSeed<'_, T> {
    type Value = Parsed<'de>;

    fn deserialize<De: de::Deserializer<'de>>(self, deserializer: De) -> Result<Parsed<'de>, De::Error> {
        deserializer.deserialize_any(ReadingVisitor { target: self.target, allowance: self.allowance })
    }
}

/// A reading: an object's fields go to the target as they are read (scalars only), anything else
/// is kept as a scalar so that the refusal can say what it was.
struct ReadingVisitor<'a, T> {
    target: &'a mut T,
    allowance: &'a mut Allowance,
}

impl<'de, T: ReadingTarget<'de>> Visitor<'de> for ReadingVisitor<'_, T> {
    type Value = Parsed<'de>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parsed<'de>, A::Error> {
        let Self { target, allowance } = self;
        // The table may hold a reading whose parsing failed halfway (a malformed NDJSON line).
        target.clear();
        while let Some(key_opt) =
            map.next_key_seed(KeySeed { target: &*target, allowance: &mut *allowance })?
        {
            let Some(key) = key_opt else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let value = map.next_value_seed(FieldValueSeed { allowance: &mut *allowance })?;
            if allowance.exceeded {
                continue;
            }
            match key {
                FieldKey::Known(position) => target.set(position, value),
                FieldKey::Unknown(name) => target.add_unknown(name, value),
            }
        }
        if allowance.exceeded {
            // Refused as too large: nothing of it is needed.
            target.clear();
        }
        Ok(Parsed::Object)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Parsed<'de>, A::Error> {
        FieldValueVisitor { allowance: self.allowance }.visit_seq(seq).map(Parsed::Other)
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
        FieldValueVisitor { allowance: self.allowance }.visit_str(value).map(Parsed::Other)
    }

    fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Parsed<'de>, E> {
        FieldValueVisitor { allowance: self.allowance }.visit_borrowed_str(value).map(Parsed::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Parsed<'de>, E> {
        Ok(Parsed::Other(JsonScalar::Null))
    }
}

/// A field name as read: its position in the target's table, or the name itself.
enum FieldKey<'de> {
    Known(usize),
    Unknown(Cow<'de, str>),
}

/// A field name, charged to the reading's allowance and matched to its slot as it is read; only
/// an unknown name is kept. Nothing is read while the allowance lasts no longer.
struct KeySeed<'a, T> {
    target: &'a T,
    allowance: &'a mut Allowance,
}

impl<'de, T: ReadingTarget<'de>> DeserializeSeed<'de> for KeySeed<'_, T> {
    type Value = Option<FieldKey<'de>>;

    fn deserialize<De: de::Deserializer<'de>>(
        self,
        deserializer: De,
    ) -> Result<Option<FieldKey<'de>>, De::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, T: ReadingTarget<'de>> Visitor<'de> for KeySeed<'_, T> {
    type Value = Option<FieldKey<'de>>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a field name")
    }

    /// A name with escapes, unescaped into serde_json's scratch buffer: copied only if unknown.
    fn visit_str<E: de::Error>(self, value: &str) -> Result<Option<FieldKey<'de>>, E> {
        if !self.allowance.take(value.len() + VALUE_OVERHEAD_BYTES) {
            return Ok(None);
        }
        Ok(Some(match self.target.position_of(value) {
            Some(position) => FieldKey::Known(position),
            None => FieldKey::Unknown(Cow::Owned(value.to_string())),
        }))
    }

    fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Option<FieldKey<'de>>, E> {
        if !self.allowance.take(value.len() + VALUE_OVERHEAD_BYTES) {
            return Ok(None);
        }
        Ok(Some(match self.target.position_of(value) {
            Some(position) => FieldKey::Known(position),
            None => FieldKey::Unknown(Cow::Borrowed(value)),
        }))
    }
}

/// A field's value: scalars are kept, strings borrowed from the body unless they had escapes; an
/// array or object is skipped without being stored and kept as its marker, which no schema type
/// accepts and which names its type in the refusal.
struct FieldValueSeed<'a> {
    allowance: &'a mut Allowance,
}

impl<'de> DeserializeSeed<'de> for FieldValueSeed<'_> {
    type Value = JsonScalar<'de>;

    fn deserialize<De: de::Deserializer<'de>>(self, deserializer: De) -> Result<JsonScalar<'de>, De::Error> {
        deserializer.deserialize_any(FieldValueVisitor { allowance: self.allowance })
    }
}

struct FieldValueVisitor<'a> {
    allowance: &'a mut Allowance,
}

impl<'de> Visitor<'de> for FieldValueVisitor<'_> {
    type Value = JsonScalar<'de>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonScalar<'de>, A::Error> {
        // Skipping is iterative in serde_json and stores nothing, however deep the nesting.
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

    /// A string with escapes, unescaped into serde_json's scratch buffer: copied, as charged.
    fn visit_str<E: de::Error>(self, value: &str) -> Result<JsonScalar<'de>, E> {
        if self.allowance.take(value.len()) {
            Ok(JsonScalar::Str(Cow::Owned(value.to_string())))
        } else {
            Ok(JsonScalar::Null)
        }
    }

    /// Charged though not copied: see [`VALUE_OVERHEAD_BYTES`] for why.
    fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<JsonScalar<'de>, E> {
        if self.allowance.take(value.len()) {
            Ok(JsonScalar::Str(Cow::Borrowed(value)))
        } else {
            Ok(JsonScalar::Null)
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<JsonScalar<'de>, E> {
        Ok(JsonScalar::Null)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;

    use serde_json::{Map, Value, json};

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

    /// The tests' view of what the visitors keep: each reading as a `serde_json::Value`, every
    /// field kept by name as a map entry.
    struct ValueTarget<F> {
        object: Map<String, Value>,
        sink: F,
    }

    impl<'de, F> ReadingTarget<'de> for ValueTarget<F>
    where
        F: FnMut(usize, Result<Value, String>) -> Result<(), BodyError>,
    {
        fn position_of(&self, _name: &str) -> Option<usize> {
            None
        }

        fn clear(&mut self) {
            self.object.clear();
        }

        fn set(&mut self, _position: usize, _value: JsonScalar<'de>) {
            unreachable!("no field has a position")
        }

        fn add_unknown(&mut self, name: Cow<'de, str>, value: JsonScalar<'de>) {
            self.object.insert(name.into_owned(), value.to_value());
        }

        fn reading(&mut self, index: usize, reading: Result<Parsed<'de>, String>) -> Result<(), BodyError> {
            let value = reading.map(|parsed| match parsed {
                Parsed::Object => Value::Object(std::mem::take(&mut self.object)),
                Parsed::Other(found) => found.to_value(),
            });
            (self.sink)(index, value)
        }
    }

    /// Parses readings one at a time, as `encode_body` does, and hands each to `sink` as a
    /// `Value` with its index; returns how many there were.
    fn for_each_reading(
        body: &[u8],
        format: BodyFormat,
        rules: &RecordRules,
        sink: impl FnMut(usize, Result<Value, String>) -> Result<(), BodyError>,
    ) -> Result<usize, BodyError> {
        parse_each_reading(body, format, rules, &mut ValueTarget { object: Map::new(), sink })
    }

    /// Every reading of a body as a `Value`, or why it has none.
    fn parse_readings(
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

    /// Encodes `Value` readings through the same batch builder (and, by the schema's `Value`
    /// adapter, the same encoder) as the body's readings.
    fn encode_batch(
        schema: &StreamSchema,
        readings: &[Result<Value, String>],
        now_micros: i64,
        rules: &RecordRules,
    ) -> Result<EncodedBatch, Vec<RejectedRecord>> {
        let mut builder = BatchBuilder::new(schema, rules, now_micros, readings.len() * 96);
        for (index, reading) in readings.iter().enumerate() {
            match reading {
                Ok(value) => {
                    let start = builder.batch.payload.len();
                    let encoded =
                        schema.encode_json_within(value, &builder.event_times, &mut builder.batch.payload);
                    builder.keep(index, start, encoded);
                }
                Err(reason) => {
                    builder.reject([RejectedRecord { index, field: None, reason: reason.clone() }])
                }
            }
        }
        builder.finish(readings.len()).map_err(|error| match error {
            BatchError::Rejected { rejections, .. } => rejections.listed,
            BatchError::Body(error) => {
                vec![RejectedRecord { index: 0, field: None, reason: error.to_string() }]
            }
        })
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

    /// A batch in a form tests compare: the payload and each record's key, event time and range.
    type Records = (Vec<u8>, Vec<(String, i64, Range<usize>)>);

    fn records_of(batch: EncodedBatch) -> Records {
        let records = batch
            .records
            .iter()
            .map(|record| (record.key.clone(), record.event_time_micros, record.value_range.clone()))
            .collect();
        (batch.payload, records)
    }

    /// What `encode_body` answers for a body: its records, or the listed rejections.
    fn direct(
        schema: &StreamSchema,
        body: &str,
        format: BodyFormat,
        rules: &RecordRules,
    ) -> Result<Records, Vec<RejectedRecord>> {
        match encode_body(schema, body.as_bytes(), format, rules, NOW, &mut Unmetered) {
            Ok(batch) => Ok(records_of(batch)),
            Err(BatchError::Rejected { rejections, .. }) => Err(rejections.listed),
            Err(BatchError::Body(error)) => panic!("{body}: {error}"),
        }
    }

    /// What the same readings give as `serde_json::Value`s through the schema's `Value` adapter.
    fn through_values(schema: &StreamSchema, readings: &[&str]) -> Result<Records, Vec<RejectedRecord>> {
        let values: Vec<Result<Value, String>> =
            readings.iter().map(|reading| Ok(serde_json::from_str(reading).unwrap())).collect();
        encode_batch(schema, &values, NOW, &rules(100)).map(records_of)
    }

    /// Readings of every shape: escapes, unicode, duplicates, unknown fields, numbers at their
    /// limits, nested values, readings that are not objects.
    const READINGS: &[&str] = &[
        r#"{"device_id":"dev-1","ts":1795999999000000,"seq":7,"temperature":21.5,"rssi":-70,"status":"WARN"}"#,
        r#"{"device\u005fid":"d\u00e9v\t1","ts":"2026-11-29T10:00:00Z","s\u0065q":1,"site":"caf\u00e9 \"n\" \ud83d\ude9c"}"#,
        r#"{"device_id":"日本","ts":1795999999000,"seq":1,"site":"🚜"}"#,
        r#"{"device_id":"a","ts":1795999999000000,"seq":1,"seq":2,"device_id":"b","site":null,"site":"x"}"#,
        r#"{"zeta":1,"alpha":2,"zeta":3,"device_id":"a","ts":1795999999000000,"seq":1,"Beta":4,"":5,"z\u0065ta":6}"#,
        r#"{"device_id":"d","ts":1795999999000000,"seq":-9223372036854775808,"rssi":2147483647,"temperature":-0.0}"#,
        r#"{"device_id":"d","ts":1795999999000000,"seq":9223372036854775807,"rssi":-2147483648,"humidity":1e308}"#,
        r#"{"device_id":"d","ts":1795999999000000,"seq":9223372036854775808,"rssi":2147483648}"#,
        r#"{"device_id":"d","ts":1795999999000000,"seq":1.0,"rssi":-0,"battery":18446744073709551615}"#,
        r#"{"device_id":"d","ts":99999999999999,"seq":1}"#,
        r#"{"device_id":"d","ts":100000000000000,"seq":1}"#,
        r#"{"device_id":"d","ts":"2026-13-01T00:00:00Z","seq":1,"status":"BROKEN"}"#,
        r#"{"device_id":"","ts":1.5,"seq":null,"site":5,"status":null}"#,
        r#"{"device_id":"d","ts":1795999999000000,"seq":1,"temperature":[1,[2]],"site":{"a":{}}}"#,
        r#"{"device_id":[],"ts":{},"seq":{"a":1}}"#,
        r#"{"":1,"device_id":"d","ts":1795999999000000,"seq":1}"#,
        "{}",
        "5",
        "-0",
        "18446744073709551615",
        r#""text""#,
        r#""esc\u00e9""#,
        "true",
        "null",
        "[1,[2]]",
        "[]",
    ];

    /// Every reading gives the same records or the same refusals through the visitors and the
    /// field table as through `serde_json::Value`, alone or in a batch, as JSON or NDJSON.
    #[test]
    fn direct_parsing_agrees_with_the_value_path() {
        let schema = schema();
        let rules = rules(100);
        for &reading in READINGS {
            let expected = through_values(&schema, &[reading]);
            assert_eq!(
                direct(&schema, &format!("[{reading}]"), BodyFormat::Json, &rules),
                expected,
                "{reading}"
            );
            assert_eq!(
                direct(&schema, &format!("{reading}\r\n"), BodyFormat::Ndjson, &rules),
                expected,
                "{reading}"
            );
            if reading.starts_with('{') {
                assert_eq!(direct(&schema, reading, BodyFormat::Json, &rules), expected, "{reading}");
            }
        }
        let expected = through_values(&schema, READINGS);
        assert!(expected.as_ref().is_err_and(|rejected| rejected.len() > 20), "{expected:?}");
        assert_eq!(direct(&schema, &format!("[{}]", READINGS.join(",")), BodyFormat::Json, &rules), expected);
        assert_eq!(direct(&schema, &READINGS.join("\n"), BodyFormat::Ndjson, &rules), expected);
        let valid: Vec<&str> =
            READINGS.iter().copied().filter(|reading| through_values(&schema, &[*reading]).is_ok()).collect();
        assert!(valid.len() >= 6, "{valid:?}");
        let expected = through_values(&schema, &valid);
        assert!(expected.is_ok());
        assert_eq!(direct(&schema, &format!("[{}]", valid.join(",")), BodyFormat::Json, &rules), expected);
        assert_eq!(direct(&schema, &valid.join("\n"), BodyFormat::Ndjson, &rules), expected);
    }

    #[test]
    fn escaped_keys_and_values_are_read_as_meant() {
        let schema = schema();
        let body = r#"{"device\u005fid":"d\u00e9v","ts":1795999999000000,"s\u0065q":1,"s\u0069te":"a\"b\\c\u0000\n"}"#;
        let (payload, records) = direct(&schema, body, BodyFormat::Json, &rules(10)).unwrap();
        assert_eq!(records[0].0, "dév");
        let mut expected = Vec::new();
        let reading =
            json!({"device_id": "dév", "ts": 1_795_999_999_000_000i64, "seq": 1, "site": "a\"b\\c\u{0}\n"});
        schema.encode_json_within(&reading, &rules(10).event_times(NOW), &mut expected).unwrap();
        assert_eq!(payload, expected);
    }

    #[test]
    fn duplicate_keys_keep_the_last_value_and_count_once() {
        let schema = schema();
        let body = r#"{"device_id":"a","ts":1795999999000000,"seq":1,"seq":2,"device_id":"b"}"#;
        let (payload, records) = direct(&schema, body, BodyFormat::Json, &rules(10)).unwrap();
        assert_eq!(records[0].0, "b");
        let mut expected = Vec::new();
        let reading = json!({"device_id": "b", "ts": 1_795_999_999_000_000i64, "seq": 2});
        schema.encode_json_within(&reading, &rules(10).event_times(NOW), &mut expected).unwrap();
        assert_eq!(payload, expected);
        let body = r#"{"x":1,"device_id":"a","ts":1795999999000000,"seq":1,"x":2,"\u0078":3}"#;
        let rejected = direct(&schema, body, BodyFormat::Json, &rules(10)).unwrap_err();
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].field.as_deref(), Some("x"));
    }

    #[test]
    fn unknown_fields_are_listed_first_once_each_in_byte_order() {
        let schema = schema();
        let body =
            r#"{"zeta":1,"device_id":5,"alpha":2,"ts":1795999999000000,"seq":1,"Mid":3,"zeta":4,"\u00e9":5}"#;
        let rejected = direct(&schema, body, BodyFormat::Json, &rules(10)).unwrap_err();
        let fields: Vec<&str> = rejected.iter().filter_map(|rejection| rejection.field.as_deref()).collect();
        assert_eq!(fields, ["Mid", "alpha", "zeta", "é", "device_id"]);
        assert!(rejected[0].reason.contains("unknown field"), "{rejected:?}");
    }

    /// A reading is charged each name plus [`VALUE_OVERHEAD_BYTES`] and each string value, borrowed
    /// or copied, as it always was: one exactly at the allowance is parsed (and refused for its
    /// record size), one byte more is not kept at all.
    #[test]
    fn reading_at_the_allowance_is_parsed_and_one_byte_over_is_not() {
        let schema = schema();
        let rules = RecordRules { max_message_bytes: 10_000, ..rules(10) };
        let max_reading_bytes = rules.max_reading_bytes();
        // Names: device_id, ts, seq, site, each with the overhead; string values: "d" and the site.
        let charged_besides_site = "device_idtsseqsite".len() + 4 * VALUE_OVERHEAD_BYTES + "d".len();
        let reading = |site_len: usize, escaped: bool| {
            // One escape makes serde_json unescape the site into a copy; its length is unchanged.
            let site =
                if escaped { format!("\\u0078{}", "x".repeat(site_len - 1)) } else { "x".repeat(site_len) };
            format!(r#"{{"device_id":"d","ts":{NOW},"seq":1,"site":"{site}"}}"#)
        };
        let at_limit = max_reading_bytes - charged_besides_site;
        for escaped in [false, true] {
            for (body, format) in [
                (reading(at_limit, escaped), BodyFormat::Json),
                (format!("[{}]", reading(at_limit, escaped)), BodyFormat::Json),
                (format!("{}\n", reading(at_limit, escaped)), BodyFormat::Ndjson),
            ] {
                let rejected = direct(&schema, &body, format, &rules).unwrap_err();
                assert!(rejected[0].reason.starts_with("the record is"), "{escaped}: {:?}", rejected[0]);
            }
            for (body, format) in [
                (reading(at_limit + 1, escaped), BodyFormat::Json),
                (format!("[{}]", reading(at_limit + 1, escaped)), BodyFormat::Json),
                (format!("{}\n", reading(at_limit + 1, escaped)), BodyFormat::Ndjson),
            ] {
                let rejected = direct(&schema, &body, format, &rules).unwrap_err();
                assert_eq!(rejected[0].reason, rules.too_large_reading_reason(), "{escaped}");
            }
        }
        // A body that is one string is charged the overhead too, and is refused as a reading either way.
        let string_body = |len: usize| format!("\"{}\"", "x".repeat(len));
        let rejected =
            direct(&schema, &string_body(max_reading_bytes - VALUE_OVERHEAD_BYTES), BodyFormat::Json, &rules)
                .unwrap_err();
        assert_eq!(rejected[0].reason, "a reading must be a JSON object, found a string");
        let rejected = direct(
            &schema,
            &string_body(max_reading_bytes - VALUE_OVERHEAD_BYTES + 1),
            BodyFormat::Json,
            &rules,
        )
        .unwrap_err();
        assert_eq!(rejected[0].reason, rules.too_large_reading_reason());
    }

    #[test]
    fn ndjson_with_crlf_lines_encodes_like_lf() {
        let schema = schema();
        let lines = [
            r#"{"device_id":"a","ts":1795999999000000,"seq":1}"#,
            r#"{"device_id":"b","ts":1795999999000000,"seq":2,"site":"s\r"}"#,
            r#"{"device_id":"c","ts":1795999999000000,"seq":3}"#,
        ];
        let crlf = format!("{}\r\n", lines.join("\r\n"));
        let lf = lines.join("\n");
        let expected = through_values(&schema, &lines);
        assert_eq!(expected.as_ref().unwrap().1.len(), 3);
        assert_eq!(direct(&schema, &crlf, BodyFormat::Ndjson, &rules(10)), expected);
        assert_eq!(direct(&schema, &lf, BodyFormat::Ndjson, &rules(10)), expected);
        // A line of nothing but CR is blank.
        assert_eq!(direct(&schema, &format!("\r\n{crlf}\r\n"), BodyFormat::Ndjson, &rules(10)), expected);
    }

    fn device_batch(payload: &str) -> Result<EncodedBatch, DeviceBatchError> {
        encode_device_readings(&schema(), payload.as_bytes(), "dev", BodyFormat::Json, NOW, &rules(10))
    }

    #[test]
    fn device_readings_take_the_device_of_the_topic() {
        let schema = schema();
        // The second names the device, with escapes.
        let payload = r#"[{"ts":1795999999000000,"seq":1},
            {"device\u005fid":"d\u0065v","ts":1795999999000000,"seq":2}]"#;
        let batch = device_batch(payload).unwrap();
        let expected = through_values(
            &schema,
            &[
                r#"{"device_id":"dev","ts":1795999999000000,"seq":1}"#,
                r#"{"device_id":"dev","ts":1795999999000000,"seq":2}"#,
            ],
        );
        assert_eq!(Ok(records_of(batch)), expected);
    }

    /// A reading naming another device is refused with what it named, before the reading's own
    /// field errors; every such refusal is listed.
    #[test]
    fn device_readings_naming_another_device_are_refused() {
        let payload = r#"[{"device_id":"other","ts":1795999999000000,"seq":1},{"device_id":5,"ts":1795999999000000,"seq":2},
            {"device_id":[1],"ts":1795999999000000,"seq":3},{"ts":1795999999000000,"seq":"x"},7,{"device_id":1.0,"ts":1795999999000000,"seq":5}]"#;
        let Err(DeviceBatchError::Rejected { rejected, num_records }) = device_batch(payload) else {
            panic!("refused as a whole");
        };
        assert_eq!(num_records, 6);
        let listed: Vec<(usize, Option<&str>, &str)> = rejected
            .iter()
            .map(|rejection| (rejection.index, rejection.field.as_deref(), rejection.reason.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                (0, Some("device_id"), "\"other\" does not match the device 'dev' of the MQTT topic"),
                (1, Some("device_id"), "5 does not match the device 'dev' of the MQTT topic"),
                (1, Some("device_id"), "expected string, found a number"),
                (2, Some("device_id"), "[] does not match the device 'dev' of the MQTT topic"),
                (2, Some("device_id"), "expected string, found an array"),
                (3, Some("seq"), "expected long, found a string"),
                (4, None, "a reading must be a JSON object, found a number"),
                (5, Some("device_id"), "1.0 does not match the device 'dev' of the MQTT topic"),
                (5, Some("device_id"), "expected string, found a number"),
            ]
        );
        let Err(DeviceBatchError::Rejected { rejected, num_records: 1 }) =
            device_batch(r#"{"device_id":"d\"v","ts":1795999999000000,"seq":1}"#)
        else {
            panic!("refused");
        };
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].reason, r#""d\"v" does not match the device 'dev' of the MQTT topic"#);
        assert!(matches!(device_batch(r#"[{"ts":1}"#), Err(DeviceBatchError::Body(BodyError::Malformed(_)))));
    }
}
