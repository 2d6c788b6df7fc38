//! Decides whether a job request (a definition, a deletion, a backfill) may act, and records the
//! decision in the audit table before anything acts on it.
//!
//! A request is known by where it is (its topic partition and offset, or its record's path), its
//! signature and what it asks (action, job, place and body). The first time a replica meets it,
//! the signature is checked (`sluice_jobs::signing`), then the decision is appended to the audit
//! table. The same request read again, after a restart or a rebalance, gets the decision the
//! table holds for it: a job accepted before a key was removed keeps running, and a request
//! refused once stays refused, whatever the signing time says by now. Anything else at that
//! place (a record at a reused offset, a backfill record rewritten) is judged afresh. A
//! signature the table holds for another request is a replay. With enforcement on, a request
//! that was accepted only because enforcement was off is judged again.

use std::collections::{HashMap, HashSet};

use sluice_errors::Chain;
use sluice_jobs::audit::{AuditEntry, AuditError, Verdict, append_audit, audit_files, read_audit_file};
use sluice_jobs::signing::{Refusal, RequestSignature, SignedAction, request_sha256, sha256_hex};
use tokio::sync::Mutex;

use crate::context::ExecutorContext;

/// A request as the executor met it.
#[derive(Debug)]
pub(crate) struct JobRequest<'a> {
    pub(crate) action: SignedAction,
    pub(crate) job: &'a str,
    /// Where it was put, as signed: [`sluice_jobs::signing::topic_place`], or the backfill
    /// record's path.
    pub(crate) place: String,
    /// What the signature covers besides the action, the job, the place and the time.
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
    verdict: Verdict,
    key_name_opt: Option<String>,
    reason: String,
}

/// A request as the audit table names it: its source, its signature's and its own SHA-256.
type RequestId = (String, Option<String>, String);

/// What this replica knows of the audit table.
#[derive(Debug, Default)]
struct AuditIndex {
    files_read: HashSet<String>,
    decisions: HashMap<RequestId, Recorded>,
    /// The first request each signature was seen on.
    source_of_signature: HashMap<String, String>,
}

impl AuditIndex {
    fn add(&mut self, entry: &AuditEntry) {
        if let Some(signature) = &entry.signature_sha256_opt {
            self.source_of_signature.entry(signature.clone()).or_insert_with(|| entry.source.clone());
        }
        let id = (entry.source.clone(), entry.signature_sha256_opt.clone(), entry.request_sha256.clone());
        // Entries are read oldest first, so the newest decision on a request stands: a later row
        // is a judgement made again once enforcement was turned on.
        let recorded = Recorded {
            verdict: entry.verdict,
            key_name_opt: entry.key_name_opt.clone(),
            reason: entry.reason.clone(),
        };
        self.decisions.insert(id, recorded);
    }

    /// The decision recorded for this very request, if it still holds: one accepted only because
    /// enforcement was off does not once it is on.
    fn recorded(&self, id: &RequestId, enforce: bool) -> Option<Decision> {
        let recorded = self.decisions.get(id)?;
        match recorded.verdict {
            Verdict::Accepted if enforce && recorded.key_name_opt.is_none() => None,
            Verdict::Accepted => Some(Decision::Accepted),
            Verdict::Refused => Some(Decision::Refused(recorded.reason.clone())),
        }
    }
}

/// The longest job name an audit row and the log keep: a record's key can be a megabyte.
const MAX_AUDITED_JOB_CHARS: usize = 256;

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
        let signing = &context.config.signing;
        let signature_opt = request.signature.as_ref().ok().and_then(Option::as_ref);
        let signature_sha256_opt = signature_opt.map(RequestSignature::fingerprint);
        let request_sha256 = request_sha256(request.action, request.job, &request.place, request.body);
        let id: RequestId = (request.source.clone(), signature_sha256_opt.clone(), request_sha256.clone());
        let mut index = self.index.lock().await;
        if let Some(decision) = index.recorded(&id, signing.enforce) {
            return Ok(decision);
        }
        // Another replica may have decided it, or seen its signature, since this one last read.
        refresh(context, &mut index).await?;
        if let Some(decision) = index.recorded(&id, signing.enforce) {
            return Ok(decision);
        }
        let now = context.clock.now_micros();
        let checked = request.signature.clone().and_then(|signature_opt| {
            let key_name = signing.verify(
                signature_opt.as_ref(),
                request.action,
                request.job,
                &request.place,
                request.body,
                now,
            )?;
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
            job: request.job.chars().take(MAX_AUDITED_JOB_CHARS).collect(),
            key_name_opt,
            sql_sha256_opt: (request.action == SignedAction::Submit).then(|| sha256_hex(request.body)),
            request_sha256,
            signature_sha256_opt,
            signed_at_micros_opt: signature_opt.map(|signature| signature.signed_at_micros),
            verdict,
            reason: reason.clone(),
        };
        let unique = uuid::Uuid::new_v4().simple().to_string();
        append_audit(context.lake(), std::slice::from_ref(&entry), &unique).await?;
        index.add(&entry);
        let (job, action, source) = (&entry.job, request.action, &request.source);
        if let Err(refusal) = &checked {
            context.metrics.record_refused_request(action, refusal.kind(), verdict);
            tracing::warn!(%job, %action, %source, reason = %refusal, enforced = signing.enforce, "job request not authorized");
        } else {
            tracing::info!(%job, %action, %source, key = ?entry.key_name_opt, "job request authorized");
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
