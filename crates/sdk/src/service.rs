//! The service client: IoT Hub's REST API for back ends (registry, twins, direct methods,
//! statistics, twin queries and scheduled jobs), signing every request with a fresh SAS token
//! from the connection string's shared access policy.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use twinhub_proto::API_VERSION;
use twinhub_proto::connection_string::{ConnectionString, ConnectionStringKind};
use twinhub_proto::encoding::quote;
use twinhub_proto::error::{ERROR_CODE_HEADER, ErrorCode};
use twinhub_proto::model::{
    AuthenticationMechanism, AuthenticationType, BulkRegistryOperationResult, CloudToDeviceMethod,
    CloudToDeviceMethodResult, Device, DeviceCapabilities, DeviceStatus, ExportImportDevice,
    JobRequest, JobResponse, QueryResult, QuerySpecification, RegistryStatistics,
    ServiceStatistics, SymmetricKey, Twin, TwinProperties,
};
use twinhub_proto::sas::generate_sas_token;

use crate::error::{Error, Result};

/// What to create a device with; defaults to an enabled SAS device with hub-generated keys.
#[derive(Debug, Clone, Default)]
pub struct NewDevice {
    pub status: Option<DeviceStatus>,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub iot_edge: bool,
}

/// Builds a [`ServiceClient`].
#[derive(Debug, Clone)]
pub struct ServiceClientBuilder {
    connection_string: String,
    extra_ca: Vec<Vec<u8>>,
    timeout: Duration,
    token_ttl: Duration,
    amqp_port: Option<u16>,
    http1_only: bool,
}

impl ServiceClientBuilder {
    /// Trusts this CA (PEM) in addition to the system roots, e.g. twinhub's dev CA.
    pub fn extra_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.extra_ca.push(pem.into());
        self
    }

    /// Overall timeout per request (default 100 s, as the official SDK; a method call waits
    /// for the device inside it).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Lifetime of the SAS token signed for each request (default one hour).
    pub fn token_ttl(mut self, ttl: Duration) -> Self {
        self.token_ttl = ttl;
        self
    }

    /// Dials this port for cloud-to-device messages and feedback (AMQP over TLS) instead of
    /// 5671, the only port the official SDKs use.
    pub fn amqp_port(mut self, port: u16) -> Self {
        self.amqp_port = Some(port);
        self
    }

    /// Speaks HTTP/1.1 with keep-alive only (no HTTP/2 through ALPN), as the official Python
    /// and Node SDKs do: concurrent calls then each take a connection of their own from the
    /// pool instead of sharing one multiplexed connection.
    pub fn http1_only(mut self) -> Self {
        self.http1_only = true;
        self
    }

    pub fn build(self) -> Result<ServiceClient> {
        let cs: ConnectionString = self.connection_string.parse().map_err(
            |e: twinhub_proto::connection_string::ConnectionStringError| {
                Error::ConnectionString(e.to_string())
            },
        )?;
        if cs.kind() != ConnectionStringKind::Service {
            return Err(Error::ConnectionString(
                "a service connection string (HostName, SharedAccessKeyName, SharedAccessKey) is needed".into(),
            ));
        }
        let (Some(policy), Some(key)) = (
            cs.shared_access_key_name.clone(),
            cs.shared_access_key.clone(),
        ) else {
            return Err(Error::ConnectionString(
                "SharedAccessKeyName and SharedAccessKey are required".into(),
            ));
        };
        // reqwest is built without a bundled crypto provider: use ring, once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut certs = Vec::new();
        for pem in &self.extra_ca {
            let found = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| Error::Setup(format!("the extra CA is not valid PEM: {e}")))?;
            certs.extend(found);
        }
        let mut http = reqwest::Client::builder()
            .timeout(self.timeout)
            .tls_certs_merge(certs);
        if self.http1_only {
            http = http.http1_only();
        }
        let http = http.build().map_err(|e| Error::Setup(e.to_string()))?;
        let c2d = crate::c2d::C2dSender::new(
            crate::c2d::AmqpTarget {
                host: host_without_port(&cs.host_name).to_owned(),
                port: self.amqp_port.unwrap_or(5671),
                sr: cs.host_name.clone(),
                policy: policy.clone(),
                key: key.clone(),
                extra_ca: self.extra_ca,
                token_ttl: self.token_ttl,
            },
            self.timeout,
        );
        Ok(ServiceClient {
            http,
            base: format!("https://{}", cs.host_name),
            host: cs.host_name,
            policy,
            key,
            token_ttl: self.token_ttl,
            c2d,
        })
    }
}

