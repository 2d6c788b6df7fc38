//! The flush workers: `flush.workers` threads (one per core by default) that encode, upload and
//! commit the flushes the consumer loop hands them, so that the loop goes on polling and decoding
//! meanwhile. The loop keeps every piece of partition state: it hands off at most one flush per
//! Kafka partition at a time, receives the answers here and applies them itself. Flushes in
//! flight hold their rows until they answer, so handing off waits while they hold all of
//! `flush.max_buffered_bytes`.
//!
//! The file passes 500 lines only with its tests, which run the pool on real threads.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SendError, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use sluice_lake::CommitRecord;

use crate::buffer::HandedOff;
use crate::consumer::StreamInfo;
use crate::flush_policy::FlushPolicy;

/// How long one wait for an answer lasts before the waiting loop looks at its condition again.
pub(crate) const OUTCOME_WAIT: Duration = Duration::from_millis(100);

/// One Kafka partition's share of a flush.
pub(crate) struct FlushPart {
    pub(crate) key: (String, i32),
    pub(crate) taken: HandedOff,
}

/// Flushes of partitions of one stream that one worker encodes and uploads, then commits in one
/// Delta commit.
pub(crate) struct FlushJob {
    /// Names the hand-off; each partition's buffer remembers it until the answer comes.
    pub(crate) flush_id: u64,
    pub(crate) stream: Arc<StreamInfo>,
    pub(crate) parts: Vec<FlushPart>,
}

impl FlushJob {
    fn num_value_bytes(&self) -> usize {
        self.parts.iter().map(|part| part.taken.num_value_bytes).sum()
    }

    fn keys(&self) -> Vec<(String, i32)> {
        self.parts.iter().map(|part| part.key.clone()).collect()
    }
}

/// What became of one partition's flush.
#[derive(Debug)]
pub(crate) enum PartResult {
    /// In the table from version `table_version` on. Boxed: a commit record is large next to
    /// the other answers.
    Committed { record: Box<CommitRecord>, table_version: i64, elapsed: Duration },
    /// Another writer moved the partition's position first; the flush's files are deleted.
    Stale,
    /// Encoding, upload or commit failed, or the commit's outcome is unknown: the table's
    /// position says what holds.
    Failed,
}

#[derive(Debug)]
pub(crate) struct PartOutcome {
    pub(crate) key: (String, i32),
    pub(crate) result: PartResult,
}

/// A worker's answer to a [`FlushJob`].
#[derive(Debug)]
pub(crate) struct FlushOutcome {
    pub(crate) flush_id: u64,
    pub(crate) stream: String,
    pub(crate) parts: Vec<PartOutcome>,
    /// The job panicked: a bug, which stops the loop. Its partitions count as failed.
    pub(crate) panic_message_opt: Option<String>,
}

impl FlushOutcome {
    /// The answer to a job that did not run to its end: every partition reads its range again.
    fn failed(flush_id: u64, stream: String, keys: Vec<(String, i32)>, panic_message: String) -> Self {
        let parts = keys.into_iter().map(|key| PartOutcome { key, result: PartResult::Failed }).collect();
        Self { flush_id, stream, parts, panic_message_opt: Some(panic_message) }
    }
}

/// How many flushes were handed off and not finished by a worker, shared with the rebalance
/// callback: a revoke waits for them, so that the partitions' next owners read positions that
/// include their commits.
#[derive(Debug, Clone, Default)]
pub(crate) struct FlushesInFlight(Arc<InFlightCount>);

#[derive(Debug, Default)]
struct InFlightCount {
    num_flushes: Mutex<usize>,
    none_left: Condvar,
}

impl FlushesInFlight {
    fn started(&self) {
        *self.0.num_flushes.lock().unwrap_or_else(PoisonError::into_inner) += 1;
    }

    fn finished(&self) {
        let mut num_flushes = self.0.num_flushes.lock().unwrap_or_else(PoisonError::into_inner);
        *num_flushes = num_flushes.saturating_sub(1);
        if *num_flushes == 0 {
            self.0.none_left.notify_all();
        }
    }

