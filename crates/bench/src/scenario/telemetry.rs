//! `telemetry`: device-to-cloud messages, in three phases.
//!
//! - **Ingest.** N devices publish QoS 1 messages on `devices/{id}/messages/events/` in closed
//!   loops, W unacknowledged each, timed until the PUBACK. twinhub sends the PUBACK after the
//!   message is fsynced to its event log; the mirror is Mosquitto's QoS 1 on the same topic
//!   with the same clients and payloads (PUBACK from memory; no subscriber, so the broker drops
//!   the message after acknowledging it).
//! - **End to end.** The same devices publish at a fixed total rate (open loop), each payload
//!   stamped with its send time; a consumer connected before the first send times each
//!   message's arrival. On twinhub it is `twinhub_sdk::EventsClient` reading every partition
//!   from `@latest` over AMQP; on Mosquitto an MQTT subscriber (QoS 1) on the same topics.
//! - **Catch-up** (twinhub only: Mosquitto keeps no log to replay). A backlog is filled by many
//!   devices with many QoS 1 publishes in flight each (every one acknowledged, so the backlog
//!   is exactly the count asked for), then one `EventsClient` reads every partition from
//!   `Earliest`; the figure is the time from asking until the last event arrived.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use twinhub_mqtt::{Packet, QoS};
use twinhub_sdk::{EventsClient, StartPosition};

use super::{
    CONNECT_LIMIT, Ctx, DRAIN_LIMIT, Outcome, Target, closed_loop, connect_fleet, cpu_of,
    cpu_probe, window_bar,
};
use crate::error::{Error, Result};
use crate::hub::device_id;
use crate::machine::{cpu_seconds, machine_cpu_seconds};
use crate::mqtt::{Conn, Login};
use crate::stats::{CpuUse, Latency, Recorder, Throughput, Window};

/// How the telemetry phases are shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Devices publishing in the ingest and end-to-end phases.
    pub devices: usize,
    /// QoS 1 publishes each device keeps unacknowledged during ingest.
    pub inflight: usize,
    /// Bytes of every message's payload.
    pub payload: usize,
    pub warmup: Duration,
    /// Measured window of the ingest phase.
    pub duration: Duration,
    /// Messages per second, over all devices, in the end-to-end phase.
    pub rate: f64,
    /// Measured window of the end-to-end phase.
    pub latency_duration: Duration,
}

/// How the catch-up phase is shaped.
#[derive(Debug, Clone, Copy)]
pub struct BacklogShape {
    /// Events in the backlog.
    pub events: usize,
    /// Devices filling it...
    pub devices: usize,
    /// ...each with this many QoS 1 publishes unacknowledged.
    pub inflight: usize,
    pub payload: usize,
    /// Filling and reading each give up after this long.
    pub limit: Duration,
}

/// Where the hub's built-in Event Hub-compatible endpoint is.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub connection_string: String,
    pub ca_pem: String,
    pub port: u16,
}

impl Endpoint {
    async fn connect(&self) -> Result<EventsClient> {
        Ok(EventsClient::builder(&self.connection_string)
            .extra_ca_pem(self.ca_pem.clone())
            .port(self.port)
            .connect()
            .await?)
    }
}

/// The topic a device publishes telemetry on (the same bytes on both targets).
pub fn telemetry_topic(index: usize) -> String {
    format!("devices/{}/messages/events/", device_id(index))
}

/// Width of the stamp's fields, so the header is the same length in every message.
const STAMP_HEAD: &str = "{\"t\":\"";

/// A payload of `len` bytes (at least the header's 60-odd), valid JSON, carrying the send time
/// `t_ns` (nanoseconds after the phase's base instant), the device and a sequence number in
/// fixed-width fields so the consumer reads them back without a JSON parser.
pub fn stamped_payload(len: usize, t_ns: u64, device: usize, seq: u64) -> Bytes {
    stamped_payload_with(len, t_ns, device, seq, "")
}

