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

/// Encryption at rest on S3 (issue #18): with SSE-KMS and a bucket key set in the store options,
/// every object the compactor and the executor write is stored encrypted with that key, as the
/// server records it from each write's headers: data files (multipart uploads among them), Delta
/// log entries and checkpoints, merged files, job results, run records and the audit table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_object_written_to_s3_is_encrypted_with_the_configured_key() {
    const KEY_ID: &str = "arn:aws:kms:us-east-1:123456789012:key/sluice-test";
    let encrypted = |s3: &S3Server| {
        let mut remote = s3.remote_lake();
        for (key, value) in [
            ("aws_server_side_encryption", "aws:kms"),
            ("aws_sse_kms_key_id", KEY_ID),
            ("aws_sse_bucket_key_enabled", "true"),
        ] {
            remote.config.options.0.insert(key.to_string(), value.to_string());
        }
        remote
    };
    // Two servers: each body builds its lake from a broker of its own.
    let compactor_s3 = S3Server::start().await.unwrap();
    compactor_commits_merges_and_vacuums_exactly_once(&encrypted(&compactor_s3)).await;
    let executor_s3 = S3Server::start().await.unwrap();
    executor_reads_windows_and_commits_results(&encrypted(&executor_s3)).await;

    let mut checked = Vec::new();
    let mut multipart = 0;
    for s3 in [&compactor_s3, &executor_s3] {
        for key in s3.list_keys().await.unwrap() {
            let headers = s3.object_headers(&key).await.unwrap();
            let header = |name: &str| headers.get(name).map(String::as_str);
            assert_eq!(header("x-amz-server-side-encryption"), Some("aws:kms"), "{key}: {headers:?}");
            assert_eq!(header("x-amz-server-side-encryption-aws-kms-key-id"), Some(KEY_ID), "{key}");
            // A multipart upload's ETag ends in -<parts>. The test server keeps the encryption
            // and key of a multipart upload but not its bucket-key setting, so that is checked on
            // the objects written in one request.
            let is_multipart = header("etag").is_some_and(|etag| etag.contains('-'));
            if is_multipart {
                multipart += 1;
            } else {
                assert_eq!(header("x-amz-server-side-encryption-bucket-key-enabled"), Some("true"), "{key}");
            }
            checked.push(key);
        }
    }
    for kind in ["/_delta_log/", "/dt=", "results/device_counts/", "_sluice/jobs/", "_sluice/audit/jobs/"] {
        assert!(checked.iter().any(|key| key.contains(kind)), "no {kind} object was written: {checked:?}");
    }
    assert!(multipart > 0, "no object was uploaded in parts");
}
