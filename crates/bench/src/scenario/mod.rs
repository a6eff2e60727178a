//! The scenarios and what they share: the two kinds of MQTT target (twinhub, which speaks
//! IoT Hub's topics and authenticates devices by SAS, and a plain broker such as Mosquitto,
//! which gets the mirrored raw-MQTT flows), connecting a fleet of devices, and stopping the
//! device tasks at the end of a phase.

pub mod c2d;
pub mod cluster;
pub mod connect;
pub mod fanout;
pub mod methods;
pub mod query;
pub mod routing;
pub mod telemetry;
pub mod twin;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinSet;
use twinhub_mqtt::QoS;
use twinhub_sdk::ServiceClient;

use crate::error::{Error, Result};
use crate::hub::{DEVICE_KEY, HOSTNAME, device_id};
use crate::machine::{cpu_seconds, machine_cpu_seconds};
use crate::mqtt::{Conn, Login};
use crate::progress::Progress;
use crate::stats::{CpuUse, Recorder, Window};
use crate::tls;

/// How long one connection may take from TCP connect to CONNACK (and to SUBACK).
pub const CONNECT_LIMIT: Duration = Duration::from_secs(30);
/// Keep-alive announced by every simulated client: long enough that no PINGREQ falls inside
/// a phase, so idle means idle.
pub const KEEP_ALIVE: u16 = 600;
/// Connections opened at once while a fleet comes up (outside any measurement).
const FLEET_CONCURRENCY: usize = 64;
/// After the window closes, how long requests still in flight may take before a worker
/// stops waiting for them (they are then not counted).
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// How a closed loop learns that one of its requests ended.
pub enum Outcome {
    /// The request under this key succeeded: its latency counts.
    Done(u64),
    /// The request under this key was refused; the message says how.
    Failed(u64, String),
}

/// One connection's closed loop: `slots` requests in flight while the window is open, each
/// completion timed from its send and replaced by a new request. `issue` publishes a request
/// and returns the key its answer will carry; `answer` reads a packet's outcome, if it is
/// one. After the window, what is still in flight gets [`DRAIN_LIMIT`] and is then dropped.
pub async fn closed_loop(
    mut conn: Conn,
    slots: usize,
    window: Window,
    mut issue: impl FnMut(&mut Conn) -> Result<u64>,
    mut answer: impl FnMut(twinhub_mqtt::Packet) -> Option<Outcome>,
) -> Result<Recorder> {
    let mut rec = Recorder::new();
    let mut inflight: HashMap<u64, Instant> = HashMap::with_capacity(slots);
    if window.open(Instant::now()) {
        for _ in 0..slots {
            inflight.insert(issue(&mut conn)?, Instant::now());
        }
    }
    conn.flush().await?;
    let drain_deadline = tokio::time::Instant::from_std(window.end + DRAIN_LIMIT);
    while !inflight.is_empty() {
        match tokio::time::timeout_at(drain_deadline, conn.read_more()).await {
            Ok(read) => read?,
            // Whatever is still outstanding is lost or very late: it is not counted.
            Err(_) => break,
        }
        let now = Instant::now();
        while let Some(packet) = conn.next_buffered()? {
            let (key, failure) = match answer(packet) {
                Some(Outcome::Done(key)) => (key, None),
                Some(Outcome::Failed(key, why)) => (key, Some(why)),
                None => continue,
            };
            let Some(sent) = inflight.remove(&key) else {
                continue;
            };
            match failure {
                None if window.counts(now) => rec.record(now - sent),
                None => {}
                Some(why) => rec.error(why),
            }
            if window.open(now) {
                inflight.insert(issue(&mut conn)?, Instant::now());
            }
        }
        conn.flush().await?;
    }
    conn.close().await;
    Ok(rec)
}

/// Which protocol dialect a target speaks.
#[derive(Clone)]
pub enum Flavor {
    /// twinhub: IoT Hub topics, SAS-authenticated devices, and its REST API for callers.
    Hub { services: Vec<ServiceClient> },
    /// A plain MQTT broker: anonymous clients and the bench's own mirror topics.
    Broker,
}

