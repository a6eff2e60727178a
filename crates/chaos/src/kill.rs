//! `twinhub-chaos kill`: crash durability. Each trial starts `twinhub serve` on a fresh data
//! dir, runs mixed durable load (device reported patches over MQTT, service desired patches,
//! device creates, twin jobs), records every write the hub acknowledged, SIGKILLs the hub at
//! a random moment, restarts it on the same data dir and checks that every acknowledged
//! write is there.
//!
//! What counts: a write is acknowledged when its SDK call returned `Ok` (for a reported patch
//! the hub answers only after the durable commit). Counters increase per device and each
//! device's writes of one kind are issued one at a time, so after the restart the stored
//! counter must be at least the last acknowledged one (else acknowledged writes were lost)
//! and at most the last one sent (else the store holds a value nobody wrote). Writes in
//! flight at the kill may or may not be there. The kill is a process crash, not a power cut:
//! what the hub handed to the kernel survives it whether or not it was fsynced.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use twinhub_sdk::{DeviceClient, NewDevice, ServiceClient};

use crate::devices::{self, DeviceSettings};
use crate::hub::{HubCommand, HubProcess};
use crate::rng::Rng;

/// The twin property both counters live in (`properties.reported.seq`,
/// `properties.desired.seq`).
const SEQ: &str = "seq";
/// Devices each twin job targets.
const JOB_DEVICES: usize = 3;
/// How long the jobs acknowledged before the kill may take to finish after the restart.
const JOB_FINISH_LIMIT: Duration = Duration::from_secs(30);
/// Error messages kept per kind.
const KEEP_MESSAGES: usize = 3;

#[derive(Debug, clap::Args)]
pub struct KillArgs {
    /// How many kill-and-restart trials to run
    #[arg(long, default_value_t = 3)]
    pub trials: usize,
    /// Each trial loads the hub for a random time between 1 and this many seconds
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Devices connected over MQTT/TLS, each patching its reported properties in a loop
    #[arg(long, default_value_t = 50)]
    pub devices: usize,
    /// The twinhub binary [default: next to this program, else target/debug or target/release]
    #[arg(long)]
    pub twinhub: Option<PathBuf>,
    /// Keep each trial's data dir and hub logs (they are always kept when a trial fails)
    #[arg(long)]
    pub keep: bool,
    /// Seed for the random choices (kill times, job targets) [default: random, printed]
    #[arg(long)]
    pub seed: Option<u64>,
    /// RUST_LOG for the hub
    #[arg(long, default_value = "warn")]
    pub hub_log: String,
    /// Service workers patching desired properties (each owns a share of the devices)
    #[arg(long, default_value_t = 4)]
    pub desired_workers: usize,
    /// Service workers creating new devices
    #[arg(long, default_value_t = 2)]
    pub creators: usize,
    /// Pause between two twin-job creations, milliseconds
    #[arg(long, default_value_t = 100)]
    pub job_interval_ms: u64,
    /// Where the trial directories go [default: the system's temp dir]
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// Errors seen during the load, by kind, split at the kill.
#[derive(Default)]
struct Errors {
    /// Set just before the SIGKILL: errors after it are expected.
    killing: AtomicBool,
    by_kind: Mutex<BTreeMap<&'static str, Tally>>,
}

#[derive(Default, Clone)]
struct Tally {
    before_kill: u64,
    after_kill: u64,
    first_before_kill: Vec<String>,
}

impl Errors {
    fn record(&self, kind: &'static str, error: &dyn std::fmt::Display) {
        let after = self.killing.load(Ordering::SeqCst);
        let mut map = self.by_kind.lock().unwrap_or_else(|p| p.into_inner());
        let tally = map.entry(kind).or_default();
        if after {
            tally.after_kill += 1;
        } else {
            tally.before_kill += 1;
            if tally.first_before_kill.len() < KEEP_MESSAGES {
                tally.first_before_kill.push(error.to_string());
            }
        }
    }

