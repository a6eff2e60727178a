//! twinhub's message routing through its REST API (`/twinhub/routing`): custom endpoints,
//! routes, enrichments, the fallback route and the route test. IoT Hub manages routing through
//! Azure Resource Manager instead, so these calls work against twinhub only. They are
//! [`ServiceClient`] methods over its signed HTTPS requests; reading and testing need
//! RegistryRead or ServiceConnect, changing needs RegistryWrite. The `twinhub` CLI's `endpoint`,
//! `route` and `enrichment` commands are built on them.

use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::service::{ServiceClient, segment};

/// A custom endpoint: `kind` is `stream` (an Event Hub-compatible stream hosted by twinhub)
/// or `webhook` (with its `url`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingEndpoint {
    pub name: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// A route: messages from `source` (`DeviceMessages`, `TwinChangeEvents`,
/// `DeviceLifecycleEvents`, `DeviceConnectionStateEvents`, `DeviceJobLifecycleEvents`) for
/// which `condition` holds go to `endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub name: String,
    pub source: String,
    pub condition: String,
    pub endpoints: Vec<String>,
    pub enabled: bool,
}

/// An enrichment: application property `key` set to `value` on messages to `endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrichment {
    pub key: String,
    pub value: String,
    pub endpoints: Vec<String>,
}

/// The fallback route's switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fallback {
    pub enabled: bool,
}

/// The whole routing configuration in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingConfig {
    pub endpoints: Vec<RoutingEndpoint>,
    pub routes: Vec<Route>,
    pub enrichments: Vec<Enrichment>,
    pub fallback: Fallback,
}

/// A message for the route test.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTest {
    /// `DeviceMessages` when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Application properties.
    pub properties: Map<String, Value>,
    /// The device whose twin `$twin` conditions and enrichments read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
}

/// What the configuration does with a tested message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTestResult {
    pub matched_routes: Vec<String>,
    /// No route matched and the fallback route took it to `events`.
    pub fallback: bool,
    /// Each endpoint's copy; empty when the message would be dropped.
    pub endpoints: Vec<RouteTestDelivery>,
}

/// One endpoint's copy of a tested message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteTestDelivery {
    pub name: String,
    /// Application properties after the endpoint's enrichments.
    pub properties: Map<String, Value>,
}

const BASE: &str = "/twinhub/routing";

impl ServiceClient {
    /// The routing configuration in force.
    pub async fn routing_config(&self) -> Result<RoutingConfig> {
        self.call(Method::GET, BASE, &[], &[], None, StatusCode::OK)
            .await
    }

    /// Adds a custom endpoint (refused if one with its name exists).
    pub async fn routing_add_endpoint(
        &self,
        endpoint: &RoutingEndpoint,
    ) -> Result<RoutingEndpoint> {
        let path = format!("{BASE}/endpoints/{}", segment(&endpoint.name));
        self.call(
            Method::PUT,
            &path,
            &[],
            &[],
            Self::json(endpoint),
            StatusCode::OK,
        )
        .await
    }

    /// Removes a custom endpoint no route or enrichment names. Its stored messages stay on
    /// disk.
    pub async fn routing_remove_endpoint(&self, name: &str) -> Result<()> {
        self.routing_delete(&format!("{BASE}/endpoints/{}", segment(name)))
            .await
    }

    /// Adds a route (refused if one with its name exists, if it names an unknown endpoint or
    /// if its condition does not parse).
    pub async fn routing_add_route(&self, route: &Route) -> Result<Route> {
        let path = format!("{BASE}/routes/{}", segment(&route.name));
        self.call(
            Method::PUT,
            &path,
            &[],
            &[],
            Self::json(route),
            StatusCode::OK,
        )
        .await
    }

    pub async fn routing_remove_route(&self, name: &str) -> Result<()> {
        self.routing_delete(&format!("{BASE}/routes/{}", segment(name)))
            .await
    }

    /// Puts an enrichment, replacing one with the same key.
    pub async fn routing_add_enrichment(&self, enrichment: &Enrichment) -> Result<Enrichment> {
        let path = format!("{BASE}/enrichments/{}", segment(&enrichment.key));
        self.call(
            Method::PUT,
            &path,
            &[],
            &[],
            Self::json(enrichment),
            StatusCode::OK,
        )
        .await
    }

    pub async fn routing_remove_enrichment(&self, key: &str) -> Result<()> {
        self.routing_delete(&format!("{BASE}/enrichments/{}", segment(key)))
            .await
    }

    /// Turns the fallback route on or off; returns the setting now in force.
    pub async fn routing_set_fallback(&self, enabled: bool) -> Result<bool> {
        let set: Fallback = self
            .call(
                Method::PUT,
                &format!("{BASE}/fallback"),
                &[],
                &[],
                Self::json(&Fallback { enabled }),
                StatusCode::OK,
            )
            .await?;
        Ok(set.enabled)
    }

    /// Which routes `message` matches and what each endpoint would get (the portal's "Test
    /// route").
    pub async fn routing_test(&self, message: &RouteTest) -> Result<RouteTestResult> {
        self.call(
            Method::POST,
            &format!("{BASE}/test"),
            &[],
            &[],
            Self::json(message),
            StatusCode::OK,
        )
        .await
    }

    async fn routing_delete(&self, path: &str) -> Result<()> {
        let resp = self.send(Method::DELETE, path, &[], &[], None).await?;
        if resp.status() != StatusCode::NO_CONTENT {
            return Err(Error::Protocol(format!(
                "expected 204, got {}",
                resp.status()
            )));
        }
        Ok(())
    }
}
