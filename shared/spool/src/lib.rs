//! The edge gateway's durable spool (`sluice-edge`'s `spool`): readings a site accepted and has
//! not yet forwarded.
//!
//! A segmented append-only log. An appended record is a frame, `[len u32][crc32 u32][id u64]
//! [payload]` (little endian, the CRC over id and payload), in a segment file named after its
//! first frame's id. Appends queue for one writer thread, which writes every queued frame and
//! syncs once for all of them (group commit): an append returns only after its frame is on disk,
//! so a device is answered only for what survives a power cut, and many concurrent devices share
//! one `fdatasync`. Forwarding reads frames after a durable cursor (`cursor`, written to a
//! temporary file, synced, and renamed over the old one) and moves the cursor once central
//! ingest accepted them; segments wholly behind it are deleted.
//!
//! On open, a torn tail of the newest segment (a group whose sync never returned, so never
//! acknowledged) is cut off. A bad frame anywhere else is corruption of what was acknowledged:
//! the spool refuses to open and names the file, rather than forward around a hole.
//!
//! The spool is bounded by the bytes of its segment files. Full, it refuses new frames, or
//! drops its oldest segments when configured to, and says how many frames went.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

const FRAME_HEADER_BYTES: usize = 4 + 4 + 8;
const SEGMENT_SUFFIX: &str = ".seg";
const CURSOR_FILE: &str = "cursor";
const LOCK_FILE: &str = "lock";
const INCARNATION_FILE: &str = "incarnation";
const MACHINE_FILE: &str = "machine";
/// How long opening waits for another holder of the lock to let go.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// Frames the writer takes into one group at most, so that a flood does not hold every
/// waiting append's answer behind one huge write.
const MAX_GROUP_FRAMES: usize = 4_096;
/// Bytes read from a segment at a time: frames are read back in order, most of them small.
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// What happens to an append when the spool is at `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Refuse it: the device keeps the reading and sends it again later.
    Refuse,
    /// Delete the oldest segments to make room; their frames are lost, and counted.
    DropOldest,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub directory: PathBuf,
    /// Bytes of segment files at most.
    pub max_bytes: u64,
    /// A segment is closed and a new one begun past this size.
    pub segment_bytes: u64,
    pub full_policy: FullPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool is full ({used_bytes} of {max_bytes} bytes); nothing was written")]
    Full { used_bytes: u64, max_bytes: u64 },
    #[error("a frame of {bytes} bytes cannot fit in a spool of {max_bytes} bytes")]
    TooLarge { bytes: usize, max_bytes: u64 },
    #[error("spool I/O failed on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt at byte {offset}: {reason}; move it aside to start without it")]
    Corrupt { path: String, offset: u64, reason: String },
    #[error(
        "the spool stopped taking frames after a failed write or sync ({0}); what it acknowledged \
         before is safe, restart to recover"
    )]
    Broken(String),
    #[error("the spool in {path} is in use by another process (its lock file is held)")]
    Locked { path: String },
    #[error("the spool's writer stopped")]
    Closed,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io { path: path.display().to_string(), source }
}

/// A frame as read back for forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: u64,
    pub payload: Vec<u8>,
}

/// What an append did beyond writing its frame.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Appended {
    pub id: u64,
    /// Frames deleted to make room (drop-oldest).
    pub num_dropped_frames: u64,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    first_id: u64,
    /// One past the last frame's id.
    end_id: u64,
    bytes: u64,
}

#[derive(Debug)]
struct State {
    config: SpoolConfig,
    /// By first id.
    segments: BTreeMap<u64, Segment>,
    /// The newest segment, open for appending.
    active: Option<File>,
    next_id: u64,
    /// Every frame with an id below this was forwarded and accepted.
    acked_below: u64,
    used_bytes: u64,
    broken_opt: Option<String>,
    published: Arc<Published>,
    /// Where the last read for forwarding stopped: the next read starts there.
    read_hint_opt: Option<ReadHint>,
}

/// A segment's file, its first id, the id after its last frame, and its bytes written.
type SegmentExtent = (PathBuf, u64, u64, u64);

/// A frame's place in a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReadHint {
    segment_first_id: u64,
    frame_id: u64,
    offset: u64,
}

/// What the state says about size and health, readable without the state's lock: the writer
/// holds that lock through every fsync, which must not stall a request's readiness check.
#[derive(Debug, Default)]
struct Published {
    used_bytes: AtomicU64,
    unforwarded: AtomicU64,
    broken: OnceLock<String>,
}

/// An append waiting for the writer: its payload, and where its outcome goes.
type PendingAppend = (Vec<u8>, oneshot::Sender<Result<Appended, SpoolError>>);

/// The spool; clones share it.
#[derive(Debug, Clone)]
pub struct Spool {
    state: Arc<Mutex<State>>,
    appends: mpsc::Sender<PendingAppend>,
    published: Arc<Published>,
    incarnation: u64,
    /// Held locked while any clone lives: two processes appending to one spool would interleave
    /// frames and ids.
    _lock: Arc<File>,
}

