//! Shared test support: a real hub started in-process on loopback (ephemeral ports, a temp
//! data dir, real TLS and the real store), a service client for it, and a minimal raw MQTT
//! client over TLS built on the project's codec, for byte-level device tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use twinhub_mqtt::{Connect, ConnectReturnCode, Packet, QoS, decode, encode};
use twinhub_sdk::ServiceClient;
use twinhub_server::{Config, RunningServer};

/// Adjusts a test hub's configuration, at every start.
type Tweak = Arc<dyn Fn(&mut Config) + Send + Sync>;

pub struct TestHub {
    pub server: Option<RunningServer>,
    pub dir: tempfile::TempDir,
    pub https: SocketAddr,
    pub mqtt: SocketAddr,
    /// Applied to the configuration of every start and restart.
    tweak: Tweak,
}

pub fn config(dir: &std::path::Path, https_port: u16, mqtt_port: u16) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        hostname: "localhost".into(),
        bind: "127.0.0.1".parse().unwrap(),
        https_port,
        mqtt_port,
        amqp_port: 0,
        mqtt_connect_timeout: 2,
        ..Config::default()
    }
}

impl TestHub {
    pub async fn start() -> TestHub {
        Self::start_with(|_| {}).await
    }

    /// A hub whose configuration `tweak` adjusts (on every start).
    pub async fn start_with(tweak: impl Fn(&mut Config) + Send + Sync + 'static) -> TestHub {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, tweak).await
    }

    /// A hub on the data dir `dir` (a test may mount something there first).
    pub async fn start_in(
        dir: tempfile::TempDir,
        tweak: impl Fn(&mut Config) + Send + Sync + 'static,
    ) -> TestHub {
        let tweak: Tweak = Arc::new(tweak);
        let mut cfg = config(dir.path(), 0, 0);
        tweak(&mut cfg);
        let server = RunningServer::start(cfg).await.expect("hub starts");
        TestHub {
            https: server.https_addr,
            mqtt: server.mqtt_addr,
            server: Some(server),
            dir,
            tweak,
        }
    }

    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("hub is running")
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }

    /// Restarts on the same data dir and the same ports.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut cfg = config(self.dir.path(), self.https.port(), self.mqtt.port());
        (self.tweak)(&mut cfg);
        let server = RunningServer::start(cfg).await.expect("hub restarts");
        self.server = Some(server);
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("tls").join("ca.pem")
    }

    pub fn service_cs(&self, policy: &str) -> String {
        self.server()
            .connection_string(policy)
            .expect("policy exists")
    }

    pub fn service(&self, policy: &str) -> ServiceClient {
        ServiceClient::builder(&self.service_cs(policy))
            .extra_ca_pem(std::fs::read(self.ca_pem()).unwrap())
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    }

    pub fn owner(&self) -> ServiceClient {
        self.service("iothubowner")
    }

    /// Creates a SAS device and returns its primary key.
    pub async fn device(&self, id: &str) -> String {
        primary_key(
            self.owner()
                .create_device(id, Default::default())
                .await
                .unwrap(),
        )
    }
}

/// A device's primary key as the registry returned it.
pub fn primary_key(device: twinhub_proto::model::Device) -> String {
    device
        .authentication
        .and_then(|a| a.symmetric_key)
        .and_then(|k| k.primary_key)
        .expect("a SAS device has a primary key")
}