/// One system under test.
#[derive(Clone)]
pub struct Target {
    /// `twinhub` or `mosquitto`, as printed in the table.
    pub name: &'static str,
    pub mqtt_addr: SocketAddr,
    /// The process to read resident memory from, when it is a separate process.
    pub pid: Option<u32>,
    pub flavor: Flavor,
    /// Further processes whose CPU the methods and twin phases read over their window.
    pub watch: Vec<Watched>,
}

/// A process whose CPU a phase reads besides the server's: another node of a cluster,
/// PostgreSQL, nats-server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// As it appears in the report.
    pub name: String,
    pub pid: u32,
    /// Count the process's children too (PostgreSQL's postmaster and its backends): their
    /// utime + stime while they live, and the parent's cutime + cstime for those it reaped.
    pub tree: bool,
}

impl Watched {
    /// CPU seconds used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        if !self.tree {
            return cpu_seconds(self.pid);
        }
        let own = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        let mut total = stat_ticks(&own, true)?;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if pid == self.pid {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            if stat_ppid(&stat) == Some(self.pid) {
                total += stat_ticks(&stat, false).unwrap_or(0);
            }
        }
        Some(total as f64 / crate::machine::USER_HZ)
    }
}

/// The parent pid from a `/proc/*/stat` line.
fn stat_ppid(stat: &str) -> Option<u32> {
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime (and cutime + cstime when `reaped`) from a `/proc/*/stat` line, in ticks.
fn stat_ticks(stat: &str, reaped: bool) -> Option<u64> {
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .skip(11)
        .take(4)
        .collect();
    let n = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let own = n(0)? + n(1)?;
    Some(if reaped {
        own + n(2).unwrap_or(0) + n(3).unwrap_or(0)
    } else {
        own
    })
}

/// Reads the CPU of `watched` at the window's warm end and at its end; resolves when the
/// window ends, with each one's cores over the window (`us_per_op` is left for the caller,
/// who knows the count).
pub fn watch_probe(
    watched: &[Watched],
    window: Window,
) -> tokio::task::JoinHandle<Vec<crate::stats::ProcessCpu>> {
    let watched = watched.to_vec();
    tokio::spawn(async move {
        let read = |w: &[Watched]| w.iter().map(Watched::cpu_seconds).collect::<Vec<_>>();
        tokio::time::sleep_until(tokio::time::Instant::from_std(window.warm_end)).await;
        let before = read(&watched);
        tokio::time::sleep_until(tokio::time::Instant::from_std(window.end)).await;
        let after = read(&watched);
        let secs = window.measured().as_secs_f64().max(1e-9);
        watched
            .iter()
            .zip(before.into_iter().zip(after))
            .filter_map(|(w, (a, b))| {
                Some(crate::stats::ProcessCpu {
                    name: w.name.clone(),
                    cores: (b? - a?).max(0.0) / secs,
                    us_per_op: None,
                })
            })
            .collect()
    })
}

/// Waits for a watch probe and fills in each process's CPU per operation of `t`.
pub async fn watched_of(
    probe: tokio::task::JoinHandle<Vec<crate::stats::ProcessCpu>>,
    t: &crate::stats::Throughput,
) -> Vec<crate::stats::ProcessCpu> {
    let mut out = probe.await.unwrap_or_default();
    for p in &mut out {
        p.us_per_op = (t.per_second > 0.0).then(|| p.cores * 1e6 / t.per_second);
    }
    out
}

impl Target {
    /// What device `i` says in CONNECT on this target.
    pub fn login(&self, i: usize) -> Result<Login> {
        let id = device_id(i);
        match self.flavor {
            Flavor::Hub { .. } => {
                Login::hub_device(HOSTNAME, &id, DEVICE_KEY, token_expiry(), KEEP_ALIVE)
            }
            Flavor::Broker => Ok(Login::anonymous(&id, KEEP_ALIVE)),
        }
    }

    /// The service clients (one HTTP connection each) of a hub target.
    pub fn services(&self) -> Result<&[ServiceClient]> {
        match &self.flavor {
            Flavor::Hub { services } if !services.is_empty() => Ok(services),
            _ => Err(Error::Setup(format!(
                "{} has no REST API to call",
                self.name
            ))),
        }
    }

    pub fn is_hub(&self) -> bool {
        matches!(self.flavor, Flavor::Hub { .. })
    }
}

/// A SAS expiry a day ahead: no token expires during a run.
fn token_expiry() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 86_400
}