impl Spool {
    /// Opens the spool in `config.directory` (created if missing), recovering what a crash left.
    pub fn open(config: SpoolConfig) -> Result<Self, SpoolError> {
        Self::open_on(config, machine_fingerprint())
    }

    /// [`Spool::open`] on the machine `machine_opt` names (its machine id's fingerprint).
    fn open_on(config: SpoolConfig, machine_opt: Option<u64>) -> Result<Self, SpoolError> {
        let directory = config.directory.clone();
        std::fs::create_dir_all(&directory).map_err(io_error(&directory))?;
        let lock_path = directory.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        // A spool closed in this process lets go of its lock once its writer thread ended:
        // give that a moment rather than refuse a reopen.
        let waited_since = Instant::now();
        loop {
            match lock_file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if waited_since.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(SpoolError::Locked { path: directory.display().to_string() });
                }
                Err(std::fs::TryLockError::Error(source)) => return Err(io_error(&lock_path)(source)),
            }
        }
        let acked_below = read_cursor(&directory)?;
        let incarnation = read_or_create_incarnation(&directory, machine_opt)?;
        let mut segments = BTreeMap::new();
        for entry in std::fs::read_dir(&directory).map_err(io_error(&directory))? {
            let path = entry.map_err(io_error(&directory))?.path();
            let Some(first_id) = path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(SEGMENT_SUFFIX))
                .and_then(|stem| stem.parse::<u64>().ok())
            else {
                continue;
            };
            segments.insert(first_id, Segment { path, first_id, end_id: first_id, bytes: 0 });
        }
        let newest_opt = segments.keys().next_back().copied();
        for segment in segments.values_mut() {
            let is_newest = Some(segment.first_id) == newest_opt;
            scan_segment(segment, is_newest)?;
        }
        // Forwarded segments a crash kept from being deleted.
        let forwarded: Vec<u64> = segments
            .values()
            .filter(|segment| segment.end_id <= acked_below)
            .map(|segment| segment.first_id)
            .collect();
        for first_id in forwarded {
            if let Some(segment) = segments.remove(&first_id) {
                std::fs::remove_file(&segment.path).map_err(io_error(&segment.path))?;
            }
        }
        let next_id =
            segments.values().map(|segment| segment.end_id).max().unwrap_or(acked_below).max(acked_below);
        let used_bytes = segments.values().map(|segment| segment.bytes).sum();
        let active = match segments.values().next_back() {
            Some(segment) if segment.bytes < config.segment_bytes => {
                Some(OpenOptions::new().append(true).open(&segment.path).map_err(io_error(&segment.path))?)
            }
            _ => None,
        };
        let state = Arc::new(Mutex::new(State {
            config,
            segments,
            active,
            next_id,
            acked_below,
            used_bytes,
            broken_opt: None,
            published: Arc::default(),
            read_hint_opt: None,
        }));
        let published = {
            let state = lock(&state);
            state.publish();
            Arc::clone(&state.published)
        };
        let (appends, queue) = mpsc::channel(MAX_GROUP_FRAMES);
        let writer_state = Arc::clone(&state);
        let lock_file = Arc::new(lock_file);
        // The writer keeps the lock too: it may still write appends queued before the last
        // handle went.
        let writer_lock = Arc::clone(&lock_file);
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                write_groups(&writer_state, queue);
                drop(writer_lock);
            })
            .map_err(io_error(&directory))?;
        Ok(Self { state, appends, published, incarnation, _lock: lock_file })
    }

    /// Appends `payload` and returns once it is synced to disk.
    pub async fn append(&self, payload: Vec<u8>) -> Result<Appended, SpoolError> {
        let (answer, answered) = oneshot::channel();
        self.appends.send((payload, answer)).await.map_err(|_| SpoolError::Closed)?;
        answered.await.map_err(|_| SpoolError::Closed)?
    }

    /// Up to `max_frames` frames (and about `max_bytes`, at least one frame) not yet forwarded,
    /// oldest first.
    pub fn unforwarded(&self, max_frames: usize, max_bytes: usize) -> Result<Vec<Frame>, SpoolError> {
        // The writer holds the lock from a group's write through its sync, so what is listed
        // here is synced; reading stops at the listed length, before any later group's bytes.
        // (path, first id, end id, bytes written) of each segment holding unforwarded frames
        let (acked_below, hint_opt, segments): (u64, Option<ReadHint>, Vec<SegmentExtent>) = {
            let state = lock(&self.state);
            let segments = state
                .segments
                .values()
                .filter(|segment| segment.end_id > state.acked_below)
                .map(|segment| (segment.path.clone(), segment.first_id, segment.end_id, segment.bytes))
                .collect();
            (state.acked_below, state.read_hint_opt, segments)
        };
        let mut frames: Vec<Frame> = Vec::new();
        let mut bytes = 0;
        let mut next_hint_opt = None;
        'segments: for (path, first_id, end_id, bytes_written) in segments {
            let Ok(mut file) = File::open(&path) else {
                // Dropped to make room since the list was taken.
                continue;
            };
            // Where the last read stopped, when that is at or before the first frame wanted:
            // without it every read would walk the segment from its start, and a drain of a
            // full segment would read it once per batch.
            let (start_id, start_offset) = match hint_opt {
                Some(hint)
                    if hint.segment_first_id == first_id && hint.frame_id <= acked_below.max(first_id) =>
                {
                    (hint.frame_id, hint.offset)
                }
                _ => (first_id, 0),
            };
            file.seek(SeekFrom::Start(start_offset)).map_err(io_error(&path))?;
            let buffered = BufReader::with_capacity(READ_BUFFER_BYTES, file);
            let mut reader = FrameReader::new(buffered, &path, start_id, start_offset, bytes_written);
            loop {
                let at = (reader.expected_id, reader.offset);
                let Some(frame) = reader.next_frame()? else { break };
                if frame.id >= end_id {
                    break;
                }
                if frame.id < acked_below {
                    continue;
                }
                if frames.len() >= max_frames
                    || (!frames.is_empty() && bytes + frame.payload.len() > max_bytes)
                {
                    next_hint_opt =
                        Some(ReadHint { segment_first_id: first_id, frame_id: at.0, offset: at.1 });
                    break 'segments;
                }
                bytes += frame.payload.len();
                frames.push(frame);
                next_hint_opt = Some(ReadHint {
                    segment_first_id: first_id,
                    frame_id: reader.expected_id,
                    offset: reader.offset,
                });
            }
        }
        if next_hint_opt.is_some() {
            lock(&self.state).read_hint_opt = next_hint_opt;
        }
        Ok(frames)
    }

    /// Records that every frame with an id below `end_id` was forwarded and accepted: durably,
    /// before the segments wholly behind it are deleted.
    pub fn ack_below(&self, end_id: u64) -> Result<(), SpoolError> {
        let mut state = lock(&self.state);
        if end_id <= state.acked_below {
            return Ok(());
        }
        let end_id = end_id.min(state.next_id);
        write_cursor(&state.config.directory, end_id)?;
        state.acked_below = end_id;
        let forwarded: Vec<u64> = state
            .segments
            .values()
            // The active segment stays: appends go on into it.
            .filter(|segment| segment.end_id <= end_id && segment.end_id < state.next_id)
            .map(|segment| segment.first_id)
            .collect();
        let removed = forwarded.into_iter().try_for_each(|first_id| state.remove_segment(first_id).map(drop));
        state.publish();
        removed
    }

    /// The random number this spool directory drew when it was first opened.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Why the spool stopped taking frames, once a write or sync failed.
    pub fn broken_reason(&self) -> Option<String> {
        self.published.broken.get().cloned()
    }

    /// Bytes of segment files, and frames not yet forwarded.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.published.used_bytes.load(Ordering::Relaxed),
            self.published.unforwarded.load(Ordering::Relaxed),
        )
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update leaves the state consistent before anything that can panic.
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl State {
    fn publish(&self) {
        self.published.used_bytes.store(self.used_bytes, Ordering::Relaxed);
        self.published.unforwarded.store(self.next_id.saturating_sub(self.acked_below), Ordering::Relaxed);
        if let Some(why) = &self.broken_opt {
            let _ = self.published.broken.set(why.clone());
        }
    }

    fn remove_segment(&mut self, first_id: u64) -> Result<u64, SpoolError> {
        let Some(segment) = self.segments.remove(&first_id) else { return Ok(0) };
        if self.segments.is_empty() {
            self.active = None;
        }
        std::fs::remove_file(&segment.path).map_err(io_error(&segment.path))?;
        self.used_bytes = self.used_bytes.saturating_sub(segment.bytes);
        Ok(segment.end_id - segment.first_id.max(self.acked_below).min(segment.end_id))
    }

    /// Makes room for `bytes` more, by the full policy; the frames dropped.
    fn make_room(&mut self, bytes: u64) -> Result<u64, SpoolError> {
        let max_bytes = self.config.max_bytes;
        if bytes > max_bytes {
            return Err(SpoolError::TooLarge { bytes: bytes as usize, max_bytes });
        }
        let mut num_dropped = 0;
        while self.used_bytes + bytes > max_bytes {
            let oldest_opt = self.segments.keys().next().copied();
            match (self.config.full_policy, oldest_opt) {
                (FullPolicy::DropOldest, Some(oldest)) => {
                    num_dropped += self.remove_segment(oldest)?;
                    self.acked_below =
                        self.acked_below.max(self.segments.keys().next().copied().unwrap_or(self.next_id));
                }
                _ => return Err(SpoolError::Full { used_bytes: self.used_bytes, max_bytes }),
            }
        }
        Ok(num_dropped)
    }

    /// Bytes already in the segment that pending frames will go to: the open one, or none when
    /// a new one will be begun for them.
    fn open_segment_bytes(&self) -> u64 {
        match self.segments.values().next_back() {
            Some(segment) if self.active.is_some() && segment.bytes < self.config.segment_bytes => {
                segment.bytes
            }
            _ => 0,
        }
    }

    /// The file frames from `start_id` on go to, beginning a segment named after it when there
    /// is none open or the open one is full.
    fn active_file(&mut self, start_id: u64) -> Result<(&mut File, u64), SpoolError> {
        let full = self
            .segments
            .values()
            .next_back()
            .is_none_or(|segment| segment.bytes >= self.config.segment_bytes);
        if self.active.is_none() || full {
            let first_id = start_id;
            let path = self.config.directory.join(format!("{first_id:020}{SEGMENT_SUFFIX}"));
            let file =
                OpenOptions::new().create_new(true).append(true).open(&path).map_err(io_error(&path))?;
            // The new name must survive a crash as surely as the frames in it.
            sync_directory(&self.config.directory)?;
            self.segments.insert(first_id, Segment { path, first_id, end_id: first_id, bytes: 0 });
            self.active = Some(file);
        }
        let first_id = *self.segments.keys().next_back().unwrap_or(&self.next_id);
        match self.active.as_mut() {
            Some(file) => Ok((file, first_id)),
            None => Err(SpoolError::Closed),
        }
    }
}

