//! A partition's writer task: takes the appends queued for its partition, gathers those
//! waiting into one message (group commit), numbers it after the partition's last message
//! as the view knows it, and publishes it with `Nats-Expected-Last-Subject-Sequence`; when
//! another node got in between, catches up and numbers again. Shares the views with the
//! follower through [`Shared`].

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::HeaderMap;
use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use twinhub_eventlog::{Appended, Error, Result};

use crate::log::Shared;
use crate::view::Entry;
use crate::wire::{self, BATCH_HEADER, Batch, MAX_EVENTS_PER_MESSAGE};

/// One append: its events framed as in a payload, their count and record bytes, and where
/// the outcome goes.
#[derive(Debug)]
pub(crate) struct Request {
    pub count: u32,
    pub frames: Bytes,
    pub bytes: u64,
    pub reply: oneshot::Sender<Result<Vec<Appended>>>,
}

/// Runs until the queue is closed and drained (the log closed or dropped).
pub(crate) async fn run(
    shared: Arc<Shared>,
    partition: u32,
    mut queue: mpsc::UnboundedReceiver<Request>,
) {
    let mut carried: Option<Request> = None;
    loop {
        let first = match carried.take() {
            Some(request) => request,
            None => match queue.recv().await {
                Some(request) => request,
                None => return,
            },
        };
        let mut size = first.frames.len();
        let mut count = first.count as usize;
        let mut group = vec![first];
        // Everything queued while the previous message was in flight goes into this one, as
        // far as one message holds.
        while let Ok(request) = queue.try_recv() {
            if size + request.frames.len() > shared.max_payload
                || count + request.count as usize > MAX_EVENTS_PER_MESSAGE
            {
                carried = Some(request);
                break;
            }
            size += request.frames.len();
            count += request.count as usize;
            group.push(request);
        }
        commit(&shared, partition, group).await;
    }
}

async fn commit(shared: &Shared, partition: u32, group: Vec<Request>) {
    let payload = match group.as_slice() {
        [one] => one.frames.clone(),
        many => {
            let mut payload = BytesMut::with_capacity(many.iter().map(|r| r.frames.len()).sum());
            for request in many {
                payload.extend_from_slice(&request.frames);
            }
            payload.freeze()
        }
    };
    let count: u32 = group.iter().map(|r| r.count).sum();
    let bytes = group.iter().map(|r| r.bytes).sum();
    match publish(shared, partition, payload, count, bytes).await {
        Ok(entry) => {
            let mut index = 0u32;
            for request in group {
                let appended = (index..index + request.count)
                    .map(|i| Appended {
                        sequence: entry.batch.first_seq + i64::from(i),
                        offset: wire::offset(entry.stream_seq, i),
                        enqueued_ms: entry.batch.enqueued_ms,
                    })
                    .collect();
                index += request.count;
                // The caller may have given up waiting; the events are stored all the same.
                let _ = request.reply.send(Ok(appended));
            }
        }
        Err(e) => {
            tracing::warn!(partition, error = %e, "event log append failed");
            let text = e.to_string();
            for request in group {
                let error = match &e {
                    Error::Unavailable(_) => Error::Unavailable(text.clone()),
                    Error::Corrupt(_) => Error::Corrupt(text.clone()),
                    _ => Error::Unavailable(text.clone()),
                };
                let _ = request.reply.send(Err(error));
            }
        }
    }
}

/// Publishes the message after the partition's last one, renumbering it as often as other
/// writers get in first, until it is stored or the timeout passes.
async fn publish(
    shared: &Shared,
    partition: u32,
    payload: Bytes,
    count: u32,
    bytes: u64,
) -> Result<Entry> {
    let deadline = Instant::now() + shared.timeout;
    let subject = shared.subject(partition);
    loop {
        let previous = shared.view(partition)?.last();
        let batch = Batch::next(
            previous.as_ref().map(|e| &e.batch),
            count,
            bytes,
            shared.options.clock.now_ms(),
            shared.options.segment_bytes,
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            previous.map_or(0, |e| e.stream_seq).to_string(),
        );
        headers.insert(BATCH_HEADER, batch.header_value());
        let acked = tokio::time::timeout_at(deadline, async {
            shared
                .context
                .publish_with_headers(subject.clone(), headers, payload.clone())
                .await?
                .await
        })
        .await;
        match acked {
            Ok(Ok(ack)) => {
                let entry = Entry {
                    stream_seq: ack.sequence,
                    batch,
                };
                shared.note(partition, entry, Some(payload));
                shared.messages.fetch_add(1, Ordering::Relaxed);
                shared.events.fetch_add(u64::from(count), Ordering::Relaxed);
                return Ok(entry);
            }
            Ok(Err(e)) if e.kind() == PublishErrorKind::WrongLastSequence => {
                shared.conflicts.fetch_add(1, Ordering::Relaxed);
                catch_up(shared, partition, &subject, deadline).await?;
            }
            Ok(Err(e)) => {
                return Err(Error::Unavailable(format!("publish to {subject}: {e}")));
            }
            Err(_) => {
                return Err(Error::Unavailable(format!(
                    "publish to {subject}: not acknowledged within {:?}",
                    shared.timeout
                )));
            }
        }
    }
}

/// Another writer stored a message on the partition that the view does not hold yet: takes
/// it into the view when it is the next one, else waits for the follower to deliver up to it.
async fn catch_up(shared: &Shared, partition: u32, subject: &str, deadline: Instant) -> Result<()> {
    let last = tokio::time::timeout_at(
        deadline,
        shared.stream.get_last_raw_message_by_subject(subject),
    )
    .await;
    let message = match last {
        Ok(Ok(message)) => message,
        Ok(Err(e)) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
            return Err(Error::Unavailable(format!(
                "{subject} has no message, yet the server refused ours as out of sequence"
            )));
        }
        Ok(Err(e)) => {
            return Err(Error::Unavailable(format!(
                "last message of {subject}: {e}"
            )));
        }
        Err(_) => {
            return Err(Error::Unavailable(format!(
                "last message of {subject}: no answer within {:?}",
                shared.timeout
            )));
        }
    };
    let Some(batch) = Batch::from_headers(Some(&message.headers)) else {
        return Err(Error::Corrupt(format!(
            "message {} on {subject} was not written by a twinhub event log",
            message.sequence
        )));
    };
    {
        let view = shared.view(partition)?;
        if view.last_stream_seq() >= message.sequence {
            return Ok(());
        }
        if batch.first_seq == view.next_seq() {
            drop(view);
            let entry = Entry {
                stream_seq: message.sequence,
                batch,
            };
            shared.note(partition, entry, Some(message.payload));
            return Ok(());
        }
    }
    // More than one message behind: the follower delivers them in order.
    let mut progress = shared.progress.subscribe();
    let waited =
        tokio::time::timeout_at(deadline, progress.wait_for(|p| p.seen >= message.sequence)).await;
    match waited {
        Ok(Ok(_)) => Ok(()),
        _ => Err(Error::Unavailable(format!(
            "the follower did not reach message {} of {subject} within {:?}",
            message.sequence, shared.timeout
        ))),
    }
}