#[derive(serde::Deserialize)]
struct ConsumerGroup {
    name: String,
}

/// A client for IoT Hub's service REST API.
#[derive(Debug, Clone)]
pub struct ServiceClient {
    http: reqwest::Client,
    base: String,
    host: String,
    policy: String,
    key: String,
    token_ttl: Duration,
    /// The AMQP connection cloud-to-device sends share, opened at the first.
    c2d: std::sync::Arc<crate::c2d::C2dSender>,
}

/// `host` without a `:port` (an IPv6 literal also loses its brackets).
fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => host,
    }
}

/// A path segment, encoded like the official SDKs do (`quote(s, safe='')`).
pub(crate) fn segment(s: &str) -> String {
    quote(s).into_owned()
}

impl ServiceClient {
    /// Starts building a client from a service connection string
    /// (`HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`).
    pub fn builder(connection_string: &str) -> ServiceClientBuilder {
        ServiceClientBuilder {
            connection_string: connection_string.to_string(),
            extra_ca: Vec::new(),
            timeout: Duration::from_secs(100),
            token_ttl: Duration::from_secs(3600),
            amqp_port: None,
            http1_only: false,
        }
    }

    /// A client trusting only the system roots.
    pub fn from_connection_string(connection_string: &str) -> Result<Self> {
        Self::builder(connection_string).build()
    }

    /// The hub's host name (with `:port` when not 443), as in the connection string.
    pub fn host_name(&self) -> &str {
        &self.host
    }

    fn token(&self) -> Result<String> {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(self.token_ttl)
            .as_secs();
        generate_sas_token(&self.host, &self.key, Some(&self.policy), expiry)
            .map_err(|e| Error::ConnectionString(format!("cannot sign with the key: {e}")))
    }

    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response> {
        let resp = self.send_any(method, path, query, headers, body).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(hub_error(resp).await)
    }

    /// Sends a request and returns the response whatever its status.
    async fn send_any(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response> {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .query(&[("api-version", API_VERSION)])
            .query(query)
            .header("Authorization", self.token()?)
            .header("Accept", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        req = match body {
            Some(b) => req
                .header("Content-Type", "application/json; charset=utf-8")
                .body(b),
            None => req.header("Content-Length", "0"),
        };
        req.send().await.map_err(|e| {
            if e.is_timeout() {
                Error::TimedOut
            } else {
                Error::Unreachable(error_chain(&e))
            }
        })
    }

    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
        expect: StatusCode,
    ) -> Result<T> {
        let resp = self.send(method, path, query, headers, body).await?;
        if resp.status() != expect {
            return Err(Error::Protocol(format!(
                "expected {expect}, got {}",
                resp.status()
            )));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::Unreachable(error_chain(&e)))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Protocol(format!("unreadable body: {e}")))
    }

    pub(crate) fn json<T: Serialize>(value: &T) -> Option<Vec<u8>> {
        Some(serde_json::to_vec(value).unwrap_or_default())
    }

    pub(crate) fn if_match(etag: Option<&str>) -> Vec<(&'static str, String)> {
        let tag = etag.unwrap_or("*");
        let quoted = if tag.starts_with('"') {
            tag.to_string()
        } else {
            format!("\"{tag}\"")
        };
        vec![("If-Match", quoted)]
    }

