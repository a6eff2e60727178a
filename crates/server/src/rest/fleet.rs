//! Fleet routes: twin queries (`POST /devices/query`) and scheduled jobs (`/jobs/v2`).

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::{get, post, put};
use twinhub_proto::model::{JobRequest, QueryResult, QuerySpecification};

use super::auth::Query as QueryRights;
use super::{
    ApiError, ApiResult, AppState, Authorized, ServiceConnect, detached, ok_json, parse_json,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/devices/query", post(query))
        .route("/jobs/v2/query", get(list_jobs))
        .route("/jobs/v2/{id}", put(create_job).get(get_job))
        .route("/jobs/v2/{id}/cancel", post(cancel_job))
}

async fn query(
    State(s): State<AppState>,
    _: Authorized<QueryRights>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let spec: QuerySpecification = parse_json(&body)?;
    let page_size = match headers.get("x-ms-max-item-count") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|t| t.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::from(twinhub_core::Error::invalid(
                        "x-ms-max-item-count must be a number",
                    ))
                })?,
        ),
    };
    let continuation = headers
        .get("x-ms-continuation")
        .and_then(|v| v.to_str().ok())
        .filter(|c| !c.is_empty());
    let page = s.hub.query(&spec.query, page_size, continuation).await?;
    let mut resp = ok_json(&page.items);
    resp.headers_mut()
        .insert("x-ms-item-type", HeaderValue::from_static(page.item_type));
    if let Some(token) = page.continuation
        && let Ok(v) = HeaderValue::from_str(&token)
    {
        resp.headers_mut().insert("x-ms-continuation", v);
    }
    Ok(resp)
}

async fn create_job(
    State(s): State<AppState>,
    _: Authorized<ServiceConnect>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    let req: JobRequest = parse_json(&body)?;
    let hub = s.hub.clone();
    // Stored and started together, even if the caller hangs up in between.
    let job = detached(async move { hub.create_job(&id, &req).await }).await?;
    Ok(ok_json(&job))
}

async fn get_job(
    State(s): State<AppState>,
    _: Authorized<ServiceConnect>,
    Path(id): Path<String>,
) -> ApiResult {
    Ok(ok_json(&s.hub.get_job(&id).await?))
}

async fn cancel_job(
    State(s): State<AppState>,
    _: Authorized<ServiceConnect>,
    Path(id): Path<String>,
) -> ApiResult {
    let hub = s.hub.clone();
    Ok(ok_json(
        &detached(async move { hub.cancel_job(&id).await }).await?,
    ))
}

/// `GET /jobs/v2/query?jobType=&jobStatus=`, one page at a time: the page size in
/// `x-ms-max-item-count` (as the SDKs send it) or `pageSize` (as the REST docs show it), the
/// next page's token in `x-ms-continuation` (and `continuationToken` in the body).
async fn list_jobs(
    State(s): State<AppState>,
    _: Authorized<ServiceConnect>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let size = headers
        .get("x-ms-max-item-count")
        .and_then(|v| v.to_str().ok())
        .or(q.get("pageSize").map(String::as_str));
    let page_size = match size {
        None => None,
        Some(v) => Some(v.trim().parse::<usize>().map_err(|_| {
            ApiError::from(twinhub_core::Error::invalid(
                "the page size must be a number",
            ))
        })?),
    };
    let continuation = headers
        .get("x-ms-continuation")
        .and_then(|v| v.to_str().ok())
        .filter(|c| !c.is_empty());
    let (jobs, next) = s
        .hub
        .list_jobs(
            q.get("jobType").map(String::as_str),
            q.get("jobStatus").map(String::as_str),
            page_size,
            continuation,
        )
        .await?;
    let result = QueryResult {
        item_type: "jobResponse".into(),
        items: jobs
            .iter()
            .map(|j| serde_json::to_value(j).unwrap_or_default())
            .collect(),
        continuation_token: next.clone(),
    };
    let mut resp = ok_json(&result);
    if let Some(token) = next
        && let Ok(v) = HeaderValue::from_str(&token)
    {
        resp.headers_mut().insert("x-ms-continuation", v);
    }
    Ok(resp)
}
