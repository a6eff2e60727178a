//! SAS authorization as an extractor: a handler names the right it needs in its signature
//! (`Authorized<Write>`), and axum runs the check from the headers before any body extractor
//! reads a byte, so an unauthenticated client cannot make the hub buffer a body. Authorized
//! calls then pass the hub's REST throttle.

use std::marker::PhantomData;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use twinhub_core::auth::Right;
use twinhub_core::keys;

use super::{ApiError, AppState};

/// Which rights a route accepts (any one of them).
pub trait Rights: Send + Sync + 'static {
    const ANY_OF: &'static [Right];
}

/// RegistryRead (RegistryWrite implies it).
pub struct Read;
/// RegistryWrite.
pub struct Write;
/// ServiceConnect.
pub struct ServiceConnect;
/// Twin queries: RegistryRead or ServiceConnect, as the official SDKs' policies use either.
pub struct Query;

impl Rights for Read {
    const ANY_OF: &'static [Right] = &[Right::RegistryRead];
}
impl Rights for Write {
    const ANY_OF: &'static [Right] = &[Right::RegistryWrite];
}
impl Rights for ServiceConnect {
    const ANY_OF: &'static [Right] = &[Right::ServiceConnect];
}
impl Rights for Query {
    const ANY_OF: &'static [Right] = &[Right::RegistryRead, Right::ServiceConnect];
}

/// Proof that the request's SAS token grants one of `R`'s rights.
pub struct Authorized<R: Rights>(PhantomData<R>);

impl<R: Rights> FromRequestParts<AppState> for Authorized<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let authorizer = state.hub.authorizer();
        let now = keys::now_unix();
        let mut refusal = None;
        for right in R::ANY_OF {
            match authorizer.authorize_service(header, *right, now) {
                Ok(_) => {
                    refusal = None;
                    break;
                }
                Err(e) => {
                    refusal.get_or_insert(e);
                }
            }
        }
        if let Some(e) = refusal {
            return Err(ApiError::from(e));
        }
        state.hub.throttles().rest()?;
        Ok(Authorized(PhantomData))
    }
}

/// Proof that the request's SAS token is the device's own (the `{id}` of the path), for the
/// device-facing HTTPS endpoints. Carries the device's generation.
pub struct DeviceAuthorized {
    pub device_id: String,
    pub generation_id: String,
}

impl FromRequestParts<AppState> for DeviceAuthorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let params = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| {
                ApiError::from(twinhub_core::Error::invalid("the path names no device"))
            })?;
        let device_id = params
            .iter()
            .find(|(name, _)| *name == "id")
            .map(|(_, value)| value.to_owned())
            .ok_or_else(|| {
                ApiError::from(twinhub_core::Error::invalid("the path names no device"))
            })?;
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let generation_id = state
            .hub
            .authenticate_device_request(&device_id, header)
            .await?;
        state.hub.throttles().rest()?;
        Ok(DeviceAuthorized {
            device_id,
            generation_id,
        })
    }
}
