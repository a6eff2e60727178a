//! X.509 device authentication end to end: a real hub on loopback, TLS with client
//! certificates made here with rcgen, raw MQTT CONNECTs without a password. Self-signed devices
//! by SHA-1 and SHA-256 thumbprint, expired and mismatched certificates, CA-signed devices
//! admitted only after the CA's proof of possession, CN checks, and sessions closed when a CA
//! is removed or a device's thumbprints change; the CA REST API's answers.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use support::{RawMqtt, TestHub, connect_packet, https_client, policy_token};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use twinhub_core::certificates::{sha1_hex, sha256_hex};
use twinhub_mqtt::ConnectReturnCode;
use twinhub_proto::ErrorCode;
use twinhub_proto::model::X509Thumbprint;
use twinhub_sdk::Error as SdkError;

/// A certificate and its key.
struct Made {
    der: CertificateDer<'static>,
    pem: String,
    key: KeyPair,
}

fn params(cn: &str, days_from: i64, days_to: i64) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::days(days_from);
    p.not_after = now + time::Duration::days(days_to);
    p
}

/// A self-signed leaf valid from `days_from` to `days_to` days from now.
fn self_signed(cn: &str, days_from: i64, days_to: i64) -> Made {
    let key = KeyPair::generate().unwrap();
    let cert = params(cn, days_from, days_to).self_signed(&key).unwrap();
    Made {
        der: cert.der().clone(),
        pem: cert.pem(),
        key,
    }
}

/// A CA certificate and the issuer that signs with it.
fn ca(cn: &str) -> (Made, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut p = params(cn, -1, 365);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).unwrap();
    let issuer = Issuer::new(p, KeyPair::from_pem(&key.serialize_pem()).unwrap());
    (
        Made {
            der: cert.der().clone(),
            pem: cert.pem(),
            key,
        },
        issuer,
    )
}

fn signed(cn: &str, issuer: &Issuer<'static, KeyPair>) -> Made {
    let key = KeyPair::generate().unwrap();
    let cert = params(cn, -1, 30).signed_by(&key, issuer).unwrap();
    Made {
        der: cert.der().clone(),
        pem: cert.pem(),
        key,
    }
}

/// An MQTT/TLS connection presenting `chain` (leaf first) with `leaf`'s key.
async fn open_with_cert(
    hub: &TestHub,
    chain: Vec<CertificateDer<'static>>,
    leaf: &Made,
) -> RawMqtt {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        <CertificateDer as rustls_pki_types::pem::PemObject>::pem_file_iter(hub.ca_pem()).unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key.serialize_der()));
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = TcpStream::connect(hub.mqtt).await.unwrap();
    let stream = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    RawMqtt {
        stream,
        buf: BytesMut::new(),
    }
}

/// CONNECT without a password as `client_id`, presenting `leaf` (and `extra` after it).
async fn cert_connect(
    hub: &TestHub,
    client_id: &str,
    leaf: &Made,
    extra: &[&Made],
) -> (RawMqtt, ConnectReturnCode) {
    let mut chain = vec![leaf.der.clone()];
    chain.extend(extra.iter().map(|m| m.der.clone()));
    let mut m = open_with_cert(hub, chain, leaf).await;
    let (code, _) = m.connect(connect_packet(client_id, None, true, 60)).await;
    (m, code)
}

fn code_of(e: SdkError) -> Option<ErrorCode> {
    match e {
        SdkError::Hub { code, .. } => code,
        other => panic!("expected a hub error, got {other:?}"),
    }
}

