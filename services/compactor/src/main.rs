//! `sluice-compactor`: the compactor service binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sluice_compactor::{CompactorConfig, ResetOutcome};
use sluice_shutdown::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Writes the stream topics to object storage as event-time-partitioned Parquet, exactly once.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Configuration: defaults, then --config FILE, then SLUICE_<SECTION>__<KEY> variables.\n\
Example: SLUICE_OBJECT_STORE__URL=s3://lake/telemetry sluice-compactor --config deploy/config/compactor.toml"
)]
struct Args {
    /// TOML configuration file.
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command_opt: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Record a new committed position for partitions of a stream, after the broker lost their
    /// records (the compactor logs "the lake's committed position is beyond the end of the
    /// partition" and /readyz is 503). A running compactor reads on from it within a second.
    #[command(after_help = "Example, after the broker was replaced by an empty one:\n  \
sluice-compactor --config compactor.toml reset-position --stream telemetry --to-offset 0\n\
See docs/operations.md, \"Broker lost a partition's records\".")]
    ResetPosition {
        /// Stream name (schemas/<stream>.avsc).
        #[arg(long)]
        stream: String,
        /// Kafka partition; repeat for several. Default: every partition with a flush in the log.
        #[arg(long = "partition", value_name = "N")]
        partitions: Vec<i32>,
        /// The offset to read from next: 0 (the start of a new, empty broker's log) reads every
        /// reading the broker holds now; the partition's end skips them.
        #[arg(long, value_name = "OFFSET", allow_negative_numbers = true)]
        to_offset: i64,
        /// Kept in the commit's commitInfo, for whoever reads the log later.
        #[arg(long, default_value = "broker lost the partition's records")]
        reason: String,
    },
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sluice-compactor: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config: CompactorConfig = sluice_config::load(args.config.as_deref())?;
    if args.print_config {
        print!("{}", sluice_config::to_masked_toml(&config).context("failed to render the configuration")?);
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the runtime")?;
    if let Some(Command::ResetPosition { stream, partitions, to_offset, reason }) = args.command_opt {
        return runtime.block_on(reset_position(&config, &stream, &partitions, to_offset, &reason));
    }
    runtime.block_on(async move {
        let telemetry =
            sluice_telemetry::init(&config.telemetry, "sluice-compactor", env!("CARGO_PKG_VERSION"))
                .context("failed to start telemetry")?;
        let signals = sluice_shutdown::listen_for_signals().context("failed to listen for signals")?;
        let root = CancellationToken::new();
        let grace = Duration::from_millis(config.shutdown.grace_period_ms);
        let outcome = sluice_shutdown::run_until_stopped(
            sluice_compactor::run(config, root.clone()),
            root,
            grace,
            signals,
        )
        .await;
        let code = match outcome {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(error)) => {
                tracing::error!(error = format!("{:#}", anyhow::Error::from(error)), "compactor failed");
                ExitCode::FAILURE
            }
            Err(forced) => {
                tracing::warn!(?forced, "compactor stopped before finishing shutdown");
                ExitCode::FAILURE
            }
        };
        telemetry.shutdown();
        Ok(code)
    })
}

async fn reset_position(
    config: &CompactorConfig,
    stream: &str,
    partitions: &[i32],
    to_offset: i64,
    reason: &str,
) -> anyhow::Result<ExitCode> {
    let lake = sluice_lake::open_lake(&config.object_store).context("failed to open the object store")?;
    let outcomes = sluice_compactor::reset_position(&lake, stream, partitions, to_offset, reason)
        .await
        .context("failed to reset the committed position")?;
    let mut code = ExitCode::SUCCESS;
    for outcome in outcomes {
        match outcome {
            ResetOutcome::Recorded(record) => println!(
                "{stream} partition {}: committed position {} -> {}",
                record.kafka_partition,
                record.reset_opt.as_ref().map_or(record.end_offset, |reset| reset.previous_end_offset),
                record.end_offset,
            ),
            ResetOutcome::NoCommits { partition } => println!(
                "{stream} partition {partition}: no committed position; the compactor reads it from the beginning already"
            ),
            ResetOutcome::Conflict { partition, position } => {
                eprintln!(
                    "{stream} partition {partition}: a compactor moved the position from {position} meanwhile; nothing \
                     recorded. Check the partition again and rerun if it is still beyond the broker's end"
                );
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}
