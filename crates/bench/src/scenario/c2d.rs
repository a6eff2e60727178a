//! `c2d`: cloud-to-device messages from one sender to many connected devices, in two phases
//! on one fleet of devices (connected and subscribed at QoS 1 before either phase, each
//! acknowledging every delivery as it arrives).
//!
//! - **Throughput.** One sender keeps W sends in flight, to the devices in turn, for the
//!   window. On twinhub the sender is one `twinhub_sdk::ServiceClient` (one AMQP connection and
//!   sender link to `/messages/devicebound`); a send completes with the hub's `accepted`
//!   disposition, which comes after the message is durably queued. The hub then delivers it to
//!   the device's MQTT session (`devices/{id}/messages/devicebound/{bag}`, QoS 1, at most 8
//!   unacknowledged per device), and the device's PUBACK completes it (a durable delete). The
//!   mirror on Mosquitto is one MQTT publisher, QoS 1 to `bench/c2d/{device}` with W
//!   unacknowledged (the PUBACK comes from memory). Both sends accepted per second and
//!   deliveries received by the devices per second are counted; deliveries are the figure
//!   to compare, because an accepted send is only queued.
//! - **Latency.** The same sender sends at a fixed total rate (open loop), each payload
//!   stamped with the moment its send call started; the device times the arrival.
//!
//! After each phase the devices are given time to receive everything that was accepted, so
//! the next phase starts on empty queues; how long that took is reported (`drain`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use twinhub_mqtt::{Packet, QoS};
use twinhub_proto::error::ErrorCode;
use twinhub_sdk::{C2dMessage, ServiceClient};

use super::telemetry::{EndToEnd, payload_stamp, stamped_payload};
use super::{
    CONNECT_LIMIT, Ctx, DRAIN_LIMIT, Flavor, Outcome, Stop, Target, closed_loop, connect_fleet_qos,
    cpu_of, cpu_probe, stop_devices, window_bar,
};
use crate::error::{Error, Result};
use crate::hub::device_id;
use crate::mqtt::{Conn, Login};
use crate::stats::{Latency, Recorder, Throughput, Window};

/// How the c2d phases are shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Connected devices the messages go to, in turn.
    pub devices: usize,
    /// Sends the one sender keeps in flight in the throughput phase.
    pub inflight: usize,
    /// Bytes of every message body.
    pub payload: usize,
    pub warmup: Duration,
    /// Measured window of the throughput phase (zero skips it).
    pub duration: Duration,
    /// Messages per second in the latency phase (zero skips it).
    pub rate: f64,
    /// Measured window of the latency phase.
    pub latency_duration: Duration,
    /// How long after a phase the devices may take to receive what is still queued.
    pub drain_limit: Duration,
}

/// One target's throughput figures.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct C2dThroughput {
    pub devices: usize,
    pub inflight: usize,
    /// Sends accepted inside the window (twinhub: the `accepted` disposition, after the
    /// durable enqueue; Mosquitto: the PUBACK), their rate, and the latency from the send
    /// call to that answer; the CPU of the window.
    pub sends: Throughput,
    /// Deliveries the devices received inside the window...
    pub delivered: u64,
    /// ...per second: the figure comparable between the targets.
    pub deliveries_per_second: f64,
    /// From the send call's start to the device's PUBLISH, for messages sent in the window.
    pub delivery_latency: Latency,
    /// Sends refused because the device's queue was full (DeviceMaximumQueueDepthExceeded);
    /// also counted in `sends.errors`.
    pub queue_full: u64,
    /// Accepted sends in all (warm-up, window, and those in flight when it closed)...
    pub accepted_total: u64,
    /// ...and deliveries in all, by the end of the drain.
    pub delivered_total: u64,
    /// Accepted but not yet delivered when the window closed.
    pub backlog_at_end: u64,
    /// From the window's end until the last accepted message was delivered; `None` when
    /// some were not delivered within the drain limit.
    pub drain_seconds: Option<f64>,
    /// Deliveries flagged DUP (redelivered).
    pub duplicates: u64,
}

