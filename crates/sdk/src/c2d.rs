//! Cloud-to-device messages from the back end, over AMQP 1.0 on TLS (port 5671) as IoT Hub's
//! service SDKs send them: SASL ANONYMOUS, a CBS `put-token` with the shared access policy's
//! SAS token (renewed on the same connection before it expires), then a sender link to
//! `/messages/devicebound` whose transfers name the device in `to`, and a receiver link from
//! `/messages/serviceBound/feedback` for delivery feedback. [`ServiceClient`] keeps one
//! connection and sender link for all its sends, opened at the first and reopened after a
//! failure; each feedback receiver has a connection of its own.
//!
//! [`ServiceClient`]: crate::ServiceClient

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::{LinkStateError, Receiver, RecvError, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{
    AmqpError, Error as AmqpErrorBody, ErrorCondition, LinkError, SenderSettleMode,
};
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageId, Modified, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};
use twinhub_proto::encoding::quote;
use twinhub_proto::error::ErrorCode;

pub use twinhub_proto::c2d::{Ack, FeedbackRecord, FeedbackStatus};

use crate::error::{Error, Result};

/// How long connecting (TCP, TLS, AMQP open, CBS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Feedback batches a receiver holds unsettled at most; the hub locks each for a minute, so a
/// small window keeps batches the caller has not looked at free for other receivers.
const FEEDBACK_PREFETCH: u32 = 4;
/// The node sends go to, as the Node SDK spells it.
const DEVICEBOUND: &str = "/messages/devicebound";
/// The node feedback comes from, as the Node SDK spells it (the hub ignores the case).
const FEEDBACK: &str = "/messages/serviceBound/feedback";

/// When a message stops being deliverable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    At(SystemTime),
    After(Duration),
}

/// A cloud-to-device message for [`ServiceClient::send_c2d`](crate::ServiceClient::send_c2d).
///
/// ```
/// use std::time::Duration;
/// use twinhub_sdk::{Ack, C2dMessage};
///
/// let message = C2dMessage::new(r#"{"command":"reboot"}"#)
///     .content_type("application/json")
///     .content_encoding("utf-8")
///     .ack(Ack::Full)
///     .ttl(Duration::from_secs(600))
///     .property("priority", "high");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct C2dMessage {
    body: Vec<u8>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    content_type: Option<String>,
    content_encoding: Option<String>,
    ack: Ack,
    expiry: Option<Expiry>,
    properties: Vec<(String, String)>,
}

impl C2dMessage {
    /// A message with this body and nothing else set: the hub's default time to live, no
    /// feedback, and a random message id given at send time.
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        C2dMessage {
            body: body.into(),
            message_id: None,
            correlation_id: None,
            content_type: None,
            content_encoding: None,
            ack: Ack::None,
            expiry: None,
            properties: Vec::new(),
        }
    }

    /// The message id, reported back as `originalMessageId` in feedback (default: a random
    /// UUID, as the Python SDK does).
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    pub fn content_encoding(mut self, encoding: impl Into<String>) -> Self {
        self.content_encoding = Some(encoding.into());
        self
    }

    /// Which outcomes produce delivery feedback (`iothub-ack`; default none).
    pub fn ack(mut self, ack: Ack) -> Self {
        self.ack = ack;
        self
    }

    /// The message is not delivered at or after this time (absolute-expiry-time). The hub
    /// cuts expiries beyond its maximum time to live (two days) and refuses past ones.
    pub fn expiry(mut self, at: SystemTime) -> Self {
        self.expiry = Some(Expiry::At(at));
        self
    }

    /// The message is not delivered once this long has passed since it was sent; sets the
    /// absolute expiry time from the local clock at send time.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.expiry = Some(Expiry::After(ttl));
        self
    }

    /// An application property, delivered to the device with the message.
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }

    /// The AMQP message for `device_id`, under `message_id`.
    fn to_amqp(&self, device_id: &str, message_id: &str) -> Message<Data> {
        let expiry_ms = self.expiry.map(|e| {
            let at = match e {
                Expiry::At(at) => at,
                Expiry::After(ttl) => SystemTime::now() + ttl,
            };
            let ms = at
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            // 0 means "no expiry" on the wire; a time at or before the epoch is simply past.
            ms.max(1)
        });
        let properties = Properties {
            message_id: Some(MessageId::String(message_id.to_owned())),
            to: Some(format!(
                "/devices/{}/messages/devicebound",
                quote(device_id)
            )),
            correlation_id: self.correlation_id.clone().map(MessageId::String),
            content_type: self.content_type.clone().map(Symbol::from),
            content_encoding: self.content_encoding.clone().map(Symbol::from),
            absolute_expiry_time: expiry_ms.map(Timestamp::from_milliseconds),
            ..Properties::default()
        };
        let mut app = ApplicationProperties::builder();
        if self.ack != Ack::None {
            app = app.insert("iothub-ack", SimpleValue::String(self.ack.as_str().into()));
        }
        for (k, v) in &self.properties {
            app = app.insert(k.clone(), SimpleValue::String(v.clone()));
        }
        Message::builder()
            .properties(properties)
            .application_properties(app.build())
            .data(Binary::from(self.body.clone()))
            .build()
    }
}

