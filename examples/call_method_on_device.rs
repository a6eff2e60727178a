//! Direct methods, back-end side: invokes a direct method (`DeviceMethod` unless told
//! otherwise) on a device and prints the device's status and payload.
//!
//! The Rust port of the direct-methods tutorial's `CallMethodOnDevice`; pair it with
//! `simulated_device`, or call other examples' methods with `--method` (e.g. `factoryReset`
//! on `dm_factory_reset_device`). Runs against twinhub or Azure IoT Hub alike:
//!
//! ```sh
//! export IOTHUB_CONNECTION_STRING="HostName=...;SharedAccessKeyName=iothubowner;SharedAccessKey=..."
//! export IOTHUB_DEVICE_ID=my-device
//! cargo run --example call_method_on_device -- --ca twinhub-data/tls/ca.pem
//! ```

mod common;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use serde_json::Value;

use common::{Ended, ServiceArgs};

/// Invokes a direct method on a device and prints its answer.
#[derive(Debug, Parser)]
#[command(name = "call_method_on_device")]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
    /// The method to invoke
    #[arg(long, default_value = "DeviceMethod")]
    method: String,
    /// The method's payload, as JSON
    #[arg(long, default_value = r#"{"method_number":"42"}"#, value_parser = parse_json)]
    payload: Value,
}

fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> Result<()> {
    let mut interrupt = common::interrupt()?;
    cli.service.print_banner("DeviceMethod");
    let service = cli.service.client()?;
    let call = cli
        .service
        .invoke(&service, &cli.method, cli.payload.clone());
    match common::run_bounded(&mut interrupt, None, call).await? {
        Ended::Finished(response) => {
            println!();
            println!("Device Method called");
            println!("Device Method name       : {}", cli.method);
            println!("Device Method payload    : {}", cli.payload);
            println!();
            println!("Response status          : {}", response.status);
            println!("Response payload         : {}", response.payload);
            Ok(())
        }
        Ended::Interrupted | Ended::TimedOut(_) => {
            println!();
            println!("IoTHubDeviceMethod sample stopped");
            Ok(())
        }
    }
}
