//! `twinhub c2d`: send a device a cloud-to-device message (AMQP, through the SDK's
//! `ServiceClient::send_c2d`), print the delivery feedback as it arrives, and purge a device's
//! queue (REST). Works against a local hub's data dir or any hub's connection string.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::json;
use twinhub_sdk::{Ack, C2dMessage, ServiceClient};
use twinhub_server::HubFile;

#[derive(Args)]
pub struct C2dArgs {
    #[command(subcommand)]
    command: C2dCommand,
    #[command(flatten)]
    target: crate::Target,
    /// AMQP port of the hub [default: the data dir's, else 5671]
    #[arg(long, global = true)]
    amqp_port: Option<u16>,
}

#[derive(Subcommand)]
enum C2dCommand {
    /// Queue a message for a device; prints its message id once the hub has it on disk
    Send {
        device_id: String,
        /// The message body (text)
        body: String,
        /// An application property, NAME=VALUE (repeatable)
        #[arg(long = "property", value_name = "NAME=VALUE")]
        properties: Vec<String>,
        /// Delivery feedback to ask for: none, positive, negative or full
        #[arg(long, default_value = "none")]
        ack: String,
        /// Seconds the message lives [default: the hub's, an hour]
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
        /// The message id [default: a random UUID]
        #[arg(long)]
        message_id: Option<String>,
        #[arg(long)]
        correlation_id: Option<String>,
        #[arg(long)]
        content_type: Option<String>,
        #[arg(long)]
        content_encoding: Option<String>,
    },
    /// Print delivery feedback records as they arrive, one JSON object per line, completing
    /// each batch after printing it
    Feedback {
        /// Stop after this many seconds without feedback; 0 runs until interrupted
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Remove every message queued for a device; prints how many
    Purge { device_id: String },
}

fn client(args: &C2dArgs) -> Result<ServiceClient> {
    let target = &args.target;
    let local = HubFile::read(&target.data_dir).ok();
    let (cs, default_ca) = match &target.connection_string {
        Some(cs) => (cs.clone(), None),
        None => {
            let file = local
                .as_ref()
                .context("no --connection-string given and no local hub data dir found")?;
            let cs = file
                .connection_string("service")
                .or_else(|| file.connection_string("iothubowner"))
                .ok_or_else(|| anyhow!("the data dir has no service or iothubowner policy"))?;
            (cs, Some(target.data_dir.join("tls").join("ca.pem")))
        }
    };
    let mut builder = ServiceClient::builder(&cs).timeout(Duration::from_secs(60));
    let ca = target.ca.clone().or(default_ca.filter(|p| p.exists()));
    if let Some(ca) = ca {
        let pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
        builder = builder.extra_ca_pem(pem);
    }
    let port = args.amqp_port.or_else(|| {
        target
            .connection_string
            .is_none()
            .then(|| local.as_ref().and_then(|f| f.amqp_port))
            .flatten()
    });
    if let Some(port) = port {
        builder = builder.amqp_port(port);
    }
    Ok(builder.build()?)
}

pub async fn run(args: C2dArgs) -> Result<()> {
    let svc = client(&args)?;
    match args.command {
        C2dCommand::Send {
            device_id,
            body,
            properties,
            ack,
            ttl,
            message_id,
            correlation_id,
            content_type,
            content_encoding,
        } => {
            let ack = Ack::parse(&ack)
                .ok_or_else(|| anyhow!("--ack must be none, positive, negative or full"))?;
            let mut message = C2dMessage::new(body.into_bytes()).ack(ack);
            for p in &properties {
                let (name, value) = p
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--property {p:?} is not NAME=VALUE"))?;
                if name.is_empty() {
                    bail!("--property {p:?} has an empty name");
                }
                message = message.property(name, value);
            }
            if let Some(ttl) = ttl {
                message = message.ttl(Duration::from_secs(ttl));
            }
            if let Some(id) = message_id {
                message = message.message_id(id);
            }
            if let Some(id) = correlation_id {
                message = message.correlation_id(id);
            }
            if let Some(ct) = content_type {
                message = message.content_type(ct);
            }
            if let Some(ce) = content_encoding {
                message = message.content_encoding(ce);
            }
            let id = svc.send_c2d(&device_id, message).await?;
            println!(
                "{}",
                json!({"deviceId": device_id, "messageId": id, "ack": ack.as_str()})
            );
            Ok(())
        }
        C2dCommand::Feedback { wait } => {
            let mut feedback = svc.feedback().await?;
            loop {
                let next = if wait == 0 {
                    feedback.next().await?
                } else {
                    match tokio::time::timeout(Duration::from_secs(wait), feedback.next()).await {
                        Ok(next) => next?,
                        Err(_) => break,
                    }
                };
                let Some(batch) = next else { break };
                for record in &batch.records {
                    println!("{}", serde_json::to_string(record)?);
                }
                feedback.complete(&batch).await?;
            }
            feedback.close().await;
            Ok(())
        }
        C2dCommand::Purge { device_id } => {
            let purged = svc.purge_c2d(&device_id).await?;
            println!(
                "{}",
                json!({"deviceId": device_id, "totalMessagesPurged": purged})
            );
            Ok(())
        }
    }
}
