//! Cloud-to-device messages, back-end side: sends the device a few messages with custom
//! properties and `iothub-ack=full`, as Azure's `send_c2d_message` sample does, then prints
//! the delivery feedback the hub reports for them (`Success` once the device took one;
//! `Expired`, `Rejected`, `DeliveryCountExceeded` or `Purged` otherwise).
//!
//! Receive them with `receive_cloud_to_device_message`. Runs against twinhub or Azure IoT Hub:
//!
//! ```sh
//! export IOTHUB_CONNECTION_STRING="HostName=...;SharedAccessKeyName=service;SharedAccessKey=..."
//! export IOTHUB_DEVICE_ID=my-device
//! cargo run --example send_cloud_to_device_message -- --ca twinhub-data/tls/ca.pem --count 3
//! ```

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;
use twinhub_sdk::{Ack, C2dMessage, ServiceClient};

/// Sends cloud-to-device messages and waits for their feedback.
#[derive(Debug, Parser)]
#[command(name = "send_cloud_to_device_message")]
struct Cli {
    /// The hub's service connection string (HostName=..;SharedAccessKeyName=..;SharedAccessKey=..)
    #[arg(long, env = "IOTHUB_CONNECTION_STRING", hide_env_values = true)]
    connection_string: String,
    /// The device to send to
    #[arg(long, env = "IOTHUB_DEVICE_ID")]
    device_id: String,
    /// Trust this CA certificate (PEM) too
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Dial this AMQP port instead of 5671 (the port every official SDK uses)
    #[arg(long)]
    amqp_port: Option<u16>,
    /// Messages to send
    #[arg(long, default_value_t = 3)]
    count: u32,
    /// Seconds to wait for the feedback of every message; 0 sends and exits
    #[arg(long, default_value_t = 60)]
    feedback_timeout: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::exit_code(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> Result<()> {
    let mut builder = ServiceClient::builder(&cli.connection_string);
    if let Some(ca) = &cli.ca {
        builder = builder
            .extra_ca_pem(std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?);
    }
    if let Some(port) = cli.amqp_port {
        builder = builder.amqp_port(port);
    }
    let service = builder.build()?;
    // Listen first, so no record is missed between the sends and the wait.
    let mut feedback = if cli.feedback_timeout > 0 {
        Some(service.feedback().await?)
    } else {
        None
    };
    let mut waiting = BTreeSet::new();
    for i in 0..cli.count {
        let body = json!({"command": "blink", "sequence": i}).to_string();
        let message = C2dMessage::new(body.clone())
            .content_type("application/json")
            .content_encoding("utf-8")
            .ack(Ack::Full)
            .property("messageNumber", i.to_string())
            .property("priority", if i % 2 == 0 { "normal" } else { "high" });
        let id = service
            .send_c2d(&cli.device_id, message)
            .await
            .with_context(|| format!("sending message {i} to '{}' failed", cli.device_id))?;
        println!("Sent message {i} (id {id}): {body}");
        waiting.insert(id);
    }
    let Some(mut feedback) = feedback.take() else {
        return Ok(());
    };
    println!("Waiting for delivery feedback...");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(cli.feedback_timeout);
    while !waiting.is_empty() {
        let batch = match tokio::time::timeout_at(deadline, feedback.next()).await {
            Ok(batch) => batch?,
            Err(_) => bail!(
                "no feedback within {} s for {} message(s)",
                cli.feedback_timeout,
                waiting.len()
            ),
        };
        let Some(batch) = batch else {
            bail!("the hub closed the feedback link");
        };
        for record in &batch.records {
            println!(
                "Feedback: message {} to {}: {} ({})",
                record.original_message_id,
                record.device_id,
                record.status_code.as_str(),
                record.description
            );
            waiting.remove(&record.original_message_id);
        }
        feedback.complete(&batch).await?;
    }
    feedback.close().await;
    println!("Every message has its feedback");
    Ok(())
}
