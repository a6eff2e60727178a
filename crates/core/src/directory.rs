//! The directory of connected devices: which session serves which device, what it has
//! subscribed to, and how to reach it. A session registers a [`SessionHandle`]; the hub sends
//! it [`SessionCommand`]s over a bounded [`command_queue`]. Sharded so connects and lookups
//! on different devices never contend on one lock.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use tokio::sync::mpsc::error::{TryRecvError, TrySendError};
use tokio::sync::{Notify, OwnedMutexGuard, oneshot};

const SHARDS: usize = 64;

/// Why the hub closes a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Another connection for the same device took over.
    ReplacedByNewConnection,
    /// The device was disabled or deleted.
    DeviceDisabled,
    /// The session's command queue overflowed; the device will resync on reconnect.
    SlowConsumer,
    /// The hub is shutting down.
    Shutdown,
}

/// A device's answer to a direct method.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResponse {
    pub status: i32,
    /// The device's JSON payload, validated as JSON by the session.
    pub payload: Bytes,
}

/// Why a method call failed inside the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodFailure {
    /// The device's reply was not acceptable (too large, not JSON).
    BadResponse(String),
}

/// What the hub asks of a session.
#[derive(Debug)]
pub enum SessionCommand {
    /// Publish a method request and answer `reply` with the device's response.
    InvokeMethod {
        method_name: String,
        payload: Bytes,
        reply: oneshot::Sender<Result<MethodResponse, MethodFailure>>,
    },
    /// Publish a desired-properties patch (payload already carries `$version`).
    DesiredPatch { version: u64, payload: Bytes },
}

/// A bounded queue of commands for one session: the hub's side ([`CommandSender`], in the
/// session's handle) and the session's ([`CommandReceiver`]).
///
/// Not a tokio channel because of what an idle session pays for one: a bounded `mpsc`
/// allocates its first block of 32 slots (2 KiB for `SessionCommand`) and over 600 bytes of
/// cache-padded state up front, for every connected device, while almost every device waits
/// for commands that rarely come. Here the slots exist only while commands wait, and the
/// shared state is about a hundred bytes.
pub fn command_queue(capacity: usize) -> (CommandSender, CommandReceiver) {
    let shared = Arc::new(CommandShared {
        state: Mutex::new(CommandState {
            queued: VecDeque::new(),
            closed: false,
        }),
        ready: Notify::new(),
        capacity,
    });
    (
        CommandSender {
            shared: shared.clone(),
        },
        CommandReceiver { shared },
    )
}

/// Commands a session keeps room for once the queue has emptied: a few, so a device taking
/// a steady trickle of calls does not allocate for each, and no more, so a burst does not
/// pin its peak for the connection's life.
const KEEP_SLOTS: usize = 4;

#[derive(Debug)]
struct CommandShared {
    state: Mutex<CommandState>,
    /// Wakes the receiver; `notify_one` keeps a permit when it is not waiting.
    ready: Notify,
    capacity: usize,
}

#[derive(Debug)]
struct CommandState {
    queued: VecDeque<SessionCommand>,
    /// The receiver is gone: sends fail, as a closed channel's do.
    closed: bool,
}

impl CommandShared {
    fn state(&self) -> std::sync::MutexGuard<'_, CommandState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The hub's side of a session's [`command_queue`].
#[derive(Debug, Clone)]
pub struct CommandSender {
    shared: Arc<CommandShared>,
}

impl CommandSender {
    /// Queues `command` without waiting, or hands it back: `Full` when the session has
    /// `capacity` commands waiting, `Closed` when the session has ended.
    pub fn try_send(&self, command: SessionCommand) -> Result<(), TrySendError<SessionCommand>> {
        let mut state = self.shared.state();
        if state.closed {
            return Err(TrySendError::Closed(command));
        }
        if state.queued.len() >= self.shared.capacity {
            return Err(TrySendError::Full(command));
        }
        state.queued.push_back(command);
        drop(state);
        self.shared.ready.notify_one();
        Ok(())
    }
}

/// The session's side of its [`command_queue`]. Dropping it closes the queue and drops what
/// waits in it (a method caller then sees its reply channel closed).
#[derive(Debug)]
pub struct CommandReceiver {
    shared: Arc<CommandShared>,
}

impl CommandReceiver {
    /// The next command, waiting for one. Cancel-safe: a command is taken only by the poll
    /// that returns it. Always `Some` (the session holds a sender in its own handle); an
    /// `Option` as a channel's `recv` is.
    pub async fn recv(&mut self) -> Option<SessionCommand> {
        loop {
            if let Ok(command) = self.try_recv() {
                return Some(command);
            }
            self.shared.ready.notified().await;
        }
    }

