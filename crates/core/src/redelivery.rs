//! The memory of recently answered twin requests, per device, so that a real redelivery (the
//! same `$rid` and payload again, with MQTT's DUP flag) is answered without being applied a
//! second time. Held by the hub rather than by a session, so it survives a session takeover;
//! consulted and updated by `twins` under the device lock, so a redelivery racing its original
//! waits for the original's answer instead of applying again.
//!
//! A request that is not a redelivery is always applied: devices built on Azure's Embedded-C
//! samples send every patch with one constant `$rid`, and the C SDK's counter restarts at
//! every boot, so a `$rid` alone says nothing.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// How long an answer is remembered after it was last sent.
pub const WINDOW: Duration = Duration::from_secs(120);
/// Answers remembered per device; the oldest goes first.
const PER_DEVICE: usize = 64;
const SHARDS: usize = 64;
/// How often a shard is swept of devices whose answers all expired.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// An answer a device was sent for one twin request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinAnswer {
    /// The status in `$iothub/twin/res/{status}`.
    pub status: u16,
    /// `$version` for a successful patch.
    pub version: Option<u64>,
    /// The payload (an error body, or empty).
    pub body: Bytes,
}

impl TwinAnswer {
    /// Whether the same request, sent again, must get this answer again. Server failures and
    /// throttling are transient: a retry deserves another attempt.
    fn is_final(&self) -> bool {
        self.status < 500 && self.status != 429
    }
}

/// One remembered answer, kept small: at a few hundred patches a second the window holds
/// tens of thousands of them. The `$rid` and the payload are kept as keyed hashes.
#[derive(Debug)]
struct Remembered {
    rid: u64,
    digest: u64,
    /// The connection the answer went to: a redelivery on the same connection already has it.
    connection_id: u64,
    answer: TwinAnswer,
    at: Instant,
}

#[derive(Default)]
struct Shard {
    devices: HashMap<String, VecDeque<Remembered>>,
    swept: Option<Instant>,
}

/// What to do with an incoming twin request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redelivered {
    /// Not a redelivery: apply it.
    New,
    /// A redelivery whose answer this connection already got: send nothing.
    AlreadyAnswered,
    /// A redelivery on a later connection: send this answer again.
    Resend(TwinAnswer),
}

/// Per-device memory of recent twin answers.
pub struct Redelivery {
    shards: Vec<Mutex<Shard>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Redelivery {
    fn default() -> Self {
        Redelivery {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: Default::default(),
        }
    }
}

impl Redelivery {
    /// Keyed (random per process) hashes: a device cannot aim a collision at its own
    /// requests.
    fn rid_hash(&self, rid: &str) -> u64 {
        self.hasher.hash_one(("rid", rid))
    }

    fn digest(&self, payload: &[u8]) -> u64 {
        self.hasher.hash_one(payload)
    }

    fn shard(&self, device_id: &str) -> std::sync::MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(device_id) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Classifies a request. Only a DUP request with a remembered `$rid` and the same payload
    /// is a redelivery.
    pub fn check(
        &self,
        device_id: &str,
        connection_id: u64,
        rid: &str,
        dup: bool,
        payload: &[u8],
    ) -> Redelivered {
        if !dup {
            return Redelivered::New;
        }
        let (rid, d) = (self.rid_hash(rid), self.digest(payload));
        let now = Instant::now();
        let mut shard = self.shard(device_id);
        let Some(list) = shard.devices.get_mut(device_id) else {
            return Redelivered::New;
        };
        let Some(seen) = list
            .iter_mut()
            .rev()
            .find(|r| r.rid == rid && r.digest == d && now.duration_since(r.at) < WINDOW)
        else {
            return Redelivered::New;
        };
        if seen.connection_id == connection_id {
            return Redelivered::AlreadyAnswered;
        }
        seen.connection_id = connection_id;
        seen.at = now;
        Redelivered::Resend(seen.answer.clone())
    }

