//! `routing`: what message routing costs the hub, and how fast it delivers to a webhook.
//!
//! - **Routing cost.** Two hubs of their own, started side by side with fresh data dirs and
//!   the same devices (each with a twin tag `region`): one with no routing configuration, one
//!   with [`routed_config`] (10 routes with conditions on application properties and on
//!   `$body`, to 3 stream endpoints and `events`; 3 enrichments: a static one, `$iothubname`
//!   and `$twin.tags.region`) passed as `twinhub serve --config`. The same devices publish
//!   the same messages to each (the telemetry scenario's closed loops: N devices, QoS 1, W in
//!   flight; a property bag `level`/`kind` with `$.ct=application/json` and `$.ce=utf-8` on
//!   the topic, a JSON body with `temperature` and `site`), in alternating rounds. Figures:
//!   messages acknowledged per second and the hub's CPU per message, and how many copies the
//!   configuration makes of each message (computed with `twinhub_routing` from the same
//!   messages, and counted by the hub's `/metrics`).
//! - **Webhook delivery.** A third hub routes every device message to one webhook endpoint
//!   pointing at [`HookServer`](crate::hook::HookServer), a minimal HTTP/1.1 server in the
//!   bench that answers `200` at once. A backlog of messages is published as fast as the hub
//!   acknowledges them; the figures are the rate the receiver got them at, while the devices
//!   were publishing and after (the backlog draining), and the hub's CPU per delivery. Then
//!   the devices publish at a fixed rate, and the receiver times each message from its
//!   enqueued time (`ce-time`) and from the device's publish.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use twinhub_proto::message::Message;
use twinhub_routing::{
    EndpointKind, EndpointSpec, EnrichmentSpec, RouteSpec, Router, RoutingConfig, Source,
};
use twinhub_sdk::ServiceClient;

use super::telemetry::{self, LogCounters, Messages};
use super::{Ctx, Flavor, Target};
use crate::error::{Error, Result};
use crate::hook::HookServer;
use crate::hub::{self, HOSTNAME, Hub, Launch, device_id};
use crate::machine::{cpu_seconds, machine_cpu_seconds};
use crate::stats::{CpuUse, Latency, Recorder, Throughput, Window};
use crate::tls;

/// How the routing-cost phases are shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub devices: usize,
    /// QoS 1 publishes each device keeps unacknowledged.
    pub inflight: usize,
    pub payload: usize,
    pub warmup: Duration,
    /// Measured window of each round on each hub.
    pub duration: Duration,
}

impl Shape {
    fn telemetry(&self) -> telemetry::Shape {
        telemetry::Shape {
            devices: self.devices,
            inflight: self.inflight,
            payload: self.payload,
            warmup: self.warmup,
            duration: self.duration,
            rate: 0.0,
            latency_duration: Duration::ZERO,
        }
    }
}

/// How the webhook phases are shaped.
#[derive(Debug, Clone, Copy)]
pub struct WebhookShape {
    pub devices: usize,
    pub inflight: usize,
    pub payload: usize,
    /// Messages published as fast as the hub takes them (0 skips the phase).
    pub backlog: usize,
    /// Messages per second in the lag phase (0 skips it).
    pub rate: f64,
    pub warmup: Duration,
    pub latency_duration: Duration,
    /// How long the backlog may take to arrive.
    pub drain_limit: Duration,
}

/// The stream endpoints of [`routed_config`].
pub const STREAMS: [&str; 3] = ["alerts", "analytics", "archive"];
/// Levels by device (`i % 4`): half `info`.
const LEVELS: [&str; 4] = ["info", "info", "warning", "critical"];
const REGIONS: [&str; 3] = ["eu", "us", "asia"];

fn route(name: &str, condition: &str, endpoints: &[&str]) -> RouteSpec {
    RouteSpec {
        name: name.into(),
        source: Source::DeviceMessages,
        condition: condition.into(),
        endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        enabled: true,
    }
}

