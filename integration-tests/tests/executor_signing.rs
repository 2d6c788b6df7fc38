//! Only requests a trusted key signed make the executor act (issue #18): on a real broker, with
//! the `sluice` CLI as a submitter runs it, every kind of refusal leaves the jobs as they were,
//! says why on the status topic, and has its row in the audit table; a job accepted before its
//! key was removed keeps running after a restart until it is redefined.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_executor::audit::{AuditEntry, Verdict, load_audit};
use sluice_executor::events::JobStatusKind;
use sluice_executor::runs::{BackfillRequest, load_windows, request_backfill};
use sluice_executor::signing::{SignedAction, SigningKey, TrustedKey, sha256_hex, topic_place};
use sluice_integration_tests::{
    ExecutorService, Sandbox, job_status_event, now_micros, open_local_lake, submit_job, wait_until,
    workspace_binary,
};

const DAY: i64 = 86_400_000_000;

fn job(name: &str, select: &str) -> String {
    format!("-- name: {name}\n-- window: 2s\n{select}\n")
}

/// Runs the CLI against the sandbox; returns its exit code and what it printed.
async fn sluice(sandbox: &Sandbox, args: &[&str]) -> (i32, String) {
    let output = tokio::process::Command::new(workspace_binary("sluice"))
        .current_dir(sluice_integration_tests::repo_root())
        .arg("--lake")
        .arg(sandbox.lake_dir())
        .args(["--bootstrap-servers", &sandbox.bootstrap_servers(), "--topic-prefix", &sandbox.prefix])
        .args(args)
        .output()
        .await
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

/// Produces a record to the jobs topic with exactly these headers.
async fn produce_signed(
    sandbox: &Sandbox,
    name: &str,
    payload_opt: Option<&[u8]>,
    headers: &[(&str, String)],
) {
    produce_to(sandbox, 0, name, payload_opt, headers).await;
}

/// Produces a record to one partition of the jobs topic with exactly these headers.
async fn produce_to(
    sandbox: &Sandbox,
    partition: i32,
    name: &str,
    payload_opt: Option<&[u8]>,
    headers: &[(&str, String)],
) {
    let producer: FutureProducer =
        sluice_kafka::KafkaConfig { bootstrap_servers: sandbox.bootstrap_servers(), ..Default::default() }
            .producer_config()
            .create()
            .unwrap();
    let topic = sandbox.topic("jobs");
    let headers = headers.iter().fold(OwnedHeaders::new(), |all, (key, value)| {
        all.insert(Header { key, value: Some(value.as_bytes()) })
    });
    let mut record: FutureRecord<'_, str, [u8]> =
        FutureRecord::to(&topic).key(name).headers(headers).partition(partition);
    if let Some(payload) = payload_opt {
        record = record.payload(payload);
    }
    producer.send(record, Duration::from_secs(30)).await.map_err(|(error, _)| error).unwrap();
}

async fn refused_with(sandbox: &Sandbox, name: &str, expected: &str) {
    let event = job_status_event(&sandbox.broker, &sandbox.prefix, name, JobStatusKind::Refused).await;
    assert!(event.reason.contains(expected), "{name}: {}", event.reason);
}

/// How many windows of `job` have an outcome.
async fn windows_run(lake: &sluice_lake::Lake, job: &str) -> usize {
    load_windows(lake, job).await.unwrap().values().filter(|state| state.outcome_opt.is_some()).count()
}

/// Waits until `job` runs a window it had not run before.
async fn keeps_running(lake: &sluice_lake::Lake, job: &str) -> bool {
    let before = windows_run(lake, job).await;
    wait_until(Duration::from_secs(30), || async { windows_run(lake, job).await > before }).await
}

fn trusted(name: &str, public_key: String, jobs: &[&str], actions: &[SignedAction]) -> TrustedKey {
    TrustedKey {
        name: name.into(),
        public_key,
        jobs: jobs.iter().map(|job| (*job).to_string()).collect(),
        actions: actions.to_vec(),
    }
}

fn entries_of<'a>(audit: &'a [AuditEntry], job: &str) -> Vec<&'a AuditEntry> {
    audit.iter().filter(|entry| entry.job == job).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_a_trusted_key_signed_for_the_job_act_and_every_one_is_audited() {
    let sandbox = Sandbox::start().await.unwrap();
    let lake = open_local_lake(sandbox.lake_dir());
    let keys_dir = tempfile::TempDir::new().unwrap();
    let alice_file = keys_dir.path().join("alice.key");

    // The CLI makes the key: owner-only, its public key printed for the configuration.
    let (code, printed) =
        sluice(&sandbox, &["keys", "generate", "--out", alice_file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{printed}");
    assert_eq!(std::fs::metadata(&alice_file).unwrap().permissions().mode() & 0o777, 0o600);
    let alice = SigningKey::from_pem("alice", &std::fs::read_to_string(&alice_file).unwrap()).unwrap();
    assert!(printed.contains(&format!("public_key = \"{}\"", alice.public_key())), "{printed}");
    let (code, again) = sluice(&sandbox, &["keys", "generate", "--out", alice_file.to_str().unwrap()]).await;
    assert_ne!(code, 0, "an existing key is not overwritten: {again}");
    assert_eq!(
        SigningKey::from_pem("alice", &std::fs::read_to_string(&alice_file).unwrap()).unwrap().public_key(),
        alice.public_key()
    );

    let (bob_pem, bob_public) = SigningKey::generate().unwrap();
    let bob = SigningKey::from_pem("bob", &bob_pem).unwrap();
    let mut config = sandbox.executor_config();
    config.signing.enforce = true;
    config.signing.trusted_keys = vec![
        trusted("alice", alice.public_key(), &["signed_*"], &SignedAction::ALL),
        trusted("bob", bob_public.clone(), &["bob_*"], &[SignedAction::Submit]),
    ];
    let executor = ExecutorService::start(config.clone());
    let key_args = ["--key", alice_file.to_str().unwrap()];
    // Where the records this test produces go, as their signatures name it.
    let place = topic_place(&sandbox.topic("jobs"), 0);

    // Signed by a key trusted for the job: accepted, and it runs.
    let jobs_dir = tempfile::TempDir::new().unwrap();
    let kept_text = job("signed_kept", "SELECT 1 AS one");
    let kept_file = jobs_dir.path().join("signed_kept.sql");
    std::fs::write(&kept_file, &kept_text).unwrap();
    let kept_path = kept_file.to_str().unwrap();
    let (code, printed) =
        sluice(&sandbox, &["jobs", "submit", kept_path, "--wait", "60", key_args[0], key_args[1]]).await;
    assert_eq!(code, 0, "{printed}");
    assert!(printed.contains("Accepted"), "{printed}");
    assert!(keeps_running(&lake, "signed_kept").await);

    // Unsigned: refused with the reason, and the CLI's exit code says so.
    let unsigned_file = jobs_dir.path().join("signed_unsigned.sql");
    std::fs::write(&unsigned_file, job("signed_unsigned", "SELECT 1 AS one")).unwrap();
    let (code, printed) =
        sluice(&sandbox, &["jobs", "submit", unsigned_file.to_str().unwrap(), "--wait", "60"]).await;
    assert_eq!(code, 3, "{printed}");
    assert!(printed.contains("not signed"), "{printed}");

    // Signed, then changed: the SQL, the job it names, the action.
    let text = job("signed_changed", "SELECT 1 AS one");
    let signature = alice.sign(SignedAction::Submit, "signed_changed", &place, text.as_bytes(), now_micros());
    let changed = job("signed_changed", "SELECT 2 AS two");
    produce_signed(&sandbox, "signed_changed", Some(changed.as_bytes()), &signature.headers()).await;
    refused_with(&sandbox, "signed_changed", "does not verify").await;
    let other_job = alice.sign(SignedAction::Submit, "signed_other", &place, text.as_bytes(), now_micros());
    produce_signed(&sandbox, "signed_moved", Some(text.as_bytes()), &other_job.headers()).await;
    refused_with(&sandbox, "signed_moved", "does not verify").await;
    // Signed for partition 0, put on partition 1: a copy that would live on another replica.
    let text = job("signed_partition", "SELECT 1 AS one");
    let for_zero =
        alice.sign(SignedAction::Submit, "signed_partition", &place, text.as_bytes(), now_micros());
    produce_to(&sandbox, 1, "signed_partition", Some(text.as_bytes()), &for_zero.headers()).await;
    refused_with(&sandbox, "signed_partition", "does not verify").await;

    // A key of the right name that is not the trusted one, and a name nobody trusts.
    let (mallory_pem, _) = SigningKey::generate().unwrap();
    let mallory = SigningKey::from_pem("alice", &mallory_pem).unwrap();
    let text = job("signed_mallory", "SELECT 1 AS one");
    let forged = mallory.sign(SignedAction::Submit, "signed_mallory", &place, text.as_bytes(), now_micros());
    produce_signed(&sandbox, "signed_mallory", Some(text.as_bytes()), &forged.headers()).await;
    refused_with(&sandbox, "signed_mallory", "does not verify with the public key of 'alice'").await;
    let carol = SigningKey::from_pem("carol", &mallory_pem).unwrap();
    let text = job("signed_carol", "SELECT 1 AS one");
    let unknown = carol.sign(SignedAction::Submit, "signed_carol", &place, text.as_bytes(), now_micros());
    produce_signed(&sandbox, "signed_carol", Some(text.as_bytes()), &unknown.headers()).await;
    refused_with(&sandbox, "signed_carol", "'carol', which the executor does not trust").await;

    // Out of its scope: a job bob's globs do not cover, and an action his key may not take.
    let text = job("signed_by_bob", "SELECT 1 AS one");
    let out_of_scope = bob.sign(SignedAction::Submit, "signed_by_bob", &place, text.as_bytes(), now_micros());
    produce_signed(&sandbox, "signed_by_bob", Some(text.as_bytes()), &out_of_scope.headers()).await;
    refused_with(&sandbox, "signed_by_bob", "may not submit job 'signed_by_bob'").await;
    let text = job("bob_job", "SELECT 1 AS one");
    let in_scope = bob.sign(SignedAction::Submit, "bob_job", &place, text.as_bytes(), now_micros());
    produce_signed(&sandbox, "bob_job", Some(text.as_bytes()), &in_scope.headers()).await;
    job_status_event(&sandbox.broker, &sandbox.prefix, "bob_job", JobStatusKind::Accepted).await;
    let delete = bob.sign(SignedAction::Delete, "bob_job", &place, &[], now_micros());
    produce_signed(&sandbox, "bob_job", None, &delete.headers()).await;
    refused_with(&sandbox, "bob_job", "may not delete job 'bob_job'").await;

    // Signed too long ago, and the neighbours of the limit's other side: the future.
    let text = job("signed_old", "SELECT 1 AS one");
    let old = alice.sign(SignedAction::Submit, "signed_old", &place, text.as_bytes(), now_micros() - 2 * DAY);
    produce_signed(&sandbox, "signed_old", Some(text.as_bytes()), &old.headers()).await;
    refused_with(&sandbox, "signed_old", "signed 172").await;
    let future =
        alice.sign(SignedAction::Submit, "signed_future", &place, text.as_bytes(), now_micros() + DAY);
    produce_signed(&sandbox, "signed_future", Some(text.as_bytes()), &future.headers()).await;
    refused_with(&sandbox, "signed_future", "in the future").await;

    // Garbled headers: part of a signature, and a time that is not a number.
    let headers =
        alice.sign(SignedAction::Submit, "signed_garbled", &place, text.as_bytes(), now_micros()).headers();
    produce_signed(&sandbox, "signed_garbled", Some(text.as_bytes()), &headers[..1]).await;
    refused_with(&sandbox, "signed_garbled", "malformed").await;

    // Signed, but not UTF-8: rejected, not run as the lossy text it would turn into.
    let binary = [0xff_u8, 0xfe, b'\n'];
    let signed_binary = alice.sign(SignedAction::Submit, "signed_binary", &place, &binary, now_micros());
    produce_signed(&sandbox, "signed_binary", Some(&binary), &signed_binary.headers()).await;
    let event =
        job_status_event(&sandbox.broker, &sandbox.prefix, "signed_binary", JobStatusKind::Rejected).await;
    assert!(event.reason.contains("not UTF-8"), "{}", event.reason);

    // The accepted record, sent again as it was: a replay.
    let replayed_text = job("signed_replayed", "SELECT 1 AS one");
    let replay =
        alice.sign(SignedAction::Submit, "signed_replayed", &place, replayed_text.as_bytes(), now_micros());
    produce_signed(&sandbox, "signed_replayed", Some(replayed_text.as_bytes()), &replay.headers()).await;
    job_status_event(&sandbox.broker, &sandbox.prefix, "signed_replayed", JobStatusKind::Accepted).await;
    produce_signed(&sandbox, "signed_replayed", Some(replayed_text.as_bytes()), &replay.headers()).await;
    refused_with(&sandbox, "signed_replayed", "replayed").await;

    // Backfills: unsigned refused, signed by the CLI runs.
    let start = load_windows(&lake, "signed_kept").await.unwrap().keys().next().copied().unwrap();
    let unsigned_backfill = BackfillRequest {
        job: "signed_kept".into(),
        from_micros: start,
        to_micros: start + 2_000_000,
        requested_at_micros: now_micros(),
        signature_opt: None,
    };
    request_backfill(&lake, &unsigned_backfill).await.unwrap();
    let event =
        job_status_event(&sandbox.broker, &sandbox.prefix, "signed_kept", JobStatusKind::BackfillRefused)
            .await;
    assert!(event.reason.contains("not authorized: not signed"), "{}", event.reason);
    let from = sluice_executor::job::format_micros(start);
    let to = sluice_executor::job::format_micros(start + 2_000_000);
    let (code, printed) = sluice(
        &sandbox,
        &[
            "jobs",
            "backfill",
            "signed_kept",
            "--from",
            &from,
            "--to",
            &to,
            "--timeout",
            "60",
            key_args[0],
            key_args[1],
        ],
    )
    .await;
    assert_eq!(code, 0, "the signed backfill ran: {printed}");
    // The accepted request's record rewritten to another range, its signature kept: judged again,
    // and refused.
    let backfills_dir = sandbox.lake_dir().join("_sluice/jobs/signed_kept/backfills");
    let signed_record = std::fs::read_dir(&backfills_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| std::fs::read_to_string(path).unwrap().contains("signature"))
        .expect("the signed backfill's record");
    let mut rewritten: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&signed_record).unwrap()).unwrap();
    rewritten["to_micros"] = serde_json::json!(start + 60_000_000);
    std::fs::write(&signed_record, serde_json::to_vec(&rewritten).unwrap()).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            job_status_event(&sandbox.broker, &sandbox.prefix, "signed_kept", JobStatusKind::BackfillRefused)
                .await
                .reason
                .contains("does not verify")
        })
        .await,
        "the rewritten backfill was not refused"
    );

    // An unsigned deletion changes nothing: the job runs on. A signed one deletes.
    submit_job(&sandbox.bootstrap_servers(), &sandbox.prefix, "signed_kept", None).await.unwrap();
    refused_with(&sandbox, "signed_kept", "delete not authorized").await;
    assert!(keeps_running(&lake, "signed_kept").await, "an unsigned tombstone stopped the job");
    let (code, printed) =
        sluice(&sandbox, &["jobs", "delete", "signed_replayed", key_args[0], key_args[1]]).await;
    assert_eq!(code, 0, "{printed}");
    job_status_event(&sandbox.broker, &sandbox.prefix, "signed_replayed", JobStatusKind::Deleted).await;

    // The key is removed: after a restart the job it signed runs on, a new revision it signs is
    // refused, and the accepted revision still runs.
    executor.stop().await.unwrap();
    let mut without_alice = config.clone();
    without_alice.signing.trusted_keys.retain(|key| key.name != "alice");
    let executor = ExecutorService::start(without_alice);
    assert!(keeps_running(&lake, "signed_kept").await, "the accepted job stopped when its key was removed");
    std::fs::write(&kept_file, job("signed_kept", "SELECT 3 AS three")).unwrap();
    let (code, printed) =
        sluice(&sandbox, &["jobs", "submit", kept_path, "--wait", "60", key_args[0], key_args[1]]).await;
    assert_eq!(code, 3, "{printed}");
    assert!(printed.contains("'alice', which the executor does not trust"), "{printed}");
    assert!(keeps_running(&lake, "signed_kept").await, "the refused revision replaced the accepted one");

    // The audit trail: one row per request, re-reads after the restart add none.
    let audit = load_audit(&lake).await.unwrap();
    let kept = entries_of(&audit, "signed_kept");
    let verdicts: Vec<(SignedAction, Verdict, Option<&str>)> =
        kept.iter().map(|entry| (entry.action, entry.verdict, entry.key_name_opt.as_deref())).collect();
    assert_eq!(
        verdicts,
        [
            (SignedAction::Submit, Verdict::Accepted, Some("alice")),
            (SignedAction::Backfill, Verdict::Refused, None),
            (SignedAction::Backfill, Verdict::Accepted, Some("alice")),
            (SignedAction::Backfill, Verdict::Refused, None),
            (SignedAction::Delete, Verdict::Refused, None),
            (SignedAction::Submit, Verdict::Refused, None),
        ],
        "{kept:#?}"
    );
    assert_eq!(kept[0].sql_sha256_opt.as_deref(), Some(sha256_hex(kept_text.as_bytes()).as_str()));
    assert!(kept[0].source.starts_with(&format!("{}/", sandbox.topic("jobs"))), "{}", kept[0].source);
    for (job, reason) in [
        ("signed_unsigned", "not signed"),
        ("signed_changed", "does not verify"),
        ("signed_moved", "does not verify"),
        ("signed_partition", "does not verify"),
        ("signed_mallory", "does not verify"),
        ("signed_carol", "does not trust"),
        ("signed_by_bob", "may not submit"),
        ("signed_old", "ago"),
        ("signed_future", "future"),
        ("signed_garbled", "malformed"),
    ] {
        let entries = entries_of(&audit, job);
        assert_eq!(entries.len(), 1, "{job}: {entries:#?}");
        assert_eq!(entries[0].verdict, Verdict::Refused, "{job}");
        assert!(entries[0].reason.contains(reason), "{job}: {}", entries[0].reason);
    }
    let replayed: Vec<Verdict> =
        entries_of(&audit, "signed_replayed").iter().map(|entry| entry.verdict).collect();
    assert_eq!(replayed, [Verdict::Accepted, Verdict::Refused, Verdict::Accepted]);
    let bob_job: Vec<(SignedAction, Verdict)> =
        entries_of(&audit, "bob_job").iter().map(|entry| (entry.action, entry.verdict)).collect();
    assert_eq!(
        bob_job,
        [(SignedAction::Submit, Verdict::Accepted), (SignedAction::Delete, Verdict::Refused)]
    );

    // The CLI prints it.
    let (code, printed) = sluice(&sandbox, &["jobs", "audit", "--job", "signed_kept"]).await;
    assert_eq!(code, 0, "{printed}");
    assert_eq!(printed.lines().filter(|line| line.contains("signed_kept")).count(), 6, "{printed}");
    assert!(
        printed.contains("accepted") && printed.contains("refused") && printed.contains("alice"),
        "{printed}"
    );
    executor.stop().await.unwrap();
}

