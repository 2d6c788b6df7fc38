//! What to start next for one window of a job: nothing, the next attempt of its revision (a
//! first run, a lease that ran out, this replica's own claim left by a process that died), or a
//! new revision (a backfill asked for after it ran, or a restatement because its input rows
//! changed). Decided from the window's records and the time given, with no I/O, so that every
//! edge is tested directly; the scheduler reads the records and starts what this returns.

use std::collections::BTreeMap;

use sluice_jobs::records::{BackfillRequest, OutcomeStatus, WindowState, satisfies};

/// Which process is asking: a claim of the same replica by another incarnation is one its
/// previous process left when it died.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Replica<'a> {
    pub(crate) instance_id: &'a str,
    pub(crate) incarnation: &'a str,
}

/// For a restating job: the stream tables as they are now. `rows_now` counts the committed rows
/// overlapping the window; it is asked only when a table has moved past what the run read.
pub(crate) struct Restatement<'a, F: FnOnce() -> u64> {
    pub(crate) streams: &'a [String],
    pub(crate) versions_now: &'a BTreeMap<String, i64>,
    pub(crate) rows_now: F,
}

/// The (revision, attempt) to start for the window `[start, end)` at `now_micros`, if any.
/// `restatement_opt` is given for jobs with `restate: true` when the tables could be read.
pub(crate) fn next_step<F: FnOnce() -> u64>(
    state_opt: Option<&WindowState>,
    (window_start, window_end): (i64, i64),
    backfills: &[BackfillRequest],
    restatement_opt: Option<Restatement<'_, F>>,
    replica: Replica<'_>,
    now_micros: i64,
) -> Option<(u32, u32)> {
    let Some(state) = state_opt else { return Some((0, 1)) };
    if let Some(outcome) = &state.outcome_opt {
        let backfilled = backfills.iter().any(|request| {
            request.from_micros < window_end
                && window_start < request.to_micros
                && !satisfies(state, request.requested_at_micros)
        });
        // A window changed when a table it read has a version past the one the revision read
        // and that version's files overlapping the window hold other rows: late data, or a
        // merge that dropped duplicates. Versions alone would rerun it for every flush of any
        // hour, and merges that only rewrite files change versions without changing rows.
        let restated = outcome.status == OutcomeStatus::Succeeded
            && restatement_opt.is_some_and(|restatement| {
                let moved = restatement.streams.iter().any(|stream| {
                    match (restatement.versions_now.get(stream), outcome.input_versions.get(stream)) {
                        (Some(now), Some(read)) => now > read,
                        _ => true,
                    }
                });
                moved && (restatement.rows_now)() != outcome.input_rows
            });
        return (backfilled || restated).then_some((state.revision + 1, 1));
    }
    let Some(attempt) = &state.latest_attempt_opt else { return Some((state.revision, 1)) };
    let own_dead_claim = attempt.owner == replica.instance_id && attempt.incarnation != replica.incarnation;
    (own_dead_claim || attempt.lease_until_micros <= now_micros)
        .then_some((state.revision, attempt.attempt + 1))
}

/// One window and one replica that the tests of the window step and of the scheduler share.
#[cfg(test)]
pub(crate) mod test_window {
    use super::Replica;

    pub(crate) const HOUR: i64 = 3_600_000_000;
    /// 2026-12-01T00:00:00Z.
    pub(crate) const START: i64 = 1_796_083_200_000_000;
    pub(crate) const WINDOW: (i64, i64) = (START, START + HOUR);
    pub(crate) const ME: Replica<'static> = Replica { instance_id: "executor-0", incarnation: "b" };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use sluice_jobs::records::{AttemptRecord, OutcomeRecord, RunStats};

    use super::*;
    use crate::window_step::test_window::{HOUR, ME, START, WINDOW};

    fn attempt(owner: &str, incarnation: &str, attempt: u32, lease_until_micros: i64) -> AttemptRecord {
        AttemptRecord {
            job: "job".into(),
            window_start_micros: START,
            window_end_micros: START + HOUR,
            revision: 2,
            attempt,
            owner: owner.into(),
            incarnation: incarnation.into(),
            started_at_micros: START + HOUR,
            lease_until_micros,
        }
    }

    fn finished(status: OutcomeStatus, started_at_micros: i64, input_rows: u64, version: i64) -> WindowState {
        WindowState {
            revision: 2,
            latest_attempt_opt: Some(attempt("executor-1", "x", 1, 0)),
            outcome_opt: Some(OutcomeRecord {
                job: "job".into(),
                window_start_micros: START,
                window_end_micros: START + HOUR,
                revision: 2,
                attempt: 1,
                status,
                started_at_micros,
                finished_at_micros: started_at_micros + 1,
                stats: RunStats::default(),
                input_rows,
                result_path_opt: None,
                error_opt: None,
                input_versions: BTreeMap::from([("telemetry".to_string(), version)]),
                result_version_opt: None,
            }),
        }
    }

