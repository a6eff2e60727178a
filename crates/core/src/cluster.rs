//! The hub as one node of a cluster sharing one store: which node holds an identity's session
//! (the `node` its record names, written with the durable CONNECT), and what nodes ask of each
//! other through a [`ClusterBus`]: invoke a direct method on a session held there, push a
//! desired patch, close a session another node took over, refresh twins another node changed.
//! The bus's transport (NATS) lives outside core, in `twinhub-cluster-nats`; a single node has
//! no bus and none of this runs.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use twinhub_proto::error::ErrorCode;
use twinhub_store::Table;

use crate::directory::{CloseReason, MethodResponse};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::methods::MethodCall;

/// A direct-method call forwarded to the node holding the identity's session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteMethod {
    pub identity: String,
    pub method_name: String,
    /// The request payload, JSON text.
    pub payload: String,
    pub response_timeout_ms: u64,
    pub connect_timeout_ms: u64,
}

/// How a forwarded call ended on the node that ran it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum RemoteOutcome {
    /// The device answered.
    Answer { status: i32, payload: String },
    /// The hub refused or the device did not answer: IoT Hub's error code and message.
    Failed { code: u32, message: String },
}

/// What one node tells another (or all), without waiting for an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "notice", rename_all = "camelCase")]
pub enum Notice {
    /// A committed desired patch (with its `$version`) for the identity's session there.
    Desired {
        identity: String,
        version: u64,
        patch: String,
    },
    /// The identity signed in on `node`: any older session of it elsewhere is closed.
    Connected { identity: String, node: String },
    /// The identity was disabled or deleted: its session is closed wherever it is.
    Disabled { identity: String },
    /// Records of these identities changed on `node`: the others re-read them for their twin
    /// index, so queries on every node see every node's writes.
    Changed { node: String, keys: Vec<String> },
    /// A cloud-to-device message was queued for the identity's session there.
    C2dQueued { identity: String },
    /// Delivery feedback was written: feedback receivers read the store again.
    FeedbackQueued,
    /// A job was created on a node that does not run jobs: the leader starts it.
    JobCreated { job_id: String },
    /// A job is to be cancelled: the node running it flips its switch.
    CancelJob { job_id: String },
}

/// Why a forwarded call got no outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardError {
    /// No node of that name is running (it stopped or died): its sessions are gone.
    NodeGone,
    /// The node did not answer in time, or the bus failed; the reason is for logs.
    Failed(String),
}

/// The transport between the nodes of a cluster.
#[async_trait]
pub trait ClusterBus: Send + Sync + 'static {
    /// This node's name, unique in the cluster.
    fn node_id(&self) -> &str;

    /// Runs `call` on `node` and waits up to `wait` for its outcome.
    async fn invoke_method(
        &self,
        node: &str,
        call: &RemoteMethod,
        wait: Duration,
    ) -> std::result::Result<RemoteOutcome, ForwardError>;

    /// Sends `notice` to `node`, best effort.
    async fn notify(&self, node: &str, notice: &Notice);

    /// Sends `notice` to every other node, best effort.
    async fn broadcast(&self, notice: &Notice);

    /// Whether `node` is gone (no longer running), as sure as the bus can tell; `false` when
    /// in doubt.
    async fn node_gone(&self, _node: &str) -> bool {
        false
    }

    /// Whether the bus reaches the others now; `Err` says why (for `/health`).
    fn health(&self) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// Margin over a forwarded call's own timeouts for the hop between nodes.
const FORWARD_MARGIN: Duration = Duration::from_secs(5);
/// How often a cluster node looks in the store for an identity that is connected nowhere yet,
/// while a method call waits for it (its own sessions wake the wait at once).
const PRESENCE_POLL: Duration = Duration::from_millis(200);

impl RemoteOutcome {
    /// A failure of the hub itself (IoT Hub's 500001), for a call that could not be run.
    pub fn server_error(message: String) -> RemoteOutcome {
        RemoteOutcome::Failed {
            code: ErrorCode::ServerError.code(),
            message,
        }
    }

    fn of(result: Result<MethodResponse>) -> RemoteOutcome {
        match result {
            Ok(answer) => RemoteOutcome::Answer {
                status: answer.status,
                payload: String::from_utf8_lossy(&answer.payload).into_owned(),
            },
            Err(e) => RemoteOutcome::Failed {
                code: e.code().code(),
                message: e.message().to_owned(),
            },
        }
    }

