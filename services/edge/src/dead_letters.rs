//! The gateway's dead letters: MQTT messages that failed validation. Central ingest writes them
//! to a Kafka topic; the gateway has none, so it keeps them in a local NDJSON log beside the
//! spool (`dead-letters.ndjson`), one object per message with the payload in hex, synced before
//! the message is acknowledged. The log is bounded: past half of
//! `spool.max_dead_letter_bytes` the file becomes `dead-letters.1.ndjson` (replacing the one
//! before) and a new one begins, so that a device sending garbage cannot fill the disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::json;
use sluice_device_api::{DeadLetter, DeadLetterWritten, SinkError};

pub const CURRENT_FILE: &str = "dead-letters.ndjson";
pub const PREVIOUS_FILE: &str = "dead-letters.1.ndjson";

#[derive(Debug)]
pub(crate) struct DeadLetterLog {
    directory: PathBuf,
    /// Bytes one file may reach before it is rotated.
    max_file_bytes: u64,
    /// The payload bytes a dead letter keeps.
    payload_limit: usize,
    /// The current file and its size; none after a rotation whose new file failed to open
    /// (the next append tries again).
    file: Mutex<Option<(File, u64)>>,
}

impl DeadLetterLog {
    pub(crate) fn open(directory: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = open_current(directory)?;
        let bytes = file.metadata()?.len();
        sync_directory(directory)?;
        let max_file_bytes = (max_bytes / 2).max(1);
        // Hex doubles the payload, and the reason and source come beside it.
        let payload_limit = usize::try_from(max_file_bytes / 4).unwrap_or(usize::MAX).min(64 * 1024);
        Ok(Self {
            directory: directory.to_path_buf(),
            max_file_bytes,
            payload_limit,
            file: Mutex::new(Some((file, bytes))),
        })
    }

    pub(crate) fn payload_limit(&self) -> usize {
        self.payload_limit
    }

    /// One dead letter as its log line, and whether its payload had to be cut.
    pub(crate) fn line(
        &self,
        stream: &str,
        received_at_micros: i64,
        letter: &DeadLetter<'_>,
    ) -> (String, DeadLetterWritten) {
        let kept = &letter.payload[..letter.payload.len().min(self.payload_limit)];
        let original_size = letter.original_size_opt.unwrap_or(letter.payload.len());
        let mut line = json!({
            "received_at_micros": received_at_micros,
            "stream": stream,
            "key": cut(letter.key, 1024),
            "reason": cut(letter.reason, 4096),
            "source": cut(letter.source, 1024),
            "original_size": original_size,
            "payload_hex": hex::encode(kept),
        })
        .to_string();
        line.push('\n');
        let written =
            if kept.len() < original_size { DeadLetterWritten::Truncated } else { DeadLetterWritten::Whole };
        (line, written)
    }

    /// Appends and syncs one line: blocking file I/O, so called off the async threads.
    pub(crate) fn append(&self, line: &str) -> Result<(), SinkError> {
        let failed = |error: std::io::Error| SinkError::Unavailable {
            message: format!(
                "failed to write the dead-letter log in {}: {error}; not acknowledged",
                self.directory.display()
            ),
        };
        let mut guard = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard
            .as_ref()
            .is_some_and(|(_, bytes)| *bytes > 0 && bytes + line.len() as u64 > self.max_file_bytes)
        {
            *guard = None;
            std::fs::rename(self.directory.join(CURRENT_FILE), self.directory.join(PREVIOUS_FILE))
                .map_err(failed)?;
        }
        if guard.is_none() {
            let file = open_current(&self.directory).map_err(failed)?;
            let bytes = file.metadata().map_err(failed)?.len();
            // The new name, and the old one's rename, must survive a power cut with the letter.
            sync_directory(&self.directory).map_err(failed)?;
            *guard = Some((file, bytes));
        }
        let Some((file, bytes)) = guard.as_mut() else {
            return Err(failed(std::io::ErrorKind::NotFound.into()));
        };
        file.write_all(line.as_bytes()).and_then(|()| file.sync_data()).map_err(failed)?;
        *bytes += line.len() as u64;
        Ok(())
    }
}

fn sync_directory(directory: &Path) -> std::io::Result<()> {
    File::open(directory)?.sync_all()
}

fn open_current(directory: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(directory.join(CURRENT_FILE))
}

fn cut(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(payload: &[u8]) -> DeadLetter<'_> {
        DeadLetter { key: "sensor-1", payload, original_size_opt: None, reason: "not JSON", source: "mqtt:x" }
    }

    fn write(
        log: &DeadLetterLog,
        stream: &str,
        at: i64,
        letter: &DeadLetter<'_>,
    ) -> Result<DeadLetterWritten, SinkError> {
        let (line, written) = log.line(stream, at, letter);
        log.append(&line).map(|()| written)
    }

    #[test]
    fn the_log_keeps_each_letter_and_stays_within_its_bound() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let log = DeadLetterLog::open(directory.path(), 4_000).expect("opens");
        assert_eq!(write(&log, "telemetry", 7, &letter(b"{oops")), Ok(DeadLetterWritten::Whole));
        let text = std::fs::read_to_string(directory.path().join(CURRENT_FILE)).expect("written");
        let value: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON object");
        assert_eq!(value["payload_hex"], hex::encode(b"{oops"));
        assert_eq!(value["reason"], "not JSON");
        let big = vec![b'x'; 5_000];
        assert_eq!(write(&log, "telemetry", 8, &letter(&big)), Ok(DeadLetterWritten::Truncated));
        for index in 0..100 {
            write(&log, "telemetry", index, &letter(b"{}")).expect("written");
        }
        let size = |name: &str| std::fs::metadata(directory.path().join(name)).map(|m| m.len()).unwrap_or(0);
        assert!(size(CURRENT_FILE) <= 2_000, "current file {} bytes", size(CURRENT_FILE));
        assert!(size(PREVIOUS_FILE) <= 2_000, "previous file {} bytes", size(PREVIOUS_FILE));
        assert!(size(PREVIOUS_FILE) > 0, "rotated");
    }
}
