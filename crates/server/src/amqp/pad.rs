//! Byte-level fixes between fe2o3-amqp and the Azure clients, both directions of one stream.
//!
//! Out: every performative we send goes with all of its fields. AMQP lets a sender leave
//! trailing null fields out of a performative's list, and fe2o3-amqp does; the Event Hubs
//! SDK's pure-Python AMQP stack indexes the fields of a received `open` (and others) by
//! position and fails on a short list ("list index out of range"), while Azure's own
//! services always send them in full. Each outgoing performative is padded with nulls up to
//! its arity (begin's handle-max spelled out); protocol headers and payloads pass unchanged.
//!
//! In: frames a client sends on a channel after its own `end` there are dropped. rhea (the
//! Node SDKs) settles deliveries that were in flight after ending the session; fe2o3-amqp
//! forgets the channel at the `end` and closes the whole connection with `amqp:not-found`
//! on the next frame, cutting the client's other sessions. A `begin` opens the channel again.
//!
//! In, too: a client's `end` waits until we have answered the `detach`es it sent just before
//! it. rhea sends detach and end back to back; fe2o3-amqp's session, once it has the end,
//! refuses the link's detach reply and ends the session with `amqp:illegal-state`. Held ends
//! are let go after [`END_HOLD`] whatever happens.

use std::pin::Pin;
use std::task::{Context, Poll};

use std::future::Future;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Fields of each performative (by descriptor code), AMQP 1.0 sections 2.7 and 5.3.3.
fn arity(frame_type: u8, code: u64) -> Option<usize> {
    match (frame_type, code) {
        (0, 0x10) => Some(10), // open
        (0, 0x11) => Some(8),  // begin
        (0, 0x12) => Some(14), // attach
        (0, 0x13) => Some(11), // flow
        (0, 0x14) => Some(11), // transfer
        (0, 0x15) => Some(6),  // disposition
        (0, 0x16) => Some(3),  // detach
        (0, 0x17) => Some(1),  // end
        (0, 0x18) => Some(1),  // close
        (1, 0x40) => Some(1),  // sasl-mechanisms
        (1, 0x44) => Some(2),  // sasl-outcome
        _ => None,
    }
}

/// The length of the encoded AMQP value at the start of `b`, if it is whole.
fn value_len(b: &[u8]) -> Option<usize> {
    let sized = |width: usize| -> Option<usize> {
        let n = match width {
            1 => usize::from(*b.get(1)?),
            _ => u32::from_be_bytes(b.get(1..5)?.try_into().ok()?) as usize,
        };
        Some(1 + width + n)
    };
    let len = match *b.first()? {
        0x00 => {
            let d = value_len(&b[1..])?;
            1 + d + value_len(b.get(1 + d..)?)?
        }
        0x40..=0x45 => 1,
        0x50..=0x56 => 2,
        0x60..=0x61 => 3,
        0x70..=0x74 => 5,
        0x80..=0x84 => 9,
        0x94 | 0x98 => 17,
        0xa0 | 0xa1 | 0xa3 | 0xc0 | 0xc1 | 0xe0 => sized(1)?,
        0xb0 | 0xb1 | 0xb3 | 0xd0 | 0xd1 | 0xf0 => sized(4)?,
        _ => return None,
    };
    (len <= b.len()).then_some(len)
}

