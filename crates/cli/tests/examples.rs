//! The example programs (`examples/*.rs`) as a user runs them: each device and service
//! program is a real process, talking to a hub started in this test process on ephemeral
//! loopback ports. Loops are bounded with `--max-requests` / `--timeout`; the tests assert
//! on what the programs print, how they exit, and what the device twin holds afterwards.
//!
//! The example binaries are read from `target/<profile>/examples`, which `cargo test -p
//! twinhub` builds before it runs integration tests. With `--test examples` alone, build them
//! first: `cargo build -p twinhub --examples`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::runtime::Runtime;
use twinhub_sdk::{DeviceClient, NewDevice, NewModule, ServiceClient};
use twinhub_server::{Config, RunningServer};

/// Bound on any single wait for a program.
const WAIT: Duration = Duration::from_secs(60);
/// What every seed device answers.
const DEVICE_RESPONSE: &str = r#"{"Response":"This is the response from the device"}"#;
/// Variables the examples read; cleared so a developer's own settings cannot leak in.
const EXAMPLE_ENV: [&str; 6] = [
    "IOTHUB_DEVICE_CONNECTION_STRING",
    "IOTHUB_MODULE_CONNECTION_STRING",
    "IOTHUB_CONNECTION_STRING",
    "IOTHUB_DEVICE_ID",
    "IOTHUB_MODULE_ID",
    "IOTHUB_DEVICE_TRANSPORT",
];

/// A hub running on its own runtime, so the test body can block on child processes.
struct Hub {
    server: Option<RunningServer>,
    rt: Runtime,
    ca: PathBuf,
    service_cs: String,
    service: ServiceClient,
    _dir: TempDir,
}

impl Hub {
    fn start() -> Hub {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let server = rt
            .block_on(RunningServer::start(Config {
                data_dir: dir.path().to_path_buf(),
                hostname: "localhost".into(),
                bind: "127.0.0.1".parse().unwrap(),
                https_port: 0,
                mqtt_port: 0,
                amqp_port: 0,
                // IoT Hub batches feedback for 15 s; the C2D pair should not wait that long.
                c2d_feedback_interval_ms: 200,
                ..Config::default()
            }))
            .expect("the hub starts");
        let ca = server.ca_pem.clone().expect("the hub made a dev CA");
        let service_cs = server.connection_string("iothubowner").unwrap();
        let service = {
            let _runtime = rt.enter();
            ServiceClient::builder(&service_cs)
                .extra_ca_pem(std::fs::read(&ca).unwrap())
                .build()
                .unwrap()
        };
        Hub {
            server: Some(server),
            rt,
            ca,
            service_cs,
            service,
            _dir: dir,
        }
    }

    fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("the hub runs")
    }

    /// Registers `id` and returns its connection string.
    fn add_device(&self, id: &str) -> String {
        let device = self
            .rt
            .block_on(self.service.create_device(id, NewDevice::default()))
            .unwrap();
        let key = device
            .authentication
            .and_then(|a| a.symmetric_key)
            .and_then(|k| k.primary_key)
            .unwrap();
        format!("HostName=localhost;DeviceId={id};SharedAccessKey={key}")
    }

    fn reported(&self, id: &str) -> Value {
        let twin = self.rt.block_on(self.service.get_twin(id)).unwrap();
        Value::Object(twin.properties.unwrap_or_default().reported)
    }

    /// A device program's environment and flags for this hub (its ports are not 8883/443).
    fn run_device(&self, name: &str, cs: &str, websocket: bool, extra: &[&str]) -> Example {
        let port = if websocket {
            self.server().https_addr.port()
        } else {
            self.server().mqtt_addr.port()
        };
        let mut args = vec![
            "--port".to_string(),
            port.to_string(),
            "--ca".to_string(),
            self.ca.display().to_string(),
        ];
        if websocket {
            args.extend(["--transport".into(), "websocket".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Example::start(name, &args, &[("IOTHUB_DEVICE_CONNECTION_STRING", cs)])
    }

    /// A service program's environment and flags for this hub, driving `device_id`.
    fn run_service(&self, name: &str, device_id: &str, extra: &[&str]) -> Example {
        let mut args = vec!["--ca".to_string(), self.ca.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Example::start(
            name,
            &args,
            &[
                ("IOTHUB_CONNECTION_STRING", &self.service_cs),
                ("IOTHUB_DEVICE_ID", device_id),
            ],
        )
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.rt.block_on(server.shutdown());
        }
    }
}

/// A running example program; stdout is read line by line as it comes.
struct Example {
    name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<JoinHandle<String>>,
}

/// How an example program ended.
struct Finished {
    name: String,
    status: ExitStatus,
    stdout: Vec<String>,
    stderr: String,
}

impl Finished {
    fn output(&self) -> String {
        format!(
            "--- {} ({}) stdout ---\n{}\n--- stderr ---\n{}",
            self.name,
            self.status,
            self.stdout.join("\n"),
            self.stderr
        )
    }

    fn assert_success(&self) {
        assert!(self.status.success(), "{}", self.output());
    }

    fn assert_failure(&self) {
        assert!(!self.status.success(), "{}", self.output());
    }

    /// The rest of the first stdout line starting with `prefix`.
    fn value_after(&self, prefix: &str) -> String {
        self.stdout
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}\n{}", self.output()))
            .to_string()
    }

    /// Asserts that lines equal to `expected` appear in this order (others may come between).
    fn assert_lines_in_order(&self, expected: &[&str]) {
        let mut at = 0;
        for want in expected {
            match self.stdout[at..].iter().position(|l| l == want) {
                Some(i) => at += i + 1,
                None => panic!("no line {want:?} in order {expected:#?}\n{}", self.output()),
            }
        }
    }

    fn count(&self, line: &str) -> usize {
        self.stdout.iter().filter(|l| *l == line).count()
    }
}

fn example_path(name: &str) -> PathBuf {
    // Integration tests run from target/<profile>/deps; examples sit in ../examples.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps");
    let path = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let rebuild = "`cargo test -p twinhub` builds the examples; with --test alone run `cargo build -p twinhub --examples` first";
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}. {rebuild}", path.display()));
    // `--test examples` does not rebuild them: never test an old build of edited sources.
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut inputs = vec![sources.join(format!("{name}.rs"))];
    if let Ok(shared) = std::fs::read_dir(sources.join("common")) {
        inputs.extend(shared.flatten().map(|e| e.path()));
    }
    for input in inputs {
        let Ok(edited) = std::fs::metadata(&input).and_then(|m| m.modified()) else {
            continue;
        };
        assert!(
            built >= edited,
            "{} is older than {}. {rebuild}",
            path.display(),
            input.display()
        );
    }
    path
}

impl Example {
    fn start(name: &str, args: &[String], env: &[(&str, &str)]) -> Example {
        let mut command = Command::new(example_path(name));
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in EXAMPLE_ENV {
            command.env_remove(var);
        }
        command.envs(env.iter().copied());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Example {
            name: name.to_string(),
            child,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Waits for a stdout line containing `needle` and returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(why) => {
                    let _ = self.child.kill();
                    let finished = self.collect();
                    panic!(
                        "no line containing {needle:?} ({why:?})\n{}",
                        finished.output()
                    );
                }
            }
        }
    }

    /// Sends `signal` (e.g. `INT` for Ctrl-C) to the program.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the program to exit (killing it after [`WAIT`]) and collects its output.
    fn finish(mut self) -> Finished {
        self.collect()
    }

    fn collect(&mut self) -> Finished {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The writer is gone: the reader thread drains what is left and hangs up.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        Finished {
            name: std::mem::take(&mut self.name),
            status,
            stdout: std::mem::take(&mut self.seen),
            stderr,
        }
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        // A failed assertion must not leave the program running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn timestamp(value: &Value) -> jiff::Timestamp {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an RFC 3339 timestamp: {value}"))
}

#[test]
fn reboot_pair_reports_and_reads_reboot_time() {
    let hub = Hub::start();
    let started = jiff::Timestamp::now();
    let cs = hub.add_device("reboot-dev");
    let flags = [
        "--reboot-delay",
        "1",
        "--max-requests",
        "1",
        "--timeout",
        "60",
    ];
    let mut device = hub.run_device("dm_getstarted_device", &cs, false, &flags);
    device.wait_for("IoTHubDeviceClient waiting for commands, press Ctrl-C to exit");

    let flags = ["--poll-interval", "0.2", "--max-polls", "50"];
    let service = hub
        .run_service("dm_getstarted_service", "reboot-dev", &flags)
        .finish();
    service.assert_success();
    service.assert_lines_in_order(&[
        "Starting the IoT Hub Service Client DeviceManagement Rust sample...",
        "    Device ID         = reboot-dev",
        "Invoking device to reboot...",
        "Successfully invoked the device to reboot.",
        DEVICE_RESPONSE,
        "IoTHubClient waiting for commands, press Ctrl-C to exit",
    ]);
    let key = hub.service_cs.split("SharedAccessKey=").nth(1).unwrap();
    assert!(
        !service.stdout.iter().any(|l| l.contains(key)),
        "the banner must not print the key\n{}",
        service.output()
    );
    let last_reboot = service.value_after("Last reboot time: ");

    let device = device.finish();
    device.assert_success();
    device.assert_lines_in_order(&[
        "Starting the IoT Hub Rust sample...",
        "IoTHubDeviceClient waiting for commands, press Ctrl-C to exit",
        "Rebooting device",
        "Device rebooted",
        "Device twins updated with latest rebootTime",
    ]);

    let reported = hub.reported("reboot-dev");
    assert_eq!(reported["rebootTime"], json!(last_reboot));
    let at = timestamp(&reported["rebootTime"]);
    assert!(at >= started && at <= jiff::Timestamp::now(), "{at}");
}