/// A random version-4 UUID as text, for message ids.
fn random_uuid() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        let (x, y) = (
            crate::device::backoff::random_u64(),
            crate::device::backoff::random_u64(),
        );
        b[..8].copy_from_slice(&x.to_be_bytes());
        b[8..].copy_from_slice(&y.to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Where and as whom to sign in: taken from the service client.
#[derive(Clone)]
pub(crate) struct AmqpTarget {
    /// The host to dial and verify (the connection string's HostName without a port).
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The HostName as written, the SAS token's `sr` (as the official SDKs sign it).
    pub(crate) sr: String,
    pub(crate) policy: String,
    pub(crate) key: String,
    pub(crate) extra_ca: Vec<Vec<u8>>,
    pub(crate) token_ttl: Duration,
}

impl std::fmt::Debug for AmqpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// A signed-in connection: one session, the `$cbs` link pair kept for renewals.
struct Signed {
    connection: ConnectionHandle<()>,
    session: SessionHandle<()>,
    cbs: (Sender, Receiver),
    next_request: u64,
    renew_at: Instant,
}

impl AmqpTarget {
    fn token(&self) -> Result<(String, Duration)> {
        let ttl = self.token_ttl.max(Duration::from_secs(60));
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(ttl)
            .as_secs();
        let token =
            twinhub_proto::sas::generate_sas_token(&self.sr, &self.key, Some(&self.policy), expiry)
                .map_err(|e| Error::ConnectionString(format!("cannot sign with the key: {e}")))?;
        Ok((token, ttl))
    }

    async fn open(&self) -> Result<Signed> {
        let work = async {
            let tls = crate::device::settings::tls_config(&self.extra_ca)?;
            let (connection, mut session) =
                crate::amqp::connect(&self.host, self.port, tls, SaslProfile::Anonymous).await?;
            let suffix = crate::device::backoff::random_u64();
            let cbs_tx = Sender::attach(&mut session, format!("cbs-tx-{suffix:016x}"), "$cbs")
                .await
                .map_err(|e| Error::Protocol(format!("attaching to $cbs: {e}")))?;
            let cbs_rx = Receiver::attach(&mut session, format!("cbs-rx-{suffix:016x}"), "$cbs")
                .await
                .map_err(|e| Error::Protocol(format!("attaching to $cbs: {e}")))?;
            let mut signed = Signed {
                connection,
                session,
                cbs: (cbs_tx, cbs_rx),
                next_request: 0,
                renew_at: Instant::now(),
            };
            signed.put_token(self).await?;
            Ok(signed)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, work)
            .await
            .map_err(|_| Error::TimedOut)?
    }
}

impl Signed {
    /// Presents a fresh token on `$cbs` and waits for the hub's 200.
    async fn put_token(&mut self, target: &AmqpTarget) -> Result<()> {
        let (token, ttl) = target.token()?;
        self.next_request += 1;
        let id = self.next_request;
        let app = ApplicationProperties::builder()
            .insert("operation", SimpleValue::String("put-token".into()))
            .insert(
                "type",
                SimpleValue::String("servicebus.windows.net:sastoken".into()),
            )
            .insert("name", SimpleValue::String(target.sr.clone()))
            .build();
        let request = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::Ulong(id)),
                reply_to: Some("cbs".into()),
                to: Some("$cbs".into()),
                ..Properties::default()
            })
            .application_properties(app)
            .value(Value::String(token))
            .build();
        let (tx, rx) = &mut self.cbs;
        tx.send(request)
            .await
            .map_err(|e| Error::Unreachable(format!("the CBS request failed: {e}")))?;
        let reply = tokio::time::timeout(CONNECT_TIMEOUT, rx.recv::<Body<Value>>())
            .await
            .map_err(|_| Error::TimedOut)?
            .map_err(|e| Error::Unreachable(format!("no CBS answer: {e}")))?;
        let _ = rx.accept(&reply).await;
        let message = reply.into_message();
        let app = message.application_properties.as_ref();
        let status = app
            .and_then(|a| a.0.get("status-code"))
            .and_then(|v| match v {
                SimpleValue::Int(s) => Some(*s),
                _ => None,
            })
            .unwrap_or(0);
        if status != 200 {
            let description = app
                .and_then(|a| a.0.get("status-description"))
                .and_then(|v| match v {
                    SimpleValue::String(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            return Err(Error::NotAuthorized(format!(
                "the hub refused the token ({status}): {description}"
            )));
        }
        // Renew when four fifths of the token's life are gone.
        self.renew_at = Instant::now() + ttl.mul_f64(0.8);
        Ok(())
    }

    async fn renew_if_due(&mut self, target: &AmqpTarget) -> Result<()> {
        if Instant::now() >= self.renew_at {
            self.put_token(target).await?;
        }
        Ok(())
    }

    async fn close(mut self) {
        let _ = self.cbs.0.close().await;
        let _ = self.cbs.1.close().await;
        let _ = self.session.end().await;
        let _ = self.connection.close().await;
    }
}

/// The service client's devicebound link, opened at the first send.
struct OpenSender {
    signed: Signed,
    sender: Sender,
    generation: u64,
}

/// Sends cloud-to-device messages for a [`ServiceClient`](crate::ServiceClient): one AMQP
/// connection and sender link shared by every clone of the client.
pub(crate) struct C2dSender {
    target: AmqpTarget,
    timeout: Duration,
    state: tokio::sync::Mutex<Option<OpenSender>>,
    generations: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for C2dSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("C2dSender")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl C2dSender {
    pub(crate) fn new(target: AmqpTarget, timeout: Duration) -> Arc<C2dSender> {
        Arc::new(C2dSender {
            target,
            timeout,
            state: tokio::sync::Mutex::new(None),
            generations: std::sync::atomic::AtomicU64::new(0),
        })
    }

    async fn open(&self) -> Result<OpenSender> {
        let mut signed = self.target.open().await?;
        let suffix = crate::device::backoff::random_u64();
        let sender = Sender::builder()
            .name(format!("c2d-{suffix:016x}"))
            .target(DEVICEBOUND)
            .sender_settle_mode(SenderSettleMode::Unsettled)
            .attach(&mut signed.session)
            .await;
        let sender = match sender {
            Ok(s) => s,
            Err(e) => {
                signed.close().await;
                return Err(attach_error(
                    DEVICEBOUND,
                    e.to_string(),
                    remote_of_sender(&e),
                ));
            }
        };
        Ok(OpenSender {
            signed,
            sender,
            generation: self
                .generations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Forgets the link of `generation` after it failed, so the next send opens a new one.
    async fn discard(&self, generation: u64) {
        let mut state = self.state.lock().await;
        if state.as_ref().is_some_and(|s| s.generation == generation)
            && let Some(old) = state.take()
        {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), old.signed.close()).await;
            });
        }
    }

    pub(crate) async fn send(&self, device_id: &str, message: &C2dMessage) -> Result<String> {
        let id = message.message_id.clone().unwrap_or_else(random_uuid);
        // The link this send went out on, to retire it if the send times out.
        let used = std::sync::atomic::AtomicU64::new(u64::MAX);
        let work = async {
            // The transfer is written under the lock, its outcome awaited outside it, so many
            // sends are in flight on the one link.
            let (pending, generation) = {
                let mut state = self.state.lock().await;
                let mut retried = false;
                loop {
                    let open = match state.as_mut() {
                        Some(open) => open,
                        None => state.insert(self.open().await?),
                    };
                    let generation = open.generation;
                    let attempt = match open.signed.renew_if_due(&self.target).await {
                        Ok(()) => open
                            .sender
                            .send_batchable(message.to_amqp(device_id, &id))
                            .await
                            .map_err(send_error),
                        Err(e) => Err(e),
                    };
                    match attempt {
                        Ok(pending) => {
                            used.store(generation, std::sync::atomic::Ordering::Relaxed);
                            break (pending, generation);
                        }
                        // A link that died while idle (a hub restart, a dropped
                        // connection): nothing went out, so one fresh connection may try.
                        Err(e) => {
                            if let Some(old) = state.take() {
                                tokio::spawn(async move {
                                    let _ = tokio::time::timeout(
                                        Duration::from_secs(5),
                                        old.signed.close(),
                                    )
                                    .await;
                                });
                            }
                            if retried || !matches!(e, Error::Unreachable(_)) {
                                return Err(e);
                            }
                            retried = true;
                        }
                    }
                }
            };
            match pending.await {
                Ok(outcome) => outcome_result(outcome),
                Err(e) => {
                    self.discard(generation).await;
                    Err(Error::Unreachable(format!(
                        "the connection ended before the hub answered; the message may or may not be queued: {e}"
                    )))
                }
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(())) => Ok(id),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // A link that does not answer is not reused.
                let generation = used.load(std::sync::atomic::Ordering::Relaxed);
                if generation != u64::MAX {
                    self.discard(generation).await;
                }
                Err(Error::TimedOut)
            }
        }
    }

    pub(crate) async fn feedback(&self) -> Result<FeedbackReceiver> {
        FeedbackReceiver::open(self.target.clone()).await
    }
}

