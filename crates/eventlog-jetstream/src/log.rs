//! [`JetStreamLog`]: opening an endpoint's stream (creating it or checking it), the state the
//! writer and follower tasks share with it, and the [`EventLog`] calls, which hand appends to
//! the partition's writer (`writer`), answer `info`/`resolve`/`wait_for` from the views
//! (`view`) and fetch events by stream sequence for reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::push, stream};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use twinhub_eventlog::{
    Appended, Error, EventLog, LogOptions, MAX_PARTITIONS, NewEvent, PartitionInfo, Position,
    Result, StoredEvent,
};

use crate::view::{Entry, Tails, View};
use crate::wire::{self, MAX_EVENTS_PER_MESSAGE};
use crate::{follower, writer};

/// Room left in a message for the headers, below the server's `max_payload`.
const HEADER_ROOM: usize = 1024;
/// How many messages a read looks up in the view at a time.
const READ_CHUNK: usize = 64;
/// How many messages a read fetches from the server at once (one request each).
const FETCH_AHEAD: usize = 16;

/// How the log talks to JetStream (the [`LogOptions`] say how it behaves as a log).
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// The bound on every call to the server (a publish and its acknowledgement, a fetch, a
    /// purge); an append gives up with [`Error::Unavailable`] after it, retries included.
    pub timeout: Duration,
    /// The bound on `open` replaying the headers of the retained messages.
    pub open_timeout: Duration,
    /// Replicas of a stream this log creates (1 on a single server; 3 in a cluster).
    pub replicas: usize,
}

impl Default for JetStreamOptions {
    fn default() -> Self {
        JetStreamOptions {
            timeout: Duration::from_secs(5),
            open_timeout: Duration::from_secs(60),
            replicas: 1,
        }
    }
}

/// What this node's log has done, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JetStreamStats {
    /// Messages this node stored (one per group commit: several appends share one).
    pub messages: u64,
    /// Events in them.
    pub events: u64,
    /// Publishes the server refused because another writer had appended to the partition
    /// first; each was renumbered and published again.
    pub conflicts: u64,
}

/// How far the follower got.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Progress {
    /// The highest stream sequence delivered into the views.
    pub seen: u64,
    /// A message was delivered with nothing pending after it: the replay of the retained
    /// messages at open is over.
    pub replayed: bool,
}

/// What the log, its writers and its follower share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub client: async_nats::Client,
    pub context: jetstream::Context,
    pub stream: stream::Stream,
    pub options: LogOptions,
    pub timeout: Duration,
    /// `twinhub.<name>`: partitions publish on `<prefix>.p.<n>`, purge notices go to
    /// `<prefix>.purged`.
    pub prefix: String,
    pub views: Vec<Mutex<View>>,
    pub tails: Tails,
    /// How far the follower has delivered messages into the views.
    pub progress: watch::Sender<Progress>,
    /// The largest payload of one message.
    pub max_payload: usize,
    pub messages: AtomicU64,
    pub events: AtomicU64,
    pub conflicts: AtomicU64,
}

impl Shared {
    pub(crate) fn subject(&self, partition: u32) -> String {
        format!("{}.p.{partition}", self.prefix)
    }

    pub(crate) fn purged_subject(&self) -> String {
        format!("{}.purged", self.prefix)
    }

    pub(crate) fn view(&self, partition: u32) -> Result<MutexGuard<'_, View>> {
        let view = self
            .views
            .get(partition as usize)
            .ok_or(Error::UnknownPartition(partition))?;
        // Nothing under the lock can panic halfway through; a poisoned lock is still sound.
        Ok(view.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Takes a message into the partition's view and wakes its waiters.
    pub(crate) fn note(&self, partition: u32, entry: Entry, payload: Option<Bytes>) {
        let Ok(mut view) = self.view(partition) else {
            return;
        };
        view.insert(entry, payload);
        let next = view.next_seq();
        drop(view);
        self.tails.publish(partition, next);
    }

    /// A server call bounded by the timeout; both failures are the log being unavailable.
    pub(crate) async fn bounded<T, E: std::fmt::Display>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = std::result::Result<T, E>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Error::Unavailable(format!("{what}: {e}"))),
            Err(_) => Err(Error::Unavailable(format!(
                "{what}: no answer from JetStream within {:?}",
                self.timeout
            ))),
        }
    }
}

