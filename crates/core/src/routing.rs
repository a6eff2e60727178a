//! Message routing in the hub: the routing configuration (kept in the store's meta table,
//! seeded from the operator's config file), each custom endpoint's event log, and the path
//! of every routed message: `twinhub_routing::Router` decides, this module enriches and
//! appends to the chosen logs, and acknowledges only when all of them are durable. Device
//! messages come from `telemetry`; system events (twin changes, lifecycle, connection state,
//! jobs) from `hub_events`. The server reads stream endpoints over AMQP and delivers webhook
//! endpoints from their logs.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde_json::Value;
use twinhub_eventlog::{EventLog, NewEvent, partition_for};
use twinhub_proto::error::ErrorCode;
use twinhub_proto::message::{MAX_MESSAGE_BYTES, Message};
use twinhub_routing::{
    BUILTIN_ENDPOINT, Decision, EndpointSpec, EnrichmentSpec, RouteSpec, Router, RoutingConfig,
    RoutingError, Source,
};
use twinhub_store::{Table, Write};

use crate::error::{Error, Result};
use crate::hub::Hub;

const ROUTING_KEY: &str = "routing";

/// Opens (creating if needed) the event log of the custom endpoint with this name.
pub type EndpointLogs =
    Arc<dyn Fn(&str) -> std::result::Result<Arc<dyn EventLog>, String> + Send + Sync>;

/// A custom endpoint and its log (a stream's messages, or a webhook's delivery buffer).
#[derive(Clone)]
pub struct Endpoint {
    pub spec: EndpointSpec,
    pub log: Arc<dyn EventLog>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("spec", &self.spec)
            .finish()
    }
}

/// The routing state of the hub.
pub struct Routing {
    router: RwLock<Arc<Router>>,
    /// Custom endpoints by lower-cased name.
    endpoints: RwLock<HashMap<String, Endpoint>>,
    open_log: EndpointLogs,
    /// Serializes configuration changes and their commit.
    changing: tokio::sync::Mutex<()>,
    /// Wakes whoever serves endpoints (webhook deliverers) after a change.
    pub changed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field("config", self.router().config())
            .finish_non_exhaustive()
    }
}

fn routing_error(e: RoutingError) -> Error {
    Error::invalid(e.to_string())
}

