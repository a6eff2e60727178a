//! The webhook receiver of the routing scenario: the cheapest HTTP/1.1 server that will do,
//! on plain TCP on loopback, inside the bench. It answers every request `200` with an empty
//! body at once (keep-alive, so the hub's client reuses its connections), and counts and times
//! what it got:
//!
//! - every request, with the instant of the first and the last;
//! - the delivery lag from the message's enqueued time (`ce-time`, the time the hub appended
//!   it to the webhook endpoint's log, milliseconds since the Unix epoch) to its arrival here,
//!   read on the wall clock;
//! - the time from the device's publish to the arrival, when the body is a
//!   [`stamped_payload`](crate::scenario::telemetry::stamped_payload) sent inside the window
//!   set with [`HookServer::measure`] (both ends read one monotonic clock: the bench's).
//!
//! Request bodies come with `Content-Length` (what the hub's client sends) or chunked.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{Error, Result};
use crate::scenario::telemetry::payload_stamp;
use crate::stats::{Recorder, Window};

/// The one answer: no body, connection kept.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
/// A request head larger than this is refused (the hub's CloudEvents headers are well under).
const MAX_HEAD: usize = 64 * 1024;

/// What the receiver recorded for the window set by [`HookServer::measure`].
#[derive(Debug, Default)]
pub struct Measured {
    /// From the enqueued time (`ce-time`) to the arrival (millisecond resolution at the hub:
    /// the figure is 0 to 1 ms above the true lag).
    pub enqueued_to_received: Recorder,
    /// From the device's publish to the arrival.
    pub publish_to_received: Recorder,
    /// Messages sent inside the window that arrived (each counted once).
    pub received: u64,
    /// Arrivals of a message that had already arrived.
    pub duplicates: u64,
}

#[derive(Default)]
struct State {
    first: Option<Instant>,
    last: Option<Instant>,
    /// The publishers' clock base and the window whose messages are timed.
    window: Option<(Instant, Window)>,
    seen: HashSet<(u64, u64)>,
    measured: Measured,
    /// Requests without a readable `ce-time`.
    untimed: u64,
}

struct Shared {
    requests: AtomicU64,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, ce_time: Option<&[u8]>, body: &[u8]) {
        let now = Instant::now();
        let wall_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        self.requests.fetch_add(1, Ordering::Relaxed);
        let enqueued_us = ce_time.and_then(parse_ce_time);
        let mut state = self.state();
        state.first.get_or_insert(now);
        state.last = Some(now);
        if enqueued_us.is_none() {
            state.untimed += 1;
        }
        let Some((base, window)) = state.window else {
            return;
        };
        let Some((t_ns, device, seq)) = payload_stamp(body) else {
            return;
        };
        let sent = base + Duration::from_nanos(t_ns);
        if sent < window.warm_end || sent >= window.end {
            return;
        }
        if !state.seen.insert((device, seq)) {
            state.measured.duplicates += 1;
            return;
        }
        state.measured.received += 1;
        state
            .measured
            .publish_to_received
            .record(now.saturating_duration_since(sent));
        if let Some(enqueued) = enqueued_us {
            state
                .measured
                .enqueued_to_received
                .record(Duration::from_micros(wall_us.saturating_sub(enqueued)));
        }
    }
}

/// `ce-time` (RFC 3339) as microseconds since the Unix epoch.
fn parse_ce_time(value: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let ts: jiff::Timestamp = text.parse().ok()?;
    u64::try_from(ts.as_microsecond()).ok()
}

