//! `twinhub-chaos soak`: many devices connected for a long time under a steady, moderate mix
//! of direct methods, reported patches and desired patches, while the hub's resident memory
//! is sampled. Every operation is checked end to end: a method must come back 200 with the
//! payload the device echoed, a desired patch must reach its device, and at the end the
//! stored twins must hold the last acknowledged counters. Any error fails the soak.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use twinhub_proto::model::CloudToDeviceMethod;
use twinhub_sdk::{DeviceClient, MethodResponse, ServiceClient};

use crate::devices::{self, DeviceSettings};
use crate::hub::{HubCommand, HubProcess};
use crate::rng::Rng;

/// The twin property the soak's counters live in.
const PROP: &str = "soak";
/// The direct method every device answers (echoing the payload).
const METHOD: &str = "soak";
/// Error messages kept per kind.
const KEEP_MESSAGES: usize = 5;
/// How often the drivers issue what is due.
const TICK: Duration = Duration::from_millis(10);

#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// Devices to register and keep connected
    #[arg(long, default_value_t = 10_000)]
    pub devices: usize,
    /// How long the load runs, minutes (fractions allowed)
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// Seconds between two samples of the hub's memory
    #[arg(long, default_value_t = 60.0)]
    pub sample_secs: f64,
    /// Direct methods per second (service invokes, devices answer)
    #[arg(long, default_value_t = 200.0)]
    pub methods_rate: f64,
    /// Reported-property patches per second (devices)
    #[arg(long, default_value_t = 200.0)]
    pub reported_rate: f64,
    /// Desired-property patches per second (service), each checked to reach its device
    #[arg(long, default_value_t = 100.0)]
    pub desired_rate: f64,
    /// Devices connecting at once
    #[arg(long, default_value_t = 250)]
    pub wave: usize,
    /// Operations of one kind in flight at most; beyond it due operations are skipped
    #[arg(long, default_value_t = 2000)]
    pub max_in_flight: usize,
    /// Seconds a desired patch may take to reach its device
    #[arg(long, default_value_t = 30)]
    pub desired_timeout: u64,
    /// The twinhub binary [default: next to this program, else target/debug or target/release]
    #[arg(long)]
    pub twinhub: Option<PathBuf>,
    /// Keep the data dir and hub log (always kept when the soak fails)
    #[arg(long)]
    pub keep: bool,
    /// Seed for picking devices [default: random, printed]
    #[arg(long)]
    pub seed: Option<u64>,
    /// RUST_LOG for the hub
    #[arg(long, default_value = "warn")]
    pub hub_log: String,
    /// Where the soak's directory goes [default: the system's temp dir]
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Scrape the hub's /metrics every this many seconds, as Prometheus would [default: never]
    #[arg(long)]
    pub scrape_metrics: Option<f64>,
}

/// Counts for one kind of operation.
#[derive(Default)]
struct Kind {
    ok: AtomicU64,
    errors: AtomicU64,
    /// Due but not issued: the in-flight cap was reached or no device was free.
    skipped: AtomicU64,
    first_errors: Mutex<Vec<String>>,
    latencies_us: Mutex<Vec<u32>>,
}

