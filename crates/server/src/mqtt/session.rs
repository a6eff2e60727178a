//! One device connection from CONNECT to close. The task owns the stream, its buffers, the
//! keepalive and token-expiry deadlines, and the map of method calls awaiting the device's
//! answer. It reads every complete packet already buffered before acting and writes each
//! batch of answers with one flush. Domain work goes to `twinhub_core::Hub`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};
use twinhub_core::directory::{
    MethodFailure, MethodResponse, RecentAnswer, SessionCommand, SessionHandle, subs,
};
use twinhub_core::methods::MAX_METHOD_PAYLOAD;
use twinhub_core::{Error, keys};
use twinhub_mqtt::{
    ConnAck, Connect, ConnectReturnCode, DEFAULT_MAX_PACKET_SIZE, Packet, Publish, QoS, SubAck,
    SubscribeReturnCode, Topic, decode, encode,
};
use twinhub_proto::ErrorBody;
use twinhub_proto::topic::{self, Inbound, Subscription};

use super::SessionContext;

/// Commands queued for one session before callers get "throttled".
const COMMAND_QUEUE: usize = 256;
/// Twin request ids remembered to answer a redelivered request without applying it twice.
const RECENT_TWIN_REQUESTS: usize = 64;
/// A device that does not read its socket for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Stands in for "never" where a deadline must be an Instant (about 30 years).
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 86_400);

type Reply = oneshot::Sender<Result<MethodResponse, MethodFailure>>;

/// Why a session ended (for the log).
#[derive(Debug)]
enum End {
    /// The client closed or said DISCONNECT: nothing to report.
    Quiet,
    /// The hub closed it; the reason is worth a log line.
    Because(String),
}

fn because(s: impl Into<String>) -> End {
    End::Because(s.into())
}

/// The IoT Hub status a device sees in `$iothub/twin/res/{status}` for a failed request.
fn twin_error(e: &Error, rid: &str) -> (String, Bytes) {
    let code = e.code();
    // The detail a REST error carries in its Message, here as the whole payload.
    let body = ErrorBody::json(
        code,
        e.message(),
        &keys::tracking_id(),
        jiff::Timestamp::now(),
    );
    (
        topic::twin_response_topic(code.http_status(), rid, None),
        Bytes::from(body.message),
    )
}

/// Runs one device connection over any byte stream until it ends.
pub async fn run_session<S>(ctx: SessionContext, io: S, peer: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(io);
    let mut inbuf = BytesMut::with_capacity(4096);

    let first = timeout(ctx.connect_timeout, read_packet(&mut rd, &mut inbuf)).await;
    let connect = match first {
        Err(_) => {
            tracing::info!(%peer, "closing: no CONNECT within {:?}", ctx.connect_timeout);
            return;
        }
        Ok(Err(why)) => {
            tracing::info!(%peer, "closing before CONNECT: {why}");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(Packet::Connect(c)))) => c,
        Ok(Ok(Some(other))) => {
            tracing::info!(%peer, "closing: first packet was {} instead of CONNECT", other.packet_type());
            return;
        }
    };

    let mut out = Out {
        wr,
        buf: BytesMut::with_capacity(4096),
    };
    let device_id = match check_connect(&connect) {
        Ok(id) => id,
        Err((code, why)) => {
            tracing::info!(%peer, client_id = %connect.client_id, "refusing CONNECT ({code:?}): {why}");
            out.refuse(code).await;
            return;
        }
    };

    let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let handle = SessionHandle::new(tx);
    let password = connect
        .password
        .as_ref()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let start = match ctx
        .hub
        .connect_device(
            &device_id,
            password.as_deref(),
            connect.clean_session,
            handle.clone(),
        )
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%peer, %device_id, "refusing CONNECT (not authorized): {}", e.message());
            out.refuse(ConnectReturnCode::NotAuthorized).await;
            return;
        }
    };
    metrics::counter!("twinhub_mqtt_connections_total").increment(1);
    tracing::debug!(%peer, %device_id, resumed = start.session_present, "device connected");

    let mut session = Session {
        ctx: ctx.clone(),
        device_id: device_id.clone(),
        handle: handle.clone(),
        clean: connect.clean_session,
        filters: BTreeSet::new(),
        next_rid: 1,
        pending: HashMap::new(),
        recent: ctx.hub.directory().take_recent(&device_id),
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

    let keepalive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let expires_in = Duration::from_secs(start.token_expiry.saturating_sub(keys::now_unix()));
    // `se` is any u64 the key holder signed: a token valid past the clock's range just never
    // expires during this connection.
    let token_end = Instant::now()
        .checked_add(expires_in)
        .unwrap_or_else(|| Instant::now() + FAR_FUTURE);
    let end = session
        .serve(&mut rd, inbuf, commands, keepalive, token_end)
        .await;
    match &end {
        End::Quiet => tracing::debug!(%peer, %device_id, "device disconnected"),
        End::Because(why) => tracing::info!(%peer, %device_id, "closing connection: {why}"),
    }
    // Parked before the socket goes quiet, so a replacing connection finds the answers as
    // early as possible.
    ctx.hub
        .directory()
        .park_recent(&device_id, std::mem::take(&mut session.recent));
    session.out.finish().await;
    if let Err(e) = ctx
        .hub
        .disconnect_device(&device_id, handle.connection_id, connect.clean_session)
        .await
    {
        tracing::warn!(%device_id, "recording the disconnect failed: {}", e.message());
    }
}

