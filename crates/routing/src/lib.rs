//! IoT Hub message routing without I/O: the configuration (endpoints, routes, enrichments, the
//! fallback route) and its rules, conditions compiled with the query crate, and the decision
//! for one message: which endpoints get it, each with its enrichments. The hub core applies
//! the decision to its event logs; the server delivers webhook endpoints.
//!
//! Semantics are IoT Hub's: with no route at all every device message goes to the built-in
//! `events` endpoint; once a route exists, device messages reach an endpoint only through a
//! matching enabled route, or through the fallback route (to `events`) when none matches and
//! the fallback is enabled. A message matching several routes to one endpoint is delivered
//! there once. A condition holds only when it is exactly `true` (undefined is false).

mod config;
mod document;

pub use config::{
    BUILTIN_ENDPOINT, EndpointKind, EndpointSpec, EnrichmentSpec, MAX_ENRICHMENTS, MAX_ROUTES,
    RouteSpec, RoutingConfig, Source,
};
pub use document::{condition_document, needs_twin};

use serde_json::Value;
use twinhub_proto::message::Message;
use twinhub_query::Expr;

/// What is wrong with a routing configuration or one of its parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    #[error("{0}")]
    Invalid(String),
    #[error("route {route}: the condition does not parse: {reason}")]
    Condition { route: String, reason: String },
    #[error("{what} {name} names endpoint {endpoint}, which does not exist")]
    UnknownEndpoint {
        what: &'static str,
        name: String,
        endpoint: String,
    },
}

struct CompiledRoute {
    name: String,
    source: Source,
    condition: Option<Expr>,
    /// Indexes into [`Router::endpoints`].
    endpoints: Vec<usize>,
    needs_twin: bool,
    enabled: bool,
}

/// One endpoint's share of a routing decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub endpoint: String,
    /// Application properties to add, in configuration order.
    pub enrichments: Vec<(String, String)>,
}

/// What happens to one message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    /// The endpoints, each once, in configuration order.
    pub deliveries: Vec<Delivery>,
    /// The routes whose condition held.
    pub matched_routes: Vec<String>,
    /// No route matched and the fallback took it to `events`.
    pub fallback: bool,
}

impl Decision {
    /// Neither a route nor the fallback took the message: IoT Hub drops it.
    pub fn dropped(&self) -> bool {
        self.deliveries.is_empty()
    }
}

/// A configuration compiled for evaluation.
pub struct Router {
    config: RoutingConfig,
    routes: Vec<CompiledRoute>,
    /// `events` first, then the configured endpoints.
    endpoints: Vec<String>,
    hub_name: String,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// Validates `config` and compiles its conditions; `hub_name` is what `$iothubname`
    /// enriches with.
    pub fn compile(config: RoutingConfig, hub_name: &str) -> Result<Router, RoutingError> {
        config.validate()?;
        let mut endpoints = vec![BUILTIN_ENDPOINT.to_owned()];
        endpoints.extend(config.endpoints.iter().map(|e| e.name.clone()));
        let index = |name: &str| endpoints.iter().position(|e| e.eq_ignore_ascii_case(name));
        let mut routes = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            let condition = match r.condition.trim() {
                "" | "true" | "TRUE" | "True" => None,
                text => Some(twinhub_query::parse_condition(text).map_err(|e| {
                    RoutingError::Condition {
                        route: r.name.clone(),
                        reason: e.to_string(),
                    }
                })?),
            };
            let needs_twin = condition.as_ref().is_some_and(needs_twin);
            routes.push(CompiledRoute {
                name: r.name.clone(),
                source: r.source,
                condition,
                endpoints: r.endpoints.iter().filter_map(|e| index(e)).collect(),
                needs_twin,
                enabled: r.enabled,
            });
        }
        Ok(Router {
            config,
            routes,
            endpoints,
            hub_name: hub_name.to_owned(),
        })
    }

    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    /// Whether deciding a message from `source` needs the device's twin (a condition or an
    /// enrichment reads `$twin`), so callers load it only then.
    pub fn needs_twin(&self, source: Source) -> bool {
        self.conditions_read_twin(source)
            || self
                .config
                .enrichments
                .iter()
                .any(|e| e.value.starts_with("$twin."))
    }

    /// Whether a condition of an enabled route of `source` reads `$twin`.
    fn conditions_read_twin(&self, source: Source) -> bool {
        self.routes
            .iter()
            .any(|r| r.source == source && r.enabled && r.needs_twin)
    }

    /// Whether an enabled route takes messages from `source`: system events are built only
    /// then.
    pub fn takes(&self, source: Source) -> bool {
        self.routes.iter().any(|r| r.source == source && r.enabled)
    }

    /// Whether any route (enabled or not) exists.
    pub fn has_routes(&self) -> bool {
        !self.routes.is_empty()
    }

    /// Decides where `message` from `source` goes; `twin` is the device's twin document when
    /// [`Router::needs_twin`] said so.
    pub fn decide(&self, source: Source, message: &Message, twin: Option<&Value>) -> Decision {
        let mut decision = Decision::default();
        if self.routes.is_empty() {
            // IoT Hub without routes: device messages go to events; other sources nowhere.
            if source == Source::DeviceMessages {
                decision.deliveries.push(self.delivery(0, twin));
            }
            return decision;
        }
        // The twin goes into the document only when a condition reads it (enrichments read
        // it from `twin` directly): copying it per message is most of a document's cost.
        let doc = condition_document(message, twin.filter(|_| self.conditions_read_twin(source)));
        let mut hit = vec![false; self.endpoints.len()];
        for r in &self.routes {
            if r.source != source || !r.enabled {
                continue;
            }
            let holds = r.condition.as_ref().is_none_or(|c| c.matches(&doc));
            if holds {
                decision.matched_routes.push(r.name.clone());
                for &e in &r.endpoints {
                    hit[e] = true;
                }
            }
        }
        if decision.matched_routes.is_empty()
            && source == Source::DeviceMessages
            && self.config.fallback_enabled
        {
            hit[0] = true;
            decision.fallback = true;
        }
        for (i, on) in hit.iter().enumerate() {
            if *on {
                decision.deliveries.push(self.delivery(i, twin));
            }
        }
        decision
    }

    fn delivery(&self, endpoint: usize, twin: Option<&Value>) -> Delivery {
        let name = &self.endpoints[endpoint];
        let enrichments = self
            .config
            .enrichments
            .iter()
            .filter(|e| e.endpoints.iter().any(|n| n.eq_ignore_ascii_case(name)))
            .map(|e| (e.key.clone(), self.enrichment_value(&e.value, twin)))
            .collect();
        Delivery {
            endpoint: name.clone(),
            enrichments,
        }
    }

    /// An enrichment's value: `$iothubname`, a `$twin.` path that resolves to a scalar, or the
    /// text as written (IoT Hub stamps a missing or object-valued path literally).
    fn enrichment_value(&self, value: &str, twin: Option<&Value>) -> String {
        if value.eq_ignore_ascii_case("$iothubname") {
            return self.hub_name.clone();
        }
        if let Some(path) = value.strip_prefix("$twin.")
            && let Some(found) = twin.and_then(|t| document::lookup(t, path))
        {
            return match found {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => value.to_owned(),
            };
        }
        value.to_owned()
    }
}

#[cfg(test)]
mod tests;
