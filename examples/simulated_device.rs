//! Direct methods, device side: answers every direct method with 200 and
//! `{"Response": "This is the response from the device"}`, printing each call.
//!
//! The Rust port of the direct-methods tutorial's `SimulatedDevice`; pair it with
//! `call_method_on_device`. Runs against twinhub or Azure IoT Hub alike:
//!
//! ```sh
//! export IOTHUB_DEVICE_CONNECTION_STRING="HostName=...;DeviceId=...;SharedAccessKey=..."
//! cargo run --example simulated_device -- --ca twinhub-data/tls/ca.pem
//! ```

mod common;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use serde_json::json;
use twinhub_sdk::{DeviceClient, MethodRequests};

use common::{DEVICE_RESPONSE, DeviceArgs, RequestBudget};

/// Answers direct method calls, DeviceMethod in particular.
#[derive(Debug, Parser)]
#[command(name = "simulated_device")]
struct Cli {
    #[command(flatten)]
    device: DeviceArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> Result<()> {
    let mut interrupt = common::interrupt()?;
    println!("Starting the IoT Hub Rust direct methods sample...");
    println!("    Protocol {}", cli.device.transport.label());
    println!(
        "    Connection string={}",
        common::redacted(&cli.device.connection_string)
    );
    let client = cli.device.client()?;
    let mut requests = client.method_requests();
    client.connect().await?;
    common::log_connection_changes(&client);
    println!("IoTHubClient waiting for direct method call, press Ctrl-C to exit");

    let work = answer_calls(&client, &mut requests, &cli);
    let ended = common::run_bounded(&mut interrupt, cli.device.bounds.timeout, work).await;
    client.close().await;
    common::device_exit(&ended?, &cli.device.bounds, "IoTHubClient sample stopped")
}

async fn answer_calls(
    client: &DeviceClient,
    requests: &mut MethodRequests,
    cli: &Cli,
) -> Result<()> {
    let mut budget = RequestBudget::new(&cli.device.bounds);
    if budget.exhausted() {
        return Ok(());
    }
    while let Some(request) = requests.recv().await {
        if request.name == "DeviceMethod" {
            println!("Direct method called.");
        }
        println!(
            "\nMethod callback called with:\nmethodName = {}\npayload = {}\nTotal calls confirmed: {}\n",
            request.name,
            request.payload,
            budget.handled() + 1
        );
        if let Err(e) = request
            .respond(200, json!({"Response": DEVICE_RESPONSE}))
            .await
        {
            eprintln!("Answering the method call failed: {e}");
        }
        if budget.record() {
            return Ok(());
        }
    }
    Err(common::calls_ended(client))
}
