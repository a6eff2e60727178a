//! What the task sends and must see acknowledged: QoS 1 publishes from acceptance until
//! PUBACK (kept across reconnects and resent with DUP, under their original packet id), twin
//! requests until their answer, and the subscriptions each feature needs.

use std::collections::HashMap;

use bytes::Bytes;
use tokio::sync::oneshot;
use twinhub_mqtt::{Packet, Publish, QoS, SubAck, Subscribe, SubscribeReturnCode, Topic};
use twinhub_proto::topic::{self as iot, Subscription};

use super::conn::Conn;
use super::{Command, Task, TwinReply, TwinRequest, request_id};
use crate::error::{Error, Result};

/// QoS 1 publishes on the wire without PUBACK; more wait in the outbox.
const MAX_IN_FLIGHT: usize = 1000;
/// Abandoned entries are swept every this many accepted messages.
const SWEEP_EVERY: u64 = 1024;
/// The twin GET body the official SDKs send.
const TWIN_GET_BODY: &[u8] = b" ";

/// The subscriptions the client may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Feature {
    Methods = 0,
    TwinResponses = 1,
    DesiredPatches = 2,
}

pub(super) const FEATURES: [Feature; 3] = [
    Feature::Methods,
    Feature::TwinResponses,
    Feature::DesiredPatches,
];

