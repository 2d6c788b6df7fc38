//! Parquet modular encryption of sensitive columns (a device's location, its owner): which
//! columns of which streams are encrypted, the master keys they are encrypted under, and the
//! per-file keys in between.
//!
//! Every file gets fresh data keys (one per master key it uses), and each data key travels in the
//! file, wrapped (AES-GCM) by its master key, in the key metadata of the footer or the column.
//! The metadata is the JSON key material of Parquet's key tools (`PKMT1`, as parquet-java and
//! PyArrow write it), so that an engine with those tools and a KMS client that unwraps the same
//! way can read the files too. Master keys never leave the key provider.
//!
//! The footer stays plaintext and is signed with the footer key: readers without keys still read
//! every other column, and the Parquet writer leaves the encrypted columns' statistics out of it.
//! Sluice leaves them out of the Delta log too ([`crate::delta_stats_without`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_schema::Schema;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use parquet::encryption::decrypt::{FileDecryptionProperties, KeyRetriever};
use parquet::encryption::encrypt::FileEncryptionProperties;
use parquet::errors::ParquetError;
use ring::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sluice_config::ConfigIssue;
use sluice_schema::{EVENT_TIME_FIELD, KEY_FIELD, SEQUENCE_FIELD, SchemaRegistry};

/// Bytes of a data key: AES-256.
const DATA_KEY_BYTES: usize = 32;

/// `[encryption]`: the same for the compactor, the executor and the CLI, so that what one writes
/// the others can read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// The local key provider: a TOML file of named master keys, `name = "<base64 of 16 or 32
    /// random bytes>"`. The compactor needs it; an executor or CLI without it reads the other
    /// columns and refuses queries of the encrypted ones.
    pub key_file: Option<PathBuf>,
    /// The master key that signs each encrypted file's (plaintext) footer.
    pub footer_key: String,
    /// The encrypted columns, each with the master key its data keys are wrapped by.
    pub columns: Vec<EncryptedColumnConfig>,
    /// Executor only: the jobs (globs, as in `signing.trusted_keys`) whose runs decrypt. Any other
    /// job that reads an encrypted column is refused when it is submitted, with the column named.
    pub decrypting_jobs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptedColumnConfig {
    pub stream: String,
    pub column: String,
    /// The master key's name in the key provider.
    pub key: String,
}

impl EncryptionConfig {
    /// `writes`: the compactor's, which encrypts, and so needs the keys and the footer key.
    pub fn validate(&self, prefix: &str, writes: bool) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if self.columns.is_empty() {
            return issues;
        }
        if writes && self.key_file.is_none() {
            issues.push(ConfigIssue::new(
                format!("{prefix}.key_file"),
                "encrypted columns need master keys: set the key file",
            ));
        }
        if writes && self.footer_key.is_empty() {
            issues.push(ConfigIssue::new(
                format!("{prefix}.footer_key"),
                "encrypted columns need a master key for the footer: name one of the key file's keys",
            ));
        }
        let mut seen = BTreeSet::new();
        for (index, column) in self.columns.iter().enumerate() {
            if [KEY_FIELD, EVENT_TIME_FIELD, SEQUENCE_FIELD].contains(&column.column.as_str()) {
                issues.push(ConfigIssue::new(
                    format!("{prefix}.columns[{index}].column"),
                    format!(
                        "'{}' cannot be encrypted: files are sorted, partitioned, de-duplicated and pruned by it",
                        column.column
                    ),
                ));
            }
            if !seen.insert((column.stream.as_str(), column.column.as_str())) {
                issues.push(ConfigIssue::new(
                    format!("{prefix}.columns[{index}]"),
                    format!("{}.{} is listed twice", column.stream, column.column),
                ));
            }
            if column.key.is_empty() {
                issues.push(ConfigIssue::new(format!("{prefix}.columns[{index}].key"), "name a master key"));
            }
        }
        issues
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EncryptionError {
    #[error("failed to read the key file {path}")]
    ReadKeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the key file {path} is not a TOML table of key names to base64 keys: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("no master key named '{0}' in the key provider")]
    UnknownKey(String),
    #[error("no key provider is configured (encryption.key_file)")]
    NoKeys,
    #[error("{0}")]
    Schema(String),
    #[error("failed to wrap or unwrap a data key: {0}")]
    Crypto(String),
    #[error("failed to set up Parquet encryption")]
    Parquet(#[from] ParquetError),
}

/// A master key: 16 or 32 bytes (AES-128 or AES-256-GCM).
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey(Vec<u8>);

impl MasterKey {
    pub fn new(bytes: Vec<u8>) -> Result<Self, EncryptionError> {
        match bytes.len() {
            16 | 32 => Ok(Self(bytes)),
            other => Err(EncryptionError::Crypto(format!("a master key has 16 or 32 bytes, not {other}"))),
        }
    }

