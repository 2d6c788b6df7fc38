//! What the CLI writes to stdout: results as a table, CSV or JSON lines, made safe for a terminal,
//! and a closed stdout treated as a reader who has seen enough.

use std::borrow::Cow;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::ValueEnum;
use datafusion::arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::arrow::util::pretty::pretty_format_batches;

/// Set when a write to stdout found its reader gone. Writers such as Arrow's CSV writer turn the
/// I/O error into a message, so the error chain alone cannot tell a closed pipe from a failure.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Stdout for every line the CLI prints; notes a closed pipe for [`is_closed_stdout`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stdout;

impl Write for Stdout {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        note_closed(io::stdout().lock().write(bytes))
    }

    fn flush(&mut self) -> io::Result<()> {
        note_closed(io::stdout().lock().flush())
    }
}

fn note_closed<T>(result: io::Result<T>) -> io::Result<T> {
    if result.as_ref().is_err_and(|error| error.kind() == io::ErrorKind::BrokenPipe) {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
    }
    result
}

/// Whether `error` is (or was caused by) stdout's reader going away.
pub(crate) fn is_closed_stdout(error: &anyhow::Error) -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
        || error.chain().any(|cause| {
            cause
                .downcast_ref::<io::Error>()
                .is_some_and(|io_error| io_error.kind() == io::ErrorKind::BrokenPipe)
        })
}

/// `text` with every control character (C0, DEL, C1) and every bidirectional override shown as an
/// escape, so that a value a device sent cannot move the cursor, recolour, retitle or clear the
/// terminal of the operator who prints it, nor reorder what is shown around it.
pub(crate) fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for character in text.chars() {
        match character {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            other if needs_escape(other) => escaped.push_str(&format!("\\u{{{:x}}}", u32::from(other))),
            other => escaped.push(other),
        }
    }
    Cow::Owned(escaped)
}

