//! Cloud-to-device messaging: each device's durable queue with IoT Hub's rules (depth, time
//! to live, a one-minute lock, the abandon count), hand-out to the device's MQTT session or an
//! HTTPS poll, and the delivery feedback the service reads back in batches. Messages live in
//! the store's `CloudMessages` table and feedback records in `Feedback`; this module keeps a
//! small index of both in memory (no bodies) and commits every change before it answers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use twinhub_proto::c2d::{
    Ack, CloudMessage, FEEDBACK_CONTENT_TYPE, FeedbackRecord, FeedbackStatus, MAX_C2D_BYTES,
    Recipient, parse_to,
};
use twinhub_proto::error::ErrorCode;
use twinhub_store::{Table, Write};

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::sequence::Reserved;

/// IoT Hub's cloud-to-device settings.
#[derive(Debug, Clone)]
pub struct C2dOptions {
    /// Messages a device's queue holds at most (IoT Hub: 50).
    pub max_queue_depth: usize,
    /// A message's life when the sender sets no expiry (IoT Hub: 1 hour).
    pub default_ttl: Duration,
    /// The longest life a message may have (IoT Hub: 2 days); later expiries are cut to it.
    pub max_ttl: Duration,
    /// How long an HTTPS receive keeps a message invisible (IoT Hub: 1 minute, fixed).
    pub lock_duration: Duration,
    /// Explicit abandons after which a message is dead-lettered (IoT Hub: 10).
    pub max_delivery_count: u32,
    /// Records per feedback message at most (IoT Hub: 64).
    pub feedback_batch: usize,
    /// A feedback message goes out at the latest this long after the previous (IoT Hub: 15 s).
    pub feedback_interval: Duration,
    /// Feedback records not taken within this are dropped (IoT Hub: 1 hour).
    pub feedback_ttl: Duration,
    /// Feedback records kept at most; the oldest are dropped beyond it.
    pub max_feedback_records: usize,
}

impl Default for C2dOptions {
    fn default() -> Self {
        C2dOptions {
            max_queue_depth: 50,
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(2 * 86_400),
            lock_duration: Duration::from_secs(60),
            max_delivery_count: 10,
            feedback_batch: 64,
            feedback_interval: Duration::from_secs(15),
            feedback_ttl: Duration::from_secs(3600),
            max_feedback_records: 100_000,
        }
    }
}

/// Who holds a message's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// An MQTT session (by connection id): the lock lasts until its PUBACK or its end.
    Session(u64),
    /// An HTTPS receive: the lock lapses after [`C2dOptions::lock_duration`].
    Poll,
}

/// A message handed to a device, locked until it is completed, rejected or abandoned.
#[derive(Debug, Clone)]
pub struct Locked {
    pub lock_token: String,
    pub message: CloudMessage,
    /// Handed out before (a session ended or a lock lapsed without an answer): MQTT's DUP.
    pub redelivery: bool,
}

/// A feedback message: up to [`C2dOptions::feedback_batch`] records under one lock.
#[derive(Debug, Clone)]
pub struct FeedbackBatch {
    /// Also the message id of the AMQP message.
    pub lock_token: String,
    pub records: Vec<FeedbackRecord>,
    pub enqueued_ms: i64,
    /// Abandons so far.
    pub delivery_count: u32,
}

impl FeedbackBatch {
    pub const CONTENT_TYPE: &'static str = FEEDBACK_CONTENT_TYPE;

    /// The JSON array IoT Hub sends as the body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.records).unwrap_or_else(|_| b"[]".to_vec())
    }
}

struct Lock {
    token: String,
    holder: Holder,
    /// `None` for a session's lock.
    until: Option<Instant>,
}

struct Entry {
    message_id: Option<String>,
    generation_id: String,
    ack: Ack,
    expiry_ms: i64,
    delivery_count: u32,
    lock: Option<Lock>,
    delivered: bool,
    /// Being removed (its commit is in flight): not handed out, not counted twice.
    leaving: bool,
}

impl Entry {
    fn of(m: &CloudMessage) -> Entry {
        Entry {
            message_id: m.message_id.clone(),
            generation_id: m.generation_id.clone(),
            ack: m.ack,
            expiry_ms: m.expiry_ms,
            delivery_count: m.delivery_count,
            lock: None,
            delivered: false,
            leaving: false,
        }
    }

    /// The parts of the message feedback needs.
    fn stub(&self) -> CloudMessage {
        CloudMessage {
            message_id: self.message_id.clone(),
            generation_id: self.generation_id.clone(),
            ack: self.ack,
            ..CloudMessage::default()
        }
    }

