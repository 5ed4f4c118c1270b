//! Test certificates from rcgen: a CA, a server certificate for the names a test asks for
//! (`127.0.0.1` as an IP SAN for loopback), a client certificate, and an unrelated CA to prove
//! a client that trusts the wrong one is refused. PEM files in a directory of the test's.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// The files of one test PKI.
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA clients trust.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed none of these.
    pub other_ca: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key")).expect("self-signed ca")
}

fn write(path: &Path, pem: &str) -> PathBuf {
    std::fs::write(path, pem).expect("write pem");
    path.to_path_buf()
}

impl TestPki {
    /// A CA, a server certificate valid for `server_names` (IP addresses become IP SANs), and a
    /// client certificate, written into `dir`.
    pub fn generate(dir: &Path, server_names: &[&str]) -> Self {
        std::fs::create_dir_all(dir).expect("pki dir");
        let issuer = ca("Flotilla test CA");
        let server_key = KeyPair::generate().expect("server key");
        let names: Vec<String> = server_names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params.distinguished_name.push(DnType::CommonName, "flotilla test nats-server");
        let server = params.signed_by(&server_key, &issuer).expect("server cert");
        let client_key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::new(vec!["flotilla-client".to_owned()]).expect("client params");
        params.distinguished_name.push(DnType::CommonName, "flotilla test client");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client = params.signed_by(&client_key, &issuer).expect("client cert");
        let other = ca("Some other CA");
        Self {
            ca: write(&dir.join("ca.pem"), &issuer.pem()),
            server_cert: write(&dir.join("server.pem"), &server.pem()),
            server_key: write(&dir.join("server-key.pem"), &server_key.serialize_pem()),
            client_cert: write(&dir.join("client.pem"), &client.pem()),
            client_key: write(&dir.join("client-key.pem"), &client_key.serialize_pem()),
            other_ca: write(&dir.join("other-ca.pem"), &other.pem()),
        }
    }

    /// The nats-server `tls` block of this PKI; `verify` makes clients show a certificate.
    pub fn server_conf(&self, verify: bool) -> String {
        format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: {verify}\n  timeout: 2\n}}\n",
            self.server_cert.display(),
            self.server_key.display(),
            self.ca.display()
        )
    }

    /// How a client of a server of this PKI connects (without credentials).
    pub fn client_auth(&self, with_certificate: bool) -> flotilla_service::ClientAuth {
        flotilla_service::ClientAuth {
            creds: None,
            tls_ca: Some(self.ca.clone()),
            tls_cert: with_certificate.then(|| self.client_cert.clone()),
            tls_key: with_certificate.then(|| self.client_key.clone()),
        }
    }
}
