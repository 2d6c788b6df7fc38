//! Ingest against a Tansu broker that stalls (SIGSTOP for 20 s, state kept) and one that is
//! replaced (killed and started again, empty, on the same port): ingest must come back by itself,
//! answering 200 again within seconds, with `/readyz` telling the truth on the way and nothing
//! it acknowledged missing from the broker.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sluice_integration_tests::{
    Broker, IngestService, consume_topic_within, decode_value, ingest_config, now_micros,
    telemetry_schema_json, wait_until,
};

const STALL: Duration = Duration::from_secs(20);
/// From the broker answering again to ingest answering 200 again.
const RECOVERY: Duration = Duration::from_secs(15);

struct Sender {
    client: reqwest::Client,
    url: String,
    readyz: String,
    next_seq: i64,
    /// seq of every reading answered 200.
    acknowledged: BTreeSet<i64>,
}

impl Sender {
    fn new(ingest: &IngestService) -> Self {
        Self {
            client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
            url: ingest.records_url("telemetry"),
            readyz: format!("{}/readyz", ingest.base_url),
            next_seq: 0,
            acknowledged: BTreeSet::new(),
        }
    }

    /// Sends one reading; returns the status and how long the answer took.
    async fn send(&mut self) -> (StatusCode, Duration) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let started = Instant::now();
        let reading = json!({"device_id": "stall-probe", "ts": now_micros(), "seq": seq});
        let status = self.client.post(&self.url).json(&reading).send().await.unwrap().status();
        if status == StatusCode::OK {
            self.acknowledged.insert(seq);
        }
        (status, started.elapsed())
    }

    async fn ready(&self) -> bool {
        self.client.get(&self.readyz).send().await.is_ok_and(|response| response.status() == StatusCode::OK)
    }

    /// Waits until a reading is answered 200 again; returns how long that took.
    async fn wait_for_200(&mut self, timeout: Duration) -> Option<Duration> {
        let started = Instant::now();
        let sender = std::sync::Arc::new(tokio::sync::Mutex::new(self));
        let recovered = wait_until(timeout, || {
            let sender = std::sync::Arc::clone(&sender);
            async move { sender.lock().await.send().await.0 == StatusCode::OK }
        })
        .await;
        recovered.then(|| started.elapsed())
    }
}

/// The acknowledged readings missing from the broker's stream topic, once none are missing or
/// 30 s passed. The topic may hold more: readings answered 503 can still have been written.
async fn missing_from_broker(
    broker: &Broker,
    ingest: &IngestService,
    acknowledged: &BTreeSet<i64>,
) -> Vec<i64> {
    let schema_json = telemetry_schema_json();
    let topic = ingest.stream_topic("telemetry");
    let missing = || async {
        let records = consume_topic_within(
            &broker.bootstrap_servers(),
            &topic,
            usize::MAX,
            Duration::ZERO,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        let stored: BTreeSet<i64> = records
            .iter()
            .map(|record| decode_value(&schema_json, &record.payload).unwrap()["seq"].as_i64().unwrap())
            .collect();
        acknowledged.difference(&stored).copied().collect::<Vec<i64>>()
    };
    wait_until(Duration::from_secs(30), || async { missing().await.is_empty() }).await;
    missing().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_answers_200_again_after_the_broker_stalls_and_after_it_is_replaced() {
    let mut broker = Broker::start().await.unwrap();
    let port = broker.port;
    let config = ingest_config(&broker);
    let answer_bound = Duration::from_millis(config.producer.delivery_timeout_ms) + Duration::from_secs(2);
    let ingest = IngestService::start(config).await.unwrap();
    let mut sender = Sender::new(&ingest);
    assert_eq!(sender.send().await.0, StatusCode::OK);

    // The stall: readings sent in it are in the producer when the broker stops answering, and
    // every one of them is answered 503 (never 200, never hanging) within the delivery timeout.
    broker.pause().unwrap();
    let paused = Instant::now();
    let in_flight = futures::future::join_all((0..4).map(|seq| {
        let client = sender.client.clone();
        let url = sender.url.clone();
        async move {
            let started = Instant::now();
            let reading = json!({"device_id": "stall-probe", "ts": now_micros(), "seq": 1_000 + seq});
            (client.post(&url).json(&reading).send().await.unwrap().status(), started.elapsed())
        }
    }))
    .await;
    for (status, elapsed) in in_flight {
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(elapsed < answer_bound, "answered after {elapsed:?}");
    }
    let mut num_stalled_requests = 0;
    while paused.elapsed() < STALL {
        let (status, elapsed) = sender.send().await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "a reading was acknowledged by a frozen broker");
        assert!(elapsed < answer_bound, "answered after {elapsed:?}");
        assert!(!sender.ready().await, "/readyz says ready while the broker is frozen");
        num_stalled_requests += 1;
        // Pacing of a client that retries, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(num_stalled_requests > 10);

    broker.resume().unwrap();
    // Ready means able to produce: once /readyz says so, every reading is acknowledged (a
    // producer whose epoch bump the broker refuses must not be reported ready).
    assert!(
        wait_until(RECOVERY, || sender.ready()).await,
        "/readyz not 200 within {RECOVERY:?} of the broker answering again"
    );
    for _ in 0..5 {
        assert_eq!(sender.send().await.0, StatusCode::OK, "/readyz is 200 but readings are refused");
    }
    let missing = missing_from_broker(&broker, &ingest, &sender.acknowledged).await;
    assert!(missing.is_empty(), "acknowledged readings missing from the broker: {missing:?}");

    // The broker is replaced by an empty one on the same address.
    broker.kill().await;
    let broker = Broker::start_on(port).await.unwrap();
    sender.acknowledged.clear();
    let recovered_after = sender.wait_for_200(RECOVERY).await;
    assert!(recovered_after.is_some(), "no 200 within {RECOVERY:?} of the new broker starting");
    for _ in 0..5 {
        assert_eq!(sender.send().await.0, StatusCode::OK);
    }
    assert!(sender.ready().await);
    let missing = missing_from_broker(&broker, &ingest, &sender.acknowledged).await;
    assert!(missing.is_empty(), "acknowledged readings missing from the new broker: {missing:?}");
    ingest.stop().await.unwrap();
}
