//! The web console: its static files (HTML, CSS, ES modules under `crates/server/console/`,
//! embedded by `build.rs`) served at `/` and `/console/...`, and the few endpoints the browser
//! needs beyond IoT Hub's REST API: `/twinhub/hub` (what the signed-in policy may do and where
//! the endpoints are), a cloud-to-device send over HTTPS (IoT Hub has it only over AMQP), and
//! the live telemetry stream ([`stream`]). The browser signs every call itself with SAS tokens
//! it makes from the connection string the user pasted; the server never sees that string.

mod stream;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use twinhub_core::auth::Right;
use twinhub_core::keys;
use twinhub_proto::c2d::{Ack, CloudMessage};

use crate::rest::{
    ApiError, ApiResult, AppState, Authorized, Query, ServiceConnect, detached, ok_json, parse_json,
};

mod assets {
    include!(concat!(env!("OUT_DIR"), "/console_assets.rs"));
}

/// At most this many live telemetry streams at once, hub-wide: each holds a reader per
/// partition, and a browser tab left open should not be able to multiply them without bound.
pub const MAX_STREAMS: usize = 64;

/// What the console needs to know about the hub that no IoT Hub API tells: the public names
/// and ports the connection strings it shows carry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HubFacts {
    pub host_name: String,
    pub hub_name: String,
    pub https_port: u16,
    pub mqtt_port: u16,
    pub amqp_port: Option<u16>,
    pub amqp_plain_port: Option<u16>,
    pub event_hub_name: Option<String>,
    pub node_id: Option<String>,
}

/// The console's shared state: the facts and the bound on open streams.
#[derive(Debug)]
pub struct Console {
    facts: HubFacts,
    streams: Arc<Semaphore>,
}

impl Console {
    pub fn new(facts: HubFacts) -> Console {
        Console {
            facts,
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        }
    }

    /// Telemetry streams open now (a gauge in `/metrics` too).
    pub fn open_streams(&self) -> usize {
        MAX_STREAMS - self.streams.available_permits()
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/console/{*file}", get(asset))
        .route("/favicon.ico", get(favicon))
        .route("/twinhub/hub", get(hub_facts))
        .route("/twinhub/devices/{id}/messages", post(send_c2d))
        .route("/twinhub/telemetry", get(stream::telemetry))
}

/// Headers every console page and file carries: the console runs only its own scripts and
/// talks only to its own origin, cannot be framed, and leaks no URL to other sites.
fn harden(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}

/// One embedded file, revalidated by ETag on every load so a new binary's console is never
/// mixed with an old one's cached modules.
fn serve_file(name: &str, request: &HeaderMap) -> Response {
    let from_disk = dev_dir().and_then(|dir| read_dev_file(dir, name));
    let found = match &from_disk {
        Some((bytes, hash)) => Some((bytes.as_slice(), *hash)),
        None if dev_dir().is_some() => None,
        None => assets::ASSETS
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, b, h)| (*b, *h)),
    };
    let Some((bytes, hash)) = found else {
        let mut resp = (StatusCode::NOT_FOUND, "no such console file\n").into_response();
        harden(resp.headers_mut());
        return resp;
    };
    let etag = format!("\"{hash:016x}\"");
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut resp = Response::new(axum::body::Body::from(bytes.to_vec()));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type(name)),
        );
        resp
    };
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    harden(headers);
    resp
}

/// `TWINHUB_CONSOLE_DIR`: serve the console from this directory instead of the embedded copy,
/// so editing it needs no rebuild (development of the console only).
fn dev_dir() -> Option<&'static std::path::Path> {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::var_os("TWINHUB_CONSOLE_DIR").map(std::path::PathBuf::from)?;
        tracing::warn!(dir = %dir.display(), "serving the console from disk (TWINHUB_CONSOLE_DIR)");
        Some(dir)
    })
    .as_deref()
}

