//! The device client: IoT Hub's device-side MQTT protocol (direct methods, twins, desired
//! property patches, telemetry) against twinhub or Azure IoT Hub, over MQTT/TLS or MQTT over
//! WebSockets, signed in with a SAS key or an X.509 certificate.
//!
//! [`DeviceClient`] is a cheap handle; the connection belongs to one background task
//! (`task`) that the handle feeds with commands. `settings` resolves the connection string
//! and TLS trust once, `link` dials and authenticates one connection, `messages` holds the
//! values the application sees, and `backoff` paces reconnects. `module` is the
//! [`ModuleClient`]: the same client for a module identity, without cloud-to-device messages.

pub(crate) mod backoff;
mod link;
mod messages;
mod module;
pub(crate) mod settings;
mod task;

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};
use twinhub_proto::connection_string::{ConnectionString, ConnectionStringKind};

use crate::error::{Error, Result};
pub use messages::{
    CloudToDeviceMessage, CloudToDeviceMessages, ConnectionState, DesiredPatch, DesiredPatches,
    DeviceTwin, MethodRequest, MethodRequests, MethodResponse,
};
pub use module::{ModuleClient, ModuleClientBuilder};
pub use settings::Transport;
use settings::{ClientCertificate, Credential, Settings};
use task::{Command, Handler, Outbound, Shared, Task, TwinReply, TwinRequest};

/// Cloud-to-device messages buffered for the application at most.
const C2D_QUEUE: usize = 64;

/// IoT Hub's limit on one device-to-cloud message body.
pub const MAX_EVENT_SIZE: usize = 256 * 1024;
/// The longest keep-alive IoT Hub accepts (29 minutes).
pub const MAX_KEEP_ALIVE: Duration = Duration::from_secs(1740);
/// Operations queued for the connection task before callers wait.
const COMMAND_QUEUE: usize = 1024;
/// Method requests waiting in a [`MethodRequests`] stream before the device answers "busy".
const METHOD_QUEUE: usize = 64;
/// Desired-property changes kept for an application that has not read them yet; past this
/// it gets the whole document once it reads again.
pub const DESIRED_QUEUE: usize = 1024;

/// Builds a [`DeviceClient`] ([`DeviceClientBuilder`]) or a [`ModuleClient`]
/// ([`ModuleClientBuilder`]); start with [`DeviceClient::builder`] or
/// [`ModuleClient::builder`]. Both share every option: they differ only in the identity the
/// connection string names.
#[derive(Clone)]
pub struct ClientBuilder<C> {
    connection_string: String,
    extra_ca: Vec<Vec<u8>>,
    transport: Transport,
    port: Option<u16>,
    keep_alive: Duration,
    sas_token_ttl: Duration,
    connect_timeout: Duration,
    operation_timeout: Duration,
    certificate: Option<ClientCertificate>,
    client: PhantomData<fn() -> C>,
}

/// Builds a [`DeviceClient`]; start with [`DeviceClient::builder`].
pub type DeviceClientBuilder = ClientBuilder<DeviceClient>;

impl<C> std::fmt::Debug for ClientBuilder<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string carries the key, and the certificate's key is a secret too.
        f.debug_struct("ClientBuilder")
            .field("transport", &self.transport)
            .field("port", &self.port)
            .field("keep_alive", &self.keep_alive)
            .field("sas_token_ttl", &self.sas_token_ttl)
            .field("connect_timeout", &self.connect_timeout)
            .field("operation_timeout", &self.operation_timeout)
            .field("x509", &self.certificate.is_some())
            .finish_non_exhaustive()
    }
}

/// The kinds of client a [`ClientBuilder`] makes: [`DeviceClient`] and [`ModuleClient`].
/// Sealed, so nothing outside the SDK can turn one kind into the other.
pub trait BuiltClient: sealed::Sealed {}

pub(crate) mod sealed {
    use super::{ConnectionStringKind, DeviceClient};

    /// What the builder needs from a client kind, out of the applications' reach.
    pub trait Sealed: Sized {
        /// The connection string kind the client takes.
        const KIND: ConnectionStringKind;
        /// The client around the shared connection code.
        fn wrap(client: DeviceClient) -> Self;
    }

