//! The connection task: the one owner of the device's connection and of every piece of state
//! that outlives a single connection (QoS 1 messages awaiting PUBACK, twin requests awaiting
//! their answer, subscriptions, the last desired version delivered).
//!
//! Like the hub's session task it reads everything buffered before acting and writes each
//! batch of packets with one write; the write runs concurrently with reading so a slow hub
//! never holds up acknowledgements. Between connections it keeps accepting work, reconnects
//! with backoff, and renews the SAS token by reconnecting before it expires, draining direct
//! methods first so no call is lost. `conn` holds one connection's I/O, `outbox` what must be
//! acknowledged, `inbound` what the hub sends, `desired` the desired-property stream.
//! [`DeviceClient`](super::DeviceClient) talks to the task through [`Command`]s and [`Shared`].

mod conn;
mod desired;
mod inbound;
mod outbox;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use twinhub_mqtt::Packet;
use twinhub_proto::topic as iot;

use super::backoff::{Backoff, random_u64};
use super::link::{self, Link};
use super::messages::{
    C2dDelivery, ConnectionState, DesiredPatch, MethodRequest, MethodResponse, json_bytes,
};
use super::settings::Settings;
use crate::error::{Error, Result};
use conn::{Conn, Drain};
use desired::DesiredSync;
use outbox::{Feature, Outbox, PkidUse, Sub, TwinWait};

/// Commands taken in one go, so they leave in one write.
const COMMAND_BATCH: usize = 64;
/// A connection that lasted this long resets the backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// How long `close` and a token renewal wait to flush DISCONNECT.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);
/// Quiet time after the methods UNSUBACK before a renewal disconnects: a call the hub routed
/// to this connection just before the UNSUBSCRIBE arrives within it.
const DRAIN_QUIET: Duration = Duration::from_millis(50);
/// The longest a renewal waits for running method handlers.
const MAX_DRAIN: Duration = Duration::from_secs(60);

/// The application's method handler, boxed.
pub(crate) type Handler =
    Arc<dyn Fn(MethodRequest) -> BoxFuture<'static, MethodResponse> + Send + Sync>;

/// What the client asks of the task.
pub(crate) enum Command {
    /// A QoS 1 publish (telemetry or a method answer), answered on PUBACK.
    Publish(Outbound),
    /// A twin request, answered with the hub's `$iothub/twin/res/..` reply.
    Twin {
        request: TwinRequest,
        reply: oneshot::Sender<Result<TwinReply>>,
    },
    /// The application took a cloud-to-device message: acknowledge it, if the connection it
    /// came on is still this one.
    C2dTaken { connection: u64, pkid: u16 },
}

/// A QoS 1 message to send.
pub(crate) struct Outbound {
    pub topic: String,
    pub payload: Bytes,
    pub done: Option<oneshot::Sender<Result<()>>>,
    /// Set for method answers: the `$rid` they answer.
    pub method_rid: Option<String>,
}

impl Command {
    /// The answer to method call `rid`.
    pub fn method_response(
        status: i32,
        rid: &str,
        payload: &Value,
        done: Option<oneshot::Sender<Result<()>>>,
    ) -> Command {
        Command::Publish(Outbound {
            topic: iot::method_response_topic(status, rid),
            payload: json_bytes(payload),
            done,
            method_rid: Some(rid.to_string()),
        })
    }
}

/// The twin operations a device can ask for.
#[derive(Debug, Clone)]
pub(crate) enum TwinRequest {
    Get,
    PatchReported(Bytes),
}

/// The hub's answer to a twin request.
#[derive(Debug)]
pub(crate) struct TwinReply {
    pub status: u16,
    pub version: Option<u64>,
    pub payload: Bytes,
}

/// How the application receives methods and desired patches; read by the task whenever
/// [`Shared::changed`] fires and on every delivery.
#[derive(Default)]
pub(crate) struct Dispatch {
    pub handler: Option<Handler>,
    pub methods: Option<mpsc::Sender<MethodRequest>>,
    pub desired: Option<mpsc::Sender<DesiredPatch>>,
    pub c2d: Option<mpsc::Sender<C2dDelivery>>,
    /// Bumped by every new desired stream: each starts with the whole document.
    pub desired_generation: u64,
}