/// A [`stamped_payload`] with further JSON members `fields` (`"name":value,` each, with the
/// trailing comma) between the stamp and the padding, for routes that read `$body`.
pub fn stamped_payload_with(len: usize, t_ns: u64, device: usize, seq: u64, fields: &str) -> Bytes {
    let head = format!(
        "{STAMP_HEAD}{t_ns:020}\",\"d\":\"{device:07}\",\"s\":\"{seq:012}\",{fields}\"p\":\""
    );
    let mut out = Vec::with_capacity(len.max(head.len() + 2));
    out.extend_from_slice(head.as_bytes());
    let pad = len.saturating_sub(head.len() + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    Bytes::from(out)
}

/// Where the fixed-width fields of a [`stamped_payload`] sit: the send time, the device and
/// the sequence number.
const T_FIELD: std::ops::Range<usize> = 6..26;
const D_FIELD: std::ops::Range<usize> = 33..40;
const S_FIELD: std::ops::Range<usize> = 47..59;

fn digits(body: &[u8], range: std::ops::Range<usize>) -> Option<u64> {
    body.get(range)?.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .flatten()
    })
}

/// The send time, device and sequence number carried by a [`stamped_payload`], if `body` is
/// one.
pub fn payload_stamp(body: &[u8]) -> Option<(u64, u64, u64)> {
    if !body.starts_with(STAMP_HEAD.as_bytes()) {
        return None;
    }
    Some((
        digits(body, T_FIELD)?,
        digits(body, D_FIELD)?,
        digits(body, S_FIELD)?,
    ))
}

/// Counters of the hub's event log writer over the ingest window: fdatasyncs from `perf stat`
/// on the syscall tracepoint, machine-wide (when perf and tracefs are there; the hub is the
/// only process syncing files then). Every group commit fsyncs each partition file it wrote
/// once, so messages per fdatasync is the group commit's size per partition.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LogCounters {
    pub seconds: f64,
    pub fdatasyncs: u64,
    pub fdatasyncs_per_second: f64,
    /// Messages acknowledged in the window / fdatasyncs in the window.
    pub messages_per_fdatasync: f64,
    /// Bytes the hub process wrote to storage (`/proc/<pid>/io` `write_bytes`) per message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_bytes_per_message: Option<f64>,
}

/// One target's ingest figures.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Ingest {
    /// Messages acknowledged in the window, their rate, and publish-to-PUBACK latency.
    pub acks: Throughput,
    /// Payload megabytes (10^6) acknowledged per second.
    pub payload_mb_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<LogCounters>,
}

/// One target's end-to-end figures.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EndToEnd {
    /// The rate asked for and the rate sent in the window.
    pub target_per_second: f64,
    pub sent_per_second: f64,
    /// Messages sent in the window...
    pub sent: u64,
    /// ...and how many of them the consumer got (each counted once).
    pub received: u64,
    /// Deliveries of a message already received (at-least-once redeliveries).
    pub duplicates: u64,
    pub seconds: f64,
    /// From the publish to the consumer's arrival.
    pub latency: Latency,
    /// From the publish to its PUBACK.
    pub ack_latency: Latency,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuUse>,
}

/// The catch-up figures.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CatchUp {
    pub backlog: u64,
    pub partitions: usize,
    pub payload_bytes: usize,
    pub fill_devices: usize,
    pub fill_inflight: usize,
    /// How long filling took (all acknowledged) and its rate.
    pub fill_seconds: f64,
    pub fill_per_second: f64,
    /// Connecting the reader (TLS, AMQP open, CBS sign-in, partition ids).
    pub connect_seconds: f64,
    /// Events read, counting from the `receive` call until the last one arrived.
    pub read: u64,
    pub seconds_to_first: Option<f64>,
    pub seconds_to_last: Option<f64>,
    pub per_second: f64,
    pub payload_mb_per_second: f64,
    /// Events per partition, and whether each partition's sequence numbers came in order
    /// without gaps.
    pub per_partition: BTreeMap<String, u64>,
    pub in_order: bool,
    pub server_cores: Option<f64>,
    pub client_cores: Option<f64>,
    pub machine_cores: Option<f64>,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// What each device publishes: the topic (the IoT Hub telemetry topic, with any property
/// bag) and the JSON members its [`stamped_payload_with`] carries besides the stamp.
#[derive(Clone, Copy)]
pub struct Messages {
    pub topic: fn(usize) -> String,
    pub fields: fn(usize) -> String,
}

impl Messages {
    /// `devices/{id}/messages/events/` and the bare stamped payload.
    pub const PLAIN: Messages = Messages {
        topic: telemetry_topic,
        fields: no_fields,
    };

