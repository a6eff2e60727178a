//! Webhook endpoints end to end: a real hub in-process routes MQTT telemetry to webhook
//! endpoints pointed at small HTTP servers on loopback (axum), which answer as each test
//! needs: CloudEvents headers and properties arrive, a webhook that fails for a while gets
//! every message after it recovers, one that never recovers (or refuses with 400) fills its
//! dead-letter stream while a stream endpoint and a healthy webhook keep flowing, and a
//! restart resumes from the saved cursor. Retries are made fast for the tests through
//! `WebhookOptions::set_process_default`.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use support::*;
use twinhub_eventlog::{EventLog, partition_for};
use twinhub_mqtt::{Packet, Publish, QoS, Topic};
use twinhub_proto::message::Message;
use twinhub_routing::{EndpointKind, EndpointSpec, RouteSpec, Source};
use twinhub_server::webhook::{WebhookOptions, dead_letter_log};

const WAIT: Duration = Duration::from_secs(20);
const ATTEMPTS: u32 = 4;

/// Retries within a second, so that dead-lettering takes well under one.
fn fast_retries() -> WebhookOptions {
    WebhookOptions {
        max_attempts: ATTEMPTS,
        max_retry_time: Duration::from_secs(30),
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        request_timeout: Duration::from_secs(2),
        max_in_flight: 16,
        cursor_interval: Duration::from_millis(100),
        extra_ca_pem: Vec::new(),
    }
}

/// A hub whose webhooks retry fast.
async fn fast_hub() -> TestHub {
    TestHub::start_with(|c| c.webhook_tuning = Some(fast_retries())).await
}

/// One request a test server got.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
    status: u16,
}

/// A webhook receiver on 127.0.0.1 answering `status` (after `delay_ms`).
#[derive(Clone)]
struct Hook {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    /// Requests that have started (answered or not).
    started: Arc<AtomicUsize>,
}

async fn answer(State(hook): State<Hook>, headers: HeaderMap, body: Bytes) -> (StatusCode, String) {
    hook.started.fetch_add(1, Ordering::SeqCst);
    let delay = hook.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = hook.status.load(Ordering::SeqCst);
    hook.got.lock().unwrap().push(Received {
        headers,
        body,
        status,
    });
    let text = if status == 400 {
        "the payload is not what we want"
    } else {
        ""
    };
    (StatusCode::from_u16(status).unwrap(), text.to_owned())
}

impl Hook {
    async fn start(status: u16) -> Hook {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook = Hook {
            addr: listener.local_addr().unwrap(),
            got: Arc::default(),
            status: Arc::new(AtomicU16::new(status)),
            delay_ms: Arc::default(),
            started: Arc::default(),
        };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(answer))
            .with_state(hook.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        hook
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    fn delivered(&self) -> Vec<Received> {
        self.all()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    /// Bodies answered 2xx, with how often each was.
    fn delivered_bodies(&self) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for r in self.delivered() {
            *seen
                .entry(String::from_utf8(r.body.to_vec()).unwrap())
                .or_default() += 1;
        }
        seen
    }
}

/// Waits until `check` holds; panics with `what` after [`WAIT`].
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every message in `log`.
async fn read_all(log: &Arc<dyn EventLog>) -> Vec<Message> {
    let mut all = Vec::new();
    for p in 0..log.partition_count() {
        for e in log.read(p, 0, 100_000, usize::MAX).await.unwrap() {
            all.push(Message::decode(&e.data).unwrap());
        }
    }
    all
}

async fn until_log_holds(what: &str, log: &Arc<dyn EventLog>, n: usize) -> Vec<Message> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let all = read_all(log).await;
        if all.len() >= n {
            assert_eq!(all.len(), n, "{what}: more than expected");
            return all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {} of {n} within {WAIT:?}",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn property<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
    m.application
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
}

async fn webhook(hub: &TestHub, name: &str, url: &str) {
    hub.server()
        .hub
        .add_endpoint(EndpointSpec {
            name: name.into(),
            kind: EndpointKind::Webhook,
            url: Some(url.into()),
        })
        .await
        .unwrap();
}

async fn stream(hub: &TestHub, name: &str) {
    hub.server()
        .hub
        .add_endpoint(EndpointSpec {
            name: name.into(),
            kind: EndpointKind::Stream,
            url: None,
        })
        .await
        .unwrap();
}

async fn route(hub: &TestHub, name: &str, endpoints: &[&str]) {
    hub.server()
        .hub
        .add_route(RouteSpec {
            name: name.into(),
            source: Source::DeviceMessages,
            condition: "true".into(),
            endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
            enabled: true,
        })
        .await
        .unwrap();
}

/// A connected raw MQTT device that publishes telemetry at QoS 1.
struct Device {
    id: String,
    mqtt: RawMqtt,
    pkid: u16,
}

impl Device {
    async fn connect(hub: &TestHub, id: &str, key: &str) -> Device {
        Device {
            id: id.to_owned(),
            mqtt: RawMqtt::device(hub, id, key, true).await.0,
            pkid: 0,
        }
    }