    fn available(&self, now: Instant) -> bool {
        !self.leaving
            && match &self.lock {
                None => true,
                Some(l) => l.until.is_some_and(|u| u <= now),
            }
    }
}

#[derive(Default)]
struct DeviceQueue {
    entries: BTreeMap<u64, Entry>,
    /// Sends admitted against the depth whose commit has not finished.
    reserved: usize,
}

struct PendingFeedback {
    record: FeedbackRecord,
    device_id: String,
    created: Instant,
    lock: Option<String>,
    abandons: u32,
}

struct FeedbackLock {
    keys: Vec<u64>,
    until: Instant,
}

#[derive(Default)]
struct FeedbackState {
    records: BTreeMap<u64, PendingFeedback>,
    locks: HashMap<String, FeedbackLock>,
    last_sent: Option<Instant>,
}

const SEQUENCE_KEY: &str = "c2d_sequence";
const SEQUENCE_BLOCK: u64 = 4096;
/// How often expired messages, lapsed locks and old feedback are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The cloud-to-device state of the hub.
pub struct CloudMessaging {
    options: C2dOptions,
    queues: Mutex<HashMap<String, DeviceQueue>>,
    watchers: Mutex<HashMap<String, Weak<Notify>>>,
    feedback: Mutex<FeedbackState>,
    pub(crate) feedback_ready: Notify,
    /// Message and feedback record numbers, hub-wide.
    sequence: Reserved,
}

impl std::fmt::Debug for CloudMessaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudMessaging")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn message_key(device_id: &str, seq: u64) -> String {
    format!("{device_id}/{seq:016x}")
}

fn feedback_key(seq: u64) -> String {
    format!("{seq:016x}")
}

fn lock_lost(what: &str) -> Error {
    Error::new(
        ErrorCode::DeviceMessageLockLost,
        format!("the lock token is unknown or its lock expired: {what}"),
    )
}

/// A stored message that no longer decodes: the store was damaged under us.
fn damaged(e: twinhub_proto::message::MessageError) -> Error {
    tracing::error!("a queued cloud-to-device message cannot be decoded: {e}");
    Error::internal()
}

impl CloudMessaging {
    pub(crate) fn new(options: C2dOptions) -> CloudMessaging {
        CloudMessaging {
            options,
            queues: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            feedback: Mutex::new(FeedbackState::default()),
            feedback_ready: Notify::new(),
            sequence: Reserved::new(SEQUENCE_KEY, SEQUENCE_BLOCK),
        }
    }

    pub fn options(&self) -> &C2dOptions {
        &self.options
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<String, DeviceQueue>> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn feedback_state(&self) -> std::sync::MutexGuard<'_, FeedbackState> {
        self.feedback.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Messages in the device's queue, locked ones included (`cloudToDeviceMessageCount`).
    pub fn depth(&self, device_id: &str) -> u64 {
        self.queues().get(device_id).map_or(0, |q| {
            q.entries.values().filter(|e| !e.leaving).count() as u64
        })
    }

    /// Feedback records waiting for the service.
    pub fn feedback_depth(&self) -> usize {
        self.feedback_state().records.len()
    }

    /// A signal that fires when the device's queue may have a message to hand out.
    pub fn watch(&self, device_id: &str) -> Arc<Notify> {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = watchers.get(device_id).and_then(Weak::upgrade) {
            return n;
        }
        if watchers.len() > 1024 {
            watchers.retain(|_, w| w.strong_count() > 0);
        }
        let n = Arc::new(Notify::new());
        watchers.insert(device_id.to_owned(), Arc::downgrade(&n));
        n
    }

    pub(crate) fn wake(&self, device_id: &str) {
        let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = watchers.get(device_id).and_then(Weak::upgrade) {
            n.notify_one();
        }
    }

    async fn next_sequence(&self, hub: &Hub) -> Result<u64> {
        self.sequence.next(hub.store.as_ref(), 1).await
    }

    /// Writes for feedback records of messages that left with `status`, if their senders
    /// asked; the records join the in-memory list only after the commit ([`Self::publish`]).
    async fn feedback_writes(
        &self,
        hub: &Hub,
        device_id: &str,
        left: &[CloudMessage],
        status: FeedbackStatus,
        writes: &mut Vec<Write>,
    ) -> Result<Vec<(u64, FeedbackRecord)>> {
        let now = crate::keys::now_millis();
        let mut records = Vec::new();
        for m in left.iter().filter(|m| m.ack.wants(status)) {
            let record = FeedbackRecord::new(m, device_id, status, now);
            let seq = self.next_sequence(hub).await?;
            writes.push(Write::put(
                Table::Feedback,
                feedback_key(seq),
                serde_json::to_vec(&record).unwrap_or_default(),
            ));
            records.push((seq, record));
        }
        Ok(records)
    }

    fn publish_feedback(&self, records: Vec<(u64, FeedbackRecord)>) {
        if records.is_empty() {
            return;
        }
        let mut state = self.feedback_state();
        let now = Instant::now();
        for (seq, record) in records {
            let device_id = record.device_id.clone();
            state.records.insert(
                seq,
                PendingFeedback {
                    record,
                    device_id,
                    created: now,
                    lock: None,
                    abandons: 0,
                },
            );
        }
        drop(state);
        self.feedback_ready.notify_waiters();
    }
}

impl Hub {
    pub fn c2d(&self) -> &CloudMessaging {
        &self.c2d
    }

