//! `twinhub-chaos slow-consumer`: does a device that stops reading its socket hurt the others?
//! Direct methods run in a closed loop on healthy devices (SDK clients) in three phases:
//! alone; while a raw MQTT device that reads everything is flooded with desired patches (the
//! control: what the flood itself costs); and while an identical device that never reads is
//! flooded the same way. The report gives the latency distributions, the p99 ratio of the
//! last two, and how long the hub took to drop the slow device. Fails when a method call fails
//! or the slow device is never dropped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use twinhub_mqtt::{Connect, Packet, QoS, Subscribe, Topic, decode, encode};
use twinhub_proto::model::{CloudToDeviceMethod, ConnectionState};
use twinhub_sdk::{MethodResponse, ServiceClient};

use crate::devices::{self, DeviceSettings, device_id};
use crate::hub::{HubCommand, HubProcess};

/// The slow device's id (registered after the healthy ones).
const SLOW: &str = "slow-consumer";
/// The control device: flooded the same way, but it reads.
const READER: &str = "fast-consumer";

#[derive(Debug, clap::Args)]
pub struct SlowArgs {
    /// Healthy devices answering methods
    #[arg(long, default_value_t = 50)]
    pub devices: usize,
    /// Method calls in flight (closed loop)
    #[arg(long, default_value_t = 16)]
    pub callers: usize,
    /// Seconds each phase measures
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Bytes of filler in each desired patch flooding the slow device
    #[arg(long, default_value_t = 4096)]
    pub patch_bytes: usize,
    /// The twinhub binary [default: next to this program, else target/debug or target/release]
    #[arg(long)]
    pub twinhub: Option<PathBuf>,
    /// RUST_LOG for the hub
    #[arg(long, default_value = "warn")]
    pub hub_log: String,
    /// Where the run's directory goes [default: the system's temp dir]; removed afterwards
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// Latencies of one phase, in microseconds.
struct Phase {
    name: &'static str,
    micros: Vec<u64>,
    seconds: f64,
}

impl Phase {
    fn percentile(&self, p: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * (self.micros.len() - 1) as f64).round() as usize;
        self.micros[rank.min(self.micros.len() - 1)] as f64 / 1000.0
    }
}

pub async fn run(args: SlowArgs) -> Result<bool> {
    crate::raise_nofile_limit();
    let cmd = HubCommand::locate(args.twinhub.clone(), &args.hub_log)?;
    let mut builder = tempfile::Builder::new();
    builder.prefix("twinhub-chaos-slow-");
    let dir = match &args.work_dir {
        Some(parent) => {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
            builder.tempdir_in(parent)
        }
        None => builder.tempdir(),
    }
    .context("creating the run's directory")?;
    let data = dir.path().join("data");
    let hub = HubProcess::start(&cmd, &data, &dir.path().join("hub.log")).await?;
    let service = hub.service(Duration::from_secs(30))?;
    devices::register(&service, args.devices).await?;
    let slow_key = register_raw(&service, SLOW).await?;
    let reader_key = register_raw(&service, READER).await?;
    let settings = DeviceSettings {
        operation_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(30),
        sas_token_ttl: Duration::from_secs(3600),
    };
    let clients = (0..args.devices)
        .map(|i| devices::client(&hub, &device_id(i), &settings))
        .collect::<Result<Vec<_>>>()?;
    devices::connect_in_waves(
        &clients,
        64,
        |_, d| {
            d.set_method_handler(|r| async move { MethodResponse::new(200, r.payload) });
        },
        |_| {},
    )
    .await?;

    let window = Duration::from_secs_f64(args.seconds);
    let alone = methods(&service, args.devices, args.callers, window, "alone").await?;
    report(&alone, "");

    // The control: the same flood at a device that reads all of it.
    let mut reader = RawDevice::connect(&hub, READER, &reader_key).await?;
    reader
        .subscribe("$iothub/twin/PATCH/properties/desired/#")
        .await?;
    let draining = tokio::spawn(reader.drain());
    let flooder = flood(service.clone(), READER, args.patch_bytes, window);
    let control = methods(
        &service,
        args.devices,
        args.callers,
        window,
        "beside a flooded reader",
    )
    .await?;
    let (_, pushed) = flooder.await.context("the flooder panicked")?;
    draining.abort();
    report(
        &control,
        &format!(" ({pushed} desired patches pushed at the reader)"),
    );

    // The slow device: connects, subscribes to desired patches, then never reads again.
    let mut slow = RawDevice::connect(&hub, SLOW, &slow_key).await?;
    slow.subscribe("$iothub/twin/PATCH/properties/desired/#")
        .await?;
    let flooder = flood(service.clone(), SLOW, args.patch_bytes, window);
    let beside = methods(
        &service,
        args.devices,
        args.callers,
        window,
        "beside a slow device",
    )
    .await?;
    let (dropped_after, pushed) = flooder.await.context("the flooder panicked")?;
    drop(slow);
    report(
        &beside,
        &format!(" ({pushed} desired patches pushed at the slow device)"),
    );
    let rate = |p: &Phase| p.micros.len() as f64 / p.seconds.max(1e-9);
    println!(
        "beside the slow device vs beside the flooded reader: p99 ratio {:.2}, throughput ratio {:.2}",
        beside.percentile(99.0) / control.percentile(99.0).max(0.001),
        rate(&beside) / rate(&control).max(1e-9)
    );
    devices::close_all(&clients, Duration::from_secs(5)).await;
    let _ = hub.terminate(Duration::from_secs(20)).await;
    match dropped_after {
        Some(after) => {
            println!(
                "the slow device was dropped {:.1} s after the flood began",
                after.as_secs_f64()
            );
            Ok(true)
        }
        None => {
            println!("FAILED: the slow device was never dropped");
            Ok(false)
        }
    }
}

