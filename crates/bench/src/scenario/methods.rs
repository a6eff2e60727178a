//! `methods`: N connected devices answer; C concurrent callers invoke and time each round trip.
//! On twinhub a call is `POST /twins/{id}/methods` over HTTPS through the service SDK, which the
//! hub forwards to the device's MQTT session; on a plain broker the mirror is raw MQTT request
//! and response: the caller publishes `bench/req/{device}/{caller}/{rid}`, the device answers
//! on `bench/res/{caller}/{rid}`, the caller times it. Devices answer the same way on both
//! (QoS 1, as the official device SDKs do).

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;
use twinhub_mqtt::{Packet, QoS};
use twinhub_proto::model::CloudToDeviceMethod;
use twinhub_proto::topic::{self, Delivery};

use super::{
    Ctx, Flavor, Outcome, Stop, Target, closed_loop, connect_fleet, cpu_of, cpu_probe,
    stop_devices, watch_probe, watched_of, window_bar,
};
use crate::error::{Error, Result};
use crate::hub::device_id;
use crate::mqtt::{Conn, Login};
use crate::stats::{Recorder, Throughput, Window};

/// The method name callers invoke.
pub const METHOD_NAME: &str = "bench";
/// The device's answer (JSON, as the hub requires).
const ANSWER: &[u8] = br#"{"ok":true}"#;
/// How long the hub waits for a device before answering 504 (the phase never gets near it).
const RESPONSE_TIMEOUT_SECS: i64 = 30;

/// How one request/response phase is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Devices answering.
    pub devices: usize,
    /// Requests in flight at any time (concurrent callers).
    pub concurrency: usize,
    /// Connections the callers share (HTTP/2 connections on twinhub, MQTT connections on a
    /// broker, TLS connections for the echo floor).
    pub caller_conns: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// The subscription a device answering methods holds.
fn device_filter(target: &Target, i: usize) -> String {
    match target.flavor {
        Flavor::Hub { .. } => "$iothub/methods/POST/#".to_string(),
        Flavor::Broker => format!("bench/req/{}/#", device_id(i)),
    }
}

/// The topic a device answers a request on, or `None` if `request` is not a request.
pub fn reply_topic(hub: bool, request: &str) -> Option<String> {
    if hub {
        match topic::parse_delivery_topic(request) {
            Ok(Delivery::MethodRequest { rid, .. }) => {
                Some(topic::method_response_topic(200, &rid))
            }
            _ => None,
        }
    } else {
        let rest = request.strip_prefix("bench/req/")?;
        let mut parts = rest.splitn(3, '/');
        let (_device, caller, rid) = (parts.next()?, parts.next()?, parts.next()?);
        Some(format!("bench/res/{caller}/{rid}"))
    }
}

/// The request id in a broker reply topic `bench/res/{caller}/{rid}` addressed to `caller`.
pub fn reply_rid(caller: &str, reply: &str) -> Option<u64> {
    reply
        .strip_prefix("bench/res/")?
        .strip_prefix(caller)?
        .strip_prefix('/')?
        .parse()
        .ok()
}

/// A device: answers every request it gets until told to stop. Returns how many it answered.
async fn responder(mut conn: Conn, hub: bool, mut stop: watch::Receiver<bool>) -> Result<u64> {
    let mut answered = 0;
    loop {
        tokio::select! {
            read = conn.read_more() => read?,
            _ = stop.changed() => {
                conn.close().await;
                return Ok(answered);
            }
        }
        while let Some(packet) = conn.next_buffered()? {
            if let Packet::Publish(p) = packet
                && let Some(reply) = reply_topic(hub, p.topic.as_str())
            {
                conn.publish(reply, QoS::AtLeastOnce, Bytes::from_static(ANSWER))?;
                answered += 1;
            }
        }
        conn.flush().await?;
    }
}

