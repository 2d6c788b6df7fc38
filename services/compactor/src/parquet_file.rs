//! One flushed buffer to Parquet files: rows split by event-time partition, each file sorted by
//! (device_id, ts), with page-level statistics (column and offset indexes) for pruning.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_schema::ArrowError;
use arrow_select::interleave::interleave_record_batch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use sluice_lake::encryption::{EncryptionError, LakeEncryption};
use sluice_lake::{EventTimeOutOfRange, PartitionGranularity, PartitionKey};
use sluice_schema::{EVENT_TIME_FIELD, KEY_FIELD, SEQUENCE_FIELD, event_times_micros};

use crate::config::{ParquetCompression, ParquetConfig};

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("failed to arrange rows")]
    Arrow(#[from] ArrowError),
    #[error("failed to write Parquet")]
    Parquet(#[from] ParquetError),
    #[error("the batch has no '{0}' column")]
    MissingColumn(&'static str),
    #[error("a row cannot be partitioned")]
    EventTime(#[from] EventTimeOutOfRange),
    #[error("failed to encrypt the file's columns")]
    Encryption(#[from] EncryptionError),
}

/// A stream's column encryption, for the files the compactor writes and merges.
#[derive(Debug, Clone)]
pub(crate) struct StreamEncryption {
    pub(crate) lake: Arc<LakeEncryption>,
    pub(crate) stream: String,
}

impl StreamEncryption {
    /// `properties` for the stream's files: an encrypted column's statistics are kept per column
    /// chunk only, inside its encrypted metadata. Page statistics would add a column index that
    /// readers without the key cannot parse, and they would then fail on the whole file instead
    /// of reading its other columns; a bloom filter would be written in the clear.
    pub(crate) fn writer_properties(&self, properties: WriterProperties) -> WriterProperties {
        let mut builder = properties.into_builder();
        for column in self.lake.encrypted_columns(&self.stream) {
            let path = ColumnPath::from(column);
            // Nor a dictionary: the plaintext footer tells its page's size, which hints at how
            // many distinct values the file holds.
            builder = builder
                .set_column_statistics_enabled(path.clone(), EnabledStatistics::Chunk)
                .set_column_dictionary_enabled(path.clone(), false)
                .set_column_bloom_filter_enabled(path, false);
        }
        builder.build()
    }
}

/// One Parquet file for one event-time partition.
#[derive(Debug)]
pub(crate) struct EncodedFile {
    pub(crate) partition: PartitionKey,
    pub(crate) bytes: Vec<u8>,
    pub(crate) num_rows: usize,
    pub(crate) min_event_time_micros: i64,
    pub(crate) max_event_time_micros: i64,
    /// Delta statistics of the file's rows.
    pub(crate) stats_json: String,
}

/// How the compactor and its merges write Parquet: also what the query benchmark writes.
pub fn writer_properties(
    config: &ParquetConfig,
    key_column: usize,
    event_time_column: usize,
) -> Result<WriterProperties, EncodeError> {
    let compression = match config.compression {
        ParquetCompression::Zstd => Compression::ZSTD(ZstdLevel::try_new(config.compression_level)?),
        ParquetCompression::Snappy => Compression::SNAPPY,
        ParquetCompression::Lz4 => Compression::LZ4_RAW,
        ParquetCompression::None => Compression::UNCOMPRESSED,
    };
    let sorting = vec![
        SortingColumn { column_idx: key_column as i32, descending: false, nulls_first: false },
        SortingColumn { column_idx: event_time_column as i32, descending: false, nulls_first: false },
    ];
    Ok(WriterProperties::builder()
        .set_compression(compression)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(config.row_group_rows))
        .set_sorting_columns(Some(sorting))
        .set_column_bloom_filter_enabled(ColumnPath::from(KEY_FIELD), config.device_bloom_filter)
        .build())
}

/// The Parquet files of one flush, and how many repeated readings were left out.
#[derive(Debug)]
pub(crate) struct EncodedFlush {
    pub(crate) files: Vec<EncodedFile>,
    /// Rows equal to another row of the flush in (device_id, ts, seq): the same reading sent
    /// twice, by a client retrying a request or an MQTT redelivery.
    pub(crate) num_duplicates_dropped: usize,
}

/// The order of rows in a flush's files: (partition, device_id, ts, seq). Field order is the
/// comparison order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct SortKey {
    partition: PartitionKey,
    /// While keys are built, the device's id in order of first appearance; then its rank.
    device: u32,
    event_time: i64,
    sequence: i64,
    /// Where the row is: its batch, then its row in the batch. Last, so that of repeated
    /// readings the one consumed first comes first.
    batch: u32,
    batch_row: u32,
}

/// The distinct device ids of a flush, numbered as they first appear.
#[derive(Debug, Default)]
struct DeviceIds<'a> {
    ids: HashMap<&'a str, u32>,
    names: Vec<&'a str>,
    /// The previous row's device: a device's readings mostly arrive together (one request, one
    /// Kafka key), so most rows skip the hash lookup.
    last_opt: Option<(&'a str, u32)>,
}

impl<'a> DeviceIds<'a> {
    fn id_of(&mut self, device: &'a str) -> u32 {
        if let Some((last, id)) = self.last_opt
            && last == device
        {
            return id;
        }
        let next = self.names.len() as u32;
        let id = *self.ids.entry(device).or_insert_with(|| {
            self.names.push(device);
            next
        });
        self.last_opt = Some((device, id));
        id
    }

    /// For each id, the device's rank in byte order among all the flush's devices.
    fn ranks(&self) -> Vec<u32> {
        let mut by_name: Vec<u32> = (0..self.names.len() as u32).collect();
        by_name.sort_unstable_by_key(|&id| self.names[id as usize]);
        let mut ranks = vec![0; self.names.len()];
        for (rank, id) in by_name.into_iter().enumerate() {
            ranks[id as usize] = rank as u32;
        }
        ranks
    }
}

/// Puts `keys` in [`SortKey`] order, in time linear in the rows where it can: a counting pass
/// places each row in its (partition, device) group in the order the rows came, and only a group
/// whose readings came out of order is sorted. A device's readings nearly always come in order
/// (one Kafka key, one partition), and a comparison sort of the whole flush, over keys of 40
/// bytes, took a fifth of a flush worker's time in a profile. Each key's `device` is a rank
/// below `num_devices`. With more groups than rows (many partitions, many devices, few rows) the
/// counts would cost more than they save, and the whole flush is sorted instead.
fn sort_keys(keys: &mut Vec<SortKey>, num_devices: usize) {
    let mut partitions: Vec<PartitionKey> = Vec::new();
    for key in keys.iter() {
        if partitions.last() != Some(&key.partition) {
            partitions.push(key.partition);
        }
    }
    partitions.sort_unstable();
    partitions.dedup();
    let num_groups = partitions.len().saturating_mul(num_devices);
    if num_groups > keys.len() {
        keys.sort_unstable();
        return;
    }
    // Where each group starts in the sorted keys, from the number of rows in each group.
    let mut group_starts = vec![0_usize; num_groups + 1];
    let mut groups: Vec<usize> = Vec::with_capacity(keys.len());
    let mut last_partition_opt: Option<(PartitionKey, usize)> = None;
    for key in keys.iter() {
        let partition_index = match last_partition_opt {
            Some((partition, index)) if partition == key.partition => index,
            _ => {
                // Every key's partition is in the list: `Err` cannot happen.
                let index = partitions.binary_search(&key.partition).unwrap_or_else(|index| index);
                last_partition_opt = Some((key.partition, index));
                index
            }
        };
        debug_assert!((key.device as usize) < num_devices, "a device's rank is below the number of devices");
        let group = partition_index * num_devices + key.device as usize;
        group_starts[group + 1] += 1;
        groups.push(group);
    }
    for group in 1..group_starts.len() {
        group_starts[group] += group_starts[group - 1];
    }
    let mut next_places = group_starts.clone();
    let mut sorted = keys.clone();
    for (key, &group) in keys.iter().zip(&groups) {
        let place = &mut next_places[group];
        sorted[*place] = *key;
        *place += 1;
    }
    for bounds in group_starts.windows(2) {
        let group = &mut sorted[bounds[0]..bounds[1]];
        if !group.is_sorted() {
            group.sort_unstable();
        }
    }
    *keys = sorted;
}

/// Splits the rows of `batches` (one schema) by event-time partition and encodes each part as
/// a sorted Parquet file.
///
/// One permutation orders all rows by their [`SortKey`]; repeated readings are then adjacent
/// and dropped, and each partition is a zero-copy slice of one reordered batch, so the rows are
/// copied once.
pub(crate) fn encode_partitioned(
    batches: &[RecordBatch],
    granularity: PartitionGranularity,
    properties: &WriterProperties,
    encryption_opt: Option<&StreamEncryption>,
) -> Result<EncodedFlush, EncodeError> {
    let Some(first) = batches.first() else {
        return Ok(EncodedFlush { files: Vec::new(), num_duplicates_dropped: 0 });
    };
    let schema = first.schema();
    if let Some(other) = batches.iter().find(|batch| batch.schema().fields() != schema.fields()) {
        return Err(EncodeError::Arrow(ArrowError::SchemaError(format!(
            "rows of different schemas cannot share a file: {schema:?} and {:?}",
            other.schema()
        ))));
    }
    // One sort key per row, compared as plain integers: the device is its rank among the
    // flush's distinct device ids (in byte order, as `str` compares), so the sort never compares
    // strings.
    let mut keys: Vec<SortKey> = Vec::with_capacity(batches.iter().map(RecordBatch::num_rows).sum());
    let mut device_ids = DeviceIds::default();
    for (batch_index, batch) in batches.iter().enumerate() {
        let event_times = event_times_micros(batch).ok_or(EncodeError::MissingColumn(EVENT_TIME_FIELD))?;
        let devices = batch
            .column_by_name(KEY_FIELD)
            .and_then(|column| column.as_string_opt::<i32>())
            .ok_or(EncodeError::MissingColumn(KEY_FIELD))?;
        let sequences = batch
            .column_by_name(SEQUENCE_FIELD)
            .and_then(|column| column.as_primitive_opt::<Int64Type>())
            .ok_or(EncodeError::MissingColumn(SEQUENCE_FIELD))?
            .values();
        for (row, (&event_time, &sequence)) in event_times.iter().zip(sequences.iter()).enumerate() {
            // The consumer dead-letters such rows before they are buffered; a file is never
            // written to a partition that does not hold its rows.
            let partition = PartitionKey::try_for_event_time(event_time, granularity)?;
            keys.push(SortKey {
                partition,
                device: device_ids.id_of(devices.value(row)),
                event_time,
                sequence,
                batch: batch_index as u32,
                batch_row: row as u32,
            });
        }
    }
    let ranks = device_ids.ranks();
    for key in &mut keys {
        key.device = ranks[key.device as usize];
    }
    sort_keys(&mut keys, ranks.len());
    let num_rows_before = keys.len();
    // The partition follows from the event time, so equal (device, time, seq) means equal keys.
    keys.dedup_by(|later, earlier| {
        later.device == earlier.device
            && later.event_time == earlier.event_time
            && later.sequence == earlier.sequence
    });
    let num_duplicates_dropped = num_rows_before - keys.len();
    let batch_refs: Vec<&RecordBatch> = batches.iter().collect();
    let sorted_locations: Vec<(usize, usize)> =
        keys.iter().map(|key| (key.batch as usize, key.batch_row as usize)).collect();
    let sorted = interleave_record_batch(&batch_refs, &sorted_locations)?;
    drop(sorted_locations);
    let mut files = Vec::new();
    let mut start = 0;
    while start < keys.len() {
        let partition = keys[start].partition;
        let end = start + keys[start..].iter().take_while(|key| key.partition == partition).count();
        // Sorted by device first, so the event times of a partition are not in order.
        let (min_event_time_micros, max_event_time_micros) = keys[start..end]
            .iter()
            .map(|key| key.event_time)
            .fold((i64::MAX, i64::MIN), |(min, max), time| (min.min(time), max.max(time)));
        let part = sorted.slice(start, end - start);
        let mut file_properties = properties.clone();
        let mut withheld = BTreeSet::new();
        if let Some(encryption) = encryption_opt {
            withheld = encryption.lake.encrypted_columns(&encryption.stream);
            // Fresh data keys for every file.
            if let Some(keys) = encryption.lake.file_encryption(&encryption.stream, &part.schema())? {
                file_properties =
                    file_properties.into_builder().with_file_encryption_properties(keys).build();
            }
        }
        let mut bytes = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut bytes, part.schema(), Some(file_properties))?;
        writer.write(&part)?;
        writer.close()?;
        let stats_json = sluice_lake::delta_stats_without(std::slice::from_ref(&part), &withheld);
        files.push(EncodedFile {
            partition,
            bytes,
            num_rows: end - start,
            min_event_time_micros,
            max_event_time_micros,
            stats_json,
        });
        start = end;
    }
    Ok(EncodedFlush { files, num_duplicates_dropped })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow_schema::{DataType, Field, Schema, TimeUnit};
    use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
    use parquet::file::metadata::PageIndexPolicy;

    use super::*;

    const HOUR: i64 = 3_600_000_000;
    const BASE: i64 = 1_795_680_000_000_000;

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
            Field::new("seq", DataType::Int64, false),
        ]));
        let devices = StringArray::from(vec!["b", "a", "b", "a", "c", "b"]);
        let times = TimestampMicrosecondArray::from(vec![
            BASE + 5,
            BASE + HOUR + 1,
            BASE + 1,
            BASE + 3,
            BASE + HOUR,
            BASE + 5,
        ])
        .with_timezone("UTC");
        // The last row repeats the first: the same reading delivered twice.
        let seqs = Int64Array::from(vec![1, 2, 3, 4, 5, 1]);
        RecordBatch::try_new(schema, vec![Arc::new(devices), Arc::new(times), Arc::new(seqs)]).unwrap()
    }

    #[test]
    fn rows_split_by_hour_and_sorted_by_device_then_time() {
        let properties = writer_properties(&ParquetConfig::default(), 0, 1).unwrap();
        let flush = encode_partitioned(&[batch()], PartitionGranularity::Hour, &properties, None).unwrap();
        assert_eq!(flush.num_duplicates_dropped, 1);
        let files = flush.files;
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].partition.to_string(), "dt=2026-11-26/hour=08");
        assert_eq!(
            (files[0].num_rows, files[0].min_event_time_micros, files[0].max_event_time_micros),
            (3, BASE + 1, BASE + 5)
        );
        assert_eq!(files[1].num_rows, 2);
        let options = ArrowReaderOptions::new().with_page_index_policy(PageIndexPolicy::Required);
        let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(
            bytes::Bytes::from(files[0].bytes.clone()),
            options,
        )
        .unwrap();
        assert!(reader.metadata().column_index().is_some(), "page index written");
        assert!(reader.metadata().offset_index().is_some(), "offset index written");
        let batches: Vec<RecordBatch> = reader.build().unwrap().collect::<Result<_, _>>().unwrap();
        let devices = batches[0].column(0).as_string::<i32>();
        let seqs = batches[0].column(2).as_primitive::<arrow_array::types::Int64Type>();
        let rows: Vec<(&str, i64)> =
            (0..devices.len()).map(|row| (devices.value(row), seqs.value(row))).collect();
        assert_eq!(rows, [("a", 4), ("b", 3), ("b", 1)]);
    }

    #[test]
    fn rows_of_several_batches_are_sorted_together() {
        let properties = writer_properties(&ParquetConfig::default(), 0, 1).unwrap();
        let whole = encode_partitioned(&[batch()], PartitionGranularity::Hour, &properties, None).unwrap();
        let parts = [batch().slice(0, 2), batch().slice(2, 1), batch().slice(3, 3)];
        let split = encode_partitioned(&parts, PartitionGranularity::Hour, &properties, None).unwrap();
        assert_eq!(split.num_duplicates_dropped, 1, "a duplicate in another batch is still found");
        let bytes =
            |flush: &EncodedFlush| flush.files.iter().map(|file| file.bytes.clone()).collect::<Vec<_>>();
        assert_eq!(bytes(&split), bytes(&whole));
        let other_schema = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("device_id", DataType::Utf8, false)])),
            vec![Arc::new(StringArray::from(vec!["a"]))],
        )
        .unwrap();
        assert!(
            encode_partitioned(&[batch(), other_schema], PartitionGranularity::Hour, &properties, None)
                .is_err()
        );
    }

    #[test]
    fn daily_granularity_makes_one_file() {
        let properties = writer_properties(&ParquetConfig::default(), 0, 1).unwrap();
        let files =
            encode_partitioned(&[batch()], PartitionGranularity::Day, &properties, None).unwrap().files;
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].partition.to_string(), "dt=2026-11-26");
        assert_eq!(files[0].num_rows, 5);
    }

    fn readings(rows: &[(&str, i64, i64, i64)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false),
            Field::new("seq", DataType::Int64, false),
            Field::new("temperature", DataType::Int64, false),
        ]));
        let devices = StringArray::from(rows.iter().map(|row| row.0).collect::<Vec<_>>());
        let times = TimestampMicrosecondArray::from(rows.iter().map(|row| row.1).collect::<Vec<_>>())
            .with_timezone("UTC");
        let seqs = Int64Array::from(rows.iter().map(|row| row.2).collect::<Vec<_>>());
        let values = Int64Array::from(rows.iter().map(|row| row.3).collect::<Vec<_>>());
        RecordBatch::try_new(
            schema,
            vec![Arc::new(devices), Arc::new(times), Arc::new(seqs), Arc::new(values)],
        )
        .unwrap()
    }

    fn file_rows(file: &EncodedFile) -> Vec<(String, i64, i64)> {
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(file.bytes.clone())).unwrap();
        let mut rows = Vec::new();
        for batch in reader.build().unwrap() {
            let batch = batch.unwrap();
            let devices = batch.column(0).as_string::<i32>();
            let seqs = batch.column(2).as_primitive::<Int64Type>();
            let values = batch.column(3).as_primitive::<Int64Type>();
            rows.extend(
                (0..batch.num_rows())
                    .map(|row| (devices.value(row).to_string(), seqs.value(row), values.value(row))),
            );
        }
        rows
    }

    #[test]
    fn devices_sort_in_byte_order_and_the_first_of_repeated_readings_is_kept() {
        let properties = writer_properties(&ParquetConfig::default(), 0, 1).unwrap();
        // Upper case before lower case, a longer id after its prefix, multi-byte characters last
        // (byte order, as `str` compares); devices interleaved so that rows change device often.
        let first = readings(&[
            ("é-1", BASE + 2, 1, 10),
            ("a", BASE + 2, 7, 11),
            ("Z", BASE + 1, 1, 12),
            ("ab", BASE, 1, 13),
            ("a", BASE + 1, 6, 14),
        ]);
        // The same reading of `a` again, with another value: the one consumed first stays.
        let second = readings(&[("a", BASE + 2, 7, 99), ("Z", BASE + 3, 2, 15)]);
        let flush =
            encode_partitioned(&[first, second], PartitionGranularity::Hour, &properties, None).unwrap();
        assert_eq!(flush.num_duplicates_dropped, 1);
        assert_eq!(flush.files.len(), 1);
        let expected: Vec<(String, i64, i64)> =
            [("Z", 1, 12), ("Z", 2, 15), ("a", 6, 14), ("a", 7, 11), ("ab", 1, 13), ("é-1", 1, 10)]
                .into_iter()
                .map(|(device, seq, value)| (device.to_string(), seq, value))
                .collect();
        assert_eq!(file_rows(&flush.files[0]), expected);
        assert_eq!(
            (flush.files[0].min_event_time_micros, flush.files[0].max_event_time_micros),
            (BASE, BASE + 3)
        );
    }

    /// Keys of `num_rows` rows over `num_devices` devices, each device's readings a random step
    /// of up to 18 s after its latest one, except that every `out_of_order_every`th reading goes
    /// back by twice its step (out of time order within its group); every 97th has sequence 1.
    fn keys(num_rows: u32, num_devices: u32, out_of_order_every: u32) -> Vec<SortKey> {
        // A fixed linear congruential sequence: the same keys in every run.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |bound: u32| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % u64::from(bound)) as u32
        };
        let mut last_times = vec![BASE; num_devices as usize];
        let mut keys = Vec::new();
        for row in 0..num_rows {
            let device = next(num_devices);
            let step = i64::from(next(HOUR as u32 / 200));
            let mut event_time = last_times[device as usize] + step;
            if out_of_order_every > 0 && row % out_of_order_every == 0 {
                event_time -= 2 * step;
            }
            last_times[device as usize] = last_times[device as usize].max(event_time);
            let sequence = if row % 97 == 0 { 1 } else { i64::from(row) };
            keys.push(SortKey {
                partition: PartitionKey::for_event_time(event_time, PartitionGranularity::Hour),
                device,
                event_time,
                sequence,
                batch: row / 100,
                batch_row: row % 100,
            });
        }
        keys
    }

    #[test]
    fn keys_sorted_by_group_are_in_the_order_of_a_comparison_sort() {
        for (num_rows, num_devices, out_of_order_every) in
            [(20_000, 50, 0), (20_000, 50, 7), (20_000, 2_000, 3), (300, 2_000, 5), (1, 1, 0), (0, 0, 0)]
        {
            let keys = keys(num_rows, num_devices, out_of_order_every);
            let mut expected = keys.clone();
            expected.sort_unstable();
            let mut sorted = keys.clone();
            sort_keys(&mut sorted, num_devices as usize);
            assert!(
                sorted == expected,
                "{num_rows} rows, {num_devices} devices, every {out_of_order_every}th out of order"
            );
        }
    }

    #[test]
    fn a_reading_outside_the_lake_range_fails_the_flush_instead_of_landing_in_a_wrong_partition() {
        let properties = writer_properties(&ParquetConfig::default(), 0, 1).unwrap();
        for event_time in [
            i64::MIN,
            sluice_lake::MIN_EVENT_TIME_MICROS - 1,
            sluice_lake::MAX_EVENT_TIME_MICROS + 1,
            i64::MAX,
        ] {
            let batch = readings(&[("a", BASE, 1, 1), ("b", event_time, 1, 1)]);
            let error =
                encode_partitioned(&[batch], PartitionGranularity::Hour, &properties, None).unwrap_err();
            assert!(matches!(error, EncodeError::EventTime(_)), "{event_time}: {error:?}");
        }
        let edges = readings(&[
            ("a", sluice_lake::MIN_EVENT_TIME_MICROS, 1, 1),
            ("a", sluice_lake::MAX_EVENT_TIME_MICROS, 2, 2),
        ]);
        let files =
            encode_partitioned(&[edges], PartitionGranularity::Hour, &properties, None).unwrap().files;
        assert_eq!(files.len(), 2, "the first and the last hour the lake can hold");
    }
}
