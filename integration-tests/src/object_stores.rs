//! The object stores a remote lake lives on: an S3-compatible server (moto) and Azurite.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use sha2::{Digest as _, Sha256};
use tokio::process::Command;

use crate::process::{ServerProcess, StartFailure, answer_from, start_on_a_free_port};
use crate::{remote_lake, repo_root, unique_suffix};

/// The directory or executable that `deploy/local/<script> path` prints (installing the tool the
/// first time).
fn installed_path(script: &str) -> anyhow::Result<String> {
    let output = std::process::Command::new("bash")
        .arg(repo_root().join("deploy/local").join(script))
        .arg("path")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("failed to run deploy/local/{script}"))?;
    if !output.status.success() {
        bail!("deploy/local/{script} path failed");
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// An S3-compatible server (moto) on a free port with one bucket, killed on drop.
#[derive(Debug)]
pub struct S3Server {
    pub port: u16,
    pub bucket: String,
    _process: ServerProcess,
}

impl S3Server {
    pub async fn start() -> anyhow::Result<Self> {
        let python_path = installed_path("s3-server.sh")?;
        start_on_a_free_port(async |port| Self::start_attempt(&python_path, port).await).await
    }

    async fn start_attempt(python_path: &str, port: u16) -> Result<Self, StartFailure> {
        let mut process = ServerProcess::spawn(
            "moto",
            Command::new("python3")
                .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
                .env("PYTHONPATH", python_path),
        )?;
        let pid = process.pid()?;
        let url = format!("http://127.0.0.1:{port}/");
        let client = reqwest::Client::new();
        process
            .wait_ready(port, Duration::from_secs(30), || {
                let request = client.get(&url).send();
                async move { answer_from(pid, port, request.await.is_ok()) }
            })
            .await?;
        let bucket = format!("lake-{}", unique_suffix());
        let created =
            client.put(format!("{url}{bucket}")).send().await.context("failed to create a bucket")?;
        if !created.status().is_success() {
            return Err(anyhow::anyhow!("failed to create bucket {bucket}: {}", created.status()).into());
        }
        Ok(Self { port, bucket, _process: process })
    }

    /// Store settings for `s3://<bucket>/<prefix>` on this server.
    pub fn store_config(&self, prefix: &str) -> sluice_lake::ObjectStoreConfig {
        let mut options = sluice_lake::StoreOptions::default();
        for (key, value) in [
            ("aws_endpoint", format!("http://127.0.0.1:{}", self.port)),
            ("aws_allow_http", "true".to_string()),
            ("aws_region", "us-east-1".to_string()),
            ("aws_access_key_id", "sluice-test".to_string()),
            ("aws_secret_access_key", "sluice-test-secret".to_string()),
        ] {
            options.0.insert(key.to_string(), value);
        }
        sluice_lake::ObjectStoreConfig {
            url: format!("s3://{}/{prefix}", self.bucket),
            options,
            ..Default::default()
        }
    }

    /// The same settings as storage options of Python `deltalake` (its environment-style names).
    pub fn python_storage_options(&self) -> Vec<(String, String)> {
        let config = self.store_config("");
        config
            .options
            .0
            .iter()
            .filter_map(|(key, value)| {
                let name = match key.as_str() {
                    "aws_endpoint" => "AWS_ENDPOINT_URL",
                    "aws_allow_http" => "AWS_ALLOW_HTTP",
                    "aws_region" => "AWS_REGION",
                    "aws_access_key_id" => "AWS_ACCESS_KEY_ID",
                    "aws_secret_access_key" => "AWS_SECRET_ACCESS_KEY",
                    _ => return None,
                };
                Some((name.to_string(), value.clone()))
            })
            .collect()
    }

    /// Every object key in the bucket (the server is on loopback and checks no credentials).
    pub async fn list_keys(&self) -> anyhow::Result<Vec<String>> {
        let client = reqwest::Client::new();
        let mut keys = Vec::new();
        let mut token_opt: Option<String> = None;
        loop {
            let mut params = vec![("list-type", "2")];
            if let Some(token) = &token_opt {
                params.push(("continuation-token", token.as_str()));
            }
            let url = reqwest::Url::parse_with_params(
                &format!("http://127.0.0.1:{}/{}", self.port, self.bucket),
                &params,
            )?;
            let body = client.get(url).send().await?.error_for_status()?.text().await?;
            keys.extend(xml_values(&body, "Key"));
            token_opt = xml_values(&body, "NextContinuationToken").into_iter().next();
            if token_opt.is_none() {
                return Ok(keys);
            }
        }
    }

    /// The headers the server answers a HEAD of `key` with, names in lower case. Signed (AWS
    /// Signature Version 4, the test credentials): S3 answers 403 to an unsigned request for an
    /// object encrypted with a KMS key.
    pub async fn object_headers(&self, key: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let host = format!("127.0.0.1:{}", self.port);
        let path = format!("/{}/{}", self.bucket, sigv4_uri_encode(key));
        let now = chrono::Utc::now();
        let (amz_date, day) = (now.format("%Y%m%dT%H%M%SZ").to_string(), now.format("%Y%m%d").to_string());
        let empty_sha256 = hex::encode(Sha256::digest(b""));
        let canonical = format!(
            "HEAD\n{path}\n\nhost:{host}\nx-amz-content-sha256:{empty_sha256}\nx-amz-date:{amz_date}\n\n\
             host;x-amz-content-sha256;x-amz-date\n{empty_sha256}"
        );
        let scope = format!("{day}/us-east-1/s3/aws4_request");
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let hmac = |key: &[u8], data: &str| {
            ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), data.as_bytes())
                .as_ref()
                .to_vec()
        };
        let mut signing_key = hmac(b"AWS4sluice-test-secret", &day);
        for part in ["us-east-1", "s3", "aws4_request"] {
            signing_key = hmac(&signing_key, part);
        }
        let signature = hex::encode(hmac(&signing_key, &to_sign));
        let response = reqwest::Client::new()
            .head(format!("http://{host}{path}"))
            .header("x-amz-date", &amz_date)
            .header("x-amz-content-sha256", &empty_sha256)
            .header(
                "authorization",
                format!(
                    "AWS4-HMAC-SHA256 Credential=sluice-test/{scope}, \
                     SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}"
                ),
            )
            .send()
            .await?
            .error_for_status()?;
        Ok(response
            .headers()
            .iter()
            .map(|(name, value)| {
                (name.as_str().to_lowercase(), String::from_utf8_lossy(value.as_bytes()).into_owned())
            })
            .collect())
    }

    /// A lake under `remote_lake::LAKE_PREFIX` in the bucket.
    pub fn remote_lake(&self) -> remote_lake::RemoteLake {
        remote_lake::RemoteLake {
            config: self.store_config(remote_lake::LAKE_PREFIX),
            url: format!("s3://{}/{}", self.bucket, remote_lake::LAKE_PREFIX),
            python_storage_options: self.python_storage_options(),
        }
    }
}

