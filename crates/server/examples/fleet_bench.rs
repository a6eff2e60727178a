//! Fleet measurements: twin queries over a large registry and a method job across many
//! connected devices, on a real hub started in-process (temp data dir, loopback ports).
//!
//! ```text
//! cargo run --release -p twinhub-server --example fleet_bench -- query [--twins 100000]
//! cargo run --release -p twinhub-server --example fleet_bench -- job [--devices 10000]
//! ```
//!
//! Queries go through the SDK over HTTPS (what an application sees) and straight to
//! `Hub::query` (the engine alone). The job's devices are raw MQTT/TLS connections held by a
//! child process (this binary again, `devices` mode), so hub and devices each stay under the
//! per-process file limit; raise `ulimit -n` before running with many devices.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::{RawMqtt, TestHub, client_tls};
use tokio::task::JoinSet;
use twinhub_core::record::DeviceRecord;
use twinhub_mqtt::{Packet, QoS};
use twinhub_proto::model::{
    AuthenticationMechanism, AuthenticationType, CloudToDeviceMethod, ExportImportDevice,
    ImportMode, SymmetricKey, TwinProperties,
};
use twinhub_store::Table;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

/// The firmware-update states spread over the fleet, for the GROUP BY.
const FW_STATES: [&str; 4] = ["current", "downloading", "applying", "error"];
/// Registration calls in flight while filling the registry (each is one durable commit).
const REGISTER_CONCURRENCY: usize = 8;
/// How many times each query is timed.
const RUNS: usize = 5;

fn device_key() -> String {
    base64::engine::general_purpose::STANDARD.encode([9u8; 32])
}

fn arg_value(args: &[String], flag: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == flag) {
        None => Ok(default),
        Some(i) => Ok(args
            .get(i + 1)
            .ok_or_else(|| format!("{flag} needs a number"))?
            .parse()?),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("query") => runtime.block_on(query_bench(arg_value(&args, "--twins", 100_000)?)),
        Some("job") => runtime.block_on(job_bench(arg_value(&args, "--devices", 10_000)?)),
        Some("devices") => runtime.block_on(device_host(&args)),
        _ => Err("usage: fleet_bench query [--twins N] | job [--devices N]".into()),
    }
}

/// Registers `ids` in-process with [`device_key`], tags and reported properties, in parallel
/// batches of 100 (the bulk API's limit).
async fn register(
    hub: &TestHub,
    ids: Vec<String>,
    tags: fn(usize) -> Value,
    reported: fn(usize) -> Value,
) -> Result<Duration> {
    let started = Instant::now();
    let core = hub.server().hub.clone();
    let key = device_key();
    let batches: Vec<(usize, Vec<String>)> = ids
        .chunks(100)
        .enumerate()
        .map(|(n, c)| (n * 100, c.to_vec()))
        .collect();
    let mut queue = batches.into_iter();
    let mut running = JoinSet::new();
    loop {
        while running.len() < REGISTER_CONCURRENCY {
            let Some((first, batch)) = queue.next() else {
                break;
            };
            let core = core.clone();
            let key = key.clone();
            running.spawn(async move {
                let ops: Vec<ExportImportDevice> = batch
                    .into_iter()
                    .enumerate()
                    .map(|(j, id)| ExportImportDevice {
                        id,
                        import_mode: ImportMode::Create,
                        authentication: Some(AuthenticationMechanism {
                            symmetric_key: Some(SymmetricKey {
                                primary_key: Some(key.clone()),
                                secondary_key: Some(key.clone()),
                            }),
                            x509_thumbprint: None,
                            auth_type: AuthenticationType::Sas,
                        }),
                        tags: tags(first + j).as_object().cloned(),
                        properties: reported(first + j).as_object().map(|r| TwinProperties {
                            desired: Default::default(),
                            reported: r.clone(),
                        }),
                        ..Default::default()
                    })
                    .collect();
                core.bulk_devices(&ops).await
            });
        }
        match running.join_next().await {
            None => break,
            Some(joined) => {
                let result = joined?.map_err(|e| e.message().to_string())?;
                if !result.is_successful {
                    return Err(format!("registration failed: {:?}", result.errors).into());
                }
            }
        }
    }
    Ok(started.elapsed())
}

/// Min, median and max of `RUNS` timings of `f`, and the value of its last run.
async fn time_runs<T, F, Fut>(mut f: F) -> Result<([Duration; 3], T)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut times = Vec::with_capacity(RUNS);
    let mut last = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        last = Some(f().await?);
        times.push(t.elapsed());
    }
    times.sort();
    let last = last.ok_or("no run")?;
    Ok(([times[0], times[RUNS / 2], times[RUNS - 1]], last))
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn row(what: &str, times: [Duration; 3], result: &str) {
    println!(
        "| {what} | {} | {} | {} | {result} |",
        ms(times[0]),
        ms(times[1]),
        ms(times[2])
    );
}

