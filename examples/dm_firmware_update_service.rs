//! Device management, firmware update, back-end side: invokes `firmwareUpdate` with a
//! `fwPackageUri` on a device, then watches the device twin's reported
//! `iothubDM.firmwareUpdate` until the update completes (`applyComplete`) or fails
//! (`downloadFailed`, `applyFailed`: the device's `error` object is printed and the program
//! exits non-zero).
//!
//! Pair it with `dm_firmware_update_device`. Runs against twinhub or Azure IoT Hub alike:
//!
//! ```sh
//! export IOTHUB_CONNECTION_STRING="HostName=...;SharedAccessKeyName=iothubowner;SharedAccessKey=..."
//! export IOTHUB_DEVICE_ID=my-device
//! cargo run --example dm_firmware_update_service -- --ca twinhub-data/tls/ca.pem \
//!     --fw-package-uri https://firmware.example.com/contoso-2.0.bin
//! ```

mod common;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use twinhub_sdk::ServiceClient;

use common::{Ended, ServiceArgs};

const METHOD_NAME: &str = "firmwareUpdate";

/// Starts a firmware update on a device and follows its progress through the twin.
#[derive(Debug, Parser)]
#[command(name = "dm_firmware_update_service")]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
    /// Where the device downloads the firmware image from
    #[arg(
        long,
        default_value = "https://firmware.example.com/images/contoso-2.0.bin"
    )]
    fw_package_uri: String,
    /// Seconds between twin reads
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = common::parse_seconds)]
    poll_interval: Duration,
    /// Give up when the update has not finished after this many seconds
    #[arg(long, value_name = "SECONDS", default_value = "300", value_parser = common::parse_seconds)]
    timeout: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> Result<()> {
    let mut interrupt = common::interrupt()?;
    cli.service.print_banner("FirmwareUpdate");
    let service = cli.service.client()?;
    match common::run_bounded(
        &mut interrupt,
        Some(cli.timeout),
        update_and_watch(&service, &cli),
    )
    .await?
    {
        Ended::Finished(()) => Ok(()),
        Ended::Interrupted => {
            println!();
            println!("IoTHubDeviceMethod sample stopped");
            Ok(())
        }
        Ended::TimedOut(limit) => bail!(
            "the firmware update did not finish within {:.1} s",
            limit.as_secs_f64()
        ),
    }
}

async fn update_and_watch(service: &ServiceClient, cli: &Cli) -> Result<()> {
    let device_id = &cli.service.device_id;
    // The status of an earlier update may still be in the twin: this one is told apart by
    // its own start time.
    let previous_start = firmware_update(service, device_id)
        .await?
        .and_then(|state| state.get("startedWaitingTime").cloned());

    println!();
    println!(
        "Invoking {METHOD_NAME} with fwPackageUri={}...",
        cli.fw_package_uri
    );
    let payload = json!({"fwPackageUri": cli.fw_package_uri});
    let result = cli.service.invoke(service, METHOD_NAME, payload).await?;
    println!("Response status          : {}", result.status);
    println!("Response payload         : {}", result.payload);
    if !(200..300).contains(&result.status) {
        bail!("the device refused the firmware update");
    }

    println!();
    println!("Watching the device twin for the update's progress, press Ctrl-C to exit");
    let mut last_status = String::new();
    loop {
        let state = firmware_update(service, device_id).await?;
        let current = state.filter(|s| {
            let start = s.get("startedWaitingTime");
            start.is_some() && start != previous_start.as_ref()
        });
        if let Some(state) = current {
            let status = state
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if status != last_status {
                match stage_time(&state, &status) {
                    Some(time) => println!("Firmware update status: {status} (at {time})"),
                    None => println!("Firmware update status: {status}"),
                }
                last_status = status;
            }
            if last_status == "applyComplete" {
                println!("Firmware update succeeded");
                return Ok(());
            }
            if last_status.ends_with("Failed") {
                let error = state.get("error").cloned().unwrap_or(Value::Null);
                println!("Firmware update failed: {error}");
                bail!("the device reported {last_status}");
            }
        }
        tokio::time::sleep(cli.poll_interval).await;
    }
}

/// The timestamp the device reported for reaching `status`.
fn stage_time(state: &Value, status: &str) -> Option<String> {
    let field = match status {
        "waiting" => "/startedWaitingTime",
        "downloading" => "/startedDownloadingTime",
        "downloadComplete" => "/downloadCompleteTime",
        "applying" => "/startedApplyingTime",
        "applyComplete" => "/lastFirmwareUpdate",
        _ => "/error/time",
    };
    state
        .pointer(field)
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The device's reported `iothubDM.firmwareUpdate`, if any.
async fn firmware_update(service: &ServiceClient, device_id: &str) -> Result<Option<Value>> {
    let twin = service
        .get_twin(device_id)
        .await
        .with_context(|| format!("reading the twin of device '{device_id}' failed"))?;
    Ok(twin
        .properties
        .and_then(|p| p.reported.get("iothubDM")?.get("firmwareUpdate").cloned())
        .filter(Value::is_object))
}
