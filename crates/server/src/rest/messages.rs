//! Messaging over HTTPS: the service's purge (`DELETE /devices/{id}/commands`) and feedback
//! calls (`/messages/serviceBound/feedback`), and the device-facing endpoints the SDKs' HTTP
//! transports use: receive, complete, reject and abandon a cloud-to-device message, and send
//! telemetry. Messages travel with their properties in `iothub-*` headers; the core's queue
//! (`twinhub_core::c2d`) and event log do the rest.

use std::collections::HashMap;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Serialize;
use twinhub_core::c2d::{FeedbackBatch, Holder, Locked};
use twinhub_core::telemetry::Origin;
use twinhub_proto::c2d::millis_text;
use twinhub_proto::encoding::quote;

use super::auth::DeviceAuthorized;
use super::{ApiError, ApiResult, AppState, Authorized, ServiceConnect, detached, ok_json};

/// Application properties travel as headers with this prefix.
const APP_PREFIX: &str = "iothub-app-";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/devices/{id}/commands", delete(purge))
        .route("/messages/serviceBound/feedback", get(feedback_receive))
        .route(
            "/messages/serviceBound/feedback/{lock}",
            delete(feedback_complete),
        )
        .route(
            "/messages/serviceBound/feedback/{lock}/abandon",
            post(feedback_abandon),
        )
        // IoT Hub's documents spell it `deviceBound`; Node's HTTP transport `devicebound`.
        .route("/devices/{id}/messages/deviceBound", get(device_receive))
        .route("/devices/{id}/messages/devicebound", get(device_receive))
        .route(
            "/devices/{id}/messages/deviceBound/{lock}",
            delete(device_complete),
        )
        .route(
            "/devices/{id}/messages/devicebound/{lock}",
            delete(device_complete),
        )
        .route(
            "/devices/{id}/messages/deviceBound/{lock}/abandon",
            post(device_abandon),
        )
        .route(
            "/devices/{id}/messages/devicebound/{lock}/abandon",
            post(device_abandon),
        )
        .route("/devices/{id}/messages/events", post(device_send))
}

/// A lock token as clients send it back: the ETag they were given, quoted or not.
fn unquoted(lock: &str) -> &str {
    lock.trim().trim_matches('"')
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

fn put_header(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        headers.insert(n, v);
    }
}

