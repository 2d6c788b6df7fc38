//! The job every store does: concurrent writers appending and each waiting until its frame is
//! durable, then a backlog drained oldest first in batches, each batch deleted durably.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use sluice_spool::{FullPolicy, Spool, SpoolConfig};
use tokio::sync::{mpsc, oneshot};

use crate::engines::{Engine, FjallEngine, RedbEngine, SqliteEngine};

/// Frames one group holds at most: the spool's own bound (`MAX_GROUP_FRAMES` in sluice-spool),
/// and the capacity of its queue, given to the other stores too.
const MAX_GROUP_FRAMES: usize = 4_096;
/// The edge gateway's default spool settings (`services/edge/src/config.rs`).
const SPOOL_MAX_BYTES: u64 = 8 * 1024 * 1024 * 1024;
const SPOOL_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
const SPOOL_SMALL_SEGMENT_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreKind {
    Spool,
    /// The spool with small segments, drained only: the spool reads a segment from its start
    /// up to the cursor on every batch, so this row tells that cost apart from the rest.
    SpoolSmallSegments,
    Redb,
    Fjall,
    Sqlite,
}

impl StoreKind {
    pub(crate) const ALL: [StoreKind; 4] =
        [StoreKind::Spool, StoreKind::Redb, StoreKind::Fjall, StoreKind::Sqlite];

    pub(crate) fn name(self) -> &'static str {
        match self {
            StoreKind::Spool => "sluice-spool",
            StoreKind::SpoolSmallSegments => "sluice-spool, 1 MiB segments (diagnostic)",
            StoreKind::Redb => "redb",
            StoreKind::Fjall => "fjall",
            StoreKind::Sqlite => "sqlite",
        }
    }
}

/// How appends reach a store's transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grouping {
    /// Every append queued while a commit runs goes into the next one: the spool's group commit,
    /// and a harness writer thread doing the same for the other stores.
    Grouped,
    /// One durable transaction per append, through the same writer thread.
    OnePerAppend,
}

/// A store opened for a measurement.
enum Subject {
    Spool(Spool),
    Engine {
        appends_tx: mpsc::Sender<PendingAppend>,
        writer: std::thread::JoinHandle<anyhow::Result<Box<dyn Engine>>>,
    },
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Spool(spool) => formatter.debug_tuple("Spool").field(spool).finish(),
            Subject::Engine { .. } => formatter.debug_struct("Engine").finish_non_exhaustive(),
        }
    }
}

/// An append waiting for the writer thread, and where its id goes once durable.
type PendingAppend = (Vec<u8>, oneshot::Sender<Result<u64, String>>);

/// What a writer task appends through.
#[derive(Debug, Clone)]
enum Appender {
    Spool(Spool),
    Engine(mpsc::Sender<PendingAppend>),
}

impl Appender {
    /// Appends `payload` and returns once it is durable.
    async fn append(&self, payload: Vec<u8>) -> anyhow::Result<u64> {
        match self {
            Appender::Spool(spool) => {
                Ok(spool.append(payload).await.context("failed to append to the spool")?.id)
            }
            Appender::Engine(appends_tx) => {
                let (answer_tx, answer_rx) = oneshot::channel();
                appends_tx.send((payload, answer_tx)).await.context("the writer thread stopped")?;
                answer_rx.await.context("the writer thread stopped")?.map_err(anyhow::Error::msg)
            }
        }
    }
}

/// Reads and deletes a store's backlog.
enum Drainer {
    Spool(Spool),
    Engine(Box<dyn Engine>),
}

impl Subject {
    fn open(kind: StoreKind, directory: &Path, grouping: Grouping) -> anyhow::Result<Self> {
        std::fs::create_dir_all(directory)
            .with_context(|| format!("failed to create {}", directory.display()))?;
        let engine: Box<dyn Engine> = match kind {
            StoreKind::Spool => return Self::open_spool(directory, grouping, SPOOL_SEGMENT_BYTES),
            StoreKind::SpoolSmallSegments => {
                return Self::open_spool(directory, grouping, SPOOL_SMALL_SEGMENT_BYTES);
            }
            StoreKind::Redb => Box::new(RedbEngine::open(directory)?),
            StoreKind::Fjall => Box::new(FjallEngine::open(directory)?),
            StoreKind::Sqlite => Box::new(SqliteEngine::open(directory)?),
        };
        let max_group_frames = match grouping {
            Grouping::Grouped => MAX_GROUP_FRAMES,
            Grouping::OnePerAppend => 1,
        };
        let (appends_tx, appends_rx) = mpsc::channel(MAX_GROUP_FRAMES);
        let writer = std::thread::Builder::new()
            .name(format!("{}-writer", kind.name()))
            .spawn(move || write_groups(engine, appends_rx, max_group_frames))
            .context("failed to start the writer thread")?;
        Ok(Subject::Engine { appends_tx, writer })
    }