/// The writer thread: takes every queued append, writes them as one group, syncs once, answers.
fn write_groups(state: &Mutex<State>, mut queue: mpsc::Receiver<PendingAppend>) {
    while let Some(first) = queue.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP_FRAMES {
            match queue.try_recv() {
                Ok(append) => group.push(append),
                Err(_) => break,
            }
        }
        let mut state = lock(state);
        let answers = write_group(&mut state, &group);
        state.publish();
        drop(state);
        for ((_, answer), result) in group.into_iter().zip(answers) {
            let _ = answer.send(result);
        }
    }
}

fn write_group(state: &mut State, group: &[PendingAppend]) -> Vec<Result<Appended, SpoolError>> {
    if let Some(why) = &state.broken_opt {
        return group.iter().map(|_| Err(SpoolError::Broken(why.clone()))).collect();
    }
    let mut results: Vec<Option<Result<Appended, SpoolError>>> = Vec::with_capacity(group.len());
    let mut written: Vec<(usize, u64, u64)> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut pending_start_opt: Option<u64> = None;
    for (index, (payload, _)) in group.iter().enumerate() {
        let frame_bytes = (FRAME_HEADER_BYTES + payload.len()) as u64;
        let num_dropped = match state.make_room(frame_bytes + pending.len() as u64) {
            Ok(num_dropped) => num_dropped,
            Err(error) => {
                results.push(Some(Err(error)));
                continue;
            }
        };
        if pending_start_opt.is_some() {
            // A segment boundary: what is pending goes to the segment it began in.
            let rolls = state.open_segment_bytes() + pending.len() as u64 >= state.config.segment_bytes;
            if rolls && let Err(error) = flush_pending(state, &mut pending, &mut pending_start_opt) {
                return fail_group(state, group.len(), error);
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        if pending_start_opt.is_none() {
            pending_start_opt = Some(id);
        }
        encode_frame(&mut pending, id, payload);
        written.push((index, id, num_dropped));
        results.push(None);
    }
    if let Err(error) = flush_pending(state, &mut pending, &mut pending_start_opt) {
        return fail_group(state, group.len(), error);
    }
    if let Some(file) = state.active.as_ref()
        && let Err(source) = file.sync_data()
    {
        // After a failed sync the kernel may have dropped the dirty pages: nothing written
        // since the last good sync can be vouched for, now or later.
        return fail_group(state, group.len(), SpoolError::Broken(format!("fdatasync failed: {source}")));
    }
    for (index, id, num_dropped_frames) in written {
        results[index] = Some(Ok(Appended { id, num_dropped_frames }));
    }
    results.into_iter().map(|result| result.unwrap_or(Err(SpoolError::Closed))).collect()
}

fn fail_group(state: &mut State, num: usize, error: SpoolError) -> Vec<Result<Appended, SpoolError>> {
    let why = match error {
        SpoolError::Broken(why) => why,
        other => sluice_errors::chain_text(&other),
    };
    state.broken_opt = Some(why.clone());
    (0..num).map(|_| Err(SpoolError::Broken(why.clone()))).collect()
}

/// Writes the pending frames to the active segment; on failure the segment is cut back to where
/// it was, so that no partial frame stays behind an error.
fn flush_pending(
    state: &mut State,
    pending: &mut Vec<u8>,
    start_opt: &mut Option<u64>,
) -> Result<(), SpoolError> {
    let Some(start_id) = start_opt.take() else { return Ok(()) };
    let end_id = state.next_id;
    let (file, first_id) = state.active_file(start_id)?;
    let before = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
    if let Err(source) = file.write_all(pending) {
        let _ = file.set_len(before);
        pending.clear();
        return Err(SpoolError::Broken(format!("write failed: {source}")));
    }
    let bytes = pending.len() as u64;
    pending.clear();
    state.used_bytes += bytes;
    if let Some(segment) = state.segments.get_mut(&first_id) {
        segment.bytes += bytes;
        segment.end_id = end_id.max(start_id);
    }
    Ok(())
}

fn encode_frame(out: &mut Vec<u8>, id: u64, payload: &[u8]) {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&id.to_le_bytes());
    crc.update(payload);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Reads frames one after another, checking each.
struct FrameReader<'a, R> {
    reader: R,
    path: &'a Path,
    offset: u64,
    /// Where the frames to read end.
    limit: u64,
    expected_id: u64,
}

impl<'a, R: Read> FrameReader<'a, R> {
    /// Reads frames from `reader`, which is at byte `offset` of the segment at `path`, where the
    /// frame with id `expected_id` begins.
    fn new(reader: R, path: &'a Path, expected_id: u64, offset: u64, limit: u64) -> Self {
        Self { reader, path, offset, limit, expected_id }
    }

    /// The next frame, `None` at a clean end, or why the bytes here are not a frame.
    fn next_frame(&mut self) -> Result<Option<Frame>, SpoolError> {
        let corrupt = |offset: u64, reason: &str| SpoolError::Corrupt {
            path: self.path.display().to_string(),
            offset,
            reason: reason.to_string(),
        };
        if self.offset >= self.limit {
            return Ok(None);
        }
        let mut header = [0u8; FRAME_HEADER_BYTES];
        let num_read = read_full(&mut self.reader, &mut header).map_err(io_error(self.path))?;
        if num_read < FRAME_HEADER_BYTES || self.offset + FRAME_HEADER_BYTES as u64 > self.limit {
            return Err(corrupt(self.offset, "a frame header is cut short"));
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let mut id_bytes = [0u8; 8];
        id_bytes.copy_from_slice(&header[8..16]);
        let id = u64::from_le_bytes(id_bytes);
        let remaining = self.limit - self.offset - FRAME_HEADER_BYTES as u64;
        if len as u64 > remaining {
            return Err(corrupt(self.offset, "a frame is longer than what follows it"));
        }
        let mut payload = vec![0u8; len];
        if read_full(&mut self.reader, &mut payload).map_err(io_error(self.path))? < len {
            return Err(corrupt(self.offset, "a frame is cut short"));
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&id_bytes);
        hasher.update(&payload);
        if hasher.finalize() != crc {
            return Err(corrupt(self.offset, "a frame's checksum does not match"));
        }
        if id != self.expected_id {
            return Err(corrupt(self.offset, "frame ids are not consecutive"));
        }
        self.offset += (FRAME_HEADER_BYTES + len) as u64;
        self.expected_id += 1;
        Ok(Some(Frame { id, payload }))
    }
}

fn read_full(file: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(num_read) => filled += num_read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Reads a segment's frames to learn its ids and size. The newest segment may end in a torn
/// group (written, never synced, never acknowledged): it is cut back to its last whole frame.
fn scan_segment(segment: &mut Segment, is_newest: bool) -> Result<(), SpoolError> {
    let mut file =
        OpenOptions::new().read(true).write(true).open(&segment.path).map_err(io_error(&segment.path))?;
    let length = file.metadata().map_err(io_error(&segment.path))?.len();
    let mut reader = FrameReader::new(
        BufReader::with_capacity(READ_BUFFER_BYTES, &file),
        &segment.path,
        segment.first_id,
        0,
        length,
    );
    let mut good_end = 0;
    let mut end_id = segment.first_id;
    loop {
        match reader.next_frame() {
            Ok(Some(frame)) => {
                good_end = reader.offset;
                end_id = frame.id + 1;
            }
            Ok(None) => break,
            Err(SpoolError::Corrupt { .. }) if is_newest => {
                tracing::warn!(
                    path = %segment.path.display(),
                    offset = good_end,
                    "cutting off a torn tail of the spool: frames written but never acknowledged"
                );
                file.set_len(good_end).map_err(io_error(&segment.path))?;
                file.sync_all().map_err(io_error(&segment.path))?;
                break;
            }
            Err(error) => return Err(error),
        }
    }
    file.seek(SeekFrom::End(0)).map_err(io_error(&segment.path))?;
    segment.end_id = end_id;
    segment.bytes = good_end;
    Ok(())
}

fn read_cursor(directory: &Path) -> Result<u64, SpoolError> {
    Ok(read_checked(directory, CURSOR_FILE)?.unwrap_or(0))
}

/// A fingerprint (FNV-1a) of `/etc/machine-id`, which systemd draws once per installation;
/// none where there is no such file.
fn machine_fingerprint() -> Option<u64> {
    let machine_id = std::fs::read_to_string("/etc/machine-id").ok()?;
    let machine_id = machine_id.trim();
    if machine_id.is_empty() {
        return None;
    }
    Some(machine_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    }))
}

/// The spool's incarnation: a random number drawn when the spool directory first opened, so that
/// a spool that starts over (a new disk, a deleted directory) is told apart from the old one. A
/// directory opened on another machine than the one that drew it (a copied image, a restored
/// snapshot) draws again: its frame ids repeat ones the first machine may have forwarded.
fn read_or_create_incarnation(directory: &Path, machine_opt: Option<u64>) -> Result<u64, SpoolError> {
    let recorded_machine_opt = read_checked(directory, MACHINE_FILE)?;
    if let Some(incarnation) = read_checked(directory, INCARNATION_FILE)? {
        match (machine_opt, recorded_machine_opt) {
            (Some(machine), Some(recorded)) if machine != recorded => tracing::warn!(
                directory = %directory.display(),
                "the spool directory was made on another machine: a new incarnation, so that its frames are not taken for ones the other machine forwarded"
            ),
            (Some(machine), None) => {
                write_checked(directory, MACHINE_FILE, machine)?;
                return Ok(incarnation);
            }
            _ => return Ok(incarnation),
        }
    }
    if let Some(machine) = machine_opt {
        write_checked(directory, MACHINE_FILE, machine)?;
    }
    let mut hasher = std::hash::BuildHasher::build_hasher(&std::collections::hash_map::RandomState::new());
    std::hash::Hasher::write_u128(
        &mut hasher,
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    std::hash::Hasher::write_u32(&mut hasher, std::process::id());
    let incarnation = std::hash::Hasher::finish(&hasher);
    write_checked(directory, INCARNATION_FILE, incarnation)?;
    Ok(incarnation)
}

/// A CRC'd u64 in file `name`, or None when there is no such file.
fn read_checked(directory: &Path, name: &str) -> Result<Option<u64>, SpoolError> {
    let path = directory.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let corrupt = || SpoolError::Corrupt {
                path: path.display().to_string(),
                offset: 0,
                reason: format!("not a spool {name} file"),
            };
            let (value, check) = bytes.split_at_checked(8).ok_or_else(corrupt)?;
            let mut value_bytes = [0u8; 8];
            value_bytes.copy_from_slice(value);
            if check != crc32fast::hash(value).to_le_bytes() {
                return Err(corrupt());
            }
            Ok(Some(u64::from_le_bytes(value_bytes)))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SpoolError::Io { path: path.display().to_string(), source }),
    }
}