/// What a disposition of the hub means for a send.
fn outcome_result(outcome: Outcome) -> Result<()> {
    match outcome {
        Outcome::Accepted(_) => Ok(()),
        Outcome::Rejected(r) => Err(hub_error(r.error.as_ref())),
        Outcome::Released(_) | Outcome::Modified(Modified { .. }) => Err(Error::Hub {
            status: 503,
            code: Some(ErrorCode::ServiceUnavailable),
            message: "the hub gave the message back without queueing it".into(),
        }),
        #[allow(unreachable_patterns)]
        _ => Err(Error::Protocol("an unknown outcome".into())),
    }
}

/// An AMQP error from the hub as [`Error::Hub`]. twinhub's descriptions start with the IoT Hub
/// error code (`DeviceNotFound (404001): ...`); otherwise the condition decides, as the
/// official SDKs map it.
pub(crate) fn hub_error(err: Option<&AmqpErrorBody>) -> Error {
    let description = err.and_then(|e| e.description.clone()).unwrap_or_default();
    if let Some((code, message)) = parse_description(&description) {
        return Error::Hub {
            status: code.http_status(),
            code: Some(code),
            message,
        };
    }
    let code = err.and_then(|e| match &e.condition {
        ErrorCondition::AmqpError(AmqpError::NotFound) => Some(ErrorCode::DeviceNotFound),
        ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded) => {
            Some(ErrorCode::DeviceMaximumQueueDepthExceeded)
        }
        ErrorCondition::LinkError(LinkError::MessageSizeExceeded) => {
            Some(ErrorCode::MessageTooLarge)
        }
        ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess) => {
            Some(ErrorCode::IotHubUnauthorizedAccess)
        }
        ErrorCondition::AmqpError(AmqpError::InvalidField | AmqpError::DecodeError) => {
            Some(ErrorCode::ArgumentInvalid)
        }
        ErrorCondition::Custom(s) => match s.0.as_str() {
            "com.microsoft:argument-error" | "com.microsoft:argument-out-of-range" => {
                Some(ErrorCode::ArgumentInvalid)
            }
            "com.microsoft:device-container-throttled" => Some(ErrorCode::ThrottlingException),
            "com.microsoft:quota-exceeded" => Some(ErrorCode::IotHubQuotaExceeded),
            "com.microsoft:precondition-failed" => Some(ErrorCode::PreconditionFailed),
            "com.microsoft:timeout" => Some(ErrorCode::ServiceUnavailable),
            _ => None,
        },
        _ => None,
    });
    let condition = err.map_or_else(String::new, |e| condition_text(&e.condition));
    Error::Hub {
        status: code.map_or(500, ErrorCode::http_status),
        code,
        message: if description.is_empty() {
            format!("refused with {condition}")
        } else {
            description
        },
    }
}