    /// Registers a device.
    pub async fn create_device(&self, device_id: &str, new: NewDevice) -> Result<Device> {
        let device = Device {
            device_id: device_id.to_string(),
            status: new.status.unwrap_or(DeviceStatus::Enabled),
            authentication: Some(AuthenticationMechanism {
                symmetric_key: Some(SymmetricKey {
                    primary_key: new.primary_key,
                    secondary_key: new.secondary_key,
                }),
                x509_thumbprint: None,
                auth_type: AuthenticationType::Sas,
            }),
            capabilities: Some(DeviceCapabilities {
                iot_edge: new.iot_edge,
            }),
            ..Default::default()
        };
        self.register_device(&device).await
    }

    /// `PUT /devices/{id}` without `If-Match`: creates `device` (409 if it exists).
    pub(crate) async fn register_device(&self, device: &Device) -> Result<Device> {
        let path = format!("/devices/{}", segment(&device.device_id));
        self.call(
            Method::PUT,
            &path,
            &[],
            &[],
            Self::json(device),
            StatusCode::OK,
        )
        .await
    }

    /// Updates a device's identity (status, credentials, capabilities). `etag` `None`
    /// updates unconditionally.
    pub async fn update_device(&self, device: &Device, etag: Option<&str>) -> Result<Device> {
        let path = format!("/devices/{}", segment(&device.device_id));
        self.call(
            Method::PUT,
            &path,
            &[],
            &Self::if_match(etag),
            Self::json(device),
            StatusCode::OK,
        )
        .await
    }

    pub async fn get_device(&self, device_id: &str) -> Result<Device> {
        let path = format!("/devices/{}", segment(device_id));
        self.call(Method::GET, &path, &[], &[], None, StatusCode::OK)
            .await
    }

    /// Lists up to `top` devices (the hub's cap is 1000).
    pub async fn list_devices(&self, top: Option<usize>) -> Result<Vec<Device>> {
        let query: Vec<(&str, String)> = top.map(|t| ("top", t.to_string())).into_iter().collect();
        self.call(Method::GET, "/devices", &query, &[], None, StatusCode::OK)
            .await
    }

    /// The built-in events endpoint's consumer groups (`$Default` first).
    pub async fn list_consumer_groups(&self) -> Result<Vec<String>> {
        let groups: Vec<ConsumerGroup> = self
            .call(
                Method::GET,
                "/eventHubEndpoints/events/consumerGroups",
                &[],
                &[],
                None,
                StatusCode::OK,
            )
            .await?;
        Ok(groups.into_iter().map(|g| g.name).collect())
    }

    /// Creates a consumer group on the built-in events endpoint (creating one that exists is
    /// not an error). Needs RegistryWrite.
    pub async fn create_consumer_group(&self, name: &str) -> Result<String> {
        let path = format!("/eventHubEndpoints/events/consumerGroups/{}", segment(name));
        let group: ConsumerGroup = self
            .call(Method::PUT, &path, &[], &[], None, StatusCode::OK)
            .await?;
        Ok(group.name)
    }

    /// Deletes a consumer group (not `$Default`). Needs RegistryWrite.
    pub async fn delete_consumer_group(&self, name: &str) -> Result<()> {
        let path = format!("/eventHubEndpoints/events/consumerGroups/{}", segment(name));
        let resp = self.send(Method::DELETE, &path, &[], &[], None).await?;
        if resp.status() != StatusCode::NO_CONTENT {
            return Err(Error::Protocol(format!(
                "expected 204, got {}",
                resp.status()
            )));
        }
        Ok(())
    }

