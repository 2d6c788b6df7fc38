//! A TLS-terminating TCP proxy on 127.0.0.1, for servers that cannot speak TLS themselves: the
//! Tansu broker answers plaintext only, so a Kafka client's TLS (and mutual TLS) is tested
//! against this proxy with the broker advertising the proxy's port as its only listener.

use std::io::BufReader;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

use crate::PemPair;

/// The proxy; it stops, with every connection through it, when dropped.
#[derive(Debug)]
pub struct TlsProxy {
    pub port: u16,
    tasks: JoinSet<()>,
}

impl TlsProxy {
    /// A listening socket on a free port of 127.0.0.1, for a proxy whose port must be known
    /// before its target runs (a broker advertises it).
    pub async fn bind() -> anyhow::Result<TcpListener> {
        TcpListener::bind("127.0.0.1:0").await.context("failed to bind the TLS proxy")
    }

    /// Serves TLS with `server`'s certificate on `listener`, requiring client certificates from
    /// the CA at `client_ca_opt` when given, and forwards the plaintext to `target`.
    pub fn serve(
        listener: TcpListener,
        target: SocketAddr,
        server: &PemPair,
        client_ca_opt: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let port = listener.local_addr()?.port();
        let certs = rustls_pemfile::certs(&mut BufReader::new(server.cert_pem.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let key = rustls_pemfile::private_key(&mut BufReader::new(server.key_pem.as_bytes()))?
            .context("no private key")?;
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?;
        let builder = match client_ca_opt {
            None => builder.with_no_client_auth(),
            Some(ca_path) => {
                let mut roots = RootCertStore::empty();
                for cert in rustls_pemfile::certs(&mut BufReader::new(&std::fs::read(ca_path)?[..])) {
                    roots.add(cert?)?;
                }
                builder.with_client_cert_verifier(
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?,
                )
            }
        };
        let acceptor = TlsAcceptor::from(Arc::new(builder.with_single_cert(certs, key)?));
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    // A failed handshake (no or a wrong client certificate) just closes.
                    let Ok(mut tls) = acceptor.accept(client).await else { return };
                    let Ok(mut upstream) = TcpStream::connect(target).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { port, tasks })
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}
