//! `spool-bench`: measures the edge gateway's spool (`sluice-spool`, a segmented append-only log
//! with group commit) against redb, fjall and SQLite doing the same durable job, so that issue
//! #19's choice of spool store rests on numbers. Local disk only; see README.md.

mod engines;
mod report;
mod workload;

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::report::{AppendRow, DrainRow};
use crate::workload::{AppendCase, Grouping, StoreKind};

const USAGE: &str = "usage: spool-bench [--directory PATH] [--runs N] [--scale FACTOR]

  --directory PATH  where the stores are created, on the disk to measure; must not exist or be
                    empty, and is removed afterwards (default /work/spool-bench-tmp)
  --runs N          runs of the whole set, in alternating store order (default 3)
  --scale FACTOR    multiplies every case's number of appends and the drain backlog (default 1)";

#[derive(Debug)]
struct Args {
    directory: PathBuf,
    num_runs: usize,
    scale: f64,
}

/// The arguments, or none when only help was asked for.
fn parse_args() -> anyhow::Result<Option<Args>> {
    let mut parsed = Args { directory: PathBuf::from("/work/spool-bench-tmp"), num_runs: 3, scale: 1.0 };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value\n\n{USAGE}"));
        match flag.as_str() {
            "--directory" => parsed.directory = PathBuf::from(value()?),
            "--runs" => {
                parsed.num_runs =
                    value()?.parse().context("--runs takes a whole number of runs, at least 1")?
            }
            "--scale" => {
                parsed.scale = value()?.parse().context("--scale takes a positive factor, like 0.1")?
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => anyhow::bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    anyhow::ensure!(parsed.num_runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(parsed.scale > 0.0, "--scale must be positive");
    Ok(Some(parsed))
}

/// The append cases at scale 1, each sized so that a store takes 2 to 7 seconds on a virtual disk
/// that syncs in about 0.15 ms (the machine README.md describes).
fn append_cases(scale: f64) -> Vec<AppendCase> {
    let scaled = |num_appends: usize| ((num_appends as f64 * scale) as usize).max(64);
    let mut cases = Vec::new();
    for (payload_bytes, counts) in [(200, [20_000, 150_000, 400_000]), (8 * 1024, [12_000, 50_000, 80_000])] {
        for (num_writers, num_appends) in [1, 16, 64].into_iter().zip(counts) {
            cases.push(AppendCase {
                payload_bytes,
                num_writers,
                num_appends: scaled(num_appends),
                grouping: Grouping::Grouped,
            });
        }
    }
    for (payload_bytes, num_appends) in [(200, 20_000), (8 * 1024, 12_000)] {
        cases.push(AppendCase {
            payload_bytes,
            num_writers: 16,
            num_appends: scaled(num_appends),
            grouping: Grouping::OnePerAppend,
        });
    }
    cases
}

const DRAIN_BACKLOG_FRAMES: usize = 100_000;
const DRAIN_PAYLOAD_BYTES: usize = 200;
const DRAIN_BATCH_FRAMES: usize = 500;

/// The scratch directory, removed when the run ends however it ends.
#[derive(Debug)]
struct Scratch {
    directory: PathBuf,
}

impl Scratch {
    fn create(directory: &Path) -> anyhow::Result<Self> {
        // Only a directory this run made is removed afterwards: never someone's files.
        if let Ok(mut entries) = std::fs::read_dir(directory) {
            anyhow::ensure!(
                entries.next().is_none(),
                "{} is not empty: pick another --directory, or empty it",
                directory.display()
            );
        }
        std::fs::create_dir_all(directory)
            .with_context(|| format!("failed to create {}", directory.display()))?;
        Ok(Self { directory: directory.to_path_buf() })
    }

    /// A fresh subdirectory for one measurement.
    fn fresh(&self, name: &str) -> PathBuf {
        self.directory.join(name)
    }

    /// Removes a measurement's files and flushes the file system, so that their write-back and
    /// discards are not charged to the next store.
    fn clear(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::remove_dir_all(path).with_context(|| format!("failed to remove {}", path.display()))?;
        let synced = std::process::Command::new("sync").status().context("failed to run sync")?;
        anyhow::ensure!(synced.success(), "sync failed: {synced}");
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.directory) {
            eprintln!("failed to remove {}: {error}", self.directory.display());
        }
    }
}

fn main() -> anyhow::Result<()> {
    let Some(args) = parse_args()? else { return Ok(()) };
    let scratch = Scratch::create(&args.directory)?;
    // Two workers: the machine's cores, as the gateway would have.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .context("failed to build the runtime")?;
    let cases = append_cases(args.scale);
    let backlog_frames = ((DRAIN_BACKLOG_FRAMES as f64 * args.scale) as usize).max(DRAIN_BATCH_FRAMES);

    let mut append_rows: Vec<AppendRow> = Vec::new();
    for case in &cases {
        for kind in StoreKind::ALL {
            // The spool's group commit is built in: there is no ungrouped spool to measure.
            if kind == StoreKind::Spool && case.grouping == Grouping::OnePerAppend {
                continue;
            }
            append_rows.push(AppendRow { case: *case, kind, outcomes: Vec::new() });
        }
    }
    let mut drain_rows: Vec<DrainRow> = StoreKind::ALL
        .into_iter()
        .chain([StoreKind::SpoolSmallSegments])
        .map(|kind| DrainRow { kind, outcomes: Vec::new() })
        .collect();
    let load_at_start = load_average();

    for run in 0..args.num_runs {
        // Alternating order, so that neither end of a run (a cold or a busy disk) favours a store.
        let mut order = StoreKind::ALL.to_vec();
        if run % 2 == 1 {
            order.reverse();
        }
        for (case_index, case) in cases.iter().enumerate() {
            for kind in &order {
                let Some(row) = append_rows.iter_mut().find(|row| row.case == *case && row.kind == *kind)
                else {
                    continue;
                };
                let directory = scratch.fresh(&format!("run{run}-case{case_index}-{}", kind.name()));
                let outcome = workload::measure_appends(&runtime, *kind, &directory, *case)
                    .with_context(|| format!("failed to measure {} on {case:?}", kind.name()))?;
                scratch.clear(&directory)?;
                eprintln!(
                    "run {run}: {:>12} {:>5} B x {:>2} writers {:?}: {:>8.0} appends/s, p50 {:.2} ms, p99 {:.2} ms",
                    kind.name(),
                    case.payload_bytes,
                    case.num_writers,
                    case.grouping,
                    outcome.appends_per_second(),
                    outcome.latency_p50.as_secs_f64() * 1e3,
                    outcome.latency_p99.as_secs_f64() * 1e3,
                );
                row.outcomes.push(outcome);
            }
        }
        let mut drain_order = order.clone();
        let spool_position = drain_order.iter().position(|kind| *kind == StoreKind::Spool).unwrap_or(0);
        drain_order.insert(spool_position + 1, StoreKind::SpoolSmallSegments);
        for (kind_index, kind) in drain_order.iter().enumerate() {
            let directory = scratch.fresh(&format!("run{run}-drain{kind_index}"));
            let outcome = workload::measure_drain(
                &runtime,
                *kind,
                &directory,
                backlog_frames,
                DRAIN_PAYLOAD_BYTES,
                DRAIN_BATCH_FRAMES,
            )
            .with_context(|| format!("failed to measure {}'s drain", kind.name()))?;
            scratch.clear(&directory)?;
            eprintln!(
                "run {run}: {:>12} drain: {:.0} frames/s, {:.2}x on disk, {} bytes left",
                kind.name(),
                outcome.frames_per_second(),
                outcome.space_amplification(),
                outcome.disk_bytes_after_drain,
            );
            if let Some(row) = drain_rows.iter_mut().find(|row| row.kind == *kind) {
                row.outcomes.push(outcome);
            }
        }
    }

    print!("{}", report::render(&append_rows, &drain_rows, args.num_runs, backlog_frames));
    // Another build or test run on the machine shares its disk and cores: say how busy it was.
    println!("\nload average (1, 5, 15 min) at start: {load_at_start}; at end: {}", load_average());
    Ok(())
}

fn load_average() -> String {
    match std::fs::read_to_string("/proc/loadavg") {
        Ok(text) => text.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        Err(error) => format!("unknown ({error})"),
    }
}
