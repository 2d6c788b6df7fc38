//! `sluice simulate`: a fleet of devices sending telemetry to ingest over HTTP and MQTT, with
//! realistic signals and the faults real fleets have. It doubles as a load generator, and it
//! reports (and optionally logs) exactly what it sent and what ingest answered, so that tests
//! and the local run can check the pipeline against it.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::ValueEnum;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sluice_clock::now_micros;
use sluice_jobs::job::parse_duration_micros;

const DAY_MICROS: f64 = 86_400_000_000.0;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Transport {
    Http,
    Mqtt,
}

/// One message a device sends: a valid reading, or an invalid one.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub device_id: String,
    pub transport: Transport,
    pub body: Value,
    pub faults: Vec<&'static str>,
}

impl Outgoing {
    fn is_invalid(&self) -> bool {
        self.faults.contains(&"invalid")
    }
}

#[derive(Debug)]
struct Device {
    id: String,
    site: String,
    transport: Transport,
    seq: i64,
    battery: f64,
    skew_micros: i64,
    base_temperature: f64,
    rssi_base: i32,
    held_back_opt: Option<Outgoing>,
}

/// The fleet: devices and their signals, with faults applied. Pure: the caller decides the event
/// times and sends what comes out.
pub(crate) struct Fleet {
    devices: Vec<Device>,
    rng: StdRng,
    faults: FaultRates,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FaultRates {
    pub invalid: f64,
    pub late: f64,
    pub late_by_micros: i64,
    pub out_of_order: f64,
    pub duplicates: f64,
    pub anomalies: f64,
}

impl Fleet {
    pub(crate) fn new(args: &SimulateArgs, use_mqtt: bool, faults: FaultRates) -> Self {
        let mut rng = StdRng::seed_from_u64(args.seed);
        let num_mqtt = if use_mqtt { (args.devices as f64 * args.mqtt_share).round() as usize } else { 0 };
        let skew_micros = i64::try_from(args.clock_skew.as_micros()).unwrap_or(i64::MAX / 4);
        // Which devices use MQTT: a seeded shuffle, so that both transports serve every site.
        let mut order: Vec<usize> = (0..args.devices).collect();
        for index in (1..order.len()).rev() {
            order.swap(index, rng.random_range(0..=index));
        }
        let mqtt_devices: std::collections::BTreeSet<usize> = order.into_iter().take(num_mqtt).collect();
        let devices = (0..args.devices)
            .map(|index| {
                let site = index % args.sites.max(1);
                Device {
                    id: format!("{}-{}-{index:04}", args.device_prefix, site + 1),
                    site: format!("site-{}", site + 1),
                    transport: if mqtt_devices.contains(&index) { Transport::Mqtt } else { Transport::Http },
                    seq: 0,
                    battery: rng.random_range(0.5..1.0),
                    skew_micros: if skew_micros > 0 {
                        rng.random_range(-skew_micros..=skew_micros)
                    } else {
                        0
                    },
                    base_temperature: 12.0 + 3.0 * site as f64 + rng.random_range(-1.0..1.0),
                    rssi_base: -55 - 5 * (site as i32 % 6),
                    held_back_opt: None,
                }
            })
            .collect();
        Self { devices, rng, faults }
    }

    pub(crate) fn num_mqtt_devices(&self) -> usize {
        self.devices.iter().filter(|device| device.transport == Transport::Mqtt).count()
    }

