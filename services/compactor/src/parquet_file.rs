//! One flushed buffer to Parquet files: rows split by event-time partition, each file sorted by
//! (device_id, ts), with page-level statistics (column and offset indexes) for pruning.

use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, TimestampMicrosecondType, TimestampMillisecondType};
use arrow_array::{ArrayRef, RecordBatch, UInt32Array};
use arrow_schema::{ArrowError, DataType, TimeUnit};
use arrow_select::take::take_record_batch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use sluice_lake::{PartitionGranularity, PartitionKey};
use sluice_schema::{EVENT_TIME_FIELD, KEY_FIELD, SEQUENCE_FIELD};

use crate::config::{ParquetCompression, ParquetConfig};

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("failed to arrange rows")]
    Arrow(#[from] ArrowError),
    #[error("failed to write Parquet")]
    Parquet(#[from] ParquetError),
    #[error("the batch has no '{0}' column")]
    MissingColumn(&'static str),
}

/// One Parquet file for one event-time partition.
#[derive(Debug)]
pub(crate) struct EncodedFile {
    pub(crate) partition: PartitionKey,
    pub(crate) bytes: Vec<u8>,
    pub(crate) num_rows: usize,
    pub(crate) min_event_time_micros: i64,
    pub(crate) max_event_time_micros: i64,
}

pub(crate) fn writer_properties(
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

/// Event times of every row, in microseconds.
fn event_times_micros(column: &ArrayRef) -> Result<Vec<i64>, EncodeError> {
    Ok(match column.data_type() {
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            column.as_primitive::<TimestampMicrosecondType>().values().to_vec()
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => column
            .as_primitive::<TimestampMillisecondType>()
            .values()
            .iter()
            .map(|millis| millis * 1_000)
            .collect(),
        _ => return Err(EncodeError::MissingColumn(EVENT_TIME_FIELD)),
    })
}

/// The Parquet files of one flush, and how many repeated readings were left out.
#[derive(Debug)]
pub(crate) struct EncodedFlush {
    pub(crate) files: Vec<EncodedFile>,
    /// Rows equal to another row of the flush in (device_id, ts, seq): the same reading sent
    /// twice, by a client retrying a request or an MQTT redelivery.
    pub(crate) num_duplicates_dropped: usize,
}

/// Splits `batch` by event-time partition and encodes each part as a sorted Parquet file.
///
/// One permutation orders all rows by (partition, device_id, ts, seq); repeated readings are
/// then adjacent and dropped, and each partition is a zero-copy slice of one reordered batch, so
/// the rows are copied once.
pub(crate) fn encode_partitioned(
    batch: &RecordBatch,
    granularity: PartitionGranularity,
    properties: &WriterProperties,
) -> Result<EncodedFlush, EncodeError> {
    let schema = batch.schema();
    let key_index = schema.index_of(KEY_FIELD).map_err(|_| EncodeError::MissingColumn(KEY_FIELD))?;
    let event_time_index =
        schema.index_of(EVENT_TIME_FIELD).map_err(|_| EncodeError::MissingColumn(EVENT_TIME_FIELD))?;
    let event_times = event_times_micros(batch.column(event_time_index))?;
    let devices =
        batch.column(key_index).as_string_opt::<i32>().ok_or(EncodeError::MissingColumn(KEY_FIELD))?;
    let sequences = batch
        .column_by_name(SEQUENCE_FIELD)
        .and_then(|column| column.as_primitive_opt::<Int64Type>())
        .ok_or(EncodeError::MissingColumn(SEQUENCE_FIELD))?
        .values();
    let partitions: Vec<PartitionKey> =
        event_times.iter().map(|&event_time| PartitionKey::for_event_time(event_time, granularity)).collect();
    let mut order: Vec<u32> = (0..batch.num_rows() as u32).collect();
    order.sort_unstable_by(|&left, &right| {
        let (left, right) = (left as usize, right as usize);
        partitions[left]
            .cmp(&partitions[right])
            .then_with(|| devices.value(left).cmp(devices.value(right)))
            .then_with(|| event_times[left].cmp(&event_times[right]))
            .then_with(|| sequences[left].cmp(&sequences[right]))
    });
    let num_rows_before = order.len();
    order.dedup_by(|&mut later, &mut earlier| {
        let (later, earlier) = (later as usize, earlier as usize);
        sequences[later] == sequences[earlier]
            && event_times[later] == event_times[earlier]
            && devices.value(later) == devices.value(earlier)
    });
    let num_duplicates_dropped = num_rows_before - order.len();
    let sorted = take_record_batch(batch, &UInt32Array::from(order.clone()))?;
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
        files.push(EncodedFile {
            partition,
            bytes,
            num_rows: end - start,
            min_event_time_micros,
            max_event_time_micros,
        });
        start = end;
    }
    Ok(EncodedFlush { files, num_duplicates_dropped })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow_schema::{Field, Schema};
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
        let flush = encode_partitioned(&batch(), PartitionGranularity::Hour, &properties).unwrap();
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
    fn daily_granularity_makes_one_file() {
        let properties = writer_properties(&ParquetConfig::default(), 0, 1).unwrap();
        let files = encode_partitioned(&batch(), PartitionGranularity::Day, &properties).unwrap().files;
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].partition.to_string(), "dt=2026-11-26");
        assert_eq!(files[0].num_rows, 5);
    }
}