/// With enforcement off (the local demo), unsigned requests run, and are still audited with
/// what enforcement would have said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_enforcement_off_unsigned_jobs_run_and_are_audited() {
    let sandbox = Sandbox::start().await.unwrap();
    let lake = open_local_lake(sandbox.lake_dir());
    let executor = ExecutorService::start(sandbox.executor_config());
    let text = job("unsigned", "SELECT 1 AS one");
    submit_job(&sandbox.bootstrap_servers(), &sandbox.prefix, "unsigned", Some(&text)).await.unwrap();
    job_status_event(&sandbox.broker, &sandbox.prefix, "unsigned", JobStatusKind::Accepted).await;
    assert!(keeps_running(&lake, "unsigned").await);
    let audit = load_audit(&lake).await.unwrap();
    let entries = entries_of(&audit, "unsigned");
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0].verdict, Verdict::Accepted);
    assert!(entries[0].reason.contains("signing.enforce is off") && entries[0].reason.contains("not signed"));
    executor.stop().await.unwrap();

    // Enforcement turned on: what ran only because it was off is judged again, and refused.
    let mut enforcing = sandbox.executor_config();
    enforcing.signing.enforce = true;
    let executor = ExecutorService::start(enforcing);
    let event = job_status_event(&sandbox.broker, &sandbox.prefix, "unsigned", JobStatusKind::Refused).await;
    assert!(event.reason.contains("not signed"), "{}", event.reason);
    let audit = load_audit(&lake).await.unwrap();
    let verdicts: Vec<Verdict> = entries_of(&audit, "unsigned").iter().map(|entry| entry.verdict).collect();
    assert_eq!(verdicts, [Verdict::Accepted, Verdict::Refused]);
    let ran = windows_run(&lake, "unsigned").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(windows_run(&lake, "unsigned").await, ran, "the refused job still runs");
    executor.stop().await.unwrap();
}
