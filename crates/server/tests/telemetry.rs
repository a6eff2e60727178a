//! Telemetry end to end through a real hub: raw MQTT devices publish, the SDK's
//! `EventsClient` and raw fe2o3-amqp clients read back over AMQP/TLS. Covers what the device
//! stamps and what the hub stamps, acks only after the append, refusals (oversized, malformed,
//! bad credentials, unknown group or partition), wills, restarts, redirects, epochs and
//! receivers that grant no credit.

mod support;

use std::time::Duration;

use bytes::Bytes;
use fe2o3_amqp::link::{Receiver, ReceiverAttachError, RecvError};
use fe2o3_amqp::types::definitions::{ErrorCondition, Fields, LinkError};
use fe2o3_amqp::types::messaging::{Body, Source};
use fe2o3_amqp::types::primitives::{Symbol, Value};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use support::*;
use twinhub_mqtt::{LastWill, Packet, Publish, QoS, Topic};
use twinhub_sdk::{Event, EventStream, EventsClient, StartPosition};

const WAIT: Duration = Duration::from_secs(15);

fn events_cs(hub: &TestHub) -> String {
    hub.server()
        .hub_file
        .events_connection_string("service", false)
        .expect("the hub file names the events endpoint")
}

async fn events(hub: &TestHub) -> EventsClient {
    EventsClient::builder(&events_cs(hub))
        .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
        .connect()
        .await
        .expect("the events client signs in")
}

async fn read(stream: &mut EventStream, n: usize) -> Vec<Event> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(e))) => got.push(e),
            Ok(Some(Err(e))) => panic!("reading events failed: {e}"),
            Ok(None) => panic!("the event stream ended after {} of {n}", got.len()),
            Err(_) => panic!("only {} of {n} events arrived within {WAIT:?}", got.len()),
        }
    }
    got
}

/// The error a refused receiver reports, at the attach or as the stream's first item.
async fn first_error(receive: twinhub_sdk::Result<EventStream>) -> String {
    match receive {
        Err(e) => format!("{e:?} {e}"),
        Ok(mut stream) => match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Err(e))) => format!("{e:?} {e}"),
            other => panic!("expected the receiver to be refused, got {other:?}"),
        },
    }
}

async fn nothing_within(stream: &mut EventStream, limit: Duration) {
    if let Ok(Some(e)) = tokio::time::timeout(limit, stream.next()).await {
        panic!("expected no event, got {e:?}");
    }
}

fn publish(device: &str, bag: &str, payload: &[u8], qos: QoS, pkid: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: Topic::try_from(format!("devices/{device}/messages/events/{bag}")).unwrap(),
        pkid,
        payload: Bytes::copy_from_slice(payload),
    })
}

async fn device(hub: &TestHub, id: &str) -> RawMqtt {
    let key = hub.device(id).await;
    RawMqtt::device(hub, id, &key, true).await.0
}

/// The hub closes the connection and sends no PUBACK first.
async fn unacknowledged_close(m: &mut RawMqtt, why: &str) {
    let before = closed_within(&mut m.stream, WAIT).await.expect(why);
    assert!(
        !before.windows(2).any(|w| w == [0x40, 0x02]),
        "{why}: a PUBACK came before the close"
    );
}

async fn puback(m: &mut RawMqtt, pkid: u16) {
    match m.recv_within(WAIT).await {
        Ok(Some(Packet::PubAck(id))) => assert_eq!(id, pkid),
        other => panic!("expected PUBACK {pkid}, got {other:?}"),
    }
}

