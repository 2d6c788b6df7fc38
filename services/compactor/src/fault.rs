//! Fault points for crash tests. `SLUICE_COMPACTOR_ABORT_AT=<point>:<n>` makes the process abort
//! the n-th time it reaches the point, so a test can prove that a crash landed exactly there
//! (a SIGKILL at a random moment mostly lands between flushes). Unset, as in every deployment, a
//! point costs one load of an already initialised value.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) const ABORT_AT_VARIABLE: &str = "SLUICE_COMPACTOR_ABORT_AT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultPoint {
    /// A flush's files are uploaded to their final paths; its Delta commit is not made yet.
    /// Reached on a flush worker.
    AfterUpload,
    /// A flush's Delta commit landed; its worker has not answered the loop yet, so the loop has
    /// not let the partition's next flush go nor moved Kafka's offset.
    AfterCommit,
}

impl FaultPoint {
    const ALL: [Self; 2] = [Self::AfterUpload, Self::AfterCommit];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::AfterUpload => "after-upload",
            Self::AfterCommit => "after-commit",
        }
    }

    /// Aborts the process if this is the armed point and its count is reached.
    pub(crate) fn reached(self) {
        let Some(armed) = ARMED.get().copied().flatten() else { return };
        if armed.point != self {
            return;
        }
        let num_hits = HITS.fetch_add(1, Ordering::Relaxed) + 1;
        if num_hits == armed.at_hit {
            // Straight to stderr: a crash test reads it, and a buffered log line would die with us.
            eprintln!("fault point {} reached (hit {num_hits}); aborting ({ABORT_AT_VARIABLE})", self.name());
            std::process::abort();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ArmedFault {
    point: FaultPoint,
    at_hit: u64,
}

static ARMED: OnceLock<Option<ArmedFault>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

/// `SLUICE_COMPACTOR_ABORT_AT` names no fault point, or no hit count.
#[derive(Debug, thiserror::Error)]
#[error("{ABORT_AT_VARIABLE}='{value}': expected <point>:<n> with point one of {points} and n >= 1")]
pub struct InvalidFaultPoint {
    value: String,
    points: String,
}

/// Reads `SLUICE_COMPACTOR_ABORT_AT` once, at start; a value that names no point is refused
/// rather than ignored, so a crash test cannot pass without its crash.
#[allow(
    clippy::disallowed_methods,
    reason = "a crash test's switch, not configuration: kept out of the config file and its reference on purpose"
)]
pub(crate) fn arm_from_environment() -> Result<(), InvalidFaultPoint> {
    let armed = match std::env::var(ABORT_AT_VARIABLE) {
        Ok(value) => Some(parse(&value)?),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(value)) => return Err(invalid(&value.to_string_lossy())),
    };
    if let Some(armed) = armed {
        tracing::warn!(
            point = armed.point.name(),
            at_hit = armed.at_hit,
            "fault point armed: the process aborts there"
        );
    }
    // A second start in one process (tests) keeps the first setting.
    let _ = ARMED.set(armed);
    Ok(())
}

fn invalid(value: &str) -> InvalidFaultPoint {
    let names: Vec<&str> = FaultPoint::ALL.iter().map(|point| point.name()).collect();
    InvalidFaultPoint { value: value.to_string(), points: names.join(", ") }
}

fn parse(value: &str) -> Result<ArmedFault, InvalidFaultPoint> {
    let invalid = || invalid(value);
    let (name, count) = value.split_once(':').ok_or_else(invalid)?;
    let point = FaultPoint::ALL.into_iter().find(|point| point.name() == name).ok_or_else(invalid)?;
    let at_hit: u64 = count.parse().map_err(|_| invalid())?;
    if at_hit == 0 {
        return Err(invalid());
    }
    Ok(ArmedFault { point, at_hit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_and_counts_parse_and_anything_else_is_refused() {
        assert_eq!(
            parse("after-upload:3").ok(),
            Some(ArmedFault { point: FaultPoint::AfterUpload, at_hit: 3 })
        );
        assert_eq!(
            parse("after-commit:1").ok(),
            Some(ArmedFault { point: FaultPoint::AfterCommit, at_hit: 1 })
        );
        for bad in [
            "after-upload",
            "after-upload:0",
            "after-upload:-1",
            "before-upload:1",
            "",
            ":1",
            "after-commit:x",
        ] {
            let error = parse(bad).unwrap_err().to_string();
            assert!(error.contains("after-upload") && error.contains(bad), "{bad}: {error}");
        }
    }
}
