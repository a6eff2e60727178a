//! The HTTPS API as the official service SDK calls it: the router, the single place where a
//! hub error becomes an IoT Hub error response, SAS authorization per route (an extractor that
//! runs before the body is read), request metrics, `/health`, `/metrics`, and the
//! MQTT-over-WebSocket upgrade. Handlers are in `devices`, `twins` and `fleet`; they call
//! `twinhub_core::Hub`, writes through [`detached`] so their effects outlive a caller that
//! hangs up.

mod auth;
mod certificates;
mod devices;
mod events;
mod fleet;
mod messages;
mod routing;
mod twins;

pub use auth::{Authorized, Query, Read, ServiceConnect, Write};

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use twinhub_core::{Hub, keys};
use twinhub_proto::error::{ERROR_CODE_HEADER, ErrorBody, ErrorCode};

use crate::admission::Admission;
use crate::mqtt::SessionContext;

/// Largest request body accepted (a bulk import of 100 devices with twins fits).
pub const MAX_BODY: usize = 4 * 1024 * 1024;
/// The whole request body must arrive within this long.
pub const BODY_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct AppState {
    pub hub: Arc<Hub>,
    pub metrics: PrometheusHandle,
    pub sessions: SessionContext,
    pub amqp: crate::amqp::AmqpContext,
    pub admission: Arc<Admission>,
    pub console: Arc<crate::console::Console>,
}

/// A hub error on its way to an HTTP client.
#[derive(Debug)]
pub struct ApiError(pub twinhub_core::Error);

impl From<twinhub_core::Error> for ApiError {
    fn from(e: twinhub_core::Error) -> Self {
        ApiError(e)
    }
}

/// The one mapping from hub errors to HTTP: status from the code, the IoT Hub body, and the
/// `iothub-errorcode` header. Every endpoint answers in the JSON-message style (IoT Hub's
/// newer form, used by its method endpoints) because it carries the numeric error code that
/// SDKs other than Python's read; the header carries the name.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.code();
        let tracking = keys::tracking_id();
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            // Rate-limited: while the disk is full every write fails, and a line per request
            // would fill what little space comes back.
            static FAILURES: twinhub_core::logsafe::RateLimit =
                twinhub_core::logsafe::RateLimit::new(std::time::Duration::from_secs(10), 10);
            if let Some(suppressed) = FAILURES.allow() {
                tracing::warn!(code = code.name(), tracking_id = %tracking, suppressed, message = self.0.message(), "request failed");
            }
        } else {
            tracing::debug!(code = code.name(), tracking_id = %tracking, message = self.0.message(), "request refused");
        }
        let body = ErrorBody::json(code, self.0.message(), &tracking, jiff::Timestamp::now());
        let mut resp = json_response(status, serde_json::to_vec(&body).unwrap_or_default());
        if let Ok(v) = HeaderValue::from_str(code.name()) {
            resp.headers_mut().insert(ERROR_CODE_HEADER, v);
        }
        resp
    }
}

pub type ApiResult<T = Response> = Result<T, ApiError>;

pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

pub fn ok_json<T: serde::Serialize>(value: &T) -> Response {
    json_response(
        StatusCode::OK,
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

/// Runs a hub operation to its end in a task of its own, so that what follows a durable
/// commit (closing a disabled device's session, pushing a desired patch, counting a device)
/// happens even if the HTTP caller hangs up and its request future is dropped.
pub async fn detached<T, F>(operation: F) -> ApiResult<T>
where
    F: Future<Output = twinhub_core::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    match tokio::spawn(operation).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => {
            tracing::error!("a hub operation failed: {e}");
            Err(ApiError::from(twinhub_core::Error::internal()))
        }
    }
}

pub fn if_match(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok())
}

/// Parses a JSON body that must be an object (serde would also take an array for a
/// struct), answering 400 with the IoT Hub body when it is not valid.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    parse_shaped(body, b'{', "a JSON object")
}

/// Parses a JSON body that must be an array.
pub fn parse_json_array<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    parse_shaped(body, b'[', "a JSON array")
}

fn parse_shaped<T: serde::de::DeserializeOwned>(
    body: &[u8],
    opener: u8,
    what: &str,
) -> ApiResult<T> {
    let invalid = |why: String| {
        ApiError::from(twinhub_core::Error::invalid(format!(
            "The request body is not valid: {why}"
        )))
    };
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&opener) {
        return Err(invalid(format!("expected {what}")));
    }
    serde_json::from_slice(body).map_err(|e| invalid(e.to_string()))
}

