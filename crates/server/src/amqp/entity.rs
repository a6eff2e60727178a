//! Which event log an Event Hub entity name (a connection string's `EntityPath`, the first
//! segment of a receiver's address, the `name` of a `$management` READ) reads. The hub's own
//! entity is the built-in endpoint, with the consumer groups the hub keeps; the name of a custom
//! `stream` endpoint is that endpoint's log, with the one consumer group `$Default`, and so is
//! a webhook's dead-letter stream (`<webhook>-deadletter`, see `crate::webhook`). A webhook
//! endpoint's own log is its delivery buffer, not a stream, so its name is not found. `links`
//! asks here for receivers and `$management`; the logs come from `twinhub_core`'s routing.

use std::sync::Arc;

use twinhub_eventlog::EventLog;
use twinhub_routing::EndpointKind;

use super::AmqpContext;

/// The consumer group of a custom stream: Event Hubs' default one, always there.
pub(super) const STREAM_CONSUMER_GROUP: &str = "$Default";

/// A readable entity.
pub(super) struct Entity {
    /// The name as configured (replies carry it).
    pub name: String,
    pub log: Arc<dyn EventLog>,
    pub created_ms: i64,
    builtin: bool,
}

impl Entity {
    /// The entity called `name` (ignoring case), if one is readable.
    pub fn resolve(ctx: &AmqpContext, name: &str) -> Option<Entity> {
        let events = ctx.hub.events();
        if name.eq_ignore_ascii_case(&ctx.entity) {
            return Some(Entity {
                name: ctx.entity.clone(),
                log: events.log().clone(),
                created_ms: events.created_ms(),
                builtin: true,
            });
        }
        let routing = ctx.hub.routing();
        let (name, log) = match routing.endpoint(name) {
            Some(endpoint) if endpoint.spec.kind == EndpointKind::Stream => {
                (endpoint.spec.name, endpoint.log)
            }
            Some(_) => return None,
            None => {
                let webhook = routing.endpoints().into_iter().find(|e| {
                    e.spec.kind == EndpointKind::Webhook
                        && crate::webhook::dead_letter_name(&e.spec.name).eq_ignore_ascii_case(name)
                })?;
                let dead_letters = crate::webhook::dead_letter_name(&webhook.spec.name);
                // Opened at most once (the server's opener keeps each log), usually already
                // by the deliverer; the first open recovers a directory, which is brief.
                match routing.auxiliary_log(&dead_letters) {
                    Ok(log) => (dead_letters, log),
                    Err(e) => {
                        tracing::warn!(entity = %dead_letters, "a dead-letter stream cannot be opened: {}", e.message());
                        return None;
                    }
                }
            }
        };
        Some(Entity {
            name,
            log,
            // A stream has no creation time of its own that survives restarts; the hub's
            // endpoint time is what clients see for every entity.
            created_ms: events.created_ms(),
            builtin: false,
        })
    }

    /// The consumer group `group` names here, as it is spelled on the entity.
    pub fn consumer_group(&self, ctx: &AmqpContext, group: &str) -> Option<String> {
        if self.builtin {
            ctx.hub.events().consumer_group(group)
        } else if group.eq_ignore_ascii_case(STREAM_CONSUMER_GROUP) {
            Some(STREAM_CONSUMER_GROUP.to_owned())
        } else {
            None
        }
    }

    /// The key the partition owners (epochs, five readers) are kept under: the group alone
    /// for the built-in entity, as before streams existed, else qualified by the entity so that
    /// `$Default` of one stream does not share its readers with another's.
    pub fn owners_key(&self, group: &str) -> String {
        if self.builtin {
            group.to_owned()
        } else {
            format!("{}/{group}", self.name.to_ascii_lowercase())
        }
    }
}