    fn open_spool(directory: &Path, grouping: Grouping, segment_bytes: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(grouping == Grouping::Grouped, "the spool's group commit cannot be turned off");
        let spool = Spool::open(SpoolConfig {
            directory: directory.to_path_buf(),
            max_bytes: SPOOL_MAX_BYTES,
            segment_bytes,
            full_policy: FullPolicy::Refuse,
        })
        .context("failed to open the spool")?;
        Ok(Subject::Spool(spool))
    }

    fn appender(&self) -> Appender {
        match self {
            Subject::Spool(spool) => Appender::Spool(spool.clone()),
            Subject::Engine { appends_tx, .. } => Appender::Engine(appends_tx.clone()),
        }
    }

    /// Stops taking appends and hands the store over for draining.
    fn into_drainer(self) -> anyhow::Result<Drainer> {
        match self {
            Subject::Spool(spool) => Ok(Drainer::Spool(spool)),
            Subject::Engine { appends_tx, writer } => {
                drop(appends_tx);
                let engine = writer.join().map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
                Ok(Drainer::Engine(engine))
            }
        }
    }
}

/// The writer thread of the stores that have no group commit of their own: the spool's
/// `write_groups`, with a transaction where the spool writes and syncs its segment.
fn write_groups(
    mut engine: Box<dyn Engine>,
    mut appends_rx: mpsc::Receiver<PendingAppend>,
    max_group_frames: usize,
) -> anyhow::Result<Box<dyn Engine>> {
    // Each measurement opens a fresh directory, so ids start at zero.
    let mut next_id = 0u64;
    while let Some(first) = appends_rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < max_group_frames {
            match appends_rx.try_recv() {
                Ok(append) => group.push(append),
                Err(_) => break,
            }
        }
        let payloads: Vec<&[u8]> = group.iter().map(|(payload, _)| payload.as_slice()).collect();
        let committed = engine.commit_group(next_id, &payloads);
        drop(payloads);
        if let Err(error) = committed {
            let why = format!("{error:#}");
            for (_, answer_tx) in group {
                let _ = answer_tx.send(Err(why.clone()));
            }
            return Err(error);
        }
        let first_id = next_id;
        next_id += group.len() as u64;
        for ((_, answer_tx), id) in group.into_iter().zip(first_id..) {
            let _ = answer_tx.send(Ok(id));
        }
    }
    Ok(engine)
}

impl Drainer {
    fn oldest(&mut self, max_frames: usize) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
        match self {
            // What the gateway's forwarder asks for when it has no byte bound.
            Drainer::Spool(spool) => Ok(spool
                .unforwarded(max_frames, usize::MAX)
                .context("failed to read the spool")?
                .into_iter()
                .map(|frame| (frame.id, frame.payload))
                .collect()),
            Drainer::Engine(engine) => engine.oldest(max_frames),
        }
    }

    fn delete_below(&mut self, end_id: u64) -> anyhow::Result<()> {
        match self {
            Drainer::Spool(spool) => spool.ack_below(end_id).context("failed to move the spool's cursor"),
            Drainer::Engine(engine) => engine.delete_below(end_id),
        }
    }
}

/// One append measurement's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AppendCase {
    pub(crate) payload_bytes: usize,
    pub(crate) num_writers: usize,
    pub(crate) num_appends: usize,
    pub(crate) grouping: Grouping,
}

#[derive(Debug, Clone)]
pub(crate) struct AppendOutcome {
    pub(crate) elapsed: Duration,
    pub(crate) num_appends: usize,
    pub(crate) payload_bytes: usize,
    pub(crate) latency_p50: Duration,
    pub(crate) latency_p99: Duration,
}

