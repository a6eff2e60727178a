//! Device management, factory reset, device side: answers the `factoryReset` direct method
//! at once, then simulates the reset and reports its progress in the reported property
//! `iothubDM.factoryReset`: `resetting` → `rebooting` → `resetComplete`, each stage with its
//! timestamp. A factory reset forgets what the device reported about its past, so the
//! `resetting` stage also removes `rebootTime` and `iothubDM.firmwareUpdate`.
//!
//! Invoke it with `call_method_on_device --method factoryReset`. Runs against twinhub or
//! Azure IoT Hub alike:
//!
//! ```sh
//! export IOTHUB_DEVICE_CONNECTION_STRING="HostName=...;DeviceId=...;SharedAccessKey=..."
//! cargo run --example dm_factory_reset_device -- --ca twinhub-data/tls/ca.pem
//! ```

mod common;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use serde_json::{Value, json};
use twinhub_sdk::DeviceClient;

use common::DeviceArgs;

const METHOD_NAME: &str = "factoryReset";
/// The section of `iothubDM` this operation reports in.
const SECTION: &str = "factoryReset";

/// Answers factoryReset and reports the simulated reset's progress.
#[derive(Debug, Parser)]
#[command(name = "dm_factory_reset_device")]
struct Cli {
    #[command(flatten)]
    device: DeviceArgs,
    /// Seconds each simulated stage (wiping, rebooting) takes
    #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = common::parse_seconds)]
    step_delay: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> Result<()> {
    let mut interrupt = common::interrupt()?;
    println!("Starting the IoT Hub Rust factory reset sample...");
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
        "Factory reset started",
        |_payload| {
            println!("Factory reset requested");
            Ok(factory_reset(client.clone(), cli.step_delay))
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

async fn factory_reset(client: DeviceClient, step: Duration) {
    match reset_stages(&client, step).await {
        Ok(()) => println!("Factory reset complete"),
        Err(e) => eprintln!("Factory reset abandoned: {e:#}"),
    }
}

async fn reset_stages(client: &DeviceClient, step: Duration) -> Result<()> {
    let report = |status: &'static str, fields: Value, extra: Value| {
        common::report_stage(client, SECTION, status, fields, extra)
    };
    // The reset wipes the device's history, and with it what it reported about that history.
    let forget = json!({"rebootTime": null, "iothubDM": {"firmwareUpdate": null}});
    let fields = json!({
        "startedResetTime": common::now(),
        "startedRebootTime": null,
        "lastFactoryResetTime": null,
    });
    report("resetting", fields, forget).await?;
    println!("Wiping device data");
    tokio::time::sleep(step).await;

    report(
        "rebooting",
        json!({"startedRebootTime": common::now()}),
        json!({}),
    )
    .await?;
    println!("Rebooting device");
    tokio::time::sleep(step).await;

    let fields = json!({"lastFactoryResetTime": common::now()});
    report("resetComplete", fields, json!({})).await
}
