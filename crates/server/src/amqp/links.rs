//! The links of one AMQP session: `$cbs` and `$management` request/reply pairs (the reply
//! goes back on the link the client attached from the same node), partition receivers fed
//! from the event log of their entity (the built-in endpoint or a custom stream, see `entity`;
//! credit-driven, woken by appends), IoT Hub's redirect on its own
//! `messages/events` paths, the cloud-to-device links (handed to `c2d` once ServiceConnect is
//! proved), and refusals with Event Hubs' error conditions.

use std::collections::HashMap;
use std::sync::Arc;

use fe2o3_amqp::acceptor::{LinkAcceptor, LinkEndpoint, ListenerSessionHandle};
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp_types::definitions::{
    AmqpError, Error as AmqpErrorBody, ErrorCondition, Fields, LinkError, Role,
};
use fe2o3_amqp_types::messaging::{Body, TargetArchetype};
use fe2o3_amqp_types::primitives::{Symbol, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use twinhub_core::auth::Right;
use twinhub_core::keys;
use twinhub_core::logsafe::Shown;
use twinhub_eventhub::address::{Node, parse_address, redirect_address};
use twinhub_eventhub::filter::{
    SELECTOR_FILTER, SELECTOR_FILTER_CODE, StartPosition, parse_selector,
};
use twinhub_eventhub::management::{self, PartitionState, Request};
use twinhub_eventhub::{EventMeta, RuntimeInfo, event_message};
use twinhub_eventlog::{EventLog, Position};
use twinhub_proto::message::Message as D2cMessage;

use super::entity::Entity;
use super::owners::{Claim, Refusal};
use super::{AmqpContext, Grants};

/// Events read from the log per batch, and about this many bytes.
const READ_BATCH: usize = 256;
const READ_BYTES: usize = 1 << 20;

fn error(condition: ErrorCondition, description: impl Into<String>) -> AmqpErrorBody {
    AmqpErrorBody::new(condition, Some(description.into()), None)
}

/// Detaches (closes) a just-accepted link with `err`.
async fn refuse(link: LinkEndpoint, err: AmqpErrorBody) {
    let _ = match link {
        LinkEndpoint::Sender(s) => s.close_with_error(err).await,
        LinkEndpoint::Receiver(r) => r.close_with_error(err).await,
    };
}

/// A request/reply node whose two links have not both arrived yet.
#[derive(Default)]
struct PendingPair {
    requests: Option<Receiver>,
    replies: Option<Sender>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum ControlNode {
    Cbs,
    Management,
}

pub(super) async fn serve_session(
    ctx: AmqpContext,
    mut session: ListenerSessionHandle,
    grants: Arc<Grants>,
    done: CancellationToken,
    peer: String,
) {
    let links = TaskTracker::new();
    let mut pairs: HashMap<ControlNode, PendingPair> = HashMap::new();
    loop {
        let attach = tokio::select! {
            _ = done.cancelled() => break,
            attach = session.next_incoming_attach() => match attach {
                Some(a) => a,
                None => break,
            },
        };
        // The node is the source of a link the client receives on, the target of one it sends on.
        let address = match attach.role {
            Role::Receiver => attach
                .source
                .as_ref()
                .and_then(|s| s.address.clone())
                .unwrap_or_default(),
            Role::Sender => match attach.target.as_deref() {
                Some(TargetArchetype::Target(t)) => t.address.clone().unwrap_or_default(),
                #[allow(unreachable_patterns)]
                _ => String::new(),
            },
        };
        let node = parse_address(&address);
        let epoch = attach
            .properties
            .as_ref()
            .and_then(|p| p.get(&Symbol::from("com.microsoft:epoch")))
            .and_then(|v| match v {
                Value::Long(e) => Some(*e),
                Value::Int(e) => Some(i64::from(*e)),
                _ => None,
            });
        let runtime_metric = attach.desired_capabilities.as_ref().is_some_and(|caps| {
            caps.0
                .iter()
                .any(|c| c.0 == "com.microsoft:enable-receiver-runtime-metric")
        });
        let filter = selector_of(&attach);
        let role = attach.role.clone();
        // A receiver's start is fixed before its attach is answered: `@latest` then means
        // what was stored when the client asked, and nothing appended in between is skipped.
        let opened = match (&node, &role) {
            (
                Node::Partition {
                    entity,
                    consumer_group,
                    partition,
                },
                Role::Receiver,
            ) => Some(open_partition(
                &ctx,
                &grants,
                entity,
                consumer_group,
                partition,
                filter.as_deref(),
                epoch,
            )),
            _ => None,
        };
        // A back end's devicebound sender gets its own settlement rules and size limit.
        let acceptor = match (&node, &role) {
            (Node::DeviceBound, Role::Sender) => super::c2d::devicebound_acceptor(),
            _ => LinkAcceptor::new(),
        };
        let link = match acceptor.accept_incoming_attach(attach, &mut session).await {
            Ok(link) => link,
            Err(e) => {
                tracing::debug!(%peer, address = %Shown(&address), "AMQP attach failed: {e}");
                continue;
            }
        };
        match node {
            Node::Cbs | Node::Management { .. } => {
                let kind = if node == Node::Cbs {
                    ControlNode::Cbs
                } else {
                    ControlNode::Management
                };
                if let Node::Management {
                    entity: Some(entity),
                } = &node
                    && Entity::resolve(&ctx, entity).is_none()
                {
                    refuse(
                        link,
                        error(
                            AmqpError::NotFound.into(),
                            format!("The messaging entity {} could not be found", Shown(entity)),
                        ),
                    )
                    .await;
                    continue;
                }
                let pair = pairs.entry(kind).or_default();
                match link {
                    LinkEndpoint::Receiver(r) => pair.requests = Some(r),
                    LinkEndpoint::Sender(s) => pair.replies = Some(s),
                }
                if pair.requests.is_some() && pair.replies.is_some() {
                    let pair = pairs.remove(&kind).unwrap_or_default();
                    if let (Some(requests), Some(replies)) = (pair.requests, pair.replies) {
                        links.spawn(serve_control(
                            ctx.clone(),
                            kind,
                            requests,
                            replies,
                            grants.clone(),
                            done.clone(),
                            peer.clone(),
                        ));
                    }
                }
            }
            Node::Partition { .. } => match (link, opened) {
                (LinkEndpoint::Sender(sender), Some(Ok((log, partition, cursor, claim)))) => {
                    links.spawn(serve_partition(
                        log,
                        sender,
                        partition,
                        cursor,
                        claim,
                        runtime_metric,
                        done.clone(),
                        peer.clone(),
                    ));
                }
                (LinkEndpoint::Sender(sender), Some(Err(err))) => {
                    tracing::debug!(%peer, address = %Shown(&address), "AMQP receiver refused: {err:?}");
                    let _ = sender.close_with_error(err).await;
                }
                (link, _) => {
                    refuse(
                        link,
                        error(
                            AmqpError::NotAllowed.into(),
                            "Sending to an Event Hub partition of the built-in endpoint is not supported; devices send telemetry over MQTT",
                        ),
                    )
                    .await;
                }
            },
            Node::HubEventsManagement | Node::HubEventsPartition { .. } => {
                let rest = match &node {
                    Node::HubEventsPartition {
                        consumer_group,
                        partition,
                    } => format!("ConsumerGroups/{consumer_group}/Partitions/{partition}"),
                    _ => "$management".to_owned(),
                };
                let target =
                    redirect_address(&ctx.redirect_host, ctx.redirect_port, &ctx.entity, &rest);
                let mut info = Fields::new();
                info.insert(
                    Symbol::from("hostname"),
                    Value::String(ctx.redirect_host.clone()),
                );
                info.insert(
                    Symbol::from("network-host"),
                    Value::String(ctx.redirect_host.clone()),
                );
                info.insert(
                    Symbol::from("port"),
                    Value::Int(i32::from(ctx.redirect_port)),
                );
                info.insert(Symbol::from("address"), Value::String(target));
                refuse(
                    link,
                    AmqpErrorBody::new(
                        ErrorCondition::LinkError(LinkError::Redirect),
                        None,
                        Some(info),
                    ),
                )
                .await;
            }
            Node::DeviceBound | Node::Feedback if !grants.allows(Right::ServiceConnect) => {
                tracing::debug!(%peer, address = %Shown(&address), "AMQP cloud-to-device link refused: no ServiceConnect");
                refuse(link, unauthorized()).await;
            }
            Node::DeviceBound => match link {
                LinkEndpoint::Receiver(r) => {
                    links.spawn(super::c2d::serve_devicebound(
                        ctx.clone(),
                        r,
                        done.clone(),
                        peer.clone(),
                    ));
                }
                link => {
                    refuse(
                        link,
                        error(
                            AmqpError::NotAllowed.into(),
                            "messages/devicebound only takes messages; delivery feedback is read from messages/servicebound/feedback",
                        ),
                    )
                    .await;
                }
            },
            Node::Feedback => match link {
                LinkEndpoint::Sender(s) => {
                    links.spawn(super::c2d::serve_feedback(
                        ctx.clone(),
                        s,
                        done.clone(),
                        peer.clone(),
                    ));
                }
                link => {
                    refuse(
                        link,
                        error(
                            AmqpError::NotAllowed.into(),
                            "messages/servicebound/feedback can only be read from",
                        ),
                    )
                    .await;
                }
            },
            Node::Other(path) => {
                refuse(
                    link,
                    error(
                        AmqpError::NotFound.into(),
                        format!("The messaging entity {} could not be found", Shown(&path)),
                    ),
                )
                .await;
            }
        }
    }
    links.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), links.wait()).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), session.end()).await;
}

