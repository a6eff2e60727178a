//! The floor: a raw TLS echo server (run as a child process, `twinhub-bench echo-server`, so
//! its wake-ups cost what a broker's do, or in-process for tests) and a closed-loop client
//! that times request/response round trips over it with the same client stack as the MQTT
//! targets. Frames are a 4-byte length, an 8-byte request id and padding; the server just
//! copies bytes back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use std::io::BufRead as _;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::client::TlsStream;

use crate::child::ChildProcess;
use crate::error::{Error, Result};
use crate::scenario::methods::Shape;
use crate::scenario::{Ctx, DRAIN_LIMIT, cpu_of, cpu_probe, window_bar};
use crate::stats::{Recorder, Throughput, Window};
use crate::tls::{self, ServerCert};

/// Bytes per request frame, about the size of a small MQTT method request.
pub const FRAME_LEN: usize = 48;
/// What the child prints first, followed by its address.
const READY_LINE: &str = "listening on ";

/// Accepts TLS connections on `listener` and echoes every byte back, until the task ends.
pub async fn serve(listener: TcpListener, acceptor: TlsAcceptor) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(_) => {
                // Out of descriptors and the like: back off rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let Some(data) = buf.get(..n) else { return };
                        if tls.write_all(data).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// The body of `twinhub-bench echo-server`: serve on a loopback port, announcing it on stdout.
pub async fn serve_main(cert: &Path, key: &Path) -> Result<()> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))
    };
    let acceptor = tls::acceptor(&ServerCert {
        chain_pem: read(cert)?,
        key_pem: read(key)?,
    })?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::io("binding the echo server", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("reading the echo server's address", e))?;
    println!("{READY_LINE}{addr}");
    serve(listener, acceptor).await;
    Ok(())
}

enum Running {
    Child(ChildProcess),
    Task(JoinHandle<()>),
}

/// A running echo server.
pub struct EchoServer {
    pub addr: SocketAddr,
    running: Running,
}

impl EchoServer {
    /// Starts `exe echo-server` with `cert` written into `dir`.
    pub async fn start_child(exe: &Path, dir: &Path, cert: &ServerCert) -> Result<EchoServer> {
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            Ok(path)
        };
        let cert_path = write("echo-cert.pem", &cert.chain_pem)?;
        let key_path = write("echo-key.pem", &cert.key_pem)?;
        let mut child = ChildProcess::spawn(
            std::process::Command::new(exe)
                .arg("echo-server")
                .arg("--cert")
                .arg(&cert_path)
                .arg("--key")
                .arg(&key_path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
            "the echo server",
        )?;
        let stdout = child
            .take_stdout()
            .ok_or_else(|| Error::Setup("the echo server's stdout is not piped".into()))?;
        let limit = Duration::from_secs(10);
        // If the child never speaks, dropping it (on the timeout's error path) closes the pipe
        // and ends the blocking read.
        let reading = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .map(|_| line)
        });
        let line = tokio::time::timeout(limit, reading)
            .await
            .map_err(|_| Error::timeout("starting the echo server", limit))?
            .map_err(|e| Error::Setup(format!("reading the echo server's address: {e}")))?
            .map_err(|e| Error::io("reading the echo server's address", e))?;
        let addr = line
            .trim()
            .strip_prefix(READY_LINE)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| Error::Setup(format!("the echo server said '{}'", line.trim())))?;
        Ok(EchoServer {
            addr,
            running: Running::Child(child),
        })
    }

    /// Serves from a task of the current runtime.
    pub async fn start_in_process(cert: &ServerCert) -> Result<EchoServer> {
        let acceptor = tls::acceptor(cert)?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::io("binding the echo server", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the echo server's address", e))?;
        Ok(EchoServer {
            addr,
            running: Running::Task(tokio::spawn(serve(listener, acceptor))),
        })
    }

    /// The server's process id when it runs as a child.
    pub fn pid(&self) -> Option<u32> {
        match &self.running {
            Running::Child(c) => Some(c.id()),
            Running::Task(_) => None,
        }
    }

    pub async fn stop(self) {
        match self.running {
            Running::Child(child) => drop(child),
            Running::Task(task) => task.abort(),
        }
    }
}

/// Appends one request frame with id `rid`.
fn put_frame(buf: &mut BytesMut, rid: u64) {
    // The length field counts the bytes after it.
    buf.put_u32(u32::try_from(FRAME_LEN - 4).unwrap_or(0));
    buf.put_u64(rid);
    buf.put_bytes(b'.', FRAME_LEN - 12);
}

