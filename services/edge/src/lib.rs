//! `sluice-edge`, the gateway a site runs so that readings survive its uplink going down
//! (issue #19). Devices talk to it exactly as to central ingest (the same HTTP API, MQTT bridge,
//! validation and answers, from `sluice-device-api`); a reading is acknowledged once it is
//! synced to the gateway's disk spool ([`spool`]). Forwarding the spool to central ingest
//! follows the plan in docs/design/edge-gateway.md.

pub mod config;
mod dead_letters;
mod forward;
mod metrics;
mod sink;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_device_api::{DeviceApiError, DeviceApiMetrics, Supervisor};
use sluice_schema::{SchemaError, SchemaRegistry};
use sluice_shutdown::{CancellationToken, TaskTracker};

pub use crate::config::EdgeConfig;
pub use crate::dead_letters::{CURRENT_FILE as DEAD_LETTER_FILE, PREVIOUS_FILE as PREVIOUS_DEAD_LETTER_FILE};
pub use crate::forward::ForwardError;
use crate::spool::{Spool, SpoolConfig, SpoolError};
pub use sluice_device_api::forwarded;
pub use sluice_spool as spool;

/// How often the spool's health and size are looked at between appends.
const SPOOL_WATCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("failed to load stream schemas")]
    Schemas(#[from] SchemaError),
    #[error("failed to open the spool")]
    Spool(#[from] SpoolError),
    #[error("failed to open the dead-letter log in {path}")]
    DeadLetters {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start the device API")]
    DeviceApi(#[from] DeviceApiError),
    #[error("failed to set up forwarding to central ingest")]
    Forward(#[source] ForwardSetupError),
    #[error("the background task {task} failed: {cause}")]
    TaskFailed { task: &'static str, cause: String },
}

pub type Result<T, E = EdgeError> = std::result::Result<T, E>;

/// A started gateway.
#[derive(Debug)]
pub struct RunningEdge {
    local_addr: SocketAddr,
    spool: Spool,
    tracker: TaskTracker,
    supervisor: Supervisor,
}

impl RunningEdge {
    /// The HTTP listener's address (useful when the configured port is 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The spool the gateway appends to: what it acknowledged and has not forwarded.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Waits until shutdown completed; a background task that failed (and so started the
    /// shutdown) makes this an error.
    pub async fn wait(self) -> Result<()> {
        self.tracker.close();
        self.tracker.wait().await;
        match self.supervisor.failure() {
            Some(failure) => Err(EdgeError::TaskFailed { task: failure.task, cause: failure.cause }),
            None => Ok(()),
        }
    }
}

/// Runs the gateway until `shutdown` is cancelled and shutdown completed.
pub async fn run(config: EdgeConfig, shutdown: CancellationToken) -> Result<()> {
    start(config, shutdown).await?.wait().await
}

/// Loads schemas, opens (and recovers) the spool, and starts serving devices.
pub async fn start(config: EdgeConfig, shutdown: CancellationToken) -> Result<RunningEdge> {
    let schemas = SchemaRegistry::load_directory(&config.schemas.directory)?;
    let spool_config = SpoolConfig {
        directory: config.spool.directory.clone(),
        max_bytes: config.spool.max_bytes,
        segment_bytes: config.spool.segment_bytes,
        full_policy: config.spool.full_policy,
    };
    // Recovery reads every spool file: blocking work.
    let spool = tokio::task::spawn_blocking(move || Spool::open(spool_config))
        .await
        .map_err(|error| SpoolError::Broken(format!("opening the spool failed: {error}")))??;
    let dead_letters =
        dead_letters::DeadLetterLog::open(&config.spool.directory, config.spool.max_dead_letter_bytes)
            .map_err(|source| EdgeError::DeadLetters {
                path: config.spool.directory.display().to_string(),
                source,
            })?;
    let edge_metrics = Arc::new(metrics::EdgeMetrics::new(config.spool.max_bytes));
    edge_metrics.record_usage(&spool);
    let (bytes, batches) = spool.usage();
    tracing::info!(directory = %config.spool.directory.display(), bytes, batches, "spool open");

    let dead_letters = Arc::new(dead_letters);
    let forwarder_opt = if config.forward.url.is_empty() {
        tracing::warn!("forward.url is empty: readings stay in the spool until it is set");
        None
    } else {
        Some(forwarder(&config.forward, spool.clone(), Arc::clone(&dead_letters), Arc::clone(&edge_metrics))?)
    };

    let tracker = TaskTracker::new();
    // The service's own tasks stop on this child: a start that fails half way stops what it
    // began (and so lets go of the spool) without cancelling the caller's token.
    let tasks_shutdown = shutdown.child_token();
    let device_api_metrics = Arc::new(DeviceApiMetrics::new("edge"));
    let supervisor =
        Supervisor::new(tracker.clone(), tasks_shutdown.clone(), Arc::clone(&device_api_metrics));
    let sink = sink::SpoolSink {
        spool: spool.clone(),
        dead_letters,
        metrics: Arc::clone(&edge_metrics),
        max_message_bytes: config.forward.max_message_bytes,
    };
    let started = sluice_device_api::start(
        config.device_api(),
        schemas,
        sink,
        device_api_metrics,
        &supervisor,
        tasks_shutdown.clone(),
    )
    .await;
    let local_addr = match started {
        Ok(local_addr) => local_addr,
        Err(error) => {
            tasks_shutdown.cancel();
            return Err(error.into());
        }
    };
    supervisor
        .spawn("spool_watch", watch_spool(spool.clone(), Arc::clone(&edge_metrics), tasks_shutdown.clone()));
    if let Some(forwarder) = forwarder_opt {
        supervisor.spawn("forwarder", forwarder.run(tasks_shutdown.clone()));
    }
    tracing::info!(%local_addr, tls = config.http.tls_cert_path.is_some(), mqtt = config.mqtt.enabled, "edge gateway ready");
    Ok(RunningEdge { local_addr, spool, tracker, supervisor })
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardSetupError {
    #[error("failed to set up TLS to central ingest")]
    Tls(#[from] sluice_device_api::TlsError),
    #[error("forward.token is not a valid HTTP header value")]
    Token,
    #[error("the gateway's name '{0}' is not usable in an edge id: set forward.edge_id")]
    EdgeId(String),
    #[error("failed to build the HTTP client")]
    Client(#[from] reqwest::Error),
}

fn forwarder(
    settings: &config::ForwardConfig,
    spool: Spool,
    dead_letters: Arc<dead_letters::DeadLetterLog>,
    metrics: Arc<metrics::EdgeMetrics>,
) -> Result<forward::Forwarder> {
    let setup = |error: ForwardSetupError| EdgeError::Forward(error);
    let identity_opt = settings.tls_cert_path.as_deref().zip(settings.tls_key_path.as_deref());
    let tls = sluice_device_api::tls_client_config(
        settings.ca_cert_path.as_deref(),
        "forward.ca_cert_path",
        identity_opt,
    )
    .map_err(|error| setup(error.into()))?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(Arc::unwrap_or_clone(tls))
        .timeout(Duration::from_millis(settings.request_timeout_ms))
        .connect_timeout(Duration::from_millis(settings.request_timeout_ms.min(10_000)))
        .build()
        .map_err(|error| setup(error.into()))?;
    let authorization_opt = if settings.token.expose().is_empty() {
        None
    } else {
        let mut value =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", settings.token.expose()))
                .map_err(|_| setup(ForwardSetupError::Token))?;
        value.set_sensitive(true);
        Some(value)
    };
    let name = if settings.edge_id.is_empty() { host_name() } else { settings.edge_id.clone() };
    let edge_id = reqwest::header::HeaderValue::from_str(&format!("{name}.{:016x}", spool.incarnation()))
        .map_err(|_| setup(ForwardSetupError::EdgeId(name.clone())))?;
    tracing::info!(edge_id = ?edge_id, "forwarding to central ingest");
    Ok(forward::Forwarder {
        spool,
        client,
        streams_url: format!("{}/v1/streams/", settings.url.trim_end_matches('/')),
        authorization_opt,
        edge_id,
        settings: settings.clone(),
        dead_letters,
        metrics,
    })
}

/// Keeps the spool gauges current, and stops the gateway once the spool stopped taking frames:
/// only a restart recovers it (what a failed sync left cannot be vouched for), and a process
/// that exits is restarted by systemd or Kubernetes, while one that stays up refusing
/// everything is not.
async fn watch_spool(
    spool: Spool,
    metrics: Arc<metrics::EdgeMetrics>,
    shutdown: CancellationToken,
) -> std::result::Result<(), SpoolError> {
    loop {
        metrics.record_usage(&spool);
        if let Some(why) = spool.broken_reason() {
            return Err(SpoolError::Broken(why));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(SPOOL_WATCH_INTERVAL) => {}
        }
    }
}

/// The machine's host name, cut to what an edge id may hold; `edge` when there is none.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cleaned: String = name
        .trim()
        .chars()
        .filter(|character| character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-'))
        .take(64)
        .collect();
    if cleaned.is_empty() { "edge".to_string() } else { cleaned }
}
