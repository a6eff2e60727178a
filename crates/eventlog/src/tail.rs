//! Wakes tailing readers: one watch channel per partition carries the next sequence number to
//! be published and whether the log closed. Both backends publish through it after an append
//! is visible to reads, so a woken reader always finds the event.

use tokio::sync::watch;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy)]
struct Tail {
    next: i64,
    closed: bool,
}

#[derive(Debug)]
pub(crate) struct Tails {
    partitions: Vec<watch::Sender<Tail>>,
}

impl Tails {
    /// One channel per partition, starting at each partition's next sequence number.
    pub(crate) fn new(nexts: impl IntoIterator<Item = i64>) -> Self {
        Tails {
            partitions: nexts
                .into_iter()
                .map(|next| {
                    watch::Sender::new(Tail {
                        next,
                        closed: false,
                    })
                })
                .collect(),
        }
    }

    pub(crate) fn publish(&self, partition: u32, next: i64) {
        if let Some(sender) = self.partitions.get(partition as usize) {
            sender.send_modify(|tail| tail.next = tail.next.max(next));
        }
    }

    pub(crate) fn close(&self) {
        for sender in &self.partitions {
            sender.send_modify(|tail| tail.closed = true);
        }
    }

    pub(crate) async fn wait_for(&self, partition: u32, next: i64) -> Result<()> {
        let Some(sender) = self.partitions.get(partition as usize) else {
            return Err(Error::UnknownPartition(partition));
        };
        let mut receiver = sender.subscribe();
        // The sender lives as long as `self`, so `wait_for` cannot see it dropped.
        let tail = receiver
            .wait_for(|tail| tail.next > next || tail.closed)
            .await
            .map_err(|_| Error::Closed)?;
        if tail.next > next {
            Ok(())
        } else {
            Err(Error::Closed)
        }
    }
}
