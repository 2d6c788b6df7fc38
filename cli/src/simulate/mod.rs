//! `sluice simulate`: a fleet of devices sending telemetry to ingest over HTTP and MQTT, with
//! realistic signals and the faults real fleets have. It doubles as a load generator, and it
//! reports (and optionally logs) exactly what it sent and what ingest answered, so that tests
//! and the local run can check the pipeline against it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::ValueEnum;
use sluice_clock::now_micros;
use sluice_jobs::job::parse_duration_micros;

use self::faults::FaultRates;
use self::fleet::Fleet;
use self::senders::Sender;

mod faults;
mod fleet;
mod report;
mod senders;

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:\n  \
sluice simulate --devices 32 --history 10m                      # ten minutes of readings at once\n  \
sluice simulate --devices 100 --rate 2 --duration 5m --mqtt 127.0.0.1:1883\n  \
sluice simulate --history 1h --invalid 0.01 --late 0.02 --out-of-order 0.05 --duplicates 0.01 --report json")]
pub(crate) struct SimulateArgs {
    /// Ingest's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub ingest_url: String,
    /// Bearer token for ingest, when its authentication is on.
    #[arg(long)]
    pub token: Option<String>,
    /// MQTT broker (host:port). With it, a share of the devices publish over MQTT.
    #[arg(long, value_name = "HOST:PORT")]
    pub mqtt: Option<String>,
    /// Share of devices that publish over MQTT when --mqtt is given.
    #[arg(long, default_value_t = 0.5)]
    pub mqtt_share: f64,
    /// MQTT topic prefix: readings go to `<prefix>/<stream>/<device_id>`.
    #[arg(long, default_value = "sluice")]
    pub mqtt_topic_prefix: String,
    /// Stream to send to.
    #[arg(long, default_value = "telemetry")]
    pub stream: String,
    #[arg(long, default_value_t = 32)]
    pub devices: usize,
    /// Sites (farms, factories, depots) the devices are spread over.
    #[arg(long, default_value_t = 4)]
    pub sites: usize,
    /// Readings per device per second of event time.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// First send this much history (event times from now minus it up to now) as fast as ingest
    /// takes it, e.g. 10m or 2h.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub history: Duration,
    /// Then send live readings for this long, e.g. 5m.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub duration: Duration,
    /// Stop after this many readings in all.
    #[arg(long)]
    pub count: Option<u64>,
    /// Share of readings that are invalid (a wrong type, a missing field, a bad timestamp).
    #[arg(long, default_value_t = 0.0)]
    pub invalid: f64,
    /// Share of readings that arrive late: their event time is --late-by in the past.
    #[arg(long, default_value_t = 0.0)]
    pub late: f64,
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub late_by: Duration,
    /// Share of readings sent after the device's next reading.
    #[arg(long, default_value_t = 0.0)]
    pub out_of_order: f64,
    /// Largest device clock error; each device gets a fixed skew within plus or minus this.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub clock_skew: Duration,
    /// Share of readings sent twice, as a device retrying after a lost answer would.
    #[arg(long, default_value_t = 0.0)]
    pub duplicates: f64,
    /// Share of readings with an anomaly (a temperature spike, status FAULT).
    #[arg(long, default_value_t = 0.002)]
    pub anomalies: f64,
    /// Seed of the random generator: the same seed sends the same readings.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Device ids are `<prefix>-<site>-<n>`.
    #[arg(long, default_value = "sim")]
    pub device_prefix: String,
    /// Readings per HTTP request.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// HTTP requests in flight at once; more load ingest harder and let batches arrive out of
    /// order.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Write every reading sent here, one JSON object per line with its transport, faults and
    /// ingest's answer.
    #[arg(long, value_name = "PATH")]
    pub log: Option<PathBuf>,
    /// Summary on stdout at the end.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub report: ReportFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ReportFormat {
    Text,
    Json,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" || text.trim() == "0s" {
        return Ok(Duration::ZERO);
    }
    let micros = parse_duration_micros(text)?;
    Ok(Duration::from_micros(u64::try_from(micros).map_err(|_| format!("'{text}' is negative"))?))
}

pub(crate) fn run(args: &SimulateArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.sites == 0 || args.rate <= 0.0 || !args.rate.is_finite() {
        bail!("--devices, --sites and --rate must be greater than 0");
    }
    if args.history.is_zero() && args.duration.is_zero() && args.count.is_none() {
        bail!("nothing to send: give --history, --duration or --count");
    }
    for (name, share) in [
        ("--mqtt-share", args.mqtt_share),
        ("--invalid", args.invalid),
        ("--late", args.late),
        ("--out-of-order", args.out_of_order),
        ("--duplicates", args.duplicates),
        ("--anomalies", args.anomalies),
    ] {
        if !(0.0..=1.0).contains(&share) {
            bail!("{name} is a share of readings between 0 and 1, got {share}");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(simulate(args))
}

async fn simulate(args: &SimulateArgs) -> anyhow::Result<()> {
    let faults = FaultRates {
        invalid: args.invalid,
        late: args.late,
        late_by_micros: i64::try_from(args.late_by.as_micros()).unwrap_or(i64::MAX / 4),
        out_of_order: args.out_of_order,
        duplicates: args.duplicates,
        anomalies: args.anomalies,
    };
    let mut fleet = Fleet::new(args, args.mqtt.is_some(), faults);
    let num_mqtt_devices = fleet.num_mqtt_devices();
    let mut sender = Sender::connect(args).await?;
    let started = std::time::Instant::now();
    let step_micros = (1_000_000.0 / args.rate).max(1.0) as i64;
    let limit = args.count.unwrap_or(u64::MAX);
    let mut sent: u64 = 0;

    let now = now_micros();
    let history_micros = i64::try_from(args.history.as_micros()).unwrap_or(i64::MAX / 4);
    let mut event_time = now - history_micros;
    // History: as fast as ingest takes it.
    while event_time < now && sent < limit {
        sent += sender.send(fleet.tick(event_time), limit - sent).await?;
        event_time += step_micros;
    }
    // Live: one reading per device per step of wall time. Sending the history took time; the
    // readings of that time go out first (at once), so there is no gap up to the live ones. A
    // history-only run ends at the time its history was sent.
    let live_end = if args.duration.is_zero() {
        now_micros()
    } else {
        now + i64::try_from(args.duration.as_micros()).unwrap_or(i64::MAX / 4)
    };
    let unbounded_live = args.history.is_zero() && args.duration.is_zero();
    while sent < limit && (event_time < live_end || unbounded_live) {
        let wait = event_time - now_micros();
        if wait > 0 {
            tokio::time::sleep(Duration::from_micros(wait as u64)).await;
        }
        sent += sender.send(fleet.tick(event_time), limit - sent).await?;
        event_time += step_micros;
    }
    sender.send(fleet.drain(), u64::MAX).await?;
    let mut report = sender.finish().await?;
    report.elapsed = started.elapsed();
    match args.report {
        ReportFormat::Json => outln!("{}", report.to_json(args, num_mqtt_devices)),
        ReportFormat::Text => report.print_text(args, num_mqtt_devices)?,
    }
    Ok(())
}

/// Simulator flags parsed as the command line parses them, for the tests of its modules.
#[cfg(test)]
fn parse_args(extra: &[&str]) -> SimulateArgs {
    #[derive(Debug, clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: SimulateArgs,
    }
    let mut argv = vec!["simulate"];
    argv.extend_from_slice(extra);
    <Wrapper as clap::Parser>::parse_from(argv).args
}
