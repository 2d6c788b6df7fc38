//! Small-file merge: committed files of a closed event-time partition (its hour ended long
//! enough ago) that are smaller than `small_file_bytes` are rewritten as one sorted file, swapped
//! in by one Delta commit (`add` of the output and `remove` of the inputs, no data change), so a
//! reader of any table version sees each row once. A merge that loses to another one deletes its
//! output and is dropped.

use std::collections::BTreeMap;
use std::time::Duration;

use arrow_array::RecordBatch;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::file::properties::WriterProperties;
use sluice_lake::{
    CommittedFile, Lake, LakeError, MergeRecord, PartitionGranularity, PartitionKey, TableCommit,
};
use sluice_shutdown::CancellationToken;

use crate::config::MergeConfig;
use crate::consumer::{millis_to_micros, now_micros};
use crate::parquet_file::{EncodeError, StreamEncryption, encode_partitioned};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("lake operation failed")]
    Lake(#[from] LakeError),
    #[error("failed to read {path}")]
    Read {
        path: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("failed to combine the files of {partition}")]
    Combine {
        partition: String,
        #[source]
        source: arrow_schema::ArrowError,
    },
    #[error("failed to write the merged file")]
    Encode(#[from] EncodeError),
    #[error("the merge worker panicked")]
    Panicked,
}

/// What the merger needs to know about one stream.
#[derive(Debug, Clone)]
pub(crate) struct MergeTarget {
    pub(crate) stream: String,
    pub(crate) granularity: PartitionGranularity,
    pub(crate) writer_properties: WriterProperties,
    pub(crate) encryption_opt: Option<StreamEncryption>,
}

/// Runs merges every `interval_ms` until shutdown.
pub(crate) async fn run_merger(
    lake: Lake,
    targets: Vec<MergeTarget>,
    config: MergeConfig,
    writer_id: String,
    shutdown: CancellationToken,
) -> Result<(), MergeError> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(config.interval_ms)) => {}
        }
        for target in &targets {
            match merge_stream(&lake, target, &config, &writer_id, &shutdown).await {
                Ok(0) => {}
                Ok(num_merges) => tracing::info!(stream = %target.stream, num_merges, "merged small files"),
                // A panic is a defect, not a passing store error: trying again would hide it.
                Err(error @ MergeError::Panicked) => return Err(error),
                Err(error) => {
                    tracing::warn!(stream = %target.stream, error = %sluice_errors::Chain(&error), "small-file merge failed; trying again later")
                }
            }
        }
    }
}

/// One round of merges for a stream; returns how many merges it committed.
pub(crate) async fn merge_stream(
    lake: &Lake,
    target: &MergeTarget,
    config: &MergeConfig,
    writer_id: &str,
    shutdown: &CancellationToken,
) -> Result<usize, MergeError> {
    let closed_before = now_micros().saturating_sub(millis_to_micros(config.min_partition_age_ms));
    let mut small_by_partition: BTreeMap<String, Vec<CommittedFile>> = BTreeMap::new();
    for file in lake.live_files(&target.stream).await? {
        // Files that older versions filed under a partition that cannot hold their rows (event
        // times outside years 0000-9999) stay as they are: rewriting them could not place them.
        let (Ok(key), Ok(_)) = (
            PartitionKey::try_for_event_time(file.min_event_time_micros, target.granularity),
            PartitionKey::try_for_event_time(file.max_event_time_micros, target.granularity),
        ) else {
            continue;
        };
        if key.end_micros() <= closed_before && (file.size_bytes as usize) < config.small_file_bytes {
            small_by_partition.entry(file.partition.clone()).or_default().push(file);
        }
    }
    let mut num_merges = 0;
    for (partition, mut files) in small_by_partition {
        if shutdown.is_cancelled() {
            break;
        }
        files.sort_by(|left, right| left.path.cmp(&right.path));
        let mut inputs = Vec::new();
        let mut total_bytes = 0;
        for file in files {
            if inputs.len() == config.max_files_per_merge
                || total_bytes + file.size_bytes as usize > config.target_file_bytes
            {
                break;
            }
            total_bytes += file.size_bytes as usize;
            inputs.push(file);
        }
        if inputs.len() < 2 {
            continue;
        }
        let (output, stats_json) = merge_files(lake, target, &partition, &inputs).await?;
        let record = MergeRecord {
            stream: target.stream.clone(),
            partition,
            inputs,
            output,
            writer_id: writer_id.to_string(),
            created_at_micros: now_micros(),
        };
        match lake.create_merge(&record, &stats_json).await {
            Ok(TableCommit::Committed { .. }) => num_merges += 1,
            Ok(TableCommit::Conflict) => {
                // Another replica merged meanwhile; its view wins, ours is stale. Next round.
                lake.delete(&record.output.path).await?;
                break;
            }
            Err(error) => {
                // Whether it landed is unknown: the janitor deletes the output if no version has it.
                return Err(error.into());
            }
        }
    }
    Ok(num_merges)
}

