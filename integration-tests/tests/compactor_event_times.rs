//! Records whose event time no lake partition can hold (any `i64` can be in Kafka: records of
//! older ingest versions, or of other producers) are dead-lettered with the reason; their
//! neighbours land exactly once, the extreme times a partition can hold land in the right
//! partition, merging keeps working, and a restart does not dead-letter them again.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::time::Duration;

use sluice_integration_tests::{
    Broker, assert_exactly_once, compactor_config, consume_topic, consume_topic_within, decode_value,
    open_local_lake, produce_raw, produce_readings, read_lake_rows, telemetry_readings,
    telemetry_schema_json, unique_suffix, wait_for_lake_rows, wait_until,
};
use sluice_lake::{MAX_EVENT_TIME_MICROS, MIN_EVENT_TIME_MICROS};

const HOUR: i64 = 3_600_000_000;

fn write_long(value: i64, out: &mut Vec<u8>) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

/// A telemetry record as any Avro writer would produce it, with any `ts`: the ingest of this
/// version refuses such times, older versions and other producers did not.
fn raw_reading(device_id: &str, ts: i64, seq: i64) -> Vec<u8> {
    let schema = apache_avro::Schema::parse_str(&telemetry_schema_json()).unwrap();
    let mut value = sluice_schema::single_object_header(sluice_schema::fingerprint_of(&schema));
    write_long(device_id.len() as i64, &mut value);
    value.extend_from_slice(device_id.as_bytes());
    write_long(ts, &mut value);
    write_long(seq, &mut value);
    // site, temperature, humidity, battery, rssi: the null branch; status: OK.
    for _ in 0..6 {
        write_long(0, &mut value);
    }
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpartitionable_event_times_are_dead_lettered_and_merging_goes_on() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let lake_dir = tempfile::TempDir::new().unwrap();
    let mut config = compactor_config(&broker, &prefix, lake_dir.path());
    config.flush.max_age_ms = 150;
    config.merge.interval_ms = 300;
    config.merge.min_partition_age_ms = 0;
    config.merge.small_file_bytes = 1024 * 1024;
    let shutdown = sluice_shutdown::CancellationToken::new();
    // A failing assertion must not leave the consumer thread running (the runtime waits for it).
    let _shutdown_guard = shutdown.clone().drop_guard();
    let compactor = sluice_compactor::start(config.clone(), shutdown.clone()).await.unwrap();

    let schema_json = telemetry_schema_json();
    let check = raw_reading("dev-check", -1, 7);
    let decoded = decode_value(&schema_json, &check).unwrap();
    assert_eq!(
        (decoded["ts"].as_i64(), decoded["seq"].as_i64()),
        (Some(-1), Some(7)),
        "the test encodes Avro"
    );

    // Refused: every time outside 0000-01-01 .. 9999-12-31 UTC, down to the ends of i64.
    let year_10000 = MAX_EVENT_TIME_MICROS + 1;
    let refused_times =
        [i64::MIN, i64::MIN + 1, MIN_EVENT_TIME_MICROS - 1, year_10000, year_10000 + HOUR, i64::MAX];
    // Kept: the first and last microsecond a partition can hold, and the microsecond before 1970.
    let kept_times = [MIN_EVENT_TIME_MICROS, MAX_EVENT_TIME_MICROS, -1];
    let producer = sluice_kafka::BatchProducer::new(&config.kafka.producer_config()).unwrap();
    let mut kept_readings = Vec::new();
    for round in 0..2_i64 {
        // One device per Kafka partition key: poison and neighbours share a partition and a flush.
        let mut values = Vec::new();
        for (index, &ts) in refused_times.iter().enumerate() {
            values.push(raw_reading("dev-edge", ts, round * 100 + index as i64));
            let neighbour_seq = round * 100 + 50 + index as i64;
            values.push(raw_reading("dev-edge", kept_times[index % kept_times.len()], neighbour_seq));
            kept_readings.push(serde_json::json!({"device_id": "dev-edge", "seq": neighbour_seq}));
        }
        produce_raw(&producer, &topic, values.iter().map(|value| (&b"dev-edge"[..], 0, value.as_slice())))
            .await
            .unwrap();
        // Ordinary readings in between, flushed separately: small files for the merge.
        let ordinary = telemetry_readings(400, 4, HOUR)
            .into_iter()
            .map(|mut reading| {
                let seq = reading["seq"].as_i64().unwrap();
                reading["seq"] = serde_json::json!(seq + round * 1_000);
                reading
            })
            .collect::<Vec<_>>();
        produce_readings(&broker.bootstrap_servers(), &topic, &ordinary).await.unwrap();
        kept_readings.extend(ordinary);
        let rows =
            wait_for_lake_rows(lake_dir.path(), "telemetry", kept_readings.len(), Duration::from_secs(60))
                .await;
        assert_eq!(rows.len(), kept_readings.len(), "round {round}");
    }

    let dead_letters = consume_topic(
        &broker.bootstrap_servers(),
        &format!("{prefix}.telemetry.dlq"),
        2 * refused_times.len(),
        Duration::from_millis(500),
    )
    .await
    .unwrap();
    assert_eq!(dead_letters.len(), 2 * refused_times.len());
    let mut dead_times: Vec<i64> = dead_letters
        .iter()
        .map(|record| {
            let reason = record.header(sluice_compactor::DEAD_LETTER_REASON_HEADER).unwrap();
            assert!(
                reason.contains("outside 0000-01-01T00:00:00Z to 9999-12-31T23:59:59.999999Z"),
                "{reason}"
            );
            assert!(
                record.header(sluice_compactor::DEAD_LETTER_SOURCE_HEADER).unwrap().starts_with("kafka:")
            );
            let time = decode_value(&schema_json, &record.payload).unwrap()["ts"].as_i64().unwrap();
            assert!(reason.contains(&time.to_string()), "the reason names the time: {reason}");
            time
        })
        .collect();
    dead_times.sort_unstable();
    let mut expected_dead: Vec<i64> = refused_times.iter().chain(&refused_times).copied().collect();
    expected_dead.sort_unstable();
    assert_eq!(dead_times, expected_dead);

    let rows = read_lake_rows(lake_dir.path(), "telemetry").unwrap();
    assert_exactly_once(&rows, &kept_readings);
    for partition in ["dt=0000-01-01/hour=00", "dt=9999-12-31/hour=23", "dt=1969-12-31/hour=23"] {
        assert!(lake_dir.path().join("telemetry").join(partition).is_dir(), "{partition} holds its rows");
    }
    assert!(!lake_dir.path().join("telemetry/dt=-9999-01-01").exists(), "nothing filed under a wrong date");

    // Merging goes on, the year-0000 hour (two small files, closed long ago) included, and the
    // service stayed up the whole time.
    let lake = open_local_lake(lake_dir.path());
    let merged = wait_until(Duration::from_secs(60), || {
        let lake = lake.clone();
        async move {
            let merges = lake.merges("telemetry").await.unwrap();
            merges.iter().any(|merge| merge.partition == "dt=0000-01-01/hour=00") && merges.len() >= 2
        }
    })
    .await;
    assert!(merged, "merges: {:?}", lake.merges("telemetry").await.unwrap());
    assert!(compactor.is_ready(), "the compactor is still ready");
    assert!(!shutdown.is_cancelled(), "no task failed");
    let live_rows = sluice_integration_tests::read_live_rows(&lake, "telemetry").await.unwrap();
    assert_exactly_once(&live_rows, &kept_readings);
    shutdown.cancel();
    compactor.wait().await.unwrap();

    // After a restart the poison is behind the committed position: not dead-lettered again.
    let commits = lake.commits("telemetry").await.unwrap();
    assert_eq!(
        commits.iter().map(|commit| commit.num_dead_lettered).sum::<u64>(),
        2 * refused_times.len() as u64
    );
    let shutdown = sluice_shutdown::CancellationToken::new();
    // A failing assertion must not leave the consumer thread running (the runtime waits for it).
    let _shutdown_guard = shutdown.clone().drop_guard();
    let compactor = sluice_compactor::start(config, shutdown.clone()).await.unwrap();
    let after = telemetry_readings(200, 4, HOUR)
        .into_iter()
        .map(|mut reading| {
            let seq = reading["seq"].as_i64().unwrap();
            reading["seq"] = serde_json::json!(seq + 10_000);
            reading
        })
        .collect::<Vec<_>>();
    produce_readings(&broker.bootstrap_servers(), &topic, &after).await.unwrap();
    kept_readings.extend(after);
    wait_for_lake_rows(lake_dir.path(), "telemetry", kept_readings.len(), Duration::from_secs(60)).await;
    shutdown.cancel();
    compactor.wait().await.unwrap();
    assert_exactly_once(&read_lake_rows(lake_dir.path(), "telemetry").unwrap(), &kept_readings);
    let dead_letters = consume_topic_within(
        &broker.bootstrap_servers(),
        &format!("{prefix}.telemetry.dlq"),
        2 * refused_times.len() + 1,
        Duration::ZERO,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(dead_letters.len(), 2 * refused_times.len(), "nothing dead-lettered twice");
}