    /// Waits until every flush handed off has finished, at most `limit`; false if some had not.
    pub(crate) fn wait_until_none(&self, limit: Duration) -> bool {
        let guard = self.0.num_flushes.lock().unwrap_or_else(PoisonError::into_inner);
        let (num_flushes, _) = self
            .0
            .none_left
            .wait_timeout_while(guard, limit, |num_left| *num_left > 0)
            .unwrap_or_else(PoisonError::into_inner);
        *num_flushes == 0
    }
}

/// The workers and what the loop knows of the flushes it handed them. Used from the loop's
/// thread only.
pub(crate) struct FlushPool {
    jobs_tx: Sender<FlushJob>,
    outcomes_rx: Receiver<FlushOutcome>,
    workers: Vec<JoinHandle<()>>,
    policy: FlushPolicy,
    in_flight: FlushesInFlight,
    last_flush_id: u64,
    /// Value bytes of each flush handed off whose answer was not received yet.
    bytes_in_flight: HashMap<u64, usize>,
    num_in_flight_bytes: usize,
    /// Answers received while waiting for room, not applied by the loop yet.
    received: VecDeque<FlushOutcome>,
    panic_message_opt: Option<String>,
}

impl FlushPool {
    /// Starts `num_workers` threads (at least one), each running `run_flush` on the jobs it
    /// takes.
    pub(crate) fn start<F>(
        num_workers: usize,
        policy: FlushPolicy,
        in_flight: FlushesInFlight,
        run_flush: F,
    ) -> std::io::Result<Self>
    where
        F: Fn(FlushJob) -> FlushOutcome + Send + Sync + 'static,
    {
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<FlushJob>();
        let (outcomes_tx, outcomes_rx) = std::sync::mpsc::channel::<FlushOutcome>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let flush_runner = Arc::new(run_flush);
        let mut workers = Vec::with_capacity(num_workers.max(1));
        for index in 0..num_workers.max(1) {
            let worker = Worker {
                jobs_rx: Arc::clone(&jobs_rx),
                outcomes_tx: outcomes_tx.clone(),
                run_flush: Arc::clone(&flush_runner),
                in_flight: in_flight.clone(),
            };
            // On an error the workers started so far end with the dropped jobs channel.
            workers.push(
                std::thread::Builder::new()
                    .name(format!("sluice-flush-{index}"))
                    .spawn(move || worker.run())?,
            );
        }
        Ok(Self {
            jobs_tx,
            outcomes_rx,
            workers,
            policy,
            in_flight,
            last_flush_id: 0,
            bytes_in_flight: HashMap::new(),
            num_in_flight_bytes: 0,
            received: VecDeque::new(),
            panic_message_opt: None,
        })
    }

    pub(crate) fn num_workers(&self) -> usize {
        self.workers.len()
    }

    /// A new id for a hand-off; ids are never reused, so an answer matches one flush only.
    pub(crate) fn next_flush_id(&mut self) -> u64 {
        self.last_flush_id += 1;
        self.last_flush_id
    }

    /// Value bytes the flushes handed off still hold: part of `flush.max_buffered_bytes`.
    pub(crate) fn num_in_flight_bytes(&self) -> usize {
        self.num_in_flight_bytes
    }

    /// Whether a flush handed off has not answered yet (or its answer was not received).
    pub(crate) fn has_flushes_in_flight(&self) -> bool {
        !self.bytes_in_flight.is_empty()
    }

    /// Hands a job to the workers, first waiting for answers while the flushes in flight leave
    /// no room for it. Answers received meanwhile wait for [`Self::next_outcome`].
    pub(crate) fn submit(&mut self, job: FlushJob) {
        let num_job_bytes = job.num_value_bytes();
        while !self.policy.may_hand_off(self.num_in_flight_bytes, self.bytes_in_flight.len(), num_job_bytes) {
            self.wait_for_outcome(OUTCOME_WAIT);
        }
        self.bytes_in_flight.insert(job.flush_id, num_job_bytes);
        self.num_in_flight_bytes += num_job_bytes;
        self.in_flight.started();
        if let Err(SendError(unsent)) = self.jobs_tx.send(job) {
            // No worker is left to take it (they stop only with the pool): answer for them, so
            // that the partitions read their ranges again and the loop stops.
            self.in_flight.finished();
            let outcome = FlushOutcome::failed(
                unsent.flush_id,
                unsent.stream.stream.clone(),
                unsent.keys(),
                "the flush workers stopped".to_string(),
            );
            self.accept(outcome);
        }
    }

