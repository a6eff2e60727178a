//! The device endpoint at the byte level: CONNECT answers, topic rules, malformed and
//! forbidden packets, keepalive and CONNECT deadlines, persisted subscriptions, direct methods
//! and twins, against a real in-process hub over TLS, with the project's MQTT codec as client.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{RawMqtt, TestHub, connect_packet, device_token};
use twinhub_mqtt::{ConnectReturnCode, Packet, QoS};
use twinhub_proto::error::ErrorCode;
use twinhub_proto::model::{CloudToDeviceMethod, DeviceStatus};
use twinhub_sdk::NewDevice;

fn method(name: &str, payload: Value, timeout: Option<i64>) -> CloudToDeviceMethod {
    CloudToDeviceMethod {
        method_name: name.into(),
        payload: Some(payload),
        response_timeout_in_seconds: timeout,
        connect_timeout_in_seconds: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connack_codes() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;

    let mut m = RawMqtt::open(&hub).await;
    let bad_sig = device_token("d1", &twinhub_core::keys::generate_key(), 60);
    assert_eq!(
        m.connect(connect_packet("d1", Some(&bad_sig), false, 60))
            .await
            .0,
        ConnectReturnCode::NotAuthorized
    );

    let mut m = RawMqtt::open(&hub).await;
    let expired = device_token("d1", &key, -10);
    assert_eq!(
        m.connect(connect_packet("d1", Some(&expired), false, 60))
            .await
            .0,
        ConnectReturnCode::NotAuthorized
    );

    let mut m = RawMqtt::open(&hub).await;
    let unknown = device_token("ghost", &key, 60);
    assert_eq!(
        m.connect(connect_packet("ghost", Some(&unknown), false, 60))
            .await
            .0,
        ConnectReturnCode::NotAuthorized
    );

    let mut m = RawMqtt::open(&hub).await;
    let mut old = connect_packet("d1", Some(&device_token("d1", &key, 60)), false, 60);
    old.protocol_level = 3;
    old.protocol_name = "MQIsdp".into();
    assert_eq!(
        m.connect(old).await.0,
        ConnectReturnCode::UnacceptableProtocolVersion
    );

    let mut m = RawMqtt::open(&hub).await;
    let mut mismatch = connect_packet("d1", Some(&device_token("d1", &key, 60)), false, 60);
    mismatch.username = Some("localhost/other/?api-version=2021-04-12".into());
    assert_eq!(
        m.connect(mismatch).await.0,
        ConnectReturnCode::IdentifierRejected
    );

    // A token signed by a policy with DeviceConnect is accepted too.
    let device_policy = hub
        .server()
        .hub_file
        .policies
        .iter()
        .find(|p| p.name == "device")
        .unwrap()
        .primary_key
        .clone();
    let policy_token = twinhub_proto::sas::generate_sas_token(
        "localhost/devices/d1",
        &device_policy,
        Some("device"),
        support::now_unix() + 60,
    )
    .unwrap();
    let mut m = RawMqtt::open(&hub).await;
    assert_eq!(
        m.connect(connect_packet("d1", Some(&policy_token), false, 60))
            .await
            .0,
        ConnectReturnCode::Accepted
    );

    // Disabled devices cannot connect.
    let svc = hub.owner();
    svc.create_device(
        "off",
        NewDevice {
            status: Some(DeviceStatus::Disabled),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let off_key = svc
        .get_device("off")
        .await
        .unwrap()
        .authentication
        .unwrap()
        .symmetric_key
        .unwrap()
        .primary_key
        .unwrap();
    let mut m = RawMqtt::open(&hub).await;
    assert_eq!(
        m.connect(connect_packet(
            "off",
            Some(&device_token("off", &off_key, 60)),
            false,
            60
        ))
        .await
        .0,
        ConnectReturnCode::NotAuthorized
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forbidden_and_malformed_input_closes_the_connection() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    hub.device("d2").await;
    let long = Duration::from_secs(5);

    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    m.publish(
        "devices/d2/messages/events/",
        b"x",
        QoS::AtLeastOnce,
        1,
        false,
    )
    .await;
    m.expect_closed(long).await;

    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    m.send(&Packet::Subscribe(twinhub_mqtt::Subscribe {
        pkid: 1,
        filters: vec![(twinhub_mqtt::Topic::new("#").unwrap(), QoS::AtMostOnce)],
    }))
    .await;
    m.expect_closed(long).await;

    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    m.publish(
        "devices/d1/messages/events/",
        b"x",
        QoS::ExactlyOnce,
        1,
        false,
    )
    .await;
    m.expect_closed(long).await;

    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    m.send_raw(&[0xF0, 0x00]).await; // packet type 15 is reserved
    m.expect_closed(long).await;

    // A PUBLISH whose remaining length announces 300 KiB: refused from the header alone.
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    let len = 300 * 1024u32;
    m.send_raw(&[
        0x30,
        (len & 0x7f) as u8 | 0x80,
        ((len >> 7) & 0x7f) as u8 | 0x80,
        (len >> 14) as u8,
    ])
    .await;
    m.expect_closed(long).await;

    // Telemetry on its own topic is accepted and acknowledged; the connection stays.
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    m.publish(
        "devices/d1/messages/events/a=1",
        b"hello",
        QoS::AtLeastOnce,
        7,
        false,
    )
    .await;
    assert!(matches!(m.recv().await, Some(Packet::PubAck(7))));
    m.send(&Packet::PingReq).await;
    assert!(matches!(m.recv().await, Some(Packet::PingResp)));
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_deadline_and_keepalive() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;

    // The test hub gives 2 s for CONNECT.
    let mut silent = RawMqtt::open(&hub).await;
    let started = std::time::Instant::now();
    silent.expect_closed(Duration::from_secs(5)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed too early: {:?}",
        started.elapsed()
    );

    // Keepalive 2 s: closed after 1.5 x 2 s of silence, not before.
    let mut m = RawMqtt::open(&hub).await;
    assert_eq!(
        m.connect(connect_packet(
            "d1",
            Some(&device_token("d1", &key, 60)),
            true,
            2
        ))
        .await
        .0,
        ConnectReturnCode::Accepted
    );
    let started = std::time::Instant::now();
    m.expect_closed(Duration::from_secs(6)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2900),
        "closed after {waited:?}, before 1.5 x keepalive"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_expiry_closes_the_session() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let mut m = RawMqtt::open(&hub).await;
    assert_eq!(
        m.connect(connect_packet(
            "d1",
            Some(&device_token("d1", &key, 2)),
            true,
            60
        ))
        .await
        .0,
        ConnectReturnCode::Accepted
    );
    m.expect_closed(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_methods() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let svc = hub.owner();

    // Unknown device: 404001; known but offline: 404103.
    let e = svc
        .invoke_method("ghost", &method("m", json!(null), None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::DeviceNotFound));
    let e = svc
        .invoke_method("d1", &method("m", json!(null), None))
        .await
        .unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(404), Some(ErrorCode::DeviceNotOnline))
    );

    // Connected but not subscribed to methods: still not online for methods.
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    let e = svc
        .invoke_method("d1", &method("m", json!(null), None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::DeviceNotOnline));

    m.subscribe(&["$iothub/methods/POST/#"]).await;
    // Invalid timeouts and oversize payloads are refused before reaching the device.
    for bad in [
        method("m", json!(1), Some(4)),
        method("m", json!(1), Some(301)),
        method("m", json!("x".repeat(130 * 1024)), None),
        method("a/b", json!(1), None),
    ] {
        let e = svc.invoke_method("d1", &bad).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{:?}", bad.method_name);
    }

    // Many concurrent calls, each answered with its own payload.
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let svc = svc.clone();
            tokio::spawn(async move {
                svc.invoke_method("d1", &method("echo", json!({ "i": i }), None))
                    .await
            })
        })
        .collect();
    for _ in 0..20 {
        let req = m.next_publish().await;
        let topic = req.topic.as_str().to_string();
        assert!(
            topic.starts_with("$iothub/methods/POST/echo/?$rid="),
            "{topic}"
        );
        let rid = topic.rsplit_once("$rid=").unwrap().1.to_string();
        let body: Value = serde_json::from_slice(&req.payload).unwrap();
        let reply = json!({ "got": body["i"] }).to_string();
        m.publish(
            &format!("$iothub/methods/res/201/?$rid={rid}"),
            reply.as_bytes(),
            QoS::AtLeastOnce,
            9,
            false,
        )
        .await;
    }
    for (i, call) in calls.into_iter().enumerate() {
        let r = call.await.unwrap().unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.payload, json!({ "got": i }));
    }

    // No answer within the (minimum) timeout: 504101; the late answer is dropped quietly.
    let slow = tokio::spawn({
        let svc = svc.clone();
        async move {
            svc.invoke_method("d1", &method("slow", json!(null), Some(5)))
                .await
        }
    });
    let req = m.next_publish().await;
    let e = slow.await.unwrap().unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (Some(504), Some(ErrorCode::GatewayTimeout))
    );
    let rid = req
        .topic
        .as_str()
        .rsplit_once("$rid=")
        .unwrap()
        .1
        .to_string();
    m.publish(
        &format!("$iothub/methods/res/200/?$rid={rid}"),
        b"{}",
        QoS::AtMostOnce,
        0,
        false,
    )
    .await;
    m.send(&Packet::PingReq).await;
    assert!(
        matches!(m.recv().await, Some(Packet::PingResp)),
        "a late answer must not break the session"
    );

    // A reply that is not JSON fails the call cleanly.
    let bad = tokio::spawn({
        let svc = svc.clone();
        async move {
            svc.invoke_method("d1", &method("bad", json!(null), None))
                .await
        }
    });
    m.answer_method(200, b"{not json", QoS::AtMostOnce).await;
    assert_eq!(bad.await.unwrap().unwrap_err().status(), Some(400));
}