    /// Deletes a device. `etag` `None` deletes unconditionally.
    pub async fn delete_device(&self, device_id: &str, etag: Option<&str>) -> Result<()> {
        let path = format!("/devices/{}", segment(device_id));
        let resp = self
            .send(Method::DELETE, &path, &[], &Self::if_match(etag), None)
            .await?;
        if resp.status() != StatusCode::NO_CONTENT {
            return Err(Error::Protocol(format!(
                "expected 204, got {}",
                resp.status()
            )));
        }
        Ok(())
    }

    /// Removes every cloud-to-device message queued for the device (`Purged` feedback goes to
    /// senders that asked for negative feedback); returns how many were removed.
    pub async fn purge_c2d(&self, device_id: &str) -> Result<u64> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Purged {
            total_messages_purged: u64,
        }
        let path = format!("/devices/{}/commands", segment(device_id));
        let purged: Purged = self
            .call(Method::DELETE, &path, &[], &[], None, StatusCode::OK)
            .await?;
        Ok(purged.total_messages_purged)
    }

    /// Sends a cloud-to-device message to the device over AMQP and returns its message id once
    /// the hub queued it (durably). A refusal is [`Error::Hub`] with IoT Hub's code:
    /// `DeviceNotFound`, `DeviceMaximumQueueDepthExceeded`, `MessageTooLarge`,
    /// `ArgumentInvalid` (e.g. an expiry in the past). Sends from all clones of the client
    /// share one connection and are pipelined on it.
    pub async fn send_c2d(
        &self,
        device_id: &str,
        message: crate::c2d::C2dMessage,
    ) -> Result<String> {
        self.c2d.send(device_id, &message).await
    }

    /// A receiver of delivery feedback (`/messages/serviceBound/feedback`) on a connection of
    /// its own.
    pub async fn feedback(&self) -> Result<crate::c2d::FeedbackReceiver> {
        self.c2d.feedback().await
    }

    /// Creates, updates or deletes up to 100 devices in one call. A partly failed batch is
    /// not an error: its result lists the failures.
    pub async fn bulk(&self, ops: &[ExportImportDevice]) -> Result<BulkRegistryOperationResult> {
        let resp = self
            .send_any(Method::POST, "/devices", &[], &[], Self::json(&ops))
            .await?;
        // IoT Hub answers 400 with the same result shape when some operations failed; any
        // other refusal carries the usual error body.
        let status = resp.status();
        if status != StatusCode::OK && status != StatusCode::BAD_REQUEST {
            return Err(hub_error(resp).await);
        }
        let named = named_code(&resp);
        let body = resp
            .bytes()
            .await
            .map_err(|e| Error::Unreachable(error_chain(&e)))?;
        match bulk_result(&body) {
            Some(result) => Ok(result),
            None if status == StatusCode::OK => Err(Error::Protocol(
                "the answer to a bulk request is not a bulk result".into(),
            )),
            None => Err(Error::from_hub(status.as_u16(), named, &body)),
        }
    }

    pub async fn get_twin(&self, device_id: &str) -> Result<Twin> {
        let path = format!("/twins/{}", segment(device_id));
        self.call(Method::GET, &path, &[], &[], None, StatusCode::OK)
            .await
    }

    /// Merges `patch` (`{"tags": .., "properties": {"desired": ..}}`; `null` deletes) into
    /// the twin.
    pub async fn update_twin(
        &self,
        device_id: &str,
        patch: &Value,
        etag: Option<&str>,
    ) -> Result<Twin> {
        self.write_twin(Method::PATCH, device_id, patch, etag).await
    }

    /// Replaces the twin's tags and desired properties.
    pub async fn replace_twin(
        &self,
        device_id: &str,
        twin: &Value,
        etag: Option<&str>,
    ) -> Result<Twin> {
        self.write_twin(Method::PUT, device_id, twin, etag).await
    }

    async fn write_twin(
        &self,
        method: Method,
        device_id: &str,
        body: &Value,
        etag: Option<&str>,
    ) -> Result<Twin> {
        let path = format!("/twins/{}", segment(device_id));
        self.call(
            method,
            &path,
            &[],
            &Self::if_match(etag),
            Self::json(body),
            StatusCode::OK,
        )
        .await
    }

    /// Invokes a direct method and returns the device's status and payload.
    pub async fn invoke_method(
        &self,
        device_id: &str,
        method: &CloudToDeviceMethod,
    ) -> Result<CloudToDeviceMethodResult> {
        let path = format!("/twins/{}/methods", segment(device_id));
        self.call(
            Method::POST,
            &path,
            &[],
            &[],
            Self::json(method),
            StatusCode::OK,
        )
        .await
    }

    pub async fn registry_statistics(&self) -> Result<RegistryStatistics> {
        self.call(
            Method::GET,
            "/statistics/devices",
            &[],
            &[],
            None,
            StatusCode::OK,
        )
        .await
    }

    pub async fn service_statistics(&self) -> Result<ServiceStatistics> {
        self.call(
            Method::GET,
            "/statistics/service",
            &[],
            &[],
            None,
            StatusCode::OK,
        )
        .await
    }
}