    /// The next answer, received earlier or waiting now; never blocks.
    pub(crate) fn next_outcome(&mut self) -> Option<FlushOutcome> {
        if self.received.is_empty() {
            match self.outcomes_rx.try_recv() {
                Ok(outcome) => self.accept(outcome),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => self.workers_gone(),
            }
        }
        self.received.pop_front()
    }

    /// Blocks until an answer arrives or `timeout` passed, if any flush is in flight; the answer
    /// waits for [`Self::next_outcome`].
    pub(crate) fn wait_for_outcome(&mut self, timeout: Duration) {
        if !self.has_flushes_in_flight() {
            return;
        }
        match self.outcomes_rx.recv_timeout(timeout) {
            Ok(outcome) => self.accept(outcome),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => self.workers_gone(),
        }
    }

    /// Why a flush panicked, once: the loop stops on it.
    pub(crate) fn take_panic_message(&mut self) -> Option<String> {
        self.panic_message_opt.take()
    }

    /// Ends the workers once they finished the jobs handed to them (the loop waits for every
    /// answer first) and waits for their threads.
    pub(crate) fn stop(self) {
        let Self { jobs_tx, workers, .. } = self;
        drop(jobs_tx);
        for worker in workers {
            if worker.join().is_err() {
                tracing::error!("a flush worker thread panicked");
            }
        }
    }

    /// An answer arrived: what its flush held no longer counts against the budget.
    fn accept(&mut self, outcome: FlushOutcome) {
        if let Some(num_bytes) = self.bytes_in_flight.remove(&outcome.flush_id) {
            self.num_in_flight_bytes = self.num_in_flight_bytes.saturating_sub(num_bytes);
        }
        if let Some(message) = &outcome.panic_message_opt {
            self.panic_message_opt.get_or_insert_with(|| message.clone());
        }
        self.received.push_back(outcome);
    }

    /// Every worker ended although the pool still runs, which only a panic outside a job could
    /// do: the flushes in flight will never answer, so the loop is told to stop. Their
    /// partitions commit nothing more here; whoever owns them next reads the table's positions.
    fn workers_gone(&mut self) {
        if self.bytes_in_flight.is_empty() {
            return;
        }
        self.bytes_in_flight.clear();
        self.num_in_flight_bytes = 0;
        self.panic_message_opt.get_or_insert_with(|| "every flush worker stopped".to_string());
    }
}

/// What one worker thread holds.
struct Worker<F> {
    jobs_rx: Arc<Mutex<Receiver<FlushJob>>>,
    outcomes_tx: Sender<FlushOutcome>,
    run_flush: Arc<F>,
    in_flight: FlushesInFlight,
}

