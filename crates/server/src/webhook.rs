//! Webhook endpoints: each routed message is POSTed to the endpoint's URL in CloudEvents 1.0
//! HTTP binary content mode, at least once, from the endpoint's own durable event log.
//!
//! Routing (`twinhub_core::routing`) appends a message to a webhook endpoint's log and the
//! device's acknowledgement waits only for that append, so a slow or dead webhook never slows
//! ingestion. This module is the other half: a supervisor follows the routing configuration
//! (`Routing::changed`) and runs one deliverer per webhook endpoint, which tails every
//! partition of the endpoint's log from a cursor kept in the store (`meta`,
//! `webhook/{endpoint}/{partition}` -> the next sequence number to deliver).
//!
//! Delivery:
//! - Up to [`WebhookOptions::max_in_flight`] POSTs per endpoint at once (one semaphore shared
//!   by its partitions; other endpoints have their own), with no ordering promise: a message
//!   being retried is overtaken by later ones, even of its own partition. Receivers that care
//!   deduplicate and order by `ce-id` / `ce-time`.
//! - A 2xx answer delivers. 408, 429, 5xx, timeouts and connection failures are retried with
//!   jittered exponential backoff (honouring `Retry-After`); any other answer (4xx, 3xx:
//!   redirects are not followed, since a POST must not silently turn into a GET) is final.
//!   After [`WebhookOptions::max_attempts`] attempts, or when the next retry would pass
//!   [`WebhookOptions::max_retry_time`] since the first attempt, or at once for a final answer,
//!   the message goes to the endpoint's dead-letter stream (`{endpoint}-deadletter`, see
//!   [`dead_letter_log`]) with the application properties `webhook-error` and
//!   `webhook-attempts`.
//! - The cursor is the oldest message not yet delivered or dead-lettered; it is saved about
//!   once a second while it moves and when the deliverer stops. A clean restart repeats only
//!   what was in flight; after a crash, what was finished since the last save is posted again
//!   (about a second's worth, more when an older message was still being retried, since the
//!   cursor cannot pass it). At least once, never lost (within the log's retention).
//!
//! The CloudEvents mapping (HTTP protocol binding 1.0.2, binary mode):
//!
//! | header | value |
//! |---|---|
//! | `ce-specversion` | `1.0` |
//! | `ce-id` | the message id (`$.mid`), else `{partition}-{sequence number}` in the endpoint's log |
//! | `ce-source` | `/twinhub/{hub name}/devices/{deviceId}` (`/modules/{moduleId}` appended for a module); the hub name is the host name's first label (`twinhub` for `localhost` or an IP), as in system events' `hubName`; each id is percent-encoded as a path segment, and then, like every value, by the binding (a `/` in an id arrives as `%252F`) |
//! | `ce-type` | `Microsoft.Devices.DeviceTelemetry` for device messages, `Microsoft.Devices.{iothub-message-source}` for system events (`Microsoft.Devices.twinChangeEvents`, ...) |
//! | `ce-time` | the enqueued time in the endpoint's log, RFC 3339 UTC |
//! | `ce-subject` | the device id |
//! | `ce-dataschema` | `dt-dataschema` (the model id), when the device announced one |
//! | `Content-Type` | the message's content type (`$.ct`), else `application/octet-stream` |
//! | `ce-iothubconnectiondeviceid`, `ce-iothubconnectionmoduleid` | the sender's identity as the hub authenticated it |
//! | `ce-iothubmessageid`, `ce-iothubcorrelationid`, `ce-iothubcontentencoding`, `ce-iothubcreationtimeutc`, `ce-iothubcomponent`, `ce-iothubmessagesource` | `message-id`, `correlation-id`, `content-encoding` (`$.ce`: a charset, so not HTTP's `Content-Encoding`), `iothub-creation-time-utc`, `dt-subject`, `iothub-message-source`, when set |
//! | `ce-{name}` | each application property (enrichments included); a property without a value gives an empty header |
//!
//! CloudEvents attribute names are lower-case `a-z0-9`, so an application property's name is
//! mapped by [`extension_name`]: ASCII letters lower-cased, every other character dropped
//! (`Temp-Alert` -> `tempalert`, `x.y_z` -> `xyz`), `property` if nothing is left. A name
//! that is a CloudEvents context attribute (`id`, `source`, `type`, ...), one of the
//! `iothub...` names above (whether or not this message sets it, so that the mapping does not
//! depend on the message), or taken by an earlier property of the same message gets the
//! smallest suffix `2`, `3`, ... that makes it free, in the order the device sent them.
//! Values are percent-encoded as the binding requires (UTF-8; everything outside printable
//! ASCII, space, `"` and `%`). The `iothub...` names are longer than the 20 characters
//! CloudEvents recommends; they stay readable rather than cryptic.
//!
//! Defaults ([`WebhookOptions`]): 16 in flight per endpoint, 10 s per request, retries after
//! 1 s doubling to 60 s (each drawn from the upper half of its interval), 8 attempts or 10
//! minutes of trying, whichever comes first (with the default backoff 8 attempts take about
//! 2 minutes; the 10 minutes bind when requests time out or servers ask `Retry-After`).
//!
//! Metrics, labelled `endpoint`: `twinhub_webhook_delivered_total`,
//! `twinhub_webhook_retried_total`, `twinhub_webhook_dead_lettered_total`, and the histogram
//! `twinhub_webhook_delivery_lag_seconds` (acceptance time minus enqueued time).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use twinhub_core::Hub;
use twinhub_eventlog::{EventLog, NewEvent, StoredEvent, partition_for};
use twinhub_proto::message::{Message, SOURCE_TELEMETRY};
use twinhub_store::{Table, Write};