/// An [`EventLog`] whose partitions are subjects of one JetStream stream, shared by every hub
/// node that opens the same endpoint (see the crate docs for the design).
#[derive(Debug)]
pub struct JetStreamLog {
    shared: Arc<Shared>,
    stream_name: String,
    /// Per partition, the queue of its writer task; `None` once closed.
    writers: Vec<Mutex<Option<mpsc::UnboundedSender<writer::Request>>>>,
    writer_tasks: Mutex<Vec<JoinHandle<()>>>,
    follower: JoinHandle<()>,
}

impl JetStreamLog {
    /// Connects to `url` and opens the log of endpoint `name` (see [`JetStreamLog::open`]).
    pub async fn connect(url: &str, name: &str, options: LogOptions) -> Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(JetStreamOptions::default().timeout)
            .connect(url)
            .await
            .map_err(|e| Error::Unavailable(format!("connect to {url}: {e}")))?;
        Self::open(client, name, options).await
    }

    /// Opens the log of endpoint `name` (any text: it is made into a stream name and subject
    /// token) on `client`'s JetStream, creating its stream if missing, with the default
    /// [`JetStreamOptions`].
    ///
    /// Fails with [`Error::PartitionMismatch`] when the stream was made for another number of
    /// partitions, [`Error::Unavailable`] when JetStream does not answer.
    pub async fn open(client: async_nats::Client, name: &str, options: LogOptions) -> Result<Self> {
        Self::open_with(client, name, options, JetStreamOptions::default()).await
    }

    /// [`JetStreamLog::open`] with the given JetStream options.
    pub async fn open_with(
        client: async_nats::Client,
        name: &str,
        options: LogOptions,
        jetstream_options: JetStreamOptions,
    ) -> Result<Self> {
        validate(&options)?;
        let token = stream_token(name);
        let stream_name = format!("twinhub-{token}");
        let prefix = format!("twinhub.{token}");
        let mut context = jetstream::new(client.clone());
        context.set_timeout(jetstream_options.timeout);
        let stream = open_stream(
            &context,
            &stream_name,
            &prefix,
            options.partitions,
            &jetstream_options,
        )
        .await?;

        let max_payload = client.server_info().max_payload.saturating_sub(HEADER_ROOM);
        if options.max_event_bytes + wire::FRAME_OVERHEAD > max_payload {
            tracing::warn!(
                max_event_bytes = options.max_event_bytes,
                max_payload,
                "events up to max_event_bytes do not fit one NATS message; raise the server's \
                 max_payload (larger events fail with TooLarge)"
            );
        }
        let shared = Arc::new(Shared {
            views: (0..options.partitions)
                .map(|_| Mutex::new(View::new(options.tail_cache_bytes)))
                .collect(),
            tails: Tails::new(options.partitions),
            progress: watch::Sender::new(Progress::default()),
            client: client.clone(),
            context: context.clone(),
            stream,
            timeout: jetstream_options.timeout,
            prefix,
            options,
            max_payload,
            messages: AtomicU64::new(0),
            events: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
        });

        // Subscribed before the consumer starts, so no purge is missed in between.
        let purges = shared
            .bounded(
                "subscribe to purge notices",
                client.subscribe(shared.purged_subject()),
            )
            .await?;
        let state = shared
            .bounded("stream info", shared.stream.get_info())
            .await?
            .state;
        let messages = shared
            .bounded("create the follower", async {
                let consumer = shared
                    .stream
                    .create_consumer(push::OrderedConfig {
                        deliver_subject: client.new_inbox(),
                        filter_subject: format!("{}.p.*", shared.prefix),
                        headers_only: true,
                        description: Some(format!("twinhub event log follower of {name}")),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                consumer.messages().await.map_err(|e| e.to_string())
            })
            .await?;
        let follower = tokio::spawn(follower::run(Arc::clone(&shared), messages, purges));

        // `info` and `resolve` answer from the views: they must hold every retained message
        // (up to the stream's last at open, or until nothing is pending if that one is gone).
        if state.messages > 0 {
            let last = state.last_sequence;
            let mut progress = shared.progress.subscribe();
            let caught_up = tokio::time::timeout(
                jetstream_options.open_timeout,
                progress.wait_for(|p| p.seen >= last || p.replayed),
            )
            .await;
            if !matches!(caught_up, Ok(Ok(_))) {
                follower.abort();
                return Err(Error::Unavailable(format!(
                    "replaying stream {stream_name} up to sequence {last} took more than {:?}",
                    jetstream_options.open_timeout
                )));
            }
        }

        let mut writers = Vec::new();
        let mut writer_tasks = Vec::new();
        for partition in 0..shared.options.partitions {
            let (sender, receiver) = mpsc::unbounded_channel();
            writers.push(Mutex::new(Some(sender)));
            writer_tasks.push(tokio::spawn(writer::run(
                Arc::clone(&shared),
                partition,
                receiver,
            )));
        }
        Ok(JetStreamLog {
            shared,
            stream_name,
            writers,
            writer_tasks: Mutex::new(writer_tasks),
            follower,
        })
    }

    /// The JetStream stream holding this log.
    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    pub fn stats(&self) -> JetStreamStats {
        JetStreamStats {
            messages: self.shared.messages.load(Ordering::Relaxed),
            events: self.shared.events.load(Ordering::Relaxed),
            conflicts: self.shared.conflicts.load(Ordering::Relaxed),
        }
    }

    /// The subject partition `partition`'s events are published on.
    pub fn subject(&self, partition: u32) -> String {
        self.shared.subject(partition)
    }

    /// Fetches one message's payload; `None` when it is gone (purged, maybe by another node).
    async fn fetch(&self, partition: u32, entry: &Entry) -> Result<Option<Bytes>> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind as Kind;
        let fetched = tokio::time::timeout(
            self.shared.timeout,
            self.shared.stream.get_raw_message(entry.stream_seq),
        )
        .await;
        let message = match fetched {
            Ok(Ok(message)) => message,
            Ok(Err(e)) if e.kind() == Kind::NoMessageFound => return Ok(None),
            Ok(Err(e)) => {
                return Err(Error::Unavailable(format!(
                    "fetch message {}: {e}",
                    entry.stream_seq
                )));
            }
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "fetch message {}: no answer within {:?}",
                    entry.stream_seq, self.shared.timeout
                )));
            }
        };
        let batch = wire::Batch::from_headers(Some(&message.headers));
        if message.subject.as_str() != self.shared.subject(partition) || batch != Some(entry.batch)
        {
            return Err(Error::Corrupt(format!(
                "message {} on {} is not the one the log recorded for partition {partition}",
                entry.stream_seq, message.subject
            )));
        }
        Ok(Some(message.payload))
    }
}