#[test]
fn direct_method_pair_over_websockets() {
    let hub = Hub::start();
    let cs = hub.add_device("methods-dev");
    let flags = ["--max-requests", "2", "--timeout", "60"];
    let mut device = hub.run_device("simulated_device", &cs, true, &flags);
    device.wait_for("IoTHubClient waiting for direct method call, press Ctrl-C to exit");

    let seed = hub
        .run_service("call_method_on_device", "methods-dev", &[])
        .finish();
    seed.assert_success();
    seed.assert_lines_in_order(&[
        "Starting the IoT Hub Service Client DeviceMethod Rust sample...",
        "Device Method called",
        "Device Method name       : DeviceMethod",
        r#"Device Method payload    : {"method_number":"42"}"#,
        "Response status          : 200",
        &format!("Response payload         : {DEVICE_RESPONSE}"),
    ]);

    let flags = ["--method", "configure", "--payload", r#"{"level":3}"#];
    let other = hub
        .run_service("call_method_on_device", "methods-dev", &flags)
        .finish();
    other.assert_success();
    other.assert_lines_in_order(&[
        "Device Method name       : configure",
        "Response status          : 200",
    ]);

    let device = device.finish();
    device.assert_success();
    device.assert_lines_in_order(&[
        "    Protocol MQTT_WS",
        "Direct method called.",
        "methodName = DeviceMethod",
        r#"payload = {"method_number":"42"}"#,
        "Total calls confirmed: 1",
        "methodName = configure",
        r#"payload = {"level":3}"#,
        "Total calls confirmed: 2",
    ]);
    assert_eq!(
        device.count("Direct method called."),
        1,
        "{}",
        device.output()
    );
}

#[test]
fn cloud_to_device_pair_delivers_and_reports_success_feedback() {
    let hub = Hub::start();
    let cs = hub.add_device("c2d-dev");
    let mut device = hub.run_device(
        "receive_cloud_to_device_message",
        &cs,
        false,
        &["--max-requests", "3", "--timeout", "60"],
    );
    device.wait_for("Waiting for cloud-to-device messages");
    let amqp = hub.server().amqp_addr.port().to_string();
    let service = hub
        .run_service(
            "send_cloud_to_device_message",
            "c2d-dev",
            &[
                "--amqp-port",
                &amqp,
                "--count",
                "3",
                "--feedback-timeout",
                "60",
            ],
        )
        .finish();
    service.assert_success();
    service.assert_lines_in_order(&[
        "Waiting for delivery feedback...",
        "Every message has its feedback",
    ]);
    let out = service.output();
    assert_eq!(out.matches("Sent message ").count(), 3, "{out}");
    assert_eq!(out.matches(": Success (Success)").count(), 3, "{out}");
    let device = device.finish();
    device.assert_success();
    device.assert_lines_in_order(&[
        "Message received (1):",
        r#"  data: {"command":"blink","sequence":0}"#,
        "  content type: application/json",
        "  ack: full",
        "  property messageNumber: 0",
        "Message received (3):",
        "Received 3 messages",
    ]);
}

#[test]
fn firmware_update_pair_walks_through_every_stage() {
    let hub = Hub::start();
    let cs = hub.add_device("fw-dev");
    let flags = [
        "--step-delay",
        "0.3",
        "--max-requests",
        "1",
        "--timeout",
        "60",
    ];
    let mut device = hub.run_device("dm_firmware_update_device", &cs, false, &flags);
    device.wait_for("IoTHubDeviceClient waiting for commands");

    let uri = "https://firmware.example.com/images/v2.bin";
    let flags = ["--fw-package-uri", uri, "--poll-interval", "0.05"];
    let service = hub
        .run_service("dm_firmware_update_service", "fw-dev", &flags)
        .finish();
    service.assert_success();
    service.assert_lines_in_order(&[
        "Response status          : 200",
        r#"Response payload         : {"Response":"Firmware update started"}"#,
        "Firmware update succeeded",
    ]);
    // Polling may miss short stages, but what it saw must be in the device's order and end
    // with the final one.
    let order = [
        "waiting",
        "downloading",
        "downloadComplete",
        "applying",
        "applyComplete",
    ];
    let seen: Vec<&str> = service
        .stdout
        .iter()
        .filter_map(|l| l.strip_prefix("Firmware update status: "))
        .map(|l| l.split(" (at ").next().unwrap_or_default())
        .collect();
    let positions: Vec<usize> = seen
        .iter()
        .map(|s| order.iter().position(|o| o == s).expect("a known status"))
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "{}",
        service.output()
    );
    assert_eq!(seen.last(), Some(&"applyComplete"), "{}", service.output());

    let device = device.finish();
    device.assert_success();
    device.assert_lines_in_order(&[
        &format!("Firmware update requested: fwPackageUri={uri}"),
        "firmwareUpdate status: waiting",
        "firmwareUpdate status: downloading",
        &format!("Downloading image from {uri}"),
        "firmwareUpdate status: downloadComplete",
        "firmwareUpdate status: applying",
        "Applying image",
        "firmwareUpdate status: applyComplete",
        "Firmware update complete",
    ]);

    let state = &hub.reported("fw-dev")["iothubDM"]["firmwareUpdate"];
    assert_eq!(state["status"], "applyComplete");
    assert_eq!(state["fwPackageUri"], uri);
    assert!(state.get("error").is_none(), "{state}");
    let times: Vec<jiff::Timestamp> = [
        "startedWaitingTime",
        "startedDownloadingTime",
        "downloadCompleteTime",
        "startedApplyingTime",
        "lastFirmwareUpdate",
    ]
    .iter()
    .map(|field| timestamp(&state[field]))
    .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{state}");
}

