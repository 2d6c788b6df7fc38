//! Ingest's HTTP connections against slow and silent clients on real sockets: connections that
//! never complete a request are closed after the header-read or idle timeout, a body that
//! trickles in gets 408, and past `http.max_connections` new connections are refused at once
//! while accepted ones, and valid clients once a slot frees, are served.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sluice_integration_tests::{Broker, IngestService, ingest_config, now_micros, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn address(ingest: &IngestService) -> SocketAddr {
    ingest.base_url.trim_start_matches("http://").parse().unwrap()
}

/// What a slow client saw: when the server closed the connection, and what it answered.
#[derive(Debug)]
struct Closed {
    after: Duration,
    answer: String,
}

/// A connection and when it was made.
async fn connect(address: SocketAddr) -> (TcpStream, Instant) {
    let started = Instant::now();
    (TcpStream::connect(address).await.unwrap(), started)
}

/// Sends `head`, then one byte of `drip` every `interval` (never finishing what it started),
/// until the server closes the connection or `give_up` passes.
async fn slow_client(
    (mut stream, started): (TcpStream, Instant),
    head: String,
    drip: &'static [u8],
    interval: Duration,
    give_up: Duration,
) -> Closed {
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut ticker = tokio::time::interval(interval);
    let mut next_byte = 0;
    let mut buffer = [0; 4096];
    loop {
        tokio::select! {
            read = stream.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(num_read) => answer.extend_from_slice(&buffer[..num_read]),
            },
            _ = ticker.tick(), if !drip.is_empty() => {
                let byte = drip[next_byte % drip.len()];
                next_byte += 1;
                if stream.write_all(&[byte]).await.is_err() {
                    // Closed by the server; what it answered is still readable.
                    let _ = tokio::time::timeout(Duration::from_millis(500), stream.read_to_end(&mut answer)).await;
                    break;
                }
            }
            _ = tokio::time::sleep_until((started + give_up).into()) => break,
        }
    }
    Closed { after: started.elapsed(), answer: String::from_utf8_lossy(&answer).into_owned() }
}

