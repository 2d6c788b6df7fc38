//! `sluice-executor`: the executor service binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_executor::ExecutorConfig;
use sluice_shutdown::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs the SQL jobs submitted to the jobs topic over the lake, each complete window once.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Configuration: defaults, then --config FILE, then SLUICE_<SECTION>__<KEY> variables.\n\
Example: SLUICE_EXECUTOR__MAX_CONCURRENT_RUNS=4 sluice-executor --config deploy/config/executor.toml"
)]
struct Args {
    /// TOML configuration file.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    role_opt: Option<Role>,
}

/// Without a subcommand the process is an executor replica. A Ballista cluster, for jobs with
/// `-- engine: ballista`, is one `ballista-scheduler` and any number of `ballista-worker`s, all
/// started from this binary with the same configuration file (docs/distributed-queries.md).
#[derive(Debug, Subcommand)]
enum Role {
    /// Run the Ballista scheduler, listening on ballista.scheduler_bind.
    BallistaScheduler,
    /// Run a Ballista worker that reads the lake in [object_store] and takes tasks from
    /// ballista.scheduler_url.
    BallistaWorker,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sluice-executor: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config: ExecutorConfig = sluice_config::load(args.config.as_deref())?;
    if args.print_config {
        print!("{}", sluice_config::to_masked_toml(&config).context("failed to render the configuration")?);
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the runtime")?;
    runtime.block_on(async move {
        let telemetry =
            sluice_telemetry::init(&config.telemetry, "sluice-executor", env!("CARGO_PKG_VERSION"))
                .context("failed to start telemetry")?;
        let signals = sluice_shutdown::listen_for_signals().context("failed to listen for signals")?;
        let root = CancellationToken::new();
        // The loop itself lets runs finish within the grace period; allow it a little more.
        let grace = Duration::from_millis(config.shutdown.grace_period_ms + 5_000);
        let service = async {
            match args.role_opt {
                None => sluice_executor::run(config, root.clone()).await.map_err(anyhow::Error::from),
                Some(role) => run_ballista(role, &config, &root).await,
            }
        };
        let outcome = sluice_shutdown::run_until_stopped(service, root.clone(), grace, signals).await;
        let code = match outcome {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(error)) => {
                tracing::error!(error = format!("{error:#}"), "executor failed");
                ExitCode::FAILURE
            }
            Err(forced) => {
                tracing::warn!(?forced, "executor stopped before finishing shutdown");
                ExitCode::FAILURE
            }
        };
        telemetry.shutdown();
        Ok(code)
    })
}

/// A Ballista process stops with the signal that stops the binary: tasks it was running fail,
/// and their windows are retried like any failed attempt.
async fn run_ballista(role: Role, config: &ExecutorConfig, stop: &CancellationToken) -> anyhow::Result<()> {
    use sluice_executor::distributed;

    let running = async {
        let (store, _root) = sluice_lake::open_store(&config.object_store)?;
        match role {
            Role::BallistaScheduler => distributed::run_scheduler(&config.ballista, store).await?,
            Role::BallistaWorker => {
                distributed::run_worker(&config.ballista, store, config.query.memory_limit_bytes).await?
            }
        }
        Ok(())
    };
    tokio::select! {
        result = running => result,
        () = stop.cancelled() => Ok(()),
    }
}