    /// Every device's messages for one reading taken at `event_time_micros` (true time; the
    /// device's clock skew is added to what it reports).
    pub(crate) fn tick(&mut self, event_time_micros: i64) -> Vec<Outgoing> {
        let mut out = Vec::with_capacity(self.devices.len());
        let faults = self.faults;
        for index in 0..self.devices.len() {
            let rng = &mut self.rng;
            let device = &mut self.devices[index];
            device.seq += 1;
            let mut message_faults = Vec::new();
            let mut reported_ts = event_time_micros + device.skew_micros;
            if device.skew_micros != 0 {
                message_faults.push("clock_skew");
            }
            if rng.random_bool(faults.late.clamp(0.0, 1.0)) {
                reported_ts -= faults.late_by_micros;
                message_faults.push("late");
            }
            let body = if rng.random_bool(faults.invalid.clamp(0.0, 1.0)) {
                message_faults.push("invalid");
                invalid_reading(rng, device, reported_ts)
            } else {
                let anomaly = rng.random_bool(faults.anomalies.clamp(0.0, 1.0));
                if anomaly {
                    message_faults.push("anomaly");
                }
                reading(rng, device, event_time_micros, reported_ts, anomaly)
            };
            let message = Outgoing {
                device_id: device.id.clone(),
                transport: device.transport,
                body,
                faults: message_faults,
            };
            // A held-back reading goes out right after this one: out of order.
            let held_back_opt = device.held_back_opt.take();
            if held_back_opt.is_none() && rng.random_bool(faults.out_of_order.clamp(0.0, 1.0)) {
                let mut held = message;
                held.faults.push("out_of_order");
                device.held_back_opt = Some(held);
            } else {
                let duplicate = rng.random_bool(faults.duplicates.clamp(0.0, 1.0));
                if duplicate && !message.is_invalid() {
                    let mut retry = message.clone();
                    retry.faults.push("duplicate");
                    out.push(message);
                    out.push(retry);
                } else {
                    out.push(message);
                }
            }
            if let Some(held) = held_back_opt {
                out.push(held);
            }
        }
        out
    }

