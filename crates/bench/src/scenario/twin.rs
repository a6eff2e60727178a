//! `twin`: N devices patch their reported properties as fast as the acks come back. On twinhub
//! the ack is `$iothub/twin/res/204/?$rid=..` after the durable commit; the mirror on a plain
//! broker is a QoS 1 PUBLISH answered by PUBACK (Mosquitto keeps it in memory only, so that
//! figure is an upper bound, not a durable equal).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::task::JoinSet;
use twinhub_mqtt::{Packet, QoS};
use twinhub_proto::topic::{self, Delivery};

use super::{Ctx, DRAIN_LIMIT, Flavor, Target, connect_fleet, cpu_of, cpu_probe, window_bar};
use crate::error::Result;
use crate::hub::device_id;
use crate::mqtt::Conn;
use crate::stats::{Recorder, Throughput, Window};

/// How the twin phase is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub devices: usize,
    /// Patches each device keeps in flight.
    pub inflight: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Runs the phase against `target`.
pub async fn run(ctx: &Ctx, target: &Target, shape: Shape) -> Result<Throughput> {
    let hub = target.is_hub();
    let conns = connect_fleet(
        ctx,
        target,
        shape.devices,
        |_| match target.flavor {
            Flavor::Hub { .. } => vec!["$iothub/twin/res/#".to_string()],
            Flavor::Broker => Vec::new(),
        },
        &format!("{}: devices", target.name),
    )
    .await?;
    let window = Window::starting_now(shape.warmup, shape.duration);
    let cpu = cpu_probe(target.pid, window);
    let bar = window_bar(ctx, &format!("{} twin patches", target.name), window);
    let mut set = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let inflight = shape.inflight.max(1);
        set.spawn(
            async move { Recorder::or_failure(patcher(conn, i, hub, inflight, window).await) },
        );
    }
    let total = Recorder::join_all(set, "a device task").await;
    bar.abort();
    Ok(Throughput {
        cpu: cpu_of(cpu).await,
        ..total.throughput(window.measured())
    })
}

/// One device's closed loop of reported patches.
async fn patcher(
    mut conn: Conn,
    index: usize,
    hub: bool,
    slots: usize,
    window: Window,
) -> Result<Recorder> {
    let mut rec = Recorder::new();
    let mut inflight: HashMap<u64, Instant> = HashMap::with_capacity(slots);
    let broker_topic = format!("bench/twin/{}", device_id(index));
    let mut seq = 0u64;
    let mut issue = |conn: &mut Conn, inflight: &mut HashMap<u64, Instant>| -> Result<()> {
        seq += 1;
        let payload = Bytes::from(format!("{{\"bench\":{{\"seq\":{seq}}}}}"));
        let key = if hub {
            conn.publish(
                topic::twin_patch_reported_topic(&seq.to_string()),
                QoS::AtLeastOnce,
                payload,
            )?;
            seq
        } else {
            u64::from(conn.publish(broker_topic.clone(), QoS::AtLeastOnce, payload)?)
        };
        inflight.insert(key, Instant::now());
        Ok(())
    };
    if window.open(Instant::now()) {
        for _ in 0..slots {
            issue(&mut conn, &mut inflight)?;
        }
    }
    conn.flush().await?;
    let drain_deadline = tokio::time::Instant::from_std(window.end + DRAIN_LIMIT);
    while !inflight.is_empty() {
        match tokio::time::timeout_at(drain_deadline, conn.read_more()).await {
            Ok(read) => read?,
            Err(_) => break,
        }
        let now = Instant::now();
        while let Some(packet) = conn.next_buffered()? {
            // (key, acknowledged successfully?)
            let answer = match packet {
                Packet::Publish(p) if hub => match topic::parse_delivery_topic(p.topic.as_str()) {
                    Ok(Delivery::TwinResponse { status, rid, .. }) => {
                        rid.parse::<u64>().ok().map(|k| (k, status))
                    }
                    _ => None,
                },
                Packet::PubAck(pkid) if !hub => Some((u64::from(pkid), 204)),
                _ => None,
            };
            let Some((key, status)) = answer else {
                continue;
            };
            let Some(sent) = inflight.remove(&key) else {
                continue;
            };
            if status == 204 {
                if window.counts(now) {
                    rec.record(now - sent);
                }
            } else {
                rec.error(format!("the hub answered a reported patch with {status}"));
            }
            if window.open(now) {
                issue(&mut conn, &mut inflight)?;
            }
        }
        conn.flush().await?;
    }
    conn.close().await;
    Ok(rec)
}
