//! The HTTP listener: accepts connections up to `http.max_connections`, runs the TLS handshake
//! and HTTP/1.1 or HTTP/2 on each, and closes connections that hold a slot without sending
//! requests. hyper bounds none of this by itself (and axum's `serve` sets no timer), so a client
//! that opens connections and drips header bytes would otherwise keep them, and the process's
//! file descriptors, forever.
//!
//! Each connection is watched by its own task: while a request is being handled the request's
//! own limits apply (`http.request_body_timeout_ms`, the producer's delivery timeout); while none
//! is, the connection must complete a request within `http.header_read_timeout_ms` (the first,
//! counted from accept and including the TLS handshake) or `http.idle_timeout_ms` (the next one
//! on a kept-alive connection), or it is closed.

use std::io::ErrorKind;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use sluice_shutdown::{CancellationToken, TaskTracker};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::config::HttpConfig;
use crate::metrics::{ConnectionCloseReason, DeviceApiMetrics};
use crate::tls::CertifiedClient;

/// How long a connection that is being closed (for idleness or shutdown) may take to say goodbye
/// (an HTTP/2 GOAWAY, the rest of a response) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Read buffer of an HTTP/1 connection: the most its request head may take (431 past it).
const MAX_READ_BUFFER_BYTES: usize = 64 * 1024;
/// Pause after a failed accept (for example out of file descriptors) so that the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The connection limits, from `http.*`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    pub(crate) max_connections: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

impl ConnectionLimits {
    pub(crate) fn from_config(http: &HttpConfig) -> Self {
        Self {
            max_connections: http.max_connections,
            header_read_timeout: Duration::from_millis(http.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(http.idle_timeout_ms),
        }
    }
}

/// Accepts and serves connections until `shutdown`, then lets open ones finish their requests and
/// returns once every connection closed.
pub(crate) async fn serve(
    listener: TcpListener,
    tls_opt: Option<TlsAcceptor>,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<DeviceApiMetrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS)));
    let refusal = refusal_response(limits.max_connections);
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    tracing::warn!(error = %sluice_errors::Chain(&error), "failed to accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Answered without a task of its own: a flood of connections costs no more than this.
            refuse(stream, tls_opt.is_none().then_some(&refusal[..]));
            metrics.record_connection_closed(ConnectionCloseReason::ConnectionLimit);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            router: router.clone(),
            limits,
            metrics: Arc::clone(&metrics),
            shutdown: shutdown.clone(),
            _slot: slot,
        };
        connections.spawn(connection.run(stream, tls_opt.clone()));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors of one connection that failed before it was accepted; the listener is fine.
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

fn refusal_response(max_connections: usize) -> Vec<u8> {
    let body = serde_json::json!({
        "error": format!(
            "the server has {max_connections} connections open, its limit (http.max_connections); retry shortly"
        )
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Answers a connection over the limit and closes it, without waiting for anything: the answer
/// goes out only if the socket takes it at once (plain HTTP only; a TLS client gets the close).
fn refuse(stream: TcpStream, answer_opt: Option<&[u8]>) {
    if let Some(answer) = answer_opt {
        let _ = stream.try_write(answer);
    }
    // Whatever the client already sent is read so that the close is a FIN, not a reset that
    // could destroy the answer before the client reads it.
    let mut scratch = [0; 4096];
    for _ in 0..4 {
        match stream.try_read(&mut scratch) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// One accepted connection and the slot it holds.
struct Connection {
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<DeviceApiMetrics>,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn run(self, stream: TcpStream, tls_opt: Option<TlsAcceptor>) {
        self.metrics.add_http_connections(1);
        let activity = Arc::new(Activity::new());
        match tls_opt {
            None => self.serve(TokioIo::new(stream), activity, None).await,
            Some(acceptor) => {
                // `timeout` saturates a deadline past what an Instant can hold; `+` would panic.
                match tokio::time::timeout(self.limits.header_read_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        let client_opt = tls_stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(CertifiedClient::from_certificate);
                        self.serve(TokioIo::new(tls_stream), activity, client_opt).await
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(error = %sluice_errors::Chain(&error), "TLS handshake failed");
                        self.metrics.record_connection_closed(ConnectionCloseReason::TlsHandshake);
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake timed out");
                        self.metrics.record_connection_closed(ConnectionCloseReason::HeaderTimeout);
                    }
                }
            }
        }
        self.metrics.add_http_connections(-1);
    }

    /// Serves requests; each carries the connection's certified client, if it presented one.
    async fn serve<I>(&self, io: TokioIo<I>, activity: Arc<Activity>, client_opt: Option<CertifiedClient>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let router = self.router.clone();
        let request_activity = Arc::clone(&activity);
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            if let Some(client) = &client_opt {
                request.extensions_mut().insert(client.clone());
            }
            let busy = Arc::clone(&request_activity).begin();
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await;
                drop(busy);
                response
            }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Ingest's request headers are small; hyper's default 400 KiB read buffer per connection
        // would let every connection slot hold that much with a header that never ends.
        builder.http1().max_buf_size(MAX_READ_BUFFER_BYTES);
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        let mut closing_since_opt: Option<Instant> = None;
        loop {
            let deadline_opt = activity.quiet_deadline(&self.limits, closing_since_opt);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(error = %sluice_errors::Chain(&*error), "HTTP connection ended with an error");
                    }
                    return;
                }
                _ = self.shutdown.cancelled(), if closing_since_opt.is_none() => {
                    connection.as_mut().graceful_shutdown();
                    closing_since_opt = Some(Instant::now());
                }
                _ = activity.changed.notified() => {}
                _ = sleep_until_opt(deadline_opt) => {
                    // A request may have begun as the deadline passed; then it is not quiet.
                    let still_quiet = activity
                        .quiet_deadline(&self.limits, closing_since_opt)
                        .is_some_and(|deadline| deadline <= Instant::now());
                    if still_quiet && closing_since_opt.is_some() {
                        // Closing, no request left, and its grace is over: drop it.
                        return;
                    }
                    if still_quiet {
                        let reason = if activity.num_served() == 0 {
                            ConnectionCloseReason::HeaderTimeout
                        } else {
                            ConnectionCloseReason::IdleTimeout
                        };
                        tracing::debug!(reason = reason.as_label(), "closing a quiet HTTP connection");
                        self.metrics.record_connection_closed(reason);
                        connection.as_mut().graceful_shutdown();
                        closing_since_opt = Some(Instant::now());
                    }
                }
            }
        }
    }
}

