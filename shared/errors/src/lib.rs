//! One way to print an error with its causes, and one way to say what a loop must do with it.
//! A log line or an answer that shows only the top message loses what an operator needs
//! ("failed to read the stream tables" without the S3 status under it), and three hand-written
//! loops printed it three slightly different ways. [`ErrorClass`] is the retry decision.

mod class;

use std::any::Any;
use std::error::Error;
use std::fmt;

pub use crate::class::ErrorClass;

/// Displays `error` and each of its sources, `: `-separated, as anyhow's `{:#}` does, so that
/// lines from errors of every kind read alike: `failed to commit: conflict: version 7 exists`.
pub struct Chain<'a, E: Error + ?Sized>(pub &'a E);

impl<E: Error + ?Sized> fmt::Display for Chain<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source_opt = self.0.source();
        while let Some(source) = source_opt {
            write!(f, ": {source}")?;
            source_opt = source.source();
        }
        Ok(())
    }
}

impl<E: Error + ?Sized> fmt::Debug for Chain<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `error` and its causes as one string.
pub fn chain_text<E: Error + ?Sized>(error: &E) -> String {
    Chain(error).to_string()
}

/// The message a panic was raised with (`panic!("...")` gives a `&str` or a `String`), for
/// the log line or error that reports a task, job or message that panicked.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|message| (*message).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[derive(Debug)]
    struct Layer {
        message: &'static str,
        source_opt: Option<Box<Layer>>,
    }

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.message)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.source_opt.as_deref().map(|layer| layer as &(dyn Error + 'static))
        }
    }

    #[test]
    fn every_cause_is_printed_in_order() {
        let error = Layer {
            message: "failed to read the stream tables",
            source_opt: Some(Box::new(Layer {
                message: "failed to load table 'telemetry'",
                source_opt: Some(Box::new(Layer { message: "503 Slow Down", source_opt: None })),
            })),
        };
        assert_eq!(
            chain_text(&error),
            "failed to read the stream tables: failed to load table 'telemetry': 503 Slow Down"
        );
    }

    #[test]
    fn an_error_without_causes_is_its_message() {
        let error = Layer { message: "timed out", source_opt: None };
        assert_eq!(Chain(&error).to_string(), "timed out");
    }

    #[test]
    fn a_panic_reads_as_its_message_whatever_it_was_raised_with() {
        let literal = std::panic::catch_unwind(|| panic!("index out of bounds")).unwrap_err();
        assert_eq!(panic_message(literal.as_ref()), "index out of bounds");
        let formatted = std::panic::catch_unwind(|| panic!("row {}", 7)).unwrap_err();
        assert_eq!(panic_message(formatted.as_ref()), "row 7");
        let other = std::panic::catch_unwind(|| std::panic::panic_any(42_u8)).unwrap_err();
        assert_eq!(panic_message(other.as_ref()), "a panic without a message");
    }
}
