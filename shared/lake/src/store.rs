//! Opening the configured object store: a local directory, S3 or any S3-compatible endpoint,
//! Google Cloud Storage, or Azure Blob Storage.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use sluice_config::{ConfigIssue, is_secret_property};

/// Store options passed to the object_store builder (`aws_endpoint`, `aws_region`,
/// `aws_allow_http`, `aws_virtual_hosted_style_request`, ...). `Debug` hides secrets.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoreOptions(pub BTreeMap<String, String>);

impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(key, value)| {
                (
                    key.as_str(),
                    if is_secret_property(key) || key.contains("key") {
                        "<redacted>"
                    } else {
                        value.as_str()
                    },
                )
            }))
            .finish()
    }
}

/// The `[object_store]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectStoreConfig {
    /// A local directory (`./data`, `/var/lib/sluice`, `file:///...`), `s3://bucket/prefix`,
    /// `gs://bucket/prefix` or `az://container/prefix`. Cloud credentials come from the standard
    /// chain of each cloud (environment, web identity / IRSA, workload identity, instance metadata)
    /// unless given in `options`.
    pub url: String,
    pub options: StoreOptions,
    /// Files at least this large are uploaded in parts of this size (S3 needs 5 MiB or more).
    pub multipart_threshold_bytes: usize,
}

impl Default for ObjectStoreConfig {
    fn default() -> Self {
        Self {
            url: "./data".to_string(),
            options: StoreOptions::default(),
            multipart_threshold_bytes: crate::DEFAULT_MULTIPART_THRESHOLD_BYTES,
        }
    }
}

impl ObjectStoreConfig {
    pub fn validate(&self, prefix: &str) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if self.multipart_threshold_bytes < 5 * 1024 * 1024 {
            issues.push(ConfigIssue::new(
                format!("{prefix}.multipart_threshold_bytes"),
                "must be at least 5 MiB, the smallest part S3 accepts",
            ));
        }
        if self.url.is_empty() {
            issues.push(ConfigIssue::new(
                format!("{prefix}.url"),
                "must name a directory or an s3://, gs:// or az:// URL",
            ));
        } else if let Some((scheme, _)) = self.url.split_once("://")
            && !["file", "s3", "s3a", "gs", "az", "abfs", "abfss"].contains(&scheme)
        {
            issues.push(ConfigIssue::new(
                format!("{prefix}.url"),
                format!("scheme '{scheme}' is not supported; use a path, file://, s3://, gs:// or az://"),
            ));
        }
        issues
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to create local directory {path}")]
    CreateDirectory {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid object store URL '{url}'")]
    Url {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("failed to configure the object store for '{url}'")]
    Configure {
        url: String,
        #[source]
        source: object_store::Error,
    },
}

/// Opens the configured store as a lake.
pub fn open_lake(config: &ObjectStoreConfig) -> Result<crate::Lake, StoreError> {
    let (store, root) = open_store(config)?;
    Ok(crate::Lake::new(store, root).with_multipart_threshold(config.multipart_threshold_bytes))
}

/// Opens the store and returns it with the root path of the lake inside it.
pub fn open_store(config: &ObjectStoreConfig) -> Result<(Arc<dyn ObjectStore>, Path), StoreError> {
    let url = config.url.as_str();
    let configure = |source| StoreError::Configure { url: url.to_string(), source };
    let Some((scheme, _)) = url.split_once("://").filter(|(scheme, _)| *scheme != "file") else {
        let directory = url.strip_prefix("file://").unwrap_or(url);
        std::fs::create_dir_all(directory)
            .map_err(|source| StoreError::CreateDirectory { path: directory.to_string(), source })?;
        let store = LocalFileSystem::new_with_prefix(directory).map_err(configure)?;
        return Ok((Arc::new(store), Path::default()));
    };
    let parsed = url::Url::parse(url).map_err(|source| StoreError::Url { url: url.to_string(), source })?;
    let root = Path::from(parsed.path().trim_matches('/'));
    let options = config.options.0.iter();
    let store: Arc<dyn ObjectStore> = match scheme {
        "s3" | "s3a" => {
            let mut builder = AmazonS3Builder::from_env().with_url(url);
            for (key, value) in options {
                builder = builder.with_config(key.parse().map_err(configure)?, value);
            }
            Arc::new(builder.build().map_err(configure)?)
        }
        "gs" => {
            let mut builder = GoogleCloudStorageBuilder::from_env().with_url(url);
            for (key, value) in options {
                builder = builder.with_config(key.parse().map_err(configure)?, value);
            }
            Arc::new(builder.build().map_err(configure)?)
        }
        _ => {
            let mut builder = MicrosoftAzureBuilder::from_env().with_url(url);
            for (key, value) in options {
                builder = builder.with_config(key.parse().map_err(configure)?, value);
            }
            Arc::new(builder.build().map_err(configure)?)
        }
    };
    Ok((store, root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_directory_is_created_and_rooted() {
        let directory = tempfile::TempDir::new().unwrap();
        let path = directory.path().join("lake");
        let config = ObjectStoreConfig { url: path.display().to_string(), ..ObjectStoreConfig::default() };
        let (_store, root) = open_store(&config).unwrap();
        assert!(path.is_dir());
        assert_eq!(root, Path::default());
    }

    #[test]
    fn s3_urls_take_bucket_and_prefix_and_options() {
        let mut options = StoreOptions::default();
        options.0.insert("aws_endpoint".into(), "http://127.0.0.1:9000".into());
        options.0.insert("aws_allow_http".into(), "true".into());
        options.0.insert("aws_secret_access_key".into(), "hunter2".into());
        options.0.insert("aws_access_key_id".into(), "AKIA".into());
        options.0.insert("aws_region".into(), "us-east-1".into());
        let config = ObjectStoreConfig {
            url: "s3://bucket/lake/prod".into(),
            options,
            ..ObjectStoreConfig::default()
        };
        let (_store, root) = open_store(&config).unwrap();
        assert_eq!(root.as_ref(), "lake/prod");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn unknown_schemes_and_options_are_refused() {
        let config = ObjectStoreConfig { url: "ftp://host/x".into(), ..ObjectStoreConfig::default() };
        assert_eq!(config.validate("object_store")[0].key, "object_store.url");
        let mut options = StoreOptions::default();
        options.0.insert("aws_no_such_option".into(), "1".into());
        assert!(
            open_store(&ObjectStoreConfig {
                url: "s3://bucket".into(),
                options,
                ..ObjectStoreConfig::default()
            })
            .is_err()
        );
    }
}