    impl Sealed for DeviceClient {
        const KIND: ConnectionStringKind = ConnectionStringKind::Device;
        fn wrap(client: DeviceClient) -> Self {
            client
        }
    }
}

impl BuiltClient for DeviceClient {}

impl<C: BuiltClient> ClientBuilder<C> {
    pub(crate) fn new(connection_string: String) -> Self {
        ClientBuilder {
            connection_string,
            extra_ca: Vec::new(),
            transport: Transport::Mqtt,
            port: None,
            keep_alive: Duration::from_secs(60),
            sas_token_ttl: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(30),
            certificate: None,
            client: PhantomData,
        }
    }

    /// Trusts this CA (PEM text) in addition to the system roots, e.g. twinhub's dev CA.
    pub fn extra_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.extra_ca.push(pem.into());
        self
    }

    /// Signs in with an X.509 client certificate instead of a SAS key: `chain_pem` holds the
    /// identity's certificate first, then any intermediates; `key_pem` its private key (PKCS#8,
    /// PKCS#1 or SEC1). The connection string then carries `x509=true` and no key; the MQTT
    /// user name stays the same and CONNECT carries no password.
    pub fn x509_certificate(
        mut self,
        chain_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.certificate = Some(ClientCertificate {
            chain_pem: chain_pem.into(),
            key_pem: key_pem.into(),
        });
        self
    }

    /// MQTT over TLS (default) or MQTT over WebSockets.
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Dials this port instead of the transport's default (8883 for MQTT, 443 for
    /// WebSockets), e.g. for a twinhub on unprivileged ports.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The MQTT keep-alive, whole seconds from 1 s to 29 min (default 60 s). The client
    /// pings when the link is quiet this long and reconnects if the hub does not answer
    /// within another keep-alive.
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// Lifetime of the SAS token each connection signs (default one hour, at least one
    /// second). The client reconnects with a fresh token at 80% of it.
    pub fn sas_token_ttl(mut self, ttl: Duration) -> Self {
        self.sas_token_ttl = ttl;
        self
    }

    /// Bound on one connection attempt: TCP, TLS, WebSocket upgrade and CONNACK (default
    /// 30 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bound on one operation (twin read or patch, telemetry, method answer) including any
    /// wait for a reconnect (default 30 s).
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// Checks the settings and loads the TLS roots (and the client certificate). Does not
    /// connect: see [`DeviceClient::connect`] and [`ModuleClient::connect`].
    pub fn build(self) -> Result<C> {
        let cs: ConnectionString = self.connection_string.parse().map_err(
            |e: twinhub_proto::connection_string::ConnectionStringError| {
                Error::ConnectionString(e.to_string())
            },
        )?;
        match (cs.kind(), C::KIND) {
            (ConnectionStringKind::Device, ConnectionStringKind::Device)
            | (ConnectionStringKind::Module, ConnectionStringKind::Module) => {}
            (ConnectionStringKind::Module, _) => {
                return Err(Error::ConnectionString(
                    "a module connection string (with ModuleId) is for ModuleClient".into(),
                ));
            }
            (ConnectionStringKind::Device, _) => {
                return Err(Error::ConnectionString(
                    "a module connection string (HostName, DeviceId, ModuleId, SharedAccessKey) is needed".into(),
                ));
            }
            (ConnectionStringKind::Service, _) => {
                return Err(Error::ConnectionString(
                    "a device connection string (HostName, DeviceId, SharedAccessKey) is needed"
                        .into(),
                ));
            }
        }
        let Some(device_id) = cs.device_id.clone() else {
            return Err(Error::ConnectionString("DeviceId is required".into()));
        };
        let credential = match (cs.shared_access_key.clone(), cs.x509, &self.certificate) {
            (Some(key), _, None) => Credential::Key(key),
            (None, true, Some(_)) => Credential::Certificate,
            (None, true, None) => {
                return Err(Error::ConnectionString(
                    "x509=true: give the certificate and key with x509_certificate()".into(),
                ));
            }
            (Some(_), _, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "both a SharedAccessKey and a certificate were given: use one".into(),
                ));
            }
            (None, false, _) => {
                return Err(Error::ConnectionString(
                    "the client signs its own tokens: SharedAccessKey (or x509=true with a certificate) is required".into(),
                ));
            }
        };
        let dial_host = cs.dial_host().to_string();
        if dial_host.parse::<std::net::IpAddr>().is_err() && dial_host.contains(':') {
            return Err(Error::ConnectionString(format!(
                "'{dial_host}' must be a bare host name; set the port with port()"
            )));
        }
        let keep_alive = self.keep_alive.as_secs();
        if keep_alive == 0 || self.keep_alive > MAX_KEEP_ALIVE {
            return Err(Error::InvalidArgument(
                "keep_alive must be between 1 second and 29 minutes".into(),
            ));
        }
        if self.sas_token_ttl < Duration::from_secs(1) {
            return Err(Error::InvalidArgument(
                "sas_token_ttl must be at least 1 second".into(),
            ));
        }
        if self.connect_timeout.is_zero() || self.operation_timeout.is_zero() {
            return Err(Error::InvalidArgument("timeouts must not be zero".into()));
        }
        let tls = match credential {
            Credential::Certificate => {
                settings::tls_config_with(&self.extra_ca, self.certificate.as_ref())?
            }
            Credential::Key(_) => settings::tls_config(&self.extra_ca)?,
        };
        let settings = Settings {
            server_name: settings::server_name(&dial_host)?,
            host_name: cs.host_name,
            dial_host,
            device_id,
            module_id: cs.module_id,
            credential,
            transport: self.transport,
            port: self.port.unwrap_or(self.transport.default_port()),
            keep_alive: Duration::from_secs(keep_alive),
            token_ttl: self.sas_token_ttl,
            connect_timeout: self.connect_timeout,
            operation_timeout: self.operation_timeout,
            tls,
        };
        let (commands, pending) = mpsc::channel(COMMAND_QUEUE);
        Ok(C::wrap(DeviceClient {
            inner: Arc::new(Inner {
                settings: Arc::new(settings),
                shared: Arc::new(Shared::new()),
                commands,
                pending: tokio::sync::Mutex::new(Some(pending)),
            }),
        }))
    }
}