/// The routed hub's configuration: 3 stream endpoints, 10 routes (conditions on the
/// application properties `level` and `kind` and on `$body.temperature`, `$body.site` and a
/// `$body.firmware` no message has), 3 enrichments on every endpoint.
pub fn routed_config() -> RoutingConfig {
    let all = ["events", "alerts", "analytics", "archive"];
    let enrich = |key: &str, value: &str| EnrichmentSpec {
        key: key.into(),
        value: value.into(),
        endpoints: all.iter().map(|e| e.to_string()).collect(),
    };
    RoutingConfig {
        endpoints: STREAMS
            .iter()
            .map(|name| EndpointSpec {
                name: (*name).into(),
                kind: EndpointKind::Stream,
                url: None,
            })
            .collect(),
        routes: vec![
            route("critical", "level = 'critical'", &["alerts"]),
            route(
                "warm-warning",
                "level = 'warning' AND $body.temperature > 35",
                &["alerts"],
            ),
            route("hot", "$body.temperature > 45", &["alerts", "analytics"]),
            route("cold", "$body.temperature < 15", &["analytics"]),
            route("site-zero", "$body.site = 'site-0'", &["analytics"]),
            route("archive-telemetry", "kind = 'telemetry'", &["archive"]),
            route("info-to-events", "level = 'info'", &["events"]),
            route("others-to-events", "level <> 'info'", &["events"]),
            route("beta-firmware", "$body.firmware = 'beta'", &["alerts"]),
            route(
                "debug-or-extreme",
                "level = 'debug' OR $body.temperature >= 54",
                &["archive"],
            ),
        ],
        enrichments: vec![
            enrich("env", "bench"),
            enrich("hub", "$iothubname"),
            enrich("region", "$twin.tags.region"),
        ],
        fallback_enabled: true,
    }
}

/// The webhook hub's configuration: every device message to one webhook endpoint at `url`,
/// nothing to `events`.
pub fn webhook_config(url: &str) -> RoutingConfig {
    RoutingConfig {
        endpoints: vec![EndpointSpec {
            name: WEBHOOK_ENDPOINT.into(),
            kind: EndpointKind::Webhook,
            url: Some(url.into()),
        }],
        routes: vec![route("to-webhook", "true", &[WEBHOOK_ENDPOINT])],
        enrichments: Vec::new(),
        fallback_enabled: true,
    }
}

/// The webhook endpoint's name.
pub const WEBHOOK_ENDPOINT: &str = "hook";

/// The property bag device `i` sends (the same on the routed and the unrouted hub).
fn property_bag(i: usize) -> String {
    format!(
        "level={}&kind=telemetry&$.ct=application%2Fjson&$.ce=utf-8",
        LEVELS[i % LEVELS.len()]
    )
}

fn routed_topic(i: usize) -> String {
    format!("{}{}", telemetry::telemetry_topic(i), property_bag(i))
}

/// `temperature` 10 to 54 and `site` `site-0` to `site-4`, by device.
fn body_fields(i: usize) -> String {
    format!(
        "\"temperature\":{},\"site\":\"site-{}\",",
        10 + (i * 7) % 45,
        i % 5
    )
}

/// What the devices of the routing-cost phases publish.
pub const ROUTED_MESSAGES: Messages = Messages {
    topic: routed_topic,
    fields: body_fields,
};

/// The twin tags of device `i`.
fn tags(i: usize) -> serde_json::Value {
    json!({ "region": REGIONS[i % REGIONS.len()] })
}

/// What a configuration does with the devices' messages, decided by `twinhub_routing` (the
/// hub's own rules) for one message of each device.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Copies {
    /// Endpoint appends per device message (the devices publish at the same rate each).
    pub per_message: f64,
    /// Share of the messages each endpoint gets.
    pub per_endpoint: BTreeMap<String, f64>,
    /// Routes whose condition held, per message.
    pub routes_matched_per_message: f64,
    /// Share of the messages the fallback route took.
    pub fallback_share: f64,
}

/// Decides one message of each of `devices` devices with `config`.
pub fn expected_copies(config: &RoutingConfig, devices: usize, payload: usize) -> Result<Copies> {
    let router = Router::compile(config.clone(), HOSTNAME)
        .map_err(|e| Error::Setup(format!("the routing configuration: {e}")))?;
    let mut out = Copies::default();
    let n = devices.max(1);
    for i in 0..n {
        let body = ROUTED_MESSAGES.payload(payload, 0, i, 0).to_vec();
        let mut message = Message::from_property_bag(&property_bag(i), body)
            .map_err(|e| Error::Setup(format!("device {i}'s property bag: {e}")))?;
        message.stamp.device_id = device_id(i);
        let twin = json!({ "deviceId": device_id(i), "tags": tags(i) });
        let decision = router.decide(Source::DeviceMessages, &message, Some(&twin));
        out.per_message += decision.deliveries.len() as f64;
        out.routes_matched_per_message += decision.matched_routes.len() as f64;
        if decision.fallback {
            out.fallback_share += 1.0;
        }
        for d in &decision.deliveries {
            *out.per_endpoint.entry(d.endpoint.clone()).or_default() += 1.0;
        }
    }
    let n = n as f64;
    out.per_message /= n;
    out.routes_matched_per_message /= n;
    out.fallback_share /= n;
    for v in out.per_endpoint.values_mut() {
        *v /= n;
    }
    Ok(out)
}

