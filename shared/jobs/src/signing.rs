//! Who may make the executor run code: job definitions, deletions and backfill requests are signed
//! with the submitter's Ed25519 key, and the executor runs only what a trusted key signed for a
//! job in its scope.
//!
//! A signature covers the action, the job name, where the request is put (the jobs topic and
//! partition of a definition or deletion; the record's path for a backfill), the time of signing
//! and the exact bytes of the request's body (the SQL file of a definition; nothing for a
//! deletion; the range of a backfill), so that none of them can be changed, and the request cannot
//! be moved to another job, partition or deployment topic, without the key. The time bounds how
//! long a copied request stays usable; the executor also refuses a signature it has seen on
//! another request (the audit table remembers them across restarts).
//!
//! On the jobs topic the signature travels in three record headers ([`SIGNATURE_HEADER`],
//! [`KEY_NAME_HEADER`], [`SIGNED_AT_HEADER`]); a backfill request, a record in the lake, carries
//! it in its JSON.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The signature, base64.
pub const SIGNATURE_HEADER: &str = "sluice-signature";
/// The name the executor's configuration gives the public key.
pub const KEY_NAME_HEADER: &str = "sluice-signing-key";
/// When the request was signed, microseconds since the epoch in decimal.
pub const SIGNED_AT_HEADER: &str = "sluice-signed-at";

/// Starts every signed message, so that a signature made for anything else never verifies here.
const DOMAIN: &[u8] = b"sluice signed job request v1\n";

const PEM_BEGIN: &str = "-----BEGIN PRIVATE KEY-----";
const PEM_END: &str = "-----END PRIVATE KEY-----";

/// What a signed request asks the executor to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignedAction {
    /// Run a job definition (a new job or a new revision).
    Submit,
    /// Delete a job (a tombstone).
    Delete,
    /// Run windows of a job again.
    Backfill,
}

impl SignedAction {
    pub const ALL: [Self; 3] = [Self::Submit, Self::Delete, Self::Backfill];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submit => "submit",
            Self::Delete => "delete",
            Self::Backfill => "backfill",
        }
    }
}

impl fmt::Display for SignedAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A signature as a request carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSignature {
    pub key_name: String,
    pub signed_at_micros: i64,
    /// Base64 of the 64-byte Ed25519 signature.
    pub signature: String,
}

