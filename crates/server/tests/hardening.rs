//! Regression tests for the hardening review (`audit-2026-12`): acknowledged twin writes are
//! applied, an unauthenticated or misbehaving peer cannot make the hub hold resources, and
//! credentials, sessions and jobs are bounded. Each test names the finding it guards.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;
use tokio::io::AsyncWriteExt;
use twinhub_mqtt::{ConnectReturnCode, Packet, QoS};
use twinhub_proto::model::{AuthenticationMechanism, AuthenticationType, SymmetricKey};

const PATCH: &str = "$iothub/twin/PATCH/properties/reported/?$rid=";

async fn patch(m: &mut RawMqtt, rid: &str, body: Value, pkid: u16, dup: bool) -> String {
    m.publish(
        &format!("{PATCH}{rid}"),
        body.to_string().as_bytes(),
        QoS::AtLeastOnce,
        pkid,
        dup,
    )
    .await;
    m.next_publish().await.topic.as_str().to_string()
}

/// A patch sent on a connection the hub may already have closed.
async fn late_patch(m: &mut RawMqtt, rid: &str, body: &[u8], pkid: u16) {
    let _ = m
        .try_send(&Packet::Publish(twinhub_mqtt::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: twinhub_mqtt::Topic::new(format!("{PATCH}{rid}")).unwrap(),
            pkid,
            payload: bytes::Bytes::copy_from_slice(body),
        }))
        .await;
}

async fn reported(hub: &TestHub, id: &str) -> Value {
    Value::Object(
        hub.owner()
            .get_twin(id)
            .await
            .unwrap()
            .properties
            .unwrap()
            .reported,
    )
}

/// F1: a `$rid` says nothing by itself (Embedded-C devices use one constant `$rid`; the C
/// SDK's counter restarts at every boot). Only DUP + same `$rid` + same payload is a
/// redelivery; every other patch is applied, on one connection and across reconnects.
#[tokio::test(flavor = "multi_thread")]
async fn reused_rids_are_applied_and_only_real_redeliveries_are_not() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, false).await;
    m.subscribe(&["$iothub/twin/res/#"]).await;
    // One connection, one constant $rid, three patches.
    for (i, t) in [20, 21, 22].into_iter().enumerate() {
        let answer = patch(
            &mut m,
            "reported_prop",
            json!({"temp": t}),
            i as u16 + 1,
            false,
        )
        .await;
        assert_eq!(
            answer,
            format!(
                "$iothub/twin/res/204/?$rid=reported_prop&$version={}",
                i + 2
            )
        );
    }
    // After a reconnect (session kept), and after a clean one.
    drop(m);
    let (mut m, present) = RawMqtt::device(&hub, "d1", &key, false).await;
    assert!(present);
    assert_eq!(
        patch(&mut m, "reported_prop", json!({"temp": 23}), 1, false).await,
        "$iothub/twin/res/204/?$rid=reported_prop&$version=5"
    );
    drop(m);
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    m.subscribe(&["$iothub/twin/res/#"]).await;
    assert_eq!(
        patch(&mut m, "reported_prop", json!({"temp": 24}), 1, false).await,
        "$iothub/twin/res/204/?$rid=reported_prop&$version=6"
    );
    // A reboot: the counter restarts, so $rid 1 comes again with new content.
    assert_eq!(
        patch(&mut m, "1", json!({"boot": 1}), 2, false).await,
        "$iothub/twin/res/204/?$rid=1&$version=7"
    );
    drop(m);
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    m.subscribe(&["$iothub/twin/res/#"]).await;
    assert_eq!(
        patch(&mut m, "1", json!({"boot": 2}), 1, false).await,
        "$iothub/twin/res/204/?$rid=1&$version=8"
    );
    let r = reported(&hub, "d1").await;
    assert_eq!(
        (r["temp"].clone(), r["boot"].clone()),
        (json!(24), json!(2))
    );
    assert_eq!(r["$version"], 8);

    // A real redelivery on a later connection: the same answer, not applied again.
    drop(m);
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    m.subscribe(&["$iothub/twin/res/#"]).await;
    assert_eq!(
        patch(&mut m, "1", json!({"boot": 2}), 1, true).await,
        "$iothub/twin/res/204/?$rid=1&$version=8"
    );
    assert_eq!(reported(&hub, "d1").await["$version"], 8);
    // DUP but a different payload: a new request.
    assert_eq!(
        patch(&mut m, "1", json!({"boot": 3}), 2, true).await,
        "$iothub/twin/res/204/?$rid=1&$version=9"
    );
    assert_eq!(reported(&hub, "d1").await["boot"], 3);
}