async fn query_bench(twins: usize) -> Result<()> {
    let hub = TestHub::start().await;
    let ids: Vec<String> = (0..twins).map(|i| format!("dev-{i:06}")).collect();
    let took = register(
        &hub,
        ids,
        |i| json!({ "building": format!("b{}", i % 100), "floor": i % 10 }),
        |i| json!({ "iothubDM": { "firmwareUpdate": { "status": FW_STATES[i % 4] } } }),
    )
    .await?;
    println!(
        "registered {twins} twins in {:.1} s ({REGISTER_CONCURRENCY} bulk calls of 100 in flight)\n",
        took.as_secs_f64()
    );
    let svc = hub.owner();
    let core = hub.server().hub.clone();

    let matching = "SELECT * FROM devices WHERE tags.building = 'b42'";
    let nomatch = "SELECT * FROM devices WHERE tags.building = 'nowhere'";
    let group = "SELECT properties.reported.iothubDM.firmwareUpdate.status AS status, \
                 COUNT() AS n FROM devices \
                 GROUP BY properties.reported.iothubDM.firmwareUpdate.status";
    let count = "SELECT COUNT() AS n FROM devices WHERE tags.floor = 3";

    println!("| query ({twins} twins) | min ms | median ms | max ms | result |");
    println!("|---|---|---|---|---|");
    let (t, n) = time_runs(|| async {
        let mut pages = svc.query(matching).page_size(100);
        let page = pages.next_page().await?.ok_or("no page")?;
        Ok(page.items.len())
    })
    .await?;
    row(
        "HTTPS: first page (100) of `WHERE tags.building = 'b42'` (1% match)",
        t,
        &format!("{n} twins"),
    );
    let (t, n) = time_runs(|| async {
        let mut pages = svc.query(matching).page_size(1000);
        let mut rows = 0;
        while let Some(page) = pages.next_page().await? {
            rows += page.items.len();
        }
        Ok(rows)
    })
    .await?;
    row(
        "HTTPS: all pages of the same (page size 1000)",
        t,
        &format!("{n} twins"),
    );
    let (t, n) = time_runs(|| async { Ok(svc.query_all(nomatch).await?.len()) }).await?;
    row(
        "HTTPS: `WHERE tags.building = 'nowhere'` (full scan, no match)",
        t,
        &format!("{n} twins"),
    );
    let (t, rows) = time_runs(|| async { Ok(svc.query_all(group).await?) }).await?;
    row(
        "HTTPS: `GROUP BY properties.reported...firmwareUpdate.status`",
        t,
        &format!("{} groups", rows.len()),
    );
    let (t, rows) = time_runs(|| async { Ok(svc.query_all(count).await?) }).await?;
    row(
        "HTTPS: `COUNT() ... WHERE tags.floor = 3`",
        t,
        &rows.first().map(|r| r["n"].to_string()).unwrap_or_default(),
    );
    let (t, n) = time_runs(|| async {
        Ok(core
            .query(nomatch, Some(1000), None)
            .await
            .map_err(|e| e.message().to_string())?
            .items
            .len())
    })
    .await?;
    row(
        "in-process `Hub::query`: full scan, no match",
        t,
        &format!("{n} twins"),
    );
    let (t, n) = time_runs(|| async {
        Ok(core
            .query(group, None, None)
            .await
            .map_err(|e| e.message().to_string())?
            .items
            .len())
    })
    .await?;
    row(
        "in-process `Hub::query`: GROUP BY",
        t,
        &format!("{n} groups"),
    );
    scan_breakdown(&hub, twins).await
}

