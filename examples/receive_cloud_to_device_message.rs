//! Cloud-to-device messages, device side: waits for messages from the back end and prints
//! each one's body, system properties and custom properties, as Azure's `receive_message`
//! sample does. Taking a message completes it at the hub (MQTT's only answer).
//!
//! Send one with `send_cloud_to_device_message` or `twinhub c2d send`. Runs against twinhub or
//! Azure IoT Hub:
//!
//! ```sh
//! export IOTHUB_DEVICE_CONNECTION_STRING="HostName=...;DeviceId=...;SharedAccessKey=..."
//! cargo run --example receive_cloud_to_device_message -- --ca twinhub-data/tls/ca.pem
//! ```

mod common;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use common::DeviceArgs;

/// Prints the cloud-to-device messages the device receives.
#[derive(Debug, Parser)]
#[command(name = "receive_cloud_to_device_message")]
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
    let client = cli.device.client()?;
    // Subscribe before connecting, so messages queued while the device was away come at once.
    let mut messages = client.c2d_messages();
    client.connect().await?;
    common::log_connection_changes(&client);
    println!("Waiting for cloud-to-device messages, press Ctrl-C to exit");
    let limit = cli.device.bounds.max_requests;
    let work = async {
        let mut received = 0u64;
        while limit.is_none_or(|n| received < n) {
            let Some(message) = messages.recv().await else {
                anyhow::bail!("the client closed");
            };
            received += 1;
            println!("Message received ({received}):");
            println!("  data: {}", String::from_utf8_lossy(&message.body));
            for (name, value) in [
                ("message id", &message.message_id),
                ("correlation id", &message.correlation_id),
                ("content type", &message.content_type),
                ("content encoding", &message.content_encoding),
                ("expiry", &message.expiry),
            ] {
                if let Some(value) = value {
                    println!("  {name}: {value}");
                }
            }
            println!("  ack: {}", message.ack);
            for (name, value) in &message.properties {
                println!("  property {name}: {value}");
            }
        }
        anyhow::Ok(received)
    };
    let ended = common::run_bounded(&mut interrupt, cli.device.bounds.timeout, work).await;
    client.close().await;
    match ended? {
        common::Ended::Finished(n) => {
            println!("Received {n} messages");
            Ok(())
        }
        common::Ended::Interrupted => {
            println!("IoTHubClient sample stopped");
            Ok(())
        }
        common::Ended::TimedOut(limit) => match cli.device.bounds.max_requests {
            Some(n) => anyhow::bail!("received fewer than {n} messages in {} s", limit.as_secs()),
            None => {
                println!("Stopped after {} s", limit.as_secs());
                Ok(())
            }
        },
    }
}
