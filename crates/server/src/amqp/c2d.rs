//! Cloud-to-device messaging over AMQP, the service side: back ends send on a link to
//! `messages/devicebound` and read delivery feedback from `messages/servicebound/feedback`.
//! Transfers become `CloudMessage`s queued by `Hub::send_c2d`; feedback batches come from
//! `Hub::c2d_feedback_next` and go back to the hub as complete, reject or abandon according to
//! the client's disposition. `links` routes the attaches here after checking ServiceConnect.

use std::collections::HashSet;
use std::time::Duration;

use fe2o3_amqp::acceptor::LinkAcceptor;
use fe2o3_amqp::acceptor::SupportedReceiverSettleModes;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::{Receiver, RecvError, SendError, Sender};
use fe2o3_amqp_types::definitions::{
    AmqpError, Error as AmqpErrorBody, ErrorCondition, LinkError, ReceiverSettleMode,
};
use fe2o3_amqp_types::messaging::{
    Body, Data, Header, Message, MessageAnnotations, MessageId, Outcome, Properties, Source, Target,
};
use fe2o3_amqp_types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Value};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use twinhub_core::c2d::FeedbackBatch;
use twinhub_core::logsafe::Shown;
use twinhub_core::{Error, keys};
use twinhub_proto::c2d::{ACK_PROPERTY, Ack, CloudMessage, millis_text};
use twinhub_proto::error::ErrorCode;

use super::AmqpContext;

/// Transfers a devicebound link may have outstanding: the credit granted at attach and
/// renewed as dispositions go out, so a sender keeps this many messages in flight while their
/// commits share the store's fsyncs.
const DEVICEBOUND_CREDIT: u32 = 200;
/// The largest transfer a devicebound link takes. Above IoT Hub's 64 KiB so that a message
/// over it is refused on its own (`amqp:link:message-size-exceeded` in a rejected outcome)
/// rather than by detaching the link; bounded so that a client cannot make us buffer without
/// limit.
const DEVICEBOUND_MAX_MESSAGE: u64 = 256 * 1024;
/// Feedback messages one receiver link may hold unsettled.
const FEEDBACK_IN_FLIGHT: usize = 16;
/// How long the sends still running when a devicebound link ends may take to be answered.
const DRAIN: Duration = Duration::from_secs(10);

/// The link acceptor type `links` uses for every attach.
pub(super) type Acceptor = LinkAcceptor<fn(Source) -> Option<Source>, fn(Target) -> Option<Target>>;

/// The acceptor for a back end's devicebound sender link. Settlement is always
/// receiver-first: uamqp (azure-iot-hub) asks for rcv-settle-mode second but completes a send
/// only on a *settled* disposition and never settles from its side, so under mode second its
/// sends would never finish. Answering the attach with mode first is what lets both it and
/// the clients that honour the mode work.
pub(super) fn devicebound_acceptor() -> Acceptor {
    LinkAcceptor::builder()
        .supported_receiver_settle_modes(SupportedReceiverSettleModes::First)
        .fallback_receiver_settle_mode(ReceiverSettleMode::First)
        .max_message_size(DEVICEBOUND_MAX_MESSAGE)
        .build()
}

/// The AMQP error a refused send carries. The conditions are those the service SDKs turn
/// into their typed errors (Node azure-iothub `translateError`, .NET `AmqpErrorMapper`);
/// the description names IoT Hub's error code (`DeviceNotFound (404001): ...`) so that
/// clients can recover it.
pub(crate) fn rejection(err: &Error) -> AmqpErrorBody {
    let code = err.code();
    let condition: ErrorCondition = match code {
        ErrorCode::DeviceNotFound | ErrorCode::ModuleNotFound | ErrorCode::IotHubNotFound => {
            AmqpError::NotFound.into()
        }
        ErrorCode::DeviceMaximumQueueDepthExceeded | ErrorCode::IotHubQuotaExceeded => {
            AmqpError::ResourceLimitExceeded.into()
        }
        ErrorCode::MessageTooLarge => ErrorCondition::LinkError(LinkError::MessageSizeExceeded),
        ErrorCode::ArgumentInvalid | ErrorCode::ArgumentNull | ErrorCode::IotHubFormatError => {
            ErrorCondition::Custom(Symbol::from("com.microsoft:argument-error"))
        }
        ErrorCode::IotHubUnauthorizedAccess => AmqpError::UnauthorizedAccess.into(),
        ErrorCode::ThrottlingException => {
            ErrorCondition::Custom(Symbol::from("com.microsoft:device-container-throttled"))
        }
        ErrorCode::InvalidOperation => AmqpError::NotAllowed.into(),
        _ => AmqpError::InternalError.into(),
    };
    AmqpErrorBody::new(
        condition,
        Some(format!(
            "{} ({}): {}",
            code.name(),
            code.code(),
            err.message()
        )),
        None,
    )
}