fn read_dev_file(dir: &std::path::Path, name: &str) -> Option<(Vec<u8>, u64)> {
    if name
        .split('/')
        .any(|p| p.is_empty() || p == "." || p == ".." || p.contains('\\'))
    {
        return None;
    }
    let bytes = std::fs::read(dir.join(name)).ok()?;
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    Some((bytes, hash))
}

async fn index(headers: HeaderMap) -> Response {
    serve_file("index.html", &headers)
}

async fn favicon(headers: HeaderMap) -> Response {
    serve_file("icon.svg", &headers)
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve_file(&file, &headers)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Facts<'a> {
    #[serde(flatten)]
    hub: &'a HubFacts,
    policy: &'a str,
    rights: Vec<Right>,
    partitions: u32,
    version: &'static str,
}

/// `GET /twinhub/hub`: any service policy's token may ask; the answer names the policy's
/// rights, so the console can disable what the user may not do (and say why) and know at
/// sign-in that the connection string is good.
async fn hub_facts(
    State(s): State<AppState>,
    // RegistryRead or ServiceConnect: every service policy (RegistryWrite implies Read).
    _: Authorized<Query>,
    headers: HeaderMap,
) -> ApiResult {
    // The extractor checked the token; it names the policy that signed it.
    let policy = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| twinhub_proto::sas::SasToken::parse(h).ok())
        .and_then(|t| t.key_name)
        .and_then(|name| s.hub.authorizer().policy(&name).cloned())
        .ok_or_else(|| {
            ApiError::from(twinhub_core::Error::unauthorized(
                "The token names no shared access policy",
            ))
        })?;
    let rights: Vec<Right> = [
        Right::RegistryRead,
        Right::RegistryWrite,
        Right::ServiceConnect,
        Right::DeviceConnect,
    ]
    .into_iter()
    .filter(|r| policy.grants(*r))
    .collect();
    Ok(ok_json(&Facts {
        hub: &s.console.facts,
        policy: &policy.name,
        rights,
        partitions: s.hub.events().log().partition_count(),
        version: env!("CARGO_PKG_VERSION"),
    }))
}

/// A cloud-to-device message as the console sends it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SendBody {
    #[serde(default)]
    body: String,
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    content_type: Option<String>,
    content_encoding: Option<String>,
    /// `none` (default), `positive`, `negative` or `full`.
    ack: Option<String>,
    /// Seconds until the message expires; the hub's default when absent.
    ttl_seconds: Option<u32>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Sent {
    sequence_number: u64,
    message_id: Option<String>,
}

/// `POST /twinhub/devices/{id}/messages`: queues a cloud-to-device message as an AMQP sender
/// would (ServiceConnect), answering once it is durable. Not an IoT Hub API: IoT Hub sends
/// C2D only over AMQP, which a browser cannot speak.
async fn send_c2d(
    State(s): State<AppState>,
    _: Authorized<ServiceConnect>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let req: SendBody = parse_json(&body)?;
    let ack = match req.ack.as_deref() {
        None => Ack::None,
        Some(text) => Ack::parse(text).ok_or_else(|| {
            ApiError::from(twinhub_core::Error::invalid(format!(
                "ack must be none, positive, negative or full, not {:?}",
                twinhub_core::logsafe::Shown(text).to_string()
            )))
        })?,
    };
    let message = CloudMessage {
        message_id: req.message_id.clone(),
        correlation_id: req.correlation_id,
        to: format!("/devices/{id}/messages/devicebound"),
        content_type: req.content_type,
        content_encoding: req.content_encoding,
        ack,
        application: req.properties.into_iter().collect(),
        body: req.body.into_bytes(),
        expiry_ms: req.ttl_seconds.map_or(0, |t| {
            keys::now_millis().saturating_add(i64::from(t).saturating_mul(1000))
        }),
        ..CloudMessage::default()
    };
    let hub = s.hub.clone();
    let sequence_number = detached(async move { hub.send_c2d(message).await }).await?;
    Ok(ok_json(&Sent {
        sequence_number,
        message_id: req.message_id,
    }))
}