/// Reads the inputs, and writes them as one sorted file at its final path, where no reader looks
/// before the merge's commit adds it. Returns the file and its Delta statistics.
#[tracing::instrument(name = "merge", skip_all, fields(stream = %target.stream, partition = %partition, num_inputs = inputs.len()))]
async fn merge_files(
    lake: &Lake,
    target: &MergeTarget,
    partition: &str,
    inputs: &[CommittedFile],
) -> Result<(CommittedFile, String), MergeError> {
    let mut contents = Vec::with_capacity(inputs.len());
    for input in inputs {
        contents.push((input.path.clone(), lake.get(&input.path).await?));
    }
    let target_for_encoding = target.clone();
    let partition_name = partition.to_string();
    // Merged files are decrypted and written again under fresh data keys; files written before
    // the stream's columns were encrypted read the same way.
    let mut read_options = ArrowReaderOptions::new();
    if let Some(encryption) = &target.encryption_opt {
        read_options = read_options.with_file_decryption_properties(
            encryption.lake.decryption().map_err(|source| MergeError::Encode(source.into()))?,
        );
    }
    let encoded = tokio::task::spawn_blocking(move || -> Result<_, MergeError> {
        let mut batches: Vec<RecordBatch> = Vec::new();
        for (path, bytes) in contents {
            let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(bytes, read_options.clone())
                .and_then(|builder| builder.build())
                .map_err(|source| MergeError::Read { path: path.clone(), source })?;
            for batch in reader {
                batches.push(
                    batch.map_err(|source| MergeError::Combine {
                        partition: partition_name.clone(),
                        source,
                    })?,
                );
            }
        }
        // Files written under different schema versions have different columns: encoding
        // refuses to mix them, and the partition stays as it is.
        Ok(encode_partitioned(
            &batches,
            target_for_encoding.granularity,
            &target_for_encoding.writer_properties,
            target_for_encoding.encryption_opt.as_ref(),
        )?)
    })
    .await
    .map_err(|_| MergeError::Panicked)??;
    let Some(file) = encoded.files.into_iter().next() else {
        return Err(MergeError::Combine {
            partition: partition.to_string(),
            source: arrow_schema::ArrowError::InvalidArgumentError("merge produced no file".into()),
        });
    };
    let file_name = sluice_lake::layout::merged_file_name();
    let output = CommittedFile {
        path: sluice_lake::layout::data_file(&target.stream, partition, &file_name),
        partition: partition.to_string(),
        num_rows: file.num_rows as u64,
        size_bytes: file.bytes.len() as u64,
        min_event_time_micros: file.min_event_time_micros,
        max_event_time_micros: file.max_event_time_micros,
    };
    lake.put(&output.path, file.bytes).await?;
    Ok((output, file.stats_json))
}