/// An AMQP message-id or correlation-id as text, whatever its type: Node sends uuids, uamqp
/// strings, other clients ulongs or binaries. Feedback reports it back as this text.
fn id_text(id: &MessageId) -> String {
    match id {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => format!("{u:x}"),
        MessageId::Binary(b) => match std::str::from_utf8(b) {
            Ok(text) => text.to_owned(),
            Err(_) => b.iter().map(|byte| format!("{byte:02x}")).collect(),
        },
    }
}

/// An application property value as text (IoT Hub's properties are strings; the SDKs send
/// other types only by mistake, and a device still deserves to see the value).
fn value_text(v: &SimpleValue) -> String {
    match v {
        SimpleValue::Null => String::new(),
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(f) => f.0.to_string(),
        SimpleValue::Double(f) => f.0.to_string(),
        SimpleValue::Char(c) => c.to_string(),
        SimpleValue::Timestamp(t) => {
            millis_text(t.milliseconds()).unwrap_or_else(|| t.milliseconds().to_string())
        }
        SimpleValue::Uuid(u) => format!("{u:x}"),
        SimpleValue::Binary(b) => String::from_utf8_lossy(b).into_owned(),
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        other => format!("{other:?}"),
    }
}

/// Reads a transfer on a devicebound link into the message the hub queues. Refuses what IoT
/// Hub refuses before queueing: an `iothub-ack` it does not know, a body that is neither data
/// nor text. The rest (`to`, size, expiry) is the hub's to judge.
pub(crate) fn cloud_message(message: Message<Body<Value>>) -> Result<CloudMessage, Error> {
    let mut m = CloudMessage::default();
    if let Some(p) = message.properties {
        m.message_id = p.message_id.as_ref().map(id_text);
        m.correlation_id = p.correlation_id.as_ref().map(id_text);
        m.user_id = p.user_id.map(|u| String::from_utf8_lossy(&u).into_owned());
        m.to = p.to.unwrap_or_default();
        m.content_type = p.content_type.map(|s| s.0);
        m.content_encoding = p.content_encoding.map(|s| s.0);
        m.expiry_ms = p.absolute_expiry_time.map_or(0, |t| t.milliseconds());
    }
    // IoT Hub's SDKs set absolute-expiry-time; a bare header ttl means the same, relative.
    if m.expiry_ms == 0
        && let Some(ttl) = message.header.as_ref().and_then(|h| h.ttl)
    {
        m.expiry_ms = keys::now_millis().saturating_add(i64::from(ttl));
    }
    if let Some(app) = message.application_properties {
        for (key, value) in app.0 {
            if key.eq_ignore_ascii_case(ACK_PROPERTY) {
                let text = value_text(&value);
                m.ack = Ack::parse(&text).ok_or_else(|| {
                    Error::invalid(format!(
                        "iothub-ack must be none, positive, negative or full, not {:?}",
                        Shown(&text).to_string()
                    ))
                })?;
            } else {
                let text = value_text(&value);
                m.application.push((key, text));
            }
        }
    }
    m.body = match message.body {
        Body::Data(sections) => sections.into_iter().flat_map(|d| d.0.into_vec()).collect(),
        Body::Value(v) => match v.0 {
            Value::String(s) => s.into_bytes(),
            Value::Binary(b) => b.into_vec(),
            Value::Null => Vec::new(),
            _ => {
                return Err(Error::invalid(
                    "the message body must be data sections or an amqp-value string",
                ));
            }
        },
        Body::Empty => Vec::new(),
        _ => {
            return Err(Error::invalid(
                "the message body must be data sections or an amqp-value string",
            ));
        }
    };
    Ok(m)
}