fn condition_text(c: &ErrorCondition) -> String {
    match c {
        ErrorCondition::Custom(s) => s.0.clone(),
        other => format!("{other:?}"),
    }
}

/// Reads `Name (123456): text`.
fn parse_description(description: &str) -> Option<(ErrorCode, String)> {
    let (head, text) = description.split_once("): ")?;
    let (name, number) = head.rsplit_once(" (")?;
    let code = ErrorCode::from_code(number.trim().parse().ok()?)?;
    (code.name() == name.trim()).then(|| (code, text.to_owned()))
}

fn remote_of_sender(e: &fe2o3_amqp::link::SenderAttachError) -> Option<&AmqpErrorBody> {
    match e {
        fe2o3_amqp::link::SenderAttachError::RemoteClosedWithError(err) => Some(err),
        _ => None,
    }
}

fn remote_of_receiver(e: &fe2o3_amqp::link::ReceiverAttachError) -> Option<&AmqpErrorBody> {
    match e {
        fe2o3_amqp::link::ReceiverAttachError::RemoteClosedWithError(err) => Some(err),
        _ => None,
    }
}

/// A refused attach: the hub's reason when it gave one.
fn attach_error(address: &str, text: String, remote: Option<&AmqpErrorBody>) -> Error {
    match remote {
        Some(err) => link_refused(err),
        None => Error::Protocol(format!("attaching to {address}: {text}")),
    }
}