/// The job type of a scheduled direct method (`JobRequest::job_type`).
pub const METHOD_JOB: &str = "scheduleDeviceMethod";
/// The job type of a scheduled twin update (`JobRequest::job_type`).
pub const TWIN_JOB: &str = "scheduleUpdateTwin";

const MAX_ITEM_COUNT_HEADER: &str = "x-ms-max-item-count";
const CONTINUATION_HEADER: &str = "x-ms-continuation";
const ITEM_TYPE_HEADER: &str = "x-ms-item-type";
/// A jobs query that keeps handing out continuation tokens is cut off here rather than looping.
const MAX_JOB_QUERY_PAGES: usize = 10_000;

/// One page of a twin query.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPage {
    /// The rows: twins for `SELECT * FROM devices`, per-device job records for
    /// `SELECT * FROM devices.jobs`, otherwise projected or aggregated objects.
    pub items: Vec<Value>,
    /// What the rows are (`x-ms-item-type`: `twin`, `deviceJob`, `raw`...), when the hub says.
    pub item_type: Option<String>,
}

/// The pages of a twin query (`POST /devices/query`), fetched one request at a time.
///
/// Made by [`ServiceClient::query`]. Each [`next_page`](QueryPages::next_page) sends the
/// continuation token of the page before, so the hub resumes where it stopped; after the page
/// that came without a token it returns `Ok(None)`. A failed request leaves the position
/// unchanged, so calling `next_page` again retries the same page.
#[derive(Debug, Clone)]
pub struct QueryPages {
    client: ServiceClient,
    query: String,
    page_size: Option<usize>,
    continuation: Option<String>,
    done: bool,
}

impl QueryPages {
    /// Asks for at most `n` rows per page (`x-ms-max-item-count`; the hub allows 1 to 1000 and
    /// answers 400 otherwise). Without it the hub's default applies (100).
    pub fn page_size(mut self, n: usize) -> Self {
        self.page_size = Some(n);
        self
    }

    /// Starts after the page that handed out `token` (from
    /// [`continuation_token`](QueryPages::continuation_token)), e.g. in another process.
    pub fn resume_from(mut self, token: impl Into<String>) -> Self {
        self.continuation = Some(token.into());
        self.done = false;
        self
    }

    /// The token the next request will send, `None` before the first page and after the last.
    pub fn continuation_token(&self) -> Option<&str> {
        self.continuation.as_deref()
    }