/// `frame` (one whole frame) with its performative padded; `None` to keep it as it is.
pub(crate) fn pad_frame(frame: &[u8]) -> Option<Vec<u8>> {
    let doff = usize::from(*frame.get(4)?) * 4;
    let frame_type = *frame.get(5)?;
    let body = frame.get(doff..)?;
    if body.len() < 3 || body[0] != 0x00 {
        return None;
    }
    // The descriptor: smallulong (0x53) or ulong (0x80).
    let (code, at) = match body[1] {
        0x53 => (u64::from(body[2]), 3),
        0x80 => (u64::from_be_bytes(body.get(2..10)?.try_into().ok()?), 10),
        _ => return None,
    };
    let want = arity(frame_type, code)?;
    let list = body.get(at..)?;
    let (count, mut items, rest): (usize, &[u8], &[u8]) = match *list.first()? {
        0x45 => (0, &[], &list[1..]),
        0xc0 => {
            let size = usize::from(*list.get(1)?);
            let count = usize::from(*list.get(2)?);
            (count, list.get(3..2 + size)?, list.get(2 + size..)?)
        }
        0xd0 => {
            let size = u32::from_be_bytes(list.get(1..5)?.try_into().ok()?) as usize;
            let count = u32::from_be_bytes(list.get(5..9)?.try_into().ok()?) as usize;
            (count, list.get(9..5 + size)?, list.get(5 + size..)?)
        }
        _ => return None,
    };
    let mut fields: Vec<&[u8]> = Vec::with_capacity(want.max(count));
    for _ in 0..count {
        let n = value_len(items)?;
        fields.push(&items[..n]);
        items = &items[n..];
    }
    const NULL: &[u8] = &[0x40];
    // begin's handle-max defaults to 2^32-1; pyamqp reads it as given and fails on null.
    const HANDLE_MAX: &[u8] = &[0x70, 0xff, 0xff, 0xff, 0xff];
    let begin = frame_type == 0 && code == 0x11;
    let short = count < want;
    while fields.len() < want {
        fields.push(NULL);
    }
    let mut changed = short;
    if begin && fields[4] == NULL {
        fields[4] = HANDLE_MAX;
        changed = true;
    }
    if !changed {
        return None;
    }
    let items_len: usize = fields.iter().map(|f| f.len()).sum();
    let mut out = Vec::with_capacity(frame.len() + items_len + 16);
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&frame[4..doff]);
    out.extend_from_slice(&body[..at]);
    if items_len < 255 && fields.len() <= 255 {
        out.push(0xc0);
        out.push((items_len + 1) as u8);
        out.push(fields.len() as u8);
    } else {
        out.push(0xd0);
        out.extend_from_slice(&((items_len + 4) as u32).to_be_bytes());
        out.extend_from_slice(&(fields.len() as u32).to_be_bytes());
    }
    for f in &fields {
        out.extend_from_slice(f);
    }
    out.extend_from_slice(rest);
    let size = out.len() as u32;
    out[..4].copy_from_slice(&size.to_be_bytes());
    Some(out)
}

/// A stream whose writes are regrouped into whole frames, each padded by [`pad_frame`], and
/// whose reads drop what a client sends on a channel it has ended.
#[derive(Debug)]
pub(crate) struct Padded<S> {
    inner: S,
    /// Bytes read from `inner`, not yet a whole frame or header.
    raw: Vec<u8>,
    /// Whole frames and headers ready for the reader, and how many of them it took.
    ready: Vec<u8>,
    taken: usize,
    /// Channels the client sent `end` on (and no `begin` since).
    ended: std::collections::HashSet<u16>,
    eof: bool,
    /// Per client channel: detaches the client sent that we have not answered yet, and
    /// detaches we sent first (the client's next ones answer them).
    owed: std::collections::HashMap<u16, (u32, u32)>,
    /// Per client channel: its `end`, held while detaches are owed.
    held: std::collections::HashMap<u16, Vec<u8>>,
    /// Our channel -> the client's, from the `begin`s we send.
    peer_channel: std::collections::HashMap<u16, u16>,
    hold_until: Option<Pin<Box<tokio::time::Sleep>>>,
    reader: Option<std::task::Waker>,
    /// Bytes written to us, not yet a whole frame or header.
    incoming: Vec<u8>,
    /// Bytes ready for `inner`, and how many of them went out already.
    outgoing: Vec<u8>,
    sent: usize,
}

/// The longest a client's `end` waits for our detach replies.
const END_HOLD: std::time::Duration = std::time::Duration::from_secs(1);

/// Above this many bytes waiting for the socket, writes wait for it to drain.
const HIGH_WATER: usize = 256 * 1024;

