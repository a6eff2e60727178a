//! The cluster bus on NATS: core's [`ClusterBus`] for hub nodes sharing one store. Each node
//! listens on its own subjects under `twinhub.<hub>.`: `node.<id>.invoke` (request/reply: a
//! direct method run on a session held there), `node.<id>.notice` (desired patches and session
//! takeovers for it) and `all` (notices for every node: twins changed, identities disabled),
//! and answers `node.<id>.ping` so that a second node cannot start under a name in use.
//! Collaborators: core's `cluster` module (what the messages mean) and the server, which
//! connects the bus before the hub opens and serves it after.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use twinhub_core::Hub;
use twinhub_core::cluster::{ClusterBus, ForwardError, Notice, RemoteMethod, RemoteOutcome};

/// How long connecting, and the check that the node name is free, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the name check waits for a node already using it to answer.
const PING_WAIT: Duration = Duration::from_millis(500);

/// Why the bus could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid cluster setting: {0}")]
    Invalid(String),
    #[error("cannot reach NATS at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error(
        "another node of hub '{hub}' already runs as '{node}'; give this one its own --node-id"
    )]
    NodeIdInUse { hub: String, node: String },
    #[error("NATS refused a subscription: {0}")]
    Subscribe(String),
}

/// How long after (re)connecting to NATS a missing responder is not taken as a node gone: the
/// other nodes may still be resubscribing.
const SETTLE: Duration = Duration::from_secs(5);
/// How long a node found without responders is given before it is asked again.
const RECHECK: Duration = Duration::from_millis(500);

/// A node's connection to the others.
pub struct NatsBus {
    client: async_nats::Client,
    /// `twinhub.<hub token>`.
    prefix: String,
    node: String,
    /// When the client last (re)connected.
    connected_at: Arc<std::sync::Mutex<std::time::Instant>>,
}