impl RequestSignature {
    /// The headers of a jobs-topic record that carry this signature.
    pub fn headers(&self) -> [(&'static str, String); 3] {
        [
            (SIGNATURE_HEADER, self.signature.clone()),
            (KEY_NAME_HEADER, self.key_name.clone()),
            (SIGNED_AT_HEADER, self.signed_at_micros.to_string()),
        ]
    }

    /// The signature from a record's headers: none when the record has none of them; refused
    /// when it has some but not all, or one that does not parse.
    pub fn from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<Option<Self>, Refusal> {
        let (mut signature_opt, mut key_name_opt, mut signed_at_opt) = (None, None, None);
        for (name, value_opt) in headers {
            let slot = match name {
                SIGNATURE_HEADER => &mut signature_opt,
                KEY_NAME_HEADER => &mut key_name_opt,
                SIGNED_AT_HEADER => &mut signed_at_opt,
                _ => continue,
            };
            if slot.is_some() {
                return Err(Refusal::Malformed(format!("header {name} appears more than once")));
            }
            let value = std::str::from_utf8(value_opt.unwrap_or_default())
                .map_err(|_| Refusal::Malformed(format!("header {name} is not UTF-8")))?;
            *slot = Some(value.to_string());
        }
        match (signature_opt, key_name_opt, signed_at_opt) {
            (None, None, None) => Ok(None),
            (Some(signature), Some(key_name), Some(signed_at)) => {
                let signed_at_micros = signed_at.parse::<i64>().map_err(|_| {
                    Refusal::Malformed(format!(
                        "header {SIGNED_AT_HEADER} must be microseconds since the epoch, not '{}'",
                        printable(&signed_at)
                    ))
                })?;
                Ok(Some(Self { key_name, signed_at_micros, signature }))
            }
            _ => Err(Refusal::Malformed(format!(
                "a signed request needs all of {SIGNATURE_HEADER}, {KEY_NAME_HEADER} and {SIGNED_AT_HEADER}"
            ))),
        }
    }

    /// SHA-256 of the signature's bytes, hex: how the audit table names a signature, to tell a
    /// replayed one.
    pub fn fingerprint(&self) -> String {
        sha256_hex(self.signature.as_bytes())
    }
}

/// SHA-256 (hex) of what a request asks, whoever signed it: its action, job, place and body.
/// A decision recorded for a request holds only for a request with the same fingerprint.
pub fn request_sha256(action: SignedAction, job: &str, place: &str, body: &[u8]) -> String {
    sha256_hex(&signed_message(action, job, place, 0, body))
}

/// SHA-256, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Where a definition or deletion is put: the jobs topic and partition it is produced to.
pub fn topic_place(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// Where a backfill request is put: its record's path in the lake of the deployment whose jobs
/// topic is `jobs_topic`. The topic names the deployment: every lake has the same relative paths.
pub fn backfill_place(jobs_topic: &str, path: &str) -> String {
    format!("{jobs_topic}:{path}")
}

/// The bytes a signature covers.
fn signed_message(
    action: SignedAction,
    job: &str,
    place: &str,
    signed_at_micros: i64,
    body: &[u8],
) -> Vec<u8> {
    // Each field before the body is length-prefixed, so none can run into the next whatever it
    // holds; the body is last and taken whole.
    let mut message = Vec::with_capacity(DOMAIN.len() + job.len() + place.len() + body.len() + 48);
    message.extend_from_slice(DOMAIN);
    message.extend_from_slice(action.as_str().as_bytes());
    message.push(b'\n');
    for field in [job, place] {
        message.extend_from_slice(format!("{}:", field.len()).as_bytes());
        message.extend_from_slice(field.as_bytes());
        message.push(b'\n');
    }
    message.extend_from_slice(signed_at_micros.to_string().as_bytes());
    message.push(b'\n');
    message.extend_from_slice(body);
    message
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the system's random source failed")]
    Random,
    #[error("not a PEM private key: no '{PEM_BEGIN}' ... '{PEM_END}' block")]
    NotPem,
    #[error("the PEM block is not valid base64")]
    Base64,
    #[error("not an Ed25519 private key (PKCS#8): {0}")]
    Rejected(String),
}

/// A submitter's private key with the name the executors know its public key by.
pub struct SigningKey {
    name: String,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .field("public_key", &self.public_key())
            .finish()
    }
}

impl SigningKey {
    /// A new key pair: the private key as a PKCS#8 PEM document (what `openssl pkey` reads too),
    /// and the public key in base64, as the executor's configuration takes it.
    pub fn generate() -> Result<(String, String), KeyError> {
        let document =
            Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).map_err(|_| KeyError::Random)?;
        let pair = Ed25519KeyPair::from_pkcs8(document.as_ref())
            .map_err(|rejected| KeyError::Rejected(rejected.to_string()))?;
        let encoded = BASE64.encode(document.as_ref());
        let mut pem = String::from(PEM_BEGIN);
        pem.push('\n');
        for line in encoded.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str(PEM_END);
        pem.push('\n');
        Ok((pem, BASE64.encode(pair.public_key().as_ref())))
    }

    /// A key from its PEM document; OpenSSL's `genpkey -algorithm ed25519` output reads too.
    pub fn from_pem(name: &str, pem: &str) -> Result<Self, KeyError> {
        let start = pem.find(PEM_BEGIN).ok_or(KeyError::NotPem)? + PEM_BEGIN.len();
        let end = pem[start..].find(PEM_END).ok_or(KeyError::NotPem)? + start;
        let encoded: String = pem[start..end].chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let der = BASE64.decode(encoded).map_err(|_| KeyError::Base64)?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|rejected| KeyError::Rejected(rejected.to_string()))?;
        Ok(Self { name: name.to_string(), pair })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key in base64.
    pub fn public_key(&self) -> String {
        BASE64.encode(self.pair.public_key().as_ref())
    }

