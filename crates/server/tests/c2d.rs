//! Cloud-to-device messages against a real hub on loopback: delivery to an MQTT device at
//! QoS 1 on IoT Hub's topic (queue order, a bounded number in flight, PUBACK completes,
//! redelivery with DUP after a reconnect, out-of-order PUBACKs refused), the HTTPS device
//! endpoints (receive, complete, reject, abandon, telemetry), purge and the HTTPS feedback
//! calls.

mod support;

use std::time::Duration;

use support::{RawMqtt, TestHub, device_token, https_client, policy_token};
use twinhub_mqtt::{Packet, QoS};
use twinhub_proto::c2d::{Ack, CloudMessage};

const C2D_FILTER: &str = "devices/d1/messages/devicebound/#";

fn message(id: &str, ack: Ack) -> CloudMessage {
    CloudMessage {
        message_id: Some(id.into()),
        correlation_id: Some(format!("corr-{id}")),
        to: "/devices/d1/messages/devicebound".into(),
        content_type: Some("application/json".into()),
        ack,
        application: vec![("color".into(), "red blue".into())],
        body: format!("{{\"id\":\"{id}\"}}").into_bytes(),
        ..Default::default()
    }
}

fn base(hub: &TestHub) -> String {
    format!("https://localhost:{}", hub.https.port())
}

async fn depth(hub: &TestHub) -> u64 {
    hub.owner()
        .get_device("d1")
        .await
        .unwrap()
        .cloud_to_device_message_count
        .unwrap()
}

/// The bag of a delivery topic as (key, value) pairs.
fn bag(p: &twinhub_mqtt::Publish) -> Vec<(String, String)> {
    let topic = p.topic.as_str();
    assert!(
        topic.starts_with("devices/d1/messages/devicebound/"),
        "{topic}"
    );
    twinhub_proto::topic::parse_property_bag(topic.split('/').nth(4).unwrap())
}

fn prop<'a>(bag: &'a [(String, String)], key: &str) -> Option<&'a str> {
    bag.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

async fn feedback_statuses(hub: &TestHub) -> Vec<(String, String)> {
    let http = https_client(hub);
    let token = policy_token(hub, "iothubowner", 600);
    let mut out = Vec::new();
    for _ in 0..100 {
        let resp = http
            .get(format!(
                "{}/messages/serviceBound/feedback?api-version=2021-04-12",
                base(hub)
            ))
            .header("Authorization", &token)
            .send()
            .await
            .unwrap();
        if resp.status() == 204 {
            return out;
        }
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "application/vnd.microsoft.iothub.feedback.json"
        );
        let lock = resp.headers()["etag"]
            .to_str()
            .unwrap()
            .trim_matches('"')
            .to_owned();
        let records: Vec<serde_json::Value> = resp.json().await.unwrap();
        for r in records {
            out.push((
                r["originalMessageId"].as_str().unwrap().to_owned(),
                r["statusCode"].as_str().unwrap().to_owned(),
            ));
            assert_eq!(r["deviceId"], "d1");
        }
        let done = http
            .delete(format!(
                "{}/messages/serviceBound/feedback/{lock}?api-version=2021-04-12",
                base(hub)
            ))
            .header("Authorization", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 204);
    }
    panic!("feedback never ran dry");
}