/// Which stage of a full scan costs what: the same loop as `Hub::query` run up to each stage
/// in turn, and a tags-only decode standing in for reading just what the WHERE clause needs.
async fn scan_breakdown(hub: &TestHub, twins: usize) -> Result<()> {
    #[derive(Clone, Copy, PartialEq, PartialOrd)]
    enum Stage {
        Read,
        Decode,
        ToTwin,
        ToValue,
        Match,
    }
    #[derive(serde::Deserialize)]
    struct TagsOnly {
        twin: TwinTags,
    }
    #[derive(serde::Deserialize)]
    struct TwinTags {
        tags: serde_json::Map<String, Value>,
    }
    let core = hub.server().hub.clone();
    let query =
        twinhub_core::query::parse_query("SELECT * FROM devices WHERE tags.building = 'nowhere'")
            .map_err(|e| e.message().to_string())?;
    let scan = |stage: Option<Stage>| {
        let core = core.clone();
        let query = query.clone();
        async move {
            let started = Instant::now();
            let mut after: Option<String> = None;
            let mut matched = 0usize;
            loop {
                let batch = core
                    .store()
                    .scan(Table::Devices, after.as_deref(), 512)
                    .await?;
                let Some((last, _)) = batch.last() else { break };
                after = Some(last.clone());
                for (key, bytes) in &batch {
                    let Some(stage) = stage else {
                        // Tags only: what a WHERE on tags needs, without the rest of the twin.
                        let partial: TagsOnly = serde_json::from_slice(bytes)?;
                        let doc = json!({ "tags": partial.twin.tags });
                        matched += usize::from(query.matches(&doc));
                        continue;
                    };
                    if stage < Stage::Decode {
                        matched += bytes.len() & 1;
                        continue;
                    }
                    let record =
                        DeviceRecord::decode(bytes).map_err(|e| e.message().to_string())?;
                    if stage < Stage::ToTwin {
                        matched += record.twin.tags.len() & 1;
                        continue;
                    }
                    let twin = record.to_twin(core.directory().is_connected(key));
                    if stage < Stage::ToValue {
                        matched += usize::from(twin.tags.is_some());
                        continue;
                    }
                    let doc = serde_json::to_value(twin)?;
                    if stage < Stage::Match {
                        matched += usize::from(doc.is_object());
                        continue;
                    }
                    matched += usize::from(query.matches(&doc));
                }
            }
            Ok::<_, BoxError>((started.elapsed(), matched))
        }
    };
    println!();
    println!("| full scan of {twins} twins, cumulative stages | ms | µs per twin |");
    println!("|---|---|---|");
    let per = |d: Duration| d.as_secs_f64() * 1e6 / twins as f64;
    for (name, stage) in [
        ("store read (redb scan, 512 per batch)", Some(Stage::Read)),
        ("+ `DeviceRecord::decode`", Some(Stage::Decode)),
        ("+ `to_twin`", Some(Stage::ToTwin)),
        ("+ `serde_json::to_value`", Some(Stage::ToValue)),
        ("+ WHERE (= `Hub::query`'s loop)", Some(Stage::Match)),
        ("alternative: decode tags only + WHERE", None),
    ] {
        let mut times = Vec::new();
        for _ in 0..3 {
            times.push(scan(stage).await?.0);
        }
        times.sort();
        println!("| {name} | {} | {:.1} |", ms(times[1]), per(times[1]));
    }
    Ok(())
}

async fn job_bench(devices: usize) -> Result<()> {
    let hub = TestHub::start().await;
    let ids: Vec<String> = (0..devices).map(|i| format!("jd-{i:06}")).collect();
    let took = register(&hub, ids, |_| json!({ "bench": "job" }), |_| Value::Null).await?;
    println!(
        "registered {devices} devices in {:.1} s",
        took.as_secs_f64()
    );

    let mut host = DeviceHost::spawn(&hub, devices)?;
    let connected = Instant::now();
    host.wait_ready()?;
    println!(
        "{devices} devices connected over MQTT/TLS and subscribed in {:.1} s (child process)\n",
        connected.elapsed().as_secs_f64()
    );

    let svc = hub.owner();
    println!(
        "| job ({devices} connected devices) | wall s | hub start→end s | device ops/s | succeeded | failed |"
    );
    println!("|---|---|---|---|---|---|");
    let method = CloudToDeviceMethod {
        method_name: "reboot".into(),
        payload: Some(json!({ "delay": 0 })),
        response_timeout_in_seconds: Some(30),
        connect_timeout_in_seconds: Some(0),
    };
    let t = Instant::now();
    svc.schedule_method_job("bench-method", "tags.bench = 'job'", &method, None, None)
        .await?;
    let job = wait_finished(&svc, "bench-method").await?;
    report_job("method `reboot`", t.elapsed(), &job);

    let t = Instant::now();
    svc.schedule_twin_job(
        "bench-twin",
        "tags.bench = 'job'",
        &json!({ "properties": { "desired": { "interval": 60 } } }),
        None,
        None,
    )
    .await?;
    let job = wait_finished(&svc, "bench-twin").await?;
    report_job("twin update (desired)", t.elapsed(), &job);

    let answered = host.stop()?;
    println!("\nthe device host answered {answered} method calls");
    Ok(())
}