    /// Device `index`'s payload of `len` bytes stamped with `t_ns` and `seq`.
    pub fn payload(&self, len: usize, t_ns: u64, index: usize, seq: u64) -> Bytes {
        stamped_payload_with(len, t_ns, index, seq, &(self.fields)(index))
    }
}

fn no_fields(_: usize) -> String {
    String::new()
}

/// `n` device connections that only publish (no subscriptions).
pub(crate) async fn publishers(ctx: &Ctx, target: &Target, n: usize) -> Result<Vec<Conn>> {
    connect_fleet(
        ctx,
        target,
        n,
        |_| Vec::new(),
        &format!("{}: devices", target.name),
    )
    .await
}

// ---------------------------------------------------------------------------------------
// Ingest

/// Runs the ingest phase against `target`.
pub async fn ingest(ctx: &Ctx, target: &Target, shape: Shape) -> Result<Ingest> {
    let conns = publishers(ctx, target, shape.devices).await?;
    let window = Window::starting_now(shape.warmup, shape.duration);
    let log = target.pid.map(|pid| log_probe(pid, window));
    let label = format!("{} telemetry ingest", target.name);
    let (total, cpu) =
        closed_loops(ctx, target, conns, shape, Messages::PLAIN, window, &label).await;
    let acks = Throughput {
        cpu,
        ..total.throughput(window.measured())
    };
    let log = match log {
        Some(probe) => probe
            .await
            .ok()
            .and_then(|raw| raw.counters(acks.completed)),
        None => None,
    };
    Ok(Ingest {
        payload_mb_per_second: acks.per_second * shape.payload as f64 / 1e6,
        acks,
        log,
    })
}

/// Every connection in `conns` (device `i` at index `i`) keeps `shape.inflight` QoS 1
/// publishes of `messages` unacknowledged over `window`; returns the merged acknowledgement
/// latencies and the CPU of the window.
pub(crate) async fn closed_loops(
    ctx: &Ctx,
    target: &Target,
    conns: Vec<Conn>,
    shape: Shape,
    messages: Messages,
    window: Window,
    label: &str,
) -> (Recorder, Option<CpuUse>) {
    let cpu = cpu_probe(target.pid, window);
    let bar = window_bar(ctx, label, window);
    let mut set = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let slots = shape.inflight.max(1);
        let payload = messages.payload(shape.payload, 0, i, 0);
        let topic = Bytes::from((messages.topic)(i));
        set.spawn(async move {
            Recorder::or_failure(publisher(conn, topic, payload, slots, window).await)
        });
    }
    let total = Recorder::join_all(set, "a device task").await;
    bar.abort();
    (total, cpu_of(cpu).await)
}

/// One device's closed loop of QoS 1 telemetry on `topic`, keyed by packet id.
async fn publisher(
    conn: Conn,
    topic: Bytes,
    payload: Bytes,
    slots: usize,
    window: Window,
) -> Result<Recorder> {
    let issue = |conn: &mut Conn| -> Result<u64> {
        Ok(u64::from(conn.publish(
            topic.clone(),
            QoS::AtLeastOnce,
            payload.clone(),
        )?))
    };
    let answer = |packet: Packet| match packet {
        Packet::PubAck(pkid) => Some(Outcome::Done(u64::from(pkid))),
        _ => None,
    };
    closed_loop(conn, slots, window, issue, answer).await
}

/// What `perf stat` and `/proc/<pid>/io` counted over a window.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawLogCounters {
    seconds: f64,
    fdatasyncs: Option<u64>,
    write_bytes: Option<u64>,
}

impl RawLogCounters {
    pub(crate) fn counters(self, messages: u64) -> Option<LogCounters> {
        let fdatasyncs = self.fdatasyncs?;
        let seconds = self.seconds.max(1e-9);
        Some(LogCounters {
            seconds: self.seconds,
            fdatasyncs,
            fdatasyncs_per_second: fdatasyncs as f64 / seconds,
            messages_per_fdatasync: if fdatasyncs > 0 {
                messages as f64 / fdatasyncs as f64
            } else {
                0.0
            },
            disk_bytes_per_message: self
                .write_bytes
                .filter(|_| messages > 0)
                .map(|b| b as f64 / messages as f64),
        })
    }
}

