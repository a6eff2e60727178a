//! The `twinhub` binary as a user runs it: `serve` prints what a user needs and shuts down
//! cleanly on SIGTERM; startup failures give one clear line and a non-zero exit; the
//! management commands print JSON and fail with the IoT Hub error code.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_twinhub");

/// A `twinhub serve` child on 127.0.0.1 with ephemeral ports, and what it printed.
struct Served {
    child: Child,
    banner: Vec<String>,
    https_port: u16,
}

impl Served {
    fn start(data_dir: &Path) -> Served {
        let mut child = Command::new(BIN)
            .args(["serve", "--data-dir"])
            .arg(data_dir)
            .args([
                "--bind",
                "127.0.0.1",
                "--https-port",
                "0",
                "--mqtt-port",
                "0",
                "--amqp-port",
                "0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("twinhub starts");
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut banner = Vec::new();
        for line in out.lines() {
            let line = line.unwrap();
            let done = line.starts_with("Next:");
            banner.push(line);
            if done {
                break;
            }
        }
        let https_port = banner
            .iter()
            .find_map(|l| l.split("https://127.0.0.1:").nth(1))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no HTTPS address in the banner: {banner:#?}"));
        Served {
            child,
            banner,
            https_port,
        }
    }

    fn stop(self) -> std::process::ExitStatus {
        self.stop_with("TERM")
    }

    /// Sends `signal` (a `kill -SIGNAL` name) and waits for the exit.
    fn stop_with(mut self, signal: &str) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "twinhub did not exit after SIG{signal}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn run(args: &[&str], data_dir: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("TWINHUB_CONNECTION_STRING")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `serve` expecting it to refuse to start; returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(BIN).arg("serve").args(args).output().unwrap();
    assert!(!out.status.success(), "serve {args:?} started");
    let err = text(&out.stderr);
    let last = err.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("error: "), "no one-line error: {err}");
    last
}

/// At a terminal the banner shows the owner connection string (`script` gives the child a
/// pseudo-terminal).
#[test]
fn serve_prints_the_owner_string_at_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let command = format!(
        "{BIN} serve --data-dir {} --bind 127.0.0.1 --https-port 0 --mqtt-port 0 --amqp-port 0",
        dir.path().display()
    );
    let mut child = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("script (util-linux) runs");
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    for line in out.lines() {
        let line = line.unwrap();
        let done = line.starts_with("Next:");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = Command::new("pkill")
        .args(["-TERM", "-f", &dir.path().display().to_string()])
        .status();
    let _ = child.wait();
    let banner = seen.join("\n");
    assert!(
        banner.contains("SharedAccessKeyName=iothubowner;SharedAccessKey="),
        "{banner}"
    );
}

/// `check` verifies a stopped hub's data dir, names a record it cannot decode, and refuses
/// while a hub holds the store.
#[test]
fn check_verifies_a_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let served = Served::start(d);
    assert!(run(&["device", "create", "chk-1"], d).status.success());
    let busy = run(&["check"], d);
    assert!(!busy.status.success());
    assert!(
        text(&busy.stderr).contains("another process")
            || text(&busy.stdout).contains("another process"),
        "{}{}",
        text(&busy.stdout),
        text(&busy.stderr)
    );
    assert!(served.stop().success());
    let ok = run(&["check"], d);
    assert!(
        ok.status.success(),
        "{}{}",
        text(&ok.stdout),
        text(&ok.stderr)
    );
    let report = text(&ok.stdout);
    assert!(report.contains("table devices: 1 records"), "{report}");
    assert!(report.contains("no problems found"), "{report}");
}

#[test]
fn serve_banner_cli_commands_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path());
    let banner = served.banner.join("\n");
    // Not a terminal (a pipe here, a journal under a service manager): the owner key stays
    // out of the output, and the banner says how to get it.
    assert!(!banner.contains("SharedAccessKey="), "{banner}");
    assert!(
        banner.contains("twinhub connection-string --data-dir"),
        "{banner}"
    );
    assert!(banner.contains("export REQUESTS_CA_BUNDLE="), "{banner}");
    assert!(banner.contains("export SSL_CERT_FILE="), "{banner}");
    // The web console is served on the HTTPS port, and the banner says where.
    let console = format!(
        "Web console:                            https://127.0.0.1:{}/",
        served.https_port
    );
    assert!(banner.contains(&console), "{banner}");
    let d = dir.path();

    let cs = run(&["connection-string", "--policy", "service"], d);
    assert!(cs.status.success());
    assert!(text(&cs.stdout).contains(&format!(
        "HostName=localhost:{};SharedAccessKeyName=service;",
        served.https_port
    )));

    let created = run(&["device", "create", "cli-dev", "--edge"], d);
    assert!(created.status.success(), "{}", text(&created.stderr));
    let device: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    assert_eq!(device["deviceId"], "cli-dev");
    assert_eq!(device["capabilities"]["iotEdge"], true);

    let listed: serde_json::Value =
        serde_json::from_slice(&run(&["device", "list"], d).stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);

    let updated: serde_json::Value = serde_json::from_slice(
        &run(&["device", "update", "cli-dev", "--status", "disabled"], d).stdout,
    )
    .unwrap();
    assert_eq!(updated["status"], "disabled");

    let dcs = text(&run(&["device", "connection-string", "cli-dev"], d).stdout);
    let key = device["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap();
    assert_eq!(
        dcs.trim(),
        format!("HostName=localhost;DeviceId=cli-dev;SharedAccessKey={key}")
    );

    let twin = run(
        &[
            "twin",
            "update",
            "cli-dev",
            "--desired",
            r#"{"fw":"1.2"}"#,
            "--tags",
            r#"{"site":"lab"}"#,
        ],
        d,
    );
    assert!(twin.status.success(), "{}", text(&twin.stderr));
    let shown: serde_json::Value =
        serde_json::from_slice(&run(&["twin", "show", "cli-dev"], d).stdout).unwrap();
    assert_eq!(shown["properties"]["desired"]["fw"], "1.2");
    assert_eq!(shown["tags"]["site"], "lab");

    let bad_json = run(&["twin", "update", "cli-dev", "--desired", "{nope"], d);
    assert!(!bad_json.status.success());

    let missing = run(&["device", "show", "nope"], d);
    assert!(!missing.status.success());
    let err = text(&missing.stderr);
    assert!(
        err.contains("404001") && err.contains("DeviceNotFound"),
        "{err}"
    );

    assert!(run(&["device", "delete", "cli-dev"], d).status.success());
    assert!(!run(&["device", "delete", "cli-dev"], d).status.success());

    let status = served.stop();
    assert!(
        status.success(),
        "SIGTERM must shut down cleanly, got {status}"
    );
}