impl<S> Padded<S> {
    pub(crate) fn new(inner: S) -> Self {
        Padded {
            inner,
            raw: Vec::new(),
            ready: Vec::new(),
            taken: 0,
            ended: std::collections::HashSet::new(),
            eof: false,
            owed: std::collections::HashMap::new(),
            held: std::collections::HashMap::new(),
            peer_channel: std::collections::HashMap::new(),
            hold_until: None,
            reader: None,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            sent: 0,
        }
    }

    /// A stream that reads `head` (bytes already taken from `inner`, such as a peeked
    /// protocol header) before `inner`.
    pub(crate) fn with_head(inner: S, head: &[u8]) -> Self {
        let mut padded = Padded::new(inner);
        padded.raw.extend_from_slice(head);
        padded.filter_incoming();
        padded
    }

    /// Moves every whole header and frame from `raw` to `ready`, less what arrives on an
    /// ended channel.
    fn filter_incoming(&mut self) {
        let mut at = 0;
        while let Some(piece) = next_piece(&self.raw[at..]) {
            at += piece.len();
            let frame = match piece {
                Piece::Frame(frame) => frame,
                Piece::Header(bytes) | Piece::Garbage(bytes) => {
                    self.ready.extend_from_slice(bytes);
                    continue;
                }
            };
            let channel = frame.channel;
            let keep = match frame.performative {
                Some(BEGIN) => {
                    self.ended.remove(&channel);
                    self.owed.remove(&channel);
                    true
                }
                Some(DETACH) if !self.ended.contains(&channel) => {
                    let owed = self.owed.entry(channel).or_default();
                    if owed.1 > 0 {
                        owed.1 -= 1; // it answers ours
                    } else {
                        owed.0 += 1;
                    }
                    true
                }
                Some(END) => {
                    let first = self.ended.insert(channel);
                    if first && self.owed.get(&channel).is_some_and(|o| o.0 > 0) {
                        self.held.insert(channel, frame.bytes.to_vec());
                        self.hold_until = Some(Box::pin(tokio::time::sleep(END_HOLD)));
                        false
                    } else {
                        first
                    }
                }
                // Link-level frames (attach to detach) belong to the ended session; open and
                // close are the connection's and always pass.
                Some(ATTACH..=DETACH) => !self.ended.contains(&channel),
                _ => true,
            };
            if keep {
                self.ready.extend_from_slice(frame.bytes);
            }
        }
        self.raw.drain(..at);
    }

    /// Hands a held `end` to the reader.
    fn release(&mut self, client_channel: u16) {
        if let Some(end) = self.held.remove(&client_channel) {
            self.ready.extend_from_slice(&end);
            if self.held.is_empty() {
                self.hold_until = None;
            }
            if let Some(w) = self.reader.take() {
                w.wake();
            }
        }
    }

    /// Moves every whole header and frame from `incoming` to `outgoing`, padded.
    fn regroup(&mut self) {
        let mut released = Vec::new();
        let mut at = 0;
        while let Some(piece) = next_piece(&self.incoming[at..]) {
            at += piece.len();
            let frame = match piece {
                Piece::Frame(frame) => frame,
                Piece::Header(bytes) | Piece::Garbage(bytes) => {
                    self.outgoing.extend_from_slice(bytes);
                    continue;
                }
            };
            match frame.performative {
                Some(BEGIN) => {
                    // Its first field is the client's channel (ushort 0x60), after the
                    // descriptor (3 bytes) and the list8 header (3 bytes).
                    if let Some([0x60, hi, lo]) = frame.bytes.get(frame.body + 6..frame.body + 9) {
                        self.peer_channel
                            .insert(frame.channel, u16::from_be_bytes([*hi, *lo]));
                    }
                }
                Some(DETACH) => {
                    if let Some(client) = self.peer_channel.get(&frame.channel).copied() {
                        let owed = self.owed.entry(client).or_default();
                        if owed.0 > 0 {
                            owed.0 -= 1;
                            if owed.0 == 0 {
                                released.push(client);
                            }
                        } else {
                            owed.1 += 1;
                        }
                    }
                }
                _ => {}
            }
            match pad_frame(frame.bytes) {
                Some(padded) => self.outgoing.extend_from_slice(&padded),
                None => self.outgoing.extend_from_slice(frame.bytes),
            }
        }
        self.incoming.drain(..at);
        for client in released {
            self.release(client);
        }
    }
}