/// `write_bytes` of `/proc/<pid>/io`.
fn write_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The count of one event in `perf stat -x,` output (`<count>,<unit>,<event>,...`).
fn perf_count(output: &str, event: &str) -> Option<u64> {
    output.lines().find_map(|line| {
        let mut fields = line.split(',');
        let count = fields.next()?.trim();
        let _unit = fields.next()?;
        (fields.next()?.trim() == event)
            .then(|| count.parse().ok())
            .flatten()
    })
}

const FDATASYNC_EVENT: &str = "syscalls:sys_enter_fdatasync";

/// Counts fdatasyncs over the measured window with `perf stat` (absent when perf or the
/// syscall tracepoints are not available), and the bytes the hub wrote to storage.
pub(crate) fn log_probe(pid: u32, window: Window) -> tokio::task::JoinHandle<RawLogCounters> {
    tokio::spawn(async move {
        tokio::time::sleep_until(tokio::time::Instant::from_std(window.warm_end)).await;
        let secs = window.measured().as_secs_f64();
        let bytes_0 = write_bytes(pid);
        let started = Instant::now();
        let perf = tokio::task::spawn_blocking(move || {
            std::process::Command::new("perf")
                // Machine-wide (-a): counting per thread (-p) would have the kernel copy the
                // counter into every thread the hub starts, which costs the hub CPU; the hub
                // is the only process syncing files during the window.
                .args(["stat", "-a", "-x", ",", "-e", FDATASYNC_EVENT])
                .args(["--", "sleep"])
                .arg(format!("{secs:.3}"))
                .stdout(std::process::Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| perf_count(&String::from_utf8_lossy(&o.stderr), FDATASYNC_EVENT))
        })
        .await
        .ok()
        .flatten();
        let seconds = started.elapsed().as_secs_f64();
        let bytes_1 = write_bytes(pid);
        RawLogCounters {
            seconds,
            fdatasyncs: perf,
            write_bytes: bytes_0.zip(bytes_1).map(|(a, b)| b.saturating_sub(a)),
        }
    })
}

// ---------------------------------------------------------------------------------------
// End to end

/// Who receives the messages in the end-to-end phase.
pub enum Consumer<'a> {
    /// twinhub's Event Hub-compatible endpoint, read with `EventsClient` from `@latest`.
    Events(&'a Endpoint),
    /// An MQTT subscriber on the broker (QoS 1).
    Subscriber,
}

/// What the consumer collected.
#[derive(Default)]
struct Consumed {
    latencies: Recorder,
    received: u64,
    duplicates: u64,
}

/// Runs the end-to-end phase against `target`.
pub async fn end_to_end(
    ctx: &Ctx,
    target: &Target,
    shape: Shape,
    consumer: Consumer<'_>,
) -> Result<EndToEnd> {
    let conns = publishers(ctx, target, shape.devices).await?;
    let base = Instant::now();
    // Messages sent in the window, by (device, seq): the consumer counts each once.
    let arrived = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    // The window is only known once the consumer is ready; it is sent to the reader then.
    let (window_tx, window_rx) = watch::channel(None::<Window>);
    let reader = match consumer {
        Consumer::Events(endpoint) => {
            let client = endpoint.connect().await?;
            let stream = client.receive(None, StartPosition::Latest).await?;
            // The hub resolves `@latest` when it starts serving each link, just after the
            // attach: give it a moment so no early message falls before the start.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let arrived = arrived.clone();
            tokio::spawn(async move {
                let out = read_events(stream, base, window_rx, arrived, stop_rx).await;
                client.close().await;
                out
            })
        }
        Consumer::Subscriber => {
            let login = Login::anonymous("bench-telemetry-consumer", super::KEEP_ALIVE);
            let mut conn =
                Conn::open(&ctx.tls, target.mqtt_addr, None, &login, CONNECT_LIMIT).await?;
            conn.subscribe(
                &["devices/+/messages/events/#".to_string()],
                QoS::AtLeastOnce,
                CONNECT_LIMIT,
            )
            .await?;
            let arrived = arrived.clone();
            tokio::spawn(read_subscription(conn, base, window_rx, arrived, stop_rx))
        }
    };

    let window = Window::starting_now(shape.warmup, shape.latency_duration);
    let _ = window_tx.send(Some(window));
    let cpu = cpu_probe(target.pid, window);
    let bar = window_bar(
        ctx,
        &format!("{} telemetry end to end", target.name),
        window,
    );
    let mut paced = paced_all(conns, shape, Messages::PLAIN, window, base).await;
    bar.abort();
    // Let the consumer catch up with what was sent, then stop it.
    let deadline = Instant::now() + DRAIN_LIMIT;
    while arrived.load(Ordering::Relaxed) < paced.sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    let consumed = match tokio::time::timeout(Duration::from_secs(30), reader).await {
        Ok(Ok(Ok(c))) => c,
        Ok(Ok(Err(e))) => {
            paced.acks.error(format!("the consumer failed: {e}"));
            Consumed::default()
        }
        Ok(Err(e)) => {
            paced.acks.error(format!("the consumer task failed: {e}"));
            Consumed::default()
        }
        Err(_) => {
            paced.acks.error("the consumer did not stop");
            Consumed::default()
        }
    };
    let seconds = window.measured().as_secs_f64();
    let acks = paced.acks.throughput(window.measured());
    Ok(EndToEnd {
        target_per_second: shape.rate,
        sent_per_second: paced.sent as f64 / seconds.max(1e-9),
        sent: paced.sent,
        received: consumed.received,
        duplicates: consumed.duplicates,
        seconds,
        latency: consumed.latencies.latency(),
        ack_latency: acks.latency,
        errors: acks.errors + consumed.latencies.errors(),
        first_error: acks
            .first_error
            .or_else(|| consumed.latencies.throughput(Duration::ZERO).first_error),
        cpu: cpu_of(cpu).await,
    })
}

