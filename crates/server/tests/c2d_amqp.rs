//! Cloud-to-device messages from the service side over AMQP/TLS, against a real hub on
//! loopback: the SDK's `send_c2d` (answered only after the message is queued, durably) and
//! raw fe2o3-amqp clients for the wire details (refusals with IoT Hub's conditions, message-id
//! types, settle modes, links without ServiceConnect), and the feedback link (batches with
//! `Success`, abandon and an unsettled detach bringing a batch back, pre-settled receivers).

mod support;

use std::time::{Duration, Instant, SystemTime};

use fe2o3_amqp::link::{Receiver, ReceiverAttachError, Sender, SenderAttachError};
use fe2o3_amqp::types::definitions::{
    AmqpError, ErrorCondition, LinkError, ReceiverSettleMode, SenderSettleMode,
};
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageId, Outcome, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};
use futures_util::StreamExt;
use support::*;
use twinhub_core::c2d::Holder;
use twinhub_proto::c2d::FEEDBACK_CONTENT_TYPE;
use twinhub_proto::error::ErrorCode;
use twinhub_sdk::{
    Ack, C2dMessage, FeedbackBatch, FeedbackReceiver, FeedbackStatus, ServiceClient,
};
use twinhub_server::Config;

const WAIT: Duration = Duration::from_secs(15);

fn quick_feedback(c: &mut Config) {
    c.c2d_feedback_interval_ms = 100;
}

fn small_queues(c: &mut Config) {
    c.c2d_max_queue_depth = 2;
    c.c2d_feedback_interval_ms = 100;
}

