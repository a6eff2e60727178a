//! Device management, back-end side: invokes `rebootDevice` on a device, prints its answer,
//! then reads the device twin until the device reports a new `rebootTime`.
//!
//! The Rust port of the "get started with device management" tutorial's service app; pair it
//! with `dm_getstarted_device`. Runs against twinhub or Azure IoT Hub alike:
//!
//! ```sh
//! export IOTHUB_CONNECTION_STRING="HostName=...;SharedAccessKeyName=iothubowner;SharedAccessKey=..."
//! export IOTHUB_DEVICE_ID=my-device
//! cargo run --example dm_getstarted_service -- --ca twinhub-data/tls/ca.pem
//! ```

mod common;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use twinhub_sdk::ServiceClient;

use common::{Ended, ServiceArgs};

const METHOD_NAME: &str = "rebootDevice";

/// Reboots a device through a direct method and waits for its reported rebootTime.
#[derive(Debug, Parser)]
#[command(name = "dm_getstarted_service")]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
    /// Seconds between twin reads while waiting for rebootTime
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = common::parse_seconds)]
    poll_interval: Duration,
    /// Twin reads before giving up on rebootTime
    #[arg(long, value_name = "N", default_value_t = 11)]
    max_polls: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> Result<()> {
    let mut interrupt = common::interrupt()?;
    cli.service.print_banner("DeviceManagement");
    let service = cli.service.client()?;
    match common::run_bounded(&mut interrupt, None, reboot_and_watch(&service, &cli)).await? {
        Ended::Finished(()) => Ok(()),
        Ended::Interrupted | Ended::TimedOut(_) => {
            println!();
            println!("IoTHubDeviceMethod sample stopped");
            Ok(())
        }
    }
}

async fn reboot_and_watch(service: &ServiceClient, cli: &Cli) -> Result<()> {
    let device_id = &cli.service.device_id;
    // A reboot time already in the twin is the previous reboot's: wait for a different one.
    let previous = reboot_time(service, device_id).await?;

    println!();
    println!("Invoking device to reboot...");
    let result = cli
        .service
        .invoke(service, METHOD_NAME, json!({"method_number": "42"}))
        .await?;
    println!();
    println!("Successfully invoked the device to reboot.");
    println!();
    println!("{}", result.payload);
    if !(200..300).contains(&result.status) {
        bail!(
            "the device answered {METHOD_NAME} with status {}",
            result.status
        );
    }

    println!();
    println!("IoTHubClient waiting for commands, press Ctrl-C to exit");
    for poll in 0..cli.max_polls {
        if poll > 0 {
            tokio::time::sleep(cli.poll_interval).await;
        }
        match reboot_time(service, device_id).await? {
            Some(time) if Some(&time) != previous.as_ref() => {
                let text = time
                    .as_str()
                    .map_or_else(|| time.to_string(), str::to_string);
                println!("Last reboot time: {text}");
                return Ok(());
            }
            _ => println!("Waiting for device to report last reboot time..."),
        }
    }
    bail!(
        "device '{device_id}' reported no new rebootTime in {} twin reads",
        cli.max_polls
    )
}

/// The device's reported `rebootTime`, if it has one.
async fn reboot_time(service: &ServiceClient, device_id: &str) -> Result<Option<Value>> {
    let twin = service
        .get_twin(device_id)
        .await
        .with_context(|| format!("reading the twin of device '{device_id}' failed"))?;
    Ok(twin
        .properties
        .and_then(|mut p| p.reported.remove("rebootTime")))
}