/// Like [`escape_controls`], but keeps line breaks and tabs: for multi-line text such as a job's
/// SQL, where the lines are the point.
pub(crate) fn escape_controls_keep_lines(text: &str) -> String {
    text.split('\n')
        .map(|line| {
            line.split('\t').map(|part| escape_controls(part).into_owned()).collect::<Vec<_>>().join("\t")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `value` as one line of JSON in which every character [`escape_controls`] would escape is a
/// `\uXXXX` escape: the same JSON value, but safe to show in a terminal. serde_json escapes only
/// the C0 controls; DEL, C1 (such as the one-byte CSI) and direction overrides pass through.
pub(crate) fn json_line(value: &serde_json::Value) -> String {
    let text = value.to_string();
    if !text.chars().any(needs_escape) {
        return text;
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for character in text.chars() {
        // Outside strings JSON has only ASCII punctuation, so every such character is in a string.
        if needs_escape(character) {
            escaped.push_str(&format!("\\u{:04x}", u32::from(character)));
        } else {
            escaped.push(character);
        }
    }
    escaped
}

fn needs_escape(character: char) -> bool {
    character.is_control() || matches!(character, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// How results are printed: `--format` of `sluice query` and `sluice jobs results`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    Table,
    Csv,
    Json,
}

pub(crate) fn print_batches(batches: &[RecordBatch], format: OutputFormat) -> anyhow::Result<()> {
    match format {
        OutputFormat::Table => {
            let printable = batches.iter().map(printable).collect::<anyhow::Result<Vec<_>>>()?;
            outln!("{}", pretty_format_batches(&printable)?);
        }
        // CSV and JSON are data for programs: values stay as they are, and the writers quote and
        // escape them by their formats' rules.
        OutputFormat::Csv => {
            let mut writer = datafusion::arrow::csv::Writer::new(Stdout);
            for batch in batches {
                writer.write(batch)?;
            }
        }
        OutputFormat::Json => {
            let mut writer = datafusion::arrow::json::LineDelimitedWriter::new(Stdout);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
    }
    Ok(())
}

/// `batch` with every value as the text a table shows, control characters escaped (nested
/// values included, since they are shown through the same text), nulls kept as nulls.
fn printable(batch: &RecordBatch) -> anyhow::Result<RecordBatch> {
    let options = FormatOptions::default();
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let formatter = ArrayFormatter::try_new(column.as_ref(), &options)?;
        let values: StringArray = (0..column.len())
            .map(|row| {
                (!column.is_null(row))
                    .then(|| escape_controls(&formatter.value(row).to_string()).into_owned())
            })
            .collect();
        fields.push(Field::new(escape_controls(field.name()), values.data_type().clone(), true));
        columns.push(Arc::new(values));
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
}

/// The first `limit` rows of `batches`.
pub(crate) fn first_rows(batches: &[RecordBatch], limit: usize) -> Vec<RecordBatch> {
    let mut remaining = limit;
    let mut taken = Vec::new();
    for batch in batches {
        if remaining == 0 {
            break;
        }
        let length = batch.num_rows().min(remaining);
        taken.push(batch.slice(0, length));
        remaining -= length;
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, ListArray};
    use datafusion::arrow::datatypes::Int64Type;

    fn strings(values: &[Option<&str>]) -> ArrayRef {
        Arc::new(StringArray::from(values.to_vec()))
    }

    #[test]
    fn control_characters_are_escaped_and_plain_text_is_untouched() {
        assert!(matches!(escape_controls("greenhouse-7 ü 21.5°C"), Cow::Borrowed(_)));
        assert_eq!(escape_controls("a\u{1b}]0;owned\u{7}b"), "a\\u{1b}]0;owned\\u{7}b");
        assert_eq!(escape_controls("\u{1b}[2J\u{9b}31m\u{7f}"), "\\u{1b}[2J\\u{9b}31m\\u{7f}");
        assert_eq!(escape_controls("one\ntwo\r\tthree"), "one\\ntwo\\r\\tthree");
        assert_eq!(escape_controls("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(escape_controls_keep_lines("SELECT 1\n\t-- \u{1b}[31m"), "SELECT 1\n\t-- \\u{1b}[31m");
    }

    #[test]
    fn table_cells_and_names_are_escaped_nested_values_too() {
        let list = ListArray::from_iter_primitive::<Int64Type, _, _>([Some(vec![Some(1), None]), None]);
        let batch = RecordBatch::try_from_iter([
            ("device\u{1b}[1m", strings(&[Some("d\u{1b}]2;title\u{7}"), None])),
            ("n", Arc::new(Int64Array::from(vec![Some(-1), None])) as ArrayRef),
            ("readings", Arc::new(list) as ArrayRef),
        ])
        .unwrap();
        let table = pretty_format_batches(&[printable(&batch).unwrap()]).unwrap().to_string();
        assert!(!table.chars().any(|character| character.is_control() && character != '\n'), "{table}");
        assert!(table.contains("d\\u{1b}]2;title\\u{7}"), "{table}");
        assert!(table.contains("device\\u{1b}[1m"), "{table}");
        assert!(table.contains("[1, ]"), "{table}");
        assert!(table.contains("| -1 "), "{table}");
    }

    #[test]
    fn json_lines_escape_what_serde_leaves_and_stay_the_same_value() {
        let value = serde_json::json!({"device_id": "d\u{1b}[2J\u{9b}31m\u{7f}\u{202e}x", "n": 1});
        let line = json_line(&value);
        assert!(!line.chars().any(needs_escape), "{line}");
        assert!(line.contains(r"\u009b31m\u007f\u202ex"), "{line}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&line).unwrap(), value);
    }

    #[test]
    fn first_rows_spans_batches() {
        let batch = RecordBatch::try_from_iter([("s", strings(&[Some("a"), Some("b"), Some("c")]))]).unwrap();
        let rows: Vec<usize> =
            first_rows(&[batch.clone(), batch.clone()], 4).iter().map(RecordBatch::num_rows).collect();
        assert_eq!(rows, [3, 1]);
        assert!(first_rows(&[batch], 0).is_empty());
    }
}