fn etag(lock_token: &str) -> String {
    format!("\"{lock_token}\"")
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PurgeResult {
    device_id: String,
    total_messages_purged: u64,
}

async fn purge(
    State(s): State<AppState>,
    _: Authorized<ServiceConnect>,
    Path(id): Path<String>,
) -> ApiResult {
    let hub = s.hub.clone();
    let device_id = id.clone();
    let purged = detached(async move { hub.c2d_purge(&device_id).await }).await?;
    Ok(ok_json(&PurgeResult {
        device_id: id,
        total_messages_purged: purged,
    }))
}

fn feedback_response(batch: FeedbackBatch, hub_name: &str) -> Response {
    let mut resp = Response::new(Body::from(batch.body()));
    let headers = resp.headers_mut();
    put_header(headers, "content-type", FeedbackBatch::CONTENT_TYPE);
    put_header(headers, "etag", &etag(&batch.lock_token));
    put_header(headers, "iothub-messageid", &batch.lock_token);
    put_header(headers, "iothub-userid", hub_name);
    if let Some(t) = millis_text(batch.enqueued_ms) {
        put_header(headers, "iothub-enqueuedtime", &t);
    }
    put_header(
        headers,
        "iothub-deliverycount",
        &batch.delivery_count.to_string(),
    );
    resp
}

/// The waiting feedback records under a new lock, at once (204 when none wait): a poll
/// does not wait for the batching interval the AMQP receiver observes.
async fn feedback_receive(State(s): State<AppState>, _: Authorized<ServiceConnect>) -> Response {
    match s.hub.c2d_feedback_poll() {
        Some(batch) => feedback_response(
            batch,
            &twinhub_proto::connection_string::hub_name(s.hub.authorizer().hostname()),
        ),
        None => no_content(),
    }
}

async fn feedback_complete(
    State(s): State<AppState>,
    _: Authorized<ServiceConnect>,
    Path(lock): Path<String>,
) -> ApiResult {
    let hub = s.hub.clone();
    let lock = unquoted(&lock).to_owned();
    detached(async move { hub.c2d_feedback_complete(&lock).await }).await?;
    Ok(no_content())
}

async fn feedback_abandon(
    State(s): State<AppState>,
    _: Authorized<ServiceConnect>,
    Path(lock): Path<String>,
) -> ApiResult {
    let hub = s.hub.clone();
    let lock = unquoted(&lock).to_owned();
    detached(async move { hub.c2d_feedback_abandon(&lock).await }).await?;
    Ok(no_content())
}

/// A locked message as IoT Hub's HTTPS receive returns it: the body, the lock token as the
/// ETag, system properties in `iothub-*` headers, application properties as `iothub-app-*`.
fn message_response(locked: Locked) -> Response {
    let m = locked.message;
    let mut resp = Response::new(Body::from(m.body));
    let headers = resp.headers_mut();
    put_header(headers, "etag", &etag(&locked.lock_token));
    put_header(
        headers,
        "iothub-sequencenumber",
        &m.sequence_number.to_string(),
    );
    put_header(headers, "iothub-to", &m.to);
    if let Some(t) = millis_text(m.enqueued_ms) {
        put_header(headers, "iothub-enqueuedtime", &t);
    }
    if let Some(t) = millis_text(m.expiry_ms) {
        put_header(headers, "iothub-expiry", &t);
    }
    put_header(
        headers,
        "iothub-deliverycount",
        &m.delivery_count.to_string(),
    );
    for (name, value) in [
        ("iothub-messageid", &m.message_id),
        ("iothub-correlationid", &m.correlation_id),
        ("iothub-userid", &m.user_id),
        ("content-type", &m.content_type),
        ("content-encoding", &m.content_encoding),
    ] {
        if let Some(v) = value {
            put_header(headers, name, v);
        }
    }
    put_header(headers, "iothub-ack", m.ack.as_str());
    for (name, value) in &m.application {
        // A name or value a header cannot carry is percent-encoded rather than lost.
        let name = format!("{APP_PREFIX}{}", quote(name));
        match HeaderValue::from_str(value) {
            Ok(_) => put_header(headers, &name, value),
            Err(_) => put_header(headers, &name, &quote(value)),
        }
    }
    resp
}

async fn device_receive(State(s): State<AppState>, device: DeviceAuthorized) -> ApiResult {
    let next = s.hub.c2d_receive(&device.device_id, Holder::Poll).await?;
    Ok(match next {
        Some(locked) => message_response(locked),
        None => no_content(),
    })
}

async fn device_complete(
    State(s): State<AppState>,
    device: DeviceAuthorized,
    Path((_, lock)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let hub = s.hub.clone();
    let lock = unquoted(&lock).to_owned();
    let reject = q.contains_key("reject");
    detached(async move {
        if reject {
            hub.c2d_reject(&device.device_id, &lock).await
        } else {
            hub.c2d_complete(&device.device_id, &lock).await
        }
    })
    .await?;
    Ok(no_content())
}

async fn device_abandon(
    State(s): State<AppState>,
    device: DeviceAuthorized,
    Path((_, lock)): Path<(String, String)>,
) -> ApiResult {
    let hub = s.hub.clone();
    let lock = unquoted(&lock).to_owned();
    detached(async move { hub.c2d_abandon(&device.device_id, &lock).await }).await?;
    Ok(no_content())
}

/// The property bag an HTTPS telemetry request's headers stand for: `iothub-*` system
/// headers as their `$.` keys, `iothub-app-*` as application properties.
fn property_bag(headers: &HeaderMap) -> Result<String, ApiError> {
    let mut props: Vec<(String, String)> = Vec::new();
    for (name, value) in headers {
        let name = name.as_str();
        let value = value.to_str().map_err(|_| {
            ApiError::from(twinhub_core::Error::invalid(format!(
                "header {name} is not visible ASCII"
            )))
        })?;
        let key = match name {
            "iothub-messageid" => "$.mid".to_owned(),
            "iothub-correlationid" => "$.cid".to_owned(),
            "iothub-userid" => "$.uid".to_owned(),
            "iothub-contenttype" => "$.ct".to_owned(),
            "iothub-contentencoding" => "$.ce".to_owned(),
            "iothub-creation-time-utc" => "$.ctime".to_owned(),
            "iothub-expiry" => "$.exp".to_owned(),
            _ => match name.strip_prefix(APP_PREFIX) {
                Some(app) if !app.is_empty() => app.to_owned(),
                _ => continue,
            },
        };
        props.push((key, value.to_owned()));
    }
    Ok(twinhub_proto::topic::encode_property_bag(&props))
}

async fn device_send(
    State(s): State<AppState>,
    device: DeviceAuthorized,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let bag = property_bag(&headers)?;
    let hub = s.hub.clone();
    detached(async move {
        let event = hub.prepare_device_telemetry(
            &device.device_id,
            &device.generation_id,
            &bag,
            body.to_vec(),
            Origin::default(),
        )?;
        hub.append_telemetry(&device.device_id, vec![event]).await
    })
    .await?;
    Ok(no_content())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_headers_become_the_property_bag() {
        let mut h = HeaderMap::new();
        h.insert("iothub-messageid", HeaderValue::from_static("m1"));
        h.insert("iothub-app-color", HeaderValue::from_static("red blue"));
        h.insert("iothub-app-", HeaderValue::from_static("ignored"));
        h.insert(
            "authorization",
            HeaderValue::from_static("SharedAccessSignature x"),
        );
        h.insert(
            "iothub-contenttype",
            HeaderValue::from_static("application/json"),
        );
        let bag = property_bag(&h).unwrap();
        let mut parsed = twinhub_proto::topic::parse_property_bag(&bag);
        parsed.sort();
        assert_eq!(
            parsed,
            vec![
                ("$.ct".to_string(), "application/json".to_string()),
                ("$.mid".to_string(), "m1".to_string()),
                ("color".to_string(), "red blue".to_string()),
            ]
        );
    }

    #[test]
    fn lock_tokens_are_taken_quoted_or_not() {
        assert_eq!(unquoted("\"abc\""), "abc");
        assert_eq!(unquoted("abc"), "abc");
    }
}