/// The account every Azurite has, and its key: Microsoft's published development credentials,
/// not a secret (object_store's emulator mode has the same two built in).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The Blob service API version of the one request the fixture makes itself (Azurite runs with
/// `--skipApiVersionCheck`, so object_store's newer version is accepted too).
const AZURITE_API_VERSION: &str = "2021-08-06";

/// An Azure Blob Storage emulator (Azurite) on a free port with one container, killed on drop.
/// An Azure Blob Storage emulator (Azurite) on a free port with one container, killed on drop.
#[derive(Debug)]
pub struct AzuriteServer {
    pub port: u16,
    pub container: String,
    // Fields drop in order: Azurite is killed before its data directory is removed.
    _process: ServerProcess,
    _data: tempfile::TempDir,
}

impl AzuriteServer {
    pub async fn start() -> anyhow::Result<Self> {
        let binary = PathBuf::from(installed_path("azurite.sh")?);
        start_on_a_free_port(async |port| Self::start_attempt(&binary, port).await).await
    }

    async fn start_attempt(binary: &Path, port: u16) -> Result<Self, StartFailure> {
        let data = tempfile::TempDir::new().context("failed to create Azurite's data directory")?;
        // --disableTelemetry: without it Azurite reaches for a cloud metadata address off this
        // machine. --skipApiVersionCheck: object_store may speak a newer API version than
        // Azurite knows.
        let mut process = ServerProcess::spawn(
            "azurite",
            Command::new(binary)
                .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--location"])
                .arg(data.path())
                .args(["--skipApiVersionCheck", "--disableTelemetry", "--silent"]),
        )?;
        let pid = process.pid()?;
        let client = reqwest::Client::new();
        let service_url = format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}");
        // Any answer means it listens (an unsigned GET of the account gets an error status).
        process
            .wait_ready(port, Duration::from_secs(30), || {
                let request = client.get(&service_url).send();
                async move { answer_from(pid, port, request.await.is_ok()) }
            })
            .await?;
        let container = format!("lake-{}", unique_suffix());
        create_azurite_container(&client, &service_url, &container).await?;
        Ok(Self { port, container, _process: process, _data: data })
    }

    /// Store settings for `az://<container>/<prefix>` on this Azurite.
    ///
    /// Not object_store's emulator mode (`azure_storage_use_emulator`): that finds Azurite at
    /// the `AZURITE_BLOB_STORAGE_URL` environment variable or else on port 10000, and the
    /// services under test run in this process, each test with its own Azurite on a free port.
    /// An endpoint that ends in the account name (`http://127.0.0.1:PORT/devstoreaccount1`),
    /// with that account's name and key, gives the same path-style URLs
    /// (`/devstoreaccount1/<container>/<blob>`) and the same shared-key signatures as emulator
    /// mode. The one other thing emulator mode changes, listing from an offset on the client,
    /// is not needed: Azurite 3.37 honours the `startFrom` object_store sends otherwise.
    pub fn store_config(&self, prefix: &str) -> sluice_lake::ObjectStoreConfig {
        let mut options = sluice_lake::StoreOptions::default();
        for (key, value) in [
            ("azure_storage_account_name", AZURITE_ACCOUNT.to_string()),
            ("azure_storage_account_key", AZURITE_ACCOUNT_KEY.to_string()),
            ("azure_storage_endpoint", format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port)),
            ("azure_allow_http", "true".to_string()),
        ] {
            options.0.insert(key.to_string(), value);
        }
        sluice_lake::ObjectStoreConfig {
            url: format!("az://{}/{prefix}", self.container),
            options,
            ..Default::default()
        }
    }

    /// The same settings as storage options of Python `deltalake`, which takes object_store's
    /// Azure keys as they are (checked with deltalake 1.6.6 against Azurite 3.37).
    pub fn python_storage_options(&self) -> Vec<(String, String)> {
        self.store_config("").options.0.into_iter().collect()
    }

    /// A lake under `remote_lake::LAKE_PREFIX` in the container.
    pub fn remote_lake(&self) -> remote_lake::RemoteLake {
        remote_lake::RemoteLake {
            config: self.store_config(remote_lake::LAKE_PREFIX),
            url: format!("az://{}/{}", self.container, remote_lake::LAKE_PREFIX),
            python_storage_options: self.python_storage_options(),
        }
    }
}