    fn snapshot(&self) -> BTreeMap<&'static str, Tally> {
        self.by_kind
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// One device's counter of one kind: what was sent and what the hub acknowledged.
#[derive(Debug, Default, Clone)]
struct Counter {
    device: usize,
    last_sent: u64,
    /// Acknowledged values, increasing.
    acked: Vec<u64>,
}

impl Counter {
    fn last_acked(&self) -> u64 {
        self.acked.last().copied().unwrap_or(0)
    }

    /// Compares the counter the hub stored with this record: how many acknowledged writes
    /// it does not reflect (each acknowledged value above it), and whether it holds a value
    /// that was never sent.
    fn judge(&self, stored: u64) -> (usize, bool) {
        let missing = self.acked.iter().filter(|&&v| v > stored).count();
        (missing, stored > self.last_sent)
    }
}

/// What one load worker leaves behind.
enum Work {
    Reported(Counter),
    Desired(Vec<Counter>),
    Created { attempted: u64, acked: Vec<String> },
    Jobs { attempted: u64, acked: Vec<String> },
}

/// Everything acknowledged during one trial's load.
#[derive(Default)]
struct Ledger {
    reported: Vec<Counter>,
    desired: Vec<Counter>,
    created: Vec<String>,
    created_attempted: u64,
    jobs: Vec<String>,
    jobs_attempted: u64,
}

impl Ledger {
    fn add(&mut self, work: Work) {
        match work {
            Work::Reported(c) => self.reported.push(c),
            Work::Desired(cs) => self.desired.extend(cs),
            Work::Created { attempted, acked } => {
                self.created_attempted += attempted;
                self.created.extend(acked);
            }
            Work::Jobs { attempted, acked } => {
                self.jobs_attempted += attempted;
                self.jobs.extend(acked);
            }
        }
    }

    fn acked_reported(&self) -> usize {
        self.reported.iter().map(|c| c.acked.len()).sum()
    }

