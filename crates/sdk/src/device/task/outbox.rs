//! What the task sends and must see acknowledged: QoS 1 publishes from acceptance until
//! PUBACK (kept across reconnects and resent with DUP, under their original packet id), twin
//! requests until their answer, and the subscriptions each feature needs.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use tokio::sync::oneshot;
use twinhub_mqtt::{Packet, Publish, QoS, SubAck, Subscribe, SubscribeReturnCode, Topic};
use twinhub_proto::topic::{self as iot, Subscription};

use super::conn::Conn;
use super::{Command, Task, TwinReply, TwinRequest, request_id};
use crate::error::{Error, Result};

/// QoS 1 publishes on the wire without PUBACK; more wait in the outbox.
const MAX_IN_FLIGHT: usize = 1000;
/// Abandoned entries are swept after this many accepted messages at the least.
const SWEEP_EVERY: usize = 1024;
/// The twin GET body the official SDKs send.
const TWIN_GET_BODY: &[u8] = b" ";

/// The subscriptions the client may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Feature {
    Methods = 0,
    TwinResponses = 1,
    DesiredPatches = 2,
    CloudToDevice = 3,
}

pub(super) const FEATURES: [Feature; 4] = [
    Feature::Methods,
    Feature::TwinResponses,
    Feature::DesiredPatches,
    Feature::CloudToDevice,
];

