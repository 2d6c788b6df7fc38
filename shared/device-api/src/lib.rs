//! The device API that ingest and the edge gateway both serve: `POST /v1/streams/{stream}/records`
//! with `/healthz` and `/readyz`, and an MQTT bridge, validated against the stream schemas and
//! answered the same way. What differs is where accepted readings go, a [`RecordSink`]: ingest
//! produces them to Kafka, the edge gateway syncs them to its disk spool.

mod auth;
pub mod config;
pub mod forwarded;
mod http;
mod metrics;
mod mqtt;
mod records;
mod server;
mod sink;
mod tasks;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sluice_schema::SchemaRegistry;
use sluice_shutdown::CancellationToken;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use crate::config::DeviceApiConfig;
pub use crate::metrics::DeviceApiMetrics;
pub use crate::records::{EncodedBatch, EncodedRecord, RECORD_OVERHEAD_BYTES};
pub use crate::sink::{DeadLetter, DeadLetterWritten, RecordSink, SinkError};
pub use crate::tasks::{Supervisor, TaskFailure};
pub use crate::tls::{TlsError, client_config as tls_client_config};

#[derive(Debug, thiserror::Error)]
pub enum DeviceApiError {
    #[error("failed to listen on {address}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to set up TLS")]
    Tls(#[from] TlsError),
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// Starts the HTTP listener (and the MQTT bridge when `mqtt.enabled`) as tasks of `supervisor`,
/// storing accepted readings in `sink`; returns the listener's address (useful when the
/// configured port is 0). Both stop taking readings when `shutdown` is cancelled and end once
/// what they hold was answered.
pub async fn start<S: RecordSink + Clone + std::fmt::Debug>(
    config: DeviceApiConfig<'_>,
    schemas: SchemaRegistry,
    sink: S,
    metrics: Arc<DeviceApiMetrics>,
    supervisor: &Supervisor,
    shutdown: CancellationToken,
) -> Result<SocketAddr, DeviceApiError> {
    let record_rules = records::RecordRules {
        max_records: config.http.max_records_per_request,
        // Checked by `validate`; a config that skipped it gets no lower bound rather than a panic.
        earliest_event_micros: config.validation.earliest_event_micros().unwrap_or(i64::MIN),
        max_future_skew_micros: config.validation.max_future_skew_micros(),
        max_message_bytes: sink.max_message_bytes(),
    };
    if config.mqtt.enabled {
        let tls_opt = tls::mqtt_client_config(config.mqtt)?;
        let bridge = mqtt::MqttBridge {
            config: config.mqtt.clone(),
            record_rules,
            schemas: schemas.clone(),
            sink: sink.clone(),
            metrics: Arc::clone(&metrics),
            tls_opt,
        };
        supervisor.spawn("mqtt_bridge", bridge.run(shutdown.clone()));
    }
    let http_config = config.http;
    let forwarded = forwarded::ForwardedValidator::new(&schemas);
    let state = Arc::new(http::HttpState {
        http: http_config.clone(),
        record_rules,
        schemas,
        authorizer: auth::Authorizer::new(config.auth),
        device_certificates_required: http_config.tls_client_ca_path.is_some()
            && http_config.tls_client_certificates == config::ClientCertificates::Required,
        forwarded,
        sink,
        metrics: Arc::clone(&metrics),
        supervisor: supervisor.clone(),
        in_flight_bytes: Semaphore::new(http_config.max_in_flight_bytes.min(Semaphore::MAX_PERMITS)),
        shutting_down: Default::default(),
    });
    let router = http::router(Arc::clone(&state));
    let address = http_config.listen_address;
    let listener =
        TcpListener::bind(address).await.map_err(|source| DeviceApiError::Bind { address, source })?;
    let local_addr = listener.local_addr().map_err(|source| DeviceApiError::Bind { address, source })?;
    let tls_opt = tls::load_server_config(http_config)?.map(tokio_rustls::TlsAcceptor::from);
    let limits = server::ConnectionLimits::from_config(http_config);
    warn_if_file_descriptors_short(limits.max_connections);
    supervisor.spawn("http_server", async move {
        let closing = async {
            shutdown.cancelled().await;
            state.shutting_down.store(true, Ordering::Relaxed);
            tracing::info!("HTTP listener closing; draining requests in flight");
        };
        let serving = server::serve(listener, tls_opt, router, limits, metrics, shutdown.clone());
        let (_, served) = tokio::join!(closing, serving);
        served.map_err(DeviceApiError::Serve)
    });
    Ok(local_addr)
}

/// Warns when the soft open-file limit is below what `http.max_connections` needs: past it,
/// accepting fails with "Too many open files" before the connection limit is reached.
fn warn_if_file_descriptors_short(max_connections: usize) {
    // Kafka connections, the listener, logs and the runtime need some beyond the connections.
    const OTHER_DESCRIPTORS: usize = 128;
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else { return };
    let soft_limit_opt = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|value| value.parse::<usize>().ok());
    if let Some(soft_limit) = soft_limit_opt
        && soft_limit < max_connections.saturating_add(OTHER_DESCRIPTORS)
    {
        tracing::warn!(
            soft_limit,
            max_connections,
            "the open-file limit (ulimit -n) is below http.max_connections plus {OTHER_DESCRIPTORS}: raise it or lower http.max_connections"
        );
    }
}
