//! `twinhub endpoint`, `twinhub route` and `twinhub enrichment`: message routing managed at
//! run time through the hub's `/twinhub/routing` REST API (the SDK's `ServiceClient::routing_*`
//! calls), against a local hub's data dir or any hub's connection string, like the other
//! management commands. Changes are durable and in force at once; output is JSON.

use anyhow::{Result, anyhow, bail};
use clap::{Subcommand, ValueEnum};
use serde_json::{Map, Value};
use twinhub_sdk::routing::{Enrichment, Route, RouteTest, RoutingEndpoint};

use crate::{Target, client, print_json};

#[derive(Clone, Copy, ValueEnum)]
pub enum Kind {
    /// An Event Hub-compatible stream hosted by twinhub (read with EntityPath=NAME)
    Stream,
    /// HTTP(S) POST of each message (CloudEvents binary mode)
    Webhook,
}

#[derive(Subcommand)]
pub enum EndpointCommand {
    /// Add a custom endpoint
    Add {
        name: String,
        #[arg(long, value_enum)]
        kind: Kind,
        /// The webhook's http:// or https:// URL
        #[arg(long)]
        url: Option<String>,
    },
    /// List the custom endpoints as a JSON array
    List,
    /// Remove a custom endpoint that no route or enrichment names (its stored messages stay)
    Remove { name: String },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Subcommand)]
pub enum RouteCommand {
    /// Add a route
    Add {
        name: String,
        /// DeviceMessages, TwinChangeEvents, DeviceLifecycleEvents,
        /// DeviceConnectionStateEvents or DeviceJobLifecycleEvents
        #[arg(long)]
        source: String,
        /// IoT Hub's routing query, e.g. "temperatureAlert = 'true'" [default: true]
        #[arg(long)]
        condition: Option<String>,
        /// An endpoint the route sends to: events or a custom one (repeatable)
        #[arg(long = "endpoint", value_name = "ENDPOINT", required = true)]
        endpoints: Vec<String>,
        /// Add it switched off
        #[arg(long)]
        disabled: bool,
    },
    /// List the routes as a JSON array
    List,
    /// Remove a route
    Remove { name: String },
    /// Which routes a message would match and what each endpoint would get
    Test {
        /// The message's source [default: DeviceMessages]
        #[arg(long)]
        source: Option<String>,
        /// The message body (text)
        #[arg(long)]
        body: Option<String>,
        /// An application property, NAME=VALUE (repeatable)
        #[arg(long = "property", value_name = "NAME=VALUE")]
        properties: Vec<String>,
        /// The sending device (its twin is what $twin reads)
        #[arg(long = "device", value_name = "ID")]
        device: Option<String>,
        #[arg(long)]
        content_type: Option<String>,
        #[arg(long)]
        content_encoding: Option<String>,
    },
    /// Turn the fallback route (unmatched device messages to events) on or off
    Fallback {
        #[arg(value_enum)]
        state: Switch,
    },
}

#[derive(Subcommand)]
pub enum EnrichmentCommand {
    /// Add an enrichment, or replace the one with this key
    Add {
        key: String,
        /// A static text, $iothubname, $twin.tags.* or $twin.properties.desired|reported.*
        value: String,
        /// An endpoint whose messages get it (repeatable)
        #[arg(long = "endpoint", value_name = "ENDPOINT", required = true)]
        endpoints: Vec<String>,
    },
    /// List the enrichments as a JSON array
    List,
    /// Remove an enrichment
    Remove { key: String },
}

pub async fn endpoint(command: EndpointCommand, target: &Target) -> Result<()> {
    let (svc, _) = client(target)?;
    match command {
        EndpointCommand::Add { name, kind, url } => {
            let kind = match kind {
                Kind::Stream => "stream",
                Kind::Webhook => "webhook",
            };
            let endpoint = RoutingEndpoint {
                name,
                kind: kind.to_owned(),
                url,
            };
            print_json(&svc.routing_add_endpoint(&endpoint).await?)
        }
        EndpointCommand::List => print_json(&svc.routing_config().await?.endpoints),
        EndpointCommand::Remove { name } => {
            svc.routing_remove_endpoint(&name).await?;
            eprintln!("removed endpoint {name}");
            Ok(())
        }
    }
}

pub async fn route(command: RouteCommand, target: &Target) -> Result<()> {
    let (svc, _) = client(target)?;
    match command {
        RouteCommand::Add {
            name,
            source,
            condition,
            endpoints,
            disabled,
        } => {
            let route = Route {
                name,
                source,
                condition: condition.unwrap_or_else(|| "true".to_owned()),
                endpoints,
                enabled: !disabled,
            };
            print_json(&svc.routing_add_route(&route).await?)
        }
        RouteCommand::List => print_json(&svc.routing_config().await?.routes),
        RouteCommand::Remove { name } => {
            svc.routing_remove_route(&name).await?;
            eprintln!("removed route {name}");
            Ok(())
        }
        RouteCommand::Test {
            source,
            body,
            properties,
            device,
            content_type,
            content_encoding,
        } => {
            let test = RouteTest {
                source,
                body,
                properties: property_map(&properties)?,
                device_id: device,
                content_type,
                content_encoding,
            };
            print_json(&svc.routing_test(&test).await?)
        }
        RouteCommand::Fallback { state } => {
            let enabled = svc
                .routing_set_fallback(matches!(state, Switch::On))
                .await?;
            print_json(&serde_json::json!({ "fallback": { "enabled": enabled } }))
        }
    }
}

pub async fn enrichment(command: EnrichmentCommand, target: &Target) -> Result<()> {
    let (svc, _) = client(target)?;
    match command {
        EnrichmentCommand::Add {
            key,
            value,
            endpoints,
        } => {
            let enrichment = Enrichment {
                key,
                value,
                endpoints,
            };
            print_json(&svc.routing_add_enrichment(&enrichment).await?)
        }
        EnrichmentCommand::List => print_json(&svc.routing_config().await?.enrichments),
        EnrichmentCommand::Remove { key } => {
            svc.routing_remove_enrichment(&key).await?;
            eprintln!("removed enrichment {key}");
            Ok(())
        }
    }
}

/// `NAME=VALUE` flags as application properties; a later flag for a name replaces an earlier.
fn property_map(flags: &[String]) -> Result<Map<String, Value>> {
    let mut map = Map::new();
    for flag in flags {
        let (k, v) = flag
            .split_once('=')
            .ok_or_else(|| anyhow!("--property {flag:?} is not NAME=VALUE"))?;
        if k.is_empty() {
            bail!("--property {flag:?} has an empty name");
        }
        map.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_name_value_pairs() {
        let map = property_map(&["a=1".into(), "b=x=y".into(), "c=".into()]).unwrap();
        assert_eq!(map["a"], "1");
        assert_eq!(map["b"], "x=y");
        assert_eq!(map["c"], "");
        assert!(property_map(&["novalue".into()]).is_err());
        assert!(property_map(&["=v".into()]).is_err());
    }
}
