//! TLS on the HTTP listener (rustls). Handshakes run in each connection's task (server.rs), under
//! the connection's header-read timeout, so that a slow or silent client cannot hold up others.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::ServerConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("failed to read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no {what} in PEM form")]
    Missing { path: String, what: &'static str },
    #[error("the TLS certificate and key do not form a usable server configuration")]
    Config(#[source] tokio_rustls::rustls::Error),
}

pub(crate) fn load_server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(&cert_pem[..]))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read { path: cert_path.display().to_string(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Missing { path: cert_path.display().to_string(), what: "certificate" });
    }
    let key = rustls_pemfile::private_key(&mut BufReader::new(&key_pem[..]))
        .map_err(|source| TlsError::Read { path: key_path.display().to_string(), source })?
        .ok_or_else(|| TlsError::Missing { path: key_path.display().to_string(), what: "private key" })?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