    /// The next command if one is waiting (`Empty` otherwise), as a channel's `try_recv`.
    pub fn try_recv(&mut self) -> Result<SessionCommand, TryRecvError> {
        let mut state = self.shared.state();
        let command = state.queued.pop_front();
        if state.queued.is_empty() && state.queued.capacity() > KEEP_SLOTS {
            state.queued = VecDeque::new();
        }
        command.ok_or(TryRecvError::Empty)
    }
}

impl Drop for CommandReceiver {
    fn drop(&mut self) {
        let queued = {
            let mut state = self.shared.state();
            state.closed = true;
            std::mem::take(&mut state.queued)
        };
        // Outside the lock: dropping a method's reply wakes its caller.
        drop(queued);
    }
}

/// An out-of-band request to close a session; works even when its command queue is full.
#[derive(Debug, Default)]
pub struct CloseSignal {
    reason: Mutex<Option<CloseReason>>,
    notify: Notify,
}

impl CloseSignal {
    pub fn close(&self, reason: CloseReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        self.notify.notify_one();
    }

    /// Whether [`CloseSignal::close`] has been called.
    pub fn is_closed(&self) -> bool {
        self.reason().is_some()
    }

    /// The first reason given to [`CloseSignal::close`], if it has been called.
    pub fn reason(&self) -> Option<CloseReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Completes when [`CloseSignal::close`] has been called; yields the first reason.
    pub async fn closed(&self) -> CloseReason {
        loop {
            let notified = self.notify.notified();
            if let Some(r) = *self.reason.lock().unwrap_or_else(|e| e.into_inner()) {
                return r;
            }
            notified.await;
        }
    }
}

/// Subscription flags a session publishes for the hub's routing decisions.
pub mod subs {
    pub const METHODS: u8 = 1;
    pub const DESIRED: u8 = 2;
    pub const TWIN_RESPONSES: u8 = 4;
    pub const C2D: u8 = 8;
}

/// How the hub reaches one connected session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub connection_id: u64,
    pub commands: CommandSender,
    pub close: Arc<CloseSignal>,
    subscriptions: Arc<AtomicU8>,
}

impl SessionHandle {
    pub fn new(commands: CommandSender) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        SessionHandle {
            connection_id: NEXT.fetch_add(1, Ordering::Relaxed),
            commands,
            close: Arc::new(CloseSignal::default()),
            subscriptions: Arc::new(AtomicU8::new(0)),
        }
    }

    pub fn is_subscribed(&self, flag: u8) -> bool {
        self.subscriptions.load(Ordering::Acquire) & flag != 0
    }

    pub fn subscriptions(&self) -> u8 {
        self.subscriptions.load(Ordering::Acquire)
    }
}

type Shard = RwLock<HashMap<String, SessionHandle>>;

type Watchers = Mutex<HashMap<String, Arc<Notify>>>;

/// Device id → the session currently serving it.
pub struct Directory {
    shards: Vec<Shard>,
    hasher: std::collections::hash_map::RandomState,
    connected: AtomicUsize,
    /// Per device, woken when a session for it registers or subscribes (for method
    /// connect-timeouts). Only devices someone waits for have an entry, so a reconnect storm
    /// wakes only the waiters of the devices that reconnect.
    watchers: Vec<Watchers>,
}

impl Default for Directory {
    fn default() -> Self {
        Directory {
            watchers: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: Default::default(),
            connected: AtomicUsize::new(0),
        }
    }
}

/// Sessions are keyed by identity key; a module's holds a '/'.
fn is_module_key(key: &str) -> bool {
    key.contains('/')
}