impl<F: Fn(FlushJob) -> FlushOutcome> Worker<F> {
    /// Runs jobs until the pool stops. A job that panics is answered as failed, with the panic,
    /// so that the loop learns of it instead of waiting for an answer forever.
    fn run(self) {
        loop {
            // The workers take turns waiting for the next job; the lock is released once one came.
            let next = self.jobs_rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
            let Ok(job) = next else { return };
            let (flush_id, stream, keys) = (job.flush_id, job.stream.stream.clone(), job.keys());
            let run_flush = &self.run_flush;
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(move || (**run_flush)(job)))
                .unwrap_or_else(|payload| {
                    let message = sluice_errors::panic_message(&*payload);
                    tracing::error!(%stream, flush_id, %message, "a flush panicked");
                    FlushOutcome::failed(flush_id, stream, keys, message)
                });
            // The loop may be gone already (it stopped without waiting after a failure).
            let _ = self.outcomes_tx.send(outcome);
            self.in_flight.finished();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::mpsc;

    use parquet::file::properties::WriterProperties;
    use sluice_lake::PartitionGranularity;
    use sluice_schema::StreamSchema;

    use super::*;
    use crate::config::FlushConfig;

    fn stream() -> Arc<StreamInfo> {
        let reader = Arc::new(
            StreamSchema::from_avro_json(
                "telemetry",
                include_str!("../../../schemas/telemetry.avsc"),
                Path::new("telemetry.avsc"),
            )
            .unwrap(),
        );
        Arc::new(StreamInfo {
            stream: "telemetry".to_string(),
            topic: "sluice.telemetry".to_string(),
            dead_letter_topic: "sluice.telemetry.dlq".to_string(),
            writers: vec![Arc::clone(&reader)],
            reader,
            granularity: PartitionGranularity::Hour,
            writer_properties: WriterProperties::builder().build(),
            encryption_opt: None,
        })
    }

    fn policy(max_buffered_bytes: usize) -> FlushPolicy {
        FlushPolicy::new(&FlushConfig { max_buffered_bytes, ..FlushConfig::default() })
    }

    fn job(pool: &mut FlushPool, partition: i32, num_value_bytes: usize) -> FlushJob {
        let taken = HandedOff {
            batches: Vec::new(),
            range: 0..1,
            previous_end_offset_opt: None,
            num_dead_lettered: 0,
            max_event_time_micros_opt: None,
            num_value_bytes,
            edge_positions_opt: None,
            num_edge_repeats_dropped: 0,
        };
        FlushJob {
            flush_id: pool.next_flush_id(),
            stream: stream(),
            parts: vec![FlushPart { key: ("sluice.telemetry".to_string(), partition), taken }],
        }
    }

    /// Answers every partition of a job with `result`.
    fn answer(job: FlushJob, result: impl Fn() -> PartResult) -> FlushOutcome {
        FlushOutcome {
            flush_id: job.flush_id,
            stream: job.stream.stream.clone(),
            parts: job
                .parts
                .into_iter()
                .map(|part| PartOutcome { key: part.key, result: result() })
                .collect(),
            panic_message_opt: None,
        }
    }

    fn wait_for_all(pool: &mut FlushPool) -> Vec<FlushOutcome> {
        let mut outcomes = Vec::new();
        while pool.has_flushes_in_flight() {
            pool.wait_for_outcome(Duration::from_secs(10));
        }
        while let Some(outcome) = pool.next_outcome() {
            outcomes.push(outcome);
        }
        outcomes
    }

    #[test]
    fn every_job_is_answered_and_releases_its_bytes() {
        let in_flight = FlushesInFlight::default();
        let mut pool = FlushPool::start(2, policy(1_000), in_flight.clone(), |job: FlushJob| {
            let stale = job.parts.first().is_some_and(|part| part.key.1 % 2 == 1);
            if stale { answer(job, || PartResult::Stale) } else { answer(job, || PartResult::Failed) }
        })
        .unwrap();
        assert_eq!(pool.num_workers(), 2);
        let mut flush_ids = Vec::new();
        for partition in 0..4 {
            let job = job(&mut pool, partition, 100);
            flush_ids.push(job.flush_id);
            pool.submit(job);
        }
        let mut outcomes = wait_for_all(&mut pool);
        assert_eq!(pool.num_in_flight_bytes(), 0);
        assert!(in_flight.wait_until_none(Duration::from_secs(10)));
        outcomes.sort_by_key(|outcome| outcome.flush_id);
        assert_eq!(outcomes.iter().map(|outcome| outcome.flush_id).collect::<Vec<_>>(), flush_ids);
        for outcome in &outcomes {
            let [part] = &outcome.parts[..] else { panic!("one part per job: {outcome:?}") };
            let expected_stale = part.key.1 % 2 == 1;
            assert_eq!(matches!(part.result, PartResult::Stale), expected_stale, "{outcome:?}");
            assert!(outcome.panic_message_opt.is_none());
        }
        assert!(pool.take_panic_message().is_none());
        pool.stop();
    }

    #[test]
    fn handing_off_waits_while_the_flushes_in_flight_hold_the_budget() {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let in_flight = FlushesInFlight::default();
        let mut pool = FlushPool::start(2, policy(100), in_flight.clone(), move |job: FlushJob| {
            release_rx.lock().unwrap().recv().unwrap();
            answer(job, || PartResult::Failed)
        })
        .unwrap();
        let first = job(&mut pool, 0, 60);
        let first_id = first.flush_id;
        pool.submit(first);
        assert_eq!(pool.num_in_flight_bytes(), 60);
        assert!(!in_flight.wait_until_none(Duration::from_millis(10)), "the first flush holds its worker");

        // 60 + 60 is past the budget of 100: the second waits until the first answered.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            release_tx.send(()).unwrap();
            release_tx
        });
        let second = job(&mut pool, 1, 60);
        let second_id = second.flush_id;
        pool.submit(second);
        let release_tx = releaser.join().unwrap();
        assert_eq!(pool.num_in_flight_bytes(), 60, "only the second holds bytes now");
        let first_outcome = pool.next_outcome().expect("received while the second waited");
        assert_eq!(first_outcome.flush_id, first_id);
        assert!(pool.next_outcome().is_none(), "the second has not answered");