fn write_cursor(directory: &Path, acked_below: u64) -> Result<(), SpoolError> {
    write_checked(directory, CURSOR_FILE, acked_below)
}

/// Writes a CRC'd u64 to file `name` so that a crash leaves the old value or the new one.
fn write_checked(directory: &Path, name: &str, value: u64) -> Result<(), SpoolError> {
    let path = directory.join(name);
    let temporary = directory.join(format!("{name}.tmp"));
    let value = value.to_le_bytes();
    let mut bytes = value.to_vec();
    bytes.extend_from_slice(&crc32fast::hash(&value).to_le_bytes());
    let mut file = File::create(&temporary).map_err(io_error(&temporary))?;
    file.write_all(&bytes).map_err(io_error(&temporary))?;
    file.sync_all().map_err(io_error(&temporary))?;
    std::fs::rename(&temporary, &path).map_err(io_error(&path))?;
    sync_directory(directory)
}

fn sync_directory(directory: &Path) -> Result<(), SpoolError> {
    File::open(directory).and_then(|handle| handle.sync_all()).map_err(io_error(directory))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(directory: &Path, max_bytes: u64, segment_bytes: u64, full_policy: FullPolicy) -> SpoolConfig {
        SpoolConfig { directory: directory.to_path_buf(), max_bytes, segment_bytes, full_policy }
    }

    /// A refusing spool of `max_bytes` in `directory` with `num_frames` appended one at a time.
    async fn filled(directory: &Path, max_bytes: u64, segment_bytes: u64, num_frames: u64) -> Spool {
        let spool = Spool::open(config(directory, max_bytes, segment_bytes, FullPolicy::Refuse)).unwrap();
        for index in 0..num_frames {
            spool.append(payload(index)).await.unwrap();
        }
        spool
    }

    fn payload(index: u64) -> Vec<u8> {
        format!("reading-{index:06}").into_bytes()
    }

    fn segment_files(directory: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(directory)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "seg"))
            .collect();
        files.sort();
        files
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_come_back_in_order_across_segments_and_reopens() {
        let directory = tempfile::TempDir::new().unwrap();
        let spool = Spool::open(config(directory.path(), 1 << 20, 256, FullPolicy::Refuse)).unwrap();
        let mut tasks = Vec::new();
        for index in 0..200u64 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move { spool.append(payload(index)).await.unwrap().id }));
        }
        let mut ids = Vec::new();
        for task in tasks {
            ids.push(task.await.unwrap());
        }
        ids.sort();
        assert_eq!(ids, (0..200).collect::<Vec<_>>(), "every append got its own id");
        assert!(segment_files(directory.path()).len() > 5, "small segments roll");
        let spool_incarnation = spool.incarnation();
        let second = Spool::open(config(directory.path(), 1 << 20, 256, FullPolicy::Refuse));
        assert!(matches!(second, Err(SpoolError::Locked { .. })), "a second opener is refused");
        drop(spool);

        let reopened = Spool::open(config(directory.path(), 1 << 20, 256, FullPolicy::Refuse)).unwrap();
        let frames = reopened.unforwarded(1_000, usize::MAX).unwrap();
        assert_eq!(frames.iter().map(|frame| frame.id).collect::<Vec<_>>(), (0..200).collect::<Vec<_>>());
        // What each id holds is what was appended under it.
        let payloads: BTreeMap<u64, Vec<u8>> =
            frames.into_iter().map(|frame| (frame.id, frame.payload)).collect();
        let mut contents: Vec<Vec<u8>> = payloads.into_values().collect();
        contents.sort();
        assert_eq!(contents, (0..200).map(payload).collect::<Vec<_>>());
        assert_eq!(reopened.append(b"after".to_vec()).await.unwrap().id, 200);
        assert_eq!(
            reopened.incarnation(),
            spool_incarnation,
            "an incarnation lasts as long as its directory"
        );
        let other = tempfile::TempDir::new().unwrap();
        let fresh = Spool::open(config(other.path(), 1 << 20, 256, FullPolicy::Refuse)).unwrap();
        assert_ne!(fresh.incarnation(), spool_incarnation, "a new directory is a new incarnation");
        drop(reopened);
        let moved =
            Spool::open_on(config(directory.path(), 1 << 20, 256, FullPolicy::Refuse), Some(7)).unwrap();
        let moved_incarnation = moved.incarnation();
        drop(moved);
        let again =
            Spool::open_on(config(directory.path(), 1 << 20, 256, FullPolicy::Refuse), Some(7)).unwrap();
        assert_eq!(again.incarnation(), moved_incarnation, "the same machine keeps it");
        drop(again);
        let copied =
            Spool::open_on(config(directory.path(), 1 << 20, 256, FullPolicy::Refuse), Some(8)).unwrap();
        assert_ne!(copied.incarnation(), moved_incarnation, "another machine draws a new one");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_resume_where_the_last_stopped_and_start_over_when_it_is_past_the_cursor() {
        let directory = tempfile::TempDir::new().unwrap();
        let spool = filled(directory.path(), 1 << 20, 4_096, 300).await;
        let ids = |frames: Vec<Frame>| -> Vec<u64> {
            frames
                .into_iter()
                .map(|frame| {
                    assert_eq!(frame.payload, payload(frame.id), "frame {} holds its own payload", frame.id);
                    frame.id
                })
                .collect()
        };
        // Read, acknowledge, read on: each batch starts at the cursor, across segments.
        let mut acked = 0;
        let mut total = 300;
        while acked < total {
            let batch = ids(spool.unforwarded(7, usize::MAX).unwrap());
            let expected: Vec<u64> = (acked..(acked + 7).min(total)).collect();
            assert_eq!(batch, expected);
            // Appends in between do not move where the next read starts.
            if acked == 140 {
                spool.append(payload(300)).await.unwrap();
                total = 301;
            }
            acked = *batch.last().unwrap() + 1;
            spool.ack_below(acked).unwrap();
        }
        assert!(spool.unforwarded(7, usize::MAX).unwrap().is_empty());
        // Read again without an acknowledgement (a retry after a restart of the forwarder), and
        // a read that stops on bytes: the same frames from the cursor.
        for index in 301..320 {
            assert_eq!(spool.append(payload(index)).await.unwrap().id, index);
        }
        assert_eq!(ids(spool.unforwarded(5, usize::MAX).unwrap()), (301..306).collect::<Vec<_>>());
        assert_eq!(ids(spool.unforwarded(3, usize::MAX).unwrap()), (301..304).collect::<Vec<_>>());
        assert_eq!(ids(spool.unforwarded(100, 30).unwrap()), (301..303).collect::<Vec<_>>());
        spool.ack_below(303).unwrap();
        assert_eq!(ids(spool.unforwarded(100, usize::MAX).unwrap()), (303..320).collect::<Vec<_>>());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwarded_frames_stay_forwarded_and_their_segments_go() {
        let directory = tempfile::TempDir::new().unwrap();
        let spool = filled(directory.path(), 1 << 20, 200, 50).await;
        let batch = spool.unforwarded(20, usize::MAX).unwrap();
        assert_eq!(batch.len(), 20);
        let files_before = segment_files(directory.path()).len();
        spool.ack_below(batch.last().unwrap().id + 1).unwrap();
        assert!(segment_files(directory.path()).len() < files_before, "segments behind the cursor deleted");
        assert_eq!(spool.unforwarded(1, usize::MAX).unwrap()[0].id, 20);
        // Byte-bounded batches take at least one frame.
        assert_eq!(spool.unforwarded(100, 1).unwrap().len(), 1);
        drop(spool);
        let reopened = Spool::open(config(directory.path(), 1 << 20, 200, FullPolicy::Refuse)).unwrap();
        let rest = reopened.unforwarded(1_000, usize::MAX).unwrap();
        assert_eq!(rest.first().map(|frame| frame.id), Some(20));
        assert_eq!(rest.len(), 30);
        assert_eq!(reopened.usage().1, 30);
        // Everything forwarded: the spool is empty but ids go on.
        reopened.ack_below(50).unwrap();
        assert!(reopened.unforwarded(10, usize::MAX).unwrap().is_empty());
        assert_eq!(reopened.append(b"next".to_vec()).await.unwrap().id, 50);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_torn_tail_is_cut_at_every_byte_and_what_came_before_survives() {
        let directory = tempfile::TempDir::new().unwrap();
        let spool = filled(directory.path(), 1 << 20, 1 << 20, 3).await;
        drop(spool);
        let file = segment_files(directory.path()).pop().unwrap();
        let whole = std::fs::read(&file).unwrap();
        let frame_bytes = whole.len() / 3;
        for cut in 1..frame_bytes {
            // The third frame written in part, as a crash during its write leaves it.
            std::fs::write(&file, &whole[..2 * frame_bytes + cut]).unwrap();
            let reopened =
                Spool::open(config(directory.path(), 1 << 20, 1 << 20, FullPolicy::Refuse)).unwrap();
            let ids: Vec<u64> =
                reopened.unforwarded(10, usize::MAX).unwrap().iter().map(|frame| frame.id).collect();
            assert_eq!(ids, [0, 1], "cut at {cut}");
            assert_eq!(std::fs::metadata(&file).unwrap().len() as usize, 2 * frame_bytes);
        }
        // A flipped bit in the last frame is a torn tail too; in a sealed segment it is corruption.
        let mut flipped = whole.clone();
        flipped[whole.len() - 1] ^= 1;
        std::fs::write(&file, &flipped).unwrap();
        let reopened = Spool::open(config(directory.path(), 1 << 20, 1 << 20, FullPolicy::Refuse)).unwrap();
        assert_eq!(reopened.unforwarded(10, usize::MAX).unwrap().len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corruption_before_the_newest_segment_refuses_to_open_and_names_the_file() {
        let directory = tempfile::TempDir::new().unwrap();
        let spool = filled(directory.path(), 1 << 20, 60, 10).await;
        drop(spool);
        let first = segment_files(directory.path()).remove(0);
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[FRAME_HEADER_BYTES] ^= 0x20;
        std::fs::write(&first, &bytes).unwrap();
        let error = Spool::open(config(directory.path(), 1 << 20, 60, FullPolicy::Refuse)).unwrap_err();
        assert!(matches!(&error, SpoolError::Corrupt { path, .. } if path.ends_with(".seg")), "{error}");
        assert!(error.to_string().contains("checksum"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_spool_refuses_or_drops_its_oldest_and_counts_them() {
        let directory = tempfile::TempDir::new().unwrap();
        let frame = (FRAME_HEADER_BYTES + payload(0).len()) as u64;
        // Room for exactly ten frames, two per segment.
        let refusing = filled(directory.path(), 10 * frame, 2 * frame, 10).await;
        let error = refusing.append(payload(10)).await.unwrap_err();
        assert!(matches!(error, SpoolError::Full { .. }), "{error}");
        assert_eq!(refusing.usage(), (10 * frame, 10));
        // Forwarding makes room again.
        refusing.ack_below(2).unwrap();
        refusing.append(payload(10)).await.unwrap();
        let too_large = refusing.append(vec![0; 11 * frame as usize]).await.unwrap_err();
        assert!(matches!(too_large, SpoolError::TooLarge { .. }), "{too_large}");
        drop(refusing);

        let directory = tempfile::TempDir::new().unwrap();
        let dropping =
            Spool::open(config(directory.path(), 10 * frame, 2 * frame, FullPolicy::DropOldest)).unwrap();
        let mut num_dropped = 0;
        for index in 0..14 {
            num_dropped += dropping.append(payload(index)).await.unwrap().num_dropped_frames;
        }
        let kept: Vec<u64> =
            dropping.unforwarded(100, usize::MAX).unwrap().iter().map(|frame| frame.id).collect();
        assert_eq!(num_dropped, 4, "whole segments of two frames went");
        assert_eq!(kept, (4..14).collect::<Vec<_>>());
        assert!(dropping.usage().0 <= 10 * frame);
    }
}
