//! One device connection from CONNECT to close. The task owns the stream, its buffers, the
//! keepalive and token-expiry deadlines, and the map of method calls awaiting the device's
//! answer. It reads every complete packet already buffered before acting and writes each
//! batch of answers with one flush, flushing early when answers pile up so one device cannot
//! make the hub buffer without bound. Domain work goes to `twinhub_core::Hub`; twin requests
//! are deduplicated there, under the device lock.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use twinhub_core::c2d::Holder;
use twinhub_core::directory::{
    CloseSignal, CommandReceiver, MethodFailure, MethodResponse, SessionCommand, SessionHandle,
    command_queue, subs,
};
use twinhub_core::logsafe::{RateLimit, Shown};
use twinhub_core::methods::MAX_METHOD_PAYLOAD;
use twinhub_core::record::identity_key;
use twinhub_core::redelivery::TwinAnswer;
use twinhub_core::sessions::Credentials;
use twinhub_core::telemetry::Origin;
use twinhub_core::twins::{PatchOutcome, SessionRef, TwinRequest};
use twinhub_core::{Error, keys};
use twinhub_mqtt::{
    ConnAck, Connect, ConnectReturnCode, DEFAULT_MAX_PACKET_SIZE, LastWill, Packet, Publish, QoS,
    SubAck, SubscribeReturnCode, Topic, decode, encode,
};
use twinhub_proto::error::ErrorCode;
use twinhub_proto::topic::{self, Inbound, Subscription};

use super::SessionContext;
use super::c2d::{Acked, Outbox};

/// Telemetry publishes of one read appended together, at most this many or about this many
/// bytes at a time.
const TELEMETRY_BATCH: usize = 256;
const TELEMETRY_BATCH_BYTES: usize = 1 << 20;
/// Commands queued for one session before callers get "throttled".
const COMMAND_QUEUE: usize = 256;
/// A device that does not read its socket for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The last flush and the TLS close, when a session ends, get at most this long.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Answers buffered before they are flushed even though more input is waiting: bounds what
/// one read of pipelined requests (twin GETs answered with whole twins) can make the hub hold.
const OUT_FLUSH_BYTES: usize = 256 * 1024;
/// Twin requests answered before a flush: a cap on requests outstanding per session.
const MAX_OUTSTANDING_TWIN: usize = 64;
/// One read from the stream takes at most this much, through a buffer on the stack: the
/// session's own input buffer holds only what is not yet a whole packet, and nothing at all
/// while the device is idle (an idle connection is the common case, by the thousands).
/// One TLS record's worth, so a read never leaves plaintext behind in rustls for no reason.
const READ_CHUNK: usize = 16 * 1024;
/// IoT Hub's longest keepalive; 0 (no keepalive) is taken as this too, so a half-open
/// connection is always noticed.
const MAX_KEEPALIVE_SECS: u16 = 1177;
/// Stands in for "never" where a deadline must be an Instant (about 30 years).
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 86_400);

/// Refused CONNECTs are logged at most this often (each burst then a count).
static REFUSALS: RateLimit = RateLimit::new(Duration::from_secs(10), 20);

type Reply = oneshot::Sender<Result<MethodResponse, MethodFailure>>;

/// Why a session ended (for the log).
#[derive(Debug)]
enum End {
    /// The client said DISCONNECT: its will is discarded.
    Disconnected,
    /// The client closed the connection without DISCONNECT: nothing to report, but its will
    /// is sent.
    Quiet,
    /// The hub closed it; the reason is worth a log line.
    Because(String),
}

fn because(s: impl Into<String>) -> End {
    End::Because(s.into())
}

/// Logs a refusal of a peer that has not authenticated, rate-limited.
fn log_refusal(peer: &str, what: std::fmt::Arguments<'_>) {
    if let Some(suppressed) = REFUSALS.allow() {
        if suppressed > 0 {
            tracing::info!(%peer, suppressed, "refusing connection: {what}");
        } else {
            tracing::info!(%peer, "refusing connection: {what}");
        }
    }
}

/// The CONNACK code a failed `connect_device` earns: bad credentials are "not authorized";
/// throttling and the hub's own faults are "server unavailable", which devices retry.
fn refusal_code(e: &Error) -> ConnectReturnCode {
    match e.code() {
        ErrorCode::IotHubUnauthorizedAccess | ErrorCode::DeviceNotFound => {
            ConnectReturnCode::NotAuthorized
        }
        _ => ConnectReturnCode::ServerUnavailable,
    }
}

fn twin_answer_packet(rid: &str, answer: &TwinAnswer) -> (String, Bytes) {
    (
        topic::twin_response_topic(answer.status, rid, answer.version),
        answer.body.clone(),
    )
}