/// The hub detached a link with `err` (IoT Hub answers an attach it refuses with an attach
/// and an immediate detach, so this shows at the first use of the link).
fn link_refused(err: &AmqpErrorBody) -> Error {
    if err.condition == ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess) {
        Error::NotAuthorized(err.description.clone().unwrap_or_default())
    } else {
        hub_error(Some(err))
    }
}

/// A send that could not go out: refused by the hub, or the connection is gone.
fn send_error(e: fe2o3_amqp::link::SendError) -> Error {
    match &e {
        fe2o3_amqp::link::SendError::LinkStateError(
            LinkStateError::RemoteClosedWithError(err)
            | LinkStateError::RemoteDetachedWithError(err),
        ) => link_refused(err),
        _ => Error::Unreachable(format!("sending: {e}")),
    }
}

/// One feedback message: up to 64 records under one lock. Settle it with
/// [`FeedbackReceiver::complete`], [`abandon`](FeedbackReceiver::abandon) or
/// [`reject`](FeedbackReceiver::reject) within a minute, or the hub hands it out again.
#[derive(Debug, Clone)]
pub struct FeedbackBatch {
    /// The hub's lock token for the batch (the AMQP message id).
    pub lock_token: String,
    /// When the hub sent the batch, in milliseconds since the epoch.
    pub enqueued_time: Option<i64>,
    /// Times the batch was abandoned before.
    pub delivery_count: u32,
    /// What happened to each message, oldest first.
    pub records: Vec<FeedbackRecord>,
    info: DeliveryInfo,
}

/// Delivery feedback as the hub batches it (`/messages/serviceBound/feedback`), from
/// [`ServiceClient::feedback`](crate::ServiceClient::feedback). Receivers compete: each batch
/// goes to one of them. A batch left unsettled when the receiver is dropped or closed comes
/// back.
///
/// ```no_run
/// # async fn demo(service: twinhub_sdk::ServiceClient) -> Result<(), twinhub_sdk::Error> {
/// let mut feedback = service.feedback().await?;
/// while let Some(batch) = feedback.next().await? {
///     for record in &batch.records {
///         println!("{} on {}: {:?}", record.original_message_id, record.device_id, record.status_code);
///     }
///     feedback.complete(&batch).await?;
/// }
/// # Ok(()) }
/// ```
pub struct FeedbackReceiver {
    target: AmqpTarget,
    signed: Option<Signed>,
    receiver: Option<Receiver>,
}

