//! A throwaway certificate authority for TLS tests: a CA, server certificates for 127.0.0.1 and
//! localhost, client certificates named by their subject common name, and revocation lists, all
//! written as PEM files into the test's directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SerialNumber, date_time_ymd,
};

/// A certificate and its key as PEM files.
#[derive(Debug, Clone)]
pub struct PemPair {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

impl PemPair {
    /// Certificate and key in one PEM, as `reqwest::Identity::from_pem` takes them.
    pub fn identity_pem(&self) -> Vec<u8> {
        format!("{}{}", self.cert_pem, self.key_pem).into_bytes()
    }
}

pub struct TestCa {
    directory: PathBuf,
    name: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate, PEM, at `cert_path`.
    pub cert_pem: String,
    pub cert_path: PathBuf,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").field("name", &self.name).field("cert_path", &self.cert_path).finish()
    }
}

impl TestCa {
    /// A new CA whose files go to `directory`, named `name` (files are prefixed with it).
    pub fn new(directory: &Path, name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = distinguished_name(&format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let certificate = params.self_signed(&key)?;
        let cert_path = directory.join(format!("{name}-ca.crt"));
        std::fs::write(&cert_path, certificate.pem())?;
        Ok(Self {
            directory: directory.to_path_buf(),
            name: name.to_string(),
            issuer: Issuer::new(params, key),
            cert_pem: certificate.pem(),
            cert_path,
        })
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self, file_stem: &str) -> anyhow::Result<PemPair> {
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        params.distinguished_name = distinguished_name("localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, file_stem)
    }

    /// A client certificate whose subject common name is `common_name_opt` (none when `None`),
    /// with serial number `serial` so that a revocation list can name it.
    pub fn client(
        &self,
        file_stem: &str,
        common_name_opt: Option<&str>,
        serial: u64,
    ) -> anyhow::Result<PemPair> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = match common_name_opt {
            Some(common_name) => distinguished_name(common_name),
            None => {
                let mut name = DistinguishedName::new();
                name.push(DnType::OrganizationName, "Sluice tests");
                name
            }
        };
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from(serial));
        self.sign(params, file_stem)
    }

    /// A site gateway's client certificate: subject organizational unit `sluice-edge`, common
    /// name `name`.
    pub fn gateway(&self, file_stem: &str, name: &str, serial: u64) -> anyhow::Result<PemPair> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::OrganizationalUnitName, "sluice-edge");
        subject.push(DnType::CommonName, name);
        params.distinguished_name = subject;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from(serial));
        self.sign(params, file_stem)
    }

    /// A revocation list, signed by this CA, naming the certificates with these serial numbers.
    pub fn revocation_list(&self, file_stem: &str, revoked_serials: &[u64]) -> anyhow::Result<PathBuf> {
        let params = CertificateRevocationListParams {
            this_update: date_time_ymd(2020, 1, 1),
            next_update: date_time_ymd(2100, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked_serials
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: date_time_ymd(2021, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let path = self.directory.join(format!("{file_stem}.crl"));
        std::fs::write(&path, params.signed_by(&self.issuer)?.pem()?)?;
        Ok(path)
    }

    fn sign(&self, params: CertificateParams, file_stem: &str) -> anyhow::Result<PemPair> {
        let key = KeyPair::generate()?;
        let certificate = params.signed_by(&key, &self.issuer)?;
        let cert_path = self.directory.join(format!("{file_stem}.crt"));
        let key_path = self.directory.join(format!("{file_stem}.key"));
        std::fs::write(&cert_path, certificate.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(PemPair { cert_path, key_path, cert_pem: certificate.pem(), key_pem: key.serialize_pem() })
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}