/// A name as one subject token (a hub's, or a hostname for a default node id): letters,
/// digits, `-` and `_` kept, anything else `_`.
pub fn token(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Node names become subject tokens as they are, so only those characters are accepted.
pub fn validate_node_id(node: &str) -> Result<(), Error> {
    if node.is_empty()
        || node.len() > 64
        || !node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::Invalid(format!(
            "node id '{node}' must be 1 to 64 letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

impl NatsBus {
    /// Connects to NATS as node `node` of hub `hub`, and checks that no live node uses the
    /// same name.
    pub async fn connect(url: &str, hub: &str, node: &str) -> Result<Arc<NatsBus>, Error> {
        validate_node_id(node)?;
        let unreachable = |reason: String| Error::Unreachable {
            url: url.to_owned(),
            reason,
        };
        let connected_at = Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
        let on_event = connected_at.clone();
        let client = tokio::time::timeout(
            CONNECT_TIMEOUT,
            async_nats::ConnectOptions::new()
                .name(format!("twinhub node {node}"))
                .event_callback(move |event| {
                    let on_event = on_event.clone();
                    async move {
                        if matches!(event, async_nats::Event::Connected) {
                            *on_event.lock().unwrap_or_else(|e| e.into_inner()) =
                                std::time::Instant::now();
                        }
                    }
                })
                // Nodes keep retrying a NATS server that restarts; callers see failed
                // forwards meanwhile, never a hang.
                .retry_on_initial_connect()
                .connect(url),
        )
        .await
        .map_err(|_| unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
        let bus = NatsBus {
            client,
            prefix: format!("twinhub.{}", token(hub)),
            node: node.to_owned(),
            connected_at,
        };
        let ping = async_nats::Request::new()
            .payload(Bytes::new())
            .timeout(Some(PING_WAIT));
        match bus
            .client
            .send_request(bus.subject(node, "ping"), ping)
            .await
        {
            Ok(_) => {
                return Err(Error::NodeIdInUse {
                    hub: hub.to_owned(),
                    node: node.to_owned(),
                });
            }
            Err(e) => match e.kind() {
                async_nats::client::RequestErrorKind::NoResponders
                | async_nats::client::RequestErrorKind::TimedOut => {}
                _ => return Err(unreachable(e.to_string())),
            },
        }
        Ok(Arc::new(bus))
    }

    fn subject(&self, node: &str, what: &str) -> String {
        format!("{}.node.{node}.{what}", self.prefix)
    }

    fn all(&self) -> String {
        format!("{}.all", self.prefix)
    }

    /// Serves the other nodes' requests and notices with `hub` until `shutdown`. Method calls
    /// run concurrently (each waits for its device); notices are handled one at a time in
    /// the order they came, so that twin refreshes never go back in time.
    pub async fn serve(
        self: &Arc<Self>,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<(), Error> {
        let subscribe = |subject: String| {
            let client = self.client.clone();
            async move {
                client
                    .subscribe(subject)
                    .await
                    .map_err(|e| Error::Subscribe(e.to_string()))
            }
        };
        let mut invokes = subscribe(self.subject(&self.node, "invoke")).await?;
        let mut pings = subscribe(self.subject(&self.node, "ping")).await?;
        let notices = subscribe(self.subject(&self.node, "notice")).await?;
        let broadcasts = subscribe(self.all()).await?;
        // The subscriptions must be in place before other nodes are told this one exists.
        let _ = self.client.flush().await;

        let calls = tracker.clone();
        tracker.spawn({
            let bus = self.clone();
            let hub = hub.clone();
            let shutdown = shutdown.clone();
            async move {
                loop {
                    let message = tokio::select! {
                        m = invokes.next() => m,
                        _ = shutdown.cancelled() => break,
                    };
                    let Some(message) = message else { break };
                    let (bus, hub) = (bus.clone(), hub.clone());
                    calls.spawn(async move { bus.answer_invoke(&hub, message).await });
                }
            }
        });
        tracker.spawn({
            let bus = self.clone();
            let shutdown = shutdown.clone();
            async move {
                loop {
                    let message = tokio::select! {
                        m = pings.next() => m,
                        _ = shutdown.cancelled() => break,
                    };
                    let Some(message) = message else { break };
                    if let Some(reply) = message.reply {
                        let _ = bus.client.publish(reply, Bytes::new()).await;
                    }
                }
            }
        });
        tracker.spawn({
            let shutdown = shutdown.clone();
            let mut merged = futures_util::stream::select(notices, broadcasts);
            async move {
                loop {
                    let message = tokio::select! {
                        m = merged.next() => m,
                        _ = shutdown.cancelled() => break,
                    };
                    let Some(message) = message else { break };
                    match serde_json::from_slice::<Notice>(&message.payload) {
                        Ok(notice) => hub.on_notice(notice).await,
                        Err(e) => tracing::warn!(
                            subject = %message.subject,
                            "a cluster notice could not be read: {e}"
                        ),
                    }
                }
            }
        });
        Ok(())
    }

    async fn answer_invoke(&self, hub: &Hub, message: async_nats::Message) {
        let Some(reply) = message.reply else { return };
        let outcome = match serde_json::from_slice::<RemoteMethod>(&message.payload) {
            Ok(call) => hub.serve_remote_method(call).await,
            Err(e) => {
                RemoteOutcome::server_error(format!("the forwarded call could not be read: {e}"))
            }
        };
        let body = serde_json::to_vec(&outcome).unwrap_or_default();
        if let Err(e) = self.client.publish(reply, Bytes::from(body)).await {
            tracing::warn!("answering a forwarded method call failed: {e}");
        }
    }

    async fn publish(&self, subject: String, notice: &Notice) {
        let body = serde_json::to_vec(notice).unwrap_or_default();
        if let Err(e) = self.client.publish(subject, Bytes::from(body)).await {
            tracing::warn!("a cluster notice could not be sent: {e}");
        }
    }
}

#[async_trait]
impl ClusterBus for NatsBus {
    fn node_id(&self) -> &str {
        &self.node
    }

    async fn invoke_method(
        &self,
        node: &str,
        call: &RemoteMethod,
        wait: Duration,
    ) -> Result<RemoteOutcome, ForwardError> {
        let body = serde_json::to_vec(call).map_err(|e| ForwardError::Failed(e.to_string()))?;
        let request = async_nats::Request::new()
            .payload(Bytes::from(body))
            .timeout(Some(wait));
        let answer = match self
            .client
            .send_request(self.subject(node, "invoke"), request)
            .await
        {
            Ok(answer) => answer,
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
                return Err(if self.node_gone(node).await {
                    ForwardError::NodeGone
                } else {
                    ForwardError::Failed(format!("node {node} did not take the call"))
                });
            }
            Err(e) => return Err(ForwardError::Failed(e.to_string())),
        };
        serde_json::from_slice(&answer.payload)
            .map_err(|e| ForwardError::Failed(format!("unreadable answer: {e}")))
    }

    async fn notify(&self, node: &str, notice: &Notice) {
        self.publish(self.subject(node, "notice"), notice).await;
    }

    async fn broadcast(&self, notice: &Notice) {
        self.publish(self.all(), notice).await;
    }

    /// Gone only when this node's own connection has settled (after a NATS restart every node
    /// resubscribes, and for a moment none answers) and the node does not answer a ping, nor
    /// another one a moment later.
    async fn node_gone(&self, node: &str) -> bool {
        let since = *self.connected_at.lock().unwrap_or_else(|e| e.into_inner());
        if since.elapsed() < SETTLE || self.health().is_err() {
            return false;
        }
        tokio::time::sleep(RECHECK).await;
        let ping = async_nats::Request::new()
            .payload(Bytes::new())
            .timeout(Some(PING_WAIT));
        match self
            .client
            .send_request(self.subject(node, "ping"), ping)
            .await
        {
            Ok(_) => false,
            Err(e) => e.kind() == async_nats::client::RequestErrorKind::NoResponders,
        }
    }

    fn health(&self) -> Result<(), String> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(format!("NATS is {state}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_subject_tokens() {
        assert_eq!(token("127.0.0.5"), "127_0_0_5");
        assert_eq!(token("hub-1_a"), "hub-1_a");
        assert!(validate_node_id("node-1").is_ok());
        for bad in ["", "a.b", "a b", "a*", ">", &"x".repeat(65)] {
            assert!(validate_node_id(bad).is_err(), "{bad:?}");
        }
    }
}
