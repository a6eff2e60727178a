//! Device management, firmware update, device side: answers the `firmwareUpdate` direct
//! method (payload `{"fwPackageUri": "https://..."}`) at once, then simulates the update and
//! reports its progress in the reported property `iothubDM.firmwareUpdate`: `waiting` →
//! `downloading` → `downloadComplete` → `applying` → `applyComplete`, each stage with its
//! timestamp. A failed download or apply ends in `downloadFailed` or `applyFailed` with an
//! `error` object (`code`, `message`, `time`).
//!
//! The download is simulated: a URI that is not `http(s)://` fails as invalid, a host under
//! the reserved `.invalid` domain fails as unreachable, and `--fail download|apply` makes a
//! stage fail on purpose. Pair it with `dm_firmware_update_service`. Runs against twinhub or
//! Azure IoT Hub alike:
//!
//! ```sh
//! export IOTHUB_DEVICE_CONNECTION_STRING="HostName=...;DeviceId=...;SharedAccessKey=..."
//! cargo run --example dm_firmware_update_device -- --ca twinhub-data/tls/ca.pem
//! ```

mod common;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use twinhub_sdk::DeviceClient;

use common::DeviceArgs;

const METHOD_NAME: &str = "firmwareUpdate";
/// The section of `iothubDM` this operation reports in.
const SECTION: &str = "firmwareUpdate";

/// Answers firmwareUpdate and reports the simulated update's progress.
#[derive(Debug, Parser)]
#[command(name = "dm_firmware_update_device")]
struct Cli {
    #[command(flatten)]
    device: DeviceArgs,
    /// Seconds each simulated stage (waiting, downloading, applying) takes
    #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = common::parse_seconds)]
    step_delay: Duration,
    /// Make this stage of every update fail
    #[arg(long, value_enum)]
    fail: Option<Stage>,
}

/// The stages that can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Stage {
    Download,
    Apply,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> Result<()> {
    let mut interrupt = common::interrupt()?;
    println!("Starting the IoT Hub Rust firmware update sample...");
    let client = cli.device.client()?;
    let mut requests = client.method_requests();
    client.connect().await?;
    common::log_connection_changes(&client);
    println!("IoTHubDeviceClient waiting for commands, press Ctrl-C to exit");

    let work = common::serve_operations(
        &client,
        &mut requests,
        &cli.device.bounds,
        METHOD_NAME,
        "Firmware update started",
        |payload| {
            let uri = package_uri(&payload)?;
            println!("Firmware update requested: fwPackageUri={uri}");
            let update = Update {
                client: client.clone(),
                uri,
                step: cli.step_delay,
                fail: cli.fail,
            };
            Ok(update.run())
        },
    );
    let ended = common::run_bounded(&mut interrupt, cli.device.bounds.timeout, work).await;
    client.close().await;
    common::device_exit(
        &ended?,
        &cli.device.bounds,
        "IoTHubDeviceClient sample stopped",
    )
}

/// The `fwPackageUri` of a `firmwareUpdate` call.
fn package_uri(payload: &Value) -> Result<String, String> {
    match payload.get("fwPackageUri").and_then(Value::as_str) {
        Some(uri) if !uri.trim().is_empty() => Ok(uri.trim().to_string()),
        _ => Err(r#"The payload must be {"fwPackageUri": "<URI of the firmware image>"}"#.into()),
    }
}

/// One simulated firmware update.
struct Update {
    client: DeviceClient,
    uri: String,
    step: Duration,
    fail: Option<Stage>,
}

impl Update {
    async fn run(self) {
        match self.stages().await {
            Ok(true) => println!("Firmware update complete"),
            Ok(false) => println!("Firmware update failed"),
            Err(e) => eprintln!("Firmware update abandoned: {e:#}"),
        }
    }

    /// Walks through the stages; `Ok(false)` when the update failed and said so.
    async fn stages(&self) -> Result<bool> {
        // A new update starts from a clean slate: the last one's stage times and error go.
        let fields = json!({
            "fwPackageUri": self.uri,
            "startedWaitingTime": common::now(),
            "startedDownloadingTime": null,
            "downloadCompleteTime": null,
            "startedApplyingTime": null,
            "error": null,
        });
        self.report("waiting", fields).await?;
        tokio::time::sleep(self.step).await;

        self.report(
            "downloading",
            json!({"startedDownloadingTime": common::now()}),
        )
        .await?;
        println!("Downloading image from {}", self.uri);
        tokio::time::sleep(self.step).await;
        let problem = download_problem(&self.uri).or_else(|| {
            (self.fail == Some(Stage::Download)).then(|| {
                (
                    "DownloadFailed",
                    "the download failed (--fail download)".into(),
                )
            })
        });
        if let Some((code, message)) = problem {
            self.fail_with("downloadFailed", code, &message).await?;
            return Ok(false);
        }
        self.report(
            "downloadComplete",
            json!({"downloadCompleteTime": common::now()}),
        )
        .await?;

        self.report("applying", json!({"startedApplyingTime": common::now()}))
            .await?;
        println!("Applying image");
        tokio::time::sleep(self.step).await;
        if self.fail == Some(Stage::Apply) {
            let message = "applying the image failed (--fail apply)";
            self.fail_with("applyFailed", "ApplyFailed", message)
                .await?;
            return Ok(false);
        }
        self.report(
            "applyComplete",
            json!({"lastFirmwareUpdate": common::now()}),
        )
        .await?;
        Ok(true)
    }

    async fn report(&self, status: &str, fields: Value) -> Result<()> {
        common::report_stage(&self.client, SECTION, status, fields, json!({})).await
    }

    async fn fail_with(&self, status: &str, code: &str, message: &str) -> Result<()> {
        println!("{message}");
        let error = json!({"code": code, "message": message, "time": common::now()});
        self.report(status, json!({"error": error})).await
    }
}

/// Why the simulated download of `uri` fails, if it does: only absolute `http(s)://` URIs
/// are downloadable, and hosts under the reserved `.invalid` domain never resolve.
fn download_problem(uri: &str) -> Option<(&'static str, String)> {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Some(("InvalidUri", format!("'{uri}' is not an absolute URI")));
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Some((
            "UnsupportedScheme",
            format!("cannot download over '{scheme}'"),
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = match host_port.strip_prefix('[') {
        Some(ipv6) => ipv6.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return Some(("InvalidUri", format!("'{uri}' names no host")));
    }
    if host == "invalid" || host.ends_with(".invalid") {
        return Some(("HostUnreachable", format!("cannot reach {host}")));
    }
    None
}
