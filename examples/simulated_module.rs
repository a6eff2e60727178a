//! Modules, module side: a `filter` module on a device (IoT Edge style) with its own key,
//! twin and direct methods. It takes its `threshold` from the module twin's desired
//! properties and reports it back; the direct method `filter` with `{"temperature": T}`
//! answers whether T passes the threshold and, if it does, sends it on as telemetry from the
//! module (the hub stamps it with the module id).
//!
//! Pair it with `call_method_on_module`. Runs against twinhub or Azure IoT Hub alike:
//!
//! ```sh
//! twinhub module create my-device filter
//! export IOTHUB_MODULE_CONNECTION_STRING="$(twinhub module connection-string my-device filter)"
//! cargo run --example simulated_module -- --ca twinhub-data/tls/ca.pem
//! ```

mod common;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use serde_json::{Value, json};
use twinhub_sdk::{DesiredPatches, MethodRequests, ModuleClient};

use common::{ModuleArgs, RequestBudget};

/// The threshold until the twin sets one.
const DEFAULT_THRESHOLD: f64 = 25.0;

/// Filters temperatures against a threshold kept in the module twin.
#[derive(Debug, Parser)]
#[command(name = "simulated_module")]
struct Cli {
    #[command(flatten)]
    module: ModuleArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> Result<()> {
    let mut interrupt = common::interrupt()?;
    let module = cli.module.client()?;
    // Both streams before connect, so the subscriptions go out with the first connection.
    let mut requests = module.method_requests();
    let mut desired = module.desired_patches();
    module.connect().await?;
    println!(
        "Module {} of device {} connected; waiting for direct methods and desired properties",
        module.module_id(),
        module.device_id()
    );
    let work = serve(&module, &mut requests, &mut desired, &cli);
    let ended = common::run_bounded(&mut interrupt, cli.module.bounds.timeout, work).await;
    module.close().await;
    common::device_exit(&ended?, &cli.module.bounds, "Module sample stopped")
}

async fn serve(
    module: &ModuleClient,
    requests: &mut MethodRequests,
    desired: &mut DesiredPatches,
    cli: &Cli,
) -> Result<()> {
    let mut budget = RequestBudget::new(&cli.module.bounds);
    let mut threshold = DEFAULT_THRESHOLD;
    while !budget.exhausted() {
        // Desired changes first: a service that sets the threshold and then calls `filter`
        // expects the call to see it.
        tokio::select! {
            biased;
            Some(patch) = desired.recv() => {
                // The first item is the whole desired document; later ones are changes.
                if let Some(t) = patch.patch.get("threshold").and_then(Value::as_f64) {
                    threshold = t;
                    let version = module.patch_reported(&json!({"threshold": t})).await?;
                    println!("threshold is now {t} (desired v{}, reported v{version})", patch.version);
                }
            }
            request = requests.recv() => {
                let Some(request) = request else {
                    anyhow::bail!("the module stopped receiving method calls");
                };
                let temperature = request.payload.get("temperature").and_then(Value::as_f64);
                let (status, answer) = match (request.name.as_str(), temperature) {
                    ("filter", Some(t)) => {
                        let forwarded = t > threshold;
                        if forwarded {
                            module
                                .send_event(json!({"temperature": t}).to_string(), &[])
                                .await?;
                        }
                        println!("filter {t} against {threshold}: forwarded = {forwarded}");
                        (200, json!({"forwarded": forwarded, "threshold": threshold}))
                    }
                    ("filter", None) => (400, json!({"error": "give {\"temperature\": number}"})),
                    (other, _) => (404, json!({"error": format!("unknown method '{other}'")})),
                };
                request.respond(status, answer).await?;
                budget.record();
            }
        }
    }
    Ok(())
}