/// The selector text of a receiver's source filter, under either descriptor form.
fn selector_of(attach: &fe2o3_amqp_types::performatives::Attach) -> Option<String> {
    let filter = attach.source.as_ref()?.filter.as_ref()?;
    for (key, value) in filter.iter() {
        let text = match value {
            Value::Described(d) => {
                let named = match &d.descriptor {
                    serde_amqp::descriptor::Descriptor::Name(n) => n.0 == SELECTOR_FILTER,
                    serde_amqp::descriptor::Descriptor::Code(c) => *c == SELECTOR_FILTER_CODE,
                };
                if !named && key.0 != SELECTOR_FILTER {
                    continue;
                }
                match &d.value {
                    Value::String(s) => s.clone(),
                    _ => continue,
                }
            }
            Value::String(s) if key.0 == SELECTOR_FILTER => s.clone(),
            _ => continue,
        };
        return Some(text);
    }
    None
}

fn unauthorized() -> AmqpErrorBody {
    error(
        AmqpError::UnauthorizedAccess.into(),
        "Unauthorized: put a token with ServiceConnect on $cbs (or sign in with SASL PLAIN) before attaching",
    )
}

/// What a partition receiver reads: the entity's log, the partition, the first sequence
/// number to send, and its place among the partition's readers.
type OpenedPartition = (Arc<dyn EventLog>, u32, i64, Claim);