    /// Readings still held back for reordering, sent at the end so that none is lost.
    pub(crate) fn drain(&mut self) -> Vec<Outgoing> {
        self.devices.iter_mut().filter_map(|device| device.held_back_opt.take()).collect()
    }
}

/// Standard normal noise (Box-Muller); rand's own distributions crate is not worth a dependency.
fn gaussian(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn round(value: f64, decimals: i32) -> f64 {
    let factor = 10f64.powi(decimals);
    (value * factor).round() / factor
}

fn reading(
    rng: &mut StdRng,
    device: &mut Device,
    event_time_micros: i64,
    reported_ts: i64,
    anomaly: bool,
) -> Value {
    // Daily cycle: coolest around 03:00 UTC, warmest around 15:00.
    let day_fraction = event_time_micros.rem_euclid(DAY_MICROS as i64) as f64 / DAY_MICROS;
    let cycle = (std::f64::consts::TAU * (day_fraction - 0.375)).sin();
    let mut temperature = device.base_temperature + 6.0 * cycle + 0.3 * gaussian(rng);
    if anomaly {
        temperature += rng.random_range(15.0..25.0);
    }
    let humidity =
        (65.0 - 2.0 * (temperature - device.base_temperature) + 2.0 * gaussian(rng)).clamp(5.0, 100.0);
    device.battery -= 0.0004 + 0.0001 * rng.random_range(0.0..1.0);
    if device.battery < 0.05 {
        // Someone swapped the battery.
        device.battery = 1.0;
    }
    let status = if anomaly {
        "FAULT"
    } else if device.battery < 0.2 {
        "WARN"
    } else {
        "OK"
    };
    json!({
        "device_id": device.id,
        "ts": reported_ts,
        "seq": device.seq,
        "site": device.site,
        "temperature": round(temperature, 2),
        "humidity": round(humidity, 1),
        "battery": round(device.battery, 4),
        "rssi": device.rssi_base - rng.random_range(0..20),
        "status": status,
    })
}

/// A reading ingest must refuse, one of the mistakes device firmware makes.
fn invalid_reading(rng: &mut StdRng, device: &Device, reported_ts: i64) -> Value {
    match rng.random_range(0..3) {
        0 => json!({"device_id": device.id, "ts": reported_ts, "seq": device.seq, "temperature": "hot"}),
        1 => json!({"device_id": device.id, "ts": reported_ts, "site": device.site}),
        _ => json!({"device_id": device.id, "ts": "noon", "seq": device.seq}),
    }
}

/// What was sent and what came of it.
#[derive(Debug, Default)]
pub(crate) struct Report {
    http_sent: u64,
    http_accepted: u64,
    http_rejected: u64,
    mqtt_published: u64,
    rejected_by_reason: BTreeMap<String, u64>,
    faults: BTreeMap<&'static str, u64>,
    first_event_time_opt: Option<i64>,
    last_event_time_opt: Option<i64>,
    http_requests: u64,
    http_retries: u64,
    elapsed: Duration,
}

impl Report {
    fn to_json(&self, args: &SimulateArgs, num_mqtt_devices: usize) -> Value {
        json!({
            "devices": args.devices,
            "mqtt_devices": num_mqtt_devices,
            "sites": args.sites,
            "sent": self.http_sent + self.mqtt_published,
            "http": {
                "sent": self.http_sent,
                "accepted": self.http_accepted,
                "rejected": self.http_rejected,
                "requests": self.http_requests,
                "retries": self.http_retries,
            },
            "mqtt": {"published": self.mqtt_published},
            "rejected_by_reason": self.rejected_by_reason,
            "faults": self.faults,
            "first_event_time": self.first_event_time_opt.map(sluice_clock::format_micros),
            "last_event_time": self.last_event_time_opt.map(sluice_clock::format_micros),
            "elapsed_seconds": self.elapsed.as_secs_f64(),
            "readings_per_second": self.readings_per_second(),
        })
    }

    /// Sending rate over the whole run, answers included: with history, ingest's throughput.
    fn readings_per_second(&self) -> f64 {
        (self.http_sent + self.mqtt_published) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn print_text(&self, args: &SimulateArgs, num_mqtt_devices: usize) -> anyhow::Result<()> {
        outln!(
            "sent {} readings from {} devices at {} sites ({} over MQTT) in {:.1} s, {:.0} readings/s",
            self.http_sent + self.mqtt_published,
            args.devices,
            args.sites,
            num_mqtt_devices,
            self.elapsed.as_secs_f64(),
            self.readings_per_second()
        );
        outln!(
            "  HTTP: {} sent, {} accepted, {} rejected ({} requests, {} retried)",
            self.http_sent,
            self.http_accepted,
            self.http_rejected,
            self.http_requests,
            self.http_retries
        );
        for (reason, count) in &self.rejected_by_reason {
            outln!("    rejected {count}: {reason}");
        }
        if self.mqtt_published > 0 {
            outln!(
                "  MQTT: {} published and acknowledged by the MQTT broker (invalid ones go to the dead-letter topic)",
                self.mqtt_published
            );
        }
        if !self.faults.is_empty() {
            let faults: Vec<String> =
                self.faults.iter().map(|(fault, count)| format!("{fault} {count}")).collect();
            outln!("  faults: {}", faults.join(", "));
        }
        if let (Some(first), Some(last)) = (self.first_event_time_opt, self.last_event_time_opt) {
            outln!(
                "  event times {} to {}",
                sluice_clock::format_micros(first),
                sluice_clock::format_micros(last)
            );
        }
        Ok(())
    }
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

/// Sends messages: HTTP in batches, up to `--concurrency` requests at once (invalid readings
/// alone, so that a refused one holds up no valid neighbour), MQTT one publish per reading with
/// QoS 1.
struct Sender {
    target: HttpTarget,
    batch: usize,
    concurrency: usize,
    in_flight: tokio::task::JoinSet<anyhow::Result<PostOutcome>>,
    mqtt_opt: Option<MqttSender>,
    mqtt_topic_prefix: String,
    stream: String,
    log_opt: Option<std::io::BufWriter<std::fs::File>>,
    report: Report,
}

struct MqttSender {
    client: rumqttc::AsyncClient,
    acks: tokio::sync::mpsc::UnboundedReceiver<Result<(), String>>,
    pending: u64,
}

impl Sender {
    async fn connect(args: &SimulateArgs) -> anyhow::Result<Self> {
        let mqtt_opt = match &args.mqtt {
            None => None,
            Some(address) => Some(MqttSender::connect(address, args.seed).await?),
        };
        let log_opt = match &args.log {
            None => None,
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("failed to create {}", path.display()))?,
            )),
        };
        Ok(Self {
            target: HttpTarget {
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .context("failed to build the HTTP client")?,
                records_url: format!(
                    "{}/v1/streams/{}/records",
                    args.ingest_url.trim_end_matches('/'),
                    args.stream
                ),
                token_opt: args.token.clone(),
            },
            batch: args.batch.max(1),
            concurrency: args.concurrency.max(1),
            in_flight: tokio::task::JoinSet::new(),
            mqtt_opt,
            mqtt_topic_prefix: args.mqtt_topic_prefix.clone(),
            stream: args.stream.clone(),
            log_opt,
            report: Report::default(),
        })
    }

    /// Sends up to `limit` messages; returns how many.
    async fn send(&mut self, mut messages: Vec<Outgoing>, limit: u64) -> anyhow::Result<u64> {
        messages.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let num_messages = messages.len() as u64;
        for message in &messages {
            for fault in &message.faults {
                *self.report.faults.entry(fault).or_default() += 1;
            }
            if let Some(ts) = message.body["ts"].as_i64() {
                let first = self.report.first_event_time_opt.get_or_insert(ts);
                *first = (*first).min(ts);
                let last = self.report.last_event_time_opt.get_or_insert(ts);
                *last = (*last).max(ts);
            }
        }
        let (mqtt, http): (Vec<Outgoing>, Vec<Outgoing>) =
            messages.into_iter().partition(|message| message.transport == Transport::Mqtt);
        for message in &mqtt {
            let topic = format!("{}/{}/{}", self.mqtt_topic_prefix, self.stream, message.device_id);
            let mqtt_sender = self.mqtt_opt.as_mut().context("an MQTT device without --mqtt")?;
            mqtt_sender.publish(&topic, message.body.to_string()).await?;
            self.report.mqtt_published += 1;
            self.log(message, "published")?;
        }
        let (invalid, valid): (Vec<Outgoing>, Vec<Outgoing>) =
            http.into_iter().partition(Outgoing::is_invalid);
        let batches = valid
            .chunks(self.batch)
            .map(<[Outgoing]>::to_vec)
            .chain(invalid.into_iter().map(|message| vec![message]));
        for batch in batches {
            while self.in_flight.len() >= self.concurrency {
                self.settle_one().await?;
            }
            self.in_flight.spawn(post(self.target.clone(), batch));
        }
        Ok(num_messages)
    }

    /// Waits for one in-flight HTTP batch and books what ingest answered.
    async fn settle_one(&mut self) -> anyhow::Result<()> {
        let Some(joined) = self.in_flight.join_next().await else { return Ok(()) };
        let outcome = joined.context("an HTTP sender task failed")??;
        self.report.http_requests += outcome.requests;
        self.report.http_retries += outcome.retries;
        for (message, answer) in outcome.answers {
            self.report.http_sent += 1;
            let text = match answer {
                Answer::Accepted => {
                    self.report.http_accepted += 1;
                    "accepted".to_string()
                }
                Answer::Rejected(reason) => {
                    self.report.http_rejected += 1;
                    *self.report.rejected_by_reason.entry(reason.clone()).or_default() += 1;
                    format!("rejected: {reason}")
                }
            };
            self.log(&message, &text)?;
        }
        Ok(())
    }

    fn log(&mut self, message: &Outgoing, outcome: &str) -> anyhow::Result<()> {
        if let Some(log) = &mut self.log_opt {
            let transport = match message.transport {
                Transport::Http => "http",
                Transport::Mqtt => "mqtt",
            };
            let line = json!({
                "transport": transport,
                "faults": message.faults,
                "outcome": outcome,
                "reading": message.body,
            });
            writeln!(log, "{line}").context("failed to write the log")?;
        }
        Ok(())
    }

    async fn finish(mut self) -> anyhow::Result<Report> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        if let Some(mqtt) = self.mqtt_opt.take() {
            mqtt.wait_for_acks().await?;
        }
        if let Some(log) = &mut self.log_opt {
            log.flush().context("failed to write the log")?;
        }
        Ok(self.report)
    }
}