/// Runs one device connection over any byte stream until it ends. `admission` is held until
/// the device has authenticated: it counts toward the hub's cap on unauthenticated peers.
/// `certificates` is the client certificate chain the TLS handshake received (DER, leaf
/// first; empty when the client sent none): what an X.509 identity signs in with.
///
/// Not an `async fn`: the stream is split (moved behind the halves' shared pointer) before
/// the future exists, because an async fn keeps room for its arguments for its whole life,
/// and a TLS stream is over a kilobyte that every idle session would carry twice.
pub fn run_session<S>(
    ctx: SessionContext,
    io: S,
    peer: String,
    certificates: Vec<Vec<u8>>,
    admission: Option<OwnedSemaphorePermit>,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    session(ctx, rd, wr, peer, certificates, admission)
}

async fn session<S>(
    ctx: SessionContext,
    mut rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    peer: String,
    certificates: Vec<Vec<u8>>,
    admission: Option<OwnedSemaphorePermit>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Empty until bytes arrive: see `read_some`.
    let mut inbuf = BytesMut::new();

    let first = timeout(ctx.connect_timeout, read_packet(&mut rd, &mut inbuf)).await;
    let connect = match first {
        Err(_) => {
            log_refusal(
                &peer,
                format_args!("no CONNECT within {:?}", ctx.connect_timeout),
            );
            return;
        }
        Ok(Err(why)) => {
            log_refusal(&peer, format_args!("before CONNECT: {why}"));
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(Some(other))) => {
            log_refusal(
                &peer,
                format_args!(
                    "first packet was {} instead of CONNECT",
                    other.packet_type()
                ),
            );
            return;
        }
    };

    let mut out = Out::new(wr, ctx.shutdown.clone());
    let device_id = match check_connect(&connect) {
        Ok(id) => id,
        Err((code, why)) => {
            log_refusal(
                &peer,
                format_args!(
                    "CONNECT from client id {} ({code:?}): {why}",
                    Shown(&connect.client_id)
                ),
            );
            out.refuse(code).await;
            return;
        }
    };

    let (tx, commands) = command_queue(COMMAND_QUEUE);
    let handle = SessionHandle::new(tx);
    out.close = Some(handle.close.clone());
    let password = connect
        .password
        .as_ref()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    // The hub's futures are boxed where the session awaits them: a session's future is as
    // large as the largest state it can be in, and it is kept for the connection's life.
    let start = match Box::pin(ctx.hub.connect_device(
        &device_id,
        Credentials {
            password: password.as_deref(),
            certificates: &certificates,
        },
        connect.clean_session,
        handle.clone(),
    ))
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let code = refusal_code(&e);
            log_refusal(
                &peer,
                format_args!(
                    "CONNECT of device {} ({code:?}): {}",
                    Shown(&device_id),
                    e.message()
                ),
            );
            out.refuse(code).await;
            return;
        }
    };
    drop(admission);
    metrics::counter!("twinhub_mqtt_connections_total").increment(1);
    tracing::debug!(%peer, %device_id, resumed = start.session_present, "device connected");
    // Locals live to the end of the function, and this one lasts as long as the connection:
    // what is needed only to sign in is dropped now. CONNECT's strings and password (and the
    // read buffer its password and will point into) go with it; the will is copied out.
    drop(password);
    drop(certificates);
    let (clean_session, keep_alive, will, model_id) = {
        let c = connect;
        let will = c.will.and_then(|w| {
            Some(LastWill {
                topic: Topic::try_from(w.topic.as_str()).ok()?,
                message: Bytes::copy_from_slice(&w.message),
                qos: w.qos,
                retain: w.retain,
            })
        });
        (
            c.clean_session,
            c.keep_alive,
            will,
            model_id(c.username.as_deref().unwrap_or_default()),
        )
    };

    let mut session = Session {
        ctx: ctx.clone(),
        device_id: device_id.clone(),
        generation_id: start.generation_id,
        model_id,
        telemetry: Vec::new(),
        telemetry_bytes: 0,
        handle: handle.clone(),
        clean: clean_session,
        filters: BTreeSet::new(),
        next_rid: 1,
        pending: HashMap::new(),
        answered: false,
        twin_since_flush: 0,
        c2d: Outbox::new(),
        out,
    };
    session.out.push(&Packet::ConnAck(ConnAck {
        session_present: start.session_present,
        code: ConnectReturnCode::Accepted,
    }));
    for f in start.subscriptions {
        if topic::parse_subscription(&f).is_ok() {
            session.filters.insert(f);
        }
    }
    session.publish_flags();

    // IoT Hub takes keepalive 0, or one above its maximum, as its maximum.
    let keepalive_secs = match keep_alive {
        0 => MAX_KEEPALIVE_SECS,
        k => k.min(MAX_KEEPALIVE_SECS),
    };
    let keepalive = Duration::from_millis(u64::from(keepalive_secs) * 1500);
    let expires_in = Duration::from_secs(start.token_expiry.saturating_sub(keys::now_unix()));
    // `se` is any u64 the key holder signed (within the hub's maximum lifetime): a deadline
    // past the clock's range just never comes during this connection.
    let token_end = Instant::now()
        .checked_add(expires_in)
        .unwrap_or_else(|| Instant::now() + FAR_FUTURE);
    let end = session
        .serve(&mut rd, inbuf, commands, keepalive, token_end)
        .await;
    // What the device did not acknowledge waits in its queue for the next session.
    ctx.hub.c2d_release(&device_id, handle.connection_id);
    match &end {
        End::Disconnected | End::Quiet => {
            tracing::debug!(%peer, %device_id, "device disconnected")
        }
        End::Because(why) => tracing::info!(%peer, %device_id, "closing connection: {why}"),
    }
    session.out.finish().await;
    // IoT Hub sends the will of a device that went away without DISCONNECT as telemetry,
    // when it names the device's own events topic. A session the hub replaced or closed
    // does not (the device did not go away).
    if !matches!(end, End::Disconnected)
        && let Some(will) = &will
        && !session.closed_by_hub()
    {
        Box::pin(session.send_will(will)).await;
    }
    if let Err(e) = Box::pin(ctx.hub.disconnect_device(
        &device_id,
        handle.connection_id,
        clean_session,
    ))
    .await
    {
        tracing::warn!(%device_id, "recording the disconnect failed: {}", e.message());
    }
}