    pub fn sign(
        &self,
        action: SignedAction,
        job: &str,
        place: &str,
        body: &[u8],
        signed_at_micros: i64,
    ) -> RequestSignature {
        let signature = self.pair.sign(&signed_message(action, job, place, signed_at_micros, body));
        RequestSignature {
            key_name: self.name.clone(),
            signed_at_micros,
            signature: BASE64.encode(signature.as_ref()),
        }
    }
}

/// The executor's `[signing]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    /// Refuse what no trusted key signed. Off, every request is still checked and audited, and
    /// runs whatever the check said.
    pub enforce: bool,
    /// A request signed longer ago than this when the executor first sees it is refused.
    pub max_age_ms: u64,
    /// How far in the future a signing time may be (the submitter's clock running ahead).
    pub max_clock_skew_ms: u64,
    pub trusted_keys: Vec<TrustedKey>,
}

impl Default for SigningConfig {
    fn default() -> Self {
        Self { enforce: true, max_age_ms: 86_400_000, max_clock_skew_ms: 300_000, trusted_keys: Vec::new() }
    }
}

/// A public key the executor trusts, and for what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    /// What requests name the key by (the `sluice-signing-key` header).
    pub name: String,
    /// The Ed25519 public key, base64 (as `sluice keys generate` prints it).
    pub public_key: String,
    /// Job names (globs: `*` any run of characters, `?` one) this key may act on.
    pub jobs: Vec<String>,
    /// What it may do to them; all three when not given.
    #[serde(default = "all_actions")]
    pub actions: Vec<SignedAction>,
}

fn all_actions() -> Vec<SignedAction> {
    SignedAction::ALL.to_vec()
}

impl SigningConfig {
    /// Problems with the section, each as (key, message).
    pub fn issues(&self, prefix: &str) -> Vec<(String, String)> {
        let mut issues = Vec::new();
        if self.max_age_ms == 0 {
            issues.push((format!("{prefix}.max_age_ms"), "must be greater than 0".to_string()));
        }
        let mut names = std::collections::BTreeSet::new();
        for (index, key) in self.trusted_keys.iter().enumerate() {
            let at = format!("{prefix}.trusted_keys[{index}]");
            if key.name.trim().is_empty() {
                issues.push((format!("{at}.name"), "must not be empty".to_string()));
            } else if !names.insert(key.name.as_str()) {
                issues.push((
                    format!("{at}.name"),
                    format!("'{}' is the name of an earlier key too", key.name),
                ));
            }
            if let Err(message) = decode_public_key(&key.public_key) {
                issues.push((format!("{at}.public_key"), message));
            }
            if key.jobs.is_empty() {
                issues.push((format!("{at}.jobs"), "lists no job; use [\"*\"] for every job".to_string()));
            }
            if key.actions.is_empty() {
                issues.push((format!("{at}.actions"), "lists no action".to_string()));
            }
        }
        issues
    }

    /// Checks a request: the name of the key that signed it, or why it is refused. Replays of a
    /// signature seen before are the caller's to find (it keeps the signatures it has seen).
    pub fn verify(
        &self,
        signature_opt: Option<&RequestSignature>,
        action: SignedAction,
        job: &str,
        place: &str,
        body: &[u8],
        now_micros: i64,
    ) -> Result<String, Refusal> {
        let Some(signature) = signature_opt else { return Err(Refusal::Unsigned) };
        let Some(key) = self.trusted_keys.iter().find(|key| key.name == signature.key_name) else {
            return Err(Refusal::UnknownKey(printable(&signature.key_name)));
        };
        let public_key =
            decode_public_key(&key.public_key).map_err(|_| Refusal::UnknownKey(key.name.clone()))?;
        let signature_bytes = BASE64
            .decode(&signature.signature)
            .map_err(|_| Refusal::Malformed(format!("header {SIGNATURE_HEADER} is not base64")))?;
        let message = signed_message(action, job, place, signature.signed_at_micros, body);
        if UnparsedPublicKey::new(&ED25519, public_key).verify(&message, &signature_bytes).is_err() {
            return Err(Refusal::BadSignature { key: key.name.clone() });
        }
        if !key.actions.contains(&action) || !key.jobs.iter().any(|pattern| glob_matches(pattern, job)) {
            return Err(Refusal::OutOfScope { key: key.name.clone(), action, job: job.to_string() });
        }
        let age_micros = now_micros.saturating_sub(signature.signed_at_micros);
        let max_age_micros = i64::try_from(self.max_age_ms).unwrap_or(i64::MAX).saturating_mul(1_000);
        if age_micros > max_age_micros {
            return Err(Refusal::Expired {
                age_s: age_micros / 1_000_000,
                max_age_s: max_age_micros / 1_000_000,
            });
        }
        let skew_micros = i64::try_from(self.max_clock_skew_ms).unwrap_or(i64::MAX).saturating_mul(1_000);
        if age_micros < skew_micros.saturating_neg() {
            return Err(Refusal::FromTheFuture { ahead_s: age_micros.saturating_neg() / 1_000_000 });
        }
        Ok(key.name.clone())
    }
}