/// Takes one whole frame off the front of `buf`; returns its request id.
fn take_frame(buf: &mut BytesMut) -> Option<Result<u64>> {
    if buf.len() < 4 {
        return None;
    }
    let len = usize::try_from(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]])).ok()?;
    if !(8..=1 << 20).contains(&len) {
        return Some(Err(Error::Protocol(format!("echo frame of {len} bytes"))));
    }
    if buf.len() < 4 + len {
        return None;
    }
    buf.advance(4);
    let rid = buf.get_u64();
    buf.advance(len - 8);
    Some(Ok(rid))
}

/// C round trips in flight over `caller_conns` TLS connections to the echo server (process
/// `pid`, if it is a child).
pub async fn round_trips(
    ctx: &Ctx,
    addr: SocketAddr,
    pid: Option<u32>,
    shape: Shape,
) -> Result<Throughput> {
    let conns = shape.caller_conns.clamp(1, shape.concurrency.max(1));
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        streams.push(ctx.tls.connect(addr, None).await?);
    }
    let window = Window::starting_now(shape.warmup, shape.duration);
    let cpu = cpu_probe(pid, window);
    let bar = window_bar(ctx, &format!("TLS echo C={}", shape.concurrency), window);
    let mut set = JoinSet::new();
    for (k, stream) in streams.into_iter().enumerate() {
        let slots = shape.concurrency / conns + usize::from(k < shape.concurrency % conns);
        set.spawn(async move { Recorder::or_failure(echo_caller(stream, slots, window).await) });
    }
    let total = Recorder::join_all(set, "an echo caller").await;
    bar.abort();
    Ok(Throughput {
        cpu: cpu_of(cpu).await,
        ..total.throughput(window.measured())
    })
}

async fn echo_caller(
    mut io: TlsStream<TcpStream>,
    slots: usize,
    window: Window,
) -> Result<Recorder> {
    let mut rec = Recorder::new();
    let mut inflight: HashMap<u64, Instant> = HashMap::with_capacity(slots);
    let mut next_rid = 0u64;
    let mut wbuf = BytesMut::with_capacity(FRAME_LEN * slots.max(1));
    let mut rbuf = BytesMut::with_capacity(16 * 1024);
    let mut issue = |wbuf: &mut BytesMut, inflight: &mut HashMap<u64, Instant>| {
        put_frame(wbuf, next_rid);
        inflight.insert(next_rid, Instant::now());
        next_rid += 1;
    };
    if window.open(Instant::now()) {
        for _ in 0..slots {
            issue(&mut wbuf, &mut inflight);
        }
    }
    let drain_deadline = tokio::time::Instant::from_std(window.end + DRAIN_LIMIT);
    while !inflight.is_empty() {
        if !wbuf.is_empty() {
            let data = wbuf.split();
            io.write_all(&data)
                .await
                .map_err(|e| Error::io("writing to the echo server", e))?;
            io.flush()
                .await
                .map_err(|e| Error::io("writing to the echo server", e))?;
        }
        rbuf.reserve(4096);
        match tokio::time::timeout_at(drain_deadline, io.read_buf(&mut rbuf)).await {
            Ok(Ok(0)) => return Err(Error::Closed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Error::io("reading from the echo server", e)),
            Err(_) => break,
        }
        let now = Instant::now();
        while let Some(frame) = take_frame(&mut rbuf) {
            let Some(sent) = inflight.remove(&frame?) else {
                continue;
            };
            if window.counts(now) {
                rec.record(now - sent);
            }
            if window.open(now) {
                issue(&mut wbuf, &mut inflight);
            }
        }
    }
    let _ = io.shutdown().await;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_partial_frames_wait() {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, 7);
        put_frame(&mut buf, 8);
        assert_eq!(buf.len(), 2 * FRAME_LEN);
        let mut partial = buf.split_to(FRAME_LEN + 10);
        assert_eq!(take_frame(&mut partial).and_then(Result::ok), Some(7));
        assert!(
            take_frame(&mut partial).is_none(),
            "10 bytes are not a frame"
        );
        partial.unsplit(buf);
        assert_eq!(take_frame(&mut partial).and_then(Result::ok), Some(8));
        assert!(partial.is_empty());
    }

    #[test]
    fn a_bad_length_is_an_error() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_bytes(0, 8);
        assert!(matches!(take_frame(&mut buf), Some(Err(_))));
    }
}