/// Validates CONNECT's protocol, client id and user name; returns the device id. The
/// reason is for the log and quotes the peer's text through [`Shown`].
fn check_connect(c: &Connect) -> Result<String, (ConnectReturnCode, String)> {
    if c.protocol_name != "MQTT" || c.protocol_level != 4 {
        return Err((
            ConnectReturnCode::UnacceptableProtocolVersion,
            format!(
                "protocol {} level {} (only MQTT 3.1.1 is served)",
                Shown(&c.protocol_name),
                c.protocol_level
            ),
        ));
    }
    if c.client_id.is_empty() {
        return Err((
            ConnectReturnCode::IdentifierRejected,
            "empty client id".into(),
        ));
    }
    let Some(username) = c.username.as_deref() else {
        return Err((ConnectReturnCode::NotAuthorized, "no user name".into()));
    };
    // `{hostname}/{clientId}/?api-version=...`: the identity sits between the first '/' and
    // the query.
    let path = username.split_once("/?").map_or(username, |(p, _)| p);
    let identity = path
        .split_once('/')
        .map_or("", |(_, rest)| rest)
        .trim_end_matches('/');
    if identity != c.client_id {
        return Err((
            ConnectReturnCode::IdentifierRejected,
            format!(
                "the client id does not match the user name {}",
                Shown(username)
            ),
        ));
    }
    // `deviceId` or `deviceId/moduleId`: the client id is the identity key.
    let (device, module) = match c.client_id.split_once('/') {
        Some((d, m)) => (d, Some(m)),
        None => (c.client_id.as_str(), None),
    };
    let valid = twinhub_proto::ids::validate_device_id(device).is_ok()
        && module.is_none_or(|m| twinhub_proto::ids::validate_module_id(m).is_ok());
    if !valid {
        return Err((
            ConnectReturnCode::IdentifierRejected,
            format!(
                "the client id {} is not a device or module id",
                Shown(&c.client_id)
            ),
        ));
    }
    Ok(c.client_id.clone())
}

async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Packet>, String> {
    loop {
        match decode(buf, DEFAULT_MAX_PACKET_SIZE) {
            Ok(Some(p)) => return Ok(Some(p)),
            Ok(None) => {}
            Err(e) => return Err(format!("malformed packet: {e}")),
        }
        match read_some(rd, buf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
}

/// Reads what the stream has (up to [`READ_CHUNK`]) and appends it to `buf`; 0 at the end
/// of the stream. The bytes land in a buffer on the stack of the poll first, not in the
/// future, so `buf` is allocated only when data arrives and grows by what arrived: an idle
/// session waits for input without holding an input buffer. Cancel-safe: nothing is kept
/// between polls.
async fn read_some<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut BytesMut) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut chunk = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut *rd).poll_read(cx, &mut chunk))?;
        buf.extend_from_slice(chunk.filled());
        Poll::Ready(Ok(chunk.filled().len()))
    })
    .await
}

/// The write side: packets are encoded into one buffer and flushed together.
struct Out<W> {
    wr: W,
    buf: BytesMut,
    /// The session's close signal, once it has one: a flush blocked on a device that stopped
    /// reading ends as soon as the hub closes the session.
    close: Option<Arc<CloseSignal>>,
    shutdown: CancellationToken,
    /// A write was cut short: the peer is not reading, so closing need not wait for it.
    stalled: bool,
}