    /// Whether the last page has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Fetches the next page, or `Ok(None)` once the last one has been read.
    pub async fn next_page(&mut self) -> Result<Option<QueryPage>> {
        if self.done {
            return Ok(None);
        }
        let mut headers = Vec::new();
        if let Some(n) = self.page_size {
            headers.push((MAX_ITEM_COUNT_HEADER, n.to_string()));
        }
        if let Some(token) = &self.continuation {
            headers.push((CONTINUATION_HEADER, token.clone()));
        }
        let spec = QuerySpecification {
            query: self.query.clone(),
        };
        let resp = self
            .client
            .send(
                Method::POST,
                "/devices/query",
                &[],
                &headers,
                ServiceClient::json(&spec),
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(Error::Protocol(format!(
                "expected 200 to a query, got {}",
                resp.status()
            )));
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let item_type = header(ITEM_TYPE_HEADER);
        let continuation = header(CONTINUATION_HEADER);
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::Unreachable(error_chain(&e)))?;
        let items: Vec<Value> = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Protocol(format!("a query page must be a JSON array: {e}")))?;
        // Only move on once the page is in hand, so a failure above can be retried.
        self.done = continuation.is_none();
        self.continuation = continuation;
        Ok(Some(QueryPage { items, item_type }))
    }

    /// The remaining pages as a stream; it ends after the last page or the first error.
    pub fn into_stream(self) -> impl Stream<Item = Result<QueryPage>> {
        futures_util::stream::unfold(Some(self), |state| async move {
            let mut pages = state?;
            match pages.next_page().await {
                Ok(Some(page)) => Some((Ok(page), Some(pages))),
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        })
    }
}

/// Twin queries and scheduled jobs.
impl ServiceClient {
    /// Prepares the query `text` (IoT Hub's query language, e.g.
    /// `SELECT * FROM devices WHERE tags.plant = 'Redmond43'`); nothing is sent until
    /// [`QueryPages::next_page`]. Results reflect every write the hub acknowledged before the
    /// page was requested.
    pub fn query(&self, text: impl Into<String>) -> QueryPages {
        QueryPages {
            client: self.clone(),
            query: text.into(),
            page_size: None,
            continuation: None,
            done: false,
        }
    }

    /// Runs the query `text` to the end and returns every row of every page.
    pub async fn query_all(&self, text: impl Into<String>) -> Result<Vec<Value>> {
        let mut pages = self.query(text);
        let mut rows = Vec::new();
        while let Some(page) = pages.next_page().await? {
            rows.extend(page.items);
        }
        Ok(rows)
    }

    /// Creates a scheduled job (`PUT /jobs/v2/{jobId}`) from a complete request; the job id is
    /// `job.job_id`. The hub answers 400 for a bad type, condition, operation, start time or
    /// maximum execution time.
    pub async fn create_job(&self, job: &JobRequest) -> Result<JobResponse> {
        if job.job_id.is_empty() {
            return Err(Error::InvalidArgument("the job needs a jobId".into()));
        }
        let path = format!("/jobs/v2/{}", segment(&job.job_id));
        self.call(
            Method::PUT,
            &path,
            &[],
            &[],
            Self::json(job),
            StatusCode::OK,
        )
        .await
    }

    /// Schedules `method` on every device matching `condition` (a WHERE condition such as
    /// `deviceId IN ['d1', 'd2']`, or `*` for all). `start` is an RFC 3339 time (`None` or a
    /// past time: now); `max_execution_secs` bounds the whole job (the hub's default: an hour).
    pub async fn schedule_method_job(
        &self,
        job_id: &str,
        condition: &str,
        method: &CloudToDeviceMethod,
        start: Option<String>,
        max_execution_secs: Option<u64>,
    ) -> Result<JobResponse> {
        let job = JobRequest {
            job_id: job_id.to_owned(),
            job_type: METHOD_JOB.to_owned(),
            cloud_to_device_method: Some(method.clone()),
            update_twin: None,
            query_condition: Some(condition.to_owned()),
            start_time: start,
            max_execution_time_in_seconds: max_seconds(max_execution_secs)?,
        };
        self.create_job(&job).await
    }