impl AppendOutcome {
    pub(crate) fn appends_per_second(&self) -> f64 {
        self.num_appends as f64 / self.elapsed.as_secs_f64()
    }

    /// Payload megabytes (10^6 bytes) a second.
    pub(crate) fn megabytes_per_second(&self) -> f64 {
        self.appends_per_second() * self.payload_bytes as f64 / 1e6
    }
}

/// Opens `kind` in the empty `directory` and runs `case` against it.
pub(crate) fn measure_appends(
    runtime: &tokio::runtime::Runtime,
    kind: StoreKind,
    directory: &Path,
    case: AppendCase,
) -> anyhow::Result<AppendOutcome> {
    let subject = Subject::open(kind, directory, case.grouping)?;
    let payloads = Arc::new(payload_pool(case.payload_bytes));
    let written =
        runtime.block_on(run_writers(subject.appender(), case.num_writers, case.num_appends, payloads))?;
    check_ids(&written.ids, case.num_appends)?;
    // Joins the writer thread, so that a failure it kept to itself is seen.
    drop(subject.into_drainer()?);
    let mut latencies = written.latencies;
    latencies.sort_unstable();
    Ok(AppendOutcome {
        elapsed: written.elapsed,
        num_appends: case.num_appends,
        payload_bytes: case.payload_bytes,
        latency_p50: percentile(&latencies, 0.50),
        latency_p99: percentile(&latencies, 0.99),
    })
}

#[derive(Debug, Clone)]
pub(crate) struct DrainOutcome {
    pub(crate) backlog_frames: usize,
    pub(crate) backlog_payload_bytes: u64,
    pub(crate) fill_elapsed: Duration,
    pub(crate) disk_bytes_after_fill: u64,
    pub(crate) drain_elapsed: Duration,
    pub(crate) disk_bytes_after_drain: u64,
}

impl DrainOutcome {
    pub(crate) fn frames_per_second(&self) -> f64 {
        self.backlog_frames as f64 / self.drain_elapsed.as_secs_f64()
    }

    /// Bytes on disk for each payload byte held.
    pub(crate) fn space_amplification(&self) -> f64 {
        self.disk_bytes_after_fill as f64 / self.backlog_payload_bytes as f64
    }
}

/// Writers filling the backlog: enough that every group is as large as a store takes.
const FILL_WRITERS: usize = 1_024;

/// Fills `kind` in the empty `directory` with `backlog_frames` frames of `payload_bytes`, then
/// drains it oldest first, `batch_frames` at a time, each batch deleted durably.
pub(crate) fn measure_drain(
    runtime: &tokio::runtime::Runtime,
    kind: StoreKind,
    directory: &Path,
    backlog_frames: usize,
    payload_bytes: usize,
    batch_frames: usize,
) -> anyhow::Result<DrainOutcome> {
    let subject = Subject::open(kind, directory, Grouping::Grouped)?;
    let payloads = Arc::new(payload_pool(payload_bytes));
    let written =
        runtime.block_on(run_writers(subject.appender(), FILL_WRITERS, backlog_frames, payloads))?;
    check_ids(&written.ids, backlog_frames)?;
    let mut drainer = subject.into_drainer()?;
    let disk_bytes_after_fill = disk_bytes(directory)?;

    let started = Instant::now();
    let mut next_id = 0u64;
    loop {
        let frames = drainer.oldest(batch_frames)?;
        let Some(&(last_id, _)) = frames.last() else { break };
        for (id, payload) in &frames {
            anyhow::ensure!(*id == next_id, "{} gave frame {id} where {next_id} was next", kind.name());
            anyhow::ensure!(payload.len() == payload_bytes, "{} gave frame {id} back cut short", kind.name());
            next_id += 1;
        }
        drainer.delete_below(last_id + 1)?;
    }
    let drain_elapsed = started.elapsed();
    anyhow::ensure!(
        next_id == backlog_frames as u64,
        "{} gave back {next_id} frames of {backlog_frames}",
        kind.name()
    );
    let disk_bytes_after_drain = disk_bytes(directory)?;
    drop(drainer);
    Ok(DrainOutcome {
        backlog_frames,
        backlog_payload_bytes: (backlog_frames * payload_bytes) as u64,
        fill_elapsed: written.elapsed,
        disk_bytes_after_fill,
        drain_elapsed,
        disk_bytes_after_drain,
    })
}