impl JetStreamLog {
    /// The payloads of `messages`, in order, fetched (those not cached) a few at a time.
    async fn fetch_all(
        &self,
        partition: u32,
        messages: Vec<(Entry, Option<Bytes>)>,
    ) -> Vec<Result<Option<Bytes>>> {
        let fetches = messages.into_iter().map(|(entry, cached)| async move {
            match cached {
                Some(payload) => Ok(Some(payload)),
                None => self.fetch(partition, &entry).await,
            }
        });
        futures_util::stream::iter(fetches)
            .buffered(FETCH_AHEAD)
            .collect()
            .await
    }
}

/// How many of `chunk`'s messages (read from `cursor` on) the read's limits can reach, after
/// `events` events of `bytes` bytes, judged by the sizes in their headers: a message that
/// turns out not to be needed is merely fetched for nothing, and one too few only costs
/// another pass.
fn reachable(
    chunk: &[(Entry, Option<Bytes>)],
    cursor: i64,
    mut events: usize,
    mut bytes: usize,
    max_events: usize,
    max_bytes: usize,
) -> usize {
    let mut needed = 0;
    for (entry, _) in chunk {
        if events >= max_events || (events > 0 && bytes > max_bytes) {
            break;
        }
        let batch = &entry.batch;
        let skip = (cursor - batch.first_seq).clamp(0, i64::from(batch.count)) as usize;
        events += batch.count as usize - skip;
        bytes = bytes.saturating_add(usize::try_from(wire::data_len(batch)).unwrap_or(usize::MAX));
        needed += 1;
    }
    needed
}

impl Drop for JetStreamLog {
    fn drop(&mut self) {
        // The writers end with their queues (dropped with `self`); the follower would not.
        self.follower.abort();
    }
}

#[async_trait]
impl EventLog for JetStreamLog {
    fn partition_count(&self) -> u32 {
        self.shared.options.partitions
    }