impl<W: AsyncWrite + Unpin> Out<W> {
    fn new(wr: W, shutdown: CancellationToken) -> Self {
        Out {
            wr,
            // Allocated by the first packet pushed, given back after each flush.
            buf: BytesMut::new(),
            close: None,
            shutdown,
            stalled: false,
        }
    }

    fn push(&mut self, p: &Packet) {
        if let Err(e) = encode(p, &mut self.buf) {
            tracing::error!("encoding an outgoing {} failed: {e}", p.packet_type());
        }
    }

    fn publish(&mut self, topic: String, payload: Bytes) {
        match Topic::new(topic) {
            Ok(topic) => self.push(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic,
                pkid: 0,
                payload,
            })),
            Err(e) => tracing::error!("an outgoing topic is invalid: {e}"),
        }
    }

    /// A cloud-to-device message at QoS 1 (the only thing the hub publishes at QoS 1).
    fn publish_acked(&mut self, topic: String, payload: Bytes, pkid: u16, dup: bool) {
        match Topic::new(topic) {
            Ok(topic) => self.push(&Packet::Publish(Publish {
                dup,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic,
                pkid,
                payload,
            })),
            Err(e) => tracing::error!("an outgoing topic is invalid: {e}"),
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let close = self.close.clone();
        let closed = async {
            match &close {
                Some(c) => c.closed().await,
                None => std::future::pending().await,
            }
        };
        // Biased: a write that can complete does, so answers already owed go out even when
        // the session is closing; the close only cuts a write the device is not taking.
        let result = tokio::select! {
            biased;
            written = timeout(WRITE_TIMEOUT, self.wr.write_all(&self.buf)) => match written {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(because(format!("write failed: {e}"))),
                Err(_) => Err(because("the device stopped reading")),
            },
            reason = closed => Err(because(format!("closed by the hub while the device was not reading: {reason:?}"))),
            _ = self.shutdown.cancelled() => Err(because("the hub is shutting down")),
        };
        match result {
            Ok(()) => {
                // The stream took a copy (rustls encrypted it): an idle session keeps no
                // output buffer, and one large answer pins nothing afterwards.
                self.buf = BytesMut::new();
                Ok(())
            }
            Err(end) => {
                self.stalled = true;
                Err(end)
            }
        }
    }

    async fn refuse(&mut self, code: ConnectReturnCode) {
        self.push(&Packet::ConnAck(ConnAck {
            session_present: false,
            code,
        }));
        self.finish().await;
    }

    /// Sends what is queued and closes the stream, within [`FINISH_TIMEOUT`]; at once when a
    /// write already stalled (the peer is not reading: the TCP close is all it gets).
    async fn finish(&mut self) {
        if self.stalled {
            return;
        }
        let _ = timeout(FINISH_TIMEOUT, async {
            if !self.buf.is_empty() {
                let _ = self.wr.write_all(&self.buf).await;
            }
            let _ = self.wr.shutdown().await;
        })
        .await;
    }
}

/// The Plug and Play model id a device announces in its user name (`...&model-id=dtmi:...`).
fn model_id(username: &str) -> Option<String> {
    let (_, query) = username.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("model-id="))
        .filter(|v| !v.is_empty() && v.len() <= 512)
        .map(|v| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
}

struct Session<W> {
    ctx: SessionContext,
    device_id: String,
    generation_id: String,
    /// `dt-dataschema` of its telemetry.
    model_id: Option<String>,
    /// Telemetry read but not yet appended: packet id, QoS, the prepared event.
    telemetry: Vec<(u16, QoS, twinhub_eventlog::NewEvent)>,
    telemetry_bytes: usize,
    handle: SessionHandle,
    clean: bool,
    filters: BTreeSet<String>,
    next_rid: u64,
    pending: HashMap<String, Reply>,
    /// A method caller was handed its answer since the last flush.
    answered: bool,
    /// Twin requests answered since the last flush.
    twin_since_flush: usize,
    /// Cloud-to-device messages out to the device.
    c2d: Outbox,
    out: Out<W>,
}

impl<W: AsyncWrite + Unpin> Session<W> {
    /// The hub ended this session (a newer connection, changed credentials, shutdown).
    fn closed_by_hub(&self) -> bool {
        self.handle.close.is_closed()
    }

    /// Appends the device's will as telemetry marked `iothub-MessageType=Will`, if it names
    /// the device's own events topic; other wills are ignored, as IoT Hub ignores them.
    async fn send_will(&self, will: &twinhub_mqtt::LastWill) {
        let Ok(Inbound::Telemetry {
            device_id,
            module_id: None,
            properties,
        }) = topic::parse_publish_topic(will.topic.as_str())
        else {
            return;
        };
        if device_id != self.device_id {
            return;
        }
        if let Err(e) = self
            .ctx
            .hub
            .send_telemetry(
                &self.session_ref(),
                properties,
                will.message.to_vec(),
                Origin {
                    retain: will.retain,
                    will: true,
                    model_id: self.model_id.as_deref(),
                },
            )
            .await
        {
            tracing::info!(device_id = %self.device_id, "the device's will was not kept: {}", e.message());
        }
    }