/// How webhook endpoints are delivered. The same for every endpoint of a hub.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookOptions {
    /// Attempts per message before it is dead-lettered (the first one included).
    pub max_attempts: u32,
    /// No retry starts later than this after a message's first attempt.
    pub max_retry_time: Duration,
    /// The wait before the first retry; it doubles with each further one.
    pub initial_backoff: Duration,
    /// The longest wait between two attempts (`Retry-After` included).
    pub max_backoff: Duration,
    /// One request, from connecting to the end of the response body.
    pub request_timeout: Duration,
    /// POSTs in flight at once per endpoint.
    pub max_in_flight: usize,
    /// How often a partition's cursor is saved while it moves.
    pub cursor_interval: Duration,
    /// Further trust anchors for `https://` webhooks (PEM), besides the system's roots.
    pub extra_ca_pem: Vec<Vec<u8>>,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        WebhookOptions {
            max_attempts: 8,
            max_retry_time: Duration::from_secs(10 * 60),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            max_in_flight: 16,
            cursor_interval: Duration::from_secs(1),
            extra_ca_pem: Vec::new(),
        }
    }
}

/// The name of the stream an endpoint's undeliverable messages go to.
pub fn dead_letter_name(endpoint: &str) -> String {
    format!("{endpoint}-deadletter")
}

/// The dead-letter stream of webhook endpoint `endpoint`: a log of `twinhub_proto::message`
/// encodings like every endpoint's, opened the way endpoint logs are
/// (`Routing::auxiliary_log`; the server's opener keeps one log per name, under
/// `<data-dir>/endpoints/<endpoint>-deadletter`, with the endpoints' retention).
pub async fn dead_letter_log(hub: &Arc<Hub>, endpoint: &str) -> Result<Arc<dyn EventLog>, String> {
    let name = dead_letter_name(endpoint);
    let opener = hub.clone();
    // A disk log opens (and may recover) its files: blocking work.
    tokio::task::spawn_blocking(move || opener.routing().auxiliary_log(&name))
        .await
        .map_err(|e| format!("opening the dead-letter stream failed: {e}"))?
        .map_err(|e| e.message().to_owned())
}

/// Starts delivering the webhook endpoints of `hub` with `options` (from the hub's settings),
/// trusting `dev_ca` (the hub's dev CA, PEM) besides the system's roots. Stops when
/// `shutdown` is cancelled, after saving every cursor.
pub fn start(
    hub: Arc<Hub>,
    mut options: WebhookOptions,
    dev_ca: Option<&Path>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    if let Some(path) = dev_ca {
        match std::fs::read(path) {
            Ok(pem) => options.extra_ca_pem.push(pem),
            Err(e) => tracing::warn!(
                "webhooks will not trust the dev CA: {} cannot be read: {e}",
                path.display()
            ),
        }
    }
    if let Err(e) = spawn(hub, options, shutdown.clone(), tracker) {
        tracing::error!("webhook endpoints will not be delivered: {e}");
    }
}

