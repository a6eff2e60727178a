//! twinhub's domain without sockets: the identity registry, twin documents and their rules,
//! direct methods, authorization decisions, and the directory of connected devices. The
//! server crate drives it from REST handlers and MQTT sessions; `twinhub-store` persists it.

pub mod auth;
pub mod c2d;
pub mod certificates;
pub mod check;
pub mod cluster;
pub mod directory;
pub mod error;
pub mod hub;
pub mod hub_events;
pub mod jobs;
mod jobs_leader;
pub mod keys;
pub mod logsafe;
pub mod methods;
pub mod modules;
pub mod query;
pub mod record;
pub mod redelivery;
pub mod registry;
pub mod routing;
mod sequence;
pub mod sessions;
pub mod telemetry;
pub mod throttle;
pub mod twin_doc;
mod twin_index;
pub mod twins;

pub use error::{Error, Result};
pub use hub::{Hub, HubOptions};