        release_tx.send(()).unwrap();
        let outcomes = wait_for_all(&mut pool);
        assert_eq!(outcomes.iter().map(|outcome| outcome.flush_id).collect::<Vec<_>>(), vec![second_id]);
        assert!(in_flight.wait_until_none(Duration::from_secs(10)));
        pool.stop();
    }

    #[test]
    fn a_flush_larger_than_the_budget_goes_when_nothing_else_is_in_flight() {
        let mut pool = FlushPool::start(1, policy(100), FlushesInFlight::default(), |job| {
            answer(job, || PartResult::Failed)
        })
        .unwrap();
        let large = job(&mut pool, 0, 1_000);
        pool.submit(large);
        assert_eq!(wait_for_all(&mut pool).len(), 1);
        pool.stop();
    }

    #[test]
    fn a_flush_that_panics_is_answered_as_failed_and_reports_the_panic() {
        let in_flight = FlushesInFlight::default();
        let mut pool = FlushPool::start(1, policy(1_000), in_flight.clone(), |job: FlushJob| {
            if job.parts.iter().any(|part| part.key.1 == 3) {
                panic!("encoder bug");
            }
            answer(job, || PartResult::Stale)
        })
        .unwrap();
        let panicking = job(&mut pool, 3, 10);
        pool.submit(panicking);
        let after = job(&mut pool, 4, 10);
        pool.submit(after);
        let outcomes = wait_for_all(&mut pool);
        assert_eq!(outcomes.len(), 2, "the worker went on after the panic");
        let failed = outcomes.iter().find(|outcome| outcome.parts[0].key.1 == 3).unwrap();
        assert!(matches!(failed.parts[0].result, PartResult::Failed));
        assert_eq!(failed.panic_message_opt.as_deref(), Some("encoder bug"));
        assert_eq!(pool.take_panic_message().as_deref(), Some("encoder bug"));
        assert!(pool.take_panic_message().is_none(), "reported once");
        assert!(in_flight.wait_until_none(Duration::from_secs(10)));
        pool.stop();
    }

    #[test]
    fn a_revoke_waits_until_the_workers_finished() {
        let in_flight = FlushesInFlight::default();
        assert!(in_flight.wait_until_none(Duration::ZERO), "nothing in flight");
        in_flight.started();
        in_flight.started();
        assert!(!in_flight.wait_until_none(Duration::from_millis(10)));
        let finisher = {
            let in_flight = in_flight.clone();
            std::thread::spawn(move || {
                in_flight.finished();
                std::thread::sleep(Duration::from_millis(20));
                in_flight.finished();
            })
        };
        assert!(in_flight.wait_until_none(Duration::from_secs(10)));
        finisher.join().unwrap();
    }
}