    /// Publishes and waits for the PUBACK (the append to every endpoint's log is durable).
    async fn send(&mut self, bag: &str, body: &[u8]) {
        self.pkid += 1;
        self.mqtt
            .send(&Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: Topic::try_from(format!("devices/{}/messages/events/{bag}", self.id))
                    .unwrap(),
                pkid: self.pkid,
                payload: Bytes::copy_from_slice(body),
            }))
            .await;
        match self.mqtt.recv_within(WAIT).await {
            Ok(Some(Packet::PubAck(id))) => assert_eq!(id, self.pkid),
            other => panic!("expected PUBACK {}, got {other:?}", self.pkid),
        }
    }
}

fn header<'a>(r: &'a Received, name: &str) -> &'a str {
    r.headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {:?}", r.headers))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn telemetry_reaches_the_webhook_as_a_cloudevent_with_its_properties() {
    let hub = fast_hub().await;
    let hook = Hook::start(200).await;
    webhook(&hub, "wh", &hook.url()).await;
    route(&hub, "all", &["wh"]).await;
    let key = hub.device("wh-dev").await;
    let mut d = Device::connect(&hub, "wh-dev", &key).await;
    let before = jiff::Timestamp::now();
    d.send(
        "%24.mid=m1&%24.cid=c1&%24.ct=application%2Fjson&%24.ce=utf-8&Temp-Alert=true&note=h%C3%A9%20%22hi%22&bare",
        br#"{"t":21}"#,
    )
    .await;
    d.send("plain=1", b"\x00\x01raw").await;
    until("two deliveries", || hook.delivered().len() == 2).await;
    let got = hook.delivered();
    let (json, raw) = if got[0].body.as_ref() == br#"{"t":21}"# {
        (&got[0], &got[1])
    } else {
        (&got[1], &got[0])
    };

    assert_eq!(json.body.as_ref(), br#"{"t":21}"#);
    assert_eq!(header(json, "ce-specversion"), "1.0");
    assert_eq!(header(json, "ce-id"), "m1");
    assert_eq!(header(json, "ce-source"), "/twinhub/twinhub/devices/wh-dev");
    assert_eq!(header(json, "ce-type"), "Microsoft.Devices.DeviceTelemetry");
    assert_eq!(header(json, "ce-subject"), "wh-dev");
    assert_eq!(header(json, "content-type"), "application/json");
    let time: jiff::Timestamp = header(json, "ce-time").parse().unwrap();
    assert!(
        time >= before - jiff::SignedDuration::from_secs(1)
            && time <= jiff::Timestamp::now() + jiff::SignedDuration::from_secs(1),
        "ce-time {time} is not the enqueued time"
    );
    assert_eq!(header(json, "ce-iothubconnectiondeviceid"), "wh-dev");
    assert_eq!(header(json, "ce-iothubmessageid"), "m1");
    assert_eq!(header(json, "ce-iothubcorrelationid"), "c1");
    assert_eq!(header(json, "ce-iothubcontentencoding"), "utf-8");
    assert_eq!(header(json, "ce-iothubmessagesource"), "Telemetry");
    // Application properties: names lower-cased with other characters dropped, values
    // percent-encoded as the CloudEvents HTTP binding says.
    assert_eq!(header(json, "ce-tempalert"), "true");
    assert_eq!(header(json, "ce-note"), "h%C3%A9%20%22hi%22");
    assert_eq!(header(json, "ce-bare"), "");

    // No message id: the position in the endpoint's log; no content type: octets.
    let p = partition_for("wh-dev", 4);
    assert_eq!(raw.body.as_ref(), b"\x00\x01raw");
    assert_eq!(header(raw, "ce-id"), format!("{p}-1"));
    assert_eq!(header(raw, "content-type"), "application/octet-stream");
    assert_eq!(header(raw, "ce-plain"), "1");
    assert!(raw.headers.get("ce-iothubmessageid").is_none());
    // Nothing was retried or dead-lettered.
    assert_eq!(hook.all().len(), 2);
    let dl = dead_letter_log(&hub.server().hub, "wh").await.unwrap();
    assert!(read_all(&dl).await.is_empty());
}