impl Feature {
    pub fn subscription(self, device_id: &str) -> Subscription {
        match self {
            Feature::Methods => Subscription::Methods,
            Feature::TwinResponses => Subscription::TwinResponses,
            Feature::DesiredPatches => Subscription::DesiredPatches,
            Feature::CloudToDevice => Subscription::CloudToDevice {
                device_id: device_id.to_owned(),
            },
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
struct Outgoing {
    topic: String,
    payload: Bytes,
    /// Assigned on first send and kept for redelivery, as MQTT requires.
    pkid: Option<u16>,
    /// Sent at least once: a resend carries DUP.
    sent: bool,
    /// Sent on the current connection.
    on_wire: bool,
    done: Option<oneshot::Sender<Result<()>>>,
    twin_rid: Option<String>,
    method_rid: Option<String>,
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

    fn kind(&self) -> Kind {
        if self.twin_rid.is_some() {
            Kind::Twin
        } else if self.method_rid.is_some() {
            Kind::MethodAnswer
        } else {
            Kind::Event
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
    fn fail(self, error: &Error) {
        if let Some(done) = self.done {
            let _ = done.send(Err(error.clone()));
        }
    }
}

/// What an outbox entry is; each kind may be held back for a reason of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Telemetry.
    Event = 0,
    /// A twin request: waits until the hub will answer it.
    Twin = 1,
    /// A direct-method answer: the only kind a renewal still lets out.
    MethodAnswer = 2,
}

/// The publishes awaiting PUBACK in acceptance order, indexed so that sending and
/// acknowledging never walk the whole backlog: counters for the in-flight window and what is
/// on the wire, and per kind the entries not yet sent on the current connection.
#[derive(Default)]
pub(super) struct Outbox {
    entries: BTreeMap<u64, Outgoing>,
    /// Not sent on the current connection, by [`Kind`].
    unsent: [BTreeSet<u64>; 3],
    /// Entries holding a packet identifier: the in-flight window.
    with_pkid: usize,
    /// Entries sent on the current connection.
    on_wire: usize,
    /// Entries added since the last sweep.
    since_sweep: usize,
}

impl Outbox {
    /// Adds a message that was never sent.
    fn insert(&mut self, seq: u64, outgoing: Outgoing) {
        self.unsent[outgoing.kind() as usize].insert(seq);
        self.entries.insert(seq, outgoing);
        self.since_sweep += 1;
    }

    /// Whether enough was added to pay for a sweep, which walks every entry: waiting for as
    /// many additions as there are entries keeps sweeping linear in what is accepted.
    fn sweep_due(&mut self) -> bool {
        let due = self.since_sweep >= SWEEP_EVERY.max(self.entries.len());
        if due {
            self.since_sweep = 0;
        }
        due
    }

    fn remove(&mut self, seq: u64) -> Option<Outgoing> {
        let o = self.entries.remove(&seq)?;
        self.unsent[o.kind() as usize].remove(&seq);
        self.with_pkid = self.with_pkid.saturating_sub(usize::from(o.pkid.is_some()));
        self.on_wire = self.on_wire.saturating_sub(usize::from(o.on_wire));
        Some(o)
    }

    /// Removes and returns every entry `remove` picks.
    fn remove_where(&mut self, mut remove: impl FnMut(&Outgoing) -> bool) -> Vec<Outgoing> {
        let picked: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, o)| remove(o))
            .map(|(seq, _)| *seq)
            .collect();
        picked
            .into_iter()
            .filter_map(|seq| self.remove(seq))
            .collect()
    }

    /// Empties the outbox.
    fn take_all(&mut self) -> impl Iterator<Item = Outgoing> + use<> {
        std::mem::take(self).entries.into_values()
    }

    /// A new connection: nothing is on its wire, so everything waits to be sent again.
    fn new_connection(&mut self) {
        self.on_wire = 0;
        for set in &mut self.unsent {
            set.clear();
        }
        for (seq, o) in &mut self.entries {
            o.on_wire = false;
            self.unsent[o.kind() as usize].insert(*seq);
        }
    }

    /// The oldest entry not sent on this connection among the kinds that may go now.
    fn next_unsent(&self, may_go: impl Fn(Kind) -> bool) -> Option<u64> {
        [Kind::Event, Kind::Twin, Kind::MethodAnswer]
            .into_iter()
            .filter(|k| may_go(*k))
            .filter_map(|k| self.unsent[k as usize].first().copied())
            .min()
    }

    fn assign_pkid(&mut self, seq: u64, pkid: u16) {
        if let Some(o) = self.entries.get_mut(&seq)
            && o.pkid.replace(pkid).is_none()
        {
            self.with_pkid += 1;
        }
    }

    /// Records that `seq` went out on this connection; returns its twin `$rid`, if any.
    fn mark_sent(&mut self, seq: u64) -> Option<&str> {
        let o = self.entries.get_mut(&seq)?;
        self.unsent[o.kind() as usize].remove(&seq);
        o.sent = true;
        if !o.on_wire {
            o.on_wire = true;
            self.on_wire += 1;
        }
        o.twin_rid.as_deref()
    }

    /// The PUBLISH for entry `seq` under `pkid`.
    fn packet(&self, seq: u64, pkid: u16) -> Option<Result<Packet>> {
        let o = self.entries.get(&seq)?;
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
        Some(packet)
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
            Command::C2dTaken { connection, pkid } => {
                if connection == self.connection {
                    self.c2d_acks.push(pkid);
                    self.dirty = true;
                }
            }
        }
    }

    fn enqueue(&mut self, outgoing: Outgoing) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outbox.insert(seq, outgoing);
        self.dirty = true;
        if self.outbox.sweep_due() {
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
        for o in self.outbox.remove_where(|o| o.abandoned(twins)) {
            if let Some(pkid) = o.pkid {
                self.pkids.remove(&pkid);
            }
        }
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
        self.outbox.new_connection();
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
            match Topic::new(f.subscription(&self.settings.device_id).filter()) {
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
        let Ok(filter) = Topic::new(feature.subscription(&self.settings.device_id).filter()) else {
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
        let draining = conn.drain.is_some();
        self.send_ready(draining, |packet| conn.push(packet));
    }

    /// [`send_outbox`](Self::send_outbox) with the connection's part passed in. Each entry
    /// is looked at once per connection, however long the backlog.
    fn send_ready(&mut self, draining: bool, mut push: impl FnMut(&Packet) -> Result<()>) {
        let twin_ready = self.has(Feature::TwinResponses);
        let may_go = |kind| match kind {
            Kind::MethodAnswer => true,
            Kind::Twin => twin_ready && !draining,
            Kind::Event => !draining,
        };
        while let Some(seq) = self.outbox.next_unsent(may_go) {
            let assigned = self.outbox.entries.get(&seq).and_then(|o| o.pkid);
            let pkid = match assigned {
                Some(pkid) => pkid,
                None if self.outbox.with_pkid >= MAX_IN_FLIGHT => break,
                None => {
                    let pkid = self.alloc_pkid();
                    self.pkids.insert(pkid, PkidUse::Publish(seq));
                    self.outbox.assign_pkid(seq, pkid);
                    pkid
                }
            };
            let Some(packet) = self.outbox.packet(seq, pkid) else {
                break;
            };
            match packet.and_then(|p| push(&p)) {
                Ok(()) => {
                    if let Some(rid) = self.outbox.mark_sent(seq)
                        && let Some(wait) = self.twins.get_mut(rid)
                    {
                        wait.asked = true;
                    }
                }
                Err(error) => self.fail_unsendable(seq, pkid, &error),
            }
        }
    }

    /// Drops entry `seq`, which cannot be encoded, and tells whoever waits for it.
    fn fail_unsendable(&mut self, seq: u64, pkid: u16, error: &Error) {
        self.pkids.remove(&pkid);
        let Some(o) = self.outbox.remove(seq) else {
            return;
        };
        if let Some(rid) = &o.twin_rid
            && let Some(wait) = self.twins.remove(rid)
            && let Some(reply) = wait.reply
        {
            let _ = reply.send(Err(error.clone()));
        }
        o.fail(error);
    }

    pub(super) fn puback(&mut self, conn: &mut Conn, pkid: u16) {
        if let Some(rid) = self.acknowledged(pkid) {
            conn.methods_outstanding.remove(&rid);
        }
    }

    /// Completes the publish `pkid` stands for; returns the method call it answered, if any.
    fn acknowledged(&mut self, pkid: u16) -> Option<String> {
        let Some(PkidUse::Publish(seq)) = self.pkids.get(&pkid) else {
            return None;
        };
        let seq = *seq;
        self.pkids.remove(&pkid);
        let o = self.outbox.remove(seq)?;
        if let Some(done) = o.done {
            let _ = done.send(Ok(()));
        }
        if let Some(rid) = o.twin_rid
            && let Some(wait) = self.twins.get_mut(&rid)
        {
            wait.seq = None;
        }
        // A slot in the in-flight window opened.
        self.dirty = true;
        o.method_rid
    }

    /// Marks the acknowledged features held; returns those just gained.
    pub(super) fn suback(&mut self, ack: SubAck) -> Vec<Feature> {
        let Some(PkidUse::Subscribe(features)) = self.pkids.remove(&ack.pkid) else {
            return Vec::new();
        };
        for (i, f) in features.iter().enumerate() {
            if matches!(ack.return_codes.get(i), Some(SubscribeReturnCode::Failure)) {
                // IoT Hub's SDKs carry on too; the feature then simply receives nothing.
                tracing::warn!(filter = %f.subscription(&self.settings.device_id).filter(), "the hub refused a subscription");
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
        self.outbox.on_wire > 0 || self.twins.values().any(|w| w.asked)
    }

    /// Fails every waiting operation with `error` (the task is ending).
    pub(super) fn fail_all(&mut self, error: &Error) {
        for o in self.outbox.take_all() {
            o.fail(error);
        }
        for (_, w) in std::mem::take(&mut self.twins) {
            if let Some(reply) = w.reply {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use tokio::sync::mpsc;

    use super::*;
    use crate::device::DeviceClient;
    use crate::device::task::{Outbound, Shared};

    fn task() -> Task {
        let device = "HostName=h;DeviceId=d1;SharedAccessKey=c2VjcmV0LWtleS1mb3ItdGVzdHM=";
        let client = DeviceClient::builder(device)
            .build()
            .expect("valid settings");
        let (responder, commands) = mpsc::channel(1);
        let settings = client.inner.settings.clone();
        Task::new(settings, Arc::new(Shared::new()), commands, responder)
    }

    /// Accepts `n` telemetry messages with payloads "0", "1", ...; returns their outcomes.
    fn accept_events(task: &mut Task, n: usize) -> Vec<oneshot::Receiver<Result<()>>> {
        (0..n)
            .map(|i| {
                let (done, acked) = oneshot::channel();
                task.accept(Command::Publish(Outbound {
                    topic: "devices/d1/messages/events/".into(),
                    payload: Bytes::from(i.to_string()),
                    done: Some(done),
                    method_rid: None,
                }));
                acked
            })
            .collect()
    }

    /// The PUBLISHes one send pass writes.
    fn send(task: &mut Task, draining: bool) -> Vec<Publish> {
        let mut sent = Vec::new();
        task.send_ready(draining, |packet| {
            if let Packet::Publish(p) = packet {
                sent.push(p.clone());
            }
            Ok(())
        });
        sent
    }

    fn topics(sent: &[Publish]) -> Vec<&str> {
        sent.iter().map(|p| p.topic.as_str()).collect()
    }

    #[test]
    fn a_large_backlog_drains_in_order_each_message_acknowledged_once() {
        // Quadratic sending would take minutes here: every PUBACK triggers a send pass.
        const BACKLOG: usize = 50_000;
        let mut task = task();
        let outcomes = accept_events(&mut task, BACKLOG);
        let mut on_wire: VecDeque<Publish> = send(&mut task, false).into();
        assert_eq!(on_wire.len(), MAX_IN_FLIGHT);
        let mut delivered = Vec::with_capacity(BACKLOG);
        while let Some(p) = on_wire.pop_front() {
            assert!(!p.dup, "nothing is sent twice on one connection");
            delivered.push(p.payload.clone());
            assert_eq!(task.acknowledged(p.pkid), None);
            // A second PUBACK for the same id finds nothing left to complete.
            assert_eq!(task.acknowledged(p.pkid), None);
            on_wire.extend(send(&mut task, false));
            assert!(on_wire.len() <= MAX_IN_FLIGHT);
            assert_eq!(task.outbox.with_pkid, on_wire.len());
        }
        let expected: Vec<Bytes> = (0..BACKLOG).map(|i| Bytes::from(i.to_string())).collect();
        assert!(
            delivered == expected,
            "every message once, in acceptance order"
        );
        for (i, mut outcome) in outcomes.into_iter().enumerate() {
            assert!(matches!(outcome.try_recv(), Ok(Ok(()))), "message {i}");
        }
        assert!(task.outbox.entries.is_empty() && task.pkids.is_empty());
        assert!(!task.awaiting_hub());
    }

    #[test]
    fn messages_whose_callers_gave_up_are_swept_before_being_sent() {
        let mut task = task();
        for _ in 10..SWEEP_EVERY {
            drop(accept_events(&mut task, 1));
        }
        let mut kept = accept_events(&mut task, 10);
        // The sweep ran at the SWEEP_EVERY-th message: only the awaited ones are left.
        assert_eq!(task.outbox.entries.len(), 10);
        let sent = send(&mut task, false);
        assert_eq!(sent.len(), 10);
        for p in &sent {
            task.acknowledged(p.pkid);
        }
        assert!(kept.iter_mut().all(|k| matches!(k.try_recv(), Ok(Ok(())))));
    }

    #[test]
    fn a_new_connection_resends_the_unacknowledged_with_dup_under_their_ids() {
        let mut task = task();
        let mut outcomes = accept_events(&mut task, 5);
        let first = send(&mut task, false);
        assert_eq!(first.len(), 5);
        task.acknowledged(first[1].pkid);
        assert!(matches!(outcomes[1].try_recv(), Ok(Ok(()))));

        task.reset_outbox(true);
        let again = send(&mut task, false);
        let pkids: Vec<u16> = again.iter().map(|p| p.pkid).collect();
        let expected: Vec<u16> = [0, 2, 3, 4].iter().map(|&i| first[i].pkid).collect();
        assert_eq!(pkids, expected);
        assert!(again.iter().all(|p| p.dup));
        assert!(send(&mut task, false).is_empty(), "once per connection");
        assert!(task.awaiting_hub());
        for p in &again {
            task.acknowledged(p.pkid);
        }
        assert!(!task.awaiting_hub());
        for i in [0, 2, 3, 4] {
            assert!(matches!(outcomes[i].try_recv(), Ok(Ok(()))), "message {i}");
        }
    }

    #[test]
    fn twin_requests_wait_for_their_subscription_and_renewals_send_only_method_answers() {
        let mut task = task();
        let (reply, _answer) = oneshot::channel();
        task.accept(Command::Twin {
            request: TwinRequest::Get,
            reply,
        });
        let _outcomes = accept_events(&mut task, 1);
        let answer = serde_json::json!({});
        task.accept(Command::method_response(200, "m1", &answer, None));

        let sent = send(&mut task, true);
        assert_eq!(topics(&sent), ["$iothub/methods/res/200/?$rid=m1"]);
        let sent = send(&mut task, false);
        assert_eq!(topics(&sent), ["devices/d1/messages/events/"]);
        assert!(task.twins.values().all(|w| !w.asked));

        task.sub(Feature::TwinResponses).active = true;
        let sent = send(&mut task, false);
        assert_eq!(sent.len(), 1);
        assert!(
            sent[0]
                .topic
                .as_str()
                .starts_with("$iothub/twin/GET/?$rid=")
        );
        assert!(task.twins.values().all(|w| w.asked));
    }
}
