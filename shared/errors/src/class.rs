//! What a loop that works through inputs (records, windows, requests) must do with an error. An
//! error that is only a string cannot drive that decision, and a loop that retries everything
//! spends its attempts on inputs that fail the same way every time while one that retries
//! nothing loses work to a store that was briefly down. The code that builds an error knows
//! which it is; it says so with an [`ErrorClass`], and the loop acts on that alone.

use std::fmt;

/// How a run loop treats an error. Models: Quickwit's `StorageErrorKind`, Arroyo's `RetryHint`,
/// kafka-delta-ingest's dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Something outside the input failed and may not fail next time: a store or broker that
    /// errored or was unreachable, a timeout on a busy machine, a task that panicked. Back off
    /// and try the same input again, up to the loop's bound on attempts.
    Retryable,
    /// The input itself is bad: it fails the same way however often it is tried (SQL that
    /// cannot be planned, a value of the wrong type, a result past a limit). Retrying cannot
    /// help, so record the input as failed with the reason (or dead-letter it) at once, and go
    /// on with the next one.
    Poison,
    /// The process cannot go on: whatever it tries next fails the same way (a runtime that
    /// was shut down, a client fenced for good). Cancel the root token so that the process
    /// winds down and exits non-zero, to be restarted, instead of failing every input it holds.
    Fatal,
}

impl ErrorClass {
    /// Whether the same input may be tried again.
    pub fn is_retryable(self) -> bool {
        self == Self::Retryable
    }

    /// A fixed lowercase name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retryable => "retryable",
            Self::Poison => "poison",
            Self::Fatal => "fatal",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_retryable_errors_are_tried_again_and_each_class_has_a_fixed_name() {
        let cases = [
            (ErrorClass::Retryable, true, "retryable"),
            (ErrorClass::Poison, false, "poison"),
            (ErrorClass::Fatal, false, "fatal"),
        ];
        for (class, retryable, name) in cases {
            assert_eq!(class.is_retryable(), retryable, "{class:?}");
            assert_eq!(class.to_string(), name);
        }
    }
}