    /// A new random 32-byte key, base64: a line of a key file.
    pub fn generate_base64() -> Result<String, EncryptionError> {
        let mut bytes = [0u8; 32];
        fill_random(&mut bytes)?;
        Ok(BASE64.encode(bytes))
    }

    fn aead_key(&self) -> Result<LessSafeKey, EncryptionError> {
        let algorithm = if self.0.len() == 16 { &AES_128_GCM } else { &AES_256_GCM };
        let key = UnboundKey::new(algorithm, &self.0)
            .map_err(|_| EncryptionError::Crypto("the master key is unusable".into()))?;
        Ok(LessSafeKey::new(key))
    }

    /// `data_key` sealed under this key, named `id` (bound in as associated data, so a wrapped key
    /// cannot be passed off as another master key's): base64 of nonce, ciphertext and tag.
    fn wrap(&self, id: &str, data_key: &[u8]) -> Result<String, EncryptionError> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let mut sealed = data_key.to_vec();
        self.aead_key()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| EncryptionError::Crypto("sealing failed".into()))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&sealed);
        Ok(BASE64.encode(wrapped))
    }

    fn unwrap(&self, id: &str, wrapped: &str) -> Result<Vec<u8>, EncryptionError> {
        let bytes = BASE64
            .decode(wrapped)
            .map_err(|_| EncryptionError::Crypto(format!("the data key wrapped by '{id}' is not base64")))?;
        if bytes.len() <= NONCE_LEN {
            return Err(EncryptionError::Crypto(format!("the data key wrapped by '{id}' is too short")));
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| EncryptionError::Crypto("bad nonce".into()))?;
        let mut in_out = sealed.to_vec();
        let opened =
            self.aead_key()?.open_in_place(nonce, Aad::from(id.as_bytes()), &mut in_out).map_err(|_| {
                EncryptionError::Crypto(format!(
                    "master key '{id}' does not open the file's data key (another key of that name?)"
                ))
            })?;
        Ok(opened.to_vec())
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey(<{} bytes>)", self.0.len())
    }
}

/// Where master keys come from. Parquet asks for keys from synchronous code, once per file
/// read or written, so a provider backed by a remote KMS (AWS KMS, Vault transit, Cloud KMS)
/// fetches or unwraps its master keys when the service starts and answers from memory; see
/// docs/operations.md, "Column encryption", for writing one.
pub trait KeyProvider: Send + Sync + fmt::Debug {
    fn master_key(&self, id: &str) -> Result<MasterKey, EncryptionError>;
}

/// The local key provider: named master keys in a TOML file (for the demo and for keys a
/// secret manager mounts as a file).
pub struct KeyFile {
    path: PathBuf,
    keys: BTreeMap<String, MasterKey>,
}

impl fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFile").field("path", &self.path).field("keys", &self.keys.keys()).finish()
    }
}

impl KeyFile {
    pub fn load(path: &Path) -> Result<Self, EncryptionError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| EncryptionError::ReadKeyFile { path: path.display().to_string(), source })?;
        let invalid = |reason: String| EncryptionError::KeyFile { path: path.display().to_string(), reason };
        let table: BTreeMap<String, String> =
            toml::from_str(&text).map_err(|error| invalid(error.message().to_string()))?;
        let mut keys = BTreeMap::new();
        for (name, encoded) in table {
            let bytes = BASE64
                .decode(encoded.trim())
                .map_err(|_| invalid(format!("the value of '{name}' is not base64")))?;
            let key = MasterKey::new(bytes).map_err(|error| invalid(format!("'{name}': {error}")))?;
            keys.insert(name, key);
        }
        Ok(Self { path: path.to_path_buf(), keys })
    }
}

