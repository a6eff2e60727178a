//! The built-in endpoint's consumer groups (`/eventHubEndpoints/events/consumerGroups`), the
//! REST face of what IoT Hub manages through Azure Resource Manager. Listing needs
//! ServiceConnect (what reading needs); creating and deleting need RegistryWrite.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use super::{ApiResult, AppState, Authorized, ServiceConnect, Write, detached, ok_json};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/eventHubEndpoints/events/consumerGroups", get(list))
        .route(
            "/eventHubEndpoints/events/consumerGroups/{name}",
            get(get_one).put(create).delete(delete),
        )
}

#[derive(Serialize)]
struct ConsumerGroup {
    name: String,
}

async fn list(State(s): State<AppState>, _: Authorized<ServiceConnect>) -> Response {
    let groups: Vec<ConsumerGroup> = s
        .hub
        .events()
        .consumer_groups()
        .into_iter()
        .map(|name| ConsumerGroup { name })
        .collect();
    ok_json(&groups)
}

async fn get_one(
    State(s): State<AppState>,
    _: Authorized<ServiceConnect>,
    Path(name): Path<String>,
) -> ApiResult {
    match s.hub.events().consumer_group(&name) {
        Some(name) => Ok(ok_json(&ConsumerGroup { name })),
        None => Err(twinhub_core::Error::new(
            twinhub_proto::error::ErrorCode::IotHubNotFound,
            format!(
                "Consumer group {} not found",
                twinhub_core::logsafe::Shown(&name)
            ),
        )
        .into()),
    }
}

async fn create(
    State(s): State<AppState>,
    _: Authorized<Write>,
    Path(name): Path<String>,
) -> ApiResult {
    let hub = s.hub.clone();
    let name = detached(async move { hub.create_consumer_group(&name).await }).await?;
    Ok(ok_json(&ConsumerGroup { name }))
}

async fn delete(
    State(s): State<AppState>,
    _: Authorized<Write>,
    Path(name): Path<String>,
) -> ApiResult {
    let hub = s.hub.clone();
    detached(async move { hub.delete_consumer_group(&name).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