/// Registers a device for a raw connection and returns its key.
async fn register_raw(service: &ServiceClient, id: &str) -> Result<String> {
    service
        .create_device(id, Default::default())
        .await
        .with_context(|| format!("registering {id}"))?
        .authentication
        .and_then(|a| a.symmetric_key)
        .and_then(|k| k.primary_key)
        .with_context(|| format!("{id} has no key"))
}

/// Pushes desired patches at `id` as fast as the hub takes them, for at least `window`, and
/// until the hub shows the device disconnected (or a minute more). Returns when that was
/// seen, and how many patches were pushed.
fn flood(
    service: ServiceClient,
    id: &'static str,
    patch_bytes: usize,
    window: Duration,
) -> tokio::task::JoinHandle<(Option<Duration>, u64)> {
    // Twin strings are at most 4 KiB: the filler is spread over keys.
    let filler: serde_json::Map<String, serde_json::Value> = (0..patch_bytes.div_ceil(4000))
        .map(|k| {
            (
                format!("f{k}"),
                json!("f".repeat(4000.min(patch_bytes - k * 4000))),
            )
        })
        .collect();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut i = 0u64;
        let mut dropped_after = None;
        while started.elapsed() < window + Duration::from_secs(60) {
            let patch = json!({"properties": {"desired": {"fill": filler, "i": i}}});
            if let Err(e) = service.update_twin(id, &patch, None).await {
                eprintln!("a desired patch at {id} failed: {e}");
                break;
            }
            i += 1;
            if dropped_after.is_none() && i.is_multiple_of(16) {
                let state = service
                    .get_device(id)
                    .await
                    .ok()
                    .and_then(|d| d.connection_state);
                if state == Some(ConnectionState::Disconnected) {
                    dropped_after = Some(started.elapsed());
                }
            }
            if started.elapsed() >= window && (dropped_after.is_some() || id == READER) {
                break;
            }
        }
        (dropped_after, i)
    })
}

fn report(phase: &Phase, note: &str) {
    println!(
        "{:<22} {} calls in {:.1} s, p50 {:.2} ms, p99 {:.2} ms{note}",
        format!("{}:", phase.name),
        phase.micros.len(),
        phase.seconds,
        phase.percentile(50.0),
        phase.percentile(99.0)
    );
}

/// Direct methods on the healthy devices in a closed loop of `callers` for `window`.
async fn methods(
    service: &ServiceClient,
    devices: usize,
    callers: usize,
    window: Duration,
    name: &'static str,
) -> Result<Phase> {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for c in 0..callers {
        let service = service.clone();
        set.spawn(async move {
            let mut micros = Vec::new();
            let mut n = c;
            while started.elapsed() < window {
                let call = CloudToDeviceMethod {
                    method_name: "ping".into(),
                    payload: Some(json!({ "n": n })),
                    response_timeout_in_seconds: Some(30),
                    connect_timeout_in_seconds: Some(5),
                };
                let sent = Instant::now();
                let r = service
                    .invoke_method(&device_id(n % devices), &call)
                    .await
                    .with_context(|| format!("method call {n}"))?;
                if r.status != 200 {
                    bail!("method call {n} answered {}", r.status);
                }
                micros.push(sent.elapsed().as_micros() as u64);
                n += callers;
            }
            anyhow::Ok(micros)
        });
    }
    let mut all = Vec::new();
    while let Some(done) = set.join_next().await {
        all.extend(done.context("a caller panicked")??);
    }
    all.sort_unstable();
    Ok(Phase {
        name,
        micros: all,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A device on a raw MQTT/TLS connection, so that it can stop reading.
struct RawDevice {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl RawDevice {
    async fn connect(hub: &HubProcess, id: &str, key: &str) -> Result<RawDevice> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&hub.ca_pem) {
            roots.add(cert?)?;
        }
        let cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(("127.0.0.1", hub.mqtt_port)).await?;
        let stream = TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 3600;
        let token = twinhub_proto::sas::generate_sas_token(
            &format!("localhost/devices/{id}"),
            key,
            None,
            expiry,
        )?;
        let mut device = RawDevice {
            stream,
            buf: BytesMut::new(),
        };
        device
            .send(&Packet::Connect(Connect {
                protocol_name: "MQTT".into(),
                protocol_level: 4,
                clean_session: true,
                keep_alive: 600,
                client_id: id.into(),
                will: None,
                username: Some(format!("localhost/{id}/?api-version=2021-04-12")),
                password: Some(token.into_bytes().into()),
            }))
            .await?;
        match device.recv().await? {
            Packet::ConnAck(a) if a.code == twinhub_mqtt::ConnectReturnCode::Accepted => {}
            other => bail!("the slow device was refused: {other:?}"),
        }
        Ok(device)
    }

    async fn subscribe(&mut self, filter: &str) -> Result<()> {
        self.send(&Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: vec![(Topic::new(filter.to_string())?, QoS::AtMostOnce)],
        }))
        .await?;
        match self.recv().await? {
            Packet::SubAck(_) => Ok(()),
            other => bail!("expected SUBACK, got {other:?}"),
        }
    }

    /// Reads and discards everything until the connection ends.
    async fn drain(mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(self.stream.read(&mut buf).await, Ok(n) if n > 0) {}
    }

    async fn send(&mut self, p: &Packet) -> Result<()> {
        let mut out = BytesMut::new();
        encode(p, &mut out)?;
        self.stream.write_all(&out).await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Packet> {
        loop {
            if let Some(p) = decode(&mut self.buf, usize::MAX >> 4)? {
                return Ok(p);
            }
            if tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                .await
                .context("no answer from the hub")??
                == 0
            {
                bail!("the hub closed the connection");
            }
        }
    }
}