impl KeyProvider for KeyFile {
    fn master_key(&self, id: &str) -> Result<MasterKey, EncryptionError> {
        self.keys.get(id).cloned().ok_or_else(|| EncryptionError::UnknownKey(id.to_string()))
    }
}

/// The lake's encryption: which columns, under which keys, and who decrypts.
#[derive(Debug)]
pub struct LakeEncryption {
    /// `None` where the columns are known but no keys are held.
    provider_opt: Option<Arc<dyn KeyProvider>>,
    footer_key: String,
    /// Stream, then column, then master key.
    streams: BTreeMap<String, BTreeMap<String, String>>,
    decrypting_jobs: Vec<String>,
}

impl LakeEncryption {
    /// From validated configuration; `None` when no column is encrypted. Every column must be in
    /// its stream's schema and, with a key file, every named key in it, so that a typo stops the
    /// service at start instead of writing a column in plaintext.
    pub fn from_config(
        config: &EncryptionConfig,
        schemas: &SchemaRegistry,
    ) -> Result<Option<Arc<Self>>, EncryptionError> {
        if config.columns.is_empty() {
            return Ok(None);
        }
        let provider_opt = match &config.key_file {
            Some(key_file) => Some(Arc::new(KeyFile::load(key_file)?) as Arc<dyn KeyProvider>),
            None => None,
        };
        Self::with_provider(config, schemas, provider_opt).map(Some)
    }

    /// With keys from `provider_opt` (a KMS-backed provider, or none to hold no keys).
    pub fn with_provider(
        config: &EncryptionConfig,
        schemas: &SchemaRegistry,
        provider_opt: Option<Arc<dyn KeyProvider>>,
    ) -> Result<Arc<Self>, EncryptionError> {
        if let Some(provider) = &provider_opt
            && !config.footer_key.is_empty()
        {
            provider.master_key(&config.footer_key)?;
        }
        let mut streams: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for column in &config.columns {
            let Some(schema) = schemas.stream(&column.stream) else {
                return Err(EncryptionError::Schema(format!(
                    "encryption.columns names stream '{}', which has no schema",
                    column.stream
                )));
            };
            if !schema.fields.iter().any(|field| field.name == column.column) {
                return Err(EncryptionError::Schema(format!(
                    "encryption.columns names '{}.{}', which the stream's schema does not have",
                    column.stream, column.column
                )));
            }
            if let Some(provider) = &provider_opt {
                provider.master_key(&column.key)?;
            }
            streams
                .entry(column.stream.clone())
                .or_default()
                .insert(column.column.clone(), column.key.clone());
        }
        Ok(Arc::new(Self {
            provider_opt,
            footer_key: config.footer_key.clone(),
            streams,
            decrypting_jobs: config.decrypting_jobs.clone(),
        }))
    }