/// A running receiver; stops when dropped.
pub struct HookServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HookServer {
    /// Listens on 127.0.0.1, a port the system picks.
    pub async fn start() -> Result<HookServer> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::io("binding the webhook receiver", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("the webhook receiver's address", e))?;
        let shared = Arc::new(Shared {
            requests: AtomicU64::new(0),
            state: Mutex::new(State::default()),
        });
        let accepting = shared.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        if let Ok((stream, _)) = accepted {
                            let _ = stream.set_nodelay(true);
                            conns.spawn(serve(stream, accepting.clone()));
                        }
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(HookServer { addr, shared, task })
    }

    /// The URL to configure as the webhook endpoint.
    pub fn url(&self) -> String {
        format!("http://{}/bench/hook", self.addr)
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// When the first and the last request arrived, since the last [`HookServer::reset`].
    pub fn first_last(&self) -> (Option<Instant>, Option<Instant>) {
        let s = self.shared.state();
        (s.first, s.last)
    }

    /// Requests that carried no readable `ce-time`.
    pub fn untimed(&self) -> u64 {
        self.shared.state().untimed
    }

    /// Forgets the first and last arrival and everything measured.
    pub fn reset(&self) {
        *self.shared.state() = State::default();
    }

    /// Times the messages stamped (relative to `base`) inside `window` from now on.
    pub fn measure(&self, base: Instant, window: Window) {
        let mut s = self.shared.state();
        s.window = Some((base, window));
        s.seen.clear();
        s.measured = Measured::default();
    }

    /// Messages of the window that arrived so far.
    pub fn measured_received(&self) -> u64 {
        self.shared.state().measured.received
    }

    /// What was measured since [`HookServer::measure`]; stops measuring.
    pub fn take_measured(&self) -> Measured {
        let mut s = self.shared.state();
        s.window = None;
        s.seen.clear();
        std::mem::take(&mut s.measured)
    }
}

/// One connection: requests in, `200` out, until the peer closes or breaks the protocol.
async fn serve(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Answer every complete request in the buffer, then read more.
        loop {
            match parse_request(&buf) {
                Parsed::Request {
                    consumed,
                    ce_time,
                    body,
                    close,
                } => {
                    shared.record(ce_time.as_deref(), &body);
                    buf.drain(..consumed);
                    if stream.write_all(OK).await.is_err() || close {
                        return;
                    }
                }
                Parsed::Incomplete => break,
                Parsed::Bad => return,
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[derive(Debug, PartialEq)]
enum Parsed {
    Request {
        consumed: usize,
        ce_time: Option<Vec<u8>>,
        body: Vec<u8>,
        close: bool,
    },
    Incomplete,
    Bad,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One HTTP/1.1 request from the front of `buf`, if all of it is there.
fn parse_request(buf: &[u8]) -> Parsed {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Parsed::Bad
        } else {
            Parsed::Incomplete
        };
    };
    let head = &buf[..head_end];
    let body_start = head_end + 4;
    let mut content_length = None;
    let mut chunked = false;
    let mut ce_time = None;
    let mut close = false;
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            let Some(n) = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
            else {
                return Parsed::Bad;
            };
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value.eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"ce-time") {
            ce_time = Some(value.to_vec());
        } else if name.eq_ignore_ascii_case(b"connection") {
            close = value.eq_ignore_ascii_case(b"close");
        }
    }
    if chunked {
        return match dechunk(&buf[body_start..]) {
            Some(Some((body, used))) => Parsed::Request {
                consumed: body_start + used,
                ce_time,
                body,
                close,
            },
            Some(None) => Parsed::Incomplete,
            None => Parsed::Bad,
        };
    }
    let len = content_length.unwrap_or(0);
    if buf.len() < body_start + len {
        return Parsed::Incomplete;
    }
    Parsed::Request {
        consumed: body_start + len,
        ce_time,
        body: buf[body_start..body_start + len].to_vec(),
        close,
    }
}