/// F1 (and the takeover race): the memory of answers belongs to the device, not to a
/// session, so a redelivery on a connection that replaced a live one is answered, not
/// applied twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivery_after_a_takeover_is_answered_not_applied() {
    let hub = TestHub::start().await;
    let key = hub.device("d1").await;
    let (mut first, _) = RawMqtt::device(&hub, "d1", &key, false).await;
    first.subscribe(&["$iothub/twin/res/#"]).await;
    assert_eq!(
        patch(&mut first, "7", json!({"x": 1}), 1, false).await,
        "$iothub/twin/res/204/?$rid=7&$version=2"
    );
    // The device reconnects while its first connection is still open.
    let (mut second, _) = RawMqtt::device(&hub, "d1", &key, false).await;
    assert_eq!(
        patch(&mut second, "7", json!({"x": 1}), 1, true).await,
        "$iothub/twin/res/204/?$rid=7&$version=2"
    );
    assert_eq!(reported(&hub, "d1").await["$version"], 2);
    first.expect_closed(Duration::from_secs(5)).await;
}

/// F13: once a device is disabled, or deleted and created again, its old session writes
/// nothing, even what it already had buffered.
#[tokio::test(flavor = "multi_thread")]
async fn a_closed_session_writes_nothing_more() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let key = hub.device("d1").await;
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    m.subscribe(&["$iothub/twin/res/#"]).await;
    let mut device = svc.get_device("d1").await.unwrap();
    device.status = twinhub_proto::model::DeviceStatus::Disabled;
    svc.update_device(&device, Some("*")).await.unwrap();
    // The socket may still be open for a moment: whatever it sends now is not applied.
    for i in 0..20u16 {
        late_patch(&mut m, &format!("late{i}"), br#"{"late":true}"#, i + 1).await;
    }
    m.expect_closed(Duration::from_secs(5)).await;
    assert!(reported(&hub, "d1").await.get("late").is_none());

    // Deleted and created again under the same id: a new device the old session cannot touch.
    let key = hub.device("d2").await;
    let (mut m, _) = RawMqtt::device(&hub, "d2", &key, true).await;
    svc.delete_device("d2", None).await.unwrap();
    let new = svc.create_device("d2", Default::default()).await.unwrap();
    for i in 0..20u16 {
        late_patch(&mut m, &format!("old{i}"), br#"{"old":true}"#, i + 1).await;
    }
    m.expect_closed(Duration::from_secs(5)).await;
    let twin = svc.get_twin("d2").await.unwrap();
    assert_eq!(twin.properties.unwrap().reported.get("old"), None);
    // F-etag: the new device's etag is not its predecessor's.
    assert_ne!(new.etag, Some(device.etag.unwrap_or_default()));
}

/// F5: a key rotation or a change of authentication type ends the sessions signed in with
/// the old credentials.
#[tokio::test(flavor = "multi_thread")]
async fn changing_credentials_closes_live_sessions() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let key = hub.device("d1").await;
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    let mut device = svc.get_device("d1").await.unwrap();
    device.authentication = Some(AuthenticationMechanism {
        symmetric_key: Some(SymmetricKey {
            primary_key: Some(twinhub_core::keys::generate_key()),
            secondary_key: Some(twinhub_core::keys::generate_key()),
        }),
        x509_thumbprint: None,
        auth_type: AuthenticationType::Sas,
    });
    svc.update_device(&device, Some("*")).await.unwrap();
    m.expect_closed(Duration::from_secs(5)).await;
    // The old key no longer signs in.
    assert_eq!(
        RawMqtt::connack(&hub, "d1", &key).await.1,
        ConnectReturnCode::NotAuthorized
    );

    // Changing only status reason (same credentials) keeps the session.
    let key = hub.device("d2").await;
    let (mut m, _) = RawMqtt::device(&hub, "d2", &key, true).await;
    let mut device = svc.get_device("d2").await.unwrap();
    device.status_reason = Some("inventory".into());
    svc.update_device(&device, Some("*")).await.unwrap();
    m.send(&Packet::PingReq).await;
    assert!(matches!(m.recv().await, Some(Packet::PingResp)));
}