impl Directory {
    fn shard(&self, device_id: &str) -> &Shard {
        &self.shards[self.shard_index(device_id)]
    }

    /// Registers `handle` for `device_id`; returns the handle it replaced, if any.
    pub fn register(&self, device_id: &str, handle: SessionHandle) -> Option<SessionHandle> {
        let old = self
            .shard(device_id)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(device_id.to_string(), handle);
        if old.is_none() && !is_module_key(device_id) {
            self.connected.fetch_add(1, Ordering::Relaxed);
        }
        self.wake(device_id);
        old
    }

    /// Removes the entry for `device_id` if it is still `connection_id`'s. Returns whether
    /// it was removed.
    pub fn unregister(&self, device_id: &str, connection_id: u64) -> bool {
        let mut shard = self
            .shard(device_id)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if shard
            .get(device_id)
            .is_some_and(|h| h.connection_id == connection_id)
        {
            shard.remove(device_id);
            if !is_module_key(device_id) {
                self.connected.fetch_sub(1, Ordering::Relaxed);
            }
            true
        } else {
            false
        }
    }

    pub fn get(&self, device_id: &str) -> Option<SessionHandle> {
        self.shard(device_id)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(device_id)
            .cloned()
    }

    pub fn is_connected(&self, device_id: &str) -> bool {
        self.shard(device_id)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(device_id)
    }

    /// Connected devices (IoT Hub's `connectedDeviceCount`); module sessions are not counted.
    pub fn connected_count(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Records a session's subscriptions (a bit set of [`subs`]) and wakes the device's
    /// waiters.
    pub fn set_subscriptions(&self, device_id: &str, handle: &SessionHandle, flags: u8) {
        handle.subscriptions.store(flags, Ordering::Release);
        self.wake(device_id);
    }

    fn shard_index(&self, device_id: &str) -> usize {
        (self.hasher.hash_one(device_id) as usize) % SHARDS
    }

    fn wake(&self, device_id: &str) {
        let watchers = self.watchers[self.shard_index(device_id)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = watchers.get(device_id) {
            n.notify_waiters();
        }
    }

    /// Watches `device_id` for registrations and subscription changes until dropped.
    pub fn watch(&self, device_id: &str) -> Watch<'_> {
        let notify = self.watchers[self.shard_index(device_id)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(device_id.to_string())
            .or_default()
            .clone();
        Watch {
            directory: self,
            device_id: device_id.to_string(),
            notify,
        }
    }

    /// Every registered handle (for shutdown).
    pub fn all(&self) -> Vec<SessionHandle> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.read()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// A registration for one device's changes; see [`Directory::watch`].
pub struct Watch<'a> {
    directory: &'a Directory,
    device_id: String,
    notify: Arc<Notify>,
}

impl Watch<'_> {
    /// A future that completes at the device's next change. Create (and `enable`) it before
    /// checking the state it waits on, so a change in between is not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut watchers = self.directory.watchers[self.directory.shard_index(&self.device_id)]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Clones are made under this lock, so a count of two means only the map and this
        // watch hold it.
        if watchers
            .get(&self.device_id)
            .is_some_and(|n| Arc::strong_count(n) == 2)
        {
            watchers.remove(&self.device_id);
        }
    }
}

/// One async mutex per key, created on demand and dropped when unused, so a slow write to
/// one device never queues writes to another.
pub struct KeyedLocks {
    shards: Vec<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for KeyedLocks {
    fn default() -> Self {
        KeyedLocks {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }
}

/// Holds a key's lock; releases it (and forgets the key when no one waits) on drop. Also
/// dropped while still waiting (a cancelled caller), which forgets the key just the same.
pub struct KeyGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    mutex: Option<Arc<tokio::sync::Mutex<()>>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    pub async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let mutex = {
            let mut map = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        let mut held = KeyGuard {
            locks: self,
            key: key.to_string(),
            mutex: Some(mutex.clone()),
            guard: None,
        };
        held.guard = Some(mutex.lock_owned().await);
        held
    }

    /// Keys currently held or waited for (for tests).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut map = self
            .locks
            .shard(&self.key)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        drop(self.guard.take());
        drop(self.mutex.take());
        // Clones are made under the map's lock, so a count of one means only the map holds
        // it: nobody holds or waits for the key any more.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn register_replace_unregister() {
        let d = Directory::default();
        let (tx, _rx) = command_queue(1);
        let h1 = SessionHandle::new(tx.clone());
        let h2 = SessionHandle::new(tx);
        assert!(d.register("a", h1.clone()).is_none());
        assert_eq!(d.connected_count(), 1);
        let old = d.register("a", h2.clone()).unwrap();
        assert_eq!(old.connection_id, h1.connection_id);
        assert_eq!(d.connected_count(), 1);
        // The replaced session's late unregister must not remove the new one.
        assert!(!d.unregister("a", h1.connection_id));
        assert!(d.is_connected("a"));
        assert!(d.unregister("a", h2.connection_id));
        assert_eq!(d.connected_count(), 0);
    }

