//! Fleet routes: twin queries (`POST /devices/query`) and scheduled jobs (`/jobs/v2`).

use std::collections::HashMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::{get, post, put};
use twinhub_core::auth::Right;
use twinhub_proto::model::{JobRequest, QueryResult, QuerySpecification};

use super::{ApiError, ApiResult, AppState, authorize, ok_json, parse_json};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/devices/query", post(query))
        .route("/jobs/v2/query", get(list_jobs))
        .route("/jobs/v2/{id}", put(create_job).get(get_job))
        .route("/jobs/v2/{id}/cancel", post(cancel_job))
}

async fn query(State(s): State<AppState>, headers: HeaderMap, body: Bytes) -> ApiResult {
    // Queries read twins: either registry reading or service rights will do.
    if authorize(&s, &headers, Right::RegistryRead).is_err() {
        authorize(&s, &headers, Right::ServiceConnect)?;
    }
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
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult {
    authorize(&s, &headers, Right::ServiceConnect)?;
    let req: JobRequest = parse_json(&body)?;
    Ok(ok_json(&s.hub.create_job(&id, &req).await?))
}

async fn get_job(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    authorize(&s, &headers, Right::ServiceConnect)?;
    Ok(ok_json(&s.hub.get_job(&id).await?))
}

async fn cancel_job(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    authorize(&s, &headers, Right::ServiceConnect)?;
    Ok(ok_json(&s.hub.cancel_job(&id).await?))
}

async fn list_jobs(
    State(s): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    authorize(&s, &headers, Right::ServiceConnect)?;
    let jobs = s
        .hub
        .list_jobs(
            q.get("jobType").map(String::as_str),
            q.get("jobStatus").map(String::as_str),
        )
        .await?;
    let result = QueryResult {
        item_type: "jobResponse".into(),
        items: jobs
            .iter()
            .map(|j| serde_json::to_value(j).unwrap_or_default())
            .collect(),
        continuation_token: None,
    };
    Ok(ok_json(&result))
}
