//! The routing configuration as users write it (TOML `[[endpoints]]`, `[[routes]]`,
//! `[[enrichments]]`, `[fallback]`; the REST API's JSON) and IoT Hub's rules for it: names,
//! the reserved `events` endpoint, at most 10 enrichments, routes naming existing endpoints.

use serde::{Deserialize, Serialize};

use crate::RoutingError;

/// The built-in endpoint's name.
pub const BUILTIN_ENDPOINT: &str = "events";
/// IoT Hub's limit on enrichments per hub.
pub const MAX_ENRICHMENTS: usize = 10;
/// IoT Hub's limit on routes per hub.
pub const MAX_ROUTES: usize = 100;
/// IoT Hub's limit on custom endpoints per hub.
pub const MAX_ENDPOINTS: usize = 10;

/// Where a route's messages come from (IoT Hub's `RoutingSource`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Source {
    DeviceMessages,
    TwinChangeEvents,
    DeviceLifecycleEvents,
    DeviceConnectionStateEvents,
    DeviceJobLifecycleEvents,
}

impl Source {
    pub const ALL: [Source; 5] = [
        Source::DeviceMessages,
        Source::TwinChangeEvents,
        Source::DeviceLifecycleEvents,
        Source::DeviceConnectionStateEvents,
        Source::DeviceJobLifecycleEvents,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::DeviceMessages => "DeviceMessages",
            Source::TwinChangeEvents => "TwinChangeEvents",
            Source::DeviceLifecycleEvents => "DeviceLifecycleEvents",
            Source::DeviceConnectionStateEvents => "DeviceConnectionStateEvents",
            Source::DeviceJobLifecycleEvents => "DeviceJobLifecycleEvents",
        }
    }

    /// Parses a source name, ignoring case.
    pub fn parse(text: &str) -> Option<Source> {
        Source::ALL
            .into_iter()
            .find(|s| s.as_str().eq_ignore_ascii_case(text.trim()))
    }
}

/// What kind of endpoint a custom endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// An Event Hub-compatible stream hosted by twinhub (its own event log).
    Stream,
    /// HTTP(S) POST of each message in CloudEvents' binary mode.
    Webhook,
}

/// A custom endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub name: String,
    pub kind: EndpointKind,
    /// The webhook's URL (`http://` or `https://`); none for a stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// A route: messages from `source` for which `condition` holds go to `endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub name: String,
    pub source: Source,
    /// IoT Hub's routing query; `true` (the default) matches everything.
    #[serde(default = "always")]
    pub condition: String,
    pub endpoints: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// An enrichment: application property `key` set to `value` on messages to `endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichmentSpec {
    pub key: String,
    /// A static text, `$iothubname`, `$twin.tags.*` or `$twin.properties.desired|reported.*`.
    pub value: String,
    pub endpoints: Vec<String>,
}

/// Everything routing needs to know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub enrichments: Vec<EnrichmentSpec>,
    /// Device messages that match no route go to `events` (IoT Hub's default: on).
    #[serde(default = "yes")]
    pub fallback_enabled: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            endpoints: Vec::new(),
            routes: Vec::new(),
            enrichments: Vec::new(),
            fallback_enabled: true,
        }
    }
}

fn always() -> String {
    "true".to_owned()
}

fn yes() -> bool {
    true
}

fn invalid(message: String) -> RoutingError {
    RoutingError::Invalid(message)
}

/// IoT Hub's names for routes and endpoints: 1 to 64 letters, digits, `-` and `_`.
fn check_name(what: &str, name: &str) -> Result<(), RoutingError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} name {name:?} is invalid: use 1 to 64 letters, digits, '-' or '_'"
        )))
    }
}

impl RoutingConfig {
    /// Whether `name` is an endpoint messages can go to (`events` or a custom one).
    pub fn has_endpoint(&self, name: &str) -> bool {
        name.eq_ignore_ascii_case(crate::BUILTIN_ENDPOINT)
            || self
                .endpoints
                .iter()
                .any(|e| e.name.eq_ignore_ascii_case(name))
    }

    /// Checks names, limits and references; conditions are checked when compiled.
    pub fn validate(&self) -> Result<(), RoutingError> {
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(invalid(format!(
                "at most {MAX_ENDPOINTS} custom endpoints, not {}",
                self.endpoints.len()
            )));
        }
        if self.routes.len() > MAX_ROUTES {
            return Err(invalid(format!(
                "at most {MAX_ROUTES} routes, not {}",
                self.routes.len()
            )));
        }
        if self.enrichments.len() > MAX_ENRICHMENTS {
            return Err(invalid(format!(
                "at most {MAX_ENRICHMENTS} enrichments, not {}",
                self.enrichments.len()
            )));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            check_name("endpoint", &e.name)?;
            if e.name.eq_ignore_ascii_case(BUILTIN_ENDPOINT) {
                return Err(invalid(format!(
                    "endpoint name {:?} is the built-in endpoint's",
                    e.name
                )));
            }
            if self.endpoints[..i]
                .iter()
                .any(|o| o.name.eq_ignore_ascii_case(&e.name))
            {
                return Err(invalid(format!("endpoint {} is defined twice", e.name)));
            }
            match (e.kind, &e.url) {
                (EndpointKind::Stream, Some(_)) => {
                    return Err(invalid(format!(
                        "endpoint {}: a stream takes no url",
                        e.name
                    )));
                }
                (EndpointKind::Webhook, None) => {
                    return Err(invalid(format!(
                        "endpoint {}: a webhook needs a url",
                        e.name
                    )));
                }
                (EndpointKind::Webhook, Some(url))
                    if !(url.starts_with("http://") || url.starts_with("https://")) =>
                {
                    return Err(invalid(format!(
                        "endpoint {}: the url must start with http:// or https://",
                        e.name
                    )));
                }
                _ => {}
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            check_name("route", &r.name)?;
            if self.routes[..i]
                .iter()
                .any(|o| o.name.eq_ignore_ascii_case(&r.name))
            {
                return Err(invalid(format!("route {} is defined twice", r.name)));
            }
            if r.endpoints.is_empty() {
                return Err(invalid(format!("route {} names no endpoint", r.name)));
            }
            for e in &r.endpoints {
                if !self.has_endpoint(e) {
                    return Err(RoutingError::UnknownEndpoint {
                        what: "route",
                        name: r.name.clone(),
                        endpoint: e.clone(),
                    });
                }
            }
        }
        for (i, e) in self.enrichments.iter().enumerate() {
            let key_ok = !e.key.is_empty()
                && e.key.len() <= 64
                && e.key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !key_ok {
                return Err(invalid(format!(
                    "enrichment key {:?} is invalid: use letters, digits, '-', '_' or '.'",
                    e.key
                )));
            }
            if self.enrichments[..i].iter().any(|o| o.key == e.key) {
                return Err(invalid(format!("enrichment {} is defined twice", e.key)));
            }
            if e.value.is_empty() {
                return Err(invalid(format!("enrichment {} has no value", e.key)));
            }
            if e.endpoints.is_empty() {
                return Err(invalid(format!("enrichment {} names no endpoint", e.key)));
            }
            for n in &e.endpoints {
                if !self.has_endpoint(n) {
                    return Err(RoutingError::UnknownEndpoint {
                        what: "enrichment",
                        name: e.key.clone(),
                        endpoint: n.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}
