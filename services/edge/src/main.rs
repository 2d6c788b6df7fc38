//! `sluice-edge`: the site gateway binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sluice_edge::EdgeConfig;
use sluice_shutdown::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Takes a site's device readings over HTTP and MQTT and keeps them on disk for central ingest.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Configuration: defaults, then --config FILE, then SLUICE_<SECTION>__<KEY> variables.\n\
Example: SLUICE_SPOOL__DIRECTORY=/data/spool sluice-edge --config deploy/config/edge.toml"
)]
struct Args {
    /// TOML configuration file.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sluice-edge: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config: EdgeConfig = sluice_config::load(args.config.as_deref())?;
    if args.print_config {
        print!("{}", sluice_config::to_masked_toml(&config).context("failed to render the configuration")?);
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the runtime")?;
    runtime.block_on(async move {
        let telemetry = sluice_telemetry::init(&config.telemetry, "sluice-edge", env!("CARGO_PKG_VERSION"))
            .context("failed to start telemetry")?;
        let signals = sluice_shutdown::listen_for_signals().context("failed to listen for signals")?;
        let root = CancellationToken::new();
        let grace = Duration::from_millis(config.shutdown.grace_period_ms);
        let outcome =
            sluice_shutdown::run_until_stopped(sluice_edge::run(config, root.clone()), root, grace, signals)
                .await;
        let code = match outcome {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(error)) => {
                tracing::error!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "the edge gateway failed"
                );
                ExitCode::FAILURE
            }
            Err(forced) => {
                tracing::warn!(?forced, "the edge gateway stopped before finishing shutdown");
                ExitCode::FAILURE
            }
        };
        telemetry.shutdown();
        Ok(code)
    })
}