/// A hub of the routing scenario with what talks to it.
pub struct ScenarioHub {
    pub hub: Hub,
    /// Trusts this hub's own dev CA.
    pub ctx: Ctx,
    pub target: Target,
    pub service: ServiceClient,
}

impl ScenarioHub {
    /// Starts a hub with a fresh data dir `dir` and `routing`, registers `devices` devices and
    /// gives each twin its `region` tag.
    pub async fn start(
        launch: &Launch,
        dir: &std::path::Path,
        name: &'static str,
        partitions: u32,
        routing: Option<RoutingConfig>,
        devices: usize,
        ctx: &Ctx,
    ) -> Result<ScenarioHub> {
        let options = hub::Options {
            partitions: Some(partitions),
            routing,
            ..hub::Options::default()
        };
        ctx.progress.note(&format!("starting {name}"));
        let hub = Hub::start_with_options(launch, dir, &options).await?;
        if let Some(pid) = hub.pid() {
            ctx.progress.note(&format!("{name} pid {pid}"));
        }
        let ready = async {
            let ctx = Ctx {
                tls: tls::Client::new(hub.ca_pem.as_bytes())?,
                progress: ctx.progress.clone(),
            };
            let service = hub.service()?;
            hub::register_devices(&service, devices, &ctx.progress).await?;
            tag_devices(&service, devices).await?;
            let target = Target {
                name,
                mqtt_addr: hub.mqtt_addr,
                pid: hub.pid(),
                flavor: Flavor::Hub {
                    services: vec![service.clone()],
                },
                watch: Vec::new(),
            };
            Ok::<_, Error>((ctx, target, service))
        }
        .await;
        match ready {
            Ok((ctx, target, service)) => Ok(ScenarioHub {
                hub,
                ctx,
                target,
                service,
            }),
            Err(e) => {
                hub.stop().await;
                Err(e)
            }
        }
    }

    pub async fn stop(self) {
        self.hub.stop().await;
    }

    /// The hub's Prometheus metrics.
    pub async fn metrics(&self) -> Result<Metrics> {
        scrape(&self.ctx.tls, self.hub.https_addr)
            .await
            .map(|text| Metrics { text })
    }
}

/// Sets every device's `region` tag, a few at a time.
async fn tag_devices(service: &ServiceClient, devices: usize) -> Result<()> {
    let mut pending = JoinSet::new();
    let mut next = 0;
    loop {
        while pending.len() < 8 && next < devices {
            let service = service.clone();
            let i = next;
            next += 1;
            pending.spawn(async move {
                service
                    .update_twin(&device_id(i), &json!({ "tags": tags(i) }), None)
                    .await
                    .map(|_| ())
            });
        }
        let Some(done) = pending.join_next().await else {
            return Ok(());
        };
        done.map_err(|e| Error::Setup(format!("a tagging task failed: {e}")))??;
    }
}

/// `GET /metrics` over HTTP/1.1 on the hub's HTTPS port (the endpoint takes no credentials).
async fn scrape(tls: &tls::Client, addr: SocketAddr) -> Result<String> {
    let limit = Duration::from_secs(10);
    let fetch = async {
        let mut stream = tls.connect(addr, None).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| Error::io("asking for /metrics", e))?;
        let mut raw = Vec::new();
        // The hub may close without a TLS close_notify: what arrived is the answer.
        if let Err(e) = stream.read_to_end(&mut raw).await
            && raw.is_empty()
        {
            return Err(Error::io("reading /metrics", e));
        }
        Ok(raw)
    };
    let raw = tokio::time::timeout(limit, fetch)
        .await
        .map_err(|_| Error::timeout("reading the hub's /metrics", limit))??;
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| Error::Protocol("/metrics answered without a head".into()))?;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(Error::Protocol(format!(
            "/metrics answered {}",
            head.lines().next().unwrap_or("")
        )));
    }
    let body = &raw[head_end + 4..];
    let body = if head.contains("transfer-encoding: chunked") {
        crate::hook::dechunk(body)
            .flatten()
            .map(|(b, _)| b)
            .ok_or_else(|| Error::Protocol("/metrics sent a broken chunked body".into()))?
    } else {
        body.to_vec()
    };
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// One scrape of a hub's Prometheus text.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    text: String,
}