#[test]
fn firmware_update_failures_report_an_error_object() {
    let hub = Hub::start();
    let cs = hub.add_device("fw-fail-dev");
    let flags = [
        "--step-delay",
        "0.1",
        "--fail",
        "apply",
        "--max-requests",
        "2",
        "--timeout",
        "60",
    ];
    let mut device = hub.run_device("dm_firmware_update_device", &cs, false, &flags);
    device.wait_for("IoTHubDeviceClient waiting for commands");

    // A call without a package URI is refused at once and starts nothing.
    let flags = ["--method", "firmwareUpdate", "--payload", "{}"];
    let refused = hub
        .run_service("call_method_on_device", "fw-fail-dev", &flags)
        .finish();
    refused.assert_success();
    refused.assert_lines_in_order(&["Response status          : 400"]);

    // An unreachable host fails the download.
    let flags = [
        "--fw-package-uri",
        "https://firmware.example.invalid/v2.bin",
        "--poll-interval",
        "0.05",
    ];
    let unreachable = hub
        .run_service("dm_firmware_update_service", "fw-fail-dev", &flags)
        .finish();
    unreachable.assert_failure();
    let error = unreachable.value_after("Firmware update failed: ");
    let error: Value = serde_json::from_str(&error).unwrap();
    assert_eq!(error["code"], "HostUnreachable", "{}", unreachable.output());
    let state = &hub.reported("fw-fail-dev")["iothubDM"]["firmwareUpdate"];
    assert_eq!(state["status"], "downloadFailed");
    assert_eq!(state["error"], error);
    assert!(state.get("downloadCompleteTime").is_none(), "{state}");

    // A reachable package downloads, then --fail apply fails the apply; the watcher must not
    // mistake the previous update's downloadFailed for this one's outcome.
    let flags = [
        "--fw-package-uri",
        "https://firmware.example.com/v2.bin",
        "--poll-interval",
        "0.05",
    ];
    let apply = hub
        .run_service("dm_firmware_update_service", "fw-fail-dev", &flags)
        .finish();
    apply.assert_failure();
    assert!(
        !apply
            .stdout
            .iter()
            .any(|l| l.starts_with("Firmware update status: downloadFailed")),
        "{}",
        apply.output()
    );
    let error: Value =
        serde_json::from_str(&apply.value_after("Firmware update failed: ")).unwrap();
    assert_eq!(error["code"], "ApplyFailed", "{}", apply.output());
    let state = &hub.reported("fw-fail-dev")["iothubDM"]["firmwareUpdate"];
    assert_eq!(state["status"], "applyFailed");
    assert_eq!(state["error"], error);
    timestamp(&state["downloadCompleteTime"]);
    timestamp(&error["time"]);

    let device = device.finish();
    device.assert_success();
    device.assert_lines_in_order(&[
        "firmwareUpdate status: downloadFailed",
        "Firmware update failed",
        "firmwareUpdate status: downloadComplete",
        "firmwareUpdate status: applyFailed",
        "Firmware update failed",
    ]);
}