    fn session_ref(&self) -> SessionRef<'_> {
        SessionRef {
            device_id: &self.device_id,
            handle: &self.handle,
            generation_id: &self.generation_id,
        }
    }

    async fn serve<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        mut inbuf: BytesMut,
        mut commands: CommandReceiver,
        keepalive: Duration,
        token_expiry: Instant,
    ) -> End {
        let close = self.handle.close.clone();
        let shutdown = self.ctx.shutdown.clone();
        let mut last_read = Instant::now();
        // Packets that arrived together with CONNECT.
        if let Err(end) = Box::pin(self.drain_input(&mut inbuf)).await {
            return end;
        }
        // A restored subscription gets what queued while the device was away.
        if let Err(end) = Box::pin(self.fill_c2d()).await {
            return end;
        }
        loop {
            if self.answered {
                // The device answered method calls in what was just read. Their callers'
                // tasks were woken but cannot run while this one does: yield once, so the
                // HTTP responses leave before this session writes the PUBACKs (which nobody
                // waits for), then send the PUBACKs together with any method requests queued
                // meanwhile, in one write.
                self.answered = false;
                tokio::task::yield_now().await;
                self.take_commands(&mut commands);
            }
            if let Err(end) = self.flush().await {
                return end;
            }
            // Every whole packet was handled: give the buffer back (decoded payloads that
            // still share it keep their part alive on their own), so an idle session holds
            // none; `read_some` allocates what the next read brings.
            if inbuf.is_empty() {
                inbuf = BytesMut::new();
            }
            let keepalive_deadline = last_read + keepalive;
            tokio::select! {
                reason = close.closed() => return because(format!("closed by the hub: {reason:?}")),
                _ = shutdown.cancelled() => return because("the hub is shutting down"),
                read = read_some(rd, &mut inbuf) => match read {
                    Ok(0) => return End::Quiet,
                    Ok(_) => {
                        last_read = Instant::now();
                        // Boxed (one allocation per read): handling packets awaits the
                        // hub's twin, method and telemetry futures, which an idle session
                        // should not keep room for.
                        if let Err(end) = Box::pin(self.drain_input(&mut inbuf)).await {
                            return end;
                        }
                        // Requests queued while the input was handled leave in the same
                        // write as its answers and PUBACKs.
                        self.take_commands(&mut commands);
                    }
                    Err(e) => return because(format!("read failed: {e}")),
                },
                Some(cmd) = commands.recv() => {
                    self.command(cmd);
                    // Take whatever else is queued so it leaves in the same write.
                    self.take_commands(&mut commands);
                }
                _ = self.c2d.changed(), if self.c2d.wants_more() => {
                    if let Err(end) = Box::pin(self.fill_c2d()).await {
                        return end;
                    }
                }
                // One timer for both deadlines: every idle session waits on it, and each
                // timer is over a hundred bytes of the session's future.
                _ = sleep_until(keepalive_deadline.min(token_expiry)) => {
                    if token_expiry <= keepalive_deadline {
                        return because("the SAS token expired");
                    }
                    return because("keepalive expired (nothing received for 1.5 times the keepalive)");
                }
            }
        }
    }

    /// Appends the telemetry gathered from this read in one batch and queues its PUBACKs.
    async fn flush_telemetry(&mut self) -> Result<(), End> {
        if self.telemetry.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.telemetry);
        self.telemetry_bytes = 0;
        let mut acks = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for (pkid, qos, event) in batch {
            acks.push((pkid, qos));
            events.push(event);
        }
        if let Err(e) = self.ctx.hub.append_telemetry(&self.device_id, events).await {
            return Err(because(format!(
                "telemetry refused ({}): {}",
                e.code().name(),
                e.message()
            )));
        }
        for (pkid, qos) in acks {
            if qos == QoS::AtLeastOnce {
                self.out.push(&Packet::PubAck(pkid));
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.twin_since_flush = 0;
        self.out.flush().await
    }

    async fn drain_input(&mut self, inbuf: &mut BytesMut) -> Result<(), End> {
        loop {
            // A closed session handles nothing more, even what it already read.
            if let Some(reason) = self.closed_reason() {
                return Err(because(format!("closed by the hub: {reason:?}")));
            }
            if self.out.buf.len() >= OUT_FLUSH_BYTES
                || self.twin_since_flush >= MAX_OUTSTANDING_TWIN
            {
                self.flush().await?;
            }
            match decode(inbuf, DEFAULT_MAX_PACKET_SIZE) {
                Ok(Some(p)) => self.packet(p).await?,
                Ok(None) => return self.flush_telemetry().await,
                Err(e) => {
                    self.flush_telemetry().await?;
                    return Err(because(format!("malformed packet: {e}")));
                }
            }
        }
    }

    /// Takes up to 64 queued commands without waiting.
    fn take_commands(&mut self, commands: &mut CommandReceiver) {
        for _ in 0..64 {
            match commands.try_recv() {
                Ok(cmd) => self.command(cmd),
                Err(_) => break,
            }
        }
    }

    fn closed_reason(&self) -> Option<twinhub_core::directory::CloseReason> {
        self.handle.close.reason()
    }

    fn command(&mut self, cmd: SessionCommand) {
        match cmd {
            SessionCommand::InvokeMethod {
                method_name,
                payload,
                reply,
            } => {
                let rid = self.next_rid.to_string();
                self.next_rid += 1;
                if self.pending.len() >= 256 {
                    // Forget calls whose caller already gave up.
                    self.pending.retain(|_, r| !r.is_closed());
                }
                self.pending.insert(rid.clone(), reply);
                self.out
                    .publish(topic::method_request_topic(&method_name, &rid), payload);
            }
            SessionCommand::DesiredPatch { version, payload } => {
                self.out
                    .publish(topic::desired_patch_topic(version), payload);
            }
        }
    }

    fn publish_flags(&mut self) {
        let mut flags = 0;
        for f in &self.filters {
            flags |= match topic::parse_subscription(f) {
                Ok(Subscription::Methods) => subs::METHODS,
                Ok(Subscription::DesiredPatches) => subs::DESIRED,
                Ok(Subscription::TwinResponses) => subs::TWIN_RESPONSES,
                Ok(Subscription::CloudToDevice { .. }) => subs::C2D,
                _ => 0,
            };
        }
        self.ctx
            .hub
            .directory()
            .set_subscriptions(&self.device_id, &self.handle, flags);
        let hub = &self.ctx.hub;
        let device_id = &self.device_id;
        self.c2d
            .set_subscribed(flags & subs::C2D != 0, || hub.c2d().watch(device_id));
    }

    /// Takes messages from the device's queue and publishes them, while the subscription
    /// stands and fewer than the bound are out.
    async fn fill_c2d(&mut self) -> Result<(), End> {
        while self.c2d.wants_more() {
            let next = self
                .ctx
                .hub
                .c2d_receive(&self.device_id, Holder::Session(self.handle.connection_id))
                .await;
            match next {
                Ok(Some(locked)) => {
                    let topic = topic::c2d_topic(
                        &self.device_id,
                        &locked.message.mqtt_properties(&self.device_id),
                    );
                    let pkid = self.c2d.track(locked.lock_token);
                    self.out.publish_acked(
                        topic,
                        Bytes::from(locked.message.body),
                        pkid,
                        locked.redelivery,
                    );
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(because(format!(
                        "taking a cloud-to-device message failed: {}",
                        e.message()
                    )));
                }
            }
        }
        Ok(())
    }

    /// A PUBACK completes the oldest message out; IoT Hub closes a device that acknowledges
    /// out of order, and so does twinhub.
    async fn c2d_acked(&mut self, pkid: u16) -> Result<(), End> {
        match self.c2d.acked(pkid) {
            Acked::Completed(token) => {
                if let Err(e) = self.ctx.hub.c2d_complete(&self.device_id, &token).await {
                    // Purged or the device deleted meanwhile: nothing left to complete.
                    tracing::debug!(device_id = %self.device_id, "completing a cloud-to-device message: {}", e.message());
                }
                self.fill_c2d().await
            }
            Acked::OutOfOrder { expected } => Err(because(format!(
                "PUBACK {pkid} out of order: PUBACKs must follow the order of the PUBLISHes (MQTT 3.1.1 section 4.6); expected {expected}"
            ))),
            Acked::Unknown => Ok(()),
        }
    }

    async fn packet(&mut self, p: Packet) -> Result<(), End> {
        if !matches!(p, Packet::Publish(_)) {
            self.flush_telemetry().await?;
        }
        match p {
            Packet::Publish(publish) => self.publish(publish).await,
            Packet::Subscribe(sub) => {
                let before = self.filters.clone();
                let mut codes = Vec::with_capacity(sub.filters.len());
                for (filter, qos) in &sub.filters {
                    self.check_filter(filter.as_str())?;
                    self.filters.insert(filter.as_str().to_string());
                    let granted = if *qos == QoS::AtMostOnce {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    };
                    codes.push(SubscribeReturnCode::Success(granted));
                }
                if self.filters != before {
                    self.persist_filters().await?;
                    self.publish_flags();
                }
                self.out.push(&Packet::SubAck(SubAck {
                    pkid: sub.pkid,
                    return_codes: codes,
                }));
                // After the SUBACK, so the device knows the subscription before messages come.
                self.fill_c2d().await
            }
            Packet::Unsubscribe(unsub) => {
                let before = self.filters.clone();
                for filter in &unsub.filters {
                    self.filters.remove(filter.as_str());
                }
                if self.filters != before {
                    self.persist_filters().await?;
                    self.publish_flags();
                }
                self.out.push(&Packet::UnsubAck(unsub.pkid));
                Ok(())
            }
            Packet::PingReq => {
                self.out.push(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect => Err(End::Disconnected),
            Packet::PubAck(pkid) => self.c2d_acked(pkid).await,
            other => Err(because(format!(
                "unexpected {} from a device",
                other.packet_type()
            ))),
        }
    }

    fn check_filter(&self, filter: &str) -> Result<(), End> {
        match topic::parse_subscription(filter) {
            // A module's key holds a '/', so it never equals a device id: modules have no
            // cloud-to-device queue.
            Ok(Subscription::CloudToDevice { device_id }) if device_id != self.device_id => {
                Err(because(format!(
                    "subscribe to another identity's topic {}",
                    Shown(filter)
                )))
            }
            Ok(Subscription::ModuleInputs {
                device_id,
                module_id,
            }) if identity_key(&device_id, Some(&module_id)) != self.device_id => Err(because(
                format!("subscribe to another identity's topic {}", Shown(filter)),
            )),
            Ok(_) => Ok(()),
            Err(_) => Err(because(format!(
                "subscribe to a topic filter the hub does not serve: {}",
                Shown(filter)
            ))),
        }
    }

    async fn persist_filters(&mut self) -> Result<(), End> {
        if self.clean {
            return Ok(());
        }
        let filters: Vec<String> = self.filters.iter().cloned().collect();
        match self
            .ctx
            .hub
            .save_subscriptions(&self.session_ref(), &filters)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(because("the session was replaced or its device changed")),
            Err(e) => Err(because(format!(
                "saving subscriptions failed: {}",
                e.message()
            ))),
        }
    }

    async fn publish(&mut self, p: Publish) -> Result<(), End> {
        if p.qos == QoS::ExactlyOnce {
            self.flush_telemetry().await?;
            return Err(because("QoS 2 publish (IoT Hub serves QoS 0 and 1 only)"));
        }
        let inbound = match topic::parse_publish_topic(p.topic.as_str()) {
            Ok(i) => i,
            Err(_) => {
                self.flush_telemetry().await?;
                return Err(because(format!(
                    "publish to a topic the hub does not serve: {}",
                    Shown(p.topic.as_str())
                )));
            }
        };
        if !matches!(inbound, Inbound::Telemetry { .. }) {
            self.flush_telemetry().await?;
        }
        match inbound {
            Inbound::Telemetry {
                device_id,
                module_id,
                properties,
            } => {
                if identity_key(device_id, module_id) != self.device_id {
                    self.flush_telemetry().await?;
                    return Err(because(format!(
                        "publish to another identity's topic {}",
                        Shown(p.topic.as_str())
                    )));
                }
                // Over the operator's rate the acknowledgement waits (IoT Hub's traffic
                // shaping): the device slows down instead of losing messages.
                if let Err(wait) = self.ctx.hub.throttles().d2c(&self.device_id) {
                    self.flush_telemetry().await?;
                    self.flush().await?;
                    self.pause(wait).await?;
                }
                // A message the hub cannot keep closes the connection unacknowledged (MQTT
                // 3.1.1 has no negative PUBACK); the device sends it again after reconnecting.
                let prepared = self.ctx.hub.prepare_telemetry(
                    &self.session_ref(),
                    properties,
                    p.payload.to_vec(),
                    Origin {
                        retain: p.retain,
                        will: false,
                        model_id: self.model_id.as_deref(),
                    },
                );
                let event = match prepared {
                    Ok(event) => event,
                    Err(e) => {
                        // What came before it is kept and acknowledged.
                        self.flush_telemetry().await?;
                        return Err(because(format!(
                            "telemetry refused ({}): {}",
                            e.code().name(),
                            e.message()
                        )));
                    }
                };
                // Gathered with the rest of this read and appended in one go; the PUBACKs
                // leave once the batch is durable, in order.
                self.telemetry_bytes += event.data.len();
                self.telemetry.push((p.pkid, p.qos, event));
                if self.telemetry.len() >= TELEMETRY_BATCH
                    || self.telemetry_bytes >= TELEMETRY_BATCH_BYTES
                {
                    self.flush_telemetry().await?;
                }
                return Ok(());
            }
            Inbound::MethodResponse { status, rid } => {
                let rid = rid.to_string();
                match self.pending.remove(&rid) {
                    Some(reply) => {
                        self.answered |= reply.send(method_answer(status, &p.payload)).is_ok();
                    }
                    None => {
                        tracing::debug!(device_id = %self.device_id, rid = %Shown(&rid), "late or unknown method response dropped")
                    }
                }
            }
            Inbound::TwinGet { rid } => {
                let rid = rid.to_string();
                let (topic, payload) = match self.ctx.hub.device_get_twin(&self.device_id).await {
                    Ok(doc) => (topic::twin_response_topic(200, &rid, None), doc),
                    Err(e) => twin_answer_packet(&rid, &TwinAnswer::from_error(&e)),
                };
                self.twin_since_flush += 1;
                self.out.publish(topic, payload);
            }
            Inbound::TwinPatchReported { rid } => {
                let rid = rid.to_string();
                let request = TwinRequest {
                    rid: &rid,
                    dup: p.dup,
                    payload: &p.payload,
                };
                let outcome = self
                    .ctx
                    .hub
                    .device_patch_reported(&self.session_ref(), &request)
                    .await;
                self.twin_since_flush += 1;
                match outcome {
                    PatchOutcome::Answer(answer) => {
                        let (topic, payload) = twin_answer_packet(&rid, &answer);
                        self.out.publish(topic, payload);
                    }
                    PatchOutcome::AlreadyAnswered => {}
                    PatchOutcome::SessionEnded => {
                        return Err(because(
                            "the session was replaced, or its device disabled, deleted or re-created",
                        ));
                    }
                }
            }
        }
        if p.qos == QoS::AtLeastOnce {
            self.out.push(&Packet::PubAck(p.pkid));
        }
        Ok(())
    }

    /// Waits `wait`, unless the hub closes the session meanwhile.
    async fn pause(&self, wait: Duration) -> Result<(), End> {
        tokio::select! {
            _ = tokio::time::sleep(wait) => Ok(()),
            reason = self.handle.close.closed() => Err(because(format!("closed by the hub: {reason:?}"))),
            _ = self.ctx.shutdown.cancelled() => Err(because("the hub is shutting down")),
        }
    }
}

/// Validates a device's method answer: at most 128 KiB of JSON (empty means `null`).
fn method_answer(status: i32, payload: &Bytes) -> Result<MethodResponse, MethodFailure> {
    if payload.len() > MAX_METHOD_PAYLOAD {
        return Err(MethodFailure::BadResponse(format!(
            "the response payload is {} bytes, over the limit of {MAX_METHOD_PAYLOAD}",
            payload.len()
        )));
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(MethodResponse {
            status,
            payload: Bytes::from_static(b"null"),
        });
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_err() {
        return Err(MethodFailure::BadResponse(
            "the response payload is not JSON".into(),
        ));
    }
    Ok(MethodResponse {
        status,
        payload: payload.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(client_id: &str, username: Option<&str>, level: u8) -> Connect {
        Connect {
            protocol_name: "MQTT".into(),
            protocol_level: level,
            clean_session: false,
            keep_alive: 60,
            client_id: client_id.into(),
            will: None,
            username: username.map(str::to_string),
            password: Some(Bytes::from_static(b"x")),
        }
    }

    #[test]
    fn connect_checks() {
        let ok = connect(
            "d1",
            Some("hub/d1/?api-version=2019-10-01&DeviceClientType=x"),
            4,
        );
        assert_eq!(check_connect(&ok).unwrap(), "d1");
        let bare = connect("d1", Some("hub/d1"), 4);
        assert_eq!(check_connect(&bare).unwrap(), "d1");
        let level3 = connect("d1", Some("hub/d1/?a=b"), 3);
        assert_eq!(
            check_connect(&level3).unwrap_err().0,
            ConnectReturnCode::UnacceptableProtocolVersion
        );
        let mismatch = connect("d2", Some("hub/d1/?a=b"), 4);
        assert_eq!(
            check_connect(&mismatch).unwrap_err().0,
            ConnectReturnCode::IdentifierRejected
        );
        let anonymous = connect("d1", None, 4);
        assert_eq!(
            check_connect(&anonymous).unwrap_err().0,
            ConnectReturnCode::NotAuthorized
        );
    }

    #[test]
    fn method_answers() {
        assert_eq!(
            method_answer(200, &Bytes::new()).unwrap().payload,
            Bytes::from_static(b"null")
        );
        assert!(method_answer(200, &Bytes::from_static(b"{\"a\":1}")).is_ok());
        assert!(method_answer(200, &Bytes::from_static(b"{nope")).is_err());
        let big = Bytes::from(vec![b' '; MAX_METHOD_PAYLOAD + 1]);
        assert!(method_answer(200, &big).is_err());
    }
}
