//! The Kafka record headers Sluice writes and reads. Ingest sets them, the compactor reads the
//! fingerprint and writes its own dead letters, and users' consumers see them on the dead-letter
//! topic: one definition, so a rename cannot split the writers from the readers.

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
