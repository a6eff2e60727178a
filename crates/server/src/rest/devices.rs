//! Registry routes: `/devices`, `/devices/{id}`, bulk import, a device's modules
//! (`/devices/{id}/modules[/{mid}]`), and `/statistics/*`.

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use twinhub_proto::model::{Device, ExportImportDevice, Module};

use super::{
    ApiError, ApiResult, AppState, Authorized, Read, ServiceConnect, Write, detached, if_match,
    ok_json, parse_json, parse_json_array,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/devices", get(list).post(bulk))
        .route("/devices/{id}", get(get_one).put(put).delete(delete))
        .route("/devices/{id}/modules", get(list_modules))
        .route(
            "/devices/{id}/modules/{mid}",
            get(get_module).put(put_module).delete(delete_module),
        )
        .route("/statistics/devices", get(registry_statistics))
        .route("/statistics/service", get(service_statistics))
}

async fn list(
    State(s): State<AppState>,
    _: Authorized<Read>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let top = match q.get("top") {
        None => None,
        Some(t) => Some(t.parse::<usize>().map_err(|_| {
            ApiError::from(twinhub_core::Error::invalid(
                "top must be a non-negative integer",
            ))
        })?),
    };
    Ok(ok_json(&s.hub.list_devices(top).await?))
}

async fn get_one(
    State(s): State<AppState>,
    _: Authorized<Read>,
    Path(id): Path<String>,
) -> ApiResult {
    Ok(ok_json(&s.hub.get_device(&id).await?))
}

async fn put(
    State(s): State<AppState>,
    _: Authorized<Write>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let device: Device = parse_json(&body)?;
    let etag = if_match(&headers).map(str::to_owned);
    let hub = s.hub.clone();
    let device =
        detached(async move { hub.put_device(&id, &device, etag.as_deref()).await }).await?;
    Ok(ok_json(&device))
}

async fn delete(
    State(s): State<AppState>,
    _: Authorized<Write>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let etag = if_match(&headers).map(str::to_owned);
    let hub = s.hub.clone();
    detached(async move { hub.delete_device(&id, etag.as_deref()).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn bulk(State(s): State<AppState>, _: Authorized<Write>, body: Bytes) -> ApiResult {
    let ops: Vec<ExportImportDevice> = parse_json_array(&body)?;
    let hub = s.hub.clone();
    let result = detached(async move { hub.bulk_devices(&ops).await }).await?;
    // IoT Hub answers 400 with the same result body when any operation failed.
    let status = if result.is_successful {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let mut resp: Response = ok_json(&result);
    *resp.status_mut() = status;
    Ok(resp)
}

async fn registry_statistics(State(s): State<AppState>, _: Authorized<Read>) -> ApiResult {
    Ok(ok_json(&s.hub.registry_statistics_now().await?))
}

async fn service_statistics(State(s): State<AppState>, _: Authorized<ServiceConnect>) -> ApiResult {
    Ok(ok_json(&s.hub.service_statistics_now().await?))
}

async fn list_modules(
    State(s): State<AppState>,
    _: Authorized<Read>,
    Path(id): Path<String>,
) -> ApiResult {
    Ok(ok_json(&s.hub.list_modules(&id).await?))
}

async fn get_module(
    State(s): State<AppState>,
    _: Authorized<Read>,
    Path((id, mid)): Path<(String, String)>,
) -> ApiResult {
    Ok(ok_json(&s.hub.get_module(&id, &mid).await?))
}

async fn put_module(
    State(s): State<AppState>,
    _: Authorized<Write>,
    headers: HeaderMap,
    Path((id, mid)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let module: Module = parse_json(&body)?;
    let etag = if_match(&headers).map(str::to_owned);
    let hub = s.hub.clone();
    let module =
        detached(async move { hub.put_module(&id, &mid, &module, etag.as_deref()).await }).await?;
    Ok(ok_json(&module))
}

async fn delete_module(
    State(s): State<AppState>,
    _: Authorized<Write>,
    headers: HeaderMap,
    Path((id, mid)): Path<(String, String)>,
) -> ApiResult {
    let etag = if_match(&headers).map(str::to_owned);
    let hub = s.hub.clone();
    detached(async move { hub.delete_module(&id, &mid, etag.as_deref()).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