impl Drop for TestHub {
    fn drop(&mut self) {
        // A test that panicked leaves the server running: cancel what we can.
        if let Some(s) = self.server.take() {
            s.hub.close_all_sessions();
        }
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn device_token(device_id: &str, key: &str, ttl_secs: i64) -> String {
    let expiry = (now_unix() as i64 + ttl_secs).max(0) as u64;
    twinhub_proto::sas::generate_sas_token(
        &format!("localhost/devices/{device_id}"),
        key,
        None,
        expiry,
    )
    .unwrap()
}

/// A raw MQTT connection over TLS, for byte-level tests.
pub struct RawMqtt {
    pub stream: TlsStream<TcpStream>,
    pub buf: BytesMut,
}

/// Resident memory of this process, in KiB (Linux).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A TLS connection to `addr` trusting the hub's CA, offering `alpn`.
pub async fn tls_connect(hub: &TestHub, addr: SocketAddr, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(hub.ca_pem()).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// Reads until the peer closes; `Err(())` if it is still open after `within`.
pub async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Result<Vec<u8>, ()> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Err(()),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

impl RawMqtt {
    pub async fn open(hub: &TestHub) -> RawMqtt {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(hub.ca_pem()).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
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

    pub async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        encode(p, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        // The server may close while we write a large frame: that is what some tests want.
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// The next packet, or None when the server closed the connection. Fails after 10 s.
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(Duration::from_secs(10))
            .await
            .expect("no packet and no close within the deadline")
    }

    /// Ok(None) on close, Err(()) when nothing happened within `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Result<Option<Packet>, ()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(p) = decode(&mut self.buf, usize::MAX >> 4).unwrap() {
                return Ok(Some(p));
            }
            self.buf.reserve(4096);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Waits for the server to close the connection (skipping packets); panics otherwise.
    pub async fn expect_closed(&mut self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_within(left).await {
                Ok(None) => return,
                Ok(Some(_)) => continue,
                Err(()) => panic!("the server did not close the connection within {within:?}"),
            }
        }
    }

    /// Sends CONNECT and returns the CONNACK code and session-present flag.
    pub async fn connect(&mut self, c: Connect) -> (ConnectReturnCode, bool) {
        self.send(&Packet::Connect(c)).await;
        match self.recv().await {
            Some(Packet::ConnAck(a)) => (a.code, a.session_present),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// The CONNACK code a fresh connection of `device_id` gets with a valid token.
    pub async fn connack(
        hub: &TestHub,
        device_id: &str,
        key: &str,
    ) -> (RawMqtt, ConnectReturnCode) {
        let mut m = RawMqtt::open(hub).await;
        let token = device_token(device_id, key, 600);
        let (code, _) = m
            .connect(connect_packet(device_id, Some(&token), true, 60))
            .await;
        (m, code)
    }

    /// A connected device session (asserts CONNACK 0).
    pub async fn device(hub: &TestHub, device_id: &str, key: &str, clean: bool) -> (RawMqtt, bool) {
        let mut m = RawMqtt::open(hub).await;
        let (code, present) = m
            .connect(connect_packet(
                device_id,
                Some(&device_token(device_id, key, 3600)),
                clean,
                60,
            ))
            .await;
        assert_eq!(code, ConnectReturnCode::Accepted);
        (m, present)
    }

    pub async fn subscribe(&mut self, filters: &[&str]) {
        let sub = twinhub_mqtt::Subscribe {
            pkid: 1,
            filters: filters
                .iter()
                .map(|f| {
                    (
                        twinhub_mqtt::Topic::new(f.to_string()).unwrap(),
                        QoS::AtLeastOnce,
                    )
                })
                .collect(),
        };
        self.send(&Packet::Subscribe(sub)).await;
        loop {
            match self.recv().await {
                Some(Packet::SubAck(a)) => return assert_eq!(a.pkid, 1),
                // Acks of earlier publishes may still be in flight.
                Some(Packet::PubAck(_)) => continue,
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    pub async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, pkid: u16, dup: bool) {
        self.send(&Packet::Publish(twinhub_mqtt::Publish {
            dup,
            qos,
            retain: false,
            topic: twinhub_mqtt::Topic::new(topic.to_string()).unwrap(),
            pkid,
            payload: bytes::Bytes::copy_from_slice(payload),
        }))
        .await;
    }

    /// Waits for the next method request and answers it; returns the request.
    pub async fn answer_method(
        &mut self,
        status: i32,
        payload: &[u8],
        qos: QoS,
    ) -> twinhub_mqtt::Publish {
        let req = self.next_publish().await;
        let rid = req
            .topic
            .as_str()
            .rsplit_once("$rid=")
            .expect("a $rid in the method topic")
            .1
            .to_string();
        let pkid = if qos == QoS::AtMostOnce { 0 } else { 1 };
        self.publish(
            &format!("$iothub/methods/res/{status}/?$rid={rid}"),
            payload,
            qos,
            pkid,
            false,
        )
        .await;
        req
    }

    /// The next PUBLISH the hub sends, skipping acks.
    pub async fn next_publish(&mut self) -> twinhub_mqtt::Publish {
        loop {
            match self.recv().await {
                Some(Packet::Publish(p)) => return p,
                Some(_) => continue,
                None => panic!("connection closed while waiting for a PUBLISH"),
            }
        }
    }
}

pub fn connect_packet(
    device_id: &str,
    password: Option<&str>,
    clean: bool,
    keep_alive: u16,
) -> Connect {
    Connect {
        protocol_name: "MQTT".into(),
        protocol_level: 4,
        clean_session: clean,
        keep_alive,
        client_id: device_id.into(),
        will: None,
        username: Some(format!("localhost/{device_id}/?api-version=2021-04-12")),
        password: password.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes())),
    }
}

/// A TLS client config trusting the hub's development CA at `ca_pem`.
pub fn client_tls(ca_pem: &std::path::Path) -> Option<Arc<rustls::ClientConfig>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).ok()? {
        roots.add(cert.ok()?).ok()?;
    }
    Some(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

impl RawMqtt {
    /// A connected device session, or `None` when the hub cannot be reached or refuses it:
    /// for simulated devices that must survive a hub restart (no panics, the caller retries).
    /// Needs no `TestHub`, so it runs inside spawned tasks.
    pub async fn try_device(
        mqtt: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        device_id: &str,
        key: &str,
    ) -> Option<RawMqtt> {
        let tcp = TcpStream::connect(mqtt).await.ok()?;
        let stream = TlsConnector::from(tls)
            .connect(ServerName::try_from("localhost").ok()?, tcp)
            .await
            .ok()?;
        let mut m = RawMqtt {
            stream,
            buf: BytesMut::new(),
        };
        let token = device_token(device_id, key, 3600);
        // No keepalive: simulated devices sit idle between method calls for as long as a test runs.
        let connect = connect_packet(device_id, Some(&token), true, 0);
        if !m.try_send(&Packet::Connect(connect)).await {
            return None;
        }
        match m.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::ConnAck(a))) if a.code == ConnectReturnCode::Accepted => Some(m),
            _ => None,
        }
    }

    /// Sends a packet; false when the connection is gone.
    pub async fn try_send(&mut self, p: &Packet) -> bool {
        let mut out = BytesMut::new();
        if encode(p, &mut out).is_err() {
            return false;
        }
        self.stream.write_all(&out).await.is_ok() && self.stream.flush().await.is_ok()
    }

    /// Subscribes at QoS 1 and waits for the SUBACK; false on close or after 10 s.
    pub async fn try_subscribe(&mut self, filters: &[&str]) -> bool {
        let Ok(filters) = filters
            .iter()
            .map(|f| twinhub_mqtt::Topic::new(f.to_string()).map(|t| (t, QoS::AtLeastOnce)))
            .collect::<Result<Vec<_>, _>>()
        else {
            return false;
        };
        let sub = twinhub_mqtt::Subscribe { pkid: 1, filters };
        if !self.try_send(&Packet::Subscribe(sub)).await {
            return false;
        }
        loop {
            match self.recv_within(Duration::from_secs(10)).await {
                Ok(Some(Packet::SubAck(a))) => return a.pkid == 1,
                Ok(Some(_)) => continue,
                _ => return false,
            }
        }
    }
}

/// The key of shared access policy `policy`.
pub fn policy_key(hub: &TestHub, policy: &str) -> String {
    hub.service_cs(policy)
        .split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .unwrap()
        .to_owned()
}

/// A raw AMQP session over TLS to the hub's AMQP port: SASL PLAIN as `policy` (the policy's
/// key as the password), or ANONYMOUS with no token at all.
pub async fn raw_amqp_session(
    hub: &TestHub,
    policy: Option<&str>,
) -> (
    fe2o3_amqp::connection::ConnectionHandle<()>,
    fe2o3_amqp::session::SessionHandle<()>,
) {
    let tls = client_tls(&hub.ca_pem()).unwrap();
    let tcp = tokio::net::TcpStream::connect(hub.server().amqp_addr)
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let profile = match policy {
        Some(p) => fe2o3_amqp::sasl_profile::SaslProfile::Plain {
            username: p.into(),
            password: policy_key(hub, p),
        },
        None => fe2o3_amqp::sasl_profile::SaslProfile::Anonymous,
    };
    let mut connection = fe2o3_amqp::Connection::builder()
        .container_id("raw")
        .scheme("amqp")
        .sasl_profile(profile)
        .open_with_stream(stream)
        .await
        .unwrap();
    let session = fe2o3_amqp::Session::begin(&mut connection).await.unwrap();
    (connection, session)
}

/// `GET /health` on the hub's HTTPS port: the status and the body.
pub async fn health(hub: &TestHub) -> (u16, String) {
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(hub.ca_pem()).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://localhost:{}/health", hub.https.port()))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The bodies of the first `n` events of `entity` (`None`: the built-in endpoint), read from
/// the start of every partition through this hub's own AMQP port, sorted.
pub async fn event_bodies(hub: &TestHub, entity: Option<&str>, n: usize) -> Vec<String> {
    let file = &hub.server().hub_file;
    let cs = match entity {
        Some(name) => file.entity_connection_string("service", false, name),
        None => file.events_connection_string("service", false),
    }
    .expect("the endpoint's connection string");
    let client = twinhub_sdk::EventsClient::builder(&cs)
        .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
        .port(hub.server().amqp_addr.port())
        .connect()
        .await
        .expect("the events client signs in");
    let mut stream = client
        .receive(None, twinhub_sdk::StartPosition::Earliest)
        .await
        .expect("the receivers attach");
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(Ok(e))) => got.push(String::from_utf8_lossy(&e.body).into_owned()),
            other => panic!("reading events failed after {got:?}: {other:?}"),
        }
    }
    got.sort();
    got
}

/// The Rust SDK's client for SAS device `id`, aimed at this hub's MQTT port.
pub fn device_client(hub: &TestHub, id: &str, key: &str) -> twinhub_sdk::DeviceClient {
    twinhub_sdk::DeviceClient::builder(&format!(
        "HostName=localhost;DeviceId={id};SharedAccessKey={key}"
    ))
    .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
    .port(hub.mqtt.port())
    .operation_timeout(Duration::from_secs(30))
    .build()
    .unwrap()
}

/// A reqwest client trusting only this hub's development CA, for raw HTTPS calls.
pub fn https_client(hub: &TestHub) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(hub.ca_pem()).unwrap()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap()
}

/// A service SAS token of shared access policy `policy`, valid `ttl_secs`.
pub fn policy_token(hub: &TestHub, policy: &str, ttl_secs: u64) -> String {
    twinhub_proto::sas::generate_sas_token(
        "localhost",
        &policy_key(hub, policy),
        Some(policy),
        now_unix() + ttl_secs,
    )
    .unwrap()
}