    /// Reads the queues and feedback records back from the store at open; records that cannot
    /// be decoded go to the quarantine table.
    pub(crate) async fn load_c2d(&self) -> Result<()> {
        let mut bad = Vec::new();
        let mut highest = 0u64;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .scan(Table::CloudMessages, after.as_deref(), 1000)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            let mut queues = self.c2d.queues();
            for (key, bytes) in page {
                let device_id = key.rsplit_once('/').map(|(d, _)| d.to_owned());
                match (CloudMessage::decode(&bytes), device_id) {
                    (Ok(m), Some(device_id)) => {
                        highest = highest.max(m.sequence_number);
                        queues
                            .entry(device_id)
                            .or_default()
                            .entries
                            .insert(m.sequence_number, Entry::of(&m));
                    }
                    _ => bad.push((key, bytes)),
                }
            }
        }
        self.quarantine(Table::CloudMessages, bad).await?;
        let mut bad = Vec::new();
        let mut after: Option<String> = None;
        let mut records = Vec::new();
        loop {
            let page = self
                .store
                .scan(Table::Feedback, after.as_deref(), 1000)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (key, bytes) in page {
                let seq = u64::from_str_radix(&key, 16).ok();
                match (serde_json::from_slice::<FeedbackRecord>(&bytes), seq) {
                    (Ok(r), Some(seq)) => {
                        highest = highest.max(seq);
                        records.push((seq, r));
                    }
                    _ => bad.push((key, bytes)),
                }
            }
        }
        self.quarantine(Table::Feedback, bad).await?;
        self.c2d.publish_feedback(records);
        self.c2d.sequence.observe(highest).await;
        Ok(())
    }