    #[tokio::test]
    async fn command_queue_is_bounded_wakes_its_receiver_and_closes_with_it() {
        let desired = |version| SessionCommand::DesiredPatch {
            version,
            payload: Bytes::new(),
        };
        let version = |c: SessionCommand| match c {
            SessionCommand::DesiredPatch { version, .. } => version,
            other => panic!("unexpected {other:?}"),
        };
        let (tx, mut rx) = command_queue(2);
        assert!(rx.try_recv().is_err());
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            (rx, first)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_send(desired(1)).unwrap();
        let (mut rx, first) = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("a send must wake the waiting receiver")
            .unwrap();
        assert_eq!(version(first.unwrap()), 1);
        tx.try_send(desired(2)).unwrap();
        tx.try_send(desired(3)).unwrap();
        assert!(matches!(
            tx.try_send(desired(4)),
            Err(TrySendError::Full(_))
        ));
        assert_eq!(version(rx.recv().await.unwrap()), 2);
        assert_eq!(version(rx.try_recv().unwrap()), 3);
        assert!(rx.try_recv().is_err());
        // A burst's room is given back once the queue is empty.
        let (tx, mut rx) = command_queue(64);
        for v in 0..64 {
            tx.try_send(desired(v)).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert!(tx.shared.state().queued.capacity() <= KEEP_SLOTS);
        // What still waits is dropped with the receiver: a method caller sees its reply
        // channel closed instead of waiting for its timeout.
        let (reply, answer) = oneshot::channel();
        tx.try_send(SessionCommand::InvokeMethod {
            method_name: "m".into(),
            payload: Bytes::new(),
            reply,
        })
        .unwrap();
        drop(rx);
        assert!(answer.await.is_err());
        assert!(matches!(
            tx.try_send(desired(9)),
            Err(TrySendError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn keyed_locks_serialize_one_key_only() {
        let locks = Arc::new(KeyedLocks::default());
        let g = locks.lock("x").await;
        // Another key is free.
        tokio::time::timeout(Duration::from_millis(100), locks.lock("y"))
            .await
            .expect("other key blocked");
        // Same key waits.
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock("x").await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(g);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("waiter never got the lock")
            .unwrap();
        assert!(locks.is_empty(), "unused keys must be forgotten");
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_no_key_behind() {
        let locks = Arc::new(KeyedLocks::default());
        let g = locks.lock("x").await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock("x").await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The holder leaves while the waiter still waits, then the waiter gives up.
        drop(g);
        waiter.abort();
        let _ = waiter.await;
        assert!(locks.is_empty(), "a cancelled waiter leaked its key");
    }

    #[tokio::test]
    async fn watchers_are_per_device_and_forgotten() {
        let d = Directory::default();
        let w = d.watch("a");
        {
            let changed = w.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (tx, _rx) = command_queue(1);
            // Another device's registration does not wake a's waiter.
            d.register("b", SessionHandle::new(tx.clone()));
            assert!(
                tokio::time::timeout(Duration::from_millis(20), changed.as_mut())
                    .await
                    .is_err()
            );
            d.register("a", SessionHandle::new(tx));
            tokio::time::timeout(Duration::from_secs(1), changed)
                .await
                .expect("a's registration must wake its waiter");
        }
        drop(w);
        assert!(d.watchers.iter().all(|s| s.lock().unwrap().is_empty()));
    }
}