impl Metrics {
    /// The samples of counter `name`, by their label text (`endpoint="alerts"`; empty when
    /// it has none).
    pub fn samples(&self, name: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for line in self.text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let (labels, value) = if let Some(inner) = rest.strip_prefix('{') {
                let Some((labels, value)) = inner.split_once('}') else {
                    continue;
                };
                (labels.to_string(), value)
            } else if rest.starts_with(' ') {
                (String::new(), rest)
            } else {
                continue;
            };
            if let Ok(v) = value.trim().parse::<f64>() {
                out.insert(labels, v);
            }
        }
        out
    }

    /// The sum of counter `name` over its labels.
    pub fn total(&self, name: &str) -> f64 {
        self.samples(name).values().sum()
    }

    /// The value of `name` with `key="value"` among its labels.
    pub fn labelled(&self, name: &str, key: &str, value: &str) -> f64 {
        let wanted = format!("{key}=\"{value}\"");
        self.samples(name)
            .into_iter()
            .filter(|(labels, _)| labels.split(',').any(|l| l.trim() == wanted))
            .map(|(_, v)| v)
            .sum()
    }

    /// Per label value of `key`, the growth of `name` from `before` to `self`.
    fn growth_by(&self, before: &Metrics, name: &str, key: &str) -> BTreeMap<String, u64> {
        let label_value = |labels: &str| {
            labels.split(',').find_map(|l| {
                let (k, v) = l.trim().split_once('=')?;
                (k == key).then(|| v.trim_matches('"').to_string())
            })
        };
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for (labels, after) in self.samples(name) {
            let Some(v) = label_value(&labels) else {
                continue;
            };
            let was = before.samples(name).get(&labels).copied().unwrap_or(0.0);
            *out.entry(v).or_default() += (after - was).max(0.0) as u64;
        }
        out
    }
}

const D2C: &str = "twinhub_d2c_messages_total";
const ENDPOINT_MESSAGES: &str = "twinhub_endpoint_messages_total";
const DROPPED: &str = "twinhub_routing_dropped_total";
const WEBHOOK_DELIVERED: &str = "twinhub_webhook_delivered_total";
const WEBHOOK_RETRIED: &str = "twinhub_webhook_retried_total";
const WEBHOOK_DEAD: &str = "twinhub_webhook_dead_lettered_total";

/// What the hub's metrics counted over one or more ingest rounds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Counted {
    /// Device messages taken in (warm-up and drain included).
    pub d2c_messages: u64,
    /// Copies appended to each endpoint (only counted on a hub with routes or enrichments:
    /// without, messages go straight to the built-in log).
    pub endpoint_copies: BTreeMap<String, u64>,
    pub dropped: u64,
}

impl Counted {
    fn between(before: &Metrics, after: &Metrics) -> Counted {
        Counted {
            d2c_messages: (after.total(D2C) - before.total(D2C)).max(0.0) as u64,
            endpoint_copies: after.growth_by(before, ENDPOINT_MESSAGES, "endpoint"),
            dropped: (after.total(DROPPED) - before.total(DROPPED)).max(0.0) as u64,
        }
    }

    fn add(&mut self, other: &Counted) {
        self.d2c_messages += other.d2c_messages;
        for (k, v) in &other.endpoint_copies {
            *self.endpoint_copies.entry(k.clone()).or_default() += v;
        }
        self.dropped += other.dropped;
    }

    /// Copies appended per device message, when the hub counted any.
    pub fn copies_per_message(&self) -> Option<f64> {
        let copies: u64 = self.endpoint_copies.values().sum();
        (self.d2c_messages > 0 && copies > 0).then(|| copies as f64 / self.d2c_messages as f64)
    }
}

/// One measured round on one hub.
pub struct Round {
    pub recorder: Recorder,
    pub throughput: Throughput,
    pub counted: Option<Counted>,
    /// fdatasyncs (machine-wide, `perf stat`) and bytes the hub wrote over the window.
    pub log: Option<LogCounters>,
}