/// What the scenarios share.
#[derive(Clone)]
pub struct Ctx {
    pub tls: tls::Client,
    pub progress: Progress,
}

/// Connects devices `0..count` to `target`, each subscribed to the filters `filters(i)`
/// gives (none when empty) at QoS 0, a bounded number at a time. The result is in device
/// order.
pub async fn connect_fleet(
    ctx: &Ctx,
    target: &Target,
    count: usize,
    filters: impl Fn(usize) -> Vec<String>,
    label: &str,
) -> Result<Vec<Conn>> {
    connect_fleet_qos(ctx, target, count, filters, QoS::AtMostOnce, label).await
}

/// [`connect_fleet`] with the subscriptions at `qos`.
pub async fn connect_fleet_qos(
    ctx: &Ctx,
    target: &Target,
    count: usize,
    filters: impl Fn(usize) -> Vec<String>,
    qos: QoS,
    label: &str,
) -> Result<Vec<Conn>> {
    let bar = ctx.progress.bar(label, count as u64);
    let mut conns: Vec<Option<Conn>> = (0..count).map(|_| None).collect();
    let mut pending = JoinSet::new();
    let mut next = 0;
    loop {
        while pending.len() < FLEET_CONCURRENCY && next < count {
            let i = next;
            next += 1;
            let login = target.login(i)?;
            let subs = filters(i);
            let tls = ctx.tls.clone();
            let addr = target.mqtt_addr;
            pending.spawn(async move {
                let mut conn = Conn::open(&tls, addr, None, &login, CONNECT_LIMIT).await?;
                if !subs.is_empty() {
                    conn.subscribe(&subs, qos, CONNECT_LIMIT).await?;
                }
                Ok::<_, Error>((i, conn))
            });
        }
        let Some(joined) = pending.join_next().await else {
            break;
        };
        let (i, conn) =
            joined.map_err(|e| Error::Setup(format!("a connecting task failed: {e}")))??;
        if let Some(slot) = conns.get_mut(i) {
            *slot = Some(conn);
        }
        bar.inc(1);
    }
    bar.finish();
    Ok(conns.into_iter().flatten().collect())
}

/// Tells device tasks to say DISCONNECT and end.
pub struct Stop {
    tx: watch::Sender<bool>,
}

impl Stop {
    pub fn new() -> (Stop, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (Stop { tx }, rx)
    }

    pub fn stop(&self) {
        let _ = self.tx.send(true);
    }
}

/// Closes a set of device tasks: signals them, then waits (bounded) for each to finish.
pub async fn stop_devices<T: 'static>(stop: Stop, mut tasks: JoinSet<T>) -> Vec<T> {
    stop.stop();
    let mut out = Vec::with_capacity(tasks.len());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(v))) => out.push(v),
            Ok(Some(Err(_))) => {}
            Ok(None) => break,
            Err(_) => {
                tasks.abort_all();
                break;
            }
        }
    }
    out
}