const BEGIN: u8 = 0x11;
const ATTACH: u8 = 0x12;
const DETACH: u8 = 0x16;
const END: u8 = 0x17;

/// One unit of the byte stream.
enum Piece<'a> {
    /// A protocol header (`AMQP` and four version bytes).
    Header(&'a [u8]),
    Frame(Frame<'a>),
    /// The rest of the stream after a size below 8: no frame, passed on for the codec to
    /// refuse.
    Garbage(&'a [u8]),
}

struct Frame<'a> {
    bytes: &'a [u8],
    channel: u16,
    /// Where the body starts (after the extended header).
    body: usize,
    /// An AMQP (not SASL) performative's descriptor code.
    performative: Option<u8>,
}

impl Piece<'_> {
    fn len(&self) -> usize {
        match self {
            Piece::Header(b) | Piece::Garbage(b) => b.len(),
            Piece::Frame(f) => f.bytes.len(),
        }
    }
}

/// The piece at the start of `rest`, or `None` while it is incomplete.
fn next_piece(rest: &[u8]) -> Option<Piece<'_>> {
    if rest.len() < 8 {
        return None;
    }
    if &rest[..4] == b"AMQP" {
        return Some(Piece::Header(&rest[..8]));
    }
    let size = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    if size < 8 {
        return Some(Piece::Garbage(rest));
    }
    let bytes = rest.get(..size)?;
    let body = usize::from(bytes[4]) * 4;
    let performative = match bytes.get(body..body + 3) {
        Some([0x00, 0x53, code]) if bytes[5] == 0 => Some(*code),
        _ => None,
    };
    Some(Piece::Frame(Frame {
        bytes,
        channel: u16::from_be_bytes([bytes[6], bytes[7]]),
        body,
        performative,
    }))
}