#[tokio::test(flavor = "multi_thread")]
async fn method_waits_for_connect_timeout() {
    let hub = TestHub::start().await;
    let key = hub.device("late").await;
    let svc = hub.owner();
    let call = tokio::spawn(async move {
        let mut req = method("hello", json!(1), None);
        req.connect_timeout_in_seconds = Some(10);
        svc.invoke_method("late", &req).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut m, _) = RawMqtt::device(&hub, "late", &key, true).await;
    m.subscribe(&["$iothub/methods/POST/#"]).await;
    m.answer_method(200, b"\"hi\"", QoS::AtLeastOnce).await;
    let r = call.await.unwrap().unwrap();
    assert_eq!((r.status, r.payload), (200, json!("hi")));
}

/// A token whose expiry lies further ahead than the hub's maximum lifetime (a year by
/// default) is refused: a leaked key must not buy a credential that outlives every rotation.
/// One within the maximum is accepted.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_outlives_the_maximum_lifetime_is_refused() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let forever =
        twinhub_proto::sas::generate_sas_token("localhost/devices/d1", &key, None, u64::MAX)
            .unwrap();
    let mut m = RawMqtt::open(&hub).await;
    assert_eq!(
        m.connect(connect_packet("d1", Some(&forever), false, 60))
            .await
            .0,
        ConnectReturnCode::NotAuthorized
    );
    let eleven_months = device_token("d1", &key, 330 * 86_400);
    let mut m = RawMqtt::open(&hub).await;
    assert_eq!(
        m.connect(connect_packet("d1", Some(&eleven_months), false, 60))
            .await
            .0,
        ConnectReturnCode::Accepted
    );
    m.publish(
        "$iothub/twin/GET/?$rid=g1",
        b" ",
        QoS::AtLeastOnce,
        1,
        false,
    )
    .await;
    let res = m.next_publish().await;
    assert_eq!(res.topic.as_str(), "$iothub/twin/res/200/?$rid=g1");
}