/// The handlers are in place before the banner, so Ctrl-C the moment it shows is a graceful
/// shutdown (exit 0), not death by the default disposition.
#[test]
fn ctrl_c_right_after_the_banner_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let status = Served::start(dir.path()).stop_with("INT");
    assert!(
        status.success(),
        "Ctrl-C must shut down cleanly, got {status}"
    );
}

#[test]
fn port_in_use_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let line = refused(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--https-port",
        &port,
        "--mqtt-port",
        "0",
        "--amqp-port",
        "0",
    ]);
    assert!(
        line.contains("address already in use") && line.contains("--https-port"),
        "{line}"
    );
}

#[test]
fn privileged_port_refused_to_a_user_without_the_capability() {
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().to_str().unwrap().to_string();
    // Run as an unprivileged user: as root, drop to nobody with setpriv.
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| text(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let mut cmd = if is_root {
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            BIN,
        ]);
        c
    } else {
        Command::new(BIN)
    };
    let out = cmd
        .args([
            "serve",
            "--data-dir",
            &dir_path,
            "--bind",
            "127.0.0.1",
            "--https-port",
            "443",
            "--mqtt-port",
            "0",
            "--amqp-port",
            "0",
        ])
        .output()
        .expect("setpriv (util-linux) runs");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("permission denied")
            && err.contains("--https-port")
            && err.contains("setcap cap_net_bind_service"),
        "{err}"
    );
}