/// State shared between the client handles and the task.
pub(crate) struct Shared {
    pub state: watch::Sender<ConnectionState>,
    pub dispatch: Mutex<Dispatch>,
    /// Wakes the task after `dispatch` changed.
    pub changed: Notify,
    /// Set to ask the task to say DISCONNECT and end.
    pub close: watch::Sender<bool>,
    /// Set by the task when it has ended.
    pub done: watch::Sender<bool>,
    /// The desired stream's queue was full and patches were dropped: when the application
    /// has read some, the task sends the whole document instead.
    pub desired_lagging: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            state: watch::Sender::new(ConnectionState::Disconnected {
                reason: "not connected yet".into(),
            }),
            dispatch: Mutex::new(Dispatch::default()),
            changed: Notify::new(),
            close: watch::Sender::new(false),
            done: watch::Sender::new(false),
            desired_lagging: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The dispatch table; a panic elsewhere while it was held does not make it unusable.
    pub fn dispatch(&self) -> std::sync::MutexGuard<'_, Dispatch> {
        self.dispatch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Why a connection ended.
enum End {
    Dropped(String),
    Renew,
    Closed,
}

/// Completes once the application asked to close (or every handle is gone).
pub(crate) async fn closed(close: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens when the client is gone.
    let _ = close.wait_for(|c| *c).await;
}

/// A uuid-v4-shaped `$rid`, as the official SDKs use.
fn request_id() -> String {
    let hi = random_u64();
    let lo = random_u64();
    let time_hi = ((hi & 0xffff) as u16 & 0x0fff) | 0x4000;
    let clock = ((lo >> 48) as u16 & 0x3fff) | 0x8000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        time_hi,
        clock,
        lo & 0xffff_ffff_ffff
    )
}

/// The connection task.
pub(crate) struct Task {
    settings: Arc<Settings>,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    /// Handed to method requests so they can answer.
    responder: mpsc::Sender<Command>,
    close: watch::Receiver<bool>,
    backoff: Backoff,
    next_seq: u64,
    next_pkid: u16,
    outbox: Outbox,
    pkids: HashMap<u16, PkidUse>,
    twins: HashMap<String, TwinWait>,
    subs: [Sub; 4],
    desired: DesiredSync,
    /// Counts connections, so an acknowledgement never reaches a later connection.
    connection: u64,
    /// Packet ids of cloud-to-device messages the application took, to acknowledge.
    c2d_acks: Vec<u16>,
    /// Something changed that may let subscriptions or queued messages go out.
    dirty: bool,
}

impl Task {
    pub fn new(
        settings: Arc<Settings>,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<Command>,
        responder: mpsc::Sender<Command>,
    ) -> Task {
        let close = shared.close.subscribe();
        Task {
            settings,
            shared,
            commands,
            responder,
            close,
            backoff: Backoff::default(),
            next_seq: 0,
            next_pkid: 0,
            outbox: Outbox::default(),
            pkids: HashMap::new(),
            twins: HashMap::new(),
            subs: [Sub::default(); 4],
            desired: DesiredSync::default(),
            connection: 0,
            c2d_acks: Vec::new(),
            dirty: true,
        }
    }

    fn set_state(&self, state: ConnectionState) {
        self.shared.state.send_replace(state);
    }

    /// Runs from the first accepted connection until close or a final failure.
    pub async fn run(mut self, first: Link) {
        let device_id = self.settings.client_id();
        let mut link = first;
        loop {
            let started = Instant::now();
            let end = self.serve(link).await;
            let mut delay = match end {
                End::Closed => return self.finish_closed(),
                End::Renew => {
                    tracing::debug!(%device_id, "reconnecting to renew the SAS token");
                    // The connection held for most of a token's life.
                    self.backoff.reset();
                    None
                }
                End::Dropped(reason) => {
                    tracing::info!(%device_id, "connection lost: {reason}");
                    self.set_state(ConnectionState::Disconnected { reason });
                    if started.elapsed() >= STABLE_CONNECTION {
                        self.backoff.reset();
                    }
                    Some(self.backoff.next_delay())
                }
            };
            link = loop {
                self.set_state(ConnectionState::Reconnecting);
                if let Some(delay) = delay.take()
                    && !self.idle(delay).await
                {
                    return self.finish_closed();
                }
                let attempt = tokio::select! {
                    attempt = link::establish(&self.settings) => attempt,
                    _ = closed(&mut self.close) => return self.finish_closed(),
                };
                match attempt {
                    Ok(link) => break link,
                    Err(e @ Error::NotAuthorized(_)) => {
                        // New attempts would be refused just the same.
                        tracing::warn!(%device_id, "giving up: {e}");
                        return self.finish(ConnectionState::Failed(e.clone()), e);
                    }
                    Err(e) => {
                        tracing::debug!(%device_id, "reconnect failed: {e}");
                        self.set_state(ConnectionState::Disconnected {
                            reason: e.to_string(),
                        });
                        delay = Some(self.backoff.next_delay());
                    }
                }
            };
        }
    }