/// Checks a receiver's rights, entity, consumer group, partition and filter, and claims its
/// place.
fn open_partition(
    ctx: &AmqpContext,
    grants: &Grants,
    entity: &str,
    consumer_group: &str,
    partition: &str,
    filter: Option<&str>,
    epoch: Option<i64>,
) -> Result<OpenedPartition, AmqpErrorBody> {
    if !grants.allows(Right::ServiceConnect) {
        return Err(unauthorized());
    }
    let not_found = |what: String| error(AmqpError::NotFound.into(), what);
    let Some(entity) = Entity::resolve(ctx, entity) else {
        return Err(not_found(format!(
            "The messaging entity {} could not be found",
            Shown(entity)
        )));
    };
    let Some(group) = entity.consumer_group(ctx, consumer_group) else {
        return Err(not_found(format!(
            "The consumer group {} does not exist",
            Shown(consumer_group)
        )));
    };
    let count = entity.log.partition_count();
    let p = partition
        .parse::<u32>()
        .ok()
        .filter(|p| *p < count && partition == p.to_string())
        .ok_or_else(|| {
            not_found(format!(
                "Partition {} does not exist; valid partitions are 0 to {}",
                Shown(partition),
                count - 1
            ))
        })?;
    let position = match filter {
        None => StartPosition::Earliest,
        Some(text) => parse_selector(text)
            .map_err(|e| error(AmqpError::InvalidField.into(), e.to_string()))?,
    };
    let claim = ctx
        .owners
        .claim(&entity.owners_key(&group), p, epoch)
        .map_err(|r| match r {
        Refusal::Outranked(why) => error(ErrorCondition::LinkError(LinkError::Stolen), why),
        Refusal::Full => error(
            AmqpError::ResourceLimitExceeded.into(),
            format!(
                "At most {} receivers may read partition {p} of consumer group '{group}' at once",
                super::owners::MAX_READERS
            ),
        ),
    })?;
    let cursor = entity
        .log
        .resolve(p, &position_of(position))
        .map_err(|e| error(AmqpError::InternalError.into(), e.to_string()))?;
    Ok((entity.log, p, cursor, claim))
}