/// One target's figures.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct C2dRun {
    pub throughput: Option<C2dThroughput>,
    /// The fixed-rate phase: `latency` is from the send call to the device, `ack_latency`
    /// from the send call to its acceptance.
    pub latency: Option<EndToEnd>,
    /// Device connections that failed during the phases.
    pub device_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_device_error: Option<String>,
}

/// The topic a Mosquitto device subscribes to and the mirror publishes on.
pub fn broker_topic(index: usize) -> String {
    format!("bench/c2d/{}", device_id(index))
}

/// IoT Hub's cloud-to-device filter for device `index`.
pub fn hub_filter(index: usize) -> String {
    format!("devices/{}/messages/devicebound/#", device_id(index))
}

// ---------------------------------------------------------------------------------------
// The devices' side: every delivery, timed against the stamp in its payload.

/// What the devices received in one phase.
#[derive(Default)]
struct PhaseStats {
    window: Option<Window>,
    /// Send-to-device latency of the messages sent inside the window (first deliveries).
    latency: Recorder,
    /// Messages sent inside the window that arrived (first deliveries).
    received: u64,
    /// Deliveries of any message that arrived inside the window.
    arrived_in_window: u64,
    duplicates: u64,
    last_arrival: Option<Instant>,
}

/// Where the device tasks put what they receive.
struct Sink {
    base: Instant,
    /// Every delivery since the devices connected.
    delivered: AtomicU64,
    phase: Mutex<PhaseStats>,
}

