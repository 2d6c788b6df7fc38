//! Readings an edge gateway forwards to central ingest, and central's check of them.
//!
//! A gateway spools each accepted request as one *spooled batch*: the stream, the schema
//! fingerprint, when the gateway received it, and each record's key, event time and Avro value
//! exactly as the device API encoded and validated them. Layout, little endian:
//! `[version u8 = 1][stream_len u16][stream][fingerprint u64][received_at_micros i64]
//! [num_records u32]`, then per record `[key_len u16][key][event_time_micros i64]
//! [value_len u32][value]`.
//!
//! Forwarding sends spooled batches as they are, several to a request, with content type
//! [`EDGE_BATCHES_CONTENT_TYPE`]: `[version u8 = 1][num_batches u32]`, then per batch
//! `[len u32][spooled batch]`. So central produces exactly the bytes the gateway acknowledged,
//! with no second encoding. Central trusts none of it: every value is decoded as the compactor
//! will decode it, its `device_id` must be the record's key and its `ts` the record's event
//! time, and the event-time limits and record size apply as to any request.

use std::collections::HashMap;
use std::sync::Mutex;

use sluice_schema::{EventTimeLimits, KEY_FIELD, SchemaRegistry, StreamDecoder};

use crate::http::cut;
use crate::records::{
    BatchError, BodyError, EncodedBatch, EncodedRecord, MemoryBudget, RecordRules, RejectedRecord, Rejections,
};

/// The media type of a gateway's forwarded batches.
pub const EDGE_BATCHES_CONTENT_TYPE: &str = "application/vnd.sluice.edge-batches";

/// Whether a request's `Content-Type` says it holds forwarded batches.
pub(crate) fn is_edge_batches(content_type_opt: Option<&str>) -> bool {
    content_type_opt.is_some_and(|content_type| {
        content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .eq_ignore_ascii_case(EDGE_BATCHES_CONTENT_TYPE)
    })
}

const VERSION: u8 = 1;

/// One record of a spooled batch, borrowed from its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpooledRecord<'a> {
    pub key: &'a str,
    pub event_time_micros: i64,
    pub value: &'a [u8],
}

/// A spooled batch read back from its frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledBatch<'a> {
    pub stream: &'a str,
    pub fingerprint: u64,
    pub received_at_micros: i64,
    pub records: Vec<SpooledRecord<'a>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchFormatError {
    #[error("a spooled batch of format version {0}; this gateway reads version {VERSION}")]
    Version(u8),
    #[error("a spooled batch ends early at byte {0}")]
    Truncated(usize),
    #[error("a spooled batch names its stream or a key in bytes that are not UTF-8")]
    NotUtf8,
    #[error("a spooled batch has {0} bytes after its last record")]
    Trailing(usize),
    #[error("a stream name or key of {0} bytes is too long to spool")]
    TooLong(usize),
    #[error("{0}")]
    Indexes(&'static str),
}

/// The spooled form of `batch` of `stream`.
pub fn encode_spooled(
    stream: &str,
    fingerprint: u64,
    received_at_micros: i64,
    batch: &EncodedBatch,
) -> Result<Vec<u8>, BatchFormatError> {
    let records = batch.records.iter().map(|record| SpooledRecord {
        key: &record.key,
        event_time_micros: record.event_time_micros,
        value: batch.value(record),
    });
    write_spooled(stream, fingerprint, received_at_micros, records)
}