/// F3: a TLS client that sends nothing after the handshake is closed (it would otherwise
/// hold a file descriptor for ever); so is an HTTP connection left idle.
#[tokio::test(flavor = "multi_thread")]
async fn silent_and_idle_https_connections_are_closed() {
    let hub = TestHub::start_with(|c| c.http_idle_timeout = 2).await;
    let started = Instant::now();
    let mut silent = tls_connect(&hub, hub.https, &[b"h2", b"http/1.1"]).await;
    let mut prefix = tls_connect(&hub, hub.https, &[b"h2"]).await;
    // Just "P", a prefix of the HTTP/2 preface, which hyper waits on without a timer.
    prefix.write_all(b"P").await.unwrap();
    prefix.flush().await.unwrap();
    closed_within(&mut silent, Duration::from_secs(15))
        .await
        .expect("a silent connection stayed open");
    assert!(started.elapsed() >= Duration::from_secs(9));
    closed_within(&mut prefix, Duration::from_secs(25))
        .await
        .expect("a connection that sent one byte stayed open");

    // An HTTP/1.1 keep-alive connection that went quiet after a request.
    let mut idle = tls_connect(&hub, hub.https, &[b"http/1.1"]).await;
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answer = closed_within(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle keep-alive connection stayed open");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
}

/// F3: the connection cap and the cap on unauthenticated peers close what is over them at
/// once, and count it.
#[tokio::test(flavor = "multi_thread")]
async fn connection_caps_refuse_what_is_over_them() {
    let hub = TestHub::start_with(|c| {
        c.max_connections = Some(6);
        c.max_unauthenticated = 3;
    })
    .await;
    let mut keys = Vec::new();
    {
        // One client, one connection, closed before the count below.
        let svc = hub.owner();
        for i in 0..6 {
            let d = svc
                .create_device(&format!("cap{i}"), Default::default())
                .await
                .unwrap();
            keys.push(primary_key(d));
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Three silent peers hold every unauthenticated place...
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(hub.mqtt).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so a fourth is closed at once, before any TLS.
    let mut fourth = tokio::net::TcpStream::connect(hub.https).await.unwrap();
    closed_within(&mut fourth, Duration::from_secs(2))
        .await
        .expect("a connection over the unauthenticated cap was kept");
    drop(silent);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Devices that authenticate free their place: six connected devices fill the cap.
    let mut devices = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        devices.push(RawMqtt::device(&hub, &format!("cap{i}"), key, true).await.0);
    }
    let mut seventh = tokio::net::TcpStream::connect(hub.mqtt).await.unwrap();
    closed_within(&mut seventh, Duration::from_secs(2))
        .await
        .expect("a connection over max_connections was kept");
    let metrics = hub.server().admission.open_connections();
    assert_eq!(metrics, 6);
}

/// Opens an MQTT-over-WebSocket upgrade and returns the stream once the hub answered 101.
async fn websocket(hub: &TestHub) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut s = tls_connect(hub, hub.https, &[b"http/1.1"]).await;
    s.write_all(
        b"GET /$iothub/websocket HTTP/1.1\r\nhost: localhost\r\nconnection: Upgrade\r\n\
upgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
sec-websocket-protocol: mqtt\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 0];
    let mut buf = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf)
            .await
            .unwrap();
        head.push(buf[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));
    s
}