async fn sleep_until_opt(deadline_opt: Option<Instant>) {
    match deadline_opt {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Requests in progress on one connection and since when it has had none.
struct Activity {
    state: Mutex<ActivityState>,
    changed: Notify,
}

struct ActivityState {
    num_in_progress: usize,
    num_served: u64,
    quiet_since: Instant,
}

impl Activity {
    fn new() -> Self {
        Self {
            state: Mutex::new(ActivityState {
                num_in_progress: 0,
                num_served: 0,
                quiet_since: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        // The state stays consistent even if a holder panicked: every update is one assignment.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks a request as begun (its headers arrived); the guard marks it done when dropped.
    fn begin(self: Arc<Self>) -> Busy {
        self.lock().num_in_progress += 1;
        self.changed.notify_one();
        Busy { activity: self }
    }

    /// When the connection must have begun its next request, or, once it is closing, when it is
    /// dropped; `None` while a request is in progress (the request's own limits bound it) or when
    /// the deadline is past what an `Instant` can hold.
    fn quiet_deadline(
        &self,
        limits: &ConnectionLimits,
        closing_since_opt: Option<Instant>,
    ) -> Option<Instant> {
        let state = self.lock();
        if state.num_in_progress > 0 {
            return None;
        }
        if let Some(closing_since) = closing_since_opt {
            return closing_since.max(state.quiet_since).checked_add(CLOSE_GRACE);
        }
        let allowed = if state.num_served == 0 { limits.header_read_timeout } else { limits.idle_timeout };
        state.quiet_since.checked_add(allowed)
    }

    fn num_served(&self) -> u64 {
        self.lock().num_served
    }
}

/// A request in progress on its connection.
struct Busy {
    activity: Arc<Activity>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        {
            let mut state = self.activity.lock();
            state.num_in_progress = state.num_in_progress.saturating_sub(1);
            state.num_served += 1;
            state.quiet_since = Instant::now();
        }
        self.activity.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_connection_is_quiet_until_a_request_begins_and_after_it_ends() {
        let activity = Arc::new(Activity::new());
        let accepted = activity.lock().quiet_since;
        assert_eq!(activity.quiet_deadline(&limits(), None), Some(accepted + Duration::from_secs(10)));
        let busy = Arc::clone(&activity).begin();
        let second = Arc::clone(&activity).begin();
        assert_eq!(activity.quiet_deadline(&limits(), None), None, "no deadline while requests run");
        drop(busy);
        assert_eq!(activity.quiet_deadline(&limits(), None), None, "one is still running");
        drop(second);
        let quiet_since = activity.lock().quiet_since;
        assert_eq!(activity.num_served(), 2);
        assert_eq!(activity.quiet_deadline(&limits(), None), Some(quiet_since + Duration::from_secs(60)));
        let closing_since = quiet_since + Duration::from_secs(5);
        assert_eq!(
            activity.quiet_deadline(&limits(), Some(closing_since)),
            Some(closing_since + CLOSE_GRACE)
        );
    }

    #[test]
    fn timeouts_past_what_an_instant_holds_do_not_panic() {
        let activity = Activity::new();
        // The largest configurable timeout fits an Instant; a larger one is no deadline, not a panic.
        let largest = ConnectionLimits { header_read_timeout: Duration::from_millis(u64::MAX), ..limits() };
        assert!(activity.quiet_deadline(&largest, None).is_some());
        let endless = ConnectionLimits { header_read_timeout: Duration::MAX, ..limits() };
        assert_eq!(activity.quiet_deadline(&endless, None), None);
    }

    #[test]
    fn the_refusal_is_a_complete_http_answer() {
        let answer = String::from_utf8(refusal_response(8)).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert!(body["error"].as_str().unwrap().contains("8 connections open"), "{body}");
    }
}