    /// Schedules a twin update on every device matching `condition`. `patch` is shaped like a
    /// twin PATCH: `{"tags": {..}, "properties": {"desired": {..}}}` (either part may be left
    /// out; `null` deletes a key). `start` and `max_execution_secs` as in
    /// [`schedule_method_job`](ServiceClient::schedule_method_job).
    pub async fn schedule_twin_job(
        &self,
        job_id: &str,
        condition: &str,
        patch: &Value,
        start: Option<String>,
        max_execution_secs: Option<u64>,
    ) -> Result<JobResponse> {
        let job = JobRequest {
            job_id: job_id.to_owned(),
            job_type: TWIN_JOB.to_owned(),
            cloud_to_device_method: None,
            update_twin: Some(twin_patch(patch)?),
            query_condition: Some(condition.to_owned()),
            start_time: start,
            max_execution_time_in_seconds: max_seconds(max_execution_secs)?,
        };
        self.create_job(&job).await
    }

    /// A job's state and statistics (`GET /jobs/v2/{jobId}`); 404 `JobNotFound` when unknown.
    pub async fn get_job(&self, job_id: &str) -> Result<JobResponse> {
        let path = format!("/jobs/v2/{}", segment(job_id));
        self.call(Method::GET, &path, &[], &[], None, StatusCode::OK)
            .await
    }

    /// Cancels a job that has not finished and returns its state; a finished job is returned
    /// unchanged.
    pub async fn cancel_job(&self, job_id: &str) -> Result<JobResponse> {
        let path = format!("/jobs/v2/{}/cancel", segment(job_id));
        self.call(Method::POST, &path, &[], &[], None, StatusCode::OK)
            .await
    }

    /// Jobs of a type (e.g. [`METHOD_JOB`]) and/or a status (`scheduled`, `running`,
    /// `completed`, `failed`, `cancelled`...), each filter only when given.
    pub async fn list_jobs(
        &self,
        job_type: Option<&str>,
        status: Option<&str>,
    ) -> Result<Vec<JobResponse>> {
        let mut query = Vec::new();
        if let Some(t) = job_type {
            query.push(("jobType", t.to_owned()));
        }
        if let Some(s) = status {
            query.push(("jobStatus", s.to_owned()));
        }
        let mut jobs = Vec::new();
        let mut continuation: Option<String> = None;
        for _ in 0..MAX_JOB_QUERY_PAGES {
            let headers: Vec<(&str, String)> = continuation
                .iter()
                .map(|t| (CONTINUATION_HEADER, t.clone()))
                .collect();
            let resp = self
                .send(Method::GET, "/jobs/v2/query", &query, &headers, None)
                .await?;
            let header_token = resp
                .headers()
                .get(CONTINUATION_HEADER)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.trim().is_empty())
                .map(str::to_owned);
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| Error::Unreachable(error_chain(&e)))?;
            let page: QueryResult = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Protocol(format!("unreadable jobs page: {e}")))?;
            for item in page.items {
                jobs.push(
                    serde_json::from_value(item)
                        .map_err(|e| Error::Protocol(format!("unreadable job: {e}")))?,
                );
            }
            let next = page
                .continuation_token
                .filter(|t| !t.is_empty())
                .or(header_token);
            if next.is_none() || next == continuation {
                return Ok(jobs);
            }
            continuation = next;
        }
        Err(Error::Protocol(format!(
            "the jobs query did not end within {MAX_JOB_QUERY_PAGES} pages"
        )))
    }
}

fn max_seconds(secs: Option<u64>) -> Result<Option<i64>> {
    secs.map(|s| {
        i64::try_from(s).map_err(|_| {
            Error::InvalidArgument(format!("a maximum execution time of {s} s is too long"))
        })
    })
    .transpose()
}