/// The spooled form of `records` of `stream` (a spooled batch with some of its records left out).
pub fn encode_spooled_records(
    stream: &str,
    fingerprint: u64,
    received_at_micros: i64,
    records: &[SpooledRecord<'_>],
) -> Result<Vec<u8>, BatchFormatError> {
    write_spooled(stream, fingerprint, received_at_micros, records.iter().copied())
}

fn write_spooled<'a>(
    stream: &str,
    fingerprint: u64,
    received_at_micros: i64,
    records: impl ExactSizeIterator<Item = SpooledRecord<'a>> + Clone,
) -> Result<Vec<u8>, BatchFormatError> {
    let stream_len = u16::try_from(stream.len()).map_err(|_| BatchFormatError::TooLong(stream.len()))?;
    let num_records = u32::try_from(records.len()).map_err(|_| BatchFormatError::TooLong(records.len()))?;
    let record_bytes: usize =
        records.clone().map(|record| 2 + record.key.len() + 8 + 4 + record.value.len()).sum();
    let mut out = Vec::with_capacity(1 + 2 + stream.len() + 8 + 8 + 4 + record_bytes);
    out.push(VERSION);
    out.extend_from_slice(&stream_len.to_le_bytes());
    out.extend_from_slice(stream.as_bytes());
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out.extend_from_slice(&received_at_micros.to_le_bytes());
    out.extend_from_slice(&num_records.to_le_bytes());
    for record in records {
        let key_len =
            u16::try_from(record.key.len()).map_err(|_| BatchFormatError::TooLong(record.key.len()))?;
        let value_len =
            u32::try_from(record.value.len()).map_err(|_| BatchFormatError::TooLong(record.value.len()))?;
        out.extend_from_slice(&key_len.to_le_bytes());
        out.extend_from_slice(record.key.as_bytes());
        out.extend_from_slice(&record.event_time_micros.to_le_bytes());
        out.extend_from_slice(&value_len.to_le_bytes());
        out.extend_from_slice(record.value);
    }
    Ok(out)
}

/// Reads a frame payload back. Every length is checked against what is left, so a damaged
/// payload is an error, never a panic or a huge allocation.
pub fn decode_spooled(payload: &[u8]) -> Result<SpooledBatch<'_>, BatchFormatError> {
    let mut reader = Reader { bytes: payload, offset: 0 };
    let version = reader.take(1)?[0];
    if version != VERSION {
        return Err(BatchFormatError::Version(version));
    }
    let stream_len = usize::from(reader.u16()?);
    let stream = reader.text(stream_len)?;
    let fingerprint = reader.u64()?;
    let received_at_micros = reader.i64()?;
    let num_records = reader.u32()? as usize;
    // Each record takes at least 14 bytes: a count beyond what is left is damage.
    let mut records = Vec::with_capacity(num_records.min(reader.remaining() / 14));
    for _ in 0..num_records {
        let key_len = usize::from(reader.u16()?);
        let key = reader.text(key_len)?;
        let event_time_micros = reader.i64()?;
        let value_len = reader.u32()? as usize;
        let value = reader.take(value_len)?;
        records.push(SpooledRecord { key, event_time_micros, value });
    }
    if reader.remaining() > 0 {
        return Err(BatchFormatError::Trailing(reader.remaining()));
    }
    Ok(SpooledBatch { stream, fingerprint, received_at_micros, records })
}

/// One spooled batch of a forwarding request: the spool frame it was read from and, when some of
/// its records were left out, the index in that frame of each record it still carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedBatch<'a> {
    pub frame_id: u64,
    pub batch: SpooledBatch<'a>,
    /// Empty: the records are the frame's, all of them in order.
    pub indexes: Vec<u32>,
}

impl ForwardedBatch<'_> {
    /// The record's index in its frame.
    fn index_of(&self, record: usize) -> u32 {
        self.indexes.get(record).copied().unwrap_or(record as u32)
    }
}

/// Bits of an edge position that hold a record's index in its frame; the frame id takes the rest.
const POSITION_INDEX_BITS: u32 = 23;
/// The largest frame id a position holds (2^40: a gateway accepting a thousand requests a second
/// reaches it after 34 years).
const MAX_POSITION_FRAME_ID: u64 = 1 << 40;

/// A forwarded record's place in everything its gateway accepted, one number that grows in the
/// order the gateway accepted readings: the compactor leaves out, per gateway and Kafka
/// partition, a record at a position it has seen, so a batch sent twice lands once.
pub fn edge_position(frame_id: u64, index: u32) -> Option<i64> {
    if frame_id >= MAX_POSITION_FRAME_ID || index >= 1 << POSITION_INDEX_BITS {
        return None;
    }
    i64::try_from((frame_id << POSITION_INDEX_BITS) | u64::from(index)).ok()
}