/// Shows a bar that fills over the measured window (on a terminal only); it ends with the
/// window.
pub fn window_bar(ctx: &Ctx, label: &str, window: Window) -> tokio::task::JoinHandle<()> {
    let total = window.end.saturating_duration_since(Instant::now());
    let bar = ctx
        .progress
        .bar(label, u64::try_from(total.as_millis()).unwrap_or(u64::MAX));
    let start = Instant::now();
    tokio::spawn(async move {
        while Instant::now() < window.end {
            let done = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            bar.set_position(done);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bar.finish();
    })
}

/// Measures the CPU the server process `server` (if separate) and the bench use between
/// the window's start and end; resolves when the window ends.
pub fn cpu_probe(server: Option<u32>, window: Window) -> tokio::task::JoinHandle<CpuUse> {
    let me = std::process::id();
    tokio::spawn(async move {
        let read = || {
            (
                server.and_then(cpu_seconds),
                cpu_seconds(me),
                machine_cpu_seconds(),
            )
        };
        tokio::time::sleep_until(tokio::time::Instant::from_std(window.warm_end)).await;
        let (server_0, client_0, machine_0) = read();
        tokio::time::sleep_until(tokio::time::Instant::from_std(window.end)).await;
        let (server_1, client_1, machine_1) = read();
        let secs = window.measured().as_secs_f64().max(1e-9);
        let cores = |a: Option<f64>, b: Option<f64>| Some((b? - a?).max(0.0) / secs);
        CpuUse {
            server_cores: cores(server_0, server_1),
            client_cores: cores(client_0, client_1),
            machine_cores: cores(machine_0.map(|m| m.busy), machine_1.map(|m| m.busy)),
            steal_cores: cores(machine_0.map(|m| m.steal), machine_1.map(|m| m.steal)),
        }
    })
}

/// Waits (at most `limit`) until the machine is quiet: less than `QUIET_CORES` busy over a
/// one-second sample. Other work on a shared machine (builds, tests) skews every figure, so
/// phases start when it has passed. Returns the busy cores last seen when it never got quiet.
pub async fn wait_quiet(progress: &Progress, limit: Duration) -> Option<f64> {
    const QUIET_CORES: f64 = 0.25;
    let started = Instant::now();
    let mut told = false;
    loop {
        let before = machine_cpu_seconds()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = machine_cpu_seconds()?;
        let busy = (after.busy - before.busy) + (after.steal - before.steal);
        if busy < QUIET_CORES {
            return None;
        }
        if started.elapsed() >= limit {
            return Some(busy);
        }
        if !told {
            progress.note(&format!(
                "waiting for the machine to go quiet ({busy:.2} cores busy elsewhere)"
            ));
            told = true;
        }
    }
}

/// Waits for a CPU probe; a failed probe just leaves the figure out.
pub async fn cpu_of(probe: tokio::task::JoinHandle<CpuUse>) -> Option<CpuUse> {
    probe.await.ok()
}

/// `count` source addresses 127.0.0.1, 127.0.0.2, ...: each gives the client side its own
/// ephemeral port range towards the one listening address.
pub fn source_addrs(count: usize) -> Vec<IpAddr> {
    (1..=count.clamp(1, 254))
        .map(|i| IpAddr::from([127, 0, 0, u8::try_from(i).unwrap_or(1)]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_stay_in_loopback() {
        let addrs = source_addrs(4);
        assert_eq!(addrs.len(), 4);
        assert_eq!(addrs[0], IpAddr::from([127, 0, 0, 1]));
        assert_eq!(addrs[3], IpAddr::from([127, 0, 0, 4]));
        assert!(source_addrs(1000).iter().all(|a| a.is_loopback()));
        assert_eq!(source_addrs(0).len(), 1);
    }

    #[test]
    fn hub_devices_sign_and_broker_devices_are_anonymous() {
        let hub = Target {
            name: "twinhub",
            mqtt_addr: "127.0.0.1:1"
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 1))),
            pid: None,
            flavor: Flavor::Hub { services: vec![] },
            watch: Vec::new(),
        };
        let login = hub.login(5).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(login.client_id, "dev-000005");
        assert!(
            login
                .password
                .is_some_and(|p| p.starts_with("SharedAccessSignature "))
        );
        assert!(hub.services().is_err(), "no clients were given");
        let broker = Target {
            flavor: Flavor::Broker,
            name: "mosquitto",
            ..hub
        };
        assert!(broker.login(5).is_ok_and(|l| l.password.is_none()));
    }
}