/// Where and how to post: cloned into each sender task.
#[derive(Clone)]
struct HttpTarget {
    client: reqwest::Client,
    records_url: String,
    token_opt: Option<String>,
}

enum Answer {
    Accepted,
    Rejected(String),
}

struct PostOutcome {
    answers: Vec<(Outgoing, Answer)>,
    requests: u64,
    retries: u64,
}

/// Posts readings as NDJSON. A 400 names the refused records: they are booked with their
/// reason and the rest is sent again, as a gateway would. 429, 503 and connection errors are
/// retried with backoff.
async fn post(target: HttpTarget, messages: Vec<Outgoing>) -> anyhow::Result<PostOutcome> {
    let mut outcome = PostOutcome { answers: Vec::with_capacity(messages.len()), requests: 0, retries: 0 };
    let mut remaining = messages;
    let mut attempt = 0u32;
    while !remaining.is_empty() {
        let body: String = remaining.iter().map(|message| format!("{}\n", message.body)).collect();
        let mut request =
            target.client.post(&target.records_url).header("content-type", "application/x-ndjson").body(body);
        if let Some(token) = &target.token_opt {
            request = request.bearer_auth(token);
        }
        outcome.requests += 1;
        let (status_opt, text) = match request.send().await {
            Ok(response) => {
                let status = response.status();
                (Some(status), response.text().await.unwrap_or_default())
            }
            Err(error) => (None, error.to_string()),
        };
        match status_opt {
            Some(status) if status.is_success() => {
                outcome.answers.extend(remaining.drain(..).map(|message| (message, Answer::Accepted)));
            }
            Some(status) if status.as_u16() == 400 => {
                let refused = refused_records(&text, remaining.len());
                if refused.is_empty() {
                    bail!("ingest refused a request without naming a record: {text}");
                }
                let mut kept = Vec::with_capacity(remaining.len());
                for (index, message) in remaining.into_iter().enumerate() {
                    match refused.get(&index) {
                        Some(reason) => outcome.answers.push((message, Answer::Rejected(reason.clone()))),
                        None => kept.push(message),
                    }
                }
                remaining = kept;
            }
            Some(status) if !(status.as_u16() == 429 || status.is_server_error()) => {
                bail!("ingest answered {status}: {text}");
            }
            _ if attempt >= 8 => bail!("ingest did not take readings after {attempt} retries: {text}"),
            _ => {
                attempt += 1;
                outcome.retries += 1;
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(6))).await;
            }
        }
    }
    Ok(outcome)
}

