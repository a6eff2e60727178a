//! The follower task: how a node sees every node's appends and purges. An ordered push
//! consumer delivers the headers of every message on the partitions' subjects, in stream
//! order (it recreates itself after a reconnect or a gap, from the last sequence delivered);
//! each enters its partition's view and wakes that partition's waiters. Purge notices from
//! other nodes trim the views. Runs until the log closes or is dropped.

use std::sync::Arc;
use std::time::Duration;

use async_nats::Subscriber;
use async_nats::jetstream::consumer::push::Ordered;
use futures_util::StreamExt;

use crate::log::Shared;
use crate::view::Entry;
use crate::wire::Batch;

/// A pause after a consumer error, so that a failing server does not make this task spin
/// (the consumer recovers by itself; this is not polling for messages).
const ERROR_PAUSE: Duration = Duration::from_millis(100);

pub(crate) async fn run(shared: Arc<Shared>, mut messages: Ordered, purges: Subscriber) {
    let mut purges = Some(purges);
    loop {
        let notice = async {
            match purges.as_mut() {
                Some(purges) => purges.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            message = messages.next() => match message {
                Some(Ok(message)) => deliver(&shared, &message),
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "event log follower: consumer error");
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
                None => {
                    tracing::warn!("event log follower: the consumer ended");
                    return;
                }
            },
            notice = notice => match notice {
                Some(notice) => purged(&shared, &notice.payload),
                None => purges = None,
            },
        }
    }
}

fn deliver(shared: &Shared, message: &async_nats::jetstream::Message) {
    let Ok(info) = message.info() else {
        tracing::warn!(subject = %message.subject, "event log follower: a message without info");
        return;
    };
    let stream_seq = info.stream_sequence;
    let partition = message
        .subject
        .as_str()
        .strip_prefix(shared.prefix.as_str())
        .and_then(|rest| rest.strip_prefix(".p."))
        .and_then(|n| n.parse::<u32>().ok());
    match (partition, Batch::from_headers(message.headers.as_ref())) {
        (Some(partition), Some(batch)) if partition < shared.options.partitions => {
            shared.note(partition, Entry { stream_seq, batch }, None);
        }
        _ => tracing::warn!(
            subject = %message.subject,
            stream_seq,
            "event log follower: a message not written by a twinhub event log; ignored"
        ),
    }
    let replayed = info.pending == 0;
    shared.progress.send_if_modified(|progress| {
        let changed = stream_seq > progress.seen || (replayed && !progress.replayed);
        progress.seen = progress.seen.max(stream_seq);
        progress.replayed |= replayed;
        changed
    });
}

/// A notice `<partition> <stream sequence>`: the partition's messages below it were purged.
fn purged(shared: &Shared, payload: &[u8]) {
    let parsed = std::str::from_utf8(payload).ok().and_then(|text| {
        let (partition, keep_from) = text.split_once(' ')?;
        Some((
            partition.parse::<u32>().ok()?,
            keep_from.parse::<u64>().ok()?,
        ))
    });
    match parsed {
        Some((partition, keep_from)) => {
            if let Ok(mut view) = shared.view(partition) {
                view.trim_before(keep_from);
            }
        }
        None => tracing::debug!("event log follower: an unreadable purge notice"),
    }
}
