//! The HTTPS API as the official service SDK calls it: the router, the single place where a
//! hub error becomes an IoT Hub error response, SAS authorization per route, request metrics,
//! `/health`, `/metrics`, and the MQTT-over-WebSocket upgrade. Handlers are in `devices` and
//! `twins`; they call `twinhub_core::Hub`.

mod devices;
mod fleet;
mod twins;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use twinhub_core::auth::Right;
use twinhub_core::{Hub, keys};
use twinhub_proto::error::{ERROR_CODE_HEADER, ErrorBody, ErrorCode};

use crate::mqtt::SessionContext;

/// Largest request body accepted (a bulk import of 100 devices with twins fits).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub hub: Arc<Hub>,
    pub metrics: PrometheusHandle,
    pub sessions: SessionContext,
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
            tracing::warn!(code = code.name(), tracking_id = %tracking, message = self.0.message(), "request failed");
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

/// Checks the request's SAS token grants `right`.
pub fn authorize(state: &AppState, headers: &HeaderMap, right: Right) -> ApiResult<()> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    state
        .hub
        .authorizer()
        .authorize_service(header, right, keys::now_unix())
        .map(|_| ())
        .map_err(ApiError::from)
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

async fn health() -> &'static str {
    "ok\n"
}

async fn render_metrics(State(state): State<AppState>) -> Response {
    // Read from the directory at scrape time: sessions setting it as they come and go could
    // leave a stale count last.
    metrics::gauge!("twinhub_connected_devices")
        .set(state.hub.directory().connected_count() as f64);
    let mut resp = Response::new(Body::from(state.metrics.render()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

async fn websocket(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    let ctx = state.sessions.clone();
    ws.protocols(["mqtt"])
        .max_message_size(twinhub_mqtt::DEFAULT_MAX_PACKET_SIZE + 1024)
        .on_upgrade(move |socket| crate::mqtt::serve_websocket(socket, ctx))
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
        .route("/$iothub/websocket", get(websocket))
        .route_layer(middleware::from_fn(track))
        .route("/health", get(health))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}
