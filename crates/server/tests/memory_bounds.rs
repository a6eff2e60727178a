//! Memory bounds under hostile input, measured as this process's resident memory: the hub
//! runs in-process, so these tests take one lock and run one at a time (other tests in the
//! same binary would move the figure).

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use support::*;
use twinhub_mqtt::{Packet, QoS};

static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// F2: REST authorizes from the headers before reading a body. Fifty unauthenticated HTTP/2
/// streams, each with a body that never ends, are all refused with 401 at once.
#[tokio::test(flavor = "multi_thread")]
async fn unauthenticated_bodies_are_refused_before_they_are_read() {
    let _alone = ALONE.lock().await;
    let hub = TestHub::start().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(hub.ca_pem()).unwrap()).unwrap(),
        )
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let url = format!(
        "https://localhost:{}/twins/x?api-version=2021-04-12",
        hub.https.port()
    );
    let before = rss_kib();
    let started = Instant::now();
    let mut calls = Vec::new();
    for _ in 0..50 {
        // 64 KiB, then silence: a server that reads before authorizing waits for ever.
        let chunk = bytes::Bytes::from(vec![b' '; 64 * 1024]);
        let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(chunk) })
            .chain(futures_util::stream::pending());
        let req = client
            .patch(&url)
            .header("content-length", (4 * 1024 * 1024 - 1).to_string())
            .body(reqwest::Body::wrap_stream(body));
        calls.push(tokio::spawn(req.send()));
    }
    for call in calls {
        let resp = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("an unauthenticated request waited for its body")
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(
            resp.headers()["iothub-errorcode"],
            "IotHubUnauthorizedAccess"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    let grown = rss_kib().saturating_sub(before);
    // 50 streams x 4 MiB would be 200 MiB; the flow-control windows alone allow 1 MiB.
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
}

/// F6: a device pipelining a thousand twin GETs (each answered with a 30 KiB twin) while not
/// reading makes the hub hold a bounded amount, not every answer at once; when the device
/// reads again every answer arrives, in order.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_twin_requests_are_answered_with_bounded_buffers() {
    let _alone = ALONE.lock().await;
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    m.subscribe(&["$iothub/twin/res/#"]).await;
    let big: serde_json::Map<String, Value> = (0..15)
        .map(|i| (format!("k{i}"), json!("x".repeat(2000))))
        .collect();
    m.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=big",
        Value::Object(big).to_string().as_bytes(),
        QoS::AtLeastOnce,
        1,
        false,
    )
    .await;
    assert!(
        m.next_publish()
            .await
            .topic
            .as_str()
            .starts_with("$iothub/twin/res/204/")
    );
    let mut requests = bytes::BytesMut::new();
    for i in 0..1000 {
        let p = Packet::Publish(twinhub_mqtt::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: twinhub_mqtt::Topic::new(format!("$iothub/twin/GET/?$rid=g{i}")).unwrap(),
            pkid: 0,
            payload: bytes::Bytes::new(),
        });
        twinhub_mqtt::encode(&p, &mut requests).unwrap();
    }
    let before = rss_kib();
    m.send_raw(&requests).await;
    // The device does not read for a while: the hub must stop at its bound.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss_kib().saturating_sub(before);
    // Unbounded, one 16 KiB read of requests became ~14 MiB of answers, and more followed.
    assert!(
        grown < 8 * 1024,
        "RSS grew by {grown} KiB while the device was not reading"
    );
    for i in 0..1000 {
        let p = m.next_publish().await;
        assert_eq!(p.topic.as_str(), format!("$iothub/twin/res/200/?$rid=g{i}"));
    }
}

/// Idle device connections stay small: an idle session holds its TLS state and its parked
/// task, and no input or output buffer. The figure is this process's RSS, so it includes the
/// test's own client side of each connection (rustls and `RawMqtt`'s 4 KiB read buffer);
/// the hub's side alone was about 36 KiB per connection (13 KiB of it the accept task's
/// future, 12 KiB buffers kept while idle) before, and is about 12 KiB now. Together they measured 36.5 KiB in a debug build.
#[tokio::test(flavor = "multi_thread")]
async fn idle_device_connections_hold_no_buffers() {
    let _alone = ALONE.lock().await;
    let hub = TestHub::start().await;
    const N: usize = 300;
    let mut keys = Vec::with_capacity(N);
    for i in 0..N {
        keys.push(hub.device(&format!("idle{i}")).await);
    }
    // One connection first, so one-time costs (the first session's allocations, the TLS
    // session cache) are not counted.
    let warm_key = hub.device("warm").await;
    let (_warm, _) = RawMqtt::device(&hub, "warm", &warm_key, true).await;
    let before = rss_kib();
    let mut open = Vec::with_capacity(N);
    for (i, key) in keys.iter().enumerate() {
        open.push(
            RawMqtt::device(&hub, &format!("idle{i}"), key, true)
                .await
                .0,
        );
    }
    let per_connection = rss_kib().saturating_sub(before) as f64 / N as f64;
    assert!(
        per_connection < 44.0,
        "{per_connection:.1} KiB per idle connection (hub and client sides together)"
    );
    drop(open);
}