impl std::fmt::Debug for FeedbackReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedbackReceiver")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl FeedbackReceiver {
    async fn open(target: AmqpTarget) -> Result<FeedbackReceiver> {
        let mut signed = target.open().await?;
        let suffix = crate::device::backoff::random_u64();
        let attached = Receiver::builder()
            .name(format!("feedback-{suffix:016x}"))
            .source(FEEDBACK)
            .target(format!("feedback-rx-{suffix:016x}"))
            .sender_settle_mode(SenderSettleMode::Unsettled)
            .credit_mode(CreditMode::Auto(FEEDBACK_PREFETCH))
            .attach(&mut signed.session)
            .await;
        match attached {
            Ok(receiver) => Ok(FeedbackReceiver {
                target,
                signed: Some(signed),
                receiver: Some(receiver),
            }),
            Err(e) => {
                signed.close().await;
                Err(attach_error(
                    FEEDBACK,
                    e.to_string(),
                    remote_of_receiver(&e),
                ))
            }
        }
    }

    /// The next feedback batch; `Ok(None)` once the hub closed the link. Keeps the
    /// connection's token fresh while it waits.
    pub async fn next(&mut self) -> Result<Option<FeedbackBatch>> {
        let (Some(signed), Some(receiver)) = (self.signed.as_mut(), self.receiver.as_mut()) else {
            return Err(Error::Closed);
        };
        loop {
            let renew_at = tokio::time::Instant::from_std(signed.renew_at);
            let delivery = tokio::select! {
                d = receiver.recv::<Body<Value>>() => d,
                _ = tokio::time::sleep_until(renew_at) => {
                    signed.put_token(&self.target).await?;
                    continue;
                }
            };
            return match delivery {
                Ok(delivery) => {
                    let info = DeliveryInfo::from(&delivery);
                    match read_batch(delivery.into_message(), info.clone()) {
                        Ok(batch) => Ok(Some(batch)),
                        Err(e) => {
                            // Not ours to judge further: hand it back for another reader.
                            let _ = receiver.release(info).await;
                            Err(e)
                        }
                    }
                }
                Err(RecvError::LinkStateError(
                    LinkStateError::RemoteClosed | LinkStateError::RemoteDetached,
                )) => Ok(None),
                Err(RecvError::LinkStateError(
                    LinkStateError::RemoteClosedWithError(err)
                    | LinkStateError::RemoteDetachedWithError(err),
                )) => Err(link_refused(&err)),
                Err(e) => Err(Error::Unreachable(format!("the feedback link ended: {e}"))),
            };
        }
    }

    fn receiver(&self) -> Result<&Receiver> {
        self.receiver.as_ref().ok_or(Error::Closed)
    }

    /// The records were handled: the hub deletes them.
    pub async fn complete(&self, batch: &FeedbackBatch) -> Result<()> {
        self.receiver()?
            .accept(batch.info.clone())
            .await
            .map_err(|e| Error::Unreachable(format!("settling feedback: {e}")))
    }

    /// Give the batch back: the hub sends its records again (to any feedback receiver),
    /// counting one delivery; records abandoned ten times are dropped.
    pub async fn abandon(&self, batch: &FeedbackBatch) -> Result<()> {
        self.receiver()?
            .release(batch.info.clone())
            .await
            .map_err(|e| Error::Unreachable(format!("settling feedback: {e}")))
    }

    /// Refuse the batch: the hub drops its records.
    pub async fn reject(&self, batch: &FeedbackBatch) -> Result<()> {
        self.receiver()?
            .reject(batch.info.clone(), None)
            .await
            .map_err(|e| Error::Unreachable(format!("settling feedback: {e}")))
    }

    /// Detaches and closes the connection; unsettled batches go back to the hub.
    pub async fn close(mut self) {
        if let Some(r) = self.receiver.take() {
            let _ = r.close().await;
        }
        if let Some(s) = self.signed.take() {
            s.close().await;
        }
    }
}

