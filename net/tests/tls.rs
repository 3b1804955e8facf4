//! TLS on the data API with rustls, through the real binary and a real TLS client
//! (ureq over rustls) that trusts only the test's own certificate.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;

use common::Server;
use serde_json::json;

fn client_trusting(cert_der: &[u8]) -> ureq::Agent {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert_der.to_vec()))
        .expect("trust the test certificate");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    ureq::AgentBuilder::new()
        .tls_config(Arc::new(config))
        .build()
}

#[test]
fn the_api_serves_tls_to_a_client_that_trusts_the_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key, certified) = common::self_signed_cert(dir.path());

    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            cert.to_str().expect("path"),
            "--tls-key",
            key.to_str().expect("path"),
        ],
    );
    assert!(server.api.starts_with("https://"), "{}", server.api);
    let agent = client_trusting(certified.cert.der());
    let created = agent
        .post(&format!("{}/v1/tenants", server.api))
        .set("content-type", "application/json")
        .send_string(&json!({"tenant": "acme"}).to_string())
        .expect("created over TLS");
    assert_eq!(created.status(), 201);
    let listed: serde_json::Value = agent
        .get(&format!("{}/v1/tenants", server.api))
        .call()
        .expect("listed over TLS")
        .into_json()
        .expect("json");
    assert_eq!(listed["tenants"], json!(["acme"]));

    // A client that does not trust the certificate is refused by its own TLS check.
    let untrusting = ureq::AgentBuilder::new().build();
    assert!(untrusting
        .get(&format!("{}/v1/tenants", server.api))
        .call()
        .is_err());
    // Plain HTTP on the TLS port gets no HTTP answer.
    let addr = server.api.trim_start_matches("https://").to_string();
    let mut plain = std::net::TcpStream::connect(&addr).expect("connect");
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .expect("timeout");
    plain
        .write_all(b"GET /v1/tenants HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
    // The server still serves TLS clients.
    assert!(agent
        .get(&format!("{}/v1/tenants", server.api))
        .call()
        .is_ok());
}

#[test]
fn a_bad_certificate_file_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "not a certificate").expect("write");
    let err = Server::try_start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            cert.to_str().expect("path"),
            "--tls-key",
            cert.to_str().expect("path"),
        ],
    )
    .err()
    .expect("refused");
    assert!(err.contains("cert.pem"), "{err}");
}
