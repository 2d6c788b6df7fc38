//! `/healthz` (the process serves requests) and `/readyz` (it does its work: the compactor
//! consumes, the executor schedules) for Kubernetes probes. Ingest answers both on its own API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use sluice_config::ConfigIssue;
use tokio_util::sync::CancellationToken;

/// The `[health]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Where `/healthz` and `/readyz` are served; empty turns them off.
    pub listen_address: String,
}

impl HealthConfig {
    pub fn with_address(address: &str) -> Self {
        Self { listen_address: address.to_string() }
    }

    pub fn validate(&self, prefix: &str) -> Vec<ConfigIssue> {
        if self.listen_address.is_empty() || self.listen_address.parse::<SocketAddr>().is_ok() {
            return Vec::new();
        }
        vec![ConfigIssue::new(
            format!("{prefix}.listen_address"),
            "must be host:port, e.g. 0.0.0.0:8081, or empty",
        )]
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self::with_address("127.0.0.1:8081")
    }
}

/// Readiness as the service reports it; cloned into the service's loop.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Binds the endpoints and serves them until `shutdown`; returns the bound address (useful with
/// port 0), or none when turned off.
pub async fn serve(
    config: &HealthConfig,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<Option<SocketAddr>> {
    if config.listen_address.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(&config.listen_address).await?;
    let address = listener.local_addr()?;
    let app = Router::new().route("/healthz", get(|| async { "ok" })).route(
        "/readyz",
        get(move || {
            let ready = readiness.is_ready();
            async move {
                if ready { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
            }
        }),
    );
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(error) = served {
            tracing::warn!(error = %sluice_errors::Chain(&error), "health endpoint stopped");
        }
    });
    Ok(Some(address))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use super::*;

    #[tokio::test]
    async fn readiness_follows_the_service() {
        let readiness = Readiness::default();
        let shutdown = CancellationToken::new();
        let address = serve(&HealthConfig::with_address("127.0.0.1:0"), readiness.clone(), shutdown.clone())
            .await
            .unwrap()
            .unwrap();
        let get = |path: &str| reqwest::get(format!("http://{address}{path}"));
        assert_eq!(get("/healthz").await.unwrap().status(), 200);
        assert_eq!(get("/readyz").await.unwrap().status(), 503);
        readiness.set(true);
        assert_eq!(get("/readyz").await.unwrap().status(), 200);
        shutdown.cancel();
        assert!(HealthConfig::with_address("nonsense").validate("health").len() == 1);
        assert!(HealthConfig::with_address("").validate("health").is_empty());
    }
}