async fn wait_finished(
    svc: &twinhub_sdk::ServiceClient,
    job_id: &str,
) -> Result<twinhub_proto::model::JobResponse> {
    loop {
        let job = svc.get_job(job_id).await?;
        if matches!(job.status.as_str(), "completed" | "failed" | "cancelled") {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn report_job(what: &str, wall: Duration, job: &twinhub_proto::model::JobResponse) {
    let parse = |t: &Option<String>| t.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok());
    let hub_secs = match (parse(&job.start_time), parse(&job.end_time)) {
        (Some(s), Some(e)) => e.duration_since(s).as_secs_f64(),
        _ => f64::NAN,
    };
    let stats = job.device_job_statistics.unwrap_or_default();
    println!(
        "| {what} ({}) | {:.2} | {:.2} | {:.0} | {} | {} |",
        job.status,
        wall.as_secs_f64(),
        hub_secs,
        stats.device_count as f64 / hub_secs,
        stats.succeeded_count,
        stats.failed_count
    );
}

/// The child process holding the devices' connections.
struct DeviceHost {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl DeviceHost {
    fn spawn(hub: &TestHub, devices: usize) -> Result<DeviceHost> {
        let mut child = Command::new(std::env::current_exe()?)
            .args([
                "devices",
                "--count",
                &devices.to_string(),
                "--port",
                &hub.mqtt.port().to_string(),
            ])
            .arg("--ca")
            .arg(hub.ca_pem())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        Ok(DeviceHost {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    fn wait_ready(&mut self) -> Result<()> {
        for line in self.lines.by_ref() {
            let line = line?;
            if line.starts_with("READY") {
                return Ok(());
            }
            eprintln!("device host: {line}");
        }
        Err("the device host exited before its devices were connected".into())
    }

    /// Closes the host's stdin (its signal to stop) and returns how many calls it answered.
    fn stop(mut self) -> Result<usize> {
        drop(self.child.stdin.take());
        let mut answered = 0;
        for line in self.lines.by_ref() {
            if let Some(n) = line?.strip_prefix("ANSWERED ") {
                answered = n.trim().parse()?;
            }
        }
        self.child.wait()?;
        Ok(answered)
    }
}

/// `devices` mode: connects `--count` devices to 127.0.0.1:`--port`, answers every method
/// with 200 at once, prints `READY` once all are subscribed and `ANSWERED n` when stdin closes.
async fn device_host(args: &[String]) -> Result<()> {
    let count = arg_value(args, "--count", 0)?;
    let port = u16::try_from(arg_value(args, "--port", 0)?)?;
    let ca = args
        .iter()
        .position(|a| a == "--ca")
        .and_then(|i| args.get(i + 1))
        .ok_or("--ca is required")?;
    let tls = client_tls(std::path::Path::new(ca)).ok_or("cannot read the CA")?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let answered = Arc::new(AtomicUsize::new(0));
    let dialing = Arc::new(tokio::sync::Semaphore::new(64));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for i in 0..count {
        let id = format!("jd-{i:06}");
        let (tls, dialing, answered, ready) = (
            tls.clone(),
            dialing.clone(),
            answered.clone(),
            ready_tx.clone(),
        );
        tokio::spawn(async move {
            let mut session = None;
            for _ in 0..20 {
                let _turn = dialing.acquire().await;
                if let Some(mut m) =
                    RawMqtt::try_device(addr, tls.clone(), &id, &device_key()).await
                    && m.try_subscribe(&["$iothub/methods/POST/#"]).await
                {
                    session = Some(m);
                    break;
                }
            }
            let Some(mut m) = session else {
                eprintln!("{id} could not connect");
                return;
            };
            let _ = ready.send(());
            answer_methods(&mut m, &answered).await;
        });
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < count {
        if ready_rx.recv().await.is_none() {
            return Err(format!("only {ready} of {count} devices connected").into());
        }
        ready += 1;
    }
    println!("READY {ready}");
    std::io::stdout().flush()?;
    // Stop when the parent closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    })
    .await?;
    println!("ANSWERED {}", answered.load(Ordering::Relaxed));
    Ok(())
}

async fn answer_methods(m: &mut RawMqtt, answered: &AtomicUsize) {
    loop {
        let publish = match m.recv_within(Duration::from_secs(24 * 3600)).await {
            Ok(Some(Packet::Publish(p))) => p,
            Ok(Some(_)) => continue,
            Ok(None) | Err(()) => return,
        };
        let topic = publish.topic.as_str();
        let Some((_, rid)) = topic
            .strip_prefix("$iothub/methods/POST/")
            .and_then(|rest| rest.rsplit_once("$rid="))
        else {
            continue;
        };
        let Ok(reply_topic) =
            twinhub_mqtt::Topic::new(format!("$iothub/methods/res/200/?$rid={rid}"))
        else {
            continue;
        };
        let reply = Packet::Publish(twinhub_mqtt::Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: reply_topic,
            pkid: 0,
            payload: bytes::Bytes::from_static(b"{\"ok\":true}"),
        });
        if !m.try_send(&reply).await {
            return;
        }
        answered.fetch_add(1, Ordering::Relaxed);
    }
}
