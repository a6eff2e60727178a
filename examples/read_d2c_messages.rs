//! Telemetry, back-end side: reads device-to-cloud messages from the hub's built-in
//! Event Hub-compatible endpoint over AMQP and prints each with its properties, as the
//! quickstart's `read_device_to_cloud_messages` does.
//!
//! Takes the Event Hub-compatible connection string (`twinhub connection-string --events`), or
//! the IoT Hub service one (the hub's redirect names the endpoint):
//!
//! ```sh
//! export EVENTHUB_CONNECTION_STRING="$(twinhub connection-string --events)"
//! cargo run --example read_d2c_messages -- --ca twinhub-data/tls/ca.pem --from-start
//! ```

mod common;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use twinhub_sdk::{EventsClient, StartPosition};

/// Prints the messages devices send.
#[derive(Debug, Parser)]
#[command(name = "read_d2c_messages")]
struct Cli {
    /// Event Hub-compatible (Endpoint=sb://..) or IoT Hub service connection string
    #[arg(long, env = "EVENTHUB_CONNECTION_STRING", hide_env_values = true)]
    connection_string: String,
    /// The consumer group to read as
    #[arg(long, default_value = "$Default")]
    consumer_group: String,
    /// Read what the endpoint holds already, not only new messages
    #[arg(long)]
    from_start: bool,
    /// Dial this AMQP port instead of 5671
    #[arg(long)]
    port: Option<u16>,
    /// Trust this CA certificate (PEM) too
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Exit after this many messages
    #[arg(long)]
    max_messages: Option<u64>,
    /// Exit after this many seconds; with --max-messages, having read fewer is an error
    #[arg(long, value_parser = common::parse_seconds)]
    timeout: Option<Duration>,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> Result<()> {
    let mut interrupt = common::interrupt()?;
    let mut builder =
        EventsClient::builder(&cli.connection_string).consumer_group(&cli.consumer_group);
    if let Some(ca) = &cli.ca {
        builder = builder
            .extra_ca_pem(std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?);
    }
    if let Some(port) = cli.port {
        builder = builder.port(port);
    }
    let client = builder.connect().await?;
    let start = if cli.from_start {
        StartPosition::Earliest
    } else {
        StartPosition::Latest
    };
    let mut events = client.receive(None, start).await?;
    println!(
        "Reading {} ({} partitions), press Ctrl-C to exit",
        client.event_hub_name(),
        client.partition_ids().len()
    );
    let work = async {
        let mut read = 0u64;
        while cli.max_messages.is_none_or(|n| read < n) {
            let Some(event) = events.next().await else {
                break;
            };
            let event = event?;
            read += 1;
            println!(
                "Received event from partition: {} (sequence {}, offset {})",
                event.partition, event.sequence_number, event.offset
            );
            println!(
                "Telemetry received: {}",
                String::from_utf8_lossy(&event.body)
            );
            println!("Properties (set by device): {:?}", event.properties);
            println!(
                "System properties (set by IoT Hub): {:?}",
                event.system_properties
            );
            println!(
                "Device: {}\n",
                event.device_id.as_deref().unwrap_or("(none)")
            );
        }
        anyhow::Ok(read)
    };
    let ended = common::run_bounded(&mut interrupt, cli.timeout, work).await;
    drop(events);
    client.close().await;
    match ended? {
        common::Ended::Finished(read) => {
            if let Some(n) = cli.max_messages
                && read < n
            {
                bail!("the endpoint closed after {read} of {n} messages");
            }
            println!("Read {read} messages");
            Ok(())
        }
        common::Ended::Interrupted => Ok(()),
        common::Ended::TimedOut(limit) => match cli.max_messages {
            Some(n) => bail!("read fewer than {n} messages within {} s", limit.as_secs()),
            None => Ok(()),
        },
    }
}
