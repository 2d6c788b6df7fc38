//! What the compactor has seen of an edge gateway's positions in one Kafka partition, to tell
//! a reading the gateway sent again from one it sends for the first time.
//!
//! A gateway sends its spool in order, one request at a time, and moves past a request only
//! after central answered 200 (Kafka acknowledged every record of it). So when a request's first
//! position is `floor`, every reading of that gateway below `floor` that was ever to be stored is
//! already in Kafka, at an offset before any record of that request. Central puts the request's
//! floor on each record it produces. Below the greatest floor seen, a record is a repeat; at or
//! above it, only the exact positions seen are: a request answered 503 after some of its records
//! were acknowledged and others timed out leaves gaps that its resend fills.

use serde::{Deserialize, Serialize};

/// Positions at or above the floor are kept exactly up to this many runs of consecutive
/// positions per gateway; past it the floor rises over the oldest runs. A gateway that follows
/// the protocol never needs more than one request's worth (`http.max_records_per_request`).
pub const MAX_SEEN_RUNS: usize = 65_536;

/// One gateway's positions seen in one Kafka partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredPositions")]
pub struct GatewayPositions {
    /// Every position below it was stored before.
    pub floor: i64,
    /// Runs `[first, last]` of positions seen at or above `floor`: sorted, disjoint and not
    /// adjacent.
    pub seen: Vec<[i64; 2]>,
}

/// The stored forms: the current one, and the first, a single greatest position (everything at
/// or below it was seen).
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredPositions {
    Seen { floor: i64, seen: Vec<[i64; 2]> },
    Greatest(i64),
}

impl From<StoredPositions> for GatewayPositions {
    fn from(stored: StoredPositions) -> Self {
        match stored {
            StoredPositions::Seen { floor, seen } => Self { floor, seen },
            StoredPositions::Greatest(greatest) => {
                Self { floor: greatest.saturating_add(1), seen: Vec::new() }
            }
        }
    }
}

impl GatewayPositions {
    /// Takes a record at `position` from a request whose first position is `floor`; true when
    /// it repeats one seen before (leave it out), false when it is new (now seen).
    pub fn observe(&mut self, position: i64, floor: i64) -> bool {
        if position < self.floor {
            return true;
        }
        // A floor above the position is not the protocol's; the record is kept rather than
        // trusted to move the floor past itself.
        if floor > self.floor && floor <= position {
            self.raise_floor(floor);
        }
        let at = self.seen.partition_point(|run| run[1] < position);
        if self.seen.get(at).is_some_and(|run| run[0] <= position) {
            return true;
        }
        let joins_before = at > 0 && position.checked_sub(1) == Some(self.seen[at - 1][1]);
        let joins_after = self.seen.get(at).is_some_and(|run| position.checked_add(1) == Some(run[0]));
        match (joins_before, joins_after) {
            (true, true) => {
                self.seen[at - 1][1] = self.seen[at][1];
                self.seen.remove(at);
            }
            (true, false) => self.seen[at - 1][1] = position,
            (false, true) => self.seen[at][0] = position,
            (false, false) => self.seen.insert(at, [position, position]),
        }
        if self.seen.len() > MAX_SEEN_RUNS {
            let lowest_kept = self.seen[self.seen.len() - MAX_SEEN_RUNS][0];
            self.raise_floor(lowest_kept);
        }
        false
    }

    fn raise_floor(&mut self, floor: i64) {
        self.floor = floor;
        let below = self.seen.partition_point(|run| run[1] < floor);
        self.seen.drain(..below);
        if let Some(first) = self.seen.first_mut() {
            first[0] = first[0].max(floor);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Observes `(position, floor)` pairs in order; which of them were repeats.
    fn repeats(positions: &mut GatewayPositions, records: &[(i64, i64)]) -> Vec<i64> {
        records
            .iter()
            .filter(|&&(position, floor)| positions.observe(position, floor))
            .map(|&(position, _)| position)
            .collect()
    }

    #[test]
    fn a_resend_fills_the_gap_a_timed_out_record_left_and_repeats_nothing() {
        let mut positions = GatewayPositions::default();
        // 10..=14 sent; 12 timed out, the others were acknowledged, the request was answered 503.
        assert!(repeats(&mut positions, &[(10, 10), (11, 10), (13, 10), (14, 10)]).is_empty());
        let resent: Vec<(i64, i64)> = (10..=14).map(|position| (position, 10)).collect();
        assert_eq!(repeats(&mut positions, &resent), vec![10, 11, 13, 14]);
        assert_eq!(positions.seen, vec![[10, 14]]);
        // The next request starts past the last: everything below it is a repeat from now on.
        assert!(repeats(&mut positions, &[(20, 20)]).is_empty());
        assert_eq!((positions.floor, positions.seen.clone()), (20, vec![[20, 20]]));
        assert_eq!(repeats(&mut positions, &[(12, 10), (19, 10)]), vec![12, 19]);
    }

    #[test]
    fn a_late_copy_of_an_earlier_request_is_a_repeat_on_either_side_of_the_floor() {
        let mut positions = GatewayPositions::default();
        // A 413 split 10..=13 into 10..=11 and 12..=13; the whole request arrives late.
        assert!(repeats(&mut positions, &[(10, 10), (11, 10), (12, 12), (13, 12)]).is_empty());
        assert_eq!(repeats(&mut positions, &[(10, 10), (11, 10), (12, 10), (13, 10)]), vec![10, 11, 12, 13]);
        // A floor above its own record is ignored rather than let the record past itself.
        assert!(!positions.observe(15, 40));
        assert_eq!(positions.floor, 12);
    }

    #[test]
    fn runs_merge_from_either_side_and_stop_at_their_bound() {
        let mut positions = GatewayPositions::default();
        assert!(repeats(&mut positions, &[(5, 0), (7, 0), (6, 0), (3, 0), (4, 0)]).is_empty());
        assert_eq!(positions.seen, vec![[3, 7]]);
        assert!(repeats(&mut positions, &[(i64::MAX, 0), (i64::MAX - 1, 0)]).is_empty());
        assert_eq!(positions.seen, vec![[3, 7], [i64::MAX - 1, i64::MAX]]);
        let mut many = GatewayPositions::default();
        for run in 0..(MAX_SEEN_RUNS as i64 + 10) {
            assert!(!many.observe(run * 2, 0));
        }
        assert_eq!(many.seen.len(), MAX_SEEN_RUNS);
        assert_eq!(many.floor, 20);
        assert!(many.observe(18, 0), "below the raised floor is taken as seen");
    }

    #[test]
    fn the_first_stored_form_reads_as_everything_up_to_its_greatest_seen() {
        let stored: BTreeMap<String, GatewayPositions> =
            serde_json::from_str(r#"{"a/old": 41, "a/new": {"floor": 7, "seen": [[7, 9]]}}"#).unwrap();
        assert_eq!(stored["a/old"], GatewayPositions { floor: 42, seen: vec![] });
        assert_eq!(stored["a/new"], GatewayPositions { floor: 7, seen: vec![[7, 9]] });
        let written = serde_json::to_string(&stored["a/new"]).unwrap();
        assert_eq!(serde_json::from_str::<GatewayPositions>(&written).unwrap(), stored["a/new"]);
    }
}
