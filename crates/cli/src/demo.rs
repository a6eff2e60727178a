//! `twinhub demo`: the device-management reboot scenario end to end in one process. Starts a
//! hub (`twinhub_server::RunningServer`) on free loopback ports with a throwaway data dir,
//! registers a device and drives it with the SDK's `ServiceClient` while the SDK's
//! `DeviceClient` plays the device, printing each step with the time it happened.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use twinhub_sdk::proto::model::CloudToDeviceMethod;
use twinhub_sdk::{DeviceClient, MethodRequests, NewDevice, ServiceClient, Transport};
use twinhub_server::{Config, RunningServer};

const DEVICE_ID: &str = "demo-device";
const METHOD_NAME: &str = "rebootDevice";
/// How often the service reads the twin while it waits for `rebootTime`.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The whole story's bound beyond the reboot itself: it takes well under a second on a
/// laptop, so anything near this means something is stuck.
const STORY_SLACK: Duration = Duration::from_secs(30);

/// Options of `twinhub demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Seconds the simulated reboot takes
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = parse_seconds)]
    pub reboot_delay: Duration,
    /// Connect the device with MQTT over WebSockets instead of MQTT over TLS
    #[arg(long)]
    pub websockets: bool,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    let delay = Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("'{text}' is not a usable duration"))?;
    if delay > Duration::from_secs(300) {
        return Err("the reboot may take at most 300 seconds".into());
    }
    Ok(delay)
}