/// What the paced publishers did.
#[derive(Default)]
pub(crate) struct Paced {
    /// Publish-to-PUBACK latencies of the messages sent in the window.
    pub(crate) acks: Recorder,
    /// Messages sent in the window.
    pub(crate) sent: u64,
}

impl Paced {
    fn merge(&mut self, other: Paced) {
        self.acks.merge(&other.acks);
        self.sent += other.sent;
    }
}

/// The connections in `conns` (device `i` at index `i`) publish `messages` at `shape.rate`
/// in all, open loop, their sends spread evenly over the period, each payload stamped with
/// its send time after `base`, until `window` ends; then they wait for their last acks.
pub(crate) async fn paced_all(
    conns: Vec<Conn>,
    shape: Shape,
    messages: Messages,
    window: Window,
    base: Instant,
) -> Paced {
    let devices = conns.len().max(1);
    let period = Duration::from_secs_f64(devices as f64 / shape.rate.max(1e-3));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        // Spread the devices' sends evenly over one period.
        let first = start + period.mul_f64(i as f64 / devices as f64);
        let payload = shape.payload;
        set.spawn(async move {
            paced_publisher(conn, i, messages, payload, period, first, window, base)
                .await
                .unwrap_or_else(|e| {
                    let mut p = Paced::default();
                    p.acks.error(e);
                    p
                })
        });
    }
    let mut paced = Paced::default();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(p) => paced.merge(p),
            Err(e) => paced.acks.error(format!("a device task failed: {e}")),
        }
    }
    paced
}

