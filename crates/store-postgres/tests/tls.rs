//! TLS to PostgreSQL: a cluster of its own serving a certificate from a CA made here, with
//! plaintext TCP refused (`hostssl` only), so a connection that works is a TLS one. The CA is
//! given by `sslrootcert=` in the URL or by `PostgresOptions::ca_file`; a server whose
//! certificate chains to another CA, or does not name the host, is refused.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use twinhub_store::{Store, Table, Write};
use twinhub_store_postgres::{ConnectError, PostgresOptions, PostgresStore};
use twinhub_testsvc::postgres::{PgServer, PgServerOptions, PgTls};

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

/// A CA, and a server certificate from it for `names`.
fn pki(names: &[&str]) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "twinhub test PostgreSQL CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "twinhub test PostgreSQL");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn tls_server(pki: &Pki) -> PgServer {
    PgServer::start_with(PgServerOptions {
        tls: Some(PgTls {
            cert_pem: pki.cert_pem.clone(),
            key_pem: pki.key_pem.clone(),
        }),
    })
}

fn write_ca(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

async fn round_trip(store: &PostgresStore) {
    store
        .commit(vec![Write::put(
            Table::Devices,
            "over-tls",
            b"yes".to_vec(),
        )])
        .await
        .unwrap();
    assert_eq!(
        store.get(Table::Devices, "over-tls").await.unwrap(),
        Some(b"yes".to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_ca_in_the_url_or_the_options() {
    let pki = pki(&["localhost", "127.0.0.1"]);
    let server = tls_server(&pki);
    let db = server.fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let ca = write_ca(dir.path(), "ca.pem", &pki.ca_pem);

    // Plaintext is refused by the server (hostssl only)...
    let plain = PostgresStore::connect(&db.url(), PostgresOptions::default()).await;
    assert!(
        matches!(plain, Err(ConnectError::Rejected(_))),
        "plaintext connect returned {:?}",
        plain.err()
    );

    // ...so these connect over TLS: the CA in the URL (percent-encoded as a URL wants)...
    let encoded: String = ca.to_str().unwrap().replace('/', "%2F");
    let url = format!("{}?sslmode=verify-full&sslrootcert={encoded}", db.url());
    let store = PostgresStore::connect(&url, PostgresOptions::default())
        .await
        .unwrap_or_else(|e| panic!("TLS connect with sslrootcert: {e}"));
    round_trip(&store).await;
    store.close().await.unwrap();

    // ...or in the options, with sslmode=require.
    let options = PostgresOptions {
        ca_file: Some(ca.clone()),
        ..PostgresOptions::default()
    };
    let url = format!("{}?sslmode=require", db.url());
    let store = PostgresStore::connect(&url, options)
        .await
        .unwrap_or_else(|e| panic!("TLS connect with ca_file: {e}"));
    round_trip(&store).await;
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_an_unknown_ca_and_a_wrong_name() {
    let pki_right = pki(&["localhost", "127.0.0.1"]);
    let server = tls_server(&pki_right);
    let db = server.fresh_database();
    let dir = tempfile::tempdir().unwrap();

    // A CA that did not sign the server's certificate.
    let stranger = pki(&["localhost"]);
    let other_ca = write_ca(dir.path(), "other.pem", &stranger.ca_pem);
    let options = PostgresOptions {
        ca_file: Some(other_ca),
        ..PostgresOptions::default()
    };
    let url = format!("{}?sslmode=require", db.url());
    match PostgresStore::connect(&url, options).await {
        Err(ConnectError::Unavailable(message)) => {
            assert!(
                message.contains("certificate") || message.contains("TLS"),
                "{message}"
            );
        }
        Err(e) => panic!("expected a TLS failure, got {e}"),
        Ok(_) => panic!("connected to a server whose certificate chains to an unknown CA"),
    }

    // The right CA, but the certificate does not name the host connected to (127.0.0.1).
    let localhost_only = pki(&["localhost"]);
    let server2 = tls_server(&localhost_only);
    let db2 = server2.fresh_database();
    let ca2 = write_ca(dir.path(), "ca2.pem", &localhost_only.ca_pem);
    let options = PostgresOptions {
        ca_file: Some(ca2),
        ..PostgresOptions::default()
    };
    let url = format!("{}?sslmode=verify-full", db2.url());
    assert!(
        PostgresStore::connect(&url, options.clone()).await.is_err(),
        "connected though the certificate does not name 127.0.0.1"
    );
    // Under the name it does carry, it works.
    let url = format!(
        "postgres://postgres@localhost:{}/{}?sslmode=verify-full",
        server2.port(),
        db2.name()
    );
    let store = PostgresStore::connect(&url, options)
        .await
        .unwrap_or_else(|e| panic!("TLS connect by name: {e}"));
    round_trip(&store).await;
    store.close().await.unwrap();
}