#[test]
fn factory_reset_wipes_history_and_reports_each_stage() {
    let hub = Hub::start();
    let cs = hub.add_device("reset-dev");
    // The device has a past: a reboot time and a firmware update status.
    hub.rt.block_on(async {
        let ca = std::fs::read(&hub.ca).unwrap();
        let client = DeviceClient::builder(&cs)
            .extra_ca_pem(ca)
            .port(hub.server().mqtt_addr.port())
            .build()
            .unwrap();
        client.connect().await.unwrap();
        let history = json!({
            "rebootTime": "2024-01-01T00:00:00.000Z",
            "iothubDM": {"firmwareUpdate": {"status": "applyComplete"}},
            "serialNumber": "SN-1",
        });
        client.patch_reported(&history).await.unwrap();
        client.close().await;
    });

    let flags = [
        "--step-delay",
        "0.2",
        "--max-requests",
        "1",
        "--timeout",
        "60",
    ];
    let mut device = hub.run_device("dm_factory_reset_device", &cs, false, &flags);
    device.wait_for("IoTHubDeviceClient waiting for commands");
    let call = hub
        .run_service(
            "call_method_on_device",
            "reset-dev",
            &["--method", "factoryReset"],
        )
        .finish();
    call.assert_success();
    call.assert_lines_in_order(&[
        "Device Method name       : factoryReset",
        "Response status          : 200",
        r#"Response payload         : {"Response":"Factory reset started"}"#,
    ]);

    let device = device.finish();
    device.assert_success();
    device.assert_lines_in_order(&[
        "Factory reset requested",
        "factoryReset status: resetting",
        "factoryReset status: rebooting",
        "factoryReset status: resetComplete",
        "Factory reset complete",
    ]);

    let reported = hub.reported("reset-dev");
    let state = &reported["iothubDM"]["factoryReset"];
    assert_eq!(state["status"], "resetComplete", "{reported}");
    let started = timestamp(&state["startedResetTime"]);
    let rebooted = timestamp(&state["startedRebootTime"]);
    let done = timestamp(&state["lastFactoryResetTime"]);
    assert!(started <= rebooted && rebooted <= done, "{state}");
    assert!(reported.get("rebootTime").is_none(), "{reported}");
    assert!(
        reported["iothubDM"].get("firmwareUpdate").is_none(),
        "{reported}"
    );
    // Only the device's history goes, not what it is.
    assert_eq!(reported["serialNumber"], "SN-1");
}

#[test]
fn device_programs_stop_cleanly_on_ctrl_c_and_sigterm() {
    let hub = Hub::start();
    let cases = [
        (
            "simulated_device",
            "INT",
            "IoTHubClient waiting for direct method call",
            "IoTHubClient sample stopped",
        ),
        (
            "dm_getstarted_device",
            "TERM",
            "IoTHubDeviceClient waiting for commands",
            "IoTHubDeviceClient sample stopped",
        ),
        // A signal while still connecting is held until the program waits, not fatal: the
        // handlers are in place before the first line is printed.
        (
            "simulated_device",
            "INT",
            "Starting the IoT Hub Rust direct methods sample",
            "IoTHubClient sample stopped",
        ),
        (
            "dm_getstarted_device",
            "TERM",
            "Starting the IoT Hub Rust sample",
            "IoTHubDeviceClient sample stopped",
        ),
    ];
    for (i, (name, signal, ready, stopped)) in cases.into_iter().enumerate() {
        let cs = hub.add_device(&format!("signal-dev-{i}"));
        let mut device = hub.run_device(name, &cs, false, &[]);
        device.wait_for(ready);
        device.signal(signal);
        let finished = device.finish();
        finished.assert_success();
        assert_eq!(
            finished.stdout.last().map(String::as_str),
            Some(stopped),
            "{}",
            finished.output()
        );
    }
}

