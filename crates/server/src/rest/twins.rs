//! Twin and direct-method routes: `/twins/{id}`, `/twins/{id}/methods`, and the same for a
//! module under `/twins/{id}/modules/{mid}`. Handlers name an identity by its key
//! (`twinhub_core::record::identity_key`), checked here so a device route never reaches a
//! module.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde_json::Value;
use twinhub_core::methods::MethodCall;
use twinhub_proto::model::CloudToDeviceMethod;

use twinhub_core::modules::module_key;

use super::{
    ApiError, ApiResult, AppState, Authorized, ServiceConnect, detached, if_match, json_response,
    ok_json, parse_json,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/twins/{id}",
            get(get_twin).patch(patch_twin).put(replace_twin),
        )
        .route("/twins/{id}/methods", post(invoke))
        .route(
            "/twins/{id}/modules/{mid}",
            get(get_module_twin)
                .patch(patch_module_twin)
                .put(replace_module_twin),
        )
        .route("/twins/{id}/modules/{mid}/methods", post(invoke_module))
}

/// A device route's identity key: the id, checked to be a device id.
fn device_key(id: &str) -> Result<String, ApiError> {
    twinhub_core::registry::validate_device_id(id)?;
    Ok(id.to_owned())
}

async fn get_module_twin(
    State(s): State<AppState>,
    _: Authorized<ServiceConnect>,
    Path((id, mid)): Path<(String, String)>,
) -> ApiResult {
    Ok(ok_json(&s.hub.get_twin(&module_key(&id, &mid)?).await?))
}

async fn patch_module_twin(
    s: State<AppState>,
    _: Authorized<ServiceConnect>,
    h: HeaderMap,
    Path((id, mid)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    write_identity_twin(s, h, module_key(&id, &mid)?, body, false).await
}

async fn replace_module_twin(
    s: State<AppState>,
    _: Authorized<ServiceConnect>,
    h: HeaderMap,
    Path((id, mid)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    write_identity_twin(s, h, module_key(&id, &mid)?, body, true).await
}

async fn invoke_module(
    s: State<AppState>,
    _: Authorized<ServiceConnect>,
    Path((id, mid)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    invoke_identity(s, module_key(&id, &mid)?, body).await
}

async fn get_twin(
    State(s): State<AppState>,
    _: Authorized<ServiceConnect>,
    Path(id): Path<String>,
) -> ApiResult {
    Ok(ok_json(&s.hub.get_twin(&device_key(&id)?).await?))
}

async fn patch_twin(
    s: State<AppState>,
    auth: Authorized<ServiceConnect>,
    h: HeaderMap,
    id: Path<String>,
    body: Bytes,
) -> ApiResult {
    write_twin(s, auth, h, id, body, false).await
}

async fn replace_twin(
    s: State<AppState>,
    auth: Authorized<ServiceConnect>,
    h: HeaderMap,
    id: Path<String>,
    body: Bytes,
) -> ApiResult {
    write_twin(s, auth, h, id, body, true).await
}

/// PATCH merges, PUT replaces; both go through `Hub::write_twin`.
async fn write_twin(
    s: State<AppState>,
    _: Authorized<ServiceConnect>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
    replace: bool,
) -> ApiResult {
    write_identity_twin(s, headers, device_key(&id)?, body, replace).await
}

async fn write_identity_twin(
    State(s): State<AppState>,
    headers: HeaderMap,
    id: String,
    body: Bytes,
    replace: bool,
) -> ApiResult {
    let body: Value = parse_json(&body)?;
    let etag = if_match(&headers).map(str::to_owned);
    let hub = s.hub.clone();
    let twin =
        detached(async move { hub.write_twin(&id, &body, etag.as_deref(), replace).await }).await?;
    Ok(ok_json(&twin))
}

async fn invoke(
    s: State<AppState>,
    _: Authorized<ServiceConnect>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    invoke_identity(s, device_key(&id)?, body).await
}

async fn invoke_identity(State(s): State<AppState>, id: String, body: Bytes) -> ApiResult {
    let request: CloudToDeviceMethod = parse_json(&body)?;
    let call = MethodCall::from_request(&request)?;
    let started = std::time::Instant::now();
    let answer = s.hub.invoke_method(&id, call).await;
    metrics::histogram!("twinhub_method_duration_seconds").record(started.elapsed().as_secs_f64());
    let answer = answer?;
    // The device's payload was validated as JSON by its session; splice it in as is.
    let payload = if answer.payload.is_empty() {
        &b"null"[..]
    } else {
        &answer.payload[..]
    };
    let mut out = Vec::with_capacity(payload.len() + 32);
    out.extend_from_slice(format!("{{\"status\":{},\"payload\":", answer.status).as_bytes());
    out.extend_from_slice(payload);
    out.push(b'}');
    Ok(json_response(StatusCode::OK, out))
}
