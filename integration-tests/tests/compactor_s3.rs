//! The lake on a real S3-compatible server (moto) on 127.0.0.1: the compactor's conditional log
//! commits, multipart uploads, merges and VACUUM, read back by delta-rs and by an outside reader;
//! and the executor reading a window's table version from the bucket and committing its result
//! table there. The bodies are shared with Azurite's tests (remote_lake.rs).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use sluice_integration_tests::S3Server;
use sluice_integration_tests::remote_lake::{
    compactor_commits_merges_and_vacuums_exactly_once, executor_reads_windows_and_commits_results,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compactor_commits_merges_and_vacuums_on_s3_exactly_once() {
    let s3 = S3Server::start().await.unwrap();
    compactor_commits_merges_and_vacuums_exactly_once(&s3.remote_lake()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executor_reads_windows_from_s3_and_commits_results_there() {
    let s3 = S3Server::start().await.unwrap();
    executor_reads_windows_and_commits_results(&s3.remote_lake()).await;
}