/// An upgraded WebSocket session keeps counting as an open connection (hyper lets go of the
/// connection it upgraded).
#[tokio::test(flavor = "multi_thread")]
async fn websocket_sessions_count_as_open_connections() {
    let hub = TestHub::start().await;
    let _a = websocket(&hub).await;
    let _b = websocket(&hub).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hub.server().admission.open_connections(), 2);
}

/// F9: a WebSocket frame header announcing 16 MiB is refused at the header, before the hub
/// reserves anything for it.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_websocket_frames_are_refused_at_the_header() {
    let hub = TestHub::start().await;
    let mut s = websocket(&hub).await;
    // A masked binary frame announcing 16 MiB (64-bit length), then a trickle.
    let mut frame = vec![0x82, 0xFF];
    frame.extend_from_slice(&(16u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    s.write_all(&frame).await.unwrap();
    s.write_all(&[0u8; 16]).await.unwrap();
    closed_within(&mut s, Duration::from_secs(3))
        .await
        .expect("a 16 MiB frame header was accepted");
}

/// F10 and method names: what would panic a job runner or cross-wire a method's `$rid`
/// is refused with 400.
#[tokio::test(flavor = "multi_thread")]
async fn unbounded_job_times_and_bad_method_names_are_refused() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let job: twinhub_proto::model::JobRequest = serde_json::from_value(json!({
        "jobId": "j1",
        "type": "scheduleDeviceMethod",
        "cloudToDeviceMethod": {"methodName": "reboot", "payload": null},
        "queryCondition": "*",
        "maxExecutionTimeInSeconds": i64::MAX,
    }))
    .unwrap();
    let err = svc.create_job(&job).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    hub.device("m").await;
    for name in ["x?$rid=7&", "a#b", "a+b", "a/b"] {
        let call = twinhub_proto::model::CloudToDeviceMethod {
            method_name: name.into(),
            payload: None,
            response_timeout_in_seconds: Some(5),
            connect_timeout_in_seconds: Some(0),
        };
        let err = svc.invoke_method("m", &call).await.unwrap_err();
        assert_eq!(err.status(), Some(400), "{name}: {err}");
    }
}