/// One round of closed-loop ingest on `hub`.
pub async fn ingest_round(hub: &ScenarioHub, shape: Shape, label: &str) -> Result<Round> {
    let before = hub.metrics().await.ok();
    let conns = telemetry::publishers(&hub.ctx, &hub.target, shape.devices).await?;
    let window = Window::starting_now(shape.warmup, shape.duration);
    let log = hub.target.pid.map(|pid| telemetry::log_probe(pid, window));
    let (recorder, cpu) = telemetry::closed_loops(
        &hub.ctx,
        &hub.target,
        conns,
        shape.telemetry(),
        ROUTED_MESSAGES,
        window,
        label,
    )
    .await;
    let throughput = Throughput {
        cpu,
        ..recorder.throughput(window.measured())
    };
    let log = match log {
        Some(probe) => probe
            .await
            .ok()
            .and_then(|raw| raw.counters(throughput.completed)),
        None => None,
    };
    hub::wait_disconnected(&hub.service, Duration::from_secs(60)).await?;
    let after = hub.metrics().await.ok();
    let counted = before
        .zip(after)
        .map(|(before, after)| Counted::between(&before, &after));
    Ok(Round {
        recorder,
        throughput,
        counted,
        log,
    })
}

/// One hub's ingest over every round.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IngestFigures {
    /// Each round's figures (acknowledgements in the window, latency to the PUBACK, CPU).
    pub rounds: Vec<Throughput>,
    pub completed: u64,
    pub seconds: f64,
    pub messages_per_second: f64,
    /// Publish to PUBACK over every round.
    pub latency: Latency,
    /// The hub's CPU over the windows, in cores, and per acknowledged message.
    pub server_cores: Option<f64>,
    pub server_us_per_message: Option<f64>,
    pub bench_cores: Option<f64>,
    /// Busy cores besides the hub and the bench, steal included.
    pub other_cores: Option<f64>,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// What the hub's `/metrics` counted over the rounds (warm-ups included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counted: Option<Counted>,
    /// Endpoint appends per device message, from `counted`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copies_per_message: Option<f64>,
    /// fdatasyncs and disk writes over the windows (needs `perf` and the syscall
    /// tracepoints, as for telemetry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<LogCounters>,
}

