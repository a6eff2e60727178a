//! Modules, back-end side: sets the `threshold` desired property in a module's twin, invokes
//! the module's direct method `filter`, and prints the module's answer and what its twin
//! reports.
//!
//! Pair it with `simulated_module`. Runs against twinhub or Azure IoT Hub alike:
//!
//! ```sh
//! export IOTHUB_CONNECTION_STRING="HostName=...;SharedAccessKeyName=iothubowner;SharedAccessKey=..."
//! export IOTHUB_DEVICE_ID=my-device
//! cargo run --example call_method_on_module -- --module-id filter --threshold 30 --temperature 31.5 --ca twinhub-data/tls/ca.pem
//! ```

mod common;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;
use twinhub_sdk::proto::model::CloudToDeviceMethod;

use common::ServiceArgs;

/// Configures a module through its twin and calls its direct method.
#[derive(Debug, Parser)]
#[command(name = "call_method_on_module")]
struct Cli {
    #[command(flatten)]
    service: ServiceArgs,
    /// The module to drive
    #[arg(long, env = "IOTHUB_MODULE_ID")]
    module_id: String,
    /// Set this threshold in the module twin's desired properties first
    #[arg(long)]
    threshold: Option<f64>,
    /// The temperature to send through the module's `filter` method
    #[arg(long, default_value_t = 30.0)]
    temperature: f64,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> Result<()> {
    let service = cli.service.client()?;
    let (device, module) = (&cli.service.device_id, &cli.module_id);
    if let Some(threshold) = cli.threshold {
        let patch = json!({"properties": {"desired": {"threshold": threshold}}});
        let twin = service
            .update_module_twin(device, module, &patch, None)
            .await
            .context("updating the module twin failed")?;
        let version = twin
            .properties
            .and_then(|p| p.desired.get("$version").cloned());
        println!("desired threshold {threshold} set (desired $version {version:?})");
    }
    let call = CloudToDeviceMethod {
        method_name: "filter".into(),
        payload: Some(json!({"temperature": cli.temperature})),
        response_timeout_in_seconds: Some(cli.service.response_timeout),
        connect_timeout_in_seconds: Some(cli.service.connect_timeout),
    };
    let answer = service
        .invoke_module_method(device, module, &call)
        .await
        .with_context(|| format!("invoking filter on module '{module}' of '{device}' failed"))?;
    println!("Response status  : {}", answer.status);
    println!("Response payload : {}", answer.payload);
    let twin = service.get_module_twin(device, module).await?;
    let reported = twin
        .properties
        .and_then(|p| p.reported.get("threshold").cloned());
    println!("Reported threshold: {}", reported.unwrap_or_default());
    Ok(())
}