/// Index to reason of each record a 400 answer names
/// (`{"error": "...", "rejected": [{"index", "field", "reason"}], ...}`, docs/ingest-api.md).
fn refused_records(answer: &str, num_records: usize) -> BTreeMap<usize, String> {
    let mut refused = BTreeMap::new();
    let Ok(body) = serde_json::from_str::<Value>(answer) else { return refused };
    for error in body["rejected"].as_array().into_iter().flatten() {
        let Some(index) = error["index"].as_u64().and_then(|index| usize::try_from(index).ok()) else {
            continue;
        };
        if index < num_records {
            let field = error["field"].as_str().unwrap_or("record");
            let reason = error["reason"].as_str().unwrap_or("invalid");
            refused.entry(index).or_insert_with(|| format!("{field}: {reason}"));
        }
    }
    refused
}

impl MqttSender {
    async fn connect(address: &str, seed: u64) -> anyhow::Result<Self> {
        let (host, port) = address
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.to_string(), port.parse::<u16>().ok()?)))
            .with_context(|| format!("--mqtt takes host:port, got '{address}'"))?;
        let mut options =
            rumqttc::MqttOptions::new(format!("sluice-simulate-{seed}-{}", std::process::id()), host, port);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut event_loop) = rumqttc::AsyncClient::new(options, 1_000);
        let (ack_tx, acks) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match event_loop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        if ack_tx.send(Ok(())).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(error) => {
                        // rumqttc reconnects on the next poll and resends unacknowledged publishes.
                        let _ = ack_tx.send(Err(error.to_string()));
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(Self { client, acks, pending: 0 })
    }

    async fn publish(&mut self, topic: &str, payload: String) -> anyhow::Result<()> {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .context("failed to publish over MQTT")?;
        self.pending += 1;
        // Keep a bounded window of unacknowledged publishes.
        while self.pending > 500 {
            self.next_ack().await?;
        }
        Ok(())
    }

    async fn next_ack(&mut self) -> anyhow::Result<()> {
        let mut errors = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(30), self.acks.recv()).await {
                Ok(Some(Ok(()))) => {
                    self.pending -= 1;
                    return Ok(());
                }
                Ok(Some(Err(error))) => {
                    errors += 1;
                    if errors > 20 {
                        bail!("the MQTT broker is unreachable: {error}");
                    }
                }
                Ok(None) | Err(_) => bail!("no acknowledgement from the MQTT broker within 30 s"),
            }
        }
    }

    async fn wait_for_acks(mut self) -> anyhow::Result<()> {
        while self.pending > 0 {
            self.next_ack().await?;
        }
        let _ = self.client.disconnect().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn args(extra: &[&str]) -> SimulateArgs {
        let mut argv = vec!["simulate"];
        argv.extend_from_slice(extra);
        Wrapper::parse_from(argv).args
    }

    #[test]
    fn signals_stay_in_physical_ranges_and_sequences_increase() {
        let args = args(&["--devices", "8", "--sites", "3", "--history", "1h"]);
        let mut fleet = Fleet::new(&args, false, FaultRates::default());
        let mut last_seq: BTreeMap<String, i64> = BTreeMap::new();
        let start = 1_764_144_000_000_000; // 2025-11-26T08:00:00Z
        for step in 0..2_000 {
            for message in fleet.tick(start + step * 60_000_000) {
                let reading = &message.body;
                let temperature = reading["temperature"].as_f64().unwrap();
                assert!((-10.0..45.0).contains(&temperature), "{reading}");
                let battery = reading["battery"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&battery), "{reading}");
                let humidity = reading["humidity"].as_f64().unwrap();
                assert!((5.0..=100.0).contains(&humidity), "{reading}");
                let seq = reading["seq"].as_i64().unwrap();
                let previous = last_seq.insert(message.device_id.clone(), seq).unwrap_or(0);
                assert_eq!(seq, previous + 1, "{reading}");
                assert_eq!(reading["ts"].as_i64().unwrap(), start + step * 60_000_000);
            }
        }
        let sites: std::collections::BTreeSet<&str> =
            fleet.devices.iter().map(|device| device.site.as_str()).collect();
        assert_eq!(sites.len(), 3);
    }

    #[test]
    fn faults_come_at_their_rates_and_lose_no_reading() {
        let args = args(&["--devices", "20", "--history", "1h", "--seed", "7"]);
        let rates = FaultRates {
            invalid: 0.05,
            late: 0.1,
            late_by_micros: 300_000_000,
            out_of_order: 0.1,
            duplicates: 0.05,
            anomalies: 0.01,
        };
        let mut fleet = Fleet::new(&args, false, rates);
        let mut messages = Vec::new();
        for step in 0..500 {
            messages.extend(fleet.tick(step * 1_000_000));
        }
        messages.extend(fleet.drain());
        let count = |fault: &str| messages.iter().filter(|message| message.faults.contains(&fault)).count();
        let readings = 20 * 500;
        for (fault, rate) in [("invalid", 0.05), ("late", 0.1), ("duplicate", 0.05), ("anomaly", 0.01)] {
            let share = count(fault) as f64 / readings as f64;
            assert!((share - rate).abs() < rate * 0.3, "{fault}: {share} for {rate}");
        }
        assert!(count("out_of_order") > 500, "{}", count("out_of_order"));
        // Every (device, seq) is sent, once more for each duplicate.
        let distinct: std::collections::BTreeSet<(String, i64)> = messages
            .iter()
            .filter_map(|message| Some((message.device_id.clone(), message.body["seq"].as_i64()?)))
            .collect();
        let missing_seq = messages.iter().filter(|message| message.body["seq"].is_null()).count();
        assert_eq!(distinct.len() + missing_seq, readings);
        assert_eq!(messages.len(), readings + count("duplicate"));
        // Out of order: some device sends a higher seq before a lower one.
        let mut reordered = false;
        let mut last: BTreeMap<&str, i64> = BTreeMap::new();
        for message in &messages {
            if let Some(seq) = message.body["seq"].as_i64() {
                if last.get(message.device_id.as_str()).is_some_and(|&previous| previous > seq) {
                    reordered = true;
                }
                last.insert(&message.device_id, seq);
            }
        }
        assert!(reordered);
    }

    #[test]
    fn mqtt_devices_are_the_asked_share_and_spread_over_sites() {
        let args = args(&["--devices", "40", "--sites", "4", "--mqtt-share", "0.25", "--history", "1m"]);
        let fleet = Fleet::new(&args, true, FaultRates::default());
        assert_eq!(fleet.num_mqtt_devices(), 10);
        let mqtt_sites: std::collections::BTreeSet<&str> = fleet
            .devices
            .iter()
            .filter(|device| device.transport == Transport::Mqtt)
            .map(|device| device.site.as_str())
            .collect();
        assert!(mqtt_sites.len() >= 2, "{mqtt_sites:?}");
        assert_eq!(Fleet::new(&args, false, FaultRates::default()).num_mqtt_devices(), 0);
    }

    #[test]
    fn refused_records_are_read_from_ingest_answers() {
        let answer = r#"{"error":"2 of 3 records are invalid; nothing was written","rejected":[{"index":1,"field":"seq","reason":"required field is missing"},{"index":9,"field":"ts","reason":"x"}]}"#;
        let refused = refused_records(answer, 3);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[&1], "seq: required field is missing");
        assert!(refused_records("not json", 3).is_empty());
    }
}
