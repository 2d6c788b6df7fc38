//! Test fixtures: real servers on 127.0.0.1 (the Tansu Kafka-protocol broker, Mosquitto, an
//! S3-compatible server, Azurite) on free ports, one set per test, and the Sluice services
//! started in-process against them. Every test gets its own topic prefix, so tests run in
//! parallel without `#[serial]`.
//!
//! Everything is used from the crate root; the modules only sort it by concern.

mod fault_proxy;
mod jobs;
mod kafka;
mod lake;
mod mqtt;
mod object_stores;
mod pki;
mod process;
mod readers;
mod readings;
pub mod remote_lake;
mod sandbox;
mod servers;
mod services;
mod support;
mod tls_proxy;

pub use fault_proxy::{FaultMode, FaultProxy};
pub use jobs::{
    compacted_readings, job_run_events, job_status_event, job_status_event_within, read_job_result,
    submit_job, windows_succeeded,
};
pub use kafka::{
    ConsumedRecord, consume_topic, consume_topic_within, decode_value, produce_raw, produce_readings,
    produce_readings_with_headers, telemetry_schema_json,
};
pub use lake::{
    DeltaLogReader, LakeRow, LogVersion, assert_every_reader_sees, assert_exactly_once, datafusion_rows,
    delta_live_files, open_local_lake, parquet_files_under, parquet_rows, read_committed_rows,
    read_lake_rows, read_live_rows, read_rows_of, settled_watermark, wait_for_lake_rows,
    wait_until_merged_and_vacuumed,
};
pub use mqtt::{MqttDevice, wait_for_mqtt_bridge};
pub use object_stores::{AzuriteServer, S3Server};
pub use pki::{PemPair, TestCa};
pub use process::{Readiness, ServiceBinary, free_port};
pub use readers::{
    LoopRead, OUTSIDE_READERS, ReadLoop, assert_outside_readers_see, delta_readers_python_path, lake_rows_of,
    loop_keys_sha256, outside_reader_rows, parse_loop_reads,
};
pub use readings::telemetry_readings;
pub use sandbox::Sandbox;
pub use servers::{Broker, Mosquitto};
pub use services::{
    CompactorService, CompactorToml, EdgeService, ExecutorService, IngestService, IngestToml,
    compactor_config, compactor_toml, edge_config, edge_toml, executor_config, ingest_config, ingest_toml,
};
pub use sluice_clock::now_micros;
pub use sluice_ingest::RunningIngest;
pub use support::{
    bench_arg, bench_text_arg, release_binary, repo_root, unique_suffix, wait_until, workspace_binary,
};
pub use tls_proxy::TlsProxy;