    /// In a cluster, brings this node's index of the device's queue in step with the store:
    /// another node may have queued, delivered or purged messages. Locks held here are kept;
    /// messages whose removal is in flight stay until it lands. A single node has nothing to
    /// learn and reads nothing.
    pub(crate) async fn c2d_refresh(&self, device_id: &str) -> Result<()> {
        if self.cluster.is_none() {
            return Ok(());
        }
        let prefix = format!("{device_id}/");
        let mut stored = BTreeMap::new();
        let mut after = Some(prefix.clone());
        'pages: loop {
            let page = self
                .store
                .scan(Table::CloudMessages, after.as_deref(), 1000)
                .await?;
            let full = page.len() == 1000;
            for (key, bytes) in &page {
                if !key.starts_with(&prefix) {
                    break 'pages;
                }
                if let Ok(m) = CloudMessage::decode(bytes) {
                    stored.insert(m.sequence_number, m);
                }
            }
            match page.last() {
                Some((k, _)) if full => after = Some(k.clone()),
                _ => break,
            }
        }
        let mut queues = self.c2d.queues();
        let q = queues.entry(device_id.to_owned()).or_default();
        q.entries
            .retain(|seq, e| e.leaving || stored.contains_key(seq));
        for (seq, m) in &stored {
            q.entries.entry(*seq).or_insert_with(|| Entry::of(m));
        }
        Ok(())
    }

    /// In a cluster, takes the feedback records other nodes wrote (messages completed,
    /// rejected or expired there) and drops those another node's receiver has taken. Records
    /// locked by a receiver of this node are kept until it settles them.
    async fn c2d_feedback_refresh(&self) -> Result<()> {
        if self.cluster.is_none() {
            return Ok(());
        }
        let mut stored = BTreeMap::new();
        self.for_each_entry(Table::Feedback, |key, bytes| {
            if let (Ok(seq), Ok(record)) = (
                u64::from_str_radix(&key, 16),
                serde_json::from_slice::<FeedbackRecord>(&bytes),
            ) {
                stored.insert(seq, record);
            }
        })
        .await?;
        let mut state = self.c2d.feedback_state();
        state
            .records
            .retain(|seq, r| r.lock.is_some() || stored.contains_key(seq));
        let now = Instant::now();
        for (seq, record) in stored {
            state.records.entry(seq).or_insert_with(|| PendingFeedback {
                device_id: record.device_id.clone(),
                record,
                created: now,
                lock: None,
                abandons: 0,
            });
        }
        Ok(())
    }

    /// In a cluster, refreshes every queue from the store (before a sweep).
    async fn c2d_refresh_all(&self) -> Result<()> {
        let mut devices: std::collections::BTreeSet<String> =
            self.c2d.queues().keys().cloned().collect();
        self.for_each_entry(Table::CloudMessages, |key, _| {
            if let Some((device, _)) = key.rsplit_once('/') {
                devices.insert(device.to_owned());
            }
        })
        .await?;
        for device in devices {
            self.c2d_refresh(&device).await?;
        }
        Ok(())
    }

    /// Queues `message` for the device its `to` names, once durable. Fills in the sequence
    /// number, enqueued time, expiry (the sender's, cut to the maximum, or the default) and
    /// the device's generation.
    pub async fn send_c2d(&self, mut message: CloudMessage) -> Result<u64> {
        let Some(Recipient {
            device_id,
            module_id,
        }) = parse_to(&message.to)
        else {
            return Err(Error::invalid(format!(
                "the message's 'to' must be /devices/{{deviceId}}/messages/devicebound, not {:?}",
                crate::logsafe::Shown(&message.to).to_string()
            )));
        };
        if let Some(module_id) = module_id {
            return Err(Error::new(
                ErrorCode::ModuleNotFound,
                format!("module {module_id} on device {device_id} does not exist"),
            ));
        }
        let size = message.size();
        if size > MAX_C2D_BYTES {
            return Err(Error::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "the message is {size} bytes; a cloud-to-device message may have {MAX_C2D_BYTES}"
                ),
            ));
        }
        let now = crate::keys::now_millis();
        let opts = &self.c2d.options;
        let longest = now.saturating_add(opts.max_ttl.as_millis() as i64);
        message.expiry_ms = if message.expiry_ms == 0 {
            now.saturating_add(opts.default_ttl.as_millis() as i64)
        } else if message.expiry_ms <= now {
            return Err(Error::invalid(
                "the message expired before it reached the hub (absolute-expiry-time is past)",
            ));
        } else {
            message.expiry_ms.min(longest)
        };
        let _guard = self.locks.lock(&device_id).await;
        let record = self.load_existing(&device_id).await?;
        self.c2d_refresh(&device_id).await?;
        {
            let mut queues = self.c2d.queues();
            let q = queues.entry(device_id.clone()).or_default();
            let depth = q.entries.values().filter(|e| !e.leaving).count() + q.reserved;
            if depth >= opts.max_queue_depth {
                return Err(Error::new(
                    ErrorCode::DeviceMaximumQueueDepthExceeded,
                    format!(
                        "the queue of device {device_id} holds {} messages, its maximum",
                        opts.max_queue_depth
                    ),
                ));
            }
            q.reserved += 1;
        }
        let result = async {
            message.sequence_number = self.c2d.next_sequence(self).await?;
            message.enqueued_ms = now;
            message.generation_id = record.generation_id.clone();
            message.delivery_count = 0;
            self.store
                .commit(vec![Write::put(
                    Table::CloudMessages,
                    message_key(&device_id, message.sequence_number),
                    message.encode(),
                )])
                .await?;
            Ok::<_, Error>(())
        }
        .await;
        {
            let mut queues = self.c2d.queues();
            let q = queues.entry(device_id.clone()).or_default();
            q.reserved = q.reserved.saturating_sub(1);
            if result.is_ok() {
                q.entries
                    .insert(message.sequence_number, Entry::of(&message));
            }
        }
        result?;
        metrics::counter!("twinhub_c2d_messages_total", "outcome" => "queued").increment(1);
        self.c2d.wake(&device_id);
        if let (Some(node), Some(bus)) = (self.remote_node(record.node.as_deref()), self.cluster())
        {
            let notice = crate::cluster::Notice::C2dQueued {
                identity: device_id.clone(),
            };
            bus.notify(node, &notice).await;
        }
        Ok(message.sequence_number)
    }

    /// Locks and returns the device's next message in queue order, if one is waiting. Expired
    /// messages met on the way leave with `Expired` feedback and are never handed out.
    pub async fn c2d_receive(&self, device_id: &str, holder: Holder) -> Result<Option<Locked>> {
        self.c2d_refresh(device_id).await?;
        loop {
            let now = Instant::now();
            let now_ms = crate::keys::now_millis();
            let mut expired = Vec::new();
            let picked = {
                let mut queues = self.c2d.queues();
                let Some(q) = queues.get_mut(device_id) else {
                    return Ok(None);
                };
                let mut picked = None;
                for (seq, e) in q.entries.iter_mut() {
                    if !e.available(now) {
                        continue;
                    }
                    if e.expiry_ms <= now_ms {
                        e.leaving = true;
                        expired.push(*seq);
                        continue;
                    }
                    let token = crate::keys::lock_token();
                    e.lock = Some(Lock {
                        token: token.clone(),
                        holder,
                        until: match holder {
                            Holder::Session(_) => None,
                            Holder::Poll => Some(now + self.c2d.options.lock_duration),
                        },
                    });
                    let redelivery = e.delivered;
                    e.delivered = true;
                    picked = Some((*seq, token, redelivery));
                    break;
                }
                picked
            };
            if !expired.is_empty() {
                self.c2d_remove(device_id, &expired, FeedbackStatus::Expired)
                    .await?;
            }
            let Some((seq, lock_token, redelivery)) = picked else {
                return Ok(None);
            };
            match self
                .store
                .get(Table::CloudMessages, &message_key(device_id, seq))
                .await?
            {
                Some(bytes) => {
                    let message = CloudMessage::decode(&bytes).map_err(damaged)?;
                    return Ok(Some(Locked {
                        lock_token,
                        message,
                        redelivery,
                    }));
                }
                // Removed while it was being picked (a purge): take the next.
                None => {
                    let mut queues = self.c2d.queues();
                    if let Some(q) = queues.get_mut(device_id) {
                        q.entries.remove(&seq);
                    }
                }
            }
        }
    }

    /// The sequence number of the message the device holds under `lock_token`, if the lock
    /// is still its own.
    fn c2d_locked(&self, device_id: &str, lock_token: &str) -> Result<u64> {
        let now = Instant::now();
        let queues = self.c2d.queues();
        queues
            .get(device_id)
            .and_then(|q| {
                q.entries.iter().find(|(_, e)| {
                    !e.leaving
                        && e.lock.as_ref().is_some_and(|l| {
                            l.token == lock_token && l.until.is_none_or(|u| u > now)
                        })
                })
            })
            .map(|(seq, _)| *seq)
            .ok_or_else(|| lock_lost(lock_token))
    }

    /// The device took the message: it leaves the queue (`Success` feedback if asked).
    pub async fn c2d_complete(&self, device_id: &str, lock_token: &str) -> Result<()> {
        let seq = self.c2d_locked(device_id, lock_token)?;
        self.c2d_remove(device_id, &[seq], FeedbackStatus::Success)
            .await
            .map(drop)
    }

    /// The device refused the message: it is dead-lettered (`Rejected` feedback if asked).
    pub async fn c2d_reject(&self, device_id: &str, lock_token: &str) -> Result<()> {
        let seq = self.c2d_locked(device_id, lock_token)?;
        self.c2d_remove(device_id, &[seq], FeedbackStatus::Rejected)
            .await
            .map(drop)
    }

    /// The device gave the message back: it counts one delivery and is queued again, or is
    /// dead-lettered (`DeliveryCountExceeded`) once the count reaches the maximum.
    pub async fn c2d_abandon(&self, device_id: &str, lock_token: &str) -> Result<()> {
        let seq = self.c2d_locked(device_id, lock_token)?;
        let count = {
            let queues = self.c2d.queues();
            queues
                .get(device_id)
                .and_then(|q| q.entries.get(&seq))
                .map_or(0, |e| e.delivery_count)
                + 1
        };
        if count >= self.c2d.options.max_delivery_count {
            return self
                .c2d_remove(device_id, &[seq], FeedbackStatus::DeliveryCountExceeded)
                .await
                .map(drop);
        }
        let key = message_key(device_id, seq);
        let Some(bytes) = self.store.get(Table::CloudMessages, &key).await? else {
            return Err(lock_lost(lock_token));
        };
        let mut message = CloudMessage::decode(&bytes).map_err(damaged)?;
        message.delivery_count = count;
        self.store
            .commit(vec![Write::put(
                Table::CloudMessages,
                key,
                message.encode(),
            )])
            .await?;
        metrics::counter!("twinhub_c2d_messages_total", "outcome" => "Abandoned").increment(1);
        {
            let mut queues = self.c2d.queues();
            if let Some(e) = queues
                .get_mut(device_id)
                .and_then(|q| q.entries.get_mut(&seq))
            {
                e.delivery_count = count;
                e.lock = None;
            }
        }
        self.c2d.wake(device_id);
        Ok(())
    }

    /// Unlocks what a session held when it ended; the messages keep their delivery count and
    /// go out again marked as redeliveries.
    pub fn c2d_release(&self, device_id: &str, connection_id: u64) {
        let mut released = false;
        {
            let mut queues = self.c2d.queues();
            if let Some(q) = queues.get_mut(device_id) {
                for e in q.entries.values_mut() {
                    if e.lock
                        .as_ref()
                        .is_some_and(|l| l.holder == Holder::Session(connection_id))
                    {
                        e.lock = None;
                        released = true;
                    }
                }
            }
        }
        if released {
            self.c2d.wake(device_id);
        }
    }

    /// `DELETE /devices/{id}/commands`: removes every queued message, locked ones included,
    /// with `Purged` feedback where asked. Returns how many.
    pub async fn c2d_purge(&self, device_id: &str) -> Result<u64> {
        let _guard = self.locks.lock(device_id).await;
        self.load_existing(device_id).await?;
        self.c2d_refresh(device_id).await?;
        let seqs: Vec<u64> = {
            let mut queues = self.c2d.queues();
            let Some(q) = queues.get_mut(device_id) else {
                return Ok(0);
            };
            q.entries
                .iter_mut()
                .filter(|(_, e)| !e.leaving)
                .map(|(seq, e)| {
                    e.leaving = true;
                    *seq
                })
                .collect()
        };
        self.c2d_remove(device_id, &seqs, FeedbackStatus::Purged)
            .await
    }

    /// Removes the messages `seqs` (already marked leaving, or locked by the caller) from the
    /// store and the queue in one commit together with their feedback records.
    async fn c2d_remove(
        &self,
        device_id: &str,
        seqs: &[u64],
        status: FeedbackStatus,
    ) -> Result<u64> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let stubs: Vec<CloudMessage> = {
            let mut queues = self.c2d.queues();
            let Some(q) = queues.get_mut(device_id) else {
                return Ok(0);
            };
            seqs.iter()
                .filter_map(|seq| {
                    q.entries.get_mut(seq).map(|e| {
                        e.leaving = true;
                        e.stub()
                    })
                })
                .collect()
        };
        let mut writes: Vec<Write> = seqs
            .iter()
            .map(|seq| Write::delete(Table::CloudMessages, message_key(device_id, *seq)))
            .collect();
        let committed: Result<Vec<(u64, FeedbackRecord)>> = async {
            let records = self
                .c2d
                .feedback_writes(self, device_id, &stubs, status, &mut writes)
                .await?;
            self.store.commit(writes).await?;
            Ok(records)
        }
        .await;
        let published = {
            let mut queues = self.c2d.queues();
            let Some(q) = queues.get_mut(device_id) else {
                return Ok(0);
            };
            match committed {
                Ok(records) => {
                    for seq in seqs {
                        q.entries.remove(seq);
                    }
                    metrics::counter!("twinhub_c2d_messages_total", "outcome" => status.as_str())
                        .increment(stubs.len() as u64);
                    if q.entries.is_empty() && q.reserved == 0 {
                        queues.remove(device_id);
                    }
                    drop(queues);
                    let published = !records.is_empty();
                    self.c2d.publish_feedback(records);
                    published
                }
                Err(e) => {
                    for seq in seqs {
                        if let Some(e) = q.entries.get_mut(seq) {
                            e.leaving = false;
                        }
                    }
                    return Err(e);
                }
            }
        };
        if published && let Some(bus) = self.cluster() {
            bus.broadcast(&crate::cluster::Notice::FeedbackQueued).await;
        }
        Ok(stubs.len() as u64)
    }

    /// The writes that drop a deleted device's queue and its pending feedback; the registry
    /// commits them with the deletion and then calls [`Hub::c2d_forget`].
    pub(crate) fn c2d_deletion_writes(&self, device_id: &str) -> Vec<Write> {
        let mut writes: Vec<Write> = {
            let queues = self.c2d.queues();
            queues.get(device_id).map_or_else(Vec::new, |q| {
                q.entries
                    .keys()
                    .map(|seq| Write::delete(Table::CloudMessages, message_key(device_id, *seq)))
                    .collect()
            })
        };
        let state = self.c2d.feedback_state();
        writes.extend(
            state
                .records
                .iter()
                .filter(|(_, r)| r.device_id == device_id)
                .map(|(seq, _)| Write::delete(Table::Feedback, feedback_key(*seq))),
        );
        writes
    }

    pub(crate) fn c2d_forget(&self, device_id: &str) {
        self.c2d.queues().remove(device_id);
        let mut state = self.c2d.feedback_state();
        state.records.retain(|_, r| r.device_id != device_id);
    }

    /// The next feedback message for the service, waiting until one is due: when
    /// [`C2dOptions::feedback_batch`] records wait, or any wait and the previous message went
    /// out at least [`C2dOptions::feedback_interval`] ago.
    pub async fn c2d_feedback_next(&self) -> FeedbackBatch {
        loop {
            // Registered before looking, so a record published between the look and the wait
            // still wakes this waiter (`notify_waiters` wakes only registered ones).
            let notified = self.c2d.feedback_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Err(e) = self.c2d_feedback_refresh().await {
                tracing::warn!("reading the cluster's feedback failed: {}", e.message());
            }
            let wait = match self.c2d_feedback_take(false) {
                Ok(batch) => return batch,
                Err(wait) => wait,
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The waiting feedback records (up to a batch) under a new lock, at once; `None` when
    /// none wait. The HTTPS receive, which polls, does not wait for the interval.
    pub fn c2d_feedback_poll(&self) -> Option<FeedbackBatch> {
        self.c2d_feedback_take(true).ok()
    }

    /// A batch, or how long to wait before one may be due.
    fn c2d_feedback_take(
        &self,
        now_or_never: bool,
    ) -> std::result::Result<FeedbackBatch, Duration> {
        let opts = &self.c2d.options;
        let now = Instant::now();
        let mut state = self.c2d.feedback_state();
        let free: Vec<u64> = state
            .records
            .iter()
            .filter(|(_, r)| r.lock.is_none())
            .map(|(seq, _)| *seq)
            .take(opts.feedback_batch)
            .collect();
        let idle_long_enough = state
            .last_sent
            .is_none_or(|t| now.duration_since(t) >= opts.feedback_interval);
        if free.is_empty() {
            return Err(Duration::from_secs(3600));
        }
        if !(now_or_never || free.len() >= opts.feedback_batch || idle_long_enough) {
            let due = state.last_sent.map_or(now, |t| t + opts.feedback_interval);
            return Err(due
                .saturating_duration_since(now)
                .max(Duration::from_millis(1)));
        }
        let token = crate::keys::lock_token();
        let mut records = Vec::with_capacity(free.len());
        let mut delivery_count = 0;
        for seq in &free {
            if let Some(r) = state.records.get_mut(seq) {
                r.lock = Some(token.clone());
                delivery_count = delivery_count.max(r.abandons);
                records.push(r.record.clone());
            }
        }
        let enqueued_ms = crate::keys::now_millis();
        state.locks.insert(
            token.clone(),
            FeedbackLock {
                keys: free,
                until: now + opts.lock_duration,
            },
        );
        state.last_sent = Some(now);
        Ok(FeedbackBatch {
            lock_token: token,
            records,
            enqueued_ms,
            delivery_count,
        })
    }

    /// The service took the feedback message: its records are removed.
    pub async fn c2d_feedback_complete(&self, lock_token: &str) -> Result<()> {
        let keys = {
            let state = self.c2d.feedback_state();
            match state.locks.get(lock_token) {
                Some(l) if l.until > Instant::now() => l.keys.clone(),
                _ => return Err(lock_lost(lock_token)),
            }
        };
        self.c2d_feedback_drop(lock_token, &keys).await
    }

    /// The service refused the feedback message: its records are dropped (dead-lettered).
    pub async fn c2d_feedback_reject(&self, lock_token: &str) -> Result<()> {
        self.c2d_feedback_complete(lock_token).await
    }

    async fn c2d_feedback_drop(&self, lock_token: &str, keys: &[u64]) -> Result<()> {
        self.store
            .commit(
                keys.iter()
                    .map(|seq| Write::delete(Table::Feedback, feedback_key(*seq)))
                    .collect(),
            )
            .await?;
        let mut state = self.c2d.feedback_state();
        state.locks.remove(lock_token);
        for seq in keys {
            state.records.remove(seq);
        }
        Ok(())
    }

    /// The service gave the feedback message back: its records wait again, counting one
    /// delivery; records abandoned [`C2dOptions::max_delivery_count`] times are dropped.
    pub async fn c2d_feedback_abandon(&self, lock_token: &str) -> Result<()> {
        let max = self.c2d.options.max_delivery_count;
        let exhausted: Vec<u64> = {
            let mut state = self.c2d.feedback_state();
            let Some(lock) = state.locks.remove(lock_token) else {
                return Err(lock_lost(lock_token));
            };
            let mut exhausted = Vec::new();
            for seq in lock.keys {
                if let Some(r) = state.records.get_mut(&seq) {
                    r.lock = None;
                    r.abandons += 1;
                    if r.abandons >= max {
                        exhausted.push(seq);
                    }
                }
            }
            exhausted
        };
        if !exhausted.is_empty() {
            self.store
                .commit(
                    exhausted
                        .iter()
                        .map(|seq| Write::delete(Table::Feedback, feedback_key(*seq)))
                        .collect(),
                )
                .await?;
            let mut state = self.c2d.feedback_state();
            for seq in &exhausted {
                state.records.remove(seq);
            }
        }
        self.c2d.feedback_ready.notify_waiters();
        Ok(())
    }

    /// One sweep: expired messages leave with `Expired` feedback, lapsed HTTPS locks and
    /// feedback locks are released, feedback past its time to live or over the bound is
    /// dropped.
    pub async fn c2d_sweep(&self) -> Result<()> {
        if self.cluster.is_some() {
            // One node sweeps for the cluster (the one running the jobs), from the store's
            // queues: another node's index may hold messages delivered since.
            if !*self.jobs.leading.borrow() {
                return Ok(());
            }
            self.c2d_refresh_all().await?;
        }
        let now = Instant::now();
        let now_ms = crate::keys::now_millis();
        let (expired, woken): (Vec<(String, Vec<u64>)>, Vec<String>) = {
            let mut queues = self.c2d.queues();
            let mut expired = Vec::new();
            let mut woken = Vec::new();
            for (device_id, q) in queues.iter_mut() {
                let mut seqs = Vec::new();
                let mut unlocked = false;
                for (seq, e) in q.entries.iter_mut() {
                    if e.leaving {
                        continue;
                    }
                    if e.lock
                        .as_ref()
                        .is_some_and(|l| l.until.is_some_and(|u| u <= now))
                    {
                        e.lock = None;
                        unlocked = true;
                    }
                    // A message a session holds is the session's until its PUBACK.
                    if e.expiry_ms <= now_ms && e.lock.is_none() {
                        e.leaving = true;
                        seqs.push(*seq);
                    }
                }
                if !seqs.is_empty() {
                    expired.push((device_id.clone(), seqs));
                }
                if unlocked {
                    woken.push(device_id.clone());
                }
            }
            (expired, woken)
        };
        for device_id in woken {
            self.c2d.wake(&device_id);
        }
        for (device_id, seqs) in expired {
            self.c2d_remove(&device_id, &seqs, FeedbackStatus::Expired)
                .await?;
        }
        let dropped: Vec<u64> = {
            let opts = &self.c2d.options;
            let mut state = self.c2d.feedback_state();
            let lapsed: Vec<String> = state
                .locks
                .iter()
                .filter(|(_, l)| l.until <= now)
                .map(|(t, _)| t.clone())
                .collect();
            for token in lapsed {
                if let Some(lock) = state.locks.remove(&token) {
                    for seq in lock.keys {
                        if let Some(r) = state.records.get_mut(&seq) {
                            r.lock = None;
                        }
                    }
                }
            }
            let mut dropped: Vec<u64> = state
                .records
                .iter()
                .filter(|(_, r)| {
                    r.lock.is_none() && now.duration_since(r.created) >= opts.feedback_ttl
                })
                .map(|(seq, _)| *seq)
                .collect();
            let over = state
                .records
                .len()
                .saturating_sub(opts.max_feedback_records);
            dropped.extend(
                state
                    .records
                    .iter()
                    .filter(|(_, r)| r.lock.is_none())
                    .map(|(seq, _)| *seq)
                    .take(over),
            );
            dropped.sort_unstable();
            dropped.dedup();
            dropped
        };
        if !dropped.is_empty() {
            tracing::info!(
                records = dropped.len(),
                "feedback records dropped: past their time to live or over the bound"
            );
            self.store
                .commit(
                    dropped
                        .iter()
                        .map(|seq| Write::delete(Table::Feedback, feedback_key(*seq)))
                        .collect(),
                )
                .await?;
            let mut state = self.c2d.feedback_state();
            for seq in &dropped {
                state.records.remove(seq);
            }
        }
        self.c2d.feedback_ready.notify_waiters();
        Ok(())
    }

    pub(crate) fn spawn_c2d_sweep(self: &Arc<Self>) {
        let hub = Arc::downgrade(self);
        let mut suspend = self.jobs.suspend.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(SWEEP_EVERY) => {}
                    _ = suspend.wait_for(|s| *s) => return,
                }
                let Some(h) = hub.upgrade() else { return };
                if let Err(e) = h.c2d_sweep().await {
                    tracing::warn!("the cloud-to-device sweep failed: {}", e.message());
                }
            }
        });
    }
}