/// Starts the webhook supervisor of `hub` with `options` on `tracker`.
pub fn spawn(
    hub: Arc<Hub>,
    options: WebhookOptions,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), String> {
    // reqwest is built without a bundled crypto provider: use ring, as the rest of the hub.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = Vec::new();
    for pem in &options.extra_ca_pem {
        roots.extend(
            reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("a webhook CA is not valid PEM: {e}"))?,
        );
    }
    let client = reqwest::Client::builder()
        .timeout(options.request_timeout)
        .connect_timeout(options.request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(options.max_in_flight)
        .user_agent(concat!("twinhub-webhook/", env!("CARGO_PKG_VERSION")))
        .tls_certs_merge(roots)
        .build()
        .map_err(|e| format!("the webhook HTTP client cannot be built: {e}"))?;
    let shared = Arc::new(Shared {
        hub_name: twinhub_proto::connection_string::hub_name(hub.authorizer().hostname()),
        hub,
        client,
        options,
    });
    tracker.spawn(supervise(shared, shutdown));
    Ok(())
}

/// What every deliverer of a hub shares.
struct Shared {
    hub: Arc<Hub>,
    client: reqwest::Client,
    options: WebhookOptions,
    /// The hub's name in `ce-source`: IoT Hub's short name (the host name's first label).
    hub_name: String,
}

struct Running {
    url: String,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Keeps one deliverer per webhook endpoint of the routing configuration in force.
async fn supervise(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut changed = shared.hub.routing().changed.subscribe();
    // In a cluster one node delivers (the lease holder), or every node would post every
    // message; the others stop their deliverers, which save their cursors as they go.
    let mut leading = shared.hub.leads_cluster_work();
    let mut running: HashMap<String, Running> = HashMap::new();
    loop {
        changed.borrow_and_update();
        let delivers = *leading.borrow_and_update();
        let wanted: HashMap<String, twinhub_core::routing::Endpoint> = shared
            .hub
            .routing()
            .endpoints()
            .into_iter()
            .filter(|e| delivers && e.spec.kind == twinhub_routing::EndpointKind::Webhook)
            .map(|e| (e.spec.name.to_ascii_lowercase(), e))
            .collect();
        // Stop those removed or pointed elsewhere first: a restarted deliverer must read the
        // cursor its predecessor saved on the way out.
        let stale: Vec<String> = running
            .iter()
            .filter(|(key, run)| {
                wanted
                    .get(*key)
                    .is_none_or(|e| e.spec.url.as_deref() != Some(run.url.as_str()))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(run) = running.remove(&key) {
                run.cancel.cancel();
                let _ = run.task.await;
                tracing::info!(endpoint = %key, "webhook deliverer stopped");
            }
        }
        for (key, endpoint) in wanted {
            if running.contains_key(&key) {
                continue;
            }
            let Some(url) = endpoint.spec.url.clone() else {
                continue;
            };
            let parsed = match reqwest::Url::parse(&url) {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(endpoint = %endpoint.spec.name, "the webhook URL {url:?} is not usable: {e}");
                    continue;
                }
            };
            let cancel = shutdown.child_token();
            let deliverer = Arc::new(Deliverer {
                shared: shared.clone(),
                name: endpoint.spec.name.clone(),
                key: key.clone(),
                url: parsed,
                log: endpoint.log.clone(),
                slots: Arc::new(Semaphore::new(shared.options.max_in_flight.max(1))),
                dead_letters: tokio::sync::OnceCell::new(),
            });
            tracing::info!(endpoint = %endpoint.spec.name, "webhook deliverer started");
            let task = tokio::spawn(deliverer.run(cancel.clone()));
            running.insert(key, Running { url, cancel, task });
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = changed.changed() => if r.is_err() {
                shutdown.cancelled().await;
                break;
            },
            r = leading.changed() => if r.is_err() {
                shutdown.cancelled().await;
                break;
            },
        }
    }
    for run in running.values() {
        run.cancel.cancel();
    }
    for (_, run) in running {
        let _ = run.task.await;
    }
}

/// One webhook endpoint's delivery.
struct Deliverer {
    shared: Arc<Shared>,
    /// As configured (metrics, logs, the dead-letter stream's name).
    name: String,
    /// Lower-cased (cursor keys).
    key: String,
    url: reqwest::Url,
    log: Arc<dyn EventLog>,
    /// The endpoint's in-flight bound, shared by its partitions.
    slots: Arc<Semaphore>,
    /// The dead-letter stream, opened when first needed.
    dead_letters: tokio::sync::OnceCell<Arc<dyn EventLog>>,
}

/// How many events a partition reads at once, and their bytes.
const READ_EVENTS: usize = 64;
const READ_BYTES: usize = 1024 * 1024;
/// How long to wait before retrying a failed store or log operation.
const IO_RETRY: Duration = Duration::from_secs(1);

fn cursor_key(endpoint_key: &str, partition: u32) -> String {
    format!("webhook/{endpoint_key}/{partition}")
}

impl Deliverer {
    async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut partitions = JoinSet::new();
        for p in 0..self.log.partition_count() {
            partitions.spawn(self.clone().run_partition(p, cancel.clone()));
        }
        while partitions.join_next().await.is_some() {}
    }