/// Reads a feedback message: lock token, enqueued time, delivery count, the JSON records.
fn read_batch(message: Message<Body<Value>>, info: DeliveryInfo) -> Result<FeedbackBatch> {
    let lock_token = match message
        .properties
        .as_ref()
        .and_then(|p| p.message_id.as_ref())
    {
        Some(MessageId::String(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => {
            return Err(Error::Protocol(
                "a feedback message without a message id (its lock token)".into(),
            ));
        }
    };
    let enqueued_time = message.message_annotations.as_ref().and_then(|a| {
        a.0.iter().find_map(|(k, v)| match (k, v) {
            (OwnedKey::Symbol(s), Value::Timestamp(t)) if s.0 == "iothub-enqueuedtime" => {
                Some(t.milliseconds())
            }
            _ => None,
        })
    });
    let delivery_count = message.header.as_ref().map_or(0, |h| h.delivery_count);
    let body: Vec<u8> = match message.body {
        Body::Data(sections) => sections.into_iter().flat_map(|d| d.0.into_vec()).collect(),
        Body::Value(v) => match v.0 {
            Value::Binary(b) => b.into_vec(),
            Value::String(s) => s.into_bytes(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    let records = serde_json::from_slice(&body).map_err(|e| {
        Error::Protocol(format!(
            "the feedback body is not a JSON array of records: {e}"
        ))
    })?;
    Ok(FeedbackBatch {
        lock_token,
        enqueued_time,
        delivery_count,
        records,
        info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_what_the_official_sdks_send() {
        let m = C2dMessage::new("hi")
            .correlation_id("c1")
            .content_type("text/plain")
            .content_encoding("utf-8")
            .ack(Ack::Full)
            .expiry(UNIX_EPOCH + Duration::from_secs(2_000_000_000))
            .property("k", "v");
        let amqp = m.to_amqp("dev ice/1", "m-1");
        let p = amqp.properties.unwrap();
        assert_eq!(p.message_id, Some(MessageId::String("m-1".into())));
        assert_eq!(
            p.to.as_deref(),
            Some("/devices/dev%20ice%2F1/messages/devicebound")
        );
        assert_eq!(p.correlation_id, Some(MessageId::String("c1".into())));
        assert_eq!(p.content_type, Some(Symbol::from("text/plain")));
        assert_eq!(
            p.absolute_expiry_time.map(|t| t.milliseconds()),
            Some(2_000_000_000_000)
        );
        let app = amqp.application_properties.unwrap();
        assert_eq!(
            app.0.get("iothub-ack"),
            Some(&SimpleValue::String("full".into()))
        );
        assert_eq!(app.0.get("k"), Some(&SimpleValue::String("v".into())));
        // No ack asked: no iothub-ack at all.
        let plain = C2dMessage::new("x").to_amqp("d", "m");
        assert!(
            plain
                .application_properties
                .is_none_or(|a| !a.0.contains_key("iothub-ack"))
        );
    }

    #[test]
    fn message_ids_are_random_uuids() {
        let a = random_uuid();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, random_uuid());
    }

    #[test]
    fn refusals_keep_the_iot_hub_code() {
        let err = AmqpErrorBody::new(
            AmqpError::NotFound,
            Some("DeviceNotFound (404001): Device d9 not registered".into()),
            None,
        );
        match hub_error(Some(&err)) {
            Error::Hub {
                status,
                code,
                message,
            } => {
                assert_eq!(status, 404);
                assert_eq!(code, Some(ErrorCode::DeviceNotFound));
                assert_eq!(message, "Device d9 not registered");
            }
            other => panic!("{other:?}"),
        }
        // Without a code in the text, the condition decides (as against Azure IoT Hub).
        let err = AmqpErrorBody::new(
            AmqpError::ResourceLimitExceeded,
            Some("queue full".into()),
            None,
        );
        assert_eq!(
            hub_error(Some(&err)).code(),
            Some(ErrorCode::DeviceMaximumQueueDepthExceeded)
        );
        let err = AmqpErrorBody::new(
            ErrorCondition::Custom(Symbol::from("com.microsoft:argument-error")),
            None,
            None,
        );
        assert_eq!(hub_error(Some(&err)).status(), Some(400));
        assert_eq!(parse_description("Nonsense (404001): x"), None);
        assert_eq!(parse_description("DeviceNotFound: x"), None);
    }
}