/// Runs the demo: hub up, device registered and connected, `rebootDevice` invoked, the
/// device reboots and reports `rebootTime`, the service reads it from the twin; then
/// everything is shut down and the data dir removed.
pub async fn run(args: DemoArgs) -> Result<()> {
    let clock = Clock(Instant::now());
    // From the first line on, Ctrl-C ends the demo through its cleanup (hub stopped, data dir
    // removed) rather than killing the process.
    let mut interrupt =
        crate::interrupt::Interrupt::install().context("installing signal handlers")?;
    println!("twinhub demo: a hub, a device and a back end in one process, rebooting the device");
    let dir = DataDir::create()?;
    let server = RunningServer::start(Config {
        data_dir: dir.path().to_path_buf(),
        hostname: "localhost".into(),
        bind: [127, 0, 0, 1].into(),
        https_port: 0,
        mqtt_port: 0,
        amqp_port: 0,
        ..Config::default()
    })
    .await
    .context("starting the hub failed")?;
    clock.say(format_args!(
        "hub started: https://{} (REST, MQTT over WebSockets), mqtts://{} (MQTT over TLS), data dir {}",
        server.https_addr,
        server.mqtt_addr,
        dir.path().display()
    ));

    let limit = args.reboot_delay + STORY_SLACK;
    let outcome = tokio::select! {
        told = tokio::time::timeout(limit, story(&server, &args, clock)) => told
            .unwrap_or_else(|_| Err(anyhow!("the demo did not finish within {} s", limit.as_secs()))),
        () = interrupt.wait() => Err(anyhow!("interrupted")),
    };

    server.shutdown().await;
    drop(dir);
    clock.say("hub stopped and its data dir removed");
    outcome?;
    println!(
        "Done in {:.1} s. The same scenario as two programs: `cargo run --example dm_getstarted_device` and `dm_getstarted_service` (README, \"Rust examples\").",
        clock.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The scenario proper, against a started hub.
async fn story(server: &RunningServer, args: &DemoArgs, clock: Clock) -> Result<()> {
    let ca_path = server
        .ca_pem
        .as_ref()
        .context("the hub has no development CA")?;
    let ca = std::fs::read(ca_path).with_context(|| format!("reading {}", ca_path.display()))?;
    let service_cs = server
        .connection_string("iothubowner")
        .context("the hub has no iothubowner policy")?;
    let service = ServiceClient::builder(&service_cs)
        .extra_ca_pem(ca.clone())
        .timeout(args.reboot_delay + STORY_SLACK)
        .build()?;

    let created = service
        .create_device(DEVICE_ID, NewDevice::default())
        .await
        .context("registering the device failed")?;
    let key = created
        .authentication
        .and_then(|a| a.symmetric_key)
        .and_then(|k| k.primary_key)
        .context("the hub generated no device key")?;
    clock.say(format_args!(
        "registered device '{DEVICE_ID}' (ServiceClient::create_device)"
    ));

    let (transport, port, over) = if args.websockets {
        (
            Transport::WebSocket,
            server.https_addr.port(),
            "MQTT over WebSockets",
        )
    } else {
        (Transport::Mqtt, server.mqtt_addr.port(), "MQTT over TLS")
    };
    let device_cs = format!(
        "HostName={};DeviceId={DEVICE_ID};SharedAccessKey={key}",
        server.config.hostname
    );
    let device = DeviceClient::builder(&device_cs)
        .extra_ca_pem(ca)
        .transport(transport)
        .port(port)
        .build()?;
    let requests = device.method_requests();
    device
        .connect()
        .await
        .context("connecting the device failed")?;
    clock.say(format_args!(
        "device connected over {over} and listens for direct methods (DeviceClient)"
    ));
    let device_side = tokio::spawn(play_device(
        device.clone(),
        requests,
        args.reboot_delay,
        clock,
    ));

    let told = drive_device(&service, args, clock).await;
    // The device's own account of what it reported, to check the service read the same.
    let reported = match device_side.await {
        Ok(reported) => reported,
        Err(e) => Err(anyhow!("the device task failed: {e}")),
    };
    device.close().await;
    let read = told?;
    let reported = reported?;
    ensure!(
        read == reported,
        "the service read rebootTime {read} but the device reported {reported}"
    );
    Ok(())
}

/// The device: answers the one `rebootDevice` call at once, reboots, then reports the time.
/// Returns the `rebootTime` it reported.
async fn play_device(
    device: DeviceClient,
    mut requests: MethodRequests,
    reboot_delay: Duration,
    clock: Clock,
) -> Result<String> {
    let request = requests
        .recv()
        .await
        .context("the device stopped receiving method calls")?;
    if request.name != METHOD_NAME {
        bail!("the device got an unexpected method call: {}", request.name);
    }
    clock.say(format_args!(
        "device got {METHOD_NAME}: rebooting, which takes {:.1} s",
        reboot_delay.as_secs_f64()
    ));
    request
        .respond(200, json!({"Response": "Rebooting"}))
        .await
        .context("the device could not answer")?;
    clock.say("device answered 200 and reboots");
    tokio::time::sleep(reboot_delay).await;
    let reboot_time = format!("{:.3}", jiff::Timestamp::now());
    clock.say("device rebooted");
    device
        .patch_reported(&json!({"rebootTime": reboot_time}))
        .await
        .context("the device could not report rebootTime")?;
    clock.say(format_args!(
        "device reported rebootTime = {reboot_time} (DeviceClient::patch_reported)"
    ));
    Ok(reboot_time)
}

/// The back end: invokes `rebootDevice`, then reads the twin until `rebootTime` shows.
/// Returns the `rebootTime` it read.
async fn drive_device(service: &ServiceClient, args: &DemoArgs, clock: Clock) -> Result<String> {
    clock.say(format_args!(
        "service invokes {METHOD_NAME} on '{DEVICE_ID}' (ServiceClient::invoke_method)"
    ));
    let call = CloudToDeviceMethod {
        method_name: METHOD_NAME.into(),
        payload: Some(json!({"method_number": "42"})),
        response_timeout_in_seconds: Some(30),
        connect_timeout_in_seconds: Some(10),
    };
    let answer = service
        .invoke_method(DEVICE_ID, &call)
        .await
        .context("invoking the method failed")?;
    clock.say(format_args!(
        "service got the device's answer: {} {}",
        answer.status, answer.payload
    ));
    ensure!(
        answer.status == 200,
        "the device answered {}",
        answer.status
    );

    clock.say("service reads the twin until the device reports rebootTime...");
    let deadline = Instant::now() + args.reboot_delay + STORY_SLACK;
    let mut reads = 0u32;
    loop {
        let twin = service
            .get_twin(DEVICE_ID)
            .await
            .context("reading the twin failed")?;
        reads += 1;
        let reboot_time = twin
            .properties
            .as_ref()
            .and_then(|p| p.reported.get("rebootTime"))
            .and_then(Value::as_str);
        if let Some(time) = reboot_time {
            clock.say(format_args!(
                "service read rebootTime = {time} from the twin ({reads} twin reads, ServiceClient::get_twin)"
            ));
            return Ok(time.to_string());
        }
        if Instant::now() >= deadline {
            bail!("the twin showed no rebootTime after {reads} reads");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Prints story lines stamped with the time since the demo started.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn elapsed(self) -> Duration {
        self.0.elapsed()
    }

    fn say(self, what: impl Display) {
        println!("[{:>6.2}s] {what}", self.elapsed().as_secs_f64());
    }
}

/// A fresh private directory under the system's temp dir, removed when dropped.
#[derive(Debug)]
struct DataDir(PathBuf);

impl DataDir {
    fn create() -> Result<DataDir> {
        let base = std::env::temp_dir();
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        for attempt in 0..100u32 {
            let path = base.join(format!(
                "twinhub-demo-{}-{stamp:x}-{attempt}",
                std::process::id()
            ));
            let mut builder = std::fs::DirBuilder::new();
            // The dir holds the dev CA's private key: only its owner may read it.
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            match builder.create(&path) {
                Ok(()) => return Ok(DataDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", path.display()));
                }
            }
        }
        bail!("could not create a fresh data dir under {}", base.display())
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "warning: could not remove the demo's data dir {}: {e}",
                self.0.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reboot_delay_is_bounded_seconds() {
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds(" 2 "), Ok(Duration::from_secs(2)));
        for bad in ["", "soon", "-1", "NaN", "inf", "301"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn data_dir_is_fresh_private_and_removed_on_drop() {
        let first = DataDir::create().unwrap();
        let second = DataDir::create().unwrap();
        assert_ne!(first.path(), second.path());
        assert!(first.path().is_dir());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(first.path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        let path = first.path().to_path_buf();
        std::fs::write(path.join("file"), b"x").unwrap();
        drop(first);
        assert!(!path.exists());
    }
}