    /// Where partition `p` resumes: the saved cursor, or the log's start for a new endpoint.
    async fn load_cursor(&self, p: u32, cancel: &CancellationToken) -> Option<i64> {
        let key = cursor_key(&self.key, p);
        loop {
            match self.shared.hub.store().get(Table::Meta, &key).await {
                Ok(saved) => {
                    let saved = saved.and_then(|b| String::from_utf8(b).ok()?.parse::<i64>().ok());
                    let info = match self.log.info(p) {
                        Ok(i) => i,
                        Err(e) => {
                            tracing::warn!(endpoint = %self.name, partition = p, "the webhook log cannot be read: {e}");
                            tokio::select! {
                                _ = cancel.cancelled() => return None,
                                _ = tokio::time::sleep(IO_RETRY) => continue,
                            }
                        }
                    };
                    return Some(match saved {
                        // A cursor past the log's end means the log is younger than the cursor
                        // (a log kept in memory, a data directory restored from elsewhere):
                        // everything in it is undelivered.
                        Some(next) if next > info.last_sequence + 1 => {
                            tracing::warn!(endpoint = %self.name, partition = p, "the saved webhook cursor {next} is past the log's end; delivering the log from its start");
                            info.begin_sequence
                        }
                        Some(next) => next,
                        None => info.begin_sequence,
                    });
                }
                Err(e) => {
                    tracing::warn!(endpoint = %self.name, "reading a webhook cursor failed: {e}");
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(IO_RETRY) => {}
                    }
                }
            }
        }
    }

    async fn save_cursor(&self, p: u32, next: i64) -> bool {
        let write = Write::put(
            Table::Meta,
            cursor_key(&self.key, p),
            next.to_string().into_bytes(),
        );
        match self.shared.hub.store().commit(vec![write]).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(endpoint = %self.name, partition = p, "saving the webhook cursor failed: {e}");
                false
            }
        }
    }

    /// Tails partition `p`: dispatches each event to a delivery task as a slot frees, and saves
    /// the cursor (the oldest event not finished) as it moves.
    async fn run_partition(self: Arc<Self>, p: u32, cancel: CancellationToken) {
        let Some(start) = self.load_cursor(p, &cancel).await else {
            return;
        };
        let mut saved = start;
        // The next sequence number to read.
        let mut read_next = start;
        let mut buffered: VecDeque<StoredEvent> = VecDeque::new();
        let mut deliveries: JoinSet<i64> = JoinSet::new();
        let mut pending: BTreeSet<i64> = BTreeSet::new();
        let mut save_at: Option<Instant> = None;
        let mut log_open = true;
        loop {
            // The oldest event not finished: everything before it is delivered or dead-lettered.
            let cursor = pending
                .first()
                .copied()
                .or_else(|| buffered.front().map(|e| e.sequence))
                .unwrap_or(read_next);
            if cursor != saved && save_at.is_none() {
                save_at = Some(Instant::now() + self.shared.options.cursor_interval);
            }
            if buffered.is_empty() && log_open {
                match self.log.read(p, read_next, READ_EVENTS, READ_BYTES).await {
                    Ok(events) => {
                        if let Some(first) = events.first()
                            && first.sequence > read_next
                        {
                            tracing::warn!(endpoint = %self.name, partition = p, lost = first.sequence - read_next, "webhook messages passed the log's retention before delivery");
                        }
                        if let Some(last) = events.last() {
                            read_next = last.sequence + 1;
                        }
                        buffered.extend(events);
                    }
                    Err(twinhub_eventlog::Error::Closed) => log_open = false,
                    Err(e) => {
                        tracing::warn!(endpoint = %self.name, partition = p, "reading the webhook log failed: {e}");
                        tokio::select! {
                            _ = cancel.cancelled() => break,
                            _ = tokio::time::sleep(IO_RETRY) => continue,
                        }
                    }
                }
                if !buffered.is_empty() {
                    continue;
                }
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(done) = deliveries.join_next(), if !deliveries.is_empty() => {
                    match done {
                        Ok(sequence) => { pending.remove(&sequence); }
                        // A delivery task cannot panic by design; if one did, its event stays
                        // pending (the cursor holds) until the next start redelivers it.
                        Err(e) => tracing::error!(endpoint = %self.name, "a webhook delivery task failed: {e}"),
                    }
                }
                permit = self.slots.clone().acquire_owned(), if !buffered.is_empty() => {
                    let Ok(permit) = permit else { break };
                    if let Some(event) = buffered.pop_front() {
                        pending.insert(event.sequence);
                        let me = self.clone();
                        deliveries.spawn(async move {
                            let sequence = event.sequence;
                            me.deliver(p, event).await;
                            drop(permit);
                            sequence
                        });
                    }
                }
                _ = sleep_until(save_at) => {
                    save_at = None;
                    if self.save_cursor(p, cursor).await {
                        saved = cursor;
                    }
                }
                r = self.log.wait_for(p, read_next), if buffered.is_empty() && log_open => {
                    if r.is_err() {
                        log_open = false;
                    }
                }
            }
        }
        // Unfinished deliveries are dropped: the cursor stays before them, so the next start
        // makes them again.
        deliveries.shutdown().await;
        let cursor = pending
            .first()
            .copied()
            .or_else(|| buffered.front().map(|e| e.sequence))
            .unwrap_or(read_next);
        if cursor != saved {
            self.save_cursor(p, cursor).await;
        }
    }

    /// Delivers one event until it is accepted or dead-lettered.
    async fn deliver(&self, p: u32, event: StoredEvent) {
        let options = &self.shared.options;
        let message = match Message::decode(&event.data) {
            Ok(m) => m,
            Err(e) => {
                // Nothing can be posted for it; keep its bytes where an operator can look.
                let raw = Message {
                    body: event.data.to_vec(),
                    ..Message::default()
                };
                self.dead_letter(raw, format!("the stored message cannot be read: {e}"), 0)
                    .await;
                return;
            }
        };
        let headers = cloud_event_headers(&message, &self.shared.hub_name, p, &event);
        let body = Bytes::from(message.body.clone());
        let first = Instant::now();
        let mut attempts = 0u32;
        let error = loop {
            attempts += 1;
            let outcome = self.post(headers.clone(), body.clone()).await;
            let (error, retry_after) = match outcome {
                Attempt::Delivered => {
                    metrics::counter!("twinhub_webhook_delivered_total", "endpoint" => self.name.clone())
                        .increment(1);
                    let lag_ms = twinhub_core::keys::now_millis().saturating_sub(event.enqueued_ms);
                    metrics::histogram!("twinhub_webhook_delivery_lag_seconds", "endpoint" => self.name.clone())
                        .record(lag_ms.max(0) as f64 / 1000.0);
                    return;
                }
                Attempt::Final(error) => break error,
                Attempt::Retry(error, retry_after) => (error, retry_after),
            };
            let delay = backoff(options, attempts, retry_after);
            if attempts >= options.max_attempts.max(1)
                || first.elapsed() + delay > options.max_retry_time
            {
                break error;
            }
            tracing::debug!(endpoint = %self.name, attempts, "webhook delivery failed ({error}); retrying in {delay:?}");
            metrics::counter!("twinhub_webhook_retried_total", "endpoint" => self.name.clone())
                .increment(1);
            tokio::time::sleep(delay).await;
        };
        self.dead_letter(message, error, attempts).await;
    }

    async fn post(&self, headers: HeaderMap, body: Bytes) -> Attempt {
        let sent = self
            .shared
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) if e.is_builder() => return Attempt::Final(describe(&e)),
            Err(e) => return Attempt::Retry(describe(&e), None),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read (a bounded part of) the answer: a connection whose body was read goes back to
        // the pool, and a refusal's first words say why in the dead-letter record.
        let mut said = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) if said.len() < ANSWER_KEPT => said.extend_from_slice(&chunk),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) if status.is_success() => {
                    // The webhook said yes; a broken body after that changes nothing.
                    tracing::debug!(endpoint = %self.name, "reading a webhook's answer failed: {e}");
                    break;
                }
                Err(e) => return Attempt::Retry(describe(&e), retry_after),
            }
        }
        if status.is_success() {
            return Attempt::Delivered;
        }
        let error = status_error(status, &said);
        if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            Attempt::Retry(error, retry_after)
        } else {
            Attempt::Final(error)
        }
    }

    /// Appends `message` to the endpoint's dead-letter stream, retrying until it is kept (the
    /// cursor must not pass a message that is neither delivered nor kept).
    async fn dead_letter(&self, mut message: Message, error: String, attempts: u32) {
        tracing::warn!(endpoint = %self.name, device = %message.stamp.device_id, attempts, "a webhook message was dead-lettered: {error}");
        set_property(&mut message.application, "webhook-error", error);
        set_property(
            &mut message.application,
            "webhook-attempts",
            attempts.to_string(),
        );
        let data = Bytes::from(message.encode());
        loop {
            let log = self
                .dead_letters
                .get_or_try_init(|| dead_letter_log(&self.shared.hub, &self.name))
                .await;
            let kept = match log {
                Ok(log) => {
                    let partition = partition_for(&message.stamp.device_id, log.partition_count());
                    log.append(partition, vec![NewEvent::new(data.clone())])
                        .await
                        .map_err(|e| e.to_string())
                }
                Err(e) => Err(e),
            };
            match kept {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(endpoint = %self.name, "keeping a dead-lettered webhook message failed: {e}; retrying");
                    tokio::time::sleep(IO_RETRY).await;
                }
            }
        }
        metrics::counter!("twinhub_webhook_dead_lettered_total", "endpoint" => self.name.clone())
            .increment(1);
    }
}

