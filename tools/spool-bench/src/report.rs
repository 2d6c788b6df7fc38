//! The results as Markdown tables: the median over runs, and each run's figure beside it so
//! that the spread shows.

use std::fmt::Write as _;

use crate::workload::{AppendCase, AppendOutcome, DrainOutcome, Grouping, StoreKind};

#[derive(Debug)]
pub(crate) struct AppendRow {
    pub(crate) case: AppendCase,
    pub(crate) kind: StoreKind,
    /// One per run.
    pub(crate) outcomes: Vec<AppendOutcome>,
}

#[derive(Debug)]
pub(crate) struct DrainRow {
    pub(crate) kind: StoreKind,
    /// One per run.
    pub(crate) outcomes: Vec<DrainOutcome>,
}

pub(crate) fn render(
    append_rows: &[AppendRow],
    drain_rows: &[DrainRow],
    num_runs: usize,
    backlog_frames: usize,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### Appends: each writer waits until its append is durable (median of {num_runs} runs)\n"
    );
    let _ = writeln!(
        out,
        "| payload | writers | commits | store | appends/s | MB/s | p50 ms | p99 ms | appends/s each run |"
    );
    let _ = writeln!(out, "|---|---|---|---|---:|---:|---:|---:|---|");
    for row in append_rows {
        let grouping = match row.case.grouping {
            Grouping::Grouped => "grouped",
            Grouping::OnePerAppend => "one per append",
        };
        let per_run: Vec<String> =
            row.outcomes.iter().map(|outcome| format!("{:.0}", outcome.appends_per_second())).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {grouping} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
            payload_label(row.case.payload_bytes),
            row.case.num_writers,
            row.kind.name(),
            median(row.outcomes.iter().map(AppendOutcome::appends_per_second)),
            median(row.outcomes.iter().map(AppendOutcome::megabytes_per_second)),
            median(row.outcomes.iter().map(|outcome| outcome.latency_p50.as_secs_f64() * 1e3)),
            median(row.outcomes.iter().map(|outcome| outcome.latency_p99.as_secs_f64() * 1e3)),
            per_run.join(" / "),
        );
    }
    let _ = writeln!(
        out,
        "\n### Drain: {backlog_frames} frames of 200 B, read oldest first 500 at a time, each batch deleted durably (median of {num_runs} runs)\n"
    );
    let _ = writeln!(
        out,
        "| store | backlog written in s | on disk after backlog MB | space amplification | drain frames/s | on disk after drain MB | drain frames/s each run |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
    for row in drain_rows {
        let per_run: Vec<String> =
            row.outcomes.iter().map(|outcome| format!("{:.0}", outcome.frames_per_second())).collect();
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.1} | {:.2}x | {:.0} | {:.2} | {} |",
            row.kind.name(),
            median(row.outcomes.iter().map(|outcome| outcome.fill_elapsed.as_secs_f64())),
            median(row.outcomes.iter().map(|outcome| outcome.disk_bytes_after_fill as f64 / 1e6)),
            median(row.outcomes.iter().map(DrainOutcome::space_amplification)),
            median(row.outcomes.iter().map(DrainOutcome::frames_per_second)),
            median(row.outcomes.iter().map(|outcome| outcome.disk_bytes_after_drain as f64 / 1e6)),
            per_run.join(" / "),
        );
    }
    out
}

fn payload_label(payload_bytes: usize) -> String {
    if payload_bytes.is_multiple_of(1024) {
        format!("{} KiB", payload_bytes / 1024)
    } else {
        format!("{payload_bytes} B")
    }
}

/// The median; the mean of the middle two for an even count.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) { (sorted[middle - 1] + sorted[middle]) / 2.0 } else { sorted[middle] }
}