#[test]
fn data_dir_not_writable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let line = refused(&[
        "--data-dir",
        file.join("sub").to_str().unwrap(),
        "--https-port",
        "0",
        "--mqtt-port",
        "0",
        "--amqp-port",
        "0",
    ]);
    assert!(
        line.contains("data directory") && line.contains("cannot create"),
        "{line}"
    );
}

#[test]
fn bad_config_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("hub.toml");
    std::fs::write(&cfg, "https_port = 0\nmqtt_prot = 1\n").unwrap();
    let line = refused(&[
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        line.contains("configuration error") && line.contains("mqtt_prot"),
        "{line}"
    );
}

#[test]
fn certificate_and_key_that_do_not_match() {
    let dir = tempfile::tempdir().unwrap();
    // A first start creates the dev PKI; its CA key does not match the server certificate.
    Served::start(dir.path()).stop();
    let tls = dir.path().join("tls");
    let line = refused(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--https-port",
        "0",
        "--mqtt-port",
        "0",
        "--amqp-port",
        "0",
        "--tls-cert",
        tls.join("server.pem").to_str().unwrap(),
        "--tls-key",
        tls.join("ca-key.pem").to_str().unwrap(),
    ]);
    assert!(line.contains("do not match"), "{line}");
}

/// `module ...`, `twin show|update --module` and `method invoke [--module]` against a served
/// hub; the method reaches a `ModuleClient` connected with the string `module
/// connection-string` printed.
#[test]
fn module_twin_and_method_commands() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path());
    let mqtt_port: u16 = served
        .banner
        .iter()
        .find_map(|l| l.split("mqtts://127.0.0.1:").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .expect("the banner names the MQTT port");
    let d = dir.path();
    let json = |out: &Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let refusal = |out: &Output| -> String {
        assert!(!out.status.success(), "{}", text(&out.stdout));
        text(&out.stderr)
    };
    json(&run(&["device", "create", "gw"], d));

    let created = json(&run(
        &[
            "module",
            "create",
            "gw",
            "filter",
            "--managed-by",
            "IotEdge",
        ],
        d,
    ));
    assert_eq!(created["moduleId"], "filter");
    assert_eq!(created["deviceId"], "gw");
    assert_eq!(created["managedBy"], "IotEdge");
    let (primary, secondary) = ("cHJpbWFyeS1tb2R1bGUta2V5", "c2Vjb25kYXJ5LW1vZHVsZS1rZXk=");
    let given = json(&run(
        &[
            "module",
            "create",
            "gw",
            "given",
            "--primary-key",
            primary,
            "--secondary-key",
            secondary,
        ],
        d,
    ));
    assert_eq!(
        given["authentication"]["symmetricKey"]["primaryKey"],
        primary
    );
    let err = refusal(&run(&["module", "create", "gw", "filter"], d));
    assert!(
        err.contains("409301") && err.contains("ModuleAlreadyExistsOnDevice"),
        "{err}"
    );
    let listed = json(&run(&["module", "list", "gw"], d));
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["moduleId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["filter", "given"]);
    assert_eq!(
        json(&run(&["module", "show", "gw", "given"], d))["moduleId"],
        "given"
    );
    let cs = run(
        &[
            "module",
            "connection-string",
            "gw",
            "given",
            "--key",
            "secondary",
        ],
        d,
    );
    assert_eq!(
        text(&cs.stdout).trim(),
        format!("HostName=localhost;DeviceId=gw;ModuleId=given;SharedAccessKey={secondary}")
    );

    // The module twin, not the device's.
    json(&run(
        &[
            "twin",
            "update",
            "gw",
            "--module",
            "filter",
            "--desired",
            r#"{"threshold":30}"#,
            "--tags",
            r#"{"site":"lab"}"#,
        ],
        d,
    ));
    let twin = json(&run(&["twin", "show", "gw", "--module", "filter"], d));
    assert_eq!(twin["moduleId"], "filter");
    assert_eq!(twin["properties"]["desired"]["threshold"], 30);
    assert_eq!(twin["tags"]["site"], "lab");
    let device_twin = json(&run(&["twin", "show", "gw"], d));
    assert!(
        device_twin["properties"]["desired"]
            .get("threshold")
            .is_none()
    );

    // Methods: an offline module, a missing one, then a connected one.
    let err = refusal(&run(
        &["method", "invoke", "gw", "echo", "--module", "filter"],
        d,
    ));
    assert!(err.contains("404103"), "{err}");
    let err = refusal(&run(
        &["method", "invoke", "gw", "echo", "--module", "nope"],
        d,
    ));
    assert!(
        err.contains("404010") && err.contains("ModuleNotFound"),
        "{err}"
    );
    let module_cs = text(&run(&["module", "connection-string", "gw", "filter"], d).stdout);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let module = rt.block_on(async {
        let module = twinhub_sdk::ModuleClient::builder(module_cs.trim())
            .extra_ca_pem(std::fs::read(d.join("tls").join("ca.pem")).unwrap())
            .port(mqtt_port)
            .build()
            .unwrap();
        module.set_method_handler(|request| async move {
            twinhub_sdk::MethodResponse::new(200, request.payload)
        });
        module.connect().await.unwrap();
        module
    });
    let answer = json(&run(
        &[
            "method",
            "invoke",
            "gw",
            "echo",
            "--module",
            "filter",
            "--payload",
            r#"{"x":1}"#,
            "--timeout",
            "10",
            "--connect-timeout",
            "5",
        ],
        d,
    ));
    assert_eq!(
        answer,
        serde_json::json!({"status": 200, "payload": {"x": 1}})
    );
    rt.block_on(module.close());
    let err = refusal(&run(
        &["method", "invoke", "gw", "echo", "--timeout", "1"],
        d,
    ));
    assert!(err.contains("--timeout"), "{err}");

    // A self-signed module from `cert device`, registered by thumbprint, signs in with it.
    let certs = tempfile::tempdir().unwrap();
    let issued = run(
        &[
            "cert",
            "device",
            "gw/xmod",
            "--self-signed",
            "--out",
            certs.path().to_str().unwrap(),
        ],
        d,
    );
    assert!(issued.status.success(), "{}", text(&issued.stderr));
    let (cert, key) = (
        certs.path().join("gw-xmod.pem"),
        certs.path().join("gw-xmod-key.pem"),
    );
    let x509 = json(&run(
        &[
            "module",
            "create",
            "gw",
            "xmod",
            "--auth",
            "selfSigned",
            "--cert",
            cert.to_str().unwrap(),
        ],
        d,
    ));
    assert_eq!(x509["authentication"]["type"], "selfSigned");
    let err = refusal(&run(&["module", "connection-string", "gw", "xmod"], d));
    assert!(err.contains("does not use SAS keys"), "{err}");
    rt.block_on(async {
        let module = twinhub_sdk::ModuleClient::x509_builder(
            "localhost",
            "gw",
            "xmod",
            std::fs::read(&cert).unwrap(),
            std::fs::read(&key).unwrap(),
        )
        .extra_ca_pem(std::fs::read(d.join("tls").join("ca.pem")).unwrap())
        .port(mqtt_port)
        .build()
        .unwrap();
        module.connect().await.unwrap();
        module
            .patch_reported(&serde_json::json!({"x509": true}))
            .await
            .unwrap();
        module.close().await;
    });
    let twin = json(&run(&["twin", "show", "gw", "--module", "xmod"], d));
    assert_eq!(twin["properties"]["reported"]["x509"], true);

    let deleted = run(&["module", "delete", "gw", "given"], d);
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    let err = refusal(&run(&["module", "show", "gw", "given"], d));
    assert!(err.contains("404010"), "{err}");
    assert!(served.stop().success());
}

/// `twinhub device list | head -1`: a reader that stops early ends the command quietly with
/// success, not with a "failed printing to stdout" panic (the list is far larger than a pipe's
/// buffer, so the write fails while the reader is gone).
#[test]
fn a_reader_that_stops_early_is_not_an_error() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path());
    let d = dir.path();
    for i in 0..100 {
        let out = run(&["device", "create", &format!("pipe-{i:03}")], d);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let mut child = Command::new(BIN)
        .args(["device", "list", "--data-dir"])
        .arg(d)
        .env_remove("TWINHUB_CONNECTION_STRING")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    served.stop();
}