/// A forwarding request's body. Each entry is `(frame id, spooled batch, indexes)`, the indexes
/// empty when the batch is its frame's as spooled.
pub fn forward_body(entries: &[(u64, &[u8], &[u32])]) -> Result<Vec<u8>, BatchFormatError> {
    let num_batches = u32::try_from(entries.len()).map_err(|_| BatchFormatError::TooLong(entries.len()))?;
    let mut body = Vec::new();
    body.push(VERSION);
    body.extend_from_slice(&num_batches.to_le_bytes());
    for (frame_id, batch, indexes) in entries {
        let len = u32::try_from(batch.len()).map_err(|_| BatchFormatError::TooLong(batch.len()))?;
        let num_indexes =
            u32::try_from(indexes.len()).map_err(|_| BatchFormatError::TooLong(indexes.len()))?;
        body.extend_from_slice(&frame_id.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(batch);
        body.extend_from_slice(&num_indexes.to_le_bytes());
        for index in *indexes {
            body.extend_from_slice(&index.to_le_bytes());
        }
    }
    Ok(body)
}

/// The batches of a forwarding request's body: `[version u8 = 1][num_batches u32]`, then per
/// batch `[frame_id u64][len u32][spooled batch][num_indexes u32][index u32 ...]`.
pub fn split_forward_body(body: &[u8]) -> Result<Vec<ForwardedBatch<'_>>, BatchFormatError> {
    let mut reader = Reader { bytes: body, offset: 0 };
    let version = reader.take(1)?[0];
    if version != VERSION {
        return Err(BatchFormatError::Version(version));
    }
    let num_batches = reader.u32()? as usize;
    // Each batch takes at least 16 bytes: a count beyond what is left is damage.
    let mut batches = Vec::with_capacity(num_batches.min(reader.remaining() / 16));
    for _ in 0..num_batches {
        let frame_id = reader.u64()?;
        let len = reader.u32()? as usize;
        let batch = decode_spooled(reader.take(len)?)?;
        let num_indexes = reader.u32()? as usize;
        if num_indexes != 0 && num_indexes != batch.records.len() {
            return Err(BatchFormatError::Indexes("a batch lists indexes for some of its records only"));
        }
        let mut indexes = Vec::with_capacity(num_indexes.min(reader.remaining() / 4));
        for _ in 0..num_indexes {
            let index = reader.u32()?;
            if indexes.last().is_some_and(|last| *last >= index) {
                return Err(BatchFormatError::Indexes("a batch's record indexes do not increase"));
            }
            indexes.push(index);
        }
        batches.push(ForwardedBatch { frame_id, batch, indexes });
    }
    if reader.remaining() > 0 {
        return Err(BatchFormatError::Trailing(reader.remaining()));
    }
    Ok(batches)
}

/// What names a gateway in the `Sluice-Edge-Id` header: the gateway's name and its spool's
/// incarnation, so that a gateway whose spool starts over is a new sequence of positions.
pub const EDGE_ID_HEADER: &str = "sluice-edge-id";
/// The longest edge id central takes, so that its Kafka header stays small.
pub const MAX_EDGE_ID_BYTES: usize = 128;

/// Why an edge id cannot be used, if it cannot.
pub fn edge_id_problem(edge_id: &str) -> Option<String> {
    if edge_id.is_empty() || edge_id.len() > MAX_EDGE_ID_BYTES {
        return Some(format!("an edge id has 1 to {MAX_EDGE_ID_BYTES} characters"));
    }
    // No '/': central puts the token's name and a '/' before it, and a presented id must not be
    // able to pass for another token's gateway.
    if !edge_id.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-')) {
        return Some("an edge id holds only letters, digits, '.', '_' and '-'".to_string());
    }
    None
}

/// Where forwarded records came from: the gateway, and each record's position (parallel to the
/// batch's records, increasing), for the compactor to tell a batch sent twice. The first is the
/// request's floor: the gateway sent everything below it before, in requests answered 200.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdgeOrigin {
    pub edge_id: String,
    pub positions: Vec<i64>,
}