    fn acked_desired(&self) -> usize {
        self.desired.iter().map(|c| c.acked.len()).sum()
    }
}

/// One trial's figures.
#[derive(Default)]
struct TrialReport {
    load: Duration,
    acked_reported: usize,
    acked_desired: usize,
    acked_creates: usize,
    acked_jobs: usize,
    lost: usize,
    /// Stored counters above anything sent.
    phantom: usize,
    restart_banner: Option<Duration>,
    restart_ready: Option<Duration>,
    errors_before_kill: u64,
    errors_after_kill: u64,
    /// Why the trial failed; empty when it passed.
    failures: Vec<String>,
    /// Observations that do not fail the trial.
    notes: Vec<String>,
    kept: Option<PathBuf>,
}

pub async fn run(args: KillArgs) -> Result<bool> {
    if args.trials == 0 || args.devices == 0 {
        bail!("--trials and --devices must be at least 1");
    }
    if !args.seconds.is_finite() || args.seconds < 1.0 || args.seconds > 86_400.0 {
        bail!("--seconds must be between 1 and 86400");
    }
    let cmd = HubCommand::locate(args.twinhub.clone(), &args.hub_log)?;
    let seed = args.seed.unwrap_or_else(Rng::fresh_seed);
    let rng = Rng::new(seed);
    println!(
        "twinhub-chaos kill: {} trial(s), {} devices, load 1-{} s, hub {}, seed {seed}",
        args.trials,
        args.devices,
        args.seconds,
        cmd.bin.display()
    );
    let mut reports = Vec::new();
    for n in 1..=args.trials {
        let mut trial_rng = rng.fork(n as u64);
        let report = match trial(n, &args, &cmd, &mut trial_rng).await {
            Ok(report) => report,
            Err(e) => TrialReport {
                failures: vec![format!("{e:#}")],
                ..Default::default()
            },
        };
        print_trial(n, args.trials, &report);
        reports.push(report);
    }
    print_summary(&reports);
    Ok(reports.iter().all(|r| r.failures.is_empty()))
}

async fn trial(n: usize, args: &KillArgs, cmd: &HubCommand, rng: &mut Rng) -> Result<TrialReport> {
    let prefix = format!("twinhub-chaos-kill-{n}-");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    let dir = match &args.work_dir {
        Some(parent) => {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
            builder.tempdir_in(parent)
        }
        None => builder.tempdir(),
    }
    .context("creating the trial directory")?;
    let data_dir = dir.path().join("data");
    let mut report = TrialReport::default();

    let result = load_kill_verify(n, args, cmd, rng, dir.path(), &data_dir, &mut report).await;
    if let Err(e) = result {
        report.failures.push(format!("{e:#}"));
    }
    if args.keep || !report.failures.is_empty() {
        report.kept = Some(dir.keep());
    }
    Ok(report)
}

async fn load_kill_verify(
    n: usize,
    args: &KillArgs,
    cmd: &HubCommand,
    rng: &mut Rng,
    dir: &std::path::Path,
    data_dir: &std::path::Path,
    report: &mut TrialReport,
) -> Result<()> {
    let mut hub = HubProcess::start(cmd, data_dir, &dir.join("hub-1.log"))
        .await
        .context("first start")?;
    let service = hub.service(Duration::from_secs(10))?;
    devices::register(&service, args.devices)
        .await
        .context("registering the devices")?;
    let settings = DeviceSettings {
        operation_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(10),
        sas_token_ttl: Duration::from_secs(3600),
    };
    let clients = (0..args.devices)
        .map(|i| devices::client(&hub, &devices::device_id(i), &settings))
        .collect::<Result<Vec<_>>>()?;
    let mut drains = JoinSet::new();
    devices::connect_in_waves(
        &clients,
        100,
        |_, device| {
            // Take the desired pushes, as a device app would.
            let mut patches = device.desired_patches();
            drains.spawn(async move { while patches.recv().await.is_some() {} });
        },
        |_| {},
    )
    .await
    .context("connecting the devices")?;

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(Errors::default());
    let mut workers = JoinSet::new();
    for (i, device) in clients.iter().enumerate() {
        workers.spawn(report_loop(i, device.clone(), stop.clone(), errors.clone()));
    }
    let w = args.desired_workers.max(1);
    for k in 0..w {
        let mine: Vec<usize> = (0..args.devices).filter(|i| i % w == k).collect();
        workers.spawn(desired_loop(
            mine,
            service.clone(),
            stop.clone(),
            errors.clone(),
        ));
    }
    for c in 0..args.creators {
        workers.spawn(create_loop(
            format!("new-t{n}-c{c}"),
            service.clone(),
            stop.clone(),
            errors.clone(),
        ));
    }
    workers.spawn(job_loop(
        format!("chaos-t{n}-job"),
        args.devices,
        Duration::from_millis(args.job_interval_ms),
        rng.fork(0),
        service.clone(),
        stop.clone(),
        errors.clone(),
    ));

    let load = Duration::from_secs_f64(rng.between(1.0, args.seconds.max(1.0)));
    let started = Instant::now();
    tokio::time::sleep(load).await;
    if let Some(status) = hub.exited() {
        bail!(
            "the hub died during the load ({status}); log: {}",
            hub.log_tail(10)
        );
    }
    errors.killing.store(true, Ordering::SeqCst);
    hub.kill9().context("killing the hub")?;
    report.load = started.elapsed();
    stop.store(true, Ordering::SeqCst);

    // Every worker ends with its current call (which fails: the hub is gone); closing the
    // devices ends their pending patches at once.
    devices::close_all(&clients, Duration::from_secs(5)).await;
    let mut ledger = Ledger::default();
    let gather = async {
        while let Some(done) = workers.join_next().await {
            ledger.add(done.context("a load worker panicked")?);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), gather)
        .await
        .context("the load workers did not stop within 60 s of the kill")??;
    drains.abort_all();
    drop(clients);
    report.acked_reported = ledger.acked_reported();
    report.acked_desired = ledger.acked_desired();
    report.acked_creates = ledger.created.len();
    report.acked_jobs = ledger.jobs.len();
    for (kind, tally) in errors.snapshot() {
        report.errors_before_kill += tally.before_kill;
        report.errors_after_kill += tally.after_kill;
        if tally.before_kill > 0 {
            report.notes.push(format!(
                "{} {kind} error(s) before the kill, first: {}",
                tally.before_kill,
                tally.first_before_kill.join(" / ")
            ));
        }
    }

    let hub = match HubProcess::start(cmd, data_dir, &dir.join("hub-2.log")).await {
        Ok(hub) => hub,
        Err(e) => {
            report
                .failures
                .push(format!("the hub failed to restart after SIGKILL: {e:#}"));
            return Ok(());
        }
    };
    report.restart_banner = Some(hub.banner_after);
    report.restart_ready = Some(hub.ready_after);
    let service = hub.service(Duration::from_secs(10))?;
    verify(&service, &ledger, report).await?;
    wait_for_jobs(&service, &ledger.jobs, report).await;

    match hub.terminate(Duration::from_secs(30)).await? {
        Some(status) if status.success() => {}
        Some(status) => report
            .failures
            .push(format!("the restarted hub exited {status} on SIGTERM")),
        None => report
            .failures
            .push("the restarted hub did not stop within 30 s of SIGTERM".into()),
    }
    Ok(())
}

/// Device `i` patches `reported.seq` = 1, 2, 3, ... until stopped.
async fn report_loop(
    i: usize,
    device: DeviceClient,
    stop: Arc<AtomicBool>,
    errors: Arc<Errors>,
) -> Work {
    let mut counter = Counter {
        device: i,
        ..Default::default()
    };
    while !stop.load(Ordering::SeqCst) {
        let seq = counter.last_sent + 1;
        counter.last_sent = seq;
        match device.patch_reported(&json!({ SEQ: seq })).await {
            Ok(_) => counter.acked.push(seq),
            Err(e) => {
                errors.record("reported", &e);
                pause_after_error(&stop).await;
            }
        }
    }
    Work::Reported(counter)
}

/// Patches `desired.seq` on each of `mine` in turn, each device's counter increasing.
async fn desired_loop(
    mine: Vec<usize>,
    service: ServiceClient,
    stop: Arc<AtomicBool>,
    errors: Arc<Errors>,
) -> Work {
    let mut counters: Vec<Counter> = mine
        .iter()
        .map(|&device| Counter {
            device,
            ..Default::default()
        })
        .collect();
    'load: loop {
        for counter in &mut counters {
            if stop.load(Ordering::SeqCst) {
                break 'load;
            }
            let seq = counter.last_sent + 1;
            counter.last_sent = seq;
            let patch = json!({ "properties": { "desired": { SEQ: seq } } });
            match service
                .update_twin(&devices::device_id(counter.device), &patch, None)
                .await
            {
                Ok(_) => counter.acked.push(seq),
                Err(e) => {
                    errors.record("desired", &e);
                    pause_after_error(&stop).await;
                }
            }
        }
        if counters.is_empty() {
            break;
        }
    }
    Work::Desired(counters)
}

/// Creates devices `{prefix}-000000`, `{prefix}-000001`, ... until stopped.
async fn create_loop(
    prefix: String,
    service: ServiceClient,
    stop: Arc<AtomicBool>,
    errors: Arc<Errors>,
) -> Work {
    let mut attempted = 0;
    let mut acked = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let id = format!("{prefix}-{attempted:06}");
        attempted += 1;
        match service.create_device(&id, NewDevice::default()).await {
            Ok(_) => acked.push(id),
            Err(e) => {
                errors.record("create", &e);
                pause_after_error(&stop).await;
            }
        }
    }
    Work::Created { attempted, acked }
}