/// Waits until the hub's sweep or a completion has produced `n` feedback records.
async fn wait_feedback(hub: &TestHub, n: usize) {
    for _ in 0..100 {
        if hub.server().hub.c2d().feedback_depth() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} feedback records after 5 s");
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt_delivery_in_order_with_iot_hub_bag_and_puback_completes() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let (mut dev, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    dev.subscribe(&[C2D_FILTER]).await;
    let h = &hub.server().hub;
    h.send_c2d(message("m1", Ack::Full)).await.unwrap();
    h.send_c2d(message("m2", Ack::None)).await.unwrap();
    let first = dev.next_publish().await;
    assert_eq!(first.qos, QoS::AtLeastOnce);
    assert!(!first.dup);
    let b = bag(&first);
    assert_eq!(prop(&b, "$.mid"), Some("m1"));
    assert_eq!(prop(&b, "$.cid"), Some("corr-m1"));
    assert_eq!(prop(&b, "$.ct"), Some("application/json"));
    assert_eq!(prop(&b, "$.to"), Some("/devices/d1/messages/deviceBound"));
    assert_eq!(prop(&b, "iothub-ack"), Some("full"));
    assert_eq!(prop(&b, "color"), Some("red blue"));
    assert!(prop(&b, "$.exp").is_some());
    assert_eq!(&first.payload[..], b"{\"id\":\"m1\"}");
    let second = dev.next_publish().await;
    assert_eq!(prop(&bag(&second), "$.mid"), Some("m2"));
    assert_eq!(prop(&bag(&second), "iothub-ack"), None);
    assert_eq!(depth(&hub).await, 2, "unacknowledged messages stay queued");
    dev.send(&Packet::PubAck(first.pkid)).await;
    dev.send(&Packet::PubAck(second.pkid)).await;
    for _ in 0..100 {
        if depth(&hub).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(depth(&hub).await, 0);
    wait_feedback(&hub, 1).await;
    assert_eq!(
        feedback_statuses(&hub).await,
        vec![("m1".to_string(), "Success".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_device_gets_its_queue_at_connect_a_few_at_a_time() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    {
        let (mut dev, _) = RawMqtt::device(&hub, "d1", &key, false).await;
        dev.subscribe(&[C2D_FILTER]).await;
        dev.send(&Packet::Disconnect).await;
    }
    let h = &hub.server().hub;
    for i in 0..12 {
        h.send_c2d(message(&format!("m{i}"), Ack::None))
            .await
            .unwrap();
    }
    // The persistent session's subscription brings the queue, in order, 8 at a time.
    let (mut dev, present) = RawMqtt::device(&hub, "d1", &key, false).await;
    assert!(present);
    let mut got = Vec::new();
    for _ in 0..8 {
        got.push(dev.next_publish().await);
    }
    assert!(
        dev.recv_within(Duration::from_millis(300)).await.is_err(),
        "no ninth message before a PUBACK"
    );
    for (i, p) in got.iter().enumerate() {
        assert_eq!(prop(&bag(p), "$.mid"), Some(format!("m{i}").as_str()));
        dev.send(&Packet::PubAck(p.pkid)).await;
    }
    for i in 8..12 {
        let p = dev.next_publish().await;
        assert_eq!(prop(&bag(&p), "$.mid"), Some(format!("m{i}").as_str()));
        dev.send(&Packet::PubAck(p.pkid)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unacknowledged_messages_come_again_with_dup_after_a_reconnect() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let h = &hub.server().hub;
    h.send_c2d(message("m1", Ack::None)).await.unwrap();
    {
        let (mut dev, _) = RawMqtt::device(&hub, "d1", &key, false).await;
        dev.subscribe(&[C2D_FILTER]).await;
        let p = dev.next_publish().await;
        assert!(!p.dup);
        // Dropped without a PUBACK.
    }
    let (mut dev, _) = RawMqtt::device(&hub, "d1", &key, false).await;
    let p = dev.next_publish().await;
    assert!(p.dup, "a redelivery carries DUP");
    assert_eq!(prop(&bag(&p), "$.mid"), Some("m1"));
    dev.send(&Packet::PubAck(p.pkid)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_puback_out_of_order_closes_the_connection_and_nothing_is_lost() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let h = &hub.server().hub;
    h.send_c2d(message("a", Ack::None)).await.unwrap();
    h.send_c2d(message("b", Ack::None)).await.unwrap();
    let (mut dev, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    dev.subscribe(&[C2D_FILTER]).await;
    let _a = dev.next_publish().await;
    let b = dev.next_publish().await;
    dev.send(&Packet::PubAck(b.pkid)).await;
    dev.expect_closed(Duration::from_secs(5)).await;
    assert_eq!(depth(&hub).await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn https_device_receives_completes_rejects_and_abandons() {
    let hub = TestHub::start_with(|c| c.c2d_max_delivery_count = 2).await;
    let key = hub.device("d1").await;
    let http = https_client(&hub);
    let token = device_token("d1", &key, 600);
    let url = format!(
        "{}/devices/d1/messages/deviceBound?api-version=2021-04-12",
        base(&hub)
    );
    let receive = || http.get(&url).header("Authorization", &token).send();
    assert_eq!(receive().await.unwrap().status(), 204);
    let h = &hub.server().hub;
    h.send_c2d(message("ok", Ack::Full)).await.unwrap();
    h.send_c2d(message("no", Ack::Full)).await.unwrap();
    h.send_c2d(message("again", Ack::Full)).await.unwrap();

    let resp = receive().await.unwrap();
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    assert_eq!(headers["iothub-messageid"], "ok");
    assert_eq!(headers["iothub-correlationid"], "corr-ok");
    assert_eq!(headers["iothub-app-color"], "red blue");
    assert_eq!(headers["iothub-to"], "/devices/d1/messages/devicebound");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["iothub-deliverycount"], "0");
    assert!(
        headers["iothub-sequencenumber"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );
    let etag = headers["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(resp.bytes().await.unwrap(), &b"{\"id\":\"ok\"}"[..]);
    let lock = etag.trim_matches('"');
    let done = http
        .delete(format!(
            "{}/devices/d1/messages/deviceBound/{lock}?api-version=2021-04-12",
            base(&hub)
        ))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 204);
    // The same lock again: IoT Hub's lock-lost error.
    let again = http
        .delete(format!(
            "{}/devices/d1/messages/deviceBound/{lock}?api-version=2021-04-12",
            base(&hub)
        ))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 412);
    assert_eq!(again.headers()["iothub-errorcode"], "DeviceMessageLockLost");

    // Reject.
    let resp = receive().await.unwrap();
    assert_eq!(resp.headers()["iothub-messageid"], "no");
    let lock = resp.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let rejected = http
        .delete(format!(
            "{}/devices/d1/messages/deviceBound/{lock}?reject&api-version=2021-04-12",
            base(&hub)
        ))
        .header("Authorization", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status(), 204);

    // Abandon twice: the second reaches the maximum and dead-letters it.
    for round in 0..2 {
        let resp = receive().await.unwrap();
        assert_eq!(resp.headers()["iothub-messageid"], "again");
        assert_eq!(
            resp.headers()["iothub-deliverycount"],
            round.to_string().as_str()
        );
        let lock = resp.headers()["etag"]
            .to_str()
            .unwrap()
            .trim_matches('"')
            .to_owned();
        let abandoned = http
            .post(format!(
                "{}/devices/d1/messages/deviceBound/{lock}/abandon?api-version=2021-04-12",
                base(&hub)
            ))
            .header("Authorization", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(abandoned.status(), 204);
    }
    assert_eq!(receive().await.unwrap().status(), 204);
    wait_feedback(&hub, 3).await;
    let mut statuses = feedback_statuses(&hub).await;
    statuses.sort();
    assert_eq!(
        statuses,
        vec![
            ("again".to_string(), "DeliveryCountExceeded".to_string()),
            ("no".to_string(), "Rejected".to_string()),
            ("ok".to_string(), "Success".to_string()),
        ]
    );

    // Another device's token, or none, gets 401.
    let other = hub.device("d2").await;
    let wrong = http
        .get(&url)
        .header("Authorization", device_token("d2", &other, 600))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn https_telemetry_reaches_the_event_log_with_its_properties() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let http = https_client(&hub);
    let resp = http
        .post(format!(
            "{}/devices/d1/messages/events?api-version=2021-04-12",
            base(&hub)
        ))
        .header("Authorization", device_token("d1", &key, 600))
        .header("iothub-messageid", "http-1")
        .header("iothub-app-level", "high")
        .body("{\"t\":21}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let log = hub.server().hub.events().log().clone();
    let mut found = None;
    for p in 0..log.partition_count() {
        let events = log.read(p, 0, 10, 1 << 20).await.unwrap();
        if let Some(e) = events.first() {
            found = Some(twinhub_proto::message::Message::decode(&e.data).unwrap());
        }
    }
    let m = found.expect("the message is in the log");
    assert_eq!(m.system.message_id.as_deref(), Some("http-1"));
    assert_eq!(m.stamp.device_id, "d1");
    assert_eq!(
        m.application,
        vec![("level".to_string(), Some("high".to_string()))]
    );
    assert_eq!(m.body, b"{\"t\":21}");
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_over_rest_empties_the_queue() {
    let hub = TestHub::start().await;
    hub.device("d1").await;
    let h = &hub.server().hub;
    for id in ["a", "b", "c"] {
        h.send_c2d(message(id, Ack::Negative)).await.unwrap();
    }
    assert_eq!(depth(&hub).await, 3);
    let http = https_client(&hub);
    let resp = http
        .delete(format!(
            "{}/devices/d1/commands?api-version=2021-04-12",
            base(&hub)
        ))
        .header("Authorization", policy_token(&hub, "iothubowner", 600))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["deviceId"], "d1");
    assert_eq!(body["totalMessagesPurged"], 3);
    assert_eq!(depth(&hub).await, 0);
    // The Rust service client's purge.
    h.send_c2d(message("d", Ack::None)).await.unwrap();
    assert_eq!(hub.owner().purge_c2d("d1").await.unwrap(), 1);
    assert_eq!(hub.owner().purge_c2d("d1").await.unwrap(), 0);
    match hub.owner().purge_c2d("nobody").await {
        Err(twinhub_sdk::Error::Hub { status, .. }) => assert_eq!(status, 404),
        other => panic!("expected a 404, got {other:?}"),
    }
    wait_feedback(&hub, 3).await;
    let statuses = feedback_statuses(&hub).await;
    assert_eq!(statuses.len(), 3);
    assert!(statuses.iter().all(|(_, s)| s == "Purged"));
    let missing = http
        .delete(format!(
            "{}/devices/nobody/commands?api-version=2021-04-12",
            base(&hub)
        ))
        .header("Authorization", policy_token(&hub, "iothubowner", 600))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rust_device_client_streams_messages_and_taking_one_completes_it() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let client = || {
        twinhub_sdk::DeviceClient::builder(&format!(
            "HostName=localhost;DeviceId=d1;SharedAccessKey={key}"
        ))
        .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
        .port(hub.mqtt.port())
        .build()
        .unwrap()
    };
    let device = client();
    let mut messages = device.c2d_messages();
    device.connect().await.unwrap();
    let h = &hub.server().hub;
    h.send_c2d(message("m1", Ack::Full)).await.unwrap();
    h.send_c2d(message("m2", Ack::None)).await.unwrap();
    let m1 = tokio::time::timeout(Duration::from_secs(10), messages.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m1.message_id.as_deref(), Some("m1"));
    assert_eq!(m1.correlation_id.as_deref(), Some("corr-m1"));
    assert_eq!(m1.content_type.as_deref(), Some("application/json"));
    assert_eq!(m1.ack, "full");
    assert_eq!(m1.property("color"), Some("red blue"));
    assert_eq!(&m1.body[..], b"{\"id\":\"m1\"}");
    assert!(!m1.redelivered);
    wait_feedback(&hub, 1).await;
    // m2 arrived at the client but was never taken: after the client goes, it waits again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(depth(&hub).await, 1);
    device.close().await;
    drop(messages);
    let device = client();
    let mut messages = device.c2d_messages();
    device.connect().await.unwrap();
    let m2 = tokio::time::timeout(Duration::from_secs(10), messages.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m2.message_id.as_deref(), Some("m2"));
    for _ in 0..100 {
        if depth(&hub).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(depth(&hub).await, 0);
    device.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_taken_just_before_close_is_completed_not_redelivered() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    for round in 0..3 {
        let device = twinhub_sdk::DeviceClient::builder(&format!(
            "HostName=localhost;DeviceId=d1;SharedAccessKey={key}"
        ))
        .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
        .port(hub.mqtt.port())
        .build()
        .unwrap();
        let mut messages = device.c2d_messages();
        device.connect().await.unwrap();
        hub.server()
            .hub
            .send_c2d(message(&format!("m{round}"), Ack::None))
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), messages.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.message_id, Some(format!("m{round}")));
        assert!(
            !got.redelivered,
            "round {round}: the previous message came again"
        );
        // Close at once: the PUBACK must leave before DISCONNECT.
        device.close().await;
        for _ in 0..100 {
            if depth(&hub).await == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            depth(&hub).await,
            0,
            "round {round}: the taken message is still queued"
        );
    }
}
