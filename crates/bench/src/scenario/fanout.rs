//! `desired-fanout`: N connected devices each get one desired-property patch; the figure is
//! the time from the first send until the last device has its patch. On twinhub the sender
//! PATCHes `/twins/{id}` over REST (C at a time) and the hub pushes
//! `$iothub/twin/PATCH/properties/desired/?$version=..` after its durable commit; the mirror on
//! a plain broker is one publisher sending a QoS 1 message to each device's own topic with C
//! unacknowledged at a time.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use twinhub_mqtt::{Packet, QoS};
use twinhub_proto::topic::{self, Delivery};

use super::{CONNECT_LIMIT, Ctx, Flavor, Stop, Target, connect_fleet, stop_devices};
use crate::error::{Error, Result};
use crate::hub::device_id;
use crate::mqtt::{Conn, Login};
use crate::stats::{Latency, Recorder};

/// How the fan-out phase is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub devices: usize,
    /// Sends in flight at once.
    pub concurrency: usize,
    /// The phase gives up waiting after this long.
    pub limit: Duration,
}

/// The fan-out figures.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Fanout {
    pub devices: usize,
    /// Devices that got their patch.
    pub received: usize,
    /// Sends that failed.
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// From the first send until the last device had its patch; `None` if some never did.
    pub seconds_to_all: Option<f64>,
    /// Devices reached per second over that time.
    pub per_second: f64,
    /// Per device, from its send to its arrival.
    pub latency: Latency,
}

/// Whether `topic` is the desired patch the device waits for.
fn is_patch(hub: bool, topic: &str) -> bool {
    if hub {
        matches!(
            topic::parse_delivery_topic(topic),
            Ok(Delivery::DesiredPatch { .. })
        )
    } else {
        topic.starts_with("bench/desired/")
    }
}

/// A device: reports when its first patch arrives, then idles until told to stop.
async fn listener(
    mut conn: Conn,
    index: usize,
    hub: bool,
    arrived: mpsc::UnboundedSender<(usize, Instant)>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut reported = false;
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
            if let Packet::Publish(p) = packet
                && !reported
                && is_patch(hub, p.topic.as_str())
            {
                reported = true;
                let _ = arrived.send((index, now));
            }
        }
    }
}

/// Send times, as nanoseconds after the phase's start (`u64::MAX`: not sent).
type SendTimes = Arc<Vec<AtomicU64>>;

fn mark_sent(sent: &SendTimes, index: usize, start: Instant) {
    if let Some(slot) = sent.get(index) {
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        slot.store(nanos, Ordering::Relaxed);
    }
}