/// Bytes the three edge headers add to a Kafka record at most (names, values, varint lengths).
pub const EDGE_HEADERS_OVERHEAD_BYTES: usize =
    (sluice_schema::wire::EDGE_ID_HEADER.len() + MAX_EDGE_ID_BYTES + 2)
        + (sluice_schema::wire::EDGE_POSITION_HEADER.len() + 20 + 2)
        + (sluice_schema::wire::EDGE_FLOOR_HEADER.len() + 20 + 2);

/// Central ingest's check of forwarded batches: one decoder per stream, as the compactor
/// builds them (the current schema and every earlier one of the stream).
pub(crate) struct ForwardedValidator {
    decoders: HashMap<String, Mutex<StreamDecoder>>,
}

impl std::fmt::Debug for ForwardedValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardedValidator").field("streams", &self.decoders.len()).finish()
    }
}

impl ForwardedValidator {
    /// Streams whose decoder cannot be built take no forwarded batches (they are refused with
    /// the reason); the others do.
    pub(crate) fn new(schemas: &SchemaRegistry) -> Self {
        let mut decoders = HashMap::new();
        for stream in schemas.stream_names() {
            let Some(reader) = schemas.stream(stream) else { continue };
            match StreamDecoder::new(std::sync::Arc::clone(reader), schemas.writers_of(stream)) {
                Ok(decoder) => {
                    decoders.insert(stream.to_string(), Mutex::new(decoder));
                }
                Err(error) => {
                    tracing::error!(%stream, %error, "forwarded batches of this stream will be refused")
                }
            }
        }
        Self { decoders }
    }

    /// The records of a forwarding body for `stream`, each checked; all or nothing, like any
    /// request. The batch's buffers are charged to `budget`.
    pub(crate) fn check(
        &self,
        stream: &str,
        edge_id: &str,
        body: &[u8],
        rules: &RecordRules,
        now_micros: i64,
        budget: &mut dyn MemoryBudget,
    ) -> Result<EncodedBatch, BatchError> {
        let malformed = |message: String| BatchError::Body(BodyError::Malformed(message));
        let batches = split_forward_body(body)
            .map_err(|error| malformed(format!("not a forwarded batch body: {error}")))?;
        if let Some(other) = batches.iter().find(|forwarded| forwarded.batch.stream != stream) {
            return Err(malformed(format!(
                "a forwarded batch of stream '{}' was sent to stream '{stream}'",
                cut(other.batch.stream)
            )));
        }
        let mut positions = Vec::new();
        for forwarded in &batches {
            for record in 0..forwarded.batch.records.len() {
                let index = forwarded.index_of(record);
                let position = edge_position(forwarded.frame_id, index).ok_or_else(|| {
                    malformed(format!(
                        "frame {} record {index} is past the positions an edge gateway may use",
                        forwarded.frame_id
                    ))
                })?;
                if positions.last().is_some_and(|last| *last >= position) {
                    return Err(malformed(
                        "forwarded records must come in the order their gateway accepted them".into(),
                    ));
                }
                positions.push(position);
            }
        }
        let records: Vec<SpooledRecord<'_>> =
            batches.iter().flat_map(|forwarded| forwarded.batch.records.iter().copied()).collect();
        let num_records = records.len();
        if num_records > rules.max_records {
            return Err(BatchError::Body(BodyError::TooLarge(format!(
                "{num_records} records exceed the limit of {} per request (http.max_records_per_request)",
                rules.max_records
            ))));
        }
        let Some(decoder) = self.decoders.get(stream) else {
            return Err(malformed(format!(
                "stream '{}' takes no forwarded batches: its schema has no decoder",
                cut(stream)
            )));
        };
        let mut batch = EncodedBatch::default();
        let payload_bytes: usize = records.iter().map(|record| record.value.len()).sum();
        let key_bytes: usize = records.iter().map(|record| record.key.len()).sum();
        let charge = payload_bytes
            + key_bytes
            + num_records * (std::mem::size_of::<EncodedRecord>() + std::mem::size_of::<i64>());
        if !budget.grow(charge) {
            return Err(BatchError::Body(BodyError::OverBudget));
        }
        let result = check_records(decoder, &records, rules, now_micros, &mut batch);
        if result.is_err() {
            budget.shrink(charge);
        }
        batch.edge_opt = Some(EdgeOrigin { edge_id: edge_id.to_string(), positions });
        result.map(|()| batch).map_err(|rejections| BatchError::Rejected { rejections, num_records })
    }
}

