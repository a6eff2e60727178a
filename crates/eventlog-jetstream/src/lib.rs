//! The [`twinhub_eventlog::EventLog`] trait on NATS JetStream, so that several hub nodes share
//! one event stream per endpoint: every node appends to any partition and reads every
//! partition, seeing the others' appends. [`JetStreamLog`] is the backend; `wire` is the
//! message format, `view` the per-partition state each node keeps, `writer` the appends,
//! `follower` how a node sees the others' appends and purges.
//!
//! # Layout
//!
//! One stream per endpoint, `twinhub-<name>` (file storage), whose subjects are
//! `twinhub.<name>.p.<partition>`; its description records the partition count, checked on
//! open. One append is one JetStream message: the events' data framed in the payload, and a
//! `Twinhub-Batch` header carrying what the log assigned to them: the first partition
//! sequence number, the count, the enqueued time, the records' size and the segment the batch
//! belongs to. A batch is therefore stored whole or not at all, with consecutive numbers,
//! whatever other writers do.
//!
//! # Numbering across writers
//!
//! Everything a message carries follows from the partition's previous message: the first
//! sequence is the previous one's end, the time is the clock's but never below the previous
//! one's, the segment continues or rolls as the sizes say. A writer publishes with
//! `Nats-Expected-Last-Subject-Sequence` set to the stream sequence of the partition's last
//! message as it knows it, so the server stores the message only if no other writer got in
//! between. When one did (the server answers "wrong last sequence"), the writer learns the
//! partition's newest message (from the server, or from the follower when it is more than one
//! message behind), renumbers and publishes again, within the timeout. So two nodes never
//! give out one number twice, never skip one, and enqueued times never go back, whatever
//! their clocks say.
//!
//! An event's offset is its message's stream sequence shifted left by 24 bits, plus twice
//! its index in the message: strictly increasing within a partition (a partition's messages
//! take increasing stream sequences), the same on every node, and with a gap after every
//! event so that an offset between two events exists (and resolves to the later one).
//!
//! # Seeing other nodes
//!
//! Each node keeps a view of every partition (one small entry per retained message, no data)
//! from which `info` and `resolve` answer synchronously. Its own appends enter the view when
//! the server acknowledges them; every node's appends, its own included, arrive through an
//! ordered push consumer on the stream delivering headers only (duplicates are recognised by
//! stream sequence). `open` returns once that consumer has replayed the retained messages.
//! `wait_for` is woken when a message enters the view, from either source: no polling.
//! `read` maps partition sequences to messages through the view and fetches the messages its
//! limits can reach by stream sequence, several requests in flight (a message get answered by
//! the stream's leader, so a message just acknowledged is always found; a direct get from a
//! replica might not be). The newest payloads, up to `tail_cache_bytes` per partition, are
//! kept in memory for tailing readers. Another node's append is visible here once the
//! follower delivered it (a round trip or so later); this node's own, once `append`
//! returned.
//!
//! # Group commit and durability
//!
//! Per partition, one writer task publishes one message at a time (the next message must name
//! the previous one's stream sequence, known only from its acknowledgement) and gathers every
//! append queued meanwhile into it, so concurrent appends share one round trip; partitions
//! proceed in parallel. An append returns once JetStream has acknowledged the message, i.e.
//! the stream stored it (on a replicated stream, a quorum of its replicas; the server's own
//! fsync policy applies). Every call to the server is bounded by the timeout in
//! [`JetStreamOptions`]; a server that does not answer makes appends fail with
//! [`Error::Unavailable`](twinhub_eventlog::Error::Unavailable). An append that timed out
//! may still have been stored: it then appears in the log (with numbers of its own) and the
//! next append numbers after it.
//!
//! # Retention
//!
//! Segments are runs of messages up to `segment_bytes`, decided by the writer and carried in
//! the header, so every node sees the same ones. `enforce_retention` purges a partition's
//! whole old segments (never the newest) by subject up to a stream sequence, and tells other
//! nodes on `twinhub.<name>.purged`, so their views let go too. The stream has no `max_age`
//! or `max_bytes` of its own: the server would drop a quiet partition's newest message, and
//! with it the numbering the next append must continue.

//!
//! # Limits
//!
//! One append must fit one message: a batch above the server's `max_payload` (less room for
//! headers) fails with [`Error::TooLarge`](twinhub_eventlog::Error::TooLarge), so the
//! servers' `max_payload` must exceed `max_event_bytes` (NATS's default of 1 MB does not
//! cover the default 1 MiB events). The numbering lives in the partitions' messages: a stream
//! purged or edited behind the log's back (its newest message of a partition removed) makes
//! appends to that partition fail, and a partition whose messages all vanished would number
//! from 0 again. Each node keeps about 60 bytes per retained message in memory.

mod follower;
mod log;
mod view;
mod wire;
mod writer;

pub use log::{JetStreamLog, JetStreamOptions, JetStreamStats};