    /// The encrypted columns of `stream` (none for a stream not listed).
    pub fn encrypted_columns(&self, stream: &str) -> BTreeSet<&str> {
        self.streams
            .get(stream)
            .map(|columns| columns.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    pub fn encrypted_streams(&self) -> impl Iterator<Item = &str> {
        self.streams.keys().map(String::as_str)
    }

    /// Whether keys are held: without them nothing encrypted is read or written.
    pub fn holds_keys(&self) -> bool {
        self.provider_opt.is_some()
    }

    /// The globs of the jobs whose runs decrypt.
    pub fn decrypting_jobs(&self) -> &[String] {
        &self.decrypting_jobs
    }

    /// Encryption for a new file of `stream` with `schema`, or `None` when the file holds none of
    /// the stream's encrypted columns (a file of an older schema). Fresh data keys every time.
    pub fn file_encryption(
        &self,
        stream: &str,
        schema: &Schema,
    ) -> Result<Option<Arc<FileEncryptionProperties>>, EncryptionError> {
        let Some(columns) = self.streams.get(stream) else { return Ok(None) };
        let present: Vec<(&String, &String)> =
            columns.iter().filter(|(column, _)| schema.field_with_name(column).is_ok()).collect();
        if present.is_empty() {
            return Ok(None);
        }
        let (footer_key, footer_metadata) = self.new_data_key(&self.footer_key, true)?;
        let mut builder = FileEncryptionProperties::builder(footer_key)
            .with_plaintext_footer(true)
            .with_footer_key_metadata(footer_metadata);
        // One data key per master key in the file: columns under one master key share it.
        let mut data_keys: BTreeMap<&str, (Vec<u8>, Vec<u8>)> = BTreeMap::new();
        for (column, master) in present {
            if !data_keys.contains_key(master.as_str()) {
                data_keys.insert(master, self.new_data_key(master, false)?);
            }
            let (key, metadata) = &data_keys[master.as_str()];
            builder = builder.with_column_key_and_metadata(column, key.clone(), metadata.clone());
        }
        Ok(Some(builder.build()?))
    }

    /// What reads every file of the lake, encrypted or not: keys are unwrapped from each file's
    /// key metadata as it is read.
    pub fn decryption(&self) -> Result<Arc<FileDecryptionProperties>, EncryptionError> {
        let provider = self.provider_opt.as_ref().ok_or(EncryptionError::NoKeys)?;
        let retriever = KeyUnwrapper { provider: Arc::clone(provider) };
        Ok(FileDecryptionProperties::with_key_retriever(Arc::new(retriever)).build()?)
    }

    fn new_data_key(&self, master_id: &str, is_footer: bool) -> Result<(Vec<u8>, Vec<u8>), EncryptionError> {
        let mut data_key = vec![0u8; DATA_KEY_BYTES];
        fill_random(&mut data_key)?;
        let provider = self.provider_opt.as_ref().ok_or(EncryptionError::NoKeys)?;
        let wrapped = provider.master_key(master_id)?.wrap(master_id, &data_key)?;
        Ok((data_key, key_material(master_id, &wrapped, is_footer)))
    }
}

fn fill_random(bytes: &mut [u8]) -> Result<(), EncryptionError> {
    SystemRandom::new()
        .fill(bytes)
        .map_err(|_| EncryptionError::Crypto("no randomness from the system".into()))
}

/// Parquet key tools' key material (`PKMT1`), stored inside the file.
fn key_material(master_id: &str, wrapped: &str, is_footer: bool) -> Vec<u8> {
    let mut material = json!({
        "keyMaterialType": "PKMT1",
        "internalStorage": true,
        "isFooterKey": is_footer,
        "masterKeyID": master_id,
        "wrappedDEK": wrapped,
        "doubleWrapping": false,
    });
    if is_footer {
        material["kmsInstanceID"] = json!("DEFAULT");
        material["kmsInstanceURL"] = json!("DEFAULT");
    }
    material.to_string().into_bytes()
}

/// Unwraps each data key from the key material Parquet hands over as it reads a file.
struct KeyUnwrapper {
    provider: Arc<dyn KeyProvider>,
}

impl KeyUnwrapper {
    fn unwrap_material(&self, key_metadata: &[u8]) -> Result<Vec<u8>, EncryptionError> {
        let bad = || EncryptionError::Crypto("the file's key metadata is not Sluice's key material".into());
        let material: Value = serde_json::from_slice(key_metadata).map_err(|_| bad())?;
        let master_id = material["masterKeyID"].as_str().ok_or_else(bad)?;
        let wrapped = material["wrappedDEK"].as_str().ok_or_else(bad)?;
        self.provider.master_key(master_id)?.unwrap(master_id, wrapped)
    }
}

impl KeyRetriever for KeyUnwrapper {
    fn retrieve_key(&self, key_metadata: &[u8]) -> parquet::errors::Result<Vec<u8>> {
        self.unwrap_material(key_metadata).map_err(|error| ParquetError::General(error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(BTreeMap<String, MasterKey>);

    impl KeyProvider for Fixed {
        fn master_key(&self, id: &str) -> Result<MasterKey, EncryptionError> {
            self.0.get(id).cloned().ok_or_else(|| EncryptionError::UnknownKey(id.to_string()))
        }
    }

    #[test]
    fn a_wrapped_data_key_opens_only_with_its_master_key_and_name() {
        let key = MasterKey::new(vec![7; 32]).unwrap();
        let wrapped = key.wrap("site-1", &[42; 32]).unwrap();
        assert_eq!(key.unwrap("site-1", &wrapped).unwrap(), vec![42; 32]);
        // The same bytes under another name, or another key under the same name, do not open it.
        assert!(key.unwrap("site-2", &wrapped).is_err());
        assert!(MasterKey::new(vec![8; 32]).unwrap().unwrap("site-1", &wrapped).is_err());
        // Nor does a truncated or altered one.
        assert!(key.unwrap("site-1", &wrapped[..8]).is_err());
        let mut altered = BASE64.decode(&wrapped).unwrap();
        *altered.last_mut().unwrap() ^= 1;
        assert!(key.unwrap("site-1", &BASE64.encode(altered)).is_err());
        // AES-128 master keys work the same; other sizes are refused.
        let short = MasterKey::new(vec![1; 16]).unwrap();
        assert_eq!(short.unwrap("k", &short.wrap("k", &[3; 32]).unwrap()).unwrap(), vec![3; 32]);
        assert!(MasterKey::new(vec![1; 24]).is_err());
        assert!(MasterKey::new(Vec::new()).is_err());
    }

    #[test]
    fn key_material_names_its_master_key_and_is_read_back() {
        let provider =
            Arc::new(Fixed(BTreeMap::from([("m".to_string(), MasterKey::new(vec![9; 32]).unwrap())])));
        let unwrapper = KeyUnwrapper { provider: Arc::clone(&provider) as Arc<dyn KeyProvider> };
        let wrapped = provider.master_key("m").unwrap().wrap("m", &[5; 32]).unwrap();
        let material = key_material("m", &wrapped, true);
        let parsed: Value = serde_json::from_slice(&material).unwrap();
        assert_eq!(parsed["keyMaterialType"], "PKMT1");
        assert_eq!(parsed["isFooterKey"], true);
        assert_eq!(parsed["kmsInstanceID"], "DEFAULT");
        assert_eq!(unwrapper.retrieve_key(&material).unwrap(), vec![5; 32]);
        for garbage in [&b""[..], b"{}", b"not json", b"{\"masterKeyID\":\"other\",\"wrappedDEK\":\"AAAA\"}"]
        {
            assert!(unwrapper.retrieve_key(garbage).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn key_files_hold_named_base64_keys_and_say_what_is_wrong() {
        let directory = tempfile::TempDir::new().unwrap();
        let path = directory.path().join("keys.toml");
        let generated = MasterKey::generate_base64().unwrap();
        std::fs::write(&path, format!("site = \"{generated}\"\nowner = \"{}\"\n", BASE64.encode([2u8; 16])))
            .unwrap();
        let file = KeyFile::load(&path).unwrap();
        assert_eq!(file.master_key("site").unwrap().0, BASE64.decode(&generated).unwrap());
        assert!(matches!(file.master_key("nope"), Err(EncryptionError::UnknownKey(_))));
        assert!(!format!("{file:?}").contains(&generated), "keys stay out of Debug");
        for (text, says) in [
            ("site = \"not base64!\"", "not base64"),
            ("site = \"AAAA\"", "16 or 32 bytes"),
            ("site = 5", "not a TOML table"),
            ("[[", "not a TOML table"),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = KeyFile::load(&path).unwrap_err().to_string();
            assert!(error.contains(says) || error.contains("not a TOML table"), "{text}: {error}");
        }
    }

    #[test]
    fn columns_that_order_or_partition_files_cannot_be_encrypted() {
        let config = EncryptionConfig {
            key_file: None,
            footer_key: String::new(),
            columns: vec![
                EncryptedColumnConfig { stream: "t".into(), column: KEY_FIELD.into(), key: "k".into() },
                EncryptedColumnConfig { stream: "t".into(), column: "site".into(), key: "k".into() },
                EncryptedColumnConfig { stream: "t".into(), column: "site".into(), key: String::new() },
            ],
            decrypting_jobs: Vec::new(),
        };
        let keys: Vec<String> =
            config.validate("encryption", true).into_iter().map(|issue| issue.key).collect();
        assert_eq!(
            keys,
            [
                "encryption.key_file",
                "encryption.footer_key",
                "encryption.columns[0].column",
                "encryption.columns[2]",
                "encryption.columns[2].key"
            ]
        );
        assert_eq!(EncryptionConfig::default().validate("encryption", true), Vec::new());
        // A reader may know the columns without holding keys.
        let keys: Vec<String> =
            config.validate("encryption", false).into_iter().map(|issue| issue.key).collect();
        assert_eq!(
            keys,
            ["encryption.columns[0].column", "encryption.columns[2]", "encryption.columns[2].key"]
        );
    }
}