#[tokio::test]
async fn self_signed_devices_sign_in_by_sha1_or_sha256_thumbprint() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let one = self_signed("x1", -1, 30);
    let two = self_signed("x2", -1, 30);
    svc.create_x509_device("x1", &sha1_hex(&one.der), None)
        .await
        .unwrap();
    // Lower-case hex is accepted at registration (and stored upper-case).
    svc.create_x509_device("x2", "00", Some(&sha256_hex(&two.der).to_lowercase()))
        .await
        .expect_err("a thumbprint must be 40 or 64 hex digits");
    svc.create_x509_device("x2", &sha256_hex(&two.der).to_lowercase(), None)
        .await
        .unwrap();

    let (mut a, code) = cert_connect(&hub, "x1", &one, &[]).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    let (b, code) = cert_connect(&hub, "x2", &two, &[]).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    // The session works like any other: a reported patch is answered.
    a.subscribe(&["$iothub/twin/res/#"]).await;
    a.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=1",
        b"{\"fw\":1}",
        twinhub_mqtt::QoS::AtMostOnce,
        0,
        false,
    )
    .await;
    let answer = a.next_publish().await;
    assert!(
        answer.topic.as_str().starts_with("$iothub/twin/res/204/"),
        "{}",
        answer.topic
    );
    let twin = svc.get_twin("x1").await.unwrap();
    assert_eq!(
        twin.properties.unwrap().reported.get("fw"),
        Some(&serde_json::json!(1))
    );
    drop(b.stream);

    // x1's certificate is not x2's.
    let (_, code) = cert_connect(&hub, "x2", &one, &[]).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    // No certificate at all.
    let mut plain = RawMqtt::open(&hub).await;
    let (code, _) = plain.connect(connect_packet("x1", None, true, 60)).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    // A SAS device is not admitted by a certificate.
    hub.device("sas1").await;
    let (_, code) = cert_connect(&hub, "sas1", &one, &[]).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let old = self_signed("old", -30, -1);
    let early = self_signed("early", 2, 30);
    svc.create_x509_device("old", &sha1_hex(&old.der), None)
        .await
        .unwrap();
    svc.create_x509_device("early", &sha1_hex(&early.der), None)
        .await
        .unwrap();
    let (_, code) = cert_connect(&hub, "old", &old, &[]).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    let (_, code) = cert_connect(&hub, "early", &early, &[]).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
}

#[tokio::test]
async fn changing_the_thumbprint_closes_the_session() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let cert = self_signed("t1", -1, 30);
    let next = self_signed("t1", -1, 30);
    svc.create_x509_device("t1", &sha1_hex(&cert.der), None)
        .await
        .unwrap();
    let (mut m, code) = cert_connect(&hub, "t1", &cert, &[]).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    let mut device = svc.get_device("t1").await.unwrap();
    if let Some(auth) = device.authentication.as_mut() {
        auth.x509_thumbprint = Some(X509Thumbprint {
            primary_thumbprint: Some(sha1_hex(&next.der)),
            secondary_thumbprint: None,
        });
    }
    svc.update_device(&device, None).await.unwrap();
    m.expect_closed(Duration::from_secs(5)).await;
    let (_, code) = cert_connect(&hub, "t1", &cert, &[]).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    let (_, code) = cert_connect(&hub, "t1", &next, &[]).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
}