fn position_of(start: StartPosition) -> Position {
    match start {
        StartPosition::Earliest => Position::Earliest,
        StartPosition::Latest => Position::Latest,
        StartPosition::Offset { offset, inclusive } => Position::Offset { offset, inclusive },
        StartPosition::Sequence {
            sequence,
            inclusive,
        } => Position::Sequence {
            sequence,
            inclusive,
        },
        StartPosition::EnqueuedTime { ms, inclusive } => Position::EnqueuedTime { ms, inclusive },
    }
}

enum Step {
    Stop(Option<AmqpErrorBody>),
    Gone,
    Go,
}

/// Feeds a partition receiver from the log until it detaches, is stolen, or the connection
/// ends. Sending waits for the client's credit, so a receiver that grants none gets nothing
/// and costs nothing but its task.
#[allow(clippy::too_many_arguments)]
async fn serve_partition(
    log: Arc<dyn EventLog>,
    mut sender: Sender,
    partition: u32,
    cursor: i64,
    claim: Claim,
    runtime_metric: bool,
    done: CancellationToken,
    peer: String,
) {
    let stolen = claim.stolen.clone();
    let stolen_error = || {
        error(
            ErrorCondition::LinkError(LinkError::Stolen),
            "A receiver with a higher epoch took this partition",
        )
    };
    let mut next = cursor;
    let outcome = 'pump: loop {
        let batch = tokio::select! {
            _ = done.cancelled() => break 'pump Step::Stop(None),
            _ = stolen.cancelled() => break 'pump Step::Stop(Some(stolen_error())),
            read = log.read(partition, next, READ_BATCH, READ_BYTES) => read,
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(partition, "reading the event log failed: {e}");
                break Step::Stop(Some(error(
                    AmqpError::InternalError.into(),
                    "The event log cannot be read; retry later",
                )));
            }
        };
        if batch.is_empty() {
            let step = tokio::select! {
                _ = done.cancelled() => Step::Stop(None),
                _ = stolen.cancelled() => Step::Stop(Some(stolen_error())),
                _ = sender.on_detach() => Step::Gone,
                woke = log.wait_for(partition, next) => match woke {
                    Ok(()) => Step::Go,
                    Err(_) => Step::Stop(None),
                },
            };
            match step {
                Step::Go => continue,
                other => break other,
            }
        }
        for event in batch {
            let message = match D2cMessage::decode(&event.data) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(
                        partition,
                        sequence = event.sequence,
                        "a stored event cannot be decoded; skipped: {e}"
                    );
                    next = event.sequence + 1;
                    continue;
                }
            };
            let runtime = if runtime_metric {
                log.info(partition).ok().map(|i| RuntimeInfo {
                    last_sequence: i.last_sequence,
                    last_offset: i.last_offset.unwrap_or(event.offset),
                    last_enqueued_ms: i.last_enqueued_ms.unwrap_or(event.enqueued_ms),
                    retrieved_ms: keys::now_millis(),
                })
            } else {
                None
            };
            let amqp = event_message(
                &message,
                EventMeta {
                    sequence: event.sequence,
                    offset: event.offset,
                    enqueued_ms: event.enqueued_ms,
                },
                runtime,
            );
            let sent = tokio::select! {
                _ = done.cancelled() => Err(Step::Stop(None)),
                _ = stolen.cancelled() => Err(Step::Stop(Some(stolen_error()))),
                sent = sender.send_batchable(amqp) => sent.map_err(|e| {
                    tracing::debug!(%peer, partition, "AMQP receiver ended: {e}");
                    Step::Gone
                }),
            };
            match sent {
                // The client settles each delivery; nothing waits on the outcome.
                Ok(_delivery) => {}
                Err(step) => break 'pump step,
            }
            metrics::counter!("twinhub_events_delivered_total").increment(1);
            next = event.sequence + 1;
        }
    };
    match outcome {
        Step::Stop(Some(err)) => {
            let _ = sender.close_with_error(err).await;
        }
        Step::Stop(None) => {
            let _ = sender.close().await;
        }
        Step::Gone | Step::Go => {}
    }
    drop(claim);
}