/// The `updateTwin` of a twin job from a PATCH-shaped value, with etag `*` as IoT Hub expects.
fn twin_patch(patch: &Value) -> Result<Twin> {
    let bad = |why: &str| Error::InvalidArgument(format!("the twin job's patch {why}"));
    let Value::Object(parts) = patch else {
        return Err(bad("must be a JSON object"));
    };
    let mut twin = Twin {
        etag: Some("*".to_owned()),
        ..Default::default()
    };
    for (key, value) in parts {
        match (key.as_str(), value) {
            ("tags", Value::Object(tags)) => twin.tags = Some(tags.clone()),
            ("properties", Value::Object(props)) => {
                for (section, content) in props {
                    match (section.as_str(), content) {
                        ("desired", Value::Object(desired)) => {
                            twin.properties = Some(TwinProperties {
                                desired: desired.clone(),
                                reported: Default::default(),
                            });
                        }
                        _ => return Err(bad("may only set properties.desired (an object)")),
                    }
                }
            }
            _ => return Err(bad("may only hold tags and properties.desired (objects)")),
        }
    }
    if twin.tags.is_none() && twin.properties.is_none() {
        return Err(bad("must set tags or properties.desired"));
    }
    Ok(twin)
}

/// Turns an error response into [`Error::Hub`].
async fn hub_error(resp: reqwest::Response) -> Error {
    let status = resp.status().as_u16();
    let named = named_code(&resp);
    let body = resp.bytes().await.unwrap_or_default();
    Error::from_hub(status, named, &body)
}

/// The code the `iothub-errorcode` header names.
fn named_code(resp: &reqwest::Response) -> Option<ErrorCode> {
    resp.headers()
        .get(ERROR_CODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorCode::from_name)
}

/// The bulk result in `body`, `None` for anything else. Every field of the result defaults,
/// so any JSON object would deserialise: its `isSuccessful` flag must be there.
fn bulk_result(body: &[u8]) -> Option<BulkRegistryOperationResult> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.get("isSuccessful")?.as_bool()?;
    serde_json::from_value(value).ok()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_twin_patch_becomes_the_update_twin_iot_hub_expects() {
        let twin = twin_patch(&json!({
            "tags": { "floor": 3 },
            "properties": { "desired": { "fan": null } },
        }))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&twin).unwrap(),
            json!({
                "etag": "*",
                "tags": { "floor": 3 },
                "properties": { "desired": { "fan": null } },
            })
        );
        let desired_only = twin_patch(&json!({ "properties": { "desired": { "a": 1 } } })).unwrap();
        assert!(desired_only.tags.is_none());
    }

    #[test]
    fn a_twin_patch_outside_tags_and_desired_is_refused() {
        for bad in [
            json!(null),
            json!({}),
            json!({ "tags": 1 }),
            json!({ "properties": { "reported": {} } }),
            json!({ "properties": {} }),
            json!({ "deviceId": "x" }),
        ] {
            assert!(
                matches!(twin_patch(&bad), Err(Error::InvalidArgument(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn bulk_results_are_told_from_error_bodies() {
        let partial = br#"{"isSuccessful":false,"errors":[{"deviceId":"d1","errorCode":"DeviceNotFound","errorStatus":"gone"}],"warnings":[]}"#;
        let result = bulk_result(partial).expect("a bulk result");
        assert!(!result.is_successful);
        assert_eq!(result.errors[0].device_id, "d1");
        assert!(bulk_result(br#"{"isSuccessful":true}"#).is_some_and(|r| r.is_successful));
        for other in [
            // An error body that merely mentions the flag is still an error body.
            &br#"{"Message":"ErrorCode:ArgumentInvalid;isSuccessful must be set","ExceptionMessage":""}"#[..],
            br#"{"isSuccessful":"yes"}"#,
            br#"{}"#,
            b"[]",
            b"not json",
        ] {
            assert_eq!(bulk_result(other), None, "{}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn maximum_execution_times_beyond_i64_are_refused() {
        assert_eq!(max_seconds(None).unwrap(), None);
        assert_eq!(max_seconds(Some(60)).unwrap(), Some(60));
        assert!(max_seconds(Some(u64::MAX)).is_err());
    }
}
