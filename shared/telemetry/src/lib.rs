//! Logs, traces and metrics for the Sluice services. Logs go to stdout through `tracing`
//! (pretty for people, JSON for log collectors); when an OTLP endpoint is configured, spans and
//! metrics are also exported over OTLP (gRPC or HTTP) with the resource attributes
//! `service.name`, `service.version` and `service.instance.id`.

use std::io::IsTerminal as _;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use sluice_config::ConfigIssue;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use opentelemetry::global::meter;
pub use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, UpDownCounter};

/// Histogram bucket bounds for latencies in seconds, from a millisecond to ten seconds. The SDK's
/// default bounds (0 to 10,000) suit milliseconds and would put every request in the first bucket.
pub const LATENCY_BUCKETS_SECONDS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Bucket bounds for work that takes seconds to an hour (flushes, job runs).
pub const DURATION_BUCKETS_SECONDS: &[f64] =
    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// Bucket bounds for file sizes in bytes, 64 KiB to 1 GiB: small files are what hurts scans.
pub const FILE_SIZE_BUCKETS_BYTES: &[f64] = &[
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    33_554_432.0,
    67_108_864.0,
    134_217_728.0,
    268_435_456.0,
    536_870_912.0,
    1_073_741_824.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    Grpc,
    Http,
}

/// The `[telemetry]` section of every service's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `pretty` or `json`.
    pub log_format: LogFormat,
    /// A tracing filter directive, for example `info` or `info,sluice_ingest=debug`.
    pub log_level: String,
    /// OTLP collector endpoint, for example `http://127.0.0.1:4317` (gRPC) or
    /// `http://127.0.0.1:4318` (HTTP; `/v1/traces` and `/v1/metrics` are appended). Empty: no export.
    pub otlp_endpoint: String,
    pub otlp_protocol: OtlpProtocol,
    /// How often metrics are pushed to the collector.
    pub metrics_interval_ms: u64,
    /// `service.instance.id`; empty means a random id per process (a pod name is a good choice).
    pub instance_id: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Pretty,
            log_level: "info".to_string(),
            otlp_endpoint: String::new(),
            otlp_protocol: OtlpProtocol::Grpc,
            metrics_interval_ms: 10_000,
            instance_id: String::new(),
        }
    }
}

impl TelemetryConfig {
    /// Problems with this section, keyed under `prefix` (usually `telemetry`).
    pub fn validate(&self, prefix: &str) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if let Err(error) = EnvFilter::try_new(&self.log_level) {
            issues.push(ConfigIssue::new(
                format!("{prefix}.log_level"),
                format!("not a valid filter directive: {error}"),
            ));
        }
        let endpoint = &self.otlp_endpoint;
        if !(endpoint.is_empty() || endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            issues.push(ConfigIssue::new(
                format!("{prefix}.otlp_endpoint"),
                format!("must start with http:// or https://, got '{}'", self.otlp_endpoint),
            ));
        }
        if self.metrics_interval_ms == 0 {
            issues.push(ConfigIssue::new(format!("{prefix}.metrics_interval_ms"), "must be greater than 0"));
        }
        issues
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter '{directive}'")]
    LogFilter {
        directive: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("failed to build the OTLP {signal} exporter for {endpoint}")]
    Exporter {
        signal: &'static str,
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("failed to install the log subscriber")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the exporters alive; [`TelemetryGuard::shutdown`] flushes what is buffered.
#[derive(Debug)]
pub struct TelemetryGuard {
    tracer_provider_opt: Option<SdkTracerProvider>,
    meter_provider_opt: Option<SdkMeterProvider>,
}

impl TelemetryGuard {
    /// Flushes and stops the exporters. Call it last, after the service stopped, so that the
    /// spans and metrics of the shutdown itself are delivered.
    pub fn shutdown(self) {
        if let Some(tracer_provider) = self.tracer_provider_opt
            && let Err(error) = tracer_provider.shutdown()
        {
            eprintln!("failed to flush traces: {error}");
        }
        if let Some(meter_provider) = self.meter_provider_opt
            && let Err(error) = meter_provider.shutdown()
        {
            eprintln!("failed to flush metrics: {error}");
        }
    }
}

/// Installs the global log subscriber and, when configured, the OTLP exporters. Call it once, from
/// inside the Tokio runtime (the gRPC exporter needs one).
pub fn init(
    config: &TelemetryConfig,
    service_name: &'static str,
    service_version: &'static str,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&config.log_level)
        .map_err(|source| TelemetryError::LogFilter { directive: config.log_level.clone(), source })?;
    let (tracer_provider_opt, meter_provider_opt) = if config.otlp_endpoint.is_empty() {
        (None, None)
    } else {
        let resource = resource(config, service_name, service_version);
        let tracer_provider = SdkTracerProvider::builder()
            .with_batch_exporter(span_exporter(config)?)
            .with_resource(resource.clone())
            .build();
        let reader = PeriodicReader::builder(metric_exporter(config)?)
            .with_interval(Duration::from_millis(config.metrics_interval_ms))
            .build();
        let meter_provider = SdkMeterProvider::builder().with_reader(reader).with_resource(resource).build();
        opentelemetry::global::set_meter_provider(meter_provider.clone());
        (Some(tracer_provider), Some(meter_provider))
    };
    let otel_layer_opt = tracer_provider_opt
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer(service_name)));
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer_opt);
    // Colour codes are for people at a terminal; in a log file or a collector they are noise that
    // breaks grep and log parsers.
    let ansi = std::io::stdout().is_terminal();
    match config.log_format {
        LogFormat::Pretty => registry.with(tracing_subscriber::fmt::layer().with_ansi(ansi)).try_init()?,
        LogFormat::Json => registry
            .with(tracing_subscriber::fmt::layer().json().with_ansi(false).flatten_event(true))
            .try_init()?,
    }
    Ok(TelemetryGuard { tracer_provider_opt, meter_provider_opt })
}