impl IngestFigures {
    pub fn from_rounds(rounds: Vec<Round>) -> IngestFigures {
        let rounds_empty = rounds.is_empty();
        let mut all = Recorder::new();
        let mut counted: Option<Counted> = None;
        let mut seconds = 0.0;
        let (mut server, mut bench, mut other) = (Some(0.0), Some(0.0), Some(0.0));
        // fdatasyncs, seconds probed, bytes written; absent if any round lacks them.
        let mut log = Some((0u64, 0.0f64, Some(0.0f64)));
        let add = |sum: &mut Option<f64>, v: Option<f64>, secs: f64| {
            *sum = sum.zip(v).map(|(s, v)| s + v * secs);
        };
        for r in &rounds {
            all.merge(&r.recorder);
            let t = &r.throughput;
            seconds += t.seconds;
            let cpu = t.cpu.unwrap_or_default();
            add(&mut server, cpu.server_cores, t.seconds);
            add(&mut bench, cpu.client_cores, t.seconds);
            let others = cpu
                .other_cores()
                .map(|o| o + cpu.steal_cores.unwrap_or(0.0));
            add(&mut other, others, t.seconds);
            log = log.zip(r.log).map(|((n, secs, bytes), l)| {
                let written = l.disk_bytes_per_message.map(|b| b * t.completed as f64);
                (
                    n + l.fdatasyncs,
                    secs + l.seconds,
                    bytes.zip(written).map(|(a, b)| a + b),
                )
            });
            match (&mut counted, &r.counted) {
                (None, Some(c)) => counted = Some(c.clone()),
                (Some(sum), Some(c)) => sum.add(c),
                _ => {}
            }
        }
        let t = all.throughput(Duration::from_secs_f64(seconds));
        let per_window = |v: Option<f64>| v.filter(|_| seconds > 0.0).map(|v| v / seconds);
        let server_cores = per_window(server);
        IngestFigures {
            rounds: rounds.into_iter().map(|r| r.throughput).collect(),
            completed: t.completed,
            seconds,
            messages_per_second: t.per_second,
            latency: t.latency,
            server_us_per_message: server_cores.and_then(|c| {
                CpuUse {
                    server_cores: Some(c),
                    ..CpuUse::default()
                }
                .server_us_per_op(t.per_second)
            }),
            server_cores,
            bench_cores: per_window(bench),
            other_cores: per_window(other),
            errors: t.errors,
            first_error: t.first_error,
            copies_per_message: counted.as_ref().and_then(Counted::copies_per_message),
            counted,
            log: log
                .filter(|_| !rounds_empty)
                .map(|(fdatasyncs, secs, bytes)| {
                    let secs_ = secs.max(1e-9);
                    LogCounters {
                        seconds: secs,
                        fdatasyncs,
                        fdatasyncs_per_second: fdatasyncs as f64 / secs_,
                        messages_per_fdatasync: if fdatasyncs > 0 {
                            t.completed as f64 / fdatasyncs as f64
                        } else {
                            0.0
                        },
                        disk_bytes_per_message: bytes
                            .filter(|_| t.completed > 0)
                            .map(|b| b / t.completed as f64),
                    }
                }),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Webhook

/// The backlog phase's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WebhookBacklog {
    /// Messages published and acknowledged (all routed to the webhook).
    pub backlog: u64,
    pub fill_seconds: f64,
    pub fill_per_second: f64,
    /// Requests the receiver got in all, and while the devices were still publishing.
    pub delivered: u64,
    pub delivered_during_fill: u64,
    pub per_second_during_fill: f64,
    /// From the end of the fill to the last arrival, and the rate over it.
    pub drain_seconds: Option<f64>,
    pub per_second_draining: Option<f64>,
    /// From the first arrival to the last.
    pub per_second_overall: Option<f64>,
    /// The hub's CPU while only delivering (the drain), in cores and per delivery.
    pub server_cores_draining: Option<f64>,
    pub server_us_per_delivery: Option<f64>,
    pub bench_cores_draining: Option<f64>,
    pub machine_cores_draining: Option<f64>,
    /// The hub's `twinhub_webhook_*_total` over the phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub_delivered: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub_retried: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hub_dead_lettered: Option<u64>,
    /// Whether every message arrived within the drain limit.
    pub complete: bool,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// The fixed-rate phase's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WebhookLag {
    pub target_per_second: f64,
    pub sent_per_second: f64,
    pub sent: u64,
    pub received: u64,
    pub duplicates: u64,
    pub seconds: f64,
    /// From the hub's enqueued time (`ce-time`, milliseconds: 0 to 1 ms high) to the arrival.
    pub enqueued_to_received: Latency,
    /// From the device's publish to the arrival (one clock, microseconds).
    pub publish_to_received: Latency,
    /// From the publish to its PUBACK.
    pub ack_latency: Latency,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuUse>,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// The webhook phases.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WebhookRun {
    /// What the hub delivers with (its defaults: `twinhub serve` has no webhook settings).
    pub receiver: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog: Option<WebhookBacklog>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<WebhookLag>,
    /// Requests without a readable `ce-time`.
    pub untimed: u64,
}

/// Publishes one message and waits (up to `limit`) for the receiver to get it: whether this
/// hub delivers webhooks at all.
pub async fn webhook_probe(hub: &ScenarioHub, hook: &HookServer, limit: Duration) -> Result<bool> {
    let mut conns = telemetry::publishers(&hub.ctx, &hub.target, 1).await?;
    let Some(conn) = conns.pop() else {
        return Ok(false);
    };
    let before = hook.requests();
    let deadline = Instant::now() + limit;
    let topic = Bytes::from(telemetry::telemetry_topic(0));
    let payload = telemetry::stamped_payload(64, 0, 0, 0);
    telemetry::fill(conn, 0, topic, payload, 1, 1, deadline).await?;
    while hook.requests() == before {
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hub::wait_disconnected(&hub.service, Duration::from_secs(60)).await?;
    Ok(true)
}

fn cpu_now(pid: Option<u32>) -> (Option<f64>, Option<f64>, Option<f64>) {
    (
        pid.and_then(cpu_seconds),
        cpu_seconds(std::process::id()),
        machine_cpu_seconds().map(|m| m.busy),
    )
}

/// Publishes `shape.backlog` messages as fast as the hub acknowledges them and times their
/// arrival at the receiver.
pub async fn webhook_backlog(
    hub: &ScenarioHub,
    hook: &HookServer,
    shape: WebhookShape,
) -> Result<WebhookBacklog> {
    let mut out = WebhookBacklog::default();
    let devices = shape.devices.clamp(1, shape.backlog.max(1));
    let conns = telemetry::publishers(&hub.ctx, &hub.target, devices).await?;
    let before = hub.metrics().await.ok();
    let bar = hub
        .ctx
        .progress
        .bar("webhook backlog", shape.backlog as u64);
    hook.reset();
    let base_requests = hook.requests();
    let started = Instant::now();
    let deadline = started + shape.drain_limit;
    let mut set = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let count = shape.backlog / devices + usize::from(i < shape.backlog % devices);
        let topic = Bytes::from(telemetry::telemetry_topic(i));
        let payload = telemetry::stamped_payload(shape.payload, 0, i, 0);
        set.spawn(telemetry::fill(
            conn,
            i,
            topic,
            payload,
            count,
            shape.inflight.max(1),
            deadline,
        ));
    }
    let mut filled = 0u64;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(n)) => filled += n,
            Ok(Err(e)) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
            }
            Err(e) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("a device task failed: {e}"));
            }
        }
    }
    let fill_end = Instant::now();
    let cpu_0 = cpu_now(hub.target.pid);
    let during_fill = hook.requests() - base_requests;
    out.backlog = filled;
    out.fill_seconds = fill_end.duration_since(started).as_secs_f64();
    out.fill_per_second = filled as f64 / out.fill_seconds.max(1e-9);
    out.delivered_during_fill = during_fill;
    out.per_second_during_fill = during_fill as f64 / out.fill_seconds.max(1e-9);
    bar.set_position(during_fill);

    // The drain: the hub only delivers now.
    let mut delivered = during_fill;
    while delivered < filled && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        delivered = hook.requests() - base_requests;
        bar.set_position(delivered);
    }
    let cpu_1 = cpu_now(hub.target.pid);
    let span = fill_end.elapsed().as_secs_f64().max(1e-9);
    bar.finish();
    out.delivered = delivered;
    out.complete = delivered >= filled;
    let (first, last) = hook.first_last();
    if let Some(last) = last.filter(|_| out.complete) {
        let drain = last.saturating_duration_since(fill_end).as_secs_f64();
        out.drain_seconds = Some(drain);
        if drain > 0.0 && delivered > during_fill {
            out.per_second_draining = Some((delivered - during_fill) as f64 / drain);
            let cores = |a: Option<f64>, b: Option<f64>| Some((b? - a?).max(0.0) / span);
            out.server_cores_draining = cores(cpu_0.0, cpu_1.0);
            out.bench_cores_draining = cores(cpu_0.1, cpu_1.1);
            out.machine_cores_draining = cores(cpu_0.2, cpu_1.2);
            out.server_us_per_delivery = cpu_0
                .0
                .zip(cpu_1.0)
                .map(|(a, b)| (b - a).max(0.0) * 1e6 / (delivered - during_fill) as f64);
        }
        if let Some(first) = first {
            let span = last.saturating_duration_since(first).as_secs_f64();
            out.per_second_overall = (span > 0.0).then(|| delivered as f64 / span);
        }
    }
    // Let the hub's counters catch up with the last deliveries' bookkeeping.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let (Some(before), Ok(after)) = (before, hub.metrics().await) {
        let grew = |name: &str| {
            (after.labelled(name, "endpoint", WEBHOOK_ENDPOINT)
                - before.labelled(name, "endpoint", WEBHOOK_ENDPOINT))
            .max(0.0) as u64
        };
        out.hub_delivered = Some(grew(WEBHOOK_DELIVERED));
        out.hub_retried = Some(grew(WEBHOOK_RETRIED));
        out.hub_dead_lettered = Some(grew(WEBHOOK_DEAD));
    }
    hub::wait_disconnected(&hub.service, Duration::from_secs(60)).await?;
    Ok(out)
}