/// Answers `$cbs` or `$management` requests arriving on `requests` through `replies`.
async fn serve_control(
    ctx: AmqpContext,
    kind: ControlNode,
    mut requests: Receiver,
    mut replies: Sender,
    grants: Arc<Grants>,
    done: CancellationToken,
    peer: String,
) {
    loop {
        let delivery = tokio::select! {
            _ = done.cancelled() => break,
            d = requests.recv::<Body<Value>>() => match d {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(%peer, "AMQP {kind:?} link ended: {e}");
                    break;
                }
            },
        };
        let message = delivery.message();
        let body = match &message.body {
            Body::Value(v) => Some(&v.0),
            _ => None,
        };
        let request = Request::read(
            message.properties.as_ref(),
            message.application_properties.as_ref(),
            body,
        );
        let _ = requests.accept(&delivery).await;
        let reply = match kind {
            ControlNode::Cbs => put_token(&ctx, &grants, &request, &peer),
            ControlNode::Management => read_metadata(&ctx, &grants, &request),
        };
        if let Err(e) = replies.send_batchable(reply).await {
            tracing::debug!(%peer, "AMQP {kind:?} reply not sent: {e}");
            break;
        }
    }
    // Clients end the exchange by detaching both links. Answer their detaches instead of
    // sending our own: a detach of ours crossing theirs reaches the client after it may have
    // attached a new link under the same handle, which breaks that link (seen with
    // fe2o3-amqp's client).
    if !done.is_cancelled() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), replies.on_detach()).await;
    }
    let _ = requests.close().await;
    let _ = replies.close().await;
}

type Reply = fe2o3_amqp_types::messaging::Message<fe2o3_amqp_types::messaging::AmqpValue<Value>>;

fn put_token(ctx: &AmqpContext, grants: &Grants, request: &Request, peer: &str) -> Reply {
    if request.operation.as_deref() != Some("put-token") {
        return management::reply(
            request,
            400,
            "Only put-token is supported on $cbs",
            Value::Null,
        );
    }
    let Some(token) = request.body_text.as_deref() else {
        return management::reply(
            request,
            400,
            "The put-token request carries no token",
            Value::Null,
        );
    };
    match ctx
        .hub
        .authorizer()
        .authorize_amqp_token(token, keys::now_unix())
    {
        Ok(grant) => {
            grants.add(grant);
            management::reply(request, 200, "OK", Value::Null)
        }
        Err(e) => {
            tracing::info!(%peer, "AMQP put-token refused: {}", e.message());
            management::reply(request, 401, e.message(), Value::Null)
        }
    }
}

fn read_metadata(ctx: &AmqpContext, grants: &Grants, request: &Request) -> Reply {
    let authorized = match request.security_token.as_deref() {
        Some(token) => ctx
            .hub
            .authorizer()
            .authorize_amqp_token(token, keys::now_unix())
            .is_ok_and(|g| g.allows(Right::ServiceConnect, keys::now_unix())),
        None => false,
    } || grants.allows(Right::ServiceConnect);
    if !authorized {
        return management::reply(
            request,
            401,
            "Unauthorized: a token with ServiceConnect is needed",
            Value::Null,
        );
    }
    if request.operation.as_deref() != Some("READ") {
        return management::reply(
            request,
            400,
            "Only READ is supported on $management",
            Value::Null,
        );
    }
    // A READ without a name is about the built-in endpoint, as before streams existed.
    let name = request.name.as_deref().unwrap_or(&ctx.entity);
    let Some(entity) = Entity::resolve(ctx, name) else {
        return management::reply(
            request,
            404,
            &format!("The messaging entity {} could not be found", Shown(name)),
            Value::Null,
        );
    };
    let log = &entity.log;
    let ids = twinhub_eventhub::partition_ids(log.partition_count());
    match request.kind.as_deref() {
        Some(management::TYPE_EVENTHUB) => management::reply(
            request,
            200,
            "OK",
            management::eventhub_info(&entity.name, entity.created_ms, &ids),
        ),
        Some(management::TYPE_PARTITION) => {
            let Some(p) = request
                .partition
                .as_deref()
                .and_then(|p| ids.iter().position(|id| id == p))
            else {
                return management::reply(
                    request,
                    404,
                    "The partition does not exist",
                    Value::Null,
                );
            };
            match log.info(p as u32) {
                Ok(info) => management::reply(
                    request,
                    200,
                    "OK",
                    management::partition_info(
                        &entity.name,
                        &ids[p],
                        PartitionState {
                            begin_sequence: info.begin_sequence,
                            last_sequence: info.last_sequence,
                            last_offset: info.last_offset,
                            last_enqueued_ms: info.last_enqueued_ms,
                            is_empty: info.is_empty,
                        },
                        keys::now_millis(),
                    ),
                ),
                Err(e) => management::reply(request, 500, &e.to_string(), Value::Null),
            }
        }
        _ => management::reply(request, 400, "Unknown management type", Value::Null),
    }
}