#[tokio::test]
async fn a_webhook_that_fails_for_a_while_gets_every_message_after_it_recovers() {
    let hub = fast_hub().await;
    let hook = Hook::start(503).await;
    webhook(&hub, "flaky", &hook.url()).await;
    route(&hub, "all", &["flaky"]).await;
    let key = hub.device("flaky-dev").await;
    let mut d = Device::connect(&hub, "flaky-dev", &key).await;
    for i in 0..20 {
        d.send(&format!("i={i}"), format!("m{i}").as_bytes()).await;
    }
    // Every message in flight has been refused at least once before the webhook recovers.
    until("first refusals", || hook.all().len() >= 16).await;
    hook.status.store(200, Ordering::SeqCst);
    until("all 20 delivered", || hook.delivered_bodies().len() == 20).await;
    let bodies = hook.delivered_bodies();
    for i in 0..20 {
        assert!(bodies.contains_key(&format!("m{i}")), "m{i} missing");
    }
    assert!(hook.all().iter().any(|r| r.status == 503));
    let dl = dead_letter_log(&hub.server().hub, "flaky").await.unwrap();
    assert!(read_all(&dl).await.is_empty(), "nothing was dead-lettered");
}

#[tokio::test]
async fn dead_webhooks_fill_their_dead_letter_streams_while_other_endpoints_keep_flowing() {
    let hub = fast_hub().await;
    // Slow refusals: dead-lettering 10 messages takes seconds, the others must not wait.
    let dead = Hook::start(503).await;
    dead.delay_ms.store(1000, Ordering::SeqCst);
    let bad = Hook::start(400).await;
    let ok = Hook::start(204).await;
    webhook(&hub, "dead", &dead.url()).await;
    webhook(&hub, "bad", &bad.url()).await;
    webhook(&hub, "ok", &ok.url()).await;
    stream(&hub, "st").await;
    route(&hub, "all", &["dead", "bad", "ok", "st"]).await;
    let key = hub.device("dl-dev").await;
    let mut d = Device::connect(&hub, "dl-dev", &key).await;
    for i in 0..10 {
        d.send(&format!("i={i}"), format!("m{i}").as_bytes()).await;
    }
    let server = &hub.server().hub;
    let st = server.endpoint_log("st").unwrap();
    until_log_holds("the stream", &st, 10).await;
    until("the healthy webhook", || ok.delivered_bodies().len() == 10).await;
    let dead_dl = dead_letter_log(server, "dead").await.unwrap();
    // 4 attempts of at least a second each: the dead webhook is still at it.
    assert!(
        read_all(&dead_dl).await.len() < 10,
        "the stream and the healthy webhook waited for the dead one"
    );

    // A refusal is final: one attempt each, the answer quoted.
    let bad_dl = dead_letter_log(server, "bad").await.unwrap();
    let refused = until_log_holds("bad's dead letters", &bad_dl, 10).await;
    for m in &refused {
        assert_eq!(property(m, "webhook-attempts"), Some("1"));
        assert_eq!(
            property(m, "webhook-error"),
            Some("HTTP 400 Bad Request: the payload is not what we want")
        );
        assert_eq!(m.stamp.device_id, "dl-dev");
    }
    assert_eq!(bad.all().len(), 10, "a 400 is not retried");

    let failed = until_log_holds("dead's dead letters", &dead_dl, 10).await;
    let mut bodies: Vec<String> = failed
        .iter()
        .map(|m| String::from_utf8(m.body.clone()).unwrap())
        .collect();
    bodies.sort();
    let mut want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    want.sort();
    assert_eq!(bodies, want);
    for m in &failed {
        assert_eq!(
            property(m, "webhook-attempts"),
            Some(ATTEMPTS.to_string().as_str())
        );
        assert_eq!(
            property(m, "webhook-error"),
            Some("HTTP 503 Service Unavailable")
        );
        // The message as routed, properties and all.
        assert!(property(m, "i").is_some());
    }
    assert_eq!(dead.all().len(), 10 * ATTEMPTS as usize);
    assert!(dead.delivered().is_empty());
}