/// How much of a webhook's answer is read into memory (the rest is read and dropped).
const ANSWER_KEPT: usize = 4096;
/// How much of a refusal's answer the dead-letter record quotes.
const ANSWER_QUOTED: usize = 200;

enum Attempt {
    Delivered,
    /// Worth trying again (with the server's `Retry-After`, if it sent one).
    Retry(String, Option<Duration>),
    /// Trying again would get the same answer.
    Final(String),
}

fn status_error(status: StatusCode, answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer);
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(ANSWER_QUOTED)
        .collect();
    let text = text.trim();
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    }
}

/// A request failure with its causes (reqwest's own text names only the URL).
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "the request timed out".to_owned()
    } else if e.is_connect() {
        "the connection failed".to_owned()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// The wait before retry number `attempts` (1 for the first retry): `initial_backoff` doubled
/// per retry up to `max_backoff`, drawn uniformly from its upper half so that messages that
/// failed together do not come back together; at least what `Retry-After` asked, up to
/// `max_backoff`.
fn backoff(options: &WebhookOptions, attempts: u32, retry_after: Option<Duration>) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let full = options
        .initial_backoff
        .saturating_mul(1u32 << exp)
        .min(options.max_backoff);
    let half = full / 2;
    let spread = half.as_millis() as u64;
    let jitter = if spread == 0 {
        0
    } else {
        getrandom::u64().unwrap_or(0) % (spread + 1)
    };
    let delay = half + Duration::from_millis(jitter);
    match retry_after {
        Some(asked) => delay.max(asked.min(options.max_backoff)),
        None => delay,
    }
}

