//! Operator-set throttles: token buckets per device (connects, twin writes, device-to-cloud
//! messages) and one for the hub's REST operations. IoT Hub has fixed throttles per tier;
//! twinhub's are the operator's to set, off unless configured (but for a generous connect
//! limit, so a device flapping between two clones costs bounded durable writes). A refusal is
//! IoT Hub's ThrottlingException and is counted in `twinhub_throttled_total`.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use twinhub_proto::error::ErrorCode;

use crate::error::{Error, Result};

const SHARDS: usize = 64;
/// A bucket holds this many seconds of its rate (at least one token).
const BURST_SECONDS: f64 = 10.0;
/// How often a shard forgets devices whose buckets are full again.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The configured rates, in operations per second; 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThrottleConfig {
    /// MQTT CONNECTs per device.
    pub device_connects: f64,
    /// Reported-property patches per device.
    pub device_twin_writes: f64,
    /// Device-to-cloud messages per device (over the limit, the device's acks are delayed).
    pub device_d2c: f64,
    /// REST operations for the whole hub.
    pub rest: f64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            device_connects: 5.0,
            device_twin_writes: 0.0,
            device_d2c: 0.0,
            rest: 0.0,
        }
    }
}

impl ThrottleConfig {
    /// Refuses negative, infinite or NaN rates.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, v) in [
            ("throttle_device_connects", self.device_connects),
            ("throttle_device_twin_writes", self.device_twin_writes),
            ("throttle_device_d2c", self.device_d2c),
            ("throttle_rest", self.rest),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{name} must be a rate >= 0 (0 is off), not {v}"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Self {
        Bucket {
            tokens: capacity,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, capacity: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        self.at = now;
    }

    /// Takes a token if one is there; otherwise how long until one is.
    fn take(
        &mut self,
        rate: f64,
        capacity: f64,
        now: Instant,
    ) -> std::result::Result<(), Duration> {
        self.refill(rate, capacity, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }
}

/// One shard of a limit: the buckets of its keys, and when it was last swept.
type Shard = Mutex<(HashMap<String, Bucket>, Option<Instant>)>;

/// One limit over many keys.
struct Keyed {
    rate: f64,
    capacity: f64,
    kind: &'static str,
    shards: Vec<Shard>,
    hasher: std::collections::hash_map::RandomState,
}

impl Keyed {
    fn new(rate: f64, kind: &'static str) -> Self {
        Keyed {
            rate,
            capacity: (rate * BURST_SECONDS).max(1.0),
            kind,
            shards: (0..SHARDS)
                .map(|_| Mutex::new((HashMap::new(), None)))
                .collect(),
            hasher: Default::default(),
        }
    }

    fn take(&self, key: &str) -> std::result::Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        let mut guard = self.shards[i].lock().unwrap_or_else(|e| e.into_inner());
        let (map, swept) = &mut *guard;
        if swept.is_none_or(|at| now.duration_since(at) >= SWEEP_EVERY) {
            *swept = Some(now);
            let (rate, capacity) = (self.rate, self.capacity);
            map.retain(|_, b| {
                b.refill(rate, capacity, now);
                b.tokens < capacity
            });
        }
        let bucket = map
            .entry(key.to_string())
            .or_insert_with(|| Bucket::full(self.capacity, now));
        let taken = bucket.take(self.rate, self.capacity, now);
        if taken.is_err() {
            metrics::counter!("twinhub_throttled_total", "kind" => self.kind).increment(1);
        }
        taken
    }
}

/// Every throttle of the hub.
pub struct Throttles {
    connects: Keyed,
    twin_writes: Keyed,
    d2c: Keyed,
    rest: Keyed,
}

fn throttled(what: String) -> Error {
    Error::new(ErrorCode::ThrottlingException, what)
}

impl Throttles {
    pub fn new(config: &ThrottleConfig) -> Self {
        Throttles {
            connects: Keyed::new(config.device_connects, "device_connect"),
            twin_writes: Keyed::new(config.device_twin_writes, "device_twin_write"),
            d2c: Keyed::new(config.device_d2c, "device_d2c"),
            rest: Keyed::new(config.rest, "rest"),
        }
    }

    /// A device's CONNECT.
    pub fn connect(&self, device_id: &str) -> Result<()> {
        self.connects.take(device_id).map_err(|_| {
            throttled(format!(
                "Device '{device_id}' connects more often than this hub allows"
            ))
        })
    }

    /// A device's reported-properties patch.
    pub fn twin_write(&self, device_id: &str) -> Result<()> {
        self.twin_writes.take(device_id).map_err(|_| {
            throttled(format!(
                "Device '{device_id}' updates its twin more often than this hub allows"
            ))
        })
    }

    /// A device-to-cloud message: `Err(wait)` says how long to hold its acknowledgement.
    pub fn d2c(&self, device_id: &str) -> std::result::Result<(), Duration> {
        self.d2c.take(device_id)
    }

    /// One REST operation.
    pub fn rest(&self) -> Result<()> {
        self.rest
            .take("")
            .map_err(|_| throttled("The hub's REST request rate limit was exceeded".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_a_burst_then_the_rate() {
        let t = Throttles::new(&ThrottleConfig {
            device_connects: 1.0,
            device_twin_writes: 0.0,
            device_d2c: 0.5,
            rest: 0.0,
        });
        for _ in 0..10 {
            t.connect("a").unwrap();
        }
        let err = t.connect("a").unwrap_err();
        assert_eq!(err.code(), ErrorCode::ThrottlingException);
        // Per device: another device has its own bucket.
        t.connect("b").unwrap();
        // Off: never refused.
        for _ in 0..1000 {
            t.twin_write("a").unwrap();
            t.rest().unwrap();
        }
        for _ in 0..5 {
            t.d2c("a").unwrap();
        }
        let wait = t.d2c("a").unwrap_err();
        assert!(
            wait > Duration::from_millis(1500) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
    }

    #[test]
    fn bad_rates_are_refused() {
        let mut c = ThrottleConfig::default();
        assert!(c.validate().is_ok());
        c.rest = -1.0;
        assert!(c.validate().is_err());
        c.rest = f64::NAN;
        assert!(c.validate().is_err());
    }
}
