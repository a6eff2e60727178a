//! Message routing at run time: `/twinhub/routing` (the whole configuration), its endpoints,
//! routes and enrichments by name, the fallback switch, and the portal's "Test route". IoT
//! Hub manages routing through Azure Resource Manager, not through the hub's own REST API, so
//! these paths are twinhub's own (under `/twinhub/`, where IoT Hub has nothing). The JSON
//! mirrors the config file's tables. Reading and testing need RegistryRead or ServiceConnect;
//! changing needs RegistryWrite. Every change goes through `twinhub_core`'s routing (validated,
//! committed, in force at once); refusals are IoT Hub error codes through `ApiError`.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use twinhub_core::Error;
use twinhub_core::logsafe::Shown;
use twinhub_proto::error::ErrorCode;
use twinhub_proto::message::{Message, SOURCE_TELEMETRY, Stamp, SystemProperties};
use twinhub_routing::{
    EndpointKind, EndpointSpec, EnrichmentSpec, RouteSpec, RoutingConfig, Source,
};

use super::auth::Query as ReadRights;
use super::{ApiResult, AppState, Authorized, Write, detached, ok_json, parse_json};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/twinhub/routing", get(show))
        .route(
            "/twinhub/routing/endpoints/{name}",
            put(put_endpoint).delete(delete_endpoint),
        )
        .route(
            "/twinhub/routing/routes/{name}",
            put(put_route).delete(delete_route),
        )
        .route(
            "/twinhub/routing/enrichments/{key}",
            put(put_enrichment).delete(delete_enrichment),
        )
        .route("/twinhub/routing/fallback", put(put_fallback))
        .route("/twinhub/routing/test", post(test))
}

/// The `[fallback]` table.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fallback {
    enabled: bool,
}

/// The configuration as the config file spells it.
#[derive(Serialize)]
struct ConfigView {
    endpoints: Vec<EndpointSpec>,
    routes: Vec<RouteSpec>,
    enrichments: Vec<EnrichmentSpec>,
    fallback: Fallback,
}

impl From<RoutingConfig> for ConfigView {
    fn from(c: RoutingConfig) -> Self {
        ConfigView {
            endpoints: c.endpoints,
            routes: c.routes,
            enrichments: c.enrichments,
            fallback: Fallback {
                enabled: c.fallback_enabled,
            },
        }
    }
}

async fn show(State(s): State<AppState>, _: Authorized<ReadRights>) -> Response {
    ok_json(&ConfigView::from(s.hub.routing().config()))
}

fn not_found(what: &str, name: &str) -> Error {
    Error::new(
        ErrorCode::IotHubNotFound,
        format!("The {what} {} does not exist", Shown(name)),
    )
}