/// A device's connection to IoT Hub or twinhub.
///
/// Cloning is cheap and every clone drives the same connection. After
/// [`connect`](DeviceClient::connect) a background task keeps the connection up: it
/// reconnects after a drop (exponential backoff with jitter, 100 ms doubling to 30 s), renews
/// the SAS token by reconnecting at 80% of its lifetime, and stops only on
/// [`close`](DeviceClient::close), when every handle is dropped, or when the hub refuses the
/// credentials ([`ConnectionState::Failed`]). A method handler that captures a clone of the
/// client keeps the connection alive until `close`.
///
/// Operations wait for a connection when there is none, bounded by the operation timeout.
/// Telemetry and method answers are delivered at least once: after a reconnect, messages the
/// hub had not acknowledged are sent again.
#[derive(Clone)]
pub struct DeviceClient {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Arc<Settings>,
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    /// The task's end of the queue until `connect` starts it.
    pending: tokio::sync::Mutex<Option<mpsc::Receiver<Command>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: let the task say DISCONNECT and end.
        self.shared.close.send_replace(true);
    }
}

impl std::fmt::Debug for DeviceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceClient")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl DeviceClient {
    /// Starts building a client from a device connection string
    /// (`HostName=..;DeviceId=..;SharedAccessKey=..[;GatewayHostName=..]`). With
    /// `GatewayHostName` the client dials the gateway and still names `HostName` in its
    /// credentials.
    pub fn builder(connection_string: &str) -> DeviceClientBuilder {
        ClientBuilder::new(connection_string.to_string())
    }

    /// Starts building a client that signs in as `device_id` with an X.509 certificate
    /// (`chain_pem`, leaf first) and its private key (`key_pem`) instead of a SAS key; the
    /// same as [`builder`](Self::builder) with `HostName={host_name};DeviceId={device_id};x509=true`
    /// and [`x509_certificate`](ClientBuilder::x509_certificate).
    pub fn x509_builder(
        host_name: &str,
        device_id: &str,
        chain_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> DeviceClientBuilder {
        let cs = ConnectionString {
            host_name: host_name.to_owned(),
            device_id: Some(device_id.to_owned()),
            x509: true,
            ..ConnectionString::default()
        };
        ClientBuilder::new(cs.to_string()).x509_certificate(chain_pem, key_pem)
    }

    /// The device id from the connection string.
    pub fn device_id(&self) -> &str {
        &self.inner.settings.device_id
    }

    /// Connects once. On success the background task takes over the connection; on failure
    /// nothing runs and the error says why: [`Error::NotAuthorized`] (wrong key, unknown or
    /// disabled device), [`Error::Unreachable`] (DNS, TCP, TLS), [`Error::TimedOut`],
    /// [`Error::Protocol`], or [`Error::Closed`] when [`close`](Self::close) ends the attempt.
    /// Calling it again after success does nothing; after a failure it tries again.
    pub async fn connect(&self) -> Result<()> {
        let mut pending = self.inner.pending.lock().await;
        if pending.is_none() {
            return if *self.inner.shared.done.borrow() {
                Err(self.ended())
            } else {
                Ok(())
            };
        }
        if *self.inner.shared.close.borrow() {
            return Err(Error::Closed);
        }
        // `close` waits for this lock: give up the attempt as soon as it is asked for, rather
        // than after the connect timeout.
        let mut close = self.inner.shared.close.subscribe();
        let attempt = tokio::select! {
            attempt = link::establish(&self.inner.settings) => attempt,
            () = task::closed(&mut close) => Err(Error::Closed),
        };
        match attempt {
            Ok(link) => {
                let Some(commands) = pending.take() else {
                    return Err(Error::Closed);
                };
                let mut task = Task::new(
                    self.inner.settings.clone(),
                    self.inner.shared.clone(),
                    commands,
                    self.inner.commands.clone(),
                );
                // Subscribe for a handler or stream set up before connecting right away.
                task.sync_dispatch();
                self.inner
                    .shared
                    .state
                    .send_replace(ConnectionState::Connected);
                tokio::spawn(task.run(link));
                Ok(())
            }
            Err(e) => {
                self.inner
                    .shared
                    .state
                    .send_replace(ConnectionState::Disconnected {
                        reason: e.to_string(),
                    });
                Err(e)
            }
        }
    }

    /// Watches the connection: [`ConnectionState::Connected`], `Disconnected`, `Reconnecting`
    /// or `Failed`.
    pub fn connection_state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.shared.state.subscribe()
    }

    /// Answers direct methods with `handler`: each call runs it as its own task and sends
    /// the [`MethodResponse`] it returns (a panicking handler answers 500). Replaces an
    /// earlier handler and takes precedence over [`method_requests`](Self::method_requests).
    /// Subscribes to methods now, or at connect when not connected yet.
    pub fn set_method_handler<F, Fut>(&self, handler: F)
    where
        F: Fn(MethodRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = MethodResponse> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |request| Box::pin(handler(request)));
        self.update_dispatch(|d| d.handler = Some(handler));
    }

    /// Direct-method calls as a stream; answer each with [`MethodRequest::respond`]. Only
    /// used while no handler is set; a second call replaces (ends) the first stream. Calls
    /// arriving while 64 are waiting unread are answered 503.
    pub fn method_requests(&self) -> MethodRequests {
        let (tx, rx) = mpsc::channel(METHOD_QUEUE);
        self.update_dispatch(|d| d.methods = Some(tx));
        MethodRequests { rx }
    }

    /// Desired-property changes as a stream, in version order. The first item is the whole
    /// desired document (`full: true`); then each change as the hub sends it. After a
    /// reconnect the client reads the twin and, if changes were missed, sends the whole
    /// document again (`full: true`). An application that falls more than
    /// [`DESIRED_QUEUE`] changes behind is not buffered for
    /// without bound: once it reads again it gets the whole document (`full: true`) in place
    /// of what it missed. A second call replaces (ends) the first stream.
    pub fn desired_patches(&self) -> DesiredPatches {
        let (tx, rx) = mpsc::channel(DESIRED_QUEUE);
        self.inner
            .shared
            .desired_lagging
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.update_dispatch(|d| {
            d.desired = Some(tx);
            d.desired_generation += 1;
        });
        DesiredPatches {
            rx,
            shared: self.inner.shared.clone(),
        }
    }

    /// Cloud-to-device messages as a stream, in the order the hub sends them. The client
    /// subscribes on the first call; taking a message completes it at the hub. The hub keeps
    /// at most 8 messages out to a device, so an application that stops reading holds back
    /// its queue rather than growing a buffer here. A second call replaces (ends) the first
    /// stream.
    pub fn c2d_messages(&self) -> CloudToDeviceMessages {
        // Above the hub's in-flight bound, so a delivery always finds room.
        let (tx, rx) = mpsc::channel(C2D_QUEUE);
        self.update_dispatch(|d| d.c2d = Some(tx));
        CloudToDeviceMessages {
            rx,
            commands: self.inner.commands.clone(),
        }
    }

    fn update_dispatch(&self, change: impl FnOnce(&mut task::Dispatch)) {
        if *self.inner.shared.done.borrow() {
            return;
        }
        change(&mut self.inner.shared.dispatch());
        self.inner.shared.changed.notify_one();
    }

    /// Reads the twin's desired and reported properties.
    pub async fn get_twin(&self) -> Result<DeviceTwin> {
        let reply = self.twin(TwinRequest::Get).await?;
        DeviceTwin::parse(&reply.payload)
    }

    /// Merges `patch` into the reported properties (`null` removes a property) and returns
    /// the new reported `$version`. A refusal is [`Error::Hub`] with the hub's status and
    /// message.
    pub async fn patch_reported(&self, patch: &Value) -> Result<u64> {
        let body = serde_json::to_vec(patch)
            .map_err(|e| Error::InvalidArgument(format!("the patch is not JSON: {e}")))?;
        let reply = self
            .twin(TwinRequest::PatchReported(Bytes::from(body)))
            .await?;
        reply.version.ok_or_else(|| {
            Error::Protocol("the hub acknowledged the patch without a $version".into())
        })
    }

    async fn twin(&self, request: TwinRequest) -> Result<TwinReply> {
        let (reply, answer) = oneshot::channel();
        let reply = self.call(Command::Twin { request, reply }, answer).await?;
        if reply.status >= 300 {
            return Err(Error::from_hub(reply.status, None, &reply.payload));
        }
        Ok(reply)
    }

    /// Sends a device-to-cloud message with application or system properties (`$.ct`,
    /// `$.ce`, `$.mid`, ...), and returns once the hub acknowledged it (QoS 1).
    pub async fn send_event(
        &self,
        payload: impl Into<Bytes>,
        properties: &[(String, String)],
    ) -> Result<()> {
        let payload = payload.into();
        if payload.len() > MAX_EVENT_SIZE {
            return Err(Error::InvalidArgument(format!(
                "the message is {} bytes; IoT Hub accepts at most {MAX_EVENT_SIZE}",
                payload.len()
            )));
        }
        let settings = &self.inner.settings;
        let topic = twinhub_proto::topic::telemetry_topic(
            &settings.device_id,
            settings.module_id.as_deref(),
            properties,
        );
        let (done, acked) = oneshot::channel();
        let command = Command::Publish(Outbound {
            topic,
            payload,
            done: Some(done),
            method_rid: None,
        });
        self.call(command, acked).await
    }

    async fn call<T>(&self, command: Command, answer: oneshot::Receiver<Result<T>>) -> Result<T> {
        let operation = async {
            self.inner
                .commands
                .send(command)
                .await
                .map_err(|_| self.ended())?;
            answer.await.map_err(|_| self.ended())?
        };
        tokio::time::timeout(self.inner.settings.operation_timeout, operation)
            .await
            .map_err(|_| Error::TimedOut)?
    }

    /// Why operations can no longer run.
    fn ended(&self) -> Error {
        match &*self.inner.shared.state.borrow() {
            ConnectionState::Failed(e) => e.clone(),
            _ => Error::Closed,
        }
    }

    /// Sends what is queued, says DISCONNECT, and ends the background task; operations
    /// still waiting fail with [`Error::Closed`].
    pub async fn close(&self) {
        self.inner.shared.close.send_replace(true);
        {
            let mut pending = self.inner.pending.lock().await;
            if let Some(mut queue) = pending.take() {
                // Never connected: nothing runs, so fail what was queued here.
                queue.close();
                drop(queue);
                self.inner
                    .shared
                    .state
                    .send_replace(ConnectionState::Disconnected {
                        reason: "closed by the application".into(),
                    });
                self.inner.shared.done.send_replace(true);
                return;
            }
        }
        let mut done = self.inner.shared.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHM=";

    #[test]
    fn builder_validates_the_connection_string_and_options() {
        let device = format!("HostName=hub.example.net;DeviceId=d1;SharedAccessKey={KEY}");
        let client = DeviceClient::builder(&device).build().unwrap();
        assert_eq!(client.device_id(), "d1");
        assert_eq!(client.inner.settings.port, 8883);
        let ws = DeviceClient::builder(&device)
            .transport(Transport::WebSocket)
            .build()
            .unwrap();
        assert_eq!(ws.inner.settings.port, 443);

        let gateway = format!("{device};GatewayHostName=127.0.0.1");
        let client = DeviceClient::builder(&gateway).port(9000).build().unwrap();
        assert_eq!(client.inner.settings.dial_host, "127.0.0.1");
        assert_eq!(client.inner.settings.host_name, "hub.example.net");
        assert_eq!(client.inner.settings.port, 9000);

        let service = format!("HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}");
        let module = format!("{device};ModuleId=m");
        let with_port = format!("HostName=h:8883;DeviceId=d1;SharedAccessKey={KEY}");
        for bad in [
            service.as_str(),
            &module,
            &with_port,
            "HostName=h;DeviceId=d;x509=true",
        ] {
            assert!(
                matches!(
                    DeviceClient::builder(bad).build(),
                    Err(Error::ConnectionString(_))
                ),
                "{bad}"
            );
        }
        for builder in [
            DeviceClient::builder(&device).keep_alive(Duration::from_millis(500)),
            DeviceClient::builder(&device).keep_alive(Duration::from_secs(1741)),
            DeviceClient::builder(&device).sas_token_ttl(Duration::from_millis(999)),
            DeviceClient::builder(&device).operation_timeout(Duration::ZERO),
        ] {
            assert!(matches!(builder.build(), Err(Error::InvalidArgument(_))));
        }
    }

    #[test]
    fn builder_debug_hides_the_key() {
        let device = format!("HostName=h;DeviceId=d1;SharedAccessKey={KEY}");
        let builder = DeviceClient::builder(&device);
        assert!(!format!("{builder:?}").contains(KEY));
        let client = builder.build().unwrap();
        assert!(!format!("{client:?}").contains(KEY));
    }

    #[tokio::test]
    async fn operations_before_connect_fail_closed_after_close() {
        let device = format!("HostName=h;DeviceId=d1;SharedAccessKey={KEY}");
        let client = DeviceClient::builder(&device)
            .operation_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let waiting = {
            let client = client.clone();
            tokio::spawn(async move { client.get_twin().await })
        };
        tokio::task::yield_now().await;
        client.close().await;
        let result = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("the queued operation ends with close")
            .expect("no panic");
        assert!(matches!(result, Err(Error::Closed)), "{result:?}");
        assert!(matches!(client.connect().await, Err(Error::Closed)));
        assert!(matches!(
            client.send_event("x", &[]).await,
            Err(Error::Closed)
        ));
    }

    #[tokio::test]
    async fn close_ends_a_connect_the_hub_never_answers() {
        // A peer that accepts TCP and then stays silent: the TLS handshake would wait for the
        // whole connect timeout.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (accepted, dialled) = oneshot::channel();
        let silent = tokio::spawn(async move {
            let (_socket, _) = listener.accept().await.expect("the client dials");
            let _ = accepted.send(());
            std::future::pending::<()>().await;
        });
        let device = format!("HostName=127.0.0.1;DeviceId=d1;SharedAccessKey={KEY}");
        let client = DeviceClient::builder(&device)
            .port(port)
            .connect_timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let connecting = {
            let client = client.clone();
            tokio::spawn(async move { client.connect().await })
        };
        let bound = Duration::from_secs(5);
        tokio::time::timeout(bound, dialled)
            .await
            .expect("the client dials")
            .expect("the listener reports the connection");
        tokio::time::timeout(bound, client.close())
            .await
            .expect("close returns without waiting for the connect timeout");
        let result = tokio::time::timeout(bound, connecting)
            .await
            .expect("connect ends with close")
            .expect("no panic");
        assert!(matches!(result, Err(Error::Closed)), "{result:?}");
        assert!(*client.inner.shared.done.borrow());
        silent.abort();
    }
}
