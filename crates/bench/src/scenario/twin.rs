//! `twin`: N devices patch their reported properties as fast as the acks come back. On twinhub
//! the ack is `$iothub/twin/res/204/?$rid=..` after the durable commit; the mirror on a plain
//! broker is a QoS 1 PUBLISH answered by PUBACK (Mosquitto keeps it in memory only, so that
//! figure is an upper bound, not a durable equal).

use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinSet;
use twinhub_mqtt::{Packet, QoS};
use twinhub_proto::topic::{self, Delivery};

use super::{
    Ctx, Flavor, Outcome, Target, closed_loop, connect_fleet, cpu_of, cpu_probe, watch_probe,
    watched_of, window_bar,
};
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
    let watched = watch_probe(&target.watch, window);
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
    let mut t = Throughput {
        cpu: cpu_of(cpu).await,
        ..total.throughput(window.measured())
    };
    t.processes = watched_of(watched, &t).await;
    Ok(t)
}

/// One device's closed loop of reported patches.
async fn patcher(
    conn: Conn,
    index: usize,
    hub: bool,
    slots: usize,
    window: Window,
) -> Result<Recorder> {
    let broker_topic = format!("bench/twin/{}", device_id(index));
    let mut seq = 0u64;
    let issue = |conn: &mut Conn| -> Result<u64> {
        seq += 1;
        let payload = Bytes::from(format!("{{\"bench\":{{\"seq\":{seq}}}}}"));
        if hub {
            conn.publish(
                topic::twin_patch_reported_topic(&seq.to_string()),
                QoS::AtLeastOnce,
                payload,
            )?;
            Ok(seq)
        } else {
            Ok(u64::from(conn.publish(
                broker_topic.clone(),
                QoS::AtLeastOnce,
                payload,
            )?))
        }
    };
    let answer = |packet: Packet| match packet {
        Packet::Publish(p) if hub => match topic::parse_delivery_topic(p.topic.as_str()) {
            Ok(Delivery::TwinResponse { status, rid, .. }) => {
                let key = rid.parse::<u64>().ok()?;
                Some(if status == 204 {
                    Outcome::Done(key)
                } else {
                    Outcome::Failed(
                        key,
                        format!("the hub answered a reported patch with {status}"),
                    )
                })
            }
            _ => None,
        },
        Packet::PubAck(pkid) if !hub => Some(Outcome::Done(u64::from(pkid))),
        _ => None,
    };
    closed_loop(conn, slots, window, issue, answer).await
}