    fn into_result(self) -> Result<MethodResponse> {
        match self {
            RemoteOutcome::Answer { status, payload } => Ok(MethodResponse {
                status,
                payload: Bytes::from(payload),
            }),
            RemoteOutcome::Failed { code, message } => Err(Error::new(
                ErrorCode::from_code(code).unwrap_or(ErrorCode::ServerError),
                message,
            )),
        }
    }
}

impl Hub {
    /// The cluster bus, when this hub is one node of several.
    pub(crate) fn cluster(&self) -> Option<&Arc<dyn ClusterBus>> {
        self.cluster.as_ref()
    }

    /// The other node holding `node`'s session, if the record names one that is not this.
    pub(crate) fn remote_node<'a>(&self, node: Option<&'a str>) -> Option<&'a str> {
        let me = self.cluster()?.node_id();
        node.filter(|n| *n != me)
    }

    /// Forwards a method call to `node` and maps its outcome back; a node that cannot be
    /// reached holds no session anyone can use (IoT Hub's 404103).
    pub(crate) async fn invoke_remote(
        &self,
        node: &str,
        identity: &str,
        call: &MethodCall,
        connect_timeout: Duration,
    ) -> Result<MethodResponse> {
        let Some(bus) = self.cluster() else {
            return Err(crate::methods::not_online(identity));
        };
        let remote = RemoteMethod {
            identity: identity.to_owned(),
            method_name: call.method_name.clone(),
            payload: String::from_utf8_lossy(&call.payload).into_owned(),
            response_timeout_ms: call.response_timeout.as_millis() as u64,
            connect_timeout_ms: connect_timeout.as_millis() as u64,
        };
        // With the bus down no node can be reached: said at once, as the hub's own outage.
        if let Err(reason) = bus.health() {
            return Err(Error::new(
                ErrorCode::ServiceUnavailable,
                format!("The hub cannot reach its other nodes now ({reason}); retry later"),
            ));
        }
        let wait = call.response_timeout + connect_timeout + FORWARD_MARGIN;
        match bus.invoke_method(node, &remote, wait).await {
            Ok(outcome) => outcome.into_result(),
            Err(ForwardError::NodeGone) => {
                // The record still names a node that is no longer running (killed before its
                // devices' disconnects were written): nobody holds the session.
                self.forget_gone_node(identity, node).await;
                Err(crate::methods::not_online(identity))
            }
            Err(ForwardError::Failed(reason)) => {
                tracing::warn!(node, identity, "forwarding a method call failed: {reason}");
                Err(Error::new(
                    ErrorCode::ServiceUnavailable,
                    format!(
                        "The hub could not reach the node holding the session of '{identity}'; retry later"
                    ),
                ))
            }
        }
    }

    /// Clears the records naming `node` (this node when `None`) as holding their sessions.
    pub(crate) async fn forget_sessions_of_node(&self, node: Option<&str>) {
        let Some(bus) = self.cluster() else { return };
        let node = node.unwrap_or(bus.node_id()).to_owned();
        for (key, holder) in self.twin_index.sessions() {
            if *holder == *node {
                self.forget_gone_node(&key, &node).await;
            }
        }
    }

    /// Clears the sessions of nodes that are gone (killed without writing their devices'
    /// disconnects), so their devices stop showing connected (run by the lease holder).
    pub(crate) async fn sweep_gone_nodes(&self) {
        let Some(bus) = self.cluster() else { return };
        let me = bus.node_id();
        let nodes: std::collections::BTreeSet<Arc<str>> = self
            .twin_index
            .sessions()
            .into_iter()
            .map(|(_, node)| node)
            .filter(|node| &**node != me)
            .collect();
        for node in nodes {
            if bus.node_gone(&node).await {
                tracing::warn!(node = %node, "a node is gone: its devices' sessions are cleared");
                self.forget_sessions_of_node(Some(&node)).await;
            }
        }
    }

    /// Clears an identity's record of a session on `node`, a node found gone, unless the
    /// record changed meanwhile (the device signed in again somewhere).
    async fn forget_gone_node(&self, identity: &str, node: &str) {
        let table = crate::record::table_of(identity);
        let Ok(Some(bytes)) = self.store.get(table, identity).await else {
            return;
        };
        let Ok(mut rec) = crate::record::DeviceRecord::decode(&bytes) else {
            return;
        };
        if rec.node.as_deref() != Some(node) {
            return;
        }
        rec.node = None;
        let expect = twinhub_store::Expect::holds(table, identity, bytes);
        match self
            .store
            .commit_checked(vec![expect], vec![rec.write()])
            .await
        {
            Ok(_) => tracing::info!(node, identity, "cleared a session of a node that is gone"),
            Err(e) => tracing::warn!(node, identity, "clearing a gone node's session failed: {e}"),
        }
    }

    /// Serves a method call another node forwarded here: only this node's sessions count, so
    /// a call never travels twice.
    pub async fn serve_remote_method(&self, call: RemoteMethod) -> RemoteOutcome {
        let local = MethodCall {
            method_name: call.method_name,
            payload: Bytes::from(call.payload),
            response_timeout: Duration::from_millis(call.response_timeout_ms),
            connect_timeout: Duration::from_millis(call.connect_timeout_ms),
        };
        RemoteOutcome::of(self.invoke_local(&call.identity, local).await)
    }

    /// Acts on a notice from another node.
    pub async fn on_notice(self: &Arc<Self>, notice: Notice) {
        match notice {
            Notice::JobCreated { job_id } => {
                if *self.jobs.leading.borrow() {
                    self.spawn_job(job_id);
                }
            }
            Notice::CancelJob { job_id } => {
                self.cancel_running_job(&job_id);
            }
            Notice::C2dQueued { identity } => {
                // The session's next receive reads the queue from the store.
                self.c2d.wake(&identity);
            }
            Notice::FeedbackQueued => self.c2d.feedback_ready.notify_waiters(),
            Notice::Desired {
                identity,
                version,
                patch,
            } => {
                self.push_desired_payload(&identity, version, Bytes::from(patch));
            }
            Notice::Connected { identity, node } => {
                if self.remote_node(Some(&node)).is_some() {
                    self.close_device_session(&identity, CloseReason::ReplacedByNewConnection);
                }
            }
            Notice::Disabled { identity } => {
                self.close_device_session(&identity, CloseReason::DeviceDisabled);
            }
            Notice::Changed { node, keys } => {
                if self.remote_node(Some(&node)).is_none() {
                    return;
                }
                for key in keys {
                    let table = crate::record::table_of(&key);
                    match self.store.get(table, &key).await {
                        Ok(value) => self.twin_index.refresh(table, key, value),
                        Err(e) => tracing::warn!(
                            %key,
                            "a twin another node changed could not be read for the index: {e}"
                        ),
                    }
                }
            }
        }
    }

    /// Whether the cluster bus works, when this hub is one node of a cluster.
    pub fn cluster_health(&self) -> Option<std::result::Result<(), String>> {
        self.cluster.as_ref().map(|bus| bus.health())
    }

    /// Whether the identity has a session on this node, or, in a cluster, on any node.
    pub(crate) fn connected_anywhere(&self, key: &str, node: Option<&str>) -> bool {
        self.directory.is_connected(key) || (self.cluster.is_some() && node.is_some())
    }

    /// Waits, in a cluster, for the identity's session to appear on this node (its directory
    /// wakes the wait) or on another (seen in the store every [`PRESENCE_POLL`]).
    pub(crate) fn presence_poll(&self) -> Option<Duration> {
        self.cluster.as_ref().map(|_| PRESENCE_POLL)
    }
}

