//! TLS on the HTTP listener (rustls), optionally mutual: devices then present certificates from
//! the device CA, and a certificate's subject common name is the one device its connection may
//! write for. Handshakes run in each connection's task (server.rs), under the connection's
//! header-read timeout, so that a slow or silent client cannot hold up others.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::rustls::ServerConfig;

use crate::config::{HttpConfig, MqttConfig};

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
    #[error("{path} holds a certificate that cannot be a trusted device CA")]
    ClientCa {
        path: String,
        #[source]
        source: tokio_rustls::rustls::Error,
    },
    #[error("the device CA and revocation lists do not form a usable client verifier")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
    #[error("{path} holds a certificate that cannot be a trusted CA")]
    Ca {
        path: String,
        #[source]
        source: tokio_rustls::rustls::Error,
    },
    #[error("the system's CA certificates could not be read (set {ca_key}): {why}")]
    SystemRoots { ca_key: &'static str, why: String },
    #[error("the TLS client settings do not form a usable client configuration")]
    ClientConfig(#[source] tokio_rustls::rustls::Error),
}

/// Who a connection's client certificate says it is. rustls has already checked the chain to
/// the device CA (and the revocation lists) before a connection gets this far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CertifiedClient {
    /// The certificate's subject common name: the only `device_id` the connection may write.
    Device(Arc<str>),
    /// A site gateway's certificate (its subject's organizational unit is [`GATEWAY_UNIT`]),
    /// named by its common name: it forwards the gateway's batches for any device, and writes
    /// no reading of its own.
    Gateway(Arc<str>),
    /// Why the certificate names no device: no common name, several, or one that is not text.
    Unnamed(&'static str),
}

/// The subject organizational unit (OU) that makes a client certificate from the device CA a
/// site gateway's rather than a device's. Only the CA's holder can put it there, as with a
/// device's name.
pub(crate) const GATEWAY_UNIT: &str = "sluice-edge";

impl CertifiedClient {
    /// Reads the leaf certificate's subject. A common name, rather than a SAN, because device
    /// fleets name devices there (Azure IoT Hub's X.509 devices, AWS IoT's thing certificates
    /// issued per device) and device ids need not be DNS names.
    pub(crate) fn from_certificate(der: &CertificateDer<'_>) -> Self {
        let Ok((_, certificate)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
            return Self::Unnamed("it cannot be parsed");
        };
        let mut names = certificate.subject().iter_common_name();
        let (Some(name), None) = (names.next(), names.next()) else {
            return Self::Unnamed("its subject needs exactly one common name (CN), the device_id");
        };
        let is_gateway =
            certificate.subject().iter_organizational_unit().any(|unit| unit.as_str() == Ok(GATEWAY_UNIT));
        match name.as_str() {
            Ok("") => Self::Unnamed("its subject common name (CN) is empty"),
            Ok(gateway) if is_gateway => Self::Gateway(Arc::from(gateway)),
            Ok(device_id) => Self::Device(Arc::from(device_id)),
            Err(_) => Self::Unnamed("its subject common name (CN) is not a UTF-8, printable or IA5 string"),
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

/// The listener's TLS configuration, or `None` when `http.tls_cert_path` is unset.
pub(crate) fn load_server_config(http: &HttpConfig) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    let (Some(cert_path), Some(key_path)) = (&http.tls_cert_path, &http.tls_key_path) else {
        return Ok(None);
    };
    let (certs, key) = read_certified_key(cert_path, key_path)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match &http.tls_client_ca_path {
        None => builder.with_no_client_auth(),
        Some(ca_path) => builder.with_client_cert_verifier(client_verifier(http, ca_path, provider)?),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// A certificate chain and its private key from PEM files.
fn read_certified_key(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let cert_pem = read_file(cert_path)?;
    let key_pem = read_file(key_path)?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(&cert_pem[..]))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read { path: cert_path.display().to_string(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Missing { path: cert_path.display().to_string(), what: "certificate" });
    }
    let key = rustls_pemfile::private_key(&mut BufReader::new(&key_pem[..]))
        .map_err(|source| TlsError::Read { path: key_path.display().to_string(), source })?
        .ok_or_else(|| TlsError::Missing { path: key_path.display().to_string(), what: "private key" })?;
    Ok((certs, key))
}

/// Every CA certificate in a PEM file, as a root store; `wrap` names the error for a certificate
/// that cannot be a root.
fn read_roots(
    path: &Path,
    wrap: fn(String, tokio_rustls::rustls::Error) -> TlsError,
) -> Result<RootCertStore, TlsError> {
    let pem = read_file(path)?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut BufReader::new(&pem[..])) {
        let cert = cert.map_err(|source| TlsError::Read { path: path.display().to_string(), source })?;
        roots.add(cert).map_err(|source| wrap(path.display().to_string(), source))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Missing { path: path.display().to_string(), what: "CA certificate" });
    }
    Ok(roots)
}

/// The MQTT bridge's TLS configuration, or `None` when `mqtt.tls` is off.
pub(crate) fn mqtt_client_config(mqtt: &MqttConfig) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    if !mqtt.tls {
        return Ok(None);
    }
    let identity_opt = mqtt.tls_cert_path.as_deref().zip(mqtt.tls_key_path.as_deref());
    client_config(mqtt.tls_ca_path.as_deref(), "mqtt.tls_ca_path", identity_opt).map(Some)
}

/// A TLS client configuration (ring): the CAs in `ca_path_opt`, or the system's when unset
/// (`ca_key` names the setting in errors), and the client certificate chain and key of
/// `identity_opt` when given.
pub fn client_config(
    ca_path_opt: Option<&Path>,
    ca_key: &'static str,
    identity_opt: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca_path_opt {
        Some(ca_path) => read_roots(ca_path, |path, source| TlsError::Ca { path, source })?,
        None => {
            let loaded = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (num_added, _) = roots.add_parsable_certificates(loaded.certs);
            if num_added == 0 {
                let why = loaded.errors.first().map_or("none found".to_string(), ToString::to_string);
                return Err(TlsError::SystemRoots { ca_key, why });
            }
            roots
        }
    };
    // No process-wide default provider is installed, and with more than one compiled into a
    // binary rustls cannot pick one by itself: name it, as the listener does.
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::ClientConfig)?
        .with_root_certificates(roots);
    let config = match identity_opt {
        Some((cert_path, key_path)) => {
            let (certs, key) = read_certified_key(cert_path, key_path)?;
            builder.with_client_auth_cert(certs, key).map_err(TlsError::ClientConfig)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn client_verifier(
    http: &HttpConfig,
    ca_path: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let roots = read_roots(ca_path, |path, source| TlsError::ClientCa { path, source })?;
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if let Some(crl_path) = &http.tls_client_crl_path {
        let crl_pem = read_file(crl_path)?;
        let crls = rustls_pemfile::crls(&mut BufReader::new(&crl_pem[..]))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Read { path: crl_path.display().to_string(), source })?;
        if crls.is_empty() {
            return Err(TlsError::Missing {
                path: crl_path.display().to_string(),
                what: "certificate revocation list",
            });
        }
        // Devices are the leaves; intermediate CAs are revoked by replacing the CA file. A leaf
        // whose issuer has no list here is refused rather than let through unchecked.
        // A list past its next update no longer says who is revoked: fail closed, as OpenSSL
        // does, rather than trust it forever.
        verifier =
            verifier.with_crls(crls).only_check_end_entity_revocation().enforce_revocation_expiration();
    }
    // A client without a certificate completes the handshake either way: `required` is enforced
    // per request (http.rs), so that kubelet probes of /healthz and /readyz, which present no
    // certificate, still pass, and a device that forgot its certificate gets a 401 that says so
    // instead of a bare handshake failure. A certificate that is presented must verify.
    verifier.allow_unauthenticated().build().map_err(TlsError::ClientVerifier)
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair};

    use super::*;

    fn certificate_named(entries: &[(DnType, DnValue)]) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut name = DistinguishedName::new();
        for (kind, value) in entries {
            name.push(kind.clone(), value.clone());
        }
        params.distinguished_name = name;
        params.self_signed(&KeyPair::generate().unwrap()).unwrap().der().clone()
    }

    #[test]
    fn the_subject_common_name_is_the_device() {
        let named = |value: DnValue| {
            certificate_named(&[(DnType::OrganizationName, "farm".into()), (DnType::CommonName, value)])
        };
        assert_eq!(
            CertifiedClient::from_certificate(&named(DnValue::Utf8String("tractor-7".into()))),
            CertifiedClient::Device(Arc::from("tractor-7"))
        );
        assert_eq!(
            CertifiedClient::from_certificate(&named(DnValue::Utf8String("日本-1".into()))),
            CertifiedClient::Device(Arc::from("日本-1"))
        );
        assert!(matches!(
            CertifiedClient::from_certificate(&named(DnValue::Utf8String(String::new()))),
            CertifiedClient::Unnamed(_)
        ));
        // A BMPString (UTF-16) name is not read as text rather than guessed at.
        assert!(matches!(
            CertifiedClient::from_certificate(&named(DnValue::BmpString("ab".try_into().unwrap()))),
            CertifiedClient::Unnamed(_)
        ));
    }

    #[test]
    fn the_gateway_unit_makes_a_certificate_a_gateways() {
        let gateway = certificate_named(&[
            (DnType::OrganizationalUnitName, "fleet".into()),
            (DnType::OrganizationalUnitName, GATEWAY_UNIT.into()),
            (DnType::CommonName, "site-7".into()),
        ]);
        assert_eq!(
            CertifiedClient::from_certificate(&gateway),
            CertifiedClient::Gateway(Arc::from("site-7"))
        );
        // The unit must be exactly the gateway unit, not merely contain it.
        let device = certificate_named(&[
            (DnType::OrganizationalUnitName, format!("{GATEWAY_UNIT}s").into()),
            (DnType::CommonName, "site-7".into()),
        ]);
        assert_eq!(CertifiedClient::from_certificate(&device), CertifiedClient::Device(Arc::from("site-7")));
        let unnamed = certificate_named(&[(DnType::OrganizationalUnitName, GATEWAY_UNIT.into())]);
        assert!(matches!(CertifiedClient::from_certificate(&unnamed), CertifiedClient::Unnamed(_)));
    }

    #[test]
    fn a_certificate_without_one_readable_common_name_names_no_device() {
        let no_name = certificate_named(&[(DnType::OrganizationName, "farm".into())]);
        assert!(matches!(CertifiedClient::from_certificate(&no_name), CertifiedClient::Unnamed(_)));
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(CertifiedClient::from_certificate(&garbage), CertifiedClient::Unnamed(_)));
        let empty = CertificateDer::from(Vec::new());
        assert!(matches!(CertifiedClient::from_certificate(&empty), CertifiedClient::Unnamed(_)));
    }
}
