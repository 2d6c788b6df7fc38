//! When a Kafka partition's buffer is flushed: on size as records arrive, and at each check on
//! age (data is queryable within `flush.max_age_ms`), on scatter (too many event-time partitions
//! open, from late or replayed data) and on memory (buffers and flushes in flight together past
//! `flush.max_buffered_bytes`, largest buffer first); and when handing off or consuming must wait
//! for flushes in flight to answer. Decided here from what the buffers and the flush workers
//! report and the time given, so that every edge is tested without a broker, a store or a sleep;
//! the consumer does the flushing.

use std::time::{Duration, Instant};

use crate::config::FlushConfig;

/// What the policy needs to know of one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BufferState {
    /// When its oldest record not yet committed was buffered.
    pub(crate) first_buffered_at_opt: Option<Instant>,
    /// Distinct event-time partitions among its decoded rows.
    pub(crate) num_open_partitions: usize,
    /// Avro bytes buffered: the proxy for memory.
    pub(crate) num_value_bytes: usize,
    /// Whether it holds a range not yet committed; an empty buffer is never due.
    pub(crate) has_uncommitted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlushPolicy {
    target_file_bytes: usize,
    max_age: Duration,
    max_open_partitions: usize,
    max_buffered_bytes: usize,
}

impl FlushPolicy {
    pub(crate) fn new(config: &FlushConfig) -> Self {
        Self {
            target_file_bytes: config.target_file_bytes,
            max_age: Duration::from_millis(config.max_age_ms),
            max_open_partitions: config.max_open_partitions,
            max_buffered_bytes: config.max_buffered_bytes,
        }
    }

    /// Whether a buffer is big enough for a file of its own: checked as each record arrives.
    pub(crate) fn is_full(&self, num_value_bytes: usize) -> bool {
        num_value_bytes >= self.target_file_bytes
    }

    /// Whether a buffer is due at `now` on age or scatter.
    pub(crate) fn is_due(&self, buffer: &BufferState, now: Instant) -> bool {
        let too_old = buffer
            .first_buffered_at_opt
            .is_some_and(|since| now.saturating_duration_since(since) >= self.max_age);
        let too_scattered = buffer.num_open_partitions > self.max_open_partitions;
        buffer.has_uncommitted && (too_old || too_scattered)
    }

    /// Which of `buffers` (their keys and buffered bytes, after the due ones were handed off) to
    /// flush, largest first, until the rest and `num_other_bytes` fit in
    /// `flush.max_buffered_bytes`. `num_other_bytes` is memory that no flush chosen now can free:
    /// flushes in flight, and buffers waiting for their partition's flush in flight to answer.
    /// Ties go to the first given, so that a run of checks does not pick at random.
    pub(crate) fn over_budget<K: Clone>(&self, buffers: &[(K, usize)], num_other_bytes: usize) -> Vec<K> {
        // Summed wide: buffers near usize::MAX each must not wrap or saturate the total.
        let mut total: u128 =
            buffers.iter().map(|(_, bytes)| *bytes as u128).sum::<u128>() + num_other_bytes as u128;
        let budget = self.max_buffered_bytes as u128;
        let mut by_size: Vec<&(K, usize)> = buffers.iter().collect();
        // Stable: equal sizes keep their given order.
        by_size.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
        let mut chosen = Vec::new();
        for (key, bytes) in by_size {
            if total <= budget || *bytes == 0 {
                break;
            }
            chosen.push(key.clone());
            total -= *bytes as u128;
        }
        chosen
    }

    /// Whether buffers and flushes in flight, holding `num_held_bytes` together, are past
    /// `flush.max_buffered_bytes`: consumption then waits for flushes to answer. Handing a buffer
    /// off frees nothing; only a flush that answered does.
    pub(crate) fn is_over_budget(&self, num_held_bytes: usize) -> bool {
        num_held_bytes > self.max_buffered_bytes
    }