    async fn append(&self, partition: u32, events: Vec<NewEvent>) -> Result<Vec<Appended>> {
        let queue = self
            .writers
            .get(partition as usize)
            .ok_or(Error::UnknownPartition(partition))?;
        let max = self.shared.options.max_event_bytes;
        if let Some(event) = events.iter().find(|event| event.data.len() > max) {
            return Err(Error::TooLarge {
                size: event.data.len(),
                max,
            });
        }
        let mut frames = BytesMut::with_capacity(
            events
                .iter()
                .map(|e| e.data.len() + wire::FRAME_OVERHEAD)
                .sum(),
        );
        let mut bytes = 0;
        for event in &events {
            wire::put_event(&mut frames, &event.data);
            bytes += wire::record_len(event.data.len());
        }
        // One append is one message, so that it is stored whole or not at all.
        if frames.len() > self.shared.max_payload || events.len() > MAX_EVENTS_PER_MESSAGE {
            return Err(Error::TooLarge {
                size: frames.len(),
                max: self.shared.max_payload,
            });
        }
        let (reply, answer) = oneshot::channel();
        {
            let queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
            // Checked under the queue's lock: `close` takes the queue under it, so an append
            // is either queued before (and finished by the writer) or refused.
            let Some(queue) = queue.as_ref() else {
                return Err(Error::Closed);
            };
            if events.is_empty() {
                return Ok(Vec::new());
            }
            let request = writer::Request {
                count: events.len() as u32,
                frames: frames.freeze(),
                bytes,
                reply,
            };
            if queue.send(request).is_err() {
                return Err(Error::Closed);
            }
        }
        answer.await.unwrap_or(Err(Error::Closed))
    }

    fn info(&self, partition: u32) -> Result<PartitionInfo> {
        Ok(self.shared.view(partition)?.info())
    }

    fn resolve(&self, partition: u32, from: &Position) -> Result<i64> {
        Ok(self.shared.view(partition)?.resolve(from))
    }

    async fn read(
        &self,
        partition: u32,
        next: i64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredEvent>> {
        drop(self.shared.view(partition)?);
        let mut events: Vec<StoredEvent> = Vec::new();
        let mut bytes = 0usize;
        let mut cursor = next;
        // Each pass either reads at least one message or forgets at least one purged one.
        'pass: while events.len() < max_events {
            let chunk = self.shared.view(partition)?.from(cursor, READ_CHUNK);
            let needed = reachable(&chunk, cursor, events.len(), bytes, max_events, max_bytes);
            let payloads = self.fetch_all(partition, chunk[..needed].to_vec()).await;
            if payloads.is_empty() {
                break;
            }
            for ((entry, cached), payload) in chunk.iter().zip(payloads) {
                let Some(payload) = payload? else {
                    // Purged since the view was read: everything older is gone too.
                    let mut view = self.shared.view(partition)?;
                    view.trim_before(entry.stream_seq + 1);
                    if view.holds(entry.stream_seq) {
                        return Err(Error::Corrupt(format!(
                            "message {} of partition {partition} is missing from the stream",
                            entry.stream_seq
                        )));
                    }
                    continue 'pass;
                };
                if cached.is_none() {
                    self.shared
                        .view(partition)?
                        .cache_payload(entry.stream_seq, payload.clone());
                }
                let data = wire::decode(&payload, entry.batch.count)
                    .map_err(|e| Error::Corrupt(format!("message {}: {e}", entry.stream_seq)))?;
                let skip = (cursor - entry.batch.first_seq).max(0) as usize;
                for (i, data) in data.into_iter().enumerate().skip(skip) {
                    if events.len() == max_events
                        || (!events.is_empty() && bytes.saturating_add(data.len()) > max_bytes)
                    {
                        return Ok(events);
                    }
                    bytes += data.len();
                    events.push(StoredEvent {
                        sequence: entry.batch.first_seq + i as i64,
                        offset: wire::offset(entry.stream_seq, i as u32),
                        enqueued_ms: entry.batch.enqueued_ms,
                        data,
                    });
                }
                cursor = entry.batch.end_seq();
            }
        }
        Ok(events)
    }

    async fn wait_for(&self, partition: u32, next: i64) -> Result<()> {
        let known = self.shared.view(partition)?.next_seq();
        if known > next {
            return Ok(());
        }
        self.shared.tails.wait_for(partition, next).await
    }