/// Publishes at `shape.rate` and times each message at the receiver.
pub async fn webhook_lag(
    hub: &ScenarioHub,
    hook: &HookServer,
    shape: WebhookShape,
) -> Result<WebhookLag> {
    let conns = telemetry::publishers(&hub.ctx, &hub.target, shape.devices).await?;
    let tshape = telemetry::Shape {
        devices: shape.devices,
        inflight: 1,
        payload: shape.payload,
        warmup: shape.warmup,
        duration: Duration::ZERO,
        rate: shape.rate,
        latency_duration: shape.latency_duration,
    };
    let base = Instant::now();
    let window = Window::starting_now(shape.warmup, shape.latency_duration);
    hook.measure(base, window);
    let cpu = super::cpu_probe(hub.target.pid, window);
    let bar = super::window_bar(&hub.ctx, "webhook lag", window);
    let paced = telemetry::paced_all(conns, tshape, Messages::PLAIN, window, base).await;
    bar.abort();
    // Let the last messages of the window arrive.
    let deadline = Instant::now() + super::DRAIN_LIMIT;
    while hook.measured_received() < paced.sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let measured = hook.take_measured();
    let seconds = window.measured().as_secs_f64();
    let acks = paced.acks.throughput(window.measured());
    hub::wait_disconnected(&hub.service, Duration::from_secs(60)).await?;
    Ok(WebhookLag {
        target_per_second: shape.rate,
        sent_per_second: paced.sent as f64 / seconds.max(1e-9),
        sent: paced.sent,
        received: measured.received,
        duplicates: measured.duplicates,
        seconds,
        enqueued_to_received: measured.enqueued_to_received.latency(),
        publish_to_received: measured.publish_to_received.latency(),
        ack_latency: acks.latency,
        cpu: super::cpu_of(cpu).await,
        errors: acks.errors,
        first_error: acks.first_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_routed_configuration_is_valid_and_makes_several_copies() {
        let config = routed_config();
        assert_eq!(config.routes.len(), 10);
        assert_eq!(config.enrichments.len(), 3);
        config.validate().expect("valid");
        let copies = expected_copies(&config, 100, 1024).expect("decided");
        // Every message reaches events (routes 7 and 8 together take all) and archive.
        assert_eq!(copies.per_endpoint.get("events"), Some(&1.0));
        assert_eq!(copies.per_endpoint.get("archive"), Some(&1.0));
        assert!(
            copies.per_message > 2.0 && copies.per_message < 4.0,
            "{copies:?}"
        );
        assert_eq!(copies.fallback_share, 0.0);
        // Without routes, each message is appended once, to events.
        let plain = expected_copies(&RoutingConfig::default(), 10, 1024).expect("decided");
        assert_eq!(plain.per_message, 1.0);
        webhook_config("http://127.0.0.1:1/x")
            .validate()
            .expect("valid");
    }

    #[test]
    fn messages_carry_the_properties_and_body_the_routes_read() {
        let topic = routed_topic(3);
        assert!(topic.starts_with("devices/dev-000003/messages/events/level=critical&"));
        let body = ROUTED_MESSAGES.payload(1024, 5, 3, 7);
        assert_eq!(body.len(), 1024);
        assert_eq!(telemetry::payload_stamp(&body), Some((5, 3, 7)));
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(json["temperature"], 31);
        assert_eq!(json["site"], "site-3");
    }

    #[test]
    fn prometheus_counters_are_read_by_label() {
        let before = Metrics {
            text: "# TYPE x counter\ntwinhub_d2c_messages_total 10\n\
                   twinhub_endpoint_messages_total{endpoint=\"events\"} 10\n"
                .into(),
        };
        let after = Metrics {
            text: "twinhub_d2c_messages_total 110\n\
                   twinhub_d2c_messages_total_other 5\n\
                   twinhub_endpoint_messages_total{endpoint=\"events\"} 110\n\
                   twinhub_endpoint_messages_total{endpoint=\"alerts\"} 50\n"
                .into(),
        };
        assert_eq!(after.total(D2C), 110.0);
        assert_eq!(
            after.labelled(ENDPOINT_MESSAGES, "endpoint", "alerts"),
            50.0
        );
        let c = Counted::between(&before, &after);
        assert_eq!(c.d2c_messages, 100);
        assert_eq!(c.endpoint_copies.get("events"), Some(&100));
        assert_eq!(c.endpoint_copies.get("alerts"), Some(&50));
        assert_eq!(c.copies_per_message(), Some(1.5));
        assert_eq!(Counted::default().copies_per_message(), None);
    }

    #[test]
    fn rounds_add_up_to_rates_and_cpu_per_message() {
        let round = |n: u64, cores: f64| {
            let mut rec = Recorder::new();
            for _ in 0..n {
                rec.record(Duration::from_micros(500));
            }
            let throughput = Throughput {
                cpu: Some(CpuUse {
                    server_cores: Some(cores),
                    client_cores: Some(0.5),
                    machine_cores: Some(cores + 0.5),
                    steal_cores: Some(0.0),
                }),
                ..rec.throughput(Duration::from_secs(1))
            };
            Round {
                recorder: rec,
                throughput,
                counted: None,
                log: Some(LogCounters {
                    seconds: 1.0,
                    fdatasyncs: 100,
                    disk_bytes_per_message: Some(2048.0),
                    ..LogCounters::default()
                }),
            }
        };
        let f = IngestFigures::from_rounds(vec![round(1000, 1.0), round(3000, 1.0)]);
        assert_eq!(f.completed, 4000);
        assert!((f.messages_per_second - 2000.0).abs() < 1e-6);
        // 2 core-seconds over 4,000 messages.
        assert!((f.server_us_per_message.unwrap_or(0.0) - 500.0).abs() < 1e-6);
        assert_eq!(f.rounds.len(), 2);
        let log = f.log.expect("fdatasyncs counted");
        assert_eq!(log.fdatasyncs, 200);
        assert!((log.messages_per_fdatasync - 20.0).abs() < 1e-9);
        assert_eq!(log.disk_bytes_per_message, Some(2048.0));
    }
}
