//! Decides whether a job request (a definition, a deletion, a backfill) may act, and records the
//! decision in the audit table before anything acts on it.
//!
//! A request is known by where it is (its topic partition and offset, or its record's path) and
//! its signature. The first time a replica meets it, the signature is checked
//! (`sluice_jobs::signing`), then the decision is appended to the audit table. A request read
//! again, after a restart or a rebalance, gets the decision the table holds for it: a job
//! accepted before a key was removed keeps running, and a request refused once stays refused,
//! whatever the signing time says by now. A signature the table holds for another request is a
//! replay.

use std::collections::{HashMap, HashSet};

use sluice_errors::Chain;
use sluice_jobs::audit::{AuditEntry, AuditError, Verdict, append_audit, audit_files, read_audit_file};
use sluice_jobs::signing::{Refusal, RequestSignature, SignedAction, sha256_hex};
use tokio::sync::Mutex;

use crate::context::ExecutorContext;

/// A request as the executor met it.
#[derive(Debug)]
pub(crate) struct JobRequest<'a> {
    pub(crate) action: SignedAction,
    pub(crate) job: &'a str,
    /// What the signature covers besides the action, the job and the time.
    pub(crate) body: &'a [u8],
    /// Where the request is (see [`AuditEntry::source`]).
    pub(crate) source: String,
    /// The request's signature, none, or why its headers cannot be read.
    pub(crate) signature: Result<Option<RequestSignature>, Refusal>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    Accepted,
    /// Why, as the submitter reads it.
    Refused(String),
}

#[derive(Debug, Clone)]
struct Recorded {
    signature_sha256_opt: Option<String>,
    verdict: Verdict,
    reason: String,
}

/// What this replica knows of the audit table.
#[derive(Debug, Default)]
struct AuditIndex {
    files_read: HashSet<String>,
    by_source: HashMap<String, Recorded>,
    /// The first request each signature was seen on.
    source_of_signature: HashMap<String, String>,
}

impl AuditIndex {
    fn add(&mut self, entry: &AuditEntry) {
        if let Some(signature) = &entry.signature_sha256_opt {
            self.source_of_signature.entry(signature.clone()).or_insert_with(|| entry.source.clone());
        }
        self.by_source.entry(entry.source.clone()).or_insert_with(|| Recorded {
            signature_sha256_opt: entry.signature_sha256_opt.clone(),
            verdict: entry.verdict,
            reason: entry.reason.clone(),
        });
    }

    /// The decision recorded for this very request: the same place and the same signature.
    fn recorded(&self, source: &str, signature_sha256_opt: Option<&String>) -> Option<Decision> {
        let recorded = self.by_source.get(source)?;
        (recorded.signature_sha256_opt.as_ref() == signature_sha256_opt).then(|| match recorded.verdict {
            Verdict::Accepted => Decision::Accepted,
            Verdict::Refused => Decision::Refused(recorded.reason.clone()),
        })
    }
}

#[derive(Debug, Default)]
pub(crate) struct JobAuth {
    index: Mutex<AuditIndex>,
}

impl JobAuth {
    /// The decision on a request, recorded in the audit table first. An error means the table
    /// could not be read or written: nothing may act on the request yet.
    pub(crate) async fn decide(
        &self,
        context: &ExecutorContext,
        request: JobRequest<'_>,
    ) -> Result<Decision, AuditError> {
        let signature_sha256_opt =
            request.signature.as_ref().ok().and_then(Option::as_ref).map(RequestSignature::fingerprint);
        let mut index = self.index.lock().await;
        if let Some(decision) = index.recorded(&request.source, signature_sha256_opt.as_ref()) {
            return Ok(decision);
        }
        // Another replica may have decided it, or seen its signature, since this one last read.
        refresh(context, &mut index).await?;
        if let Some(decision) = index.recorded(&request.source, signature_sha256_opt.as_ref()) {
            return Ok(decision);
        }
        let signing = &context.config.signing;
        let now = context.clock.now_micros();
        let signature_opt = request.signature.as_ref().ok().and_then(Option::as_ref);
        let checked = request.signature.clone().and_then(|signature_opt| {
            let key_name =
                signing.verify(signature_opt.as_ref(), request.action, request.job, request.body, now)?;
            if let Some(first_seen) = signature_sha256_opt
                .as_ref()
                .and_then(|signature| index.source_of_signature.get(signature))
                .filter(|first_seen| **first_seen != request.source)
            {
                return Err(Refusal::Replayed { first_seen: first_seen.clone() });
            }
            Ok(key_name)
        });
        let (verdict, key_name_opt, reason) = match &checked {
            Ok(key_name) => (Verdict::Accepted, Some(key_name.clone()), String::new()),
            Err(refusal) if signing.enforce => (Verdict::Refused, None, refusal.to_string()),
            Err(refusal) => (
                Verdict::Accepted,
                None,
                format!("accepted because signing.enforce is off; with it on: {refusal}"),
            ),
        };
        let entry = AuditEntry {
            at_micros: now,
            executor: context.instance_id.clone(),
            source: request.source.clone(),
            action: request.action,
            job: request.job.to_string(),
            key_name_opt,
            sql_sha256_opt: (request.action == SignedAction::Submit).then(|| sha256_hex(request.body)),
            signature_sha256_opt,
            signed_at_micros_opt: signature_opt.map(|signature| signature.signed_at_micros),
            verdict,
            reason: reason.clone(),
        };
        append_audit(
            context.lake(),
            std::slice::from_ref(&entry),
            &uuid::Uuid::new_v4().simple().to_string(),
        )
        .await?;
        index.add(&entry);
        if let Err(refusal) = &checked {
            context.metrics.record_refused_request(request.action, refusal.kind(), verdict);
            tracing::warn!(job = %request.job, action = %request.action, source = %request.source, reason = %refusal, enforced = signing.enforce, "job request not authorized");
        } else {
            tracing::info!(job = %request.job, action = %request.action, source = %request.source, key = ?entry.key_name_opt, "job request authorized");
        }
        Ok(match verdict {
            Verdict::Accepted => Decision::Accepted,
            Verdict::Refused => Decision::Refused(reason),
        })
    }
}

/// Reads the audit files this replica has not read yet.
async fn refresh(context: &ExecutorContext, index: &mut AuditIndex) -> Result<(), AuditError> {
    let lake = context.lake();
    for path in audit_files(lake).await? {
        if index.files_read.contains(&path) {
            continue;
        }
        match read_audit_file(lake, &path).await {
            Ok(entries) => entries.iter().for_each(|entry| index.add(entry)),
            // A file that cannot be read is no reason to stop judging requests: what it held is
            // missing from the index, so a request it covered is judged (and audited) again.
            Err(error @ (AuditError::Column { .. } | AuditError::Parquet { .. })) => {
                tracing::error!(%path, error = %Chain(&error), "an audit file cannot be read; its entries are left out");
            }
            Err(error) => return Err(error),
        }
        index.files_read.insert(path);
    }
    Ok(())
}