/// A cluster's registry, counted from the shared store.
pub(crate) struct ClusterCounts {
    pub total: u64,
    pub enabled: u64,
    /// Devices whose record names a node holding their session.
    pub connected: u64,
}

impl Hub {
    /// Counts every device record in the store: a scan, so its cost grows with the registry
    /// (about a second per 100,000 devices); statistics are not on any device's path.
    pub(crate) async fn cluster_counts(&self) -> Result<ClusterCounts> {
        let mut counts = ClusterCounts {
            total: 0,
            enabled: 0,
            connected: 0,
        };
        self.for_each_entry(Table::Devices, |_, bytes| {
            let Ok(rec) = crate::record::DeviceRecord::decode(&bytes) else {
                return;
            };
            counts.total += 1;
            if rec.status == twinhub_proto::model::DeviceStatus::Enabled {
                counts.enabled += 1;
            }
            if rec.node.is_some() {
                counts.connected += 1;
            }
        })
        .await?;
        Ok(counts)
    }
}

/// The keys of twin records in a batch, for [`Notice::Changed`].
pub(crate) fn changed_keys(writes: &[twinhub_store::Write]) -> Vec<String> {
    writes
        .iter()
        .filter(|w| matches!(w.table, Table::Devices | Table::Modules))
        .map(|w| w.key.clone())
        .collect()
}
