//! The compactor against a real Tansu broker and a local-filesystem Delta lake: every record lands
//! in exactly one file of the table's latest version, across restarts, rebalances and a stale
//! writer; the log is read back independently of delta-rs (`read_lake_rows` replays it).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeSet;
use std::time::Duration;

use sluice_integration_tests::{
    Broker, CompactorService, assert_exactly_once, compactor_config, consume_topic, produce_raw,
    produce_readings, produce_readings_with_headers, read_lake_rows, telemetry_readings, unique_suffix,
    wait_for_lake_rows,
};
use sluice_lake::{CommitRecord, Lake};

const HOUR: i64 = 3_600_000_000;

fn lake(directory: &std::path::Path) -> Lake {
    let config =
        sluice_lake::ObjectStoreConfig { url: directory.display().to_string(), ..Default::default() };
    let (store, root) = sluice_lake::open_store(&config).unwrap();
    Lake::new(store, root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_land_once_in_hourly_partitions_sorted_and_committed() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let readings = telemetry_readings(10_000, 37, 3 * HOUR);
    let mut config = compactor_config(&broker, &prefix, lake_dir.path());
    config.watermark.interval_ms = 200;
    config.watermark.allowed_lateness_ms = 5_000;
    let compactor = CompactorService::start(config).await.unwrap();
    produce_readings(&broker.bootstrap_servers(), &format!("{prefix}.telemetry"), &readings).await.unwrap();

    let rows =
        wait_for_lake_rows(lake_dir.path(), "telemetry", readings.len(), Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let rows_after = read_lake_rows(lake_dir.path(), "telemetry").unwrap();
    assert_eq!(rows.len(), rows_after.len(), "nothing more appeared later");
    assert_exactly_once(&rows_after, &readings);
    // The published watermark is the slowest partition's committed event time minus lateness.
    let lake = lake(lake_dir.path());
    let expected_watermark =
        lake.watermark("telemetry", 4, 5_000_000).await.unwrap().expect("all partitions committed");
    let published = sluice_integration_tests::wait_until(Duration::from_secs(10), || {
        let lake = lake.clone();
        async move {
            lake.published_watermark("telemetry")
                .await
                .unwrap()
                .is_some_and(|watermark| watermark.watermark_micros == expected_watermark)
        }
    })
    .await;
    assert!(published, "watermark {expected_watermark} published");
    let newest = rows_after.iter().map(|row| row.ts_micros).max().unwrap();
    assert!(expected_watermark <= newest - 5_000_000);
    compactor.stop().await.unwrap();

    // Every flush is one commit, and each partition's flushes chain without gaps: each started
    // from the position the one before it committed, in later table versions.
    let commits = lake.commits("telemetry").await.unwrap();
    let committed_rows: u64 = commits.iter().map(CommitRecord::num_rows).sum();
    assert_eq!(committed_rows, readings.len() as u64);
    for pair in commits.windows(2).filter(|pair| pair[0].kafka_partition == pair[1].kafka_partition) {
        assert!(pair[1].table_version_opt > pair[0].table_version_opt);
        assert_eq!(pair[1].previous_end_offset_opt, Some(pair[0].end_offset), "positions chain");
        assert_eq!(pair[1].start_offset, pair[0].end_offset, "ranges chain");
    }
    // The log's txn of each partition is where its last flush ended.
    for partition in 0..4 {
        let position = lake.latest_commit("telemetry", partition).await.unwrap().unwrap();
        let last = commits.iter().rfind(|record| record.kafka_partition == partition).unwrap();
        assert_eq!(position.end_offset, last.end_offset);
    }
    // A clean run leaves no file that the log does not add.
    let mut on_disk = sluice_integration_tests::parquet_files_under(&lake_dir.path().join("telemetry"));
    on_disk.sort();
    assert_eq!(
        on_disk,
        sluice_integration_tests::delta_live_files(&lake_dir.path().join("telemetry")).unwrap()
    );
    sluice_integration_tests::assert_outside_readers_see(&lake_dir.path().join("telemetry"), &readings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_after_the_last_commit() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let lake_dir = tempfile::TempDir::new().unwrap();
    let readings = telemetry_readings(6_000, 20, 2 * HOUR);
    let config = compactor_config(&broker, &prefix, lake_dir.path());

    let compactor = CompactorService::start(config.clone()).await.unwrap();
    produce_readings(&broker.bootstrap_servers(), &topic, &readings[..3_000]).await.unwrap();
    wait_for_lake_rows(lake_dir.path(), "telemetry", 3_000, Duration::from_secs(60)).await;
    compactor.stop().await.unwrap();

    produce_readings(&broker.bootstrap_servers(), &topic, &readings[3_000..]).await.unwrap();
    // A new consumer group: Kafka's committed offsets are not what resumes; the lake's are.
    let mut restarted = config;
    restarted.compactor.group_id = format!("compactor-{}", unique_suffix());
    let compactor = CompactorService::start(restarted).await.unwrap();
    wait_for_lake_rows(lake_dir.path(), "telemetry", readings.len(), Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    compactor.stop().await.unwrap();
    sluice_integration_tests::assert_every_reader_sees(lake_dir.path(), "telemetry", &readings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_records_are_dead_lettered_with_a_reason_and_do_not_stall() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let lake_dir = tempfile::TempDir::new().unwrap();
    let config = compactor_config(&broker, &prefix, lake_dir.path());
    let compactor = CompactorService::start(config.clone()).await.unwrap();
    let before = telemetry_readings(100, 5, HOUR);
    produce_readings(&broker.bootstrap_servers(), &topic, &before).await.unwrap();
    let producer = sluice_kafka::BatchProducer::new(&config.kafka.producer_config()).unwrap();
    let mut unknown_fingerprint = vec![0xC3, 0x01];
    unknown_fingerprint.extend_from_slice(&[7; 8]);
    unknown_fingerprint.extend_from_slice(b"junk");
    // Framed with the stream's fingerprint but broken inside: only decoding finds them out, one
    // at decode time (truncated) and one when the decoded rows become a batch (enum index).
    let schema_path = sluice_integration_tests::repo_root().join("schemas/telemetry.avsc");
    let schema = sluice_schema::StreamSchema::from_avro_json(
        "telemetry",
        &std::fs::read_to_string(&schema_path).unwrap(),
        &schema_path,
    )
    .unwrap();
    let encode = |seq: i64| {
        let mut value = Vec::new();
        let reading = serde_json::json!({"device_id": "dev-0000", "ts": before[0]["ts"], "seq": seq});
        schema.encode_json(&reading, i64::MAX / 2, 0, &mut value).unwrap();
        value
    };
    let mut truncated = encode(1_000_000);
    truncated.pop();
    // The status enum is the last field; 18 is index 9, past its three symbols.
    let mut bad_enum = encode(1_000_001);
    *bad_enum.last_mut().unwrap() = 18;
    let poison: [&[u8]; 4] = [b"{\"not\": \"avro\"}", &unknown_fingerprint, &truncated, &bad_enum];
    produce_raw(&producer, &topic, poison.iter().map(|value| (&b"dev-0000"[..], 0, *value))).await.unwrap();
    let after = telemetry_readings(200, 5, HOUR)[100..].to_vec();
    produce_readings(&broker.bootstrap_servers(), &topic, &after).await.unwrap();

    let expected: Vec<serde_json::Value> = before.iter().chain(&after).cloned().collect();
    let rows =
        wait_for_lake_rows(lake_dir.path(), "telemetry", expected.len(), Duration::from_secs(60)).await;
    assert_exactly_once(&rows, &expected);
    sluice_integration_tests::assert_every_reader_sees(lake_dir.path(), "telemetry", &expected).await;
    let dead_letters = consume_topic(
        &broker.bootstrap_servers(),
        &format!("{prefix}.telemetry.dlq"),
        4,
        Duration::from_millis(500),
    )
    .await
    .unwrap();
    assert_eq!(dead_letters.len(), 4);
    let reasons: Vec<&str> = dead_letters
        .iter()
        .map(|record| record.header(sluice_compactor::DEAD_LETTER_REASON_HEADER).unwrap())
        .collect();
    assert!(reasons.iter().any(|reason| reason.contains("single-object marker")), "{reasons:?}");
    assert!(reasons.iter().any(|reason| reason.contains("fingerprint 0707070707070707")), "{reasons:?}");
    let undecodable =
        reasons.iter().filter(|reason| reason.contains("does not decode") || reason.contains("truncated"));
    assert_eq!(undecodable.count(), 2, "{reasons:?}");
    let dead_payloads: Vec<&[u8]> = dead_letters.iter().map(|record| record.payload.as_slice()).collect();
    assert!(dead_payloads.contains(&truncated.as_slice()) && dead_payloads.contains(&bad_enum.as_slice()));
    assert!(dead_letters.iter().all(|record| {
        record.header(sluice_compactor::DEAD_LETTER_SOURCE_HEADER).unwrap().starts_with("kafka:")
    }));
    compactor.stop().await.unwrap();
    let commits = lake(lake_dir.path()).commits("telemetry").await.unwrap();
    assert_eq!(commits.iter().map(|commit| commit.num_dead_lettered).sum::<u64>(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_writer_loses_its_commit_and_nothing_is_duplicated() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let lake_dir = tempfile::TempDir::new().unwrap();
    let table_dir = lake_dir.path().join("telemetry");
    let readings = telemetry_readings(4_000, 16, HOUR);
    let mut stale_config = compactor_config(&broker, &prefix, lake_dir.path());
    stale_config.compactor.instance_id = "stale".into();
    // Buffers long enough for another owner to commit the same records first.
    stale_config.flush.max_age_ms = 12_000;
    let stale = CompactorService::start(stale_config.clone()).await.unwrap();
    produce_readings(&broker.bootstrap_servers(), &topic, &readings[..2_000]).await.unwrap();
    wait_for_lake_rows(lake_dir.path(), "telemetry", 2_000, Duration::from_secs(60)).await;

    // Every file that ever appears under the table, to tell the stale writer's uploads apart.
    let stop_watching = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let (table_dir, stop) = (table_dir.clone(), stop_watching.clone());
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.is_cancelled() {
                seen.extend(sluice_integration_tests::parquet_files_under(&table_dir));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        })
    };
    // The stale writer buffers the next records; before its flush is due, a new owner (another
    // consumer group, as after a rebalance the stale one did not notice) reads the same records
    // from the lake's positions and commits them.
    produce_readings(&broker.bootstrap_servers(), &topic, &readings[2_000..3_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let mut owner_config = stale_config.clone();
    owner_config.compactor.instance_id = "new-owner".into();
    owner_config.compactor.group_id = format!("owner-{}", unique_suffix());
    owner_config.flush.max_age_ms = 200;
    let owner = CompactorService::start(owner_config).await.unwrap();
    wait_for_lake_rows(lake_dir.path(), "telemetry", 3_000, Duration::from_secs(60)).await;
    owner.stop().await.unwrap();
    let lake = lake(lake_dir.path());
    let owner_committed: Vec<CommitRecord> = lake
        .commits("telemetry")
        .await
        .unwrap()
        .into_iter()
        .filter(|record| record.writer_id == "new-owner")
        .collect();
    assert!(
        owner_committed.iter().any(|record| record.num_rows() > 0),
        "the new owner committed the buffered records"
    );

    // The stale writer's flush comes due now: it must lose, delete its files and read on from
    // the new owner's positions.
    produce_readings(&broker.bootstrap_servers(), &topic, &readings[3_000..]).await.unwrap();
    wait_for_lake_rows(lake_dir.path(), "telemetry", readings.len(), Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stale.stop().await.unwrap();
    stop_watching.cancel();
    let seen = watcher.await.unwrap();
    sluice_integration_tests::assert_every_reader_sees(lake_dir.path(), "telemetry", &readings).await;

    let live: std::collections::BTreeSet<String> =
        sluice_integration_tests::delta_live_files(&table_dir).unwrap().into_iter().collect();
    let discarded: Vec<&String> = seen.difference(&live).collect();
    assert!(!discarded.is_empty(), "the stale writer uploaded a flush that lost");
    // The dangerous case: a lost flush held records that the new owner committed (its file is
    // named after its Kafka partition and first offset, `p<partition>-o<offset>-...`).
    let range_of = |path: &str| -> Option<(i32, i64)> {
        let name = path.rsplit('/').next()?;
        let (partition, rest) = name.strip_prefix('p')?.split_once("-o")?;
        Some((partition.parse().ok()?, rest.split('-').next()?.parse().ok()?))
    };
    let overlapping = discarded.iter().filter_map(|path| range_of(path)).any(|(partition, offset)| {
        owner_committed.iter().any(|record| {
            record.kafka_partition == partition && (record.start_offset..record.end_offset).contains(&offset)
        })
    });
    assert!(
        overlapping,
        "a lost flush held records the new owner committed: {discarded:?} {owner_committed:?}"
    );
    let mut left: Vec<String> = sluice_integration_tests::parquet_files_under(&table_dir);
    left.retain(|path| !live.contains(path));
    assert!(left.is_empty(), "the stale writer deleted the files of its lost commit: {left:?}");
    let commits = lake.commits("telemetry").await.unwrap();
    assert!(
        commits.iter().any(|record| record.writer_id == "stale" && record.num_rows() > 0),
        "the stale writer went on"
    );
    for pair in commits.windows(2).filter(|pair| pair[0].kafka_partition == pair[1].kafka_partition) {
        assert_eq!(pair[1].start_offset, pair[0].end_offset, "ranges chain across writers");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_partitions_and_survive_one_leaving() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let lake_dir = tempfile::TempDir::new().unwrap();
    let readings = telemetry_readings(12_000, 40, 2 * HOUR);
    let mut config = compactor_config(&broker, &prefix, lake_dir.path());
    // Buffers are still open when the second instance joins (a flush waits 10 s, the join a
    // few): the first is revoked partitions whose rows it has not committed, and the new owner
    // reads them again from the table.
    config.flush.max_age_ms = 10_000;
    config.compactor.instance_id = "first".into();
    let first = CompactorService::start(config.clone()).await.unwrap();
    let assigned = sluice_integration_tests::wait_until(Duration::from_secs(30), || {
        let ready = first.is_ready();
        async move { ready }
    })
    .await;
    assert!(assigned, "the first instance joined the group");
    produce_readings(&broker.bootstrap_servers(), &topic, &readings[..4_000]).await.unwrap();
    // Read, not yet flushed: the rows are in the first instance's buffers when the second joins.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    config.compactor.instance_id = "second".into();
    let second = CompactorService::start(config.clone()).await.unwrap();
    produce_readings(&broker.bootstrap_servers(), &topic, &readings[4_000..8_000]).await.unwrap();
    wait_for_lake_rows(lake_dir.path(), "telemetry", 8_000, Duration::from_secs(60)).await;
    assert!(
        first.revoked_uncommitted_records() > 0,
        "the first instance was revoked partitions with rows buffered and not committed"
    );
    // One janitor per table: the owner of partition 0.
    let one_janitor = sluice_integration_tests::wait_until(Duration::from_secs(30), || {
        let janitors = [first.janitor_streams(), second.janitor_streams()];
        async move { janitors.contains(&vec!["telemetry".to_string()]) && janitors.contains(&Vec::new()) }
    })
    .await;
    assert!(
        one_janitor,
        "exactly one instance keeps the table: {:?}",
        [first.janitor_streams(), second.janitor_streams()]
    );
    // The instance that keeps the table leaves mid-stream; the other takes its partitions over,
    // and with them the janitor's work.
    let (leaving, staying) =
        if first.janitor_streams().is_empty() { (second, first) } else { (first, second) };
    leaving.stop().await.unwrap();
    let janitor_moved = sluice_integration_tests::wait_until(Duration::from_secs(60), || {
        let kept = staying.janitor_streams();
        async move { kept == ["telemetry"] }
    })
    .await;
    assert!(janitor_moved, "the remaining instance keeps the table: {:?}", staying.janitor_streams());
    produce_readings(&broker.bootstrap_servers(), &topic, &readings[8_000..]).await.unwrap();
    wait_for_lake_rows(lake_dir.path(), "telemetry", readings.len(), Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    staying.stop().await.unwrap();
    sluice_integration_tests::assert_every_reader_sees(lake_dir.path(), "telemetry", &readings).await;
    let commits = lake(lake_dir.path()).commits("telemetry").await.unwrap();
    for writer in ["first", "second"] {
        assert!(
            commits.iter().any(|record| record.writer_id == writer && record.num_rows() > 0),
            "{writer} committed"
        );
    }
    for pair in commits.windows(2).filter(|pair| pair[0].kafka_partition == pair[1].kafka_partition) {
        assert_eq!(
            pair[1].previous_end_offset_opt,
            Some(pair[0].end_offset),
            "positions chain across owners"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_sent_twice_within_a_flush_is_written_once() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let lake_dir = tempfile::TempDir::new().unwrap();
    let mut config = compactor_config(&broker, &prefix, lake_dir.path());
    config.flush.max_age_ms = 3_000;
    let compactor = CompactorService::start(config).await.unwrap();
    let readings = telemetry_readings(1_000, 10, HOUR);
    // A client that retried its whole request after a 503: every reading arrives twice.
    produce_readings(&broker.bootstrap_servers(), &topic, &readings).await.unwrap();
    produce_readings(&broker.bootstrap_servers(), &topic, &readings).await.unwrap();
    let lake = lake(lake_dir.path());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline
        && lake.committed_offsets("telemetry", 4).await.unwrap() < 2_000
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    compactor.stop().await.unwrap();
    sluice_integration_tests::assert_every_reader_sees(lake_dir.path(), "telemetry", &readings).await;
    let commits = lake.commits("telemetry").await.unwrap();
    assert_eq!(commits.iter().map(|commit| commit.num_duplicates_dropped).sum::<u64>(), 1_000);
    // Every partition committed, so the stream has a completeness watermark within the data.
    let watermark = lake.watermark("telemetry", 4, 0).await.unwrap().expect("watermark");
    let times: Vec<i64> = readings.iter().map(|reading| reading["ts"].as_i64().unwrap()).collect();
    assert!(watermark >= *times.iter().min().unwrap() && watermark <= *times.iter().max().unwrap());
}

/// Waits until the stream's partitions committed `offsets` records between them.
async fn wait_for_committed_offsets(lake: &Lake, offsets: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while lake.committed_offsets("telemetry", 4).await.unwrap() < offsets {
        assert!(std::time::Instant::now() < deadline, "{offsets} offsets not committed within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_request_sent_again_after_a_partial_acknowledgement_fills_its_gap_once() {
    use sluice_schema::wire::{EDGE_FLOOR_HEADER, EDGE_ID_HEADER, EDGE_POSITION_HEADER};
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let lake_dir = tempfile::TempDir::new().unwrap();
    let mut config = compactor_config(&broker, &prefix, lake_dir.path());
    config.flush.max_age_ms = 1_000;
    let mut compactor = CompactorService::start(config.clone()).await.unwrap();
    let ts = sluice_integration_tests::now_micros() - 2 * HOUR;
    let reading = |seq: i64| serde_json::json!({"device_id": "pump-1", "ts": ts + seq, "seq": seq});
    // As central ingest produces a gateway's request: each record's position, and the
    // request's first position as its floor. One device, so one Kafka partition.
    let produce = |seqs: Vec<i64>, floor: i64| {
        let readings: Vec<serde_json::Value> = seqs.iter().map(|&seq| reading(seq)).collect();
        let bootstrap = broker.bootstrap_servers();
        let topic = topic.clone();
        async move {
            produce_readings_with_headers(&bootstrap, &topic, &readings, |index| {
                vec![
                    (EDGE_ID_HEADER, "site-7/gw.a1".to_string()),
                    (EDGE_POSITION_HEADER, (1_000 + seqs[index]).to_string()),
                    (EDGE_FLOOR_HEADER, (1_000 + floor).to_string()),
                ]
            })
            .await
            .unwrap()
        }
    };
    let lake = lake(lake_dir.path());
    // Request 0..=4: record 2 timed out in the producer, the others were acknowledged, the
    // gateway was answered 503; each attempt is committed by a flush of its own.
    produce(vec![0, 1, 3, 4], 0).await;
    wait_for_committed_offsets(&lake, 4).await;
    produce((0..=4).collect(), 0).await;
    wait_for_committed_offsets(&lake, 9).await;
    // The compactor started next knows the gateway's positions only from the table.
    compactor.stop().await.unwrap();
    compactor = CompactorService::start(config).await.unwrap();
    // The next request, then a copy of the first that central took late (its answer timed out).
    produce(vec![5, 6], 5).await;
    produce((0..=4).collect(), 0).await;
    wait_for_committed_offsets(&lake, 16).await;
    compactor.stop().await.unwrap();
    let sent: Vec<serde_json::Value> = (0..=6).map(reading).collect();
    assert_exactly_once(&read_lake_rows(lake_dir.path(), "telemetry").unwrap(), &sent);
    let commits = lake.commits("telemetry").await.unwrap();
    assert_eq!(commits.iter().map(|commit| commit.num_edge_repeats_dropped).sum::<u64>(), 4 + 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_v2_adds_a_field_and_old_records_read_with_its_default() {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let lake_dir = tempfile::TempDir::new().unwrap();
    let schemas_dir = tempfile::TempDir::new().unwrap();
    let v1 = std::fs::read_to_string(sluice_integration_tests::repo_root().join("schemas/telemetry.avsc"))
        .unwrap();
    let v2 = v1.replacen(
        r#"{"name": "site""#,
        r#"{"name": "firmware", "type": "string", "default": "unknown"},
    {"name": "pressure", "type": ["null", "double"], "default": null},
    {"name": "site""#,
        1,
    );
    assert_ne!(v1, v2);
    let v1_schema = sluice_schema::StreamSchema::from_avro_json("telemetry", &v1, "v1".as_ref()).unwrap();
    let v2_schema = sluice_schema::StreamSchema::from_avro_json("telemetry", &v2, "v2".as_ref()).unwrap();

    // Phase 1: v1 is the stream's schema.
    std::fs::write(schemas_dir.path().join("telemetry.avsc"), &v1).unwrap();
    let mut config = compactor_config(&broker, &prefix, lake_dir.path());
    config.schemas.directory = schemas_dir.path().to_path_buf();
    let compactor = CompactorService::start(config.clone()).await.unwrap();
    let old = telemetry_readings(300, 5, HOUR);
    produce_readings(&broker.bootstrap_servers(), &topic, &old).await.unwrap();
    wait_for_lake_rows(lake_dir.path(), "telemetry", 300, Duration::from_secs(60)).await;
    compactor.stop().await.unwrap();

    // Phase 2: v2 becomes current, v1 moves to history; old devices still send v1 records.
    std::fs::write(schemas_dir.path().join("telemetry.avsc"), &v2).unwrap();
    std::fs::create_dir_all(schemas_dir.path().join("history/telemetry")).unwrap();
    std::fs::write(schemas_dir.path().join("history/telemetry/v1.avsc"), &v1).unwrap();
    let compactor = CompactorService::start(config).await.unwrap();
    let producer = sluice_kafka::BatchProducer::new(
        &sluice_kafka::KafkaConfig { bootstrap_servers: broker.bootstrap_servers(), ..Default::default() }
            .producer_config(),
    )
    .unwrap();
    let now = sluice_integration_tests::now_micros() - HOUR;
    let mut values = Vec::new();
    for seq in 0..10 {
        let (schema, reading) = if seq % 2 == 0 {
            (&v1_schema, serde_json::json!({"device_id": "mixed", "ts": now + seq, "seq": 1_000 + seq}))
        } else {
            (
                &v2_schema,
                serde_json::json!({"device_id": "mixed", "ts": now + seq, "seq": 1_000 + seq, "firmware": "2.0", "pressure": 1.5}),
            )
        };
        let mut value = Vec::new();
        schema.encode_json(&reading, i64::MAX / 2, 0, &mut value).unwrap();
        values.push(value);
    }
    produce_raw(
        &producer,
        &topic,
        values
            .iter()
            .enumerate()
            .map(|(index, value)| (&b"mixed"[..], now / 1_000 + index as i64, value.as_slice())),
    )
    .await
    .unwrap();
    wait_for_lake_rows(lake_dir.path(), "telemetry", 310, Duration::from_secs(60)).await;
    compactor.stop().await.unwrap();

    let rows = read_lake_rows(lake_dir.path(), "telemetry").unwrap();
    assert_eq!(rows.len(), 310, "old and new files read together");
    // The new files carry the new columns; records from the old writer got the defaults.
    let lake = lake(lake_dir.path());
    let commits = lake.commits("telemetry").await.unwrap();
    let mut firmware_by_seq = Vec::new();
    for file in commits.iter().flat_map(|commit| &commit.files) {
        let bytes = bytes::Bytes::from(std::fs::read(lake_dir.path().join(&file.path)).unwrap());
        for batch in parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
        {
            let batch = batch.unwrap();
            let Some(firmware) = batch.column_by_name("firmware") else { continue };
            let firmware = firmware.as_string::<i32>();
            let pressure = batch.column_by_name("pressure").unwrap();
            let seqs = batch.column_by_name("seq").unwrap().as_primitive::<arrow_array::types::Int64Type>();
            for row in 0..batch.num_rows() {
                firmware_by_seq.push((
                    seqs.value(row),
                    firmware.value(row).to_string(),
                    pressure.is_null(row),
                ));
            }
        }
    }
    firmware_by_seq.sort();
    assert_eq!(firmware_by_seq.len(), 10);
    // The table gained the new columns in one schema change, which outside readers see too.
    let history = lake.history("telemetry").await.unwrap();
    assert_eq!(history.iter().filter(|commit| commit.operation == "ADD COLUMN").count(), 1);
    let rows = sluice_integration_tests::outside_reader_rows(
        "deltalake",
        &lake_dir.path().join("telemetry").to_string_lossy(),
        &["seq", "firmware", "pressure"],
        None,
        &[],
    )
    .unwrap();
    assert_eq!(rows.len(), 310);
    let new_rows = rows.iter().filter(|row| row["seq"].as_i64().unwrap() >= 1_000).count();
    assert_eq!(rows.iter().filter(|row| row["firmware"] == "2.0").count(), 5, "{new_rows} new rows");
    // Rows committed before the column was added read as NULL in it (Delta does not rewrite old
    // files), in the executor as in outside readers, rather than failing the query.
    let before_change: Vec<_> = rows.iter().filter(|row| row["seq"].as_i64().unwrap() < 1_000).collect();
    assert_eq!(before_change.len(), 300);
    assert!(before_change.iter().all(|row| row["firmware"].is_null() && row["pressure"].is_null()));
    let (store, root) = sluice_lake::open_store(&sluice_lake::ObjectStoreConfig {
        url: lake_dir.path().display().to_string(),
        ..Default::default()
    })
    .unwrap();
    let registry =
        std::sync::Arc::new(sluice_schema::SchemaRegistry::load_directory(schemas_dir.path()).unwrap());
    let catalog = sluice_executor::Catalog::new(store, root, registry, Vec::new());
    let snapshot = catalog.snapshot().await.unwrap();
    let ctx = catalog.session(&snapshot, sluice_executor::Scope::All, false).await.unwrap();
    let sql = "SELECT count(*) AS total, count(firmware) AS with_firmware, count(pressure) AS with_pressure, \
               count(*) FILTER (WHERE firmware = 'unknown') AS defaulted FROM telemetry";
    let batches = sluice_executor::plan_query(&ctx, sql, None).await.unwrap().collect().await.unwrap();
    let counts: Vec<i64> = (0..4)
        .map(|column| batches[0].column(column).as_primitive::<arrow_array::types::Int64Type>().value(0))
        .collect();
    assert_eq!(
        counts,
        [310, 10, 5, 5],
        "total, firmware set (v2 records and v1 records with its default), pressure set, default"
    );
    for (seq, firmware, pressure_is_null) in firmware_by_seq {
        if seq % 2 == 0 {
            assert_eq!((firmware.as_str(), pressure_is_null), ("unknown", true), "v1 record {seq}");
        } else {
            assert_eq!((firmware.as_str(), pressure_is_null), ("2.0", false), "v2 record {seq}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn janitor_removes_files_no_table_version_adds() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let lake_dir = tempfile::TempDir::new().unwrap();
    let partition_dir = lake_dir.path().join("telemetry/dt=2026-11-26/hour=08");
    std::fs::create_dir_all(&partition_dir).unwrap();
    let orphan = partition_dir.join("p000-o00000000000000000000-crashed.parquet");
    std::fs::write(&orphan, b"PAR1 left by a flush that died before its commit").unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    let mut config = compactor_config(&broker, &prefix, lake_dir.path());
    config.janitor.interval_ms = 300;
    config.janitor.min_age_ms = 1_000;
    let compactor = CompactorService::start(config).await.unwrap();
    let readings = telemetry_readings(2_000, 10, HOUR);
    produce_readings(&broker.bootstrap_servers(), &format!("{prefix}.telemetry"), &readings).await.unwrap();
    wait_for_lake_rows(lake_dir.path(), "telemetry", readings.len(), Duration::from_secs(60)).await;
    let removed = sluice_integration_tests::wait_until(Duration::from_secs(10), || {
        let orphan = orphan.clone();
        async move { !orphan.exists() }
    })
    .await;
    // Committed files grow older than the bound too, and stay: the log adds them.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    compactor.stop().await.unwrap();
    assert!(removed, "uncommitted file removed");
    assert_exactly_once(&read_lake_rows(lake_dir.path(), "telemetry").unwrap(), &readings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_of_closed_partitions_merge_without_readers_seeing_duplicates() {
    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let lake_dir = tempfile::TempDir::new().unwrap();
    let readings = telemetry_readings(6_000, 12, 2 * HOUR);
    let mut config = compactor_config(&broker, &prefix, lake_dir.path());
    config.flush.max_age_ms = 150;
    config.merge.interval_ms = 400;
    config.merge.min_partition_age_ms = 0;
    config.merge.small_file_bytes = 1024 * 1024;
    // VACUUM runs under the readers too: merged-away files go 2 s after their merge.
    config.janitor.interval_ms = 300;
    config.janitor.removed_retention_ms = 2_000;
    let compactor = CompactorService::start(config).await.unwrap();

    // Readers run throughout, each reading rows of one table version: by replaying the log (as
    // any Delta engine does) and through delta-rs. Neither may see a row twice or fail a read.
    let stop_readers = tokio_util::sync::CancellationToken::new();
    let log_reader = {
        let (lake_dir, stop) = (lake_dir.path().to_path_buf(), stop_readers.clone());
        tokio::spawn(async move {
            let mut num_reads = 0;
            while !stop.is_cancelled() {
                let rows = read_lake_rows(&lake_dir, "telemetry").unwrap();
                let mut keys: Vec<(String, i64)> =
                    rows.into_iter().map(|row| (row.device_id, row.seq)).collect();
                let num_rows = keys.len();
                keys.sort();
                keys.dedup();
                assert_eq!(keys.len(), num_rows, "a log reader saw a row twice");
                num_reads += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            num_reads
        })
    };
    let version_reader = {
        let (lake, stop) = (lake(lake_dir.path()), stop_readers.clone());
        tokio::spawn(async move {
            // (table version, rows it holds), per read.
            let mut reads: Vec<(i64, usize)> = Vec::new();
            while !stop.is_cancelled() {
                let Some((version, files)) = lake.table_files("telemetry").await.unwrap() else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let rows = sluice_integration_tests::read_rows_of(&lake, &files).await.unwrap();
                let mut keys: Vec<(String, i64)> =
                    rows.into_iter().map(|row| (row.device_id, row.seq)).collect();
                let num_rows = keys.len();
                keys.sort();
                keys.dedup();
                assert_eq!(keys.len(), num_rows, "version {version} holds a row twice");
                reads.push((version, num_rows));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            reads
        })
    };

    for burst in readings.chunks(1_000) {
        produce_readings(&broker.bootstrap_servers(), &topic, burst).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let lake = lake(lake_dir.path());
    // Done merging: every reading committed, and each partition down to one file. Until then a
    // partition that still takes flushes (the newest hour) is merged again, and its merged-away
    // files wait out the retention after the check below.
    let merged = sluice_integration_tests::wait_until(Duration::from_secs(60), || {
        let lake = lake.clone();
        async move {
            let committed: u64 =
                lake.commits("telemetry").await.unwrap().iter().map(|commit| commit.num_rows()).sum();
            let live = lake.live_files("telemetry").await.unwrap();
            let partitions: BTreeSet<&str> = live.iter().map(|file| file.partition.as_str()).collect();
            committed == 6_000
                && lake.merges("telemetry").await.unwrap().len() >= 2
                && partitions.len() == live.len()
        }
    })
    .await;
    // VACUUM deletes the merged-away files while the readers still run: 2 s of retention after
    // the last merge, and a janitor pass.
    let vacuumed = sluice_integration_tests::wait_until(Duration::from_secs(30), || {
        let (lake, directory) = (lake.clone(), lake_dir.path().join("telemetry"));
        async move {
            let live = lake.live_files("telemetry").await.unwrap().len();
            sluice_integration_tests::parquet_files_under(&directory).len() == live
        }
    })
    .await;
    stop_readers.cancel();
    assert!(log_reader.await.unwrap() > 10);
    let reads = version_reader.await.unwrap();
    compactor.stop().await.unwrap();
    assert!(merged, "merges happened, down to one file per partition");
    assert!(vacuumed, "VACUUM deleted the merged-away files");

    // Reads overlapped merges: some merge committed between two reads, and the reads on both
    // sides of it saw the same rows.
    let history = lake.history("telemetry").await.unwrap();
    let merge_versions: Vec<i64> =
        history.iter().filter(|commit| commit.merge_opt.is_some()).map(|commit| commit.version).collect();
    let overlapped = merge_versions.iter().any(|&merge| {
        reads.iter().any(|(version, _)| *version < merge)
            && reads.iter().any(|(version, _)| *version >= merge)
    });
    assert!(overlapped, "reads {reads:?} did not span a merge at {merge_versions:?}");
    // A merge changes no data: a later version never holds fewer rows than an earlier one.
    let mut by_version = reads.clone();
    by_version.sort();
    assert!(by_version.windows(2).all(|pair| pair[1].1 >= pair[0].1), "rows went missing: {by_version:?}");
    assert!(reads.iter().all(|(_, rows)| *rows <= 6_000));

    assert_exactly_once(&read_lake_rows(lake_dir.path(), "telemetry").unwrap(), &readings);
    assert_exactly_once(
        &sluice_integration_tests::read_live_rows(&lake, "telemetry").await.unwrap(),
        &readings,
    );
    let committed_files: usize =
        lake.commits("telemetry").await.unwrap().iter().map(|commit| commit.files.len()).sum();
    let live_files = lake.live_files("telemetry").await.unwrap().len();
    assert!(live_files < committed_files, "{live_files} live files from {committed_files} committed");
    // VACUUM deleted what merges removed, and nothing the table holds.
    let on_disk = sluice_integration_tests::parquet_files_under(&lake_dir.path().join("telemetry"));
    assert_eq!(on_disk.len(), live_files, "{on_disk:?}");
    sluice_integration_tests::assert_outside_readers_see(&lake_dir.path().join("telemetry"), &readings);
}

/// An engine outside Sluice reading while small files merge and VACUUM runs: Python `deltalake`
/// reads the whole table over and over (integration-tests/readers/read_loop.py) while a
/// compactor merges every hourly partition and its janitor deletes the merged-away files. Each
/// read must return exactly the produced rows, each once, and no read may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_through_merges_and_vacuum_see_every_row_exactly_once() {
    use std::collections::{BTreeMap, BTreeSet};

    use sluice_integration_tests::{
        LoopRead, ReadLoop, delta_live_files, loop_keys_sha256, now_micros, parquet_files_under, wait_until,
    };

    let broker = Broker::start().await.unwrap();
    let prefix = format!("test-{}", unique_suffix());
    let topic = format!("{prefix}.telemetry");
    let lake_dir = tempfile::TempDir::new().unwrap();
    let table_dir = lake_dir.path().join("telemetry");
    let readings = telemetry_readings(3_000, 12, 2 * HOUR);
    let num_readings = readings.len() as u64;
    let expected_sha256 = loop_keys_sha256(&readings);

    // Phase 1, merges off: the readings are committed as many small files, one per Kafka
    // partition and hour in each flush. The first burst waits for the group join, so that each
    // later burst is flushed (100 ms) before the next one arrives (300 ms).
    let mut config = compactor_config(&broker, &prefix, lake_dir.path());
    config.flush.max_age_ms = 100;
    config.merge.enabled = false;
    let writer = CompactorService::start(config.clone()).await.unwrap();
    produce_readings(&broker.bootstrap_servers(), &topic, &readings[..250]).await.unwrap();
    wait_for_lake_rows(lake_dir.path(), "telemetry", 250, Duration::from_secs(60)).await;
    for burst in readings[250..].chunks(250) {
        produce_readings(&broker.bootstrap_servers(), &topic, burst).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_for_lake_rows(lake_dir.path(), "telemetry", readings.len(), Duration::from_secs(60)).await;
    writer.stop().await.unwrap();
    assert_exactly_once(&read_lake_rows(lake_dir.path(), "telemetry").unwrap(), &readings);
    let files_before = delta_live_files(&table_dir).unwrap();
    let mut files_per_partition: BTreeMap<String, usize> = BTreeMap::new();
    for path in &files_before {
        let partition = path.rsplit_once('/').map_or(path.as_str(), |(partition, _)| partition);
        *files_per_partition.entry(partition.to_string()).or_default() += 1;
    }
    // A partition of one file has nothing to merge; every other one must be merged.
    let partitions_to_merge: BTreeSet<String> = files_per_partition
        .iter()
        .filter(|(_, num_files)| **num_files >= 2)
        .map(|(partition, _)| partition.clone())
        .collect();
    // At most 4 files per merge and one merge per partition per round: a partition of 8 or
    // more files takes at least 3 rounds, 500 ms apart, so the merges take over a second, in
    // which the loop (a read every ~100 ms) reads some half-merged versions.
    let most_files = files_per_partition.values().copied().max().unwrap_or(0);
    assert!(most_files >= 8, "too few small files to merge in several rounds: {files_per_partition:?}");

    // Phase 2: the read loop runs, and has read the unmerged table before any merge can start.
    let mut reader = ReadLoop::start(&table_dir.to_string_lossy(), &[]).await.unwrap();
    reader.wait_for_reads(2, Duration::from_secs(30)).await.unwrap();
    let mut merging = config;
    merging.compactor.group_id = format!("compactor-{}", unique_suffix());
    merging.merge.enabled = true;
    merging.merge.interval_ms = 500;
    merging.merge.min_partition_age_ms = 0;
    merging.merge.small_file_bytes = 64 * 1024 * 1024;
    merging.merge.max_files_per_merge = 4;
    merging.janitor.interval_ms = 200;
    // A read loads a version, then opens that version's files: a few tens of milliseconds here,
    // well under a second even on a busy machine. A file a merge removed is deleted no sooner
    // than 3 s after that merge committed, so a read that loaded a version before the merge
    // has finished with the file long before it goes; a read that loads a later version does
    // not list it. (With no retention, a read of a version loaded just before a merge can find
    // its files gone and fail with FileNotFoundError, which read_loop.py reports as a line.)
    merging.janitor.removed_retention_ms = 3_000;
    let compactor = CompactorService::start(merging).await.unwrap();

    // Done when every partition that had several files was merged down to one file and the
    // janitor deleted every file the table no longer holds.
    let lake = lake(lake_dir.path());
    let num_partitions = files_per_partition.len();
    let settled = wait_until(Duration::from_secs(30), || {
        let (lake, table_dir, partitions_to_merge) =
            (lake.clone(), table_dir.clone(), partitions_to_merge.clone());
        async move {
            let merged: BTreeSet<String> =
                lake.merges("telemetry").await.unwrap().into_iter().map(|merge| merge.partition).collect();
            let live = delta_live_files(&table_dir).unwrap();
            merged == partitions_to_merge
                && live.len() == num_partitions
                && parquet_files_under(&table_dir) == live
        }
    })
    .await;
    let vacuumed_at_micros = now_micros();
    assert!(
        settled,
        "merges of {partitions_to_merge:?} and their VACUUM did not finish: live {:?}, on disk {:?}",
        delta_live_files(&table_dir).unwrap(),
        parquet_files_under(&table_dir)
    );
    // The loop goes on reading the merged and vacuumed table for a while.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let read_after_vacuum = wait_until(Duration::from_secs(20), || {
        let num_reads_after =
            reader.reads().unwrap().iter().filter(|read| read.started_micros >= vacuumed_at_micros).count();
        async move { num_reads_after >= 2 }
    })
    .await;
    let reads = reader.stop(Duration::from_secs(30)).await.unwrap();
    compactor.stop().await.unwrap();
    assert!(read_after_vacuum, "no read after VACUUM: {reads:?}");

    // No read failed, and every read saw exactly the produced rows, each once.
    let failed: Vec<&LoopRead> = reads.iter().filter(|read| read.error_opt.is_some()).collect();
    assert!(failed.is_empty(), "{} of {} reads failed: {failed:#?}", failed.len(), reads.len());
    for read in &reads {
        assert_eq!(read.num_rows, num_readings, "a read missed or repeated rows: {read:?}");
        assert_eq!(read.num_distinct_keys, num_readings, "a read saw a row twice: {read:?}");
        assert_eq!(read.keys_sha256, expected_sha256, "a read saw other rows than produced: {read:?}");
    }

    // The reads overlapped the merges: some read the table before the first merge, some after
    // the last, and some in between, when some partitions were merged and others not yet.
    let history = lake.history("telemetry").await.unwrap();
    let merge_versions: Vec<i64> =
        history.iter().filter(|commit| commit.merge_opt.is_some()).map(|commit| commit.version).collect();
    let first_merge = *merge_versions.first().expect("merges committed");
    let last_merge = *merge_versions.last().expect("merges committed");
    let versions_read: Vec<i64> = reads.iter().filter_map(|read| read.version_opt).collect();
    let summary = format!("versions read {versions_read:?}, merges at {merge_versions:?}");
    assert!(
        versions_read.iter().any(|&version| version < first_merge),
        "no read before the merges: {summary}"
    );
    assert!(
        versions_read.iter().any(|&version| version >= last_merge),
        "no read after the merges: {summary}"
    );
    assert!(
        versions_read.iter().any(|version| (first_merge..last_merge).contains(version)),
        "no read of a half-merged version: {summary}"
    );
    for read in &reads {
        let version = read.version_opt.unwrap();
        if version < first_merge {
            assert_eq!(read.num_files, files_before.len() as u64, "unmerged version {version}");
        } else if version >= last_merge {
            assert_eq!(read.num_files, num_partitions as u64, "merged version {version}");
        }
    }
    let num_reads_after_vacuum =
        reads.iter().filter(|read| read.started_micros >= vacuumed_at_micros).count();
    assert!(num_reads_after_vacuum >= 2, "{num_reads_after_vacuum} reads after VACUUM: {summary}");

    // What the reads saw is what the table holds, and VACUUM left only its files.
    assert_exactly_once(&read_lake_rows(lake_dir.path(), "telemetry").unwrap(), &readings);
    assert_eq!(parquet_files_under(&table_dir), delta_live_files(&table_dir).unwrap());
}
