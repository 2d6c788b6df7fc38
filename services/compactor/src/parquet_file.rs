//! One flushed buffer to Parquet files: rows split by event-time partition, each file sorted by
//! (device_id, ts), with page-level statistics (column and offset indexes) for pruning.

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

/// Splits the rows of `batches` (one schema) by event-time partition and encodes each part as
/// a sorted Parquet file.
///
/// One permutation orders all rows by (partition, device_id, ts, seq); repeated readings are
/// then adjacent and dropped, and each partition is a zero-copy slice of one reordered batch, so
/// the rows are copied once.
pub(crate) fn encode_partitioned(
    batches: &[RecordBatch],
    granularity: PartitionGranularity,
    properties: &WriterProperties,
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
    let mut event_times = Vec::new();
    let mut devices = Vec::new();
    let mut sequences = Vec::new();
    // Where each batch's rows start in the row numbering of all batches.
    let mut batch_starts = Vec::with_capacity(batches.len());
    for batch in batches {
        batch_starts.push(event_times.len());
        event_times.extend(event_times_micros(batch).ok_or(EncodeError::MissingColumn(EVENT_TIME_FIELD))?);
        let batch_devices = batch
            .column_by_name(KEY_FIELD)
            .and_then(|column| column.as_string_opt::<i32>())
            .ok_or(EncodeError::MissingColumn(KEY_FIELD))?;
        devices.extend((0..batch.num_rows()).map(|row| batch_devices.value(row)));
        sequences.extend_from_slice(
            batch
                .column_by_name(SEQUENCE_FIELD)
                .and_then(|column| column.as_primitive_opt::<Int64Type>())
                .ok_or(EncodeError::MissingColumn(SEQUENCE_FIELD))?
                .values(),
        );
    }
    // The consumer dead-letters such rows before they are buffered; a file is never written to
    // a partition that does not hold its rows.
    let partitions: Vec<PartitionKey> = event_times
        .iter()
        .map(|&event_time| PartitionKey::try_for_event_time(event_time, granularity))
        .collect::<Result<_, _>>()?;
    let mut order: Vec<u32> = (0..event_times.len() as u32).collect();
    order.sort_unstable_by(|&left, &right| {
        let (left, right) = (left as usize, right as usize);
        partitions[left]
            .cmp(&partitions[right])
            .then_with(|| devices[left].cmp(devices[right]))
            .then_with(|| event_times[left].cmp(&event_times[right]))
            .then_with(|| sequences[left].cmp(&sequences[right]))
    });
    let num_rows_before = order.len();
    order.dedup_by(|&mut later, &mut earlier| {
        let (later, earlier) = (later as usize, earlier as usize);
        sequences[later] == sequences[earlier]
            && event_times[later] == event_times[earlier]
            && devices[later] == devices[earlier]
    });
    let num_duplicates_dropped = num_rows_before - order.len();
    let batch_refs: Vec<&RecordBatch> = batches.iter().collect();
    let sorted_locations: Vec<(usize, usize)> = order
        .iter()
        .map(|&row| {
            let row = row as usize;
            let batch_index = batch_starts.partition_point(|&start| start <= row) - 1;
            (batch_index, row - batch_starts[batch_index])
        })
        .collect();
    let sorted = interleave_record_batch(&batch_refs, &sorted_locations)?;
    let mut files = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let partition = partitions[order[start] as usize];
        let end =
            start + order[start..].iter().take_while(|&&row| partitions[row as usize] == partition).count();
        let (min_event_time_micros, max_event_time_micros) = order[start..end]
            .iter()
            .map(|&row| event_times[row as usize])
            .fold((i64::MAX, i64::MIN), |(min, max), time| (min.min(time), max.max(time)));
        let part = sorted.slice(start, end - start);
        let mut bytes = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut bytes, part.schema(), Some(properties.clone()))?;
        writer.write(&part)?;
        writer.close()?;
        let stats_json = sluice_lake::delta_stats(std::slice::from_ref(&part));
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
        let flush = encode_partitioned(&[batch()], PartitionGranularity::Hour, &properties).unwrap();
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
        let whole = encode_partitioned(&[batch()], PartitionGranularity::Hour, &properties).unwrap();
        let parts = [batch().slice(0, 2), batch().slice(2, 1), batch().slice(3, 3)];
        let split = encode_partitioned(&parts, PartitionGranularity::Hour, &properties).unwrap();
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
            encode_partitioned(&[batch(), other_schema], PartitionGranularity::Hour, &properties).is_err()
        );
    }

    #[test]
    fn daily_granularity_makes_one_file() {
        let properties = writer_properties(&ParquetConfig::default(), 0, 1).unwrap();
        let files = encode_partitioned(&[batch()], PartitionGranularity::Day, &properties).unwrap().files;
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].partition.to_string(), "dt=2026-11-26");
        assert_eq!(files[0].num_rows, 5);
    }
}