#[tokio::test]
async fn a_restart_resumes_from_the_saved_cursor() {
    let mut hub = fast_hub().await;
    let hook = Hook::start(200).await;
    webhook(&hub, "wh", &hook.url()).await;
    route(&hub, "all", &["wh"]).await;
    let key = hub.device("rs-dev").await;
    let mut d = Device::connect(&hub, "rs-dev", &key).await;
    for i in 0..5 {
        d.send("", format!("a{i}").as_bytes()).await;
    }
    until("the first five", || hook.delivered_bodies().len() == 5).await;

    // The webhook stops answering; three messages are in flight when the hub stops.
    hook.delay_ms.store(60_000, Ordering::SeqCst);
    for i in 0..3 {
        d.send("", format!("b{i}").as_bytes()).await;
    }
    until("three requests hanging", || {
        hook.started.load(Ordering::SeqCst) == 8
    })
    .await;
    drop(d);
    // Requests already hanging stay so (the delay is read as each starts).
    hook.delay_ms.store(0, Ordering::SeqCst);
    hub.restart().await;

    until("the three after the restart", || {
        hook.delivered_bodies().len() == 8
    })
    .await;
    let mut d = Device::connect(&hub, "rs-dev", &key).await;
    d.send("", b"c0").await;
    until("one more", || hook.delivered_bodies().len() == 9).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The delivered ones were not delivered again: the cursor was saved at shutdown.
    for (body, n) in hook.delivered_bodies() {
        assert_eq!(n, 1, "{body} delivered {n} times");
    }
    let dl = dead_letter_log(&hub.server().hub, "wh").await.unwrap();
    assert!(read_all(&dl).await.is_empty());
}

/// Delivery throughput to a local server that answers at once: messages are appended straight
/// to the endpoint's log (ingestion is measured elsewhere), then timed until all are accepted.
/// Run with `cargo test --release -p twinhub-server --test webhook -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn throughput_to_a_local_server() {
    for in_flight in [16, 64] {
        measure_throughput(in_flight).await;
    }
}

async fn measure_throughput(in_flight: usize) {
    const N: usize = 20_000;
    const BATCH: usize = 100;
    const DEVICES: usize = 16;
    let mut hub = TestHub::start_with(move |c| {
        c.webhook_tuning = Some(WebhookOptions {
            max_in_flight: in_flight,
            ..fast_retries()
        })
    })
    .await;
    let hook = Hook::start(200).await;
    webhook(&hub, "tp", &hook.url()).await;
    let log = hub.server().hub.endpoint_log("tp").unwrap();
    let started = tokio::time::Instant::now();
    for chunk in 0..N / BATCH {
        let device = format!("tp-{}", chunk % DEVICES);
        let events = (0..BATCH)
            .map(|i| {
                let mut m = Message::from_property_bag(
                    &format!("%24.mid={chunk}-{i}&%24.ct=application%2Fjson&a=1&b=two&c=3"),
                    vec![b'x'; 256],
                )
                .unwrap();
                m.stamp.device_id = device.clone();
                m.stamp.source = "Telemetry".into();
                twinhub_eventlog::NewEvent::new(m.encode())
            })
            .collect();
        log.append(partition_for(&device, log.partition_count()), events)
            .await
            .unwrap();
    }
    let appended = started.elapsed();
    until("all delivered", || hook.got.lock().unwrap().len() >= N).await;
    let took = started.elapsed();
    println!(
        "in flight {in_flight}: {N} messages (256-byte bodies, 3 properties) appended in \
         {appended:?}, delivered in {took:?}: {:.0} messages/s",
        N as f64 / took.as_secs_f64()
    );
    hub.stop().await;
}

#[tokio::test]
async fn system_events_carry_their_source_as_the_event_type() {
    let hub = fast_hub().await;
    let hook = Hook::start(200).await;
    webhook(&hub, "wh", &hook.url()).await;
    hub.server()
        .hub
        .add_route(RouteSpec {
            name: "lifecycle".into(),
            source: Source::DeviceLifecycleEvents,
            condition: "true".into(),
            endpoints: vec!["wh".into()],
            enabled: true,
        })
        .await
        .unwrap();
    hub.device("born").await;
    until("the lifecycle event", || hook.delivered().len() == 1).await;
    let got = &hook.delivered()[0];
    assert_eq!(
        header(got, "ce-type"),
        "Microsoft.Devices.deviceLifecycleEvents"
    );
    assert_eq!(header(got, "ce-source"), "/twinhub/twinhub/devices/born");
    assert_eq!(header(got, "ce-subject"), "born");
    assert_eq!(
        header(got, "ce-iothubmessagesource"),
        "deviceLifecycleEvents"
    );
    assert_eq!(header(got, "ce-optype"), "createDeviceIdentity");
    assert!(header(got, "content-type").starts_with("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["deviceId"], "born");
}