impl<S: AsyncWrite + Unpin> Padded<S> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = std::task::ready!(
                Pin::new(&mut self.inner).poll_write(cx, &self.outgoing[self.sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.outgoing.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Padded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = this.hold_until.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.hold_until = None;
            let channels: Vec<u16> = this.held.keys().copied().collect();
            for c in channels {
                this.release(c);
            }
        }
        this.reader = Some(cx.waker().clone());
        loop {
            if this.taken < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.taken);
                buf.put_slice(&this.ready[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.ready.len() {
                    this.ready.clear();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // What is left is a partial frame: hand it over so the codec sees the end.
                if !this.raw.is_empty() {
                    this.ready.append(&mut this.raw);
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut read = ReadBuf::new(&mut chunk);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            this.raw.extend_from_slice(read.filled());
            this.filter_incoming();
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Padded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.outgoing.len() - this.sent > HIGH_WATER {
            std::task::ready!(this.poll_drain(cx))?;
        }
        this.incoming.extend_from_slice(buf);
        this.regroup();
        // Start sending without waiting for a flush; what does not fit waits in `outgoing`.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frame(frame_type: u8, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&((8 + body.len()) as u32).to_be_bytes());
        f.extend_from_slice(&[2, frame_type, 0, 0]);
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn a_short_open_gets_all_ten_fields() {
        // open(container-id "c", null, max-frame-size 65536 as uint)
        let body = [
            0x00, 0x53, 0x10, 0xc0, 0x0a, 0x03, 0xa1, 0x01, b'c', 0x40, 0x70, 0, 1, 0, 0,
        ];
        let padded = pad_frame(&frame(0, &body)).unwrap();
        assert_eq!(
            u32::from_be_bytes(padded[..4].try_into().unwrap()) as usize,
            padded.len()
        );
        let list = &padded[8 + 3..];
        assert_eq!(list[0], 0xc0);
        assert_eq!(list[2], 10);
        assert_eq!(usize::from(list[1]), list.len() - 2);
        assert!(list.ends_with(&[0x40; 7]));
    }

    #[test]
    fn an_empty_list_and_a_transfer_payload() {
        // end with list0
        let padded = pad_frame(&frame(0, &[0x00, 0x53, 0x17, 0x45])).unwrap();
        assert_eq!(&padded[8..], &[0x00, 0x53, 0x17, 0xc0, 0x02, 0x01, 0x40]);
        // transfer(handle 0) followed by a payload that must survive
        let mut body = vec![0x00, 0x53, 0x14, 0xc0, 0x02, 0x01, 0x43];
        body.extend_from_slice(b"payload");
        let padded = pad_frame(&frame(0, &body)).unwrap();
        assert!(padded.ends_with(b"payload"));
        assert_eq!(padded[8 + 5], 11);
    }

    #[test]
    fn begin_gets_an_explicit_handle_max() {
        // begin(null, 0 as uint0, 5000, 5000) and nothing else
        let body = [
            0x00, 0x53, 0x11, 0xc0, 0x0a, 0x04, 0x40, 0x43, 0x70, 0, 0, 0x13, 0x88, 0x52, 0x10,
        ];
        let padded = pad_frame(&frame(0, &body)).unwrap();
        let list = &padded[8 + 3..];
        assert_eq!(list[2], 8);
        let fields = &list[3..];
        assert_eq!(&fields[..9], &body[6..]);
        assert_eq!(&fields[9..14], &[0x70, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&fields[14..], &[0x40; 3]);
    }

    #[test]
    fn described_and_variable_values_are_walked() {
        // attach(name "ab", handle 0, role true, 0, 0, source described list, target null ...)
        let source = [0x00, 0x53, 0x28, 0xc0, 0x05, 0x01, 0xa1, 0x02, b'x', b'y'];
        let mut body = vec![0x00, 0x53, 0x12];
        let mut items = vec![0xa1, 0x02, b'a', b'b', 0x43, 0x41, 0x50, 0x00, 0x50, 0x00];
        items.extend_from_slice(&source);
        body.push(0xc0);
        body.push((items.len() + 1) as u8);
        body.push(6);
        body.extend_from_slice(&items);
        let padded = pad_frame(&frame(0, &body)).unwrap();
        let list = &padded[8 + 3..];
        assert_eq!(list[2], 14);
        assert!(list[3..].starts_with(&items));
        assert_eq!(list.len(), 3 + items.len() + 8);
    }

    #[test]
    fn full_lists_heartbeats_and_unknown_frames_pass() {
        assert!(pad_frame(&frame(0, &[])).is_none());
        let detach_full = [0x00, 0x53, 0x16, 0xc0, 0x04, 0x03, 0x43, 0x41, 0x40];
        assert!(pad_frame(&frame(0, &detach_full)).is_none());
        assert!(pad_frame(&frame(0, &[0x00, 0x53, 0x77, 0x45])).is_none());
    }

    #[tokio::test]
    async fn frames_after_a_clients_end_are_dropped_until_it_begins_again() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let on = |channel: u8, body: &[u8]| {
            let mut f = frame(0, body);
            f[7] = channel;
            f
        };
        let disposition = [0x00, 0x53, 0x15, 0xc0, 0x03, 0x02, 0x41, 0x43];
        let end = [0x00, 0x53, 0x17, 0x45];
        let begin = [0x00, 0x53, 0x11, 0xc0, 0x02, 0x01, 0x40];
        let mut sent = b"AMQP\x00\x01\x00\x00".to_vec();
        let mut want = sent.clone();
        for f in [on(5, &disposition), on(5, &end)] {
            sent.extend(&f);
            want.extend(&f);
        }
        sent.extend(on(5, &disposition)); // after the end: dropped
        let close = on(5, &[0x00, 0x53, 0x18, 0x45]); // the connection's close always passes
        sent.extend(&close);
        want.extend(&close);
        let other = on(3, &disposition); // another channel: kept
        sent.extend(&other);
        want.extend(&other);
        for f in [on(5, &begin), on(5, &disposition)] {
            sent.extend(&f);
            want.extend(&f);
        }
        let (mut a, b) = tokio::io::duplex(4096);
        let mut r = Padded::new(b);
        for chunk in sent.chunks(5) {
            a.write_all(chunk).await.unwrap();
        }
        drop(a);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_clients_end_waits_for_our_detach_replies() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let on = |channel: u8, body: &[u8]| {
            let mut f = frame(0, body);
            f[7] = channel;
            f
        };
        let begin_for_5 = [0x00, 0x53, 0x11, 0xc0, 0x04, 0x01, 0x60, 0x00, 0x05];
        let detach = [0x00, 0x53, 0x16, 0xc0, 0x03, 0x02, 0x43, 0x41];
        let end = [0x00, 0x53, 0x17, 0xc0, 0x02, 0x01, 0x40];
        let (mut client, server_side) = tokio::io::duplex(4096);
        let mut hub = Padded::new(server_side);
        hub.write_all(&on(0, &begin_for_5)).await.unwrap();
        hub.flush().await.unwrap();
        let mut from_client = on(5, &detach);
        from_client.extend(on(5, &end));
        client.write_all(&from_client).await.unwrap();
        let mut got = vec![0u8; on(5, &detach).len()];
        hub.read_exact(&mut got).await.unwrap();
        assert_eq!(got, on(5, &detach));
        let mut more = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), hub.read(&mut more))
                .await
                .is_err(),
            "the end was not held"
        );
        hub.write_all(&on(0, &detach)).await.unwrap();
        hub.flush().await.unwrap();
        let mut got = vec![0u8; on(5, &end).len()];
        // Well before END_HOLD, so only our detach can have released it.
        tokio::time::timeout(END_HOLD / 5, hub.read_exact(&mut got))
            .await
            .expect("our detach lets the end through")
            .unwrap();
        assert_eq!(got, on(5, &end));
    }

    #[tokio::test]
    async fn a_held_end_goes_through_after_the_hold_even_unanswered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let on = |channel: u8, body: &[u8]| {
            let mut f = frame(0, body);
            f[7] = channel;
            f
        };
        let detach = [0x00, 0x53, 0x16, 0xc0, 0x03, 0x02, 0x43, 0x41];
        let end = [0x00, 0x53, 0x17, 0xc0, 0x02, 0x01, 0x40];
        let (mut client, server_side) = tokio::io::duplex(4096);
        let mut hub = Padded::new(server_side);
        let mut from_client = on(2, &detach);
        from_client.extend(on(2, &end));
        client.write_all(&from_client).await.unwrap();
        let mut got = vec![0u8; from_client.len()];
        tokio::time::timeout(END_HOLD * 3, hub.read_exact(&mut got))
            .await
            .expect("released after the hold")
            .unwrap();
        assert_eq!(got, from_client);
    }

    #[tokio::test]
    async fn the_stream_regroups_split_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(4096);
        let mut w = Padded::new(a);
        let mut bytes = b"AMQP\x00\x01\x00\x00".to_vec();
        bytes.extend(frame(0, &[0x00, 0x53, 0x17, 0x45]));
        bytes.extend(frame(0, &[]));
        for chunk in bytes.chunks(3) {
            w.write_all(chunk).await.unwrap();
        }
        w.flush().await.unwrap();
        drop(w);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        let mut want = b"AMQP\x00\x01\x00\x00".to_vec();
        want.extend(frame(0, &[0x00, 0x53, 0x17, 0xc0, 0x02, 0x01, 0x40]));
        want.extend(frame(0, &[]));
        assert_eq!(got, want);
    }
}