impl Routing {
    pub(crate) fn new(hub_name: &str, open_log: Option<EndpointLogs>) -> Result<Routing> {
        let open_log = open_log.unwrap_or_else(|| {
            Arc::new(|_: &str| {
                twinhub_eventlog::MemoryLog::new(twinhub_eventlog::LogOptions::default())
                    .map(|l| Arc::new(l) as Arc<dyn EventLog>)
                    .map_err(|e| e.to_string())
            })
        });
        Ok(Routing {
            router: RwLock::new(Arc::new(
                Router::compile(RoutingConfig::default(), hub_name).map_err(routing_error)?,
            )),
            endpoints: RwLock::new(HashMap::new()),
            open_log,
            changing: tokio::sync::Mutex::new(()),
            changed: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The compiled configuration in force.
    pub fn router(&self) -> Arc<Router> {
        self.router
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn config(&self) -> RoutingConfig {
        self.router().config().clone()
    }

    /// The custom endpoint `name` (matched ignoring case), if configured.
    pub fn endpoint(&self, name: &str) -> Option<Endpoint> {
        self.endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name.to_ascii_lowercase())
            .cloned()
    }

    /// Every custom endpoint.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let mut all: Vec<Endpoint> = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        all
    }

    /// Opens the logs of endpoints new in `config`, then puts `router` in force.
    fn install(&self, router: Router) -> Result<()> {
        let mut opened = HashMap::new();
        {
            let current = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
            for spec in &router.config().endpoints {
                let key = spec.name.to_ascii_lowercase();
                let log = match current.get(&key) {
                    Some(e) => e.log.clone(),
                    None => (self.open_log)(&spec.name).map_err(|e| {
                        Error::new(
                            ErrorCode::ServiceUnavailable,
                            format!("the log of endpoint {} cannot be opened: {e}", spec.name),
                        )
                    })?,
                };
                opened.insert(
                    key,
                    Endpoint {
                        spec: spec.clone(),
                        log,
                    },
                );
            }
        }
        *self.endpoints.write().unwrap_or_else(|e| e.into_inner()) = opened;
        *self.router.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(router);
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// The log of stream `name` that the server keeps beside the endpoints (a webhook's
    /// dead-letter stream), opened the way endpoint logs are; a configured endpoint of that
    /// name gives its own log. Whether two calls share one log is the opener's to say (the
    /// server's keeps one per name; the in-memory default makes a new one each time), so the
    /// caller keeps what it got. Blocking: a disk log opens and checks its files.
    pub fn auxiliary_log(&self, name: &str) -> Result<Arc<dyn EventLog>> {
        if let Some(endpoint) = self.endpoint(name) {
            return Ok(endpoint.log);
        }
        (self.open_log)(name).map_err(|e| {
            Error::new(
                ErrorCode::ServiceUnavailable,
                format!("the log of {name} cannot be opened: {e}"),
            )
        })
    }
}

/// Folds `file` (the operator's config file) into `stored`: an entry of the file replaces the
/// stored one of the same name in its place, or joins at the end; the file can turn the
/// fallback off.
fn merge(mut stored: RoutingConfig, file: &RoutingConfig) -> RoutingConfig {
    fn upsert<T: Clone>(list: &mut Vec<T>, item: &T, same: impl Fn(&T) -> bool) {
        match list.iter_mut().find(|o| same(o)) {
            Some(slot) => *slot = item.clone(),
            None => list.push(item.clone()),
        }
    }
    for e in &file.endpoints {
        upsert(&mut stored.endpoints, e, |o| {
            o.name.eq_ignore_ascii_case(&e.name)
        });
    }
    for r in &file.routes {
        upsert(&mut stored.routes, r, |o| {
            o.name.eq_ignore_ascii_case(&r.name)
        });
    }
    for n in &file.enrichments {
        upsert(&mut stored.enrichments, n, |o| o.key == n.key);
    }
    if !file.fallback_enabled {
        stored.fallback_enabled = false;
    }
    stored
}

/// A message's application properties (a value may be null).
pub type Properties = Vec<(String, Option<String>)>;

/// A message the routing test evaluated, as each endpoint would get it.
#[derive(Debug, Clone)]
pub struct RouteTest {
    pub decision: Decision,
    /// Per endpoint, the application properties after enrichment.
    pub properties: Vec<(String, Properties)>,
}

impl Hub {
    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// Loads the stored configuration at open, folds in the config file's, and puts it in
    /// force. A file configuration that does not validate stops the hub with the reason.
    pub(crate) async fn load_routing(&self, from_file: &RoutingConfig) -> Result<()> {
        let stored = match self.store.get(Table::Meta, ROUTING_KEY).await? {
            Some(bytes) => serde_json::from_slice::<RoutingConfig>(&bytes).map_err(|e| {
                Error::new(
                    ErrorCode::ServerError,
                    format!("the stored routing configuration cannot be read: {e}"),
                )
            })?,
            None => RoutingConfig::default(),
        };
        let config = merge(stored.clone(), from_file);
        let router = Router::compile(
            config.clone(),
            &twinhub_proto::connection_string::hub_name(self.auth.hostname()),
        )
        .map_err(routing_error)?;
        if config != stored {
            self.save_routing(&config).await?;
        }
        self.routing.install(router)
    }

    async fn save_routing(&self, config: &RoutingConfig) -> Result<()> {
        self.store
            .commit(vec![Write::put(
                Table::Meta,
                ROUTING_KEY,
                serde_json::to_vec(config).unwrap_or_default(),
            )])
            .await?;
        Ok(())
    }

    /// Changes the configuration with `change`, validates and compiles the result, commits
    /// it, and puts it in force. Refusals say what is wrong.
    pub async fn change_routing(
        &self,
        change: impl FnOnce(&mut RoutingConfig) -> Result<()>,
    ) -> Result<RoutingConfig> {
        let _guard = self.routing.changing.lock().await;
        let mut config = self.routing.config();
        change(&mut config)?;
        let router = Router::compile(
            config.clone(),
            &twinhub_proto::connection_string::hub_name(self.auth.hostname()),
        )
        .map_err(routing_error)?;
        self.save_routing(&config).await?;
        self.routing.install(router)?;
        Ok(config)
    }

    pub async fn add_endpoint(&self, spec: EndpointSpec) -> Result<RoutingConfig> {
        self.change_routing(|c| {
            if c.has_endpoint(&spec.name) {
                return Err(Error::new(
                    ErrorCode::InvalidOperation,
                    format!("endpoint {} already exists", spec.name),
                ));
            }
            c.endpoints.push(spec);
            Ok(())
        })
        .await
    }

    /// Removes a custom endpoint that no route or enrichment names. Its log stays on disk.
    pub async fn remove_endpoint(&self, name: &str) -> Result<RoutingConfig> {
        self.change_routing(|c| {
            let before = c.endpoints.len();
            c.endpoints.retain(|e| !e.name.eq_ignore_ascii_case(name));
            if c.endpoints.len() == before {
                return Err(not_found("endpoint", name));
            }
            Ok(())
        })
        .await
    }

    pub async fn add_route(&self, route: RouteSpec) -> Result<RoutingConfig> {
        self.change_routing(|c| {
            if c.routes
                .iter()
                .any(|r| r.name.eq_ignore_ascii_case(&route.name))
            {
                return Err(Error::new(
                    ErrorCode::InvalidOperation,
                    format!("route {} already exists", route.name),
                ));
            }
            c.routes.push(route);
            Ok(())
        })
        .await
    }

    pub async fn remove_route(&self, name: &str) -> Result<RoutingConfig> {
        self.change_routing(|c| {
            let before = c.routes.len();
            c.routes.retain(|r| !r.name.eq_ignore_ascii_case(name));
            if c.routes.len() == before {
                return Err(not_found("route", name));
            }
            Ok(())
        })
        .await
    }

    pub async fn add_enrichment(&self, enrichment: EnrichmentSpec) -> Result<RoutingConfig> {
        self.change_routing(|c| {
            c.enrichments.retain(|e| e.key != enrichment.key);
            c.enrichments.push(enrichment);
            Ok(())
        })
        .await
    }

    pub async fn remove_enrichment(&self, key: &str) -> Result<RoutingConfig> {
        self.change_routing(|c| {
            let before = c.enrichments.len();
            c.enrichments.retain(|e| e.key != key);
            if c.enrichments.len() == before {
                return Err(not_found("enrichment", key));
            }
            Ok(())
        })
        .await
    }

    pub async fn set_fallback(&self, enabled: bool) -> Result<RoutingConfig> {
        self.change_routing(|c| {
            c.fallback_enabled = enabled;
            Ok(())
        })
        .await
    }

    /// The log behind endpoint `name`: the built-in one for `events`.
    pub fn endpoint_log(&self, name: &str) -> Option<Arc<dyn EventLog>> {
        if name.eq_ignore_ascii_case(BUILTIN_ENDPOINT) {
            return Some(self.events.log().clone());
        }
        self.routing.endpoint(name).map(|e| e.log)
    }

    /// The twin document `$twin` conditions and enrichments read, if the device exists.
    async fn routing_twin(&self, device_id: &str) -> Result<Option<Value>> {
        Ok(self
            .load(device_id)
            .await?
            .map(|rec| serde_json::to_value(self.render_twin(&rec)).unwrap_or(Value::Null)))
    }

    /// What the portal's "Test route" answers: which routes match `message` from `source`
    /// (the twin of `device_id` read when a condition needs it), and the message each endpoint
    /// would get.
    pub async fn test_route(&self, source: Source, message: &Message) -> Result<RouteTest> {
        let router = self.routing.router();
        let twin = if router.needs_twin(source) {
            self.routing_twin(&message.stamp.identity_key()).await?
        } else {
            None
        };
        let decision = router.decide(source, message, twin.as_ref());
        let properties = decision
            .deliveries
            .iter()
            .map(|d| {
                let mut props = message.application.clone();
                enrich(&mut props, &d.enrichments);
                (d.endpoint.clone(), props)
            })
            .collect();
        Ok(RouteTest {
            decision,
            properties,
        })
    }

    /// Whether a system event from `source` would go anywhere (build it only then).
    pub fn routes_events(&self, source: Source) -> bool {
        self.routing.router().takes(source)
    }

    /// Routes one system event (built by `hub_events`) after the operation it reports has
    /// committed. A failure to keep it is logged, not returned: the operation stands.
    pub(crate) async fn emit_event(&self, source: Source, message: Message) {
        let device_id = message.stamp.identity_key();
        if let Err(e) = self.route_messages(source, &device_id, vec![message]).await {
            tracing::warn!(source = source.as_str(), %device_id, "a system event was not kept: {}", e.message());
        }
    }

    /// Routes `messages` of one identity (`key`: a device id or `deviceId/moduleId`) from
    /// `source` and appends each to every endpoint its decision names, in order per endpoint;
    /// returns once every append is durable. Messages no route takes are dropped and counted,
    /// as IoT Hub drops them.
    pub(crate) async fn route_messages(
        &self,
        source: Source,
        key: &str,
        messages: Vec<Message>,
    ) -> Result<()> {
        let router = self.routing.router();
        let (device_id, _) = crate::record::split_identity(key);
        let twin = if router.needs_twin(source) {
            self.routing_twin(key).await?
        } else {
            None
        };
        let mut per_endpoint: Vec<(String, Vec<NewEvent>)> = Vec::new();
        for message in &messages {
            let decision = router.decide(source, message, twin.as_ref());
            for r in &decision.matched_routes {
                metrics::counter!("twinhub_route_matched_total", "route" => r.clone()).increment(1);
            }
            if decision.dropped() {
                metrics::counter!("twinhub_routing_dropped_total", "source" => source.as_str())
                    .increment(1);
                continue;
            }
            for d in &decision.deliveries {
                let data = if d.enrichments.is_empty() {
                    message.encode()
                } else {
                    let mut enriched = message.clone();
                    enrich(&mut enriched.application, &d.enrichments);
                    // IoT Hub drops a message that enrichment took over the limit.
                    if enriched.size() > MAX_MESSAGE_BYTES {
                        metrics::counter!("twinhub_routing_dropped_total", "source" => "enrichment-too-large")
                            .increment(1);
                        continue;
                    }
                    enriched.encode()
                };
                match per_endpoint.iter_mut().find(|(e, _)| *e == d.endpoint) {
                    Some((_, events)) => events.push(NewEvent::new(data)),
                    None => per_endpoint.push((d.endpoint.clone(), vec![NewEvent::new(data)])),
                }
            }
        }
        let appends = per_endpoint
            .into_iter()
            .map(|(endpoint, events)| async move {
                let log = self.endpoint_log(&endpoint).ok_or_else(|| {
                    Error::new(
                        ErrorCode::ServiceUnavailable,
                        format!("endpoint {endpoint} has no log"),
                    )
                })?;
                let count = events.len() as u64;
                let partition = partition_for(device_id, log.partition_count());
                log.append(partition, events)
                    .await
                    .map_err(crate::telemetry::log_error)?;
                metrics::counter!("twinhub_endpoint_messages_total", "endpoint" => endpoint)
                    .increment(count);
                Ok::<_, Error>(())
            });
        for result in futures_util::future::join_all(appends).await {
            result?;
        }
        Ok(())
    }
}

fn not_found(what: &str, name: &str) -> Error {
    Error::new(
        ErrorCode::InvalidOperation,
        format!("{what} {name} does not exist"),
    )
}

/// Adds enrichments as application properties. An enrichment replaces a property of the same
/// name the device sent: the hub's stamp is what a back end trusts (IoT Hub's documents do not
/// say; this is twinhub's choice).
fn enrich(props: &mut Vec<(String, Option<String>)>, enrichments: &[(String, String)]) {
    for (k, v) in enrichments {
        props.retain(|(name, _)| name != k);
        props.push((k.clone(), Some(v.clone())));
    }
}