fn set_property(props: &mut Vec<(String, Option<String>)>, name: &str, value: String) {
    props.retain(|(k, _)| k != name);
    props.push((name.to_owned(), Some(value)));
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// CloudEvents' context attributes (1.0): names an extension may not take.
const CONTEXT_ATTRIBUTES: [&str; 10] = [
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "database64",
];

/// The extensions the hub sets from IoT Hub's system properties, reserved even when a message
/// has no value for them.
const HUB_EXTENSIONS: [&str; 8] = [
    "iothubconnectiondeviceid",
    "iothubconnectionmoduleid",
    "iothubmessageid",
    "iothubcorrelationid",
    "iothubcontentencoding",
    "iothubcreationtimeutc",
    "iothubcomponent",
    "iothubmessagesource",
];

/// The CloudEvents HTTP binding's encoding of header values: printable ASCII except space,
/// `"` and `%` as is, everything else percent-encoded as UTF-8.
const CE_VALUE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');

/// What a path segment of `ce-source` may not hold as is.
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// An application property's name as a CloudEvents extension name before collisions are
/// resolved: ASCII letters lower-cased, digits kept, everything else dropped; `property` when
/// nothing is left.
pub fn extension_name(name: &str) -> String {
    let mapped: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if mapped.is_empty() {
        "property".to_owned()
    } else {
        mapped
    }
}

/// The extension names of `properties`, in order, collisions resolved as the module
/// documentation says.
pub fn extension_names<'a>(properties: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut taken: HashSet<String> = CONTEXT_ATTRIBUTES
        .iter()
        .chain(HUB_EXTENSIONS.iter())
        .map(|s| (*s).to_owned())
        .collect();
    properties
        .into_iter()
        .map(|name| {
            let base = extension_name(name);
            let mut candidate = base.clone();
            let mut n = 2u32;
            while taken.contains(&candidate) {
                candidate = format!("{base}{n}");
                n += 1;
            }
            taken.insert(candidate.clone());
            candidate
        })
        .collect()
}

