//! Who reads each partition of each consumer group, for Event Hubs' owner levels (epochs): a
//! receiver with a higher epoch takes the partition from receivers with a lower one or none
//! (they are closed with `amqp:link:stolen`); while an epoch receiver holds it, receivers
//! without one, or with a lower one, are refused. At most five receivers share a partition.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_util::sync::CancellationToken;

/// Event Hubs' limit on concurrent receivers per partition and consumer group.
pub const MAX_READERS: usize = 5;

struct Reader {
    id: u64,
    epoch: Option<i64>,
    stolen: CancellationToken,
}

/// The registry of partition readers.
#[derive(Default)]
pub struct Owners {
    readers: Mutex<HashMap<(String, u32), Vec<Reader>>>,
    next: AtomicU64,
}

/// Why a receiver may not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A receiver with a higher epoch (or any epoch, for one without) holds the partition.
    Outranked(String),
    /// Five receivers read it already.
    Full,
}

/// A place among a partition's readers, given back on drop. `stolen` fires when a receiver
/// with a higher epoch takes the partition.
pub struct Claim {
    owners: Arc<Owners>,
    key: (String, u32),
    id: u64,
    pub stolen: CancellationToken,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut readers = self
            .owners
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(list) = readers.get_mut(&self.key) {
            list.retain(|r| r.id != self.id);
            if list.is_empty() {
                readers.remove(&self.key);
            }
        }
    }
}

impl Owners {
    /// Claims a place for a receiver on `partition` of `group` (compared case-insensitively).
    pub fn claim(
        self: &Arc<Self>,
        group: &str,
        partition: u32,
        epoch: Option<i64>,
    ) -> Result<Claim, Refusal> {
        let key = (group.to_ascii_lowercase(), partition);
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        let list = readers.entry(key.clone()).or_default();
        let highest = list.iter().filter_map(|r| r.epoch).max();
        match (epoch, highest) {
            (None, Some(h)) => {
                return Err(Refusal::Outranked(format!(
                    "a receiver with epoch {h} holds partition {partition}; receivers without an epoch are refused"
                )));
            }
            (Some(e), Some(h)) if e < h => {
                return Err(Refusal::Outranked(format!(
                    "a receiver with the higher epoch {h} holds partition {partition}"
                )));
            }
            _ => {}
        }
        if let Some(e) = epoch {
            // Lower epochs and epoch-less readers lose the partition.
            list.retain(|r| {
                let keep = r.epoch.is_some_and(|x| x >= e);
                if !keep {
                    r.stolen.cancel();
                }
                keep
            });
        }
        if list.len() >= MAX_READERS {
            return Err(Refusal::Full);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let stolen = CancellationToken::new();
        list.push(Reader {
            id,
            epoch,
            stolen: stolen.clone(),
        });
        Ok(Claim {
            owners: self.clone(),
            key,
            id,
            stolen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_epochs_steal_and_lower_ones_are_refused() {
        let owners = Arc::new(Owners::default());
        let plain = owners.claim("$Default", 0, None).unwrap();
        let one = owners.claim("$default", 0, Some(1)).unwrap();
        assert!(plain.stolen.is_cancelled());
        assert!(!one.stolen.is_cancelled());
        assert!(matches!(
            owners.claim("$Default", 0, None),
            Err(Refusal::Outranked(_))
        ));
        assert!(matches!(
            owners.claim("$Default", 0, Some(0)),
            Err(Refusal::Outranked(_))
        ));
        let same = owners.claim("$Default", 0, Some(1)).unwrap();
        assert!(!one.stolen.is_cancelled());
        let two = owners.claim("$Default", 0, Some(2)).unwrap();
        assert!(one.stolen.is_cancelled() && same.stolen.is_cancelled());
        // Another partition and another group are untouched.
        let other = owners.claim("$Default", 1, None).unwrap();
        let other_group = owners.claim("cg", 0, None).unwrap();
        assert!(!other.stolen.is_cancelled() && !other_group.stolen.is_cancelled());
        drop(two);
        drop((one, same, plain));
        assert!(owners.claim("$Default", 0, None).is_ok());
    }

    #[test]
    fn five_readers_at_most() {
        let owners = Arc::new(Owners::default());
        let claims: Vec<_> = (0..MAX_READERS)
            .map(|_| owners.claim("$Default", 0, None).unwrap())
            .collect();
        assert_eq!(owners.claim("$Default", 0, None).err(), Some(Refusal::Full));
        drop(claims);
        assert!(owners.claim("$Default", 0, None).is_ok());
    }
}