/// Validates CONNECT's protocol, client id and user name; returns the device id.
fn check_connect(c: &Connect) -> Result<String, (ConnectReturnCode, String)> {
    if c.protocol_name != "MQTT" || c.protocol_level != 4 {
        return Err((
            ConnectReturnCode::UnacceptableProtocolVersion,
            format!(
                "protocol {} level {} (only MQTT 3.1.1 is served)",
                c.protocol_name, c.protocol_level
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
                "client id '{}' does not match the user name '{username}'",
                c.client_id
            ),
        ));
    }
    if c.client_id.contains('/') {
        return Err((
            ConnectReturnCode::NotAuthorized,
            "module identities are not served yet".into(),
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
        buf.reserve(4096);
        match rd.read_buf(buf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
}

/// The write side: packets are encoded into one buffer and flushed together.
struct Out<W> {
    wr: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> Out<W> {
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

    async fn flush(&mut self) -> Result<(), End> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = self.buf.split().freeze();
        match timeout(WRITE_TIMEOUT, self.wr.write_all(&data)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(because(format!("write failed: {e}"))),
            Err(_) => Err(because("the device stopped reading")),
        }
    }

    async fn refuse(&mut self, code: ConnectReturnCode) {
        self.push(&Packet::ConnAck(ConnAck {
            session_present: false,
            code,
        }));
        self.finish().await;
    }

    /// Sends what is queued and closes the stream, within [`WRITE_TIMEOUT`] in all: a peer
    /// that stopped reading would otherwise hold the TLS close (and the session) forever.
    async fn finish(&mut self) {
        let _ = timeout(WRITE_TIMEOUT, async {
            let _ = self.flush().await;
            let _ = self.wr.shutdown().await;
        })
        .await;
    }
}

struct Session<W> {
    ctx: SessionContext,
    device_id: String,
    handle: SessionHandle,
    clean: bool,
    filters: BTreeSet<String>,
    next_rid: u64,
    pending: HashMap<String, Reply>,
    /// Recently answered twin requests (carried over from the device's previous session).
    recent: VecDeque<RecentAnswer>,
    out: Out<W>,
}

impl<W: AsyncWrite + Unpin> Session<W> {
    async fn serve<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        mut inbuf: BytesMut,
        mut commands: mpsc::Receiver<SessionCommand>,
        keepalive: Option<Duration>,
        token_expiry: Instant,
    ) -> End {
        let close = self.handle.close.clone();
        let shutdown = self.ctx.shutdown.clone();
        let mut last_read = Instant::now();
        // Packets that arrived together with CONNECT.
        if let Err(end) = self.drain_input(&mut inbuf).await {
            return end;
        }
        loop {
            if let Err(end) = self.out.flush().await {
                return end;
            }
            let keepalive_deadline = keepalive.map(|k| last_read + k);
            inbuf.reserve(4096);
            tokio::select! {
                reason = close.closed() => return because(format!("closed by the hub: {reason:?}")),
                _ = shutdown.cancelled() => return because("the hub is shutting down"),
                read = rd.read_buf(&mut inbuf) => match read {
                    Ok(0) => return End::Quiet,
                    Ok(_) => {
                        last_read = Instant::now();
                        if let Err(end) = self.drain_input(&mut inbuf).await {
                            return end;
                        }
                    }
                    Err(e) => return because(format!("read failed: {e}")),
                },
                Some(cmd) = commands.recv() => {
                    self.command(cmd);
                    // Take whatever else is queued so it leaves in the same write.
                    for _ in 0..64 {
                        match commands.try_recv() {
                            Ok(cmd) => self.command(cmd),
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep_until(keepalive_deadline.unwrap_or(token_expiry)), if keepalive_deadline.is_some() => {
                    return because("keepalive expired (nothing received for 1.5 times the keepalive)");
                }
                _ = sleep_until(token_expiry) => return because("the SAS token expired"),
            }
        }
    }

    async fn drain_input(&mut self, inbuf: &mut BytesMut) -> Result<(), End> {
        loop {
            match decode(inbuf, DEFAULT_MAX_PACKET_SIZE) {
                Ok(Some(p)) => self.packet(p).await?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(because(format!("malformed packet: {e}"))),
            }
        }
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

    fn publish_flags(&self) {
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
            .set_subscriptions(&self.handle, flags);
    }

    async fn packet(&mut self, p: Packet) -> Result<(), End> {
        match p {
            Packet::Publish(publish) => self.publish(publish).await,
            Packet::Subscribe(sub) => {
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
                self.persist_filters().await?;
                self.publish_flags();
                self.out.push(&Packet::SubAck(SubAck {
                    pkid: sub.pkid,
                    return_codes: codes,
                }));
                Ok(())
            }
            Packet::Unsubscribe(unsub) => {
                for filter in &unsub.filters {
                    self.filters.remove(filter.as_str());
                }
                self.persist_filters().await?;
                self.publish_flags();
                self.out.push(&Packet::UnsubAck(unsub.pkid));
                Ok(())
            }
            Packet::PingReq => {
                self.out.push(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect => Err(End::Quiet),
            // Devices acknowledge nothing we send at QoS 1 today; a stray PUBACK is harmless.
            Packet::PubAck(_) => Ok(()),
            other => Err(because(format!(
                "unexpected {} from a device",
                other.packet_type()
            ))),
        }
    }

    fn check_filter(&self, filter: &str) -> Result<(), End> {
        match topic::parse_subscription(filter) {
            Ok(Subscription::CloudToDevice { device_id }) if device_id != self.device_id => Err(
                because(format!("subscribe to another device's topic '{filter}'")),
            ),
            Ok(Subscription::ModuleInputs { .. }) => Err(because(format!(
                "subscribe to module topic '{filter}' by a device identity"
            ))),
            Ok(_) => Ok(()),
            Err(_) => Err(because(format!(
                "subscribe to a topic filter the hub does not serve: '{filter}'"
            ))),
        }
    }

    async fn persist_filters(&mut self) -> Result<(), End> {
        if self.clean {
            return Ok(());
        }
        let filters: Vec<String> = self.filters.iter().cloned().collect();
        self.ctx
            .hub
            .save_subscriptions(&self.device_id, &filters)
            .await
            .map_err(|e| because(format!("saving subscriptions failed: {}", e.message())))
    }

    async fn publish(&mut self, p: Publish) -> Result<(), End> {
        if p.qos == QoS::ExactlyOnce {
            return Err(because("QoS 2 publish (IoT Hub serves QoS 0 and 1 only)"));
        }
        let inbound = match topic::parse_publish_topic(p.topic.as_str()) {
            Ok(i) => i,
            Err(_) => {
                return Err(because(format!(
                    "publish to a topic the hub does not serve: '{}'",
                    p.topic.as_str()
                )));
            }
        };
        match inbound {
            Inbound::Telemetry {
                device_id,
                module_id,
                ..
            } => {
                if device_id != self.device_id || module_id.is_some() {
                    return Err(because(format!(
                        "publish to another identity's topic '{}'",
                        p.topic.as_str()
                    )));
                }
                metrics::counter!("twinhub_d2c_messages_total").increment(1);
            }
            Inbound::MethodResponse { status, rid } => {
                let rid = rid.to_string();
                match self.pending.remove(&rid) {
                    Some(reply) => {
                        let _ = reply.send(method_answer(status, &p.payload));
                    }
                    None => {
                        tracing::debug!(device_id = %self.device_id, %rid, "late or unknown method response dropped")
                    }
                }
            }
            Inbound::TwinGet { rid } => {
                let rid = rid.to_string();
                let (topic, payload) = match self.ctx.hub.device_get_twin(&self.device_id).await {
                    Ok(doc) => (topic::twin_response_topic(200, &rid, None), doc),
                    Err(e) => twin_error(&e, &rid),
                };
                self.out.publish(topic, payload);
            }
            Inbound::TwinPatchReported { rid } => {
                let rid = rid.to_string();
                let connection_id = self.handle.connection_id;
                if let Some(seen) = self.recent.iter_mut().find(|a| a.rid == rid) {
                    // A redelivery of a request already applied: never apply it twice. This
                    // connection already has the answer; a new one may have missed it.
                    if seen.connection_id != connection_id {
                        seen.connection_id = connection_id;
                        let (topic, payload) = (seen.topic.clone(), seen.payload.clone());
                        self.out.publish(topic, payload);
                    }
                } else {
                    let (topic, payload) = match self
                        .ctx
                        .hub
                        .device_patch_reported(&self.device_id, &p.payload)
                        .await
                    {
                        Ok(version) => (
                            topic::twin_response_topic(204, &rid, Some(version)),
                            Bytes::new(),
                        ),
                        Err(e) => twin_error(&e, &rid),
                    };
                    if self.recent.len() >= RECENT_TWIN_REQUESTS {
                        self.recent.pop_front();
                    }
                    self.recent.push_back(RecentAnswer {
                        rid,
                        connection_id,
                        topic: topic.clone(),
                        payload: payload.clone(),
                    });
                    self.out.publish(topic, payload);
                }
            }
        }
        if p.qos == QoS::AtLeastOnce {
            self.out.push(&Packet::PubAck(p.pkid));
        }
        Ok(())
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