#[tokio::test]
async fn published_messages_read_back_with_what_the_device_and_the_hub_set() {
    let hub = TestHub::start().await;
    let mut d = device(&hub, "tel-1").await;
    let client = events(&hub).await;
    assert_eq!(client.partition_ids(), ["0", "1", "2", "3"]);
    let mut stream = client.receive(None, StartPosition::Earliest).await.unwrap();
    let bag = "%24.mid=m%201&%24.cid=c1&%24.ct=application%2Fjson&%24.ce=utf-8&temperatureAlert=true&empty=&bare";
    for i in 1..=3u16 {
        d.send(&publish(
            "tel-1",
            bag,
            format!("{{\"i\":{i}}}").as_bytes(),
            QoS::AtLeastOnce,
            i,
        ))
        .await;
        puback(&mut d, i).await;
    }
    // QoS 0 is appended without an acknowledgement.
    d.send(&publish("tel-1", "", b"{\"i\":4}", QoS::AtMostOnce, 0))
        .await;
    let got = read(&mut stream, 4).await;
    let bodies: Vec<String> = got
        .iter()
        .map(|e| String::from_utf8_lossy(&e.body).into_owned())
        .collect();
    assert_eq!(
        bodies,
        [r#"{"i":1}"#, r#"{"i":2}"#, r#"{"i":3}"#, r#"{"i":4}"#]
    );
    let e = &got[0];
    assert_eq!(e.device_id.as_deref(), Some("tel-1"));
    assert_eq!(e.system_properties["message-id"], "m 1");
    assert_eq!(e.system_properties["correlation-id"], "c1");
    assert_eq!(e.system_properties["content-type"], "application/json");
    assert_eq!(e.system_properties["content-encoding"], "utf-8");
    assert_eq!(e.properties["temperatureAlert"].as_deref(), Some("true"));
    assert_eq!(e.properties["empty"].as_deref(), Some(""));
    assert_eq!(e.properties["bare"], None);
    assert_eq!(e.annotations["iothub-message-source"], "Telemetry");
    assert!(
        e.annotations["iothub-connection-auth-method"]
            .as_str()
            .unwrap()
            .contains("\"sas\"")
    );
    assert!(
        e.annotations
            .contains_key("iothub-connection-auth-generation-id")
    );
    assert!(e.annotations.contains_key("iothub-enqueuedtime"));
    let seqs: Vec<i64> = got.iter().map(|e| e.sequence_number).collect();
    assert_eq!(
        seqs,
        [0, 1, 2, 3],
        "one device: one partition, numbered from 0"
    );
    let offsets: Vec<u64> = got.iter().map(|e| e.offset.parse().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    assert!(
        got.windows(2)
            .all(|w| w[0].enqueued_time <= w[1].enqueued_time)
    );
}

#[tokio::test]
async fn oversized_and_malformed_publishes_are_refused_unacknowledged() {
    let hub = TestHub::start().await;
    let client = events(&hub).await;
    let mut stream = client.receive(None, StartPosition::Earliest).await.unwrap();
    let key = hub.device("tel-bad").await;

    // 256 KiB counts the body and the properties: four bytes of properties tip it over.
    let (mut d, _) = RawMqtt::device(&hub, "tel-bad", &key, true).await;
    let body = vec![b'x'; 256 * 1024 - 2];
    d.send(&publish("tel-bad", "abc=de", &body, QoS::AtLeastOnce, 1))
        .await;
    unacknowledged_close(&mut d, "an oversized message must close the connection").await;

    let (mut d, _) = RawMqtt::device(&hub, "tel-bad", &key, true).await;
    d.send(&publish("tel-bad", "a=%zz", b"{}", QoS::AtLeastOnce, 2))
        .await;
    unacknowledged_close(&mut d, "a malformed bag must close the connection").await;

    let (mut d, _) = RawMqtt::device(&hub, "tel-bad", &key, true).await;
    d.send(&publish("tel-bad", "ok=1", b"{}", QoS::AtLeastOnce, 3))
        .await;
    puback(&mut d, 3).await;
    let got = read(&mut stream, 1).await;
    assert_eq!(
        got[0].properties["ok"].as_deref(),
        Some("1"),
        "only the good message was kept"
    );
    nothing_within(&mut stream, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn a_will_on_the_events_topic_is_kept_when_the_device_drops() {
    let hub = TestHub::start().await;
    let key = hub.device("tel-will").await;
    let client = events(&hub).await;
    let mut stream = client.receive(None, StartPosition::Earliest).await.unwrap();
    let will = |text: &str| LastWill {
        topic: Topic::try_from("devices/tel-will/messages/events/kind=will".to_owned()).unwrap(),
        message: Bytes::copy_from_slice(text.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
    };

    // A clean DISCONNECT discards the will.
    let mut m = RawMqtt::open(&hub).await;
    let mut c = connect_packet(
        "tel-will",
        Some(&device_token("tel-will", &key, 3600)),
        true,
        60,
    );
    c.will = Some(will("discarded"));
    m.connect(c).await;
    m.send(&Packet::Disconnect).await;
    closed_within(&mut m.stream, WAIT)
        .await
        .expect("DISCONNECT closes the connection");

    // Going away without DISCONNECT sends it.
    let mut m = RawMqtt::open(&hub).await;
    let mut c = connect_packet(
        "tel-will",
        Some(&device_token("tel-will", &key, 3600)),
        true,
        60,
    );
    c.will = Some(will("gone"));
    m.connect(c).await;
    drop(m);

    let got = read(&mut stream, 1).await;
    assert_eq!(got[0].body, b"gone");
    assert_eq!(
        got[0].properties["iothub-MessageType"].as_deref(),
        Some("Will")
    );
    assert_eq!(got[0].properties["kind"].as_deref(), Some("will"));
    nothing_within(&mut stream, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn bad_credentials_unknown_groups_and_partitions_are_refused() {
    let hub = TestHub::start().await;
    let cs = events_cs(&hub);
    let key = cs
        .split(';')
        .find_map(|p| p.strip_prefix("SharedAccessKey="))
        .unwrap();
    let wrong = cs.replace(key, "d3Jvbmcga2V5IHdyb25nIGtleQ==");
    let err = EventsClient::builder(&wrong)
        .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(err, twinhub_sdk::Error::NotAuthorized(_)), "{err}");

    let client = EventsClient::builder(&cs)
        .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
        .consumer_group("nosuchgroup")
        .connect()
        .await
        .unwrap();
    // As Event Hubs does, the hub answers the attach and then detaches with the error.
    let err = first_error(client.receive(None, StartPosition::Earliest).await).await;
    assert!(err.contains("nosuchgroup"), "{err}");

    let client = events(&hub).await;
    let err = first_error(
        client
            .receive(Some(&["9".to_owned()]), StartPosition::Earliest)
            .await,
    )
    .await;
    assert!(
        err.contains("Partition \"9\" does not exist") && err.contains("404"),
        "{err}"
    );
}

#[tokio::test]
async fn a_start_past_the_end_waits_for_new_events_and_offsets_resume() {
    let hub = TestHub::start().await;
    let mut d = device(&hub, "tel-pos").await;
    for i in 1..=3u16 {
        d.send(&publish(
            "tel-pos",
            "",
            format!("{i}").as_bytes(),
            QoS::AtLeastOnce,
            i,
        ))
        .await;
        puback(&mut d, i).await;
    }
    let client = events(&hub).await;
    let all = read(
        &mut client.receive(None, StartPosition::Earliest).await.unwrap(),
        3,
    )
    .await;
    let partition = all[0].partition.clone();
    let parts = [partition.clone()];

    let from_offset = read(
        &mut client
            .receive(
                Some(&parts),
                StartPosition::AfterOffset(all[0].offset.parse().unwrap()),
            )
            .await
            .unwrap(),
        2,
    )
    .await;
    assert_eq!(
        from_offset
            .iter()
            .map(|e| e.body.clone())
            .collect::<Vec<_>>(),
        [b"2".to_vec(), b"3".to_vec()]
    );

    let mut past = client
        .receive(Some(&parts), StartPosition::AfterSequence(1_000))
        .await
        .unwrap();
    nothing_within(&mut past, Duration::from_millis(500)).await;
    let mut latest = client
        .receive(Some(&parts), StartPosition::Latest)
        .await
        .unwrap();
    d.send(&publish("tel-pos", "", b"4", QoS::AtLeastOnce, 4))
        .await;
    puback(&mut d, 4).await;
    assert_eq!(read(&mut past, 1).await[0].body, b"4");
    assert_eq!(read(&mut latest, 1).await[0].body, b"4");
    let by_time = read(
        &mut client
            .receive(
                Some(&parts),
                StartPosition::EnqueuedTime(all[2].enqueued_time),
            )
            .await
            .unwrap(),
        2,
    )
    .await;
    // Events enqueued in the same millisecond as the third are at or after its time too.
    let first = all
        .iter()
        .find(|e| e.enqueued_time >= all[2].enqueued_time)
        .unwrap();
    assert_eq!(by_time[0].body, first.body);
    assert!(
        by_time
            .iter()
            .all(|e| e.enqueued_time >= all[2].enqueued_time)
    );
}

#[tokio::test]
async fn telemetry_survives_a_restart_and_numbering_goes_on() {
    let mut hub = TestHub::start().await;
    let mut d = device(&hub, "tel-restart").await;
    d.send(&publish("tel-restart", "", b"before", QoS::AtLeastOnce, 1))
        .await;
    puback(&mut d, 1).await;
    drop(d);
    hub.restart().await;
    let dev = hub.owner().get_device("tel-restart").await.unwrap();
    let (mut d, _) = RawMqtt::device(&hub, "tel-restart", &primary_key(dev), true).await;
    d.send(&publish("tel-restart", "", b"after", QoS::AtLeastOnce, 2))
        .await;
    puback(&mut d, 2).await;
    let client = events(&hub).await;
    let got = read(
        &mut client.receive(None, StartPosition::Earliest).await.unwrap(),
        2,
    )
    .await;
    assert_eq!(got[0].body, b"before");
    assert_eq!(got[1].body, b"after");
    assert_eq!((got[0].sequence_number, got[1].sequence_number), (0, 1));
}

#[tokio::test]
async fn the_iot_hub_connection_string_finds_the_endpoint_through_the_redirect() {
    let hub = TestHub::start().await;
    let mut d = device(&hub, "tel-redirect").await;
    d.send(&publish("tel-redirect", "", b"hello", QoS::AtLeastOnce, 1))
        .await;
    puback(&mut d, 1).await;
    let client = EventsClient::builder(&hub.service_cs("service"))
        .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
        .port(hub.server().amqp_addr.port())
        .connect()
        .await
        .expect("the redirect names the endpoint");
    assert_eq!(client.event_hub_name(), "twinhub");
    let got = read(
        &mut client.receive(None, StartPosition::Earliest).await.unwrap(),
        1,
    )
    .await;
    assert_eq!(got[0].body, b"hello");
}

#[tokio::test]
async fn consumer_groups_are_managed_over_rest() {
    let hub = TestHub::start().await;
    let owner = hub.owner();
    assert_eq!(owner.list_consumer_groups().await.unwrap(), ["$Default"]);
    assert_eq!(
        owner.create_consumer_group("analytics").await.unwrap(),
        "analytics"
    );
    assert_eq!(
        owner.create_consumer_group("ANALYTICS").await.unwrap(),
        "analytics"
    );
    assert_eq!(
        owner.list_consumer_groups().await.unwrap(),
        ["$Default", "analytics"]
    );
    let status = |e: twinhub_sdk::Error| match e {
        twinhub_sdk::Error::Hub { status, .. } => status,
        other => panic!("{other}"),
    };
    assert_eq!(
        status(owner.create_consumer_group("bad name").await.unwrap_err()),
        400
    );
    assert_eq!(
        status(owner.delete_consumer_group("$Default").await.unwrap_err()),
        400
    );
    assert_eq!(
        status(owner.delete_consumer_group("nope").await.unwrap_err()),
        404
    );
    assert_eq!(
        status(
            hub.service("service")
                .create_consumer_group("x")
                .await
                .unwrap_err()
        ),
        401,
        "ServiceConnect alone cannot create groups"
    );
    let client = EventsClient::builder(&events_cs(&hub))
        .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
        .consumer_group("Analytics")
        .connect()
        .await
        .unwrap();
    client
        .receive(None, StartPosition::Earliest)
        .await
        .expect("a created group reads");
    owner.delete_consumer_group("analytics").await.unwrap();
    // Groups are durable.
    owner.create_consumer_group("kept").await.unwrap();
    let mut hub = hub;
    hub.restart().await;
    assert_eq!(
        hub.owner().list_consumer_groups().await.unwrap(),
        ["$Default", "kept"]
    );
}

async fn raw_receiver(
    session: &mut fe2o3_amqp::session::SessionHandle<()>,
    name: &str,
    epoch: Option<i64>,
    credit: Option<u32>,
) -> Result<Receiver, ReceiverAttachError> {
    let source = Source::builder()
        .address("amqps://localhost/twinhub/ConsumerGroups/$Default/Partitions/0")
        .add_to_filter(
            Symbol::from("apache.org:selector-filter:string"),
            Described {
                descriptor: Descriptor::Name(Symbol::from("apache.org:selector-filter:string")),
                value: Value::String("amqp.annotation.x-opt-offset > '-1'".into()),
            },
        )
        .build();
    let mut builder = Receiver::builder()
        .name(name)
        .source(source)
        .target(format!("rx-{name}"));
    if let Some(e) = epoch {
        let mut props = Fields::new();
        props.insert(Symbol::from("com.microsoft:epoch"), Value::Long(e));
        builder = builder.properties(props);
    }
    if credit.is_some() {
        builder = builder.credit_mode(fe2o3_amqp::link::receiver::CreditMode::Manual);
    }
    builder.attach(session).await
}

fn is_stolen(e: &RecvError) -> bool {
    matches!(
        e,
        RecvError::LinkStateError(fe2o3_amqp::link::LinkStateError::RemoteClosedWithError(err))
            if err.condition == ErrorCondition::LinkError(LinkError::Stolen)
    )
}

#[tokio::test]
async fn a_higher_epoch_takes_the_partition() {
    let hub = TestHub::start().await;
    let (_c1, mut s1) = raw_amqp_session(&hub, Some("service")).await;
    let (_c2, mut s2) = raw_amqp_session(&hub, Some("service")).await;
    let mut first = raw_receiver(&mut s1, "epoch-1", Some(1), None)
        .await
        .unwrap();
    let _second = raw_receiver(&mut s2, "epoch-2", Some(2), None)
        .await
        .unwrap();
    let ended = tokio::time::timeout(WAIT, first.recv::<Body<Value>>())
        .await
        .expect("the lower epoch is detached");
    match ended {
        Err(e) => assert!(is_stolen(&e), "{e:?}"),
        Ok(_) => panic!("the lower-epoch receiver got an event instead of being detached"),
    }
    match raw_receiver(&mut s1, "no-epoch", None, None).await {
        Err(ReceiverAttachError::RemoteClosedWithError(e)) => {
            assert_eq!(e.condition, ErrorCondition::LinkError(LinkError::Stolen))
        }
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(mut r) => {
            let e = tokio::time::timeout(WAIT, r.recv::<Body<Value>>())
                .await
                .unwrap()
                .unwrap_err();
            assert!(is_stolen(&e), "{e:?}");
        }
    }
}

#[tokio::test]
async fn a_receiver_that_grants_no_credit_gets_nothing_until_it_does() {
    let hub = TestHub::start().await;
    // Find a device id that lands in partition 0.
    let id = (0..)
        .map(|i| format!("credit-{i}"))
        .find(|id| twinhub_eventlog::partition_for(id, 4) == 0)
        .unwrap();
    let mut d = device(&hub, &id).await;
    for i in 1..=3u16 {
        d.send(&publish(
            &id,
            "",
            format!("{i}").as_bytes(),
            QoS::AtLeastOnce,
            i,
        ))
        .await;
        puback(&mut d, i).await;
    }
    let (_c, mut s) = raw_amqp_session(&hub, Some("service")).await;
    let mut r = raw_receiver(&mut s, "stingy", None, Some(0)).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(700), r.recv::<Body<Value>>())
            .await
            .is_err(),
        "an event arrived without credit"
    );
    r.set_credit(1).await.unwrap();
    let first = tokio::time::timeout(WAIT, r.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    r.accept(&first).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), r.recv::<Body<Value>>())
            .await
            .is_err(),
        "more events than credit"
    );
}

#[tokio::test]
async fn links_closed_by_the_client_free_their_handles_for_new_ones() {
    // The client closes a $management pair and attaches a receiver at once, round after round,
    // on one session: the hub answers the client's detaches and never sends a late one of its
    // own that would land on the new link's handle.
    let hub = TestHub::start().await;
    let (_c, mut s) = raw_amqp_session(&hub, Some("service")).await;
    for round in 0..5 {
        let rx = Receiver::attach(&mut s, format!("m-rx-{round}"), "$management")
            .await
            .unwrap();
        let tx = fe2o3_amqp::link::Sender::attach(&mut s, format!("m-tx-{round}"), "$management")
            .await
            .unwrap();
        tx.close().await.unwrap();
        let _ = rx.close().await;
        let r = raw_receiver(&mut s, &format!("p-{round}"), None, None)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        let _ = r.close().await;
    }
}

/// Upgrades `path` with `protocols` and returns the response head and the stream.
async fn upgrade(
    hub: &TestHub,
    path: &str,
    protocols: &str,
) -> (
    String,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_connect(hub, hub.https, &[b"http/1.1"]).await;
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
sec-websocket-protocol: {protocols}\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    (String::from_utf8_lossy(&head).to_ascii_lowercase(), s)
}

/// Sends the plain AMQP header in a masked binary frame and reads the hub's first frame back.
async fn amqp_over_websocket_answers(
    mut s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let header = b"AMQP\x00\x01\x00\x00";
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x82, 0x80 | header.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(header.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).await.unwrap();
    let mut head = [0u8; 2];
    tokio::time::timeout(WAIT, s.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head[0], 0x82, "a binary frame");
    let len = usize::from(head[1] & 0x7f);
    let mut payload = vec![0u8; len.min(125)];
    s.read_exact(&mut payload).await.unwrap();
    assert!(payload.starts_with(b"AMQP\x00\x01\x00\x00"), "{payload:?}");
}

#[tokio::test]
async fn amqp_over_websockets_on_the_azure_paths_echoes_amqpwsb10() {
    let hub = TestHub::start().await;
    for path in [
        "/$servicebus/websocket",
        "/$servicebus/websocket/",
        "/$iothub/websocket",
    ] {
        let (head, s) = upgrade(&hub, path, "AMQPWSB10").await;
        assert!(head.starts_with("http/1.1 101"), "{path}: {head}");
        assert!(
            head.contains("sec-websocket-protocol: amqpwsb10"),
            "{path}: {head}"
        );
        amqp_over_websocket_answers(s).await;
    }
    // The device path still speaks MQTT to devices that ask for it.
    let (head, _s) = upgrade(&hub, "/$iothub/websocket", "mqtt").await;
    assert!(head.contains("sec-websocket-protocol: mqtt"), "{head}");
}

#[tokio::test]
async fn the_model_id_of_the_user_name_becomes_dt_dataschema() {
    let hub = TestHub::start().await;
    let key = hub.device("tel-pnp").await;
    let mut m = RawMqtt::open(&hub).await;
    let mut c = connect_packet(
        "tel-pnp",
        Some(&device_token("tel-pnp", &key, 3600)),
        true,
        60,
    );
    c.username = Some(
        "localhost/tel-pnp/?api-version=2021-04-12&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1"
            .into(),
    );
    m.connect(c).await;
    m.send(&publish(
        "tel-pnp",
        "%24.sub=thermostat1",
        b"{}",
        QoS::AtLeastOnce,
        1,
    ))
    .await;
    puback(&mut m, 1).await;
    let client = events(&hub).await;
    let got = read(
        &mut client.receive(None, StartPosition::Earliest).await.unwrap(),
        1,
    )
    .await;
    assert_eq!(
        got[0].annotations["dt-dataschema"],
        "dtmi:com:example:Thermostat;1"
    );
    assert_eq!(got[0].annotations["dt-subject"], "thermostat1");
}

#[tokio::test]
async fn a_burst_in_one_write_is_kept_in_order_and_acknowledged_in_order() {
    let hub = TestHub::start().await;
    let mut d = device(&hub, "tel-burst").await;
    let mut bytes = bytes::BytesMut::new();
    for i in 1..=300u16 {
        twinhub_mqtt::encode(
            &publish(
                "tel-burst",
                "",
                format!("{i}").as_bytes(),
                QoS::AtLeastOnce,
                i,
            ),
            &mut bytes,
        )
        .unwrap();
    }
    d.send_raw(&bytes).await;
    for i in 1..=300u16 {
        puback(&mut d, i).await;
    }
    let client = events(&hub).await;
    let got = read(
        &mut client.receive(None, StartPosition::Earliest).await.unwrap(),
        300,
    )
    .await;
    let bodies: Vec<String> = got
        .iter()
        .map(|e| String::from_utf8_lossy(&e.body).into_owned())
        .collect();
    let want: Vec<String> = (1..=300).map(|i| i.to_string()).collect();
    assert_eq!(bodies, want);
}
