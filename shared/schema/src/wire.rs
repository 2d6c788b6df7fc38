//! The Kafka value format: Avro single-object encoding. Two marker bytes `C3 01`, the writer
//! schema's CRC-64-AVRO fingerprint as 8 little-endian bytes, then the Avro binary datum. Any
//! Avro library can read it, and a reader finds the writer schema without a registry service.
//!
//! The record headers Sluice writes and reads live here too. Ingest sets them, the compactor reads
//! them and writes its own dead letters, and users' consumers see them on the dead-letter topic:
//! one definition beside the value format, so a rename cannot split the writers from the readers.

/// The two bytes that start every single-object encoded datum.
pub const SINGLE_OBJECT_MARKER: [u8; 2] = [0xC3, 0x01];
const SINGLE_OBJECT_HEADER_LEN: usize = 10;

/// The writer schema (16 hex digits of its CRC-64-AVRO fingerprint).
pub const SCHEMA_FINGERPRINT_HEADER: &str = "sluice.schema.fingerprint";
/// The time ingest received the record, epoch microseconds in decimal.
pub const INGEST_TIME_HEADER: &str = "sluice.ingest.time";
/// On dead letters: why the record was refused (by ingest) or could not be compacted.
pub const DEAD_LETTER_REASON_HEADER: &str = "sluice.dlq.reason";
/// On dead letters: where the record came from (an MQTT topic, an HTTP stream, or
/// `kafka:<topic>/<partition>@<offset>` for the compactor's).
pub const DEAD_LETTER_SOURCE_HEADER: &str = "sluice.dlq.source";
/// On dead letters whose payload was cut to fit the producer's message limit: the size in bytes
/// of the payload as it arrived (the value holds its first bytes only).
pub const DEAD_LETTER_ORIGINAL_SIZE_HEADER: &str = "sluice.dlq.original.size";
/// On records an edge gateway forwarded: which gateway (and spool incarnation) accepted them.
pub const EDGE_ID_HEADER: &str = "sluice.edge.id";
/// On records an edge gateway forwarded: the record's position in all that gateway accepted,
/// decimal; it grows in the order the gateway accepted readings.
pub const EDGE_POSITION_HEADER: &str = "sluice.edge.position";
/// On records an edge gateway forwarded: the first position of the request central took the
/// record in, decimal. The gateway sent every reading below it before, in requests central
/// answered 200.
pub const EDGE_FLOOR_HEADER: &str = "sluice.edge.floor";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("value of {len} bytes is shorter than the 10-byte single-object header")]
    TooShort { len: usize },
    #[error("value does not start with the Avro single-object marker C3 01 (found {found:02X?})")]
    BadMarker { found: [u8; 2] },
}

/// The 10-byte header naming a writer schema, for readers that check it (apache-avro's
/// `GenericSingleObjectReader::builder().header(..)`).
pub fn single_object_header(fingerprint: u64) -> Vec<u8> {
    let mut header = Vec::with_capacity(SINGLE_OBJECT_HEADER_LEN);
    write_single_object_header(fingerprint, &mut header);
    header
}

pub fn write_single_object_header(fingerprint: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&SINGLE_OBJECT_MARKER);
    out.extend_from_slice(&fingerprint.to_le_bytes());
}

/// Splits a Kafka value into the writer fingerprint and the Avro datum.
pub fn split_single_object(value: &[u8]) -> Result<(u64, &[u8]), WireError> {
    if value.len() < SINGLE_OBJECT_HEADER_LEN {
        return Err(WireError::TooShort { len: value.len() });
    }
    let (header, datum) = value.split_at(SINGLE_OBJECT_HEADER_LEN);
    if header[..2] != SINGLE_OBJECT_MARKER {
        return Err(WireError::BadMarker { found: [header[0], header[1]] });
    }
    let mut fingerprint = [0u8; 8];
    fingerprint.copy_from_slice(&header[2..]);
    Ok((u64::from_le_bytes(fingerprint), datum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut value = Vec::new();
        write_single_object_header(0x0102_0304_0506_0708, &mut value);
        value.push(42);
        assert_eq!(split_single_object(&value), Ok((0x0102_0304_0506_0708, &[42u8][..])));
    }

    #[test]
    fn foreign_bytes_are_rejected() {
        assert_eq!(split_single_object(b"{}"), Err(WireError::TooShort { len: 2 }));
        assert_eq!(
            split_single_object(b"{\"json\": true}"),
            Err(WireError::BadMarker { found: [b'{', b'"'] })
        );
    }
}