fn check_records(
    decoder: &Mutex<StreamDecoder>,
    records: &[SpooledRecord<'_>],
    rules: &RecordRules,
    now_micros: i64,
    batch: &mut EncodedBatch,
) -> Result<(), Rejections> {
    let values: Vec<&[u8]> = records.iter().map(|record| record.value).collect();
    let decoded = decoder.lock().unwrap_or_else(std::sync::PoisonError::into_inner).decode(&values);
    let mut reasons: Vec<Vec<RejectedRecord>> = vec![Vec::new(); records.len()];
    let reject =
        |reasons: &mut Vec<Vec<RejectedRecord>>, index: usize, field: Option<&str>, reason: String| {
            reasons[index].push(RejectedRecord { index, field: field.map(str::to_string), reason });
        };
    let mut decoded_indexes = Vec::with_capacity(records.len());
    let mut rejected = decoded.rejected.iter().peekable();
    for index in 0..records.len() {
        match rejected.peek() {
            Some((rejected_index, reason)) if *rejected_index == index => {
                reject(
                    &mut reasons,
                    index,
                    None,
                    format!("the value does not decode as the stream's schema: {reason}"),
                );
                rejected.next();
            }
            _ => decoded_indexes.push(index),
        }
    }
    let device_ids = decoded.batch.column_by_name(KEY_FIELD).and_then(|column| {
        column
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .map(|array| array.iter().collect::<Vec<_>>())
    });
    let event_times = sluice_schema::event_times_micros(&decoded.batch);
    let limits = EventTimeLimits {
        now_micros,
        max_future_skew_micros: rules.max_future_skew_micros,
        earliest_micros: rules.earliest_event_micros,
    };
    for (row, &index) in decoded_indexes.iter().enumerate() {
        let record = &records[index];
        match device_ids.as_ref().and_then(|ids| ids.get(row).copied().flatten()) {
            Some(device_id) if device_id == record.key => {}
            Some(device_id) => reject(
                &mut reasons,
                index,
                Some(KEY_FIELD),
                format!(
                    "the value names device '{}', the record's key '{}'",
                    cut(device_id),
                    cut(record.key)
                ),
            ),
            None => reject(&mut reasons, index, Some(KEY_FIELD), "the value has no device_id".to_string()),
        }
        match event_times.as_ref().and_then(|times| times.get(row).copied()) {
            Some(ts) if ts == record.event_time_micros => {}
            _ => reject(
                &mut reasons,
                index,
                Some("ts"),
                "the value's ts is not the record's event time".to_string(),
            ),
        }
        if let Some(reason) = limits.check(record.event_time_micros) {
            reject(&mut reasons, index, Some("ts"), reason);
        }
        // The edge headers travel with the record too.
        let bytes = record.key.len() + record.value.len() + EDGE_HEADERS_OVERHEAD_BYTES;
        if bytes > rules.max_record_bytes() {
            reject(
                &mut reasons,
                index,
                None,
                format!(
                    "the record is {bytes} bytes with its key and edge headers; at most {} fit",
                    rules.max_record_bytes()
                ),
            );
        }
    }
    let mut rejections = Rejections::default();
    for record_reasons in reasons {
        rejections.add_record(record_reasons);
    }
    if !rejections.is_empty() {
        return Err(rejections);
    }
    batch.payload.reserve_exact(values.iter().map(|value| value.len()).sum());
    batch.records.reserve_exact(records.len());
    for record in records {
        let start = batch.payload.len();
        batch.payload.extend_from_slice(record.value);
        batch.records.push(EncodedRecord {
            key: record.key.to_string(),
            event_time_micros: record.event_time_micros,
            value_range: start..batch.payload.len(),
        });
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], BatchFormatError> {
        if len > self.remaining() {
            return Err(BatchFormatError::Truncated(self.bytes.len()));
        }
        let taken = &self.bytes[self.offset..self.offset + len];
        self.offset += len;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BatchFormatError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u16(&mut self) -> Result<u16, BatchFormatError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, BatchFormatError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, BatchFormatError> {
        self.array().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> Result<i64, BatchFormatError> {
        self.array().map(i64::from_le_bytes)
    }

    fn text(&mut self, len: usize) -> Result<&'a str, BatchFormatError> {
        std::str::from_utf8(self.take(len)?).map_err(|_| BatchFormatError::NotUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(records: &[(&str, i64, &[u8])]) -> EncodedBatch {
        let mut batch = EncodedBatch::default();
        for (key, event_time_micros, value) in records {
            let start = batch.payload.len();
            batch.payload.extend_from_slice(value);
            batch.records.push(EncodedRecord {
                key: key.to_string(),
                event_time_micros: *event_time_micros,
                value_range: start..batch.payload.len(),
            });
        }
        batch
    }

    #[test]
    fn a_batch_comes_back_as_it_was_spooled_at_the_extremes_of_each_field() {
        let records: [(&str, i64, &[u8]); 4] =
            [("sensor-1", i64::MIN, b""), ("é", i64::MAX, &[0, 255, 7]), ("", 0, b"x"), ("d", -1, &[1; 300])];
        let payload = encode_spooled("telemetry", u64::MAX, i64::MIN, &batch(&records)).expect("encodes");
        let decoded = decode_spooled(&payload).expect("decodes");
        assert_eq!(decoded.stream, "telemetry");
        assert_eq!(decoded.fingerprint, u64::MAX);
        assert_eq!(decoded.received_at_micros, i64::MIN);
        let expected: Vec<SpooledRecord<'_>> = records
            .iter()
            .map(|(key, event_time_micros, value)| SpooledRecord {
                key,
                event_time_micros: *event_time_micros,
                value,
            })
            .collect();
        assert_eq!(decoded.records, expected);
        let empty = encode_spooled("t", 0, 0, &EncodedBatch::default()).expect("encodes");
        assert_eq!(decode_spooled(&empty).expect("decodes").records, Vec::new());
    }

    #[test]
    fn every_cut_and_damaged_count_is_an_error_not_a_panic() {
        let payload =
            encode_spooled("telemetry", 7, 1, &batch(&[("a", 1, b"abc"), ("b", 2, b"de")])).expect("encodes");
        for end in 0..payload.len() {
            assert!(decode_spooled(&payload[..end]).is_err(), "cut at {end} decoded");
        }
        let mut trailing = payload.clone();
        trailing.push(0);
        assert_eq!(decode_spooled(&trailing), Err(BatchFormatError::Trailing(1)));
        let mut huge_count = payload.clone();
        let count_at = 1 + 2 + "telemetry".len() + 8 + 8;
        huge_count[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_spooled(&huge_count), Err(BatchFormatError::Truncated(_))));
        let mut version = payload;
        version[0] = 2;
        assert_eq!(decode_spooled(&version), Err(BatchFormatError::Version(2)));
        let long = "k".repeat(usize::from(u16::MAX) + 1);
        assert_eq!(
            encode_spooled(&long, 0, 0, &EncodedBatch::default()),
            Err(BatchFormatError::TooLong(long.len()))
        );
    }

    #[test]
    fn an_edge_id_cannot_pass_for_another_tokens_gateway_and_positions_stop_at_their_limits() {
        assert_eq!(edge_id_problem("site-7.00ff00ff00ff00ff"), None);
        assert!(
            edge_id_problem("farm/site-7.00ff").is_some(),
            "no '/': central puts the token name before it"
        );
        assert!(edge_id_problem("").is_some());
        assert!(edge_id_problem(&"x".repeat(MAX_EDGE_ID_BYTES + 1)).is_some());
        assert_eq!(edge_position((1 << 40) - 1, (1 << 23) - 1), Some(i64::MAX));
        assert_eq!(edge_position(1 << 40, 0), None);
        assert_eq!(edge_position(0, 1 << 23), None);
        assert!(edge_position(2, 0) > edge_position(1, (1 << 23) - 1), "positions grow with frames first");
    }
}