    fn finish_closed(self) {
        let state = ConnectionState::Disconnected {
            reason: "closed by the application".into(),
        };
        self.finish(state, Error::Closed);
    }

    /// Publishes the final state, fails everything still waiting with `error`, and ends the
    /// application's streams.
    fn finish(mut self, state: ConnectionState, error: Error) {
        // First, so that callers whose queue closes below already read why.
        self.set_state(state);
        self.fail_all(&error);
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Publish(o) => {
                    if let Some(done) = o.done {
                        let _ = done.send(Err(error.clone()));
                    }
                }
                Command::Twin { reply, .. } => {
                    let _ = reply.send(Err(error.clone()));
                }
                Command::C2dTaken { .. } => {}
            }
        }
        {
            // Dropping the handler also frees any client handle it captured.
            let mut dispatch = self.shared.dispatch();
            dispatch.handler = None;
            dispatch.methods = None;
            dispatch.desired = None;
            dispatch.c2d = None;
        }
        self.shared.done.send_replace(true);
    }

    /// Waits `delay` while disconnected, still accepting work. `false` if asked to close.
    async fn idle(&mut self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = sleep_until(until) => return true,
                _ = closed(&mut self.close) => return false,
                Some(command) = self.commands.recv() => self.accept(command),
                _ = self.shared.changed.notified() => self.sync_dispatch(),
            }
        }
    }

    /// Serves one connection until it ends.
    async fn serve(&mut self, link: Link) -> End {
        let session_present = link.session_present;
        let mut conn = Conn::new(link);
        // Acknowledgements owed to the last connection mean nothing on this one: the hub
        // delivers those messages again.
        self.c2d_acks.clear();
        self.connection += 1;
        self.on_connected(session_present);
        if let Err(why) = self.drain_input(&mut conn) {
            return End::Dropped(why);
        }
        let keep_alive = self.settings.keep_alive;
        loop {
            if self.dirty {
                self.dirty = false;
                self.ensure_subscriptions(&mut conn);
                for pkid in std::mem::take(&mut self.c2d_acks) {
                    let _ = conn.push(&Packet::PubAck(pkid));
                }
                self.send_outbox(&mut conn);
            }
            conn.out.start_write();
            let now = Instant::now();
            // Ping when either direction was quiet for a keep-alive: the hub needs to hear
            // from us, and silence from the hub may mean a dead link.
            let ping_at = conn.last_read.min(conn.out.last_write) + keep_alive;
            let dead_at = conn.ping_sent.map(|sent| sent + keep_alive);
            let renew_at = conn.renew_at.filter(|_| conn.drain.is_none());
            let drain_at = self.drain_wake(&conn);
            tokio::select! {
                _ = closed(&mut self.close) => return self.goodbye(&mut conn, End::Closed).await,
                read = conn.reader.read(&mut conn.inbuf) => match read {
                    Ok(0) => return End::Dropped("the hub closed the connection".into()),
                    Ok(_) => {
                        conn.last_read = Instant::now();
                        if let Err(why) = self.drain_input(&mut conn) {
                            return End::Dropped(why);
                        }
                    }
                    Err(e) => return End::Dropped(format!("read failed: {e}")),
                },
                written = conn.out.written() => {
                    if let Err(e) = written {
                        return End::Dropped(format!("write failed: {e}"));
                    }
                }
                Some(command) = self.commands.recv() => {
                    self.accept(command);
                    for _ in 0..COMMAND_BATCH {
                        match self.commands.try_recv() {
                            Ok(command) => self.accept(command),
                            Err(_) => break,
                        }
                    }
                }
                _ = self.shared.changed.notified() => self.sync_dispatch(),
                _ = sleep_until(ping_at), if conn.ping_sent.is_none() => {
                    if conn.push(&Packet::PingReq).is_ok() {
                        conn.ping_sent = Some(Instant::now());
                    }
                }
                _ = sleep_until(dead_at.unwrap_or(now)), if dead_at.is_some() => {
                    return End::Dropped("no PINGRESP within the keep-alive".into());
                }
                _ = sleep_until(renew_at.unwrap_or(now)), if renew_at.is_some() => {
                    self.start_renewal(&mut conn);
                }
                _ = sleep_until(drain_at.unwrap_or(now)), if drain_at.is_some() => {
                    if self.drain_wake(&conn).is_some_and(|at| at <= Instant::now()) {
                        return self.goodbye(&mut conn, End::Renew).await;
                    }
                }
            }
        }
    }

    /// Says DISCONNECT after whatever is queued, then ends the connection with `end`.
    async fn goodbye(&mut self, conn: &mut Conn, end: End) -> End {
        // Messages the application took just before closing are acknowledged on the way
        // out; otherwise the hub would deliver them again to the next connection.
        while let Ok(command) = self.commands.try_recv() {
            self.accept(command);
        }
        for pkid in std::mem::take(&mut self.c2d_acks) {
            let _ = conn.push(&Packet::PubAck(pkid));
        }
        let _ = conn.push(&Packet::Disconnect);
        match tokio::time::timeout(GOODBYE_TIMEOUT, conn.out.finish()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("flushing before DISCONNECT failed: {e}"),
            Err(_) => tracing::debug!("flushing before DISCONNECT timed out"),
        }
        end
    }

    /// Resets per-connection state after CONNACK and queues what the new connection must
    /// carry: subscriptions the hub lost, unacknowledged messages, unanswered twin requests,
    /// and a desired resync when patches may have been missed.
    fn on_connected(&mut self, session_present: bool) {
        // The old connection's read is void; a new one starts below if it can be answered.
        self.abandon_resync();
        self.reset_outbox(session_present);
        if self.has(Feature::DesiredPatches) {
            self.start_resync();
        }
        self.set_state(ConnectionState::Connected);
    }

    /// Reads the application's dispatch table after it changed.
    pub(crate) fn sync_dispatch(&mut self) {
        let (methods, desired, generation, c2d) = {
            let d = self.shared.dispatch();
            (
                d.handler.is_some() || d.methods.is_some(),
                d.desired.is_some(),
                d.desired_generation,
                d.c2d.is_some(),
            )
        };
        if methods {
            self.sub(Feature::Methods).wanted = true;
        }
        if c2d {
            self.sub(Feature::CloudToDevice).wanted = true;
        }
        if desired {
            self.sub(Feature::DesiredPatches).wanted = true;
            self.sub(Feature::TwinResponses).wanted = true;
            if generation != self.desired.generation {
                self.desired.restart(generation);
                if self.has(Feature::DesiredPatches) {
                    self.start_resync();
                }
            } else if self.desired_caught_up() && self.has(Feature::DesiredPatches) {
                self.start_resync();
            }
        }
        self.dirty = true;
    }

    /// Begins replacing the connection before its token expires: the hub forgets calls
    /// whose connection ends, so with methods subscribed it first unsubscribes and lets
    /// running calls finish, and it waits for what is already sent to be acknowledged.
    fn start_renewal(&mut self, conn: &mut Conn) {
        let now = Instant::now();
        let methods = self.subs[Feature::Methods as usize];
        let unsubscribed =
            (methods.active || methods.requested) && self.unsubscribe(conn, Feature::Methods);
        // A tenth of the TTL is half of what is left of the token.
        let budget = self.settings.token_ttl.mul_f64(0.1).min(MAX_DRAIN);
        conn.drain = Some(Drain {
            deadline: now + budget,
            unsuback_at: (!unsubscribed).then_some(now),
        });
    }

    /// When a renewal may disconnect: once methods are unsubscribed, no call runs and none
    /// arrived for a moment, and nothing sent waits for the hub; at the latest at the
    /// deadline.
    fn drain_wake(&self, conn: &Conn) -> Option<Instant> {
        let drain = conn.drain.as_ref()?;
        let quiet = match drain.unsuback_at {
            Some(unsuback) if conn.methods_outstanding.is_empty() && !self.awaiting_hub() => {
                let last = conn.last_method_at.map_or(unsuback, |m| m.max(unsuback));
                last + DRAIN_QUIET
            }
            _ => drain.deadline,
        };
        Some(quiet.min(drain.deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_look_like_uuid_v4_and_differ() {
        let a = request_id();
        let b = request_id();
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "{a}");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{a}");
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }
}
