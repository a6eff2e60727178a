//! Device management, device side: answers the `rebootDevice` direct method by simulating a
//! reboot, reporting the time in the `rebootTime` reported property, and answering 200.
//!
//! The Rust port of the "get started with device management" tutorial's device app; pair it
//! with `dm_getstarted_service`. Runs against twinhub or Azure IoT Hub alike:
//!
//! ```sh
//! export IOTHUB_DEVICE_CONNECTION_STRING="HostName=...;DeviceId=...;SharedAccessKey=..."
//! cargo run --example dm_getstarted_device -- --ca twinhub-data/tls/ca.pem
//! ```

mod common;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use serde_json::json;
use twinhub_sdk::{DeviceClient, MethodRequests};

use common::{DEVICE_RESPONSE, DeviceArgs, RequestBudget};

const METHOD_NAME: &str = "rebootDevice";

/// Answers rebootDevice: simulates a reboot, then reports rebootTime.
#[derive(Debug, Parser)]
#[command(name = "dm_getstarted_device")]
struct Cli {
    #[command(flatten)]
    device: DeviceArgs,
    /// Seconds the simulated reboot takes
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = common::parse_seconds)]
    reboot_delay: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> Result<()> {
    let mut interrupt = common::interrupt()?;
    println!("Starting the IoT Hub Rust sample...");
    let client = cli.device.client()?;
    let mut requests = client.method_requests();
    client.connect().await?;
    common::log_connection_changes(&client);
    println!("IoTHubDeviceClient waiting for commands, press Ctrl-C to exit");

    let work = reboot_listener(&client, &mut requests, &cli);
    let ended = common::run_bounded(&mut interrupt, cli.device.bounds.timeout, work).await;
    client.close().await;
    common::device_exit(
        &ended?,
        &cli.device.bounds,
        "IoTHubDeviceClient sample stopped",
    )
}

/// Serves reboot requests one at a time, as a device can only reboot once at a time.
async fn reboot_listener(
    client: &DeviceClient,
    requests: &mut MethodRequests,
    cli: &Cli,
) -> Result<()> {
    let mut budget = RequestBudget::new(&cli.device.bounds);
    if budget.exhausted() {
        return Ok(());
    }
    while let Some(request) = requests.recv().await {
        if request.name != METHOD_NAME {
            let payload = json!({"Response": format!("Unknown method '{}'", request.name)});
            if let Err(e) = request.respond(404, payload).await {
                eprintln!("Answering a method call failed: {e}");
            }
            continue;
        }

        println!("Rebooting device");
        tokio::time::sleep(cli.reboot_delay).await;
        println!("Device rebooted");

        let reboot_time = common::now();
        let (status, payload) = match client
            .patch_reported(&json!({"rebootTime": reboot_time}))
            .await
        {
            Ok(_) => {
                println!("Device twins updated with latest rebootTime");
                (200, json!({"Response": DEVICE_RESPONSE}))
            }
            Err(e) => {
                eprintln!("Reporting rebootTime failed: {e}");
                let message = format!("Rebooted, but reporting rebootTime failed: {e}");
                (500, json!({"Response": message}))
            }
        };
        if let Err(e) = request.respond(status, payload).await {
            eprintln!("Answering {METHOD_NAME} failed: {e}");
        }
        if budget.record() {
            return Ok(());
        }
    }
    Err(common::calls_ended(client))
}