#[derive(Debug)]
struct Written {
    elapsed: Duration,
    latencies: Vec<Duration>,
    ids: Vec<u64>,
}

/// `num_writers` tasks share `num_appends` appends; each waits for its append to be durable
/// before the next, as a device waits for its answer.
async fn run_writers(
    appender: Appender,
    num_writers: usize,
    num_appends: usize,
    payloads: Arc<Vec<Vec<u8>>>,
) -> anyhow::Result<Written> {
    let mut writers = tokio::task::JoinSet::new();
    let started = Instant::now();
    for writer_index in 0..num_writers {
        let num_own_appends =
            num_appends / num_writers + usize::from(writer_index < num_appends % num_writers);
        let appender = appender.clone();
        let payloads = Arc::clone(&payloads);
        writers.spawn(async move {
            let mut latencies = Vec::with_capacity(num_own_appends);
            let mut ids = Vec::with_capacity(num_own_appends);
            for append_index in 0..num_own_appends {
                let payload = payloads[(writer_index + append_index * num_writers) % payloads.len()].clone();
                let sent_at = Instant::now();
                ids.push(appender.append(payload).await?);
                latencies.push(sent_at.elapsed());
            }
            anyhow::Ok((latencies, ids))
        });
    }
    // The writer thread ends when the last appender goes.
    drop(appender);
    let mut latencies = Vec::with_capacity(num_appends);
    let mut ids = Vec::with_capacity(num_appends);
    while let Some(joined) = writers.join_next().await {
        let (own_latencies, own_ids) = joined.context("a writer task panicked")??;
        latencies.extend(own_latencies);
        ids.extend(own_ids);
    }
    Ok(Written { elapsed: started.elapsed(), latencies, ids })
}

/// Every append got its own id, and none went missing.
fn check_ids(ids: &[u64], num_appends: usize) -> anyhow::Result<()> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    let consecutive = sorted.iter().zip(0u64..).all(|(id, expected)| *id == expected);
    anyhow::ensure!(
        sorted.len() == num_appends && consecutive,
        "appends came back with ids other than 0..{num_appends}"
    );
    Ok(())
}

/// The value at `fraction` of `sorted` (nearest rank).
fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Distinct payloads of `num_bytes`, shaped like the spool's frames (Avro-encoded readings): a
/// stream name, device ids from a small set, increasing timestamps and noisy floats. A store
/// that compresses (fjall's blocks) gains about what it would on real frames, no more.
fn payload_pool(num_bytes: usize) -> Vec<Vec<u8>> {
    const NUM_PAYLOADS: u64 = 64;
    (1..=NUM_PAYLOADS).map(|seed| payload(num_bytes, seed)).collect()
}

fn payload(num_bytes: usize, seed: u64) -> Vec<u8> {
    // xorshift64*: no dependency for numbers that need only look random.
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut bytes = Vec::with_capacity(num_bytes + 64);
    bytes.extend_from_slice(b"\x0eclimate\x10");
    let mut timestamp_micros = 1_764_633_600_000_000u64 + next() % 1_000_000;
    while bytes.len() < num_bytes {
        bytes.extend_from_slice(format!("site-7/device-{:04}", next() % 200).as_bytes());
        timestamp_micros += next() % 5_000_000;
        // Avro's zig-zag varint.
        let mut varint = timestamp_micros << 1;
        while varint >= 0x80 {
            bytes.push((varint as u8) | 0x80);
            varint >>= 7;
        }
        bytes.push(varint as u8);
        for _ in 0..3 {
            let reading = 15.0 + (next() % 2_000) as f64 / 100.0;
            bytes.extend_from_slice(&reading.to_le_bytes());
        }
    }
    bytes.truncate(num_bytes);
    bytes
}

/// What `du` counts: allocated blocks, not file lengths, so preallocation and holes show.
pub(crate) fn disk_bytes(path: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let metadata =
        std::fs::symlink_metadata(path).with_context(|| format!("failed to stat {}", path.display()))?;
    let mut total = metadata.blocks() * 512;
    if metadata.is_dir() {
        for entry in std::fs::read_dir(path).with_context(|| format!("failed to list {}", path.display()))? {
            let entry = entry.with_context(|| format!("failed to list {}", path.display()))?;
            total += disk_bytes(&entry.path())?;
        }
    }
    Ok(total)
}
