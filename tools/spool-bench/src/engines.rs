//! The embedded stores, each doing the spool's job at its most durable setting: a group of
//! frames goes in as one transaction that is on disk when `commit_group` returns, the oldest
//! frames are read in id order, and a forwarded prefix is deleted as one durable transaction.

use std::path::Path;

use anyhow::Context;
use redb::ReadableDatabase as _;

/// A store as the harness drives it, from one thread at a time.
pub(crate) trait Engine: Send {
    /// Writes frames `first_id`, `first_id + 1`, ... as one transaction, durable on return.
    fn commit_group(&mut self, first_id: u64, payloads: &[&[u8]]) -> anyhow::Result<()>;

    /// Up to `max_frames` of the oldest frames, by id.
    fn oldest(&mut self, max_frames: usize) -> anyhow::Result<Vec<(u64, Vec<u8>)>>;

    /// Deletes every frame with an id below `end_id` as one transaction, durable on return.
    fn delete_below(&mut self, end_id: u64) -> anyhow::Result<()>;
}

const REDB_FRAMES: redb::TableDefinition<'static, u64, &'static [u8]> = redb::TableDefinition::new("frames");

/// redb: a copy-on-write B-tree in one file.
pub(crate) struct RedbEngine {
    database: redb::Database,
}

impl std::fmt::Debug for RedbEngine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("RedbEngine").finish_non_exhaustive()
    }
}

impl RedbEngine {
    pub(crate) fn open(directory: &Path) -> anyhow::Result<Self> {
        let path = directory.join("spool.redb");
        let database = redb::Database::create(&path)
            .with_context(|| format!("failed to create redb database {}", path.display()))?;
        let engine = Self { database };
        // The table exists from here on, so that a read before the first append finds it.
        let transaction = engine.begin_durable_write()?;
        transaction.open_table(REDB_FRAMES).context("failed to create the redb table")?;
        transaction.commit().context("failed to commit the redb table")?;
        Ok(engine)
    }

    fn begin_durable_write(&self) -> anyhow::Result<redb::WriteTransaction> {
        let mut transaction =
            self.database.begin_write().context("failed to begin a redb write transaction")?;
        // The default already, stated so that a change of default cannot weaken the comparison.
        // One-phase commit (redb's default) is what redb recommends short of a hostile writer:
        // its commit slots are checksummed.
        transaction
            .set_durability(redb::Durability::Immediate)
            .context("failed to ask redb for immediate durability")?;
        Ok(transaction)
    }
}

impl Engine for RedbEngine {
    fn commit_group(&mut self, first_id: u64, payloads: &[&[u8]]) -> anyhow::Result<()> {
        let transaction = self.begin_durable_write()?;
        {
            // redb orders u64 keys by value: the order big-endian bytes give a byte-ordered store,
            // without a variable-length key.
            let mut table = transaction.open_table(REDB_FRAMES).context("failed to open the redb table")?;
            for (id, payload) in (first_id..).zip(payloads) {
                table.insert(id, *payload).context("failed to insert into redb")?;
            }
        }
        transaction.commit().context("failed to commit a redb group")
    }

    fn oldest(&mut self, max_frames: usize) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
        let transaction = self.database.begin_read().context("failed to begin a redb read transaction")?;
        let table = transaction.open_table(REDB_FRAMES).context("failed to open the redb table")?;
        let mut frames = Vec::with_capacity(max_frames);
        for entry in table.range::<u64>(..).context("failed to scan redb")?.take(max_frames) {
            let (id, payload) = entry.context("failed to read a redb entry")?;
            frames.push((id.value(), payload.value().to_vec()));
        }
        Ok(frames)
    }

    fn delete_below(&mut self, end_id: u64) -> anyhow::Result<()> {
        let transaction = self.begin_durable_write()?;
        {
            let mut table = transaction.open_table(REDB_FRAMES).context("failed to open the redb table")?;
            table.retain_in(..end_id, |_, _| false).context("failed to delete a redb range")?;
        }
        transaction.commit().context("failed to commit a redb delete")
    }
}

/// fjall: an LSM tree with a write-ahead journal.
pub(crate) struct FjallEngine {
    database: fjall::Database,
    frames: fjall::Keyspace,
    /// Every id below this was deleted. An LSM tree keeps deleted keys as tombstones until
    /// compaction, so a scan from the start would step over every one of them; a forwarder
    /// keeps its place instead (after a restart it would scan from the start once).
    deleted_below: u64,
}

impl std::fmt::Debug for FjallEngine {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("FjallEngine")
            .field("deleted_below", &self.deleted_below)
            .finish_non_exhaustive()
    }
}

impl FjallEngine {
    pub(crate) fn open(directory: &Path) -> anyhow::Result<Self> {
        let database = fjall::Database::builder(directory)
            .open()
            .with_context(|| format!("failed to open fjall database {}", directory.display()))?;
        let frames = database
            .keyspace("frames", fjall::KeyspaceCreateOptions::default)
            .context("failed to open the fjall keyspace")?;
        Ok(Self { database, frames, deleted_below: 0 })
    }