/// Serves a back end's link to `messages/devicebound` until it detaches or the connection
/// ends. Each transfer is queued in its own task (so a commit is never cut short when the link
/// goes away) and disposed only once the hub answered: `accepted` after the durable commit,
/// `rejected` with IoT Hub's condition otherwise. Many transfers are in flight at once; their
/// dispositions go out in the order their commits finish.
pub(super) async fn serve_devicebound(
    ctx: AmqpContext,
    mut receiver: Receiver,
    done: CancellationToken,
    peer: String,
) {
    if receiver.set_credit(DEVICEBOUND_CREDIT).await.is_err() {
        return;
    }
    let mut inflight = FuturesUnordered::new();
    let mut closing = None;
    loop {
        tokio::select! {
            _ = done.cancelled() => break,
            Some(joined) = inflight.next(), if !inflight.is_empty() => {
                if !dispose(&receiver, joined, &peer).await {
                    break;
                }
            }
            delivery = receiver.recv::<Body<Value>>() => match delivery {
                Ok(delivery) => {
                    let info = DeliveryInfo::from(&delivery);
                    let hub = ctx.hub.clone();
                    let message = cloud_message(delivery.into_message());
                    inflight.push(ctx.tracker.spawn(async move {
                        let outcome = match message {
                            Ok(m) => hub.send_c2d(m).await.map(|_| ()),
                            Err(e) => Err(e),
                        };
                        (info, outcome)
                    }));
                }
                Err(RecvError::MessageDecode(e)) => {
                    tracing::debug!(%peer, "a cloud-to-device transfer cannot be decoded: {}", Shown(&e.source.to_string()));
                    let refused = Error::invalid("the message cannot be decoded as an AMQP message");
                    if receiver.reject(e.info, rejection(&refused)).await.is_err() {
                        break;
                    }
                }
                Err(RecvError::LinkStateError(e)) => {
                    tracing::debug!(%peer, "AMQP devicebound link ended: {e}");
                    break;
                }
                Err(e) => {
                    tracing::debug!(%peer, "AMQP devicebound link broke the protocol: {e}");
                    closing = Some(AmqpErrorBody::new(
                        ErrorCondition::from(AmqpError::NotAllowed),
                        Some(e.to_string()),
                        None,
                    ));
                    break;
                }
            },
        }
    }
    // What was handed to the hub is committed or refused whatever happens to the link; answer
    // what can still be answered, so a client that is only closing gets its outcomes.
    let drain = async {
        while let Some(joined) = inflight.next().await {
            if !dispose(&receiver, joined, &peer).await {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN, drain).await;
    let _ = match closing {
        Some(err) => receiver.close_with_error(err).await,
        None => receiver.close().await,
    };
}

type Joined = Result<(DeliveryInfo, Result<(), Error>), tokio::task::JoinError>;

/// Sends the disposition of one finished send; false when the link is gone.
async fn dispose(receiver: &Receiver, joined: Joined, peer: &str) -> bool {
    let (info, outcome) = match joined {
        Ok(pair) => pair,
        Err(e) => {
            // The task cannot be joined only if it panicked: its delivery is lost with it and
            // the client's send times out.
            tracing::error!(%peer, "a cloud-to-device send task failed: {e}");
            return true;
        }
    };
    let sent = match outcome {
        Ok(()) => receiver.accept(info).await,
        Err(e) => {
            metrics::counter!("twinhub_c2d_refused_total", "code" => e.code().name()).increment(1);
            tracing::debug!(%peer, code = e.code().name(), "cloud-to-device send refused: {}", Shown(e.message()));
            receiver.reject(info, rejection(&e)).await
        }
    };
    sent.is_ok()
}

/// The AMQP message of a feedback batch, as IoT Hub sends it: message-id the lock token,
/// IoT Hub's feedback content type, user-id the hub's name, the enqueued time as the
/// `iothub-enqueuedtime` annotation, and the JSON array of records as one data section.
pub(crate) fn feedback_message(batch: &FeedbackBatch, hub_name: &str) -> Message<Data> {
    let mut annotations = MessageAnnotations::default();
    annotations.insert(
        Symbol::from("iothub-enqueuedtime").into(),
        Value::Timestamp(Timestamp::from_milliseconds(batch.enqueued_ms)),
    );
    Message::builder()
        .header(Header {
            durable: true,
            delivery_count: batch.delivery_count,
            ..Header::default()
        })
        .message_annotations(annotations)
        .properties(Properties {
            message_id: Some(MessageId::String(batch.lock_token.clone())),
            user_id: Some(Binary::from(hub_name.as_bytes().to_vec())),
            content_type: Some(Symbol::from(FeedbackBatch::CONTENT_TYPE)),
            creation_time: Some(Timestamp::from_milliseconds(batch.enqueued_ms)),
            ..Properties::default()
        })
        .data(Binary::from(batch.body()))
        .build()
}

/// Feeds a back end's link from `messages/servicebound/feedback` until it detaches or the
/// connection ends. Each batch goes out unsettled under its lock token and is completed,
/// rejected or abandoned as the client disposes of it; a batch still unsettled when the link
/// ends is abandoned, so it comes back (to this client or a competing receiver). A client
/// that takes messages pre-settled has completed them by taking them.
pub(super) async fn serve_feedback(
    ctx: AmqpContext,
    mut sender: Sender,
    done: CancellationToken,
    peer: String,
) {
    let hub = ctx.hub.clone();
    // A batch that cannot go out for want of credit is left to its lock's lapse, which
    // returns the records without counting a delivery; give up a little before it.
    let credit_wait = hub
        .c2d()
        .options()
        .lock_duration
        .saturating_sub(Duration::from_secs(5))
        .max(Duration::from_secs(1));
    let mut unsettled: FuturesUnordered<BoxFuture<'static, (String, Result<Outcome, SendError>)>> =
        FuturesUnordered::new();
    // The lock tokens of the batches on the wire, to abandon those never settled.
    let mut open: HashSet<String> = HashSet::new();
    let mut gone = false;
    loop {
        let batch = tokio::select! {
            _ = done.cancelled() => break,
            _ = sender.on_detach() => {
                gone = true;
                break;
            }
            Some((token, outcome)) = unsettled.next(), if !unsettled.is_empty() => {
                open.remove(&token);
                settle_feedback(&ctx, &token, outcome, &peer).await;
                continue;
            }
            batch = hub.c2d_feedback_next(), if unsettled.len() < FEEDBACK_IN_FLIGHT => batch,
        };
        let token = batch.lock_token.clone();
        let message = feedback_message(&batch, &ctx.entity);
        let sent = tokio::select! {
            _ = done.cancelled() => None,
            sent = tokio::time::timeout(credit_wait, sender.send_batchable(message)) => Some(sent),
        };
        match sent {
            Some(Ok(Ok(outcome))) => {
                metrics::counter!("twinhub_c2d_feedback_messages_sent_total").increment(1);
                open.insert(token.clone());
                unsettled.push(async move { (token, outcome.await) }.boxed());
            }
            Some(Ok(Err(e))) => {
                tracing::debug!(%peer, "AMQP feedback link ended: {e}");
                abandon(&ctx, &token, &peer).await;
                gone = true;
                break;
            }
            Some(Err(_no_credit)) => {
                tracing::debug!(%peer, "a feedback receiver granted no credit; its batch waits for its lock to lapse");
            }
            None => {
                abandon(&ctx, &token, &peer).await;
                break;
            }
        }
    }
    if gone {
        drop(sender);
    } else {
        let _ = tokio::time::timeout(Duration::from_secs(2), sender.close()).await;
    }
    // Outcomes that arrived before the end still count (the link's end resolves the others
    // with an error); whatever is left open comes back.
    let settle_rest = async {
        while let Some((token, outcome)) = unsettled.next().await {
            open.remove(&token);
            settle_feedback(&ctx, &token, outcome, &peer).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), settle_rest).await;
    for token in open {
        abandon(&ctx, &token, &peer).await;
    }
}

/// Applies the client's outcome for the feedback batch under `token`.
async fn settle_feedback(
    ctx: &AmqpContext,
    token: &str,
    outcome: Result<Outcome, SendError>,
    peer: &str,
) {
    let result = match outcome {
        Ok(Outcome::Accepted(_)) => ctx.hub.c2d_feedback_complete(token).await,
        Ok(Outcome::Rejected(_)) => ctx.hub.c2d_feedback_reject(token).await,
        Ok(Outcome::Released(_) | Outcome::Modified(_)) => {
            ctx.hub.c2d_feedback_abandon(token).await
        }
        #[allow(unreachable_patterns)]
        Ok(_) => ctx.hub.c2d_feedback_abandon(token).await,
        Err(e) => {
            tracing::debug!(%peer, "a feedback message was not settled: {e}");
            ctx.hub.c2d_feedback_abandon(token).await
        }
    };
    if let Err(e) = result {
        // A lock that lapsed meanwhile: the records went back and are sent again.
        tracing::debug!(%peer, "feedback settlement not applied: {}", Shown(e.message()));
    }
}

async fn abandon(ctx: &AmqpContext, token: &str, peer: &str) {
    if let Err(e) = ctx.hub.c2d_feedback_abandon(token).await {
        tracing::debug!(%peer, "feedback abandon not applied: {}", Shown(e.message()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::messaging::{AmqpValue, ApplicationProperties};
    use twinhub_proto::c2d::FeedbackRecord;

    fn with_app(app: Vec<(&str, SimpleValue)>, body: Body<Value>) -> Message<Body<Value>> {
        let mut b = ApplicationProperties::builder();
        for (k, v) in app {
            b = b.insert(k, v);
        }
        Message {
            header: None,
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(Properties {
                to: Some("/devices/d/messages/devicebound".into()),
                ..Properties::default()
            }),
            application_properties: Some(b.build()),
            body,
            footer: None,
        }
    }

    #[test]
    fn iothub_ack_is_read_and_removed_and_a_bad_one_refused() {
        let m = cloud_message(with_app(
            vec![
                ("a", SimpleValue::String("1".into())),
                ("IoTHub-Ack", SimpleValue::String("Full".into())),
                ("z", SimpleValue::Null),
            ],
            Body::Empty,
        ))
        .unwrap();
        assert_eq!(m.ack, Ack::Full);
        assert_eq!(
            m.application,
            [("a".into(), "1".into()), ("z".into(), String::new())]
        );
        let refused = cloud_message(with_app(
            vec![("iothub-ack", SimpleValue::String("loud".into()))],
            Body::Empty,
        ))
        .unwrap_err();
        assert_eq!(refused.code(), ErrorCode::ArgumentInvalid);
    }

    #[test]
    fn bodies_data_text_or_refused() {
        let text = cloud_message(with_app(
            vec![],
            Body::Value(AmqpValue(Value::String("hé".into()))),
        ))
        .unwrap();
        assert_eq!(text.body, "hé".as_bytes());
        let data = cloud_message(with_app(
            vec![],
            Body::Data(
                vec![
                    Data(Binary::from(b"ab".to_vec())),
                    Data(Binary::from(b"cd".to_vec())),
                ]
                .into(),
            ),
        ))
        .unwrap();
        assert_eq!(data.body, b"abcd");
        let number = cloud_message(with_app(vec![], Body::Value(AmqpValue(Value::Int(3)))));
        assert_eq!(number.unwrap_err().code(), ErrorCode::ArgumentInvalid);
    }

    #[test]
    fn a_header_ttl_stands_in_for_a_missing_expiry() {
        let mut m = with_app(vec![], Body::Empty);
        m.header = Some(Header {
            ttl: Some(60_000),
            ..Header::default()
        });
        let before = keys::now_millis();
        let got = cloud_message(m).unwrap();
        assert!((before + 60_000..=keys::now_millis() + 60_000).contains(&got.expiry_ms));
    }

    #[test]
    fn ids_of_every_type_as_text() {
        assert_eq!(id_text(&MessageId::Ulong(7)), "7");
        assert_eq!(
            id_text(&MessageId::Binary(Binary::from(vec![0xff, 0x01]))),
            "ff01"
        );
        assert_eq!(id_text(&MessageId::String("s".into())), "s");
    }

    #[test]
    fn refusals_name_the_code_under_the_sdks_conditions() {
        let e = rejection(&Error::device_not_found("d1"));
        assert_eq!(e.condition, ErrorCondition::from(AmqpError::NotFound));
        assert_eq!(
            e.description.as_deref(),
            Some("DeviceNotFound (404001): Device d1 not registered")
        );
        let e = rejection(&Error::new(
            ErrorCode::DeviceMaximumQueueDepthExceeded,
            "full",
        ));
        assert_eq!(
            e.condition,
            ErrorCondition::from(AmqpError::ResourceLimitExceeded)
        );
        let e = rejection(&Error::invalid("no"));
        assert_eq!(
            e.condition,
            ErrorCondition::Custom(Symbol::from("com.microsoft:argument-error"))
        );
        let e = rejection(&Error::new(ErrorCode::ServiceUnavailable, "busy"));
        assert_eq!(e.condition, ErrorCondition::from(AmqpError::InternalError));
    }

    #[test]
    fn a_feedback_message_is_shaped_as_iot_hubs() {
        let batch = FeedbackBatch {
            lock_token: "tok".into(),
            records: vec![FeedbackRecord {
                original_message_id: "m".into(),
                enqueued_time_utc: "2026-01-01T00:00:00.0000000Z".into(),
                status_code: twinhub_proto::c2d::FeedbackStatus::Success,
                description: "Success".into(),
                device_id: "d".into(),
                device_generation_id: "1".into(),
            }],
            enqueued_ms: 1_000,
            delivery_count: 2,
        };
        let m = feedback_message(&batch, "myhub");
        let p = m.properties.unwrap();
        assert_eq!(p.message_id, Some(MessageId::String("tok".into())));
        assert_eq!(p.user_id.unwrap().into_vec(), b"myhub");
        assert_eq!(p.content_type.unwrap().0, FeedbackBatch::CONTENT_TYPE);
        assert_eq!(m.header.unwrap().delivery_count, 2);
        let json: serde_json::Value = serde_json::from_slice(&m.body.0).unwrap();
        assert_eq!(json[0]["statusCode"], "Success");
    }
}