#[tokio::test]
async fn ca_signed_devices_need_a_verified_ca_and_their_own_cn() {
    let mut hub = TestHub::start().await;
    let svc = hub.owner();
    let (root, issuer) = ca("Test Root");
    svc.create_ca_device("c1").await.unwrap();
    let leaf = signed("c1", &issuer);

    // No CA registered yet.
    let (_, code) = cert_connect(&hub, "c1", &leaf, &[]).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);

    let added = svc.add_certificate("root", &root.pem).await.unwrap();
    assert!(!added.properties.is_verified);
    assert_eq!(added.properties.thumbprint, sha1_hex(&root.der));
    assert!(added.properties.subject.contains("CN=Test Root"));
    assert!(added.properties.expiry.ends_with(" GMT"));
    // Registered but not verified.
    let (_, code) = cert_connect(&hub, "c1", &leaf, &[]).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);

    // Verifying before a code exists is refused.
    let e = svc
        .verify_certificate("root", &root.pem, None)
        .await
        .unwrap_err();
    assert_eq!(code_of(e), Some(ErrorCode::InvalidOperation));
    let with_code = svc
        .generate_verification_code("root", Some(&added.etag))
        .await
        .unwrap();
    let code_text = with_code.properties.verification_code.clone().unwrap();
    assert_eq!(code_text.len(), 40);
    // A stale etag is refused.
    let e = svc
        .generate_verification_code("root", Some(&added.etag))
        .await
        .unwrap_err();
    assert_eq!(code_of(e), Some(ErrorCode::PreconditionFailed));
    // Signed by another key: refused. The right CN but self-signed: refused.
    let (_, stranger) = ca("Stranger");
    let forged = signed(&code_text, &stranger);
    let e = svc
        .verify_certificate("root", &forged.pem, None)
        .await
        .unwrap_err();
    assert_eq!(code_of(e), Some(ErrorCode::ArgumentInvalid));
    let wrong_cn = signed("not-the-code", &issuer);
    let e = svc
        .verify_certificate("root", &wrong_cn.pem, None)
        .await
        .unwrap_err();
    assert_eq!(code_of(e), Some(ErrorCode::ArgumentInvalid));
    let proof = signed(&code_text, &issuer);
    let verified = svc
        .verify_certificate("root", &proof.pem, None)
        .await
        .unwrap();
    assert!(verified.properties.is_verified);
    assert!(verified.properties.verification_code.is_none());

    // Now admitted; another device's certificate is not.
    let (mut session, code) = cert_connect(&hub, "c1", &leaf, &[]).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    let other = signed("c2", &issuer);
    let (_, code) = cert_connect(&hub, "c1", &other, &[]).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    // Through an intermediate CA the device presents.
    let (inter_made, inter) = {
        let key = KeyPair::generate().unwrap();
        let mut p = params("Intermediate", -1, 100);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.signed_by(&key, &issuer).unwrap();
        let issuer2 = Issuer::new(p, KeyPair::from_pem(&key.serialize_pem()).unwrap());
        (
            Made {
                der: cert.der().clone(),
                pem: cert.pem(),
                key,
            },
            issuer2,
        )
    };
    svc.create_ca_device("c3").await.unwrap();
    let deep = signed("c3", &inter);
    let (_, code) = cert_connect(&hub, "c3", &deep, &[&inter_made]).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    // Without the intermediate the chain is broken.
    let (_, code) = cert_connect(&hub, "c3", &deep, &[]).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);

    // The CA list survives a restart, verified.
    drop(session);
    hub.restart().await;
    let svc = hub.owner();
    let listed = svc.list_certificates().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].properties.is_verified);
    let (s, code) = cert_connect(&hub, "c1", &leaf, &[]).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    session = s;

    // Removing the CA closes the session it admitted and admits no one after.
    svc.delete_certificate("root", None).await.unwrap();
    session.expect_closed(Duration::from_secs(5)).await;
    let (_, code) = cert_connect(&hub, "c1", &leaf, &[]).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    let e = svc.get_certificate("root").await.unwrap_err();
    assert_eq!(code_of(e), Some(ErrorCode::IotHubNotFound));
}

#[tokio::test]
async fn the_certificate_api_refuses_bad_input_with_iot_hub_errors() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let leaf = self_signed("not-a-ca", -1, 30);
    let e = svc.add_certificate("leaf", &leaf.pem).await.unwrap_err();
    assert_eq!(code_of(e), Some(ErrorCode::ArgumentInvalid));
    let e = svc.add_certificate("junk", "hello").await.unwrap_err();
    assert_eq!(code_of(e), Some(ErrorCode::ArgumentInvalid));
    let (root, _) = ca("Root");
    let e = svc
        .add_certificate("bad/name", &root.pem)
        .await
        .unwrap_err();
    assert!(matches!(e, SdkError::Hub { .. }));
    let added = svc.add_certificate("r", &root.pem).await.unwrap();
    // Adding again without an etag is refused; replacing with the etag works and unverifies.
    let e = svc.add_certificate("r", &root.pem).await.unwrap_err();
    assert_eq!(code_of(e), Some(ErrorCode::PreconditionFailed));
    let e = svc
        .delete_certificate("r", Some("stale"))
        .await
        .unwrap_err();
    assert_eq!(code_of(e), Some(ErrorCode::PreconditionFailed));
    let replaced = svc
        .replace_certificate("R", &root.pem, Some(&added.etag))
        .await
        .unwrap();
    assert_ne!(replaced.etag, added.etag);
    assert_eq!(replaced.name, "r");
    let e = svc.delete_certificate("missing", None).await.unwrap_err();
    assert_eq!(code_of(e), Some(ErrorCode::IotHubNotFound));
    // Reading needs RegistryRead: the device policy has none.
    let e = hub.service("device").list_certificates().await.unwrap_err();
    assert_eq!(code_of(e), Some(ErrorCode::IotHubUnauthorizedAccess));
    svc.delete_certificate("r", Some(&replaced.etag))
        .await
        .unwrap();
    assert!(svc.list_certificates().await.unwrap().is_empty());
}