/// One device publishing every `period` from `first` until the window ends (open loop: a
/// late PUBACK does not hold the next send back), then waiting for its last acks.
#[allow(clippy::too_many_arguments)]
async fn paced_publisher(
    mut conn: Conn,
    index: usize,
    messages: Messages,
    payload_len: usize,
    period: Duration,
    first: Instant,
    window: Window,
    base: Instant,
) -> Result<Paced> {
    let topic = Bytes::from((messages.topic)(index));
    let mut out = Paced::default();
    let mut unacked: HashMap<u16, Instant> = HashMap::new();
    let mut next = first;
    let mut seq = 0u64;
    let drain_deadline = tokio::time::Instant::from_std(window.end + DRAIN_LIMIT);
    loop {
        let sending = next < window.end;
        if !sending && unacked.is_empty() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(next)), if sending => {
                let now = Instant::now();
                let t_ns = u64::try_from(now.duration_since(base).as_nanos()).unwrap_or(u64::MAX);
                let payload = messages.payload(payload_len, t_ns, index, seq);
                seq += 1;
                let pkid = conn.publish(topic.clone(), QoS::AtLeastOnce, payload)?;
                conn.flush().await?;
                // The same test as the consumer's: sent inside the measured window.
                if now >= window.warm_end && now < window.end {
                    out.sent += 1;
                    unacked.insert(pkid, now);
                }
                next += period;
            }
            read = conn.read_more() => {
                read?;
                let now = Instant::now();
                while let Some(packet) = conn.next_buffered()? {
                    if let Packet::PubAck(pkid) = packet
                        && let Some(sent) = unacked.remove(&pkid)
                    {
                        out.acks.record(now - sent);
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
    conn.close().await;
    Ok(out)
}

/// Counts a message's arrival if it was sent inside the window, once per message.
struct Arrivals {
    base: Instant,
    window: Option<Window>,
    /// (device, sequence) of every message counted.
    seen: std::collections::HashSet<(u64, u64)>,
    out: Consumed,
    arrived: Arc<AtomicU64>,
}

impl Arrivals {
    fn new(base: Instant, arrived: Arc<AtomicU64>) -> Arrivals {
        Arrivals {
            base,
            window: None,
            seen: std::collections::HashSet::new(),
            out: Consumed::default(),
            arrived,
        }
    }

    fn arrive(&mut self, body: &[u8], at: Instant) {
        let Some(window) = self.window else { return };
        let Some((t_ns, device, seq)) = payload_stamp(body) else {
            return;
        };
        let sent = self.base + Duration::from_nanos(t_ns);
        if sent < window.warm_end || sent >= window.end {
            return;
        }
        if !self.seen.insert((device, seq)) {
            self.out.duplicates += 1;
            return;
        }
        self.out
            .latencies
            .record(at.saturating_duration_since(sent));
        self.out.received += 1;
        self.arrived.fetch_add(1, Ordering::Relaxed);
    }
}

async fn read_events(
    mut stream: twinhub_sdk::EventStream,
    base: Instant,
    mut window: watch::Receiver<Option<Window>>,
    arrived: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> Result<Consumed> {
    let mut arrivals = Arrivals::new(base, arrived);
    loop {
        tokio::select! {
            next = stream.next() => match next {
                Some(Ok(event)) => {
                    let now = Instant::now();
                    if arrivals.window.is_none() {
                        arrivals.window = *window.borrow_and_update();
                    }
                    arrivals.arrive(&event.body, now);
                }
                Some(Err(e)) => return Err(Error::Sdk(e)),
                None => return Err(Error::Closed),
            },
            _ = stop.changed() => return Ok(arrivals.out),
        }
    }
}

async fn read_subscription(
    mut conn: Conn,
    base: Instant,
    mut window: watch::Receiver<Option<Window>>,
    arrived: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> Result<Consumed> {
    let mut arrivals = Arrivals::new(base, arrived);
    loop {
        tokio::select! {
            read = conn.read_more() => read?,
            _ = stop.changed() => {
                conn.close().await;
                return Ok(arrivals.out);
            }
        }
        let now = Instant::now();
        if arrivals.window.is_none() {
            arrivals.window = *window.borrow_and_update();
        }
        while let Some(packet) = conn.next_buffered()? {
            if let Packet::Publish(p) = packet {
                if p.qos == QoS::AtLeastOnce {
                    conn.queue(&Packet::PubAck(p.pkid))?;
                }
                arrivals.arrive(&p.payload, now);
            }
        }
        conn.flush().await?;
    }
}

/// The floor under any durable acknowledgement on this disk: records of `shape.payload`
/// bytes appended to a new file in `dir`, each followed by an fdatasync, paced at the
/// end-to-end phase's rate over a window of the same length. The latency is the write plus
/// the fdatasync.
pub async fn disk_floor(dir: &std::path::Path, shape: Shape) -> Result<EndToEnd> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let path = dir.join("fdatasync-floor.bin");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let window = Window::starting_now(shape.warmup, shape.latency_duration);
    let period = Duration::from_secs_f64(1.0 / shape.rate.max(1e-3));
    let record = vec![b'x'; shape.payload.max(1)];
    let outcome = tokio::task::spawn_blocking(move || {
        let mut rec = Recorder::new();
        let mut sent = 0u64;
        let mut at = 0u64;
        let mut next = Instant::now();
        while next < window.end {
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let started = Instant::now();
            let done = file
                .write_all_at(&record, at)
                .and_then(|()| file.sync_data());
            let took = started.elapsed();
            at += record.len() as u64;
            if started >= window.warm_end && started < window.end {
                sent += 1;
                match done {
                    Ok(()) => rec.record(took),
                    Err(e) => rec.error(e),
                }
            }
            next += period;
        }
        (rec, sent)
    })
    .await;
    let _ = std::fs::remove_file(&path);
    let (rec, sent) = outcome.map_err(|e| Error::Setup(format!("the disk floor failed: {e}")))?;
    let t = rec.throughput(window.measured());
    Ok(EndToEnd {
        target_per_second: shape.rate,
        sent_per_second: sent as f64 / t.seconds.max(1e-9),
        sent,
        received: t.completed,
        seconds: t.seconds,
        latency: t.latency,
        errors: t.errors,
        first_error: t.first_error,
        ..EndToEnd::default()
    })
}

// ---------------------------------------------------------------------------------------
// Catch-up

/// Fills `target` (a hub of its own, with no other events) with a backlog; [`read_backlog`]
/// reads it back.
pub async fn fill_backlog(ctx: &Ctx, target: &Target, shape: BacklogShape) -> Result<CatchUp> {
    let mut out = CatchUp {
        backlog: shape.events as u64,
        payload_bytes: shape.payload,
        fill_devices: shape.devices,
        fill_inflight: shape.inflight,
        ..CatchUp::default()
    };

    // Fill: every message is acknowledged, so the backlog is exactly `events` long.
    let devices = shape.devices.clamp(1, shape.events.max(1));
    let conns = publishers(ctx, target, devices).await?;
    let bar = ctx
        .progress
        .bar("telemetry backlog fill", shape.events as u64);
    let started = Instant::now();
    let deadline = started + shape.limit;
    let mut set = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let count = shape.events / devices + usize::from(i < shape.events % devices);
        let payload = stamped_payload(shape.payload, 0, i, 0);
        let inflight = shape.inflight.max(1);
        let topic = Bytes::from(telemetry_topic(i));
        set.spawn(fill(conn, i, topic, payload, count, inflight, deadline));
    }
    let mut filled = 0u64;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(n)) => {
                filled += n;
                bar.inc(n);
            }
            Ok(Err(e)) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("filling: {e}"));
            }
            Err(e) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("a filling task failed: {e}"));
            }
        }
    }
    bar.finish();
    out.fill_seconds = started.elapsed().as_secs_f64();
    out.fill_per_second = filled as f64 / out.fill_seconds.max(1e-9);
    out.backlog = filled;
    Ok(out)
}