async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("twinhub_http_requests_total", "route" => route.clone(), "method" => method, "status" => status).increment(1);
    metrics::histogram!("twinhub_http_request_duration_seconds", "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// `ok` while the store accepts writes; 503 with the reason while it does not (a full disk,
/// an I/O error), so a load balancer or supervisor sees it.
async fn health(State(state): State<AppState>) -> Response {
    if let twinhub_store::Health::Faulty(reason) = state.hub.store().health() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unavailable: the store cannot write: {reason}\n"),
        )
            .into_response();
    }
    if let Some(Err(reason)) = state.hub.cluster_health() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unavailable: the cluster bus cannot reach the other nodes: {reason}\n"),
        )
            .into_response();
    }
    (StatusCode::OK, "ok\n").into_response()
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    // Read from the directory at scrape time: sessions setting it as they come and go could
    // leave a stale count last.
    metrics::gauge!("twinhub_connected_devices")
        .set(state.hub.directory().connected_count() as f64);
    metrics::gauge!("twinhub_open_connections").set(state.admission.open_connections() as f64);
    metrics::gauge!("twinhub_unauthenticated_connections")
        .set(state.admission.unauthenticated() as f64);
    let healthy = state.hub.store().health() == twinhub_store::Health::Ok;
    metrics::gauge!("twinhub_store_healthy").set(if healthy { 1.0 } else { 0.0 });
    let mut resp = Response::new(Body::from(state.metrics.render()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// WebSocket frames and messages: an MQTT packet (at most 256 KiB) and its framing fit; a
/// peer cannot make the hub reserve more for a frame it merely announces.
const MAX_WS_FRAME: usize = twinhub_mqtt::DEFAULT_MAX_PACKET_SIZE + 1024;

/// The WebSocket subprotocol of AMQP over WebSockets (the Azure clients insist on its echo).
const AMQP_WS_PROTOCOL: &str = "AMQPWSB10";

/// `/$iothub/websocket`: MQTT for devices (`mqtt`), AMQP for service clients (`AMQPWSB10`).
async fn websocket(
    State(state): State<AppState>,
    certificates: Option<axum::Extension<crate::http_conn::ClientCertificates>>,
    ws: WebSocketUpgrade,
) -> Response {
    let chain = certificates
        .map(|c| c.0.0.as_ref().clone())
        .unwrap_or_default();
    upgrade(state, ws, &["mqtt", AMQP_WS_PROTOCOL], chain)
}

/// `/$servicebus/websocket[/]`: AMQP only (the Event Hubs clients).
async fn amqp_websocket(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    upgrade(state, ws, &[AMQP_WS_PROTOCOL], Vec::new())
}

/// `certificates`: the HTTPS connection's client chain, for an MQTT device signing in with it.
fn upgrade(
    state: AppState,
    ws: WebSocketUpgrade,
    protocols: &[&'static str],
    certificates: Vec<Vec<u8>>,
) -> Response {
    let Some(mut admitted) = state.admission.upgraded() else {
        return ApiError::from(twinhub_core::Error::new(
            ErrorCode::ServiceUnavailable,
            "Too many connections; retry later",
        ))
        .into_response();
    };
    let amqp_only = protocols == [AMQP_WS_PROTOCOL];
    let tracker = state.sessions.tracker.clone();
    ws.protocols(protocols.iter().copied())
        .max_frame_size(MAX_WS_FRAME)
        .max_message_size(MAX_WS_FRAME)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(2 * MAX_WS_FRAME)
        .on_upgrade(move |socket| {
            let unauthenticated = admitted.unauthenticated.take();
            let amqp = amqp_only
                || socket.protocol().is_some_and(|p| {
                    p.as_bytes()
                        .eq_ignore_ascii_case(AMQP_WS_PROTOCOL.as_bytes())
                });
            tracker.track_future(async move {
                if amqp {
                    let ctx = state.amqp.clone();
                    let tracker = ctx.tracker.clone();
                    crate::ws::bridge(socket, &tracker, move |io| {
                        crate::amqp::serve_connection(
                            ctx,
                            io,
                            "websocket".to_string(),
                            unauthenticated,
                        )
                    })
                    .await;
                } else {
                    crate::mqtt::serve_websocket(
                        socket,
                        state.sessions.clone(),
                        certificates,
                        unauthenticated,
                    )
                    .await;
                }
                drop(admitted);
            })
        })
}

async fn not_found() -> ApiError {
    ApiError::from(twinhub_core::Error::new(
        ErrorCode::InvalidOperation,
        "No such endpoint",
    ))
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(devices::routes())
        .merge(twins::routes())
        .merge(fleet::routes())
        .merge(events::routes())
        .merge(messages::routes())
        .merge(routing::routes())
        .merge(certificates::routes())
        .merge(crate::console::routes())
        .route("/$iothub/websocket", get(websocket))
        .route("/$servicebus/websocket", get(amqp_websocket))
        .route("/$servicebus/websocket/", get(amqp_websocket))
        .route_layer(middleware::from_fn(track))
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::timeout::RequestBodyDeadlineLayer::new(
            BODY_DEADLINE,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}
