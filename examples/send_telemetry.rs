//! Telemetry, device side: sends Azure's simulated-device readings (temperature and humidity as
//! JSON, with a `temperatureAlert` application property when it is hot) once a second.
//!
//! The Rust port of the quickstart's `SimulatedDevice`; read the messages back with
//! `read_d2c_messages` or `twinhub monitor-events`. Runs against twinhub or Azure IoT Hub:
//!
//! ```sh
//! export IOTHUB_DEVICE_CONNECTION_STRING="HostName=...;DeviceId=...;SharedAccessKey=..."
//! cargo run --example send_telemetry -- --ca twinhub-data/tls/ca.pem --count 10
//! ```

mod common;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use serde_json::json;

use common::DeviceArgs;

/// Sends simulated temperature and humidity readings.
#[derive(Debug, Parser)]
#[command(name = "send_telemetry")]
struct Cli {
    #[command(flatten)]
    device: DeviceArgs,
    /// Messages to send (default: until Ctrl-C)
    #[arg(long)]
    count: Option<u64>,
    /// Milliseconds between messages
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
}

const TEMPERATURE: f64 = 20.0;
const HUMIDITY: f64 = 60.0;
/// Readings above this get `temperatureAlert=true`.
const ALERT_ABOVE: f64 = 30.0;

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run(Cli::parse()).await)
}

/// A cheap deterministic jitter (no randomness crate for a sample): readings wander like the
/// quickstart's `random.random()` ones.
fn wander(seed: u64) -> f64 {
    let x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((x >> 33) % 1000) as f64 / 1000.0
}

async fn run(cli: Cli) -> Result<()> {
    let mut interrupt = common::interrupt()?;
    println!("IoT Hub device sending periodic messages, press Ctrl-C to exit");
    let client = cli.device.client()?;
    client.connect().await?;
    common::log_connection_changes(&client);
    let work = async {
        let mut sent = 0u64;
        while cli.count.is_none_or(|n| sent < n) {
            let temperature = TEMPERATURE + wander(sent * 2) * 15.0;
            let humidity = HUMIDITY + wander(sent * 2 + 1) * 20.0;
            let body = json!({"temperature": temperature, "humidity": humidity}).to_string();
            let alert = if temperature > ALERT_ABOVE {
                "true"
            } else {
                "false"
            };
            let properties = [
                ("$.ct".to_owned(), "application/json".to_owned()),
                ("$.ce".to_owned(), "utf-8".to_owned()),
                ("temperatureAlert".to_owned(), alert.to_owned()),
            ];
            println!("Sending message: {body}");
            client.send_event(body, &properties).await?;
            sent += 1;
            println!("Message sent ({sent})");
            tokio::time::sleep(Duration::from_millis(cli.interval_ms)).await;
        }
        anyhow::Ok(sent)
    };
    let ended = common::run_bounded(&mut interrupt, cli.device.bounds.timeout, work).await;
    client.close().await;
    match ended? {
        common::Ended::Finished(sent) => {
            println!("Sent {sent} messages");
            Ok(())
        }
        common::Ended::Interrupted => {
            println!("IoTHubClient sample stopped");
            Ok(())
        }
        common::Ended::TimedOut(limit) => {
            println!("Stopped after {} s", limit.as_secs());
            Ok(())
        }
    }
}