/// Reads the backlog [`fill_backlog`] left with one `EventsClient` from `Earliest`, every
/// partition, until the last event arrived.
pub async fn read_backlog(
    ctx: &Ctx,
    target: &Target,
    endpoint: &Endpoint,
    shape: BacklogShape,
    mut out: CatchUp,
) -> Result<CatchUp> {
    let filled = out.backlog;
    if filled == 0 {
        return Ok(out);
    }
    let connecting = Instant::now();
    let client = endpoint.connect().await?;
    out.connect_seconds = connecting.elapsed().as_secs_f64();
    out.partitions = client.partition_ids().len();
    let bar = ctx.progress.bar("telemetry catch-up read", filled);
    let cpu_0 = (
        target.pid.and_then(cpu_seconds),
        cpu_seconds(std::process::id()),
        machine_cpu_seconds(),
    );
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + shape.limit);
    let mut stream = client.receive(None, StartPosition::Earliest).await?;
    let mut next_seq: BTreeMap<String, i64> = BTreeMap::new();
    let mut in_order = true;
    let mut read = 0u64;
    let mut first = None;
    let mut last = None;
    while read < filled {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(event))) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                let expected = next_seq.entry(event.partition.clone()).or_insert(0);
                if event.sequence_number != *expected {
                    in_order = false;
                }
                *expected = event.sequence_number + 1;
                read += 1;
                if read.is_multiple_of(4096) {
                    bar.inc(4096);
                }
            }
            Ok(Some(Err(e))) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("reading: {e}"));
                break;
            }
            Ok(None) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| "the event stream ended".to_string());
                break;
            }
            Err(_) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| {
                    format!("{read} of {filled} events read within {:?}", shape.limit)
                });
                break;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    let cpu_1 = (
        target.pid.and_then(cpu_seconds),
        cpu_seconds(std::process::id()),
        machine_cpu_seconds(),
    );
    bar.finish();
    drop(stream);
    client.close().await;
    let cores = |a: Option<f64>, b: Option<f64>| Some((b? - a?).max(0.0) / elapsed);
    out.server_cores = cores(cpu_0.0, cpu_1.0);
    out.client_cores = cores(cpu_0.1, cpu_1.1);
    out.machine_cores = cores(cpu_0.2.map(|m| m.busy), cpu_1.2.map(|m| m.busy));
    out.read = read;
    out.seconds_to_first = first.map(|f| f.duration_since(started).as_secs_f64());
    out.seconds_to_last = last
        .filter(|_| read == filled)
        .map(|l| l.duration_since(started).as_secs_f64());
    let span = out.seconds_to_last.unwrap_or(elapsed);
    out.per_second = read as f64 / span.max(1e-9);
    out.payload_mb_per_second = out.per_second * shape.payload as f64 / 1e6;
    out.per_partition = next_seq
        .into_iter()
        .map(|(p, next)| (p, u64::try_from(next).unwrap_or(0)))
        .collect();
    out.in_order = in_order && read == filled;
    Ok(out)
}