#[test]
fn bounded_runs_end_on_their_own() {
    let hub = Hub::start();
    let cs = hub.add_device("bounded-dev");
    // Fewer requests than asked for within the timeout is a failure...
    let flags = ["--max-requests", "1", "--timeout", "0.5"];
    let short = hub
        .run_device("dm_getstarted_device", &cs, false, &flags)
        .finish();
    short.assert_failure();
    assert!(
        short.stderr.contains("timed out after 0.5 s"),
        "{}",
        short.output()
    );
    // ...while a plain --timeout is just the end of the run.
    let plain = hub
        .run_device("simulated_device", &cs, false, &["--timeout", "0.5"])
        .finish();
    plain.assert_success();
    assert_eq!(
        plain.stdout.last().map(String::as_str),
        Some("IoTHubClient sample stopped"),
        "{}",
        plain.output()
    );
}

#[test]
fn programs_explain_what_went_wrong() {
    let hub = Hub::start();

    let unknown = hub
        .run_service("call_method_on_device", "no-such-device", &[])
        .finish();
    unknown.assert_failure();
    assert!(
        unknown.stderr.contains("DeviceNotFound"),
        "{}",
        unknown.output()
    );

    hub.add_device("offline-dev");
    let flags = ["--connect-timeout", "0"];
    let offline = hub
        .run_service("call_method_on_device", "offline-dev", &flags)
        .finish();
    offline.assert_failure();
    assert!(
        offline.stderr.contains("DeviceNotOnline"),
        "{}",
        offline.output()
    );

    let cs = hub.add_device("wrong-key-dev");
    let wrong = cs.replace("SharedAccessKey=", "SharedAccessKey=AAAA");
    let refused = hub
        .run_device("simulated_device", &wrong, false, &["--timeout", "10"])
        .finish();
    refused.assert_failure();
    assert!(
        refused.stderr.contains("refused the credentials"),
        "{}",
        refused.output()
    );

    let unconfigured = Example::start("dm_getstarted_device", &[], &[]).finish();
    assert_eq!(
        unconfigured.status.code(),
        Some(2),
        "{}",
        unconfigured.output()
    );
    assert!(
        unconfigured.stderr.contains("--connection-string"),
        "{}",
        unconfigured.output()
    );
}

#[test]
fn module_pair_configures_the_module_twin_and_calls_its_method() {
    let hub = Hub::start();
    hub.add_device("edge-dev");
    let module = hub
        .rt
        .block_on(
            hub.service
                .create_module("edge-dev", "filter", NewModule::default()),
        )
        .unwrap();
    let key = module
        .authentication
        .and_then(|a| a.symmetric_key)
        .and_then(|k| k.primary_key)
        .unwrap();
    let cs = format!("HostName=localhost;DeviceId=edge-dev;ModuleId=filter;SharedAccessKey={key}");
    let args: Vec<String> = [
        "--port",
        &hub.server().mqtt_addr.port().to_string(),
        "--ca",
        &hub.ca.display().to_string(),
        "--max-requests",
        "2",
        "--timeout",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut module = Example::start(
        "simulated_module",
        &args,
        &[("IOTHUB_MODULE_CONNECTION_STRING", &cs)],
    );
    module.wait_for("waiting for direct methods and desired properties");

    // 27 passes the default threshold (25) but not the one the twin sets first.
    let flags = [
        "--module-id",
        "filter",
        "--threshold",
        "30",
        "--temperature",
        "27",
    ];
    let first = hub
        .run_service("call_method_on_module", "edge-dev", &flags)
        .finish();
    first.assert_success();
    first.assert_lines_in_order(&[
        "Response status  : 200",
        r#"Response payload : {"forwarded":false,"threshold":30.0}"#,
    ]);
    let flags = ["--module-id", "filter", "--temperature", "31.5"];
    let second = hub
        .run_service("call_method_on_module", "edge-dev", &flags)
        .finish();
    second.assert_success();
    second.assert_lines_in_order(&[
        r#"Response payload : {"forwarded":true,"threshold":30.0}"#,
        "Reported threshold: 30.0",
    ]);

    let module = module.finish();
    module.assert_success();
    module.assert_lines_in_order(&[
        "Module filter of device edge-dev connected; waiting for direct methods and desired properties",
        "filter 27 against 30: forwarded = false",
        "filter 31.5 against 30: forwarded = true",
    ]);
    // The device's own twin is untouched.
    assert_eq!(hub.reported("edge-dev").get("threshold"), None);
}
