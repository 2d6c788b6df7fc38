//! Graceful shutdown: turns SIGTERM/SIGINT into the cancellation of a root token, and bounds how
//! long the service may take to wind down after it. Only `main` uses this; components receive
//! child tokens and never look at signals themselves.

use std::future::Future;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;

/// Why a service stopped before its own shutdown work was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForcedStop {
    /// A second SIGTERM/SIGINT arrived while the service was winding down.
    SecondSignal,
    /// The grace period after the first signal ran out.
    GraceExpired,
}

/// Forwards SIGTERM and SIGINT, by name, into a channel.
pub fn listen_for_signals() -> std::io::Result<mpsc::Receiver<&'static str>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let (signal_tx, signal_rx) = mpsc::channel(4);
    // Detached on purpose: it lives as long as the process and holds no resources to clean up.
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            if signal_tx.send(name).await.is_err() {
                return;
            }
        }
    });
    Ok(signal_rx)
}

/// Runs `service` until it finishes. The first signal cancels `root` so that the service winds
/// down; a second signal or the end of `grace` abandons it.
pub async fn run_until_stopped<F, T>(
    service: F,
    root: CancellationToken,
    grace: Duration,
    mut signal_rx: mpsc::Receiver<&'static str>,
) -> Result<T, ForcedStop>
where
    F: Future<Output = T>,
{
    tokio::pin!(service);
    tokio::select! {
        output = &mut service => return Ok(output),
        Some(name) = signal_rx.recv() => {
            tracing::info!(signal = name, grace_ms = grace.as_millis() as u64, "shutting down; send the signal again to stop at once");
            root.cancel();
        }
    }
    tokio::select! {
        output = &mut service => Ok(output),
        Some(name) = signal_rx.recv() => {
            tracing::warn!(signal = name, "second signal: stopping without finishing shutdown");
            Err(ForcedStop::SecondSignal)
        }
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "grace period over: stopping without finishing shutdown");
            Err(ForcedStop::GraceExpired)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn signal_cancels_root_and_service_finishes_within_grace() {
        let root = CancellationToken::new();
        let service_token = root.child_token();
        let service = async move {
            service_token.cancelled().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            "drained"
        };
        let (signal_tx, signal_rx) = mpsc::channel(4);
        signal_tx.send("SIGTERM").await.unwrap();
        let outcome = run_until_stopped(service, root.clone(), Duration::from_secs(1), signal_rx).await;
        assert_eq!(outcome, Ok("drained"));
        assert!(root.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn service_that_ignores_cancellation_is_abandoned_after_grace() {
        let root = CancellationToken::new();
        let (signal_tx, signal_rx) = mpsc::channel(4);
        signal_tx.send("SIGTERM").await.unwrap();
        let outcome =
            run_until_stopped(std::future::pending::<()>(), root, Duration::from_secs(2), signal_rx).await;
        assert_eq!(outcome, Err(ForcedStop::GraceExpired));
    }

    #[tokio::test(start_paused = true)]
    async fn second_signal_stops_at_once() {
        let root = CancellationToken::new();
        let (signal_tx, signal_rx) = mpsc::channel(4);
        signal_tx.send("SIGINT").await.unwrap();
        signal_tx.send("SIGINT").await.unwrap();
        let outcome =
            run_until_stopped(std::future::pending::<()>(), root, Duration::from_secs(3600), signal_rx).await;
        assert_eq!(outcome, Err(ForcedStop::SecondSignal));
    }

    #[tokio::test(start_paused = true)]
    async fn service_finishing_first_is_not_cancelled() {
        let root = CancellationToken::new();
        let (_signal_tx, signal_rx) = mpsc::channel(4);
        let outcome = run_until_stopped(async { 7 }, root.clone(), Duration::from_secs(1), signal_rx).await;
        assert_eq!(outcome, Ok(7));
        assert!(!root.is_cancelled());
    }
}