/// F7: a disable whose caller hangs up at once still closes the device's session. The hang-up
/// may cancel the request before it commits (then nothing changed, which is fine); whenever
/// the disable did commit, the session must be closed too.
#[tokio::test(flavor = "multi_thread")]
async fn a_disable_whose_caller_hangs_up_still_closes_the_session() {
    let hub = TestHub::start().await;
    let cs: twinhub_proto::connection_string::ConnectionString =
        hub.service_cs("iothubowner").parse().unwrap();
    let token = twinhub_proto::sas::generate_sas_token(
        &cs.host_name,
        &cs.shared_access_key.clone().unwrap(),
        cs.shared_access_key_name.as_deref(),
        now_unix() + 600,
    )
    .unwrap();
    let mut committed = 0;
    for trial in 0..10 {
        let id = format!("hang{trial}");
        let key = hub.device(&id).await;
        let (mut m, _) = RawMqtt::device(&hub, &id, &key, true).await;
        let body = json!({"deviceId": id, "status": "disabled"}).to_string();
        let mut s = tls_connect(&hub, hub.https, &[b"http/1.1"]).await;
        s.write_all(
            format!(
                "PUT /devices/{id}?api-version=2021-04-12 HTTP/1.1\r\nhost: localhost\r\n\
authorization: {token}\r\nif-match: *\r\ncontent-type: application/json\r\n\
content-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        s.flush().await.unwrap();
        // Hang up without waiting for the answer.
        drop(s);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let device = hub.owner().get_device(&id).await.unwrap();
        if device.status == twinhub_proto::model::DeviceStatus::Disabled {
            committed += 1;
            m.expect_closed(Duration::from_secs(5)).await;
        }
    }
    assert!(
        committed > 0,
        "no hung-up disable ever committed: the case was not exercised"
    );
}

/// Slow consumers: a device that stops reading while desired patches flood its session is
/// dropped as soon as its queue overflows, not after the write timeout, while other devices
/// keep working.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_that_stops_reading_is_dropped_at_once() {
    let hub = TestHub::start().await;
    let svc = hub.owner();
    let key = hub.device("slow").await;
    let (mut slow, _) = RawMqtt::device(&hub, "slow", &key, true).await;
    slow.subscribe(&["$iothub/twin/PATCH/properties/desired/#"])
        .await;
    let other_key = hub.device("other").await;
    let (mut other, _) = RawMqtt::device(&hub, "other", &other_key, true).await;
    other.subscribe(&["$iothub/twin/res/#"]).await;
    let started = Instant::now();
    let filler = "y".repeat(3000);
    let mut i = 0;
    // The slow device reads nothing from here on.
    while hub.server().hub.directory().is_connected("slow") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the slow device was not dropped"
        );
        let patch = json!({"properties": {"desired": {"fill": filler, "i": i}}});
        svc.update_twin("slow", &patch, None).await.unwrap();
        i += 1;
    }
    let dropped_after = started.elapsed();
    assert!(
        dropped_after < Duration::from_secs(15),
        "dropped only after {dropped_after:?}"
    );
    // The other device was never disturbed.
    assert!(
        patch(&mut other, "o1", json!({"ok": true}), 1, false)
            .await
            .starts_with("$iothub/twin/res/204/")
    );
}

/// Throttles (off by default but for connects): over the operator's rates, twin patches are
/// answered 429, CONNECTs are refused as "server unavailable" and REST calls get 429001.
#[tokio::test(flavor = "multi_thread")]
async fn throttles_answer_with_iot_hubs_codes() {
    let hub = TestHub::start_with(|c| {
        c.throttle_device_twin_writes = 0.2;
        c.throttle_device_connects = 0.2;
        c.throttle_rest = 0.5;
    })
    .await;
    let key = hub.device("d1").await;
    let (mut m, _) = RawMqtt::device(&hub, "d1", &key, true).await;
    m.subscribe(&["$iothub/twin/res/#"]).await;
    // Burst: 0.2/s holds 2 tokens.
    for i in 0..2u16 {
        let a = patch(&mut m, &format!("p{i}"), json!({"i": i}), i + 1, false).await;
        assert!(a.starts_with("$iothub/twin/res/204/"), "{a}");
    }
    let a = patch(&mut m, "p2", json!({"i": 2}), 3, false).await;
    assert_eq!(a, "$iothub/twin/res/429/?$rid=p2");
    // Connects: the first took a token, one more is allowed, then refused with 3.
    drop(m);
    let _ = RawMqtt::device(&hub, "d1", &key, true).await;
    assert_eq!(
        RawMqtt::connack(&hub, "d1", &key).await.1,
        ConnectReturnCode::ServerUnavailable
    );
    // REST: 0.5/s holds 5 tokens, some already used above.
    let svc = hub.owner();
    let mut throttled = None;
    for _ in 0..10 {
        if let Err(e) = svc.get_device("d1").await {
            throttled = Some(e);
            break;
        }
    }
    let err = throttled.expect("REST calls were never throttled");
    assert_eq!(err.status(), Some(429), "{err}");
    assert!(
        err.to_string().contains("429001") || err.to_string().contains("Throttling"),
        "{err}"
    );
}

/// F12: the data dir is owner-only, and so is the store holding every key.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread")]
async fn the_data_dir_and_store_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let hub = TestHub::start_in(dir, |_| {}).await;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(hub.dir.path()), 0o700);
    assert_eq!(mode(&hub.dir.path().join("store.redb")), 0o600);
    assert_eq!(mode(&hub.dir.path().join("hub.json")), 0o600);
}