#[tokio::test]
async fn resource_manager_shapes_and_module_common_names() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let (root, issuer) = ca("ARM Root");
    let url = format!(
        "https://localhost:{}/twinhub/certificates",
        hub.https.port()
    );
    // Resource Manager's PUT body, isVerified on upload (no proof of possession).
    let put = https_client(&hub)
        .put(format!("{url}/arm?api-version=2021-04-12"))
        .header("Authorization", policy_token(&hub, "iothubowner", 600))
        .json(&serde_json::json!({"properties": {"certificate": root.pem, "isVerified": true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let list: serde_json::Value = https_client(&hub)
        .get(format!("{url}?api-version=2021-04-12"))
        .header("Authorization", policy_token(&hub, "iothubowner", 600))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let value = list["value"].as_array().expect("{\"value\": [...]}");
    assert_eq!(value.len(), 1);
    assert_eq!(value[0]["properties"]["isVerified"], true);
    assert_eq!(value[0]["name"], "arm");

    // A module's CA-signed certificate names deviceId/moduleId; a bare module id is not enough
    // (it would admit that module name on every device).
    svc.create_device("md", Default::default()).await.unwrap();
    let module = twinhub_proto::model::Module {
        module_id: "m1".into(),
        device_id: "md".into(),
        authentication: Some(twinhub_proto::model::AuthenticationMechanism {
            symmetric_key: None,
            x509_thumbprint: None,
            auth_type: twinhub_proto::model::AuthenticationType::CertificateAuthority,
        }),
        ..Default::default()
    };
    let put = https_client(&hub)
        .put(format!(
            "https://localhost:{}/devices/md/modules/m1?api-version=2021-04-12",
            hub.https.port()
        ))
        .header("Authorization", policy_token(&hub, "iothubowner", 600))
        .json(&module)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.text().await.unwrap());
    let full = signed("md/m1", &issuer);
    let (_, code) = cert_connect(&hub, "md/m1", &full, &[]).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    let bare = signed("m1", &issuer);
    let (_, code) = cert_connect(&hub, "md/m1", &bare, &[]).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
    // The module's certificate does not sign its device in.
    let (_, code) = cert_connect(&hub, "md", &full, &[]).await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
}

/// The Rust SDK's DeviceClient with a certificate over both transports: on 443 the HTTPS
/// connection's client chain reaches the MQTT-over-WebSocket session.
#[tokio::test]
async fn the_sdk_device_client_signs_in_with_a_certificate_over_both_transports() {
    use twinhub_sdk::{DeviceClient, Transport};
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let (root, issuer) = ca("SDK Root");
    let added = svc.add_certificate("sdk", &root.pem).await.unwrap();
    let code = svc
        .generate_verification_code("sdk", Some(&added.etag))
        .await
        .unwrap()
        .properties
        .verification_code
        .unwrap();
    svc.verify_certificate("sdk", &signed(&code, &issuer).pem, None)
        .await
        .unwrap();
    let ca_pem = std::fs::read(hub.ca_pem()).unwrap();
    for transport in [Transport::Mqtt, Transport::WebSocket] {
        let port = match transport {
            Transport::Mqtt => hub.mqtt.port(),
            Transport::WebSocket => hub.https.port(),
        };
        let tag = format!("{transport:?}").to_lowercase();
        let ss_id = format!("sdk-ss-{tag}");
        let ss = self_signed(&ss_id, -1, 30);
        svc.create_x509_device(&ss_id, &sha256_hex(&ss.der), None)
            .await
            .unwrap();
        let ca_id = format!("sdk-ca-{tag}");
        svc.create_ca_device(&ca_id).await.unwrap();
        let leaf = signed(&ca_id, &issuer);
        for (id, made) in [(&ss_id, &ss), (&ca_id, &leaf)] {
            let client = DeviceClient::x509_builder(
                "localhost",
                id,
                made.pem.clone(),
                made.key.serialize_pem(),
            )
            .extra_ca_pem(ca_pem.clone())
            .transport(transport)
            .port(port)
            .build()
            .unwrap();
            client.connect().await.unwrap();
            client
                .patch_reported(&serde_json::json!({"via": tag}))
                .await
                .unwrap();
            let twin = svc.get_twin(id).await.unwrap();
            assert_eq!(
                twin.properties.unwrap().reported.get("via"),
                Some(&serde_json::json!(tag)),
                "{id}"
            );
            client.close().await;
        }
        // Another device's certificate over the same transport is refused.
        let client =
            DeviceClient::x509_builder("localhost", &ca_id, ss.pem.clone(), ss.key.serialize_pem())
                .extra_ca_pem(ca_pem.clone())
                .transport(transport)
                .port(port)
                .build()
                .unwrap();
        assert!(
            matches!(client.connect().await, Err(SdkError::NotAuthorized(_))),
            "{tag}"
        );
    }
}