/// Creates a container with the Blob service's Create Container call, which object_store does
/// not make, signed with the account's shared key (the 2015-02-21 and later string to sign).
async fn create_azurite_container(
    client: &reqwest::Client,
    service_url: &str,
    container: &str,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    // The verb, then Content-Encoding, Content-Language, Content-Length, Content-MD5,
    // Content-Type, Date, If-Modified-Since, If-Match, If-None-Match, If-Unmodified-Since and
    // Range (all empty here) each ending in a newline; then the x-ms- headers in name order; then
    // the resource: the account, the URL path (path-style: the account again, then the
    // container) and the query parameters.
    let string_to_sign = format!(
        "PUT\n{}x-ms-date:{date}\nx-ms-version:{AZURITE_API_VERSION}\n\
         /{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container",
        "\n".repeat(11)
    );
    let key = STANDARD.decode(AZURITE_ACCOUNT_KEY).context("the Azurite account key is not base64")?;
    let signature = STANDARD.encode(hmac_sha256(&key, string_to_sign.as_bytes()));
    let response = client
        .put(format!("{service_url}/{container}?restype=container"))
        .header("x-ms-date", date.as_str())
        .header("x-ms-version", AZURITE_API_VERSION)
        .header(reqwest::header::AUTHORIZATION, format!("SharedKey {AZURITE_ACCOUNT}:{signature}"))
        .send()
        .await
        .with_context(|| format!("failed to create container {container}"))?;
    let status = response.status();
    if status != reqwest::StatusCode::CREATED {
        let body = response.text().await.unwrap_or_default();
        bail!("failed to create container {container}: {status}: {body}");
    }
    Ok(())
}

/// HMAC-SHA256 (RFC 2104), for the one request the Azurite fixture signs itself.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};

    const BLOCK_BYTES: usize = 64;
    let mut key_block = [0_u8; BLOCK_BYTES];
    if key.len() > BLOCK_BYTES {
        let hashed: [u8; 32] = Sha256::digest(key).into();
        key_block[..hashed.len()].copy_from_slice(&hashed);
    } else {
        key_block[..key.len()].copy_from_slice(key);
    }
    let inner_pad = key_block.map(|byte| byte ^ 0x36);
    let outer_pad = key_block.map(|byte| byte ^ 0x5c);
    let inner: [u8; 32] = Sha256::new().chain_update(inner_pad).chain_update(message).finalize().into();
    Sha256::new().chain_update(outer_pad).chain_update(inner).finalize().into()
}

/// The texts of every `<tag>...</tag>` in an S3 XML answer (keys Sluice writes need no unescaping
/// beyond `&amp;`).
fn xml_values(body: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    body.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split_once(&close).map(|(value, _)| value.replace("&amp;", "&")))
        .collect()
}

/// A key as SigV4's canonical URI spells it: every byte but unreserved characters and `/`
/// percent-encoded.
fn sigv4_uri_encode(key: &str) -> String {
    key.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}