/// A service client for `policy` that dials the hub's AMQP port.
fn service(hub: &TestHub, policy: &str) -> ServiceClient {
    ServiceClient::builder(&hub.service_cs(policy))
        .extra_ca_pem(std::fs::read(hub.ca_pem()).unwrap())
        .amqp_port(hub.server().amqp_addr.port())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn raw_sender(session: &mut fe2o3_amqp::session::SessionHandle<()>, name: &str) -> Sender {
    Sender::attach(session, name, "amqps://localhost/messages/devicebound")
        .await
        .unwrap()
}

fn to(device: &str) -> Option<String> {
    Some(format!("/devices/{device}/messages/devicebound"))
}

fn raw_message(props: Properties, app: Vec<(&str, SimpleValue)>, body: &[u8]) -> Message<Data> {
    let mut builder = ApplicationProperties::builder();
    for (k, v) in app {
        builder = builder.insert(k, v);
    }
    Message::builder()
        .properties(props)
        .application_properties(builder.build())
        .data(Binary::from(body.to_vec()))
        .build()
}

/// The condition and description a raw send was rejected with.
async fn rejected(sender: &mut Sender, message: Message<Data>) -> (ErrorCondition, String) {
    match tokio::time::timeout(WAIT, sender.send(message))
        .await
        .expect("an outcome in time")
    {
        Ok(Outcome::Rejected(r)) => {
            let e = r.error.expect("a rejection carries an error");
            (e.condition, e.description.unwrap_or_default())
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

async fn next_batch(rx: &mut FeedbackReceiver) -> FeedbackBatch {
    tokio::time::timeout(WAIT, rx.next())
        .await
        .expect("a feedback batch in time")
        .expect("the feedback link works")
        .expect("the feedback link is open")
}

async fn no_batch_within(rx: &mut FeedbackReceiver, limit: Duration) {
    if let Ok(got) = tokio::time::timeout(limit, rx.next()).await {
        panic!("expected no feedback, got {got:?}");
    }
}

/// Completes the device's next message as a device would, straight on the hub.
async fn device_completes(hub: &TestHub, device: &str) -> String {
    let h = &hub.server().hub;
    let locked = h
        .c2d_receive(device, Holder::Poll)
        .await
        .unwrap()
        .expect("a queued message");
    h.c2d_complete(device, &locked.lock_token).await.unwrap();
    locked.message.message_id.unwrap_or_default()
}

#[tokio::test]
async fn a_send_is_accepted_once_the_message_is_durably_queued() {
    let mut hub = TestHub::start().await;
    hub.device("c2d-a").await;
    let client = service(&hub, "service");
    let before = twinhub_core::keys::now_millis();
    let id = client
        .send_c2d(
            "c2d-a",
            C2dMessage::new("hello device")
                .message_id("m-1")
                .correlation_id("c-1")
                .content_type("text/plain")
                .content_encoding("utf-8")
                .ack(Ack::Full)
                .ttl(Duration::from_secs(600))
                .property("color", "red")
                .property("empty", ""),
        )
        .await
        .unwrap();
    assert_eq!(id, "m-1");
    // The accepted outcome came after the commit: the queue holds the message already.
    assert_eq!(hub.server().hub.c2d().depth("c2d-a"), 1);
    let device = hub.owner().get_device("c2d-a").await.unwrap();
    assert_eq!(device.cloud_to_device_message_count, Some(1));
    // A random message id when the caller sets none.
    let generated = client
        .send_c2d("c2d-a", C2dMessage::new(Vec::new()))
        .await
        .unwrap();
    assert_eq!(generated.len(), 36, "{generated}");

    // ... and it survives a restart.
    hub.restart().await;
    let h = hub.server().hub.clone();
    assert_eq!(h.c2d().depth("c2d-a"), 2);
    let m = h
        .c2d_receive("c2d-a", Holder::Poll)
        .await
        .unwrap()
        .unwrap()
        .message;
    assert_eq!(m.message_id.as_deref(), Some("m-1"));
    assert_eq!(m.correlation_id.as_deref(), Some("c-1"));
    assert_eq!(m.content_type.as_deref(), Some("text/plain"));
    assert_eq!(m.content_encoding.as_deref(), Some("utf-8"));
    assert_eq!(m.to, "/devices/c2d-a/messages/devicebound");
    assert_eq!(m.ack, Ack::Full);
    assert_eq!(
        m.application,
        [
            ("color".to_owned(), "red".to_owned()),
            ("empty".to_owned(), String::new())
        ],
        "iothub-ack is not an application property"
    );
    assert_eq!(m.body, b"hello device");
    let ttl = m.expiry_ms - before;
    assert!((595_000..=605_000).contains(&ttl), "expiry {ttl} ms out");
}

#[tokio::test]
async fn refusals_carry_the_iot_hub_code_in_the_sdk() {
    let hub = TestHub::start_with(small_queues).await;
    hub.device("c2d-r").await;
    let client = service(&hub, "service");
    let code = |r: twinhub_sdk::Result<String>| match r {
        Err(e) => (e.status(), e.code()),
        Ok(id) => panic!("expected a refusal, {id} was queued"),
    };
    assert_eq!(
        code(client.send_c2d("nobody", C2dMessage::new("x")).await),
        (Some(404), Some(ErrorCode::DeviceNotFound))
    );
    assert_eq!(
        code(
            client
                .send_c2d("c2d-r", C2dMessage::new(vec![b'x'; 64 * 1024 + 1]))
                .await
        ),
        (Some(413), Some(ErrorCode::MessageTooLarge))
    );
    let past = SystemTime::now() - Duration::from_secs(60);
    assert_eq!(
        code(
            client
                .send_c2d("c2d-r", C2dMessage::new("late").expiry(past))
                .await
        ),
        (Some(400), Some(ErrorCode::ArgumentInvalid))
    );
    for i in 0..2 {
        client
            .send_c2d("c2d-r", C2dMessage::new(format!("{i}")))
            .await
            .unwrap();
    }
    assert_eq!(
        code(client.send_c2d("c2d-r", C2dMessage::new("full")).await),
        (Some(403), Some(ErrorCode::DeviceMaximumQueueDepthExceeded))
    );
    // Refusals leave the link usable.
    device_completes(&hub, "c2d-r").await;
    client
        .send_c2d("c2d-r", C2dMessage::new("room again"))
        .await
        .unwrap();
    assert_eq!(hub.server().hub.c2d().depth("c2d-r"), 2);
}

#[tokio::test]
async fn refusals_use_the_conditions_the_service_sdks_map() {
    let hub = TestHub::start_with(small_queues).await;
    hub.device("c2d-w").await;
    let (_c, mut s) = raw_amqp_session(&hub, Some("service")).await;
    let mut tx = raw_sender(&mut s, "raw-refusals").await;
    let props = |to: Option<String>| Properties {
        message_id: Some(MessageId::String("m".into())),
        to,
        ..Properties::default()
    };

    let (condition, description) =
        rejected(&mut tx, raw_message(props(to("nobody")), vec![], b"x")).await;
    assert_eq!(condition, ErrorCondition::AmqpError(AmqpError::NotFound));
    assert!(
        description.starts_with("DeviceNotFound (404001): "),
        "{description}"
    );

    let argument = ErrorCondition::Custom(Symbol::from("com.microsoft:argument-error"));
    let (condition, description) = rejected(&mut tx, raw_message(props(None), vec![], b"x")).await;
    assert_eq!(condition, argument, "a message without `to`");
    assert!(
        description.starts_with("ArgumentInvalid (400004): "),
        "{description}"
    );
    let (condition, _) = rejected(
        &mut tx,
        raw_message(
            props(Some("/devices/c2d-w/messages/events".into())),
            vec![],
            b"x",
        ),
    )
    .await;
    assert_eq!(condition, argument, "a `to` that is not devicebound");
    let (condition, _) = rejected(
        &mut tx,
        raw_message(
            props(to("c2d-w")),
            vec![("iothub-ack", SimpleValue::String("sometimes".into()))],
            b"x",
        ),
    )
    .await;
    assert_eq!(condition, argument, "an unknown iothub-ack");
    let expired = Properties {
        absolute_expiry_time: Some(Timestamp::from_milliseconds(
            twinhub_core::keys::now_millis() - 1000,
        )),
        ..props(to("c2d-w"))
    };
    let (condition, _) = rejected(&mut tx, raw_message(expired, vec![], b"x")).await;
    assert_eq!(condition, argument, "expired on arrival");

    let (condition, description) = rejected(
        &mut tx,
        raw_message(props(to("c2d-w")), vec![], &vec![b'x'; 64 * 1024 + 1]),
    )
    .await;
    assert_eq!(
        condition,
        ErrorCondition::LinkError(LinkError::MessageSizeExceeded)
    );
    assert!(
        description.starts_with("MessageTooLarge (413001): "),
        "{description}"
    );

    for _ in 0..2 {
        let sent = tx
            .send(raw_message(props(to("c2d-w")), vec![], b"ok"))
            .await;
        assert!(matches!(sent, Ok(Outcome::Accepted(_))), "{sent:?}");
    }
    let (condition, _) = rejected(&mut tx, raw_message(props(to("c2d-w")), vec![], b"x")).await;
    assert_eq!(
        condition,
        ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded)
    );
    assert_eq!(hub.server().hub.c2d().depth("c2d-w"), 2);
}

#[tokio::test]
async fn any_message_id_type_is_kept_as_text_and_values_as_strings() {
    let hub = TestHub::start().await;
    hub.device("c2d-t").await;
    let (_c, mut s) = raw_amqp_session(&hub, Some("service")).await;
    // A sender asking for rcv-settle-mode second, as uamqp does: the hub answers with first
    // and settles each delivery with its outcome.
    let mut tx = Sender::builder()
        .name("raw-types")
        .target("/Messages/DeviceBound")
        .receiver_settle_mode(ReceiverSettleMode::Second)
        .attach(&mut s)
        .await
        .unwrap();
    let uuid = [
        0x6f, 0x1e, 0x5a, 0x8e, 0x4a, 0x3b, 0x4c, 0x2d, 0x9e, 0x1f, 0x0a, 0x1b, 0x2c, 0x3d, 0x4e,
        0x5f,
    ];
    let props = Properties {
        message_id: Some(MessageId::Uuid(uuid.into())),
        correlation_id: Some(MessageId::Ulong(42)),
        to: Some("/devices/c2d%2Dt/messages/DeviceBound".into()),
        ..Properties::default()
    };
    let mut app = ApplicationProperties::builder();
    app = app.insert("n", SimpleValue::Int(5));
    app = app.insert("b", SimpleValue::Bool(true));
    app = app.insert("iothub-ack", SimpleValue::String("Positive".into()));
    let message = Message::builder()
        .properties(props)
        .application_properties(app.build())
        .value(Value::String("text body".into()))
        .build();
    let outcome = tokio::time::timeout(WAIT, tx.send(message)).await.unwrap();
    assert!(matches!(outcome, Ok(Outcome::Accepted(_))), "{outcome:?}");
    let binary = Properties {
        message_id: Some(MessageId::Binary(Binary::from(b"bin-id".to_vec()))),
        to: to("c2d-t"),
        ..Properties::default()
    };
    let outcome = tokio::time::timeout(WAIT, tx.send(raw_message(binary, vec![], b"")))
        .await
        .unwrap();
    assert!(matches!(outcome, Ok(Outcome::Accepted(_))), "{outcome:?}");

    let h = &hub.server().hub;
    let first = h
        .c2d_receive("c2d-t", Holder::Poll)
        .await
        .unwrap()
        .unwrap()
        .message;
    assert_eq!(
        first.message_id.as_deref(),
        Some("6f1e5a8e-4a3b-4c2d-9e1f-0a1b2c3d4e5f")
    );
    assert_eq!(first.correlation_id.as_deref(), Some("42"));
    assert_eq!(first.ack, Ack::Positive);
    assert_eq!(
        first.application,
        [
            ("n".to_owned(), "5".to_owned()),
            ("b".to_owned(), "true".to_owned())
        ]
    );
    assert_eq!(first.body, b"text body");
    let second = h
        .c2d_receive("c2d-t", Holder::Poll)
        .await
        .unwrap()
        .unwrap()
        .message;
    assert_eq!(second.message_id.as_deref(), Some("bin-id"));
}

/// The refusal of a link attach, whether it comes with the attach or as a detach right after.
async fn sender_refused(
    session: &mut fe2o3_amqp::session::SessionHandle<()>,
    name: &str,
) -> ErrorCondition {
    match Sender::attach(session, name, "/messages/devicebound").await {
        Err(SenderAttachError::RemoteClosedWithError(e)) => e.condition,
        Err(e) => panic!("unexpected attach error {e:?}"),
        Ok(mut tx) => {
            let message = raw_message(
                Properties {
                    to: to("c2d-u"),
                    ..Properties::default()
                },
                vec![],
                b"x",
            );
            match tokio::time::timeout(WAIT, tx.send(message)).await.unwrap() {
                Err(fe2o3_amqp::link::SendError::LinkStateError(
                    fe2o3_amqp::link::LinkStateError::RemoteClosedWithError(e),
                )) => e.condition,
                other => panic!("expected the link to be refused, got {other:?}"),
            }
        }
    }
}

async fn receiver_refused(session: &mut fe2o3_amqp::session::SessionHandle<()>) -> ErrorCondition {
    match Receiver::attach(session, "fb-no", "/messages/servicebound/feedback").await {
        Err(ReceiverAttachError::RemoteClosedWithError(e)) => e.condition,
        Err(e) => panic!("unexpected attach error {e:?}"),
        Ok(mut rx) => match tokio::time::timeout(WAIT, rx.recv::<Body<Value>>())
            .await
            .unwrap()
        {
            Err(fe2o3_amqp::link::RecvError::LinkStateError(
                fe2o3_amqp::link::LinkStateError::RemoteClosedWithError(e),
            )) => e.condition,
            other => panic!("expected the link to be refused, got {other:?}"),
        },
    }
}

#[tokio::test]
async fn links_without_service_connect_are_refused() {
    let hub = TestHub::start().await;
    hub.device("c2d-u").await;
    let unauthorized = ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess);
    // A policy without ServiceConnect, signed in with SASL PLAIN.
    let (_c, mut s) = raw_amqp_session(&hub, Some("registryRead")).await;
    assert_eq!(sender_refused(&mut s, "tx-ro").await, unauthorized);
    assert_eq!(receiver_refused(&mut s).await, unauthorized);
    // No token at all.
    let (_c2, mut s2) = raw_amqp_session(&hub, None).await;
    assert_eq!(sender_refused(&mut s2, "tx-anon").await, unauthorized);
    // The SDK, whose CBS put-token succeeds but grants no ServiceConnect.
    match service(&hub, "registryReadWrite")
        .send_c2d("c2d-u", C2dMessage::new("x"))
        .await
    {
        Err(twinhub_sdk::Error::NotAuthorized(_)) => {}
        other => panic!("expected NotAuthorized, got {other:?}"),
    }
    // A refused link shows at once or at the first read.
    let refused = match service(&hub, "registryRead").feedback().await {
        Err(e) => e,
        Ok(mut rx) => tokio::time::timeout(WAIT, rx.next())
            .await
            .unwrap()
            .expect_err("the feedback link is refused"),
    };
    assert!(
        matches!(refused, twinhub_sdk::Error::NotAuthorized(_)),
        "{refused:?}"
    );
    assert_eq!(hub.server().hub.c2d().depth("c2d-u"), 0);
}

#[tokio::test]
async fn a_completed_message_with_full_ack_comes_back_as_success_feedback() {
    let hub = TestHub::start_with(quick_feedback).await;
    hub.device("c2d-f").await;
    let client = service(&hub, "service");
    let mut feedback = client.feedback().await.unwrap();
    let id = client
        .send_c2d("c2d-f", C2dMessage::new("ping").ack(Ack::Full))
        .await
        .unwrap();
    // No feedback was asked for this one.
    client
        .send_c2d("c2d-f", C2dMessage::new("quiet"))
        .await
        .unwrap();
    assert_eq!(device_completes(&hub, "c2d-f").await, id);
    device_completes(&hub, "c2d-f").await;
    let batch = next_batch(&mut feedback).await;
    assert_eq!(batch.records.len(), 1, "{batch:?}");
    let r = &batch.records[0];
    assert_eq!(r.original_message_id, id);
    assert_eq!(r.device_id, "c2d-f");
    assert_eq!(r.status_code, FeedbackStatus::Success);
    assert_eq!(r.description, "Success");
    assert!(!r.device_generation_id.is_empty());
    assert!(
        r.enqueued_time_utc.ends_with('Z'),
        "{}",
        r.enqueued_time_utc
    );
    assert!(batch.enqueued_time.is_some());
    assert_eq!(batch.delivery_count, 0);
    feedback.complete(&batch).await.unwrap();
    no_batch_within(&mut feedback, Duration::from_millis(800)).await;
    wait_until(|| hub.server().hub.c2d().feedback_depth() == 0).await;
    feedback.close().await;
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "the condition never held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_abandoned_batch_comes_back_and_a_rejected_one_is_dropped() {
    let hub = TestHub::start_with(quick_feedback).await;
    hub.device("c2d-b").await;
    let client = service(&hub, "service");
    let id = client
        .send_c2d("c2d-b", C2dMessage::new("x").ack(Ack::Positive))
        .await
        .unwrap();
    device_completes(&hub, "c2d-b").await;
    let mut feedback = client.feedback().await.unwrap();
    let first = next_batch(&mut feedback).await;
    assert_eq!(first.records[0].original_message_id, id);
    feedback.abandon(&first).await.unwrap();
    let again = next_batch(&mut feedback).await;
    assert_eq!(again.records, first.records);
    assert_ne!(again.lock_token, first.lock_token);
    assert_eq!(again.delivery_count, 1);
    feedback.reject(&again).await.unwrap();
    no_batch_within(&mut feedback, Duration::from_millis(800)).await;
    wait_until(|| hub.server().hub.c2d().feedback_depth() == 0).await;
}

#[tokio::test]
async fn a_batch_unsettled_when_its_receiver_leaves_goes_to_another() {
    let hub = TestHub::start_with(quick_feedback).await;
    hub.device("c2d-d").await;
    let client = service(&hub, "service");
    let id = client
        .send_c2d("c2d-d", C2dMessage::new("x").ack(Ack::Full))
        .await
        .unwrap();
    device_completes(&hub, "c2d-d").await;
    let mut first = client.feedback().await.unwrap();
    let batch = next_batch(&mut first).await;
    assert_eq!(batch.records[0].original_message_id, id);
    first.close().await;
    let mut second = client.feedback().await.unwrap();
    let again = next_batch(&mut second).await;
    assert_eq!(again.records, batch.records);
    second.complete(&again).await.unwrap();
    wait_until(|| hub.server().hub.c2d().feedback_depth() == 0).await;
    // Receivers compete for batches: only the next one may be listening.
    second.close().await;

    // The same when the whole connection just goes away.
    let id = client
        .send_c2d("c2d-d", C2dMessage::new("y").ack(Ack::Full))
        .await
        .unwrap();
    device_completes(&hub, "c2d-d").await;
    let mut dropped = client.feedback().await.unwrap();
    assert_eq!(
        next_batch(&mut dropped).await.records[0].original_message_id,
        id
    );
    drop(dropped);
    let mut third = client.feedback().await.unwrap();
    let again = next_batch(&mut third).await;
    assert_eq!(again.records[0].original_message_id, id);
    third.complete(&again).await.unwrap();
}

#[tokio::test]
async fn a_pre_settled_receiver_gets_iot_hubs_feedback_message_and_completes_it() {
    let hub = TestHub::start_with(quick_feedback).await;
    hub.device("c2d-p").await;
    let client = service(&hub, "service");
    let id = client
        .send_c2d("c2d-p", C2dMessage::new("x").ack(Ack::Full))
        .await
        .unwrap();
    device_completes(&hub, "c2d-p").await;
    let (_c, mut s) = raw_amqp_session(&hub, Some("service")).await;
    let mut rx = Receiver::builder()
        .name("fb-settled")
        .source("amqps://localhost:5671/messages/servicebound/feedback")
        .target("fb-local")
        .sender_settle_mode(SenderSettleMode::Settled)
        .attach(&mut s)
        .await
        .unwrap();
    let delivery = tokio::time::timeout(WAIT, rx.recv::<Body<Value>>())
        .await
        .unwrap()
        .unwrap();
    let message = delivery.into_message();
    let p = message.properties.unwrap();
    assert!(matches!(p.message_id, Some(MessageId::String(_))));
    assert_eq!(p.content_type, Some(Symbol::from(FEEDBACK_CONTENT_TYPE)));
    assert_eq!(
        p.user_id.map(|u| u.into_vec()),
        Some(b"twinhub".to_vec()),
        "user-id is the hub's name"
    );
    let annotations = message.message_annotations.unwrap();
    assert!(
        annotations.0.iter().any(|(k, v)| matches!(
            (k, v),
            (OwnedKey::Symbol(s), Value::Timestamp(_)) if s.0 == "iothub-enqueuedtime"
        )),
        "{annotations:?}"
    );
    let Body::Data(data) = message.body else {
        panic!("the body is one data section");
    };
    let json: serde_json::Value =
        serde_json::from_slice(&data.into_iter().next().unwrap().0).unwrap();
    assert_eq!(json[0]["originalMessageId"], id.as_str());
    assert_eq!(json[0]["statusCode"], "Success");
    assert_eq!(json[0]["deviceId"], "c2d-p");
    // Taking it pre-settled completed it.
    wait_until(|| hub.server().hub.c2d().feedback_depth() == 0).await;
}

#[tokio::test]
async fn thousands_of_sends_share_one_pipelined_link() {
    let hub = TestHub::start().await;
    let devices: Vec<String> = (0..40).map(|i| format!("c2d-load-{i}")).collect();
    for d in &devices {
        hub.device(d).await;
    }
    let client = service(&hub, "service");
    // Open the connection first, so the rate below counts only sends.
    client
        .send_c2d(&devices[0], C2dMessage::new("warm-up"))
        .await
        .unwrap();
    let total = 1200usize;
    let started = Instant::now();
    let results: Vec<_> = futures_util::stream::iter(0..total)
        .map(|i| {
            let client = client.clone();
            let device = devices[i % devices.len()].clone();
            async move {
                client
                    .send_c2d(&device, C2dMessage::new(format!("{i}")))
                    .await
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed[0]
    );
    let queued: u64 = devices
        .iter()
        .map(|d| hub.server().hub.c2d().depth(d))
        .sum();
    assert_eq!(queued, total as u64 + 1);
    eprintln!(
        "{total} sends over one link in {elapsed:?}: {:.0}/s (debug build)",
        total as f64 / elapsed.as_secs_f64()
    );
}