    async fn enforce_retention(&self, now_ms: i64) -> Result<u64> {
        let retention_ms =
            i64::try_from(self.shared.options.retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now_ms.saturating_sub(retention_ms);
        let mut dropped = 0;
        for partition in 0..self.shared.options.partitions {
            let expired = self
                .shared
                .view(partition)?
                .expired(cutoff, self.shared.options.retention_bytes);
            let Some(expired) = expired else { continue };
            let subject = self.shared.subject(partition);
            self.shared
                .bounded(
                    "purge",
                    self.shared
                        .stream
                        .purge()
                        .filter(subject)
                        .sequence(expired.keep_from)
                        .into_future(),
                )
                .await?;
            self.shared.view(partition)?.trim_before(expired.keep_from);
            dropped += expired.events;
            // Best effort: other nodes also find out when a read meets a purged message.
            let notice = format!("{partition} {}", expired.keep_from);
            if let Err(e) = self
                .shared
                .client
                .publish(self.shared.purged_subject(), notice.into())
                .await
            {
                tracing::debug!(error = %e, "purge notice not sent");
            }
        }
        Ok(dropped)
    }

    async fn close(&self) {
        for queue in &self.writers {
            queue.lock().unwrap_or_else(PoisonError::into_inner).take();
        }
        // Each writer finishes what was queued before its queue closed, then ends.
        let tasks = std::mem::take(
            &mut *self
                .writer_tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for task in tasks {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "an event log writer ended abnormally");
            }
        }
        self.follower.abort();
        self.shared.tails.close();
    }
}

fn validate(options: &LogOptions) -> Result<()> {
    if !(1..=MAX_PARTITIONS).contains(&options.partitions) {
        return Err(Error::InvalidOptions(format!(
            "partitions must be 1..={MAX_PARTITIONS}, not {}",
            options.partitions
        )));
    }
    if options.segment_bytes == 0 {
        return Err(Error::InvalidOptions(
            "segment_bytes must be above 0".into(),
        ));
    }
    Ok(())
}

/// `name` as a stream name and subject token: kept when it only holds ASCII letters, digits,
/// `-` and `_`; otherwise those characters, `_` for the others, and a hash of the original so
/// that two names differing only in such characters get different streams.
pub(crate) fn stream_token(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        return name.to_string();
    }
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let hash = name.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    format!("{cleaned}-{hash:08x}")
}

const PARTITIONS_TAG: &str = "partitions=";

/// Gets the endpoint's stream, or creates it; checks its partition count either way.
async fn open_stream(
    context: &jetstream::Context,
    stream_name: &str,
    prefix: &str,
    partitions: u32,
    options: &JetStreamOptions,
) -> Result<stream::Stream> {
    let config = stream::Config {
        name: stream_name.to_string(),
        description: Some(format!("twinhub event log; {PARTITIONS_TAG}{partitions}")),
        subjects: vec![format!("{prefix}.p.*")],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        num_replicas: options.replicas,
        ..Default::default()
    };
    let mut attempts = 0;
    let stream = loop {
        attempts += 1;
        match tokio::time::timeout(
            options.timeout,
            context.get_or_create_stream(config.clone()),
        )
        .await
        {
            Ok(Ok(stream)) => break stream,
            // Another node may have created it between the look and the create: look again.
            Ok(Err(e)) if attempts < 2 => {
                tracing::debug!(error = %e, stream = stream_name, "creating the stream failed");
            }
            Ok(Err(e)) => {
                return Err(Error::Unavailable(format!(
                    "open stream {stream_name}: {e}"
                )));
            }
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "open stream {stream_name}: no answer within {:?}",
                    options.timeout
                )));
            }
        }
    };
    let existing = &stream.cached_info().config;
    let found = existing
        .description
        .as_deref()
        .and_then(|d| d.rsplit_once(PARTITIONS_TAG))
        .and_then(|(_, n)| n.trim().parse::<u32>().ok());
    match found {
        Some(found) if found == partitions => {}
        Some(found) => {
            return Err(Error::PartitionMismatch {
                found,
                expected: partitions,
            });
        }
        None => {
            return Err(Error::InvalidOptions(format!(
                "stream {stream_name} exists but is not a twinhub event log (its description \
                 does not say its partitions)"
            )));
        }
    }
    if existing.subjects != config.subjects {
        return Err(Error::InvalidOptions(format!(
            "stream {stream_name} has subjects {:?}, not {:?}",
            existing.subjects, config.subjects
        )));
    }
    Ok(stream)
}