#[tokio::test(flavor = "multi_thread")]
async fn twins_over_mqtt() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let svc = hub.owner();
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;

    // A twin GET is answered before any subscription to $iothub/twin/res/#.
    m.publish(
        "$iothub/twin/GET/?$rid=g1",
        b" ",
        QoS::AtLeastOnce,
        1,
        false,
    )
    .await;
    let res = m.next_publish().await;
    assert_eq!(res.topic.as_str(), "$iothub/twin/res/200/?$rid=g1");
    let doc: Value = serde_json::from_slice(&res.payload).unwrap();
    assert_eq!(
        (
            doc["desired"]["$version"].clone(),
            doc["reported"]["$version"].clone()
        ),
        (json!(1), json!(1))
    );

    m.subscribe(&[
        "$iothub/twin/res/#",
        "$iothub/twin/PATCH/properties/desired/#",
    ])
    .await;
    m.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=p1",
        br#"{"rebootTime":"t1","n":{"a":1}}"#,
        QoS::AtLeastOnce,
        2,
        false,
    )
    .await;
    let res = m.next_publish().await;
    assert_eq!(
        res.topic.as_str(),
        "$iothub/twin/res/204/?$rid=p1&$version=2"
    );
    // The same request redelivered (DUP) on the same connection: applied once, answered once.
    m.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=p1",
        br#"{"rebootTime":"t1","n":{"a":1}}"#,
        QoS::AtLeastOnce,
        2,
        true,
    )
    .await;
    m.send(&Packet::PingReq).await;
    loop {
        match m.recv().await {
            Some(Packet::PubAck(2)) => continue,
            Some(Packet::PingResp) => break,
            other => panic!("a duplicate must not be answered twice; got {other:?}"),
        }
    }
    let twin = svc.get_twin("d1").await.unwrap();
    let reported = twin.properties.unwrap().reported;
    assert_eq!(
        (reported["rebootTime"].clone(), reported["$version"].clone()),
        (json!("t1"), json!(2))
    );

    // Redelivered after a reconnect (paho resends unacknowledged publishes): the answer is
    // sent again, since the first may have been lost, but the patch is not applied again.
    drop(m);
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, false).await;
    m.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=p1",
        br#"{"rebootTime":"t1","n":{"a":1}}"#,
        QoS::AtLeastOnce,
        2,
        true,
    )
    .await;
    assert_eq!(
        m.next_publish().await.topic.as_str(),
        "$iothub/twin/res/204/?$rid=p1&$version=2"
    );
    assert_eq!(
        svc.get_twin("d1")
            .await
            .unwrap()
            .properties
            .unwrap()
            .reported["$version"],
        2
    );
    m.subscribe(&[
        "$iothub/twin/res/#",
        "$iothub/twin/PATCH/properties/desired/#",
    ])
    .await;

    // Invalid patches answer 400 with an error body.
    m.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=p2",
        br#"{"bad.key":1}"#,
        QoS::AtLeastOnce,
        3,
        false,
    )
    .await;
    let res = m.next_publish().await;
    assert_eq!(res.topic.as_str(), "$iothub/twin/res/400/?$rid=p2");
    assert_eq!(
        serde_json::from_slice::<Value>(&res.payload).unwrap()["errorCode"],
        400004
    );
    m.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=p3",
        b"[1,2]",
        QoS::AtLeastOnce,
        4,
        false,
    )
    .await;
    assert_eq!(
        m.next_publish().await.topic.as_str(),
        "$iothub/twin/res/400/?$rid=p3"
    );

    // Desired changes arrive in version order, each carrying $version.
    for i in 0..5 {
        svc.update_twin("d1", &json!({"properties": {"desired": {"step": i}}}), None)
            .await
            .unwrap();
    }
    for i in 0..5u64 {
        let p = m.next_publish().await;
        assert_eq!(
            p.topic.as_str(),
            format!("$iothub/twin/PATCH/properties/desired/?$version={}", i + 2)
        );
        let body: Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(body, json!({"step": i, "$version": i + 2}));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_persist_and_replace() {
    let mut hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let svc = hub.owner();

    let (mut m, present) = RawMqtt::device(&hub, "d1", &key, false).await;
    assert!(!present);
    m.subscribe(&["$iothub/methods/POST/#"]).await;
    assert_eq!(
        svc.service_statistics()
            .await
            .unwrap()
            .connected_device_count,
        1
    );

    // A second connection for the device closes the first; subscriptions carry over.
    let (mut m2, present) = RawMqtt::device(&hub, "d1", &key, false).await;
    assert!(present);
    m.expect_closed(Duration::from_secs(5)).await;
    let call = tokio::spawn({
        let svc = svc.clone();
        async move {
            svc.invoke_method("d1", &method("ping", json!(null), None))
                .await
        }
    });
    m2.answer_method(200, b"null", QoS::AtLeastOnce).await;
    assert_eq!(call.await.unwrap().unwrap().status, 200);
    drop(m2);

    // Across a hub restart too (the official SDK never subscribes again).
    hub.restart().await;
    let svc = hub.owner();
    let (mut m3, present) = RawMqtt::device(&hub, "d1", &key, false).await;
    assert!(present);
    let call = tokio::spawn({
        let svc = svc.clone();
        async move {
            svc.invoke_method("d1", &method("again", json!(null), None))
                .await
        }
    });
    m3.answer_method(200, b"1", QoS::AtLeastOnce).await;
    assert_eq!(call.await.unwrap().unwrap().payload, json!(1));
    drop(m3);

    // CleanSession=1 starts clean.
    let (_m4, present) = RawMqtt::device(&hub, "d1", &key, true).await;
    assert!(!present);
    let e = svc
        .invoke_method("d1", &method("m", json!(null), None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::DeviceNotOnline));
}

#[tokio::test(flavor = "multi_thread")]
async fn disabling_or_deleting_closes_the_connection() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let key = hub.device("d1").await;
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, false).await;
    let mut d = svc.get_device("d1").await.unwrap();
    assert_eq!(
        d.connection_state,
        Some(twinhub_proto::model::ConnectionState::Connected)
    );
    d.status = DeviceStatus::Disabled;
    svc.update_device(&d, None).await.unwrap();
    m.expect_closed(Duration::from_secs(5)).await;

    let key2 = hub.device("d2").await;
    let (mut m2, _) = RawMqtt::device(&hub, "d2", &key2, false).await;
    svc.delete_device("d2", None).await.unwrap();
    m2.expect_closed(Duration::from_secs(5)).await;
    // Give the session a moment to record the disconnect, then check presence.
    for _ in 0..50 {
        if svc
            .service_statistics()
            .await
            .unwrap()
            .connected_device_count
            == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("connected device count did not return to 0");
}
