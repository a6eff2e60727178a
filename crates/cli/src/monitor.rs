//! `twinhub monitor-events`: prints the device-to-cloud messages arriving on the built-in
//! events endpoint, one JSON object per line in the shape `az iot hub monitor-events` prints
//! (`{"event": {"origin", "module", "interface", "component", "payload", ...}}`), read over
//! AMQP through the SDK's `EventsClient`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::{Map, Value, json};
use twinhub_sdk::{Event, EventsClient, StartPosition};
use twinhub_server::HubFile;

#[derive(Args)]
pub struct MonitorArgs {
    /// Only this device's messages
    #[arg(long)]
    device: Option<String>,
    /// The consumer group to read as
    #[arg(long, default_value = "$Default")]
    consumer_group: String,
    /// What to show besides the payload: sys, app, anno, or all (comma-separated)
    #[arg(long, value_delimiter = ',')]
    properties: Vec<String>,
    /// Start at this enqueued time: RFC 3339 or milliseconds since the epoch [default: now]
    #[arg(long)]
    enqueued_time: Option<String>,
    /// Stop after this many seconds without a message; 0 runs until interrupted
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// AMQP port of the hub [default: the data dir's, else 5671]
    #[arg(long)]
    amqp_port: Option<u16>,
    /// A service connection string (IoT Hub or Event Hub-compatible; else read from --data-dir)
    #[arg(long, env = "TWINHUB_CONNECTION_STRING", hide_env_values = true)]
    connection_string: Option<String>,
    /// A local hub's data dir, for its connection string and CA
    #[arg(long, env = "TWINHUB_DATA_DIR", default_value = "./twinhub-data")]
    data_dir: PathBuf,
    /// A CA certificate (PEM) to trust besides the system roots
    #[arg(long)]
    ca: Option<PathBuf>,
}

#[derive(Default)]
struct Show {
    system: bool,
    application: bool,
    annotations: bool,
}

fn show(choices: &[String]) -> Result<Show> {
    let mut s = Show::default();
    for c in choices {
        match c.trim() {
            "sys" => s.system = true,
            "app" => s.application = true,
            "anno" => s.annotations = true,
            "all" => {
                s = Show {
                    system: true,
                    application: true,
                    annotations: true,
                }
            }
            "" => {}
            other => bail!("--properties takes sys, app, anno or all, not '{other}'"),
        }
    }
    Ok(s)
}

fn start_of(text: Option<&str>) -> Result<StartPosition> {
    let Some(text) = text else {
        return Ok(StartPosition::EnqueuedTime(
            jiff::Timestamp::now().as_millisecond(),
        ));
    };
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(StartPosition::EnqueuedTime(ms));
    }
    let t: jiff::Timestamp = text.parse().map_err(|e| {
        anyhow!("--enqueued-time '{text}' is neither RFC 3339 nor epoch milliseconds: {e}")
    })?;
    Ok(StartPosition::EnqueuedTime(t.as_millisecond()))
}

/// The payload as az shows it: JSON when it parses, else text.
fn payload(body: &[u8]) -> Value {
    match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned())),
        Err(_) => Value::String(String::from_utf8_lossy(body).into_owned()),
    }
}

fn render(event: &Event, show: &Show) -> Value {
    let text = |k: &str| {
        event
            .annotations
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let mut e = Map::new();
    e.insert(
        "origin".into(),
        json!(event.device_id.clone().unwrap_or_default()),
    );
    e.insert(
        "module".into(),
        json!(event.module_id.clone().unwrap_or_default()),
    );
    e.insert("interface".into(), json!(text("dt-dataschema")));
    e.insert("component".into(), json!(text("dt-subject")));
    e.insert("payload".into(), payload(&event.body));
    if show.annotations {
        e.insert("annotations".into(), json!(event.annotations));
    }
    if show.system || show.application {
        let mut p = Map::new();
        if show.system {
            p.insert("system".into(), json!(event.system_properties));
        }
        if show.application {
            p.insert("application".into(), json!(event.properties));
        }
        e.insert("properties".into(), Value::Object(p));
    }
    json!({ "event": e })
}

pub async fn run(args: MonitorArgs) -> Result<()> {
    let show = show(&args.properties)?;
    let start = start_of(args.enqueued_time.as_deref())?;
    let (cs, port, default_ca) = match &args.connection_string {
        Some(cs) => (cs.clone(), args.amqp_port, None),
        None => {
            let file = HubFile::read(&args.data_dir)
                .context("no --connection-string given and no local hub data dir found")?;
            let cs = file
                .events_connection_string("service", false)
                .ok_or_else(|| {
                    anyhow!("the hub has not run with the events endpoint yet; start it once")
                })?;
            (
                cs,
                args.amqp_port.or(file.amqp_port),
                Some(args.data_dir.join("tls").join("ca.pem")),
            )
        }
    };
    let mut builder = EventsClient::builder(&cs).consumer_group(&args.consumer_group);
    if let Some(port) = port {
        builder = builder.port(port);
    }
    if let Some(ca) = args.ca.clone().or(default_ca.filter(|p| p.exists())) {
        let pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
        builder = builder.extra_ca_pem(pem);
    }
    let client = builder.connect().await?;
    let mut events = client.receive(None, start).await?;
    eprintln!(
        "Monitoring {} ({} partitions, consumer group {}); Ctrl-C to stop",
        client.event_hub_name(),
        client.partition_ids().len(),
        args.consumer_group
    );
    let idle = (args.timeout > 0).then(|| Duration::from_secs(args.timeout));
    loop {
        let next = match idle {
            Some(idle) => match tokio::time::timeout(idle, events.next()).await {
                Ok(next) => next,
                Err(_) => {
                    eprintln!("No message for {} s; stopping", args.timeout);
                    break;
                }
            },
            None => events.next().await,
        };
        let Some(event) = next else { break };
        let event = event?;
        if let Some(device) = &args.device
            && event.device_id.as_deref() != Some(device.as_str())
        {
            continue;
        }
        if !crate::print_line(&render(&event, &show).to_string())? {
            // The reader went away (`| head`): stop as if interrupted.
            break;
        }
    }
    drop(events);
    client.close().await;
    Ok(())
}