impl Kind {
    fn ok(&self, took: Duration) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        lock(&self.latencies_us).push(us);
    }

    fn error(&self, message: impl Into<String>) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = lock(&self.first_errors);
        if first.len() < KEEP_MESSAGES {
            first.push(message.into());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
struct Stats {
    methods: Kind,
    reported: Kind,
    desired: Kind,
    /// A device's connection dropped (the SDK reconnects by itself).
    disconnects: Kind,
    /// Final read-back of the twins.
    verify: Kind,
    /// The hub itself: died, did not stop cleanly.
    hub: Kind,
}

impl Stats {
    fn kinds(&self) -> [(&'static str, &Kind); 6] {
        [
            ("methods", &self.methods),
            ("reported", &self.reported),
            ("desired", &self.desired),
            ("disconnects", &self.disconnects),
            ("verify", &self.verify),
            ("hub", &self.hub),
        ]
    }

    fn ops(&self) -> u64 {
        [&self.methods, &self.reported, &self.desired]
            .iter()
            .map(|k| k.ok.load(Ordering::Relaxed))
            .sum()
    }

    fn errors(&self) -> u64 {
        self.kinds()
            .iter()
            .map(|(_, k)| k.errors.load(Ordering::Relaxed))
            .sum()
    }
}

/// A per-device counter: the last value sent and the last acknowledged.
#[derive(Default)]
struct Seq {
    sent: AtomicU64,
    acked: AtomicU64,
}

/// The connected devices and what the soak did to each.
struct Fleet {
    clients: Vec<DeviceClient>,
    ids: Vec<String>,
    /// One operation of a kind per device at a time, so counters arrive in order.
    reported_busy: Vec<AtomicBool>,
    desired_busy: Vec<AtomicBool>,
    reported: Vec<Seq>,
    desired: Vec<Seq>,
    /// The highest desired counter each device has received.
    received: Vec<watch::Sender<u64>>,
    /// Set when the soak winds down: connection changes after it are not errors.
    closing: AtomicBool,
}

/// Marks a device free again when the operation ends, however it ends.
struct Claim<'a>(&'a AtomicBool);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Fleet {
    /// A random device not busy with this kind of operation, marked busy; the operation
    /// frees it with a [`Claim`].
    fn claim(busy: &[AtomicBool], rng: &mut Rng) -> Option<usize> {
        (0..8).map(|_| rng.below(busy.len())).find(|&i| {
            busy[i]
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }
}

/// Spreads `rate` operations per second over ticks.
struct Pacer {
    rate: f64,
    started: Instant,
    issued: u64,
}

impl Pacer {
    fn new(rate: f64) -> Pacer {
        Pacer {
            rate,
            started: Instant::now(),
            issued: 0,
        }
    }

    /// How many operations are due now.
    fn due(&mut self) -> u64 {
        let target = (self.rate * self.started.elapsed().as_secs_f64()) as u64;
        let due = target.saturating_sub(self.issued);
        self.issued = target.max(self.issued);
        due
    }
}

/// One RSS sample.
struct Sample {
    elapsed: Duration,
    rss_kib: Option<u64>,
    ops: u64,
    errors: u64,
    connected: Option<u64>,
}

pub async fn run(args: SoakArgs) -> Result<bool> {
    let positive = |x: f64| x.is_finite() && x > 0.0 && x < 1e7;
    if args.devices == 0 || !positive(args.minutes) || !positive(args.sample_secs) {
        bail!("--devices, --minutes and --sample-secs must be positive");
    }
    if args.scrape_metrics.is_some_and(|s| !positive(s)) {
        bail!("--scrape-metrics must be positive");
    }
    let rates = [args.methods_rate, args.reported_rate, args.desired_rate];
    if rates.iter().any(|&r| !r.is_finite() || r < 0.0) {
        bail!("the rates must be zero or positive");
    }
    let cmd = HubCommand::locate(args.twinhub.clone(), &args.hub_log)?;
    let seed = args.seed.unwrap_or_else(Rng::fresh_seed);
    let nofile = crate::raise_nofile_limit();
    // Each side holds one socket per device; leave room for files, the store, REST.
    if nofile < args.devices as u64 + 512 {
        bail!(
            "the open-file limit is {nofile}, too low for {} devices: raise it (ulimit -n) or use fewer devices",
            args.devices
        );
    }
    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    println!(
        "twinhub-chaos soak: {} devices for {:.1} min; {}/s methods, {}/s reported, {}/s desired; sample every {} s; /metrics {}; hub {}; seed {seed}; open files {nofile}",
        args.devices,
        args.minutes,
        args.methods_rate,
        args.reported_rate,
        args.desired_rate,
        args.sample_secs,
        args.scrape_metrics
            .map_or_else(|| "not scraped".into(), |s| format!("scraped every {s} s")),
        cmd.bin.display()
    );

    let mut builder = tempfile::Builder::new();
    builder.prefix("twinhub-chaos-soak-");
    let dir = match &args.work_dir {
        Some(parent) => {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
            builder.tempdir_in(parent)
        }
        None => builder.tempdir(),
    }
    .context("creating the soak directory")?;
    let stats = Arc::new(Stats::default());
    let outcome = soak(&args, &cmd, seed, duration, dir.path(), &stats).await;
    if let Err(e) = &outcome {
        stats.hub.error(format!("{e:#}"));
    }
    let passed = stats.errors() == 0;
    if args.keep || !passed {
        println!("kept: {}", dir.keep().display());
    }
    if let Ok(samples) = outcome {
        print_totals(&stats, &samples, duration);
    } else {
        print_errors(&stats);
    }
    println!(
        "{}",
        if passed {
            "soak passed: no errors".to_string()
        } else {
            format!("soak FAILED: {} error(s)", stats.errors())
        }
    );
    Ok(passed)
}

async fn soak(
    args: &SoakArgs,
    cmd: &HubCommand,
    seed: u64,
    duration: Duration,
    dir: &std::path::Path,
    stats: &Arc<Stats>,
) -> Result<Vec<Sample>> {
    let clock = Instant::now();
    let mut hub = HubProcess::start(cmd, &dir.join("data"), &dir.join("hub.log"))
        .await
        .context("starting the hub")?;
    println!(
        "[{:>7.1}s] hub pid {} ready in {:.2} s (https {}, mqtt {}), RSS {}",
        clock.elapsed().as_secs_f64(),
        hub.pid(),
        hub.ready_after.as_secs_f64(),
        hub.https_port,
        hub.mqtt_port,
        mib(hub.rss_kib())
    );
    // Method calls wait for the device inside the request: allow its 30 s and some.
    let service = hub.service(Duration::from_secs(60))?;
    let started = Instant::now();
    devices::register(&service, args.devices)
        .await
        .context("registering the devices")?;
    println!(
        "[{:>7.1}s] registered {} devices in {:.2} s (bulk, 100 per call)",
        clock.elapsed().as_secs_f64(),
        args.devices,
        started.elapsed().as_secs_f64()
    );

    let settings = DeviceSettings {
        operation_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(30),
        // No token renewal (a planned reconnect) during the run.
        sas_token_ttl: duration * 2 + Duration::from_secs(3600),
    };
    let started = Instant::now();
    let ids: Vec<String> = (0..args.devices).map(devices::device_id).collect();
    let clients = ids
        .iter()
        .map(|id| devices::client(&hub, id, &settings))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "[{:>7.1}s] built {} device clients in {:.1} s",
        clock.elapsed().as_secs_f64(),
        args.devices,
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let fleet = Arc::new(Fleet {
        ids,
        reported_busy: (0..args.devices).map(|_| AtomicBool::new(false)).collect(),
        desired_busy: (0..args.devices).map(|_| AtomicBool::new(false)).collect(),
        reported: (0..args.devices).map(|_| Seq::default()).collect(),
        desired: (0..args.devices).map(|_| Seq::default()).collect(),
        received: (0..args.devices).map(|_| watch::Sender::new(0)).collect(),
        closing: AtomicBool::new(false),
        clients,
    });
    let mut listeners = JoinSet::new();
    let step = (args.devices / 10).max(args.wave).max(1);
    let mut next_report = step;
    devices::connect_in_waves(
        &fleet.clients,
        args.wave,
        |i, device| {
            device.set_method_handler(|request| async move {
                MethodResponse::new(200, json!({ "echo": request.payload }))
            });
            let mut patches = device.desired_patches();
            let fleet = fleet.clone();
            listeners.spawn(async move {
                while let Some(patch) = patches.recv().await {
                    if let Some(v) = patch.patch.get(PROP).and_then(Value::as_u64) {
                        fleet.received[i].send_if_modified(|seen| {
                            let newer = v > *seen;
                            if newer {
                                *seen = v;
                            }
                            newer
                        });
                    }
                }
            });
        },
        |connected| {
            if connected >= next_report || connected == args.devices {
                println!(
                    "[{:>7.1}s] connected {connected}/{} devices",
                    clock.elapsed().as_secs_f64(),
                    args.devices
                );
                next_report = connected + step;
            }
        },
    )
    .await
    .context("connecting the devices")?;
    println!(
        "[{:>7.1}s] all {} devices connected in {:.1} s (waves of {})",
        clock.elapsed().as_secs_f64(),
        args.devices,
        started.elapsed().as_secs_f64(),
        args.wave
    );
    for (i, device) in fleet.clients.iter().enumerate() {
        listeners.spawn(watch_connection(
            i,
            device.connection_state(),
            fleet.clone(),
            stats.clone(),
        ));
    }

    // The load.
    let rng = Rng::new(seed);
    let stop = Arc::new(AtomicBool::new(false));
    let mut drivers = JoinSet::new();
    drivers.spawn(drive(
        args.methods_rate,
        args.max_in_flight,
        duration,
        stop.clone(),
        stats.clone(),
        rng.fork(1),
        Op::Method,
        fleet.clone(),
        service.clone(),
        args.desired_timeout,
    ));
    drivers.spawn(drive(
        args.reported_rate,
        args.max_in_flight,
        duration,
        stop.clone(),
        stats.clone(),
        rng.fork(2),
        Op::Reported,
        fleet.clone(),
        service.clone(),
        args.desired_timeout,
    ));
    drivers.spawn(drive(
        args.desired_rate,
        args.max_in_flight,
        duration,
        stop.clone(),
        stats.clone(),
        rng.fork(3),
        Op::Desired,
        fleet.clone(),
        service.clone(),
        args.desired_timeout,
    ));

    let load_started = Instant::now();
    let scraper = match args.scrape_metrics {
        Some(secs) => Some(tokio::spawn(scrape_metrics(
            metrics_client(&hub.ca_pem)?,
            format!("https://localhost:{}/metrics", hub.https_port),
            Duration::from_secs_f64(secs),
            stats.clone(),
        ))),
        None => None,
    };
    let stats_client = hub.service(Duration::from_secs(5))?;
    let mut samples = vec![sample(&hub, &stats_client, load_started, stats).await];
    print_sample(samples.last());
    let every = Duration::from_secs_f64(args.sample_secs);
    let mut next = load_started + every;
    let mut hub_died = None;
    loop {
        let wait = tokio::time::sleep_until(next.into());
        tokio::select! {
            () = wait => {
                if let Some(status) = hub.exited() {
                    stop.store(true, Ordering::SeqCst);
                    hub_died = Some(format!("the hub exited during the soak ({status}); log: {}", hub.log_tail(10)));
                    break;
                }
                samples.push(sample(&hub, &stats_client, load_started, stats).await);
                print_sample(samples.last());
                next += every;
            }
            done = drivers.join_next() => {
                match done {
                    Some(Ok(())) => continue,
                    Some(Err(e)) => bail!("a load driver panicked: {e}"),
                    None => break,
                }
            }
        }
    }
    while drivers.join_next().await.is_some() {}
    if let Some(died) = hub_died {
        bail!(died);
    }
    // A last sample at the end of the load, unless the periodic one just was.
    if samples
        .last()
        .is_none_or(|s| load_started.elapsed() > s.elapsed + Duration::from_secs(1))
    {
        samples.push(sample(&hub, &stats_client, load_started, stats).await);
        print_sample(samples.last());
    }

    if let Some(scraper) = scraper {
        scraper.abort();
    }
    fleet.closing.store(true, Ordering::SeqCst);
    verify(&service, &fleet, stats).await;
    devices::close_all(&fleet.clients, Duration::from_secs(10)).await;
    listeners.abort_all();
    match hub.terminate(Duration::from_secs(60)).await? {
        Some(status) if status.success() => {}
        Some(status) => stats
            .hub
            .error(format!("the hub exited {status} on SIGTERM")),
        None => stats
            .hub
            .error("the hub did not stop within 60 s of SIGTERM"),
    }
    Ok(samples)
}

/// An HTTPS client trusting the hub's CA, for `/metrics` (which needs no token).
fn metrics_client(ca_pem: &[u8]) -> Result<reqwest::Client> {
    let certs = reqwest::Certificate::from_pem_bundle(ca_pem).context("reading the hub's CA")?;
    // reqwest is built without a crypto provider of its own; the SDK's ServiceClient, built
    // before this, installed ring as the process default.
    reqwest::Client::builder()
        .tls_certs_merge(certs)
        .timeout(Duration::from_secs(10))
        .build()
        .context("building the /metrics client")
}

/// Reads `url` every `every`, as a Prometheus scraper would; a failed scrape is a hub error.
async fn scrape_metrics(client: reqwest::Client, url: String, every: Duration, stats: Arc<Stats>) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let outcome = match client.get(&url).send().await {
            Ok(resp) if resp.status().is_success() => resp.bytes().await.map(|_| ()),
            Ok(resp) => {
                stats
                    .hub
                    .error(format!("GET /metrics answered {}", resp.status()));
                continue;
            }
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            stats.hub.error(format!("GET /metrics failed: {e}"));
        }
    }
}

/// Counts a device's drops: a change from connected to anything else.
async fn watch_connection(
    i: usize,
    mut state: watch::Receiver<twinhub_sdk::ConnectionState>,
    fleet: Arc<Fleet>,
    stats: Arc<Stats>,
) {
    let mut was_connected = state.borrow_and_update().is_connected();
    while state.changed().await.is_ok() {
        let now = state.borrow_and_update().clone();
        if fleet.closing.load(Ordering::SeqCst) {
            return;
        }
        if was_connected && !now.is_connected() {
            stats
                .disconnects
                .error(format!("{}: {now:?}", fleet.ids[i]));
        }
        was_connected = now.is_connected();
    }
}

#[derive(Clone, Copy)]
enum Op {
    Method,
    Reported,
    Desired,
}

/// Issues `rate` operations of one kind per second until `duration` is over, then waits for
/// those in flight.
#[allow(clippy::too_many_arguments)]
async fn drive(
    rate: f64,
    max_in_flight: usize,
    duration: Duration,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    mut rng: Rng,
    op: Op,
    fleet: Arc<Fleet>,
    service: ServiceClient,
    desired_timeout: u64,
) {
    if rate <= 0.0 {
        return;
    }
    let kind = match op {
        Op::Method => &stats.methods,
        Op::Reported => &stats.reported,
        Op::Desired => &stats.desired,
    };
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let mut tasks = JoinSet::new();
    let mut pacer = Pacer::new(rate);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    while pacer.started.elapsed() < duration && !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        for _ in 0..pacer.due() {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                kind.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            seq += 1;
            let fleet = fleet.clone();
            let stats = stats.clone();
            match op {
                Op::Method => {
                    let i = rng.below(fleet.ids.len());
                    let service = service.clone();
                    tasks.spawn(async move {
                        call_method(&service, &fleet, i, seq, &stats.methods).await;
                        drop(permit);
                    });
                }
                Op::Reported => {
                    let Some(i) = Fleet::claim(&fleet.reported_busy, &mut rng) else {
                        kind.skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    tasks.spawn(async move {
                        let _claim = Claim(&fleet.reported_busy[i]);
                        patch_reported(&fleet, i, &stats.reported).await;
                        drop(permit);
                    });
                }
                Op::Desired => {
                    let Some(i) = Fleet::claim(&fleet.desired_busy, &mut rng) else {
                        kind.skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let service = service.clone();
                    tasks.spawn(async move {
                        let _claim = Claim(&fleet.desired_busy[i]);
                        patch_desired(&service, &fleet, i, desired_timeout, &stats.desired).await;
                        drop(permit);
                    });
                }
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// Invokes the method on device `i`; the device echoes the payload.
async fn call_method(service: &ServiceClient, fleet: &Fleet, i: usize, seq: u64, kind: &Kind) {
    let id = &fleet.ids[i];
    let payload = json!({ "n": seq });
    let call = CloudToDeviceMethod {
        method_name: METHOD.into(),
        payload: Some(payload.clone()),
        response_timeout_in_seconds: Some(30),
        // `DeviceClient::connect` returns at the CONNACK, before the hub has acknowledged the
        // method subscription: a call in that gap would find nobody listening. Let the hub
        // wait for the subscription a little, as IoT Hub does for a device coming online.
        connect_timeout_in_seconds: Some(5),
    };
    let started = Instant::now();
    match service.invoke_method(id, &call).await {
        Ok(answer) if answer.status == 200 && answer.payload == json!({ "echo": payload }) => {
            kind.ok(started.elapsed());
        }
        Ok(answer) => kind.error(format!(
            "{id}: answered {} {} to {payload}",
            answer.status, answer.payload
        )),
        Err(e) => kind.error(format!("{id}: {e}")),
    }
}

/// Device `i` reports the next value of its counter.
async fn patch_reported(fleet: &Fleet, i: usize, kind: &Kind) {
    let seq = fleet.reported[i].sent.fetch_add(1, Ordering::SeqCst) + 1;
    let started = Instant::now();
    match fleet.clients[i].patch_reported(&json!({ PROP: seq })).await {
        Ok(_) => {
            fleet.reported[i].acked.store(seq, Ordering::SeqCst);
            kind.ok(started.elapsed());
        }
        Err(e) => kind.error(format!("{}: {e}", fleet.ids[i])),
    }
}

/// The service sets the next desired value on device `i`, then waits until the device has
/// received it. The latency counted is from the service's call to the device's receipt.
async fn patch_desired(
    service: &ServiceClient,
    fleet: &Fleet,
    i: usize,
    timeout_secs: u64,
    kind: &Kind,
) {
    let id = &fleet.ids[i];
    let seq = fleet.desired[i].sent.fetch_add(1, Ordering::SeqCst) + 1;
    let mut received = fleet.received[i].subscribe();
    let started = Instant::now();
    let patch = json!({ "properties": { "desired": { PROP: seq } } });
    if let Err(e) = service.update_twin(id, &patch, None).await {
        kind.error(format!("{id}: {e}"));
        return;
    }
    fleet.desired[i].acked.store(seq, Ordering::SeqCst);
    let limit = Duration::from_secs(timeout_secs);
    let arrived = tokio::time::timeout(limit, async {
        received.wait_for(|&v| v >= seq).await.is_ok()
    })
    .await;
    match arrived {
        Ok(true) => kind.ok(started.elapsed()),
        Ok(false) => kind.error(format!("{id}: the desired listener ended")),
        Err(_) => kind.error(format!(
            "{id}: desired {PROP}={seq} acknowledged but not received by the device within {timeout_secs} s (device has {})",
            *received.borrow()
        )),
    }
}

/// After the load: every twin must hold the last acknowledged counters (each device's
/// writes of a kind went one at a time) and nothing above what was sent.
async fn verify(service: &ServiceClient, fleet: &Fleet, stats: &Stats) {
    let query = format!(
        "SELECT deviceId, properties.reported.{PROP} AS r, properties.desired.{PROP} AS d FROM devices"
    );
    let mut rows = Vec::new();
    let mut pages = service.query(query).page_size(1000);
    loop {
        match pages.next_page().await {
            Ok(Some(page)) => rows.extend(page.items),
            Ok(None) => break,
            Err(e) => {
                stats.verify.error(format!("querying the twins: {e}"));
                return;
            }
        }
    }
    let index: BTreeMap<&str, usize> = fleet
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut seen = vec![false; fleet.ids.len()];
    for row in &rows {
        let Some(&i) = row
            .get("deviceId")
            .and_then(Value::as_str)
            .and_then(|id| index.get(id))
        else {
            continue;
        };
        seen[i] = true;
        for (what, stored, seq) in [
            ("reported", &row["r"], &fleet.reported[i]),
            ("desired", &row["d"], &fleet.desired[i]),
        ] {
            let stored = stored.as_u64().unwrap_or(0);
            let acked = seq.acked.load(Ordering::SeqCst);
            let sent = seq.sent.load(Ordering::SeqCst);
            if stored < acked || stored > sent {
                stats.verify.error(format!(
                    "{} {what}.{PROP}: stored {stored}, last acknowledged {acked}, last sent {sent}",
                    fleet.ids[i]
                ));
            } else {
                stats.verify.ok(Duration::ZERO);
            }
        }
    }
    let missing = seen.iter().filter(|s| !**s).count();
    if missing > 0 {
        stats
            .verify
            .error(format!("{missing} device(s) missing from the query"));
    }
}

async fn sample(
    hub: &HubProcess,
    service: &ServiceClient,
    since: Instant,
    stats: &Stats,
) -> Sample {
    let connected = service
        .service_statistics()
        .await
        .ok()
        .map(|s| s.connected_device_count);
    Sample {
        elapsed: since.elapsed(),
        rss_kib: hub.rss_kib(),
        ops: stats.ops(),
        errors: stats.errors(),
        connected,
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn print_sample(sample: Option<&Sample>) {
    let Some(s) = sample else { return };
    println!(
        "load +{:>7.1}s  RSS {:>10}  ops {:>9}  errors {:>5}  connected {}",
        s.elapsed.as_secs_f64(),
        mib(s.rss_kib),
        s.ops,
        s.errors,
        s.connected.map_or_else(|| "?".into(), |c| c.to_string())
    );
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)]) / 1000.0
}

fn print_totals(stats: &Stats, samples: &[Sample], duration: Duration) {
    let secs = duration.as_secs_f64();
    println!();
    println!(
        "{:<12} {:>10} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "kind", "ok", "errors", "skipped", "ok/s", "p50 ms", "p99 ms", "max ms"
    );
    for (name, kind) in stats.kinds() {
        let mut lat = lock(&kind.latencies_us).clone();
        lat.sort_unstable();
        let ok = kind.ok.load(Ordering::Relaxed);
        let timed = matches!(name, "methods" | "reported" | "desired");
        println!(
            "{:<12} {:>10} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}",
            name,
            if name == "disconnects" || name == "hub" {
                "-".to_string()
            } else {
                ok.to_string()
            },
            kind.errors.load(Ordering::Relaxed),
            kind.skipped.load(Ordering::Relaxed),
            if timed {
                format!("{:.1}", ok as f64 / secs)
            } else {
                "-".into()
            },
            if timed {
                format!("{:.1}", percentile(&lat, 50.0))
            } else {
                "-".into()
            },
            if timed {
                format!("{:.1}", percentile(&lat, 99.0))
            } else {
                "-".into()
            },
            if timed {
                format!("{:.1}", percentile(&lat, 100.0))
            } else {
                "-".into()
            },
        );
    }
    println!("(desired latency: from the service's PATCH to the device's receipt)");
    print_errors(stats);

    println!();
    println!("hub RSS over the run:");
    let max = samples
        .iter()
        .filter_map(|s| s.rss_kib)
        .max()
        .unwrap_or(1)
        .max(1);
    for s in samples {
        let bar = s.rss_kib.map_or(0, |k| (k * 50 / max) as usize);
        println!(
            "  {:>8.1}s {:>12}  {}",
            s.elapsed.as_secs_f64(),
            mib(s.rss_kib),
            "#".repeat(bar)
        );
    }
    let rss: Vec<u64> = samples.iter().filter_map(|s| s.rss_kib).collect();
    if let (Some(first), Some(last)) = (rss.first(), rss.last()) {
        let growth = *last as f64 - *first as f64;
        println!(
            "RSS: {} at the start of the load, {} at the end ({:+.1} MiB, {:+.1}%), peak {}",
            mib(Some(*first)),
            mib(Some(*last)),
            growth / 1024.0,
            100.0 * growth / (*first).max(1) as f64,
            mib(Some(max))
        );
    }
}

fn print_errors(stats: &Stats) {
    for (name, kind) in stats.kinds() {
        let first = lock(&kind.first_errors);
        if first.is_empty() {
            continue;
        }
        println!(
            "first {name} errors ({} in all):",
            kind.errors.load(Ordering::Relaxed)
        );
        for e in first.iter() {
            println!("  {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_issues_the_rate_over_time() {
        let mut pacer = Pacer {
            rate: 100.0,
            started: Instant::now() - Duration::from_millis(500),
            issued: 0,
        };
        assert_eq!(pacer.due(), 50);
        assert_eq!(pacer.due(), 0);
        pacer.started -= Duration::from_millis(100);
        assert_eq!(pacer.due(), 10);
    }

    #[test]
    fn percentiles_read_sorted_microseconds_as_milliseconds() {
        let lat: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile(&lat, 50.0), 51.0);
        assert_eq!(percentile(&lat, 100.0), 100.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }

    #[test]
    fn a_claimed_device_is_not_handed_out_twice() {
        let busy: Vec<AtomicBool> = (0..1).map(|_| AtomicBool::new(false)).collect();
        let mut rng = Rng::new(1);
        assert_eq!(Fleet::claim(&busy, &mut rng), Some(0));
        assert_eq!(Fleet::claim(&busy, &mut rng), None);
        drop(Claim(&busy[0]));
        assert_eq!(Fleet::claim(&busy, &mut rng), Some(0));
    }
}