fn decode_public_key(encoded: &str) -> Result<Vec<u8>, String> {
    let bytes = BASE64.decode(encoded.trim()).map_err(|_| "is not base64".to_string())?;
    if bytes.len() != 32 {
        return Err(format!("is {} bytes; an Ed25519 public key is 32", bytes.len()));
    }
    Ok(bytes)
}

/// Why a request was not authorized. Its text is what the submitter reads on the status topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "not signed; the executor runs only requests signed by a trusted key (sluice jobs ... --key FILE)"
    )]
    Unsigned,
    #[error("the signature headers are malformed: {0}")]
    Malformed(String),
    #[error("signed by key '{0}', which the executor does not trust (signing.trusted_keys)")]
    UnknownKey(String),
    #[error(
        "the signature does not verify with the public key of '{key}': the request was changed or moved, or signed by another key"
    )]
    BadSignature { key: String },
    #[error("key '{key}' may not {action} job '{job}' (its jobs and actions in signing.trusted_keys)")]
    OutOfScope { key: String, action: SignedAction, job: String },
    #[error("signed {age_s} s ago, more than signing.max_age_ms ({max_age_s} s) allows; sign it again")]
    Expired { age_s: i64, max_age_s: i64 },
    #[error("signed {ahead_s} s in the future, past signing.max_clock_skew_ms; check the submitter's clock")]
    FromTheFuture { ahead_s: i64 },
    #[error("replayed: the same signature was seen before on {first_seen}; sign the request again")]
    Replayed { first_seen: String },
}

impl Refusal {
    /// Every value [`Refusal::kind`] gives.
    pub const KINDS: [&'static str; 8] = [
        "unsigned",
        "malformed",
        "unknown_key",
        "bad_signature",
        "out_of_scope",
        "expired",
        "from_the_future",
        "replayed",
    ];

    /// The `reason` label of the refusal metric and the alert rules.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::Malformed(_) => "malformed",
            Self::UnknownKey(_) => "unknown_key",
            Self::BadSignature { .. } => "bad_signature",
            Self::OutOfScope { .. } => "out_of_scope",
            Self::Expired { .. } => "expired",
            Self::FromTheFuture { .. } => "from_the_future",
            Self::Replayed { .. } => "replayed",
        }
    }
}