/// Runs every concurrency level in `levels` against `target` with one fleet of devices.
/// Returns one result per level, in order.
pub async fn run(
    ctx: &Ctx,
    target: &Target,
    shape: Shape,
    levels: &[usize],
) -> Result<Vec<(usize, Throughput)>> {
    let conns = connect_fleet(
        ctx,
        target,
        shape.devices,
        |i| vec![device_filter(target, i)],
        &format!("{}: devices", target.name),
    )
    .await?;
    let (stop, stopped) = Stop::new();
    let mut devices = JoinSet::new();
    for conn in conns {
        devices.spawn(responder(conn, target.is_hub(), stopped.clone()));
    }
    let mut results = Vec::new();
    let mut failure = None;
    for &c in levels {
        let shape = Shape {
            concurrency: c,
            ..shape
        };
        let outcome = match &target.flavor {
            Flavor::Hub { .. } => hub_callers(ctx, target, shape).await,
            Flavor::Broker => broker_callers(ctx, target, shape).await,
        };
        match outcome {
            Ok(t) => results.push((c, t)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    for outcome in stop_devices(stop, devices).await {
        if let Err(e) = outcome
            && failure.is_none()
        {
            failure = Some(Error::Setup(format!("a device failed: {e}")));
        }
    }
    match failure {
        // A device dying mid-run shows up as errors in the figures; a phase that could not
        // run at all is an error.
        Some(e) if results.len() < levels.len() => Err(e),
        _ => Ok(results),
    }
}

/// C callers over the hub's REST API, each in a closed loop.
async fn hub_callers(ctx: &Ctx, target: &Target, shape: Shape) -> Result<Throughput> {
    let services = target.services()?;
    let window = Window::starting_now(shape.warmup, shape.duration);
    let cpu = cpu_probe(target.pid, window);
    let watched = watch_probe(&target.watch, window);
    let bar = window_bar(
        ctx,
        &format!("{} methods C={}", target.name, shape.concurrency),
        window,
    );
    let mut callers = JoinSet::new();
    for j in 0..shape.concurrency {
        let service = services[j % services.len()].clone();
        let devices = shape.devices.max(1);
        callers.spawn(async move {
            let mut rec = Recorder::new();
            let mut n = 0usize;
            loop {
                let sent = Instant::now();
                if !window.open(sent) {
                    break;
                }
                let call = CloudToDeviceMethod {
                    method_name: METHOD_NAME.into(),
                    payload: Some(json!({ "seq": n })),
                    response_timeout_in_seconds: Some(RESPONSE_TIMEOUT_SECS),
                    connect_timeout_in_seconds: None,
                };
                let result = service
                    .invoke_method(&device_id((j + n) % devices), &call)
                    .await;
                n += 1;
                let done = Instant::now();
                match result {
                    Ok(r) if r.status == 200 => {
                        if window.counts(done) {
                            rec.record(done - sent);
                        }
                    }
                    Ok(r) => rec.error(format!("the device answered status {}", r.status)),
                    Err(e) => rec.error(e),
                }
            }
            rec
        });
    }
    let total = Recorder::join_all(callers, "a caller task").await;
    bar.abort();
    let mut t = Throughput {
        cpu: cpu_of(cpu).await,
        ..total.throughput(window.measured())
    };
    t.processes = watched_of(watched, &t).await;
    Ok(t)
}

/// C callers spread over `caller_conns` MQTT connections to a broker; each connection keeps
/// its share of requests in flight.
async fn broker_callers(ctx: &Ctx, target: &Target, shape: Shape) -> Result<Throughput> {
    let conns = shape.caller_conns.clamp(1, shape.concurrency.max(1));
    let mut callers = Vec::with_capacity(conns);
    for k in 0..conns {
        let name = format!("c{k}");
        let login = Login::anonymous(&format!("bench-caller-{}-{k}", shape.concurrency), 600);
        let mut conn = Conn::open(
            &ctx.tls,
            target.mqtt_addr,
            None,
            &login,
            super::CONNECT_LIMIT,
        )
        .await?;
        conn.subscribe(
            &[format!("bench/res/{name}/#")],
            QoS::AtMostOnce,
            super::CONNECT_LIMIT,
        )
        .await?;
        // Spread C slots as evenly as possible.
        let slots = shape.concurrency / conns + usize::from(k < shape.concurrency % conns);
        callers.push((conn, name, slots));
    }
    let window = Window::starting_now(shape.warmup, shape.duration);
    let cpu = cpu_probe(target.pid, window);
    let bar = window_bar(
        ctx,
        &format!("{} req/resp C={}", target.name, shape.concurrency),
        window,
    );
    let mut set = JoinSet::new();
    for (k, (conn, name, slots)) in callers.into_iter().enumerate() {
        let devices = shape.devices.max(1);
        set.spawn(async move {
            Recorder::or_failure(broker_caller(conn, &name, slots, devices, k, window).await)
        });
    }
    let total = Recorder::join_all(set, "a caller task").await;
    bar.abort();
    Ok(Throughput {
        cpu: cpu_of(cpu).await,
        ..total.throughput(window.measured())
    })
}

/// One caller connection's closed loop: `slots` requests in flight until the window closes.
async fn broker_caller(
    conn: Conn,
    name: &str,
    slots: usize,
    devices: usize,
    first: usize,
    window: Window,
) -> Result<Recorder> {
    let mut next_rid = 0u64;
    let issue = |conn: &mut Conn| -> Result<u64> {
        let rid = next_rid;
        next_rid += 1;
        let device = device_id((first + rid as usize) % devices);
        let payload = Bytes::from(format!("{{\"seq\":{rid}}}"));
        conn.publish(
            format!("bench/req/{device}/{name}/{rid}"),
            QoS::AtMostOnce,
            payload,
        )?;
        Ok(rid)
    };
    let answer = |packet: Packet| match packet {
        Packet::Publish(p) => reply_rid(name, p.topic.as_str()).map(Outcome::Done),
        _ => None,
    };
    closed_loop(conn, slots, window, issue, answer).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_answer_on_the_mirror_of_the_request() {
        assert_eq!(
            reply_topic(true, "$iothub/methods/POST/bench/?$rid=17").as_deref(),
            Some("$iothub/methods/res/200/?$rid=17")
        );
        assert_eq!(reply_topic(true, "$iothub/twin/res/204/?$rid=1"), None);
        assert_eq!(
            reply_topic(false, "bench/req/dev-000001/c3/42").as_deref(),
            Some("bench/res/c3/42")
        );
        assert_eq!(reply_topic(false, "bench/req/dev-000001"), None);
        assert_eq!(reply_topic(false, "other/topic"), None);
    }

    #[test]
    fn callers_only_take_their_own_replies() {
        assert_eq!(reply_rid("c3", "bench/res/c3/42"), Some(42));
        assert_eq!(reply_rid("c3", "bench/res/c31/42"), None);
        assert_eq!(reply_rid("c3", "bench/res/c3/x"), None);
        assert_eq!(reply_rid("c3", "bench/req/c3/42"), None);
    }
}