/// One device publishing `count` QoS 1 messages on `topic` with `inflight` unacknowledged;
/// returns how many were acknowledged.
pub(crate) async fn fill(
    mut conn: Conn,
    index: usize,
    topic: Bytes,
    payload: Bytes,
    count: usize,
    inflight: usize,
    deadline: Instant,
) -> Result<u64> {
    let deadline = tokio::time::Instant::from_std(deadline);
    let (mut sent, mut acked, mut outstanding) = (0usize, 0u64, 0usize);
    while (acked as usize) < count {
        while outstanding < inflight && sent < count {
            conn.publish(topic.clone(), QoS::AtLeastOnce, payload.clone())?;
            sent += 1;
            outstanding += 1;
        }
        conn.flush().await?;
        tokio::time::timeout_at(deadline, conn.read_more())
            .await
            .map_err(|_| {
                Error::Setup(format!(
                    "device {index}: {acked} of {count} acknowledged before the limit"
                ))
            })??;
        while let Some(packet) = conn.next_buffered()? {
            if let Packet::PubAck(_) = packet {
                acked += 1;
                outstanding = outstanding.saturating_sub(1);
            }
        }
    }
    conn.close().await;
    Ok(acked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_asked_length_and_carry_their_stamp() {
        let p = stamped_payload(1024, 1_234_567_890_123, 42, 7);
        assert_eq!(p.len(), 1024);
        assert_eq!(payload_stamp(&p), Some((1_234_567_890_123, 42, 7)));
        let json: serde_json::Value = serde_json::from_slice(&p).expect("valid JSON");
        assert_eq!(json["d"], "0000042");
        assert_eq!(json["s"], "000000000007");
        // Shorter than the header: the header alone.
        let small = stamped_payload(10, u64::MAX, 1, 1);
        assert!(small.len() > 10);
        assert_eq!(payload_stamp(&small), Some((u64::MAX, 1, 1)));
        assert_eq!(payload_stamp(b"{\"t\":\"12\"}"), None);
        assert_eq!(payload_stamp(b"hello"), None);
    }

    #[test]
    fn perf_stat_csv_is_read() {
        let out = "\n1234,,syscalls:sys_enter_fdatasync,5001234,100.00,,\n";
        assert_eq!(perf_count(out, FDATASYNC_EVENT), Some(1234));
        let unsupported = "<not supported>,,syscalls:sys_enter_fdatasync,0,100.00,,\n";
        assert_eq!(perf_count(unsupported, FDATASYNC_EVENT), None);
        assert_eq!(perf_count("", FDATASYNC_EVENT), None);
    }

    #[test]
    fn counters_relate_messages_to_fsyncs() {
        let raw = RawLogCounters {
            seconds: 2.0,
            fdatasyncs: Some(400),
            write_bytes: Some(4_000_000),
        };
        let c = raw.counters(40_000).expect("counted");
        assert!((c.fdatasyncs_per_second - 200.0).abs() < 1e-9);
        assert!((c.messages_per_fdatasync - 100.0).abs() < 1e-9);
        assert_eq!(c.disk_bytes_per_message, Some(100.0));
        assert!(RawLogCounters::default().counters(1).is_none());
    }
}