/// Runs the phase against `target`.
pub async fn run(ctx: &Ctx, target: &Target, shape: Shape) -> Result<Fanout> {
    let hub = target.is_hub();
    let n = shape.devices;
    let conns = connect_fleet(
        ctx,
        target,
        n,
        |i| match target.flavor {
            Flavor::Hub { .. } => vec!["$iothub/twin/PATCH/properties/desired/#".to_string()],
            Flavor::Broker => vec![format!("bench/desired/{}", device_id(i))],
        },
        &format!("{}: devices", target.name),
    )
    .await?;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (stop, stopped) = Stop::new();
    let mut devices = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        devices.spawn(listener(conn, i, hub, arrived_tx.clone(), stopped.clone()));
    }
    drop(arrived_tx);

    let sent: SendTimes = Arc::new((0..n).map(|_| AtomicU64::new(u64::MAX)).collect());
    let bar = ctx
        .progress
        .bar(&format!("{} desired fan-out", target.name), n as u64);
    let start = Instant::now();
    let driver = match &target.flavor {
        Flavor::Hub { .. } => tokio::spawn(rest_sender(target.clone(), shape, sent.clone(), start)),
        Flavor::Broker => {
            let login = Login::anonymous("bench-fanout-publisher", super::KEEP_ALIVE);
            let conn = Conn::open(&ctx.tls, target.mqtt_addr, None, &login, CONNECT_LIMIT).await?;
            tokio::spawn(broker_sender(conn, shape, sent.clone(), start))
        }
    };

    let deadline = tokio::time::Instant::from_std(start + shape.limit);
    let mut seen = HashSet::with_capacity(n);
    let mut latencies = Recorder::new();
    let mut last = start;
    while seen.len() < n {
        match tokio::time::timeout_at(deadline, arrived.recv()).await {
            Ok(Some((i, at))) => {
                if seen.insert(i) {
                    last = last.max(at);
                    let sent_at = sent
                        .get(i)
                        .map(|s| s.load(Ordering::Relaxed))
                        .filter(|&ns| ns != u64::MAX)
                        .map(|ns| start + Duration::from_nanos(ns));
                    // An arrival can beat the sender's own bookkeeping by a hair.
                    latencies.record(
                        sent_at.map_or(Duration::ZERO, |s| at.saturating_duration_since(s)),
                    );
                    bar.inc(1);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    bar.finish();
    let send_errors = match tokio::time::timeout(Duration::from_secs(30), driver).await {
        Ok(Ok(rec)) => rec,
        Ok(Err(e)) => {
            let mut rec = Recorder::new();
            rec.error(format!("the sender failed: {e}"));
            rec
        }
        Err(_) => {
            let mut rec = Recorder::new();
            rec.error("the sender did not finish");
            rec
        }
    };
    stop_devices(stop, devices).await;

    let received = seen.len();
    let seconds = last.saturating_duration_since(start).as_secs_f64();
    Ok(Fanout {
        devices: n,
        received,
        errors: send_errors.errors(),
        first_error: send_errors.throughput(Duration::ZERO).first_error,
        seconds_to_all: (received == n).then_some(seconds),
        per_second: if seconds > 0.0 {
            received as f64 / seconds
        } else {
            0.0
        },
        latency: latencies.latency(),
    })
}

/// twinhub: `shape.concurrency` tasks PATCH one twin each until every device was sent one.
async fn rest_sender(target: Target, shape: Shape, sent: SendTimes, start: Instant) -> Recorder {
    let services = match target.services() {
        Ok(s) => s.to_vec(),
        Err(e) => return Recorder::or_failure(Err(e)),
    };
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for j in 0..shape.concurrency.max(1) {
        let service = services[j % services.len()].clone();
        let next = next.clone();
        let sent = sent.clone();
        tasks.spawn(async move {
            let mut rec = Recorder::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= shape.devices {
                    return rec;
                }
                let patch = json!({ "properties": { "desired": { "fanout": i } } });
                mark_sent(&sent, i, start);
                if let Err(e) = service.update_twin(&device_id(i), &patch, None).await {
                    rec.error(e);
                }
            }
        });
    }
    Recorder::join_all(tasks, "a sender task").await
}

/// A broker: one publisher, QoS 1, `shape.concurrency` unacknowledged at a time.
async fn broker_sender(mut conn: Conn, shape: Shape, sent: SendTimes, start: Instant) -> Recorder {
    let mut rec = Recorder::new();
    if let Err(e) = publish_all(&mut conn, shape, &sent, start).await {
        rec.error(e);
    }
    conn.close().await;
    rec
}

async fn publish_all(
    conn: &mut Conn,
    shape: Shape,
    sent: &SendTimes,
    start: Instant,
) -> Result<()> {
    let window = shape.concurrency.max(1);
    let mut unacked = HashSet::with_capacity(window);
    let mut next = 0;
    let payload = Bytes::from(json!({ "fanout": 1 }).to_string());
    let deadline = tokio::time::Instant::from_std(start + shape.limit);
    while next < shape.devices || !unacked.is_empty() {
        while unacked.len() < window && next < shape.devices {
            mark_sent(sent, next, start);
            let pkid = conn.publish(
                format!("bench/desired/{}", device_id(next)),
                QoS::AtLeastOnce,
                payload.clone(),
            )?;
            unacked.insert(pkid);
            next += 1;
        }
        conn.flush().await?;
        tokio::time::timeout_at(deadline, conn.read_more())
            .await
            .map_err(|_| Error::timeout("publishing the fan-out", shape.limit))??;
        while let Some(packet) = conn.next_buffered()? {
            if let Packet::PubAck(pkid) = packet {
                unacked.remove(&pkid);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_desired_patches_count_as_arrivals() {
        assert!(is_patch(
            true,
            "$iothub/twin/PATCH/properties/desired/?$version=4"
        ));
        assert!(!is_patch(true, "$iothub/twin/res/204/?$rid=1&$version=4"));
        assert!(!is_patch(true, "bench/desired/dev-000001"));
        assert!(is_patch(false, "bench/desired/dev-000001"));
        assert!(!is_patch(false, "bench/twin/dev-000001"));
    }
}