    fn no_restatement() -> Option<Restatement<'static, fn() -> u64>> {
        None
    }

    #[test]
    fn a_window_never_claimed_starts_its_first_attempt() {
        assert_eq!(next_step(None, WINDOW, &[], no_restatement(), ME, START), Some((0, 1)));
        let claimed_nothing = WindowState { revision: 3, ..WindowState::default() };
        assert_eq!(next_step(Some(&claimed_nothing), WINDOW, &[], no_restatement(), ME, START), Some((3, 1)));
    }

    #[test]
    fn a_claim_is_taken_over_once_its_lease_ends_or_when_this_replica_died_holding_it() {
        let now = START + 2 * HOUR;
        let cases = [
            (attempt("executor-1", "x", 1, now + 1), None, "another replica's live lease"),
            (attempt("executor-1", "x", 1, now), Some((2, 2)), "its lease ends exactly now"),
            (attempt("executor-1", "x", 4, now - 1), Some((2, 5)), "its lease ended"),
            (attempt("executor-0", "a", 1, now + HOUR), Some((2, 2)), "this replica's previous process"),
            (attempt("executor-0", "b", 1, now + HOUR), None, "this very process, still running it"),
        ];
        for (claim, expected, case) in cases {
            let state = WindowState { revision: 2, latest_attempt_opt: Some(claim), outcome_opt: None };
            assert_eq!(next_step(Some(&state), WINDOW, &[], no_restatement(), ME, now), expected, "{case}");
        }
    }

    #[test]
    fn a_finished_window_runs_again_only_for_a_backfill_asked_after_it_ran() {
        let ran_at = START + 2 * HOUR;
        let state = finished(OutcomeStatus::Failed, ran_at, 10, 5);
        let request = |from_micros, to_micros, requested_at_micros| BackfillRequest {
            job: "job".into(),
            from_micros,
            to_micros,
            requested_at_micros,
            signature_opt: None,
        };
        let cases = [
            (vec![], None, "no request"),
            (vec![request(START, START + HOUR, ran_at + 1)], Some((3, 1)), "asked after the run"),
            (vec![request(START, START + HOUR, ran_at)], None, "asked before the run started"),
            (vec![request(START + HOUR, START + 2 * HOUR, ran_at + 1)], None, "the next window only"),
            (vec![request(START - HOUR, START, ran_at + 1)], None, "ends where the window starts"),
            (vec![request(START - HOUR, START + 1, ran_at + 1)], Some((3, 1)), "overlaps by a microsecond"),
        ];
        for (requests, expected, case) in cases {
            assert_eq!(
                next_step(Some(&state), WINDOW, &requests, no_restatement(), ME, ran_at),
                expected,
                "{case}"
            );
        }
    }

    #[test]
    fn a_succeeded_window_is_restated_when_a_newer_table_version_holds_other_rows() {
        let streams = vec!["telemetry".to_string()];
        let cases = [
            (5, 10, 10, None, "the same version"),
            (6, 10, 10, None, "a newer version, the same rows (a merge that only rewrote files)"),
            (6, 10, 12, Some((3, 1)), "late rows arrived"),
            (6, 10, 9, Some((3, 1)), "a merge dropped a duplicate"),
            (4, 10, 12, None, "an older version than the run read"),
        ];
        for (version_now, rows_read, rows_now, expected, case) in cases {
            let state = finished(OutcomeStatus::Succeeded, START + 2 * HOUR, rows_read, 5);
            let versions_now = BTreeMap::from([("telemetry".to_string(), version_now)]);
            let restatement =
                Restatement { streams: &streams, versions_now: &versions_now, rows_now: || rows_now };
            assert_eq!(
                next_step(Some(&state), WINDOW, &[], Some(restatement), ME, START),
                expected,
                "{case}"
            );
        }
    }

    #[test]
    fn rows_are_counted_only_once_a_table_moved_and_failures_are_not_restated() {
        let streams = vec!["telemetry".to_string()];
        let versions_now = BTreeMap::from([("telemetry".to_string(), 5)]);
        let state = finished(OutcomeStatus::Succeeded, START, 10, 5);
        let unmoved = Restatement {
            streams: &streams,
            versions_now: &versions_now,
            rows_now: || -> u64 { panic!("counted") },
        };
        assert_eq!(next_step(Some(&state), WINDOW, &[], Some(unmoved), ME, START), None);

        let moved_versions = BTreeMap::from([("telemetry".to_string(), 9)]);
        let failed = finished(OutcomeStatus::Failed, START, 10, 5);
        let restatement = Restatement { streams: &streams, versions_now: &moved_versions, rows_now: || 99 };
        assert_eq!(next_step(Some(&failed), WINDOW, &[], Some(restatement), ME, START), None);

        // A stream the run did not record (or a table not there now) counts as moved.
        let other = vec!["other".to_string()];
        let restatement = Restatement { streams: &other, versions_now: &versions_now, rows_now: || 11 };
        assert_eq!(next_step(Some(&state), WINDOW, &[], Some(restatement), ME, START), Some((3, 1)));
    }
}