    /// Remembers the answer to a request just handled (transient failures are not kept).
    pub fn remember(
        &self,
        device_id: &str,
        connection_id: u64,
        rid: &str,
        payload: &[u8],
        answer: &TwinAnswer,
    ) {
        let (rid, digest) = (self.rid_hash(rid), self.digest(payload));
        let now = Instant::now();
        let mut shard = self.shard(device_id);
        if shard
            .swept
            .is_none_or(|at| now.duration_since(at) >= SWEEP_EVERY)
        {
            shard.swept = Some(now);
            shard.devices.retain(|_, list| {
                list.retain(|r| now.duration_since(r.at) < WINDOW);
                // A burst's capacity is given back once its answers expire.
                if list.capacity() > 2 * list.len() + 8 {
                    list.shrink_to(list.len() + 4);
                }
                !list.is_empty()
            });
        }
        let list = shard.devices.entry(device_id.to_string()).or_default();
        // The newest answer for a `$rid` replaces any older one.
        list.retain(|r| r.rid != rid);
        if !answer.is_final() {
            return;
        }
        if list.len() >= PER_DEVICE {
            list.pop_front();
        }
        list.push_back(Remembered {
            rid,
            digest,
            connection_id,
            answer: answer.clone(),
            at: now,
        });
    }

    /// Forgets a device (deleted: a namesake created later starts clean).
    pub fn forget(&self, device_id: &str) {
        self.shard(device_id).devices.remove(device_id);
    }

    /// Devices with remembered answers (for tests and metrics).
    pub fn devices(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).devices.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(version: u64) -> TwinAnswer {
        TwinAnswer {
            status: 204,
            version: Some(version),
            body: Bytes::new(),
        }
    }

    #[test]
    fn only_a_dup_with_the_same_payload_is_a_redelivery() {
        let r = Redelivery::default();
        r.remember("d", 1, "7", b"{\"a\":1}", &ok(2));
        // Same $rid, no DUP: a new request (a constant-$rid device, or a rebooted one).
        assert_eq!(r.check("d", 1, "7", false, b"{\"a\":1}"), Redelivered::New);
        // DUP but another payload: new.
        assert_eq!(r.check("d", 2, "7", true, b"{\"a\":2}"), Redelivered::New);
        // DUP, same payload, same connection: answered already.
        assert_eq!(
            r.check("d", 1, "7", true, b"{\"a\":1}"),
            Redelivered::AlreadyAnswered
        );
        // DUP, same payload, a later connection: the same answer again, once.
        assert_eq!(
            r.check("d", 2, "7", true, b"{\"a\":1}"),
            Redelivered::Resend(ok(2))
        );
        assert_eq!(
            r.check("d", 2, "7", true, b"{\"a\":1}"),
            Redelivered::AlreadyAnswered
        );
        // Other devices are unaffected.
        assert_eq!(r.check("e", 2, "7", true, b"{\"a\":1}"), Redelivered::New);
    }

    #[test]
    fn transient_failures_are_not_remembered_and_the_newest_answer_wins() {
        let r = Redelivery::default();
        r.remember("d", 1, "1", b"{}", &ok(2));
        let busy = TwinAnswer {
            status: 503,
            version: None,
            body: Bytes::from_static(b"{}"),
        };
        r.remember("d", 1, "1", b"{}", &busy);
        assert_eq!(r.check("d", 2, "1", true, b"{}"), Redelivered::New);
        r.remember("d", 1, "1", b"{}", &ok(3));
        assert_eq!(
            r.check("d", 2, "1", true, b"{}"),
            Redelivered::Resend(ok(3))
        );
        r.forget("d");
        assert_eq!(r.devices(), 0);
    }

    #[test]
    fn at_most_64_answers_per_device() {
        let r = Redelivery::default();
        for i in 0..100u64 {
            r.remember("d", 1, &i.to_string(), b"{}", &ok(i));
        }
        assert_eq!(r.check("d", 2, "0", true, b"{}"), Redelivered::New);
        assert_eq!(
            r.check("d", 2, "99", true, b"{}"),
            Redelivered::Resend(ok(99))
        );
    }
}