/// `*` matches any run of characters (none too), `?` exactly one; everything else itself.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (pattern, text): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was and the text position it matched up to: on a mismatch the star
    // takes one more character, which keeps the match linear-time per star.
    let mut star_opt: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star_opt = Some((p, t));
            p += 1;
        } else if let Some((star, matched)) = star_opt {
            p = star + 1;
            t = matched + 1;
            star_opt = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

/// A name from a request, safe to print: control characters escaped, at most 128 characters.
fn printable(text: &str) -> String {
    text.chars().take(128).flat_map(char::escape_default).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    const NOW: i64 = 1_764_000_000_000_000;
    const PLACE: &str = "sluice.jobs/0";

    fn key(name: &str) -> (SigningKey, String) {
        let (pem, public) = SigningKey::generate().unwrap();
        (SigningKey::from_pem(name, &pem).unwrap(), public)
    }

    fn config(name: &str, public: &str, jobs: &[&str], actions: &[SignedAction]) -> SigningConfig {
        SigningConfig {
            trusted_keys: vec![TrustedKey {
                name: name.into(),
                public_key: public.into(),
                jobs: jobs.iter().map(|job| (*job).to_string()).collect(),
                actions: actions.to_vec(),
            }],
            ..SigningConfig::default()
        }
    }

    #[test]
    fn a_signed_request_verifies_and_any_change_to_it_does_not() {
        let (alice, public) = key("alice");
        let trust = config("alice", &public, &["hourly_*"], &SignedAction::ALL);
        let sql = b"-- window: 1h\nSELECT 1";
        let signature = alice.sign(SignedAction::Submit, "hourly_stats", PLACE, sql, NOW);
        assert_eq!(
            trust.verify(Some(&signature), SignedAction::Submit, "hourly_stats", PLACE, sql, NOW),
            Ok("alice".into())
        );
        let bad = |refusal: Result<String, Refusal>| {
            assert!(matches!(refusal, Err(Refusal::BadSignature { .. })), "{refusal:?}")
        };
        bad(trust.verify(
            Some(&signature),
            SignedAction::Submit,
            "hourly_stats",
            PLACE,
            b"-- window: 1h\nSELECT 2",
            NOW,
        ));
        bad(trust.verify(Some(&signature), SignedAction::Submit, "hourly_other", PLACE, sql, NOW));
        bad(trust.verify(Some(&signature), SignedAction::Delete, "hourly_stats", PLACE, sql, NOW));
        let mut moved = signature.clone();
        moved.signed_at_micros += 1;
        bad(trust.verify(Some(&signature), SignedAction::Submit, "hourly_stats", "sluice.jobs/1", sql, NOW));
        bad(trust.verify(Some(&signature), SignedAction::Submit, "hourly_stats", "staging.jobs/0", sql, NOW));
        bad(trust.verify(Some(&moved), SignedAction::Submit, "hourly_stats", PLACE, sql, NOW));
    }

    #[test]
    fn unsigned_unknown_out_of_scope_old_and_future_requests_are_refused() {
        let (alice, public) = key("alice");
        let (mallory, _) = key("alice");
        let trust = config("alice", &public, &["hourly_*"], &[SignedAction::Submit]);
        // Signs with `key` what it then checks: the same action, job and body.
        let check = |key: &SigningKey, action, job: &str, signed_at_micros| {
            trust.verify(
                Some(&key.sign(action, job, PLACE, b"x", signed_at_micros)),
                action,
                job,
                PLACE,
                b"x",
                NOW,
            )
        };
        assert_eq!(
            trust.verify(None, SignedAction::Submit, "hourly_a", PLACE, b"x", NOW),
            Err(Refusal::Unsigned)
        );
        let (bob, _) = key("bob");
        assert_eq!(
            check(&bob, SignedAction::Submit, "hourly_a", NOW),
            Err(Refusal::UnknownKey("bob".into()))
        );
        // The right name is not enough without the key.
        assert!(matches!(
            check(&mallory, SignedAction::Submit, "hourly_a", NOW),
            Err(Refusal::BadSignature { .. })
        ));
        assert!(matches!(
            check(&alice, SignedAction::Submit, "daily_a", NOW),
            Err(Refusal::OutOfScope { .. })
        ));
        assert!(matches!(
            check(&alice, SignedAction::Delete, "hourly_a", NOW),
            Err(Refusal::OutOfScope { .. })
        ));
        let max_age = 86_400_000_000;
        assert_eq!(check(&alice, SignedAction::Submit, "hourly_a", NOW - max_age), Ok("alice".into()));
        assert!(matches!(
            check(&alice, SignedAction::Submit, "hourly_a", NOW - max_age - 1),
            Err(Refusal::Expired { .. })
        ));
        assert_eq!(check(&alice, SignedAction::Submit, "hourly_a", NOW + 300_000_000), Ok("alice".into()));
        assert!(matches!(
            check(&alice, SignedAction::Submit, "hourly_a", NOW + 300_000_001),
            Err(Refusal::FromTheFuture { .. })
        ));
        // The extremes of the signing time neither overflow nor pass.
        for extreme in [i64::MIN, i64::MAX] {
            assert!(check(&alice, SignedAction::Submit, "hourly_a", extreme).is_err());
        }
    }

    #[test]
    fn headers_round_trip_and_partial_or_garbled_ones_are_refused() {
        let (alice, _) = key("alice");
        let signature = alice.sign(SignedAction::Submit, "j", PLACE, b"x", NOW);
        let headers = signature.headers();
        let parsed = RequestSignature::from_headers(
            headers.iter().map(|(name, value)| (*name, Some(value.as_bytes()))),
        );
        assert_eq!(parsed, Ok(Some(signature.clone())));
        assert_eq!(RequestSignature::from_headers([("other", Some(&b"v"[..]))]), Ok(None));
        let partial =
            RequestSignature::from_headers([(SIGNATURE_HEADER, Some(signature.signature.as_bytes()))]);
        assert!(matches!(partial, Err(Refusal::Malformed(_))));
        let twice = headers.iter().chain(headers.iter()).map(|(name, value)| (*name, Some(value.as_bytes())));
        assert!(matches!(RequestSignature::from_headers(twice), Err(Refusal::Malformed(_))));
        let bad_time = [
            (SIGNATURE_HEADER, Some(&b"AA=="[..])),
            (KEY_NAME_HEADER, Some(&b"alice"[..])),
            (SIGNED_AT_HEADER, Some(&b"yesterday"[..])),
        ];
        assert!(matches!(RequestSignature::from_headers(bad_time), Err(Refusal::Malformed(_))));
        let not_utf8 = [(KEY_NAME_HEADER, Some(&[0xff_u8][..]))];
        assert!(matches!(RequestSignature::from_headers(not_utf8), Err(Refusal::Malformed(_))));
        let null = [(SIGNATURE_HEADER, None), (KEY_NAME_HEADER, None), (SIGNED_AT_HEADER, None)];
        assert!(matches!(RequestSignature::from_headers(null), Err(Refusal::Malformed(_))));
    }

    #[test]
    fn garbled_signatures_and_keys_are_refused_not_panics() {
        let (_, public) = key("alice");
        let trust = config("alice", &public, &["*"], &SignedAction::ALL);
        for garbage in ["", "!!!", "AA==", &BASE64.encode([0u8; 65])] {
            let signature = RequestSignature {
                key_name: "alice".into(),
                signed_at_micros: NOW,
                signature: garbage.into(),
            };
            assert!(trust.verify(Some(&signature), SignedAction::Submit, "j", PLACE, b"x", NOW).is_err());
        }
        assert!(matches!(SigningKey::from_pem("k", "nothing"), Err(KeyError::NotPem)));
        let not_a_key = format!("{PEM_BEGIN}\n{}\n{PEM_END}\n", BASE64.encode(b"not a key"));
        assert!(matches!(SigningKey::from_pem("k", &not_a_key), Err(KeyError::Rejected(_))));
        let issues = config("alice", "AAAA", &[], &[]).issues("signing");
        let keys: Vec<&str> = issues.iter().map(|(key, _)| key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "signing.trusted_keys[0].public_key",
                "signing.trusted_keys[0].jobs",
                "signing.trusted_keys[0].actions"
            ]
        );
    }

    #[test]
    fn a_key_reloaded_from_its_pem_signs_as_the_generated_one() {
        let (pem, public) = SigningKey::generate().unwrap();
        let reloaded = SigningKey::from_pem("k", &pem).unwrap();
        assert_eq!(reloaded.public_key(), public);
        let trust = config("k", &public, &["*"], &SignedAction::ALL);
        let signature = reloaded.sign(SignedAction::Backfill, "j", PLACE, b"range", NOW);
        assert_eq!(
            trust.verify(Some(&signature), SignedAction::Backfill, "j", PLACE, b"range", NOW),
            Ok("k".into())
        );
    }

    #[test]
    fn globs_match_whole_names() {
        for (pattern, text, matches) in [
            ("*", "", true),
            ("*", "anything", true),
            ("hourly_*", "hourly_", true),
            ("hourly_*", "hourly_stats", true),
            ("hourly_*", "xhourly_stats", false),
            ("*_stats", "hourly_stats", true),
            ("*_stats", "hourly_stats_v2", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("exact", "exact", true),
            ("exact", "exac", false),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(glob_matches(pattern, text), matches, "{pattern} against {text}");
        }
        // Many stars against a long near-miss stay quick.
        let long = "a".repeat(10_000);
        assert!(!glob_matches("*a*a*a*a*a*a*b", &long));
    }
}