/// A chunked body: `Some(Some((body, bytes used)))` when complete, `Some(None)` when more is
/// needed, `None` when malformed. Trailers are skipped.
pub(crate) fn dechunk(mut data: &[u8]) -> Option<Option<(Vec<u8>, usize)>> {
    let total = data.len();
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(data, b"\r\n") else {
            return Some(None);
        };
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(end) = find(data, b"\r\n") else {
                    return Some(None);
                };
                data = &data[end + 2..];
                if end == 0 {
                    return Some(Some((body, total - data.len())));
                }
            }
        }
        if data.len() < size + 2 {
            return Some(None);
        }
        body.extend_from_slice(&data[..size]);
        if &data[size..size + 2] != b"\r\n" {
            return None;
        }
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_with_a_length_or_chunks_are_read_whole() {
        let req = b"POST /bench/hook HTTP/1.1\r\nHost: x\r\nce-time: 2023-11-14T22:13:20.123Z\r\nContent-Length: 5\r\n\r\nhello";
        let mut two = req.to_vec();
        two.extend_from_slice(req);
        match parse_request(&two) {
            Parsed::Request {
                consumed,
                ce_time,
                body,
                close,
            } => {
                assert_eq!(consumed, req.len());
                assert_eq!(ce_time.as_deref(), Some(&b"2023-11-14T22:13:20.123Z"[..]));
                assert_eq!(body, b"hello");
                assert!(!close);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_request(&req[..req.len() - 1]), Parsed::Incomplete);
        assert_eq!(
            parse_request(b"POST / HTTP/1.1\r\nHost"),
            Parsed::Incomplete
        );

        let chunked = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n3;x=y\r\n!!!\r\n0\r\n\r\n";
        match parse_request(chunked) {
            Parsed::Request {
                consumed,
                body,
                close,
                ..
            } => {
                assert_eq!(consumed, chunked.len());
                assert_eq!(body, b"hello!!!");
                assert!(close);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_request(&chunked[..chunked.len() - 2]),
            Parsed::Incomplete
        );
        assert_eq!(
            parse_request(b"POST / HTTP/1.1\r\ncontent-length: x\r\n\r\n"),
            Parsed::Bad
        );
    }

    #[test]
    fn ce_time_reads_with_or_without_a_fraction() {
        assert_eq!(
            parse_ce_time(b"2023-11-14T22:13:20.123Z"),
            Some(1_700_000_000_123_000)
        );
        assert_eq!(
            parse_ce_time(b"2023-11-14T22:13:20Z"),
            Some(1_700_000_000_000_000)
        );
        assert_eq!(parse_ce_time(b"yesterday"), None);
    }

    #[tokio::test]
    async fn the_receiver_answers_and_times_stamped_bodies() {
        let hook = HookServer::start().await.expect("listening");
        let base = Instant::now();
        let window = Window {
            warm_end: base,
            end: base + Duration::from_secs(60),
        };
        hook.measure(base, window);
        let mut conn = TcpStream::connect(hook.addr).await.expect("connected");
        let t_ns = u64::try_from(base.elapsed().as_nanos()).unwrap_or(0) + 1;
        let body = crate::scenario::telemetry::stamped_payload(100, t_ns, 3, 9);
        let now = jiff::Timestamp::now().to_string();
        for _ in 0..2 {
            let req = format!(
                "POST /bench/hook HTTP/1.1\r\nhost: x\r\nce-time: {now}\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            conn.write_all(req.as_bytes()).await.expect("sent");
            conn.write_all(&body).await.expect("sent");
            let mut answer = vec![0u8; OK.len()];
            conn.read_exact(&mut answer).await.expect("answered");
            assert_eq!(answer, OK);
        }
        assert_eq!(hook.requests(), 2);
        assert_eq!(hook.untimed(), 0);
        let (first, last) = hook.first_last();
        assert!(first.is_some() && last >= first);
        let m = hook.take_measured();
        assert_eq!(m.received, 1);
        assert_eq!(m.duplicates, 1);
        assert_eq!(m.publish_to_received.completed(), 1);
        assert_eq!(m.enqueued_to_received.completed(), 1);
        hook.reset();
        assert_eq!(hook.first_last(), (None, None));
    }
}