/// A body may repeat the name of its path, but not name another.
fn same_name(what: &str, path: &str, body: Option<&str>) -> Result<(), Error> {
    match body {
        Some(b) if !b.eq_ignore_ascii_case(path) => Err(Error::invalid(format!(
            "The {what} in the body ({}) differs from the one in the path ({})",
            Shown(b),
            Shown(path)
        ))),
        _ => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointBody {
    #[serde(default)]
    name: Option<String>,
    kind: EndpointKind,
    #[serde(default)]
    url: Option<String>,
}

async fn put_endpoint(
    State(s): State<AppState>,
    _: Authorized<Write>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let body: EndpointBody = parse_json(&body)?;
    same_name("endpoint name", &name, body.name.as_deref())?;
    // Readers name a stream by EntityPath; the built-in endpoint's name would be ambiguous.
    if name.eq_ignore_ascii_case(&s.amqp.entity) {
        return Err(Error::invalid(format!(
            "The endpoint name {} is the built-in endpoint's Event Hub name; choose another",
            Shown(&name)
        ))
        .into());
    }
    let spec = EndpointSpec {
        name,
        kind: body.kind,
        url: body.url,
    };
    let hub = s.hub.clone();
    let added = spec.clone();
    detached(async move { hub.add_endpoint(added).await }).await?;
    Ok(ok_json(&spec))
}

async fn delete_endpoint(
    State(s): State<AppState>,
    _: Authorized<Write>,
    Path(name): Path<String>,
) -> ApiResult {
    let config = s.hub.routing().config();
    if !config
        .endpoints
        .iter()
        .any(|e| e.name.eq_ignore_ascii_case(&name))
    {
        return Err(not_found("endpoint", &name).into());
    }
    // Said here, with the user's words, rather than as the validation's "route r names
    // endpoint e, which does not exist" about a configuration the caller never wrote.
    let users: Vec<String> = config
        .routes
        .iter()
        .filter(|r| r.endpoints.iter().any(|e| e.eq_ignore_ascii_case(&name)))
        .map(|r| format!("route {}", r.name))
        .chain(
            config
                .enrichments
                .iter()
                .filter(|n| n.endpoints.iter().any(|e| e.eq_ignore_ascii_case(&name)))
                .map(|n| format!("enrichment {}", n.key)),
        )
        .collect();
    if !users.is_empty() {
        return Err(Error::new(
            ErrorCode::InvalidOperation,
            format!(
                "The endpoint {} is used by {}; remove or change them first",
                Shown(&name),
                users.join(", ")
            ),
        )
        .into());
    }
    let hub = s.hub.clone();
    detached(async move { hub.remove_endpoint(&name).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteBody {
    #[serde(default)]
    name: Option<String>,
    source: Source,
    #[serde(default = "always")]
    condition: String,
    endpoints: Vec<String>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn always() -> String {
    "true".to_owned()
}

fn yes() -> bool {
    true
}

async fn put_route(
    State(s): State<AppState>,
    _: Authorized<Write>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let body: RouteBody = parse_json(&body)?;
    same_name("route name", &name, body.name.as_deref())?;
    let spec = RouteSpec {
        name,
        source: body.source,
        condition: body.condition,
        endpoints: body.endpoints,
        enabled: body.enabled,
    };
    let hub = s.hub.clone();
    let added = spec.clone();
    detached(async move { hub.add_route(added).await }).await?;
    Ok(ok_json(&spec))
}

async fn delete_route(
    State(s): State<AppState>,
    _: Authorized<Write>,
    Path(name): Path<String>,
) -> ApiResult {
    if !s
        .hub
        .routing()
        .config()
        .routes
        .iter()
        .any(|r| r.name.eq_ignore_ascii_case(&name))
    {
        return Err(not_found("route", &name).into());
    }
    let hub = s.hub.clone();
    detached(async move { hub.remove_route(&name).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrichmentBody {
    #[serde(default)]
    key: Option<String>,
    value: String,
    endpoints: Vec<String>,
}

/// Puts an enrichment, replacing one with the same key (IoT Hub keys enrichments by key).
async fn put_enrichment(
    State(s): State<AppState>,
    _: Authorized<Write>,
    Path(key): Path<String>,
    body: Bytes,
) -> ApiResult {
    let body: EnrichmentBody = parse_json(&body)?;
    if body.key.as_deref().is_some_and(|k| k != key) {
        return Err(Error::invalid("The key in the body differs from the one in the path").into());
    }
    let spec = EnrichmentSpec {
        key,
        value: body.value,
        endpoints: body.endpoints,
    };
    let hub = s.hub.clone();
    let added = spec.clone();
    detached(async move { hub.add_enrichment(added).await }).await?;
    Ok(ok_json(&spec))
}

async fn delete_enrichment(
    State(s): State<AppState>,
    _: Authorized<Write>,
    Path(key): Path<String>,
) -> ApiResult {
    if !s
        .hub
        .routing()
        .config()
        .enrichments
        .iter()
        .any(|e| e.key == key)
    {
        return Err(not_found("enrichment", &key).into());
    }
    let hub = s.hub.clone();
    detached(async move { hub.remove_enrichment(&key).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn put_fallback(State(s): State<AppState>, _: Authorized<Write>, body: Bytes) -> ApiResult {
    let body: Fallback = parse_json(&body)?;
    let hub = s.hub.clone();
    let config = detached(async move { hub.set_fallback(body.enabled).await }).await?;
    Ok(ok_json(&Fallback {
        enabled: config.fallback_enabled,
    }))
}

/// A message to test, as the portal's "Test route" takes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TestBody {
    #[serde(default)]
    source: Option<String>,
    /// Text as sent; any other JSON value is taken as its JSON text.
    #[serde(default)]
    body: Option<Value>,
    /// Application properties: text values, or null for a property without one.
    #[serde(default)]
    properties: Map<String, Value>,
    #[serde(default)]
    device_id: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    content_encoding: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TestResult {
    matched_routes: Vec<String>,
    fallback: bool,
    endpoints: Vec<TestDelivery>,
}

#[derive(Serialize)]
struct TestDelivery {
    name: String,
    /// The application properties this endpoint would get (after its enrichments).
    properties: Map<String, Value>,
}

/// What the configuration in force does with one message: the routes whose condition holds,
/// whether the fallback took it, and each endpoint's copy. `$twin` reads the device's twin.
async fn test(State(s): State<AppState>, _: Authorized<ReadRights>, body: Bytes) -> ApiResult {
    let body: TestBody = parse_json(&body)?;
    let source = match body.source.as_deref() {
        None => Source::DeviceMessages,
        Some(text) => Source::parse(text).ok_or_else(|| {
            Error::invalid(format!(
                "The source {} is not one of {}",
                Shown(text),
                Source::ALL.map(Source::as_str).join(", ")
            ))
        })?,
    };
    let mut application = Vec::with_capacity(body.properties.len());
    for (k, v) in body.properties {
        let value = match v {
            Value::String(s) => Some(s),
            Value::Null => None,
            // IoT Hub's properties are text; a number or flag is what its text would be.
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                return Err(
                    Error::invalid(format!("The property {} must be a string", Shown(&k))).into(),
                );
            }
        };
        application.push((k, value));
    }
    let message = Message {
        system: SystemProperties {
            content_type: body.content_type,
            content_encoding: body.content_encoding,
            ..SystemProperties::default()
        },
        application,
        stamp: Stamp {
            device_id: body.device_id.unwrap_or_default(),
            source: SOURCE_TELEMETRY.to_owned(),
            ..Stamp::default()
        },
        body: match body.body {
            None => Vec::new(),
            Some(Value::String(s)) => s.into_bytes(),
            Some(other) => other.to_string().into_bytes(),
        },
    };
    let tested = s.hub.test_route(source, &message).await?;
    let endpoints = tested
        .properties
        .into_iter()
        .map(|(name, props)| TestDelivery {
            name,
            properties: props
                .into_iter()
                .map(|(k, v)| (k, v.map_or(Value::Null, Value::String)))
                .collect(),
        })
        .collect();
    Ok(ok_json(&TestResult {
        matched_routes: tested.decision.matched_routes,
        fallback: tested.decision.fallback,
        endpoints,
    }))
}