impl Feature {
    pub fn subscription(self) -> Subscription {
        match self {
            Feature::Methods => Subscription::Methods,
            Feature::TwinResponses => Subscription::TwinResponses,
            Feature::DesiredPatches => Subscription::DesiredPatches,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Sub {
    /// The application uses the feature.
    pub wanted: bool,
    /// The hub holds the subscription (SUBACK seen, and the session survived since).
    pub active: bool,
    /// A SUBSCRIBE is out on the current connection.
    pub requested: bool,
}

/// What a packet identifier is in use for.
pub(super) enum PkidUse {
    Publish(u64),
    Subscribe(Vec<Feature>),
    Unsubscribe,
}

/// A QoS 1 publish from acceptance until PUBACK.
pub(super) struct Outgoing {
    topic: String,
    payload: Bytes,
    /// Assigned on first send and kept for redelivery, as MQTT requires.
    pkid: Option<u16>,
    /// Sent at least once: a resend carries DUP.
    sent: bool,
    /// Sent on the current connection.
    pub on_wire: bool,
    done: Option<oneshot::Sender<Result<()>>>,
    twin_rid: Option<String>,
    pub method_rid: Option<String>,
}

impl Outgoing {
    fn new(topic: String, payload: Bytes) -> Outgoing {
        Outgoing {
            topic,
            payload,
            pkid: None,
            sent: false,
            on_wire: false,
            done: None,
            twin_rid: None,
            method_rid: None,
        }
    }

    /// Never sent and nobody waits for it any more.
    fn abandoned(&self, twins: &HashMap<String, TwinWait>) -> bool {
        match &self.twin_rid {
            // An answered or abandoned twin request needs no (re)send.
            Some(rid) => !twins.contains_key(rid),
            None => !self.sent && self.done.as_ref().is_some_and(oneshot::Sender::is_closed),
        }
    }

    /// Reports the final outcome to whoever waits.
    pub fn fail(self, error: &Error) {
        if let Some(done) = self.done {
            let _ = done.send(Err(error.clone()));
        }
    }
}

/// A twin request awaiting its `$iothub/twin/res` answer.
pub(super) struct TwinWait {
    /// `None` for the task's own desired resync.
    pub reply: Option<oneshot::Sender<Result<TwinReply>>>,
    pub request: TwinRequest,
    /// Its outbox entry while not PUBACKed.
    seq: Option<u64>,
    /// Sent on the current connection: its answer may still come on it.
    pub asked: bool,
}

impl TwinWait {
    pub fn new(reply: Option<oneshot::Sender<Result<TwinReply>>>, request: TwinRequest) -> Self {
        TwinWait {
            reply,
            request,
            seq: None,
            asked: false,
        }
    }

    fn abandoned(&self) -> bool {
        self.reply.as_ref().is_some_and(oneshot::Sender::is_closed)
    }
}

impl Task {
    pub(super) fn sub(&mut self, feature: Feature) -> &mut Sub {
        &mut self.subs[feature as usize]
    }

    pub(super) fn has(&self, feature: Feature) -> bool {
        self.subs[feature as usize].active
    }

    /// Takes a command into the task's state; it goes out when the connection allows.
    pub(super) fn accept(&mut self, command: Command) {
        match command {
            Command::Publish(o) => {
                let mut outgoing = Outgoing::new(o.topic, o.payload);
                outgoing.done = o.done;
                outgoing.method_rid = o.method_rid;
                self.enqueue(outgoing);
            }
            Command::Twin { request, reply } => {
                self.sub(Feature::TwinResponses).wanted = true;
                let rid = request_id();
                self.twins
                    .insert(rid.clone(), TwinWait::new(Some(reply), request));
                self.queue_twin(rid);
            }
        }
    }

    fn enqueue(&mut self, outgoing: Outgoing) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outbox.insert(seq, outgoing);
        self.dirty = true;
        if seq % SWEEP_EVERY == SWEEP_EVERY - 1 {
            // While disconnected nothing else clears out what callers gave up on.
            self.sweep();
        }
        seq
    }

    /// Puts the twin request `rid` into the outbox.
    pub(super) fn queue_twin(&mut self, rid: String) {
        let Some(wait) = self.twins.get(&rid) else {
            return;
        };
        let (topic, payload) = match &wait.request {
            TwinRequest::Get => (iot::twin_get_topic(&rid), Bytes::from_static(TWIN_GET_BODY)),
            TwinRequest::PatchReported(body) => {
                (iot::twin_patch_reported_topic(&rid), body.clone())
            }
        };
        let mut outgoing = Outgoing::new(topic, payload);
        outgoing.twin_rid = Some(rid.clone());
        let seq = self.enqueue(outgoing);
        if let Some(wait) = self.twins.get_mut(&rid) {
            wait.seq = Some(seq);
        }
    }

    /// Drops twin requests and messages whose callers gave up before they were sent.
    fn sweep(&mut self) {
        self.twins.retain(|_, w| !w.abandoned());
        let twins = &self.twins;
        let pkids = &mut self.pkids;
        self.outbox.retain(|_, o| {
            let abandoned = o.abandoned(twins);
            if abandoned && let Some(pkid) = o.pkid {
                pkids.remove(&pkid);
            }
            !abandoned
        });
    }

    /// Prepares the outbox for a new connection: subscriptions start over (held ones stay
    /// held when the hub kept the session), everything unacknowledged goes out again, and
    /// twin requests that were acknowledged but not answered are asked again (same `$rid`):
    /// their answer was lost with the old connection.
    pub(super) fn reset_outbox(&mut self, session_present: bool) {
        self.pkids.retain(|_, u| matches!(u, PkidUse::Publish(_)));
        for sub in &mut self.subs {
            sub.requested = false;
            if !session_present {
                sub.active = false;
            }
        }
        self.sweep();
        for o in self.outbox.values_mut() {
            o.on_wire = false;
        }
        let mut requeue = Vec::new();
        for (rid, wait) in &mut self.twins {
            wait.asked = false;
            if wait.seq.is_none() {
                requeue.push(rid.clone());
            }
        }
        for rid in requeue {
            self.queue_twin(rid);
        }
        self.dirty = true;
    }

    fn alloc_pkid(&mut self) -> u16 {
        // MAX_IN_FLIGHT keeps far fewer than 65535 identifiers in use, so this ends quickly.
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid != 0 && !self.pkids.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Subscribes to what is wanted but not held, in one SUBSCRIBE.
    pub(super) fn ensure_subscriptions(&mut self, conn: &mut Conn) {
        let draining = conn.drain.is_some();
        let missing: Vec<Feature> = FEATURES
            .into_iter()
            .filter(|f| {
                let s = self.subs[*f as usize];
                // A renewal unsubscribed from methods on purpose; the next connection
                // subscribes again.
                let paused = draining && *f == Feature::Methods;
                s.wanted && !s.active && !s.requested && !paused
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        let mut filters = Vec::with_capacity(missing.len());
        for f in &missing {
            match Topic::new(f.subscription().filter()) {
                Ok(t) => filters.push((t, QoS::AtLeastOnce)),
                Err(e) => tracing::error!("invalid subscription filter: {e}"),
            }
        }
        let pkid = self.alloc_pkid();
        if conn
            .push(&Packet::Subscribe(Subscribe { pkid, filters }))
            .is_ok()
        {
            for f in &missing {
                self.sub(*f).requested = true;
            }
            self.pkids.insert(pkid, PkidUse::Subscribe(missing));
        }
    }

    /// Sends an UNSUBSCRIBE for `feature`; returns whether it went into the next write.
    pub(super) fn unsubscribe(&mut self, conn: &mut Conn, feature: Feature) -> bool {
        let Ok(filter) = Topic::new(feature.subscription().filter()) else {
            return false;
        };
        let pkid = self.alloc_pkid();
        let packet = Packet::Unsubscribe(twinhub_mqtt::Unsubscribe {
            pkid,
            filters: vec![filter],
        });
        if conn.push(&packet).is_err() {
            return false;
        }
        self.pkids.insert(pkid, PkidUse::Unsubscribe);
        let sub = self.sub(feature);
        sub.active = false;
        sub.requested = false;
        true
    }

    /// Whether `pkid` answers our UNSUBSCRIBE; frees it.
    pub(super) fn unsuback(&mut self, pkid: u16) -> bool {
        if matches!(self.pkids.get(&pkid), Some(PkidUse::Unsubscribe)) {
            self.pkids.remove(&pkid);
            return true;
        }
        false
    }

    /// Sends queued messages that may go now, in order, at most MAX_IN_FLIGHT unacknowledged.
    /// Twin requests wait until the hub will answer them (their subscription is held).
    /// During a renewal only method answers go out: the rest waits for the new connection.
    pub(super) fn send_outbox(&mut self, conn: &mut Conn) {
        let twin_ready = self.has(Feature::TwinResponses);
        let draining = conn.drain.is_some();
        let mut in_flight = self.outbox.values().filter(|o| o.pkid.is_some()).count();
        let ready: Vec<u64> = self
            .outbox
            .iter()
            .filter(|(_, o)| {
                !o.on_wire
                    && (o.twin_rid.is_none() || twin_ready)
                    && (!draining || o.method_rid.is_some())
            })
            .map(|(seq, _)| *seq)
            .collect();
        let mut failed = Vec::new();
        for seq in ready {
            let Some(assigned) = self.outbox.get(&seq).map(|o| o.pkid) else {
                continue;
            };
            let pkid = match assigned {
                Some(pkid) => pkid,
                None if in_flight >= MAX_IN_FLIGHT => break,
                None => {
                    let pkid = self.alloc_pkid();
                    self.pkids.insert(pkid, PkidUse::Publish(seq));
                    in_flight += 1;
                    pkid
                }
            };
            let Some(o) = self.outbox.get_mut(&seq) else {
                continue;
            };
            o.pkid = Some(pkid);
            let packet = Topic::new(o.topic.clone())
                .map_err(|e| Error::InvalidArgument(format!("invalid topic: {e}")))
                .map(|topic| {
                    Packet::Publish(Publish {
                        dup: o.sent,
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        topic,
                        pkid,
                        payload: o.payload.clone(),
                    })
                });
            match packet.and_then(|p| conn.push(&p)) {
                Ok(()) => {
                    o.sent = true;
                    o.on_wire = true;
                    if let Some(wait) = o.twin_rid.as_ref().and_then(|r| self.twins.get_mut(r)) {
                        wait.asked = true;
                    }
                }
                Err(e) => failed.push((seq, pkid, e)),
            }
        }
        for (seq, pkid, error) in failed {
            self.pkids.remove(&pkid);
            let Some(o) = self.outbox.remove(&seq) else {
                continue;
            };
            if let Some(rid) = &o.twin_rid
                && let Some(wait) = self.twins.remove(rid)
                && let Some(reply) = wait.reply
            {
                let _ = reply.send(Err(error.clone()));
            }
            o.fail(&error);
        }
    }

    pub(super) fn puback(&mut self, conn: &mut Conn, pkid: u16) {
        let Some(PkidUse::Publish(seq)) = self.pkids.get(&pkid) else {
            return;
        };
        let seq = *seq;
        self.pkids.remove(&pkid);
        let Some(o) = self.outbox.remove(&seq) else {
            return;
        };
        if let Some(done) = o.done {
            let _ = done.send(Ok(()));
        }
        if let Some(rid) = o.twin_rid
            && let Some(wait) = self.twins.get_mut(&rid)
        {
            wait.seq = None;
        }
        if let Some(rid) = o.method_rid {
            conn.methods_outstanding.remove(&rid);
        }
        // A slot in the in-flight window opened.
        self.dirty = true;
    }

    /// Marks the acknowledged features held; returns those just gained.
    pub(super) fn suback(&mut self, ack: SubAck) -> Vec<Feature> {
        let Some(PkidUse::Subscribe(features)) = self.pkids.remove(&ack.pkid) else {
            return Vec::new();
        };
        for (i, f) in features.iter().enumerate() {
            if matches!(ack.return_codes.get(i), Some(SubscribeReturnCode::Failure)) {
                // IoT Hub's SDKs carry on too; the feature then simply receives nothing.
                tracing::warn!(filter = %f.subscription().filter(), "the hub refused a subscription");
            }
            let sub = self.sub(*f);
            sub.requested = false;
            sub.active = true;
        }
        self.dirty = true;
        features
    }

    /// Whether anything sent on this connection still waits for the hub: a PUBACK or a
    /// twin answer. A renewal waits for these so nothing has to be sent twice.
    pub(super) fn awaiting_hub(&self) -> bool {
        self.outbox.values().any(|o| o.on_wire) || self.twins.values().any(|w| w.asked)
    }

    /// Fails every waiting operation with `error` (the task is ending).
    pub(super) fn fail_all(&mut self, error: &Error) {
        for (_, o) in std::mem::take(&mut self.outbox) {
            o.fail(error);
        }
        for (_, w) in std::mem::take(&mut self.twins) {
            if let Some(reply) = w.reply {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}