    /// Whether a flush of `num_job_bytes` may be handed off while `num_jobs_in_flight` flushes
    /// holding `num_in_flight_bytes` have not answered: flushes in flight together stay within
    /// `flush.max_buffered_bytes`, but one that alone is larger still goes when nothing else is
    /// in flight (its buffer grew while it waited).
    pub(crate) fn may_hand_off(
        &self,
        num_in_flight_bytes: usize,
        num_jobs_in_flight: usize,
        num_job_bytes: usize,
    ) -> bool {
        num_jobs_in_flight == 0
            || num_in_flight_bytes.saturating_add(num_job_bytes) <= self.max_buffered_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    fn policy() -> FlushPolicy {
        FlushPolicy::new(&FlushConfig {
            target_file_bytes: 128 * MIB,
            max_age_ms: 60_000,
            max_buffered_bytes: 512 * MIB,
            max_open_partitions: 48,
            workers: 0,
        })
    }

    fn buffer(age: Option<Duration>, num_open_partitions: usize, now: Instant) -> BufferState {
        BufferState {
            first_buffered_at_opt: age.map(|age| now - age),
            num_open_partitions,
            num_value_bytes: MIB,
            has_uncommitted: true,
        }
    }

    #[test]
    fn a_buffer_is_due_from_the_moment_its_oldest_record_reaches_the_age() {
        let now = Instant::now() + Duration::from_secs(3_600);
        let cases = [
            (None, 1, false, "nothing buffered yet"),
            (Some(Duration::ZERO), 1, false, "just buffered"),
            (Some(Duration::from_millis(59_999)), 1, false, "a millisecond short"),
            (Some(Duration::from_secs(60)), 1, true, "exactly the age"),
            (Some(Duration::from_secs(3_600)), 1, true, "long past it"),
            (Some(Duration::ZERO), 48, false, "at the open-partition limit"),
            (Some(Duration::ZERO), 49, true, "one partition past it (late data)"),
            (None, 49, true, "scattered though its age is unknown"),
        ];
        for (age, open, due, case) in cases {
            assert_eq!(policy().is_due(&buffer(age, open, now), now), due, "{case}");
        }
    }

    #[test]
    fn a_committed_buffer_is_never_due() {
        let now = Instant::now() + Duration::from_secs(3_600);
        let committed =
            BufferState { has_uncommitted: false, ..buffer(Some(Duration::from_secs(600)), 100, now) };
        assert!(!policy().is_due(&committed, now));
    }

    #[test]
    fn a_clock_read_before_the_buffer_started_is_not_an_age() {
        let started = Instant::now() + Duration::from_secs(10);
        let state = BufferState {
            first_buffered_at_opt: Some(started),
            num_open_partitions: 1,
            num_value_bytes: 1,
            has_uncommitted: true,
        };
        assert!(!policy().is_due(&state, started - Duration::from_secs(5)));
    }

    #[test]
    fn a_buffer_is_full_at_the_target_size() {
        assert!(!policy().is_full(128 * MIB - 1));
        assert!(policy().is_full(128 * MIB));
    }

    #[test]
    fn the_largest_buffers_go_first_until_the_rest_fit() {
        let policy = policy();
        // Exactly at the budget: nothing to flush.
        assert!(policy.over_budget(&[("a", 256 * MIB), ("b", 256 * MIB)], 0).is_empty());
        // One byte over: the largest goes.
        assert_eq!(policy.over_budget(&[("a", 200 * MIB), ("b", 312 * MIB + 1)], 0), vec!["b"]);
        // Far over: as many as needed, largest first.
        let chosen =
            policy.over_budget(&[("a", 100 * MIB), ("b", 400 * MIB), ("c", 300 * MIB), ("d", 200 * MIB)], 0);
        assert_eq!(chosen, vec!["b", "c"]);
        // Ties go to the first given.
        assert_eq!(policy.over_budget(&[("a", 300 * MIB), ("b", 300 * MIB)], 0), vec!["a"]);
        assert!(policy.over_budget::<&str>(&[], 0).is_empty());
    }

    #[test]
    fn flushes_in_flight_count_against_the_budget() {
        let policy = policy();
        type Buffers<'a> = &'a [(&'a str, usize)];
        // (buffers, bytes in flight or waiting for a flush in flight, chosen, case)
        let cases: [(Buffers<'_>, usize, &[&str], &str); 5] = [
            (&[("a", 100 * MIB)], 412 * MIB, &[], "exactly at the budget with a flush in flight"),
            (&[("a", 100 * MIB), ("b", 50 * MIB)], 412 * MIB, &["a"], "the largest goes"),
            (&[("a", 100 * MIB), ("b", 50 * MIB)], 600 * MIB, &["a", "b"], "in flight alone is over it"),
            (&[("a", 0)], 600 * MIB, &[], "an empty buffer frees nothing"),
            (&[], 600 * MIB, &[], "nothing to hand off: consumption waits for answers"),
        ];
        for (buffers, num_other_bytes, chosen, case) in cases {
            assert_eq!(policy.over_budget(buffers, num_other_bytes), chosen.to_vec(), "{case}");
        }
    }

    #[test]
    fn consumption_waits_past_the_budget_only() {
        let policy = policy();
        assert!(!policy.is_over_budget(0));
        assert!(!policy.is_over_budget(512 * MIB));
        assert!(policy.is_over_budget(512 * MIB + 1));
    }

    #[test]
    fn a_flush_is_handed_off_while_the_flushes_in_flight_leave_room_for_it() {
        let policy = policy();
        // (bytes in flight, flushes in flight, bytes of the flush, may go, case)
        let cases = [
            (0, 0, 128 * MIB, true, "nothing in flight"),
            (0, 0, 600 * MIB, true, "larger than the budget, alone"),
            (384 * MIB, 3, 128 * MIB, true, "exactly fills the budget"),
            (384 * MIB, 3, 128 * MIB + 1, false, "one byte past it"),
            (512 * MIB, 1, 0, true, "an empty flush only moves a position"),
            (usize::MAX, 1, usize::MAX, false, "sizes near the type limit do not wrap"),
        ];
        for (num_in_flight_bytes, num_jobs_in_flight, num_job_bytes, may_go, case) in cases {
            assert_eq!(
                policy.may_hand_off(num_in_flight_bytes, num_jobs_in_flight, num_job_bytes),
                may_go,
                "{case}"
            );
        }
    }

    #[test]
    fn sizes_near_the_type_limit_do_not_overflow() {
        let chosen = policy().over_budget(&[("a", usize::MAX), ("b", usize::MAX), ("c", 1)], usize::MAX);
        assert_eq!(chosen, vec!["a", "b", "c"]);
        let chosen = policy().over_budget(&[("a", usize::MAX), ("b", usize::MAX), ("c", 1)], 0);
        assert_eq!(chosen, vec!["a", "b"]);
    }
}
