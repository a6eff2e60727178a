//! The hub's CA certificates at run time: `/twinhub/certificates` (list), `/{name}` (get, put,
//! delete), `/{name}/generateVerificationCode` and `/{name}/verify` (IoT Hub's proof of
//! possession). IoT Hub manages these through Azure Resource Manager, not the hub's own REST API,
//! so the paths are twinhub's own (under `/twinhub/`); the documents are Resource Manager's
//! `CertificateDescription`. Reading needs RegistryRead, changing RegistryWrite. `If-Match`
//! carries the etag of the certificate a change applies to (`*` or absent: any).

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use twinhub_proto::certificate::{CertificateBody, CertificateList, CertificatePut};

use super::{
    ApiResult, AppState, Authorized, Read, Write, detached, if_match, ok_json, parse_json,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/twinhub/certificates", get(list))
        .route(
            "/twinhub/certificates/{name}",
            get(show).put(put).delete(delete),
        )
        .route(
            "/twinhub/certificates/{name}/generateVerificationCode",
            post(generate_code),
        )
        .route("/twinhub/certificates/{name}/verify", post(verify))
}

/// `{"value": [...]}`, as Resource Manager lists certificates.
async fn list(State(s): State<AppState>, _: Authorized<Read>) -> Response {
    ok_json(&CertificateList {
        value: s.hub.list_certificates(),
    })
}

async fn show(
    State(s): State<AppState>,
    _: Authorized<Read>,
    Path(name): Path<String>,
) -> ApiResult {
    Ok(ok_json(&s.hub.get_certificate(&name)?))
}

/// Adds a CA (no `If-Match`) or replaces its certificate (`If-Match`). The body is
/// `{"certificate": PEM}` or Resource Manager's `{"properties": {"certificate": PEM,
/// "isVerified": bool}}`.
async fn put(
    State(s): State<AppState>,
    _: Authorized<Write>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let (pem, verified) = parse_json::<CertificatePut>(&body)?.into_parts();
    let etag = if_match(&headers).map(str::to_owned);
    let hub = s.hub.clone();
    let done = detached(async move {
        hub.put_certificate(&name, &pem, verified, etag.as_deref())
            .await
    })
    .await?;
    Ok(ok_json(&done))
}

async fn delete(
    State(s): State<AppState>,
    _: Authorized<Write>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let etag = if_match(&headers).map(str::to_owned);
    let hub = s.hub.clone();
    detached(async move { hub.delete_certificate(&name, etag.as_deref()).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn generate_code(
    State(s): State<AppState>,
    _: Authorized<Write>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let etag = if_match(&headers).map(str::to_owned);
    let hub = s.hub.clone();
    let done =
        detached(async move { hub.generate_verification_code(&name, etag.as_deref()).await })
            .await?;
    Ok(ok_json(&done))
}

async fn verify(
    State(s): State<AppState>,
    _: Authorized<Write>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let body: CertificateBody = parse_json(&body)?;
    let etag = if_match(&headers).map(str::to_owned);
    let hub = s.hub.clone();
    let done = detached(async move {
        hub.verify_certificate(&name, &body.certificate, etag.as_deref())
            .await
    })
    .await?;
    Ok(ok_json(&done))
}