const RECORDS_HEAD: &str =
    "POST /v1/streams/telemetry/records HTTP/1.1\r\nhost: ingest\r\ncontent-type: application/json\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_complete_request_are_closed_after_their_timeout() {
    let broker = Broker::start().await.unwrap();
    let mut config = ingest_config(&broker);
    config.http.header_read_timeout_ms = 1_000;
    config.http.idle_timeout_ms = 2_000;
    config.http.request_body_timeout_ms = 1_500;
    let ingest = IngestService::start(config).await.unwrap();
    let address = address(&ingest);
    let give_up = Duration::from_secs(10);
    let tick = Duration::from_millis(100);

    let silent = tokio::spawn(slow_client(connect(address).await, String::new(), b"", tick, give_up));
    // Headers one byte at a time: each byte is progress, none completes the request.
    let dripping_headers = tokio::spawn(slow_client(
        connect(address).await,
        RECORDS_HEAD.to_string(),
        b"x-drip: abc",
        tick,
        give_up,
    ));
    // A whole request, answered, then nothing: the connection is kept alive until it is idle too long.
    let healthz = "GET /healthz HTTP/1.1\r\nhost: ingest\r\n\r\n".to_string();
    let kept_alive = tokio::spawn(slow_client(connect(address).await, healthz, b"", tick, give_up));
    // Headers complete, body promised and trickling in.
    let dripping_body = tokio::spawn(slow_client(
        connect(address).await,
        format!("{RECORDS_HEAD}content-length: 1000\r\n\r\n["),
        b" ",
        tick,
        give_up,
    ));

    // An HTTP/2 client that sends the connection preface and no request.
    let h2_silent = tokio::spawn(slow_client(
        connect(address).await,
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_string(),
        b"",
        tick,
        give_up,
    ));

    let silent = silent.await.unwrap();
    assert!(silent.answer.is_empty(), "{silent:?}");
    assert!(
        silent.after >= Duration::from_millis(900) && silent.after < Duration::from_secs(3),
        "{silent:?}"
    );

    let h2_silent = h2_silent.await.unwrap();
    assert!(
        h2_silent.after >= Duration::from_millis(900) && h2_silent.after < Duration::from_secs(3),
        "{h2_silent:?}"
    );

    let dripping_headers = dripping_headers.await.unwrap();
    assert!(
        dripping_headers.after >= Duration::from_millis(900)
            && dripping_headers.after < Duration::from_secs(3),
        "a header drip does not extend the header-read timeout: {dripping_headers:?}"
    );

    let kept_alive = kept_alive.await.unwrap();
    assert!(kept_alive.answer.starts_with("HTTP/1.1 200"), "{kept_alive:?}");
    assert!(
        kept_alive.after >= Duration::from_millis(1_900) && kept_alive.after < Duration::from_secs(4),
        "closed after the idle timeout: {kept_alive:?}"
    );

    let dripping_body = dripping_body.await.unwrap();
    assert!(dripping_body.answer.starts_with("HTTP/1.1 408"), "{dripping_body:?}");
    assert!(dripping_body.answer.contains("http.request_body_timeout_ms"), "{dripping_body:?}");
    assert!(
        dripping_body.after >= Duration::from_millis(1_400) && dripping_body.after < Duration::from_secs(4),
        "{dripping_body:?}"
    );

    // The service is unharmed.
    let response = reqwest::Client::new()
        .post(ingest.records_url("telemetry"))
        .json(&json!({"device_id": "after-slow", "ts": now_micros(), "seq": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_new_connections_and_serves_valid_clients_as_slots_free() {
    let broker = Broker::start().await.unwrap();
    let mut config = ingest_config(&broker);
    config.http.max_connections = 8;
    config.http.header_read_timeout_ms = 4_000;
    let ingest = IngestService::start(config).await.unwrap();
    let address = address(&ingest);
    let give_up = Duration::from_secs(15);
    let tick = Duration::from_millis(200);

    // Eight connections dripping headers take every slot.
    let mut slow = Vec::new();
    for _ in 0..8 {
        let connection = connect(address).await;
        slow.push(tokio::spawn(slow_client(
            connection,
            RECORDS_HEAD.to_string(),
            b"x-drip: abc",
            tick,
            give_up,
        )));
    }
    // Connections are accepted in the order they were made: by the time this one is, the eight
    // before it hold their slots.
    let refused = slow_client(connect(address).await, String::new(), b"", tick, Duration::from_secs(5)).await;
    assert!(refused.answer.starts_with("HTTP/1.1 503"), "{refused:?}");
    assert!(refused.answer.to_ascii_lowercase().contains("retry-after: 1"), "{refused:?}");
    assert!(refused.answer.contains("http.max_connections"), "{refused:?}");
    assert!(refused.after < Duration::from_secs(1), "refused at once: {refused:?}");

    // One slow client gives up: its slot goes to a valid client, the other seven still held.
    slow.pop().unwrap().abort();
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let url = ingest.records_url("telemetry");
    let served = wait_until(Duration::from_secs(2), || {
        let request =
            client.post(&url).json(&json!({"device_id": "valid", "ts": now_micros(), "seq": 1})).send();
        async move { request.await.is_ok_and(|response| response.status() == StatusCode::OK) }
    })
    .await;
    assert!(served, "a valid client is served while seven slow ones hold connections");
    for handle in &slow {
        assert!(!handle.is_finished(), "the slow clients still hold their connections");
    }

    // The header-read timeout frees every slot the slow clients held.
    for handle in slow {
        let closed = handle.await.unwrap();
        assert!(
            closed.after >= Duration::from_millis(3_900) && closed.after < Duration::from_secs(7),
            "{closed:?}"
        );
    }
    let responses = futures::future::join_all((0..8).map(|seq| {
        client.post(&url).json(&json!({"device_id": "after", "ts": now_micros(), "seq": seq})).send()
    }))
    .await;
    for response in responses {
        assert_eq!(response.unwrap().status(), StatusCode::OK);
    }
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_clients_are_closed_after_the_header_read_timeout() {
    let broker = Broker::start().await.unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let directory = tempfile::TempDir::new().unwrap();
    let cert_path = directory.path().join("tls.crt");
    let key_path = directory.path().join("tls.key");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let mut config = ingest_config(&broker);
    config.http.tls_cert_path = Some(cert_path);
    config.http.tls_key_path = Some(key_path);
    config.http.header_read_timeout_ms = 1_000;
    config.http.max_connections = 2;
    let ingest = IngestService::start(config).await.unwrap();
    let address: SocketAddr = ingest.base_url.trim_start_matches("http://").parse().unwrap();
    let tick = Duration::from_millis(100);
    let give_up = Duration::from_secs(10);
    let silent = tokio::spawn(slow_client(connect(address).await, String::new(), b"", tick, give_up));
    // A TLS handshake record header announcing 512 bytes, which then come one at a time.
    let record_header = "\u{16}\u{3}\u{1}\u{2}\u{0}".to_string();
    let dripping = tokio::spawn(slow_client(connect(address).await, record_header, b"\x01", tick, give_up));
    for closed in [silent.await.unwrap(), dripping.await.unwrap()] {
        assert!(
            closed.after >= Duration::from_millis(900) && closed.after < Duration::from_secs(3),
            "{closed:?}"
        );
    }
    // Both slots are free again: a TLS client is served.
    let port = address.port();
    let trusted = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    let response = trusted.get(format!("https://localhost:{port}/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_is_refused() {
    let broker = Broker::start().await.unwrap();
    let ingest = IngestService::start(ingest_config(&broker)).await.unwrap();
    let address = address(&ingest);
    let tick = Duration::from_millis(100);
    let at_most =
        format!("GET /healthz HTTP/1.1\r\nhost: ingest\r\nx-pad: {}\r\n\r\n", "a".repeat(60 * 1024));
    let answered = slow_client(connect(address).await, at_most, b"", tick, Duration::from_secs(1)).await;
    assert!(
        answered.answer.starts_with("HTTP/1.1 200"),
        "{:?}",
        &answered.answer[..answered.answer.len().min(200)]
    );
    let over = format!("GET /healthz HTTP/1.1\r\nhost: ingest\r\nx-pad: {}\r\n\r\n", "a".repeat(70 * 1024));
    let refused = slow_client(connect(address).await, over, b"", tick, Duration::from_secs(5)).await;
    assert!(
        refused.answer.starts_with("HTTP/1.1 431"),
        "{:?}",
        &refused.answer[..refused.answer.len().min(200)]
    );
    assert!(refused.after < Duration::from_secs(2), "{:?}", refused.after);
    ingest.stop().await.unwrap();
}