fn resource(config: &TelemetryConfig, service_name: &'static str, service_version: &'static str) -> Resource {
    let instance_id = if config.instance_id.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        config.instance_id.clone()
    };
    Resource::builder_empty()
        .with_service_name(service_name)
        .with_attributes([
            KeyValue::new("service.version", service_version),
            KeyValue::new("service.instance.id", instance_id),
        ])
        .build()
}

fn http_signal_url(endpoint: &str, signal_path: &str) -> String {
    format!("{}/{signal_path}", endpoint.trim_end_matches('/'))
}

fn span_exporter(config: &TelemetryConfig) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let result = match config.otlp_protocol {
        OtlpProtocol::Grpc => builder.with_tonic().with_endpoint(&config.otlp_endpoint).build(),
        OtlpProtocol::Http => builder
            .with_http()
            .with_endpoint(http_signal_url(&config.otlp_endpoint, "v1/traces"))
            .with_headers(Default::default())
            .build(),
    };
    result.map_err(|source| TelemetryError::Exporter {
        signal: "trace",
        endpoint: config.otlp_endpoint.clone(),
        source,
    })
}

fn metric_exporter(config: &TelemetryConfig) -> Result<opentelemetry_otlp::MetricExporter, TelemetryError> {
    let builder = opentelemetry_otlp::MetricExporter::builder();
    let result = match config.otlp_protocol {
        OtlpProtocol::Grpc => builder.with_tonic().with_endpoint(&config.otlp_endpoint).build(),
        OtlpProtocol::Http => {
            builder.with_http().with_endpoint(http_signal_url(&config.otlp_endpoint, "v1/metrics")).build()
        }
    };
    result.map_err(|source| TelemetryError::Exporter {
        signal: "metric",
        endpoint: config.otlp_endpoint.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_signal_urls_are_appended_once() {
        assert_eq!(http_signal_url("http://127.0.0.1:4318/", "v1/traces"), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(
            http_signal_url("http://127.0.0.1:4318", "v1/metrics"),
            "http://127.0.0.1:4318/v1/metrics"
        );
    }

    #[test]
    fn validation_names_bad_keys() {
        let config = TelemetryConfig {
            log_level: "info,=[".to_string(),
            otlp_endpoint: "127.0.0.1:4317".to_string(),
            metrics_interval_ms: 0,
            ..TelemetryConfig::default()
        };
        let keys: Vec<String> = config.validate("telemetry").into_iter().map(|issue| issue.key).collect();
        assert_eq!(keys, ["telemetry.log_level", "telemetry.otlp_endpoint", "telemetry.metrics_interval_ms"]);
    }
}