/// Schedules twin jobs (a tag on a few random devices) every `interval` until stopped.
async fn job_loop(
    prefix: String,
    devices: usize,
    interval: Duration,
    mut rng: Rng,
    service: ServiceClient,
    stop: Arc<AtomicBool>,
    errors: Arc<Errors>,
) -> Work {
    let mut attempted = 0;
    let mut acked = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let id = format!("{prefix}-{attempted:05}");
        attempted += 1;
        let targets: Vec<String> = (0..JOB_DEVICES.min(devices))
            .map(|_| format!("'{}'", devices::device_id(rng.below(devices))))
            .collect();
        let condition = format!("deviceId IN [{}]", targets.join(", "));
        let patch = json!({ "tags": { "chaosJob": id } });
        match service
            .schedule_twin_job(&id, &condition, &patch, None, Some(300))
            .await
        {
            Ok(_) => acked.push(id),
            Err(e) => errors.record("job", &e),
        }
        tokio::time::sleep(interval).await;
    }
    Work::Jobs { attempted, acked }
}

/// A short pause after a failed call, so a refusing hub is not spun against.
async fn pause_after_error(stop: &AtomicBool) {
    if !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Retries `op` a few times on errors other than 404, so one slow answer is not taken for
/// a loss. `Ok(None)` is a 404.
async fn read_back<T, F, Fut>(mut op: F) -> Result<Option<T>, twinhub_sdk::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, twinhub_sdk::Error>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.status() == Some(404) => return Ok(None),
            Err(e) if attempt >= 3 => return Err(e),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn stored_seq(section: &serde_json::Map<String, Value>) -> u64 {
    section.get(SEQ).and_then(Value::as_u64).unwrap_or(0)
}

/// Checks every acknowledged write against the restarted hub.
async fn verify(service: &ServiceClient, ledger: &Ledger, report: &mut TrialReport) -> Result<()> {
    let mut lost = Vec::new();
    let mut phantom = Vec::new();
    let mut unreadable = Vec::new();

    // Twins: one read per device serves both counters.
    let mut by_device: BTreeMap<usize, (Option<&Counter>, Option<&Counter>)> = BTreeMap::new();
    for c in &ledger.reported {
        by_device.entry(c.device).or_default().0 = Some(c);
    }
    for c in &ledger.desired {
        by_device.entry(c.device).or_default().1 = Some(c);
    }
    let mut reads = JoinSet::new();
    for &device in by_device.keys() {
        let service = service.clone();
        let id = devices::device_id(device);
        reads.spawn(async move {
            let twin = read_back(|| service.get_twin(&id)).await;
            (device, twin)
        });
    }
    while let Some(done) = reads.join_next().await {
        let (device, twin) = done.context("a twin read panicked")?;
        let id = devices::device_id(device);
        let (reported, desired) = by_device[&device];
        let twin = match twin {
            Ok(Some(twin)) => twin,
            Ok(None) => {
                report.lost +=
                    reported.map_or(0, |c| c.acked.len()) + desired.map_or(0, |c| c.acked.len());
                lost.push(format!("device {id} (and its twin) is gone"));
                continue;
            }
            Err(e) => {
                unreadable.push(format!("twin of {id}: {e}"));
                continue;
            }
        };
        let props = twin.properties.unwrap_or_default();
        for (kind, counter, stored) in [
            ("reported", reported, stored_seq(&props.reported)),
            ("desired", desired, stored_seq(&props.desired)),
        ] {
            let Some(counter) = counter else { continue };
            let (missing, unsent) = counter.judge(stored);
            if missing > 0 {
                report.lost += missing;
                lost.push(format!(
                    "{id} {kind}: {missing} acknowledged write(s) lost, stored {SEQ} {stored} < last acknowledged {}",
                    counter.last_acked()
                ));
            }
            if unsent {
                phantom.push(format!(
                    "{id} {kind}: stored {SEQ} {stored} > last sent {}",
                    counter.last_sent
                ));
            }
        }
    }

    let created = check_exist(&ledger.created, |id| {
        let service = service.clone();
        async move {
            read_back(|| service.get_device(&id))
                .await
                .map(|d| d.is_some())
        }
    })
    .await?;
    for (id, result) in created {
        match result {
            Ok(true) => {}
            Ok(false) => {
                report.lost += 1;
                lost.push(format!("created device {id} is missing"));
            }
            Err(e) => unreadable.push(format!("device {id}: {e}")),
        }
    }
    let jobs = check_exist(&ledger.jobs, |id| {
        let service = service.clone();
        async move {
            read_back(|| service.get_job(&id))
                .await
                .map(|j| j.is_some())
        }
    })
    .await?;
    for (id, result) in jobs {
        match result {
            Ok(true) => {}
            Ok(false) => {
                report.lost += 1;
                lost.push(format!("job {id} is missing"));
            }
            Err(e) => unreadable.push(format!("job {id}: {e}")),
        }
    }

    report.phantom = phantom.len();
    for (what, list) in [
        ("acknowledged writes lost", &lost),
        ("stored values nobody sent", &phantom),
        ("could not be read back", &unreadable),
    ] {
        if !list.is_empty() {
            let shown: Vec<&str> = list.iter().take(5).map(String::as_str).collect();
            report.failures.push(format!(
                "{what}: {} case(s): {}{}",
                list.len(),
                shown.join("; "),
                if list.len() > 5 { "; ..." } else { "" }
            ));
        }
    }
    Ok(())
}

/// Runs `check` on every id, 16 at a time.
async fn check_exist<F, Fut>(
    ids: &[String],
    check: F,
) -> Result<Vec<(String, Result<bool, twinhub_sdk::Error>)>>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<bool, twinhub_sdk::Error>> + Send + 'static,
{
    let mut results = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(16) {
        let mut set = JoinSet::new();
        for id in chunk {
            let fut = check(id.clone());
            let id = id.clone();
            set.spawn(async move { (id, fut.await) });
        }
        while let Some(done) = set.join_next().await {
            results.push(done.context("a read-back task panicked")?);
        }
    }
    Ok(results)
}

/// Jobs acknowledged before the kill must run to an end after the restart (the hub resumes
/// unfinished jobs when it opens its store).
async fn wait_for_jobs(service: &ServiceClient, jobs: &[String], report: &mut TrialReport) {
    let started = Instant::now();
    let mut open: Vec<String> = jobs.to_vec();
    let mut last_status = BTreeMap::new();
    while !open.is_empty() && started.elapsed() < JOB_FINISH_LIMIT {
        let mut still = Vec::new();
        for id in open {
            match service.get_job(&id).await {
                Ok(job) if matches!(job.status.as_str(), "completed" | "failed" | "cancelled") => {
                    if job.status != "completed" {
                        report.notes.push(format!(
                            "job {id} ended {}: {}",
                            job.status,
                            job.failure_reason.unwrap_or_default()
                        ));
                    }
                }
                Ok(job) => {
                    last_status.insert(id.clone(), job.status);
                    still.push(id);
                }
                Err(e) => {
                    last_status.insert(id.clone(), e.to_string());
                    still.push(id);
                }
            }
        }
        open = still;
        if !open.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    if !open.is_empty() {
        let shown: Vec<String> = open
            .iter()
            .take(5)
            .map(|id| format!("{id} ({})", last_status.get(id).map_or("?", String::as_str)))
            .collect();
        report.failures.push(format!(
            "{} acknowledged job(s) not finished {} s after the restart: {}",
            open.len(),
            JOB_FINISH_LIMIT.as_secs(),
            shown.join(", ")
        ));
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{:.2}", d.as_secs_f64()))
}

fn print_trial(n: usize, of: usize, r: &TrialReport) {
    println!(
        "trial {n}/{of}: load {:.2}s, acked reported {} desired {} creates {} jobs {}, lost {}, phantom {}, restart banner {}s ready {}s, errors before/after kill {}/{}: {}",
        r.load.as_secs_f64(),
        r.acked_reported,
        r.acked_desired,
        r.acked_creates,
        r.acked_jobs,
        r.lost,
        r.phantom,
        secs(r.restart_banner),
        secs(r.restart_ready),
        r.errors_before_kill,
        r.errors_after_kill,
        if r.failures.is_empty() {
            "OK"
        } else {
            "FAILED"
        },
    );
    for f in &r.failures {
        println!("  FAIL: {f}");
    }
    for note in &r.notes {
        println!("  note: {note}");
    }
    if let Some(dir) = &r.kept {
        println!("  kept: {}", dir.display());
    }
}

fn print_summary(reports: &[TrialReport]) {
    println!();
    println!(
        "{:>5} {:>7} {:>9} {:>8} {:>8} {:>6} {:>5} {:>8} {:>10} {:>9} {:>7}",
        "trial",
        "load_s",
        "reported",
        "desired",
        "creates",
        "jobs",
        "lost",
        "phantom",
        "restart_s",
        "banner_s",
        "result"
    );
    for (i, r) in reports.iter().enumerate() {
        println!(
            "{:>5} {:>7.2} {:>9} {:>8} {:>8} {:>6} {:>5} {:>8} {:>10} {:>9} {:>7}",
            i + 1,
            r.load.as_secs_f64(),
            r.acked_reported,
            r.acked_desired,
            r.acked_creates,
            r.acked_jobs,
            r.lost,
            r.phantom,
            secs(r.restart_ready),
            secs(r.restart_banner),
            if r.failures.is_empty() {
                "ok"
            } else {
                "FAILED"
            },
        );
    }
    let sum = |f: fn(&TrialReport) -> usize| reports.iter().map(f).sum::<usize>();
    println!(
        "{:>5} {:>7.2} {:>9} {:>8} {:>8} {:>6} {:>5} {:>8}",
        "all",
        reports.iter().map(|r| r.load.as_secs_f64()).sum::<f64>(),
        sum(|r| r.acked_reported),
        sum(|r| r.acked_desired),
        sum(|r| r.acked_creates),
        sum(|r| r.acked_jobs),
        sum(|r| r.lost),
        sum(|r| r.phantom),
    );
    let restarts: Vec<f64> = reports
        .iter()
        .filter_map(|r| r.restart_ready.map(|d| d.as_secs_f64()))
        .collect();
    if !restarts.is_empty() {
        let min = restarts.iter().copied().fold(f64::INFINITY, f64::min);
        let max = restarts.iter().copied().fold(0.0, f64::max);
        let mean = restarts.iter().sum::<f64>() / restarts.len() as f64;
        println!(
            "restart after SIGKILL (spawn to first REST answer): min {min:.2}s, mean {mean:.2}s, max {max:.2}s"
        );
    }
    let failed = reports.iter().filter(|r| !r.failures.is_empty()).count();
    if failed == 0 {
        println!(
            "all {} trial(s) passed: every acknowledged write survived SIGKILL",
            reports.len()
        );
    } else {
        println!("{failed} of {} trial(s) FAILED", reports.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_counters_are_judged_against_acks_and_sends() {
        // 1, 2 and 4 acknowledged; 3 failed; 5 was in flight at the kill.
        let c = Counter {
            device: 0,
            last_sent: 5,
            acked: vec![1, 2, 4],
        };
        assert_eq!(c.judge(4), (0, false));
        assert_eq!(
            c.judge(5),
            (0, false),
            "an unacknowledged write may be there"
        );
        assert_eq!(c.judge(3), (1, false));
        assert_eq!(c.judge(0), (3, false));
        assert_eq!(c.judge(6), (0, true));
        let untouched = Counter::default();
        assert_eq!(untouched.judge(0), (0, false));
        assert_eq!(untouched.judge(1), (0, true));
    }
}
