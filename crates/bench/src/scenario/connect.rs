//! `connect`: ramps to N concurrent idle device connections (TLS, CONNECT, CONNACK), with
//! the client sockets spread over several 127.0.0.x source addresses so the ephemeral port
//! range is no limit. Reports connections per second, the handshake latency, and the
//! server's resident memory per connection read from `/proc/<pid>/status`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::{CONNECT_LIMIT, Ctx, Target, source_addrs};
use crate::error::Error;
use crate::machine::rss_bytes;
use crate::mqtt::Conn;
use crate::stats::{Latency, Recorder};

/// How the connection ramp is shaped.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub connections: usize,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    /// Source addresses to spread client sockets over (127.0.0.1 upwards).
    pub source_addrs: usize,
    /// Pause between the last CONNACK and reading memory, so the server settles.
    pub settle: Duration,
    /// The ramp gives up after this long.
    pub limit: Duration,
}

/// The connection figures.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ConnectResult {
    pub requested: usize,
    pub connected: usize,
    pub errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// From the first connect to the last CONNACK.
    pub seconds: f64,
    pub per_second: f64,
    /// TCP connect to CONNACK, per connection.
    pub handshake: Latency,
    pub source_addrs: usize,
    /// The server process's resident memory before the ramp and with every connection open
    /// (absent when the server runs inside the bench).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_per_connection: Option<f64>,
    /// The load generator's own memory per connection, for context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_rss_per_connection: Option<f64>,
}

impl ConnectResult {
    /// The server's memory extrapolated linearly to `n` connections.
    pub fn server_rss_at(&self, n: usize) -> Option<f64> {
        Some(self.server_rss_before? as f64 + self.server_rss_per_connection? * n as f64)
    }
}

fn per_connection(before: Option<u64>, after: Option<u64>, n: usize) -> Option<f64> {
    let (before, after) = (before?, after?);
    (n > 0).then(|| after.saturating_sub(before) as f64 / n as f64)
}

/// Runs the ramp against `target`, holds every connection while memory is read, then closes
/// them all.
pub async fn run(ctx: &Ctx, target: &Target, shape: Shape) -> ConnectResult {
    let me = std::process::id();
    let server_before = target.pid.and_then(rss_bytes);
    let client_before = rss_bytes(me);
    let addrs = source_addrs(shape.source_addrs);
    let n = shape.connections;
    // Give up early if the target refuses wholesale; a few failures are figures.
    let max_errors = (n as u64 / 10).max(100);
    let bar = ctx
        .progress
        .bar(&format!("{} connections", target.name), n as u64);
    let mut rec = Recorder::new();
    let mut open: Vec<Conn> = Vec::with_capacity(n);
    let mut pending = JoinSet::new();
    let start = Instant::now();
    let deadline = start + shape.limit;
    let mut next = 0;
    loop {
        while pending.len() < shape.concurrency.max(1)
            && next < n
            && rec.errors() < max_errors
            && Instant::now() < deadline
        {
            let i = next;
            next += 1;
            let login = match target.login(i) {
                Ok(l) => l,
                Err(e) => {
                    rec.error(e);
                    continue;
                }
            };
            let source = addrs.get(i % addrs.len()).copied();
            let tls = ctx.tls.clone();
            let addr = target.mqtt_addr;
            pending.spawn(async move {
                let began = Instant::now();
                let conn = Conn::open(&tls, addr, source, &login, CONNECT_LIMIT).await?;
                Ok::<_, Error>((conn, began.elapsed()))
            });
        }
        let Some(joined) = pending.join_next().await else {
            break;
        };
        match joined {
            Ok(Ok((conn, took))) => {
                rec.record(took);
                open.push(conn);
                bar.inc(1);
            }
            Ok(Err(e)) => rec.error(e),
            Err(e) => rec.error(format!("a connecting task failed: {e}")),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    bar.finish();
    tokio::time::sleep(shape.settle).await;
    let server_after = target.pid.and_then(rss_bytes);
    let client_after = rss_bytes(me);
    let connected = open.len();

    // DISCONNECT everyone at once; the next phase waits for the hub to notice.
    let mut closing = JoinSet::new();
    for conn in open {
        closing.spawn(conn.close());
    }
    while closing.join_next().await.is_some() {}

    let summary = rec.throughput(Duration::ZERO);
    ConnectResult {
        requested: n,
        connected,
        errors: rec.errors(),
        first_error: summary.first_error,
        seconds,
        per_second: if seconds > 0.0 {
            connected as f64 / seconds
        } else {
            0.0
        },
        handshake: rec.latency(),
        source_addrs: addrs.len(),
        server_rss_before: server_before,
        server_rss_after: server_after,
        server_rss_per_connection: per_connection(server_before, server_after, connected),
        client_rss_per_connection: per_connection(client_before, client_after, connected),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_per_connection_and_its_extrapolation() {
        assert_eq!(per_connection(Some(1000), Some(5000), 4), Some(1000.0));
        assert_eq!(per_connection(Some(1000), Some(500), 4), Some(0.0));
        assert_eq!(per_connection(Some(1000), None, 4), None);
        assert_eq!(per_connection(Some(1000), Some(5000), 0), None);
        let r = ConnectResult {
            server_rss_before: Some(10_000_000),
            server_rss_per_connection: Some(20_000.0),
            ..Default::default()
        };
        assert_eq!(r.server_rss_at(50_000), Some(1_010_000_000.0));
        assert_eq!(ConnectResult::default().server_rss_at(1), None);
    }
}