impl Sink {
    fn new(base: Instant) -> Sink {
        Sink {
            base,
            delivered: AtomicU64::new(0),
            phase: Mutex::new(PhaseStats::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PhaseStats> {
        // A device task that panicked mid-record leaves figures that are still usable.
        self.phase
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts counting a new phase.
    fn begin(&self, window: Window) {
        *self.lock() = PhaseStats {
            window: Some(window),
            ..PhaseStats::default()
        };
    }

    /// What the devices received since [`Sink::begin`].
    fn take(&self) -> PhaseStats {
        std::mem::take(&mut *self.lock())
    }

    fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Nanoseconds from the sink's base to `at`, as stamped in payloads.
    fn stamp(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// One read's worth of deliveries (send stamp, DUP flag), all seen at `at`.
    fn arrive(&self, batch: &[(Option<u64>, bool)], at: Instant) {
        if batch.is_empty() {
            return;
        }
        self.delivered
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let mut phase = self.lock();
        phase.last_arrival = Some(at);
        let Some(window) = phase.window else { return };
        if window.counts(at) {
            phase.arrived_in_window += batch.len() as u64;
        }
        for &(stamp, dup) in batch {
            let Some(t_ns) = stamp else { continue };
            let sent = self.base + Duration::from_nanos(t_ns);
            if sent < window.warm_end || sent >= window.end {
                continue;
            }
            if dup {
                phase.duplicates += 1;
                continue;
            }
            phase.latency.record(at.saturating_duration_since(sent));
            phase.received += 1;
        }
    }
}

/// A device: acknowledges every QoS 1 delivery at once (PUBACKs in arrival order, one flush
/// per read) and reports it to the sink, until told to stop.
async fn device(mut conn: Conn, sink: Arc<Sink>, mut stop: watch::Receiver<bool>) -> Result<()> {
    let mut batch = Vec::with_capacity(16);
    loop {
        tokio::select! {
            read = conn.read_more() => read?,
            _ = stop.changed() => {
                conn.close().await;
                return Ok(());
            }
        }
        let now = Instant::now();
        while let Some(packet) = conn.next_buffered()? {
            if let Packet::Publish(p) = packet {
                if p.qos != QoS::AtMostOnce {
                    conn.queue(&Packet::PubAck(p.pkid))?;
                }
                batch.push((payload_stamp(&p.payload).map(|(t, _, _)| t), p.dup));
            }
        }
        conn.flush().await?;
        sink.arrive(&batch, now);
        batch.clear();
    }
}

/// Waits (at most `limit`) until the devices have received `expected` deliveries in all.
async fn wait_delivered(sink: &Sink, expected: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while sink.delivered() < expected {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

// ---------------------------------------------------------------------------------------
// The phases

/// Who sends.
enum Sending {
    /// twinhub: `ServiceClient::send_c2d` over the client's one AMQP sender link.
    Amqp(ServiceClient),
    /// A broker: one MQTT publisher.
    Mqtt(Box<Conn>),
}

/// Runs both phases against `target`: on twinhub `service` sends (a client of its own, so
/// its AMQP connection carries nothing else).
pub async fn run(
    ctx: &Ctx,
    target: &Target,
    shape: Shape,
    service: Option<&ServiceClient>,
) -> Result<C2dRun> {
    let n = shape.devices.max(1);
    let hub = target.is_hub();
    let conns = connect_fleet_qos(
        ctx,
        target,
        n,
        |i| match target.flavor {
            Flavor::Hub { .. } => vec![hub_filter(i)],
            Flavor::Broker => vec![broker_topic(i)],
        },
        QoS::AtLeastOnce,
        &format!("{}: devices", target.name),
    )
    .await?;
    let mut sending = if hub {
        let client = service.cloned().ok_or_else(|| {
            Error::Setup("the c2d phase on twinhub needs a service client".into())
        })?;
        Sending::Amqp(client)
    } else {
        Sending::Mqtt(Box::new(publisher(ctx, target).await?))
    };

    let sink = Arc::new(Sink::new(Instant::now()));
    let (stop, stopped) = Stop::new();
    let mut devices = JoinSet::new();
    for conn in conns {
        devices.spawn(device(conn, sink.clone(), stopped.clone()));
    }
    let targets = Targets::new(target, n);

    let mut out = C2dRun::default();
    let phases = async {
        if !shape.duration.is_zero() {
            let (t, back) = throughput(ctx, target, shape, &targets, &sink, sending).await?;
            sending = back;
            out.throughput = Some(t);
        }
        if shape.rate > 0.0 {
            out.latency = Some(latency(ctx, target, shape, &targets, &sink, &mut sending).await?);
        }
        if let Sending::Mqtt(conn) = sending {
            conn.close().await;
        }
        Ok::<_, Error>(())
    };
    let outcome = phases.await;
    for ended in stop_devices(stop, devices).await {
        if let Err(e) = ended {
            out.device_errors += 1;
            out.first_device_error.get_or_insert_with(|| e.to_string());
        }
    }
    outcome?;
    Ok(out)
}

/// The broker mirror's one publisher.
async fn publisher(ctx: &Ctx, target: &Target) -> Result<Conn> {
    let login = Login::anonymous("bench-c2d-sender", super::KEEP_ALIVE);
    Conn::open(&ctx.tls, target.mqtt_addr, None, &login, CONNECT_LIMIT).await
}

/// The device ids (twinhub) or topics (broker) messages go to, by device index.
struct Targets {
    names: Arc<Vec<String>>,
}

impl Targets {
    fn new(target: &Target, n: usize) -> Targets {
        let names = (0..n)
            .map(|i| {
                if target.is_hub() {
                    device_id(i)
                } else {
                    broker_topic(i)
                }
            })
            .collect();
        Targets {
            names: Arc::new(names),
        }
    }

    fn len(&self) -> usize {
        self.names.len().max(1)
    }
}

/// The body of message `seq` to device `device`, stamped with `sent`.
fn body(sink: &Sink, payload: usize, sent: Instant, device: usize, seq: u64) -> Bytes {
    stamped_payload(payload, sink.stamp(sent), device, seq)
}

/// What the sender of a phase counted (twinhub's send tasks, or the broker's publisher).
#[derive(Default)]
struct Sent {
    /// Send-to-accept latencies (inside the window) and the refusals.
    acks: Recorder,
    accepted: u64,
    queue_full: u64,
    /// Sends started inside the window (the latency phase).
    sent_in_window: u64,
}

impl Sent {
    fn merge(&mut self, other: Sent) {
        self.acks.merge(&other.acks);
        self.accepted += other.accepted;
        self.queue_full += other.queue_full;
        self.sent_in_window += other.sent_in_window;
    }

    /// Counts the answer to one send started at `started`; `timed` says whether its latency
    /// belongs to the figures.
    fn answer(&mut self, outcome: twinhub_sdk::Result<String>, started: Instant, timed: bool) {
        match outcome {
            Ok(_) => {
                self.accepted += 1;
                if timed {
                    self.acks.record(started.elapsed());
                }
            }
            Err(e) => {
                if let twinhub_sdk::Error::Hub {
                    code: Some(ErrorCode::DeviceMaximumQueueDepthExceeded),
                    ..
                } = &e
                {
                    self.queue_full += 1;
                }
                self.acks.error(e);
            }
        }
    }
}

/// The throughput phase. Gives the sender back for the next phase.
async fn throughput(
    ctx: &Ctx,
    target: &Target,
    shape: Shape,
    targets: &Targets,
    sink: &Arc<Sink>,
    sending: Sending,
) -> Result<(C2dThroughput, Sending)> {
    let inflight = shape.inflight.max(1);
    let delivered_before = sink.delivered();
    let window = Window::starting_now(shape.warmup, shape.duration);
    sink.begin(window);
    let cpu = cpu_probe(target.pid, window);
    let bar = window_bar(ctx, &format!("{} c2d throughput", target.name), window);
    // Accepted and delivered when the window closes.
    let accepted = Arc::new(AtomicU64::new(0));
    let at_end = {
        let accepted = accepted.clone();
        let sink = sink.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(window.end)).await;
            (
                accepted.load(Ordering::Relaxed),
                sink.delivered().saturating_sub(delivered_before),
            )
        })
    };

    let (sent, sending) = match sending {
        Sending::Amqp(client) => {
            let next = Arc::new(AtomicU64::new(0));
            let mut tasks = JoinSet::new();
            for _ in 0..inflight {
                let client = client.clone();
                let names = targets.names.clone();
                let (next, accepted, sink) = (next.clone(), accepted.clone(), sink.clone());
                let payload = shape.payload;
                tasks.spawn(async move {
                    let mut out = Sent::default();
                    loop {
                        let started = Instant::now();
                        if !window.open(started) {
                            return out;
                        }
                        let seq = next.fetch_add(1, Ordering::Relaxed);
                        let i = usize::try_from(seq).unwrap_or(0) % names.len().max(1);
                        let message =
                            C2dMessage::new(body(&sink, payload, started, i, seq).to_vec())
                                .message_id(seq.to_string());
                        let outcome = client.send_c2d(&names[i], message).await;
                        if outcome.is_ok() {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        let timed = window.counts(Instant::now());
                        out.answer(outcome, started, timed);
                    }
                });
            }
            let mut sent = Sent::default();
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok(s) => sent.merge(s),
                    Err(e) => sent.acks.error(format!("a sender task failed: {e}")),
                }
            }
            (sent, Sending::Amqp(client))
        }
        Sending::Mqtt(conn) => {
            let sent = mqtt_closed_loop(
                *conn,
                targets,
                shape.payload,
                inflight,
                window,
                sink,
                &accepted,
            )
            .await?;
            // `closed_loop` closes its connection; the latency phase gets a new one.
            (sent, Sending::Mqtt(Box::new(publisher(ctx, target).await?)))
        }
    };
    bar.abort();
    let cpu = cpu_of(cpu).await;
    let (accepted_at_end, delivered_at_end) = at_end.await.unwrap_or((0, 0));

    // Let the devices receive everything that was accepted.
    let accepted_total = sent.accepted;
    let drained = wait_delivered(sink, delivered_before + accepted_total, shape.drain_limit).await;
    let phase = sink.take();
    let delivered_total = sink.delivered().saturating_sub(delivered_before);
    let seconds = window.measured().as_secs_f64().max(1e-9);
    let sends = Throughput {
        cpu,
        ..sent.acks.throughput(window.measured())
    };
    Ok((
        C2dThroughput {
            devices: targets.len(),
            inflight,
            sends,
            delivered: phase.arrived_in_window,
            deliveries_per_second: phase.arrived_in_window as f64 / seconds,
            delivery_latency: phase.latency.latency(),
            queue_full: sent.queue_full,
            accepted_total,
            delivered_total,
            backlog_at_end: accepted_at_end.saturating_sub(delivered_at_end),
            drain_seconds: drained
                .then(|| {
                    phase
                        .last_arrival
                        .map(|l| l.saturating_duration_since(window.end).as_secs_f64())
                })
                .flatten(),
            duplicates: phase.duplicates,
        },
        sending,
    ))
}

/// The broker mirror of the throughput phase: one connection, QoS 1 publishes to the devices
/// in turn, `inflight` unacknowledged, timed to the PUBACK.
async fn mqtt_closed_loop(
    conn: Conn,
    targets: &Targets,
    payload: usize,
    inflight: usize,
    window: Window,
    sink: &Sink,
    accepted: &AtomicU64,
) -> Result<Sent> {
    let mut seq = 0u64;
    let names = targets.names.clone();
    let issue = |conn: &mut Conn| -> Result<u64> {
        let i = usize::try_from(seq).unwrap_or(0) % names.len().max(1);
        let started = Instant::now();
        let pkid = conn.publish(
            names[i].clone(),
            QoS::AtLeastOnce,
            body(sink, payload, started, i, seq),
        )?;
        seq += 1;
        Ok(u64::from(pkid))
    };
    let answer = |packet: Packet| match packet {
        Packet::PubAck(pkid) => {
            accepted.fetch_add(1, Ordering::Relaxed);
            Some(Outcome::Done(u64::from(pkid)))
        }
        _ => None,
    };
    let acks = closed_loop(conn, inflight, window, issue, answer).await?;
    Ok(Sent {
        accepted: accepted.load(Ordering::Relaxed),
        acks,
        ..Sent::default()
    })
}

/// The latency phase: a fixed total rate, open loop.
async fn latency(
    ctx: &Ctx,
    target: &Target,
    shape: Shape,
    targets: &Targets,
    sink: &Arc<Sink>,
    sending: &mut Sending,
) -> Result<EndToEnd> {
    let delivered_before = sink.delivered();
    let window = Window::starting_now(shape.warmup, shape.latency_duration);
    sink.begin(window);
    let cpu = cpu_probe(target.pid, window);
    let bar = window_bar(ctx, &format!("{} c2d latency", target.name), window);
    let period = Duration::from_secs_f64(1.0 / shape.rate.max(1e-3));
    let sent = match sending {
        Sending::Amqp(client) => amqp_paced(client, targets, shape, period, window, sink).await,
        Sending::Mqtt(conn) => mqtt_paced(conn, targets, shape, period, window, sink).await?,
    };
    bar.abort();
    let cpu = cpu_of(cpu).await;
    wait_delivered(
        sink,
        delivered_before + sent.accepted,
        DRAIN_LIMIT.max(shape.drain_limit),
    )
    .await;
    let phase = sink.take();
    let seconds = window.measured().as_secs_f64();
    let acks = sent.acks.throughput(window.measured());
    Ok(EndToEnd {
        target_per_second: shape.rate,
        sent_per_second: sent.sent_in_window as f64 / seconds.max(1e-9),
        sent: sent.sent_in_window,
        received: phase.received,
        duplicates: phase.duplicates,
        seconds,
        latency: phase.latency.latency(),
        ack_latency: acks.latency,
        errors: acks.errors,
        first_error: acks.first_error,
        cpu,
    })
}

/// twinhub at a fixed rate: each send its own task, so a slow answer never holds the next
/// send back.
async fn amqp_paced(
    client: &ServiceClient,
    targets: &Targets,
    shape: Shape,
    period: Duration,
    window: Window,
    sink: &Arc<Sink>,
) -> Sent {
    let mut out = Sent::default();
    let mut tasks = JoinSet::new();
    let mut next = Instant::now();
    let mut seq = 0u64;
    while next < window.end {
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
        let started = Instant::now();
        let in_window = started >= window.warm_end && started < window.end;
        if in_window {
            out.sent_in_window += 1;
        }
        let i = usize::try_from(seq).unwrap_or(0) % targets.len();
        let message = C2dMessage::new(body(sink, shape.payload, started, i, seq).to_vec())
            .message_id(seq.to_string());
        seq += 1;
        let client = client.clone();
        let names = targets.names.clone();
        tasks.spawn(async move {
            let outcome = client.send_c2d(&names[i], message).await;
            let mut one = Sent::default();
            one.answer(outcome, started, in_window);
            one
        });
        while let Some(joined) = tasks.try_join_next() {
            match joined {
                Ok(s) => out.merge(s),
                Err(e) => out.acks.error(format!("a send task failed: {e}")),
            }
        }
        next += period;
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(s) => out.merge(s),
            Err(e) => out.acks.error(format!("a send task failed: {e}")),
        }
    }
    out
}

/// A broker at a fixed rate: one publisher, QoS 1, no bound on the unacknowledged.
async fn mqtt_paced(
    conn: &mut Conn,
    targets: &Targets,
    shape: Shape,
    period: Duration,
    window: Window,
    sink: &Sink,
) -> Result<Sent> {
    let mut out = Sent::default();
    let mut unacked: std::collections::HashMap<u16, (Instant, bool)> =
        std::collections::HashMap::new();
    let mut next = Instant::now();
    let mut seq = 0u64;
    let drain_deadline = tokio::time::Instant::from_std(window.end + DRAIN_LIMIT);
    loop {
        let sending = next < window.end;
        if !sending && unacked.is_empty() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(next)), if sending => {
                let started = Instant::now();
                let in_window = started >= window.warm_end && started < window.end;
                let i = usize::try_from(seq).unwrap_or(0) % targets.len();
                let pkid = conn.publish(
                    targets.names[i].clone(),
                    QoS::AtLeastOnce,
                    body(sink, shape.payload, started, i, seq),
                )?;
                seq += 1;
                conn.flush().await?;
                if in_window {
                    out.sent_in_window += 1;
                }
                unacked.insert(pkid, (started, in_window));
                next += period;
            }
            read = conn.read_more() => {
                read?;
                while let Some(packet) = conn.next_buffered()? {
                    if let Packet::PubAck(pkid) = packet
                        && let Some((started, timed)) = unacked.remove(&pkid)
                    {
                        out.answer(Ok(String::new()), started, timed);
                    }
                }
            }
            _ = tokio::time::sleep_until(drain_deadline), if !sending => {
                for _ in unacked.drain() {
                    out.acks.error("no PUBACK within the drain limit");
                }
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_count_in_the_window_and_latency_only_for_messages_sent_in_it() {
        let sink = Sink::new(Instant::now());
        let window = Window::starting_now(Duration::from_millis(0), Duration::from_secs(60));
        sink.begin(window);
        let before = sink.stamp(window.warm_end - Duration::from_millis(1));
        let inside = sink.stamp(window.warm_end + Duration::from_millis(1));
        let at = window.warm_end + Duration::from_millis(3);
        sink.arrive(
            &[
                (Some(inside), false),
                (Some(before), false),
                (Some(inside), true),
                (None, false),
            ],
            at,
        );
        assert_eq!(sink.delivered(), 4);
        let phase = sink.take();
        assert_eq!(phase.arrived_in_window, 4);
        assert_eq!(phase.received, 1);
        assert_eq!(phase.duplicates, 1);
        let l = phase.latency.latency();
        assert!((1_900..=2_100).contains(&l.p50_us), "{l:?}");
        // A new phase starts from nothing; the total keeps counting.
        sink.arrive(&[(Some(inside), false)], at);
        assert_eq!(sink.delivered(), 5);
        assert_eq!(sink.take().received, 0, "no window: nothing counted");
    }

    #[test]
    fn queue_full_refusals_are_counted_apart() {
        let mut s = Sent::default();
        let t = Instant::now();
        s.answer(Ok("id".into()), t, true);
        s.answer(
            Err(twinhub_sdk::Error::Hub {
                status: 403,
                code: Some(ErrorCode::DeviceMaximumQueueDepthExceeded),
                message: "full".into(),
            }),
            t,
            true,
        );
        s.answer(Err(twinhub_sdk::Error::TimedOut), t, true);
        assert_eq!((s.accepted, s.queue_full, s.acks.errors()), (1, 1, 2));
        assert_eq!(s.acks.completed(), 1);
    }

    #[test]
    fn topics_and_filters_name_the_device() {
        assert_eq!(broker_topic(3), "bench/c2d/dev-000003");
        assert_eq!(hub_filter(3), "devices/dev-000003/messages/devicebound/#");
    }
}