    fn durable_batch(&self) -> fjall::OwnedWriteBatch {
        // fdatasync of the journal after the batch: what the spool does after a group.
        self.database.batch().durability(Some(fjall::PersistMode::SyncData))
    }
}

impl Engine for FjallEngine {
    fn commit_group(&mut self, first_id: u64, payloads: &[&[u8]]) -> anyhow::Result<()> {
        let mut batch = self.durable_batch();
        for (id, payload) in (first_id..).zip(payloads) {
            batch.insert(&self.frames, id.to_be_bytes(), *payload);
        }
        batch.commit().context("failed to commit a fjall group")
    }

    fn oldest(&mut self, max_frames: usize) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
        let mut frames = Vec::with_capacity(max_frames);
        for entry in self.frames.range(self.deleted_below.to_be_bytes()..).take(max_frames) {
            let (key, payload) = entry.into_inner().context("failed to read a fjall entry")?;
            let id_bytes: [u8; 8] =
                key.as_ref().try_into().context("a fjall key is not the 8 bytes of an id")?;
            frames.push((u64::from_be_bytes(id_bytes), payload.to_vec()));
        }
        Ok(frames)
    }

    fn delete_below(&mut self, end_id: u64) -> anyhow::Result<()> {
        // fjall has no range delete: a tombstone per frame, all in one durable batch.
        let mut batch = self.durable_batch();
        for id in self.deleted_below..end_id {
            batch.remove(&self.frames, id.to_be_bytes());
        }
        batch.commit().context("failed to commit a fjall delete")?;
        self.deleted_below = self.deleted_below.max(end_id);
        Ok(())
    }
}

/// SQLite through rusqlite: a B-tree with a write-ahead log.
#[derive(Debug)]
pub(crate) struct SqliteEngine {
    connection: rusqlite::Connection,
}

const SQLITE_INSERT: &str = "INSERT INTO frames (id, payload) VALUES (?1, ?2)";
const SQLITE_OLDEST: &str = "SELECT id, payload FROM frames ORDER BY id LIMIT ?1";
const SQLITE_DELETE: &str = "DELETE FROM frames WHERE id < ?1";

impl SqliteEngine {
    pub(crate) fn open(directory: &Path) -> anyhow::Result<Self> {
        let path = directory.join("spool.sqlite");
        let connection = rusqlite::Connection::open(&path)
            .with_context(|| format!("failed to open SQLite database {}", path.display()))?;
        let journal_mode: String = connection
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .context("failed to turn on SQLite's write-ahead log")?;
        anyhow::ensure!(journal_mode.eq_ignore_ascii_case("wal"), "SQLite kept journal_mode {journal_mode}");
        // FULL syncs the log at every commit; WAL's NORMAL would not, and can lose the last
        // commits at a power cut.
        connection.pragma_update(None, "synchronous", "FULL").context("failed to set synchronous=FULL")?;
        let synchronous: i64 = connection
            .query_row("PRAGMA synchronous", [], |row| row.get(0))
            .context("failed to read back synchronous")?;
        anyhow::ensure!(synchronous == 2, "SQLite kept synchronous={synchronous}, not FULL (2)");
        connection
            .execute_batch("CREATE TABLE frames (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
            .context("failed to create the SQLite table")?;
        Ok(Self { connection })
    }
}

impl Engine for SqliteEngine {
    fn commit_group(&mut self, first_id: u64, payloads: &[&[u8]]) -> anyhow::Result<()> {
        let transaction = self.connection.transaction().context("failed to begin a SQLite transaction")?;
        {
            let mut insert =
                transaction.prepare_cached(SQLITE_INSERT).context("failed to prepare the insert")?;
            for (id, payload) in (first_id..).zip(payloads) {
                let id = i64::try_from(id).context("an id past SQLite's integer range")?;
                insert.execute(rusqlite::params![id, payload]).context("failed to insert into SQLite")?;
            }
        }
        transaction.commit().context("failed to commit a SQLite group")
    }

    fn oldest(&mut self, max_frames: usize) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
        let mut select =
            self.connection.prepare_cached(SQLITE_OLDEST).context("failed to prepare the select")?;
        let limit = i64::try_from(max_frames).context("a batch past SQLite's integer range")?;
        let rows = select
            .query_map([limit], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)))
            .context("failed to select from SQLite")?;
        let mut frames = Vec::with_capacity(max_frames);
        for row in rows {
            let (id, payload) = row.context("failed to read a SQLite row")?;
            frames.push((u64::try_from(id).context("a negative id in SQLite")?, payload));
        }
        Ok(frames)
    }

    fn delete_below(&mut self, end_id: u64) -> anyhow::Result<()> {
        let end_id = i64::try_from(end_id).context("an id past SQLite's integer range")?;
        // Outside an explicit transaction the statement is its own, synced at commit.
        let mut delete =
            self.connection.prepare_cached(SQLITE_DELETE).context("failed to prepare the delete")?;
        delete.execute([end_id]).context("failed to delete from SQLite")?;
        Ok(())
    }
}