/// `ce-type` for a message from `source` (`iothub-message-source`).
pub fn event_type(source: &str) -> String {
    if source.is_empty() || source == SOURCE_TELEMETRY {
        "Microsoft.Devices.DeviceTelemetry".to_owned()
    } else {
        format!("Microsoft.Devices.{source}")
    }
}

fn ce_value(text: &str) -> HeaderValue {
    // Every byte left is printable ASCII, so this cannot fail.
    HeaderValue::from_str(&utf8_percent_encode(text, CE_VALUE).to_string())
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The HTTP headers of `message`, event `event` of partition `partition`, in CloudEvents'
/// binary content mode (the body goes as is).
pub fn cloud_event_headers(
    message: &Message,
    hub_name: &str,
    partition: u32,
    event: &StoredEvent,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &str, value: &str| {
        if let Ok(name) = HeaderName::try_from(format!("ce-{name}")) {
            h.append(name, ce_value(value));
        }
    };
    let system = &message.system;
    let stamp = &message.stamp;
    put("specversion", "1.0");
    let id = match &system.message_id {
        Some(id) if !id.is_empty() => id.clone(),
        _ => format!("{partition}-{}", event.sequence),
    };
    put("id", &id);
    let mut source = format!(
        "/twinhub/{}/devices/{}",
        utf8_percent_encode(hub_name, PATH_SEGMENT),
        utf8_percent_encode(&stamp.device_id, PATH_SEGMENT)
    );
    if let Some(module) = &stamp.module_id {
        source.push_str("/modules/");
        source.extend(utf8_percent_encode(module, PATH_SEGMENT));
    }
    put("source", &source);
    put("type", &event_type(&stamp.source));
    if let Ok(time) = jiff::Timestamp::from_millisecond(event.enqueued_ms) {
        put("time", &time.to_string());
    }
    put("subject", &stamp.device_id);
    if let Some(schema) = &stamp.data_schema {
        put("dataschema", schema);
    }
    put("iothubconnectiondeviceid", &stamp.device_id);
    if let Some(module) = &stamp.module_id {
        put("iothubconnectionmoduleid", module);
    }
    for (name, value) in [
        ("iothubmessageid", &system.message_id),
        ("iothubcorrelationid", &system.correlation_id),
        ("iothubcontentencoding", &system.content_encoding),
        ("iothubcreationtimeutc", &system.creation_time),
        ("iothubcomponent", &system.subject),
    ] {
        if let Some(v) = value {
            put(name, v);
        }
    }
    if !stamp.source.is_empty() {
        put("iothubmessagesource", &stamp.source);
    }
    let names = extension_names(message.application.iter().map(|(k, _)| k.as_str()));
    for (name, (_, value)) in names.iter().zip(&message.application) {
        put(name, value.as_deref().unwrap_or(""));
    }
    let content_type = system
        .content_type
        .as_deref()
        .and_then(|ct| HeaderValue::from_str(ct).ok())
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    h.insert(http::header::CONTENT_TYPE, content_type);
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinhub_proto::message::{Stamp, SystemProperties};

    fn event(sequence: i64, enqueued_ms: i64) -> StoredEvent {
        StoredEvent {
            sequence,
            offset: 0,
            enqueued_ms,
            data: Bytes::new(),
        }
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn names_are_lower_case_alphanumerics_and_collisions_get_suffixes() {
        assert_eq!(extension_name("Temp-Alert"), "tempalert");
        assert_eq!(extension_name("x.y_z"), "xyz");
        assert_eq!(extension_name("Ωmega9"), "mega9");
        assert_eq!(extension_name("--"), "property");
        assert_eq!(
            extension_names([
                "id",
                "Temp-Alert",
                "tempalert",
                "$$",
                "iothub-message-id",
                "a"
            ]),
            [
                "id2",
                "tempalert",
                "tempalert2",
                "property",
                "iothubmessageid2",
                "a"
            ]
        );
        // The mapping of a name never depends on which system properties a message sets.
        assert_eq!(extension_names(["iothubcomponent"]), ["iothubcomponent2"]);
    }

    #[test]
    fn telemetry_maps_to_binary_mode_headers() {
        let message = Message {
            system: SystemProperties {
                message_id: Some("m 1".into()),
                correlation_id: Some("c1".into()),
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                ..Default::default()
            },
            application: vec![
                ("Temp-Alert".into(), Some("très \"hot\" 100%".into())),
                ("bare".into(), None),
                ("id".into(), Some("x".into())),
            ],
            stamp: Stamp {
                device_id: "dev/1".into(),
                source: SOURCE_TELEMETRY.into(),
                ..Default::default()
            },
            body: b"{}".to_vec(),
        };
        let h = cloud_event_headers(&message, "myhub", 2, &event(7, 1_700_000_000_123));
        assert_eq!(get(&h, "ce-specversion"), Some("1.0"));
        assert_eq!(get(&h, "ce-id"), Some("m%201"));
        assert_eq!(
            get(&h, "ce-source"),
            Some("/twinhub/myhub/devices/dev%252F1")
        );
        assert_eq!(
            get(&h, "ce-type"),
            Some("Microsoft.Devices.DeviceTelemetry")
        );
        assert_eq!(get(&h, "ce-time"), Some("2023-11-14T22:13:20.123Z"));
        assert_eq!(get(&h, "ce-subject"), Some("dev/1"));
        assert_eq!(get(&h, "content-type"), Some("application/json"));
        assert_eq!(get(&h, "ce-iothubconnectiondeviceid"), Some("dev/1"));
        assert_eq!(get(&h, "ce-iothubmessageid"), Some("m%201"));
        assert_eq!(get(&h, "ce-iothubcorrelationid"), Some("c1"));
        assert_eq!(get(&h, "ce-iothubcontentencoding"), Some("utf-8"));
        assert_eq!(get(&h, "ce-iothubmessagesource"), Some("Telemetry"));
        assert_eq!(
            get(&h, "ce-tempalert"),
            Some("tr%C3%A8s%20%22hot%22%20100%25")
        );
        assert_eq!(get(&h, "ce-bare"), Some(""));
        assert_eq!(get(&h, "ce-id2"), Some("x"));
        assert_eq!(h.get_all("ce-id").iter().count(), 1);
    }

    #[test]
    fn without_a_message_id_or_content_type_the_position_and_octets_stand_in() {
        let message = Message {
            stamp: Stamp {
                device_id: "d".into(),
                module_id: Some("m".into()),
                source: "twinChangeEvents".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let h = cloud_event_headers(&message, "twinhub", 3, &event(42, 0));
        assert_eq!(get(&h, "ce-id"), Some("3-42"));
        assert_eq!(
            get(&h, "ce-type"),
            Some("Microsoft.Devices.twinChangeEvents")
        );
        assert_eq!(
            get(&h, "ce-source"),
            Some("/twinhub/twinhub/devices/d/modules/m")
        );
        assert_eq!(get(&h, "ce-iothubconnectionmoduleid"), Some("m"));
        assert_eq!(get(&h, "content-type"), Some("application/octet-stream"));
        assert!(h.get("ce-iothubmessageid").is_none());
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_honours_retry_after() {
        let o = WebhookOptions::default();
        for (attempt, full) in [(1, 1u64), (2, 2), (3, 4), (6, 32), (7, 60), (20, 60)] {
            for _ in 0..50 {
                let d = backoff(&o, attempt, None);
                assert!(
                    d >= Duration::from_millis(full * 500) && d <= Duration::from_secs(full),
                    "attempt {attempt}: {d:?}"
                );
            }
        }
        assert!(backoff(&o, 1, Some(Duration::from_secs(30))) >= Duration::from_secs(30));
        assert_eq!(
            backoff(&o, 1, Some(Duration::from_secs(3600))),
            Duration::from_secs(60)
        );
    }
}
