//! Desired-property delivery: patches go to the application's stream in version order, each
//! version once. Whenever the subscription is (re)gained or a new stream opens, the task reads
//! the twin; if the desired version moved past what the stream has seen (or the stream is
//! new), the whole document goes out first (`full`), and patches that arrived meanwhile
//! follow it.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::mpsc::error::TrySendError;

use super::outbox::TwinWait;
use super::{Task, TwinReply, TwinRequest, request_id};
use crate::device::messages::{DesiredPatch, DeviceTwin, take_version};

/// Desired-property bookkeeping across connections.
#[derive(Default)]
pub(super) struct DesiredSync {
    /// The stream generation this state belongs to.
    pub generation: u64,
    /// The highest version handed to the current stream.
    pub delivered: Option<u64>,
    /// The `$rid` of the twin read in flight.
    pub resync: Option<String>,
    /// A twin read was answered since the stream opened: patches need not wait for one.
    pub synced: bool,
    /// Patches that arrived while the read is out, delivered after it.
    pub held: Vec<(u64, Map<String, Value>)>,
}

impl DesiredSync {
    /// A new stream: it starts with the whole document.
    pub fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.delivered = None;
        self.synced = false;
        self.held.clear();
    }
}

impl Task {
    /// Reads the twin to learn the desired version, holding patches until the answer.
    pub(super) fn start_resync(&mut self) {
        if let Some(old) = self.desired.resync.take() {
            self.twins.remove(&old);
        }
        let rid = request_id();
        self.twins
            .insert(rid.clone(), TwinWait::new(None, TwinRequest::Get));
        self.desired.resync = Some(rid.clone());
        self.queue_twin(rid);
    }

    /// Forgets an unanswered read (its connection is gone); the caller starts a new one.
    pub(super) fn abandon_resync(&mut self) {
        if let Some(rid) = self.desired.resync.take() {
            self.twins.remove(&rid);
        }
    }

    pub(super) fn resync_answer(&mut self, reply: TwinReply) {
        self.desired.resync = None;
        self.desired.synced = true;
        if reply.status >= 300 {
            tracing::warn!(
                status = reply.status,
                "reading the twin to resynchronise desired properties failed"
            );
        } else {
            match DeviceTwin::parse(&reply.payload) {
                Ok(twin) => {
                    if self
                        .desired
                        .delivered
                        .is_none_or(|d| twin.desired_version > d)
                    {
                        self.emit(DesiredPatch {
                            version: twin.desired_version,
                            patch: twin.desired,
                            full: true,
                        });
                    }
                }
                Err(e) => tracing::warn!("the twin read for resynchronisation is unusable: {e}"),
            }
        }
        let mut held = std::mem::take(&mut self.desired.held);
        held.sort_by_key(|(version, _)| *version);
        for (version, patch) in held {
            self.deliver(version, patch);
        }
    }

    /// Whether the stream had fallen behind and now has room again (clears the flag): the
    /// caller then reads the twin, whose whole document replaces what was dropped.
    pub(super) fn desired_caught_up(&mut self) -> bool {
        if !self.shared.desired_lagging.load(Ordering::Relaxed) {
            return false;
        }
        let room = self
            .shared
            .dispatch()
            .desired
            .as_ref()
            .is_some_and(|tx| tx.capacity() >= tx.max_capacity() / 2);
        if room {
            self.shared.desired_lagging.store(false, Ordering::Relaxed);
        }
        room
    }

    /// A patch notification from the hub.
    pub(super) fn desired_patch(&mut self, topic_version: Option<u64>, payload: &Bytes) {
        if self.shared.dispatch().desired.is_none() {
            return;
        }
        if self.shared.desired_lagging.load(Ordering::Relaxed) {
            // Dropped: the whole document follows once the application reads again.
            return;
        }
        let parsed = match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(mut map)) => {
                let version = take_version(&mut map).or(topic_version);
                version.map(|v| (v, map))
            }
            _ => None,
        };
        // A new stream gets its whole document first (a resumed session can deliver patches
        // before the SUBACK that triggers the read); later reads also hold patches back.
        let hold = self.desired.resync.is_some() || !self.desired.synced;
        match parsed {
            Some((version, patch)) if hold => self.desired.held.push((version, patch)),
            Some((version, patch)) => self.deliver(version, patch),
            None => {
                // Cannot order or apply it: read the whole document instead.
                tracing::warn!("unusable desired-property patch; reading the twin instead");
                self.start_resync();
            }
        }
    }

    /// Hands a patch to the application unless it already has that version.
    fn deliver(&mut self, version: u64, patch: Map<String, Value>) {
        if self.desired.delivered.is_some_and(|d| version <= d) {
            return;
        }
        self.emit(DesiredPatch {
            version,
            patch,
            full: false,
        });
    }

    fn emit(&mut self, patch: DesiredPatch) {
        let version = patch.version;
        let mut dispatch = self.shared.dispatch();
        let Some(tx) = dispatch.desired.as_ref() else {
            return;
        };
        match tx.try_send(patch) {
            Ok(()) => self.desired.delivered = Some(version),
            Err(TrySendError::Full(_)) => {
                // The application reads too slowly: drop rather than buffer without bound.
                if !self.shared.desired_lagging.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        version,
                        "the application is more than {} desired patches behind; it will get the whole document when it reads again",
                        crate::device::DESIRED_QUEUE
                    );
                }
            }
            // The application dropped the stream.
            Err(TrySendError::Closed(_)) => dispatch.desired = None,
        }
    }
}
